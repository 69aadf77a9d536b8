//! Decay ticks: `rescorer tick` (for a cron job) and the optional in-worker ticker publish one
//! `{"ts": T}` to every partition of the ticks topic, so each worker rescores the due pairs of the
//! schedule shards behind its own tick partitions.

use std::time::Duration;

use anyhow::Context;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::Settings;

/// Publishes a tick at `ts_ms` to every partition of the ticks topic; returns how many.
pub async fn publish(
    settings: &Settings,
    producer: &FutureProducer,
    ts_ms: i64,
) -> anyhow::Result<usize> {
    let topic = settings.topics.decay_ticks.clone();
    // A short blocking call: ticks are rare, and this keeps the producer the only client.
    let partitions = producer
        .client()
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .map(|md| {
            md.topics()
                .first()
                .map(|t| t.partitions().len())
                .unwrap_or(0)
        })
        .with_context(|| format!("reading the partitions of {topic}"))?;
    anyhow::ensure!(
        partitions > 0,
        "topic {topic} has no partitions (does it exist?)"
    );
    let payload = serde_json::json!({ "ts": ts_ms }).to_string();
    let sends = (0..partitions as i32).map(|p| {
        let record: FutureRecord<'_, str, str> =
            FutureRecord::to(&topic).partition(p).payload(&payload);
        producer.send(record, Duration::from_secs(30))
    });
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| e)
            .with_context(|| format!("publishing a tick to {topic}"))?;
    }
    Ok(partitions)
}

/// Publishes a wall-clock tick every `decay.ticker_interval_secs` until `stop`.
pub async fn ticker(
    settings: &Settings,
    producer: &FutureProducer,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut every = tokio::time::interval(Duration::from_secs(settings.decay.ticker_interval_secs));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let now = crate::worker::chrono_now_ms();
        match publish(settings, producer, now).await {
            Ok(n) => tracing::info!(ts = now, partitions = n, "decay tick published"),
            Err(e) => tracing::warn!(error = %e, "decay tick not published"),
        }
    }
}
