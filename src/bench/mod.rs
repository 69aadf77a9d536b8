//! `rescorer bench e2e`: the worker, as its own process, against a broker and a Redis on this
//! machine, measured against the ceilings taken in the same run. It measures and reports; it
//! asserts nothing about speed. `scripts/bench.sh` starts the broker and Redis and runs it.

pub mod ceilings;
mod committed;
mod freshness;
pub mod plot;
mod probe;
mod report;
pub use report::freshness_table;
mod state;
mod takeover;
mod tick;
mod watch;
use watch::{watcher, WATCH_EVERY};

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde::{Deserialize, Serialize};

use crate::cli::loadgen::{run as loadgen, LoadgenOptions};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::score::Scorer;
use freshness::freshness;
pub use freshness::freshness_levels;
use probe::WorkerProcess;
use state::{once_per_trigger, preload};

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
    /// Seconds of the same traffic (another seed) before each freshness level is measured.
    pub freshness_warmup_seconds: u64,
    /// Batch sizes drained besides the default (ablation).
    pub batch_sizes: Vec<usize>,
    /// Backlog + live phase: live rate as a fraction of the default drain rate, and the backlog
    /// as minutes of that traffic.
    pub live_fraction: f64,
    pub backlog_minutes: f64,
    /// Longest a backlog phase may run.
    pub phase_limit_secs: u64,
    /// Only the ceilings and the default drain (e.g. peak RSS with a large stored state), and the
    /// tick phase.
    pub drain_only: bool,
    /// Members of the tick phase (see [`tick::TickRun`]); 0 skips it.
    pub tick_members: usize,
    pub members: usize,
    pub candidates: usize,
    pub zipf: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Rows per event if every distinct trigger of the stream (a member's rescoring, a
    /// candidate's fan-out, a pair) were scored exactly once, at the final state's sizes: what
    /// perfect coalescing of this stream would cost (the default drain only).
    #[serde(default)]
    pub once_per_trigger_rows_per_event: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Freshness {
    pub target_fraction: f64,
    pub rate: u64,
    pub sent: u64,
    /// Worker histogram: Kafka timestamp → Redis acknowledgement.
    #[serde(deserialize_with = "nan_if_null")]
    pub p50_ms: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p95_ms: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p99_ms: f64,
    /// Seconds of traffic before the measured ones (not in the quantiles).
    #[serde(default)]
    pub warmup_s: u64,
    /// The raw floor at this rate: produce → consume through the broker for a plain consumer
    /// with the worker's fetch settings, events like the load's, no worker running (ms; 0 in
    /// reports taken before it was measured).
    #[serde(default)]
    pub broker_p50_ms: f64,
    #[serde(default)]
    pub broker_p99_ms: f64,
    /// Load generator's side: send → the member's published as_of reaches the event's time.
    pub seen: Seen,
}

/// Freshness as a reader of Redis sees it (see `watch`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Seen {
    pub samples: usize,
    pub unobserved: usize,
    #[serde(deserialize_with = "nan_if_null")]
    pub p50_ms: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p95_ms: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p99_ms: f64,
}

impl Seen {
    fn of(o: &watch::Observed) -> Self {
        Self {
            samples: o.points.len(),
            unobserved: o.unobserved,
            p50_ms: o.quantile(0.5),
            p95_ms: o.quantile(0.95),
            p99_ms: o.quantile(0.99),
        }
    }
}

/// One scrape during the backlog + live phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the worker started.
    pub t: f64,
    pub lag_messages: f64,
    /// Largest partition lag in seconds.
    pub lag_seconds: f64,
    /// p99 of live events scored since the previous sample (worker histogram), ms.
    #[serde(deserialize_with = "nan_if_null")]
    pub live_p99_ms: f64,
    pub catchup_partitions: f64,
    pub events: f64,
}

