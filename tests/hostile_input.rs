//! Nothing stalls the worker: each hostile input is produced, then a canary on every partition of
//! every input topic; every canary must be scored (its message committed after its score was
//! acknowledged), each hostile input must be in the dead-letter topic with its reason, or counted
//! and skipped, and nothing else may be lost. Real broker, real redis-server, real model.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::harness::Harness;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use serde_json::json;

const T0: i64 = 1_764_000_000_000;

/// One DLQ record: its headers and value.
struct DeadLetter {
    key: Option<Vec<u8>>,
    headers: HashMap<String, String>,
    value: Option<Vec<u8>>,
}

/// Reads `n` records of the test's DLQ topic.
async fn dead_letters(h: &Harness, n: usize) -> Vec<DeadLetter> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &h.broker.bootstrap)
        .set(
            "group.id",
            format!("{}-dlq-reader", h.settings.kafka.group_id),
        )
        .set("auto.offset.reset", "earliest")
        .set("fetch.message.max.bytes", "2000000")
        .create()
        .unwrap();
    consumer.subscribe(&[&h.settings.topics.dlq]).unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} DLQ records arrived", out.len()))
            .unwrap();
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|x| {
                        let v = x.value.map(String::from_utf8_lossy).unwrap_or_default();
                        (x.key.to_owned(), v.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(DeadLetter {
            key: m.key().map(<[u8]>::to_vec),
            headers,
            value: m.payload().map(<[u8]>::to_vec),
        });
    }
    out
}

/// A canary on every partition of the feature and candidate topics, and a tick on every
/// partition of the ticks topic; returns the canary members, each with its one candidate.
async fn canaries(h: &Harness, round: &str, ts: i64) -> Vec<(String, String)> {
    let (f, c) = (
        h.settings.topics.feature_updates.clone(),
        h.settings.topics.new_candidates.clone(),
    );
    let mut members = Vec::new();
    for p in 0..h.partitions {
        let m = format!("canary-{round}-m{p}");
        let cand = format!("canary-{round}-c{p}");
        let pair = json!({"member_id": m, "candidate_id": cand, "reason": "job_change", "ts": ts});
        let bytes = pair.to_string();
        h.send_raw(&c, Some(&m), Some(bytes.as_bytes()), Some(p))
            .await;
        let feat =
            json!({"entity": "member", "id": m, "features": {"sessions_7d": 3}, "ts": ts + 1});
        let bytes = feat.to_string();
        h.send_raw(&f, Some(&m), Some(bytes.as_bytes()), Some(p))
            .await;
        members.push((m, cand));
    }
    h.tick(ts + 2).await;
    members
}

