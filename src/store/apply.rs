//! Applying a run of decoded events to the state, in order, in two round trips: the guarded
//! scripts in one pipeline, then the cross-slot index updates of the pairs that changed.

use redis::{FromRedisValue, Script};

use super::state::{due_member, protocol, FeatureOutcome, PairState};
use super::{Store, StoreError};
use crate::decode::{Entity, Event};
use crate::model::FeatureMap;

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Features(FeatureOutcome),
    /// An upsert or removal: true when it was newer than the stored pair.
    Pair(bool),
    /// Ticks change no state.
    Tick,
}

impl Store {
    pub(super) fn pair_keys(&self, member: &str) -> Vec<String> {
        vec![
            self.keys.pairs(member),
            self.keys.scored_as_of(member),
            self.keys.rest_scores(member),
            self.keys.scores(member),
        ]
    }

    /// One `rev.lua` call: `op` ("add" or "rem") `member` in `candidate`'s reverse index.
    fn rev_call(
        &self,
        candidate: &str,
        member: &str,
        ts: i64,
        offset: i64,
        op: &str,
    ) -> (&Script, Vec<String>, Vec<String>) {
        let keys = vec![
            self.keys.reverse(candidate),
            self.keys.reverse_versions(candidate),
        ];
        let args = vec![
            member.to_owned(),
            ts.to_string(),
            offset.to_string(),
            op.into(),
        ];
        (&self.scripts.rev, keys, args)
    }

    /// One `pair.lua` call writing `state` (an upsert, or a removal tombstone).
    fn pair_call(
        &self,
        member: &str,
        candidate: &str,
        state: &PairState,
        top_n: usize,
    ) -> Result<(&Script, Vec<String>, Vec<String>), StoreError> {
        let json = serde_json::to_string(state).map_err(|e| protocol("pair state", e))?;
        let op = if state.rm { "remove" } else { "upsert" };
        let args = vec![
            candidate.to_owned(),
            state.ts.to_string(),
            state.o.to_string(),
            json,
            op.into(),
            top_n.to_string(),
        ];
        Ok((&self.scripts.pair, self.pair_keys(member), args))
    }

    /// Applies `events` (each with its offset, for last-writer-wins ties) in order. Idempotent:
    /// replaying the same events leaves the same state.
    pub async fn apply(
        &self,
        events: &[(&Event, i64)],
        top_n: usize,
    ) -> Result<Vec<Applied>, StoreError> {
        let mut calls: Vec<(&Script, Vec<String>, Vec<String>)> = Vec::with_capacity(events.len());
        for (ev, offset) in events {
            match ev {
                Event::Features(u) => {
                    let keys = match u.entity {
                        Entity::Member => vec![
                            self.keys.member_features(&u.id),
                            self.keys.member_versions(&u.id),
                        ],
                        Entity::Candidate => vec![
                            self.keys.candidate_features(&u.id),
                            self.keys.candidate_versions(&u.id),
                        ],
                    };
                    let mut args = vec![u.ts.to_string(), offset.to_string()];
                    for (name, v) in &u.features {
                        args.push(name.clone());
                        args.push(v.map(|x| x.to_string()).unwrap_or_default());
                    }
                    calls.push((&self.scripts.features, keys, args));
                }
                Event::Upsert(u) => {
                    let state = PairState {
                        reason: u.reason.clone(),
                        pair_features: u.pair_features.clone(),
                        ts: u.ts,
                        o: *offset,
                        rm: false,
                    };
                    calls.push(self.pair_call(&u.member_id, &u.candidate_id, &state, top_n)?);
                }
                Event::Remove(r) => {
                    let state = PairState {
                        reason: String::new(),
                        pair_features: FeatureMap::new(),
                        ts: r.ts,
                        o: *offset,
                        rm: true,
                    };
                    calls.push(self.pair_call(&r.member_id, &r.candidate_id, &state, top_n)?);
                }
                Event::Tick(_) => {}
            }
        }
        let replies = self.eval_calls(&calls).await?;
        let mut replies = replies.iter();
        let mut out = Vec::with_capacity(events.len());
        // Reverse-index changes, each guarded by its pair's (ts, offset): on a cluster they run
        // concurrently, so they may reach Redis in any order.
        let mut rev_calls: Vec<(&Script, Vec<String>, Vec<String>)> = Vec::new();
        let mut follow_up = Vec::new();
        for (ev, offset) in events {
            if matches!(ev, Event::Tick(_)) {
                out.push(Applied::Tick);
                continue;
            }
            let reply = replies
                .next()
                .ok_or_else(|| protocol("apply", "short reply"))?;
            match ev {
                Event::Features(_) => {
                    let (applied, stale): (usize, usize) = FromRedisValue::from_redis_value(reply)?;
                    out.push(Applied::Features(FeatureOutcome { applied, stale }));
                }
                Event::Upsert(u) => {
                    let applied = i64::from_redis_value(reply)? == 1;
                    if applied {
                        rev_calls.push(self.rev_call(
                            &u.candidate_id,
                            &u.member_id,
                            u.ts,
                            *offset,
                            "add",
                        ));
                    }
                    out.push(Applied::Pair(applied));
                }
                Event::Remove(r) => {
                    let applied = i64::from_redis_value(reply)? == 1;
                    if applied {
                        rev_calls.push(self.rev_call(
                            &r.candidate_id,
                            &r.member_id,
                            r.ts,
                            *offset,
                            "rem",
                        ));
                        let mut zrem = redis::cmd("ZREM");
                        zrem.arg(self.keys.due(self.keys.shard_of(&r.member_id)))
                            .arg(due_member(&r.member_id, &r.candidate_id));
                        follow_up.push(zrem);
                    }
                    out.push(Applied::Pair(applied));
                }
                Event::Tick(_) => unreachable!("ticks were handled above"),
            }
        }
        self.eval_calls(&rev_calls).await?;
        self.multi(follow_up).await?;
        Ok(out)
    }
}
