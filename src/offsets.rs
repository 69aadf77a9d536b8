//! Acknowledge stage: per-partition contiguous watermarks of fully processed messages.
//!
//! Guarantee: the watermark of a partition only passes offset `o` once the message at `o` and
//! every message before it (that this worker received) is done — decoded and dead-lettered, or
//! applied and every score it caused acknowledged by Redis. The worker stores `watermark − 1`
//! with librdkafka (`store_offset` commits the offset after it), so a crash or rebalance replays
//! from the first unfinished message. Limits: after a revocation the partition is forgotten; its
//! late completions are ignored, and the next owner replays what was not stored.

use std::collections::{BTreeSet, HashMap};

/// A topic-partition.
pub type Tp = (String, i32);

#[derive(Debug, Default)]
struct Partition {
    /// Offsets received and not yet done.
    pending: BTreeSet<i64>,
    /// One past the highest offset the group's reader delivered.
    next: i64,
    /// Timestamp (ms) of each pending message, for lag in seconds.
    timestamps: HashMap<i64, i64>,
    /// Kafka timestamp of the last message completed at the watermark.
    last_done_ts: Option<i64>,
    /// Kafka timestamp of the last message the group's reader delivered.
    last_received_ts: Option<i64>,
    /// The group's reader delivered something (a partition split before that has `next` 0).
    delivered: bool,
    /// A split: the group's reader drains the backlog below `end` while the head reader takes
    /// `end` onwards.
    split: Option<Split>,
}

#[derive(Debug, Clone, Copy)]
struct Split {
    /// The log end when the split was made: the head reader starts here.
    end: i64,
    /// One past the last offset the head reader delivered.
    head_next: i64,
    /// The head reader stopped taking messages (the backlog is read, or it skipped an offset):
    /// the group's reader covers everything from `head_next` on.
    head_stopped: bool,
}

/// Which reader a message came from, and what the tracker made of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Track it and score it with fresh events.
    Live,
    /// Track it and score it with the backlog (a split partition below its split point).
    Backlog,
    /// Already delivered by the other reader (or from a revoked partition): ignore it.
    Duplicate,
}

