//! State operations: guarded writes through Lua scripts, and batched reads for scoring.

use std::collections::HashMap;

use redis::{Cmd, FromRedisValue, Script, Value};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};
use crate::model::FeatureMap;

#[derive(Clone)]
pub(super) struct Scripts {
    pub(super) features: Script,
    pub(super) pair: Script,
    pub(super) scores: Script,
    pub(super) rev: Script,
    pub(super) fanouts: Script,
    pub(super) owned_load: Script,
    pub(super) owned_write: Script,
    pub(super) owned_rev: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            features: Script::new(include_str!("features.lua")),
            pair: Script::new(include_str!("pair.lua")),
            scores: Script::new(include_str!("scores.lua")),
            rev: Script::new(include_str!("rev.lua")),
            fanouts: Script::new(include_str!("fanouts.lua")),
            owned_load: Script::new(include_str!("owned_load.lua")),
            owned_write: Script::new(include_str!("owned_write.lua")),
            owned_rev: Script::new(include_str!("owned_rev.lua")),
        }
    }
}

/// A pair as stored in `pairs:{member}`; `rm` marks a removal tombstone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairState {
    #[serde(rename = "r", default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(rename = "pf", default, skip_serializing_if = "FeatureMap::is_empty")]
    pub pair_features: FeatureMap,
    /// Moment time (ms), the pair's last-writer-wins version together with `o`.
    pub ts: i64,
    /// Offset of the event that wrote this state (tie-break for equal `ts`).
    pub o: i64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rm: bool,
}

/// What a scoring batch needs of one member.
#[derive(Debug, Clone, Default)]
pub struct LoadedMember {
    pub features: FeatureMap,
    /// Live (not removed) pairs by candidate.
    pub pairs: HashMap<String, PairState>,
    /// as_of (ms) of each pair's stored score.
    pub scored_as_of: HashMap<String, i64>,
}

/// Result of a partial feature update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureOutcome {
    pub applied: usize,
    pub stale: usize,
}

/// One new score for a member's candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreWrite {
    pub candidate: String,
    pub score: f32,
    pub as_of: i64,
}

/// What happened to one [`ScoreWrite`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFlag {
    Written,
    /// A score as of a later time (the value, ms) is already stored.
    Superseded(i64),
    /// The pair was removed (or never existed) by the time the score was written.
    Gone,
}

/// Most candidates in one score-script call (a member with more is written in several calls).
pub const SCORE_CALL_PAIRS: usize = 1024;

pub(super) fn protocol(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Protocol(format!("{what}: {e}"))
}

pub(super) fn parse_map(v: Value, what: &str) -> Result<FeatureMap, StoreError> {
    let raw: HashMap<String, String> = FromRedisValue::from_redis_value(&v)?;
    raw.into_iter()
        .map(|(k, s)| {
            s.parse::<f64>()
                .map(|x| (k, x))
                .map_err(|e| protocol(what, e))
        })
        .collect()
}

/// The due-schedule member for a pair: unambiguous for any ids.
pub(crate) fn due_member(member: &str, candidate: &str) -> String {
    serde_json::to_string(&(member, candidate)).expect("two strings always serialise")
}

impl Store {
    /// Runs script invocations in order; on a single Redis they go in one pipeline (EVALSHA,
    /// loading the scripts once if Redis lost them, e.g. after a restart).
    pub(super) async fn eval_calls(
        &self,
        calls: &[(&Script, Vec<String>, Vec<String>)],
    ) -> Result<Vec<Value>, StoreError> {
        let build = || {
            calls
                .iter()
                .map(|(script, keys, args)| {
                    let mut c = redis::cmd("EVALSHA");
                    c.arg(script.get_hash()).arg(keys.len()).arg(keys).arg(args);
                    c
                })
                .collect::<Vec<Cmd>>()
        };
        match self.multi(build()).await {
            Err(StoreError::Redis(e)) if e.kind() == redis::ErrorKind::NoScriptError => {
                self.load_scripts().await?;
                self.multi(build()).await
            }
            other => other,
        }
    }

    async fn eval_many(
        &self,
        script: &Script,
        calls: Vec<(Vec<String>, Vec<String>)>,
    ) -> Result<Vec<Value>, StoreError> {
        let calls: Vec<_> = calls.into_iter().map(|(k, a)| (script, k, a)).collect();
        self.eval_calls(&calls).await
    }

