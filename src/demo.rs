//! `rescorer demo`: the zero-setup first run. An embedded Kafka-protocol broker (librdkafka's mock
//! cluster) and a `redis-server` on a free port in a temporary directory, the real worker against
//! both, synthetic Catch Up traffic, live progress, and at the end the top candidates of a few
//! members read back from Redis.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::traffic::{Mix, Target, Traffic};

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub seconds: u64,
    pub rate: u64,
    pub members: usize,
    pub candidates: usize,
    pub partitions: i32,
    pub model_spec: PathBuf,
}

/// `redis-server` in a temporary directory, killed on drop.
struct LocalRedis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl LocalRedis {
    fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = tempfile::tempdir()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (install it: apt-get install redis-server, or run scripts/demo.sh)")?;
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > until {
                bail!("redis-server did not start on port {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            child,
            port,
            _dir: dir,
        })
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Quantile of a histogram family from its cumulative buckets (upper bound of the bucket).
fn quantile(metrics: &Metrics, q: f64) -> Option<f64> {
    let mut buckets: HashMap<u64, (f64, u64)> = HashMap::new();
    let mut total = 0;
    for mf in metrics.registry.gather() {
        if mf.name() != "rescorer_event_to_score_seconds" {
            continue;
        }
        for m in mf.get_metric() {
            let h = m.get_histogram();
            total += h.get_sample_count();
            for b in h.get_bucket() {
                let e = buckets
                    .entry(b.upper_bound().to_bits())
                    .or_insert((b.upper_bound(), 0));
                e.1 += b.cumulative_count();
            }
        }
    }
    if total == 0 {
        return None;
    }
    let mut sorted: Vec<(f64, u64)> = buckets.into_values().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let want = (q * total as f64).ceil() as u64;
    sorted
        .iter()
        .find(|(_, c)| *c >= want)
        .map(|(ub, _)| *ub)
        .or(Some(f64::INFINITY))
}

fn lag(text: &str) -> f64 {
    counter(text, "rescorer_consumer_lag{")
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    println!("rescorer demo: embedded Kafka-protocol broker + local redis-server + the real model");
    let redis = LocalRedis::start()?;
    let cluster = MockCluster::new(1).context("starting the embedded broker")?;
    let mut settings = Settings::default();
    settings.kafka.bootstrap_servers = cluster.bootstrap_servers();
    settings.kafka.group_id = "rescorer-demo".into();
    settings.redis.url = format!("redis://127.0.0.1:{}", redis.port);
    settings.model.spec = opts.model_spec.clone();
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    settings.http.listen = format!("127.0.0.1:{http_port}");
    let t = settings.topics.clone();
    for topic in [
        &t.feature_updates,
        &t.new_candidates,
        &t.decay_ticks,
        &t.dlq,
    ] {
        cluster
            .create_topic(topic, opts.partitions, 1)
            .context("creating demo topics")?;
    }
    println!(
        "  broker {}  redis 127.0.0.1:{}  metrics http://{}/metrics",
        settings.kafka.bootstrap_servers, redis.port, settings.http.listen
    );

    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(crate::app::run_worker(
        settings.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka.bootstrap_servers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()?;

    println!(
        "  publishing {} events/s for {} s over {} members and {} candidates (Zipf 1.1)",
        opts.rate, opts.seconds, opts.members, opts.candidates
    );
    println!("  (the first consumer-group join takes a few seconds)\n");
    let mut traffic = Traffic::new(42, opts.members, opts.candidates, 1.1, Mix::default());
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut last = (Instant::now(), 0.0, 0.0);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut next_report = Instant::now() + Duration::from_secs(1);
    let end = started + Duration::from_secs(opts.seconds);
    let drain_until = end + Duration::from_secs(30);
    loop {
        tick.tick().await;
        let now = Instant::now();
        if now < end {
            let due = (now.duration_since(started).as_secs_f64() * opts.rate as f64) as u64;
            while sent < due {
                let ev = traffic.next(crate::worker::chrono_now_ms());
                let topic = match ev.target {
                    Target::FeatureUpdates => &t.feature_updates,
                    Target::NewCandidates => &t.new_candidates,
                };
                let payload = ev.value.to_string();
                let rec: FutureRecord<'_, str, str> = FutureRecord::to(topic)
                    .key(ev.key.as_str())
                    .payload(payload.as_str());
                if producer.send_result(rec).is_err() {
                    producer.poll(Duration::from_millis(10));
                    break; // queue full: try again next tick
                }
                sent += 1;
            }
        }
        if now >= next_report {
            next_report += Duration::from_secs(1);
            let text = metrics.render();
            let events = counter(&text, "rescorer_events_total{");
            let pairs = counter(&text, "rescorer_pairs_scored_total");
            let dt = now.duration_since(last.0).as_secs_f64();
            println!(
                "  t={:>3}s  sent {:>7}  events/s {:>7.0}  pairs/s {:>7.0}  lag {:>6.0}  freshness p50 {}  p99 {}",
                started.elapsed().as_secs(),
                sent,
                ((events - last.1) / dt).max(0.0),
                ((pairs - last.2) / dt).max(0.0),
                lag(&text).max(0.0),
                fmt_secs(quantile(&metrics, 0.5)),
                fmt_secs(quantile(&metrics, 0.99)),
            );
            last = (now, events, pairs);
            if now >= end && (events as u64 >= sent && lag(&text) == 0.0 || now > drain_until) {
                break;
            }
        }
    }
    let _ = producer.flush(Duration::from_secs(5));
    let text = metrics.render();
    let events = counter(&text, "rescorer_events_total{");
    let pairs = counter(&text, "rescorer_pairs_scored_total");
    stop.cancel();
    worker.await.context("worker task")??;

    println!("\nSummary");
    println!("  events consumed     {events:.0} of {sent} published");
    println!(
        "  pairs scored        {pairs:.0} ({:.2} model rows per event)",
        pairs / events.max(1.0)
    );
    println!(
        "  freshness           p50 {}  p99 {} (Kafka timestamp -> Redis ack)",
        fmt_secs(quantile(&metrics, 0.5)),
        fmt_secs(quantile(&metrics, 0.99))
    );
    let client = redis::Client::open(settings.redis.url.as_str())?;
    let mut c = client.get_multiplexed_async_connection().await?;
    println!("\nTop candidates of the busiest members (catchup:scores:{{member}}):");
    for m in ["m0", "m1", "m2"] {
        let top: Vec<(String, f64)> = redis::cmd("ZREVRANGE")
            .arg(
                crate::store::Keys::new(settings.output.key_prefix.clone(), settings.decay.shards)
                    .scores(m),
            )
            .arg(0)
            .arg(4)
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await?;
        let shown: Vec<String> = top
            .iter()
            .map(|(cand, s)| format!("{cand} {s:.3}"))
            .collect();
        println!(
            "  {m}: {}",
            if shown.is_empty() {
                "(none yet)".into()
            } else {
                shown.join(", ")
            }
        );
    }
    drop(producer);
    drop(cluster);
    Ok(())
}

fn fmt_secs(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(s) if s.is_infinite() => ">300s".into(),
        Some(s) if s < 1.0 => format!("{:.0}ms", s * 1000.0),
        Some(s) => format!("{s:.1}s"),
    }
}
