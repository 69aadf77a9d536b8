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
mod keys;
mod state;

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

pub use apply::Applied;
pub use keys::Keys;
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

/// The store: connection, key layout and the scripts.
#[derive(Clone)]
pub struct Store {
    conn: Conn,
    keys: Keys,
    scripts: state::Scripts,
}

impl Store {
    pub fn new(conn: Conn, keys: Keys) -> Self {
        Self {
            conn,
            keys,
            scripts: state::Scripts::new(),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A connection handle for callers that read output keys directly (tests, the demo).
    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// Round trip to check Redis is reachable.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("PING").query_async::<String>(&mut c).await?;
        Ok(())
    }

    /// Runs commands that may touch different slots: pipelined in order on a single Redis, concurrent
    /// commands on a cluster (a cluster pipeline must stay within one node).
    async fn multi(&self, cmds: Vec<Cmd>) -> Result<Vec<Value>, StoreError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match &self.conn {
            Conn::Single(_) => {
                // Pipelines of at most PIPELINE_CHUNK commands, one after the other (in order):
                // a large window's writes never make one reply wait past the response timeout.
                let mut out = Vec::with_capacity(cmds.len());
                let mut cmds = cmds.into_iter().peekable();
                while cmds.peek().is_some() {
                    let mut p = redis::pipe();
                    for c in cmds.by_ref().take(PIPELINE_CHUNK) {
                        p.add_command(c);
                    }
                    let mut c = self.conn.clone();
                    out.extend(p.query_async::<Vec<Value>>(&mut c).await?);
                }
                Ok(out)
            }
            Conn::Cluster(_) => {
                let futs = cmds.into_iter().map(|cmd| {
                    let mut c = self.conn.clone();
                    async move { cmd.query_async::<Value>(&mut c).await }
                });
                Ok(futures::future::try_join_all(futs).await?)
            }
        }
    }
}
