//! Wiring: settings → model, Redis, Kafka, HTTP → the worker loop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;

use crate::config::{redact, Settings};
use crate::metrics::Metrics;
use crate::score::Scorer;
use crate::store::{Keys, Store};
use crate::worker::{Health, Worker};

/// Connects to Redis, retrying with backoff until it answers or `shutdown` fires. A server
/// certificate that cannot be verified is an error at once: retrying cannot fix it.
pub async fn connect_store(
    settings: &Settings,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Store>> {
    let keys = Keys::new(settings.output.key_prefix.clone(), settings.decay.shards);
    let timeout = Duration::from_millis(settings.redis.timeout_ms);
    let ca = redis_ca(settings)?;
    let mut delay = Duration::from_millis(200);
    // Only outages and failovers are retried; a refused password, NOPERM, ... stop start-up.
    let mut give_up =
        crate::worker::GiveUp::new(Duration::from_secs(settings.redis.give_up_after_secs));
    loop {
        let attempt = async {
            let (url, cluster) = (&settings.redis.url, settings.redis.cluster);
            let store = Store::connect(url, cluster, timeout, ca.as_deref(), keys.clone()).await?;
            store.load_scripts().await?;
            Ok::<_, crate::store::StoreError>(store)
        };
        match attempt.await {
            Ok(store) => return Ok(Some(store)),
            Err(e @ crate::store::StoreError::Certificate(_)) => {
                let url = redact::redis_url(&settings.redis.url);
                anyhow::bail!(
                    "cannot connect to redis at {url}: {}",
                    redact::scrub(&e.to_string(), &settings.redis.url)
                );
            }
            Err(e) => {
                let error = redact::scrub(&e.to_string(), &settings.redis.url);
                if let Some(fatal) = give_up.failed("connect", &e) {
                    let url = redact::redis_url(&settings.redis.url);
                    let fatal = redact::scrub(&fatal.to_string(), &settings.redis.url);
                    anyhow::bail!("cannot use redis at {url}: {fatal}");
                }
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "redis not reachable at start-up; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The PEM of `redis.tls_ca_file`, when set (validation has checked it already; this reads it
/// once for every connection).
pub fn redis_ca(settings: &Settings) -> anyhow::Result<Option<Vec<u8>>> {
    settings
        .redis
        .tls_ca_file
        .as_ref()
        .map(|p| {
            std::fs::read(p).with_context(|| format!("reading redis.tls_ca_file {}", p.display()))
        })
        .transpose()
}

/// A producer for the DLQ and ticks: idempotent, acknowledged by all in-sync replicas.
pub fn producer(settings: &Settings) -> anyhow::Result<FutureProducer> {
    let mut c = crate::consume::base_config(settings);
    c.set("acks", "all").set("linger.ms", "5");
    for (k, v) in &settings.kafka.options {
        c.set(k, v);
    }
    c.create().context("creating the Kafka producer")
}

/// `rescorer run`: serves HTTP and runs the worker until `shutdown`. Metrics are passed in so an
/// embedding process (the demo, tests) can read them.
pub async fn run_worker(
    settings: Settings,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(settings = %settings.summary(), "starting");
    let health = Arc::new(Health::default());
    let stall_ms = settings.http.stall_timeout_secs.saturating_mul(1000);
    health.stall_timeout_ms.store(
        i64::try_from(stall_ms).unwrap_or(i64::MAX),
        Ordering::Relaxed,
    );
    let addr = settings.http.listen.parse().context("http.listen")?;
    let bound = crate::http::serve(addr, metrics.clone(), health.clone(), shutdown.clone())
        .await
        .with_context(|| format!("binding http.listen {addr}"))?;
    tracing::info!(%bound, "serving /metrics, /healthz, /readyz");

    tokio::spawn(crate::worker::watch_stall(
        health.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let scorer = Scorer::load(&settings.model, metrics.clone())?;
    health.model_loaded.store(true, Ordering::Relaxed);
    let Some(store) = connect_store(&settings, &shutdown).await? else {
        return Ok(());
    };
    health.redis_ok.store(true, Ordering::Relaxed);

    let (consumer, shared, rebalances) =
        crate::consume::consumer(&settings).context("creating the Kafka consumer")?;
    let producer = producer(&settings)?;
    if settings.decay.ticker_interval_secs > 0 {
        let (settings, producer, stop) = (settings.clone(), producer.clone(), shutdown.clone());
        tokio::spawn(async move { crate::tick::ticker(&settings, &producer, stop).await });
    }
    Worker {
        settings,
        scorer,
        store,
        metrics,
        health,
        consumer,
        shared,
        rebalances,
        producer,
    }
    .run(shutdown)
    .await
}

/// Cancels the token on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received: draining");
        token.cancel();
    });
}
