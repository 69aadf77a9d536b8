//! Backlog coalescing over time (`catchup.min_interval_ms`): a member's whole rescoring from the
//! backlog is held for the interval from its first update, merging every later update of the
//! member (the largest event time wins) and the member's new pairs meanwhile, then goes into the
//! backlog window once. A backlog replays minutes of traffic in seconds, so a member updated many
//! times over those minutes is rescored once per interval of the drain, not once per update. A
//! held member is also due as soon as the backlog of its partition is read (nothing more can
//! merge into it), so the interval never delays the end of a drain. Released members go into the
//! backlog window only while it has room, so a mass release never makes one huge write.
//!
//! Guarantee: a held update's messages are done only after the window it is released into is
//! written, so a crash or shutdown replays them; at shutdown everything held is released into
//! the last window.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::coalesce::{MsgRef, Window};
use crate::offsets::Tp;

/// A member's rescoring waiting for its interval.
#[derive(Debug)]
struct Held {
    as_of: i64,
    /// New pairs of the member that arrived while it was held (each as of its largest time).
    pairs: HashMap<String, i64>,
    messages: Vec<MsgRef>,
}

#[derive(Debug, Default)]
pub struct MemberHold {
    interval: Duration,
    held: HashMap<String, Held>,
    /// Release times of held members, earliest first (one entry per hold; an entry whose member
    /// was released early is skipped).
    due: BinaryHeap<Reverse<(Instant, String)>>,
    /// Holds started and triggers merged into a hold, since the start (for the debug log).
    pub started: u64,
    pub merged: u64,
}

