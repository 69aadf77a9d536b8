//! What `rescorer run` actually logs never holds a Redis password: not in the start-up line, not
//! in the errors it retries, for a single URL and for a cluster seed list.

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::harness::Harness;
use common::services::{free_port, RedisServer};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

const T0: i64 = 1_764_000_000_000;

/// The worker's own settings as environment variables, the way a deployment passes the URL.
fn env_of(settings: &rescorer::config::Settings) -> Vec<(&'static str, String)> {
    vec![
        (
            "RESCORER__KAFKA__BOOTSTRAP_SERVERS",
            settings.kafka.bootstrap_servers.clone(),
        ),
        ("RESCORER__KAFKA__GROUP_ID", settings.kafka.group_id.clone()),
        (
            "RESCORER__TOPICS__FEATURE_UPDATES",
            settings.topics.feature_updates.clone(),
        ),
        (
            "RESCORER__TOPICS__NEW_CANDIDATES",
            settings.topics.new_candidates.clone(),
        ),
        (
            "RESCORER__TOPICS__DECAY_TICKS",
            settings.topics.decay_ticks.clone(),
        ),
        ("RESCORER__TOPICS__DLQ", settings.topics.dlq.clone()),
        ("RESCORER__REDIS__URL", settings.redis.url.clone()),
        (
            "RESCORER__OUTPUT__KEY_PREFIX",
            settings.output.key_prefix.clone(),
        ),
        ("RESCORER__DECAY__SHARDS", settings.decay.shards.to_string()),
        (
            "RESCORER__MODEL__SPEC",
            settings.model.spec.display().to_string(),
        ),
        (
            "RESCORER__HTTP__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        ),
    ]
}

/// `rescorer run` with its log collected as it is written (so a full pipe never stalls it).
struct Worker {
    child: tokio::process::Child,
    log: Arc<Mutex<String>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Worker {
    fn spawn(env: Vec<(&'static str, String)>, extra: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rescorer"))
            .arg("run")
            .args(extra)
            .envs(env)
            // Debug logs too: whatever the worker or its libraries say at any level.
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("rescorer starts");
        let log = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let sink = log.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Self { child, log, reader }
    }

    /// Waits until the log has `n` lines containing `text`.
    async fn wait_for(&self, text: &str, n: usize) {
        let seen = async {
            while self.log.lock().unwrap().matches(text).count() < n {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), seen)
            .await
            .unwrap_or_else(|_| panic!("`{text}` not logged {n} times within 60 s"));
    }

    /// SIGTERM, then the whole log.
    async fn terminate(mut self) -> String {
        let pid = self.child.id().expect("still running").to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits within 30 s of SIGTERM")
            .unwrap();
        let _ = self.reader.await;
        let log = self.log.lock().unwrap().clone();
        log
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_protected_redis_is_used_and_its_password_never_logged() {
    // `@` and `:` inside the password, written raw in the URL as people do.
    let password = "hunter2@sec:ret";
    let h = Harness::with_redis(1, RedisServer::start_with_password(password)).await;
    assert!(h.settings.redis.url.contains(password));
    let w = Worker::spawn(env_of(&h.settings), &[]);

    h.feature("member", "m1", json!({"sessions_7d": 5}), T0)
        .await;
    h.upsert("m1", "c1", "job_change", json!({"affinity": 0.6}), T0)
        .await;
    h.wait_consumed().await;
    assert_eq!(
        h.scores("m1").len(),
        1,
        "the worker wrote through the password"
    );

    let log = w.terminate().await;
    assert!(log.contains("redis=redis://:***@127.0.0.1:"), "{log}");
    for secret in ["hunter2", "sec:ret", "sec%3Aret", "%40sec"] {
        assert!(!log.contains(secret), "`{secret}` in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_seed_list_never_shows_its_passwords_even_in_errors() {
    // Nothing listens on the seeds: the worker logs the start-up line, then retries, saying why.
    let mut settings = rescorer::config::Settings::default();
    settings.model.spec = common::model_spec();
    // One password (the client uses one for every node), written raw and percent-escaped.
    settings.redis.url = format!(
        "redis://app:hunter2@sec@127.0.0.1:{}, redis://app:hunter2%40sec@127.0.0.1:{}",
        free_port(),
        free_port()
    );
    let w = Worker::spawn(env_of(&settings), &["--set", "redis.cluster=true"]);
    w.wait_for("retrying", 2).await;
    let log = w.terminate().await;
    assert!(
        log.contains("redis=redis://app:***@127.0.0.1:")
            && log.contains(",redis://app:***@127.0.0.1:"),
        "{log}"
    );
    for secret in ["hunter2", "%40sec", "@sec"] {
        assert!(!log.contains(secret), "`{secret}` in the log:\n{log}");
    }
}
