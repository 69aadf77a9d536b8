//! `rescorer loadgen`: publishes synthetic Catch Up traffic (see [`crate::traffic`]) to the
//! configured topics, open-loop at a fixed rate or as fast as the broker takes it, for a number of
//! seconds or events. Deterministic for a seed (event times are the wall clock at send, or fixed
//! steps from `start_ts` with `--event-time-step-ms` for replayable streams).

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::Settings;
use crate::traffic::{Mix, Target, Traffic};

#[derive(Debug, Clone)]
pub struct LoadgenOptions {
    /// Events per second; 0 = as fast as possible.
    pub rate: u64,
    /// Stop after this many events (0 = no limit).
    pub count: u64,
    /// Stop after this many seconds (0 = no limit).
    pub seconds: u64,
    pub seed: u64,
    pub members: usize,
    pub candidates: usize,
    pub zipf: f64,
    pub mix: Mix,
    /// Fixed event-time step from `start_ts` instead of the wall clock (replayable streams).
    pub event_time: Option<(i64, i64)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadgenReport {
    pub sent: u64,
    pub seconds: f64,
}

pub async fn run(settings: &Settings, opts: &LoadgenOptions) -> anyhow::Result<LoadgenReport> {
    anyhow::ensure!(
        opts.count > 0 || opts.seconds > 0,
        "give --count or --seconds (or both)"
    );
    let mut cfg = crate::consume::base_config(settings);
    cfg.set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000");
    for (k, v) in &settings.kafka.options {
        cfg.set(k, v);
    }
    let producer: FutureProducer = cfg.create().context("creating the Kafka producer")?;
    let mut traffic = Traffic::new(
        opts.seed,
        opts.members,
        opts.candidates,
        opts.zipf,
        opts.mix.clone(),
    );
    let started = Instant::now();
    let until = (opts.seconds > 0).then(|| started + Duration::from_secs(opts.seconds));
    let mut sent: u64 = 0;
    let mut pending = None;
    let mut pacer = tokio::time::interval(Duration::from_millis(5));
    pacer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    'outer: loop {
        if opts.rate > 0 {
            pacer.tick().await;
        } else {
            tokio::task::yield_now().await;
        }
        let now = Instant::now();
        if until.is_some_and(|u| now >= u) {
            break;
        }
        let due = if opts.rate > 0 {
            (now.duration_since(started).as_secs_f64() * opts.rate as f64) as u64
        } else {
            sent + 1000
        };
        while sent < due {
            if opts.count > 0 && sent >= opts.count {
                break 'outer;
            }
            let ts = match opts.event_time {
                Some((start, step)) => start + sent as i64 * step,
                None => crate::worker::chrono_now_ms(),
            };
            let ev = pending.take().unwrap_or_else(|| traffic.next(ts));
            let topic = match ev.target {
                Target::FeatureUpdates => &settings.topics.feature_updates,
                Target::NewCandidates => &settings.topics.new_candidates,
            };
            let payload = ev.value.to_string();
            let rec: FutureRecord<'_, str, str> = FutureRecord::to(topic)
                .key(ev.key.as_str())
                .payload(payload.as_str());
            if let Err((e, _)) = producer.send_result(rec) {
                // Local queue full: let deliveries drain, then send this same event again.
                tracing::debug!(error = %e, "producer queue full");
                producer.poll(Duration::from_millis(50));
                pending = Some(ev);
                break;
            }
            sent += 1;
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .context("flushing the producer")?;
    Ok(LoadgenReport {
        sent,
        seconds: started.elapsed().as_secs_f64(),
    })
}
