//! The typed settings tree: `rescorer.toml` < `RESCORER__SECTION__FIELD` environment < flags.
//!
//! Every field has a default with a reason. Unknown keys are an error, and every error names the
//! file and the field. Validation happens once, at start-up.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
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

/// `[model]`: the ranking model and how ONNX Runtime runs it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

/// A settings file that cannot be used; the message names the file and the field.
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