/// Watermarks of every partition this worker holds.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<Tp, Partition>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a message from the consumer group's reader (offsets of one partition arrive
    /// in increasing order).
    pub fn received(&mut self, tp: &Tp, offset: i64, timestamp_ms: Option<i64>) -> Received {
        let p = self.parts.entry(tp.clone()).or_default();
        p.delivered = true;
        if offset < p.next {
            return Received::Duplicate; // a re-delivery after a seek or rebalance
        }
        let lane = match p.split.as_mut() {
            Some(sp) if offset < sp.end => {
                if offset + 1 == sp.end {
                    // The whole backlog is delivered: from here the head reader's messages are
                    // not taken, and the readers merge once this reader passes the head's last.
                    sp.head_stopped = true;
                    if sp.head_next == sp.end {
                        p.split = None;
                    }
                }
                Received::Backlog
            }
            Some(sp) => {
                sp.head_stopped = true;
                if offset < sp.head_next {
                    p.next = offset + 1;
                    // The head reader's messages, read again: as fresh as they are. (Left at the
                    // backlog's last, the partition would look minutes behind once the readers
                    // merge, and be split again for nothing.)
                    p.last_received_ts = timestamp_ms.or(p.last_received_ts);
                    if offset + 1 == sp.head_next {
                        p.split = None;
                    }
                    return Received::Duplicate;
                }
                p.split = None;
                Received::Live
            }
            None => Received::Live,
        };
        p.next = offset + 1;
        p.last_received_ts = timestamp_ms.or(p.last_received_ts);
        p.add(offset, timestamp_ms);
        lane
    }

    /// Splits `tp` at `end` (the log end): the group's reader goes on draining the offsets
    /// below it, the head reader takes `end` onwards. False when there is nothing to split (a
    /// split running, or nothing behind). A partition the group's reader has delivered nothing
    /// from yet can be split too: whatever it delivers below `end` is backlog.
    pub fn split(&mut self, tp: &Tp, end: i64) -> bool {
        let p = self.parts.entry(tp.clone()).or_default();
        if p.split.is_some() || end <= p.next {
            return false;
        }
        p.split = Some(Split {
            end,
            head_next: end,
            head_stopped: false,
        });
        true
    }

    /// Registers a message from the head reader. Only the next expected offset is taken: after
    /// a skip (a broker answering from the next batch, compaction) or once the backlog is read,
    /// the head reader stops and the group's reader covers the rest, so nothing is missed.
    pub fn received_head(&mut self, tp: &Tp, offset: i64, timestamp_ms: Option<i64>) -> bool {
        let Some(p) = self.parts.get_mut(tp) else {
            return false;
        };
        let Some(sp) = p.split.as_mut() else {
            return false;
        };
        if sp.head_stopped || offset < sp.head_next {
            return false;
        }
        if offset > sp.head_next {
            if sp.head_next == sp.end {
                // The head reader's first message lies past the split point (a broker whose
                // log-end answer is not a batch boundary, or compaction). The group's reader has
                // not reached the split point (it would have stopped the head), so the backlog
                // simply extends to this message.
                sp.end = offset;
            } else {
                tracing::info!(
                    topic = %tp.0,
                    partition = tp.1,
                    expected = sp.head_next,
                    got = offset,
                    "the head reader skipped offsets; the group's reader covers the rest"
                );
                sp.head_stopped = true;
                return false;
            }
        }
        sp.head_next = offset + 1;
        p.add(offset, timestamp_ms);
        true
    }

    /// Whether `tp` is split and its head reader still takes messages.
    pub fn head_active(&self, tp: &Tp) -> bool {
        self.parts
            .get(tp)
            .and_then(|p| p.split)
            .is_some_and(|sp| !sp.head_stopped)
    }

    /// Where the head reader of `tp` goes on.
    pub fn head_next(&self, tp: &Tp) -> Option<i64> {
        self.parts.get(tp)?.split.map(|sp| sp.head_next)
    }

    /// Whether `tp` is split (its backlog not yet read, or the readers not yet merged).
    pub fn is_split(&self, tp: &Tp) -> bool {
        self.parts.get(tp).is_some_and(|p| p.split.is_some())
    }

    /// One past the highest offset the group's reader delivered.
    pub fn next(&self, tp: &Tp) -> Option<i64> {
        self.parts.get(tp).map(|p| p.next)
    }

    /// Whether the group's reader delivered anything from `tp` (since it was assigned).
    pub fn delivered(&self, tp: &Tp) -> bool {
        self.parts.get(tp).is_some_and(|p| p.delivered)
    }

    /// Timestamp of the last message the group's reader delivered.
    pub fn last_received_ts(&self, tp: &Tp) -> Option<i64> {
        self.parts.get(tp)?.last_received_ts
    }

    /// Marks a message done. Returns the offset to store (the highest offset below which every
    /// message is done) when the watermark moved.
    pub fn done(&mut self, tp: &Tp, offset: i64) -> Option<i64> {
        let p = self.parts.get_mut(tp)?;
        let before = p.watermark();
        if !p.pending.remove(&offset) {
            return None;
        }
        let ts = p.timestamps.remove(&offset);
        if before == offset {
            p.last_done_ts = ts.or(p.last_done_ts);
        }
        let after = p.watermark();
        (after != before).then_some(after - 1)
    }

    /// Forgets revoked partitions.
    pub fn revoke(&mut self, tp: &Tp) {
        self.parts.remove(tp);
    }

    /// The next offset this worker would commit for `tp` (its position), if it has seen any.
    pub fn position(&self, tp: &Tp) -> Option<i64> {
        self.parts.get(tp).map(Partition::watermark)
    }

    /// Kafka timestamp of the oldest unfinished message, or of the last finished one.
    pub fn oldest_unfinished_ts(&self, tp: &Tp) -> Option<i64> {
        let p = self.parts.get(tp)?;
        if p.split.is_some() && p.watermark() < p.pending.first().copied().unwrap_or(i64::MAX) {
            // Backlog not yet delivered: about as old as the last message the group's reader had.
            return p.last_received_ts;
        }
        match p.pending.first() {
            Some(o) => p.timestamps.get(o).copied(),
            None => p.last_done_ts,
        }
    }

    /// Messages received and not yet done, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.parts.values().map(|p| p.pending.len()).sum()
    }

    pub fn partitions(&self) -> impl Iterator<Item = &Tp> {
        self.parts.keys()
    }
}

