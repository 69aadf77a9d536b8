//! The worker loop: consume → decode → apply → coalesce/expand → flush → acknowledge.
//!
//! Guarantee (at-least-once, event-time exact): a message's offset is stored only after
//! everything it caused is acknowledged by Redis (see [`crate::offsets`]); Redis outages are
//! retried with backoff while intake stops, so nothing is skipped and memory stays bounded; an
//! invalid message is dead-lettered and committed. On SIGTERM/SIGINT the loop stops taking input,
//! writes the current window, commits what was stored and returns. Limits: fan-outs and ticks
//! still running at shutdown are abandoned; their messages were not stored and are replayed.
//!
//! Two lanes: fresh events, and the backlog of partitions split by `[catchup]` (a head reader
//! takes their fresh events while the group's reader drains the backlog). Each lane has its own
//! window and jobs; one window is written at a time, on a task of its own while intake goes on.
//! Live windows go first; while both lanes have a window due, the backlog gets
//! `catchup.backlog_share` of the rows written (a deficit counter), so neither starves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::Message;
use tokio::sync::mpsc;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;

mod catchup;
mod shares;

use catchup::CatchupSession;
use shares::LaneShares;

use crate::coalesce::{MsgRef, Window};
use crate::config::Settings;
use crate::consume::{Ctx, RebalanceEvent, Shared};
use crate::decode::{decode, Entity, Event, TopicKind};
use crate::expand::Jobs;
use crate::flush::{FlushStats, Flusher};
use crate::internal_events::{EventHandled, RedisUnavailable, ScoresWritten};
use crate::metrics::Metrics;
use crate::offsets::{OffsetTracker, Received, Tp};
use crate::score::Scorer;
use crate::store::{Applied, Store, StoreError};

/// Most messages taken from the consumer in one go.
const MAX_INTAKE: usize = 512;

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Health {
    pub model_loaded: AtomicBool,
    pub redis_ok: AtomicBool,
    pub assigned: AtomicBool,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.model_loaded.load(Ordering::Relaxed)
            && self.redis_ok.load(Ordering::Relaxed)
            && self.assigned.load(Ordering::Relaxed)
    }
}

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

/// Records a failed Redis operation and waits before the next attempt; false once `cancel` fires.
async fn backoff(
    what: &str,
    error: &str,
    attempt: u32,
    metrics: &Metrics,
    health: &Health,
    cancel: &CancellationToken,
) -> bool {
    let delay = (Duration::from_millis(100) * 2u32.saturating_pow(attempt.min(16) - 1))
        .min(Duration::from_secs(5));
    health.redis_ok.store(false, Ordering::Relaxed);
    RedisUnavailable {
        operation: what,
        error: &error,
        attempt,
        retry_in: delay,
    }
    .emit(metrics);
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = sleep(delay) => true,
    }
}

/// Retries `op` with exponential backoff until it succeeds or `cancel` fires (then None).
async fn retry<T, F, Fut>(
    what: &str,
    metrics: &Metrics,
    health: &Health,
    cancel: &CancellationToken,
    mut op: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => {
                if !health.redis_ok.swap(true, Ordering::Relaxed) && attempt > 0 {
                    tracing::info!(operation = what, "redis reachable again");
                }
                return Some(v);
            }
            Err(e) => {
                attempt += 1;
                if !backoff(what, &e.to_string(), attempt, metrics, health, cancel).await {
                    return None;
                }
            }
        }
    }
}

type FlushResult = Result<Option<(FlushStats, Vec<MsgRef>)>, tokio::task::JoinError>;

/// The window being written.
struct InFlight {
    seq: u64,
    lane: Lane,
    handle: tokio::task::JoinHandle<Option<(FlushStats, Vec<MsgRef>)>>,
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
    /// Split partitions the head reader serves, and whether it has been given them yet.
    catching_up: HashMap<Tp, bool>,
    session: Option<CatchupSession>,
    /// Recent average pairs per whole-member trigger (windows are sized in estimated rows).
    member_weight: f64,
    /// The writer's shares between the lanes (`catchup.backlog_share`, by rows).
    shares: LaneShares,
    jobs: Jobs,
    backlog_jobs: Jobs,
    kinds: HashMap<String, TopicKind>,
    tick_partitions: Option<i32>,
}

