//! The typed settings tree: `rescorer.toml` < `RESCORER__SECTION__FIELD` environment < `--set`.
//!
//! Every field has a default with a reason. Unknown keys are an error, and every error names the
//! file and the field. Validation happens once, at start-up. Secrets (SASL passwords, Redis
//! passwords) live in `kafka.options` and `redis.url`; [`Settings::summary`] is what gets logged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The whole settings tree.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub topics: TopicSettings,
    pub redis: RedisSettings,
    pub model: ModelSettings,
    pub batch: BatchSettings,
    pub catchup: CatchupSettings,
    pub decay: DecaySettings,
    pub output: OutputSettings,
    pub http: HttpSettings,
    pub state: StateSettings,
}

/// Where the worker keeps the state it scores from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StateMode {
    /// Every window reads what it needs from Redis and writes through per-member scripts that
    /// guard every value by event time (any worker may write any member).
    Remote,
    /// Each member's state is owned by the worker that owns the member's partition, held in
    /// memory and written behind as plain commands fenced by the owner's generation
    /// (`docs/state.md`).
    Owned,
}

/// `[state]`: where the state lives.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateSettings {
    pub mode: StateMode,
    /// Owned mode: bytes of member state kept in memory (estimated); the least recently used
    /// members whose writes are acknowledged are evicted past it and read again on their next
    /// event. 256 MiB holds about a million pairs.
    pub cache_bytes: u64,
    /// Owned state: a removal tombstone is dropped once the member has an event this much newer
    /// (in event time), so removed pairs stop costing memory; a replay of events older than that
    /// may bring a removed pair back (out of contract). 30 days; 0 keeps tombstones for ever.
    pub tombstone_horizon_secs: u64,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            mode: StateMode::Remote,
            cache_bytes: 256 * 1024 * 1024,
            tombstone_horizon_secs: 30 * 86_400,
        }
    }
}

/// `[kafka]`: the consumer group and any librdkafka option.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// The consumer group every worker of one deployment shares.
    pub group_id: String,
    /// Passed to librdkafka untouched (SASL, TLS, timeouts, ...), e.g.
    /// `"security.protocol" = "SASL_SSL"`. Overrides the worker's own defaults. Numbers and
    /// booleans are accepted and passed as their text.
    #[serde(deserialize_with = "scalar_strings")]
    pub options: BTreeMap<String, String>,
}

/// A map whose values may be TOML strings, integers, floats or booleans, kept as text.
fn scalar_strings<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, toml::Value>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            let text = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(serde::de::Error::custom(format!(
                        "option `{k}` must be a string, number or boolean, got {}",
                        other.type_str()
                    )));
                }
            };
            Ok((k, text))
        })
        .collect()
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            bootstrap_servers: "localhost:9092".into(),
            group_id: "rescorer".into(),
            options: BTreeMap::new(),
        }
    }
}

/// `[topics]`: names of the four topics.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicSettings {
    pub feature_updates: String,
    pub new_candidates: String,
    pub decay_ticks: String,
    /// Where undecodable or invalid events go, with the reason in headers.
    pub dlq: String,
    /// Owned state: candidate updates ask the owners of the candidate's members to rescore them
    /// here (internal; as many partitions as the input topics).
    pub rescore_requests: String,
}

impl Default for TopicSettings {
    fn default() -> Self {
        Self {
            feature_updates: "catchup.feature-updates".into(),
            new_candidates: "catchup.new-candidates".into(),
            decay_ticks: "catchup.decay-ticks".into(),
            dlq: "catchup.rescorer-dlq".into(),
            rescore_requests: "catchup.rescore-requests".into(),
        }
    }
}

