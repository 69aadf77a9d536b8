//! Backlog coalescing over time (`catchup.min_interval_ms`): a member's whole rescoring from the
//! backlog runs at most once per interval. An update that comes sooner is held, merging with any
//! other held update of the member (the largest event time wins), and goes into the backlog
//! window when the interval has passed. A backlog replays minutes of traffic in seconds, so a hot
//! member updated many times over those minutes is rescored a few times, not once per update.
//!
//! Guarantee: a held update's messages are done only after the window it is released into is
//! written, so a crash or shutdown replays them; at shutdown everything held is released into
//! the last window.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::coalesce::{MsgRef, Window};

/// A member update waiting for its interval.
#[derive(Debug)]
struct Held {
    as_of: i64,
    messages: Vec<MsgRef>,
}

#[derive(Debug, Default)]
pub struct MemberHold {
    interval: Duration,
    /// When each recently rescored member's last rescoring went into a window.
    last: HashMap<String, Instant>,
    held: HashMap<String, Held>,
    /// Release times of held members, earliest first (one entry per held member).
    due: BinaryHeap<Reverse<(Instant, String)>>,
}

impl MemberHold {
    /// `interval` zero holds nothing.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            ..Self::default()
        }
    }

    /// A whole-member rescoring as of `as_of`, caused by `msg`: into `window` now, or held when
    /// the member went into a window less than the interval ago.
    pub fn member(&mut self, window: &mut Window, member: &str, as_of: i64, msg: MsgRef) {
        let now = Instant::now();
        if let Some(h) = self.held.get_mut(member) {
            h.as_of = h.as_of.max(as_of);
            h.messages.push(msg);
            return;
        }
        let recent = self
            .last
            .get(member)
            .map(|t| *t + self.interval)
            .filter(|t| *t > now);
        match recent {
            Some(release) => {
                self.held.insert(
                    member.to_owned(),
                    Held {
                        as_of,
                        messages: vec![msg],
                    },
                );
                self.due.push(Reverse((release, member.to_owned())));
            }
            None => {
                self.prune(now);
                self.last.insert(member.to_owned(), now);
                window.member(member, as_of);
                window.message(msg);
            }
        }
    }

    /// When the earliest held member is released, if any is held.
    pub fn next_release(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((t, _))| *t)
    }

    /// Moves every held member whose interval has passed (all of them with `all`) into `window`.
    /// Returns how many were released.
    pub fn release(&mut self, window: &mut Window, all: bool) -> usize {
        let now = Instant::now();
        let mut n = 0;
        while let Some(Reverse((t, _))) = self.due.peek() {
            if *t > now && !all {
                break;
            }
            let Some(Reverse((_, member))) = self.due.pop() else {
                break;
            };
            if let Some(h) = self.held.remove(&member) {
                self.last.insert(member.clone(), now);
                window.member(&member, h.as_of);
                for m in h.messages {
                    window.message(m);
                }
                n += 1;
            }
        }
        n
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Forgets members whose interval passed long ago (bounded memory over many members).
    fn prune(&mut self, now: Instant) {
        if self.last.len() > 100_000 {
            let keep = self.interval;
            self.last.retain(|_, t| now.duration_since(*t) < keep);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(offset: i64) -> MsgRef {
        MsgRef::for_test(offset, true)
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_is_rescored_at_most_once_per_interval_and_nothing_is_lost() {
        let mut hold = MemberHold::new(Duration::from_secs(2));
        let mut w = Window::new(true);
        hold.member(&mut w, "m1", 10, msg(0));
        assert_eq!(w.messages.len(), 1, "the first update goes straight in");
        hold.member(&mut w, "m1", 30, msg(1));
        hold.member(&mut w, "m1", 20, msg(2));
        hold.member(&mut w, "m2", 5, msg(3));
        assert_eq!(hold.held(), 1, "m1's repeats held and merged; m2 goes in");
        assert_eq!(w.messages.len(), 2);
        assert_eq!(hold.release(&mut w, false), 0, "not yet due");

        tokio::time::advance(Duration::from_millis(2001)).await;
        let mut next = Window::new(true);
        assert_eq!(hold.release(&mut next, false), 1);
        assert_eq!(next.members["m1"].all, Some(30), "the largest event time");
        let offsets: Vec<i64> = next.messages.iter().map(|m| m.offset).collect();
        assert_eq!(
            offsets,
            vec![1, 2],
            "every held message rides with the release"
        );
        assert_eq!(hold.next_release(), None);

        hold.member(&mut next, "m1", 40, msg(4));
        assert_eq!(hold.held(), 1, "released just now: held again");
        let mut last = Window::new(true);
        assert_eq!(
            hold.release(&mut last, true),
            1,
            "shutdown releases everything"
        );
        assert_eq!(last.messages.len(), 1);
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
