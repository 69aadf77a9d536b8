//! kill -9 in the middle of a drain: the worker binary, killed at random moments while it drains
//! a batched stream with candidate fan-outs and decay ticks in flight, and restarted each time,
//! ends with exactly the scores of the final state (the same as a replay from scratch into an
//! empty Redis: `tests/worker_guarantees.rs` checks that a replay reproduces them).
//!
//! It runs on tansu's SQLite engine with batched producers, so restarts resume inside record
//! batches, and it audits every resume: the first offset each instance was delivered of a
//! partition must be the one committed when it started. If that audit fails, the broker lost
//! records, not the worker (`tests/broker.rs`).
//!
//! What it showed (tansu 0.6.0, two cores; seed 24, 20 kills, 8,000 events):
//! - SQLite engine: about 70 s; 8 and 4 partition resumes from a commit inside a batched send
//!   (two runs), each delivered from its committed offset; scores exact.
//! - Memory engine, by hand (`cargo test --test worker_crash -- --ignored`), twice: 11 and 10
//!   partition resumes inside a batch, and every one was delivered from the next batch: the
//!   rest of the batch (54 to 93 records in the second run) lost in the broker, all on the
//!   feature-updates topic, where candidate updates wait for their fan-outs. The audit fails;
//!   the final scores were still exact.
//!
//! Why the worker stayed exact on the memory engine (in earlier manual kill -9 runs too) while a
//! plain consumer lost records: nothing in the worker aligns commits or resumes to batch starts.
//! The committed offset is the per-message contiguous watermark (`src/offsets.rs`), which stops
//! inside a batch wherever a message is still pending (before fan-out intents were recorded in
//! Redis, typically a candidate update waiting for its fan-out; now, a batch taken in over several
//! intakes, which this drill forces with small windows); auto-commit takes it as it stands. But
//! the watermark cannot pass a message the group's reader has not delivered, and intake
//! (`take_fetched` in `src/worker/intake.rs`) takes everything librdkafka has fetched, whole
//! batches, and applies it to Redis in one round trip before any of it is done. So a commit
//! inside a batch lies in a batch the killed instance had already applied in full: every record
//! the broker skipped above had been taken in before the kill. What was lost was only the work
//! they triggered (member rescorings, fan-outs), which later events and the final tick (every
//! scheduled pair rescored from the stored state) redo: superseded, not recovered. The scores
//! would go wrong for a batch split across intakes by a full window (records never applied),
//! or a new pair applied but never scored (its decay-schedule entry is written with its score)
//! and never touched again; neither happened here. The head reader of a split partition starts
//! at the log end, not at a commit, and a first message past its split point extends the
//! backlog to it (`received_head`), so the group's reader covers any gap there. The earlier
//! restart and rebalance tests produced one record per batch (`linger.ms=0`, each send awaited)
//! and so never resumed inside a batch at all; batched and on the memory engine, the rebalance
//! and SIGTERM tests of `tests/worker_guarantees.rs` still pass (a graceful stop commits what it
//! took in, which ends at a fetched batch's end), so only this audit shows the defect.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use common::harness::Harness;
use common::process::WorkerProcess;
use common::scenario::Scenario;
use common::services::Engine;
use rescorer::config::StateMode;

const T0: i64 = 1_764_000_000_000;

/// Kills (and restarts) per run. Issue 17 asked for 20; each costs a start-up, a group rejoin
/// (the dead member's 3 s session runs out first) and part of a drain: about 3.5 s on two cores,
/// so the test takes about 70 s.
const KILLS: usize = 20;

/// Events in the stream: a slice of it (400 events: 80 to 120 records a partition, in one or a few batches) is
/// produced as each instance starts, so every instance has batches to drain when it is killed.
const EVENTS: usize = 8000;

/// An instance that takes in nothing for this long is killed anyway (it has caught up).
const STALL: Duration = Duration::from_secs(3);

/// Settings every instance gets on top of the test's: a killed member's partitions go to the
/// next instance after a short session timeout (librdkafka's default, 45 s, would make each
/// restart wait that long for the dead member), and offsets are committed every 100 ms, so the
/// commit a restart resumes from is where the watermark stood just before the kill, wherever in
/// a batch that is (at the default 1 s, an instance killed early commits nothing).
///
/// Windows of at most 8 pairs make intake take a few messages at a time, so a fetched record
/// batch is taken in over many intakes and the watermark stands inside it most of the time (a
/// candidate update no longer holds it there: its fan-out intent is recorded in Redis and its
/// offset stored at once).
fn sets() -> Vec<String> {
    vec![
        "batch.max_pairs=8".into(),
        "kafka.options.session.timeout.ms=\"3000\"".into(),
        "kafka.options.heartbeat.interval.ms=\"300\"".into(),
        "kafka.options.auto.commit.interval.ms=\"100\"".into(),
    ]
}

