//! Every Prometheus metric the worker exports, registered in one registry that is passed in.
//!
//! Names are snake_case with a unit suffix; labels are bounded (topic, partition, outcome,
//! device), never member or candidate ids.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Metric handles. Cloning is cheap: each handle is an `Arc` inside.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// 1 for the loaded model's `{model, version, device}`.
    pub model_info: IntGaugeVec,
    /// Wall time of one model run (one batch).
    pub model_seconds: Histogram,
    /// Pairs per model run.
    pub batch_pairs: Histogram,
    /// Pairs scored by the model.
    pub pairs_scored_total: IntCounter,
    /// Input events by topic and outcome (applied, stale, dead_lettered).
    pub events_total: IntCounterVec,
    /// Kafka message timestamp → Redis acknowledgement of the score it caused, by topic and lane
    /// (`live`: fresh events; `backlog`: a split partition's backlog, see `[catchup]`, and any
    /// message already `catchup.lag_ms` old when it was read, when that is not 0).
    pub event_to_score_seconds: HistogramVec,
    /// One batch's guarded score writes and schedule updates.
    pub redis_write_seconds: Histogram,
    /// Scores not written because a score as of a later time was already stored.
    pub scores_superseded_total: IntCounter,
    /// Redis operations that failed and are being retried.
    pub redis_errors_total: IntCounter,
    /// Messages between the partition's high watermark and this worker's position.
    pub consumer_lag: IntGaugeVec,
    /// How far behind in time this worker is on the partition (0 when caught up).
    pub consumer_lag_seconds: prometheus::GaugeVec,
    /// Partitions assigned to this worker.
    pub assigned_partitions: IntGauge,
    /// 1 when ready (model loaded, Redis reachable, partitions assigned).
    pub ready: IntGauge,
    /// Split partitions: their backlog drains while a head reader takes their fresh events.
    pub catchup_partitions: IntGauge,
    /// Fan-outs and decay ticks in progress, by lane (at `batch.max_jobs` intake waits).
    pub jobs_in_progress: IntGaugeVec,
    /// Pairs not scored this time, by reason (`features_refused`, `non_finite_score`): the rest
    /// of the window is written, the pair is tried again a decay interval later.
    pub pairs_skipped_total: IntCounterVec,
    /// Dead letters whose original value or headers were cut to fit the broker's size limit.
    pub dlq_truncated_total: IntCounter,
    /// 1 while `/healthz` fails, by reason (`stalled`: input pending and no progress for
    /// `health.stall_timeout_secs`).
    pub unhealthy: IntGaugeVec,
}

/// Latency buckets from 100 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Freshness buckets from 1 ms to 5 min, fine enough around the targets (tens of ms to a few
/// seconds) that a quantile read off them is not mostly interpolation.
const FRESHNESS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