impl Partition {
    /// The lowest offset not done: the first pending one, or the first that no reader has
    /// delivered yet.
    fn watermark(&self) -> i64 {
        let frontier = match self.split {
            Some(sp) if self.next < sp.end => self.next,
            Some(sp) => self.next.max(sp.head_next),
            None => self.next,
        };
        self.pending
            .first()
            .copied()
            .unwrap_or(frontier)
            .min(frontier)
    }

    fn add(&mut self, offset: i64, timestamp_ms: Option<i64>) {
        self.pending.insert(offset);
        if let Some(ts) = timestamp_ms {
            self.timestamps.insert(offset, ts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_only_moves_over_contiguous_done_offsets() {
        let tp: Tp = ("t".into(), 0);
        let mut t = OffsetTracker::new();
        for o in 10..15 {
            assert_eq!(t.received(&tp, o, Some(o * 100)), Received::Live);
        }
        assert_eq!(t.position(&tp), Some(10));
        assert_eq!(t.done(&tp, 12), None, "12 done but 10 and 11 are not");
        assert_eq!(t.done(&tp, 11), None);
        assert_eq!(t.oldest_unfinished_ts(&tp), Some(1000));
        assert_eq!(
            t.done(&tp, 10),
            Some(12),
            "10..=12 done: store 12, commit 13"
        );
        assert_eq!(t.position(&tp), Some(13));
        assert_eq!(t.done(&tp, 14), None);
        assert_eq!(t.done(&tp, 13), Some(14));
        assert_eq!(t.position(&tp), Some(15));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.done(&tp, 13), None, "a second completion is ignored");
    }

    #[test]
    fn a_split_holds_the_watermark_until_the_backlog_is_done_and_never_skips() {
        let tp: Tp = ("t".into(), 0);
        let mut t = OffsetTracker::new();
        assert_eq!(t.received(&tp, 0, Some(100)), Received::Live);
        assert!(
            t.split(&tp, 10),
            "backlog 1..10 stays with the group's reader"
        );
        assert!(!t.split(&tp, 20), "one split at a time");
        assert!(t.received_head(&tp, 10, Some(110)));
        assert!(t.received_head(&tp, 11, Some(111)));
        assert_eq!(t.done(&tp, 0), Some(0));
        assert_eq!(
            t.done(&tp, 10),
            None,
            "fresh messages done; offsets 1..10 are not"
        );
        assert_eq!(t.done(&tp, 11), None);
        assert_eq!(t.received(&tp, 1, Some(101)), Received::Backlog);
        assert_eq!(t.position(&tp), Some(1));
        for o in 2..10 {
            assert_eq!(t.received(&tp, o, Some(100 + o)), Received::Backlog);
        }
        for o in 1..9 {
            assert_eq!(t.done(&tp, o), Some(o));
        }
        assert_eq!(
            t.done(&tp, 9),
            Some(11),
            "9, and the head's 10 and 11, done: commit 12"
        );
        assert_eq!(t.last_received_ts(&tp), Some(109));
        assert_eq!(
            t.received(&tp, 10, Some(110)),
            Received::Duplicate,
            "the head had it"
        );
        assert_eq!(
            t.last_received_ts(&tp),
            Some(110),
            "the group's reader is as fresh as what it reads again"
        );
        assert!(
            !t.received_head(&tp, 12, None),
            "backlog read: the head reader stops"
        );
        assert_eq!(t.received(&tp, 11, None), Received::Duplicate);
        assert_eq!(t.received(&tp, 12, Some(112)), Received::Live);
        assert!(!t.is_split(&tp), "the readers merged");
        assert_eq!(t.done(&tp, 12), Some(12));
    }

    #[test]
    fn a_head_reader_that_skips_an_offset_hands_the_rest_back() {
        let tp: Tp = ("t".into(), 0);
        let mut t = OffsetTracker::new();
        t.received(&tp, 0, None);
        assert!(t.split(&tp, 5));
        assert!(t.received_head(&tp, 5, None));
        assert!(
            !t.received_head(&tp, 8, None),
            "6 and 7 never came from the head"
        );
        assert!(!t.head_active(&tp));
        assert!(!t.received_head(&tp, 9, None));
        for o in 1..5 {
            assert_eq!(t.received(&tp, o, None), Received::Backlog);
        }
        assert_eq!(t.received(&tp, 5, None), Received::Duplicate);
        assert_eq!(
            t.received(&tp, 6, None),
            Received::Live,
            "the group's reader covers 6 on"
        );
        for o in [0, 1, 2, 3, 4, 5, 6] {
            t.done(&tp, o);
        }
        assert_eq!(t.position(&tp), Some(7));
    }

    #[test]
    fn a_head_reader_starting_past_the_split_point_extends_the_backlog() {
        let tp: Tp = ("t".into(), 0);
        let mut t = OffsetTracker::new();
        t.received(&tp, 0, None);
        assert!(t.split(&tp, 5), "the log end answer: 5");
        assert!(
            t.received_head(&tp, 8, None),
            "the head's first message is 8 (its batch started past 5)"
        );
        assert!(t.received_head(&tp, 9, None));
        assert!(t.head_active(&tp));
        for o in 1..8 {
            assert_eq!(t.received(&tp, o, None), Received::Backlog, "offset {o}");
        }
        assert!(!t.head_active(&tp), "backlog read up to the head's start");
        assert_eq!(t.received(&tp, 8, None), Received::Duplicate);
        assert_eq!(t.received(&tp, 9, None), Received::Duplicate);
        assert!(!t.is_split(&tp), "merged");
        assert_eq!(t.received(&tp, 10, None), Received::Live);
        for o in 0..=10 {
            t.done(&tp, o);
        }
        assert_eq!(t.position(&tp), Some(11), "every offset once, none skipped");
    }

    #[test]
    fn a_head_reader_cannot_move_the_split_point_once_the_backlog_is_read() {
        let tp: Tp = ("t".into(), 0);
        let mut t = OffsetTracker::new();
        t.received(&tp, 0, None);
        assert!(t.split(&tp, 3));
        for o in 1..3 {
            assert_eq!(t.received(&tp, o, None), Received::Backlog);
        }
        assert_eq!(
            t.received(&tp, 3, None),
            Received::Live,
            "group passed the split point"
        );
        assert!(
            !t.received_head(&tp, 6, None),
            "too late: the group's reader covers it"
        );
        assert_eq!(t.received(&tp, 4, None), Received::Live);
    }

    #[test]
    fn a_partition_split_before_anything_was_delivered_keeps_every_offset() {
        let tp: Tp = ("t".into(), 2);
        let mut t = OffsetTracker::new();
        assert!(!t.delivered(&tp));
        assert!(t.split(&tp, 100), "starved partition split at its log end");
        assert!(t.received_head(&tp, 100, Some(1)));
        assert_eq!(t.done(&tp, 100), None, "the backlog holds the watermark");
        assert_eq!(
            t.received(&tp, 40, Some(0)),
            Received::Backlog,
            "the group's reader starts at the committed offset, 40"
        );
        assert!(t.delivered(&tp));
        assert_eq!(t.done(&tp, 40), Some(40), "store 40: commit 41");
        for o in 41..100 {
            assert_eq!(t.received(&tp, o, None), Received::Backlog);
            t.done(&tp, o);
        }
        assert_eq!(t.position(&tp), Some(101));
    }

    #[test]
    fn revoked_partitions_ignore_late_completions() {
        let tp: Tp = ("t".into(), 3);
        let mut t = OffsetTracker::new();
        t.received(&tp, 0, None);
        t.revoke(&tp);
        assert_eq!(t.done(&tp, 0), None);
        assert_eq!(t.position(&tp), None);
    }
}
