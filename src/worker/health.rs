//! What operators see of the loop's health: `/readyz` and `/healthz` flags, the stall watch that
//! fails `/healthz` when input waits with no progress, and consumer lag per partition.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{chrono_now_ms, Run, Worker};
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;

/// What `/readyz` and `/healthz` report.
#[derive(Debug, Default)]
pub struct Health {
    pub model_loaded: AtomicBool,
    pub redis_ok: AtomicBool,
    pub assigned: AtomicBool,
    /// Wall clock (ms) of the last progress: a message finished (scored, dead-lettered, stale) or
    /// a window written.
    pub last_progress_ms: AtomicI64,
    /// Wall clock (ms) since input has been pending (lag, an open window, a job); 0: none is.
    pub pending_since_ms: AtomicI64,
    /// `http.stall_timeout_secs` in ms; 0 turns the stall check off.
    pub stall_timeout_ms: AtomicI64,
}

impl Health {
    /// How long (ms) input has waited with no progress, when that is past the stall timeout:
    /// the worker is stuck and `/healthz` fails so that the orchestrator restarts it.
    pub fn stalled_ms(&self, now_ms: i64) -> Option<i64> {
        let timeout = self.stall_timeout_ms.load(Ordering::Relaxed);
        let since = self.pending_since_ms.load(Ordering::Relaxed);
        if timeout <= 0 || since == 0 {
            return None;
        }
        let idle = now_ms - since.max(self.last_progress_ms.load(Ordering::Relaxed));
        (idle > timeout).then_some(idle)
    }

    /// Notes whether input is pending now (called once a second by the loop).
    pub fn set_pending(&self, pending: bool, now_ms: i64) {
        if !pending {
            self.pending_since_ms.store(0, Ordering::Relaxed);
        } else if self.pending_since_ms.load(Ordering::Relaxed) == 0 {
            self.pending_since_ms.store(now_ms, Ordering::Relaxed);
        }
    }

    pub fn ready(&self) -> bool {
        self.model_loaded.load(Ordering::Relaxed)
            && self.redis_ok.load(Ordering::Relaxed)
            && self.assigned.load(Ordering::Relaxed)
    }
}

impl Worker {
    /// Input is pending when a partition lags, a window is open or being written, or a job can
    /// step (a fan-out waiting for its candidate's interval is not pending work: it may wait for
    /// minutes by design). The stall watch reads it.
    pub(super) fn check_stall(&self, run: &Run, busy: bool) {
        let pending = busy
            || !run.window.is_empty()
            || !run.backlog.is_empty()
            || run.jobs.runnable()
            || run.backlog_jobs.runnable()
            || run.backlog_hold.held() > 0;
        self.health.set_pending(pending, chrono_now_ms());
    }

    /// A partition is no longer this worker's: its unfinished messages are forgotten (replayed
    /// by the next owner) and its lag series removed.
    pub(super) fn forget_partition(&self, tracker: &mut OffsetTracker, tp: &crate::offsets::Tp) {
        tracker.revoke(tp);
        let p = tp.1.to_string();
        let _ = self.metrics.consumer_lag.remove_label_values(&[&tp.0, &p]);
        let _ = self
            .metrics
            .consumer_lag_seconds
            .remove_label_values(&[&tp.0, &p]);
    }

    /// After a rebalance: the assigned-partitions gauge and readiness.
    pub(super) fn note_assignment(&self) {
        let n = self.shared.assigned.lock().map(|a| a.len()).unwrap_or(0);
        self.metrics.assigned_partitions.set(n as i64);
        self.health.assigned.store(n > 0, Ordering::Relaxed);
        self.metrics.ready.set(i64::from(self.health.ready()));
    }

    /// Lag per assigned partition: high watermark (from fetch statistics) minus position, and the
    /// age of the oldest unfinished message when behind. Returns the total lag in messages.
    pub(super) fn update_lag(&self, tracker: &OffsetTracker) -> i64 {
        let mut total = 0;
        let (assigned, hw) = self.shared.snapshot();
        let now = chrono_now_ms();
        for tp in &assigned {
            let Some(&high) = hw.get(tp) else { continue };
            let p = tp.1.to_string();
            // A partition nothing was delivered from yet is behind from its start offset.
            let pos = if tracker.delivered(tp) {
                tracker.position(tp)
            } else {
                self.shared.start(tp)
            };
            let pos = pos.unwrap_or(high).min(high);
            let lag = (high - pos).max(0);
            total += lag;
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
        total
    }
}

/// Once a second, whether the worker is stalled (input pending, no progress for the stall
/// timeout): said once when it starts and once when it ends, with `rescorer_unhealthy`. Runs off
/// the worker loop, which may itself be what is stuck.
pub async fn watch_stall(health: Arc<Health>, metrics: Metrics, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let idle = health.stalled_ms(chrono_now_ms());
        if idle.is_some() != stalled {
            stalled = idle.is_some();
            crate::internal_events::StallChanged {
                stalled,
                idle_ms: idle.unwrap_or(0),
            }
            .emit(&metrics);
        }
    }
}
