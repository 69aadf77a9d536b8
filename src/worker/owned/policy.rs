//! The owned loop's policy: what to do next, as a pure function of what the loop knows (a
//! [`View`]) and the time. The loop (`run_owned`) takes a view, asks [`Policy::decide`], acts,
//! and waits only for what the [`Plan`] says can change it.
//!
//! The rules, each kept because a measurement showed it pays (`perf/README.md`):
//! - one round of fan-outs at a time, started once a waiting candidate's interval has passed
//!   (the intervals themselves are [`super::fanout::Fanouts`]' business);
//! - a tick's next chunk is read while the window has room (ticks fill windows, fresh events
//!   interleave with them);
//! - one write at a time; the window is written when the writer is free and it is full, holds a
//!   tick chunk, has waited `batch.max_wait_ms`, nothing more was fetched (idle: an event is
//!   scored as soon as it arrives), or it filled while the last write was in flight (a group
//!   commit: under load, fewer and larger writes);
//! - input is taken while the window has room: `batch.max_pairs` rows, or `LIVE_GROWTH` times
//!   that while a write is in flight.

use std::time::Duration;

use tokio::time::Instant;

/// What the loop knows when it decides. No I/O: the loop fills it from its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::worker) struct View {
    /// Rows in the window being filled.
    pub window_rows: usize,
    /// The window holds something to write (rows, or schedule and meta changes).
    pub window_has_work: bool,
    /// When the window got its first work.
    pub window_started: Option<Instant>,
    /// Rows of the write in flight (None: the writer is free).
    pub writing: Option<usize>,
    /// When the last write ended.
    pub last_write_ended: Option<Instant>,
    /// The last intake took everything fetched (nothing more was waiting).
    pub input_idle: bool,
    /// A round of fan-outs is running.
    pub fanning: bool,
    /// When the next waiting fan-out may run (None: none waits).
    pub next_fanout: Option<Instant>,
    /// A tick has a chunk to read (its last one is written, or it has not started).
    pub tick_ready: bool,
    /// A tick chunk sits in the window.
    pub tick_queued: bool,
}

/// What to do now, in this order, then what to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::worker) struct Plan {
    /// Start the due fan-outs, their intervals stretched by this many rows waiting to be
    /// written.
    pub fan_out: Option<usize>,
    /// Read a tick's next chunk into the window.
    pub tick: bool,
    /// Write the window.
    pub write: bool,
    /// Take input while waiting.
    pub take_input: bool,
    /// Wake up then even if nothing else happens (the window's deadline, a fan-out's interval).
    pub wake_at: Option<Instant>,
}

/// The loop's knobs.
#[derive(Debug, Clone, Copy)]
pub(in crate::worker) struct Policy {
    /// `batch.max_pairs`: a full window.
    pub max_pairs: usize,
    /// `batch.max_wait_ms`: the longest a window waits to be written while the writer is free.
    pub max_wait: Duration,
    /// How many windows' worth a window may grow to while a write is in flight.
    pub live_growth: usize,
}