impl MemberHold {
    /// `interval` zero holds nothing.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            ..Self::default()
        }
    }

    /// A whole-member rescoring as of `as_of`, caused by `msg`: merged into the member's hold, or
    /// a new hold released after the interval (into `window` at once with a zero interval).
    pub fn member(&mut self, window: &mut Window, member: &str, as_of: i64, msg: MsgRef) {
        if let Some(h) = self.held.get_mut(member) {
            self.merged += 1;
            h.as_of = h.as_of.max(as_of);
            h.messages.push(msg);
            return;
        }
        if self.interval.is_zero() {
            window.member(member, as_of);
            window.message(msg);
            return;
        }
        self.started += 1;
        self.held.insert(
            member.to_owned(),
            Held {
                as_of,
                pairs: HashMap::new(),
                messages: vec![msg],
            },
        );
        self.due
            .push(Reverse((Instant::now() + self.interval, member.to_owned())));
    }

    /// A new pair as of `as_of`, caused by `msg`: joins the member's hold when it is held (its
    /// rescoring covers the pair), else goes into `window`.
    pub fn pair(
        &mut self,
        window: &mut Window,
        member: &str,
        candidate: &str,
        as_of: i64,
        msg: MsgRef,
    ) {
        match self.held.get_mut(member) {
            Some(h) => {
                self.merged += 1;
                let t = h.pairs.entry(candidate.to_owned()).or_insert(as_of);
                *t = (*t).max(as_of);
                h.messages.push(msg);
            }
            None => {
                window.pair(member, candidate, as_of);
                window.message(msg);
            }
        }
    }

    /// When the earliest held member is released, if any is held.
    pub fn next_release(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((t, _))| *t)
    }

    /// Moves held members whose interval has passed (all of them with `all`) into `window`,
    /// earliest first, while the window is under `cap` (estimated rows; `all` ignores it).
    /// Returns how many were released.
    pub fn release(&mut self, window: &mut Window, all: bool, cap: usize) -> usize {
        let now = Instant::now();
        let mut n = 0;
        while let Some(Reverse((t, _))) = self.due.peek() {
            if !all && (*t > now || window.size() >= cap) {
                break;
            }
            let Some(Reverse((_, member))) = self.due.pop() else {
                break;
            };
            n += usize::from(self.release_one(window, &member));
        }
        n
    }

    /// Makes every held member with a message from one of `partitions` due now (their backlog
    /// is read: nothing more will merge into them from there); `release` then moves them into
    /// windows as they have room. Returns how many.
    pub fn due_now(&mut self, partitions: &[Tp]) -> usize {
        if partitions.is_empty() {
            return 0;
        }
        let now = Instant::now();
        let members: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| h.messages.iter().any(|m| partitions.contains(&m.tp)))
            .map(|(member, _)| member.clone())
            .collect();
        // Their later entries in `due` go stale: `release` skips members no longer held, and a
        // member held again later is released by a stale entry early, never late.
        for member in &members {
            self.due.push(Reverse((now, member.clone())));
        }
        members.len()
    }

    fn release_one(&mut self, window: &mut Window, member: &str) -> bool {
        let Some(h) = self.held.remove(member) else {
            return false;
        };
        window.member(member, h.as_of);
        for (c, t) in h.pairs {
            window.pair(member, &c, t);
        }
        for m in h.messages {
            window.message(m);
        }
        true
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(offset: i64) -> MsgRef {
        MsgRef::for_test(offset, true)
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_is_rescored_once_per_interval_and_nothing_is_lost() {
        let mut hold = MemberHold::new(Duration::from_secs(2));
        let mut w = Window::new(true);
        hold.member(&mut w, "m1", 10, msg(0));
        hold.member(&mut w, "m1", 30, msg(1));
        hold.member(&mut w, "m1", 20, msg(2));
        hold.pair(&mut w, "m1", "c1", 25, msg(3));
        hold.pair(&mut w, "m2", "c1", 5, msg(4));
        assert_eq!(
            hold.held(),
            1,
            "m1's updates and new pair merge into one hold"
        );
        assert_eq!(w.messages.len(), 1, "m2 is not held: its pair goes in");
        assert!(w.members["m2"].pairs.contains_key("c1"));
        assert_eq!(hold.release(&mut w, false, usize::MAX), 0, "not yet due");

        tokio::time::advance(Duration::from_millis(2001)).await;
        let mut next = Window::new(true);
        assert_eq!(hold.release(&mut next, false, usize::MAX), 1);
        assert_eq!(next.members["m1"].all, Some(30), "the largest event time");
        assert_eq!(next.members["m1"].pairs["c1"], 25);
        let offsets: Vec<i64> = next.messages.iter().map(|m| m.offset).collect();
        assert_eq!(
            offsets,
            vec![0, 1, 2, 3],
            "every held message rides with the release"
        );
        assert_eq!(hold.next_release(), None);

        hold.member(&mut next, "m1", 40, msg(5));
        assert_eq!(hold.held(), 1, "held again");
        let mut last = Window::new(true);
        assert_eq!(
            hold.release(&mut last, true, 0),
            1,
            "shutdown releases everything"
        );
        assert_eq!(last.messages.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn held_members_of_a_partition_whose_backlog_is_read_go_at_once() {
        let mut hold = MemberHold::new(Duration::from_secs(10));
        let mut w = Window::new(true);
        let on = |p: i32, offset: i64| MsgRef {
            tp: ("t".into(), p),
            ..MsgRef::for_test(offset, true)
        };
        for (member, p, offset) in [("m1", 0, 0), ("m2", 1, 1), ("m1", 0, 2), ("m2", 1, 3)] {
            hold.member(&mut w, member, offset, on(p, offset));
        }
        assert_eq!(hold.held(), 2);
        let mut next = Window::new(true);
        assert_eq!(
            hold.due_now(&[("t".into(), 0)]),
            1,
            "only partition 0's member"
        );
        assert_eq!(hold.release(&mut next, false, 0), 0, "no room");
        assert_eq!(hold.release(&mut next, false, usize::MAX), 1);
        assert_eq!(next.members["m1"].all, Some(2));
        assert_eq!(next.messages.len(), 2);
        assert_eq!(hold.held(), 1, "m2 still held");
        // m1's stale release time releases nothing twice; m2 goes when due.
        tokio::time::advance(Duration::from_secs(11)).await;
        let mut last = Window::new(true);
        assert_eq!(hold.release(&mut last, false, usize::MAX), 1);
        assert!(last.members.contains_key("m2") && !last.members.contains_key("m1"));
        assert_eq!(hold.next_release(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_interval_holds_nothing() {
        let mut hold = MemberHold::new(Duration::ZERO);
        let mut w = Window::new(true);
        for o in 0..3 {
            hold.member(&mut w, "m1", o, msg(o));
        }
        assert_eq!(hold.held(), 0);
        assert_eq!(w.messages.len(), 3);
    }
}
