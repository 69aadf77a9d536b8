//! The limits the worker is measured against, taken in the same run on the same machine: raw
//! consume rate from the broker, raw model rows/s at the worker's batch size, and raw pipelined
//! Redis score writes in the worker's own pattern (its Lua script; 8 pairs rescored per call on
//! members as large as the stored state, their scores changing every round).

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::Message;
use serde::Serialize;

use crate::config::Settings;
use crate::decode::{Event, PairUpsert};
use crate::model::FeatureMap;
use crate::score::Scorer;
use crate::store::{Keys, ScoreWrite, Store};

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Ceilings {
    /// Messages/s a plain consumer reads from a pre-filled topic.
    pub consume_msgs_per_s: f64,
    /// Model rows/s at the worker's batch size.
    pub model_rows_per_s: f64,
    /// Scores/s through the worker's score script, pipelined like a flush: the mean of
    /// `redis_samples`.
    pub redis_pairs_per_s: f64,
    /// The Redis ceiling taken before and after the default drain (a shared machine's speed
    /// drifts; the drain is measured against both).
    #[serde(default)]
    pub redis_samples: Vec<f64>,
    /// Events/s through the worker's state writes (the apply stage's scripts), pipelined like
    /// its intake. 0 in reports taken before it was measured.
    #[serde(default)]
    pub redis_apply_events_per_s: f64,
    /// The broker's share of freshness: produce → a consumer configured like the worker's has
    /// the message (Kafka timestamp → receipt), p50 and p99 in ms, at 200 messages/s.
    #[serde(default)]
    pub broker_p50_ms: f64,
    #[serde(default)]
    pub broker_p99_ms: f64,
    /// Raw Redis: plain `ZADD`s of one pair each to members' top-N sets (the output's key
    /// shape), pipelined 1,024 at a time through the worker's client: what Redis and the client
    /// take with no script and no state. 0 in reports taken before it was measured.
    #[serde(default)]
    pub redis_plain_writes_per_s: f64,
}

/// Produce → consume latency through the broker with the worker's fetch settings, at 200/s for
/// `seconds`: the freshness floor no worker can go under. Returns (p50, p99) in ms.
pub async fn broker_latency(
    settings: &Settings,
    topic: &str,
    seconds: f64,
) -> anyhow::Result<(f64, f64)> {
    broker_latency_at(settings, topic, seconds, 200).await
}

