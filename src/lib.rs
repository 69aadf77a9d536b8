//! `rescorer`: a nearline rescoring worker for Catch Up recommendations.
//!
//! The model side, in the order a batch passes through it:
//! - [`model::spec`]: the feature spec, the contract with the model's owners;
//! - [`model::features`]: pair state → one input row (non-finite values refused here);
//! - [`score`]: a batch's matrix → scores, on a blocking thread ([`model::engine`] runs ONNX Runtime).
//!
//! Around it: [`config`] (the typed settings tree), [`metrics`] and [`internal_events`]
//! (what operators see), [`cli`] (the commands).

pub mod cli;
pub mod config;
pub mod internal_events;
pub mod metrics;
pub mod model;
pub mod score;
