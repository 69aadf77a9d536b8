//! Real services for integration tests: `redis-server` and a Kafka-protocol broker, each started
//! on a free port and stopped on drop. Set `RESCORER_TEST_KAFKA=host:port` to use an external
//! Kafka cluster instead of starting `tansu` (then every test uses it, whatever engine it asks for).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
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

/// Certificates made with `openssl` in a temporary directory: a CA, a server certificate it
/// signed for 127.0.0.1 and localhost, and an unrelated CA that did not sign it.
pub struct TlsFiles {
    dir: tempfile::TempDir,
}

impl TlsFiles {
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let openssl = |args: &[&str]| {
            let out = Command::new(find_binary("openssl"))
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "other-ca"] {
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=rescorer test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ]);
        }
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        // clientAuth too: cluster nodes present it to each other on the TLS cluster bus.
        std::fs::write(
            dir.path().join("server.ext"),
            "subjectAltName = IP:127.0.0.1, DNS:localhost\n\
             basicConstraints = CA:FALSE\n\
             keyUsage = digitalSignature, keyEncipherment\n\
             extendedKeyUsage = serverAuth, clientAuth\n",
        )
        .expect("extensions file");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ]);
        Self { dir }
    }

    /// The CA that signed the server's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA that did not.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
}

/// A `redis-server` in a temporary directory: plain, TLS-only, and with or without a password.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// TLS only on `port` (the plain port is off); clients trust `ca`.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    password: Option<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(None, None)
    }

    /// TLS only, with the server certificate of `tls`; client certificates are not asked for.
    pub fn start_tls(tls: &TlsFiles) -> Self {
        Self::start_with(Some(tls), None)
    }

    /// `requirepass password`; [`RedisServer::url`] carries the password as written.
    pub fn start_with_password(password: &str) -> Self {
        Self::start_with(None, Some(password))
    }

    fn start_with(tls: Option<&TlsFiles>, password: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = Self {
            child: None,
            port: free_port(),
            dir,
            tls: tls.map(|t| (t.server_cert(), t.server_key(), t.ca())),
            password: password.map(str::to_owned),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(find_binary("redis-server"));
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some((cert, key, ca)) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "no"]),
        };
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .args(["--bind", "127.0.0.1"])
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
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let auth = self
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}", self.port)
    }

    /// Kills the server (an outage); the append-only file keeps its data for `restart`.
    /// Sends a signal by name to the server (`STOP` freezes it: clients time out; `CONT`).
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{name} redis-server");
    }

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
        let client = match &self.tls {
            None => redis::Client::open(self.url()),
            Some((_, _, ca)) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).expect("the test CA")),
                },
            ),
        };
        client
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
    /// record batch returns nothing from that batch (tansu 0.6.0; README "Tests" and
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

/// A three-primary Redis Cluster on free local ports, plain or TLS-only, optionally with replicas.
pub struct RedisCluster {
    nodes: Vec<Child>,
    pub ports: Vec<u16>,
    _dirs: Vec<tempfile::TempDir>,
    /// The CA clients trust, for a TLS-only cluster.
    ca: Option<PathBuf>,
}

impl RedisCluster {
    pub fn start() -> Self {
        Self::start_with(None, 0)
    }

    /// Three primaries, each with `replicas` replicas (`redis-cli --cluster create`).
    pub fn start_with_replicas(replicas: usize) -> Self {
        Self::start_with(None, replicas)
    }

    /// TLS only, between the nodes too, with the server certificate of `tls`.
    pub fn start_tls(tls: &TlsFiles) -> Self {
        Self::start_with(Some(tls), 0)
    }

    fn start_with(tls: Option<&TlsFiles>, replicas: usize) -> Self {
        let mut nodes = Vec::new();
        let mut ports = Vec::new();
        let mut dirs = Vec::new();
        for _ in 0..3 * (1 + replicas) {
            let port = free_port();
            let dir = tempfile::tempdir().expect("temp dir");
            let mut cmd = Command::new(find_binary("redis-server"));
            match tls {
                None => cmd.args(["--port", &port.to_string()]),
                Some(t) => cmd
                    .args(["--port", "0", "--tls-port", &port.to_string()])
                    .args(["--tls-cluster", "yes", "--tls-auth-clients", "no"])
                    .arg("--tls-cert-file")
                    .arg(t.server_cert())
                    .arg("--tls-key-file")
                    .arg(t.server_key())
                    .arg("--tls-ca-cert-file")
                    .arg(t.ca()),
            };
            let child = cmd
                .args(["--bind", "127.0.0.1"])
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
        let mut create = Command::new(find_binary("redis-cli"));
        if let Some(t) = tls {
            create.arg("--tls").arg("--cacert").arg(t.ca());
        }
        let status = create
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli --cluster create runs");
        assert!(status.success(), "cluster create failed");
        let cluster = Self {
            nodes,
            ports,
            _dirs: dirs,
            ca: tls.map(TlsFiles::ca),
        };
        let until = Instant::now() + Duration::from_secs(30);
        for url in cluster.node_urls() {
            loop {
                let info: String = cluster
                    .node_client(&url)
                    .and_then(|c| c.get_connection())
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query(&mut c))
                    .unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < until, "cluster not ok on {url}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Replicas serve a failover only once linked to their primary.
        for url in cluster.node_urls() {
            loop {
                let info: String = cluster
                    .node_client(&url)
                    .and_then(|c| c.get_connection())
                    .and_then(|mut c| redis::cmd("INFO").arg("replication").query(&mut c))
                    .unwrap_or_default();
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(Instant::now() < until, "replica {url} not linked: {info}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cluster
    }

    /// A synchronous connection to one node (plain clusters).
    pub fn node(&self, port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .and_then(|c| c.get_connection())
            .expect("connection to a cluster node")
    }

    /// Ports of the nodes that are replicas now.
    pub fn replicas(&self) -> Vec<u16> {
        self.ports
            .iter()
            .copied()
            .filter(|p| {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut self.node(*p))
                    .unwrap_or_default();
                info.contains("role:slave")
            })
            .collect()
    }

    fn node_urls(&self) -> Vec<String> {
        let scheme = if self.ca.is_some() { "rediss" } else { "redis" };
        self.ports
            .iter()
            .map(|p| format!("{scheme}://127.0.0.1:{p}"))
            .collect()
    }

    fn node_client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        match &self.ca {
            None => redis::Client::open(url),
            Some(ca) => redis::Client::build_with_tls(url, self.certs(ca)),
        }
    }

    fn certs(&self, ca: &Path) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(ca).expect("the test CA")),
        }
    }

    /// Seed nodes in the worker's `redis.url` format for `redis.cluster = true`.
    pub fn url(&self) -> String {
        self.node_urls().join(",")
    }

    pub fn client(&self) -> redis::cluster::ClusterConnection {
        let mut builder = redis::cluster::ClusterClientBuilder::new(self.node_urls());
        if let Some(ca) = &self.ca {
            builder = builder.certs(self.certs(ca));
        }
        builder
            .build()
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
