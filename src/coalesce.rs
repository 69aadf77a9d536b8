//! Coalesce stage: triggers inside one batch window collapse per member and per pair, keeping
//! the largest event time, so a burst of updates for one member costs one rescoring.

use std::collections::HashMap;

use tokio::time::Instant;

use crate::offsets::Tp;

/// What a member needs rescored, and as of when.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemberWork {
    /// Every pair of the member, as of at least this time (a member feature update).
    pub all: Option<i64>,
    /// Specific candidates, each as of at least its time.
    pub pairs: HashMap<String, i64>,
}

/// A message whose work is in this window; it is done when the window is written.
#[derive(Debug, Clone, PartialEq)]
pub struct MsgRef {
    pub tp: Tp,
    pub offset: i64,
    /// Kafka message timestamp (ms), for event-to-score latency.
    pub timestamp_ms: Option<i64>,
    pub topic_label: &'static str,
    /// Part of a split partition's backlog (see `[catchup]`), not a fresh event.
    pub backlog: bool,
    /// Already `catchup.lag_ms` old when it was read (taken in order before its partition was
    /// split, or from one with too little behind to split; never with `lag_ms` 0): its freshness
    /// counts as backlog.
    pub late: bool,
    /// Its offset was already stored (a candidate update, once its fan-out intent was recorded
    /// in Redis): when its work is written only its freshness is observed.
    pub acked: bool,
}

#[cfg(test)]
impl MsgRef {
    /// A message at `offset` of partition ("t", 0), for unit tests.
    pub fn for_test(offset: i64, backlog: bool) -> Self {
        Self {
            tp: ("t".into(), 0),
            offset,
            timestamp_ms: None,
            topic_label: "feature_updates",
            backlog,
            late: false,
            acked: false,
        }
    }
}

/// One batch window.
#[derive(Debug)]
pub struct Window {
    /// Merge repeated triggers (the default). Off only to measure what coalescing buys: repeats
    /// are then kept in `uncoalesced` and each is scored again.
    coalesce: bool,
    /// Triggers that would have merged, when `coalesce` is off: (member, candidate or all, as_of).
    pub uncoalesced: Vec<(String, Option<String>, i64)>,
    pub members: HashMap<String, MemberWork>,
    /// Explicit pair triggers folded in so far (repeats too, when not coalescing).
    pair_triggers: usize,
    /// Whole-member triggers folded in so far (repeats too, when not coalescing).
    member_triggers: usize,
    /// Rows a whole-member trigger is expected to cost (its member's pairs): the worker keeps it
    /// at the recent average, so a window's size estimates the rows it will score.
    member_weight: usize,
    /// Messages completed by writing this window.
    pub messages: Vec<MsgRef>,
    /// When the first trigger arrived: the flush deadline counts from here.
    pub started: Option<Instant>,
}

impl Default for Window {
    fn default() -> Self {
        Self::new(true)
    }
}

impl Window {
    pub fn new(coalesce: bool) -> Self {
        Self {
            coalesce,
            uncoalesced: Vec::new(),
            members: HashMap::new(),
            pair_triggers: 0,
            member_triggers: 0,
            member_weight: 1,
            messages: Vec::new(),
            started: None,
        }
    }

    /// Nothing to write and no deadline running.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.messages.is_empty() && self.started.is_none()
    }

    /// Rows to score so far, estimated: explicit pairs, plus each whole-member trigger at the
    /// member weight.
    pub fn size(&self) -> usize {
        self.pair_triggers + self.member_triggers * self.member_weight
    }

    /// Sets the rows a whole-member trigger is expected to cost (at least 1).
    pub fn set_member_weight(&mut self, rows: usize) {
        self.member_weight = rows.max(1);
    }

    /// Starts the flush deadline if it is not running.
    pub fn touch_deadline(&mut self) {
        if self.started.is_none() {
            self.started = Some(Instant::now());
        }
    }

    /// Rescore all of `member`'s pairs as of at least `as_of`.
    pub fn member(&mut self, member: &str, as_of: i64) {
        self.touch_deadline();
        let w = self.members.entry(member.to_owned()).or_default();
        match &mut w.all {
            Some(_) if !self.coalesce => {
                self.uncoalesced.push((member.to_owned(), None, as_of));
                self.member_triggers += 1;
            }
            Some(t) => *t = (*t).max(as_of),
            None => {
                w.all = Some(as_of);
                self.member_triggers += 1;
            }
        }
    }

    /// Rescore one pair as of at least `as_of`.
    pub fn pair(&mut self, member: &str, candidate: &str, as_of: i64) {
        self.touch_deadline();
        let w = self.members.entry(member.to_owned()).or_default();
        match w.pairs.get_mut(candidate) {
            Some(_) if !self.coalesce => {
                self.uncoalesced
                    .push((member.to_owned(), Some(candidate.to_owned()), as_of));
                self.pair_triggers += 1;
            }
            Some(t) => *t = (*t).max(as_of),
            None => {
                w.pairs.insert(candidate.to_owned(), as_of);
                self.pair_triggers += 1;
            }
        }
    }

    /// A message completed by this window's write.
    pub fn message(&mut self, m: MsgRef) {
        self.touch_deadline();
        self.messages.push(m);
    }

    pub fn take(&mut self) -> Window {
        let mut next = Window::new(self.coalesce);
        next.member_weight = self.member_weight;
        std::mem::replace(self, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_collapse_to_the_largest_event_time() {
        let mut w = Window::default();
        w.pair("m1", "c1", 5);
        w.pair("m1", "c1", 9);
        w.pair("m1", "c1", 7);
        w.member("m1", 3);
        w.member("m1", 4);
        w.pair("m2", "c1", 1);
        assert_eq!(w.size(), 3);
        w.set_member_weight(10);
        assert_eq!(w.size(), 12, "two pairs and one member of ~10 rows");
        assert_eq!(w.members["m1"].pairs["c1"], 9);
        assert_eq!(w.members["m1"].all, Some(4));
        assert!(w.started.is_some());
        let taken = w.take();
        assert!(w.is_empty() && w.started.is_none());
        assert_eq!(taken.members.len(), 2);
    }

    #[test]
    fn without_coalescing_every_repeat_is_kept() {
        let mut w = Window::new(false);
        w.pair("m1", "c1", 5);
        w.pair("m1", "c1", 9);
        w.member("m1", 3);
        w.member("m1", 4);
        assert_eq!(w.size(), 4);
        assert_eq!(w.uncoalesced.len(), 2);
        assert!(w.take().uncoalesced.len() == 2 && w.uncoalesced.is_empty());
    }
}