const PAIRS_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let model_info = IntGaugeVec::new(
            Opts::new(
                "rescorer_model_info",
                "The loaded ranking model (value 1): spec name, version and the device it runs on",
            ),
            &["model", "version", "device"],
        )
        .expect("static metric definition is valid");
        let model_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "rescorer_model_seconds",
                "Wall time of one model run (one batch)",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
        )
        .expect("static metric definition is valid");
        let batch_pairs = Histogram::with_opts(
            HistogramOpts::new("rescorer_batch_pairs", "Pairs scored per model run")
                .buckets(PAIRS_BUCKETS.to_vec()),
        )
        .expect("static metric definition is valid");
        let pairs_scored_total = IntCounter::new(
            "rescorer_pairs_scored_total",
            "Member-candidate pairs scored by the model",
        )
        .expect("static metric definition is valid");
        let events_total = IntCounterVec::new(
            Opts::new("rescorer_events_total", "Input events by topic and outcome"),
            &["topic", "outcome"],
        )
        .expect("static metric definition is valid");
        let event_to_score_seconds = HistogramVec::new(
            HistogramOpts::new(
                "rescorer_event_to_score_seconds",
                "From the Kafka message timestamp to the Redis acknowledgement of the score it caused",
            )
            .buckets(FRESHNESS_BUCKETS.to_vec()),
            &["topic", "lane"],
        )
        .expect("static metric definition is valid");
        let redis_write_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "rescorer_redis_write_seconds",
                "Guarded score writes and schedule updates of one batch",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
        )
        .expect("static metric definition is valid");
        let scores_superseded_total = IntCounter::new(
            "rescorer_scores_superseded_total",
            "Scores not written because one computed as of a later time was already stored",
        )
        .expect("static metric definition is valid");
        let redis_errors_total = IntCounter::new(
            "rescorer_redis_errors_total",
            "Redis operations that failed and were retried",
        )
        .expect("static metric definition is valid");
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "rescorer_consumer_lag",
                "Messages between the partition's high watermark and this worker's position",
            ),
            &["topic", "partition"],
        )
        .expect("static metric definition is valid");
        let consumer_lag_seconds = prometheus::GaugeVec::new(
            Opts::new(
                "rescorer_consumer_lag_seconds",
                "Age of the oldest message not yet fully processed on the partition (0 when caught up)",
            ),
            &["topic", "partition"],
        )
        .expect("static metric definition is valid");
        let assigned_partitions = IntGauge::new(
            "rescorer_assigned_partitions",
            "Partitions assigned to this worker",
        )
        .expect("static metric definition is valid");
        let ready = IntGauge::new(
            "rescorer_ready",
            "1 when the model is loaded, Redis is reachable and partitions are assigned",
        )
        .expect("static metric definition is valid");
        let catchup_partitions = IntGauge::new(
            "rescorer_catchup_partitions",
            "Partitions whose backlog drains while a head reader takes their fresh events",
        )
        .expect("static metric definition is valid");
        let jobs_in_progress = IntGaugeVec::new(
            Opts::new(
                "rescorer_jobs_in_progress",
                "Fan-outs and decay ticks in progress, by lane (intake waits at batch.max_jobs)",
            ),
            &["lane"],
        )
        .expect("static metric definition is valid");
        let pairs_skipped_total = IntCounterVec::new(
            Opts::new(
                "rescorer_pairs_skipped_total",
                "Pairs not scored this time (tried again a decay interval later), by reason",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let dlq_truncated_total = IntCounter::new(
            "rescorer_dlq_truncated_total",
            "Dead letters whose original value or headers were cut to fit the broker's size limit",
        )
        .expect("static metric definition is valid");
        let unhealthy = IntGaugeVec::new(
            Opts::new(
                "rescorer_unhealthy",
                "1 while /healthz fails, by reason (stalled: input pending and no progress)",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let this = Self {
            registry,
            model_info,
            model_seconds,
            batch_pairs,
            pairs_scored_total,
            events_total,
            event_to_score_seconds,
            redis_write_seconds,
            scores_superseded_total,
            redis_errors_total,
            consumer_lag,
            consumer_lag_seconds,
            assigned_partitions,
            ready,
            catchup_partitions,
            jobs_in_progress,
            pairs_skipped_total,
            dlq_truncated_total,
            unhealthy,
        };
        for c in this.collectors() {
            this.registry
                .register(c)
                .expect("each metric is registered once in a fresh registry");
        }
        this
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.model_info.clone()),
            Box::new(self.model_seconds.clone()),
            Box::new(self.batch_pairs.clone()),
            Box::new(self.pairs_scored_total.clone()),
            Box::new(self.events_total.clone()),
            Box::new(self.event_to_score_seconds.clone()),
            Box::new(self.redis_write_seconds.clone()),
            Box::new(self.scores_superseded_total.clone()),
            Box::new(self.redis_errors_total.clone()),
            Box::new(self.consumer_lag.clone()),
            Box::new(self.consumer_lag_seconds.clone()),
            Box::new(self.assigned_partitions.clone()),
            Box::new(self.ready.clone()),
            Box::new(self.catchup_partitions.clone()),
            Box::new(self.jobs_in_progress.clone()),
            Box::new(self.pairs_skipped_total.clone()),
            Box::new(self.dlq_truncated_total.clone()),
            Box::new(self.unhealthy.clone()),
        ]
    }

    /// Names of every metric family this worker exports (histograms also export `_bucket`,
    /// `_sum` and `_count` series), whether or not it has samples yet.
    pub fn names(&self) -> Vec<String> {
        self.collectors()
            .iter()
            .flat_map(|c| {
                c.desc()
                    .into_iter()
                    .map(|d| d.fq_name.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text encoder writes UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
