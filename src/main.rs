use std::io::{BufReader, IsTerminal};

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use rescorer::config::{Device, ModelSettings, Settings};
use rescorer::metrics::Metrics;
use rescorer::score::Scorer;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Nearline rescoring worker: Kafka events in, fresh top-K Catch Up scores in Redis.
#[derive(Parser)]
#[command(name = "rescorer", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker: consume the three topics, keep top-K scores in Redis fresh.
    Run {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Publish one decay tick (event time `--ts`, default now) to every partition of the ticks topic.
    Tick {
        #[command(flatten)]
        config: ConfigArgs,
        /// Event time of the tick, ms since the epoch.
        #[arg(long)]
        ts: Option<i64>,
    },
    /// Zero-setup first run: embedded broker, local redis-server, synthetic traffic, live progress.
    Demo {
        /// Seconds of traffic.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Events per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 5000)]
        members: usize,
        #[arg(long, default_value_t = 5000)]
        candidates: usize,
        #[arg(long, default_value = "models/catchup-ranker.json")]
        spec: PathBuf,
    },
    /// Publish synthetic Catch Up traffic to the configured topics.
    Loadgen {
        #[command(flatten)]
        config: ConfigArgs,
        /// Events per second; 0 publishes as fast as the broker takes them.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Stop after this many events (0: no limit). With --rate 0 this pre-loads a backlog.
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Stop after this many seconds (0: no limit).
        #[arg(long, default_value_t = 0)]
        seconds: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[command(flatten)]
        traffic: TrafficArgs,
        /// Percent of member feature updates.
        #[arg(long, default_value_t = 25)]
        member_updates: u32,
        /// Percent of candidate feature updates.
        #[arg(long, default_value_t = 15)]
        candidate_updates: u32,
        /// Percent of removals (the rest are new candidates).
        #[arg(long, default_value_t = 5)]
        removals: u32,
    },
    /// Topic administration.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Score pairs given as JSON lines (stdin or a file) and print one score per line.
    Score {
        #[command(flatten)]
        model: ModelArgs,
        /// JSON-lines input; `-` or absent reads stdin.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Pairs per model run.
        #[arg(long, default_value_t = 1024)]
        batch_size: usize,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create the topics in topics/topics.toml that are missing; report drift of the others.
    Apply {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, default_value = "topics/topics.toml")]
        topics: PathBuf,
        /// Replication factor for every topic created (e.g. 1 on a single-broker cluster).
        #[arg(long)]
        replication_factor: Option<i32>,
        /// Exit with status 3 when an existing topic differs from its definition.
        #[arg(long)]
        fail_on_drift: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The worker end to end against the configured broker and Redis, with ceilings, drains,
    /// ablations and open-loop freshness (scripts/bench.sh runs it on local services).
    E2e {
        #[command(flatten)]
        config: ConfigArgs,
        /// Events pre-loaded for each drain.
        #[arg(long, default_value_t = 100_000)]
        backlog: u64,
        /// Members with pairs stored before each run (ids m0.., shared with the traffic).
        #[arg(long, default_value_t = 0)]
        preload_members: usize,
        /// Candidates stored per pre-loaded member.
        #[arg(long, default_value_t = 100)]
        preload_per_member: usize,
        /// Partitions per topic of the scratch topics.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// Seconds of open-loop traffic per freshness level.
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        /// Seconds of the same traffic before each freshness level's measured seconds (another
        /// seed), so that the level measures a worker whose cache has warmed up; 0: none.
        #[arg(long, default_value_t = 0)]
        warmup: u64,
        /// Batch sizes drained besides the default (the ablation; comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,16,128")]
        batch_sizes: Vec<usize>,
        /// Backlog + live phase: live traffic at this fraction of the drained rate...
        #[arg(long, default_value_t = 0.1)]
        live_fraction: f64,
        /// ...on top of a backlog of this many minutes of that traffic.
        #[arg(long, default_value_t = 10.0)]
        backlog_minutes: f64,
        /// Longest a backlog phase may run, seconds.
        #[arg(long, default_value_t = 300)]
        phase_limit: u64,
        /// Only the ceilings and the default drain (e.g. peak RSS with a large stored state), then
        /// the full rescoring after a tick.
        #[arg(long)]
        drain_only: bool,
        /// Members in the tick phase (50 pairs each): their pairs are stored through the worker,
        /// then one tick makes every pair due and the phase times the full rescoring. 0 skips it.
        #[arg(long, default_value_t = 4000)]
        tick_members: usize,
        /// Only the backlog + live phase, with live traffic at this many events/s (no ceilings
        /// or other phases; for studying catch-up).
        #[arg(long, conflicts_with = "drain_only")]
        backlog_live_rate: Option<u64>,
        /// Only open-loop freshness phases, at these events/s (comma-separated; no ceilings or
        /// other phases).
        #[arg(long, value_delimiter = ',', conflicts_with_all = ["drain_only", "backlog_live_rate"])]
        freshness_rates: Vec<u64>,
        #[command(flatten)]
        traffic: TrafficArgs,
        /// Where the model runs, for the model ceiling and the worker (overrides `model.device`).
        #[arg(long, value_enum)]
        device: Option<Device>,
        /// Write the report here as JSON, and as markdown beside it (`.md`).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Redraws the plots of an end-to-end report (JSON written by `bench e2e --out`).
    Plot {
        /// The report; the SVG files are written beside it.
        report: PathBuf,
    },
    /// Model rows/s and batch latency per batch size.
    Model {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated batch sizes.
        #[arg(long, value_delimiter = ',', default_value = "1,64,1024,8192")]
        batch_sizes: Vec<usize>,
        /// Seconds of measurement per batch size.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Write the report as JSON here (and the markdown table beside it, `.md`).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Who the synthetic traffic is about (shared by `loadgen` and `bench e2e`).
#[derive(Args)]
struct TrafficArgs {
    /// Distinct members (ids m0..).
    #[arg(long, default_value_t = 100_000)]
    members: usize,
    /// Distinct candidates (ids c0..).
    #[arg(long, default_value_t = 100_000)]
    candidates: usize,
    /// Zipf exponent of who gets events (hot members and candidates).
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
}

/// The settings file and overrides.
#[derive(Args)]
struct ConfigArgs {
    /// TOML settings file (see rescorer.example.toml); environment RESCORER__SECTION__FIELD
    /// overrides it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one setting, e.g. `--set batch.max_pairs=512` (repeatable; wins over the
    /// environment).
    #[arg(long = "set", value_name = "SECTION.FIELD=VALUE")]
    set: Vec<String>,
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<Settings> {
        Ok(Settings::load(
            self.config.as_deref(),
            std::env::vars(),
            &self.set,
        )?)
    }
}

/// Model flags shared by the commands that load the model without a config file.
#[derive(Args)]
struct ModelArgs {
    /// The feature spec (it names the ONNX file).
    #[arg(long, default_value = "models/catchup-ranker.json")]
    spec: PathBuf,
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// ONNX Runtime threads inside one operator.
    #[arg(long, default_value_t = 1)]
    intra_threads: usize,
    /// Path to libonnxruntime.so (default: ORT_DYLIB_PATH).
    #[arg(long)]
    runtime_library: Option<PathBuf>,
}

impl ModelArgs {
    fn settings(&self) -> anyhow::Result<ModelSettings> {
        let s = ModelSettings {
            spec: self.spec.clone(),
            device: self.device,
            runtime_library: self.runtime_library.clone(),
            intra_threads: self.intra_threads,
            ..ModelSettings::default()
        };
        s.validate(std::path::Path::new("(command line)"))?;
        Ok(s)
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own progress; logs only for problems unless RUST_LOG says otherwise.
    init_tracing(match cli.command {
        Command::Demo { .. } => "warn,ort=warn",
        _ => "info,ort=warn",
    });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a benchmark's markdown and, with `--out`, writes it as JSON there and markdown beside it.
fn write_report(
    out: Option<&std::path::Path>,
    report: &impl serde::Serialize,
    markdown: &str,
) -> anyhow::Result<()> {
    println!("{markdown}");
    if let Some(out) = out {
        std::fs::write(out, serde_json::to_string_pretty(report)? + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
        let md = out.with_extension("md");
        std::fs::write(&md, markdown).with_context(|| format!("writing {}", md.display()))?;
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let settings = config.load()?;
            runtime()?.block_on(async {
                let shutdown = tokio_util::sync::CancellationToken::new();
                rescorer::app::cancel_on_signals(shutdown.clone());
                rescorer::app::run_worker(settings, Metrics::new(), shutdown).await
            })
        }
        Command::Demo {
            seconds,
            rate,
            members,
            candidates,
            spec,
        } => runtime()?.block_on(rescorer::demo::run(rescorer::demo::DemoOptions {
            seconds,
            rate,
            members,
            candidates,
            partitions: 4,
            model_spec: spec,
        })),
        Command::Loadgen {
            config,
            rate,
            count,
            seconds,
            seed,
            traffic:
                TrafficArgs {
                    members,
                    candidates,
                    zipf,
                },
            member_updates,
            candidate_updates,
            removals,
        } => {
            let settings = config.load()?;
            anyhow::ensure!(
                member_updates + candidate_updates + removals <= 100,
                "the mix percentages exceed 100"
            );
            let opts = rescorer::cli::loadgen::LoadgenOptions {
                rate,
                count,
                seconds,
                seed,
                members,
                candidates,
                zipf,
                mix: rescorer::traffic::Mix {
                    member_updates,
                    candidate_updates,
                    removals,
                },
                event_time: None,
                watch: None,
                kafka_time: false,
                stop: None,
            };
            let report = runtime()?.block_on(rescorer::cli::loadgen::run(&settings, &opts))?;
            println!(
                "published {} events in {:.1} s ({:.0} events/s)",
                report.sent,
                report.seconds,
                report.sent as f64 / report.seconds.max(1e-9)
            );
            Ok(())
        }
        Command::Topics(TopicsCommand::Apply {
            config,
            topics,
            replication_factor,
            fail_on_drift,
        }) => {
            let settings = config.load()?;
            let file = rescorer::cli::topics::TopicsFile::load(&topics)?;
            let rt = runtime()?;
            let results = rt.block_on(rescorer::cli::topics::apply(
                &settings,
                &file,
                replication_factor,
            ))?;
            let counts = rt.block_on(rescorer::cli::topics::partition_counts(&settings))?;
            let mismatch = rescorer::cli::topics::count_mismatch(&counts);
            let mut drifted = false;
            if let Some(why) = &mismatch {
                drifted = settings.state.mode == rescorer::config::StateMode::Owned;
                println!("{}: {why}", if drifted { "DRIFT" } else { "note" });
            }
            for (name, status) in results {
                match status {
                    rescorer::cli::topics::TopicStatus::Created => println!("{name}: created"),
                    rescorer::cli::topics::TopicStatus::UpToDate => println!("{name}: up to date"),
                    rescorer::cli::topics::TopicStatus::Drift(d) => {
                        drifted = true;
                        println!("{name}: DRIFT (left unchanged): {}", d.join("; "));
                    }
                }
            }
            if drifted && fail_on_drift {
                std::process::exit(3);
            }
            Ok(())
        }
        Command::Tick { config, ts } => {
            let settings = config.load()?;
            let ts = ts.unwrap_or_else(rescorer::worker::chrono_now_ms);
            anyhow::ensure!(ts >= 0, "--ts must be a non-negative time in ms");
            runtime()?.block_on(async {
                let producer = rescorer::app::producer(&settings)?;
                let n = rescorer::tick::publish(&settings, &producer, ts).await?;
                println!(
                    "published tick ts={ts} to {n} partition(s) of {}",
                    settings.topics.decay_ticks
                );
                Ok(())
            })
        }
        Command::Score {
            model,
            input,
            batch_size,
        } => {
            anyhow::ensure!(batch_size > 0, "--batch-size must be at least 1");
            let scorer = Scorer::load(&model.settings()?, Metrics::new())?;
            let stdout = std::io::stdout().lock();
            match input {
                Some(p) if p.as_os_str() != "-" => {
                    let f = std::fs::File::open(&p)
                        .with_context(|| format!("opening {}", p.display()))?;
                    rescorer::cli::score::run(&scorer, BufReader::new(f), stdout, batch_size)
                }
                _ => {
                    rescorer::cli::score::run(&scorer, std::io::stdin().lock(), stdout, batch_size)
                }
            }
        }
        Command::Bench(BenchCommand::E2e {
            config,
            backlog,
            preload_members,
            preload_per_member,
            partitions,
            seconds,
            warmup,
            batch_sizes,
            live_fraction,
            backlog_minutes,
            phase_limit,
            drain_only,
            tick_members,
            backlog_live_rate,
            freshness_rates,
            traffic:
                TrafficArgs {
                    members,
                    candidates,
                    zipf,
                },
            device,
            out,
        }) => {
            let mut settings = config.load()?;
            if let Some(device) = device {
                settings.model.device = device;
            }
            let opts = rescorer::bench::BenchOptions {
                preload_members,
                preload_per_member,
                backlog,
                partitions,
                freshness_seconds: seconds,
                freshness_warmup_seconds: warmup,
                batch_sizes,
                live_fraction,
                backlog_minutes,
                phase_limit_secs: phase_limit,
                drain_only,
                tick_members,
                members,
                candidates,
                zipf,
            };
            if let Some(rate) = backlog_live_rate {
                let phase =
                    runtime()?.block_on(rescorer::bench::backlog_live(&settings, &opts, rate))?;
                return write_report(out.as_deref(), &phase, &phase.markdown());
            }
            if !freshness_rates.is_empty() {
                let levels = runtime()?.block_on(rescorer::bench::freshness_levels(
                    &settings,
                    &opts,
                    &freshness_rates,
                ))?;
                let md = rescorer::bench::freshness_table(&levels);
                return write_report(out.as_deref(), &levels, &md);
            }
            let report = runtime()?.block_on(rescorer::bench::run(&settings, &opts))?;
            write_report(out.as_deref(), &report, &report.markdown())?;
            if let Some(out) = out.as_deref() {
                for p in rescorer::bench::plot::write(&report, out)? {
                    eprintln!("wrote {}", p.display());
                }
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Plot { report }) => {
            let text = std::fs::read_to_string(&report)
                .with_context(|| format!("reading {}", report.display()))?;
            let parsed: rescorer::bench::Report = serde_json::from_str(&text)
                .with_context(|| format!("parsing {} as an e2e report", report.display()))?;
            for p in rescorer::bench::plot::write(&parsed, &report)? {
                println!("wrote {}", p.display());
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Model {
            model,
            batch_sizes,
            seconds,
            out,
        }) => {
            anyhow::ensure!(
                batch_sizes.iter().all(|&b| b > 0),
                "--batch-sizes must all be at least 1"
            );
            let settings = model.settings()?;
            let scorer = Scorer::load(&settings, Metrics::new())?;
            let report = rescorer::cli::bench_model::run(
                &scorer,
                &batch_sizes,
                seconds,
                settings.intra_threads,
            )?;
            write_report(out.as_deref(), &report, &report.markdown())
        }
    }
}
