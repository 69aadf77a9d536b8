//! Everything under `deploy/` and `docker-compose.yml` is checked with the tool its ecosystem uses
//! (docker-compose, kubernetes-validate, promtool), and the dashboard and alerts only query metrics
//! the worker exports.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use rescorer::config::Settings;
use rescorer::metrics::Metrics;

fn root() -> PathBuf {
    common::root()
}

fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run ({e}); scripts/test.sh installs it"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `rescorer_*` names used in a text, with histogram series suffixes folded to the family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("rescorer_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if before_ok {
            let mut name = &text[start..end];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(n) = name.strip_suffix(suffix) {
                    name = n;
                }
            }
            names.insert(name.to_owned());
        }
        i = end;
    }
    names
}

fn exported() -> BTreeSet<String> {
    Metrics::new().names().into_iter().collect()
}

fn assert_only_exported(file: &Path, min: usize) {
    let text = std::fs::read_to_string(file).unwrap();
    let used = metric_names(&text);
    let known = exported();
    let unknown: Vec<_> = used.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "{} queries metrics the worker does not export: {unknown:?}",
        file.display()
    );
    assert!(used.len() >= min, "{} uses only {used:?}", file.display());
}

#[test]
fn the_dashboard_queries_only_exported_metrics_and_covers_the_operators_views() {
    let path = root().join("deploy/grafana/rescorer-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(
        dash["panels"].as_array().is_some_and(|p| p.len() >= 8),
        "dashboard has its panels"
    );
    assert_only_exported(&path, 8);
    let used = metric_names(&std::fs::read_to_string(&path).unwrap());
    for must in [
        "rescorer_consumer_lag",
        "rescorer_consumer_lag_seconds",
        "rescorer_event_to_score_seconds",
        "rescorer_events_total",
        "rescorer_pairs_scored_total",
        "rescorer_batch_pairs",
        "rescorer_model_seconds",
        "rescorer_redis_write_seconds",
    ] {
        assert!(used.contains(must), "dashboard lacks {must}");
    }
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let dir = root().join("deploy/prometheus");
    assert_only_exported(&dir.join("alerts.yaml"), 4);
    run_ok(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(dir.join("alerts.yaml")),
        "promtool check rules",
    );
    run_ok(
        Command::new("promtool")
            .current_dir(&dir)
            .args(["test", "rules", "alerts.test.yaml"]),
        "promtool test rules",
    );
    run_ok(
        Command::new("promtool")
            .args(["check", "config"])
            .arg(dir.join("prometheus.yml")),
        "promtool check config",
    );
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    let validator = root().join(".tools/bin/kubernetes-validate");
    assert!(
        validator.exists(),
        "{} missing: scripts/test.sh installs it",
        validator.display()
    );
    let mut files = Vec::new();
    for dir in ["deploy/k8s/base", "deploy/k8s/gpu"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".yaml") && name != "kustomization.yaml" {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= 7, "{files:?}");
    run_ok(
        Command::new(&validator).arg("--strict").args(&files),
        "kubernetes-validate --strict",
    );

    // The autoscaler scales on lag in seconds and never past the partition count.
    let so = std::fs::read_to_string(root().join("deploy/k8s/base/scaledobject.yaml")).unwrap();
    assert!(
        so.contains("rescorer_consumer_lag_seconds"),
        "KEDA trigger on lag seconds"
    );
    let max: i64 = so
        .lines()
        .find_map(|l| l.trim().strip_prefix("maxReplicaCount:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("maxReplicaCount set");
    let topics =
        rescorer::cli::topics::TopicsFile::load(&root().join("topics/topics.toml")).unwrap();
    let partitions = topics
        .topic
        .iter()
        .filter(|t| t.role != "dlq")
        .map(|t| t.partitions)
        .max()
        .unwrap();
    assert!(
        max <= i64::from(partitions),
        "replicas {max} capped at {partitions} partitions"
    );
    let dep = std::fs::read_to_string(root().join("deploy/k8s/base/deployment.yaml")).unwrap();
    assert!(dep.contains("/readyz") && dep.contains("/healthz"));
}

#[test]
fn the_compose_file_is_valid_and_its_parts_exist() {
    run_ok(
        Command::new("docker-compose").current_dir(root()).args([
            "-f",
            "docker-compose.yml",
            "config",
            "-q",
        ]),
        "docker-compose config",
    );
    let compose = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    for mount in compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- ./"))
    {
        let src = mount.split(':').next().unwrap();
        assert!(
            root().join(src).exists(),
            "docker-compose.yml mounts missing {src}"
        );
    }
    for image in [
        "apache/kafka",
        "redis:",
        "prom/prometheus",
        "grafana/grafana",
    ] {
        assert!(compose.contains(image), "stack has {image}");
    }
    let s = Settings::load(
        Some(&root().join("deploy/compose/rescorer.toml")),
        vec![],
        &[],
    )
    .unwrap();
    assert_eq!(s.kafka.bootstrap_servers, "kafka:9092");
}

#[test]
fn the_dockerfile_copies_what_exists_and_points_at_the_library_it_installs() {
    let df = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    for line in df
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(root().join(src).exists(), "Dockerfile copies missing {src}");
        }
    }
    assert!(df.contains("scripts/install-onnxruntime.sh $ORT_FLAVOUR /opt/rescorer/lib"));
    assert!(df.contains("ORT_DYLIB_PATH=/opt/rescorer/lib/libonnxruntime.so"));
    assert!(df.contains("cargo build --release --locked"));
}

#[test]
fn the_image_install_step_puts_the_library_where_the_image_expects_it() {
    // The Dockerfile runs `scripts/install-onnxruntime.sh $ORT_FLAVOUR /opt/rescorer/lib`; run the
    // same script into another directory and load the model with what it installed.
    let dir = tempfile::tempdir().unwrap();
    run_ok(
        Command::new(root().join("scripts/install-onnxruntime.sh")).arg(dir.path()),
        "scripts/install-onnxruntime.sh DEST",
    );
    let lib = dir.path().join("libonnxruntime.so");
    assert!(lib.exists(), "{} installed", lib.display());
    let out = Command::new(env!("CARGO_BIN_EXE_rescorer"))
        .current_dir(root())
        .env_remove("ORT_DYLIB_PATH")
        .args([
            "score",
            "--input",
            "models/catchup-ranker.golden.jsonl",
            "--runtime-library",
        ])
        .arg(&lib)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 300);
}
