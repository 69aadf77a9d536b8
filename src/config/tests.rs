//! Loading, layering and validation of settings.

use super::*;

fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rescorer.toml");
    std::fs::write(&p, text).unwrap();
    (dir, p)
}

#[test]
fn file_then_environment_then_flags() {
    let (_d, p) = write(
        "[kafka]\nbootstrap_servers = \"file:9092\"\ngroup_id = \"g\"\n[output]\ntop_n = 5\n",
    );
    let env = vec![
        (
            "RESCORER__KAFKA__GROUP_ID".to_string(),
            "from-env".to_string(),
        ),
        ("RESCORER__OUTPUT__TOP_N".to_string(), "7".to_string()),
        (
            "RESCORER__KAFKA__OPTIONS__SASL.USERNAME".to_string(),
            "u".to_string(),
        ),
        (
            "RESCORER__KAFKA__OPTIONS__FETCH.WAIT.MAX.MS".to_string(),
            "20".to_string(),
        ),
        ("UNRELATED".to_string(), "x".to_string()),
    ];
    let s = Settings::load(Some(&p), env, &["output.top_n=9".into()]).unwrap();
    assert_eq!(s.kafka.bootstrap_servers, "file:9092");
    assert_eq!(s.kafka.group_id, "from-env");
    assert_eq!(s.output.top_n, 9);
    assert_eq!(s.kafka.options["sasl.username"], "u");
    assert_eq!(s.kafka.options["fetch.wait.max.ms"], "20");
    assert_eq!(s.batch, BatchSettings::default());
}

#[test]
fn unknown_keys_and_bad_values_name_file_and_field() {
    let (_d, p) = write("[batch]\nmax_pair = 3\n");
    let err = Settings::load(Some(&p), vec![], &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rescorer.toml") && err.contains("batch") && err.contains("max_pair"),
        "{err}"
    );

    let (_d, p) = write("[output]\ntop_n = \"many\"\n");
    let err = Settings::load(Some(&p), vec![], &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("output.top_n"), "{err}");

    let (_d, p) = write("[decay]\nshards = 0\n");
    let err = Settings::load(Some(&p), vec![], &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("decay.shards") && err.contains("at least 1"),
        "{err}"
    );

    let (_d, p) = write("[catchup]\nbacklog_share = 1.0\n");
    let err = Settings::load(Some(&p), vec![], &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rescorer.toml") && err.contains("catchup.backlog_share"),
        "{err}"
    );

    let (_d, p) = write("[kafka\n");
    let err = Settings::load(Some(&p), vec![], &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("rescorer.toml"), "{err}");
}

#[test]
fn summary_hides_secrets() {
    let mut s = Settings::default();
    s.redis.url = "rediss://:hunter2@redis:6380".into();
    s.kafka
        .options
        .insert("sasl.password".into(), "hunter2".into());
    let text = s.summary();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("sasl.password"));
}

#[test]
fn young_pairs_are_due_sooner_and_never_later_than_the_max() {
    let d = DecaySettings::default();
    let h = 3_600_000;
    assert_eq!(d.next_due(10 * h, 10 * h), 10 * h + 900_000);
    assert_eq!(d.next_due(48 * h, 0), 48 * h + 12 * h);
    assert_eq!(d.next_due(1000 * h, 0), 1000 * h + 24 * h);
}

#[test]
fn due_times_never_wrap_whatever_the_times_and_intervals() {
    let max_ts = crate::decode::MAX_TS_MS;
    let d = DecaySettings::default();
    assert_eq!(d.next_due(max_ts, 0), max_ts + 24 * 3_600_000);
    assert!(d.next_due(i64::MAX, 0) == i64::MAX, "saturates");
    assert!(d.next_due(0, i64::MAX) > 0, "a moment after as_of counts as age 0");
    let huge = DecaySettings {
        min_interval_secs: u64::MAX,
        max_interval_secs: u64::MAX,
        ..DecaySettings::default()
    };
    assert_eq!(huge.next_due(max_ts, 0), i64::MAX);
    assert!(huge.next_due(5, 0) > 5);
}

#[test]
fn the_example_file_parses_to_the_defaults() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/rescorer.example.toml");
    let s = Settings::load(Some(&p), vec![], &[]).unwrap();
    assert_eq!(s, Settings::default());
}

#[test]
fn settings_written_as_toml_load_back_the_same() {
    // The benchmark hands its settings to the worker process this way.
    let env = vec![
        (
            "RESCORER__KAFKA__OPTIONS__SECURITY.PROTOCOL".to_string(),
            "SSL".to_string(),
        ),
        ("RESCORER__MODEL__DEVICE".to_string(), "auto".to_string()),
    ];
    let s = Settings::load(
        None,
        env,
        &[
            "batch.fanout_min_interval_ms=0".into(),
            "catchup.backlog_share=0.25".into(),
        ],
    )
    .unwrap();
    let (_d, p) = write(&toml::to_string(&s).unwrap());
    let back = Settings::load(Some(&p), Vec::<(String, String)>::new(), &[]).unwrap();
    assert_eq!(back, s);
    assert_eq!(back.batch.fanout_min_interval_ms, 0);
    assert_eq!(back.kafka.options["security.protocol"], "SSL");
}
