//! The owner's state: its members (features, pairs, scores, the ranking as written) and the
//! features of their candidates, in a cache bounded by bytes.
//!
//! Everything here is synchronous and reads nothing from Redis: the loop loads a member once,
//! applies events to it, and takes each window's writes from it ([`Member::plan`]).
//!
//! Guarantee: a member's in-memory state is what its writes made of the loaded state; the ranking
//! written (`scores:{m}` and `rest:{m}`) is exactly the top N and the rest of the member's current
//! scores in `ZREVRANGE` order. Limits: sizes are estimates (a few hundred bytes a pair); a dirty
//! member is never evicted, so the budget can be overshot by one window's members.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::decode::FeatureUpdate;
use crate::model::FeatureMap;
use crate::store::{MemberKey, OwnedLoad, PairState, WriteOp};

/// Candidates with their scores, best first.
pub type Ranked<'a> = Vec<(&'a String, f64)>;

/// One owned member.
#[derive(Debug, Clone, Default)]
pub struct Member {
    pub partition: i32,
    pub features: FeatureMap,
    versions: HashMap<String, (i64, i64)>,
    /// Every pair, removal tombstones included.
    pub pairs: HashMap<String, PairState>,
    /// As of when each pair's score was computed (kept after a removal, so a pair added again
    /// never scores as of an earlier time).
    pub as_of: HashMap<String, i64>,
    /// The current score of each live scored pair.
    scores: HashMap<String, f64>,
    /// What Redis holds: the top N and the rest.
    written_top: HashMap<String, f64>,
    written_rest: HashMap<String, f64>,
    dirty_features: BTreeSet<String>,
    dirty_pairs: BTreeSet<String>,
    dirty_as_of: BTreeSet<String>,
    /// When the output's TTL was last set (ms, wall clock), as far as this owner knows.
    ttl_set_at: Option<i64>,
    /// Event time of the newest event applied to the member (None: none yet).
    pub last_event: Option<i64>,
    tombstone_horizon_ms: Option<i64>,
    /// Writes planned and not acknowledged yet: the member is not evicted meanwhile (a reload
    /// would read Redis before they land).
    pending: usize,
    bytes: usize,
    used: u64,
}

/// A pair event's effect on a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairApplied {
    /// Newer than (or equal to) the stored state, so it was applied.
    pub applied: bool,
    pub was_live: bool,
    pub is_live: bool,
}

impl Member {
    pub fn from_load(partition: i32, l: OwnedLoad) -> Self {
        let mut m = Member {
            partition,
            features: l.features,
            versions: l.versions,
            pairs: l.pairs,
            as_of: l.as_of,
            written_top: l.top.into_iter().collect(),
            written_rest: l.rest.into_iter().collect(),
            ttl_set_at: l.ttl_set_at,
            ..Member::default()
        };
        m.last_event = m
            .pairs
            .values()
            .map(|p| p.ts)
            .chain(m.versions.values().map(|v| v.0))
            .max();
        m.scores = m
            .written_top
            .iter()
            .chain(&m.written_rest)
            .filter(|(c, _)| m.pairs.get(*c).is_some_and(|p| !p.rm))
            .map(|(c, s)| (c.clone(), *s))
            .collect();
        m.bytes = m.estimate();
        m
    }

    /// The live pair with candidate `c`.
    pub fn live(&self, c: &str) -> Option<&PairState> {
        self.pairs.get(c).filter(|p| !p.rm)
    }

    pub fn live_pairs(&self) -> impl Iterator<Item = (&String, &PairState)> {
        self.pairs.iter().filter(|(_, p)| !p.rm)
    }

    /// Per-feature last-writer-wins by `(ts, offset)` (an equal version applies again, so a
    /// replay is idempotent). Returns the features applied.
    pub fn apply_features(&mut self, u: &FeatureUpdate, offset: i64) -> usize {
        let mut applied = 0;
        for (name, value) in &u.features {
            if self.versions.get(name).is_some_and(|v| *v > (u.ts, offset)) {
                continue;
            }
            self.versions.insert(name.clone(), (u.ts, offset));
            self.last_event = self.last_event.max(Some(u.ts));
            match value {
                Some(x) => self.features.insert(name.clone(), *x),
                None => self.features.remove(name),
            };
            self.dirty_features.insert(name.clone());
            applied += 1;
        }
        applied
    }

