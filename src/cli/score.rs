//! `rescorer score`: score pairs given as JSON lines, for the people who own the model.
//!
//! Input, one object per line (`models/catchup-ranker.golden.jsonl` is an example):
//! `{"member": {..}, "candidate": {..}, "pair": {..}, "reason": "job_change",
//!   "moment_ts": 1764000000000, "as_of": 1764003600000}` and optionally `"expected"`.
//! Output, one line per input line: `{"line": 1, "score": 0.42}`, plus `expected` and
//! `abs_diff` when the input had `expected`. A line that cannot be scored is reported on stderr
//! with its number, and the command exits non-zero after scoring the rest.

use std::io::{BufRead, Write};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::model::{FeatureMap, PairInput};
use crate::score::Scorer;

/// One input line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairRecord {
    #[serde(default)]
    pub member: FeatureMap,
    #[serde(default)]
    pub candidate: FeatureMap,
    #[serde(default)]
    pub pair: FeatureMap,
    pub reason: String,
    pub moment_ts: i64,
    pub as_of: i64,
    #[serde(default)]
    pub expected: Option<f64>,
}

impl PairRecord {
    pub fn input(&self) -> PairInput<'_> {
        PairInput {
            member: &self.member,
            candidate: &self.candidate,
            pair: &self.pair,
            reason: &self.reason,
            moment_ts_ms: self.moment_ts,
            as_of_ms: self.as_of,
        }
    }
}

/// Reads `input`, scores in batches of `batch_size`, writes JSON lines to `out`.
pub fn run(
    scorer: &Scorer,
    input: impl BufRead,
    mut out: impl Write,
    batch_size: usize,
) -> anyhow::Result<()> {
    let layout = scorer.engine().layout().clone();
    let mut failures = 0usize;
    let mut pending: Vec<(usize, PairRecord)> = Vec::with_capacity(batch_size);
    let flush =
        |pending: &mut Vec<(usize, PairRecord)>, out: &mut dyn Write| -> anyhow::Result<usize> {
            let mut matrix = Vec::with_capacity(pending.len() * layout.width());
            let mut kept = Vec::with_capacity(pending.len());
            let mut failed = 0;
            for (line, rec) in pending.drain(..) {
                match layout.push_row(&rec.input(), &mut matrix) {
                    Ok(()) => kept.push((line, rec)),
                    Err(e) => {
                        eprintln!("line {line}: {e}");
                        failed += 1;
                    }
                }
            }
            let scores = scorer.score_blocking(&matrix)?;
            for ((line, rec), score) in kept.iter().zip(scores) {
                let mut obj = serde_json::json!({"line": line, "score": score});
                if let Some(exp) = rec.expected {
                    obj["expected"] = exp.into();
                    obj["abs_diff"] = (f64::from(score) - exp).abs().into();
                }
                writeln!(out, "{obj}")?;
            }
            Ok(failed)
        };
    for (i, line) in input.lines().enumerate() {
        let line_no = i + 1;
        let line = line.with_context(|| format!("reading input line {line_no}"))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<PairRecord>(&line) {
            Ok(rec) => pending.push((line_no, rec)),
            Err(e) => {
                eprintln!("line {line_no}: {e}");
                failures += 1;
            }
        }
        if pending.len() >= batch_size {
            failures += flush(&mut pending, &mut out)?;
        }
    }
    if !pending.is_empty() {
        failures += flush(&mut pending, &mut out)?;
    }
    out.flush()?;
    if failures > 0 {
        bail!("{failures} input line(s) could not be scored (see above)");
    }
    Ok(())
}
