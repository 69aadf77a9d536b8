//! Expand stage for events that touch many pairs: a candidate update fans out over the reverse
//! index, a decay tick walks the due schedule. Both run as jobs, one chunk per step, interleaved
//! with other input, so a candidate with a million members never stalls its partition.
//!
//! Guarantee: a tick's messages are done only after its last chunk's window is written; a
//! fan-out's messages were stored once its intent was recorded in Redis (`store/fanouts.lua`),
//! and the intent is cleared only after its last chunk's window is written. A fan-out
//! that arrives while the same candidate's fan-out is queued merges into it (the largest as_of
//! wins); one that arrives while it is running queues a single follow-up run, because members
//! already visited were scored with the older features. A tick chunk is fetched only after the
//! previous chunk was written (written pairs are rescheduled past the tick, so the walk moves on).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::coalesce::{MsgRef, Window};
use crate::store::{Store, StoreError};

#[derive(Debug)]
enum Kind {
    /// Every member of `candidate`'s reverse index; `cursor` is the SSCAN cursor (0 = start).
    Fanout {
        candidate: String,
        cursor: u64,
        started: bool,
        /// Per partition of the feature-updates topic, the highest offset of the candidate's
        /// updates this run took in before it started: the recorded intents it fulfils.
        partitions: Vec<(i32, i64)>,
    },
    /// Due pairs of `shards` up to the tick time.
    Tick { shards: Vec<u32>, next: usize },
}

#[derive(Debug)]
struct Job {
    kind: Kind,
    as_of: i64,
    messages: Vec<MsgRef>,
    /// The last chunk is in the current window; the job is over when that window is written.
    finishing: bool,
    /// A chunk is in the current window and must be written before the next is fetched.
    waiting: bool,
    /// A candidate's next fan-out waits for its minimum interval to pass.
    not_before: Option<Instant>,
    /// The taken window (by sequence number) that holds the job's waiting or last chunk.
    in_window: Option<u64>,
}

impl Job {
    /// A tick, or a fan-out that has fetched its first chunk: work in progress.
    fn started(&self) -> bool {
        match &self.kind {
            Kind::Fanout { started, .. } => *started,
            Kind::Tick { .. } => true,
        }
    }

    /// Can take a step now; a job not started yet only while `may_start`.
    fn ready(&self, now: Instant, may_start: bool) -> bool {
        !self.waiting
            && !self.finishing
            && self.not_before.is_none_or(|t| t <= now)
            && (may_start || self.started())
    }
}

/// Jobs in progress, advanced round-robin.
#[derive(Debug, Default)]
pub struct Jobs {
    queue: VecDeque<Job>,
    /// A candidate's fan-out starts at most once per this interval; updates in between merge
    /// into the next run. Bounds the cost of a hot candidate updated many times a second.
    min_fanout_interval: Duration,
    /// When each recently fanned-out candidate's last run started, and the members it covered.
    last_fanout: HashMap<String, (Instant, usize)>,
    /// The interval is one `min_fanout_interval` per this many members the candidate's last
    /// fan-out covered, so a candidate in many members' lists costs a bounded rows per second.
    members_per_interval: usize,
    /// Jobs in progress at once (`batch.max_jobs`); a queued fan-out starts when one ends.
    max_started: usize,
    /// Finished fan-outs whose intents are to be cleared (see [`Jobs::take_done_fanouts`]).
    done_fanouts: Vec<(i32, String, i64)>,
}

/// Most messages a queued fan-out keeps once their offsets are stored (for freshness only).
const MAX_MERGED_MESSAGES: usize = 256;

impl Jobs {
    pub fn new(min_fanout_interval: Duration) -> Self {
        Self {
            min_fanout_interval,
            members_per_interval: usize::MAX,
            max_started: usize::MAX,
            ..Self::default()
        }
    }

    /// At most `jobs` in progress at once; queued fan-outs start as earlier ones end.
    pub fn with_max_started(mut self, jobs: usize) -> Self {
        self.max_started = jobs.max(1);
        self
    }

    fn may_start(&self) -> bool {
        self.active() < self.max_started
    }

