//! The feature spec: the JSON contract between the model's owners and the worker.
//!
//! It names the ONNX file, its input/output tensors, and one entry per input column saying where
//! the value comes from and how it is transformed. Loading validates everything that can be checked
//! without ONNX Runtime; `engine` checks the rest against the graph.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything that can be wrong with a spec file. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("model spec {path}: cannot read file: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model spec {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("model spec {path}: field `{field}`: {problem}")]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
}

/// Where a column's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The member's (viewer's) features, written by `entity: member` updates.
    Member,
    /// The candidate's features, written by `entity: candidate` updates (a separate namespace).
    Candidate,
    /// The pair's features, from the new-candidate event that created the moment.
    Pair,
    /// 1.0 when the pair's reason equals the column's `name`, else 0.0.
    Reason,
    /// max(0, as_of − moment_ts) in hours, at the event time the pair is scored.
    AgeHours,
}

/// How a raw value becomes a model input. Anything fancier belongs inside the ONNX graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    #[default]
    Identity,
    /// log1p(max(x, 0)).
    Log1p,
}

impl Transform {
    pub fn apply(self, x: f64) -> f64 {
        match self {
            Transform::Identity => x,
            Transform::Log1p => x.max(0.0).ln_1p(),
        }
    }
}

/// One input column.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feature {
    pub name: String,
    pub source: Source,
    /// Used when the entity has no value for `name` (member/candidate/pair sources only).
    #[serde(default)]
    pub default: Option<f64>,
    #[serde(default)]
    pub transform: Option<Transform>,
}

impl Feature {
    pub fn transform(&self) -> Transform {
        self.transform.unwrap_or_default()
    }
}

/// A parsed, validated feature spec.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub version: String,
    /// ONNX file, relative to the spec file's directory unless absolute.
    pub onnx: PathBuf,
    /// Input tensor name: float32 `[batch, features.len()]`.
    pub input: String,
    /// Output tensor name: float32 `[batch]` or `[batch, 1]`.
    pub output: String,
    pub features: Vec<Feature>,
    /// The spec file this was read from (filled in by `load`).
    #[serde(skip)]
    pub path: PathBuf,
}

impl ModelSpec {
    /// Reads and validates a spec file.
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates spec text; `path` is used for messages and to resolve `onnx`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, SpecError> {
        let mut spec: ModelSpec =
            serde_json::from_str(text).map_err(|source| SpecError::Parse {
                path: path.to_owned(),
                source,
            })?;
        spec.path = path.to_owned();
        spec.validate()?;
        Ok(spec)
    }

    /// `name:version`, as written to Redis and shown in metrics.
    pub fn model_id(&self) -> String {
        format!("{}:{}", self.name, self.version)
    }

    /// The ONNX file's path, resolved against the spec's directory.
    pub fn onnx_path(&self) -> PathBuf {
        if self.onnx.is_absolute() {
            self.onnx.clone()
        } else {
            self.path
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join(&self.onnx)
        }
    }

    fn invalid(&self, field: impl Into<String>, problem: impl Into<String>) -> SpecError {
        SpecError::Invalid {
            path: self.path.clone(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn validate(&self) -> Result<(), SpecError> {
        for (field, value) in [
            ("name", &self.name),
            ("version", &self.version),
            ("input", &self.input),
            ("output", &self.output),
        ] {
            if value.trim().is_empty() {
                return Err(self.invalid(field, "must not be empty"));
            }
        }
        if self.onnx.as_os_str().is_empty() {
            return Err(self.invalid("onnx", "must name the ONNX file"));
        }
        if self.features.is_empty() {
            return Err(self.invalid("features", "must list at least one feature"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, f) in self.features.iter().enumerate() {
            let field = format!("features[{i}]");
            if f.name.trim().is_empty() {
                return Err(self.invalid(format!("{field}.name"), "must not be empty"));
            }
            match f.source {
                Source::Member | Source::Candidate | Source::Pair => {
                    if let Some(d) = f.default {
                        if !d.is_finite() {
                            return Err(self.invalid(format!("{field}.default"), "must be finite"));
                        }
                    }
                }
                Source::Reason => {
                    if f.default.is_some() || f.transform.is_some() {
                        return Err(self.invalid(
                            field,
                            "a `reason` feature is a 0/1 indicator: it takes no `default` or `transform`",
                        ));
                    }
                }
                Source::AgeHours => {
                    if f.default.is_some() {
                        return Err(self.invalid(
                            format!("{field}.default"),
                            "`age_hours` is always known: it takes no `default`",
                        ));
                    }
                }
            }
            if !seen.insert((f.source, f.name.as_str(), f.transform())) {
                return Err(self.invalid(
                    field,
                    format!(
                        "duplicate of an earlier feature ({:?} `{}` with the same transform)",
                        f.source, f.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelSpec, SpecError> {
        ModelSpec::parse(Path::new("/models/m.json"), text)
    }

    const GOOD: &str = r#"{
        "name": "m", "version": "3", "onnx": "m.onnx", "input": "features", "output": "score",
        "features": [
            {"name": "seniority", "source": "member", "default": 0.5},
            {"name": "connections", "source": "candidate", "default": 0.0, "transform": "log1p"},
            {"name": "job_change", "source": "reason"},
            {"name": "age_hours", "source": "age_hours", "transform": "log1p"}
        ]}"#;

    #[test]
    fn parses_a_good_spec_and_resolves_onnx_beside_it() {
        let spec = parse(GOOD).unwrap();
        assert_eq!(spec.model_id(), "m:3");
        assert_eq!(spec.onnx_path(), PathBuf::from("/models/m.onnx"));
        assert_eq!(spec.features[0].transform(), Transform::Identity);
        assert_eq!(spec.features[1].transform(), Transform::Log1p);
    }

    #[test]
    fn unknown_source_is_rejected_naming_the_file() {
        let err = parse(&GOOD.replace("\"source\": \"member\"", "\"source\": \"viewer\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/models/m.json"), "{err}");
        assert!(err.contains("unknown variant `viewer`"), "{err}");
    }

    #[test]
    fn unknown_transform_is_rejected() {
        let err = parse(&GOOD.replace("\"log1p\"}", "\"sqrt\"}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `sqrt`"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = parse(&GOOD.replace("\"version\"", "\"verison\": 1, \"version\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `verison`"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = ModelSpec::load(Path::new("/nonexistent/spec.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/spec.json"), "{err}");
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn reason_with_transform_and_duplicates_are_rejected() {
        let err = parse(&GOOD.replace(
            r#"{"name": "job_change", "source": "reason"}"#,
            r#"{"name": "job_change", "source": "reason", "transform": "log1p"}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("features[2]"), "{err}");

        let err = parse(&GOOD.replace(
            r#"{"name": "job_change", "source": "reason"}"#,
            r#"{"name": "seniority", "source": "member"}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("duplicate"), "{err}");
    }

    #[test]
    fn empty_fields_are_rejected_by_name() {
        let err = parse(&GOOD.replace("\"input\": \"features\"", "\"input\": \"\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("field `input`"), "{err}");
        let err = parse(
            r#"{"name": "m", "version": "1", "onnx": "m.onnx", "input": "x", "output": "y", "features": []}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("field `features`"), "{err}");
    }

    #[test]
    fn log1p_clamps_negatives() {
        assert_eq!(Transform::Log1p.apply(-5.0), 0.0);
        assert!((Transform::Log1p.apply(1.0) - 2f64.ln()).abs() < 1e-12);
        assert_eq!(Transform::Identity.apply(-5.0), -5.0);
    }
}
