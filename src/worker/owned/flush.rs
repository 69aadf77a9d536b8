//! Writing a window of the owned loop: rows from memory → model → one pipeline of plain writes
//! (fenced per member) on a task of its own while intake goes on → offsets once acknowledged. And
//! decay ticks, one schedule chunk per written window.

use std::collections::HashSet;
use std::time::Instant;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Owned;
use crate::coalesce::MsgRef;
use crate::model::{FeatureMap, PairInput};
use crate::owned::route::partition_of;
use crate::store::{scheduled_member, MemberWrite};
use crate::worker::retry::{retry, Stop};
use crate::worker::{chrono_now_ms, Worker};

/// One pair to score: member, candidate, as_of, moment ts.
type Row = (String, String, i64, i64);

/// The window being written: one at a time, in order (a later window's plan diffs against this
/// one's, as if it had landed; a failed write is retried until it lands or the worker exits).
pub(in crate::worker) struct Writing {
    seq: u64,
    members: Vec<String>,
    messages: Vec<MsgRef>,
    rows: usize,
    scored_us: u64,
    started: Instant,
    handle: JoinHandle<Result<Vec<bool>, Stop>>,
}

impl Writing {
    /// Rows this write scored.
    pub(in crate::worker) fn rows(&self) -> usize {
        self.rows
    }

    /// The write's outcome (a panicked write task is fatal).
    pub(in crate::worker) async fn wait(&mut self) -> Result<Vec<bool>, Stop> {
        match (&mut self.handle).await {
            Ok(r) => r,
            Err(e) => Err(Stop::Fatal(anyhow::anyhow!("the write task failed: {e}"))),
        }
    }
}

impl Worker {
    /// Writes the window now and waits for it (and for the one in flight before it): on a
    /// rebalance and at shutdown.
    pub(super) async fn flush_owned(
        &self,
        st: &mut Owned,
        flight: &mut Option<Writing>,
        hard_stop: &CancellationToken,
    ) {
        if let Some(mut w) = flight.take() {
            let result = w.wait().await;
            self.finish_write(st, w, result);
        }
        if st.fatal.is_none() {
            if let Some(mut w) = self.start_write(st, hard_stop).await {
                let result = w.wait().await;
                self.finish_write(st, w, result);
            }
        }
    }

