//! Turns one member–candidate pair's state into a row of the model's input matrix.
//!
//! The row is computed in f64 and stored as f32, exactly as `models/train.py` does, so that the
//! Rust and Python paths agree to the last bit before the model runs. Non-finite values are refused
//! here, before they can reach the model: a NaN in one row would otherwise poison only that score,
//! silently.

use std::collections::HashMap;

use super::spec::{ModelSpec, Source, Transform};

/// An entity's features by name (a member's, a candidate's or a pair's).
pub type FeatureMap = HashMap<String, f64>;

const MS_PER_HOUR: f64 = 3_600_000.0;

/// Everything the model sees of one pair, borrowed from wherever it is stored.
#[derive(Debug, Clone, Copy)]
pub struct PairInput<'a> {
    pub member: &'a FeatureMap,
    pub candidate: &'a FeatureMap,
    pub pair: &'a dyn Lookup,
    pub reason: &'a str,
    /// When the Catch Up moment happened (event time, ms since the epoch).
    pub moment_ts_ms: i64,
    /// The event time the pair is scored at (ms); never the wall clock.
    pub as_of_ms: i64,
}

/// Features by name: a map, or the short list a cached pair keeps (less memory a pair).
pub trait Lookup: std::fmt::Debug {
    fn feature(&self, name: &str) -> Option<f64>;
}

impl Lookup for FeatureMap {
    fn feature(&self, name: &str) -> Option<f64> {
        self.get(name).copied()
    }
}

impl Lookup for Box<[(Box<str>, f64)]> {
    fn feature(&self, name: &str) -> Option<f64> {
        self.iter().find(|(n, _)| &**n == name).map(|(_, v)| *v)
    }
}

/// A row that cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeatureError {
    #[error("{source_kind} feature `{name}` is not finite ({value})")]
    NonFinite {
        source_kind: &'static str,
        name: String,
        value: f64,
    },
    #[error("{source_kind} feature `{name}` = {value} overflows float32 after `{transform}`")]
    Overflow {
        source_kind: &'static str,
        name: String,
        value: f64,
        transform: &'static str,
    },
}

#[derive(Debug, Clone)]
enum Column {
    Lookup {
        source: Source,
        name: String,
        default: f64,
        transform: Transform,
    },
    Reason(String),
    AgeHours(Transform),
}

/// The spec compiled into a per-column plan.
#[derive(Debug, Clone)]
pub struct FeatureLayout {
    columns: Vec<Column>,
}

fn source_kind(source: Source) -> &'static str {
    match source {
        Source::Member => "member",
        Source::Candidate => "candidate",
        Source::Pair => "pair",
        Source::Reason => "reason",
        Source::AgeHours => "age_hours",
    }
}

fn transform_name(t: Transform) -> &'static str {
    match t {
        Transform::Identity => "identity",
        Transform::Log1p => "log1p",
    }
}

impl FeatureLayout {
    pub fn new(spec: &ModelSpec) -> Self {
        let columns = spec
            .features
            .iter()
            .map(|f| match f.source {
                Source::Member | Source::Candidate | Source::Pair => Column::Lookup {
                    source: f.source,
                    name: f.name.clone(),
                    default: f.default.unwrap_or(0.0),
                    transform: f.transform(),
                },
                Source::Reason => Column::Reason(f.name.clone()),
                Source::AgeHours => Column::AgeHours(f.transform()),
            })
            .collect();
        Self { columns }
    }

    /// Number of input columns.
    pub fn width(&self) -> usize {
        self.columns.len()
    }

    /// Writes one row into `out` (exactly `width()` long).
    pub fn write_row(&self, pair: &PairInput<'_>, out: &mut [f32]) -> Result<(), FeatureError> {
        debug_assert_eq!(
            out.len(),
            self.columns.len(),
            "row buffer must match the layout width"
        );
        for (slot, col) in out.iter_mut().zip(&self.columns) {
            *slot = match col {
                Column::Lookup {
                    source,
                    name,
                    default,
                    transform,
                } => {
                    let raw = match source {
                        Source::Member => pair.member.get(name).copied(),
                        Source::Candidate => pair.candidate.get(name).copied(),
                        _ => pair.pair.feature(name),
                    }
                    .unwrap_or(*default);
                    finite(*source, name, raw, *transform)?
                }
                Column::Reason(name) => {
                    if pair.reason == name {
                        1.0
                    } else {
                        0.0
                    }
                }
                Column::AgeHours(transform) => {
                    let age_ms = pair.as_of_ms.saturating_sub(pair.moment_ts_ms).max(0);
                    finite(
                        Source::AgeHours,
                        "age_hours",
                        age_ms as f64 / MS_PER_HOUR,
                        *transform,
                    )?
                }
            };
        }
        Ok(())
    }

