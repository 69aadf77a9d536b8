//! `rescorer bench e2e`: the worker, as its own process, against a broker and a Redis on this
//! machine, measured against the ceilings taken in the same run. It measures and reports; it
//! asserts nothing about speed. `scripts/bench.sh` starts the broker and Redis and runs it.

pub mod ceilings;
mod probe;

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde::Serialize;

use crate::cli::loadgen::{run as loadgen, LoadgenOptions};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::score::Scorer;
use probe::WorkerProcess;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Pairs stored before each drain: `preload_members` members with `preload_per_member`
    /// candidates each (ids shared with the load generator's), so member updates and candidate
    /// fan-outs meet a realistic state. 0 stores nothing.
    pub preload_members: usize,
    pub preload_per_member: usize,
    pub backlog: u64,
    pub partitions: i32,
    pub freshness_seconds: u64,
    pub members: usize,
    pub candidates: usize,
    pub zipf: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    pub label: String,
    pub events: u64,
    pub seconds: f64,
    pub events_per_s: f64,
    pub pairs_per_s: f64,
    pub rows_per_event: f64,
    pub peak_rss_mib: f64,
    /// The phase hit its time limit before the backlog was consumed.
    pub timed_out: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Freshness {
    pub target_fraction: f64,
    pub rate: u64,
    pub sent: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: String,
    pub preloaded_pairs: usize,
    pub backlog_events: u64,
    pub partitions: i32,
    pub ceilings: ceilings::Ceilings,
    pub sustained: Drain,
    pub no_coalescing: Drain,
    pub batch_one: Drain,
    pub freshness: Vec<Freshness>,
}

fn suffix() -> String {
    format!("{:x}", rand::random::<u32>())
}

/// Creates the four configured topics with `partitions` partitions, replication 1 (a broker on
/// this machine). Shared by the benchmark and the integration tests.
pub async fn create_topics(settings: &Settings, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        crate::consume::base_config(settings).create()?;
    let t = &settings.topics;
    let names = [
        &t.feature_updates,
        &t.new_candidates,
        &t.decay_ticks,
        &t.dlq,
    ];
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(10)));
    for r in admin.create_topics(&topics, &opts).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    Ok(())
}

/// Settings of one phase: its own topics, group and key prefix.
async fn phase_settings(base: &Settings, partitions: i32) -> anyhow::Result<Settings> {
    let id = suffix();
    let mut s = base.clone();
    s.topics.feature_updates = format!("bench-{id}-features");
    s.topics.new_candidates = format!("bench-{id}-candidates");
    s.topics.decay_ticks = format!("bench-{id}-ticks");
    s.topics.dlq = format!("bench-{id}-dlq");
    s.kafka.group_id = format!("bench-{id}");
    s.output.key_prefix = format!("bench{id}");
    create_topics(&s, partitions).await?;
    Ok(s)
}

fn load_options(
    opts: &BenchOptions,
    rate: u64,
    count: u64,
    seconds: u64,
    fixed_time: bool,
) -> LoadgenOptions {
    LoadgenOptions {
        rate,
        count,
        seconds,
        seed: 42,
        members: opts.members,
        candidates: opts.candidates,
        zipf: opts.zipf,
        mix: Default::default(),
        event_time: fixed_time.then_some((1_764_000_000_000, 10)),
    }
}

/// Stores the pre-built pairs of `opts` under `s`'s key prefix.
async fn preload(s: &Settings, opts: &BenchOptions) -> anyhow::Result<()> {
    if opts.preload_members == 0 || opts.preload_per_member == 0 {
        return Ok(());
    }
    let store = ceilings::scratch_store(s, &s.output.key_prefix).await?;
    let cands = opts.candidates.max(1);
    let mut batch = Vec::with_capacity(10_000);
    for m in 0..opts.preload_members {
        for j in 0..opts.preload_per_member {
            batch.push(crate::decode::Event::Upsert(crate::decode::PairUpsert {
                member_id: format!("m{m}"),
                candidate_id: format!("c{}", (m * 7 + j * 131) % cands),
                reason: "job_change".into(),
                pair_features: crate::model::FeatureMap::from([(
                    "affinity".to_string(),
                    (j % 10) as f64 / 10.0,
                )]),
                ts: 1_764_000_000_000 - 3_600_000,
            }));
            if batch.len() == 10_000 {
                let refs: Vec<_> = batch.iter().map(|e| (e, 0)).collect();
                store.apply(&refs, s.output.top_n).await?;
                batch.clear();
            }
        }
    }
    let refs: Vec<_> = batch.iter().map(|e| (e, 0)).collect();
    store.apply(&refs, s.output.top_n).await?;
    Ok(())
}

