//! Every Prometheus metric the worker exports, registered in one registry that is passed in.
//!
//! Names are snake_case with a unit suffix; labels are bounded (topic, partition, outcome,
//! device), never member or candidate ids.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntGaugeVec, Opts, Registry, TextEncoder,
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
}

/// Latency buckets from 100 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
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
        for m in [
            Box::new(model_info.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(model_seconds.clone()),
            Box::new(batch_pairs.clone()),
            Box::new(pairs_scored_total.clone()),
        ] {
            registry
                .register(m)
                .expect("each metric is registered once in a fresh registry");
        }
        Self {
            registry,
            model_info,
            model_seconds,
            batch_pairs,
            pairs_scored_total,
        }
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
