//! Loading the settings: file, then environment, then `--set` overrides, then validation.

use std::path::{Path, PathBuf};

use super::{ConfigError, Settings};

/// Splits a dotted `--set` key; librdkafka option names keep their dots (`kafka.options.sasl.username`).
fn dotted(key: &str) -> Vec<String> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() > 3 && parts[0] == "kafka" && parts[1] == "options" {
        vec!["kafka".into(), "options".into(), parts[2..].join(".")]
    } else {
        parts.into_iter().map(str::to_owned).collect()
    }
}

/// Whether the value at `parts` is text whatever it looks like: a librdkafka option (passed on
/// untouched, so `0x1F` stays `0x1F`) or a field whose default is a string (a group id `2024`
/// stays a string).
fn textual(parts: &[String]) -> bool {
    if parts.len() >= 3 && parts[0] == "kafka" && parts[1] == "options" {
        return true;
    }
    let Ok(defaults) = toml::Value::try_from(Settings::default()) else {
        return false;
    };
    let mut cur = &defaults;
    for p in parts {
        match cur.get(p.as_str()) {
            Some(v) => cur = v,
            None => return false,
        }
    }
    cur.is_str()
}

/// Sets the value at `parts` in `table` to `raw`, parsed as a TOML value when it is one, else a
/// string. Where the value is [`textual`], only a quoted TOML string is parsed (`"x"` is `x`);
/// anything else is kept as written.
fn set_path(table: &mut toml::Table, parts: &[String], raw: &str) -> Result<(), String> {
    let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    let value = match parsed {
        Some(v) if v.is_str() || !textual(parts) => v,
        _ => toml::Value::String(raw.to_owned()),
    };
    let (last, parents) = parts.split_last().ok_or("empty key")?;
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry((*p).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is not a section"))?;
    }
    cur.insert((*last).to_owned(), value);
    Ok(())
}

