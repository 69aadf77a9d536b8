//! `rescorer bench model`: model rows/s and batch latency for a list of batch sizes.
//!
//! A benchmark, not a test: it measures and reports, it asserts nothing about speed.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::score::Scorer;

#[derive(Debug, Serialize)]
pub struct BatchResult {
    pub batch: usize,
    pub runs: usize,
    pub rows_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub device: String,
    pub intra_threads: usize,
    pub cpu: String,
    pub seconds_per_size: f64,
    pub results: Vec<BatchResult>,
}

/// A matrix of plausible, deterministic feature values (the model's cost does not depend on them).
fn matrix(rows: usize, width: usize) -> Vec<f32> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..rows * width)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 1000) as f32 / 250.0
        })
        .collect()
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx].as_secs_f64() * 1e3
}

/// The CPU's model name, for reports.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn run(
    scorer: &Scorer,
    batch_sizes: &[usize],
    seconds: f64,
    intra_threads: usize,
) -> anyhow::Result<Report> {
    let width = scorer.engine().layout().width();
    let mut results = Vec::new();
    for &batch in batch_sizes {
        let m = matrix(batch, width);
        for _ in 0..3 {
            scorer.engine().score_matrix(&m)?;
        }
        let budget = Duration::from_secs_f64(seconds);
        let started = Instant::now();
        let mut lat = Vec::new();
        while started.elapsed() < budget || lat.len() < 5 {
            let t = Instant::now();
            let s = scorer.engine().score_matrix(&m)?;
            lat.push(t.elapsed());
            anyhow::ensure!(
                s.len() == batch,
                "model returned {} scores for {batch} rows",
                s.len()
            );
        }
        let total = started.elapsed().as_secs_f64();
        lat.sort();
        let r = BatchResult {
            batch,
            runs: lat.len(),
            rows_per_s: (batch * lat.len()) as f64 / total,
            p50_ms: percentile(&lat, 0.5),
            p99_ms: percentile(&lat, 0.99),
        };
        eprintln!(
            "batch {:>6}: {:>12.0} rows/s  p50 {:>8.3} ms  p99 {:>8.3} ms  ({} runs)",
            r.batch, r.rows_per_s, r.p50_ms, r.p99_ms, r.runs
        );
        results.push(r);
    }
    let spec = scorer.engine().spec();
    Ok(Report {
        model: spec.model_id(),
        device: scorer.engine().device().as_str().into(),
        intra_threads,
        cpu: cpu_name(),
        seconds_per_size: seconds,
        results,
    })
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "Model `{}` on `{}` ({} intra-op thread(s), {}), {} s per batch size:\n\n\
             | batch | rows/s | p50 ms | p99 ms | runs |\n|---:|---:|---:|---:|---:|\n",
            self.model, self.device, self.intra_threads, self.cpu, self.seconds_per_size
        );
        for r in &self.results {
            s += &format!(
                "| {} | {:.0} | {:.3} | {:.3} | {} |\n",
                r.batch, r.rows_per_s, r.p50_ms, r.p99_ms, r.runs
            );
        }
        s
    }
}