    /// Scores the window from memory, plans every changed member's writes and starts writing them
    /// on a task (None: nothing to write, or a fatal error).
    pub(super) async fn start_write(
        &self,
        st: &mut Owned,
        hard_stop: &CancellationToken,
    ) -> Option<Writing> {
        if st.window.is_empty()
            && st.touched.is_empty()
            && st.unscheduled.is_empty()
            && st.retired.is_empty()
        {
            return None;
        }
        let window = st.window.take();
        let flush_started = Instant::now();
        let mut rows: Vec<Row> = Vec::new();
        // Schedule entries to remove: (partition, entry).
        let mut gone = std::mem::take(&mut st.unscheduled);
        for (m, work) in &window.members {
            let Some(mem) = st.cache.get(m) else {
                continue;
            };
            let prev = |c: &str| mem.as_of(c).unwrap_or(i64::MIN);
            if let Some(all) = work.all {
                for (c, p) in mem.live_pairs() {
                    let t = work.pairs.get(c).copied().unwrap_or(all).max(all);
                    rows.push((m.clone(), c.clone(), t.max(prev(c)), p.ts));
                }
            }
            // A pair gone since is not scored: the member's schedule follows from its live pairs.
            for (c, t) in &work.pairs {
                match mem.live(c) {
                    Some(_) if work.all.is_some() => {}
                    Some(p) => rows.push((m.clone(), c.clone(), (*t).max(prev(c)), p.ts)),
                    None => {}
                }
            }
        }

        let layout = self.scorer.engine().layout();
        let empty = FeatureMap::new();
        let mut matrix = Vec::with_capacity(rows.len() * layout.width());
        let mut kept: Vec<usize> = Vec::with_capacity(rows.len());
        // Pairs the model refused, tried again later: (member, candidate, at).
        let mut refused: Vec<(String, String, i64)> = Vec::new();
        let max_ms = self.settings.decay.max_interval_secs.saturating_mul(1000);
        let later = |as_of: i64| as_of.saturating_add(i64::try_from(max_ms).unwrap_or(i64::MAX));
        for (i, (m, c, as_of, _)) in rows.iter().enumerate() {
            let Some(mem) = st.cache.get(m) else { continue };
            let Some(p) = mem.live(c) else { continue };
            let input = PairInput {
                member: &mem.features,
                candidate: st.cache.candidate(c).unwrap_or(&empty),
                pair: &p.features,
                reason: &p.reason,
                moment_ts_ms: p.ts,
                as_of_ms: *as_of,
            };
            match layout.push_row(&input, &mut matrix) {
                Ok(()) => kept.push(i),
                Err(e) => {
                    tracing::error!(error = %e, "stored features refused by the model; pair skipped");
                    self.metrics
                        .pairs_skipped_total
                        .with_label_values(&["features_refused"])
                        .inc();
                    refused.push((m.clone(), c.clone(), later(*as_of)));
                }
            }
        }
        let max_rows = self.settings.batch.max_pairs.max(1) * layout.width().max(1);
        let mut scores = Vec::with_capacity(kept.len());
        for chunk in matrix.chunks(max_rows) {
            match self.scorer.score(chunk.to_vec()).await {
                Ok((_, s)) => scores.extend(s),
                Err(e) => {
                    st.fatal
                        .get_or_insert(anyhow::anyhow!("the model failed to score a window: {e}"));
                    return None;
                }
            }
        }
        for (&i, s) in kept.iter().zip(&scores) {
            let (m, c, as_of, _) = &rows[i];
            if !s.is_finite() {
                self.metrics
                    .pairs_skipped_total
                    .with_label_values(&["non_finite_score"])
                    .inc();
                refused.push((m.clone(), c.clone(), later(*as_of)));
                continue;
            }
            let Some(mem) = st.cache.get_mut(m) else {
                continue;
            };
            if mem.set_score(c, f64::from(*s), *as_of) {
                st.touched.insert(m.clone());
            }
        }
        for (m, c, at) in refused {
            if let Some(mem) = st.cache.get_mut(&m) {
                mem.refuse(&c, at);
                st.touched.insert(m);
            }
        }

        let scored_at = flush_started.elapsed();
        let model = self.scorer.engine().spec().model_id();
        let (top_n, ttl_ms, now) = (
            self.settings.output.top_n,
            self.settings.output.ttl_secs.saturating_mul(1000),
            chrono_now_ms(),
        );
        let horizon = self.settings.state.tombstone_horizon_secs;
        let tombstones =
            (horizon > 0).then(|| i64::try_from(horizon.saturating_mul(1000)).unwrap_or(i64::MAX));
        let mut writes: Vec<MemberWrite> = Vec::new();
        // Each changed member is scheduled at its earliest due pair: (partition, member, due).
        let decay = &self.settings.decay;
        let mut due: Vec<(i32, String, i64)> = Vec::new();
        for m in std::mem::take(&mut st.touched) {
            let Some(mem) = st.cache.get_mut(&m) else {
                continue;
            };
            let Some(&generation) = st.gens.get(&mem.partition) else {
                continue;
            };
            let partition = mem.partition;
            mem.set_tombstone_horizon(tombstones);
            let ops = mem.plan(&model, top_n, ttl_ms, now);
            match mem.next_due(|a, ts| decay.next_due(a, ts)) {
                Some(at) => due.push((partition, m.clone(), at)),
                None => gone.push((partition, m.clone())),
            }
            if !ops.is_empty() {
                writes.push(MemberWrite {
                    member: m,
                    partition,
                    generation,
                    ops,
                });
            }
        }
        // Dormant members leave the schedule, unless this write schedules them again (an event
        // woke the member).
        let again: HashSet<&str> = due.iter().map(|(_, m, _)| m.as_str()).collect();
        let retired: Vec<(i32, String)> = std::mem::take(&mut st.retired)
            .into_iter()
            .filter(|(_, m)| !again.contains(m.as_str()))
            .collect();
        gone.extend(retired);
        st.seq += 1;
        for t in st.ticks.iter_mut() {
            if t.queued {
                t.queued = false;
                t.in_write = Some(st.seq);
            }
        }
        let members: Vec<String> = writes.iter().map(|w| w.member.clone()).collect();
        let mut gens: Vec<(i32, u64)> = writes
            .iter()
            .map(|w| w.partition)
            .chain(due.iter().map(|d| d.0))
            .chain(gone.iter().map(|d| d.0))
            .filter_map(|p| Some((p, *st.gens.get(&p)?)))
            .collect();
        gens.sort_unstable();
        gens.dedup();
        // Schedule changes of a partition this worker no longer owns are not written.
        due.retain(|d| st.gens.contains_key(&d.0));
        gone.retain(|d| st.gens.contains_key(&d.0));
        let tx = st.writer_tx.clone();
        let (store, metrics, health) = (
            self.store.clone(),
            self.metrics.clone(),
            self.health.clone(),
        );
        let (give_up, hard_stop) = (self.give_up_after(), hard_stop.clone());
        let handle = tokio::spawn(async move {
            let due_refs: Vec<(i32, &str, i64)> =
                due.iter().map(|(p, m, t)| (*p, m.as_str(), *t)).collect();
            let gone_refs: Vec<(i32, &str)> = gone.iter().map(|(p, e)| (*p, e.as_str())).collect();
            retry("write", &metrics, &health, give_up, &hard_stop, || {
                store.write_owned(&tx, &gens, &writes, &due_refs, &gone_refs)
            })
            .await
        });
        Some(Writing {
            seq: st.seq,
            members,
            messages: window.messages,
            rows: rows.len(),
            scored_us: scored_at.as_micros() as u64,
            started: Instant::now(),
            handle,
        })
    }

