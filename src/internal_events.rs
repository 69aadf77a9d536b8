//! One struct per observable event; `emit` logs and counts together so logs and metrics agree.

use std::time::Duration;

use tracing::{info, warn};

use crate::metrics::Metrics;

/// The model was loaded and checked against its spec.
pub struct ModelLoaded<'a> {
    pub model: &'a str,
    pub version: &'a str,
    pub device: &'a str,
    pub spec_path: &'a std::path::Path,
    /// Why `device = "auto"` fell back to CPU.
    pub fallback: Option<&'a str>,
}

impl ModelLoaded<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        metrics.model_info.reset();
        metrics
            .model_info
            .with_label_values(&[self.model, self.version, self.device])
            .set(1);
        if let Some(why) = self.fallback {
            warn!(
                model = self.model,
                version = self.version,
                reason = why,
                "device auto: CUDA unavailable, running the model on CPU"
            );
        }
        info!(model = self.model, version = self.version, device = self.device,
            spec = %self.spec_path.display(), "model loaded");
    }
}

/// One model run finished.
pub struct BatchScored {
    pub pairs: usize,
    pub elapsed: Duration,
}

impl BatchScored {
    pub fn emit(&self, metrics: &Metrics) {
        metrics.model_seconds.observe(self.elapsed.as_secs_f64());
        metrics.batch_pairs.observe(self.pairs as f64);
        metrics.pairs_scored_total.inc_by(self.pairs as u64);
        tracing::trace!(
            pairs = self.pairs,
            elapsed_us = self.elapsed.as_micros() as u64,
            "batch scored"
        );
    }
}