    /// An upsert or a removal tombstone, last-writer-wins by `(ts, offset)`.
    pub fn apply_pair(&mut self, candidate: &str, st: PairState) -> PairApplied {
        let was_live = self.live(candidate).is_some();
        if self
            .pairs
            .get(candidate)
            .is_some_and(|cur| (cur.ts, cur.o) > (st.ts, st.o))
        {
            return PairApplied {
                applied: false,
                was_live,
                is_live: was_live,
            };
        }
        let is_live = !st.rm;
        if !is_live {
            self.scores.remove(candidate);
        }
        self.last_event = self.last_event.max(Some(st.ts));
        self.pairs.insert(candidate.to_owned(), st);
        self.dirty_pairs.insert(candidate.to_owned());
        PairApplied {
            applied: true,
            was_live,
            is_live,
        }
    }

    /// Records a new score of a live pair (false: the pair is gone).
    pub fn set_score(&mut self, candidate: &str, score: f64, as_of: i64) -> bool {
        if self.live(candidate).is_none() {
            return false;
        }
        self.scores.insert(candidate.to_owned(), score);
        self.as_of.insert(candidate.to_owned(), as_of);
        self.dirty_as_of.insert(candidate.to_owned());
        true
    }

    /// Whether this member has changes not written yet (scores change only with a pair or an
    /// as_of, so the ranking cannot differ from what was written without one of these).
    pub fn dirty(&self) -> bool {
        !(self.dirty_features.is_empty()
            && self.dirty_pairs.is_empty()
            && self.dirty_as_of.is_empty())
    }

    /// The top N and the rest of the current scores, in ZREVRANGE order (higher score first,
    /// then the greater candidate by bytes).
    pub fn ranking(&self, top_n: usize) -> (Ranked<'_>, Ranked<'_>) {
        let mut all: Vec<(&String, f64)> = self.scores.iter().map(|(c, s)| (c, *s)).collect();
        all.sort_unstable_by(|a, b| {
            b.1.total_cmp(&a.1)
                .then_with(|| b.0.as_bytes().cmp(a.0.as_bytes()))
        });
        let rest = all.split_off(top_n.min(all.len()));
        (all, rest)
    }