    /// Loads every script (on every primary, for a cluster).
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        let mut c = self.conn();
        for s in [
            &self.scripts.features,
            &self.scripts.pair,
            &self.scripts.scores,
            &self.scripts.rev,
            &self.scripts.fanouts,
            &self.scripts.owned_load,
            &self.scripts.owned_write,
            &self.scripts.owned_rev,
        ] {
            let r = s.prepare_invoke().load_async(&mut c).await;
            self.checked(r).await?;
        }
        Ok(())
    }

    /// Loads features and pairs of each member: every pair (`None`) or only the listed candidates
    /// (a hot member's other pairs are not read for a single new candidate). One round trip on a
    /// single Redis.
    pub async fn load_members(
        &self,
        members: &[(&str, Option<Vec<&str>>)],
    ) -> Result<Vec<LoadedMember>, StoreError> {
        let mut cmds = Vec::with_capacity(members.len() * 3);
        for (m, only) in members {
            for key in [self.keys.pairs(m), self.keys.scored_as_of(m)] {
                let mut c = match only {
                    None => redis::cmd("HGETALL"),
                    Some(_) => redis::cmd("HMGET"),
                };
                c.arg(key);
                if let Some(cands) = only {
                    c.arg(cands);
                }
                cmds.push(c);
            }
            let mut c = redis::cmd("HGETALL");
            c.arg(self.keys.member_features(m));
            cmds.push(c);
        }
        let vals = self.multi(cmds).await?;
        let mut out = Vec::with_capacity(members.len());
        let mut it = vals.into_iter();
        for (_, only) in members {
            let (Some(pairs), Some(asof), Some(feats)) = (it.next(), it.next(), it.next()) else {
                return Err(protocol("load members", "short reply"));
            };
            let (raw, asof_raw): (Vec<(String, String)>, Vec<(String, i64)>) = match only {
                None => (
                    HashMap::<String, String>::from_redis_value(&pairs)?
                        .into_iter()
                        .collect(),
                    HashMap::<String, i64>::from_redis_value(&asof)?
                        .into_iter()
                        .collect(),
                ),
                Some(cands) => {
                    let p: Vec<Option<String>> = FromRedisValue::from_redis_value(&pairs)?;
                    let a: Vec<Option<i64>> = FromRedisValue::from_redis_value(&asof)?;
                    (
                        cands
                            .iter()
                            .zip(p)
                            .filter_map(|(c, v)| v.map(|v| (c.to_string(), v)))
                            .collect(),
                        cands
                            .iter()
                            .zip(a)
                            .filter_map(|(c, v)| v.map(|v| (c.to_string(), v)))
                            .collect(),
                    )
                }
            };
            let mut live = HashMap::with_capacity(raw.len());
            for (cand, json) in raw {
                let st: PairState =
                    serde_json::from_str(&json).map_err(|e| protocol("pair state", e))?;
                if !st.rm {
                    live.insert(cand, st);
                }
            }
            out.push(LoadedMember {
                features: parse_map(feats, "member features")?,
                pairs: live,
                scored_as_of: asof_raw.into_iter().collect(),
            });
        }
        Ok(out)
    }

    /// Loads each candidate's features.
    pub async fn load_candidates(
        &self,
        candidates: &[&str],
    ) -> Result<Vec<FeatureMap>, StoreError> {
        let cmds = candidates
            .iter()
            .map(|c| {
                let mut cmd = redis::cmd("HGETALL");
                cmd.arg(self.keys.candidate_features(c));
                cmd
            })
            .collect();
        self.multi(cmds)
            .await?
            .into_iter()
            .map(|v| parse_map(v, "candidate features"))
            .collect()
    }

    /// One chunk of the members that have `candidate`; cursor 0 starts, a returned 0 ends.
    pub async fn scan_reverse(
        &self,
        candidate: &str,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let mut c = self.conn();
        let r = redis::cmd("SSCAN")
            .arg(self.keys.reverse(candidate))
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async::<(u64, Vec<String>)>(&mut c)
            .await;
        self.checked(r).await
    }

    /// Up to `limit` pairs of `shard` due at or before `until` (ms), earliest first.
    pub async fn due(
        &self,
        shard: u32,
        until: i64,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.due_in(&self.keys.due(shard), until, limit).await
    }

    /// Up to `limit` pairs of the schedule `key` due at or before `until` (ms), earliest first.
    pub(super) async fn due_in(
        &self,
        key: &str,
        until: i64,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut c = self.conn();
        let r = redis::cmd("ZRANGE")
            .arg(key)
            .arg("-inf")
            .arg(until)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async::<Vec<String>>(&mut c)
            .await;
        let raw = self.checked(r).await?;
        raw.iter()
            .map(|s| {
                serde_json::from_str::<(String, String)>(s).map_err(|e| protocol("due entry", e))
            })
            .collect()
    }

    /// Writes each member's scores (guarded by as_of) and refreshes its top-N set and meta. A
    /// member's writes go in script calls of at most [`SCORE_CALL_PAIRS`] candidates, so no single
    /// call (which Redis runs atomically, blocking every other client) outgrows the response
    /// timeout however large the member; each call keeps the top-N set exact on its own.
    pub async fn write_scores(
        &self,
        model: &str,
        top_n: usize,
        ttl_ms: u64,
        now_ms: i64,
        per_member: &[(&str, Vec<ScoreWrite>)],
    ) -> Result<Vec<Vec<WriteFlag>>, StoreError> {
        let mut calls = Vec::new();
        // (member index, chunk length) of each call, to put the flags back together.
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for (i, (m, writes)) in per_member.iter().enumerate() {
            for chunk in writes.chunks(SCORE_CALL_PAIRS) {
                let mut keys = self.pair_keys(m);
                keys.push(self.keys.meta(m));
                let mut args = vec![
                    model.to_owned(),
                    top_n.to_string(),
                    ttl_ms.to_string(),
                    now_ms.to_string(),
                ];
                for w in chunk {
                    args.push(w.candidate.clone());
                    args.push(f64::from(w.score).to_string());
                    args.push(w.as_of.to_string());
                }
                calls.push((keys, args));
                spans.push((i, chunk.len()));
            }
        }
        let out = self.eval_many(&self.scripts.scores, calls).await?;
        let mut flags: Vec<Vec<WriteFlag>> = per_member
            .iter()
            .map(|(_, w)| Vec::with_capacity(w.len()))
            .collect();
        // The script replies with the candidates it did not write (position, flag, as_of).
        for (v, &(i, len)) in out.iter().zip(&spans) {
            let skipped: Vec<i64> = FromRedisValue::from_redis_value(v)?;
            let mut chunk = vec![WriteFlag::Written; len];
            for t in skipped.chunks(3) {
                let &[j, f, sa] = t else {
                    return Err(protocol("score write", "reply not in threes"));
                };
                let slot = usize::try_from(j - 1)
                    .ok()
                    .and_then(|j| chunk.get_mut(j))
                    .ok_or_else(|| protocol("score write", "position out of range"))?;
                *slot = if f == 0 {
                    WriteFlag::Superseded(sa)
                } else {
                    WriteFlag::Gone
                };
            }
            flags[i].extend(chunk);
        }
        Ok(flags)
    }

    /// Records (`set`) or clears fan-out intents `(partition, candidate, as_of, offset)`; see
    /// `fanouts.lua`. Recording keeps the largest as_of and offset; clearing drops an intent only
    /// when its offset is covered (`as_of` is ignored).
    pub async fn fanout_intents(
        &self,
        set: bool,
        intents: &[(i32, &str, i64, i64)],
    ) -> Result<(), StoreError> {
        let mut by_partition: HashMap<i32, Vec<String>> = HashMap::new();
        for (p, c, ts, offset) in intents {
            let args = by_partition
                .entry(*p)
                .or_insert_with(|| vec![if set { "set" } else { "clear" }.to_owned()]);
            args.push((*c).to_owned());
            args.push(ts.to_string());
            args.push(offset.to_string());
        }
        let calls = by_partition
            .into_iter()
            .map(|(p, args)| (vec![self.keys.fanouts(p)], args))
            .collect();
        self.eval_many(&self.scripts.fanouts, calls)
            .await
            .map(|_| ())
    }

    /// The fan-out intents recorded for `partition`: (candidate, as_of, offset).
    pub async fn fanout_intents_of(
        &self,
        partition: i32,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        let mut c = self.conn();
        let r = redis::cmd("HGETALL")
            .arg(self.keys.fanouts(partition))
            .query_async::<HashMap<String, String>>(&mut c)
            .await;
        self.checked(r)
            .await?
            .into_iter()
            .map(|(cand, v)| {
                let parsed = v
                    .split_once(':')
                    .and_then(|(t, o)| Some((t.parse().ok()?, o.parse().ok()?)));
                match parsed {
                    Some((ts, offset)) => Ok((cand, ts, offset)),
                    None => Err(protocol("fan-out intent", format!("{v:?}"))),
                }
            })
            .collect()
    }

    /// Sets the due time of written pairs and drops the schedule entries of gone ones.
    pub async fn schedule(
        &self,
        due: &[(&str, &str, i64)],
        gone: &[(&str, &str)],
    ) -> Result<(), StoreError> {
        let mut by_shard: HashMap<u32, (Vec<(i64, String)>, Vec<String>)> = HashMap::new();
        for (m, c, at) in due {
            by_shard
                .entry(self.keys.shard_of(m))
                .or_default()
                .0
                .push((*at, due_member(m, c)));
        }
        for (m, c) in gone {
            by_shard
                .entry(self.keys.shard_of(m))
                .or_default()
                .1
                .push(due_member(m, c));
        }
        let mut cmds = Vec::new();
        for (shard, (adds, rems)) in by_shard {
            if !adds.is_empty() {
                let mut z = redis::cmd("ZADD");
                z.arg(self.keys.due(shard));
                for (at, member) in adds {
                    z.arg(at).arg(member);
                }
                cmds.push(z);
            }
            if !rems.is_empty() {
                let mut z = redis::cmd("ZREM");
                z.arg(self.keys.due(shard)).arg(rems);
                cmds.push(z);
            }
        }
        self.multi(cmds).await.map(|_| ())
    }
}
