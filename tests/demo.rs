//! `rescorer demo`, the first command a user runs, end to end as a user runs it.

mod common;

use std::process::Command;

#[test]
fn the_demo_runs_on_its_embedded_broker_and_shows_scores_from_redis() {
    let out = Command::new(env!("CARGO_BIN_EXE_rescorer"))
        .current_dir(common::root())
        .args([
            "demo",
            "--seconds",
            "4",
            "--rate",
            "300",
            "--members",
            "50",
            "--candidates",
            "50",
        ])
        .output()
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let consumed = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("events consumed"))
        .unwrap_or_else(|| panic!("no summary:\n{stdout}"));
    let nums: Vec<u64> = consumed
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(nums.len(), 2, "{consumed}");
    assert!(
        nums[1] > 0 && nums[0] == nums[1],
        "every published event consumed: {consumed}"
    );
    let tops: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("m0:"))
        .collect();
    assert_eq!(tops.len(), 1, "{stdout}");
    assert!(
        tops[0].contains(" c"),
        "m0 has scored candidates: {}",
        tops[0]
    );
}