/// `[redis]`: the shared store. Its `Debug` masks the passwords in `url`.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://[[user]:password@]host:port[/db]` or `rediss://` for TLS. With `cluster`, a
    /// comma-separated list of seed nodes. Logged with its passwords masked.
    pub url: String,
    /// Redis Cluster (all keys carry hash tags).
    pub cluster: bool,
    /// Connect and response timeout; a slower reply counts as an outage and is retried (in
    /// smaller round trips).
    pub timeout_ms: u64,
    /// READONLY replies (a node demoted by a failover) are retried this long, the store
    /// connecting again each time, then the worker exits non-zero so that the orchestrator
    /// restarts it; nothing past the last acknowledged write is committed. 60 s: longer than a
    /// Redis failover takes. Outages (no connection, timeouts, LOADING, CLUSTERDOWN, OOM) are
    /// retried for as long as they last; permanent errors (WRONGPASS, NOPERM, WRONGTYPE, an
    /// unexpected reply, a model failure while writing) are not retried: the worker exits.
    pub give_up_after_secs: u64,
    /// PEM file of the CA certificate(s) a `rediss://` server's certificate must chain to,
    /// instead of the system trust store (for a private CA). Unset: the system trust store. A
    /// certificate that cannot be verified stops start-up; it is not retried.
    pub tls_ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redact::redis_url(&self.url))
            .field("cluster", &self.cluster)
            .field("timeout_ms", &self.timeout_ms)
            .field("give_up_after_secs", &self.give_up_after_secs)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            cluster: false,
            timeout_ms: 2000,
            give_up_after_secs: 60,
            tls_ca_file: None,
        }
    }
}

/// `[batch]`: how triggers become model runs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchSettings {
    /// Flush a batch at this many pairs (estimated: a member-wide trigger counts as the recent
    /// average pairs per member); also the most rows in one model run. 1024 amortises the
    /// per-run overhead (see perf/) while keeping a batch's Redis round trips small.
    pub max_pairs: usize,
    /// A fresh window is written as soon as the writer is free and no input is waiting; while
    /// input keeps coming, at most this long after its first trigger, full or not. 20 ms keeps
    /// a steady stream's windows large enough to coalesce bursts.
    pub max_wait_ms: u64,
    /// Members scanned per chunk of a candidate's fan-out (interleaved with other work).
    pub fanout_chunk: usize,
    /// Fan-out and decay-tick chunks fill a fresh window only up to this many pairs (and never
    /// past `max_pairs`); the rest of the window is for fresh events. A fan-out pair costs a member's whole write (one script
    /// call, one load) for a single row, several times a member-wide rescoring's cost per row,
    /// so this bounds how long fan-outs make a window, and every fresh event waiting on it.
    /// Lower favours member updates and new candidates; candidate updates then wait longer for
    /// their fan-outs (perf/README.md, eleventh run). A chunk asks for no more than the room
    /// left, though a small member set comes back whole.
    pub job_pairs: usize,
    /// Fan-outs and decay ticks in progress at once. A queued fan-out starts when fewer are in
    /// progress (its candidate's later updates merge into it meanwhile: at most one queued per
    /// candidate, so fresh events keep flowing); with this many decay ticks in progress the
    /// worker stops taking input.
    pub max_jobs: usize,
    /// A candidate's fan-out starts at most once per this interval; its updates in between merge
    /// into the next run. A hot candidate (many members, frequent updates) would otherwise rescore
    /// all of its pairs on every update; 1 s caps that cost at the price of at most 1 s of extra
    /// staleness for those pairs.
    pub fanout_min_interval_ms: u64,
    /// ...and once per `fanout_min_interval_ms` per this many members its last fan-out covered:
    /// a candidate in 2,000 members' lists fans out at most every 8 s at the defaults, so each
    /// hot candidate costs at most ~250 rows/s and fresh member updates and new candidates keep
    /// the writer (perf/README.md, seventh run: 500 left a grown graph's live lane behind).
    pub fanout_interval_members: usize,
    /// Merge repeated triggers for a member or pair inside a window. Only the benchmark's
    /// ablation turns it off, to measure what it saves.
    pub coalesce: bool,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_pairs: 1024,
            max_wait_ms: 20,
            fanout_chunk: 500,
            job_pairs: 1024,
            max_jobs: 64,
            fanout_min_interval_ms: 1000,
            fanout_interval_members: 250,
            coalesce: true,
        }
    }
}

