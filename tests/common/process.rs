//! The worker as its own process (`rescorer run`, the binary this package builds), configured
//! as a deployment is, through `RESCORER__*` variables: for tests that signal or kill it.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rescorer::config::Settings;

use super::services::free_port;

/// The `RESCORER__*` variables that point a worker at this test's broker, topics and Redis.
pub fn worker_env(st: &Settings) -> Vec<(&'static str, String)> {
    vec![
        (
            "RESCORER__KAFKA__BOOTSTRAP_SERVERS",
            st.kafka.bootstrap_servers.clone(),
        ),
        ("RESCORER__KAFKA__GROUP_ID", st.kafka.group_id.clone()),
        (
            "RESCORER__TOPICS__FEATURE_UPDATES",
            st.topics.feature_updates.clone(),
        ),
        (
            "RESCORER__TOPICS__NEW_CANDIDATES",
            st.topics.new_candidates.clone(),
        ),
        (
            "RESCORER__TOPICS__DECAY_TICKS",
            st.topics.decay_ticks.clone(),
        ),
        ("RESCORER__TOPICS__DLQ", st.topics.dlq.clone()),
        (
            "RESCORER__TOPICS__RESCORE_REQUESTS",
            st.topics.rescore_requests.clone(),
        ),
        (
            "RESCORER__STATE__MODE",
            format!("{:?}", st.state.mode).to_lowercase(),
        ),
        ("RESCORER__REDIS__URL", st.redis.url.clone()),
        ("RESCORER__OUTPUT__KEY_PREFIX", st.output.key_prefix.clone()),
        ("RESCORER__DECAY__SHARDS", st.decay.shards.to_string()),
        ("RESCORER__MODEL__SPEC", st.model.spec.display().to_string()),
    ]
}

/// `GET path` on a local HTTP port: (status, body), or `None` while nothing answers.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let status = buf.get(9..12)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// A running `rescorer run`; its log goes to a file.
pub struct WorkerProcess {
    child: tokio::process::Child,
    pub http: std::net::SocketAddr,
    log: std::path::PathBuf,
}

impl WorkerProcess {
    /// Starts the worker with `st`'s variables, then `--set` each of `sets`, logging to `log`.
    pub fn spawn(st: &Settings, sets: &[String], log: &Path) -> Self {
        Self::spawn_logging(st, sets, "info,ort=warn", log)
    }

    /// Same, with this log filter (`RUST_LOG`).
    pub fn spawn_logging(st: &Settings, sets: &[String], filter: &str, log: &Path) -> Self {
        let port = free_port();
        let path = log.to_owned();
        let log = std::fs::File::create(log).expect("worker log file");
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_rescorer"));
        cmd.args(["run", "--set", &format!("http.listen=\"127.0.0.1:{port}\"")]);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let child = cmd
            .envs(worker_env(st))
            .env("RUST_LOG", filter)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("the rescorer binary starts");
        Self {
            child,
            http: format!("127.0.0.1:{port}").parse().unwrap(),
            log: path,
        }
    }

    /// Events this worker has taken in (every outcome), from its `/metrics`.
    pub async fn events_handled(&self) -> f64 {
        let Some((200, text)) = http_get(self.http, "/metrics").await else {
            return 0.0;
        };
        text.lines()
            .filter(|l| l.starts_with("rescorer_events_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// Panics with the log if the worker has exited (it must not exit on its own).
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "the worker exited ({status}); its log ends:\n{}",
                self.log_tail()
            );
        }
    }

    /// Waits until the worker has taken in at least one event (it is assigned and consuming).
    pub async fn wait_consuming(&mut self, within: Duration) {
        let until = Instant::now() + within;
        while self.events_handled().await < 1.0 {
            self.assert_running();
            assert!(
                Instant::now() < until,
                "the worker consumed nothing within {within:?}; its log ends:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of the worker's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGKILL: no drain, no commit, nothing the worker can react to.
    pub async fn kill_9(mut self) {
        self.child.start_kill().expect("SIGKILL sent");
        let _ = self.child.wait().await;
    }

    /// Sends a signal by name (`STOP` pauses the process as a long pause would, `CONT` resumes it).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("still running").to_string();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -{name} {pid}");
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status within `within`.
    pub async fn sigterm(mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().expect("still running").to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the worker did not exit within {within:?} of SIGTERM"))
            .expect("exit status")
    }
}