    /// This member's window of writes: changed pairs, features and as_of, the ranking's diff
    /// against what Redis holds, and meta when the output changed; the output's TTL is set again
    /// once a 64th of it has passed (a key created by this write gets the time left). Empty when
    /// nothing changed. The member then counts as written (the next plan diffs against this
    /// one) and stays pending until [`Cache::acknowledged`].
    pub fn plan(&mut self, model: &str, top_n: usize, ttl_ms: u64, now_ms: i64) -> Vec<WriteOp> {
        let mut ops = self.expire_tombstones();
        let mut hset = |key, fields: Vec<String>| {
            if !fields.is_empty() {
                ops.extend(WriteOp::split(key, "HSET", fields, 2));
            }
        };
        let pairs: Vec<String> = self
            .dirty_pairs
            .iter()
            .filter_map(|c| Some((c, serde_json::to_string(self.pairs.get(c)?).ok()?)))
            .flat_map(|(c, j)| [c.clone(), j])
            .collect();
        hset(MemberKey::Pairs, pairs);
        let as_of: Vec<String> = self
            .dirty_as_of
            .iter()
            .filter_map(|c| Some([c.clone(), self.as_of.get(c)?.to_string()]))
            .flatten()
            .collect();
        hset(MemberKey::AsOf, as_of);
        let (mut set, mut del, mut vers) = (Vec::new(), Vec::new(), Vec::new());
        for name in &self.dirty_features {
            match self.features.get(name) {
                Some(x) => set.extend([name.clone(), x.to_string()]),
                None => del.push(name.clone()),
            }
            if let Some((t, o)) = self.versions.get(name) {
                vers.extend([name.clone(), format!("{t}:{o}")]);
            }
        }
        hset(MemberKey::Features, set);
        hset(MemberKey::Versions, vers);
        if !del.is_empty() {
            ops.extend(WriteOp::split(MemberKey::Features, "HDEL", del, 1));
        }

        let ttl = i64::try_from(ttl_ms).unwrap_or(i64::MAX);
        let age = self.ttl_set_at.map(|t| now_ms.saturating_sub(t));
        let output_changed = {
            // Half the TTL without a refresh: the output may have expired in Redis (its clock is
            // not ours), so the ranking is written whole rather than as a diff.
            if age.is_none_or(|a| a < 0 || a >= ttl / 2) {
                self.written_top.clear();
                self.written_rest.clear();
            }
            let (top, rest) = self.ranking(top_n);
            let mut changed = !self.dirty_as_of.is_empty();
            let mut created = Vec::new();
            for (key, want, held) in [
                (MemberKey::Top, &top, &self.written_top),
                (MemberKey::Rest, &rest, &self.written_rest),
            ] {
                let add: Vec<String> = want
                    .iter()
                    .filter(|(c, s)| held.get(*c) != Some(s))
                    .flat_map(|(c, s)| [s.to_string(), (*c).clone()])
                    .collect();
                let wanted: HashSet<&String> = want.iter().map(|(c, _)| *c).collect();
                let rem: Vec<String> = held
                    .keys()
                    .filter(|c| !wanted.contains(c))
                    .cloned()
                    .collect();
                if key == MemberKey::Top && !(add.is_empty() && rem.is_empty()) {
                    changed = true;
                }
                if !add.is_empty() && held.is_empty() {
                    created.push(key);
                }
                if !rem.is_empty() {
                    ops.extend(WriteOp::split(key, "ZREM", rem, 1));
                }
                if !add.is_empty() {
                    ops.extend(WriteOp::split(key, "ZADD", add, 2));
                }
            }
            let top: HashMap<String, f64> = top.into_iter().map(|(c, s)| (c.clone(), s)).collect();
            let rest: HashMap<String, f64> =
                rest.into_iter().map(|(c, s)| (c.clone(), s)).collect();
            self.written_top = top;
            self.written_rest = rest;
            changed.then_some(created)
        };
        if let Some(created) = output_changed {
            let refresh = age.is_none_or(|a| a < 0 || a >= ttl / 64);
            let mut meta = vec![
                "model".to_owned(),
                model.to_owned(),
                "updated_at".to_owned(),
                now_ms.to_string(),
            ];
            if let Some(max) = self.as_of.values().max() {
                meta.extend(["as_of".to_owned(), max.to_string()]);
            }
            if refresh {
                meta.extend(["ttl_set_at".to_owned(), now_ms.to_string()]);
                self.ttl_set_at = Some(now_ms);
            }
            ops.push(WriteOp {
                key: MemberKey::Meta,
                cmd: "HSET",
                args: meta,
            });
            let left = ttl.saturating_sub(age.unwrap_or(0)).max(1);
            let expire: Vec<(MemberKey, i64)> = if refresh {
                [MemberKey::Top, MemberKey::Rest, MemberKey::Meta]
                    .into_iter()
                    .map(|k| (k, ttl))
                    .collect()
            } else {
                created.into_iter().map(|k| (k, left)).collect()
            };
            for (key, ms) in expire {
                ops.push(WriteOp {
                    key,
                    cmd: "PEXPIRE",
                    args: vec![ms.to_string()],
                });
            }
        }
        self.dirty_features.clear();
        self.dirty_pairs.clear();
        self.dirty_as_of.clear();
        if !ops.is_empty() {
            self.pending += 1;
        }
        ops
    }

    /// Drops removal tombstones older than the member's newest event by more than the horizon
    /// (`state.tombstone_horizon_secs`, set with [`Member::set_tombstone_horizon`]), in memory
    /// and in Redis (the returned commands).
    fn expire_tombstones(&mut self) -> Vec<WriteOp> {
        let (Some(last), Some(h)) = (self.last_event, self.tombstone_horizon_ms) else {
            return Vec::new();
        };
        let before = last.saturating_sub(h);
        let expired: Vec<String> = self
            .pairs
            .iter()
            .filter(|(_, p)| p.rm && p.ts < before)
            .map(|(c, _)| c.clone())
            .collect();
        if expired.is_empty() {
            return Vec::new();
        }
        for c in &expired {
            self.pairs.remove(c);
            self.as_of.remove(c);
            self.dirty_pairs.remove(c);
            self.dirty_as_of.remove(c);
        }
        let mut ops = WriteOp::split(MemberKey::Pairs, "HDEL", expired.clone(), 1);
        ops.extend(WriteOp::split(MemberKey::AsOf, "HDEL", expired, 1));
        ops
    }

