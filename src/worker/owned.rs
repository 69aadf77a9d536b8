//! The owned-state loop (`state.mode = "owned"`, design in `docs/state.md`): consume → route →
//! apply in memory → score → write behind → acknowledge.
//!
//! Guarantee: each member has one writer, the owner of its partition (partition p of every input
//! topic is assigned to one worker by the `range` assignor; a message on another partition is
//! forwarded to its member's partition). A message's offset is stored only after Redis
//! acknowledged the writes of everything it caused (a forwarded message, or a candidate update,
//! once the broker acknowledged what it sent on). A worker that lost a partition without knowing
//! (a zombie) is refused by the generation fence on every member a later owner has touched, and
//! drops that partition. Limits: one window and one round of fan-outs are in flight at a time;
//! `[catchup]` splitting does not apply.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::{chrono_now_ms, take_fetched, Worker, LIVE_GROWTH};
use crate::coalesce::{MsgRef, Window};
use crate::consume::RebalanceEvent;
use crate::decode::{decode, Entity, Event, FeatureUpdate, TopicKind};
use crate::internal_events::EventHandled;
use crate::offsets::{OffsetTracker, Received};
use crate::owned::cache::Cache;
use crate::owned::route::{partition_of, RescoreRequest, FORWARDED_FROM};
use crate::store::TxConn;

mod fanout;
mod flush;
mod intake;
mod policy;

/// A partition a later owner has taken that is still assigned here this long after: the group
/// did not tell this worker (or Redis lost the generation counter); the worker exits so that it
/// rejoins afresh, rather than hold the partition's messages unacknowledged for ever.
const FENCED_FOR: Duration = Duration::from_secs(60);

/// Most messages taken from the consumer in one go: each intake costs a few Redis round trips
/// (loads, the reverse index, fan-out scans) whatever its size.
const MAX_INTAKE: usize = 2048;

use flush::Writing;

/// What a subscribed topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    Events(TopicKind),
    Requests,
}

/// A decay tick walking its partition's schedule in two passes. The walk reads chunk after chunk
/// in due order (each from the last due time read) while the writes of the earlier ones are in
/// flight, skipping pairs this tick already rescored. The sweep, once the walk's writes have
/// landed, reads from the start again, each chunk written before the next is read: it picks up
/// whatever the walk passed over (entries sharing the due time a chunk ended on), and usually
/// finds nothing.
#[derive(Debug)]
struct TickJob {
    partition: i32,
    as_of: i64,
    msg: MsgRef,
    /// The walk's position: the due time of the last entry read (None: from the start).
    after: Option<i64>,
    /// The walk has ended; the sweep runs.
    sweep: bool,
    /// A chunk is in the current window and not yet in a write.
    queued: bool,
    /// The latest write holding one of this tick's chunks, until it lands.
    in_write: Option<u64>,
    /// The sweep's previous chunk's first entry: a chunk that starts where the last one did made
    /// no progress (its pairs could not be rescheduled), and the tick ends.
    last_first: Option<String>,
}

impl TickJob {
    fn new(partition: i32, as_of: i64, msg: MsgRef) -> Self {
        Self {
            partition,
            as_of,
            msg,
            after: None,
            sweep: false,
            queued: false,
            in_write: None,
            last_first: None,
        }
    }
}

/// Loop state of the owned worker.
struct Owned {
    tracker: OffsetTracker,
    cache: Cache,
    window: Window,
    /// Members changed since the last write (their rows, if any, are in the window).
    touched: HashSet<String>,
    /// Schedule entries to drop with the next write: (partition, entry).
    unscheduled: Vec<(i32, String)>,
    /// Dormant members, dropped from the schedule with the next write unless the same write
    /// schedules them again: (partition, member).
    retired: Vec<(i32, String)>,
    /// This worker's generation of each member partition it owns (taken on first use).
    gens: HashMap<i32, u64>,
    /// Partitions a later owner took (a refused write or load), and since when: skipped until
    /// assigned again (if one stays assigned here, the worker exits: see `FENCED_FOR`).
    fenced: HashMap<i32, std::time::Instant>,
    /// Fenced transactions of intake (reverse index) and of the writer, each on a connection of
    /// its own (single Redis).
    tx: TxConn,
    writer_tx: TxConn,
    ticks: VecDeque<TickJob>,
    /// Candidate fan-outs waiting for their interval.
    fanouts: fanout::Fanouts,
    /// Feature-updates partitions whose recorded fan-out intents were taken in.
    resumed: HashSet<i32>,
    /// Partition count of every input topic.
    partitions: i32,
    kinds: HashMap<String, Input>,
    /// Sequence number of the last write started.
    seq: u64,
    fatal: Option<anyhow::Error>,
}