/// A backlog with live traffic on top.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BacklogLive {
    pub live_rate: u64,
    pub backlog_events: u64,
    pub live_sent: u64,
    /// Seconds from the worker's start until the backlog was consumed, no partition was split and
    /// less than a second of live traffic was behind.
    pub drained_after_s: Option<f64>,
    /// Seconds from the worker's start until the group had committed every backlog message.
    #[serde(default)]
    pub backlog_done_after_s: Option<f64>,
    /// Live-lane events (worker histogram) over the whole phase.
    #[serde(deserialize_with = "nan_if_null")]
    pub worker_live_p50_ms: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub worker_live_p95_ms: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub worker_live_p99_ms: f64,
    /// Backlog-lane events, for contrast.
    #[serde(deserialize_with = "nan_if_null")]
    pub worker_backlog_p50_ms: f64,
    /// Load generator's side, for live events sent until the backlog was done (or drained).
    pub seen_during_drain: Seen,
    pub peak_rss_mib: f64,
    pub series: Vec<Sample>,
    /// (seconds since start, ms) per load-generator sample.
    pub seen_points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub machine: String,
    pub preloaded_pairs: usize,
    pub backlog_events: u64,
    pub partitions: i32,
    pub ceilings: ceilings::Ceilings,
    pub sustained: Drain,
    /// None in a drain-only run (as for every phase below).
    pub no_coalescing: Option<Drain>,
    /// The default `batch.max_pairs` (the sustained drain's).
    pub batch_default: usize,
    /// Drains at other batch sizes (`batch.max_pairs`).
    pub batch_sizes: Vec<(usize, Drain)>,
    pub freshness: Vec<Freshness>,
    pub backlog_live: Option<BacklogLive>,
    /// The full rescoring after a tick (absent in older reports).
    #[serde(default)]
    pub tick: Option<tick::TickRun>,
    /// A worker starting on the pre-loaded state (only with `--preload-members`).
    #[serde(default)]
    pub takeover: Option<takeover::TakeoverRun>,
}

/// Quantiles without observations are NaN, which JSON writes as null: read null back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn suffix() -> String {
    format!("{:x}", rand::random::<u32>())
}

/// Creates the five configured topics with `partitions` partitions, replication 1 (a broker on
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
        &t.rescore_requests,
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
    s.topics.rescore_requests = format!("bench-{id}-requests");
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
        watch: None,
        kafka_time: false,
        stop: None,
    }
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
        events = m.input_events();
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
    let once = if label == "default" {
        Some(once_per_trigger(&s, opts).await?)
    } else {
        None
    };
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
        once_per_trigger_rows_per_event: once,
    };
    eprintln!(
        "  {label}: {:.0} events/s, {:.0} pairs/s, {:.2} rows/event, RSS {:.0} MiB",
        d.events_per_s, d.pairs_per_s, d.rows_per_event, d.peak_rss_mib
    );
    Ok(d)
}