    /// A write ended: members a later owner has taken drop their partition; the rest are
    /// acknowledged with the window's messages; ticks whose chunk it held may step again.
    pub(super) fn finish_write(&self, st: &mut Owned, w: Writing, result: Result<Vec<bool>, Stop>) {
        let flags = match result {
            Ok(f) => f,
            // Hard stop during an outage: nothing acknowledged, replayed later.
            Err(Stop::Cancelled) => return,
            Err(Stop::Fatal(e)) => {
                st.fatal.get_or_insert(e);
                return;
            }
        };
        self.metrics
            .redis_write_seconds
            .observe(w.started.elapsed().as_secs_f64());
        tracing::debug!(
            rows = w.rows,
            members = w.members.len(),
            messages = w.messages.len(),
            score_us = w.scored_us,
            write_us = w.started.elapsed().as_micros() as u64,
            "window written"
        );
        let n = st.partitions;
        let mut taken: HashSet<i32> = HashSet::new();
        for (m, ok) in w.members.iter().zip(flags) {
            if ok {
                st.cache.acknowledged(m);
            } else {
                taken.insert(partition_of(m, n));
            }
        }
        for p in taken {
            st.fence(p, None);
        }
        let done: Vec<_> = w
            .messages
            .into_iter()
            .filter(|m| !st.fenced.contains_key(&m.tp.1))
            .collect();
        self.complete_tracked(&mut st.tracker, &done, true);
        for t in st.ticks.iter_mut() {
            if t.in_write.is_some_and(|s| s <= w.seq) {
                t.in_write = None;
            }
        }
        let window = &st.window.members;
        let evicted = st.cache.evict(|m| window.contains_key(m));
        if evicted > 0 {
            tracing::debug!(
                evicted,
                members = st.cache.len(),
                bytes = st.cache.bytes(),
                "cold members evicted"
            );
        }
    }