/// `[catchup]`: fresh events ahead of a backlog.
///
/// When a partition falls far behind (after an outage, a deploy, a replay), a second reader (the
/// head reader) takes its fresh events from the log end while the consumer group's reader drains
/// the backlog: fresh events are scored within a window's time, the backlog behind them in
/// windows of its own that take `backlog_share` of the writer while fresh windows are due. When
/// the backlog is read, the group's reader skips what the head reader already had and takes over
/// again.
/// Offsets are committed up to the first unfinished backlog message, so a crash replays the
/// backlog, never skips it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatchupSettings {
    /// Split lagging partitions (the default). Off, a backlog is read strictly in order.
    pub enabled: bool,
    /// Split a partition when the last message read from it is at least this old, or when a
    /// fresh event would wait at least this long behind what is unread (at the recent intake
    /// rate); a partition nothing was read from yet is split at once...
    pub lag_ms: u64,
    /// ...and at least this many messages are behind it.
    pub min_messages: u64,
    /// A backlog window is written this long after its first trigger (or when full, or when
    /// nothing more can join it and the writer is free), so the backlog coalesces over longer
    /// spans than fresh events do.
    pub max_wait_ms: u64,
    /// A backlog window is full at this many (estimated) pairs: larger than fresh windows, for
    /// coalescing and throughput, yet small enough that a fresh window waits at most one backlog
    /// window's write (~0.2 s at 4096 on 2 cores).
    pub max_pairs: usize,
    /// While a backlog drains, fan-out and tick chunks fill a fresh window only up to this many
    /// pairs (when lower than `batch.job_pairs`, which applies otherwise): the fresh lane's member updates and new candidates
    /// wait for shorter windows, and the backlog gets its share of the writer sooner. Fresh
    /// candidate updates wait longer meanwhile; they merge into their queued fan-outs.
    pub job_pairs: usize,
    /// The share of written rows the backlog gets while fresh windows are due too (0 to 1):
    /// at 0.5, a backlog window goes ahead of a due fresh one only after as many fresh rows were
    /// written as backlog rows. When no fresh window is due the backlog takes the whole writer.
    pub backlog_share: f64,
    /// A member's whole rescoring from the backlog is held this long from its first update,
    /// taking in the member's later updates and new pairs, then runs once (sooner when its
    /// partition's backlog is read); a candidate's backlog fan-out runs at most once per this
    /// interval too, when longer than `batch.fanout_min_interval_ms`. A backlog replays minutes
    /// of traffic in seconds, so this is where it coalesces most; the backlog is behind anyway,
    /// and a held message's offset waits for the release. 0 turns it off.
    pub min_interval_ms: u64,
}

impl Default for CatchupSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            lag_ms: 5_000,
            min_messages: 1_000,
            max_wait_ms: 200,
            max_pairs: 4096,
            job_pairs: 256,
            backlog_share: 0.5,
            min_interval_ms: 2_000,
        }
    }
}

/// `[decay]`: when scored pairs are due for rescoring.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecaySettings {
    /// A pair is due again after `age_fraction` × its moment's age (young moments decay fast),
    /// clamped to [`min_interval_secs`, `max_interval_secs`].
    pub age_fraction: f64,
    /// Floor of the interval: 15 minutes keeps a burst of young moments from rescoring constantly.
    pub min_interval_secs: u64,
    /// Every scored pair is due again at most this long after it was scored (24 h).
    pub max_interval_secs: u64,
    /// Shards of the decay schedule; a tick on partition p of the ticks topic handles the shards
    /// s with s mod (partitions) = p. Fixed for the life of a deployment's Redis data.
    pub shards: u32,
    /// Due pairs fetched per chunk of a tick.
    pub chunk: usize,
    /// Publish a tick to every partition of the ticks topic this often. Off (0) by default so a
    /// replay stays deterministic; `rescorer tick` from a scheduler is the usual source.
    pub ticker_interval_secs: u64,
    /// Owned state: a member with no event for this long (in event time, against the tick's)
    /// is no longer decayed: a tick drops its pairs from the schedule instead of rescoring
    /// them, so its output's TTL can fire, and its next event rescores all its pairs again
    /// (30 days; 0: decay every member for ever).
    pub active_horizon_secs: u64,
}

impl Default for DecaySettings {
    fn default() -> Self {
        Self {
            age_fraction: 0.25,
            min_interval_secs: 900,
            max_interval_secs: 86_400,
            shards: 16,
            chunk: 1000,
            ticker_interval_secs: 0,
            active_horizon_secs: 30 * 86_400,
        }
    }
}

