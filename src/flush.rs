//! Load → batch → score → write: one batch window becomes model runs and guarded Redis writes.
//!
//! Guarantee: when `flush` returns Ok, every pair the window asked for that still exists has a
//! score in Redis computed from the state read after the window's events were applied, as of
//! max(trigger time, the pair's previous as_of), and a decay-schedule entry after that time;
//! pairs that no longer exist are unscheduled. An Err means nothing may be acknowledged: the
//! caller retries the same window (every write is idempotent under the event-time guards).

use std::collections::HashMap;
use std::time::Instant;

use crate::coalesce::Window;
use crate::config::{DecaySettings, OutputSettings};
use crate::model::{FeatureMap, PairInput};
use crate::score::Scorer;
use crate::store::{ScoreWrite, Store, StoreError, WriteFlag};

/// Why a flush must be retried.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Model(#[from] crate::model::EngineError),
}

/// What one flush did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FlushStats {
    pub members: usize,
    /// Whole-member triggers, and the pairs they covered (for the window's size estimate).
    pub member_triggers: usize,
    pub member_rows: usize,
    pub pairs_scored: usize,
    pub written: usize,
    pub superseded: usize,
    pub gone: usize,
    /// Pairs whose stored features the model refuses (never expected: input is validated).
    pub refused: usize,
    /// Pairs the model gave a NaN or infinite score: skipped, tried again a decay interval later.
    pub non_finite: usize,
    /// Reading the members' and candidates' state.
    pub load_seconds: f64,
    pub model_seconds: f64,
    pub redis_write_seconds: f64,
}

/// One pair to score.
struct Row<'a> {
    member: &'a str,
    candidate: &'a str,
    as_of: i64,
    moment_ts: i64,
}

pub struct Flusher<'a> {
    pub store: &'a Store,
    pub scorer: &'a Scorer,
    pub output: &'a OutputSettings,
    pub decay: &'a DecaySettings,
    pub max_pairs: usize,
}

