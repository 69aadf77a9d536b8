//! Consume stage: the Kafka consumer group over the three input topics.
//!
//! Guarantee: offsets are never stored automatically (`enable.auto.offset.store=false`); the
//! worker stores a partition's contiguous watermark (see [`crate::offsets`]) and librdkafka's
//! auto-commit commits what was stored, so nothing is committed past the last acknowledged write.
//! High watermarks come from librdkafka's statistics (fetch responses), which stay right on
//! brokers whose ListOffsets answers differ. Limits: librdkafka prefetches up to
//! `queued.max.messages.kbytes` per partition; when the worker stops polling (backpressure), the
//! prefetch queue fills and fetching stops, so memory stays bounded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use tokio::sync::mpsc;

use crate::config::Settings;
use crate::offsets::Tp;

/// A rebalance, as the worker loop sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum RebalanceEvent {
    Assigned(Vec<Tp>),
    Revoked(Vec<Tp>),
}

/// Shared between librdkafka's callbacks and the worker.
#[derive(Default)]
pub struct Shared {
    /// High watermark per partition, from the latest statistics.
    pub high_watermarks: Mutex<HashMap<Tp, i64>>,
    /// Where the group's reader starts in each partition (the committed offset, or the log start
    /// when nothing is committed), from the latest statistics: the lag of a partition it has
    /// delivered nothing from yet.
    pub starts: Mutex<HashMap<Tp, i64>>,
    /// Partitions currently assigned to this worker.
    pub assigned: Mutex<Vec<Tp>>,
}

impl Shared {
    /// The assigned partitions and their high watermarks, copied out of the locks.
    pub fn snapshot(&self) -> (Vec<Tp>, HashMap<Tp, i64>) {
        let assigned = self.assigned.lock().map(|a| a.clone()).unwrap_or_default();
        let hw = self
            .high_watermarks
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default();
        (assigned, hw)
    }

    pub fn start(&self, tp: &Tp) -> Option<i64> {
        self.starts.lock().ok()?.get(tp).copied()
    }
}

pub struct Ctx {
    pub shared: Arc<Shared>,
    rebalances: mpsc::Sender<RebalanceEvent>,
}

impl ClientContext for Ctx {
    fn stats(&self, stats: Statistics) {
        let mut hw = self
            .shared
            .high_watermarks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut starts = self.shared.starts.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, t) in stats.topics {
            for (p, part) in t.partitions {
                if p < 0 {
                    continue;
                }
                if part.hi_offset >= 0 {
                    hw.insert((topic.clone(), p), part.hi_offset);
                }
                let start = if part.committed_offset >= 0 {
                    part.committed_offset
                } else {
                    part.lo_offset
                };
                if start >= 0 {
                    starts.insert((topic.clone(), p), start);
                }
            }
        }
    }
}

fn tps(list: &rdkafka::TopicPartitionList) -> Vec<Tp> {
    list.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ConsumerContext for Ctx {
    /// On revocation, commit what is already acknowledged before the partitions move, so the new
    /// owner replays as little as possible. Messages not yet written are not committed; the new
    /// owner replays them (every write is idempotent under the event-time guards).
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(_) = rebalance {
            match consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
                Ok(())
                | Err(rdkafka::error::KafkaError::ConsumerCommit(
                    rdkafka::types::RDKafkaErrorCode::NoOffset,
                )) => {}
                Err(e) => tracing::warn!(error = %e, "commit before revocation failed"),
            }
        }
    }

    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut assigned = self
            .shared
            .assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let ev = match rebalance {
            Rebalance::Assign(list) => {
                let new = tps(list);
                for tp in &new {
                    if !assigned.contains(tp) {
                        assigned.push(tp.clone());
                    }
                }
                RebalanceEvent::Assigned(new)
            }
            Rebalance::Revoke(list) => {
                let gone = tps(list);
                assigned.retain(|tp| !gone.contains(tp));
                RebalanceEvent::Revoked(gone)
            }
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                return;
            }
        };
        tracing::info!(event = ?ev, "rebalance");
        // Bounded: rebalances are rare; if the worker is far behind, it re-reads `assigned`.
        let _ = self.rebalances.try_send(ev);
    }
}

/// Client config shared by the consumer and producers: bootstrap plus the pass-through options.
pub fn base_config(settings: &Settings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.kafka.bootstrap_servers);
    for (k, v) in &settings.kafka.options {
        c.set(k, v);
    }
    c
}

/// How long a fetch may wait for data (librdkafka's default is 500 ms). Kafka answers a fetch as
/// soon as data arrives, so there this only bounds idle fetches (100 a second per broker); some
/// Kafka-protocol brokers (tansu among them) hold every fetch for the full wait and answer with
/// what was there when it started, which puts 1 to 2 × this wait into every event's freshness.
pub const FETCH_WAIT_MAX_MS: &str = "10";

/// Settings both readers share, then `own`, then the operator's options (which win).
fn reader_config(
    settings: &Settings,
    group: &str,
    own: impl FnOnce(&mut ClientConfig),
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.kafka.bootstrap_servers)
        .set("group.id", group)
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS)
        .set("enable.partition.eof", "false");
    own(&mut c);
    for (k, v) in &settings.kafka.options {
        c.set(k, v);
    }
    c
}

/// Creates the consumer (not yet subscribed) and the receiver of its rebalance events.
pub fn consumer(
    settings: &Settings,
) -> KafkaResult<(
    Arc<StreamConsumer<Ctx>>,
    Arc<Shared>,
    mpsc::Receiver<RebalanceEvent>,
)> {
    let c = reader_config(settings, &settings.kafka.group_id, |c| {
        c.set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "500")
            .set("queued.max.messages.kbytes", "16384");
        // Owned state: partition p of every input topic goes to one worker (range assignment
        // over topics with equal partition counts), so a member's events have one owner.
        if settings.state.mode == crate::config::StateMode::Owned {
            c.set("partition.assignment.strategy", "range");
        }
    });
    let shared = Arc::new(Shared::default());
    let (tx, rx) = mpsc::channel(64);
    let consumer: StreamConsumer<Ctx> = c.create_with_context(Ctx {
        shared: shared.clone(),
        rebalances: tx,
    })?;
    Ok((Arc::new(consumer), shared, rx))
}

/// The head reader of split partitions (see [`crate::config::CatchupSettings`]): partitions are
/// assigned to it by hand at the log end; it joins no group and commits nothing (the group's
/// consumer stores every offset).
pub fn catchup_consumer(settings: &Settings) -> KafkaResult<StreamConsumer> {
    let group = format!("{}.catchup", settings.kafka.group_id);
    reader_config(settings, &group, |c| {
        c.set("enable.auto.commit", "false")
            .set("queued.max.messages.kbytes", "8192");
    })
    .create()
}