/// [`broker_latency`] at `rate` messages/s of events like the load generator's: the freshness
/// floor at that rate when nothing but a plain consumer reads them.
pub async fn broker_latency_at(
    settings: &Settings,
    topic: &str,
    seconds: f64,
    rate: u64,
) -> anyhow::Result<(f64, f64)> {
    let producer: FutureProducer = crate::consume::base_config(settings)
        .set("linger.ms", "5")
        .create()?;
    let consumer: StreamConsumer = crate::consume::base_config(settings)
        .set("group.id", format!("{topic}-latency"))
        .set("auto.offset.reset", "latest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", crate::consume::FETCH_WAIT_MAX_MS)
        .create()?;
    consumer.subscribe(&[topic])?;
    // Wait for the assignment before producing (latest offset).
    let until = Instant::now() + Duration::from_secs(30);
    while consumer.assignment().map(|a| a.count()).unwrap_or(0) == 0 {
        anyhow::ensure!(
            Instant::now() < until,
            "broker latency probe: no assignment"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rate = rate.max(1);
    let n = (seconds * rate as f64) as usize;
    let reader = async {
        let mut lat = Vec::with_capacity(n);
        while lat.len() < n {
            let Ok(m) = tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await else {
                break;
            };
            let m = m?;
            if let Some(ts) = m.timestamp().to_millis() {
                lat.push((crate::worker::chrono_now_ms() - ts) as f64);
            }
        }
        anyhow::Ok(lat)
    };
    let writer = async {
        // Timer ticks are 1 ms apart at best: each sends the messages due by then.
        let mut traffic =
            crate::traffic::Traffic::new(9, 100_000, 100_000, 1.1, Default::default());
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let started = Instant::now();
        let mut sent = 0;
        while sent < n {
            tick.tick().await;
            let due = ((started.elapsed().as_secs_f64() * rate as f64) as usize).min(n);
            while sent < due {
                let ev = traffic.next(crate::worker::chrono_now_ms());
                let payload = ev.value.to_string();
                let rec: FutureRecord<'_, str, str> = FutureRecord::to(topic)
                    .key(ev.key.as_str())
                    .payload(payload.as_str());
                if producer.send_result(rec).is_err() {
                    producer.poll(Duration::from_millis(1));
                    continue;
                }
                sent += 1;
            }
        }
        producer.flush(Duration::from_secs(30))?;
        anyhow::Ok(())
    };
    let (mut lat, ()) = tokio::try_join!(reader, writer)?;
    anyhow::ensure!(!lat.is_empty(), "broker latency probe: nothing consumed");
    lat.sort_by(f64::total_cmp);
    let q = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1];
    Ok((q(0.5), q(0.99)))
}

/// Fills `topic` with `n` messages like the worker's input, then consumes them all.
pub async fn consume(settings: &Settings, topic: &str, n: u64) -> anyhow::Result<f64> {
    let producer: FutureProducer = crate::consume::base_config(settings)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "500000")
        .create()?;
    let mut traffic = crate::traffic::Traffic::new(9, 100_000, 100_000, 1.1, Default::default());
    for i in 0..n {
        let ev = traffic.next(1_764_000_000_000 + i as i64);
        let payload = ev.value.to_string();
        loop {
            let rec: FutureRecord<'_, str, str> = FutureRecord::to(topic)
                .key(ev.key.as_str())
                .payload(payload.as_str());
            match producer.send_result(rec) {
                Ok(_) => break,
                Err(_) => producer.poll(Duration::from_millis(10)),
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("filling the consume-ceiling topic")?;
    let consumer: StreamConsumer = crate::consume::base_config(settings)
        .set("group.id", format!("{topic}-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let first = consumer.recv().await?;
    let _ = first.payload().map(<[u8]>::len);
    drop(first);
    let started = Instant::now();
    let mut seen = 1u64;
    while seen < n {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .context("consume ceiling: the topic ran dry early")??;
        let _ = m.payload().map(<[u8]>::len);
        seen += 1;
    }
    Ok((seen - 1) as f64 / started.elapsed().as_secs_f64())
}

/// Rows/s of the model at `batch` rows per run.
pub fn model(scorer: &Scorer, batch: usize, seconds: f64) -> anyhow::Result<f64> {
    let r = crate::cli::bench_model::run(scorer, &[batch], seconds, 1)?;
    Ok(r.results[0].rows_per_s)
}

/// Plain `ZADD`s/s to 1,024 members' top-N sets, one pair each, scores changing every round,
/// pipelined 1,024 at a time (see [`Ceilings::redis_plain_writes_per_s`]).
pub async fn plain_writes(store: &Store, seconds: f64) -> anyhow::Result<f64> {
    const MEMBERS: usize = 1024;
    let keys: Vec<String> = (0..MEMBERS)
        .map(|m| store.keys().scores(&format!("pm{m}")))
        .collect();
    let mut conn = store.conn();
    let started = Instant::now();
    let (mut round, mut written) = (0u64, 0usize);
    while started.elapsed().as_secs_f64() < seconds {
        round += 1;
        let mut p = redis::pipe();
        for (i, k) in keys.iter().enumerate() {
            let score = ((round as usize * 31 + i) % 1000) as f64 / 1000.0;
            p.cmd("ZADD")
                .arg(k)
                .arg(score)
                .arg(format!("c{}", i % 100))
                .ignore();
        }
        p.query_async::<()>(&mut conn)
            .await
            .context("plain ZADD pipeline")?;
        written += MEMBERS;
    }
    Ok(written as f64 / started.elapsed().as_secs_f64())
}

/// Pairs rescored per score-script call in the Redis ceiling.
const PAIRS: usize = 8;

/// Scores/s through the score script: 128 members of `stored_per_member` pairs (at least 8), 8
/// of each rescored per call to new scores, one pipeline of 128 calls (1,024 pairs) at a time.
/// The set sizes matter: a sorted-set write costs more in a larger set.
pub async fn redis(store: &Store, stored_per_member: usize, seconds: f64) -> anyhow::Result<f64> {
    const MEMBERS: usize = 128;
    let stored = stored_per_member.max(PAIRS);
    let mut events = Vec::new();
    for m in 0..MEMBERS {
        for c in 0..stored {
            events.push(Event::Upsert(PairUpsert {
                member_id: format!("bm{m}"),
                candidate_id: format!("bc{c}"),
                reason: "job_change".into(),
                pair_features: FeatureMap::from([("affinity".to_string(), 0.5)]),
                ts: 1,
            }));
        }
    }
    for chunk in events.chunks(4096) {
        let refs: Vec<(&Event, i64)> = chunk
            .iter()
            .enumerate()
            .map(|(i, e)| (e, i as i64))
            .collect();
        store.apply(&refs, 100).await?;
    }
    let members: Vec<String> = (0..MEMBERS).map(|m| format!("bm{m}")).collect();
    // Every stored pair scored once first, so later rounds update sets of the stored size.
    for first in (0..stored).step_by(PAIRS) {
        write_round(store, &members, first, stored, 0).await?;
    }
    let started = Instant::now();
    let mut round: i64 = 0;
    let mut written = 0usize;
    while started.elapsed().as_secs_f64() < seconds {
        round += 1;
        let first = (round as usize * PAIRS) % stored;
        write_round(store, &members, first, stored, round).await?;
        written += MEMBERS * PAIRS;
    }
    Ok(written as f64 / started.elapsed().as_secs_f64())
}

/// Events/s through the worker's state writes (feature and pair scripts, the apply stage),
/// pipelined 512 events at a time like the worker's intake, on the load generator's event mix
/// over `members` × `candidates` (the drain's traffic, on keys of its own under `store`). With
/// the score ceiling it gives the Redis ceiling of the worker's whole write pattern: an event
/// costs one state write plus its rows of score writes.
pub async fn apply(
    store: &Store,
    members: usize,
    candidates: usize,
    zipf: f64,
    seconds: f64,
) -> anyhow::Result<f64> {
    use crate::decode::{decode, TopicKind};
    use crate::traffic::{Target, Traffic};
    let mut traffic = Traffic::new(13, members, candidates, zipf, Default::default());
    let mut ts = 1_764_000_000_000i64;
    let mut applied = 0usize;
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds {
        let events: Vec<Event> = (0..512)
            .map(|_| {
                ts += 1;
                let g = traffic.next(ts);
                let kind = match g.target {
                    Target::FeatureUpdates => TopicKind::FeatureUpdates,
                    Target::NewCandidates => TopicKind::NewCandidates,
                };
                decode(kind, Some(g.value.to_string().as_bytes()))
            })
            .collect::<Result<_, _>>()?;
        let refs: Vec<(&Event, i64)> = events.iter().map(|e| (e, 0)).collect();
        store.apply(&refs, 100).await?;
        applied += refs.len();
    }
    Ok(applied as f64 / started.elapsed().as_secs_f64())
}

/// One pipeline: each member's candidates `first..first + 8` (mod `stored`) get new scores.
async fn write_round(
    store: &Store,
    members: &[String],
    first: usize,
    stored: usize,
    round: i64,
) -> anyhow::Result<()> {
    let batches: Vec<(&str, Vec<ScoreWrite>)> = members
        .iter()
        .enumerate()
        .map(|(m, member)| {
            let writes = (0..PAIRS)
                .map(|k| {
                    let c = (first + k) % stored;
                    // A score that moves every round (a Weyl sequence in [0, 1)).
                    let x = (round as u64 * 2_654_435_761 + (m * stored + c) as u64 * 40_503)
                        % 1_000_003;
                    ScoreWrite {
                        candidate: format!("bc{c}"),
                        score: x as f32 / 1_000_003.0,
                        as_of: round + 1,
                    }
                })
                .collect();
            (member.as_str(), writes)
        })
        .collect();
    store
        .write_scores("bench:1", 100, 60_000, round, &batches)
        .await?;
    Ok(())
}

/// A store on `settings.redis` under a scratch prefix.
pub async fn scratch_store(settings: &Settings, prefix: &str) -> anyhow::Result<Store> {
    let ca = crate::app::redis_ca(settings)?;
    let conn = crate::store::connect_with_ca(
        &settings.redis.url,
        settings.redis.cluster,
        Duration::from_secs(5),
        ca.as_deref(),
    )
    .await?;
    let store = Store::new(conn, Keys::new(prefix, settings.decay.shards));
    store.load_scripts().await?;
    Ok(store)
}

/// The Redis server's version and the encoding thresholds that set the cost of the worker's
/// writes (a member's sets and hashes up to these sizes are listpacks, scanned linearly), for the
/// report: the same code measures differently under other settings.
pub async fn redis_settings(store: &Store) -> anyhow::Result<String> {
    let mut c = store.conn();
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut c).await?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mut out = format!("Redis {version}");
    for name in ["zset-max-listpack-entries", "hash-max-listpack-entries"] {
        // Managed services may refuse CONFIG: the report then says the value is unknown.
        let kv: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(name)
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        out += &format!(", {name} {}", kv.get(1).map(String::as_str).unwrap_or("?"));
    }
    Ok(out)
}