impl Owned {
    /// What the policy decides on.
    fn view(
        &self,
        flight: &Option<Writing>,
        fanning: &Option<fanout::Fanning>,
        input_idle: bool,
        last_write_ended: Option<Instant>,
    ) -> policy::View {
        policy::View {
            window_rows: self.window.size(),
            window_has_work: !(self.window.is_empty()
                && self.touched.is_empty()
                && self.unscheduled.is_empty()
                && self.retired.is_empty()),
            window_started: self.window.started,
            writing: flight.as_ref().map(Writing::rows),
            last_write_ended,
            input_idle,
            fanning: fanning.is_some(),
            next_fanout: self.fanouts.next_wake(),
            tick_ready: self
                .ticks
                .iter()
                .any(|j| !(j.queued || j.sweep && j.in_write.is_some())),
            tick_queued: self.ticks.iter().any(|j| j.queued),
        }
    }

    /// Forgets a partition taken by a later owner: its members, its window work (its messages
    /// are left to the new owner) and its ticks.
    fn fence(&mut self, partition: i32, newer: Option<u64>) {
        let dropped = self.cache.drop_partition(partition);
        tracing::warn!(
            partition,
            newer_generation = newer,
            generation = self.gens.get(&partition),
            members = dropped,
            "a later owner has taken this partition: dropped it until it is assigned again"
        );
        self.gens.remove(&partition);
        self.fenced
            .entry(partition)
            .or_insert_with(std::time::Instant::now);
        let n = self.partitions;
        self.window
            .members
            .retain(|m, _| partition_of(m, n) != partition);
        self.window.messages.retain(|m| m.tp.1 != partition);
        self.touched.retain(|m| partition_of(m, n) != partition);
        self.unscheduled.retain(|(p, _)| *p != partition);
        self.retired.retain(|(p, _)| *p != partition);
        self.ticks.retain(|t| t.partition != partition);
        self.fanouts.drop_partitions(&HashSet::from([partition]));
        self.resumed.remove(&partition);
    }
}

