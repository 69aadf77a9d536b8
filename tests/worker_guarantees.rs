//! The guarantee users rely on, under replays, rebalances, outages and shutdown: once every
//! event and then a tick at T that makes every pair due are consumed, every stored score equals
//! the model's score of the final state as of T.
//!
//! Tests where a worker resumes from another's committed offsets (a rebalance, a restart) run on
//! the broker's SQLite engine with batched producers, so they resume inside record batches as
//! production consumers do (see `tests/broker.rs`); kill -9 is in `tests/worker_crash.rs`.

mod common;

use std::time::Duration;

use common::harness::Harness;
use common::process::WorkerProcess;
use common::scenario::Scenario;
use common::services::Engine;

const T0: i64 = 1_764_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_into_an_empty_redis_reproduces_exactly_the_same_scores() {
    let h = Harness::new(2).await;
    let scorer = common::scorer();
    let s = Scenario::generate(11, 300, 8, 10, T0);
    let mut settings = h.settings.clone();
    settings.batch.max_pairs = 16; // many small batches
    let w = h.start_worker_with(settings.clone()).await;
    s.send(&h, 0..s.events.len()).await;
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    s.check(&h, &scorer, t);
    let first = h.output_snapshot();
    w.stop().await.unwrap();

    redis::cmd("FLUSHALL")
        .query::<()>(&mut h.redis.client())
        .unwrap();
    assert!(h.output_snapshot().is_empty());
    settings.kafka.group_id = format!("{}-replay", settings.kafka.group_id);
    settings.batch.max_pairs = 1024; // different batching, same result
    let group = settings.kafka.group_id.clone();
    let w = h.start_worker_with(settings).await;
    h.wait_consumed_by(&group).await;
    h.tick(t).await;
    h.wait_consumed_by(&group).await;
    assert_eq!(
        h.output_snapshot(),
        first,
        "replay must reproduce the scores exactly"
    );
    w.stop().await.unwrap();
}