/// Pre-loads the backlog, then times the worker consuming all of it.
async fn drain(
    base: &Settings,
    opts: &BenchOptions,
    label: &str,
    set: &[String],
) -> anyhow::Result<Drain> {
    let s = phase_settings(base, opts.partitions).await?;
    preload(&s, opts).await?;
    loadgen(&s, &load_options(opts, 0, opts.backlog, 0, true)).await?;
    let worker = WorkerProcess::start(&s, set).await?;
    let limit = Duration::from_secs(180);
    // The drain starts at the last scrape that saw nothing consumed (after the group join).
    let started = Instant::now();
    let mut last_idle = Instant::now();
    let (mut events, mut pairs) = (0.0, 0.0);
    let mut finished = None;
    while started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let m = worker.scrape().await?;
        events = m.sum("rescorer_events_total");
        pairs = m.sum("rescorer_pairs_scored_total");
        if events == 0.0 {
            last_idle = Instant::now();
        }
        if events >= opts.backlog as f64 && m.sum("rescorer_consumer_lag") == 0.0 {
            finished = Some(Instant::now());
            break;
        }
    }
    let rss = worker.peak_rss_mib();
    worker.stop().await;
    anyhow::ensure!(events > 0.0, "the worker consumed nothing");
    let seconds = finished
        .unwrap_or_else(Instant::now)
        .duration_since(last_idle)
        .as_secs_f64()
        .max(1e-3);
    let d = Drain {
        label: label.into(),
        events: events as u64,
        seconds,
        events_per_s: events / seconds,
        pairs_per_s: pairs / seconds,
        rows_per_event: pairs / events.max(1.0),
        peak_rss_mib: rss,
        timed_out: events < opts.backlog as f64,
    };
    eprintln!(
        "  {label}: {:.0} events/s, {:.0} pairs/s, {:.2} rows/event, RSS {:.0} MiB",
        d.events_per_s, d.pairs_per_s, d.rows_per_event, d.peak_rss_mib
    );
    Ok(d)
}

/// Open-loop traffic at `rate` for `seconds`; freshness from the worker's histogram.
async fn freshness(
    base: &Settings,
    opts: &BenchOptions,
    fraction: f64,
    rate: u64,
) -> anyhow::Result<Freshness> {
    let s = phase_settings(base, opts.partitions).await?;
    preload(&s, opts).await?;
    let worker = WorkerProcess::start(&s, &[]).await?;
    worker.wait_ready().await?;
    let report = loadgen(
        &s,
        &load_options(opts, rate.max(1), 0, opts.freshness_seconds, false),
    )
    .await?;
    let until = Instant::now() + Duration::from_secs(60);
    let mut m = worker.scrape().await?;
    while m.sum("rescorer_events_total") < report.sent as f64 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        m = worker.scrape().await?;
    }
    worker.stop().await;
    let q = |p| m.histogram_quantile("rescorer_event_to_score_seconds", p) * 1000.0;
    let f = Freshness {
        target_fraction: fraction,
        rate,
        sent: report.sent,
        p50_ms: q(0.5),
        p95_ms: q(0.95),
        p99_ms: q(0.99),
    };
    eprintln!(
        "  freshness at {:.0}% ({rate}/s): p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms",
        fraction * 100.0,
        f.p50_ms,
        f.p95_ms,
        f.p99_ms
    );
    Ok(f)
}

