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

use crate::model::FeatureMap;
use crate::store::PairState;

pub use super::member::{CachedPair, Member, PairApplied, Ranked};

/// Maps keyed by member or candidate id (foldhash: fast, seeded per process).
type Map<K, V> = foldhash::HashMap<K, V>;

/// The features of a candidate that cached members have, and how many live pairs refer to it.
#[derive(Debug, Default)]
struct Candidate {
    features: Option<FeatureMap>,
    refs: usize,
}

/// Owned members and their candidates' features, bounded by `budget` bytes.
#[derive(Debug, Default)]
pub struct Cache {
    members: Map<String, Member>,
    candidates: Map<String, Candidate>,
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
    /// unacknowledged and that `keep` does not hold (the members of the window being filled:
    /// their rows are scored from memory), down to 90% of the budget. Returns how many were
    /// evicted.
    pub fn evict(&mut self, keep: impl Fn(&str) -> bool) -> usize {
        if self.bytes <= self.budget {
            return 0;
        }
        let target = self.budget / 10 * 9;
        let mut cold: Vec<(u64, String)> = self
            .members
            .iter()
            .filter(|(id, m)| !m.dirty() && m.pending == 0 && !keep(id))
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
mod tests;
