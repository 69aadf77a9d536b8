//! A waiting candidate fan-out no longer holds its messages' offsets: its intent is recorded in
//! Redis, the message is committed, and whoever owns the partition next (after a stop, a crash or
//! a rebalance) resumes the fan-out from the intent. With remote and with owned state (where the
//! fan-out, once it runs, is rescore requests routed to the members' owners).

mod common;

use std::time::{Duration, Instant};

use common::harness::Harness;
use rescorer::config::StateMode;
use serde_json::json;

const T0: i64 = 1_764_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_fanout_commits_its_message_and_the_next_owner_resumes_it() {
    queued_fanout_is_resumed(StateMode::Remote).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_fanout_commits_its_message_and_the_next_owner_resumes_it_with_owned_state() {
    queued_fanout_is_resumed(StateMode::Owned).await;
}

async fn queued_fanout_is_resumed(mode: StateMode) {
    let h = Harness::new(2).await;
    let scorer = common::scorer();
    let members: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    let mut settings = h.settings.clone();
    settings.state.mode = mode;
    // A candidate fans out at most once a minute: its second update waits in the queue.
    settings.batch.fanout_min_interval_ms = 60_000;
    let w = h.start_worker_with(settings).await;
    for m in &members {
        h.upsert(m, "hot", "job_change", json!({}), T0).await;
    }
    h.feature(
        "candidate",
        "hot",
        json!({"profile_completeness": 0.1}),
        T0 + 1,
    )
    .await;
    h.wait_consumed().await;
    let score_as = |v: f64, as_of: i64| {
        common::expected_score(
            &scorer,
            &[],
            &[("profile_completeness", v)],
            &[],
            "job_change",
            T0,
            as_of,
        )
    };
    let first = score_as(0.1, T0 + 1);
    for m in &members {
        assert_eq!(h.scores(m), vec![("hot".to_string(), first)], "{m}");
    }

    // The second update's fan-out waits for the interval, yet its message is committed at once
    // (before, the partition's lag stayed pinned to it for the whole interval).
    h.feature(
        "candidate",
        "hot",
        json!({"profile_completeness": 0.9}),
        T0 + 2,
    )
    .await;
    let started = Instant::now();
    h.wait_consumed().await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "committed while its fan-out waits"
    );
    assert_eq!(
        h.scores("m0"),
        vec![("hot".to_string(), first)],
        "the fan-out is still waiting"
    );
    w.stop().await.unwrap();

    // The next owner finds the intent and runs the fan-out.
    let mut settings = h.settings.clone();
    settings.state.mode = mode;
    let w = h.start_worker_with(settings).await;
    let second = score_as(0.9, T0 + 2);
    let until = Instant::now() + Duration::from_secs(30);
    for m in &members {
        while h.scores(m) != vec![("hot".to_string(), second)] {
            assert!(
                Instant::now() < until,
                "{m}: fan-out not resumed: {:?}",
                h.scores(m)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Done: the intent is cleared.
    let key = h.keys().fanouts(0);
    let key1 = h.keys().fanouts(1);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let left: usize = redis::cmd("HLEN")
            .arg(&key)
            .query(&mut h.redis.client())
            .unwrap();
        let left1: usize = redis::cmd("HLEN")
            .arg(&key1)
            .query(&mut h.redis.client())
            .unwrap();
        if left + left1 == 0 {
            break;
        }
        assert!(Instant::now() < until, "intents left: {}", left + left1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.stop().await.unwrap();
}
