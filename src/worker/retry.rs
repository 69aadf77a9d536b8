//! Redis operations retried with backoff: while Redis is unreachable the worker is not ready and
//! intake waits, so nothing is dropped and memory stays bounded. Only what can succeed is retried:
//! an outage for as long as it lasts, a failover (READONLY) for `redis.give_up_after_secs`. Any
//! other error is permanent: the operation stops with [`Stop::Fatal`] at once and the worker exits
//! to be restarted.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use super::Health;
use crate::internal_events::RedisUnavailable;
use crate::metrics::Metrics;
use crate::store::StoreError;

/// Why a retried operation stopped without succeeding.
#[derive(Debug)]
pub(super) enum Stop {
    /// The hard stop fired (shutdown during an outage): nothing acknowledged, replayed later.
    Cancelled,
    /// A permanent error, or a failover that outlasted `redis.give_up_after_secs`: the worker
    /// exits.
    Fatal(anyhow::Error),
}

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

/// Tells retried failures from fatal ones, and how long a failover has lasted.
pub struct GiveUp {
    after: Duration,
    since: Option<Instant>,
}

impl GiveUp {
    pub fn new(after: Duration) -> Self {
        Self { after, since: None }
    }

    /// Notes a failure: None to retry it (an outage; a failover not yet `after` old, an outage
    /// in between starting the count again), Some(fatal) for a permanent error or a failover that
    /// lasted `after`.
    pub fn failed(&mut self, what: &str, e: &StoreError) -> Option<anyhow::Error> {
        if e.is_outage() {
            self.since = None;
            return None;
        }
        if !e.is_failover() {
            return Some(anyhow::anyhow!(
                "redis {what} failed with an error no retry can fix: {e}"
            ));
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        (since.elapsed() >= self.after).then(|| {
            anyhow::anyhow!(
                "redis {what} kept answering READONLY for {} s (redis.give_up_after_secs): {e}",
                self.after.as_secs()
            )
        })
    }
}

/// Retries `op` with exponential backoff until it succeeds, `cancel` fires, a permanent error
/// comes back, or a failover outlasts `give_up`.
pub(super) async fn retry<T, F, Fut>(
    what: &str,
    metrics: &Metrics,
    health: &Health,
    give_up: Duration,
    cancel: &CancellationToken,
    mut op: F,
) -> Result<T, Stop>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 0;
    let mut give_up = GiveUp::new(give_up);
    loop {
        match op().await {
            Ok(v) => {
                if !health.redis_ok.swap(true, Ordering::Relaxed) && attempt > 0 {
                    tracing::info!(operation = what, "redis reachable again");
                }
                return Ok(v);
            }
            Err(e) => {
                attempt += 1;
                if let Some(fatal) = give_up.failed(what, &e) {
                    tracing::error!(operation = what, error = %fatal, "giving up: exiting so the worker is restarted");
                    return Err(Stop::Fatal(fatal));
                }
                if !backoff(what, &e.to_string(), attempt, metrics, health, cancel).await {
                    return Err(Stop::Cancelled);
                }
            }
        }
    }
}

/// A token cancelled 10 s after `shutdown`: where Redis retries stop, so a drain during an
/// outage ends (its messages left uncommitted, to be replayed) instead of hanging.
pub(super) fn hard_stop_after(shutdown: &CancellationToken) -> CancellationToken {
    let hard_stop = CancellationToken::new();
    let (shutdown, stop) = (shutdown.clone(), hard_stop.clone());
    tokio::spawn(async move {
        shutdown.cancelled().await;
        sleep(Duration::from_secs(10)).await;
        stop.cancel();
    });
    hard_stop
}

impl super::Worker {
    /// [`retry`] with this worker's metrics, health and give-up time; a stop is noted in `fatal`
    /// (a permanent error) or not (the hard stop), and either way gives None: the caller returns
    /// without acknowledging anything.
    pub(super) async fn attempt<T, F, Fut>(
        &self,
        fatal: &mut Option<anyhow::Error>,
        what: &str,
        hard_stop: &CancellationToken,
        op: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        match retry(
            what,
            &self.metrics,
            &self.health,
            self.give_up_after(),
            hard_stop,
            op,
        )
        .await
        {
            Ok(v) => Some(v),
            Err(Stop::Cancelled) => None,
            Err(Stop::Fatal(e)) => {
                fatal.get_or_insert(e);
                None
            }
        }
    }
}
