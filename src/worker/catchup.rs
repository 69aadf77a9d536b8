//! Fresh events first (`[catchup]`): splitting a partition that fell far behind, so a head reader
//! takes its fresh events from the log end while the group's reader drains the backlog, and
//! letting the head reader go once the readers merge. The offsets side is in
//! [`crate::offsets`] (`split`, `received_head`).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};

use super::{chrono_now_ms, Run, Worker};
use crate::internal_events::CatchupStarted;
use crate::offsets::Tp;

/// How long a partition whose split failed waits before it is tried again.
const SPLIT_RETRY: Duration = Duration::from_secs(5);

/// A partition's log end, fetched off the loop for a split.
pub(super) struct LogEnd {
    pub(super) tp: Tp,
    /// Where the group's reader stood when the split was decided.
    pub(super) from: i64,
    pub(super) behind_ms: Option<i64>,
    pub(super) end: Result<i64, String>,
    /// How long the broker took to answer.
    pub(super) took: Duration,
}

/// The head reader of the partitions split while it lives. It is dropped when the last of them
/// is merged back, and a partition it read is not split again before then: a reader may still
/// deliver messages it fetched earlier, and those must never count for a later split.
pub(super) struct CatchupSession {
    pub(super) consumer: Arc<StreamConsumer>,
    /// Partitions this reader let go (not split again while it lives).
    pub(super) finished: std::collections::HashSet<Tp>,
}

