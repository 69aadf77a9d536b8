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

/// An input event was handled; `outcome` is applied, stale or dead_lettered.
pub struct EventHandled<'a> {
    pub topic: &'static str,
    pub outcome: &'static str,
    pub partition: i32,
    pub offset: i64,
    /// Why it was dead-lettered.
    pub reason: Option<&'a str>,
}

impl EventHandled<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        metrics
            .events_total
            .with_label_values(&[self.topic, self.outcome])
            .inc();
        match self.reason {
            Some(reason) => warn!(
                topic = self.topic,
                partition = self.partition,
                offset = self.offset,
                reason,
                "invalid event dead-lettered"
            ),
            None => tracing::debug!(
                topic = self.topic,
                outcome = self.outcome,
                partition = self.partition,
                offset = self.offset,
                "event handled"
            ),
        }
    }
}

/// A batch window's scores are acknowledged by Redis.
pub struct ScoresWritten<'a> {
    pub stats: &'a crate::flush::FlushStats,
    pub messages: usize,
    /// "live" or "backlog".
    pub lane: &'static str,
}

impl ScoresWritten<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        let s = self.stats;
        if s.pairs_scored > 0 {
            metrics.redis_write_seconds.observe(s.redis_write_seconds);
        }
        metrics.scores_superseded_total.inc_by(s.superseded as u64);
        for (reason, n) in [
            ("features_refused", s.refused),
            ("non_finite_score", s.non_finite),
        ] {
            if n > 0 {
                metrics
                    .pairs_skipped_total
                    .with_label_values(&[reason])
                    .inc_by(n as u64);
                warn!(
                    lane = self.lane,
                    reason,
                    pairs = n,
                    "pairs skipped: not scored this time, tried again a decay interval later"
                );
            }
        }
        tracing::debug!(
            lane = self.lane,
            members = s.members,
            member_triggers = s.member_triggers,
            member_rows = s.member_rows,
            pairs = s.pairs_scored,
            written = s.written,
            superseded = s.superseded,
            gone = s.gone,
            messages = self.messages,
            load_ms = s.load_seconds * 1000.0,
            model_ms = s.model_seconds * 1000.0,
            write_ms = s.redis_write_seconds * 1000.0,
            "scores written"
        );
    }
}

/// A Redis operation failed and will be retried; the worker is not ready meanwhile.
pub struct RedisUnavailable<'a> {
    pub operation: &'a str,
    pub error: &'a dyn std::fmt::Display,
    pub attempt: u32,
    pub retry_in: Duration,
}

impl RedisUnavailable<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        metrics.redis_errors_total.inc();
        metrics.ready.set(0);
        warn!(operation = self.operation, error = %self.error, attempt = self.attempt,
            retry_in_ms = self.retry_in.as_millis() as u64, "redis unavailable; retrying");
    }
}

/// A partition far behind was split: the group's reader drains `from..to` while the head reader
/// takes fresh events from `to` on.
pub struct CatchupStarted<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub from: i64,
    pub to: i64,
    /// Age of the last message read; None when nothing was read from the partition yet.
    pub behind_ms: Option<i64>,
    /// How long the broker took to answer for the log end (the group's reader waits for it).
    pub log_end_ms: u64,
}

impl CatchupStarted<'_> {
    pub fn emit(&self, _metrics: &Metrics) {
        info!(
            topic = self.topic,
            partition = self.partition,
            from = self.from,
            to = self.to,
            behind_ms = ?self.behind_ms,
            log_end_ms = self.log_end_ms,
            "partition far behind: fresh events go to the head reader while the backlog drains"
        );
    }
}

/// The worker stopped making progress with input pending (past `http.stall_timeout_secs`:
/// `/healthz` fails), or made progress again.
pub struct StallChanged {
    pub stalled: bool,
    /// How long input has waited with no progress (ms), when stalled.
    pub idle_ms: i64,
}

impl StallChanged {
    pub fn emit(&self, metrics: &Metrics) {
        metrics
            .unhealthy
            .with_label_values(&["stalled"])
            .set(i64::from(self.stalled));
        if self.stalled {
            tracing::error!(
                idle_ms = self.idle_ms,
                "no progress with input pending: /healthz fails so the worker is restarted"
            );
        } else {
            info!("progress again: /healthz ok");
        }
    }
}
