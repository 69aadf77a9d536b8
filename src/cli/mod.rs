//! Command-line entry points. Each command is a plain function so tests can call it directly.

pub mod bench_model;
pub mod loadgen;
pub mod score;
pub mod topics;
