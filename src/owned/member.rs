//! One owned member in memory: its features, a slot per candidate (the pair, its as_of and score,
//! what Redis holds of its ranking), and the writes a window makes of it ([`Member::plan`]).
//!
//! Guarantee: the ranking written (`scores:{m}` and `rest:{m}`) is exactly the top N and the rest
//! of the member's current scores in `ZREVRANGE` order. Limits: the size is an estimate of the
//! layout (`Member::estimate`), not a measurement.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::decode::FeatureUpdate;
use crate::model::FeatureMap;
use crate::store::{MemberKey, OwnedLoad, PairState, WriteOp};

/// Maps keyed by member or candidate id (foldhash: fast, seeded per process).
type Map<K, V> = foldhash::HashMap<K, V>;

/// A ranking set of at least this many entries, most of them changed, is written afresh.
const REWRITE_FROM: usize = 8;

/// Candidates with their scores, best first.
pub type Ranked<'a> = Vec<(&'a String, f64)>;

/// A pair as the cache holds it: [`PairState`] in less memory (boxed strings, its few features
/// as a list).
#[derive(Debug, Clone, PartialEq)]
pub struct CachedPair {
    pub reason: Box<str>,
    pub features: Box<[(Box<str>, f64)]>,
    /// Moment time (ms) and offset: the pair's last-writer-wins version.
    pub ts: i64,
    pub o: i64,
    pub rm: bool,
}

impl From<PairState> for CachedPair {
    fn from(p: PairState) -> Self {
        let mut features: Vec<(Box<str>, f64)> = p
            .pair_features
            .into_iter()
            .map(|(k, v)| (k.into_boxed_str(), v))
            .collect();
        features.sort_by(|a, b| a.0.cmp(&b.0));
        Self {
            reason: p.reason.into_boxed_str(),
            features: features.into_boxed_slice(),
            ts: p.ts,
            o: p.o,
            rm: p.rm,
        }
    }
}

impl CachedPair {
    /// The pair as stored in Redis (`pairs:{m}`).
    pub fn state(&self) -> PairState {
        PairState {
            reason: self.reason.to_string(),
            pair_features: self
                .features
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            ts: self.ts,
            o: self.o,
            rm: self.rm,
        }
    }
}

/// No value: the sentinel of a slot's `as_of` (scores are always finite, so theirs is NaN).
const NO_AS_OF: i64 = i64::MIN;

fn some_score(s: f64) -> Option<f64> {
    (!s.is_nan()).then_some(s)
}

/// What a member holds of one candidate: one entry per candidate, so a pair costs one key and one
/// lookup however many of these it has (sentinels rather than options keep the slot small).
#[derive(Debug, Clone)]
struct Slot {
    /// The pair, a removal tombstone included (None: only an as_of or a written score is left).
    pair: Option<CachedPair>,
    /// As of when the pair's score was computed ([`NO_AS_OF`]: never; kept after a removal, so
    /// a pair added again never scores as of an earlier time).
    as_of: i64,
    /// The current score (live scored pairs only; NaN: none).
    score: f64,
    /// What Redis holds: the score in the top N, and in the rest (NaN: not there).
    in_top: f64,
    in_rest: f64,
    dirty_pair: bool,
    dirty_as_of: bool,
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            pair: None,
            as_of: NO_AS_OF,
            score: f64::NAN,
            in_top: f64::NAN,
            in_rest: f64::NAN,
            dirty_pair: false,
            dirty_as_of: false,
        }
    }
}

impl Slot {
    fn live(&self) -> Option<&CachedPair> {
        self.pair.as_ref().filter(|p| !p.rm)
    }

    fn as_of(&self) -> Option<i64> {
        (self.as_of != NO_AS_OF).then_some(self.as_of)
    }

    fn score(&self) -> Option<f64> {
        some_score(self.score)
    }

    fn top(&self) -> Option<f64> {
        some_score(self.in_top)
    }

