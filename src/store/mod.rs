//! Redis: the worker's state (features, pairs, reverse index, decay schedule) and its output (top-N
//! scores and meta per member), so that any worker can take over any partition.
//!
//! Guarantee: every write is guarded by event time inside a Lua script (per-feature and per-pair
//! last-writer-wins by `(ts, offset)`, per-score `as_of`), so replays and two workers writing the
//! same member during a rebalance cannot move state or scores backwards. All keys of one member
//! share the hash tag `{member_id}` (and of one candidate `{candidate_id}`), so each script touches
//! one slot and everything works on Redis Cluster. Limits: removal tombstones are kept forever (an
//! older upsert must never resurrect a pair); a pair's decay schedule entry is written after its
//! score, so a crash between the two is repaired by the replay that the uncommitted offset causes.

mod apply;
mod fenced;
mod keys;
mod owned;
mod schedule;
mod state;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

pub use apply::Applied;
pub use fenced::{Fenced, TxConn};
pub use keys::{scheduled_member, Keys};
pub use owned::{Loaded, MemberKey, MemberWrite, OwnedLoad, WriteOp};
pub use state::{FeatureOutcome, LoadedMember, PairState, ScoreWrite, WriteFlag};

/// A Redis operation failed; the caller retries (it is never a reason to skip data), except
/// [`StoreError::Certificate`], which no retry can fix.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis returned unexpected data: {0}")]
    Protocol(String),
    /// Only from connecting: the server's TLS certificate was rejected.
    #[error("redis: the server's TLS certificate could not be verified (is `redis.tls_ca_file` the CA that signed it?): {0}")]
    Certificate(redis::RedisError),
}

impl StoreError {
    /// An outage: no connection, a timeout, a node loading, a cluster re-electing, Redis out of
    /// memory or busy with a script. Retried for as long as it lasts (nothing is skipped). A
    /// READONLY reply (see [`Self::is_failover`]) is retried for a bounded time; every other
    /// error (WRONGPASS, NOPERM, WRONGTYPE, an unexpected reply) is permanent: no retry can fix
    /// it, so the worker exits at once and is restarted.
    pub fn is_outage(&self) -> bool {
        use redis::ErrorKind as K;
        match self {
            StoreError::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || matches!(
                        e.kind(),
                        K::TryAgain
                            | K::ClusterDown
                            | K::MasterDown
                            | K::BusyLoadingError
                            | K::NoScriptError
                            | K::ClusterConnectionNotFound
                            | K::Moved
                            | K::Ask
                    )
                    || matches!(
                        e.code(),
                        Some("OOM" | "BUSY" | "LOADING" | "NOREPLICAS" | "MISCONF")
                    )
            }
            StoreError::Protocol(_) | StoreError::Certificate(_) => false,
        }
    }

    /// READONLY: the node was demoted by a failover that is still settling (the store connects
    /// again, following a name that moves to the new primary). Transient while the failover
    /// lasts, so retried for `redis.give_up_after_secs`, then fatal: a URL that points at a
    /// replica for good never succeeds.
    pub fn is_failover(&self) -> bool {
        self.is_read_only()
    }

    fn is_read_only(&self) -> bool {
        matches!(self, StoreError::Redis(e) if e.kind() == redis::ErrorKind::ReadOnly)
    }
}

/// One connection to a single Redis or a Redis Cluster.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Connects to `url` (`redis://` or `rediss://`); with `cluster`, `url` is a comma-separated list
/// of seed nodes. Fails fast if the first connection cannot be made.
pub async fn connect(url: &str, cluster: bool, timeout: Duration) -> Result<Conn, StoreError> {
    connect_with_ca(url, cluster, timeout, None).await
}

/// [`connect`], verifying a `rediss://` server against `ca_pem` (PEM certificates) instead of the
/// system trust store when given. A certificate that cannot be verified is
/// [`StoreError::Certificate`]: retrying cannot fix it.
pub async fn connect_with_ca(
    url: &str,
    cluster: bool,
    timeout: Duration,
    ca_pem: Option<&[u8]>,
) -> Result<Conn, StoreError> {
    let certs = ca_pem.map(|pem| redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.to_vec()),
    });
    let conn = async {
        if cluster {
            let nodes: Vec<&str> = url.split(',').map(str::trim).collect();
            let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(timeout)
                .response_timeout(timeout);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            Ok(Conn::Cluster(
                builder.build()?.get_async_connection().await?,
            ))
        } else {
            let client = match certs {
                Some(certs) => redis::Client::build_with_tls(url, certs)?,
                None => redis::Client::open(url)?,
            };
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(timeout)
                .set_response_timeout(timeout)
                .set_number_of_retries(1);
            Ok(Conn::Single(
                ConnectionManager::new_with_config(client, config).await?,
            ))
        }
    };
    conn.await.map_err(|e: redis::RedisError| {
        if certificate_rejected(&e) {
            StoreError::Certificate(e)
        } else {
            StoreError::Redis(e)
        }
    })
}

