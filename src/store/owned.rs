//! Owned state (see `docs/state.md`): the owner of a member partition loads a member once, holds
//! it in memory and writes each window's changes as plain commands, fenced by its generation.
//!
//! Guarantee: a member's load and each of its writes run in one script call that compares the
//! caller's generation with the one stored for the member (`own:{m}`): a later owner's load
//! refuses every write of an earlier one (a zombie), and nothing of the member's state is read on
//! a write. Limits: the decay schedule (`pdue:{part-p}`) and the reverse index live in other slots
//! and are not fenced (a zombie can at worst move a due time; the index is guarded by event time).

use std::collections::HashMap;

use redis::{Cmd, FromRedisValue, Value};

use super::fenced::{Fenced, TxConn};
use super::state::{parse_map, protocol, PairState};
use super::{Store, StoreError};
use crate::model::FeatureMap;

/// One member's state as stored.
#[derive(Debug, Clone, Default)]
pub struct OwnedLoad {
    /// Every pair, removal tombstones included.
    pub pairs: HashMap<String, PairState>,
    pub as_of: HashMap<String, i64>,
    pub features: FeatureMap,
    /// Per feature, the `(ts, offset)` of the update that set it.
    pub versions: HashMap<String, (i64, i64)>,
    pub top: Vec<(String, f64)>,
    pub rest: Vec<(String, f64)>,
    /// When the output's TTL was last set (meta `ttl_set_at`, ms).
    pub ttl_set_at: Option<i64>,
}

/// The outcome of loading one member for an owner.
#[derive(Debug, Clone)]
pub enum Loaded {
    Taken(Box<OwnedLoad>),
    /// A later owner (this generation) has taken the member: the caller is a zombie.
    Fenced(u64),
}

/// A member key a window writes (the order of the write script's KEYS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberKey {
    Pairs = 2,
    AsOf = 3,
    Features = 4,
    Versions = 5,
    Top = 6,
    Rest = 7,
    Meta = 8,
}

/// One plain command on a member key.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteOp {
    pub key: MemberKey,
    pub cmd: &'static str,
    pub args: Vec<String>,
}

/// One member's window of writes.
#[derive(Debug, Clone)]
pub struct MemberWrite {
    pub member: String,
    pub partition: i32,
    pub generation: u64,
    pub ops: Vec<WriteOp>,
}

/// Most arguments of one command inside a script call (Lua's `unpack` is limited to a few
/// thousand values): larger ones are split by the caller ([`WriteOp::split`]).
pub const MAX_OP_ARGS: usize = 1000;

impl WriteOp {
    /// This command as several of at most [`MAX_OP_ARGS`] arguments, each one a whole number of
    /// `stride`-sized groups (2 for HSET and ZADD, 1 for ZREM and HDEL).
    pub fn split(key: MemberKey, cmd: &'static str, args: Vec<String>, stride: usize) -> Vec<Self> {
        let per = (MAX_OP_ARGS / stride) * stride;
        if args.len() <= per.max(stride) {
            return vec![WriteOp { key, cmd, args }];
        }
        args.chunks(per.max(stride))
            .map(|c| WriteOp {
                key,
                cmd,
                args: c.to_vec(),
            })
            .collect()
    }
}