impl Flusher<'_> {
    pub async fn flush(&self, window: &Window, now_ms: i64) -> Result<FlushStats, FlushError> {
        let mut stats = FlushStats::default();
        if window.members.is_empty() {
            return Ok(stats);
        }
        let members: Vec<&str> = window.members.keys().map(String::as_str).collect();
        let requests: Vec<(&str, Option<Vec<&str>>)> = members
            .iter()
            .map(|m| {
                let w = &window.members[*m];
                let only = w
                    .all
                    .is_none()
                    .then(|| w.pairs.keys().map(String::as_str).collect());
                (*m, only)
            })
            .collect();
        let load_started = Instant::now();
        let loaded = self.store.load_members(&requests).await?;
        stats.members = members.len();

        // Pairs to score, and pairs asked for that no longer exist (to unschedule).
        let mut rows: Vec<Row<'_>> = Vec::new();
        let mut gone: Vec<(&str, &str)> = Vec::new();
        for (m, state) in members.iter().zip(&loaded) {
            let work = &window.members[*m];
            if let Some(all) = work.all {
                stats.member_triggers += 1;
                stats.member_rows += state.pairs.len();
                for (c, p) in &state.pairs {
                    let t = work.pairs.get(c).copied().unwrap_or(all).max(all);
                    let prev = state.scored_as_of.get(c).copied().unwrap_or(i64::MIN);
                    rows.push(Row {
                        member: m,
                        candidate: c,
                        as_of: t.max(prev),
                        moment_ts: p.ts,
                    });
                }
            }
            for (c, t) in &work.pairs {
                match state.pairs.get(c) {
                    Some(_) if work.all.is_some() => {} // already in the member-wide set
                    Some(p) => {
                        let prev = state.scored_as_of.get(c).copied().unwrap_or(i64::MIN);
                        rows.push(Row {
                            member: m,
                            candidate: c,
                            as_of: (*t).max(prev),
                            moment_ts: p.ts,
                        });
                    }
                    None => gone.push((m, c)),
                }
            }
        }

        // Coalescing switched off (a measurement mode): every repeated trigger is scored again.
        for (m, cand, t) in &window.uncoalesced {
            let Some(i) = members.iter().position(|x| x == m) else {
                continue;
            };
            let state = &loaded[i];
            let prev = |c: &str| state.scored_as_of.get(c).copied().unwrap_or(i64::MIN);
            match cand {
                None => {
                    for (c, p) in &state.pairs {
                        rows.push(Row {
                            member: members[i],
                            candidate: c,
                            as_of: (*t).max(prev(c)),
                            moment_ts: p.ts,
                        });
                    }
                }
                Some(c) => {
                    if let Some((c, p)) = state.pairs.get_key_value(c.as_str()) {
                        rows.push(Row {
                            member: members[i],
                            candidate: c,
                            as_of: (*t).max(prev(c)),
                            moment_ts: p.ts,
                        });
                    }
                }
            }
        }

        let mut cands: Vec<&str> = rows.iter().map(|r| r.candidate).collect();
        cands.sort_unstable();
        cands.dedup();
        let cand_features: HashMap<&str, FeatureMap> = cands
            .iter()
            .copied()
            .zip(self.store.load_candidates(&cands).await?)
            .collect();
        stats.load_seconds = load_started.elapsed().as_secs_f64();
        let by_member: HashMap<&str, &crate::store::LoadedMember> =
            members.iter().copied().zip(&loaded).collect();

        // Build the matrix; a refused row is unscheduled to max_interval later and counted.
        let layout = self.scorer.engine().layout();
        let empty = FeatureMap::new();
        let mut matrix = Vec::with_capacity(rows.len() * layout.width());
        let mut kept: Vec<&Row<'_>> = Vec::with_capacity(rows.len());
        let mut retry_later: Vec<(&str, &str, i64)> = Vec::new();
        let max_ms = self.decay.max_interval_secs.saturating_mul(1000);
        let later = |as_of: i64| as_of.saturating_add(i64::try_from(max_ms).unwrap_or(i64::MAX));
        for r in &rows {
            let m = by_member[r.member];
            let p = &m.pairs[r.candidate];
            let input = PairInput {
                member: &m.features,
                candidate: cand_features.get(r.candidate).unwrap_or(&empty),
                pair: &p.pair_features,
                reason: &p.reason,
                moment_ts_ms: p.ts,
                as_of_ms: r.as_of,
            };
            match layout.push_row(&input, &mut matrix) {
                Ok(()) => kept.push(r),
                Err(e) => {
                    tracing::error!(error = %e, "stored features refused by the model; pair skipped");
                    stats.refused += 1;
                    retry_later.push((r.member, r.candidate, later(r.as_of)));
                }
            }
        }

        // Score in model runs of at most max_pairs rows.
        let started = Instant::now();
        let mut scores = Vec::with_capacity(kept.len());
        for chunk in matrix.chunks(self.max_pairs * layout.width()) {
            let (_, s) = self.scorer.score(chunk.to_vec()).await?;
            scores.extend(s);
        }
        stats.model_seconds = started.elapsed().as_secs_f64();
        stats.pairs_scored = scores.len();

        let mut per_member: HashMap<&str, Vec<(ScoreWrite, i64)>> = HashMap::new();
        for (r, s) in kept.iter().zip(&scores) {
            if !s.is_finite() {
                // Redis refuses a NaN score and would fail the whole window, forever: the pair is
                // skipped (counted, logged) and tried again a decay interval later.
                stats.non_finite += 1;
                retry_later.push((r.member, r.candidate, later(r.as_of)));
                continue;
            }
            per_member.entry(r.member).or_default().push((
                ScoreWrite {
                    candidate: r.candidate.to_owned(),
                    score: *s,
                    as_of: r.as_of,
                },
                r.moment_ts,
            ));
        }
        let batches: Vec<(&str, Vec<ScoreWrite>)> = per_member
            .iter()
            .map(|(m, ws)| (*m, ws.iter().map(|(w, _)| w.clone()).collect()))
            .collect();
        let model_id = self.scorer.engine().spec().model_id();
        let started = Instant::now();
        let flags = self
            .store
            .write_scores(
                &model_id,
                self.output.top_n,
                self.output.ttl_secs * 1000,
                now_ms,
                &batches,
            )
            .await?;

        let mut due: Vec<(&str, &str, i64)> = retry_later;
        for ((m, _), fl) in batches.iter().zip(&flags) {
            for ((w, moment_ts), f) in per_member[m].iter().zip(fl) {
                match f {
                    WriteFlag::Written => {
                        stats.written += 1;
                        due.push((m, &w.candidate, self.decay.next_due(w.as_of, *moment_ts)));
                    }
                    WriteFlag::Superseded(later) => {
                        stats.superseded += 1;
                        due.push((m, &w.candidate, self.decay.next_due(*later, *moment_ts)));
                    }
                    WriteFlag::Gone => {
                        stats.gone += 1;
                        gone.push((m, &w.candidate));
                    }
                }
            }
        }
        self.store.schedule(&due, &gone).await?;
        stats.redis_write_seconds = started.elapsed().as_secs_f64();
        Ok(stats)
    }
}
