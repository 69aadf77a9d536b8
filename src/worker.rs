//! The worker loop: consume → decode → apply → coalesce/expand → flush → acknowledge.
//!
//! Guarantee (at-least-once, event-time exact): a message's offset is stored only after
//! everything it caused is acknowledged by Redis (see [`crate::offsets`]); Redis outages are
//! retried with backoff while intake stops, so nothing is skipped and memory stays bounded; an
//! invalid message is dead-lettered and committed. On SIGTERM/SIGINT the loop stops taking input,
//! writes the current window, commits what was stored and returns. Limits: fan-outs and ticks
//! still running at shutdown are abandoned: a fan-out's intent stays recorded in Redis and the
//! partition's next owner resumes it; a tick's message was not stored and is replayed. A failure
//! no retry can fix ends the loop with an error (the process exits to be restarted).
//!
//! Two lanes: fresh events, and the backlog of partitions split by `[catchup]` (a head reader
//! takes their fresh events while the group's reader drains the backlog). Each lane has its own
//! window and jobs; one window is written at a time, on a task of its own while intake goes on.
//! A fresh window is written as soon as the writer is free and no input is waiting (smart
//! batching: idle, no wait; busy, windows grow with the write time).
//! Live windows go first; while both lanes have a window due, the backlog gets
//! `catchup.backlog_share` of the rows written (a deficit counter), and while the backlog is owed
//! its share the two readers take turns at intake, so neither starves. While a window is written
//! the next fresh one may grow to `LIVE_GROWTH` × `batch.max_pairs` (a group commit). Backlog
//! member updates are held per member for `catchup.min_interval_ms` (`worker/hold.rs`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use tokio::sync::mpsc;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;

mod catchup;
mod health;
mod hold;
mod intake;
mod jobs;
mod owned;
mod retry;
mod shares;
mod writer;

use catchup::{CatchupSession, LogEnd};
use hold::MemberHold;
use intake::take_fetched;
use shares::LaneShares;
use writer::InFlight;

pub use health::{watch_stall, Health};
pub use retry::GiveUp;

use crate::coalesce::{MsgRef, Window};
use crate::config::Settings;
use crate::consume::{Ctx, RebalanceEvent, Shared};
use crate::decode::TopicKind;
use crate::expand::Jobs;

use crate::metrics::Metrics;
use crate::offsets::{OffsetTracker, Tp};
use crate::score::Scorer;
use crate::store::Store;

/// Rows a whole-member trigger is taken to cost until a written window has measured it (a
/// Catch Up member holds on the order of a hundred candidates). Starting from one row let the
/// first window take in thousands of member-wide rescorings (hundreds of MiB at start-up).
const INITIAL_MEMBER_WEIGHT: usize = 100;

/// Most messages taken from the consumer in one go.
const MAX_INTAKE: usize = 512;

/// Most fan-outs and ticks queued per lane before intake waits for them (memory bound).
const MAX_QUEUED_JOBS: usize = 4096;

/// How far a fresh window may grow (in `batch.max_pairs`) while the previous one is written.
const LIVE_GROWTH: usize = 4;

/// Everything the loop needs, wired by [`crate::app`].
pub struct Worker {
    pub settings: Settings,
    pub scorer: Scorer,
    pub store: Store,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub consumer: Arc<StreamConsumer<Ctx>>,
    pub shared: Arc<Shared>,
    pub rebalances: mpsc::Receiver<RebalanceEvent>,
    pub producer: FutureProducer,
}

/// Which reader delivered a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The consumer group's reader: in order from the committed offset (a split partition's
    /// backlog, everything else's fresh events).
    Group,
    /// The head reader of split partitions: fresh events from the log end at the split.
    Head,
}

/// Which window a message's work goes to: fresh events, or the backlog of a split partition.
/// Live windows are written first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Live,
    Backlog,
}

impl Run {
    /// Fan-outs and ticks of a lane's messages: their chunks go to that lane's windows, so a
    /// backlog's candidate updates never crowd fresh events' windows.
    fn jobs_mut(&mut self, lane: Lane) -> &mut Jobs {
        match lane {
            Lane::Live => &mut self.jobs,
            Lane::Backlog => &mut self.backlog_jobs,
        }
    }