/// Waits for every message to be committed, then asserts every canary pair was scored.
async fn assert_canaries_scored(h: &Harness, members: &[(String, String)]) {
    h.wait_consumed().await;
    for (m, c) in members {
        let scores = h.scores(m);
        assert!(
            scores.iter().any(|(x, s)| x == c && s.is_finite()),
            "canary {m} not scored: {scores:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_are_dead_lettered_or_skipped_and_every_partition_keeps_flowing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("rescorer=warn")
        .with_test_writer()
        .try_init();
    let h = Harness::new(2).await;
    let w = h.start_worker().await;
    let f = h.settings.topics.feature_updates.clone();
    let c = h.settings.topics.new_candidates.clone();
    let t = h.settings.topics.decay_ticks.clone();

    // 1. An invalid message of ~1 MB: its dead letter would be over the broker's limit whole.
    let huge_entity = "x".repeat(990_000);
    let huge = format!(r#"{{"entity": "{huge_entity}", "id": "m", "features": {{}}, "ts": 1}}"#);
    // 4. A candidate feature past float32's range.
    let overflow = r#"{"entity": "candidate", "id": "c-big", "features": {"profile_completeness": 1e39}, "ts": 5}"#;
    // 5. Event times near i64::MAX.
    let far_tick = r#"{"ts": 9223372036854775000}"#;
    let far_pair = r#"{"member_id": "m-far", "candidate_id": "c-far", "reason": "job_change", "ts": 9223372036854775000}"#;
    let hostile: Vec<(&str, Vec<u8>, &str)> = vec![
        (&f, huge.clone().into_bytes(), "`entity`"),
        (&f, overflow.as_bytes().to_vec(), "overflows float32"),
        (&t, far_tick.as_bytes().to_vec(), "after year 9999"),
        (&c, far_pair.as_bytes().to_vec(), "after year 9999"),
    ];
    for (p, (topic, value, _)) in hostile.iter().enumerate() {
        let p = p as i32 % h.partitions;
        h.send_raw(topic, Some("hostile"), Some(value), Some(p))
            .await;
    }
    // Every sample the contract calls invalid, on both partitions.
    let samples = common::root().join("topics/samples");
    let mut invalid = 0;
    for (file, topic) in [("feature-updates", &f), ("new-candidates", &c)] {
        let text = std::fs::read_to_string(samples.join(format!("{file}.invalid.jsonl"))).unwrap();
        for (i, line) in text.lines().enumerate() {
            let p = i as i32 % h.partitions;
            h.send_raw(topic, Some("sample"), Some(line.as_bytes()), Some(p))
                .await;
            invalid += 1;
        }
    }
    // A valid candidate feature at the edge of float32 (the model gives NaN for it): its pairs
    // are skipped and counted, the rest of the window is written.
    h.feature(
        "candidate",
        "c-nan",
        json!({"profile_completeness": 3.4e38}),
        T0,
    )
    .await;
    h.wait_consumed().await;
    h.upsert("m-nan", "c-nan", "job_change", json!({}), T0 + 1)
        .await;
    h.upsert("m-nan", "c-ok", "job_change", json!({}), T0 + 1)
        .await;

    let members = canaries(&h, "a", T0 + 10).await;
    assert_canaries_scored(&h, &members).await;
    let nan_member = h.scores("m-nan");
    assert!(
        nan_member.iter().any(|(x, _)| x == "c-ok") && nan_member.iter().all(|(x, _)| x != "c-nan"),
        "the NaN pair is skipped, its neighbour written: {nan_member:?}"
    );

    let letters = dead_letters(&h, hostile.len() + invalid).await;
    for (topic, value, reason) in &hostile {
        let hit = letters.iter().find(|d| {
            d.key.as_deref() == Some(&b"hostile"[..])
                && d.headers["rescorer.source.topic"] == *topic
                && d.headers["rescorer.error"].contains(reason)
        });
        let d = hit.unwrap_or_else(|| panic!("no DLQ record for {topic} with {reason}"));
        if value.len() > rescorer::dlq::MAX_VALUE_BYTES {
            // Cut to the documented size, with the original's length and hash.
            assert_eq!(d.headers["rescorer.truncated"], "value");
            assert_eq!(
                d.headers["rescorer.original.value.bytes"],
                value.len().to_string()
            );
            assert_eq!(d.headers["rescorer.original.value.sha256"].len(), 64);
            let kept = d.value.as_deref().unwrap();
            assert_eq!(kept, &value[..rescorer::dlq::MAX_VALUE_BYTES]);
        } else {
            assert_eq!(d.value.as_deref(), Some(&value[..]));
            assert!(!d.headers.contains_key("rescorer.truncated"));
        }
    }
    let text = w.metrics.render();
    assert!(text.contains("rescorer_dlq_truncated_total 1"), "{text}");
    assert!(
        text.contains(r#"rescorer_pairs_skipped_total{reason="non_finite_score"}"#),
        "{text}"
    );

    // After all of it, the worker still scores everything on every partition.
    let members = canaries(&h, "b", T0 + 20).await;
    assert_canaries_scored(&h, &members).await;
    assert_eq!(w.http_get("/healthz").await.0, 200);
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_every_compression_codec_are_consumed_end_to_end() {
    let h = Harness::new(2).await;
    let w = h.start_worker().await;
    let c = h.settings.topics.new_candidates.clone();
    let codecs = ["gzip", "snappy", "lz4", "zstd"];
    for codec in codecs {
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &h.broker.bootstrap)
            .set("compression.type", codec)
            .set("linger.ms", "20")
            .create()
            .unwrap_or_else(|e| panic!("producer with {codec}: {e}"));
        // Many records per batch, so each batch is compressed as a whole.
        let values: Vec<(String, String)> = (0..40)
            .map(|i| {
                let m = format!("{codec}-m{}", i % 8);
                let v = json!({"member_id": m, "candidate_id": format!("{codec}-c{i}"),
                    "reason": "new_post", "ts": T0 + i});
                (m, v.to_string())
            })
            .collect();
        let sends = values.iter().map(|(m, v)| {
            let rec = FutureRecord::to(&c).key(m.as_str()).payload(v.as_bytes());
            h.deliver_via(&producer, &c, rec)
        });
        futures::future::join_all(sends).await;
    }
    let members = canaries(&h, "codecs", T0 + 100).await;
    assert_canaries_scored(&h, &members).await;
    for codec in codecs {
        let pairs: usize = (0..8)
            .map(|i| h.scores(&format!("{codec}-m{i}")).len())
            .sum();
        assert_eq!(
            pairs, 40,
            "{codec}: every pair of the compressed batches scored"
        );
    }
    w.stop().await.unwrap();
}
