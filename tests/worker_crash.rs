//! kill -9 in the middle of a drain: the worker binary, killed at random moments while it drains
//! a batched stream with candidate fan-outs and decay ticks in flight, and restarted each time,
//! ends with exactly the scores of the final state (the same as a replay from scratch into an
//! empty Redis: `tests/worker_guarantees.rs` checks that a replay reproduces them).
//!
//! FINDINGS

mod common;

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use common::harness::Harness;
use common::process::WorkerProcess;
use common::scenario::Scenario;
use common::services::Engine;

const T0: i64 = 1_764_000_000_000;

/// Kills (and restarts) per run. Issue 17 asked for 20; each costs a start-up, a group rejoin
/// and up to `KILL_WITHIN` of draining, about 4 s on two cores.
const KILLS: usize = 20;

/// Events in the stream: one slice of it is produced before each restart, so every instance has
/// batches to drain when it is killed.
const EVENTS: usize = 4000;

/// How long after an instance starts consuming it may be killed.
const KILL_WITHIN: Duration = Duration::from_millis(1500);

/// Settings every instance gets on top of the test's: a killed member's partitions go to the
/// next instance after a short session timeout (librdkafka's default, 45 s, would make each
/// restart wait that long for the dead member).
fn sets() -> Vec<String> {
    vec![
        "kafka.options.session.timeout.ms=\"6000\"".into(),
        "kafka.options.heartbeat.interval.ms=\"500\"".into(),
    ]
}

/// Drains `EVENTS` events under `KILLS` kill -9 and restarts on the broker `engine`, then
/// checks every stored score against the final state.
async fn drain_under_kill_9(engine: Engine, seed: u64) {
    let started = Instant::now();
    let h = Harness::with_engine(engine, 2).await;
    let scorer = common::scorer();
    let s = Scenario::generate(seed, EVENTS, 24, 30, T0);
    let logs = tempfile::tempdir().expect("temp dir");
    let mut rng = SmallRng::seed_from_u64(seed);
    let slice = EVENTS / KILLS;
    for i in 0..KILLS {
        let mut w = WorkerProcess::spawn(
            &h.settings,
            &sets(),
            &logs.path().join(format!("worker-{i}.log")),
        );
        // The next slice, batched, and a tick as of its last event: produced while the worker
        // starts, so it has batches, fan-outs and a tick's rescorings in flight when killed.
        let range = i * slice..(i + 1) * slice;
        s.send_batched(&h, range.clone()).await;
        h.tick(T0 + (range.end as i64 - 1) * 60_000).await;
        w.wait_consuming(Duration::from_secs(60)).await;
        let after = rng.random_range(Duration::ZERO..KILL_WITHIN);
        tokio::time::sleep(after).await;
        w.kill_9().await;
    }
    let last = WorkerProcess::spawn(&h.settings, &sets(), &logs.path().join("worker-last.log"));
    s.send_batched(&h, KILLS * slice..s.events.len()).await;
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    eprintln!(
        "{KILLS} kills over {EVENTS} events on the {engine:?} engine: drained in {:?}",
        started.elapsed()
    );
    s.check(&h, &scorer, t);
    assert!(last.sigterm(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_during_a_drain_leaves_exactly_the_final_scores() {
    drain_under_kill_9(Engine::Sqlite, 24).await;
}

/// The same drill on tansu's memory engine, by hand only (`cargo test --test worker_crash --
/// --ignored`): it is expected to fail, the broker losing the rest of a batch a restarted
/// worker resumes inside. It shows the drill reaches that case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "by hand: shows the memory engine's defect (expected to fail)"]
async fn the_same_drill_on_the_memory_engine_loses_records_in_the_broker() {
    drain_under_kill_9(Engine::Memory, 24).await;
}
