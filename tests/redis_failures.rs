//! Redis failing for real (a redis-server out of memory, its script cache flushed, an outage
//! longer than the consumer's poll interval, a node demoted by a failover): nothing is committed
//! past the last acknowledged write, and the final scores are exact, either after the worker
//! recovers by itself or after a clean fatal exit and a restart.

mod common;

use std::time::{Duration, Instant};

use common::harness::Harness;
use common::scenario::Scenario;
use common::services::RedisServer;

const T0: i64 = 1_764_000_000_000;

async fn wait_until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < until, "{what} within {secs} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn config_set(c: &mut redis::Connection, name: &str, value: &str) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query(c)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_and_a_flushed_script_cache_pause_the_worker_and_lose_nothing() {
    let h = Harness::new(2).await;
    let scorer = common::scorer();
    let s = Scenario::generate(31, 300, 10, 10, T0);
    let w = h.start_worker().await;
    s.send(&h, 0..100).await;
    h.wait_consumed().await;

    // Out of memory: every write is refused with OOM (an outage: retried, not ready).
    let mut c = h.redis.client();
    config_set(&mut c, "maxmemory-policy", "noeviction");
    config_set(&mut c, "maxmemory", "1");
    s.send(&h, 100..200).await;
    wait_until("readiness drops while Redis is out of memory", 20, || {
        w.metrics.render().contains("rescorer_ready 0")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    config_set(&mut c, "maxmemory", "0");
    h.wait_consumed().await;

    // The script cache flushed under the worker (as a restart or failover does): reloaded.
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut c).unwrap();
    s.send(&h, 200..s.events.len()).await;
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    s.check(&h, &scorer, t);
    assert_eq!(w.http_get("/readyz").await.0, 200);
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_poll_interval_loses_nothing() {
    let mut h = Harness::new(2).await;
    let scorer = common::scorer();
    let s = Scenario::generate(32, 200, 8, 8, T0);
    let mut settings = h.settings.clone();
    // The consumer is thrown out of its group when it does not poll for this long.
    for (k, v) in [
        ("max.poll.interval.ms", "7000"),
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "1000"),
    ] {
        settings.kafka.options.insert(k.into(), v.into());
    }
    let w = h.start_worker_with(settings).await;
    s.send(&h, 0..80).await;
    h.wait_consumed().await;
    h.redis.stop();
    s.send(&h, 80..s.events.len()).await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    h.redis.restart();
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    s.check(&h, &scorer, t);
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_node_makes_the_worker_exit_and_a_restart_on_the_new_primary_is_exact() {
    let h = Harness::new(2).await;
    let scorer = common::scorer();
    let s = Scenario::generate(33, 240, 8, 8, T0);
    let mut settings = h.settings.clone();
    settings.redis.give_up_after_secs = 3;
    let w = h.start_worker_with(settings.clone()).await;
    s.send(&h, 0..120).await;
    h.wait_consumed().await;

    // A failover: B, a replica of A, is promoted, and A becomes B's replica. The worker's
    // connection to A stays up and answers READONLY.
    let b = RedisServer::start();
    let (mut a_conn, mut b_conn) = (h.redis.client(), b.client());
    let replicaof = |c: &mut redis::Connection, host: &str, port: &str| {
        let _: () = redis::cmd("REPLICAOF")
            .arg(host)
            .arg(port)
            .query(c)
            .unwrap();
    };
    replicaof(&mut b_conn, "127.0.0.1", &h.redis.port.to_string());
    wait_until("B in sync with A", 20, || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut b.client())
            .unwrap();
        info.contains("master_link_status:up")
    })
    .await;
    replicaof(&mut b_conn, "NO", "ONE");
    replicaof(&mut a_conn, "127.0.0.1", &b.port.to_string());
    s.send(&h, 120..s.events.len()).await;

    // READONLY is not an outage: after redis.give_up_after_secs the worker exits with an error.
    let result = tokio::time::timeout(Duration::from_secs(60), w.join)
        .await
        .expect("the worker exits")
        .expect("no panic");
    let err = result.expect_err("a fatal exit").to_string();
    assert!(err.contains("give_up_after_secs"), "{err}");

    // The orchestrator restarts it against the new primary: everything uncommitted is replayed.
    settings.redis.url = b.url();
    let w = h.start_worker_with(settings).await;
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    s.check_in(&mut b.client(), &h.keys(), &scorer, t);
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_password_stops_start_up_at_once() {
    let h = Harness::new(1).await;
    let locked = RedisServer::start_with_password("right-pass");
    let mut settings = h.settings.clone();
    settings.redis.url = format!("redis://:wrong-pass@127.0.0.1:{}", locked.port);
    // A permanent error is not retried: start-up ends long before a failover would be given up.
    settings.redis.give_up_after_secs = 600;
    let w = h.start_worker_with(settings).await;
    let result = tokio::time::timeout(Duration::from_secs(30), w.join)
        .await
        .expect("start-up gives up at once")
        .expect("no panic");
    let err = format!("{:#}", result.expect_err("a fatal start-up error"));
    assert!(err.contains("no retry can fix"), "{err}");
    assert!(!err.contains("wrong-pass"), "the password is masked: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_while_input_waits_without_progress_and_recovers() {
    let mut h = Harness::new(1).await;
    let scorer = common::scorer();
    let s = Scenario::generate(34, 120, 6, 6, T0);
    let mut settings = h.settings.clone();
    settings.http.stall_timeout_secs = 2;
    let w = h.start_worker_with(settings).await;
    s.send(&h, 0..40).await;
    h.wait_consumed().await;
    assert_eq!(w.http_get("/healthz").await.0, 200, "idle is not stalled");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        w.http_get("/healthz").await.0,
        200,
        "idle for long is not stalled"
    );

    h.redis.stop();
    s.send(&h, 40..s.events.len()).await;
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = w.http_get("/healthz").await;
        // The metric follows within the stall watch's second.
        let flagged = w
            .metrics
            .render()
            .contains(r#"rescorer_unhealthy{reason="stalled"} 1"#);
        if code == 503 && flagged {
            assert!(body.contains("stalled"), "{body}");
            break;
        }
        assert!(
            Instant::now() < until,
            "/healthz should fail while input waits"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.redis.restart();
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    s.check(&h, &scorer, t);
    // The next lag refresh (every second) sees the progress.
    let until = Instant::now() + Duration::from_secs(10);
    while w.http_get("/healthz").await.0 != 200 {
        assert!(Instant::now() < until, "/healthz recovers with progress");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.stop().await.unwrap();
}