/// Log filter of every instance: `event handled` lines (topic, partition, offset) for the audit.
const LOG: &str = "info,ort=warn,rescorer::internal_events=debug";

/// Where each instance resumed against where its group had committed: the case the drill is for
/// (a resume inside a record batch) and what the broker made of it.
/// (topic, partition, offset).
type At = (String, i32, i64);

#[derive(Default)]
struct ResumeAudit {
    /// Per instance: the group's committed offsets when it started.
    starts: Vec<HashMap<(String, i32), i64>>,
    /// Per instance: every (topic, partition, offset) it took in (applied to Redis), and whether
    /// it split a partition (its head reader then starts at the log end, not at the commit).
    handled: Vec<(HashSet<At>, bool)>,
    /// Offsets where a slice of the stream (one batched send, so one or a few record batches per
    /// partition) ends: a commit elsewhere lies inside a slice.
    boundaries: HashSet<At>,
}

/// Offsets `[from, to)` of a partition that an instance resumed at `from` was never delivered.
struct Skip {
    instance: usize,
    topic: String,
    partition: i32,
    from: i64,
    to: i64,
    /// How many of them an earlier instance had taken in (applied to Redis) before its kill.
    applied_before: usize,
}

impl std::fmt::Debug for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "instance {} resumed {}/{} at {} and was delivered {} first ({} of the {} skipped \
             taken in before the kill)",
            self.instance,
            self.topic,
            self.partition,
            self.from,
            self.to,
            self.applied_before,
            self.to - self.from
        )
    }
}

impl ResumeAudit {
    /// Reads an instance's log: what it took in. Topic labels are mapped back to `names`.
    fn read_log(&mut self, log: &Path, names: &HashMap<&str, String>) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let split = text.contains("partition far behind");
        let mut handled = HashSet::new();
        // What it took in: an outcome, or (owned state) the receipt logged before any outcome.
        let taken = |l: &&str| l.contains("event handled") || l.contains("message received");
        for line in text.lines().filter(taken) {
            let field = |k: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
                    .map(|v| v.trim_matches('"').to_owned())
            };
            let (Some(t), Some(p), Some(o)) = (field("topic"), field("partition"), field("offset"))
            else {
                continue;
            };
            let (Some(topic), Ok(p), Ok(o)) = (names.get(t.as_str()), p.parse(), o.parse()) else {
                continue;
            };
            handled.insert((topic.clone(), p, o));
        }
        self.handled.push((handled, split));
    }

    /// Instances delivered, as their first message of a partition, a later offset than the one
    /// committed when they started.
    fn skips(&self) -> Vec<Skip> {
        let mut out = Vec::new();
        for (i, (start, (handled, split))) in self.starts.iter().zip(&self.handled).enumerate() {
            if *split {
                continue;
            }
            for ((topic, partition), &from) in start {
                let first = handled
                    .iter()
                    .filter(|(t, p, _)| t == topic && p == partition)
                    .map(|(_, _, o)| *o)
                    .min();
                let Some(to) = first.filter(|f| *f > from) else {
                    continue;
                };
                let applied_before = (from..to)
                    .filter(|o| {
                        self.handled[..i]
                            .iter()
                            .any(|(h, _)| h.contains(&(topic.clone(), *partition, *o)))
                    })
                    .count();
                out.push(Skip {
                    instance: i,
                    topic: topic.clone(),
                    partition: *partition,
                    from,
                    to,
                    applied_before,
                });
            }
        }
        out
    }

    /// Notes where the slices of `topics` produced so far end.
    fn slice_ends(&mut self, produced: &HashMap<(String, i32), i64>, topics: &[&String]) {
        for ((t, p), end) in produced.iter().filter(|((t, _), _)| topics.contains(&t)) {
            self.boundaries.insert((t.clone(), *p, *end));
        }
    }

    /// Partition resumes (instance, topic, partition) from a commit that lies inside a slice of
    /// the stream (ticks, one record per batch, are not counted).
    fn inside_slices(&self) -> usize {
        self.starts
            .iter()
            .flat_map(|start| start.iter())
            .filter(|((t, p), o)| {
                **o > 0
                    && self.boundaries.iter().any(|(bt, bp, _)| bt == t && bp == p)
                    && !self.boundaries.contains(&(t.clone(), *p, **o))
            })
            .count()
    }
}

