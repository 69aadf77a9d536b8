//! Shared helpers for integration tests that start real parts.
#![allow(dead_code)]

pub mod harness;
pub mod process;
pub mod scenario;
pub mod services;

use std::path::PathBuf;

use rescorer::config::ModelSettings;
use rescorer::metrics::Metrics;
use rescorer::score::Scorer;

/// The repository root (tests run with the package root as their directory, but be explicit).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The committed model's spec.
pub fn model_spec() -> PathBuf {
    root().join("models/catchup-ranker.json")
}

/// Settings that load the committed model on CPU.
pub fn model_settings() -> ModelSettings {
    ModelSettings {
        spec: model_spec(),
        ..ModelSettings::default()
    }
}

/// The real model on real ONNX Runtime.
pub fn scorer() -> Scorer {
    Scorer::load(&model_settings(), Metrics::new()).expect("the committed model loads")
}

/// The model's score for one pair's final state as of `as_of`, as the worker must store it.
pub fn expected_score(
    scorer: &Scorer,
    member: &[(&str, f64)],
    candidate: &[(&str, f64)],
    pair: &[(&str, f64)],
    reason: &str,
    moment_ts: i64,
    as_of: i64,
) -> f64 {
    let map = |kv: &[(&str, f64)]| -> rescorer::model::FeatureMap {
        kv.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    };
    let (m, c, p) = (map(member), map(candidate), map(pair));
    let input = rescorer::model::PairInput {
        member: &m,
        candidate: &c,
        pair: &p,
        reason,
        moment_ts_ms: moment_ts,
        as_of_ms: as_of,
    };
    f64::from(scorer.engine().score_pairs(&[input]).expect("scores")[0])
}
