//! Operator commands against a real broker: `rescorer topics apply` and `rescorer loadgen`.

mod common;

use std::time::Duration;

use common::harness::Harness;
use rdkafka::producer::Producer;
use rescorer::cli::topics::{apply, TopicStatus, TopicsFile};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_apply_creates_what_is_missing_and_reports_drift_without_changing_it() {
    // The harness created every topic with 2 partitions; rename two so they are missing.
    let h = Harness::new(2).await;
    let mut settings = h.settings.clone();
    settings.topics.decay_ticks = format!("{}-new", settings.topics.decay_ticks);
    settings.topics.dlq = format!("{}-new", settings.topics.dlq);
    let file = TopicsFile::load(&common::root().join("topics/topics.toml")).unwrap();
    let results = apply(&settings, &file, Some(1)).await.unwrap();
    let status = |name: &str| {
        results
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
            .unwrap()
    };
    assert_eq!(status(&settings.topics.decay_ticks), TopicStatus::Created);
    assert_eq!(status(&settings.topics.dlq), TopicStatus::Created);
    match status(&settings.topics.feature_updates) {
        TopicStatus::Drift(d) => {
            assert!(d.iter().any(|x| x == "partitions: 2, defined 12"), "{d:?}")
        }
        other => panic!("expected drift, got {other:?}"),
    }

    // Applying again creates nothing and leaves the drifted topic as it was.
    let again = apply(&settings, &file, Some(1)).await.unwrap();
    assert!(
        again.iter().all(|(_, s)| *s != TopicStatus::Created),
        "{again:?}"
    );
    let md = h
        .producer
        .client()
        .fetch_metadata(
            Some(&settings.topics.feature_updates),
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(
        md.topics()[0].partitions().len(),
        2,
        "drift is reported, never fixed by force"
    );
    let md = h
        .producer
        .client()
        .fetch_metadata(Some(&settings.topics.decay_ticks), Duration::from_secs(10))
        .unwrap();
    assert_eq!(md.topics()[0].partitions().len(), 12);
    // The new ticks topic has 12 partitions, the others 2: owned state could not use them.
    let counts = rescorer::cli::topics::partition_counts(&settings)
        .await
        .unwrap();
    let why = rescorer::cli::topics::count_mismatch(&counts).expect("counts differ");
    assert!(
        why.contains(&format!("{}=12", settings.topics.decay_ticks)),
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_traffic_is_consumed_by_the_worker() {
    let h = Harness::new(2).await;
    let w = h.start_worker().await;
    let opts = rescorer::cli::loadgen::LoadgenOptions {
        rate: 0,
        count: 500,
        seconds: 0,
        seed: 3,
        members: 100,
        candidates: 100,
        zipf: 1.1,
        mix: rescorer::traffic::Mix::default(),
        event_time: Some((1_764_000_000_000, 1000)),
        watch: None,
        kafka_time: false,
        stop: None,
    };
    let report = rescorer::cli::loadgen::run(&h.settings, &opts)
        .await
        .unwrap();
    assert_eq!(report.sent, 500);
    let until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let handled: u64 = ["applied", "stale", "dead_lettered"]
            .iter()
            .flat_map(|o| ["feature_updates", "new_candidates"].map(|t| (t, *o)))
            .map(|(t, o)| w.metrics.events_total.with_label_values(&[t, o]).get())
            .sum();
        // Handled at intake; the scores follow when the batch window is written.
        if handled == 500 && w.metrics.pairs_scored_total.get() > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "worker handled {handled} of 500"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        w.metrics
            .events_total
            .with_label_values(&["feature_updates", "dead_lettered"])
            .get()
            + w.metrics
                .events_total
                .with_label_values(&["new_candidates", "dead_lettered"])
                .get(),
        0,
        "generated traffic is valid"
    );
    assert!(w.metrics.pairs_scored_total.get() > 0);
    w.stop().await.unwrap();
}