impl Worker {
    /// Partition count of the input topics and the requests topic; an error when one is missing
    /// or their counts differ (a member's partition must be the same on every topic).
    async fn owned_partitions(&self, shutdown: &CancellationToken) -> anyhow::Result<Option<i32>> {
        let t = &self.settings.topics;
        let topics = [
            t.new_candidates.clone(),
            t.feature_updates.clone(),
            t.decay_ticks.clone(),
            t.rescore_requests.clone(),
        ];
        let mut delay = Duration::from_millis(200);
        loop {
            let consumer = self.consumer.clone();
            let names = topics.clone();
            let counts = tokio::task::spawn_blocking(move || {
                names
                    .iter()
                    .map(|n| {
                        let md = consumer.fetch_metadata(Some(n), Duration::from_secs(10))?;
                        Ok(md
                            .topics()
                            .first()
                            .filter(|t| t.error().is_none())
                            .map_or(0, |t| t.partitions().len() as i32))
                    })
                    .collect::<Result<Vec<i32>, rdkafka::error::KafkaError>>()
            })
            .await?;
            match counts {
                Ok(counts) => {
                    if let Some((name, _)) = topics.iter().zip(&counts).find(|(_, c)| **c == 0) {
                        anyhow::bail!("state.mode = \"owned\": topic `{name}` does not exist (create it with `rescorer topics apply`)");
                    }
                    if counts.iter().any(|c| *c != counts[0]) {
                        let list: Vec<String> = topics
                            .iter()
                            .zip(&counts)
                            .map(|(n, c)| format!("{n}={c}"))
                            .collect();
                        anyhow::bail!("state.mode = \"owned\" needs the same partition count on the input topics and the requests topic: {}", list.join(", "));
                    }
                    return Ok(Some(counts[0]));
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "reading topic metadata failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// The owned-state loop: decide (what is due: a full or timed-out window, a tick chunk, a
    /// rebalance), then act.
    pub(super) async fn run_owned(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Some(partitions) = self.owned_partitions(&shutdown).await? else {
            return Ok(());
        };
        let mut st = self.subscribe_owned(partitions)?;
        let hard_stop = super::retry::hard_stop_after(&shutdown);
        let policy = policy::Policy {
            max_pairs: self.settings.batch.max_pairs,
            max_wait: Duration::from_millis(self.settings.batch.max_wait_ms),
            live_growth: LIVE_GROWTH,
        };
        let mut lag_timer = tokio::time::interval(Duration::from_secs(1));
        lag_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let consumer = self.consumer.clone();
        let mut flight: Option<Writing> = None;
        let mut fanning: Option<fanout::Fanning> = None;
        let (mut input_idle, mut last_write_ended) = (false, None);
        while st.fatal.is_none() {
            // Decide, then act; an act that changed the state decides again at once.
            let view = st.view(&flight, &fanning, input_idle, last_write_ended);
            let plan = policy.decide(&view, Instant::now());
            if let Some(waiting) = plan.fan_out {
                st.fanouts.set_load(waiting, policy.max_pairs);
                fanning = self.start_fanouts(&mut st, &hard_stop);
            }
            if plan.tick && self.step_tick(&mut st, &hard_stop).await {
                continue;
            }
            if plan.write {
                flight = self.start_write(&mut st, &hard_stop).await;
                if flight.is_some() {
                    continue;
                }
            }
            // Then wait for what can change the plan.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                result = async { match flight.as_mut() {
                    Some(w) => w.wait().await,
                    None => std::future::pending().await,
                } }, if flight.is_some() => {
                    if let Some(w) = flight.take() {
                        self.finish_write(&mut st, w, result);
                    }
                    last_write_ended = Some(Instant::now());
                }
                result = async { match fanning.as_mut() {
                    Some(f) => f.wait().await,
                    None => std::future::pending().await,
                } }, if fanning.is_some() => {
                    if let Some(f) = fanning.take() {
                        self.finish_fanouts(&mut st, f, result);
                    }
                }
                ev = self.rebalances.recv() => {
                    let Some(ev) = ev else { break };
                    // The fan-out and the window in flight end (with this owner's generation)
                    // first.
                    self.finish_fanning(&mut st, &mut fanning).await;
                    self.flush_owned(&mut st, &mut flight, &hard_stop).await;
                    self.rebalanced_owned(&mut st, ev);
                    self.resume_owned_fanouts(&mut st, &hard_stop).await;
                }
                _ = sleep_until(plan.wake_at.unwrap_or_else(Instant::now)), if plan.wake_at.is_some() => {}
                msg = consumer.recv(), if plan.take_input => match msg {
                    Ok(first) => {
                        // No more messages than a window may grow to (a message is a row or
                        // more), so an intake never outgrows the window it fills.
                        let room = (policy.max_pairs * LIVE_GROWTH).saturating_sub(st.window.size());
                        let take = MAX_INTAKE.min(room).max(1);
                        let batch = take_fetched(&consumer, first, take);
                        input_idle = batch.len() < take;
                        self.health.set_pending(true, chrono_now_ms());
                        self.intake_owned(&mut st, &batch, &hard_stop).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "consumer error; librdkafka retries");
                        sleep(Duration::from_millis(200)).await;
                    }
                },
                _ = lag_timer.tick() => {
                    self.resume_owned_fanouts(&mut st, &hard_stop).await;
                    self.every_second(&mut st, flight.is_some());
                }
            }
        }
        self.leave_owned(st, flight, fanning, &hard_stop).await
    }

