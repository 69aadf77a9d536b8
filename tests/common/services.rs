//! Real services for integration tests: `redis-server` and a Kafka-protocol broker, each started
//! on a free port and stopped on drop. Set `RESCORER_TEST_KAFKA=host:port` to use an external
//! Kafka cluster instead of starting `tansu` (then every test uses it, whatever engine it asks for).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free local TCP port (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

fn wait_for_port(port: u16, what: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on port {port} within 20 s");
}

fn find_binary(name: &str) -> PathBuf {
    let mut candidates = vec![];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join(name)));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin").join(name));
    }
    candidates.push(PathBuf::from("/usr/bin").join(name));
    candidates
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("`{name}` not found: run scripts/test.sh, which installs it"))
}

/// The project's own tansu (`scripts/test.sh` installs it into `.tools/tansu` with the sqlite
/// engine) before any on PATH: an older memory-only build there cannot start `Engine::Sqlite`.
fn find_tansu() -> PathBuf {
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/tansu/bin/tansu");
    if local.exists() {
        local
    } else {
        find_binary("tansu")
    }
}

/// A `redis-server` in a temporary directory.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = Self {
            child: None,
            port: free_port(),
            dir,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new(find_binary("redis-server"))
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            // Persistence on, so a restart (an outage, not a data loss) keeps the state.
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        wait_for_port(self.port, "redis-server");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (an outage); the append-only file keeps its data for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("test connection to redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the test broker keeps its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// tansu's memory engine (`dynostore`): fast, but a fetch from an offset inside a stored
    /// record batch returns nothing from that batch (tansu 0.6.0; `/work/shared/notes` and
    /// `tests/broker.rs`). Fine for tests whose consumers never resume inside a batch.
    Memory,
    /// tansu's SQLite engine (`lite`): rebuilds batches from per-record rows, so a consumer that
    /// resumes inside a batch gets the rest of it, as from Kafka. For tests that kill, restart
    /// or rebalance a worker over batched input.
    Sqlite,
}

/// A Kafka-protocol broker: `tansu` with the chosen storage engine, or the external one.
pub struct Broker {
    child: Option<Child>,
    pub bootstrap: String,
    pub engine: Engine,
    /// The broker's working directory: its SQLite file and its log.
    dir: Option<tempfile::TempDir>,
}

impl Broker {
    pub fn start() -> Self {
        Self::start_with(Engine::Memory)
    }

    pub fn start_with(engine: Engine) -> Self {
        if let Ok(external) = std::env::var("RESCORER_TEST_KAFKA") {
            return Self {
                child: None,
                bootstrap: external,
                engine,
                dir: None,
            };
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("tansu.log")).expect("broker log");
        // tansu 0.6.0 takes the SQLite file relative to its working directory (an absolute path
        // is appended to it): start it in the temporary directory with a relative name.
        let storage = match engine {
            Engine::Memory => "memory://tansu/",
            Engine::Sqlite => "sqlite://tansu.db",
        };
        let mut child = Command::new(find_tansu())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", storage])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tansu starts");
        let until = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > until {
                let log = std::fs::read_to_string(dir.path().join("tansu.log")).unwrap_or_default();
                panic!(
                    "tansu ({engine:?}) did not listen on port {port} ({exited:?}); a tansu built \
                     without `--features libsql` cannot start the SQLite engine: run \
                     scripts/test.sh, which installs one into .tools/tansu\n{log}"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child: Some(child),
            bootstrap: format!("127.0.0.1:{port}"),
            engine,
            dir: Some(dir),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The directory goes after the broker that writes into it.
        drop(self.dir.take());
    }
}

/// A three-primary Redis Cluster on free local ports.
pub struct RedisCluster {
    nodes: Vec<Child>,
    pub ports: Vec<u16>,
    _dirs: Vec<tempfile::TempDir>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let mut nodes = Vec::new();
        let mut ports = Vec::new();
        let mut dirs = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let dir = tempfile::tempdir().expect("temp dir");
            let child = Command::new(find_binary("redis-server"))
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server starts in cluster mode");
            wait_for_port(port, "redis-server (cluster node)");
            nodes.push(child);
            ports.push(port);
            dirs.push(dir);
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let status = Command::new(find_binary("redis-cli"))
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli --cluster create runs");
        assert!(status.success(), "cluster create failed");
        let until = Instant::now() + Duration::from_secs(20);
        for p in &ports {
            loop {
                let info: String = redis::Client::open(format!("redis://127.0.0.1:{p}"))
                    .and_then(|c| c.get_connection())
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query(&mut c))
                    .unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < until, "cluster not ok on {p}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Self {
            nodes,
            ports,
            _dirs: dirs,
        }
    }

    /// Seed nodes in the worker's `redis.url` format for `redis.cluster = true`.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn client(&self) -> redis::cluster::ClusterConnection {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        redis::cluster::ClusterClient::new(nodes)
            .and_then(|c| c.get_connection())
            .expect("cluster connection")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
