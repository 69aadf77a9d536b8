//! Command-line entry points. Each command is a plain function so tests can call it directly.

pub mod bench_model;
pub mod score;
