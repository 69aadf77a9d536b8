//! Open-loop freshness: traffic at a fixed rate, event-to-score latency from the worker's
//! histogram and from the load generator's side.

use std::time::{Duration, Instant};

use super::probe::WorkerProcess;
use super::{
    ceilings, load_options, phase_settings, preload, watcher, BenchOptions, Freshness, Seen,
    WATCH_EVERY,
};
use crate::cli::loadgen::run as loadgen;
use crate::config::Settings;

/// Open-loop traffic at `rate` for `seconds`; freshness from the worker's histogram.
pub(super) async fn freshness(
    base: &Settings,
    opts: &BenchOptions,
    fraction: f64,
    rate: u64,
) -> anyhow::Result<Freshness> {
    let s = phase_settings(base, opts.partitions).await?;
    // The raw floor at this rate, on topics of its own, before the worker starts.
    let probe = phase_settings(base, opts.partitions).await?;
    let (broker_p50_ms, broker_p99_ms) =
        ceilings::broker_latency_at(&probe, &probe.topics.new_candidates, 5.0, rate).await?;
    eprintln!("    broker alone at {rate}/s: p50 {broker_p50_ms:.1} ms, p99 {broker_p99_ms:.1} ms");
    preload(&s, opts).await?;
    let worker = WorkerProcess::start(&s, &[]).await?;
    worker.wait_ready().await?;
    // A warm-up at the same rate (another seed: other events), outside the quantiles.
    let warmup = opts.freshness_warmup_seconds;
    if warmup > 0 {
        let mut lo = load_options(opts, rate.max(1), 0, warmup, false);
        lo.seed = 7;
        let sent = loadgen(&s, &lo).await?.sent;
        eprintln!("    warm-up: {sent} events in {warmup} s");
    }
    let before = worker.scrape().await?;
    let (tx, stop, seen) = watcher(&s, Duration::from_secs(30)).await?;
    let mut lo = load_options(opts, rate.max(1), 0, opts.freshness_seconds, false);
    lo.watch = Some((WATCH_EVERY, tx));
    let report = loadgen(&s, &lo).await?;
    let until = Instant::now() + Duration::from_secs(60);
    let mut m = worker.scrape().await?;
    let total = report.sent as f64 + before.input_events();
    while m.input_events() < total && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        m = worker.scrape().await?;
    }
    stop.cancel();
    let seen = Seen::of(&seen.await?);
    worker.stop().await;
    for topic in ["feature_updates", "new_candidates"] {
        let f = format!("topic=\"{topic}\"");
        let tq =
            |p| m.interval_quantile(&before, "rescorer_event_to_score_seconds", &f, p) * 1000.0;
        eprintln!("    {topic}: p50 {:.1} ms, p99 {:.1} ms", tq(0.5), tq(0.99));
    }
    let q = |p| m.interval_quantile(&before, "rescorer_event_to_score_seconds", "", p) * 1000.0;
    let f = Freshness {
        target_fraction: fraction,
        rate,
        sent: report.sent,
        p50_ms: q(0.5),
        p95_ms: q(0.95),
        p99_ms: q(0.99),
        warmup_s: warmup,
        broker_p50_ms,
        broker_p99_ms,
        seen,
    };
    eprintln!(
        "  freshness at {:.0}% ({rate}/s): worker p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms; seen in Redis p50 {:.1} ms, p99 {:.1} ms ({} samples, {} unobserved)",
        fraction * 100.0,
        f.p50_ms,
        f.p95_ms,
        f.p99_ms,
        f.seen.p50_ms,
        f.seen.p99_ms,
        f.seen.samples,
        f.seen.unobserved
    );
    Ok(f)
}

/// Only open-loop freshness, at each of `rates` events/s (for studying freshness).
pub async fn freshness_levels(
    base: &Settings,
    opts: &BenchOptions,
    rates: &[u64],
) -> anyhow::Result<Vec<Freshness>> {
    let mut levels = Vec::new();
    for &rate in rates {
        levels.push(freshness(base, opts, 0.0, rate).await?);
    }
    Ok(levels)
}