    fn rest(&self) -> Option<f64> {
        some_score(self.in_rest)
    }

    fn is_empty(&self) -> bool {
        self.pair.is_none()
            && self.as_of().is_none()
            && self.top().is_none()
            && self.rest().is_none()
    }
}

/// One owned member.
#[derive(Debug, Clone, Default)]
pub struct Member {
    pub partition: i32,
    pub features: FeatureMap,
    versions: HashMap<String, (i64, i64)>,
    /// Per candidate: the pair (tombstones included), its as_of and score, what Redis holds.
    slots: Map<String, Slot>,
    dirty_features: BTreeSet<String>,
    /// Pairs the model refused (stored features it rejects, a score that is not finite), and
    /// when to try again: in memory only (a reload tries once more).
    refused: Option<Box<Map<String, i64>>>,
    /// A pair or an as_of changed since the last plan.
    dirty_slots: bool,
    /// When the output's TTL was last set (ms, wall clock), as far as this owner knows.
    ttl_set_at: Option<i64>,
    /// Event time of the newest event applied to the member (None: none yet).
    pub last_event: Option<i64>,
    tombstone_horizon_ms: Option<i64>,
    /// Writes planned and not acknowledged yet: the member is not evicted meanwhile (a reload
    /// would read Redis before they land).
    pub(super) pending: usize,
    pub(super) bytes: usize,
    pub(super) used: u64,
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
        let mut slots: Map<String, Slot> = Map::default();
        slots.reserve(l.pairs.len());
        for (c, p) in l.pairs {
            slots.entry(c).or_default().pair = Some(p.into());
        }
        for (c, a) in l.as_of {
            slots.entry(c).or_default().as_of = a;
        }
        for (c, s) in l.top {
            slots.entry(c).or_default().in_top = s;
        }
        for (c, s) in l.rest {
            slots.entry(c).or_default().in_rest = s;
        }
        for slot in slots.values_mut() {
            if slot.live().is_some() {
                slot.score = slot.rest().or(slot.top()).unwrap_or(f64::NAN);
            }
        }
        let mut m = Member {
            partition,
            features: l.features,
            versions: l.versions,
            slots,
            ttl_set_at: l.ttl_set_at,
            ..Member::default()
        };
        m.last_event = m
            .slots
            .values()
            .filter_map(|s| Some(s.pair.as_ref()?.ts))
            .chain(m.versions.values().map(|v| v.0))
            .max();
        m.bytes = m.estimate();
        m
    }

    /// The live pair with candidate `c`.
    pub fn live(&self, c: &str) -> Option<&CachedPair> {
        self.slots.get(c)?.live()
    }

    pub fn live_pairs(&self) -> impl Iterator<Item = (&String, &CachedPair)> {
        self.slots.iter().filter_map(|(c, s)| Some((c, s.live()?)))
    }

    /// As of when the pair with candidate `c` was last scored.
    pub fn as_of(&self, c: &str) -> Option<i64> {
        self.slots.get(c)?.as_of()
    }

    /// Whether the member holds a pair (or its tombstone) with candidate `c`.
    pub fn has_pair(&self, c: &str) -> bool {
        self.slots.get(c).is_some_and(|s| s.pair.is_some())
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
        let newer = self
            .slots
            .get(candidate)
            .and_then(|s| s.pair.as_ref())
            .is_some_and(|cur| (cur.ts, cur.o) > (st.ts, st.o));
        if newer {
            return PairApplied {
                applied: false,
                was_live,
                is_live: was_live,
            };
        }
        let is_live = !st.rm;
        self.last_event = self.last_event.max(Some(st.ts));
        let slot = match self.slots.get_mut(candidate) {
            Some(s) => s,
            None => self.slots.entry(candidate.to_owned()).or_default(),
        };
        if !is_live {
            slot.score = f64::NAN;
        }
        slot.pair = Some(st.into());
        slot.dirty_pair = true;
        self.dirty_slots = true;
        PairApplied {
            applied: true,
            was_live,
            is_live,
        }
    }

    /// Records a new score of a live pair (false: the pair is gone).
    pub fn set_score(&mut self, candidate: &str, score: f64, as_of: i64) -> bool {
        let Some(slot) = self.slots.get_mut(candidate) else {
            return false;
        };
        if slot.live().is_none() {
            return false;
        }
        slot.score = score;
        slot.as_of = as_of;
        slot.dirty_as_of = true;
        self.dirty_slots = true;
        if let Some(r) = self.refused.as_mut() {
            r.remove(candidate);
            if r.is_empty() {
                self.refused = None;
            }
        }
        true
    }

    /// A pair the model refused is tried again at `at`, not before.
    pub fn refuse(&mut self, candidate: &str, at: i64) {
        self.refused
            .get_or_insert_default()
            .insert(candidate.to_owned(), at);
    }

    /// When the pair with candidate `c` is due next, by `next_due(as_of, moment ts)` (a pair
    /// never scored is due at once).
    fn pair_due(&self, c: &str, p: &CachedPair, next_due: &impl Fn(i64, i64) -> i64) -> i64 {
        if let Some(at) = self.refused.as_ref().and_then(|r| r.get(c)) {
            return *at;
        }
        self.as_of(c).map_or(i64::MIN, |a| next_due(a, p.ts))
    }

    /// When the member is due next: its earliest live pair (None: no live pair).
    pub fn next_due(&self, next_due: impl Fn(i64, i64) -> i64) -> Option<i64> {
        self.live_pairs()
            .map(|(c, p)| self.pair_due(c, p, &next_due))
            .min()
    }

    /// The live pairs due by `at`.
    pub fn due_by(&self, at: i64, next_due: impl Fn(i64, i64) -> i64) -> Vec<String> {
        self.live_pairs()
            .filter(|(c, p)| self.pair_due(c, p, &next_due) <= at)
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// Whether this member has changes not written yet (scores change only with a pair or an
    /// as_of, so the ranking cannot differ from what was written without one of these).
    pub fn dirty(&self) -> bool {
        self.dirty_slots || !self.dirty_features.is_empty()
    }

    /// The top N and the rest of the current scores, in ZREVRANGE order (higher score first,
    /// then the greater candidate by bytes).
    pub fn ranking(&self, top_n: usize) -> (Ranked<'_>, Ranked<'_>) {
        let mut all: Vec<(&String, f64)> = self
            .slots
            .iter()
            .filter_map(|(c, s)| Some((c, s.score()?)))
            .collect();
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
        let (mut pairs, mut as_of) = (Vec::new(), Vec::new());
        if self.dirty_slots {
            for (c, slot) in self.slots.iter_mut() {
                if std::mem::take(&mut slot.dirty_pair) {
                    let state = slot.pair.as_ref().map(CachedPair::state);
                    if let Some(j) = state.and_then(|p| serde_json::to_string(&p).ok()) {
                        pairs.extend([c.clone(), j]);
                    }
                }
                if std::mem::take(&mut slot.dirty_as_of) {
                    if let Some(a) = slot.as_of() {
                        as_of.extend([c.clone(), a.to_string()]);
                    }
                }
            }
        }
        let as_of_changed = !as_of.is_empty();
        hset(MemberKey::Pairs, pairs);
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
                for slot in self.slots.values_mut() {
                    slot.in_top = f64::NAN;
                    slot.in_rest = f64::NAN;
                }
            }
            let held_top = self.slots.values().any(|s| s.top().is_some());
            let held_rest = self.slots.values().any(|s| s.rest().is_some());
            let (top, rest) = self.ranking(top_n);
            let top_ids: HashSet<String> = top.iter().map(|(c, _)| (*c).clone()).collect();
            let entries = |want: &Ranked<'_>, held: fn(&Slot) -> Option<f64>, all: bool| {
                want.iter()
                    .filter(|(c, s)| all || self.slots.get(*c).and_then(held) != Some(*s))
                    .flat_map(|(c, s)| [s.to_string(), (*c).clone()])
                    .collect::<Vec<String>>()
            };
            let (mut rem_top, mut rem_rest) = (Vec::new(), Vec::new());
            for (c, slot) in &self.slots {
                let in_top = top_ids.contains(c);
                if slot.top().is_some() && !in_top {
                    rem_top.push(c.clone());
                }
                if slot.rest().is_some() && (in_top || slot.score().is_none()) {
                    rem_rest.push(c.clone());
                }
            }
            let mut changed = as_of_changed;
            let mut created = Vec::new();
            for (key, want, held_of, rem, held) in [
                (
                    MemberKey::Top,
                    &top,
                    Slot::top as fn(&Slot) -> Option<f64>,
                    rem_top,
                    held_top,
                ),
                (MemberKey::Rest, &rest, Slot::rest, rem_rest, held_rest),
            ] {
                let add = entries(want, held_of, false);
                if key == MemberKey::Top && !(add.is_empty() && rem.is_empty()) {
                    changed = true;
                }
                // Most entries of a larger set changed (a member rescored whole): the set is
                // written afresh, best first, so that each insert into Redis's small sorted set
                // lands at its head instead of after a scan parsing every stored score.
                if held && add.len() >= want.len() && want.len() >= REWRITE_FROM {
                    ops.push(WriteOp {
                        key,
                        cmd: "DEL",
                        args: Vec::new(),
                    });
                    ops.extend(WriteOp::split(key, "ZADD", entries(want, held_of, true), 2));
                    created.push(key);
                    continue;
                }
                if !add.is_empty() && !held {
                    created.push(key);
                }
                if !rem.is_empty() {
                    ops.extend(WriteOp::split(key, "ZREM", rem, 1));
                }
                if !add.is_empty() {
                    ops.extend(WriteOp::split(key, "ZADD", add, 2));
                }
            }
            // What Redis holds from now on, as if this write had landed.
            for (c, slot) in self.slots.iter_mut() {
                let top = top_ids.contains(c);
                (slot.in_top, slot.in_rest) = if top {
                    (slot.score, f64::NAN)
                } else {
                    (f64::NAN, slot.score)
                };
            }
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
            if let Some(max) = self.slots.values().filter_map(Slot::as_of).max() {
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
        self.dirty_slots = false;
        // Expired tombstones whose ranking entries were removed above are gone altogether.
        self.slots.retain(|_, s| !s.is_empty());
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
            .slots
            .iter()
            .filter(|(_, s)| s.pair.as_ref().is_some_and(|p| p.rm && p.ts < before))
            .map(|(c, _)| c.clone())
            .collect();
        if expired.is_empty() {
            return Vec::new();
        }
        for c in &expired {
            if let Some(slot) = self.slots.get_mut(c) {
                slot.pair = None;
                slot.as_of = NO_AS_OF;
                slot.dirty_pair = false;
                slot.dirty_as_of = false;
            }
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

    /// Bytes this member holds, estimated: a slot is 120 bytes in a table kept at most 7/8 full,
    /// plus its heap (allocations rounded up to 16 bytes).
    pub(super) fn estimate(&self) -> usize {
        let feats = |f: &FeatureMap| f.keys().map(|k| k.len() + 48).sum::<usize>();
        let heap = |n: usize| n.div_ceil(16) * 16;
        let pairs: usize = self
            .slots
            .iter()
            .map(|(c, s)| {
                150 + heap(c.len())
                    + s.pair.as_ref().map_or(0, |p| {
                        heap(p.reason.len())
                            + heap(p.features.len() * 24)
                            + p.features.iter().map(|(k, _)| heap(k.len())).sum::<usize>()
                    })
            })
            .sum();
        256 + feats(&self.features) * 2 + pairs
    }
}
