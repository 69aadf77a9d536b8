//! The end-to-end benchmark's smoke mode: proves `rescorer bench e2e` still works against a real
//! broker and redis-server. It checks that every phase produced numbers, never how fast they are.

mod common;

use common::harness::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_runs_every_phase_end_to_end() {
    let h = Harness::new(1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbootstrap_servers = \"{}\"\n[redis]\nurl = \"{}\"\n[model]\nspec = \"{}\"\n",
            h.broker.bootstrap,
            h.redis.url(),
            common::model_spec().display()
        ),
    )
    .unwrap();
    let out = dir.path().join("e2e.json");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_rescorer"))
        .current_dir(common::root())
        .args([
            "bench",
            "e2e",
            "--backlog",
            "300",
            "--seconds",
            "1",
            "--members",
            "100",
        ])
        .args(["--candidates", "100", "--partitions", "2"])
        .args(["--preload-members", "100", "--preload-per-member", "5"])
        .args(["--tick-members", "20"])
        .args([
            "--batch-sizes",
            "16",
            "--backlog-minutes",
            "0.05",
            "--phase-limit",
            "60",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for ceiling in [
        "consume_msgs_per_s",
        "model_rows_per_s",
        "redis_pairs_per_s",
    ] {
        assert!(
            report["ceilings"][ceiling].as_f64().unwrap() > 0.0,
            "{ceiling}: {report}"
        );
    }
    let tick = &report["tick"];
    assert_eq!(
        tick["pairs"].as_u64(),
        Some(20 * 50),
        "the tick rescored every pair: {report}"
    );
    assert!(tick["pairs_per_s"].as_f64().unwrap() > 0.0 && tick["complete"] == true);
    let batch = &report["batch_sizes"][0];
    assert_eq!(batch[0].as_u64(), Some(16), "{report}");
    for (run, drained) in [
        ("sustained", &report["sustained"]),
        ("no_coalescing", &report["no_coalescing"]),
        ("batch size 16", &batch[1]),
    ] {
        assert_eq!(
            drained["events"].as_u64(),
            Some(300),
            "{run} drained the backlog: {report}"
        );
        assert!(drained["peak_rss_mib"].as_f64().unwrap() > 0.0);
    }
    let fresh = report["freshness"].as_array().unwrap();
    assert_eq!(fresh.len(), 3);
    let seen: u64 = fresh
        .iter()
        .map(|f| f["seen"]["samples"].as_u64().unwrap())
        .sum();
    assert!(
        seen > 0,
        "the load generator saw scores of its member updates: {report}"
    );
    let backlog = &report["backlog_live"];
    assert!(backlog["live_sent"].as_u64().unwrap() > 0, "{report}");
    assert!(!backlog["series"].as_array().unwrap().is_empty());
    for plot in ["e2e-backlog.svg", "e2e-batch.svg"] {
        let svg = std::fs::read_to_string(dir.path().join(plot)).unwrap();
        assert!(svg.contains("<polyline"), "{plot} has lines");
    }
    assert!(std::fs::read_to_string(out.with_extension("md"))
        .unwrap()
        .contains("## Ceilings"));
}
