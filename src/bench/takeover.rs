//! A takeover: a worker that owns nothing yet starts on partitions whose members hold the
//! pre-loaded state (as when it takes them from a worker that stopped), and the phase times how
//! soon fresh events about members it never touched are scored: the worker's start to its
//! partitions assigned, then, one member at a time, a member update produced to its scores
//! published (the member's meta `as_of` reaching the update's time).
//!
//! Limit: with `state.mode = "owned"` nothing is loaded before an event needs it, so each probe
//! pays one member's load; the first probe also pays the first generation and candidate reads.

use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

use super::probe::WorkerProcess;
use super::state::preload;
use super::{ceilings, phase_settings, BenchOptions};
use crate::config::Settings;

/// Members probed one after another.
const PROBES: usize = 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TakeoverRun {
    /// Pairs stored before the worker started.
    pub stored_pairs: usize,
    /// Worker process start → partitions assigned (`/readyz`), seconds.
    pub assigned_s: f64,
    /// The first probe: produced right after the assignment → its scores published, ms.
    pub first_ms: f64,
    /// Worker process start → the first probe's scores published, seconds.
    pub start_to_first_s: f64,
    /// Over all probes, ms.
    pub p50_ms: f64,
    pub max_ms: f64,
    pub probes: usize,
}

pub(super) async fn takeover(base: &Settings, opts: &BenchOptions) -> anyhow::Result<TakeoverRun> {
    let s = phase_settings(base, opts.partitions).await?;
    preload(&s, opts).await?;
    let store = ceilings::scratch_store(&s, &s.output.key_prefix).await?;
    let producer: FutureProducer = crate::consume::base_config(&s)
        .set("linger.ms", "0")
        .set("partitioner", "murmur2_random")
        .create()?;
    let started = Instant::now();
    let worker = WorkerProcess::start(&s, &[]).await?;
    worker.wait_ready().await?;
    let assigned_s = started.elapsed().as_secs_f64();
    let mut seen_ms = Vec::with_capacity(PROBES);
    let mut start_to_first_s = f64::NAN;
    let stride = (opts.preload_members / PROBES).max(1);
    for i in 0..PROBES.min(opts.preload_members) {
        let member = format!("m{}", i * stride);
        let ts = crate::worker::chrono_now_ms();
        let value = serde_json::json!({
            "entity": "member",
            "id": member,
            "features": {"sessions_7d": (i % 7) as f64},
            "ts": ts,
        })
        .to_string();
        let sent = Instant::now();
        producer
            .send(
                FutureRecord::to(&s.topics.feature_updates)
                    .key(member.as_str())
                    .payload(value.as_str()),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing a probe: {e}"))?;
        let meta = store.keys().meta(&member);
        loop {
            let mut conn = store.conn();
            let as_of: Option<i64> = redis::cmd("HGET")
                .arg(&meta)
                .arg("as_of")
                .query_async(&mut conn)
                .await?;
            if as_of.is_some_and(|a| a >= ts) {
                break;
            }
            anyhow::ensure!(
                sent.elapsed() < Duration::from_secs(60),
                "member {member}'s update was not scored within 60 s of the takeover"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
        if i == 0 {
            start_to_first_s = started.elapsed().as_secs_f64();
        }
    }
    worker.stop().await;
    let first_ms = seen_ms.first().copied().unwrap_or(f64::NAN);
    let mut sorted = seen_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let run = TakeoverRun {
        stored_pairs: opts.preload_members * opts.preload_per_member,
        assigned_s,
        first_ms,
        start_to_first_s,
        p50_ms: sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN),
        max_ms: sorted.last().copied().unwrap_or(f64::NAN),
        probes: sorted.len(),
    };
    eprintln!(
        "  takeover with {} stored pairs: assigned {:.2} s after start, first fresh event scored {:.0} ms after it was produced ({:.2} s after start); {} members p50 {:.0} ms, max {:.0} ms",
        run.stored_pairs, run.assigned_s, run.first_ms, run.start_to_first_s, run.probes, run.p50_ms, run.max_ms
    );
    Ok(run)
}
