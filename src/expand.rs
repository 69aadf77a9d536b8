//! Expand stage for events that touch many pairs: a candidate update fans out over the reverse
//! index, a decay tick walks the due schedule. Both run as jobs, one chunk per step, interleaved
//! with other input, so a candidate with a million members never stalls its partition.
//!
//! Guarantee: a job's messages are done only after its last chunk's window is written. A fan-out
//! that arrives while the same candidate's fan-out is queued merges into it (the largest as_of
//! wins); one that arrives while it is running queues a single follow-up run, because members
//! already visited were scored with the older features. A tick chunk is fetched only after the
//! previous chunk was written (written pairs are rescheduled past the tick, so the walk moves on).

use std::collections::VecDeque;

use crate::coalesce::{MsgRef, Window};
use crate::store::{Store, StoreError};

#[derive(Debug)]
enum Kind {
    /// Every member of `candidate`'s reverse index; `cursor` is the SSCAN cursor (0 = start).
    Fanout {
        candidate: String,
        cursor: u64,
        started: bool,
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
}

/// Jobs in progress, advanced round-robin.
#[derive(Debug, Default)]
pub struct Jobs {
    queue: VecDeque<Job>,
}

impl Jobs {
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether any job can take a step now.
    pub fn runnable(&self) -> bool {
        self.queue.iter().any(|j| !j.waiting && !j.finishing)
    }

    /// Queues a fan-out over `candidate`'s members as of `as_of`, merging with a queued one.
    pub fn fanout(&mut self, candidate: &str, as_of: i64, msg: MsgRef) {
        for j in self.queue.iter_mut() {
            if let Kind::Fanout {
                candidate: c,
                started: false,
                ..
            } = &j.kind
            {
                if c == candidate {
                    j.as_of = j.as_of.max(as_of);
                    j.messages.push(msg);
                    return;
                }
            }
        }
        self.queue.push_back(Job {
            kind: Kind::Fanout {
                candidate: candidate.to_owned(),
                cursor: 0,
                started: false,
            },
            as_of,
            messages: vec![msg],
            finishing: false,
            waiting: false,
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
        let Some(idx) = self.queue.iter().position(|j| !j.waiting && !j.finishing) else {
            return Ok(());
        };
        let job = &mut self.queue[idx];
        match &mut job.kind {
            Kind::Fanout {
                candidate,
                cursor,
                started,
            } => {
                let (next, members) = store.scan_reverse(candidate, *cursor, fanout_chunk).await?;
                *started = true;
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

    /// The window that held the jobs' chunks was written: finished jobs hand back their
    /// messages (now done), waiting ones may fetch their next chunk.
    pub fn window_written(&mut self) -> Vec<MsgRef> {
        let mut done = Vec::new();
        self.queue.retain_mut(|j| {
            j.waiting = false;
            if j.finishing {
                done.append(&mut j.messages);
                false
            } else {
                true
            }
        });
        done
    }

    /// Drops every job (shutdown): their messages stay unacknowledged and are replayed.
    pub fn abandon(&mut self) -> usize {
        let n = self.queue.len();
        self.queue.clear();
        n
    }
}