impl Worker {
    /// Runs until `shutdown` fires (then drains) or the consumer fails for good.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
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
        let mut run = Run {
            seq: 0,
            tracker: OffsetTracker::new(),
            window: Window::new(self.settings.batch.coalesce),
            backlog: Window::new(self.settings.batch.coalesce),
            catching_up: HashMap::new(),
            session: None,
            member_weight: 1.0,
            shares: LaneShares::new(
                self.settings.catchup.backlog_share,
                self.settings.catchup.max_pairs,
            ),
            jobs: Jobs::new(Duration::from_millis(
                self.settings.batch.fanout_min_interval_ms,
            )),
            backlog_jobs: Jobs::new(Duration::from_millis(
                self.settings.batch.fanout_min_interval_ms,
            )),
            kinds,
            tick_partitions: None,
        };
        // Redis retries stop at `hard_stop`: 10 s after shutdown, so a drain during an outage
        // ends (leaving its messages uncommitted, to be replayed) instead of hanging.
        let hard_stop = CancellationToken::new();
        {
            let (shutdown, hard_stop) = (shutdown.clone(), hard_stop.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                sleep(Duration::from_secs(10)).await;
                hard_stop.cancel();
            });
        }
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
            let full = run.window.size() >= max_pairs;
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
            let room_for_jobs = run.jobs.len() < max_jobs;
            // The group's reader also carries split partitions' backlog: it waits for room in both
            // lanes.
            let intake =
                !full && !backlog_full && room_for_jobs && run.backlog_jobs.len() < max_jobs;
            let catchup = run.session.as_ref().map(|s| s.consumer.clone());
            let head_intake =
                catchup.is_some() && !run.catching_up.is_empty() && !full && room_for_jobs;
            let step_live_jobs = !full && run.jobs.runnable();
            let step_backlog_jobs = !backlog_full && run.backlog_jobs.runnable();
            let step_jobs = step_live_jobs || step_backlog_jobs;
            let job_lane = if step_live_jobs {
                Lane::Live
            } else {
                Lane::Backlog
            };
            // A fan-out held back by its interval wakes the loop when it may start.
            let wake = [
                (!full).then(|| run.jobs.next_wake()).flatten(),
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
                Some(ev) = self.rebalances.recv() => self.rebalanced(&mut run, ev),
                _ = lag_timer.tick() => {
                    self.split_lagging(&mut run).await;
                    self.update_lag(&run.tracker);
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
                _ = sleep_until(wake.unwrap_or(deadline)), if wake.is_some() && !step_jobs => {}
                // Fan-outs and ticks take turns with intake, so a steady stream of messages
                // never starves them (their messages would wait, and the job cap stop intake).
                _ = std::future::ready(()), if step_jobs && jobs_turn => {
                    jobs_turn = false;
                    self.step_jobs(&mut run, job_lane, &hard_stop).await;
                }
                // Fresh events of split partitions first.
                msg = async { match catchup.as_ref() {
                    Some(c) => c.recv().await,
                    None => std::future::pending().await,
                } }, if head_intake => match msg {
                    Ok(first) => {
                        let room = max_pairs.saturating_sub(run.window.size()).clamp(1, MAX_INTAKE);
                        let batch = match catchup.as_ref() {
                            Some(c) => take_fetched(c, first, room),
                            None => vec![first],
                        };
                        self.handle_batch(&mut run, &batch, Source::Head, &hard_stop).await;
                        self.catchup_progress(&mut run);
                        jobs_turn = true;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "head reader error; librdkafka retries");
                        sleep(Duration::from_millis(200)).await;
                    }
                },
                msg = consumer.recv(), if intake => match msg {
                    Ok(first) => {
                        // Take what is already fetched too, so one Redis round trip applies a run
                        // of events (bounded by the windows' room).
                        let room = max_pairs
                            .saturating_sub(run.window.size())
                            .min(backlog_max_pairs.saturating_sub(run.backlog.size()))
                            .clamp(1, MAX_INTAKE);
                        let batch = take_fetched(&consumer, first, room);
                        self.handle_batch(&mut run, &batch, Source::Group, &hard_stop).await;
                        self.catchup_progress(&mut run);
                        // A partition far behind is split as soon as its messages show it.
                        self.split_lagging(&mut run).await;
                        jobs_turn = true;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "consumer error; librdkafka retries");
                        sleep(Duration::from_millis(200)).await;
                    }
                },
                _ = std::future::ready(()), if step_jobs => self.step_jobs(&mut run, job_lane, &hard_stop).await,
            }
        }
        tracing::info!("shutting down: writing the current batches, then committing");
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
        Ok(())
    }

    /// Advances one fan-out or tick by a chunk, retrying Redis until the hard stop.
    async fn step_jobs(&self, run: &mut Run, lane: Lane, hard_stop: &CancellationToken) {
        let (fc, tc) = (self.settings.batch.fanout_chunk, self.settings.decay.chunk);
        let mut attempt = 0;
        let (jobs, window) = match lane {
            Lane::Live => (&mut run.jobs, &mut run.window),
            Lane::Backlog => (&mut run.backlog_jobs, &mut run.backlog),
        };
        while let Err(e) = jobs.step(&self.store, window, fc, tc).await {
            attempt += 1;
            if !backoff(
                "expand",
                &e.to_string(),
                attempt,
                &self.metrics,
                &self.health,
                hard_stop,
            )
            .await
            {
                break;
            }
        }
    }

    fn rebalanced(&self, run: &mut Run, ev: RebalanceEvent) {
        if let RebalanceEvent::Revoked(tps) = &ev {
            for tp in tps {
                if let Some(given) = run.catching_up.remove(tp) {
                    Self::release_catchup(run, tp, given);
                }
                run.tracker.revoke(tp);
                let p = tp.1.to_string();
                let _ = self.metrics.consumer_lag.remove_label_values(&[&tp.0, &p]);
                let _ = self
                    .metrics
                    .consumer_lag_seconds
                    .remove_label_values(&[&tp.0, &p]);
            }
        }
        let n = self.shared.assigned.lock().map(|a| a.len()).unwrap_or(0);
        self.metrics.assigned_partitions.set(n as i64);
        self.health.assigned.store(n > 0, Ordering::Relaxed);
        self.metrics.ready.set(i64::from(self.health.ready()));
    }

    /// Lag per assigned partition: high watermark (from fetch statistics) minus position, and the
    /// age of the oldest unfinished message when behind.
    fn update_lag(&self, tracker: &OffsetTracker) {
        let (assigned, hw) = self.shared.snapshot();
        let now = chrono_now_ms();
        for tp in &assigned {
            let Some(&high) = hw.get(tp) else { continue };
            let p = tp.1.to_string();
            let pos = tracker.position(tp).unwrap_or(high).min(high);
            let lag = (high - pos).max(0);
            self.metrics
                .consumer_lag
                .with_label_values(&[&tp.0, &p])
                .set(lag);
            let secs = if lag == 0 {
                0.0
            } else {
                tracker
                    .oldest_unfinished_ts(tp)
                    .map(|ts| ((now - ts).max(0)) as f64 / 1000.0)
                    .unwrap_or(0.0)
            };
            self.metrics
                .consumer_lag_seconds
                .with_label_values(&[&tp.0, &p])
                .set(secs);
        }
        self.metrics.ready.set(i64::from(self.health.ready()));
    }

    /// Marks messages done and stores the advanced watermarks.
    fn complete(&self, run: &mut Run, msgs: &[MsgRef], scored: bool) {
        let now = chrono_now_ms();
        for m in msgs {
            if scored {
                if let Some(ts) = m.timestamp_ms {
                    let lane = if m.backlog { "backlog" } else { "live" };
                    self.metrics
                        .event_to_score_seconds
                        .with_label_values(&[m.topic_label, lane])
                        .observe(((now - ts).max(0)) as f64 / 1000.0);
                }
            }
            if let Some(store_at) = run.tracker.done(&m.tp, m.offset) {
                if let Err(e) = self.consumer.store_offset(&m.tp.0, m.tp.1, store_at) {
                    tracing::debug!(error = %e, topic = %m.tp.0, partition = m.tp.1, "offset not stored (partition revoked?)");
                }
            }
        }
    }

    /// Takes the current window and writes it on a task of its own, so intake (decode and
    /// apply) goes on while it loads, scores and writes. One window is written at a time, in
    /// order: a later window reads state after the earlier one's writes and wins every tie.
    fn start_flush(&self, run: &mut Run, lane: Lane, hard_stop: &CancellationToken) -> InFlight {
        let window = run.window_mut(lane).take();
        run.seq += 1;
        // Each lane's jobs put their chunks in that lane's window.
        match lane {
            Lane::Live => run.jobs.window_taken(run.seq),
            Lane::Backlog => run.backlog_jobs.window_taken(run.seq),
        }
        let (store, scorer, settings) = (
            self.store.clone(),
            self.scorer.clone(),
            self.settings.clone(),
        );
        let (metrics, health, hard_stop) =
            (self.metrics.clone(), self.health.clone(), hard_stop.clone());
        let handle = tokio::spawn(async move {
            let flusher = Flusher {
                store: &store,
                scorer: &scorer,
                output: &settings.output,
                decay: &settings.decay,
                max_pairs: settings.batch.max_pairs,
            };
            let stats = retry("flush", &metrics, &health, &hard_stop, || async {
                flusher
                    .flush(&window, chrono_now_ms())
                    .await
                    .map_err(|e| match e {
                        crate::flush::FlushError::Store(s) => s,
                        crate::flush::FlushError::Model(m) => {
                            StoreError::Protocol(format!("model: {m}"))
                        }
                    })
            })
            .await?;
            Some((stats, window.messages))
        });
        InFlight {
            seq: run.seq,
            lane,
            handle,
        }
    }

    /// A window's write ended: acknowledges its messages and those of jobs it finished.
    fn finish_flush(&self, run: &mut Run, seq: u64, lane: Lane, result: FlushResult) {
        let (stats, mut msgs) = match result {
            Ok(Some(done)) => done,
            // Hard stop during an outage: nothing acknowledged, replayed by the next owner.
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "flush task failed; its messages stay unacknowledged");
                return;
            }
        };
        run.shares
            .written(lane == Lane::Backlog, stats.pairs_scored);
        // Windows are written one at a time in `seq` order, so every earlier window is written too.
        msgs.extend(run.jobs.window_written(seq));
        msgs.extend(run.backlog_jobs.window_written(seq));
        if stats.member_triggers > 0 {
            // Windows are sized in estimated rows: follow the recent pairs per member.
            let seen = stats.member_rows as f64 / stats.member_triggers as f64;
            run.member_weight = 0.8 * run.member_weight + 0.2 * seen;
            let w = (run.member_weight.round() as usize).clamp(1, self.settings.batch.max_pairs);
            run.window.set_member_weight(w);
            run.backlog.set_member_weight(w);
        }
        ScoresWritten {
            stats: &stats,
            messages: msgs.len(),
        }
        .emit(&self.metrics);
        self.complete(run, &msgs, true);
    }

    /// Writes the current window and waits for it (shutdown).
    async fn flush_now(&self, run: &mut Run, lane: Lane, hard_stop: &CancellationToken) {
        let f = self.start_flush(run, lane, hard_stop);
        let result = f.handle.await;
        self.finish_flush(run, f.seq, f.lane, result);
    }

    /// Decodes a run of messages, dead-letters the invalid ones, applies the rest to Redis in one
    /// round trip (in order), then folds their triggers into the window or the jobs.
    async fn handle_batch(
        &self,
        run: &mut Run,
        msgs: &[BorrowedMessage<'_>],
        source: Source,
        hard_stop: &CancellationToken,
    ) {
        let mut valid: Vec<(Event, MsgRef)> = Vec::with_capacity(msgs.len());
        for msg in msgs {
            let tp: Tp = (msg.topic().to_owned(), msg.partition());
            let Some(&kind) = run.kinds.get(msg.topic()) else {
                continue;
            };
            let timestamp_ms = msg.timestamp().to_millis();
            let lane = match source {
                Source::Group => match run.tracker.received(&tp, msg.offset(), timestamp_ms) {
                    Received::Live => Lane::Live,
                    Received::Backlog => Lane::Backlog,
                    Received::Duplicate => continue,
                },
                Source::Head if run.tracker.received_head(&tp, msg.offset(), timestamp_ms) => {
                    Lane::Live
                }
                // Not taken from the head reader: the group's reader covers it.
                Source::Head => continue,
            };
            let mref = MsgRef {
                tp,
                offset: msg.offset(),
                timestamp_ms,
                topic_label: kind.label(),
                backlog: lane == Lane::Backlog,
            };
            match decode(kind, msg.payload()) {
                Ok(ev) => valid.push((ev, mref)),
                Err(e) => {
                    if !self.dead_letter(msg, &e.0, hard_stop).await {
                        return; // not acknowledged by the broker: stays uncommitted, replayed
                    }
                    EventHandled {
                        topic: kind.label(),
                        outcome: "dead_lettered",
                        partition: msg.partition(),
                        offset: msg.offset(),
                        reason: Some(&e.0),
                    }
                    .emit(&self.metrics);
                    self.complete(run, &[mref], false);
                }
            }
        }
        if valid.is_empty() {
            return;
        }
        let refs: Vec<(&Event, i64)> = valid.iter().map(|(e, m)| (e, m.offset)).collect();
        let top_n = self.settings.output.top_n;
        let Some(applied) = retry("apply", &self.metrics, &self.health, hard_stop, || {
            self.store.apply(&refs, top_n)
        })
        .await
        else {
            return; // hard stop during an outage: nothing acknowledged, replayed later
        };
        for ((event, mref), applied) in valid.into_iter().zip(applied) {
            let lane = if mref.backlog {
                Lane::Backlog
            } else {
                Lane::Live
            };
            let handled = |outcome| EventHandled {
                topic: mref.topic_label,
                outcome,
                partition: mref.tp.1,
                offset: mref.offset,
                reason: None,
            };
            match (event, applied) {
                (Event::Features(u), Applied::Features(out)) => {
                    if out.applied == 0 && !u.features.is_empty() {
                        handled("stale").emit(&self.metrics);
                        self.complete(run, &[mref], false);
                        continue;
                    }
                    handled("applied").emit(&self.metrics);
                    match u.entity {
                        Entity::Member => {
                            let w = run.window_mut(lane);
                            w.member(&u.id, u.ts);
                            w.message(mref);
                        }
                        Entity::Candidate => run.jobs_mut(lane).fanout(&u.id, u.ts, mref),
                    }
                }
                (Event::Upsert(u), Applied::Pair(true)) => {
                    handled("applied").emit(&self.metrics);
                    let w = run.window_mut(lane);
                    w.pair(&u.member_id, &u.candidate_id, u.ts);
                    w.message(mref);
                }
                (Event::Remove(_), Applied::Pair(true)) => {
                    handled("applied").emit(&self.metrics);
                    self.complete(run, &[mref], false);
                }
                (Event::Upsert(_) | Event::Remove(_), _) => {
                    handled("stale").emit(&self.metrics);
                    self.complete(run, &[mref], false);
                }
                (Event::Tick(t), _) => {
                    let shards = self.tick_shards(run, &mref.tp.0, mref.tp.1).await;
                    handled("applied").emit(&self.metrics);
                    run.jobs_mut(lane).tick(shards, t.ts, mref);
                }
                (Event::Features(_), other) => {
                    tracing::error!(
                        ?other,
                        "broken invariant: a feature update applied as something else"
                    );
                }
            }
        }
    }

    /// The decay-schedule shards a tick on `partition` covers: s with s mod partitions = p.
    async fn tick_shards(&self, run: &mut Run, topic: &str, partition: i32) -> Vec<u32> {
        let known = run.tick_partitions.filter(|n| partition < *n);
        let n = match known {
            Some(n) => n,
            None => {
                let consumer = self.consumer.clone();
                let topic = topic.to_owned();
                let n = tokio::task::spawn_blocking(move || {
                    consumer
                        .fetch_metadata(Some(&topic), Duration::from_secs(10))
                        .ok()
                        .and_then(|md| md.topics().first().map(|t| t.partitions().len() as i32))
                })
                .await
                .ok()
                .flatten()
                .filter(|n| *n > partition)
                .unwrap_or(partition + 1);
                run.tick_partitions = Some(n);
                n
            }
        };
        (0..self.store.keys().shards())
            .filter(|s| (*s as i32) % n == partition)
            .collect()
    }

    /// Sends to the DLQ until the broker acknowledges (true) or the hard stop fires (false).
    async fn dead_letter(
        &self,
        msg: &BorrowedMessage<'_>,
        reason: &str,
        hard_stop: &CancellationToken,
    ) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            match crate::dlq::send(&self.producer, &self.settings.topics.dlq, msg, reason).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(error = %e, "dead-letter write failed; retrying");
                    tokio::select! {
                        _ = hard_stop.cancelled() => return false,
                        _ = sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// `first` and whatever else `consumer` has already fetched, up to `room` messages, so one Redis
/// round trip applies a run of events.
fn take_fetched<'a, C: rdkafka::consumer::ConsumerContext + 'static>(
    consumer: &'a StreamConsumer<C>,
    first: BorrowedMessage<'a>,
    room: usize,
) -> Vec<BorrowedMessage<'a>> {
    let mut batch = vec![first];
    while batch.len() < room {
        match consumer.recv().now_or_never() {
            Some(Ok(m)) => batch.push(m),
            _ => break,
        }
    }
    batch
}

/// Wall clock in ms (only for `updated_at`, freshness and lag; never for scoring).
pub fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