    /// Scales a candidate's interval with its size: one `min_fanout_interval` per `members`.
    pub fn with_members_per_interval(mut self, members: usize) -> Self {
        self.members_per_interval = members.max(1);
        self
    }

    /// The interval after a fan-out that covered `members`.
    fn interval_after(&self, members: usize) -> Duration {
        let n = members.div_ceil(self.members_per_interval).max(1);
        self.min_fanout_interval * u32::try_from(n).unwrap_or(u32::MAX)
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Jobs in progress, which count against `batch.max_jobs`: ticks and fan-outs that have
    /// started. A queued fan-out (waiting for its candidate's interval, or for a free slot)
    /// holds no work in progress, only the messages merged into it, one job per candidate, so
    /// it does not stop intake: fresh events keep flowing while hot candidates' updates merge.
    pub fn active(&self) -> usize {
        self.queue.iter().filter(|j| j.started()).count()
    }

    /// Decay ticks in progress (intake stops at `batch.max_jobs` of them; fan-outs need no such
    /// stop: one queued per candidate, started as slots free up).
    pub fn ticks(&self) -> usize {
        self.queue
            .iter()
            .filter(|j| matches!(j.kind, Kind::Tick { .. }))
            .count()
    }

    /// Whether any job can take a step now.
    pub fn runnable(&self) -> bool {
        let (now, may_start) = (Instant::now(), self.may_start());
        self.queue.iter().any(|j| j.ready(now, may_start))
    }

    /// When a job held back by its fan-out interval becomes runnable, if one is (none while
    /// no job may start: the end of a running one wakes the loop).
    pub fn next_wake(&self) -> Option<Instant> {
        if !self.may_start() {
            return None;
        }
        self.queue
            .iter()
            .filter(|j| !j.waiting && !j.finishing)
            .filter_map(|j| j.not_before)
            .min()
    }

    /// Queues a fan-out over `candidate`'s members as of `as_of`, merging with a queued one.
    pub fn fanout(&mut self, candidate: &str, as_of: i64, msg: MsgRef) {
        let (partition, offset) = (msg.tp.1, msg.offset);
        self.queue_fanout(candidate, as_of, (partition, offset), Some(msg));
    }

    /// Queues a fan-out recorded as an intent of `partition` (up to `offset`) by an earlier owner.
    pub fn resume_fanout(&mut self, candidate: &str, as_of: i64, partition: i32, offset: i64) {
        self.queue_fanout(candidate, as_of, (partition, offset), None);
    }

    /// Fan-outs that wrote their last chunk since the last call: `(partition, candidate, offset)`,
    /// whose recorded intents up to that offset can be cleared.
    pub fn take_done_fanouts(&mut self) -> Vec<(i32, String, i64)> {
        std::mem::take(&mut self.done_fanouts)
    }

    fn queue_fanout(
        &mut self,
        candidate: &str,
        as_of: i64,
        (partition, offset): (i32, i64),
        msg: Option<MsgRef>,
    ) {
        for j in self.queue.iter_mut() {
            if let Kind::Fanout {
                candidate: c,
                started: false,
                partitions,
                ..
            } = &mut j.kind
            {
                if c == candidate {
                    j.as_of = j.as_of.max(as_of);
                    match partitions.iter_mut().find(|(p, _)| *p == partition) {
                        Some((_, o)) => *o = (*o).max(offset),
                        None => partitions.push((partition, offset)),
                    }
                    // Offsets are stored already (acked): beyond a few, the merged messages
                    // would only add freshness samples, and memory for a hot candidate.
                    if let Some(m) = msg {
                        if !m.acked || j.messages.len() < MAX_MERGED_MESSAGES {
                            j.messages.push(m);
                        }
                    }
                    return;
                }
            }
        }
        let now = Instant::now();
        if self.last_fanout.len() > 100_000 {
            let (base, per) = (self.min_fanout_interval, self.members_per_interval);
            self.last_fanout.retain(|_, (t, n)| {
                now.duration_since(*t)
                    < base * u32::try_from(n.div_ceil(per).max(1)).unwrap_or(u32::MAX)
            });
        }
        let not_before = self
            .last_fanout
            .get(candidate)
            .map(|(t, n)| *t + self.interval_after(*n))
            .filter(|t| *t > now);
        self.queue.push_back(Job {
            kind: Kind::Fanout {
                candidate: candidate.to_owned(),
                cursor: 0,
                started: false,
                partitions: vec![(partition, offset)],
            },
            as_of,
            messages: msg.into_iter().collect(),
            finishing: false,
            waiting: false,
            not_before,
            in_window: None,
        });
    }

    /// Queues a decay tick over `shards` as of `as_of`.
    pub fn tick(&mut self, shards: Vec<u32>, as_of: i64, msg: MsgRef) {
        self.queue.push_back(Job {
            kind: Kind::Tick { shards, next: 0 },
            as_of,
            messages: vec![msg],
            finishing: false,
            waiting: false,
            not_before: None,
            in_window: None,
        });
    }

    /// Advances the first runnable job by one chunk into `window`.
    pub async fn step(
        &mut self,
        store: &Store,
        window: &mut Window,
        fanout_chunk: usize,
        tick_chunk: usize,
    ) -> Result<(), StoreError> {
        let (now, may_start) = (Instant::now(), self.may_start());
        let Some(idx) = self.queue.iter().position(|j| j.ready(now, may_start)) else {
            return Ok(());
        };
        let job = &mut self.queue[idx];
        match &mut job.kind {
            Kind::Fanout {
                candidate,
                cursor,
                started,
                ..
            } => {
                let (next, members) = store.scan_reverse(candidate, *cursor, fanout_chunk).await?;
                if !*started {
                    *started = true;
                    self.last_fanout.insert(candidate.clone(), (now, 0));
                }
                if let Some((_, n)) = self.last_fanout.get_mut(candidate.as_str()) {
                    *n += members.len();
                }
                for m in &members {
                    window.pair(m, candidate, job.as_of);
                }
                *cursor = next;
                if next == 0 {
                    job.finishing = true;
                }
            }
            Kind::Tick { shards, next } => match shards.get(*next) {
                None => job.finishing = true,
                Some(&shard) => {
                    let due = store.due(shard, job.as_of, tick_chunk).await?;
                    if due.is_empty() {
                        *next += 1;
                        if *next >= shards.len() {
                            job.finishing = true;
                        }
                    } else {
                        for (m, c) in &due {
                            window.pair(m, c, job.as_of);
                        }
                        job.waiting = true;
                    }
                }
            },
        }
        if job.finishing || job.waiting {
            // Make sure the window exists (and flushes) even when the chunk added nothing.
            window.touch_deadline();
        }
        // Round-robin: the job goes to the back.
        if let Some(j) = self.queue.remove(idx) {
            self.queue.push_back(j);
        }
        Ok(())
    }

    /// The current window was taken for writing as window `seq`: jobs whose waiting or last
    /// chunk is in it are released when that window is written.
    pub fn window_taken(&mut self, seq: u64) {
        for j in self.queue.iter_mut() {
            if (j.waiting || j.finishing) && j.in_window.is_none() {
                j.in_window = Some(seq);
            }
        }
    }

    /// Window `seq` was written (windows are written in order): finished jobs hand back their
    /// messages (now done), waiting ones may fetch their next chunk.
    pub fn window_written(&mut self, seq: u64) -> Vec<MsgRef> {
        let mut done = Vec::new();
        let mut fanouts = Vec::new();
        self.queue.retain_mut(|j| {
            if j.in_window.is_none_or(|s| s > seq) {
                return true;
            }
            j.in_window = None;
            j.waiting = false;
            if j.finishing {
                done.append(&mut j.messages);
                if let Kind::Fanout {
                    candidate,
                    partitions,
                    ..
                } = &j.kind
                {
                    for (p, o) in partitions {
                        fanouts.push((*p, candidate.clone(), *o));
                    }
                }
                false
            } else {
                true
            }
        });
        self.done_fanouts.extend(fanouts);
        done
    }

    /// Window `seq` (and every one before it not yet written) will never be written: jobs whose
    /// chunk was in it are dropped without completing their messages or clearing their intents
    /// (replayed, or resumed by the partition's next owner).
    pub fn window_lost(&mut self, seq: u64) -> usize {
        let before = self.queue.len();
        self.queue.retain(|j| j.in_window.is_none_or(|s| s > seq));
        before - self.queue.len()
    }

    /// Drops every job (shutdown): their messages stay unacknowledged and are replayed.
    pub fn abandon(&mut self) -> usize {
        let n = self.queue.len();
        self.queue.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(offset: i64) -> MsgRef {
        MsgRef::for_test(offset, false)
    }

    #[tokio::test(start_paused = true)]
    async fn a_hot_candidate_fans_out_at_most_once_per_interval_and_updates_merge() {
        let mut jobs = Jobs::new(Duration::from_secs(1));
        jobs.fanout("hot", 10, msg(0));
        jobs.fanout("hot", 20, msg(1));
        assert_eq!(jobs.len(), 1, "a queued fan-out absorbs the next update");
        assert!(jobs.runnable());
        // Pretend the first run started now (what `step` records) and finished.
        jobs.last_fanout.insert("hot".into(), (Instant::now(), 3));
        if let Kind::Fanout { started, .. } = &mut jobs.queue[0].kind {
            *started = true;
        }
        jobs.queue[0].finishing = true;
        jobs.window_taken(1);
        assert_eq!(jobs.window_written(1).len(), 2);

        jobs.fanout("hot", 30, msg(2));
        jobs.fanout("hot", 40, msg(3));
        assert_eq!(jobs.len(), 1);
        assert!(!jobs.runnable(), "held back until the interval has passed");
        let wake = jobs.next_wake().expect("a wake-up time");
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(Instant::now() >= wake && jobs.runnable());
        assert_eq!(jobs.queue[0].as_of, 40);
        jobs.fanout("cold", 5, msg(4));
        assert_eq!(jobs.len(), 2, "other candidates are not held back");
    }

    #[tokio::test(start_paused = true)]
    async fn only_started_jobs_count_against_the_job_cap_and_queued_fanouts_wait_for_a_slot() {
        let mut jobs = Jobs::new(Duration::from_secs(1)).with_max_started(2);
        for (i, c) in ["a", "b", "c"].into_iter().enumerate() {
            jobs.last_fanout.insert(c.into(), (Instant::now(), 10));
            jobs.fanout(c, 1, msg(i as i64));
        }
        jobs.fanout("fresh", 1, msg(3));
        assert_eq!(jobs.len(), 4);
        assert_eq!(jobs.active(), 0, "queued fan-outs hold no work in progress");
        assert!(jobs.runnable(), "the fresh one may start now");
        // Two start (what `step` records on the first chunk): the cap is reached.
        for j in jobs.queue.iter_mut().take(2) {
            if let Kind::Fanout { started, .. } = &mut j.kind {
                *started = true;
            }
            j.not_before = None;
        }
        assert_eq!(jobs.active(), 2);
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(
            !jobs.queue[2].ready(Instant::now(), jobs.may_start()),
            "its interval passed, but no slot is free"
        );
        assert!(
            jobs.next_wake().is_none(),
            "no wake-up while no job may start"
        );
        assert!(jobs.runnable(), "the started ones go on");
        jobs.queue[0].finishing = true;
        jobs.window_taken(1);
        assert_eq!(jobs.window_written(1).len(), 1);
        assert!(
            jobs.queue[1].ready(Instant::now(), jobs.may_start()),
            "a slot is free"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_candidate_in_many_lists_waits_one_interval_per_members_covered() {
        let mut jobs = Jobs::new(Duration::from_secs(1)).with_members_per_interval(500);
        // Its last fan-out covered 1,800 members: four intervals.
        jobs.last_fanout
            .insert("big".into(), (Instant::now(), 1_800));
        jobs.last_fanout
            .insert("small".into(), (Instant::now(), 40));
        jobs.fanout("big", 1, msg(0));
        jobs.fanout("small", 1, msg(1));
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(
            jobs.queue[1].ready(Instant::now(), true),
            "small: one interval"
        );
        assert!(!jobs.queue[0].ready(Instant::now(), true));
        tokio::time::advance(Duration::from_millis(3000)).await;
        assert!(
            jobs.queue[0].ready(Instant::now(), true),
            "big: four intervals"
        );
    }
}