    /// Tombstones older than the member's newest event by more than `ms` are dropped by the next
    /// plan (None: kept for ever).
    pub fn set_tombstone_horizon(&mut self, ms: Option<i64>) {
        self.tombstone_horizon_ms = ms;
    }

    /// Bytes this member holds, estimated.
    fn estimate(&self) -> usize {
        let feats = |f: &FeatureMap| f.keys().map(|k| k.len() + 48).sum::<usize>();
        let pairs: usize = self
            .pairs
            .iter()
            .map(|(c, p)| 3 * c.len() + p.reason.len() + feats(&p.pair_features) + 240)
            .sum();
        256 + feats(&self.features) * 2 + pairs
    }
}

/// The features of a candidate that cached members have, and how many live pairs refer to it.
#[derive(Debug, Default)]
struct Candidate {
    features: Option<FeatureMap>,
    refs: usize,
}

/// Owned members and their candidates' features, bounded by `budget` bytes.
#[derive(Debug, Default)]
pub struct Cache {
    members: HashMap<String, Member>,
    candidates: HashMap<String, Candidate>,
    budget: usize,
    bytes: usize,
    clock: u64,
}

impl Cache {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn contains(&self, member: &str) -> bool {
        self.members.contains_key(member)
    }

    pub fn get(&self, member: &str) -> Option<&Member> {
        self.members.get(member)
    }

    /// A member, marked as used now.
    pub fn get_mut(&mut self, member: &str) -> Option<&mut Member> {
        self.clock += 1;
        let m = self.members.get_mut(member)?;
        m.used = self.clock;
        Some(m)
    }

    fn refer(&mut self, candidate: &str, delta: isize) {
        let e = self.candidates.entry(candidate.to_owned()).or_default();
        e.refs = e.refs.saturating_add_signed(delta);
        if e.refs == 0 {
            self.candidates.remove(candidate);
        }
    }

    /// Adds a loaded member; its candidates without features are in [`Self::unknown_candidates`].
    pub fn insert(&mut self, member: &str, mut m: Member) {
        self.remove(member);
        m.bytes = m.estimate();
        let live: Vec<String> = m.live_pairs().map(|(c, _)| c.clone()).collect();
        for c in live {
            self.refer(&c, 1);
        }
        self.bytes += m.bytes;
        self.members.insert(member.to_owned(), m);
        self.get_mut(member);
    }

    fn remove(&mut self, member: &str) -> Option<Member> {
        let m = self.members.remove(member)?;
        self.bytes = self.bytes.saturating_sub(m.bytes);
        let live: Vec<String> = m.live_pairs().map(|(c, _)| c.clone()).collect();
        for c in live {
            self.refer(&c, -1);
        }
        Some(m)
    }

    /// Applies a pair event to a cached member (false when it is not cached).
    pub fn apply_pair(&mut self, member: &str, candidate: &str, st: PairState) -> PairApplied {
        let Some(m) = self.get_mut(member) else {
            return PairApplied {
                applied: false,
                was_live: false,
                is_live: false,
            };
        };
        let r = m.apply_pair(candidate, st);
        if r.is_live && !r.was_live {
            self.refer(candidate, 1);
        } else if r.was_live && !r.is_live {
            self.refer(candidate, -1);
        }
        r
    }

    /// Candidates of cached members whose features have not been read yet.
    pub fn unknown_candidates(&self) -> Vec<String> {
        self.candidates
            .iter()
            .filter(|(_, c)| c.features.is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Features of a candidate read from Redis (kept only while a cached member has it).
    pub fn set_candidate(&mut self, candidate: &str, features: FeatureMap) {
        if let Some(c) = self.candidates.get_mut(candidate) {
            c.features = Some(features);
        }
    }

    pub fn has_candidate(&self, candidate: &str) -> bool {
        self.candidates.contains_key(candidate)
    }

    pub fn candidate(&self, candidate: &str) -> Option<&FeatureMap> {
        self.candidates.get(candidate)?.features.as_ref()
    }

    /// A member's planned writes were acknowledged: it may be evicted again; its size again.
    pub fn acknowledged(&mut self, member: &str) {
        if let Some(m) = self.members.get_mut(member) {
            m.pending = m.pending.saturating_sub(1);
            let before = m.bytes;
            m.bytes = m.estimate();
            self.bytes = (self.bytes + m.bytes).saturating_sub(before);
        }
    }

    /// Drops every member of `partition` (revoked, or taken by a later owner).
    pub fn drop_partition(&mut self, partition: i32) -> usize {
        let gone: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.partition == partition)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.remove(id);
        }
        gone.len()
    }