/// Sum of a metric family's samples whose labels contain `labels` (e.g. `lane="live"`).
fn metric_sum(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_behind_live_events_and_reaches_the_same_scores() {
    let h = Harness::new(2).await;
    let scorer = common::scorer();
    let s = Scenario::generate(21, 3000, 30, 40, T0);
    let backlog = 2600;
    s.send_pipelined(&h, 0..backlog).await;
    let mut settings = h.settings.clone();
    // Split as soon as anything is behind; small windows keep the backlog from draining before
    // the split (it waits for the broker's high watermarks). The head reader then takes the
    // live events while the group's reader drains the backlog.
    settings.catchup.lag_ms = 0;
    settings.catchup.min_messages = 1;
    settings.batch.max_pairs = 2;
    let w = h.start_worker_with(settings).await;
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while metric_sum(&w.metrics.render(), "rescorer_catchup_partitions", "") < 1.0 {
        assert!(
            std::time::Instant::now() < until,
            "no partition was handed to the catch-up reader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Live events arrive while the backlog drains.
    s.send_pipelined(&h, backlog..s.events.len()).await;
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    s.check(&h, &scorer, t);
    let text = w.metrics.render();
    let count = "rescorer_event_to_score_seconds_count";
    assert!(
        metric_sum(&text, count, "lane=\"backlog\"") > 0.0,
        "backlog events were scored by the catch-up lane"
    );
    assert!(
        metric_sum(&text, count, "lane=\"live\"") > 0.0,
        "live events were scored by the live lane"
    );
    assert_eq!(
        metric_sum(&text, "rescorer_catchup_partitions", ""),
        0.0,
        "every backlog read to its end"
    );
    w.stop().await.unwrap();
}

/// Messages already `catchup.lag_ms` old when read count as backlog freshness, even from a
/// partition with too little behind to split; fresh ones count as live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_read_already_behind_count_as_backlog_freshness() {
    let h = Harness::new(1).await;
    let topic = h.settings.topics.new_candidates.clone();
    let ten_minutes_ago = rescorer::worker::chrono_now_ms() - 600_000;
    for i in 0..3 {
        let v = serde_json::json!({"member_id": "m1", "candidate_id": format!("old{i}"),
            "reason": "job_change", "pair_features": {}, "ts": T0});
        h.send_stamped(&topic, "m1", v, ten_minutes_ago).await;
    }
    let w = h.start_worker().await; // defaults: 3 messages behind are too few to split
    h.wait_consumed().await;
    for i in 0..2 {
        h.upsert(
            "m1",
            &format!("new{i}"),
            "job_change",
            serde_json::json!({}),
            T0,
        )
        .await;
    }
    h.wait_consumed().await;
    let text = w.metrics.render();
    let count = "rescorer_event_to_score_seconds_count";
    assert_eq!(metric_sum(&text, count, "lane=\"backlog\""), 3.0, "{text}");
    assert_eq!(metric_sum(&text, count, "lane=\"live\""), 2.0, "{text}");
    assert_eq!(h.scores("m1").len(), 5, "every pair scored");
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_split_the_partitions_and_one_finishes_after_the_other_stops() {
    let h = Harness::with_engine(Engine::Sqlite, 4).await;
    let scorer = common::scorer();
    let s = Scenario::generate(12, 300, 12, 10, T0);
    let a = h.start_worker().await;
    let b = h.start_worker().await;
    let assigned = |w: &common::harness::WorkerHandle| {
        let text = w.metrics.render();
        text.lines()
            .find(|l| l.starts_with("rescorer_assigned_partitions "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    };
    // The group settles with both members holding part of the 3 topics × 4 partitions (and the
    // rescore requests' 4 with owned state).
    let topics = match h.settings.state.mode {
        rescorer::config::StateMode::Remote => 3,
        rescorer::config::StateMode::Owned => 4,
    };
    let until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (pa, pb) = (assigned(&a), assigned(&b));
        if pa > 0 && pb > 0 && pa + pb == 4 * topics {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "group did not split: {pa} and {pb}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.send_batched(&h, 0..150).await;
    h.wait_consumed().await;
    let scored = |w: &common::harness::WorkerHandle| w.metrics.pairs_scored_total.get();
    assert!(
        scored(&a) > 0 && scored(&b) > 0,
        "both workers scored pairs: {} and {}",
        scored(&a),
        scored(&b)
    );
    // The rest arrives batched while `a` leaves: `b` takes over `a`'s partitions from their
    // committed offsets, wherever in a batch those fall.
    let rest = s.send_batched(&h, 150..s.events.len());
    let (stopped, ()) = tokio::join!(a.stop(), rest);
    stopped.unwrap();
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    s.check(&h, &scorer, t);
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_pauses_the_worker_and_loses_nothing() {
    let mut h = Harness::new(2).await;
    let scorer = common::scorer();
    let s = Scenario::generate(13, 200, 8, 8, T0);
    let w = h.start_worker().await;
    s.send(&h, 0..100).await;
    h.wait_consumed().await;
    assert_eq!(w.http_get("/readyz").await.0, 200);

    h.redis.stop();
    s.send(&h, 100..s.events.len()).await;
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = w.http_get("/readyz").await;
        if code == 503 {
            assert!(body.contains("redis_reachable=false"), "{body}");
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "readiness should drop while Redis is down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(w.metrics.render().contains("rescorer_redis_errors_total"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.redis.restart();
    h.wait_consumed().await;

    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    s.check(&h, &scorer, t);
    assert_eq!(w.http_get("/readyz").await.0, 200);
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_are_served_and_valid() {
    let h = Harness::new(2).await;
    let s = Scenario::generate(14, 60, 5, 5, T0);
    let w = h.start_worker().await;
    assert_eq!(w.http_get("/healthz").await.0, 200);
    s.send(&h, 0..s.events.len()).await;
    h.send_raw(
        &h.settings.topics.feature_updates.clone(),
        Some("x"),
        Some(b"oops"),
        None,
    )
    .await;
    h.wait_consumed().await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // one lag refresh after the last commit
    let (code, text) = w.http_get("/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "rescorer_consumer_lag{",
        "rescorer_consumer_lag_seconds{",
        "rescorer_event_to_score_seconds_bucket{",
        "rescorer_events_total{outcome=\"applied\"",
        "rescorer_events_total{outcome=\"dead_lettered\"",
        "rescorer_pairs_scored_total",
        "rescorer_batch_pairs_bucket",
        "rescorer_model_seconds_bucket",
        "rescorer_redis_write_seconds_bucket",
        "rescorer_model_info{device=\"cpu\",model=\"catchup-ranker\",version=\"1\"} 1",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    let fu = &h.settings.topics.feature_updates;
    for p in 0..2 {
        let lag = format!("rescorer_consumer_lag{{partition=\"{p}\",topic=\"{fu}\"}} 0");
        assert!(text.contains(&lag), "caught up: {lag}\n{text}");
    }
    assert!(!text.contains("m1"), "labels never carry member ids");

    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (scripts/test.sh installs Debian's prometheus package)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(w.http_get("/readyz").await.0, 200);
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_commits_and_exits_cleanly() {
    let h = Harness::with_engine(Engine::Sqlite, 2).await;
    let scorer = common::scorer();
    let s = Scenario::generate(15, 240, 8, 8, T0);
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("worker.log");
    let w = WorkerProcess::spawn(&h.settings, &[], &log);
    s.send_batched(&h, 0..120).await;
    h.wait_consumed().await;
    s.send_batched(&h, 120..s.events.len()).await;
    let status = w.sigterm(Duration::from_secs(30)).await;
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "clean exit after SIGTERM:\n{log}");
    assert!(log.contains("signal received"), "{log}");
    assert!(log.contains("shutting down"), "{log}");

    // Whatever it did not finish is replayed by the next worker of the group, from the
    // committed offsets (inside a batch, as likely as not): nothing lost.
    let w = h.start_worker().await;
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    s.check(&h, &scorer, t);
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_guarantee_holds_on_redis_cluster() {
    use redis::Commands;

    let h = Harness::new(2).await;
    let cluster = common::services::RedisCluster::start();
    let scorer = common::scorer();
    let s = Scenario::generate(16, 200, 8, 8, T0);
    let mut settings = h.settings.clone();
    settings.redis.url = cluster.url();
    settings.redis.cluster = true;
    let w = h.start_worker_with(settings).await;
    s.send(&h, 0..s.events.len()).await;
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    let prefix = h.settings.output.key_prefix.clone();
    let mut c = cluster.client();
    s.check_with(
        &mut |m: &str| {
            let scores: Vec<(String, f64)> = c
                .zrevrange_withscores(format!("{prefix}:scores:{{{m}}}"), 0, -1)
                .unwrap();
            let meta: std::collections::HashMap<String, String> =
                c.hgetall(format!("{prefix}:meta:{{{m}}}")).unwrap();
            (scores, meta)
        },
        &scorer,
        t,
    );
    w.stop().await.unwrap();
}
