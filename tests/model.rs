//! The committed model on real ONNX Runtime: parity with Python, start-up checks, decay.

mod common;

use std::io::BufRead;

use rescorer::cli::score::PairRecord;
use rescorer::config::{Device, ModelSettings};
use rescorer::metrics::Metrics;
use rescorer::model::{FeatureMap, PairInput};
use rescorer::score::Scorer;

fn golden() -> Vec<PairRecord> {
    let f = std::fs::File::open(common::root().join("models/catchup-ranker.golden.jsonl"))
        .expect("golden fixture is committed");
    std::io::BufReader::new(f)
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).expect("golden line parses"))
        .collect()
}

#[test]
fn golden_pairs_match_python_onnxruntime_within_1e5_at_any_batch_size() {
    let scorer = common::scorer();
    let records = golden();
    assert!(records.len() >= 200, "fixture holds a few hundred pairs");
    let inputs: Vec<PairInput<'_>> = records.iter().map(PairRecord::input).collect();
    for batch in [1, 7, 64, records.len()] {
        let mut scores = Vec::new();
        for chunk in inputs.chunks(batch) {
            scores.extend(scorer.engine().score_pairs(chunk).unwrap());
        }
        for (rec, s) in records.iter().zip(&scores) {
            let want = rec.expected.unwrap();
            assert!(
                (f64::from(*s) - want).abs() <= 1e-5,
                "batch {batch}: got {s}, python said {want} for {rec:?}"
            );
        }
    }
}

#[test]
fn scores_decay_with_the_moments_age() {
    let scorer = common::scorer();
    let m: FeatureMap = [("sessions_7d".to_string(), 4.0)].into();
    let c: FeatureMap = [("profile_completeness".to_string(), 0.8)].into();
    let p: FeatureMap = [
        ("affinity".to_string(), 0.5),
        ("mutual_connections".to_string(), 12.0),
    ]
    .into();
    for reason in ["job_change", "new_post", "birthday", "unknown_reason"] {
        let ages_h = [0i64, 6, 24, 72, 240];
        let pairs: Vec<_> = ages_h
            .iter()
            .map(|h| PairInput {
                member: &m,
                candidate: &c,
                pair: &p,
                reason,
                moment_ts_ms: 1_764_000_000_000,
                as_of_ms: 1_764_000_000_000 + h * 3_600_000,
            })
            .collect();
        let s = scorer.engine().score_pairs(&pairs).unwrap();
        for w in s.windows(2) {
            assert!(w[0] > w[1], "{reason}: scores must fall with age: {s:?}");
        }
        assert!(
            s.iter().all(|v| (0.0..=1.0).contains(v)),
            "{reason}: probabilities {s:?}"
        );
    }
}

#[test]
fn one_pair_and_a_hundred_thousand_pairs_both_score() {
    let scorer = common::scorer();
    let width = scorer.engine().layout().width();
    let one = scorer.score_blocking(&vec![0.5; width]).unwrap();
    assert_eq!(one.len(), 1);
    let many = scorer.score_blocking(&vec![0.5; width * 100_000]).unwrap();
    assert_eq!(many.len(), 100_000);
    assert!(
        many.iter().all(|s| (*s - one[0]).abs() < 1e-6),
        "same row, same score"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_scoring_runs_off_the_runtime_and_returns_the_buffer() {
    let scorer = common::scorer();
    let width = scorer.engine().layout().width();
    let (buf, scores) = scorer.score(vec![1.0; width * 3]).await.unwrap();
    assert_eq!(buf.len(), width * 3);
    assert_eq!(scores.len(), 3);
}

#[test]
fn model_info_metric_names_version_and_device() {
    let metrics = Metrics::new();
    let scorer = Scorer::load(&common::model_settings(), metrics.clone()).unwrap();
    scorer
        .score_blocking(&vec![0.0; scorer.engine().layout().width() * 5])
        .unwrap();
    let text = metrics.render();
    assert!(
        text.contains(r#"rescorer_model_info{device="cpu",model="catchup-ranker",version="1"} 1"#),
        "{text}"
    );
    assert!(text.contains("rescorer_pairs_scored_total 5"), "{text}");
}

#[test]
fn auto_device_without_cuda_falls_back_to_cpu_and_says_so() {
    if cfg!(feature = "cuda") {
        return; // with the feature, auto may legitimately pick a GPU
    }
    let metrics = Metrics::new();
    let settings = ModelSettings {
        device: Device::Auto,
        ..common::model_settings()
    };
    let scorer = Scorer::load(&settings, metrics.clone()).unwrap();
    assert_eq!(scorer.engine().device().as_str(), "cpu");
    assert!(scorer.engine().fallback_reason().unwrap().contains("cuda"));
    assert!(metrics.render().contains(r#"device="cpu""#));
}

#[test]
fn cuda_device_fails_start_up_when_the_provider_cannot_register() {
    if cfg!(feature = "cuda") && std::path::Path::new("/dev/nvidia0").exists() {
        return; // a real GPU: covered by the device run
    }
    let settings = ModelSettings {
        device: Device::Cuda,
        ..common::model_settings()
    };
    let err = Scorer::load(&settings, Metrics::new())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("device `cuda` requested"), "{err}");
}
