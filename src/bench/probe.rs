//! The worker under test, as its own process (`rescorer run`), and its `/metrics` as numbers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Settings;

pub struct WorkerProcess {
    child: tokio::process::Child,
    port: u16,
    /// The benchmark's settings as the worker's config file (removed when the worker is dropped).
    _config: tempfile::NamedTempFile,
}

/// Parsed Prometheus text: series (name with labels) → value.
pub struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Self {
        Scrape(
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .filter_map(|l| {
                    let (k, v) = l.rsplit_once(' ')?;
                    Some((k.to_owned(), v.parse().ok()?))
                })
                .collect(),
        )
    }

    /// Sum of every series of a family (all label sets).
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
            .map(|(_, v)| v)
            .sum()
    }

    /// Sum of a family's samples whose label set satisfies `keep` (given the text between the
    /// braces, e.g. `outcome="applied",topic="feature_updates"`).
    pub fn sum_where(&self, name: &str, keep: impl Fn(&str) -> bool) -> f64 {
        let prefix = format!("{name}{{");
        self.0
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?, v)))
            .filter(|(labels, _)| keep(labels))
            .map(|(_, v)| v)
            .sum()
    }

    /// Input events handled (applied, stale, dead-lettered): forwarded copies and rescore
    /// requests, which owned state sends on to itself, are not counted again.
    pub fn input_events(&self) -> f64 {
        self.sum_where("rescorer_events_total", |l| {
            !l.contains("outcome=\"forwarded\"") && !l.contains("topic=\"rescore_requests\"")
        })
    }

    /// Largest sample of a family (any label set), 0 when there is none.
    pub fn max(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
            .map(|(_, v)| *v)
            .fold(0.0, f64::max)
    }

    /// Cumulative buckets (le, count) of a histogram family, summed over the label sets whose
    /// labels contain `filter` (e.g. `lane="live"`; "" for all).
    fn buckets(&self, name: &str, filter: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{");
        let mut by_le: HashMap<String, f64> = HashMap::new();
        for (k, v) in &self.0 {
            if let Some(labels) = k.strip_prefix(&prefix) {
                if !labels.contains(filter) {
                    continue;
                }
                if let Some(le) = labels
                    .split("le=\"")
                    .nth(1)
                    .and_then(|s| s.split('"').next())
                {
                    *by_le.entry(le.to_owned()).or_default() += v;
                }
            }
        }
        let mut buckets: Vec<(f64, f64)> = by_le
            .into_iter()
            .map(|(le, c)| {
                (
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap_or(f64::INFINITY)
                    },
                    c,
                )
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }

    /// `histogram_quantile` over every label set of a histogram family, linear in the bucket.
    #[cfg(test)]
    pub fn histogram_quantile(&self, name: &str, q: f64) -> f64 {
        quantile(&self.buckets(name, ""), q)
    }

    /// The same over the label sets matching `filter`.
    pub fn histogram_quantile_where(&self, name: &str, filter: &str, q: f64) -> f64 {
        quantile(&self.buckets(name, filter), q)
    }

    /// Quantile of the observations made between `earlier` and this scrape.
    pub fn interval_quantile(&self, earlier: &Scrape, name: &str, filter: &str, q: f64) -> f64 {
        let before = earlier.buckets(name, filter);
        let delta: Vec<(f64, f64)> = self
            .buckets(name, filter)
            .into_iter()
            .map(|(le, c)| {
                let b = before
                    .iter()
                    .find(|x| x.0 == le)
                    .map(|x| x.1)
                    .unwrap_or(0.0);
                (le, c - b)
            })
            .collect();
        quantile(&delta, q)
    }
}

/// Quantile from cumulative buckets, linear inside the bucket; NaN without observations.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lo;
            }
            let inside = (count - below).max(1e-12);
            return lo + (le - lo) * (rank - below) / inside;
        }
        lo = le;
        below = count;
    }
    lo
}