    /// Drops one member (its writes were refused: a later owner has it).
    pub fn drop_member(&mut self, member: &str) {
        self.remove(member);
    }

    /// Over budget: evicts the least recently used members that have nothing unwritten or
    /// unacknowledged, down to
    /// 90% of the budget. Returns how many were evicted.
    pub fn evict(&mut self) -> usize {
        if self.bytes <= self.budget {
            return 0;
        }
        let target = self.budget / 10 * 9;
        let mut cold: Vec<(u64, String)> = self
            .members
            .iter()
            .filter(|(_, m)| !m.dirty() && m.pending == 0)
            .map(|(id, m)| (m.used, id.clone()))
            .collect();
        cold.sort_unstable();
        let mut n = 0;
        for (_, id) in cold {
            if self.bytes <= target {
                break;
            }
            self.remove(&id);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Entity;

    fn pair(ts: i64, o: i64, rm: bool) -> PairState {
        PairState {
            reason: "job_change".into(),
            pair_features: FeatureMap::new(),
            ts,
            o,
            rm,
        }
    }

    #[test]
    fn features_and_pairs_are_last_writer_wins_by_time_then_offset() {
        let mut m = Member::default();
        let upd = |ts, x| FeatureUpdate {
            entity: Entity::Member,
            id: "m".into(),
            features: vec![("f".into(), x)],
            ts,
        };
        assert_eq!(m.apply_features(&upd(10, Some(1.0)), 5), 1);
        assert_eq!(m.apply_features(&upd(9, Some(2.0)), 9), 0, "older");
        assert_eq!(m.apply_features(&upd(10, Some(3.0)), 4), 0, "same time, lower offset");
        assert_eq!(m.apply_features(&upd(10, Some(1.0)), 5), 1, "a replay applies again");
        assert_eq!(m.apply_features(&upd(11, None), 0), 1);
        assert!(!m.features.contains_key("f"));

        assert!(m.apply_pair("c", pair(10, 1, false)).applied);
        assert!(!m.apply_pair("c", pair(9, 7, true)).applied, "an older removal");
        let r = m.apply_pair("c", pair(12, 0, true));
        assert!(r.applied && r.was_live && !r.is_live);
        assert!(!m.apply_pair("c", pair(11, 3, false)).applied, "the tombstone holds");
        assert!(!m.set_score("c", 1.0, 20), "a removed pair is not scored");
    }

    #[test]
    fn the_plan_writes_the_ranking_diff_and_nothing_when_nothing_changed() {
        let mut m = Member::default();
        for (i, c) in ["a", "b", "c"].iter().enumerate() {
            m.apply_pair(c, pair(1, i as i64, false));
            m.set_score(c, i as f64, 5);
        }
        let ops = m.plan("model", 2, 1000, 7);
        let zadd = |key| {
            ops.iter()
                .filter(|o: &&WriteOp| o.key == key && o.cmd == "ZADD")
                .collect::<Vec<_>>()
        };
        let top = zadd(MemberKey::Top);
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].args, vec!["2", "c", "1", "b"]);
        let rest = zadd(MemberKey::Rest);
        assert_eq!(rest[0].args, vec!["0", "a"]);
        let expire: Vec<&WriteOp> = ops.iter().filter(|o| o.cmd == "PEXPIRE").collect();
        assert_eq!(expire.len(), 3, "a first write sets the output's TTL");
        assert!(m.plan("model", 2, 1000, 8).is_empty(), "nothing changed since");

        // "a" rises into the top: it leaves the rest, "b" goes down.
        m.set_score("a", 5.0, 6);
        let ops = m.plan("model", 2, 1000, 9);
        let cmds: Vec<(MemberKey, &str, Vec<String>)> = ops
            .iter()
            .filter(|o| matches!(o.key, MemberKey::Top | MemberKey::Rest))
            .map(|o| (o.key, o.cmd, o.args.clone()))
            .collect();
        assert!(cmds.contains(&(MemberKey::Top, "ZREM", vec!["b".into()])));
        assert!(cmds.contains(&(MemberKey::Top, "ZADD", vec!["5".into(), "a".into()])));
        assert!(cmds.contains(&(MemberKey::Rest, "ZREM", vec!["a".into()])));
        assert!(cmds.contains(&(MemberKey::Rest, "ZADD", vec!["1".into(), "b".into()])));
        assert!(ops.iter().any(|o| o.key == MemberKey::Meta && o.cmd == "HSET"));
        assert!(
            !ops.iter().any(|o| o.cmd == "PEXPIRE"),
            "the TTL is set again only once a 64th of it has passed"
        );

        // Half the TTL later the output may have expired: the whole ranking is written again.
        m.set_score("b", 3.0, 7);
        let ops = m.plan("model", 2, 1000, 600);
        let top = ops
            .iter()
            .find(|o| o.key == MemberKey::Top && o.cmd == "ZADD")
            .expect("the top written");
        assert_eq!(top.args, vec!["5", "a", "3", "b"]);
        assert_eq!(ops.iter().filter(|o| o.cmd == "PEXPIRE").count(), 3);
    }

