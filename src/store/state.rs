//! State operations: guarded writes through Lua scripts, and batched reads for scoring.

use std::collections::HashMap;

use redis::{Cmd, FromRedisValue, Script, Value};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};
use crate::decode::{Entity, PairRemove, PairUpsert};
use crate::model::FeatureMap;

#[derive(Clone)]
pub(super) struct Scripts {
    features: Script,
    pair: Script,
    scores: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            features: Script::new(include_str!("features.lua")),
            pair: Script::new(include_str!("pair.lua")),
            scores: Script::new(include_str!("scores.lua")),
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

fn protocol(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Protocol(format!("{what}: {e}"))
}

fn parse_map(v: Value, what: &str) -> Result<FeatureMap, StoreError> {
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
    /// Runs script invocations; on a single Redis they go in one pipeline (EVALSHA, loading the
    /// scripts once if Redis lost them, e.g. after a restart).
    async fn eval_many(
        &self,
        script: &Script,
        calls: Vec<(Vec<String>, Vec<String>)>,
    ) -> Result<Vec<Value>, StoreError> {
        let build = || {
            calls
                .iter()
                .map(|(keys, args)| {
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

    /// Loads every script (on every primary, for a cluster).
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        for s in [
            &self.scripts.features,
            &self.scripts.pair,
            &self.scripts.scores,
        ] {
            s.prepare_invoke().load_async(&mut c).await?;
        }
        Ok(())
    }

    /// Merges a partial feature update, per feature last-writer-wins by `(ts, offset)`.
    pub async fn apply_features(
        &self,
        entity: Entity,
        id: &str,
        ts: i64,
        offset: i64,
        features: &[(String, Option<f64>)],
    ) -> Result<FeatureOutcome, StoreError> {
        let keys = match entity {
            Entity::Member => vec![self.keys.member_features(id), self.keys.member_versions(id)],
            Entity::Candidate => vec![
                self.keys.candidate_features(id),
                self.keys.candidate_versions(id),
            ],
        };
        let mut args = vec![ts.to_string(), offset.to_string()];
        for (name, v) in features {
            args.push(name.clone());
            args.push(v.map(|x| x.to_string()).unwrap_or_default());
        }
        let out = self
            .eval_many(&self.scripts.features, vec![(keys, args)])
            .await?;
        let (applied, stale): (usize, usize) = FromRedisValue::from_redis_value(&out[0])?;
        Ok(FeatureOutcome { applied, stale })
    }

    fn pair_keys(&self, member: &str) -> Vec<String> {
        vec![
            self.keys.pairs(member),
            self.keys.scored_as_of(member),
            self.keys.all_scores(member),
            self.keys.scores(member),
        ]
    }

    /// Upserts a pair (last-writer-wins by `(ts, offset)`), then indexes it under its candidate.
    /// Returns false when a newer state (or removal) is already stored.
    pub async fn upsert_pair(
        &self,
        u: &PairUpsert,
        offset: i64,
        top_n: usize,
    ) -> Result<bool, StoreError> {
        let state = PairState {
            reason: u.reason.clone(),
            pair_features: u.pair_features.clone(),
            ts: u.ts,
            o: offset,
            rm: false,
        };
        let json = serde_json::to_string(&state).map_err(|e| protocol("pair state", e))?;
        let args = vec![
            u.candidate_id.clone(),
            u.ts.to_string(),
            offset.to_string(),
            json,
            "upsert".into(),
            top_n.to_string(),
        ];
        let out = self
            .eval_many(
                &self.scripts.pair,
                vec![(self.pair_keys(&u.member_id), args)],
            )
            .await?;
        let applied: i64 = FromRedisValue::from_redis_value(&out[0])?;
        if applied == 1 {
            let mut sadd = redis::cmd("SADD");
            sadd.arg(self.keys.reverse(&u.candidate_id))
                .arg(&u.member_id);
            self.multi(vec![sadd]).await?;
        }
        Ok(applied == 1)
    }

    /// Removes a pair and its score, leaving a tombstone; unindexes and unschedules it.
    pub async fn remove_pair(
        &self,
        r: &PairRemove,
        offset: i64,
        top_n: usize,
    ) -> Result<bool, StoreError> {
        let state = PairState {
            reason: String::new(),
            pair_features: FeatureMap::new(),
            ts: r.ts,
            o: offset,
            rm: true,
        };
        let json = serde_json::to_string(&state).map_err(|e| protocol("pair state", e))?;
        let args = vec![
            r.candidate_id.clone(),
            r.ts.to_string(),
            offset.to_string(),
            json,
            "remove".into(),
            top_n.to_string(),
        ];
        let out = self
            .eval_many(
                &self.scripts.pair,
                vec![(self.pair_keys(&r.member_id), args)],
            )
            .await?;
        let applied: i64 = FromRedisValue::from_redis_value(&out[0])?;
        if applied == 1 {
            let mut srem = redis::cmd("SREM");
            srem.arg(self.keys.reverse(&r.candidate_id))
                .arg(&r.member_id);
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(self.keys.due(self.keys.shard_of(&r.member_id)))
                .arg(due_member(&r.member_id, &r.candidate_id));
            self.multi(vec![srem, zrem]).await?;
        }
        Ok(applied == 1)
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
        let mut c = self.conn.clone();
        let (next, members): (u64, Vec<String>) = redis::cmd("SSCAN")
            .arg(self.keys.reverse(candidate))
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut c)
            .await?;
        Ok((next, members))
    }

    /// Up to `limit` pairs of `shard` due at or before `until` (ms), earliest first.
    pub async fn due(
        &self,
        shard: u32,
        until: i64,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut c = self.conn.clone();
        let raw: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.due(shard))
            .arg("-inf")
            .arg(until)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut c)
            .await?;
        raw.iter()
            .map(|s| {
                serde_json::from_str::<(String, String)>(s).map_err(|e| protocol("due entry", e))
            })
            .collect()
    }

    /// Writes each member's scores (guarded by as_of) and refreshes its top-N set and meta.
    pub async fn write_scores(
        &self,
        model: &str,
        top_n: usize,
        ttl_ms: u64,
        now_ms: i64,
        per_member: &[(&str, Vec<ScoreWrite>)],
    ) -> Result<Vec<Vec<WriteFlag>>, StoreError> {
        let calls = per_member
            .iter()
            .map(|(m, writes)| {
                let mut keys = self.pair_keys(m);
                keys.push(self.keys.meta(m));
                let mut args = vec![
                    model.to_owned(),
                    top_n.to_string(),
                    ttl_ms.to_string(),
                    now_ms.to_string(),
                ];
                for w in writes {
                    args.push(w.candidate.clone());
                    args.push(f64::from(w.score).to_string());
                    args.push(w.as_of.to_string());
                }
                (keys, args)
            })
            .collect();
        let out = self.eval_many(&self.scripts.scores, calls).await?;
        out.iter()
            .map(|v| {
                let flags: Vec<(i64, i64)> = FromRedisValue::from_redis_value(v)?;
                Ok(flags
                    .into_iter()
                    .map(|(f, sa)| match f {
                        1 => WriteFlag::Written,
                        0 => WriteFlag::Superseded(sa),
                        _ => WriteFlag::Gone,
                    })
                    .collect())
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
