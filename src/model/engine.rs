//! ONNX Runtime session for the ranking model: load, check against the spec, score a batch.
//!
//! `score` is blocking CPU (or GPU) work; callers on the async runtime go through
//! [`crate::score::Scorer`], which moves batches onto a blocking thread.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef};

use super::features::{FeatureLayout, PairInput};
use super::spec::ModelSpec;
use crate::config::{Device, ModelSettings};

/// Loading or running the model went wrong. Load errors name the file.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "ONNX Runtime library not configured: set `model.runtime_library` in the config or \
         ORT_DYLIB_PATH (scripts/install-onnxruntime.sh installs it under .ort/lib)"
    )]
    NoRuntime,
    #[error("ONNX Runtime library {path}: {message}")]
    Runtime { path: PathBuf, message: String },
    #[error("model {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("model {onnx} does not match spec {spec}: {message}")]
    Mismatch {
        onnx: PathBuf,
        spec: PathBuf,
        message: String,
    },
    #[error("device `cuda` requested but {0}")]
    Cuda(String),
    #[error("model run failed: {0}")]
    Run(String),
}

/// The device a session actually runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedDevice {
    Cpu,
    Cuda,
}

impl ResolvedDevice {
    pub fn as_str(self) -> &'static str {
        match self {
            ResolvedDevice::Cpu => "cpu",
            ResolvedDevice::Cuda => "cuda",
        }
    }
}

static RUNTIME: OnceLock<Result<Environment, String>> = OnceLock::new();