impl WorkerProcess {
    /// Starts `rescorer run` on `settings` (a config file of them, with the scratch names also
    /// in the environment so that inherited `RESCORER__*` variables cannot replace them), with
    /// extra `--set`s.
    pub async fn start(settings: &Settings, set: &[String]) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let s = settings;
        let env = [
            (
                "RESCORER__KAFKA__BOOTSTRAP_SERVERS",
                s.kafka.bootstrap_servers.clone(),
            ),
            ("RESCORER__KAFKA__GROUP_ID", s.kafka.group_id.clone()),
            (
                "RESCORER__TOPICS__FEATURE_UPDATES",
                s.topics.feature_updates.clone(),
            ),
            (
                "RESCORER__TOPICS__NEW_CANDIDATES",
                s.topics.new_candidates.clone(),
            ),
            (
                "RESCORER__TOPICS__DECAY_TICKS",
                s.topics.decay_ticks.clone(),
            ),
            ("RESCORER__TOPICS__DLQ", s.topics.dlq.clone()),
            (
                "RESCORER__TOPICS__RESCORE_REQUESTS",
                s.topics.rescore_requests.clone(),
            ),
            ("RESCORER__REDIS__URL", s.redis.url.clone()),
            ("RESCORER__OUTPUT__KEY_PREFIX", s.output.key_prefix.clone()),
            ("RESCORER__MODEL__SPEC", s.model.spec.display().to_string()),
            (
                "RESCORER__MODEL__DEVICE",
                s.model.device.as_str().to_string(),
            ),
        ];
        let mut config = tempfile::Builder::new().suffix(".toml").tempfile()?;
        std::io::Write::write_all(&mut config, toml::to_string(settings)?.as_bytes())?;
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.arg("run")
            .arg("--config")
            .arg(config.path())
            .arg("--set")
            .arg(format!("http.listen=\"127.0.0.1:{port}\""));
        for x in set {
            cmd.arg("--set").arg(x);
        }
        if let Some(lib) = &s.model.runtime_library {
            cmd.env("ORT_DYLIB_PATH", lib);
        }
        let child = cmd
            .envs(env)
            // RESCORER_BENCH_WORKER_LOG: the worker's log filter (e.g. to profile its windows).
            .env(
                "RUST_LOG",
                std::env::var("RESCORER_BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the worker process")?;
        let p = Self {
            child,
            port,
            _config: config,
        };
        let until = Instant::now() + Duration::from_secs(30);
        while p.get("/healthz").await.is_err() {
            if Instant::now() > until {
                bail!("the worker did not serve /healthz within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(p)
    }

    async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await?;
        let status = buf.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        Ok((
            status,
            buf.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_owned())
                .unwrap_or_default(),
        ))
    }

    pub async fn scrape(&self) -> anyhow::Result<Scrape> {
        Ok(Scrape::parse(&self.get("/metrics").await?.1))
    }

    /// Waits until `/readyz` answers 200 (partitions assigned).
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let until = Instant::now() + Duration::from_secs(60);
        while self.get("/readyz").await.map(|r| r.0).unwrap_or(0) != 200 {
            if Instant::now() > until {
                bail!("the worker was not ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Peak resident memory of the worker process so far (VmHWM), MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let Some(pid) = self.child.id() else {
            return f64::NAN;
        };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }

    /// SIGTERM, then wait for the drain.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_the_bucket_across_label_sets() {
        let text = "\
h_bucket{topic=\"a\",le=\"0.01\"} 50
h_bucket{topic=\"a\",le=\"0.1\"} 100
h_bucket{topic=\"a\",le=\"+Inf\"} 100
h_bucket{topic=\"b\",le=\"0.01\"} 50
h_bucket{topic=\"b\",le=\"0.1\"} 100
h_bucket{topic=\"b\",le=\"+Inf\"} 100
c_total{x=\"1\"} 3
c_total{x=\"2\"} 4
";
        let s = Scrape::parse(text);
        assert!((s.histogram_quantile("h", 0.5) - 0.01).abs() < 1e-9);
        assert!((s.histogram_quantile("h", 0.75) - 0.055).abs() < 1e-9);
        assert_eq!(s.sum("c_total"), 7.0);
        assert_eq!(s.max("c_total"), 4.0);
        assert!((s.histogram_quantile_where("h", "topic=\"b\"", 0.5) - 0.01).abs() < 1e-9);
        let later = Scrape::parse(
            &text
                .replace("le=\"0.1\"} 100", "le=\"0.1\"} 150")
                .replace("le=\"+Inf\"} 100", "le=\"+Inf\"} 150"),
        );
        assert!(
            (later.interval_quantile(&s, "h", "", 0.5) - 0.055).abs() < 1e-9,
            "only the 100 new observations, all in (0.01, 0.1]"
        );
    }
}
