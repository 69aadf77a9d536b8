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
    assert!(
        d.next_due(0, i64::MAX) > 0,
        "a moment after as_of counts as age 0"
    );
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

/// Every form `redis.url` takes, with the password each one hides.
const URL_FORMS: &[(&str, &str)] = &[
    ("redis://:hunter2@redis:6379", "hunter2"),
    ("rediss://:hunter2@redis:6380/2", "hunter2"),
    ("redis://app:hunter2@redis:6379", "hunter2"),
    ("rediss://app:hunter2@10.0.0.1", "hunter2"),
    ("redis://:p@ss@redis:6379", "p@ss"),
    ("redis://app:pa:ss@redis:6379", "pa:ss"),
    ("redis://:pa%2Fss%40x@redis:6379", "pa%2Fss%40x"),
    ("redis://:pa/ss@redis:6379", "pa/ss"),
    ("redis://:pa?ss@redis:6379", "pa?ss"),
    ("redis://:pa#ss@redis:6379", "pa#ss"),
    ("redis://u:1/secret@redis:6379", "1/secret"),
    ("redis://hunter2@redis:6379", "hunter2"),
    ("redis://redis:6379?password=hunter2", "hunter2"),
    ("redis://:hunter2@[::1]:6379", "hunter2"),
    ("not a url :hunter2@", "hunter2"),
    ("redis//:hunter2@redis", "hunter2"),
];

#[test]
fn summary_masks_every_form_of_redis_url() {
    for (url, password) in URL_FORMS {
        let mut s = Settings::default();
        s.redis.url = (*url).into();
        let text = s.summary();
        assert!(!text.contains(password), "{url}: {text}");
        // Decoded percent-escapes must not show either.
        assert!(!text.contains("pa/ss@x"), "{url}: {text}");
    }
    // Cluster seed lists: every seed's password, however many.
    let mut s = Settings::default();
    s.redis.cluster = true;
    s.redis.url = "redis://:pw1@n1:6379,redis://:pw2@n2:6379, rediss://u:p@w3@n3:6380".into();
    let text = s.summary();
    for secret in ["pw1", "pw2", "p@w3"] {
        assert!(!text.contains(secret), "{text}");
    }
    assert!(
        text.contains("redis=redis://:***@n1:6379,redis://:***@n2:6379,rediss://u:***@n3:6380"),
        "{text}"
    );
}

#[test]
fn masked_urls_keep_what_operators_need() {
    use super::redact::redis_url;
    assert_eq!(
        redis_url("redis://127.0.0.1:6379"),
        "redis://127.0.0.1:6379"
    );
    assert_eq!(redis_url("rediss://redis:6380/3"), "rediss://redis:6380/3");
    assert_eq!(
        redis_url("redis://:p@ss@redis:6379/1"),
        "redis://:***@redis:6379/1"
    );
    assert_eq!(
        redis_url("rediss://app:x%3Ay@redis"),
        "rediss://app:***@redis"
    );
    assert_eq!(redis_url("redis://secret@redis"), "redis://***@redis");
    assert_eq!(
        redis_url("redis://u:1/secret@redis:6379"),
        "redis://***@redis:6379 (not a valid URL)"
    );
    assert_eq!(
        redis_url("redis://:pa/ss@redis:6379"),
        "redis://***@redis:6379 (not a valid URL)"
    );
    assert_eq!(redis_url("garbage"), "*** (not a valid URL)");
}

#[test]
fn errors_are_scrubbed_of_every_password() {
    use super::redact::scrub;
    let url = "redis://:pw1@n1:6379,redis://u:p%40w2@n2:6379,redis://:a/b@n3,redis://lone@n4";
    let text = "failed: redis://:pw1@n1:6379 said pw1; p%40w2 or p@w2; a/b; lone; user u";
    let out = scrub(text, url);
    for secret in ["pw1", "p%40w2", "p@w2", "a/b", "lone"] {
        assert!(!out.contains(secret), "{out}");
    }
    assert!(
        out.ends_with("user u"),
        "a user name beside a password stays: {out}"
    );
}