    /// The loop ended: on a fatal error, what Redis acknowledged is committed and the error
    /// returned (the rest is replayed); on a stop, the fan-out and the write in flight finish,
    /// the window is written, and the worker commits and leaves the group.
    async fn leave_owned(
        &self,
        mut st: Owned,
        mut flight: Option<Writing>,
        mut fanning: Option<fanout::Fanning>,
        hard_stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        if let Some(fatal) = st.fatal.take() {
            if let Some(f) = fanning.take() {
                f.abort();
            }
            // Only what Redis acknowledged was stored; a write in flight is left to finish.
            if let Some(mut w) = flight.take() {
                let _ = w.wait().await;
            }
            if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::warn!(error = %e, "commit before the fatal exit failed");
            }
            return Err(fatal);
        }
        tracing::info!("shutting down: writing the current window, then committing");
        self.finish_fanning(&mut st, &mut fanning).await;
        self.flush_owned(&mut st, &mut flight, hard_stop).await;
        self.commit_and_leave();
        Ok(())
    }

    /// Once a second: lag, readiness and gauges, and the fence's exit (a partition a later owner
    /// took that is still assigned here after [`FENCED_FOR`]).
    fn every_second(&self, st: &mut Owned, writing: bool) {
        let lag = self.update_lag(&st.tracker);
        let pending = lag > 0 || !st.window.is_empty() || !st.ticks.is_empty() || writing;
        self.health.set_pending(pending, chrono_now_ms());
        self.metrics
            .jobs_in_progress
            .with_label_values(&["live"])
            .set(st.ticks.len() as i64);
        let (assigned, _) = self.shared.snapshot();
        let stuck = st.fenced.iter().find(|(p, since)| {
            since.elapsed() > FENCED_FOR && assigned.iter().any(|tp| tp.1 == **p)
        });
        if let Some((p, _)) = stuck {
            st.fatal.get_or_insert(anyhow::anyhow!(
                "partition {p} was taken by a later owner {} s ago but is still assigned to this worker: exiting to rejoin the group",
                FENCED_FOR.as_secs()
            ));
        }
    }

    /// Subscribes to the input topics and the requests topic; the loop's state, empty.
    fn subscribe_owned(&self, partitions: i32) -> anyhow::Result<Owned> {
        let t = &self.settings.topics;
        let kinds: HashMap<String, Input> = [
            (
                t.feature_updates.clone(),
                Input::Events(TopicKind::FeatureUpdates),
            ),
            (
                t.new_candidates.clone(),
                Input::Events(TopicKind::NewCandidates),
            ),
            (t.decay_ticks.clone(), Input::Events(TopicKind::DecayTicks)),
            (t.rescore_requests.clone(), Input::Requests),
        ]
        .into();
        let topics: Vec<&str> = kinds.keys().map(String::as_str).collect();
        self.consumer.subscribe(&topics)?;
        tracing::info!(topics = ?topics, partitions, group = %self.settings.kafka.group_id, "subscribed (owned state)");
        Ok(Owned {
            tracker: OffsetTracker::new(),
            cache: Cache::new(
                usize::try_from(self.settings.state.cache_bytes).unwrap_or(usize::MAX),
            ),
            window: Window::new(true),
            touched: HashSet::new(),
            unscheduled: Vec::new(),
            retired: Vec::new(),
            gens: HashMap::new(),
            fenced: HashMap::new(),
            tx: self.store.tx_conn(),
            writer_tx: self.store.tx_conn(),
            ticks: VecDeque::new(),
            fanouts: fanout::Fanouts::new(
                Duration::from_millis(self.settings.batch.fanout_min_interval_ms),
                self.settings.batch.fanout_interval_members,
            ),
            resumed: HashSet::new(),
            partitions,
            kinds,
            seq: 0,
            fatal: None,
        })
    }

    fn rebalanced_owned(&self, st: &mut Owned, ev: RebalanceEvent) {
        match &ev {
            RebalanceEvent::Revoked(tps) => {
                let mut parts: HashSet<i32> = HashSet::new();
                for tp in tps {
                    parts.insert(tp.1);
                    self.forget_partition(&mut st.tracker, tp);
                }
                st.fanouts.drop_partitions(&parts);
                for p in parts {
                    st.resumed.remove(&p);
                    let members = st.cache.drop_partition(p);
                    st.gens.remove(&p);
                    st.fenced.remove(&p);
                    st.ticks.retain(|t| t.partition != p);
                    tracing::info!(
                        partition = p,
                        members,
                        "partition revoked: its members dropped"
                    );
                }
            }
            RebalanceEvent::Assigned(tps) => {
                for tp in tps {
                    st.fenced.remove(&tp.1);
                }
            }
        }
        self.note_assignment();
    }

    /// This worker's generation of `partition`, taken from Redis on first use after assignment.
    async fn generation(
        &self,
        st: &mut Owned,
        partition: i32,
        hard_stop: &CancellationToken,
    ) -> Option<u64> {
        if let Some(g) = st.gens.get(&partition) {
            return Some(*g);
        }
        let g = self
            .attempt(&mut st.fatal, "take generation", hard_stop, || {
                self.store.take_generation(partition)
            })
            .await?;
        tracing::info!(partition, generation = g, "owning partition");
        st.gens.insert(partition, g);
        Some(g)
    }
}