/// Whether `e` is a TLS certificate the client could not verify (unknown issuer, wrong name,
/// expired, ...). The cluster client reports its seeds' errors as text, hence the fallback on
/// rustls's own wording.
fn certificate_rejected(e: &redis::RedisError) -> bool {
    let is_cert = |err: &(dyn std::error::Error + 'static)| {
        matches!(
            err.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidCertificate(_))
        )
    };
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if is_cert(err) {
            return true;
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            if is_cert(inner) {
                return true;
            }
        }
        next = err.source();
    }
    e.to_string().contains("invalid peer certificate")
}

/// Most commands in one pipeline round trip.
const PIPELINE_CHUNK: usize = 256;

/// Most read commands in one pipeline of [`Store::read_many`] (its pipelines go out together).
const READ_CHUNK: usize = 1024;

/// Where the store connects again after a READONLY reply.
#[derive(Debug, Clone)]
struct Target {
    url: String,
    cluster: bool,
    timeout: Duration,
    ca_pem: Option<Vec<u8>>,
}

/// Most script and command arguments in one pipeline on a single Redis, and the least it is cut
/// to after timeouts.
const PIPELINE_ARGS: usize = 64 * 1024;
const MIN_PIPELINE_ARGS: usize = 256;

/// The store: connection, key layout and the scripts.
#[derive(Clone)]
pub struct Store {
    conn: Arc<RwLock<Conn>>,
    target: Option<Arc<Target>>,
    keys: Keys,
    scripts: state::Scripts,
    /// Most arguments in one pipeline: halved after a timeout (a slow write is retried in
    /// smaller round trips, never again at the size that timed out), doubled after a success.
    pipeline_args: Arc<AtomicUsize>,
}

impl Store {
    pub fn new(conn: Conn, keys: Keys) -> Self {
        Self {
            conn: Arc::new(RwLock::new(conn)),
            target: None,
            keys,
            scripts: state::Scripts::new(),
            pipeline_args: Arc::new(AtomicUsize::new(PIPELINE_ARGS)),
        }
    }

