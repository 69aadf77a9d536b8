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
    /// Every n-th member feature update is also handed to this channel when it is sent, so
    /// the benchmark can watch for its score (freshness seen from the producer's side).
    pub watch: Option<(u64, tokio::sync::mpsc::UnboundedSender<Watched>)>,
    /// Stamp each message with its event time (as if it had been produced then): a backlog
    /// that looks as old as the traffic it stands for.
    pub kafka_time: bool,
    /// Stop early when this fires.
    pub stop: Option<tokio_util::sync::CancellationToken>,
}

/// A member update the load generator sent: its scores are fresh once the member's published
/// `as_of` reaches `ts`.
#[derive(Debug, Clone)]
pub struct Watched {
    pub member: String,
    pub ts: i64,
    pub sent: Instant,
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
    // Keyed by entity id with the Java client's partitioner (topics/README.md): member events land
    // on their owner's partition.
    cfg.set("linger.ms", "5")
        .set("partitioner", "murmur2_random")
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
    let mut member_updates: u64 = 0;
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
        if until.is_some_and(|u| now >= u) || opts.stop.as_ref().is_some_and(|t| t.is_cancelled()) {
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
            let mut rec: FutureRecord<'_, str, str> = FutureRecord::to(topic)
                .key(ev.key.as_str())
                .payload(payload.as_str());
            if opts.kafka_time {
                rec = rec.timestamp(ts);
            }
            if let Err((e, _)) = producer.send_result(rec) {
                // Local queue full: let deliveries drain, then send this same event again.
                tracing::debug!(error = %e, "producer queue full");
                producer.poll(Duration::from_millis(50));
                pending = Some(ev);
                break;
            }
            sent += 1;
            if let Some((every, tx)) = &opts.watch {
                if ev.target == Target::FeatureUpdates && ev.value["entity"] == "member" {
                    member_updates += 1;
                    if member_updates % every.max(&1) == 0 {
                        let _ = tx.send(Watched {
                            member: ev.key.clone(),
                            ts,
                            sent: Instant::now(),
                        });
                    }
                }
            }
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
