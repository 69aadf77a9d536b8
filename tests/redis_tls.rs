//! Redis over TLS (`rediss://`) with a private CA (`redis.tls_ca_file`): events are scored end to
//! end through it, and a certificate the worker cannot verify stops start-up with a message that
//! says so, instead of being retried forever.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::expected_score;
use common::harness::Harness;
use common::services::{free_port, RedisServer, TlsFiles};
use serde_json::json;

const T0: i64 = 1_764_000_000_000;
const H: i64 = 3_600_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_redis_with_a_private_ca_scores_events_end_to_end() {
    let tls = TlsFiles::generate();
    let h = Harness::with_redis(1, RedisServer::start_tls(&tls)).await;
    assert!(h.settings.redis.url.starts_with("rediss://"));
    let mut settings = h.settings.clone();
    settings.redis.tls_ca_file = Some(tls.ca());
    settings
        .validate(std::path::Path::new("(test)"))
        .expect("the CA file validates");
    let w = h.start_worker_with(settings).await;

    h.feature("member", "m1", json!({"sessions_7d": 5}), T0)
        .await;
    h.feature("candidate", "c1", json!({"profile_completeness": 0.9}), T0)
        .await;
    h.upsert("m1", "c1", "job_change", json!({"affinity": 0.6}), T0 + H)
        .await;
    h.wait_consumed().await;

    let want = expected_score(
        &common::scorer(),
        &[("sessions_7d", 5.0)],
        &[("profile_completeness", 0.9)],
        &[("affinity", 0.6)],
        "job_change",
        T0 + H,
        T0 + H,
    );
    // Read back over TLS too.
    assert_eq!(h.scores("m1"), vec![("c1".to_string(), want)]);
    w.stop().await.unwrap();
}

/// Runs `rescorer run` against a TLS-only Redis with these extra settings; returns its exit
/// status and log. It must exit on its own: no broker is running, so a worker that got past Redis
/// would keep running, and one that retried the certificate would never exit.
async fn run_against_tls_redis(
    redis: &RedisServer,
    set: &[String],
) -> (std::process::ExitStatus, String) {
    let mut args = vec![
        "run".to_string(),
        "--set".into(),
        format!("http.listen=127.0.0.1:{}", free_port()),
        "--set".into(),
        format!("redis.url={}", redis.url()),
        "--set".into(),
        format!("model.spec={}", common::model_spec().display()),
    ];
    for s in set {
        args.push("--set".into());
        args.push(s.clone());
    }
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rescorer"))
        .args(&args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("rescorer starts");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("start-up fails instead of retrying (no exit within 60 s)")
        .expect("rescorer runs");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_cannot_be_verified_stops_start_up() {
    let tls = TlsFiles::generate();
    let redis = RedisServer::start_tls(&tls);

    // A CA that did not sign the server's certificate.
    let (status, log) = run_against_tls_redis(
        &redis,
        &[format!("redis.tls_ca_file={}", tls.other_ca().display())],
    )
    .await;
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("certificate could not be verified") && log.contains("redis.tls_ca_file"),
        "{log}"
    );
    assert!(
        !log.contains("retrying"),
        "a certificate failure is not retried:\n{log}"
    );

    // No CA file: the system trust store does not know the test CA either.
    let (status, log) = run_against_tls_redis(&redis, &[]).await;
    assert!(!status.success(), "{log}");
    assert!(log.contains("certificate could not be verified"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_cluster_with_a_private_ca_works_and_a_wrong_ca_stops_start_up() {
    use redis::Commands;

    let tls = TlsFiles::generate();
    let cluster = common::services::RedisCluster::start_tls(&tls);
    let h = Harness::new(1).await;
    let mut settings = h.settings.clone();
    settings.redis.url = cluster.url();
    settings.redis.cluster = true;
    settings.redis.tls_ca_file = Some(tls.other_ca());

    // The wrong CA first: start-up fails, and says why.
    let err = rescorer::app::run_worker(
        settings.clone(),
        rescorer::metrics::Metrics::new(),
        tokio_util::sync::CancellationToken::new(),
    );
    let err = tokio::time::timeout(Duration::from_secs(60), err)
        .await
        .expect("start-up fails instead of retrying (no exit within 60 s)")
        .expect_err("a certificate signed by another CA is refused");
    assert!(
        format!("{err:#}").contains("certificate could not be verified"),
        "{err:#}"
    );

    settings.redis.tls_ca_file = Some(tls.ca());
    settings
        .validate(std::path::Path::new("(test)"))
        .expect("the CA file validates");
    let w = h.start_worker_with(settings).await;
    h.feature("member", "m1", json!({"sessions_7d": 5}), T0)
        .await;
    h.upsert("m1", "c1", "job_change", json!({"affinity": 0.6}), T0 + H)
        .await;
    h.wait_consumed().await;
    let want = expected_score(
        &common::scorer(),
        &[("sessions_7d", 5.0)],
        &[],
        &[("affinity", 0.6)],
        "job_change",
        T0 + H,
        T0 + H,
    );
    let key = format!("{}:scores:{{m1}}", h.settings.output.key_prefix);
    let got: Vec<(String, f64)> = cluster.client().zrevrange_withscores(key, 0, -1).unwrap();
    assert_eq!(got, vec![("c1".to_string(), want)]);
    w.stop().await.unwrap();
}