/// A backlog of `backlog_minutes` of traffic at `rate` (stamped as if produced over those
/// minutes), then the worker starts and live traffic at `rate` runs on top until the backlog is
/// consumed and less than a second of live traffic is behind (plus 5 s), or the phase limit.
pub async fn backlog_live(
    base: &Settings,
    opts: &BenchOptions,
    rate: u64,
) -> anyhow::Result<BacklogLive> {
    let s = phase_settings(base, opts.partitions).await?;
    preload(&s, opts).await?;
    let rate = rate.max(1);
    let backlog = (rate as f64 * 60.0 * opts.backlog_minutes) as u64;
    let span_ms = (opts.backlog_minutes * 60_000.0) as i64;
    let mut lo = load_options(opts, 0, backlog, 0, false);
    lo.event_time = Some((
        crate::worker::chrono_now_ms() - span_ms,
        (span_ms / backlog.max(1) as i64).max(1),
    ));
    lo.kafka_time = true;
    loadgen(&s, &lo).await?;
    let backlog_end = committed::BacklogEnd::now(&s, opts.partitions).await?;
    eprintln!("  backlog of {backlog} events written; live traffic at {rate}/s on top");

    let worker = WorkerProcess::start(&s, &[]).await?;
    let started = Instant::now();
    worker.wait_ready().await?;
    let ready_after = started.elapsed().as_secs_f64();
    // Live events sent before the split wait for the whole backlog: watched as long as the phase.
    let (tx, stop_watch, seen) =
        watcher(&s, Duration::from_secs(opts.phase_limit_secs.max(30))).await?;
    let stop_live = tokio_util::sync::CancellationToken::new();
    let mut live = load_options(opts, rate, 0, opts.phase_limit_secs, false);
    live.seed = 43;
    live.watch = Some((WATCH_EVERY, tx));
    live.stop = Some(stop_live.clone());
    let live_settings = s.clone();
    let live_task = tokio::spawn(async move { loadgen(&live_settings, &live).await });

    let limit = Duration::from_secs(opts.phase_limit_secs);
    let mut series = Vec::new();
    let mut prev = worker.scrape().await?;
    let mut drained_at: Option<f64> = None;
    let mut done_at: Option<f64> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let m = worker.scrape().await?;
        let t = started.elapsed().as_secs_f64();
        let sample = Sample {
            t,
            lag_messages: m.sum("rescorer_consumer_lag"),
            lag_seconds: m.max("rescorer_consumer_lag_seconds"),
            live_p99_ms: m.interval_quantile(
                &prev,
                "rescorer_event_to_score_seconds",
                "lane=\"live\"",
                0.99,
            ) * 1000.0,
            catchup_partitions: m.sum("rescorer_catchup_partitions"),
            events: m.input_events(),
        };
        // Drained: the backlog consumed, no partition split, and less than a second of live
        // traffic behind (the age of the oldest unfinished message also counts fan-outs held by
        // their interval, so it is not the test).
        if drained_at.is_none()
            && sample.events >= backlog as f64
            && sample.catchup_partitions == 0.0
            && sample.lag_messages < rate as f64
        {
            drained_at = Some(t);
            eprintln!("  drained after {t:.1} s");
        }
        if done_at.is_none() && backlog_end.reached().await {
            done_at = Some(t);
            eprintln!("  backlog done (every message committed) after {t:.1} s");
        }
        series.push(sample);
        prev = m;
        // A minute past the backlog's end shows what live traffic alone keeps behind.
        if drained_at.is_some_and(|d| t - d > 5.0)
            || done_at.is_some_and(|d| t - d > 60.0)
            || started.elapsed() > limit
        {
            break;
        }
    }
    stop_live.cancel();
    let live_sent = live_task.await??.sent;
    stop_watch.cancel();
    let observed = seen.await?;
    let m = worker.scrape().await?;
    let rss = worker.peak_rss_mib();
    worker.stop().await;
    let q = |lane: &str, p| {
        m.histogram_quantile_where(
            "rescorer_event_to_score_seconds",
            &format!("lane=\"{lane}\""),
            p,
        ) * 1000.0
    };
    // Samples sent before the backlog was done (the watcher's clock starts at readiness).
    let until = done_at.or(drained_at).unwrap_or(f64::INFINITY) - ready_after;
    let during = watch::Observed {
        points: observed
            .points
            .iter()
            .copied()
            .filter(|p| p.0 <= until)
            .collect(),
        unobserved: observed.unobserved,
    };
    let b = BacklogLive {
        live_rate: rate,
        backlog_events: backlog,
        live_sent,
        drained_after_s: drained_at,
        backlog_done_after_s: done_at,
        worker_live_p50_ms: q("live", 0.5),
        worker_live_p95_ms: q("live", 0.95),
        worker_live_p99_ms: q("live", 0.99),
        worker_backlog_p50_ms: q("backlog", 0.5),
        seen_during_drain: Seen::of(&during),
        peak_rss_mib: rss,
        series,
        seen_points: observed
            .points
            .iter()
            .map(|p| (p.0 + ready_after, p.1))
            .collect(),
    };
    eprintln!(
        "  live events while draining: worker p50 {:.1} ms, p99 {:.1} ms; seen in Redis p50 {:.1} ms, p99 {:.1} ms ({} samples)",
        b.worker_live_p50_ms,
        b.worker_live_p99_ms,
        b.seen_during_drain.p50_ms,
        b.seen_during_drain.p99_ms,
        b.seen_during_drain.samples
    );
    Ok(b)
}

