//! A full rescoring: the worker is given `members` × `pairs` new pairs (scored and scheduled as
//! they arrive), then one decay tick per partition far enough ahead that every pair is due; the
//! phase times the tick from its publication until every tick message is committed (every pair
//! rescored, written and rescheduled).

use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

use super::committed::BacklogEnd;
use super::probe::WorkerProcess;
use super::{phase_settings, BenchOptions};
use crate::config::Settings;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TickRun {
    pub pairs: u64,
    pub members: usize,
    /// Seconds from the tick's publication to its last message committed.
    pub seconds: f64,
    /// Pairs the model scored meanwhile, per second.
    pub pairs_per_s: f64,
    pub peak_rss_mib: f64,
    /// False when the phase limit ran out first.
    pub complete: bool,
}

/// Pairs per member in the tick phase (a Catch Up member holds on the order of a hundred).
const PAIRS_PER_MEMBER: usize = 50;

const T0: i64 = 1_764_000_000_000;

pub(super) async fn tick_rescore(base: &Settings, opts: &BenchOptions) -> anyhow::Result<TickRun> {
    let s = phase_settings(base, opts.partitions).await?;
    let members = opts.tick_members;
    let producer: FutureProducer = crate::consume::base_config(&s)
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random")
        .set("queue.buffering.max.messages", "200000")
        .create()?;
    let topic = s.topics.new_candidates.clone();
    let mut sends = Vec::with_capacity(members * PAIRS_PER_MEMBER);
    for m in 0..members {
        for j in 0..PAIRS_PER_MEMBER {
            let member = format!("m{m}");
            let value = serde_json::json!({
                "member_id": member,
                "candidate_id": format!("c{}", (m * 7 + j * 131) % opts.candidates.max(1)),
                "reason": "job_change",
                "pair_features": {"affinity": (j % 10) as f64 / 10.0},
                "ts": T0 + (j as i64) * 60_000,
            })
            .to_string();
            sends.push((member, value));
        }
    }
    let futs = sends.iter().map(|(k, v)| {
        producer.send(
            FutureRecord::to(&topic).key(k.as_str()).payload(v.as_str()),
            Duration::from_secs(60),
        )
    });
    for r in futures::future::join_all(futs).await {
        r.map_err(|(e, _)| anyhow::anyhow!("producing the pairs: {e}"))?;
    }
    let worker = WorkerProcess::start(&s, &[]).await?;
    let limit = Duration::from_secs(opts.phase_limit_secs);
    let stored = BacklogEnd::now(&s, opts.partitions).await?;
    let started = Instant::now();
    while !stored.reached().await && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = worker.scrape().await?.sum("rescorer_pairs_scored_total");
    // Every pair due: 25 h after the newest moment, past decay.max_interval_secs.
    let at = T0 + (PAIRS_PER_MEMBER as i64) * 60_000 + 25 * 3_600_000;
    let started = Instant::now();
    crate::tick::publish(&s, &producer, at).await?;
    let ticks = BacklogEnd::now(&s, opts.partitions).await?;
    let mut complete = false;
    while started.elapsed() < limit {
        if ticks.reached().await {
            complete = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let scored = worker.scrape().await?.sum("rescorer_pairs_scored_total") - before;
    let rss = worker.peak_rss_mib();
    worker.stop().await;
    let run = TickRun {
        pairs: scored as u64,
        members,
        seconds,
        pairs_per_s: scored / seconds.max(1e-3),
        peak_rss_mib: rss,
        complete,
    };
    eprintln!(
        "  tick over {} members × {PAIRS_PER_MEMBER} pairs: {:.0} pairs rescored in {:.2} s, {:.0} pairs/s",
        members, scored, seconds, run.pairs_per_s
    );
    Ok(run)
}