fn pairs_of(v: &Value, what: &str) -> Result<Vec<(String, String)>, StoreError> {
    let flat: Vec<String> = FromRedisValue::from_redis_value(v)?;
    if flat.len() % 2 != 0 {
        return Err(protocol(what, "odd reply"));
    }
    Ok(flat
        .chunks(2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect())
}

fn version(s: &str) -> Option<(i64, i64)> {
    let (t, o) = s.split_once(':')?;
    Some((t.parse().ok()?, o.parse().ok()?))
}

/// Members (or reverse-index changes) in one script call on a single Redis: the scripts' fixed
/// cost (about 10 µs a call, measured) is shared by them. On a cluster a call covers one, since
/// it must stay in one slot.
const PER_CALL: usize = 64;

/// Most commands in one fenced transaction of a window's write: Redis runs a transaction whole,
/// so a large one would hold every other client (intake's reads and reverse-index changes) for
/// its whole run; a window's write is a sequence of such transactions.
const MAX_TX_COMMANDS: usize = 2048;

impl Store {
    /// Items one script call may cover.
    fn per_call(&self) -> usize {
        match self.conn() {
            super::Conn::Single(_) => PER_CALL,
            super::Conn::Cluster(_) => 1,
        }
    }

    fn member_keys(&self, member: &str) -> Vec<String> {
        let k = &self.keys;
        vec![
            k.owner(member),
            k.pairs(member),
            k.scored_as_of(member),
            k.member_features(member),
            k.member_versions(member),
            k.scores(member),
            k.rest_scores(member),
            k.meta(member),
        ]
    }

    /// Runs commands (EVALSHA among them) in order, loading the scripts once if Redis lost them.
    async fn multi_scripts(&self, build: impl Fn() -> Vec<Cmd>) -> Result<Vec<Value>, StoreError> {
        match self.multi(build()).await {
            Err(StoreError::Redis(e)) if e.kind() == redis::ErrorKind::NoScriptError => {
                self.load_scripts().await?;
                self.multi(build()).await
            }
            other => other,
        }
    }

    /// A new generation for the owner of member partition `partition` (taken on assignment).
    pub async fn take_generation(&self, partition: i32) -> Result<u64, StoreError> {
        let mut c = self.conn();
        let r = redis::cmd("INCR")
            .arg(self.keys.generation(partition))
            .query_async::<u64>(&mut c)
            .await;
        self.checked(r).await
    }

    /// Loads each member for an owner of generation `g` (script calls of up to [`PER_CALL`]
    /// members, one round trip on a single Redis).
    async fn load_scripted(&self, members: &[(&str, u64)]) -> Result<Vec<Loaded>, StoreError> {
        let sha = self.scripts.owned_load.get_hash().to_owned();
        let per = self.per_call();
        let build = || {
            members
                .chunks(per)
                .map(|chunk| {
                    let mut c = redis::cmd("EVALSHA");
                    c.arg(&sha).arg(chunk.len() * 8);
                    for (m, _) in chunk {
                        c.arg(self.member_keys(m));
                    }
                    for (_, g) in chunk {
                        c.arg(g);
                    }
                    c
                })
                .collect()
        };
        let mut out = Vec::with_capacity(members.len());
        for reply in self.multi_scripts(build).await? {
            let per_member: Vec<Value> = FromRedisValue::from_redis_value(&reply)?;
            for v in &per_member {
                out.push(parse_load(v)?);
            }
        }
        if out.len() != members.len() {
            return Err(protocol("owned load", "reply count"));
        }
        Ok(out)
    }

    /// Applies reverse-index changes `(candidate, member, ts, offset, add)` and returns each
    /// candidate's features as read in the same call.
    async fn rev_scripted(
        &self,
        ops: &[(&str, &str, i64, i64, bool)],
    ) -> Result<Vec<FeatureMap>, StoreError> {
        let sha = self.scripts.owned_rev.get_hash().to_owned();
        let per = self.per_call();
        let build = || {
            ops.chunks(per)
                .map(|chunk| {
                    let mut c = redis::cmd("EVALSHA");
                    c.arg(&sha).arg(chunk.len() * 3);
                    for (cand, ..) in chunk {
                        c.arg(self.keys.reverse(cand))
                            .arg(self.keys.reverse_versions(cand))
                            .arg(self.keys.candidate_features(cand));
                    }
                    for (_, member, ts, offset, add) in chunk {
                        c.arg(member)
                            .arg(ts)
                            .arg(offset)
                            .arg(if *add { "add" } else { "rem" });
                    }
                    c
                })
                .collect()
        };
        let mut out = Vec::with_capacity(ops.len());
        for reply in self.multi_scripts(build).await? {
            let per_op: Vec<Value> = FromRedisValue::from_redis_value(&reply)?;
            for v in per_op {
                out.push(parse_map(v, "candidate features")?);
            }
        }
        if out.len() != ops.len() {
            return Err(protocol("reverse index", "reply count"));
        }
        Ok(out)
    }

    /// Writes each member's window (fenced) and the decay schedule changes `(partition, member,
    /// due)` and `(partition, entry)`. Returns, per member, whether it was written (false: a
    /// later owner has taken it).
    async fn write_scripted(
        &self,
        members: &[MemberWrite],
        due: &[(i32, &str, i64)],
        unscheduled: &[(i32, &str)],
    ) -> Result<Vec<bool>, StoreError> {
        let sha = self.scripts.owned_write.get_hash().to_owned();
        let schedule = self.schedule_cmds(due, unscheduled);
        let per = self.per_call();
        let build = || {
            let mut cmds: Vec<Cmd> = members
                .chunks(per)
                .map(|chunk| {
                    let mut c = redis::cmd("EVALSHA");
                    c.arg(&sha).arg(chunk.len() * 8);
                    for w in chunk {
                        c.arg(self.member_keys(&w.member));
                    }
                    for w in chunk {
                        c.arg(w.generation).arg(w.ops.len());
                        for op in &w.ops {
                            c.arg(op.key as usize)
                                .arg(op.cmd)
                                .arg(op.args.len())
                                .arg(&op.args);
                        }
                    }
                    c
                })
                .collect();
            let calls = cmds.len();
            cmds.extend(schedule.iter().cloned());
            (cmds, calls)
        };
        let (cmds, calls) = build();
        let replies = match self.multi(cmds).await {
            Err(StoreError::Redis(e)) if e.kind() == redis::ErrorKind::NoScriptError => {
                self.load_scripts().await?;
                self.multi(build().0).await?
            }
            other => other?,
        };
        let mut out = Vec::with_capacity(members.len());
        for v in replies.iter().take(calls) {
            let flags: Vec<i64> = FromRedisValue::from_redis_value(v)?;
            out.extend(flags.into_iter().map(|f| f == 1));
        }
        if out.len() != members.len() {
            return Err(protocol("owned write", "reply count"));
        }
        Ok(out)
    }

    /// A member's write as plain commands.
    fn plain_cmds(&self, w: &MemberWrite, out: &mut Vec<Cmd>) {
        let keys = self.member_keys(&w.member);
        for op in &w.ops {
            let mut c = redis::cmd(op.cmd);
            c.arg(&keys[op.key as usize - 1]).arg(&op.args);
            out.push(c);
        }
    }

    /// Loads each member for an owner of generation `g`: plain reads on a single Redis (the
    /// partition's generation fences writes there), fenced script calls on a cluster.
    pub async fn load_owned(&self, members: &[(&str, u64)]) -> Result<Vec<Loaded>, StoreError> {
        if !self.transactional() {
            return self.load_scripted(members).await;
        }
        // A member never stored (most of a cold start) costs one EXISTS over its seven keys, not
        // seven reads.
        let exists: Vec<Cmd> = members
            .iter()
            .map(|(m, _)| {
                let mut c = redis::cmd("EXISTS");
                c.arg(&self.member_keys(m)[1..]);
                c
            })
            .collect();
        let stored: Vec<&(&str, u64)> = self
            .read_many(exists)
            .await?
            .iter()
            .zip(members)
            .filter(|(v, _)| !matches!(v, Value::Int(0)))
            .map(|(_, m)| m)
            .collect();
        let mut cmds = Vec::with_capacity(stored.len() * 7);
        for (m, _) in &stored {
            let k = self.member_keys(m);
            for key in &k[1..5] {
                let mut c = redis::cmd("HGETALL");
                c.arg(key);
                cmds.push(c);
            }
            for key in &k[5..7] {
                let mut c = redis::cmd("ZRANGE");
                c.arg(key).arg(0).arg(-1).arg("WITHSCORES");
                cmds.push(c);
            }
            let mut c = redis::cmd("HGET");
            c.arg(&k[7]).arg("ttl_set_at");
            cmds.push(c);
        }
        let replies = self.read_many(cmds).await?;
        if replies.len() != stored.len() * 7 {
            return Err(protocol("owned load", "reply count"));
        }
        let mut loaded: HashMap<&str, Loaded> = HashMap::with_capacity(stored.len());
        for ((m, _), r) in stored.iter().zip(replies.chunks(7)) {
            let mut parts = vec![Value::Int(1)];
            parts.extend(r.iter().cloned());
            loaded.insert(m, parse_load(&Value::Array(parts))?);
        }
        Ok(members
            .iter()
            .map(|(m, _)| {
                loaded
                    .remove(m)
                    .unwrap_or_else(|| Loaded::Taken(Box::default()))
            })
            .collect())
    }

    /// Applies reverse-index changes `(candidate, member, ts, offset, add)` and returns each
    /// candidate's features as read together with its change: one fenced transaction on a single
    /// Redis (`gens`: the members' partitions), guarded script calls on a cluster.
    pub async fn rev_and_features(
        &self,
        tx: &TxConn,
        gens: &[(i32, u64)],
        ops: &[(&str, &str, i64, i64, bool)],
    ) -> Result<Result<Vec<FeatureMap>, Vec<i32>>, StoreError> {
        if !self.transactional() {
            return self.rev_scripted(ops).await.map(Ok);
        }
        let mut cmds = Vec::with_capacity(ops.len() * 2);
        for (cand, member, _, _, add) in ops {
            let mut c = redis::cmd(if *add { "SADD" } else { "SREM" });
            c.arg(self.keys.reverse(cand)).arg(member);
            cmds.push(c);
            let mut c = redis::cmd("HGETALL");
            c.arg(self.keys.candidate_features(cand));
            cmds.push(c);
        }
        match tx.fenced(gens, &cmds).await? {
            Fenced::Taken(moved) => Ok(Err(moved)),
            Fenced::Applied(replies) => replies
                .into_iter()
                .skip(1)
                .step_by(2)
                .map(|v| parse_map(v, "candidate features"))
                .collect::<Result<Vec<_>, _>>()
                .map(Ok),
        }
    }

    /// Writes each member's window and the decay schedule changes `(partition, member, due)` and
    /// `(partition, entry)`: fenced transactions of at most `MAX_TX_COMMANDS` commands on a
    /// single Redis (retried without the partitions another owner has taken), fenced script calls per
    /// member on a cluster. Returns, per member, whether it was written (false: a later owner
    /// has taken it).
    pub async fn write_owned(
        &self,
        tx: &TxConn,
        gens: &[(i32, u64)],
        members: &[MemberWrite],
        due: &[(i32, &str, i64)],
        unscheduled: &[(i32, &str)],
    ) -> Result<Vec<bool>, StoreError> {
        if !self.transactional() {
            return self.write_scripted(members, due, unscheduled).await;
        }
        let mut taken: Vec<i32> = Vec::new();
        'write: loop {
            // Transactions of at most MAX_TX_COMMANDS commands (a member's commands never split),
            // the schedule's in the last.
            let mut chunks: Vec<Vec<Cmd>> = vec![Vec::new()];
            for w in members.iter().filter(|w| !taken.contains(&w.partition)) {
                let mut cmds = Vec::new();
                self.plain_cmds(w, &mut cmds);
                let last = chunks.last_mut().expect("one chunk at least");
                if !last.is_empty() && last.len() + cmds.len() > MAX_TX_COMMANDS {
                    chunks.push(cmds);
                } else {
                    last.extend(cmds);
                }
            }
            let due: Vec<_> = due
                .iter()
                .filter(|d| !taken.contains(&d.0))
                .copied()
                .collect();
            let gone: Vec<_> = unscheduled
                .iter()
                .filter(|d| !taken.contains(&d.0))
                .copied()
                .collect();
            chunks
                .last_mut()
                .expect("one chunk at least")
                .extend(self.schedule_cmds(&due, &gone));
            let gens: Vec<(i32, u64)> = gens
                .iter()
                .filter(|(p, _)| !taken.contains(p))
                .copied()
                .collect();
            for cmds in chunks.iter().filter(|c| !c.is_empty()) {
                // Taken: the write starts again without those partitions (plain writes: the
                // chunks already applied are applied again, to the same values).
                if let Fenced::Taken(moved) = tx.fenced(&gens, cmds).await? {
                    taken.extend(moved);
                    continue 'write;
                }
            }
            return Ok(members
                .iter()
                .map(|w| !taken.contains(&w.partition))
                .collect());
        }
    }

    /// One chunk of each candidate's reverse index from its cursor (0 starts; a returned 0 ends),
    /// in one round trip on a single Redis.
    pub async fn scan_reverse_many(
        &self,
        scans: &[(&str, u64)],
        count: usize,
    ) -> Result<Vec<(u64, Vec<String>)>, StoreError> {
        let cmds = scans
            .iter()
            .map(|(c, cursor)| {
                let mut cmd = redis::cmd("SSCAN");
                cmd.arg(self.keys.reverse(c))
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(count);
                cmd
            })
            .collect();
        self.multi(cmds)
            .await?
            .iter()
            .map(|v| Ok(<(u64, Vec<String>)>::from_redis_value(v)?))
            .collect()
    }
}

