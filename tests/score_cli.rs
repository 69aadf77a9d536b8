//! `rescorer score`, run as a user would: the binary, JSON lines in, JSON lines out.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

fn rescorer_score(stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rescorer"))
        .current_dir(common::root())
        .args(["score", "--batch-size", "50"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn scores_the_golden_file_within_tolerance() {
    let golden =
        std::fs::read_to_string(common::root().join("models/catchup-ranker.golden.jsonl")).unwrap();
    let (ok, out, err) = rescorer_score(&golden);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), golden.lines().count());
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["line"], i + 1);
        assert!(l["abs_diff"].as_f64().unwrap() <= 1e-5, "{l}");
    }
}

#[test]
fn a_bad_line_is_reported_by_number_and_the_rest_still_score() {
    let good = r#"{"member": {}, "candidate": {}, "pair": {"affinity": 0.4}, "reason": "job_change", "moment_ts": 0, "as_of": 3600000}"#;
    let nan =
        r#"{"member": {"sessions_7d": 1e999}, "reason": "job_change", "moment_ts": 0, "as_of": 0}"#;
    let input = format!("{good}\nnot json\n{nan}\n{good}\n");
    let (ok, out, err) = rescorer_score(&input);
    assert!(!ok, "bad lines make the command fail");
    assert!(err.contains("line 2:"), "{err}");
    assert!(err.contains("line 3:"), "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["line"], 1);
    assert_eq!(lines[1]["line"], 4);
    assert_eq!(lines[0]["score"], lines[1]["score"]);
}