impl Settings {
    /// Reads `path` (if given), applies `RESCORER__SECTION__FIELD` variables from `env`, then
    /// `overrides` (`section.field=value`), and validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let shown = path
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("(defaults)"));
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::Parse {
                    path: p.to_owned(),
                    message: e.to_string(),
                })?
            }
            None => toml::Table::new(),
        };
        let parse_err = |message: String| ConfigError::Parse {
            path: shown.clone(),
            message,
        };
        for (k, v) in env {
            if let Some(rest) = k.strip_prefix("RESCORER__") {
                let parts: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
                set_path(&mut table, &parts, &v)
                    .map_err(|e| parse_err(format!("environment {k}: {e}")))?;
            }
        }
        for o in overrides {
            let (k, v) = o
                .split_once('=')
                .ok_or_else(|| parse_err(format!("--set {o}: expected section.field=value")))?;
            set_path(&mut table, &dotted(k.trim()), v.trim())
                .map_err(|e| parse_err(format!("--set {o}: {e}")))?;
        }
        let settings: Settings = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError::Invalid {
                path: shown.clone(),
                field: e.path().to_string(),
                problem: e.inner().to_string(),
            })?;
        settings.validate(&shown)?;
        Ok(settings)
    }

    /// Checks what serde cannot, naming the field.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        self.model.validate(path)?;
        let invalid = |field: &str, problem: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field: field.to_owned(),
            problem: problem.to_owned(),
        };
        let nonempty = [
            ("kafka.bootstrap_servers", &self.kafka.bootstrap_servers),
            ("kafka.group_id", &self.kafka.group_id),
            ("topics.feature_updates", &self.topics.feature_updates),
            ("topics.new_candidates", &self.topics.new_candidates),
            ("topics.decay_ticks", &self.topics.decay_ticks),
            ("topics.dlq", &self.topics.dlq),
            ("topics.rescore_requests", &self.topics.rescore_requests),
            ("redis.url", &self.redis.url),
            ("output.key_prefix", &self.output.key_prefix),
        ];
        for (field, v) in nonempty {
            if v.trim().is_empty() {
                return Err(invalid(field, "must not be empty"));
            }
        }
        let positive = [
            ("batch.max_pairs", self.batch.max_pairs as u64),
            ("batch.fanout_chunk", self.batch.fanout_chunk as u64),
            ("batch.job_pairs", self.batch.job_pairs as u64),
            ("batch.max_jobs", self.batch.max_jobs as u64),
            (
                "batch.fanout_interval_members",
                self.batch.fanout_interval_members as u64,
            ),
            ("catchup.min_messages", self.catchup.min_messages),
            ("catchup.max_pairs", self.catchup.max_pairs as u64),
            ("catchup.job_pairs", self.catchup.job_pairs as u64),
            ("decay.shards", u64::from(self.decay.shards)),
            ("decay.chunk", self.decay.chunk as u64),
            ("decay.max_interval_secs", self.decay.max_interval_secs),
            ("redis.give_up_after_secs", self.redis.give_up_after_secs),
            ("output.top_n", self.output.top_n as u64),
            ("output.ttl_secs", self.output.ttl_secs),
            ("redis.timeout_ms", self.redis.timeout_ms),
            ("state.cache_bytes", self.state.cache_bytes),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if self.state.mode == super::StateMode::Owned {
            let strategy = self.kafka.options.get("partition.assignment.strategy");
            if strategy.is_some_and(|s| s.split(',').next().map(str::trim) != Some("range")) {
                return Err(invalid(
                    "kafka.options.partition.assignment.strategy",
                    "owned state needs partition p of every input topic on one worker: use \"range\"",
                ));
            }
        }
        if self.decay.min_interval_secs > self.decay.max_interval_secs {
            return Err(invalid(
                "decay.min_interval_secs",
                "must not exceed decay.max_interval_secs",
            ));
        }
        if !(self.catchup.backlog_share > 0.0 && self.catchup.backlog_share < 1.0) {
            return Err(invalid(
                "catchup.backlog_share",
                "must be between 0 and 1 (exclusive)",
            ));
        }
        if !(self.decay.age_fraction > 0.0 && self.decay.age_fraction.is_finite()) {
            return Err(invalid("decay.age_fraction", "must be a positive number"));
        }
        if self.output.key_prefix.contains(['{', '}']) {
            return Err(invalid(
                "output.key_prefix",
                "must not contain `{` or `}`: Redis Cluster hashes the first `{...}` of a key, \
                 and a brace in the prefix would take the place of the member's hash tag",
            ));
        }
        // What the redis crate refuses without connecting (a URL it cannot read, seeds of one
        // cluster with different passwords or TLS modes) is a settings error, not an outage.
        let url = &self.redis.url;
        let checked = if self.redis.cluster {
            redis::cluster::ClusterClientBuilder::new(
                url.split(',').map(str::trim).collect::<Vec<_>>(),
            )
            .build()
            .map(drop)
        } else {
            redis::Client::open(url.as_str()).map(drop)
        };
        if let Err(e) = checked {
            return Err(invalid(
                "redis.url",
                &format!(
                    "{} is not usable: {}",
                    super::redact::redis_url(url),
                    super::redact::scrub(&e.to_string(), url)
                ),
            ));
        }
        if let Some(ca) = &self.redis.tls_ca_file {
            let shown = ca.display();
            let plain = self
                .redis
                .url
                .split(',')
                .any(|u| !u.trim().starts_with("rediss://"));
            if plain {
                return Err(invalid(
                    "redis.tls_ca_file",
                    "is set, so every address in redis.url must start with rediss://",
                ));
            }
            let pem = std::fs::read(ca)
                .map_err(|e| invalid("redis.tls_ca_file", &format!("cannot read {shown}: {e}")))?;
            use rustls::pki_types::{pem::PemObject, CertificateDer};
            let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>();
            match certs {
                Ok(c) if !c.is_empty() => {}
                Ok(_) => {
                    return Err(invalid(
                        "redis.tls_ca_file",
                        &format!("{shown} holds no PEM certificate"),
                    ))
                }
                Err(e) => {
                    return Err(invalid(
                        "redis.tls_ca_file",
                        &format!("{shown} is not a valid PEM file: {e}"),
                    ))
                }
            }
        }
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "http.listen",
                "must be an address like 0.0.0.0:9464",
            ));
        }
        Ok(())
    }

    /// What is safe to log: no passwords (every form of `redis.url` is masked by
    /// [`super::redact::redis_url`]), no librdkafka option values.
    pub fn summary(&self) -> String {
        let tls_ca = self
            .redis
            .tls_ca_file
            .as_ref()
            .map(|p| format!(" tls_ca={}", p.display()))
            .unwrap_or_default();
        format!(
            "kafka={} group={} options=[{}] redis={} cluster={}{tls_ca} model={} device={:?} batch={}/{}ms top_n={} prefix={} state={:?}",
            self.kafka.bootstrap_servers,
            self.kafka.group_id,
            self.kafka.options.keys().cloned().collect::<Vec<_>>().join(","),
            super::redact::redis_url(&self.redis.url),
            self.redis.cluster,
            self.model.spec.display(),
            self.model.device,
            self.batch.max_pairs,
            self.batch.max_wait_ms,
            self.output.top_n,
            self.output.key_prefix,
            self.state.mode,
        )
    }
}