pub async fn run(base: &Settings, opts: &BenchOptions) -> anyhow::Result<Report> {
    eprintln!("ceilings");
    let scorer = Scorer::load(&base.model, Metrics::new())?;
    let model = ceilings::model(&scorer, base.batch.max_pairs, 3.0)?;
    let store = ceilings::scratch_store(base, &format!("benchceil{}", suffix())).await?;
    let redis = ceilings::redis(&store, 3.0).await?;
    let cs = phase_settings(base, opts.partitions).await?;
    let consume =
        ceilings::consume(&cs, &cs.topics.feature_updates, opts.backlog.max(50_000)).await?;
    let ceilings = ceilings::Ceilings {
        consume_msgs_per_s: consume,
        model_rows_per_s: model,
        redis_pairs_per_s: redis,
    };
    eprintln!("  consume {consume:.0} msgs/s, model {model:.0} rows/s, redis {redis:.0} pairs/s");

    eprintln!("backlog drains ({} events)", opts.backlog);
    let sustained = drain(base, opts, "default", &[]).await?;
    let no_coalescing = drain(
        base,
        opts,
        "coalescing off",
        &["batch.coalesce=false".into()],
    )
    .await?;
    let batch_one = drain(base, opts, "batch size 1", &["batch.max_pairs=1".into()]).await?;

    eprintln!("freshness, open loop");
    let mut fresh = Vec::new();
    for fraction in [0.25, 0.5, 0.8] {
        let rate = (sustained.events_per_s * fraction) as u64;
        fresh.push(freshness(base, opts, fraction, rate).await?);
    }
    Ok(Report {
        machine: machine(),
        preloaded_pairs: opts.preload_members * opts.preload_per_member,
        backlog_events: opts.backlog,
        partitions: opts.partitions,
        ceilings,
        sustained,
        no_coalescing,
        batch_one,
        freshness: fresh,
    })
}

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {}", crate::cli::bench_model::cpu_name())
}

impl Report {
    pub fn markdown(&self) -> String {
        let c = &self.ceilings;
        let rows = self.sustained.rows_per_event;
        // Every ceiling in pairs/s: the consume ceiling carries rows/event pairs per message.
        let narrowest = [
            ("consume", c.consume_msgs_per_s * rows),
            ("model", c.model_rows_per_s),
            ("redis", c.redis_pairs_per_s),
        ]
        .into_iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(("none", 0.0));
        let mut s = format!(
            "# End-to-end benchmark\n\nMachine: {}. Broker (tansu), redis-server and the worker share it. {} pairs stored before \
             each run; backlog {} events, {} partitions per topic, Zipf traffic.\n\n\
             ## Ceilings (same run)\n\n| ceiling | rate |\n|---|---:|\n\
             | consume (plain consumer) | {:.0} msgs/s |\n| model, batch {} | {:.0} rows/s |\n| Redis score writes, worker's script | {:.0} pairs/s |\n\n",
            self.machine, self.preloaded_pairs, self.backlog_events, self.partitions, c.consume_msgs_per_s, 1024, c.model_rows_per_s, c.redis_pairs_per_s
        );
        s += "## Backlog drains\n\n| run | events/s | pairs/s | model rows / event | peak RSS MiB | complete |\n|---|---:|---:|---:|---:|---|\n";
        for d in [&self.sustained, &self.no_coalescing, &self.batch_one] {
            s += &format!(
                "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {} |\n",
                d.label,
                d.events_per_s,
                d.pairs_per_s,
                d.rows_per_event,
                d.peak_rss_mib,
                if d.timed_out {
                    "no (time limit)"
                } else {
                    "yes"
                }
            );
        }
        s += &format!(
            "\nSustained pairs/s vs the narrowest ceiling ({}, {:.0} pairs/s at {:.2} rows/event): **{:.0}%**. \
             Coalescing cuts model rows per event {:.1}×.\n\n",
            narrowest.0,
            narrowest.1,
            rows,
            100.0 * self.sustained.pairs_per_s / narrowest.1.max(1.0),
            self.no_coalescing.rows_per_event / rows.max(1e-9)
        );
        s += "## Freshness, open loop (worker histogram: Kafka timestamp → Redis ack)\n\n| load | events/s | p50 ms | p95 ms | p99 ms |\n|---|---:|---:|---:|---:|\n";
        for f in &self.freshness {
            s += &format!(
                "| {:.0}% | {} | {:.1} | {:.1} | {:.1} |\n",
                f.target_fraction * 100.0,
                f.rate,
                f.p50_ms,
                f.p95_ms,
                f.p99_ms
            );
        }
        s
    }
}