#[test]
fn kafka_options_from_the_environment_stay_text() {
    let env = vec![
        (
            "RESCORER__KAFKA__OPTIONS__SOME.MASK".to_string(),
            "0x1F".to_string(),
        ),
        (
            "RESCORER__KAFKA__OPTIONS__SASL.PASSWORD".to_string(),
            "1e5".to_string(),
        ),
        (
            "RESCORER__KAFKA__OPTIONS__ENABLE.IDEMPOTENCE".to_string(),
            "TRUE".to_string(),
        ),
        ("RESCORER__KAFKA__GROUP_ID".to_string(), "2024".to_string()),
        ("RESCORER__OUTPUT__TOP_N".to_string(), "7".to_string()),
    ];
    let s = Settings::load(
        None,
        env,
        &[
            "kafka.options.queued.min.messages=1_000".into(),
            "kafka.options.client.id=007".into(),
            "kafka.options.quoted=\"0x2F\"".into(),
            "http.listen=\"127.0.0.1:9000\"".into(),
        ],
    )
    .unwrap();
    assert_eq!(s.kafka.options["some.mask"], "0x1F");
    assert_eq!(s.kafka.options["sasl.password"], "1e5");
    assert_eq!(s.kafka.options["enable.idempotence"], "TRUE");
    assert_eq!(s.kafka.options["queued.min.messages"], "1_000");
    assert_eq!(s.kafka.options["client.id"], "007");
    assert_eq!(s.kafka.options["quoted"], "0x2F");
    assert_eq!(s.http.listen, "127.0.0.1:9000");
    assert_eq!(s.kafka.group_id, "2024");
    assert_eq!(s.output.top_n, 7);
}

#[test]
fn a_key_prefix_with_braces_is_refused() {
    for prefix in ["{tenant}", "a{b", "a}b"] {
        let err = Settings::load(
            None,
            Vec::<(String, String)>::new(),
            &[format!("output.key_prefix={prefix}")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("output.key_prefix") && err.contains('{'),
            "{prefix}: {err}"
        );
    }
    let ok = Settings::load(None, vec![], &["output.key_prefix=tenant-a:catchup".into()]);
    assert!(ok.is_ok());
}

#[test]
fn the_tls_ca_file_is_checked_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let set = |url: &str, ca: &Path| {
        Settings::load(
            None,
            Vec::<(String, String)>::new(),
            &[
                format!("redis.url={url}"),
                format!("redis.tls_ca_file={}", ca.display()),
            ],
        )
    };
    let missing = dir.path().join("missing.pem");
    let err = set("rediss://redis:6380", &missing)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("redis.tls_ca_file") && err.contains("missing.pem"),
        "{err}"
    );

    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let err = set("rediss://redis:6380", &junk).unwrap_err().to_string();
    assert!(
        err.contains("redis.tls_ca_file") && err.contains("junk.pem"),
        "{err}"
    );

    let err = set("redis://redis:6379", &junk).unwrap_err().to_string();
    assert!(
        err.contains("redis.tls_ca_file") && err.contains("rediss://"),
        "{err}"
    );
}

#[test]
fn a_redis_url_the_client_cannot_use_is_refused_without_showing_it() {
    let load = |url: &str, cluster: bool| {
        Settings::load(
            None,
            Vec::<(String, String)>::new(),
            &[
                format!("redis.url={url}"),
                format!("redis.cluster={cluster}"),
            ],
        )
    };
    for (url, cluster) in [
        ("redis://:pw1@n1:6379,redis://:pw2@n2:6379", true),
        ("rediss://:pw1@n1:6379,redis://:pw1@n2:6379", true),
        ("redis://:pw1@n1:6379,redis://:pw2@n2:6379", false),
        ("http://:pw1@n1:6379", false),
    ] {
        let err = load(url, cluster).unwrap_err().to_string();
        assert!(err.contains("redis.url"), "{url}: {err}");
        assert!(!err.contains("pw1") && !err.contains("pw2"), "{url}: {err}");
    }
    // One password written two ways is one password.
    load(
        "redis://:p@ss@n1:6379,redis://:p%40ss@n2:6379, redis://:p@ss@n3:6379",
        true,
    )
    .unwrap();
}

#[test]
fn debug_output_masks_the_redis_password() {
    let mut s = Settings::default();
    s.redis.url = "redis://:hunter2@redis:6379".into();
    let text = format!("{s:?}");
    assert!(
        !text.contains("hunter2") && text.contains("redis://:***@redis:6379"),
        "{text}"
    );
}