/// Drains `EVENTS` events under `KILLS` kill -9 and restarts on the broker `engine`, then
/// checks every stored score against the final state.
async fn drain_under_kill_9(engine: Engine, seed: u64, mode: StateMode) {
    let started = Instant::now();
    let mut h = Harness::with_engine(engine, 2).await;
    h.settings.state.mode = mode;
    let scorer = common::scorer();
    let s = Scenario::generate(seed, EVENTS, 24, 30, T0);
    let logs = tempfile::tempdir().expect("temp dir");
    let mut rng = SmallRng::seed_from_u64(seed);
    let topics = &h.settings.topics;
    let names: HashMap<&str, String> = [
        ("feature_updates", topics.feature_updates.clone()),
        ("new_candidates", topics.new_candidates.clone()),
        ("decay_ticks", topics.decay_ticks.clone()),
    ]
    .into();
    let mut audit = ResumeAudit::default();
    let reader = h.offset_reader();
    let slice = EVENTS / KILLS;
    for i in 0..KILLS {
        let log = logs.path().join(format!("worker-{i}.log"));
        let start = h.committed_with(&reader).await;
        audit.starts.push(start.clone());
        let mut w = WorkerProcess::spawn_logging(&h.settings, &sets(), LOG, &log);
        // The next slice, batched, and a tick as of its last event: produced while the worker
        // starts, so it has batches, fan-outs and a tick's rescorings in flight when killed.
        let range = i * slice..(i + 1) * slice;
        s.send_batched(&h, range.clone()).await;
        audit.slice_ends(
            &h.produced(),
            &[&topics.feature_updates, &topics.new_candidates],
        );
        h.tick(T0 + (range.end as i64 - 1) * 60_000).await;
        // Killed part-way through its drain: once its commits have covered a random share of
        // what it has to drain (or it has committed nothing new for a while).
        w.wait_consuming(Duration::from_secs(60)).await;
        let total = |c: &HashMap<(String, i32), i64>| c.values().sum::<i64>();
        let backlog = total(&h.produced()) - total(&start);
        let kill_at = total(&start) + rng.random_range(1..backlog.max(2));
        let (mut seen, mut since) = (total(&start), Instant::now());
        loop {
            w.assert_running();
            let n = total(&h.committed_with(&reader).await);
            if n >= kill_at || since.elapsed() > STALL {
                break;
            }
            if n > seen {
                (seen, since) = (n, Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w.kill_9().await;
        // A commit the instance sent just before it died may still reach the broker (later on a
        // loaded machine): the next resume point is read once the committed offsets have held
        // still for a second (nothing else commits until the next instance starts).
        let mut last = h.committed_with(&reader).await;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = h.committed_with(&reader).await;
            if now == last {
                break;
            }
            last = now;
        }
        audit.read_log(&log, &names);
    }
    let log = logs.path().join("worker-last.log");
    audit.starts.push(h.committed().await);
    let last = WorkerProcess::spawn_logging(&h.settings, &sets(), LOG, &log);
    s.send_batched(&h, KILLS * slice..s.events.len()).await;
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    assert!(last.sigterm(Duration::from_secs(30)).await.success());
    audit.read_log(&log, &names);
    let skips = audit.skips();
    eprintln!(
        "{KILLS} kills over {EVENTS} events on the {engine:?} engine: drained in {:?}; {} \
         partition resumes from a commit inside a slice of the stream, {} delivered from past \
         the commit: {skips:?}",
        started.elapsed(),
        audit.inside_slices(),
        skips.len(),
    );
    s.check(&h, &scorer, t);
    assert!(
        audit.inside_slices() > 0,
        "no restart resumed inside a batch: the drill missed the case it is for"
    );
    assert!(
        skips.is_empty(),
        "the broker skipped records after a committed offset (a resume inside a batch on tansu's \
         memory engine): it lost them, not the worker: {skips:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_during_a_drain_leaves_exactly_the_final_scores() {
    drain_under_kill_9(Engine::Sqlite, 24, StateMode::Remote).await;
}

/// The same drill with owned state: killed with members in memory, windows half written,
/// candidate fan-outs' requests partly produced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_leaves_exactly_the_final_scores_with_owned_state() {
    drain_under_kill_9(Engine::Sqlite, 25, StateMode::Owned).await;
}

/// The same drill on tansu's memory engine, by hand only (`cargo test --test worker_crash --
/// --ignored`): it is expected to fail, the broker losing the rest of a batch a restarted
/// worker resumes inside. It shows the drill reaches that case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "by hand: shows the memory engine's defect (expected to fail)"]
async fn the_same_drill_on_the_memory_engine_loses_records_in_the_broker() {
    drain_under_kill_9(Engine::Memory, 24, StateMode::Remote).await;
}