impl DecaySettings {
    /// Whether a member whose last event was at `last_event_ms` is dormant as of `at_ms` (see
    /// `active_horizon_secs`; a member with no event yet is not).
    pub fn dormant(&self, last_event_ms: Option<i64>, at_ms: i64) -> bool {
        let horizon =
            i64::try_from(self.active_horizon_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        self.active_horizon_secs > 0
            && last_event_ms.is_some_and(|t| t < at_ms.saturating_sub(horizon))
    }

    /// When a pair scored as of `as_of_ms` whose moment was at `moment_ts_ms` is due again.
    pub fn next_due(&self, as_of_ms: i64, moment_ts_ms: i64) -> i64 {
        // Saturating throughout: event times are bounded at decode, intervals by nothing but u64.
        let age_ms = as_of_ms.saturating_sub(moment_ts_ms).max(0) as f64;
        let min = self.min_interval_secs.saturating_mul(1000) as f64;
        let max = self.max_interval_secs.saturating_mul(1000) as f64;
        as_of_ms.saturating_add((age_ms * self.age_fraction).clamp(min, max) as i64)
    }
}

/// `[output]`: what the Catch Up service reads.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSettings {
    /// Prefix of every key, output and state; tenants and tests use their own.
    pub key_prefix: String,
    /// Candidates kept in `<prefix>:scores:{member}`; the rest stay in state and come back when
    /// their scores rise.
    pub top_n: usize,
    /// TTL of the output keys (7 days: members who do not come back stop costing memory), set
    /// again by a write once a 64th of it has passed.
    pub ttl_secs: u64,
}

impl Default for OutputSettings {
    fn default() -> Self {
        Self {
            key_prefix: "catchup".into(),
            top_n: 100,
            ttl_secs: 7 * 86_400,
        }
    }
}

/// `[http]`: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    pub listen: String,
    /// `/healthz` fails (503, `rescorer_unhealthy{reason="stalled"}` 1) once input has been
    /// pending (lag, an open window or a job) this long with no progress (no message finished, no
    /// window written), so the orchestrator restarts a stuck pod. 300 s: far above the longest
    /// legitimate pause (a Redis outage is retried with backoff capped at 5 s, and a restart would
    /// not end an outage sooner), short enough that a wedged worker does not hold its partitions
    /// for long. 0 turns the check off.
    pub stall_timeout_secs: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9464".into(),
            stall_timeout_secs: 300,
        }
    }
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// ONNX Runtime's CPU provider. The default: every host has one.
    #[default]
    Cpu,
    /// ONNX Runtime's CUDA provider; start-up fails if it cannot register.
    Cuda,
    /// CUDA when it registers, otherwise CPU (logged, and shown in `rescorer_model_info`).
    Auto,
}

impl Device {
    /// The name used in settings files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Auto => "auto",
        }
    }
}

/// `[model]`: the ranking model and how ONNX Runtime runs it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    /// The feature spec (JSON); it names the ONNX file, relative to itself.
    pub spec: PathBuf,
    /// `cpu`, `cuda` or `auto`.
    pub device: Device,
    /// Path to `libonnxruntime.so`. Unset: the `ORT_DYLIB_PATH` environment variable.
    pub runtime_library: Option<PathBuf>,
    /// Threads inside one operator. 1 by default: the model is small, batches are the
    /// parallelism, and the worker's own threads need the remaining cores.
    pub intra_threads: usize,
    /// Threads across independent graph nodes; the MLP is a chain, so 1.
    pub inter_threads: usize,
    /// Let ONNX Runtime's pool threads spin while waiting for work. Off by default: spinning
    /// burns cores a small host needs for consuming and Redis I/O, for little latency gain.
    pub spinning: bool,
    /// CUDA device ordinal for `cuda`/`auto`.
    pub cuda_device_id: i32,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            spec: PathBuf::from("models/catchup-ranker.json"),
            device: Device::Cpu,
            runtime_library: None,
            intra_threads: 1,
            inter_threads: 1,
            spinning: false,
            cuda_device_id: 0,
        }
    }
}

/// Settings that cannot be used; the message names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: cannot read file: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: field `{field}`: {problem}")]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
}

impl ModelSettings {
    /// Checks what serde cannot.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, problem: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field: format!("model.{field}"),
            problem: problem.to_owned(),
        };
        if self.intra_threads == 0 {
            return Err(invalid("intra_threads", "must be at least 1"));
        }
        if self.inter_threads == 0 {
            return Err(invalid("inter_threads", "must be at least 1"));
        }
        if self.cuda_device_id < 0 {
            return Err(invalid("cuda_device_id", "must not be negative"));
        }
        Ok(())
    }
}

mod load;
pub mod redact;

#[cfg(test)]
mod tests;