    #[test]
    fn tombstones_go_once_the_member_has_an_event_past_the_horizon() {
        let mut m = Member::default();
        m.set_tombstone_horizon(Some(100));
        m.apply_pair("gone", pair(10, 0, false));
        m.set_score("gone", 1.0, 10);
        m.apply_pair("gone", pair(20, 1, true));
        m.apply_pair("kept", pair(50, 2, false));
        let ops = m.plan("model", 10, 1000, 0);
        assert!(!ops.iter().any(|o| o.cmd == "HDEL"), "within the horizon");
        assert!(m.pairs.contains_key("gone"));
        m.apply_pair("new", pair(121, 3, false));
        let ops = m.plan("model", 10, 1000, 0);
        let hdel: Vec<(MemberKey, Vec<String>)> = ops
            .iter()
            .filter(|o| o.cmd == "HDEL")
            .map(|o| (o.key, o.args.clone()))
            .collect();
        assert_eq!(
            hdel,
            [
                (MemberKey::Pairs, vec!["gone".to_owned()]),
                (MemberKey::AsOf, vec!["gone".to_owned()])
            ]
        );
        assert!(!m.pairs.contains_key("gone") && !m.as_of.contains_key("gone"));
        // Out of contract from now on: an upsert older than the tombstone brings the pair back.
        assert!(m.apply_pair("gone", pair(15, 0, false)).applied);
    }

    #[test]
    fn equal_scores_rank_by_candidate_bytes_like_zrevrange() {
        let mut m = Member::default();
        for c in ["x", "y", "z"] {
            m.apply_pair(c, pair(1, 0, false));
            m.set_score(c, 1.0, 5);
        }
        let (top, rest) = m.ranking(2);
        assert_eq!(top.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(), ["z", "y"]);
        assert_eq!(rest[0].0, "x");
    }

    #[test]
    fn eviction_keeps_dirty_members_and_candidate_features_follow_their_members() {
        let mut cache = Cache::new(1);
        let mut a = Member::default();
        a.apply_pair("c1", pair(1, 0, false));
        assert!(!a.plan("m", 10, 1000, 0).is_empty());
        cache.insert("a", a);
        assert_eq!(cache.evict(), 0, "a member with a write in flight stays");
        cache.acknowledged("a");
        assert_eq!(cache.unknown_candidates(), vec!["c1".to_owned()]);
        cache.set_candidate("c1", FeatureMap::from([("x".into(), 1.0)]));
        assert!(cache.candidate("c1").is_some());
        let mut b = Member::default();
        b.apply_pair("c2", pair(1, 0, false)); // not written: dirty
        cache.insert("b", b);
        assert_eq!(cache.evict(), 1, "only the clean member goes");
        assert!(!cache.contains("a") && cache.contains("b"));
        assert!(!cache.has_candidate("c1"), "no cached member has c1 any more");
        let r = cache.apply_pair("b", "c2", pair(2, 0, true));
        assert!(r.applied && !cache.has_candidate("c2"));
    }
}
