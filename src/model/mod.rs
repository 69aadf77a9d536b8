//! The ranking model: its feature spec, the input rows built from pair state, and the ONNX
//! Runtime session that scores them.

pub mod engine;
pub mod features;
pub mod spec;

pub use engine::{Engine, EngineError, ResolvedDevice};
pub use features::{FeatureError, FeatureLayout, FeatureMap, Lookup, PairInput};
pub use spec::{ModelSpec, SpecError};