/// Produces records until the broker acknowledges each: Err(None) when the hard stop fires first,
/// Err(Some) when the broker refuses for good (the worker exits).
async fn produce_acked(
    producer: &FutureProducer,
    records: Vec<OutRecord>,
    hard_stop: &CancellationToken,
) -> Result<(), Option<anyhow::Error>> {
    let sends = records.into_iter().map(|r| async move {
        let mut delay = Duration::from_millis(100);
        loop {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &r.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: v.as_deref(),
                });
            }
            let mut rec = FutureRecord::to(&r.topic)
                .partition(r.partition)
                .headers(headers);
            if let Some(k) = &r.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(v) = &r.value {
                rec = rec.payload(v.as_slice());
            }
            if let Some(ts) = r.timestamp_ms {
                rec = rec.timestamp(ts);
            }
            match producer.send(rec, Duration::from_secs(30)).await {
                Ok(_) => return Ok(()),
                Err((e, _)) if crate::dlq::permanent(&e) => {
                    return Err(Some(anyhow::anyhow!(
                        "producing to {} partition {} can never succeed: {e}",
                        r.topic,
                        r.partition
                    )))
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, topic = %r.topic, "produce failed; retrying");
                    tokio::select! {
                        _ = hard_stop.cancelled() => return Err(None),
                        _ = sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
    for r in futures::future::join_all(sends).await {
        r?;
    }
    Ok(())
}

/// A record this worker sends on: a forwarded message or a rescore request.
struct OutRecord {
    topic: String,
    partition: i32,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    timestamp_ms: Option<i64>,
}

impl OutRecord {
    /// `msg`, unchanged, to `partition` of its topic, marked as forwarded.
    fn forward(msg: &BorrowedMessage<'_>, partition: i32) -> Self {
        let mut headers: Vec<(String, Option<Vec<u8>>)> = msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| (x.key.to_owned(), x.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        let from = format!("{}/{}/{}", msg.topic(), msg.partition(), msg.offset());
        headers.push((FORWARDED_FROM.to_owned(), Some(from.into_bytes())));
        Self {
            topic: msg.topic().to_owned(),
            partition,
            key: msg.key().map(<[u8]>::to_vec),
            value: msg.payload().map(<[u8]>::to_vec),
            headers,
            timestamp_ms: msg.timestamp().to_millis(),
        }
    }
}

/// The member an event belongs to (None: a candidate update or a tick).
fn member_of(ev: &Event) -> Option<&str> {
    match ev {
        Event::Features(FeatureUpdate {
            entity: Entity::Member,
            id,
            ..
        }) => Some(id),
        Event::Upsert(u) => Some(&u.member_id),
        Event::Remove(r) => Some(&r.member_id),
        _ => None,
    }
}

/// Freshness and outcome label of a message on a topic.
fn label(input: Input) -> &'static str {
    match input {
        Input::Events(k) => k.label(),
        // A request's timestamp is its candidate update's: its freshness is that update's.
        Input::Requests => TopicKind::FeatureUpdates.label(),
    }
}

/// Whether `received` says the message is new to this worker.
fn fresh(received: Received) -> bool {
    !matches!(received, Received::Duplicate)
}

/// The parsed request, or why it is invalid.
fn parse_request(value: Option<&[u8]>) -> Result<RescoreRequest, String> {
    let bytes = value.ok_or("request has no value")?;
    serde_json::from_slice(bytes).map_err(|e| format!("invalid rescore request: {e}"))
}

fn handled(topic: &'static str, outcome: &'static str, m: &MsgRef) -> EventHandled<'static> {
    EventHandled {
        topic,
        outcome,
        partition: m.tp.1,
        offset: m.offset,
        reason: None,
    }
}

fn is_forwarded(msg: &BorrowedMessage<'_>) -> bool {
    msg.headers()
        .is_some_and(|h| h.iter().any(|x| x.key == FORWARDED_FROM))
}

fn decode_input(input: Input, value: Option<&[u8]>) -> Result<Decoded, String> {
    match input {
        Input::Requests => parse_request(value).map(Decoded::Request),
        Input::Events(k) => decode(k, value).map(Decoded::Event).map_err(|e| e.0),
    }
}

enum Decoded {
    Event(Event),
    Request(RescoreRequest),
}
