//! The scoring stage: a batch's input matrix goes to the model on a blocking thread, never on the
//! async worker threads, and comes back as one score per row.

use std::sync::Arc;
use std::time::Instant;

use crate::config::ModelSettings;
use crate::internal_events::{BatchScored, ModelLoaded};
use crate::metrics::Metrics;
use crate::model::{Engine, EngineError, ModelSpec};

/// Start-up failures of the model: a spec or an ONNX file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Spec(#[from] crate::model::SpecError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// A cheap-to-clone handle on the loaded model.
#[derive(Clone)]
pub struct Scorer {
    engine: Arc<Engine>,
    metrics: Metrics,
}

impl Scorer {
    /// Loads the spec and model named by `settings`, checks them, and announces the model.
    pub fn load(settings: &ModelSettings, metrics: Metrics) -> Result<Self, LoadError> {
        let spec = ModelSpec::load(&settings.spec)?;
        let engine = Engine::load(spec, settings)?;
        let spec = engine.spec();
        ModelLoaded {
            model: &spec.name,
            version: &spec.version,
            device: engine.device().as_str(),
            spec_path: &spec.path,
            fallback: engine.fallback_reason(),
        }
        .emit(&metrics);
        Ok(Self {
            engine: Arc::new(engine),
            metrics,
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Scores a row-major matrix (built with `engine().layout()`) on the calling thread.
    pub fn score_blocking(&self, matrix: &[f32]) -> Result<Vec<f32>, EngineError> {
        let started = Instant::now();
        let scores = self.engine.score_matrix(matrix)?;
        BatchScored {
            pairs: scores.len(),
            elapsed: started.elapsed(),
        }
        .emit(&self.metrics);
        Ok(scores)
    }

    /// Scores a matrix on a blocking thread; the matrix is moved there and handed back with the
    /// scores so its buffer can be reused.
    pub async fn score(&self, matrix: Vec<f32>) -> Result<(Vec<f32>, Vec<f32>), EngineError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let scores = this.score_blocking(&matrix);
            scores.map(|s| (matrix, s))
        })
        .await
        .map_err(|e| EngineError::Run(format!("scoring thread failed: {e}")))?
    }
}