    /// Connects to `url` and remembers it: a READONLY reply (the node was demoted by a failover
    /// while the connection stayed up) makes the store connect afresh, so a name that now
    /// resolves to the new primary is followed.
    pub async fn connect(
        url: &str,
        cluster: bool,
        timeout: Duration,
        ca_pem: Option<&[u8]>,
        keys: Keys,
    ) -> Result<Self, StoreError> {
        let conn = connect_with_ca(url, cluster, timeout, ca_pem).await?;
        let mut store = Self::new(conn, keys);
        store.target = Some(Arc::new(Target {
            url: url.to_owned(),
            cluster,
            timeout,
            ca_pem: ca_pem.map(<[u8]>::to_vec),
        }));
        Ok(store)
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A connection handle (also for callers that read output keys directly: tests, the demo).
    pub fn conn(&self) -> Conn {
        match self.conn.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Notes a failed operation: after READONLY, connects again (best effort; the caller retries).
    async fn failed(&self, e: StoreError) -> StoreError {
        if e.is_read_only() {
            if let Some(t) = &self.target {
                match connect_with_ca(&t.url, t.cluster, t.timeout, t.ca_pem.as_deref()).await {
                    Ok(fresh) => {
                        tracing::warn!(error = %e, "redis node is read-only (demoted by a failover?): connected again");
                        match self.conn.write() {
                            Ok(mut c) => *c = fresh,
                            Err(poisoned) => *poisoned.into_inner() = fresh,
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "reconnecting after READONLY failed"),
                }
            }
        }
        if matches!(&e, StoreError::Redis(r) if r.is_timeout()) {
            let cut = (self.pipeline_args.load(Ordering::Relaxed) / 2).max(MIN_PIPELINE_ARGS);
            self.pipeline_args.store(cut, Ordering::Relaxed);
        }
        e
    }

    /// `result`, with a failure noted (see [`Self::failed`]).
    async fn checked<T>(&self, result: Result<T, redis::RedisError>) -> Result<T, StoreError> {
        match result {
            Ok(v) => Ok(v),
            Err(e) => Err(self.failed(e.into()).await),
        }
    }

    /// Round trip to check Redis is reachable.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn();
        let r = redis::cmd("PING").query_async::<String>(&mut c).await;
        self.checked(r).await.map(|_| ())
    }

    /// Runs read-only commands: on a single Redis in pipelines of [`READ_CHUNK`] commands, all in
    /// flight at once (replies in order); on a cluster, as [`Self::multi`].
    async fn read_many(&self, cmds: Vec<Cmd>) -> Result<Vec<Value>, StoreError> {
        let Conn::Single(_) = self.conn() else {
            return self.multi(cmds).await;
        };
        let pipes = cmds.chunks(READ_CHUNK).map(|chunk| {
            let mut p = redis::pipe();
            for c in chunk {
                p.add_command(c.clone());
            }
            let mut c = self.conn();
            async move { p.query_async::<Vec<Value>>(&mut c).await }
        });
        let r = futures::future::try_join_all(pipes).await;
        Ok(self.checked(r).await?.into_iter().flatten().collect())
    }

    /// Runs commands that may touch different slots: pipelined in order on a single Redis, concurrent
    /// commands on a cluster (a cluster pipeline must stay within one node).
    async fn multi(&self, cmds: Vec<Cmd>) -> Result<Vec<Value>, StoreError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match self.conn() {
            Conn::Single(_) => {
                // Pipelines of at most PIPELINE_CHUNK commands and the current argument budget,
                // one after the other (in order): a large window's writes never make one reply
                // wait past the response timeout, and one that did is retried smaller.
                let budget = self.pipeline_args.load(Ordering::Relaxed);
                let mut out = Vec::with_capacity(cmds.len());
                let mut cmds = cmds.into_iter().peekable();
                while cmds.peek().is_some() {
                    let mut p = redis::pipe();
                    let (mut n, mut args) = (0, 0);
                    while let Some(c) = cmds.peek() {
                        let a = c.args_iter().count();
                        if n > 0 && (n == PIPELINE_CHUNK || args + a > budget) {
                            break;
                        }
                        n += 1;
                        args += a;
                        p.add_command(cmds.next().expect("peeked"));
                    }
                    let mut c = self.conn();
                    let r = p.query_async::<Vec<Value>>(&mut c).await;
                    out.extend(self.checked(r).await?);
                }
                if budget < PIPELINE_ARGS {
                    let grown = (budget * 2).min(PIPELINE_ARGS);
                    self.pipeline_args.store(grown, Ordering::Relaxed);
                }
                Ok(out)
            }
            Conn::Cluster(conn) => {
                let futs = cmds.into_iter().map(|cmd| {
                    let mut c = conn.clone();
                    async move { cmd.query_async::<Value>(&mut c).await }
                });
                let r = futures::future::try_join_all(futs).await;
                self.checked(r).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error reply as Redis sends it, e.g. `-OOM command not allowed`.
    fn server_error(line: &str) -> StoreError {
        let v = redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
            .expect("an error reply parses");
        match v.extract_error() {
            Err(e) => StoreError::Redis(e),
            Ok(v) => panic!("{line}: not an error: {v:?}"),
        }
    }

    #[test]
    fn outages_are_told_apart_from_errors_that_need_a_restart() {
        let io =
            StoreError::Redis(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into());
        assert!(io.is_outage());
        assert!(
            server_error("OOM command not allowed when used memory > 'maxmemory'.").is_outage()
        );
        assert!(server_error("BUSY Redis is busy running a script.").is_outage());
        assert!(server_error("LOADING Redis is loading the dataset in memory").is_outage());
        assert!(!server_error("READONLY You can't write against a read only replica.").is_outage());
        assert!(
            server_error("READONLY You can't write against a read only replica.").is_read_only()
        );
        assert!(!server_error("NOPERM this user has no permissions").is_outage());
        assert!(!StoreError::Protocol("bad reply".into()).is_outage());
    }
}