/// Loads ONNX Runtime once per process. A second call with another path keeps the first library.
fn init_runtime(configured: Option<&Path>) -> Result<Environment, EngineError> {
    let path = match configured {
        Some(p) => p.to_owned(),
        None => std::env::var_os("ORT_DYLIB_PATH")
            .map(PathBuf::from)
            .or_else(find_dev_runtime)
            .ok_or(EngineError::NoRuntime)?,
    };
    let res = RUNTIME.get_or_init(|| {
        if !path.exists() {
            return Err(format!("{}: file not found", path.display()));
        }
        let builder = ort::init_from(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        builder
            .with_name("rescorer")
            .build()
            .map_err(|e| format!("{}: {e}", path.display()))
    });
    res.clone().map_err(|message| EngineError::Runtime {
        path,
        message: message.clone(),
    })
}

/// Where `scripts/install-onnxruntime.sh` puts the library: `.ort/lib` in the working directory or
/// above the executable (so `target/release/rescorer` run by hand finds it too).
fn find_dev_runtime() -> Option<PathBuf> {
    let rel = Path::new(".ort/lib/libonnxruntime.so");
    let cwd = std::env::current_dir().ok().map(|d| d.join(rel));
    let exe = std::env::current_exe().ok();
    let above_exe = exe
        .iter()
        .flat_map(|e| e.ancestors().skip(1).take(4))
        .map(|d| d.join(rel));
    cwd.into_iter().chain(above_exe).find(|p| p.exists())
}

/// A loaded model: the spec's layout plus one ONNX Runtime session.
pub struct Engine {
    spec: ModelSpec,
    layout: FeatureLayout,
    session: Mutex<Session>,
    device: ResolvedDevice,
    /// Why `auto` fell back to CPU, if it did.
    fallback: Option<String>,
}

impl Engine {
    /// Loads the spec's ONNX file on the configured device and checks it against the spec.
    pub fn load(spec: ModelSpec, settings: &ModelSettings) -> Result<Self, EngineError> {
        let env = init_runtime(settings.runtime_library.as_deref())?;
        let onnx = spec.onnx_path();
        if !onnx.exists() {
            return Err(EngineError::Load {
                path: onnx,
                message: format!(
                    "file not found (named by `onnx` in {})",
                    spec.path.display()
                ),
            });
        }
        let (session, device, fallback) = match settings.device {
            Device::Cpu => (
                build_session(&env, &onnx, settings, false)?,
                ResolvedDevice::Cpu,
                None,
            ),
            Device::Cuda => (
                build_session(&env, &onnx, settings, true)?,
                ResolvedDevice::Cuda,
                None,
            ),
            Device::Auto => match build_session(&env, &onnx, settings, true) {
                Ok(s) => (s, ResolvedDevice::Cuda, None),
                Err(EngineError::Cuda(why)) => (
                    build_session(&env, &onnx, settings, false)?,
                    ResolvedDevice::Cpu,
                    Some(why),
                ),
                Err(e) => return Err(e),
            },
        };
        check_against_spec(&session, &spec, &onnx)?;
        let layout = FeatureLayout::new(&spec);
        Ok(Self {
            spec,
            layout,
            session: Mutex::new(session),
            device,
            fallback,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn layout(&self) -> &FeatureLayout {
        &self.layout
    }

    pub fn device(&self) -> ResolvedDevice {
        self.device
    }

    /// Why `device = "auto"` ended up on CPU, if it did.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Scores a row-major matrix of `rows.len() / width` rows in one run.
    pub fn score_matrix(&self, rows: &[f32]) -> Result<Vec<f32>, EngineError> {
        let width = self.layout.width();
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if rows.len() % width != 0 {
            return Err(EngineError::Run(format!(
                "matrix of {} values is not a whole number of {width}-wide rows",
                rows.len()
            )));
        }
        let n = rows.len() / width;
        let input = TensorRef::from_array_view(([n, width], rows))
            .map_err(|e| EngineError::Run(e.to_string()))?;
        let mut session = self
            .session
            .lock()
            .map_err(|_| EngineError::Run("session lock poisoned by an earlier panic".into()))?;
        let outputs = session
            .run(ort::inputs![self.spec.input.as_str() => input])
            .map_err(|e| EngineError::Run(e.to_string()))?;
        let (_, scores) = outputs[self.spec.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| EngineError::Run(e.to_string()))?;
        if scores.len() != n {
            return Err(EngineError::Run(format!(
                "model returned {} scores for {n} rows",
                scores.len()
            )));
        }
        Ok(scores.to_vec())
    }

    /// Builds the matrix for `pairs` and scores it. A pair whose features are refused fails the
    /// whole call; the worker validates features on the way in so this does not happen there.
    pub fn score_pairs(&self, pairs: &[PairInput<'_>]) -> Result<Vec<f32>, ScorePairsError> {
        let mut matrix = Vec::with_capacity(pairs.len() * self.layout.width());
        for (i, p) in pairs.iter().enumerate() {
            self.layout
                .push_row(p, &mut matrix)
                .map_err(|e| ScorePairsError::Feature {
                    index: i,
                    source: e,
                })?;
        }
        Ok(self.score_matrix(&matrix)?)
    }
}

/// Errors of [`Engine::score_pairs`].
#[derive(Debug, thiserror::Error)]
pub enum ScorePairsError {
    #[error("pair {index}: {source}")]
    Feature {
        index: usize,
        source: super::features::FeatureError,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

fn build_session(
    env: &Environment,
    onnx: &Path,
    s: &ModelSettings,
    cuda: bool,
) -> Result<Session, EngineError> {
    let load = |e: &dyn std::fmt::Display| EngineError::Load {
        path: onnx.to_owned(),
        message: e.to_string(),
    };
    let mut builder = Session::builder(env)
        .map_err(|e| load(&e))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| load(&e))?
        .with_intra_threads(s.intra_threads)
        .map_err(|e| load(&e))?
        .with_inter_threads(s.inter_threads)
        .map_err(|e| load(&e))?
        .with_intra_op_spinning(s.spinning)
        .map_err(|e| load(&e))?
        .with_inter_op_spinning(s.spinning)
        .map_err(|e| load(&e))?;
    if cuda {
        builder = register_cuda(builder, s.cuda_device_id)?;
    }
    builder.commit_from_file(onnx).map_err(|e| load(&e))
}

#[cfg(feature = "cuda")]
fn register_cuda(
    builder: ort::session::builder::SessionBuilder,
    device_id: i32,
) -> Result<ort::session::builder::SessionBuilder, EngineError> {
    use ort::ep::ExecutionProvider;
    let ep = ort::ep::CUDA::default().with_device_id(device_id);
    let mut builder = builder;
    ep.register(&mut builder).map_err(|e| {
        EngineError::Cuda(format!(
            "the CUDA execution provider could not register: {e} (needs \
             libonnxruntime_providers_cuda.so beside the ONNX Runtime library and the CUDA 13 \
             runtime and cuDNN 9 on the library path)"
        ))
    })?;
    Ok(builder)
}

#[cfg(not(feature = "cuda"))]
fn register_cuda(
    _builder: ort::session::builder::SessionBuilder,
    _device_id: i32,
) -> Result<ort::session::builder::SessionBuilder, EngineError> {
    Err(EngineError::Cuda(
        "this binary was built without the `cuda` feature (cargo build --features cuda)".into(),
    ))
}

fn check_against_spec(session: &Session, spec: &ModelSpec, onnx: &Path) -> Result<(), EngineError> {
    let mismatch = |message: String| EngineError::Mismatch {
        onnx: onnx.to_owned(),
        spec: spec.path.clone(),
        message,
    };
    let names = |outlets: &[ort::value::Outlet]| {
        outlets
            .iter()
            .map(|o| o.name().to_owned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let inputs = session.inputs();
    if inputs.len() != 1 {
        return Err(mismatch(format!(
            "the graph has {} inputs ({}); the worker feeds exactly one",
            inputs.len(),
            names(inputs)
        )));
    }
    let input = &inputs[0];
    if input.name() != spec.input {
        return Err(mismatch(format!(
            "spec `input` is `{}` but the graph's input is `{}`",
            spec.input,
            input.name()
        )));
    }
    let width = spec.features.len() as i64;
    match (input.dtype().tensor_type(), input.dtype().tensor_shape()) {
        (Some(TensorElementType::Float32), Some(shape))
            if shape.len() == 2 && (shape[1] == width || shape[1] < 0) => {}
        (ty, shape) => {
            return Err(mismatch(format!(
                "input `{}` must be float32 [batch, {width}] ({width} features in the spec), \
                 the graph has {ty:?} {:?}",
                spec.input,
                shape.map(|s| s.to_vec())
            )));
        }
    }
    let Some(output) = session.outputs().iter().find(|o| o.name() == spec.output) else {
        return Err(mismatch(format!(
            "spec `output` is `{}` but the graph's outputs are: {}",
            spec.output,
            names(session.outputs())
        )));
    };
    match (output.dtype().tensor_type(), output.dtype().tensor_shape()) {
        (Some(TensorElementType::Float32), Some(shape))
            if shape.len() == 1 || (shape.len() == 2 && (shape[1] == 1 || shape[1] < 0)) => {}
        (ty, shape) => {
            return Err(mismatch(format!(
                "output `{}` must be float32 [batch] or [batch, 1], the graph has {ty:?} {:?}",
                spec.output,
                shape.map(|s| s.to_vec())
            )));
        }
    }
    Ok(())
}