impl Policy {
    pub(in crate::worker) fn decide(&self, v: &View, now: Instant) -> Plan {
        let writer_free = v.writing.is_none();
        let fan_out = (!v.fanning && v.next_fanout.is_some_and(|t| t <= now))
            .then(|| v.window_rows + v.writing.unwrap_or(0));
        let tick = v.tick_ready && v.window_rows < self.max_pairs;
        let deadline = v.window_started.map(|s| s + self.max_wait);
        let waited_for_writer = matches!(
            (v.window_started, v.last_write_ended),
            (Some(s), Some(e)) if s <= e
        );
        let write = writer_free
            && v.window_has_work
            && (v.window_rows >= self.max_pairs
                || v.tick_queued
                || v.input_idle
                || waited_for_writer
                || deadline.is_some_and(|d| d <= now));
        let cap = if writer_free {
            self.max_pairs
        } else {
            self.max_pairs * self.live_growth
        };
        let wake_at = [
            deadline.filter(|_| writer_free),
            v.next_fanout.filter(|_| !v.fanning),
        ]
        .into_iter()
        .flatten()
        .min();
        Plan {
            fan_out,
            tick,
            write,
            take_input: v.window_rows < cap,
            wake_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        max_pairs: 100,
        max_wait: Duration::from_millis(20),
        live_growth: 4,
    };

    fn idle() -> View {
        View {
            window_rows: 0,
            window_has_work: false,
            window_started: None,
            writing: None,
            last_write_ended: None,
            input_idle: false,
            fanning: false,
            next_fanout: None,
            tick_ready: false,
            tick_queued: false,
        }
    }

    fn filling(rows: usize, started: Instant) -> View {
        View {
            window_rows: rows,
            window_has_work: rows > 0,
            window_started: Some(started),
            ..idle()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_loop_only_takes_input() {
        let plan = POLICY.decide(&idle(), Instant::now());
        assert_eq!(
            plan,
            Plan {
                fan_out: None,
                tick: false,
                write: false,
                take_input: true,
                wake_at: None,
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_goes_when_full_at_its_deadline_or_when_nothing_more_was_fetched() {
        let start = Instant::now();
        let v = filling(10, start);
        let plan = POLICY.decide(&v, start);
        assert!(!plan.write, "more may come");
        assert!(plan.take_input);
        assert_eq!(plan.wake_at, Some(start + Duration::from_millis(20)));
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(
            POLICY.decide(&v, Instant::now()).write,
            "its deadline passed"
        );
        let full = filling(100, start);
        let plan = POLICY.decide(&full, start);
        assert!(plan.write, "full");
        let idle_input = View {
            input_idle: true,
            ..v
        };
        assert!(
            POLICY.decide(&idle_input, start).write,
            "nothing more fetched"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn while_a_write_is_in_flight_the_next_window_grows_then_goes_at_once() {
        let start = Instant::now();
        let busy = View {
            writing: Some(100),
            ..filling(150, start)
        };
        let plan = POLICY.decide(&busy, start);
        assert!(!plan.write, "one write at a time");
        assert!(plan.take_input, "up to live_growth windows");
        assert_eq!(plan.wake_at, None, "no deadline while the writer is busy");
        let grown = View {
            window_rows: 400,
            ..busy
        };
        assert!(!POLICY.decide(&grown, start).take_input, "grown to its cap");
        tokio::time::advance(Duration::from_millis(5)).await;
        let freed = View {
            writing: None,
            last_write_ended: Some(Instant::now()),
            ..filling(150, start)
        };
        let plan = POLICY.decide(&freed, Instant::now());
        assert!(
            plan.write,
            "filled while the last write was in flight: a group commit"
        );
        let fresh = View {
            last_write_ended: Some(start),
            ..filling(10, start + Duration::from_millis(1))
        };
        assert!(
            !POLICY.decide(&fresh, Instant::now()).write,
            "started after the last write ended: waits for its deadline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fan_outs_start_when_due_and_none_runs_stretched_by_the_rows_waiting() {
        let start = Instant::now();
        let v = View {
            next_fanout: Some(start + Duration::from_secs(1)),
            writing: Some(300),
            ..filling(50, start)
        };
        let plan = POLICY.decide(&v, start);
        assert_eq!(plan.fan_out, None, "not due yet");
        assert_eq!(plan.wake_at, Some(start + Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(POLICY.decide(&v, Instant::now()).fan_out, Some(350));
        let running = View { fanning: true, ..v };
        let plan = POLICY.decide(&running, Instant::now());
        assert_eq!(plan.fan_out, None, "one round at a time");
        assert_eq!(plan.wake_at, None, "its end wakes the loop");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tick_reads_while_the_window_has_room_and_its_chunk_goes_at_once() {
        let start = Instant::now();
        let v = View {
            tick_ready: true,
            ..filling(10, start)
        };
        assert!(POLICY.decide(&v, start).tick);
        let full = View {
            tick_ready: true,
            ..filling(100, start)
        };
        assert!(!POLICY.decide(&full, start).tick, "no room");
        let queued = View {
            tick_queued: true,
            ..filling(60, start)
        };
        assert!(POLICY.decide(&queued, start).write);
        let busy = View {
            writing: Some(1),
            ..queued
        };
        assert!(
            !POLICY.decide(&busy, start).write,
            "after the write in flight"
        );
    }
}