pub async fn run(base: &Settings, opts: &BenchOptions) -> anyhow::Result<Report> {
    eprintln!("ceilings");
    let scorer = Scorer::load(&base.model, Metrics::new())?;
    let model = ceilings::model(&scorer, base.batch.max_pairs, 3.0)?;
    let store = ceilings::scratch_store(base, &format!("benchceil{}", suffix())).await?;
    // Members as large as the stored state (the set sizes the worker's writes meet).
    let stored_per_member = if opts.preload_members > 0 {
        opts.preload_per_member
    } else {
        0
    };
    let redis = ceilings::redis(&store, stored_per_member, 3.0).await?;
    let redis_settings = ceilings::redis_settings(&store).await?;
    let apply_store = ceilings::scratch_store(base, &format!("benchapply{}", suffix())).await?;
    let apply =
        ceilings::apply(&apply_store, opts.members, opts.candidates, opts.zipf, 3.0).await?;
    let plain = ceilings::plain_writes(&store, 3.0).await?;
    let cs = phase_settings(base, opts.partitions).await?;
    let consume =
        ceilings::consume(&cs, &cs.topics.feature_updates, opts.backlog.max(50_000)).await?;
    let (broker_p50, broker_p99) =
        ceilings::broker_latency(&cs, &cs.topics.new_candidates, 5.0).await?;
    let ceilings = ceilings::Ceilings {
        consume_msgs_per_s: consume,
        model_rows_per_s: model,
        redis_pairs_per_s: redis,
        redis_samples: vec![redis],
        redis_apply_events_per_s: apply,
        broker_p50_ms: broker_p50,
        broker_p99_ms: broker_p99,
        redis_plain_writes_per_s: plain,
    };
    eprintln!("  consume {consume:.0} msgs/s, model {model:.0} rows/s, redis {redis:.0} pairs/s, state writes {apply:.0} events/s, plain ZADD {plain:.0}/s; broker produce→consume p50 {broker_p50:.0} ms, p99 {broker_p99:.0} ms");

    eprintln!("backlog drains ({} events)", opts.backlog);
    let sustained = drain(base, opts, "default", &[]).await?;
    // The Redis ceiling again, right after the drain, on fresh keys.
    let store = ceilings::scratch_store(base, &format!("benchceil{}", suffix())).await?;
    let redis_after = ceilings::redis(&store, stored_per_member, 3.0).await?;
    let mut ceilings = ceilings;
    ceilings.redis_samples.push(redis_after);
    ceilings.redis_pairs_per_s = (redis + redis_after) / 2.0;
    eprintln!(
        "  redis ceiling after the drain {redis_after:.0} pairs/s (mean {:.0})",
        ceilings.redis_pairs_per_s
    );
    let mut report = Report {
        machine: format!(
            "{}, model on {}; {redis_settings}",
            machine(),
            scorer.engine().device().as_str()
        ),
        preloaded_pairs: opts.preload_members * opts.preload_per_member,
        backlog_events: opts.backlog,
        partitions: opts.partitions,
        ceilings,
        sustained,
        no_coalescing: None,
        batch_default: base.batch.max_pairs,
        batch_sizes: Vec::new(),
        freshness: Vec::new(),
        backlog_live: None,
        tick: None,
        takeover: None,
    };
    if opts.tick_members > 0 {
        eprintln!("a full rescoring after a tick");
        report.tick = Some(tick::tick_rescore(base, opts).await?);
    }
    if opts.preload_members > 0 {
        eprintln!("a takeover of the stored state");
        report.takeover = Some(takeover::takeover(base, opts).await?);
    }
    if opts.drain_only {
        return Ok(report);
    }
    report.no_coalescing = Some(
        drain(
            base,
            opts,
            "coalescing off",
            &["batch.coalesce=false".into()],
        )
        .await?,
    );
    for &b in &opts.batch_sizes {
        let d = drain(
            base,
            opts,
            &format!("batch size {b}"),
            // Both lanes: a drain's backlog is split off and written in backlog windows.
            &[
                format!("batch.max_pairs={b}"),
                format!("catchup.max_pairs={b}"),
            ],
        )
        .await?;
        report.batch_sizes.push((b, d));
    }

    eprintln!("freshness, open loop");
    for fraction in [0.25, 0.5, 0.8] {
        let rate = (report.sustained.events_per_s * fraction) as u64;
        report
            .freshness
            .push(freshness(base, opts, fraction, rate).await?);
    }

    eprintln!("backlog with live traffic on top");
    let live_rate = (report.sustained.events_per_s * opts.live_fraction) as u64;
    report.backlog_live = Some(backlog_live(base, opts, live_rate).await?);
    Ok(report)
}
fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {}", crate::cli::bench_model::cpu_name())
}