    /// Appends one row to `matrix` (row-major); on error nothing is appended.
    pub fn push_row(
        &self,
        pair: &PairInput<'_>,
        matrix: &mut Vec<f32>,
    ) -> Result<(), FeatureError> {
        let start = matrix.len();
        matrix.resize(start + self.width(), 0.0);
        let res = self.write_row(pair, &mut matrix[start..]);
        if res.is_err() {
            matrix.truncate(start);
        }
        res
    }
}

fn finite(source: Source, name: &str, raw: f64, transform: Transform) -> Result<f32, FeatureError> {
    if !raw.is_finite() {
        return Err(FeatureError::NonFinite {
            source_kind: source_kind(source),
            name: name.to_owned(),
            value: raw,
        });
    }
    let v = transform.apply(raw) as f32;
    if !v.is_finite() {
        return Err(FeatureError::Overflow {
            source_kind: source_kind(source),
            name: name.to_owned(),
            value: raw,
            transform: transform_name(transform),
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn layout() -> FeatureLayout {
        let spec = ModelSpec::parse(
            Path::new("t.json"),
            r#"{"name": "m", "version": "1", "onnx": "m.onnx", "input": "x", "output": "y",
                "features": [
                  {"name": "x", "source": "member", "default": 2.0},
                  {"name": "x", "source": "candidate", "default": 3.0, "transform": "log1p"},
                  {"name": "m", "source": "pair"},
                  {"name": "job_change", "source": "reason"},
                  {"name": "age", "source": "age_hours"},
                  {"name": "age", "source": "age_hours", "transform": "log1p"}
                ]}"#,
        )
        .unwrap();
        FeatureLayout::new(&spec)
    }

    fn map(kv: &[(&str, f64)]) -> FeatureMap {
        kv.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn member_and_candidate_are_separate_namespaces_with_defaults() {
        let (m, c, p) = (map(&[("x", 7.0)]), map(&[]), map(&[("m", 4.0)]));
        let pair = PairInput {
            member: &m,
            candidate: &c,
            pair: &p,
            reason: "job_change",
            moment_ts_ms: 0,
            as_of_ms: 7_200_000,
        };
        let mut row = vec![0.0; layout().width()];
        layout().write_row(&pair, &mut row).unwrap();
        assert_eq!(
            row,
            vec![7.0, (4f64).ln() as f32, 4.0, 1.0, 2.0, (3f64).ln() as f32]
        );
    }

    #[test]
    fn unknown_reason_is_all_zero_and_future_moments_clamp_to_age_zero() {
        let e = map(&[]);
        let pair = PairInput {
            member: &e,
            candidate: &e,
            pair: &e,
            reason: "endorsement",
            moment_ts_ms: 10_000,
            as_of_ms: 0,
        };
        let mut row = vec![0.0; 6];
        layout().write_row(&pair, &mut row).unwrap();
        assert_eq!(row[3], 0.0);
        assert_eq!(row[4], 0.0);
        assert_eq!(row[5], 0.0);
    }

    #[test]
    fn non_finite_and_overflowing_values_are_rejected() {
        let e = map(&[]);
        for (bad, want) in [
            (f64::NAN, "not finite"),
            (f64::INFINITY, "not finite"),
            (1e300, "overflows float32"),
        ] {
            let m = map(&[("x", bad)]);
            let pair = PairInput {
                member: &m,
                candidate: &e,
                pair: &e,
                reason: "",
                moment_ts_ms: 0,
                as_of_ms: 0,
            };
            let mut matrix = vec![9.0];
            let err = layout()
                .push_row(&pair, &mut matrix)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(want) && err.contains("member feature `x`"),
                "{err}"
            );
            assert_eq!(
                matrix,
                vec![9.0],
                "a refused row leaves the matrix untouched"
            );
        }
    }
}
