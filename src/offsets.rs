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
    /// One past the highest offset received.
    next: i64,
    /// Timestamp (ms) of each pending message, for lag in seconds.
    timestamps: HashMap<i64, i64>,
    /// Kafka timestamp of the last message completed at the watermark.
    last_done_ts: Option<i64>,
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

    /// Registers a received message. Offsets of one partition arrive in increasing order.
    pub fn received(&mut self, tp: &Tp, offset: i64, timestamp_ms: Option<i64>) {
        let p = self.parts.entry(tp.clone()).or_default();
        p.pending.insert(offset);
        if let Some(ts) = timestamp_ms {
            p.timestamps.insert(offset, ts);
        }
        p.next = p.next.max(offset + 1);
    }

    /// Marks a message done. Returns the offset to store (the highest offset below which every
    /// received message is done) when the watermark moved.
    pub fn done(&mut self, tp: &Tp, offset: i64) -> Option<i64> {
        let p = self.parts.get_mut(tp)?;
        let before = p.pending.first().copied();
        if !p.pending.remove(&offset) {
            return None;
        }
        let ts = p.timestamps.remove(&offset);
        if before == Some(offset) {
            p.last_done_ts = ts.or(p.last_done_ts);
            Some(p.watermark() - 1)
        } else {
            None
        }
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
    fn watermark(&self) -> i64 {
        self.pending.first().copied().unwrap_or(self.next)
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
            t.received(&tp, o, Some(o * 100));
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
    fn revoked_partitions_ignore_late_completions() {
        let tp: Tp = ("t".into(), 3);
        let mut t = OffsetTracker::new();
        t.received(&tp, 0, None);
        t.revoke(&tp);
        assert_eq!(t.done(&tp, 0), None);
        assert_eq!(t.position(&tp), None);
    }
}