    fn window_mut(&mut self, lane: Lane) -> &mut Window {
        match lane {
            Lane::Live => &mut self.window,
            Lane::Backlog => &mut self.backlog,
        }
    }
}

/// Loop state that is not configuration.
struct Run {
    /// Sequence number of the last window taken for writing.
    seq: u64,
    tracker: OffsetTracker,
    window: Window,
    /// Triggers of backlog messages: written only when no live window is due.
    backlog: Window,
    /// Backlog member updates held until their member's interval passes (`catchup.min_interval_ms`).
    backlog_hold: MemberHold,
    /// Split partitions the head reader serves, and whether it has been given them yet.
    catching_up: HashMap<Tp, bool>,
    session: Option<CatchupSession>,
    /// Partitions whose log end is being fetched for a split, and where the fetches report.
    splitting: std::collections::HashSet<Tp>,
    log_ends: mpsc::Sender<LogEnd>,
    /// Partitions whose last split failed (no log end, no head reader): not tried again before.
    split_retry_at: HashMap<Tp, Instant>,
    /// Recent average pairs per whole-member trigger (windows are sized in estimated rows);
    /// `None` until a window has measured it.
    member_weight: Option<f64>,
    /// The writer's shares between the lanes (`catchup.backlog_share`, by rows).
    shares: LaneShares,
    jobs: Jobs,
    backlog_jobs: Jobs,
    kinds: HashMap<String, TopicKind>,
    tick_partitions: Option<i32>,
    /// The head reader had the last intake turn.
    head_turn_taken: bool,
    /// What the loop did since the last `loop state` debug line.
    counts: LoopCounts,
    /// Messages taken in per second, both readers (smoothed over the last few seconds).
    intake_per_s: f64,
    /// Partitions of the feature-updates topic whose recorded fan-outs were loaded since their
    /// assignment.
    resumed: std::collections::HashSet<i32>,
    /// A failure no retry can fix: the loop stops, commits what is acknowledged and returns it,
    /// so the process exits non-zero and the orchestrator restarts it.
    fatal: Option<anyhow::Error>,
}

/// Loop activity per second, for the `loop state` debug line.
#[derive(Debug, Default)]
struct LoopCounts {
    group_batches: u32,
    group_messages: u32,
    head_batches: u32,
    head_messages: u32,
    live_windows: u32,
    backlog_windows: u32,
    /// Fresh windows written because nothing more was waiting (not full, not at their deadline).
    idle_flushes: u32,
}