impl Worker {
    /// Splits each partition that is far behind (see `[catchup]`): the group's reader goes on
    /// draining its backlog while the head reader takes fresh events from the log end. The log
    /// end is a broker round trip (slow on a busy broker), so it is fetched off the loop and the
    /// split made when it arrives ([`Worker::split_at`]): meanwhile the group's reader waits,
    /// while writes, the head reader and jobs go on. Also retries handing split partitions to the
    /// head reader.
    pub(super) fn split_lagging(&self, run: &mut Run) {
        let c = &self.settings.catchup;
        if !c.enabled {
            return;
        }
        let (assigned, hw) = self.shared.snapshot();
        let now = chrono_now_ms();
        // How long a fresh event produced now would wait at the recent intake rate: everything
        // behind in partitions read in order, over the messages taken in per second.
        let behind_in_order: i64 = assigned
            .iter()
            .filter(|tp| run.tracker.delivered(tp) && !run.tracker.is_split(tp))
            .filter_map(|tp| Some(hw.get(tp)? - run.tracker.next(tp)?))
            .filter(|n| *n > 0)
            .sum();
        let wait_ms = behind_in_order as f64 * 1000.0 / run.intake_per_s.max(1.0);
        for tp in &assigned {
            if run.tracker.is_split(tp) || self.finished(run, tp) || run.splitting.contains(tp) {
                continue;
            }
            // The group's reader waits while a log end is fetched: a partition whose split just
            // failed (a broker timing out, say) is not tried again at once.
            if run
                .split_retry_at
                .get(tp)
                .is_some_and(|at| *at > tokio::time::Instant::now())
            {
                continue;
            }
            let Some(&high) = hw.get(tp) else { continue };
            // How far behind: the age of the last message read, or the wait a fresh event would
            // have at the recent intake rate (a backlog written moments ago is young, yet minutes
            // long). A partition the group's reader has delivered nothing from yet (just
            // assigned, or waiting behind other partitions' backlogs) is split at once when
            // enough is behind it: its age is unknown until read, and every fresh event produced
            // meanwhile would land below a later split point and wait for the whole backlog.
            let (from, behind_ms) = if run.tracker.delivered(tp) {
                let (Some(next), Some(ts)) =
                    (run.tracker.next(tp), run.tracker.last_received_ts(tp))
                else {
                    continue;
                };
                if now - ts < c.lag_ms as i64 && wait_ms < c.lag_ms as f64 {
                    continue;
                }
                (next, Some(now - ts))
            } else {
                let Some(start) = self.shared.start(tp) else {
                    continue;
                };
                (start, None)
            };
            if high - from < c.min_messages as i64 {
                continue;
            }
            // The exact log end: the head reader must start on a batch boundary, and a
            // statistics watermark may be stale.
            // A fetch still running at shutdown holds the consumer until it answers or times out
            // (5 s); its result is then dropped.
            run.splitting.insert(tp.clone());
            let (consumer, tx, tp) = (self.consumer.clone(), run.log_ends.clone(), tp.clone());
            tokio::spawn(async move {
                let (topic, partition) = (tp.0.clone(), tp.1);
                let asked = std::time::Instant::now();
                let end = tokio::task::spawn_blocking(move || {
                    consumer.fetch_watermarks(&topic, partition, Duration::from_secs(5))
                })
                .await;
                let end = match end {
                    Ok(Ok((_, end))) => Ok(end),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                // The loop owns the receiver for as long as it runs.
                let _ = tx
                    .send(LogEnd {
                        tp,
                        from,
                        behind_ms,
                        end,
                        took: asked.elapsed(),
                    })
                    .await;
            });
        }
        self.give_to_head_reader(run);
        self.set_catchup_gauge(run);
    }

    /// A split partition the head reader let go while it lives (not split again before then).
    fn finished(&self, run: &Run, tp: &Tp) -> bool {
        run.session
            .as_ref()
            .is_some_and(|s| s.finished.contains(tp))
    }

    /// Splits a partition at the log end fetched for it, unless it no longer qualifies: revoked
    /// meanwhile, split or let go already, or read past that end by the group's reader.
    pub(super) fn split_at(&self, run: &mut Run, fetched: LogEnd) {
        let LogEnd {
            tp,
            from,
            behind_ms,
            end,
            took,
        } = fetched;
        run.splitting.remove(&tp);
        let retry_at = tokio::time::Instant::now() + SPLIT_RETRY;
        let end = match end {
            Ok(end) => end,
            Err(e) => {
                tracing::warn!(error = %e, topic = %tp.0, partition = tp.1, took_ms = took.as_millis() as u64, "cannot read the log end; not split");
                run.split_retry_at.insert(tp, retry_at);
                return;
            }
        };
        run.split_retry_at.remove(&tp);
        let assigned = self.shared.snapshot().0;
        if !assigned.contains(&tp) || run.tracker.is_split(&tp) || self.finished(run, &tp) {
            return;
        }
        if run.session.is_none() {
            match crate::consume::catchup_consumer(&self.settings) {
                Ok(consumer) => {
                    run.session = Some(CatchupSession {
                        consumer: Arc::new(consumer),
                        finished: Default::default(),
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create the head reader; reading the backlog in order");
                    run.split_retry_at.insert(tp, retry_at);
                    return;
                }
            }
        }
        if !run.tracker.split(&tp, end) {
            return;
        }
        CatchupStarted {
            topic: &tp.0,
            partition: tp.1,
            from,
            to: end,
            behind_ms,
            log_end_ms: took.as_millis() as u64,
        }
        .emit(&self.metrics);
        run.catching_up.insert(tp, false);
        self.give_to_head_reader(run);
        self.set_catchup_gauge(run);
    }

    /// Hands split partitions not yet given to the head reader (retried on failure).
    fn give_to_head_reader(&self, run: &mut Run) {
        if let Some(session) = run.session.as_ref() {
            for (tp, given) in run.catching_up.iter_mut().filter(|(_, g)| !**g) {
                let mut list = rdkafka::TopicPartitionList::new();
                let start = rdkafka::Offset::Offset(run.tracker.head_next(tp).unwrap_or(0));
                let added = list.add_partition_offset(&tp.0, tp.1, start);
                match added.and_then(|()| session.consumer.incremental_assign(&list)) {
                    Ok(()) => *given = true,
                    Err(e) => {
                        tracing::warn!(error = %e, topic = %tp.0, partition = tp.1, "head reader assignment failed; retrying")
                    }
                }
            }
        }
    }

    fn set_catchup_gauge(&self, run: &Run) {
        let split = run
            .tracker
            .partitions()
            .filter(|tp| run.tracker.is_split(tp))
            .count();
        self.metrics.catchup_partitions.set(split as i64);
    }

    /// Lets the head reader go of partitions whose backlog was read (the group's reader takes
    /// over their fresh events again).
    pub(super) fn catchup_progress(&self, run: &mut Run) {
        let finished: Vec<Tp> = run
            .catching_up
            .keys()
            .filter(|tp| !run.tracker.head_active(tp))
            .cloned()
            .collect();
        // Backlog member updates held for coalescing: nothing more merges into those of a
        // partition whose backlog is read.
        run.backlog_hold.due_now(&finished);
        for tp in finished {
            if let Some(given) = run.catching_up.remove(&tp) {
                Self::release_catchup(run, &tp, given);
                tracing::info!(topic = %tp.0, partition = tp.1, "backlog read; the head reader lets the partition go");
            }
        }
        self.set_catchup_gauge(run);
    }

    /// Stops the head reader fetching `tp`; drops the reader when nothing is left to it.
    pub(super) fn release_catchup(run: &mut Run, tp: &Tp, given: bool) {
        let Some(session) = run.session.as_mut() else {
            return;
        };
        session.finished.insert(tp.clone());
        if given {
            let mut list = rdkafka::TopicPartitionList::new();
            list.add_partition(&tp.0, tp.1);
            if let Err(e) = session.consumer.incremental_unassign(&list) {
                tracing::debug!(error = %e, topic = %tp.0, partition = tp.1, "catch-up unassign failed; its late messages are skipped");
            }
        }
        if run.catching_up.is_empty() {
            if let Some(s) = run.session.take() {
                // Closing a consumer waits on its threads: off the loop.
                tokio::task::spawn_blocking(move || drop(s));
            }
        }
    }
}
