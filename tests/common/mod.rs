//! Shared helpers for integration tests that start real parts.
#![allow(dead_code)]

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
