//! A broken spec or model file stops start-up with a message naming the file and the mismatch.

mod common;

use std::path::Path;

use rescorer::config::ModelSettings;
use rescorer::metrics::Metrics;
use rescorer::score::Scorer;

/// Writes a copy of the committed spec, edited by `edit`, pointing at the real ONNX file.
fn spec_variant(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> std::path::PathBuf {
    let text = std::fs::read_to_string(common::model_spec()).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["onnx"] = common::root()
        .join("models/catchup-ranker.onnx")
        .to_string_lossy()
        .into_owned()
        .into();
    edit(&mut v);
    let path = dir.join("spec.json");
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    path
}

fn load_err(spec: &Path) -> String {
    let settings = ModelSettings {
        spec: spec.to_owned(),
        ..ModelSettings::default()
    };
    match Scorer::load(&settings, Metrics::new()) {
        Ok(_) => panic!("{} should not load", spec.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn wrong_input_name_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_variant(dir.path(), |v| v["input"] = "x".into());
    let err = load_err(&spec);
    assert!(
        err.contains("spec.json") && err.contains("catchup-ranker.onnx"),
        "{err}"
    );
    assert!(
        err.contains("spec `input` is `x` but the graph's input is `features`"),
        "{err}"
    );
}

#[test]
fn wrong_output_name_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_variant(dir.path(), |v| v["output"] = "prob".into());
    let err = load_err(&spec);
    assert!(
        err.contains("spec `output` is `prob`") && err.contains("score"),
        "{err}"
    );
}

#[test]
fn feature_count_mismatch_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_variant(dir.path(), |v| {
        v["features"].as_array_mut().unwrap().pop();
    });
    let err = load_err(&spec);
    assert!(err.contains("features in the spec"), "{err}");
}

#[test]
fn missing_onnx_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_variant(dir.path(), |v| v["onnx"] = "gone.onnx".into());
    let err = load_err(&spec);
    assert!(
        err.contains("gone.onnx") && err.contains("file not found"),
        "{err}"
    );
}

#[test]
fn corrupt_onnx_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.onnx"), b"this is not a protobuf").unwrap();
    let spec = spec_variant(dir.path(), |v| v["onnx"] = "bad.onnx".into());
    let err = load_err(&spec);
    assert!(err.contains("bad.onnx"), "{err}");
}

#[test]
fn missing_spec_file_is_named() {
    let err = load_err(Path::new("/nonexistent/catchup.json"));
    assert!(err.contains("/nonexistent/catchup.json"), "{err}");
}

#[test]
fn non_finite_feature_values_never_reach_the_model() {
    let scorer = common::scorer();
    let bad: rescorer::model::FeatureMap = [("affinity".to_string(), f64::NAN)].into();
    let empty = Default::default();
    let pair = rescorer::model::PairInput {
        member: &empty,
        candidate: &empty,
        pair: &bad,
        reason: "job_change",
        moment_ts_ms: 0,
        as_of_ms: 0,
    };
    let err = scorer
        .engine()
        .score_pairs(&[pair])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pair feature `affinity` is not finite"),
        "{err}"
    );
}