fn parse_load(v: &Value) -> Result<Loaded, StoreError> {
    let parts: Vec<Value> = FromRedisValue::from_redis_value(v)?;
    let flag = parts
        .first()
        .map(i64::from_redis_value)
        .transpose()?
        .ok_or_else(|| protocol("owned load", "empty reply"))?;
    if flag == 0 {
        let newer = parts
            .get(1)
            .map(u64::from_redis_value)
            .transpose()?
            .unwrap_or(0);
        return Ok(Loaded::Fenced(newer));
    }
    let [_, pairs, as_of, features, versions, top, rest, ttl_set_at] = &parts[..] else {
        return Err(protocol("owned load", "short reply"));
    };
    let mut out = OwnedLoad::default();
    for (cand, json) in pairs_of(pairs, "pairs")? {
        let st: PairState = serde_json::from_str(&json).map_err(|e| protocol("pair state", e))?;
        out.pairs.insert(cand, st);
    }
    for (cand, a) in pairs_of(as_of, "as_of")? {
        let a = a.parse().map_err(|e| protocol("as_of", e))?;
        out.as_of.insert(cand, a);
    }
    for (name, x) in pairs_of(features, "member features")? {
        let x = x.parse().map_err(|e| protocol("member features", e))?;
        out.features.insert(name, x);
    }
    for (name, ver) in pairs_of(versions, "member versions")? {
        let ver = version(&ver).ok_or_else(|| protocol("member versions", &ver))?;
        out.versions.insert(name, ver);
    }
    out.ttl_set_at = Option::<String>::from_redis_value(ttl_set_at)?.and_then(|t| t.parse().ok());
    for (set, v) in [(&mut out.top, top), (&mut out.rest, rest)] {
        for (cand, s) in pairs_of(v, "scores")? {
            set.push((cand, s.parse().map_err(|e| protocol("score", e))?));
        }
    }
    Ok(Loaded::Taken(Box::new(out)))
}
