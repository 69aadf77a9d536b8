//! Redis operations retried with backoff: while Redis is unreachable the worker is not ready and
//! intake waits, so nothing is dropped and memory stays bounded.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use super::Health;
use crate::internal_events::RedisUnavailable;
use crate::metrics::Metrics;
use crate::store::StoreError;

/// Records a failed Redis operation and waits before the next attempt; false once `cancel` fires.
pub(super) async fn backoff(
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
pub(super) async fn retry<T, F, Fut>(
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