impl Worker {
    /// Runs until `shutdown` fires (then drains) or the consumer fails for good.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        if self.settings.state.mode == crate::config::StateMode::Owned {
            return self.run_owned(shutdown).await;
        }
        let t = &self.settings.topics;
        let kinds: HashMap<String, TopicKind> = [
            (t.feature_updates.clone(), TopicKind::FeatureUpdates),
            (t.new_candidates.clone(), TopicKind::NewCandidates),
            (t.decay_ticks.clone(), TopicKind::DecayTicks),
        ]
        .into();
        let topics: Vec<&str> = kinds.keys().map(String::as_str).collect();
        self.consumer.subscribe(&topics)?;
        tracing::info!(topics = ?topics, group = %self.settings.kafka.group_id, "subscribed");
        // Log ends fetched for splits; at most one fetch per partition is in flight.
        let (log_ends, mut fetched_ends) = mpsc::channel::<LogEnd>(64);
        let mut run = Run {
            seq: 0,
            tracker: OffsetTracker::new(),
            window: Window::new(self.settings.batch.coalesce),
            backlog: Window::new(self.settings.batch.coalesce),
            backlog_hold: MemberHold::new(if self.settings.batch.coalesce {
                Duration::from_millis(self.settings.catchup.min_interval_ms)
            } else {
                Duration::ZERO
            }),
            catching_up: HashMap::new(),
            session: None,
            splitting: Default::default(),
            log_ends,
            split_retry_at: HashMap::new(),
            member_weight: None,
            shares: LaneShares::new(
                self.settings.catchup.backlog_share,
                self.settings.catchup.max_pairs,
            ),
            jobs: Jobs::new(Duration::from_millis(
                self.settings.batch.fanout_min_interval_ms,
            ))
            .with_members_per_interval(self.settings.batch.fanout_interval_members)
            .with_max_started(self.settings.batch.max_jobs),
            // A backlog's fan-outs coalesce over the longer of the two intervals.
            backlog_jobs: Jobs::new(Duration::from_millis(if self.settings.batch.coalesce {
                self.settings
                    .batch
                    .fanout_min_interval_ms
                    .max(self.settings.catchup.min_interval_ms)
            } else {
                self.settings.batch.fanout_min_interval_ms
            }))
            .with_members_per_interval(self.settings.batch.fanout_interval_members)
            .with_max_started(self.settings.batch.max_jobs),
            kinds,
            tick_partitions: None,
            head_turn_taken: false,
            counts: LoopCounts::default(),
            intake_per_s: 0.0,
            fatal: None,
            resumed: Default::default(),
        };
        let initial = INITIAL_MEMBER_WEIGHT.min(self.settings.batch.max_pairs);
        run.window.set_member_weight(initial);
        run.backlog.set_member_weight(initial);
        // Redis retries stop at `hard_stop`: 10 s after shutdown, so a drain during an outage
        // ends (leaving its messages uncommitted, to be replayed) instead of hanging.
        let hard_stop = retry::hard_stop_after(&shutdown);
        let max_wait = Duration::from_millis(self.settings.batch.max_wait_ms);
        let backlog_wait = Duration::from_millis(self.settings.catchup.max_wait_ms);
        let max_pairs = self.settings.batch.max_pairs;
        let backlog_max_pairs = self.settings.catchup.max_pairs;
        let mut lag_timer = tokio::time::interval(Duration::from_secs(1));
        lag_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let consumer = self.consumer.clone();
        let mut jobs_turn = false;
        let mut flight: Option<InFlight> = None;
        loop {
            if run.fatal.is_some() {
                break;
            }
            let full = run.window.size() >= max_pairs;
            // While a window is being written, the next fresh one keeps filling up to
            // LIVE_GROWTH × max_pairs (a group commit: under load, more coalescing and fewer,
            // larger writes; idle, windows stay small and fresh).
            let live_cap = if flight.is_some() {
                max_pairs * LIVE_GROWTH
            } else {
                max_pairs
            };
            let live_room = run.window.size() < live_cap;
            let deadline = run
                .window
                .started
                .map(|s| s + max_wait)
                .unwrap_or_else(Instant::now);
            let backlog_full = run.backlog.size() >= backlog_max_pairs;
            let backlog_deadline = run
                .backlog
                .started
                .map(|s| s + backlog_wait)
                .unwrap_or_else(Instant::now);
            let can_flush = flight.is_none();
            let backlog_due =
                !run.backlog.is_empty() && (backlog_full || backlog_deadline <= Instant::now());
            let backlog_first = backlog_due && run.shares.backlog_first();
            let max_jobs = self.settings.batch.max_jobs;
            // Queued fan-outs are one per candidate, their offsets stored; the queue is bounded
            // all the same (a stream of ever new candidates would grow it without end): at
            // MAX_QUEUED_JOBS intake waits while the jobs run.
            let room_for_jobs = run.jobs.ticks() < max_jobs
                && run.jobs.len() < MAX_QUEUED_JOBS
                && run.backlog_jobs.len() < MAX_QUEUED_JOBS;
            // The group's reader also carries split partitions' backlog: it waits for room in both
            // lanes, and while a split's log end is being fetched (what it reads of that
            // partition meanwhile would land before the split, in the fresh lane). Everything
            // else goes on: written windows complete, the head reader reads, jobs step.
            let intake = live_room
                && !backlog_full
                && room_for_jobs
                && run.backlog_jobs.ticks() < max_jobs
                && run.splitting.is_empty();
            let catchup = run.session.as_ref().map(|s| s.consumer.clone());
            let head_intake =
                catchup.is_some() && !run.catching_up.is_empty() && live_room && room_for_jobs;
            // While the backlog is owed its share, the readers take turns; otherwise the head
            // reader goes first.
            let group_first = head_intake && run.head_turn_taken && run.shares.backlog_first();
            let release_at = run.backlog_hold.next_release().filter(|_| !backlog_full);
            // Fan-out and tick chunks fill a fresh window only up to `batch.job_pairs` (at most
            // `max_pairs`; lower while a backlog drains, `catchup.job_pairs`); the rest
            // is for fresh events. Fan-outs soak up whatever the writer has to spare, so with
            // more they would make every window, and the wait of every fresh event in it, as
            // large as the group commit allows.
            let jobs_cap = self.live_job_pairs(&run);
            let step_live_jobs = run.window.size() < jobs_cap && run.jobs.runnable();
            let step_backlog_jobs = !backlog_full && run.backlog_jobs.runnable();
            let step_jobs = step_live_jobs || step_backlog_jobs;
            let job_lane = if step_live_jobs {
                Lane::Live
            } else {
                Lane::Backlog
            };
            // A fan-out held back by its interval wakes the loop when it may start.
            let wake = [
                (run.window.size() < jobs_cap)
                    .then(|| run.jobs.next_wake())
                    .flatten(),
                (!backlog_full)
                    .then(|| run.backlog_jobs.next_wake())
                    .flatten(),
            ]
            .into_iter()
            .flatten()
            .min();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(ev) = self.rebalances.recv() => {
                    self.rebalanced(&mut run, ev);
                    self.resume_assigned(&mut run, &hard_stop).await;
                }
                Some(end) = fetched_ends.recv() => self.split_at(&mut run, end),
                _ = lag_timer.tick() => {
                    let counts = std::mem::take(&mut run.counts);
                    let taken = f64::from(counts.group_messages + counts.head_messages);
                    run.intake_per_s = 0.5 * run.intake_per_s + 0.5 * taken;
                    self.split_lagging(&mut run);
                    // Also here: a rebalance event can be dropped (bounded channel).
                    self.resume_assigned(&mut run, &hard_stop).await;
                    let lag = self.update_lag(&run.tracker);
                    self.check_stall(&run, lag > 0 || flight.is_some());
                    for (lane, jobs) in [("live", &run.jobs), ("backlog", &run.backlog_jobs)] {
                        self.metrics.jobs_in_progress.with_label_values(&[lane]).set(jobs.len() as i64);
                    }
                    tracing::debug!(
                        live_window = run.window.size(),
                        backlog_window = run.backlog.size(),
                        live_jobs = run.jobs.len(),
                        backlog_jobs = run.backlog_jobs.len(),
                        backlog_held = run.backlog_hold.held(),
                        holds_started = run.backlog_hold.started,
                        holds_merged = run.backlog_hold.merged,
                        writing = flight.is_some(),
                        intake,
                        head_intake,
                        group_first,
                        ?counts,
                        "loop state"
                    );
                }
                result = async { match flight.as_mut() {
                    Some(f) => (&mut f.handle).await,
                    None => std::future::pending().await,
                } }, if flight.is_some() => {
                    if let Some(f) = flight.take() {
                        self.finish_flush(&mut run, f.seq, f.lane, result);
                    }
                }
                // Live windows first, but a due backlog window goes ahead once the live lane has
                // written its share of rows, so live traffic that keeps the writer busy never
                // starves the backlog, and a backlog never takes more than its share.
                _ = std::future::ready(()), if backlog_first && can_flush => {
                    flight = Some(self.start_flush(&mut run, Lane::Backlog, &hard_stop));
                }
                _ = std::future::ready(()), if full && can_flush => {
                    flight = Some(self.start_flush(&mut run, Lane::Live, &hard_stop));
                }
                _ = sleep_until(deadline), if !run.window.is_empty() && can_flush => {
                    flight = Some(self.start_flush(&mut run, Lane::Live, &hard_stop));
                }
                _ = std::future::ready(()), if backlog_full && can_flush => flight = Some(self.start_flush(&mut run, Lane::Backlog, &hard_stop)),
                _ = sleep_until(backlog_deadline), if !run.backlog.is_empty() && can_flush => flight = Some(self.start_flush(&mut run, Lane::Backlog, &hard_stop)),
                // Held backlog member updates whose interval passed join the backlog window.
                _ = sleep_until(release_at.unwrap_or(deadline)), if release_at.is_some() => {
                    run.backlog_hold.release(&mut run.backlog, false, backlog_max_pairs);
                }
                _ = sleep_until(wake.unwrap_or(deadline)), if wake.is_some() && !step_jobs => {}
                // Fan-outs and ticks take turns with intake, so a steady stream of messages
                // never starves them (their messages would wait uncommitted, and their
                // candidates' updates pile up in the queue).
                _ = std::future::ready(()), if step_jobs && jobs_turn => {
                    jobs_turn = false;
                    self.step_jobs(&mut run, job_lane, &hard_stop).await;
                }
                // The backlog's reader takes every other turn while the backlog lane is owed its
                // share of the writer (else live traffic that keeps the head reader busy would
                // stop the backlog from ever filling a window)...
                msg = consumer.recv(), if intake && group_first => {
                    self.group_intake(&mut run, &consumer, msg, live_cap, &hard_stop).await;
                    jobs_turn = true;
                }
                // ...otherwise fresh events of split partitions first.
                msg = async { match catchup.as_ref() {
                    Some(c) => c.recv().await,
                    None => std::future::pending().await,
                } }, if head_intake => match msg {
                    Ok(first) => {
                        let room = self.intake_room(&run, live_cap.saturating_sub(run.window.size()));
                        let batch = match catchup.as_ref() {
                            Some(c) => take_fetched(c, first, room),
                            None => vec![first],
                        };
                        run.head_turn_taken = true;
                        run.counts.head_batches += 1;
                        run.counts.head_messages += batch.len() as u32;
                        self.handle_batch(&mut run, &batch, Source::Head, &hard_stop).await;
                        self.catchup_progress(&mut run);
                        jobs_turn = true;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "head reader error; librdkafka retries");
                        sleep(Duration::from_millis(200)).await;
                    }
                },
                msg = consumer.recv(), if intake && !group_first => {
                    self.group_intake(&mut run, &consumer, msg, live_cap, &hard_stop).await;
                    jobs_turn = true;
                }
                // Nothing more to take in now and the writer free: the fresh window goes at once
                // (idle, an event is scored as soon as it arrives; busy, what arrived during one
                // write goes out in the next; `max_wait_ms` bounds a window while input keeps
                // coming).
                _ = std::future::ready(()), if !run.window.is_empty() && can_flush && !step_live_jobs => {
                    run.counts.idle_flushes += 1;
                    flight = Some(self.start_flush(&mut run, Lane::Live, &hard_stop));
                }
                _ = std::future::ready(()), if step_jobs => self.step_jobs(&mut run, job_lane, &hard_stop).await,
                // Like the fresh window above, the backlog window goes at once when nothing can
                // add to it now (no input waiting, no backlog job able to step, no held update
                // due) and no fresh window is open: a backlog's last fan-outs, each blocked until
                // its chunk is written, otherwise waited `catchup.max_wait_ms` a window with the
                // writer idle.
                _ = std::future::ready(()), if !run.backlog.is_empty() && can_flush && run.window.is_empty() && !step_backlog_jobs && release_at.is_none() => {
                    flight = Some(self.start_flush(&mut run, Lane::Backlog, &hard_stop));
                }
            }
        }
        if let Some(fatal) = run.fatal.take() {
            // Only what Redis acknowledged was stored: commit that, leave the rest for replay.
            if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::warn!(error = %e, "commit before the fatal exit failed");
            }
            return Err(fatal);
        }
        tracing::info!("shutting down: writing the current batches, then committing");
        run.backlog_hold.release(&mut run.backlog, true, 0);
        if let Some(f) = flight.take() {
            let result = f.handle.await;
            self.finish_flush(&mut run, f.seq, f.lane, result);
        }
        for lane in [Lane::Live, Lane::Backlog] {
            if !run.window_mut(lane).is_empty() {
                self.flush_now(&mut run, lane, &hard_stop).await;
            }
        }
        let abandoned = run.jobs.abandon() + run.backlog_jobs.abandon();
        if abandoned > 0 {
            tracing::info!(
                jobs = abandoned,
                "unfinished fan-outs/ticks left for replay"
            );
        }
        self.commit_and_leave();
        Ok(())
    }

    /// Commits what was stored and leaves the group (a graceful stop).
    fn commit_and_leave(&self) {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::info!("offsets committed"),
            // Nothing stored since the last auto-commit: nothing to do.
            Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => {}
            Err(e) => {
                tracing::warn!(error = %e, "final commit failed; the next owner replays from the last commit")
            }
        }
        self.consumer.unsubscribe();
    }

    /// Resumes the recorded fan-outs of every partition of the feature-updates topic assigned
    /// since its intents were last loaded (read from the assignment itself, so a dropped
    /// rebalance event delays this by a second at most, and a partition kept across an eager
    /// rebalance is not loaded twice).
    async fn resume_assigned(&self, run: &mut Run, hard_stop: &CancellationToken) {
        let topic = &self.settings.topics.feature_updates;
        let (assigned, _) = self.shared.snapshot();
        let now: std::collections::HashSet<i32> = assigned
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| *p)
            .collect();
        run.resumed.retain(|p| now.contains(p));
        let mut new: Vec<i32> = now.difference(&run.resumed).copied().collect();
        if new.is_empty() {
            return;
        }
        new.sort_unstable();
        if self.resume_fanouts(run, &new, hard_stop).await {
            run.resumed.extend(new);
        }
    }

    fn rebalanced(&self, run: &mut Run, ev: RebalanceEvent) {
        if let RebalanceEvent::Revoked(tps) = &ev {
            for tp in tps {
                if tp.0 == self.settings.topics.feature_updates {
                    run.resumed.remove(&tp.1);
                }
                if let Some(given) = run.catching_up.remove(tp) {
                    Self::release_catchup(run, tp, given);
                }
                self.forget_partition(&mut run.tracker, tp);
            }
        }
        self.note_assignment();
    }

    /// How long an error that is not an outage is retried (`redis.give_up_after_secs`).
    fn give_up_after(&self) -> Duration {
        Duration::from_secs(self.settings.redis.give_up_after_secs)
    }

    /// Marks messages done and stores the advanced watermarks.
    fn complete(&self, run: &mut Run, msgs: &[MsgRef], scored: bool) {
        self.complete_tracked(&mut run.tracker, msgs, scored);
    }

    /// Marks messages done in `tracker` (observing freshness when `scored`) and stores the
    /// advanced watermarks.
    fn complete_tracked(&self, tracker: &mut OffsetTracker, msgs: &[MsgRef], scored: bool) {
        let now = chrono_now_ms();
        if !msgs.is_empty() {
            self.health.last_progress_ms.store(now, Ordering::Relaxed);
        }
        for m in msgs {
            if scored {
                if let Some(ts) = m.timestamp_ms {
                    // A message read already behind counts as backlog, whichever lane wrote it.
                    let lane = if m.backlog || m.late {
                        "backlog"
                    } else {
                        "live"
                    };
                    self.metrics
                        .event_to_score_seconds
                        .with_label_values(&[m.topic_label, lane])
                        .observe(((now - ts).max(0)) as f64 / 1000.0);
                }
            }
            if m.acked {
                continue; // its offset was stored when its fan-out intent was recorded
            }
            if let Some(store_at) = tracker.done(&m.tp, m.offset) {
                if let Err(e) = self.consumer.store_offset(&m.tp.0, m.tp.1, store_at) {
                    tracing::debug!(error = %e, topic = %m.tp.0, partition = m.tp.1, "offset not stored (partition revoked?)");
                }
            }
        }
    }
}

/// Wall clock in ms (only for `updated_at`, `ttl_set_at`, freshness and lag; never for scoring).
pub fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