    /// Takes the next chunk of the first decay tick into the window: true when one was added
    /// (the caller writes it). A tick whose sweep finds nothing left due is done (see
    /// [`super::TickJob`] for the walk and the sweep).
    pub(super) async fn step_tick(&self, st: &mut Owned, hard_stop: &CancellationToken) -> bool {
        loop {
            // Ticks of different partitions overlap: one is read and scored while another's
            // chunk is written.
            let Some(i) = st
                .ticks
                .iter()
                .position(|j| !(j.queued || j.sweep && j.in_write.is_some()))
            else {
                return false;
            };
            let job = &st.ticks[i];
            let (p, as_of, sweep, after) = (job.partition, job.as_of, job.sweep, job.after);
            let id = (job.msg.tp.clone(), job.msg.offset);
            let chunk = self.settings.decay.chunk;
            let due: Vec<String> = if sweep {
                let Some(due) = self
                    .attempt(&mut st.fatal, "read schedule", hard_stop, || {
                        self.store.partition_due(p, as_of, chunk)
                    })
                    .await
                else {
                    return false;
                };
                let first = due.first().cloned();
                let Some(job) = st.ticks.get_mut(i) else {
                    return false;
                };
                if due.is_empty() || first == job.last_first {
                    if !due.is_empty() {
                        tracing::error!(
                            partition = p,
                            "a decay tick made no progress; it ends here"
                        );
                    }
                    if let Some(job) = st.ticks.remove(i) {
                        tracing::debug!(partition = p, as_of, "decay tick done");
                        self.complete_tracked(&mut st.tracker, &[job.msg], true);
                    }
                    return false;
                }
                job.last_first = first;
                due
            } else {
                let Some(due) = self
                    .attempt(&mut st.fatal, "read schedule", hard_stop, || {
                        self.store.partition_due_after(p, after, as_of, chunk)
                    })
                    .await
                else {
                    return false;
                };
                let Some(job) = st.ticks.get_mut(i) else {
                    return false;
                };
                let Some(last) = due.last() else {
                    job.sweep = true;
                    continue;
                };
                job.after = Some(last.1);
                due.into_iter().map(|(e, _)| e).collect()
            };
            match self.take_due(st, p, as_of, due, hard_stop).await {
                None => return false,
                // Nothing to write (all rescored already, or not this worker's): read on.
                Some(false) => {}
                Some(true) => {
                    // Loading may have fenced a partition and dropped its ticks: found by id.
                    let job = st
                        .ticks
                        .iter_mut()
                        .find(|j| (&j.msg.tp, j.msg.offset) == (&id.0, id.1));
                    if let Some(job) = job {
                        job.queued = true;
                    }
                    st.window.touch_deadline();
                    return true;
                }
            }
        }
    }

    /// Puts a chunk of `p`'s schedule due by `as_of` into the window: each member's pairs due
    /// by then (so a member is written once per tick). Some(true) when it added work to write,
    /// None when the members could not be loaded. A member with nothing due (rescored by this
    /// tick already, or an entry older than its state) is written again only to correct its entry.
    async fn take_due(
        &self,
        st: &mut Owned,
        p: i32,
        as_of: i64,
        due: Vec<String>,
        hard_stop: &CancellationToken,
    ) -> Option<bool> {
        let n = st.partitions;
        let entries: Vec<(String, String, bool)> = due
            .into_iter()
            .map(|e| {
                let (m, legacy) = scheduled_member(&e);
                (e, m, legacy)
            })
            .collect();
        let members: Vec<String> = entries
            .iter()
            .filter(|(_, m, _)| partition_of(m, n) == p)
            .map(|(_, m, _)| m.clone())
            .collect();
        if !self.ensure_loaded(st, members, hard_stop).await {
            return None;
        }
        let size = |st: &Owned| {
            (
                st.window.size(),
                st.unscheduled.len(),
                st.retired.len(),
                st.touched.len(),
            )
        };
        let before = size(st);
        let decay = &self.settings.decay;
        for (entry, m, legacy) in entries {
            let here = partition_of(&m, n) == p;
            // An entry of the earlier layout, or one that is not this partition's, goes.
            if legacy || !here {
                st.unscheduled.push((p, entry));
            }
            let Some(mem) = st.cache.get(&m).filter(|_| here) else {
                continue;
            };
            if decay.dormant(mem.last_event, as_of) {
                // No decay for a dormant member: it leaves the schedule, its output's TTL runs
                // out, its next event rescores it whole.
                st.retired.push((p, m));
                continue;
            }
            let pairs = mem.due_by(as_of, |a, ts| decay.next_due(a, ts));
            if pairs.is_empty() {
                st.touched.insert(m);
                continue;
            }
            for c in pairs {
                st.window.pair(&m, &c, as_of);
            }
        }
        Some(size(st) != before)
    }
}
