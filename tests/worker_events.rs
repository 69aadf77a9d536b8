//! The worker end to end against a real broker, a real redis-server and the real model.

mod common;

use common::expected_score;
use common::harness::Harness;
use serde_json::json;

const T0: i64 = 1_764_000_000_000;
const H: i64 = 3_600_000;

fn assert_score(got: &[(String, f64)], cand: &str, want: f64) {
    let s = got
        .iter()
        .find(|(c, _)| c == cand)
        .unwrap_or_else(|| panic!("{cand} missing from {got:?}"))
        .1;
    assert_eq!(s, want, "{cand}: stored {s}, model says {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_type_reaches_the_scores_as_the_model_says() {
    let h = Harness::new(2).await;
    let w = h.start_worker().await;
    let scorer = common::scorer();
    h.feature(
        "member",
        "m1",
        json!({"sessions_7d": 5, "connections": 300}),
        T0,
    )
    .await;
    h.feature(
        "candidate",
        "c1",
        json!({"profile_completeness": 0.9, "connections": 500}),
        T0,
    )
    .await;
    h.feature("candidate", "c2", json!({"profile_completeness": 0.4}), T0)
        .await;
    h.upsert(
        "m1",
        "c1",
        "job_change",
        json!({"affinity": 0.6, "mutual_connections": 12}),
        T0 + H,
    )
    .await;
    h.upsert("m1", "c2", "new_post", json!({"affinity": 0.2}), T0 + 2 * H)
        .await;
    h.wait_consumed().await;

    let m1 = [("sessions_7d", 5.0), ("connections", 300.0)];
    let c1 = [("profile_completeness", 0.9), ("connections", 500.0)];
    let c2 = [("profile_completeness", 0.4)];
    let p1 = [("affinity", 0.6), ("mutual_connections", 12.0)];
    let p2 = [("affinity", 0.2)];
    let got = h.scores("m1");
    assert_eq!(got.len(), 2, "{got:?}");
    assert_score(
        &got,
        "c1",
        expected_score(&scorer, &m1, &c1, &p1, "job_change", T0 + H, T0 + H),
    );
    assert_score(
        &got,
        "c2",
        expected_score(&scorer, &m1, &c2, &p2, "new_post", T0 + 2 * H, T0 + 2 * H),
    );

    // A member update rescores all of the member's pairs as of its own time.
    h.feature("member", "m1", json!({"sessions_7d": 1}), T0 + 3 * H)
        .await;
    h.wait_consumed().await;
    let m1 = [("sessions_7d", 1.0), ("connections", 300.0)];
    let got = h.scores("m1");
    assert_score(
        &got,
        "c1",
        expected_score(&scorer, &m1, &c1, &p1, "job_change", T0 + H, T0 + 3 * H),
    );
    assert_score(
        &got,
        "c2",
        expected_score(&scorer, &m1, &c2, &p2, "new_post", T0 + 2 * H, T0 + 3 * H),
    );

    // A tick past every pair's due time rescores everything as of the tick: scores decay.
    let before = h.scores("m1");
    let t = T0 + 30 * H;
    h.tick(t).await;
    h.wait_consumed().await;
    let got = h.scores("m1");
    let c1_now = expected_score(&scorer, &m1, &c1, &p1, "job_change", T0 + H, t);
    assert_score(&got, "c1", c1_now);
    assert_score(
        &got,
        "c2",
        expected_score(&scorer, &m1, &c2, &p2, "new_post", T0 + 2 * H, t),
    );
    let old_c1 = before.iter().find(|(c, _)| c == "c1").unwrap().1;
    assert!(
        c1_now < old_c1,
        "the job change moment aged 27 h: {c1_now} < {old_c1}"
    );
    let meta = h.meta("m1");
    assert_eq!(meta["model"], "catchup-ranker:1");
    assert_eq!(meta["as_of"], t.to_string());
    assert!(meta["updated_at"].parse::<i64>().unwrap() > T0);

    let text = w.metrics.render();
    assert!(text.contains("rescorer_pairs_scored_total"), "{text}");
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_update_fans_out_to_every_member_in_chunks() {
    let h = Harness::new(2).await;
    let mut settings = h.settings.clone();
    settings.batch.fanout_chunk = 3; // 20 members: several chunks
    settings.batch.max_pairs = 8;
    let w = h.start_worker_with(settings).await;
    let scorer = common::scorer();
    let members: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for (i, m) in members.iter().enumerate() {
        h.upsert(
            m,
            "hot",
            "promotion",
            json!({"affinity": i as f64 / 20.0}),
            T0,
        )
        .await;
    }
    h.wait_consumed().await;
    h.feature(
        "candidate",
        "hot",
        json!({"profile_completeness": 1.0, "connections": 5000}),
        T0 + 5 * H,
    )
    .await;
    h.wait_consumed().await;
    let hot = [("profile_completeness", 1.0), ("connections", 5000.0)];
    for (i, m) in members.iter().enumerate() {
        let want = expected_score(
            &scorer,
            &[],
            &hot,
            &[("affinity", i as f64 / 20.0)],
            "promotion",
            T0,
            T0 + 5 * H,
        );
        assert_score(&h.scores(m), "hot", want);
        assert_eq!(h.meta(m)["as_of"], (T0 + 5 * H).to_string());
    }
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_events_go_through_while_a_one_pair_job_share_fans_out() {
    let h = Harness::new(2).await;
    let mut settings = h.settings.clone();
    settings.batch.fanout_chunk = 4;
    settings.batch.job_pairs = 1; // fan-outs take one pair of each fresh window
    let w = h.start_worker_with(settings).await;
    let members: Vec<String> = (0..12).map(|i| format!("m{i}")).collect();
    for m in &members {
        h.upsert(m, "hot", "promotion", json!({}), T0).await;
    }
    h.wait_consumed().await;
    h.feature("candidate", "hot", json!({"connections": 7.0}), T0 + H)
        .await;
    h.feature("member", "m0", json!({"sessions_7d": 3}), T0 + 2 * H)
        .await;
    h.wait_consumed().await;
    for m in &members {
        let want = if m == "m0" { T0 + 2 * H } else { T0 + H };
        assert_eq!(h.meta(m)["as_of"], want.to_string(), "{m}");
    }
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removals_and_late_events_never_move_state_backwards() {
    let h = Harness::new(1).await;
    let w = h.start_worker().await;
    let scorer = common::scorer();
    h.upsert("m1", "gone", "birthday", json!({}), T0).await;
    h.upsert("m1", "kept", "job_change", json!({"affinity": 0.5}), T0)
        .await;
    h.remove("m1", "gone", T0 + H).await;
    // An older upsert arriving later must not bring the pair back.
    h.upsert("m1", "gone", "birthday", json!({}), T0 + H / 2)
        .await;
    // The pairs first: topics are consumed independently, and a pair scored for the first time
    // after a newer member update is scored as of its own time (until a tick), not the update's.
    h.wait_consumed().await;
    h.feature("member", "m1", json!({"sessions_7d": 9}), T0 + 2 * H)
        .await;
    // Late: older than the stored value, so it is counted and not applied.
    h.feature("member", "m1", json!({"sessions_7d": 1}), T0 + H)
        .await;
    h.wait_consumed().await;
    let got = h.scores("m1");
    assert_eq!(got.len(), 1, "{got:?}");
    let want = expected_score(
        &scorer,
        &[("sessions_7d", 9.0)],
        &[],
        &[("affinity", 0.5)],
        "job_change",
        T0,
        T0 + 2 * H,
    );
    assert_score(&got, "kept", want);

    // A newer moment replaces the pair's reason and pair features as a whole.
    h.upsert(
        "m1",
        "kept",
        "new_post",
        json!({"messages_90d": 4}),
        T0 + 3 * H,
    )
    .await;
    // A null removes a feature: the spec's default applies again.
    h.feature("member", "m1", json!({"sessions_7d": null}), T0 + 3 * H)
        .await;
    h.wait_consumed().await;
    let want = expected_score(
        &scorer,
        &[],
        &[],
        &[("messages_90d", 4.0)],
        "new_post",
        T0 + 3 * H,
        T0 + 3 * H,
    );
    assert_score(&h.scores("m1"), "kept", want);

    let text = w.metrics.render();
    assert!(
        text.contains(r#"rescorer_events_total{outcome="stale",topic="feature_updates"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"rescorer_events_total{outcome="stale",topic="new_candidates"} 1"#),
        "{text}"
    );
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_top_n_are_published_and_others_come_back_when_they_rise() {
    let h = Harness::new(1).await;
    let mut settings = h.settings.clone();
    settings.output.top_n = 3;
    let w = h.start_worker_with(settings).await;
    for i in 0..6 {
        h.upsert(
            "m1",
            &format!("c{i}"),
            "job_change",
            json!({"affinity": i as f64 / 10.0}),
            T0,
        )
        .await;
    }
    h.wait_consumed().await;
    let names = |v: Vec<(String, f64)>| v.into_iter().map(|(c, _)| c).collect::<Vec<_>>();
    assert_eq!(names(h.scores("m1")), ["c5", "c4", "c3"]);
    // c0 rises above everyone through its candidate features.
    h.feature(
        "candidate",
        "c0",
        json!({"profile_completeness": 1.0, "connections": 1}),
        T0,
    )
    .await;
    h.upsert(
        "m1",
        "c0",
        "job_change",
        json!({"affinity": 1.0, "mutual_connections": 500}),
        T0 + 1,
    )
    .await;
    h.wait_consumed().await;
    assert_eq!(names(h.scores("m1"))[0], "c0");
    assert_eq!(h.scores("m1").len(), 3);
    // Removing one from the top brings the next one back from state.
    h.remove("m1", "c0", T0 + 2).await;
    h.wait_consumed().await;
    assert_eq!(names(h.scores("m1")), ["c5", "c4", "c3"]);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{}:scores:{{m1}}", h.settings.output.key_prefix))
        .query(&mut h.redis.client())
        .unwrap();
    assert!(ttl > 6 * 86_400_000, "TTL refreshed on write: {ttl}");
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_go_to_the_dlq_with_the_reason_and_never_block_the_partition() {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    use rdkafka::Message;

    let h = Harness::new(1).await;
    let w = h.start_worker().await;
    let f = h.settings.topics.feature_updates.clone();
    let c = h.settings.topics.new_candidates.clone();
    let long = "x".repeat(129);
    let bad: Vec<(&str, Option<Vec<u8>>, &str)> = vec![
        (&f, Some(b"{not json".to_vec()), "invalid JSON"),
        (
            &f,
            Some(br#"{"entity": "member", "id": 7, "features": {}, "ts": 1}"#.to_vec()),
            "`id` must be a string",
        ),
        (
            &f,
            Some(
                br#"{"entity": "member", "id": "m", "features": {"a": "high"}, "ts": 1}"#.to_vec(),
            ),
            "got a string",
        ),
        (
            &f,
            Some(br#"{"entity": "member", "id": "m", "features": {"a": 1e999}, "ts": 1}"#.to_vec()),
            "invalid JSON",
        ),
        (
            &c,
            Some(br#"{"member_id": "m", "candidate_id": "c", "ts": 1}"#.to_vec()),
            "missing field `reason`",
        ),
        (
            &c,
            Some(
                format!(
                    r#"{{"member_id": "{long}", "candidate_id": "c", "reason": "r", "ts": 1}}"#
                )
                .into_bytes(),
            ),
            "129 bytes",
        ),
        (&c, None, "no value"),
    ];
    for (topic, value, _) in &bad {
        h.send_raw(topic, Some("k"), value.as_deref(), None).await;
    }
    // Valid events behind the bad ones on the same partitions still get through.
    h.upsert("m1", "c1", "job_change", json!({}), T0).await;
    h.wait_consumed().await;
    assert_eq!(h.scores("m1").len(), 1);

    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &h.broker.bootstrap)
        .set(
            "group.id",
            format!("{}-dlq-reader", h.settings.kafka.group_id),
        )
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&h.settings.topics.dlq]).unwrap();
    let mut seen = Vec::new();
    while seen.len() < bad.len() {
        let m = tokio::time::timeout(std::time::Duration::from_secs(30), consumer.recv())
            .await
            .expect("DLQ records arrive")
            .unwrap();
        let hdr = |name: &str| {
            m.headers()
                .and_then(|hs| hs.iter().find(|x| x.key == name).and_then(|x| x.value))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        seen.push((
            hdr("rescorer.source.topic"),
            m.payload().map(<[u8]>::to_vec),
            hdr("rescorer.error"),
            hdr("rescorer.source.offset"),
        ));
        assert_eq!(m.key(), Some(&b"k"[..]));
    }
    for (topic, value, reason) in &bad {
        let hit = seen.iter().find(|(t, v, _, _)| t == topic && v == value);
        let (_, _, got, offset) = hit.unwrap_or_else(|| panic!("no DLQ record for {value:?}"));
        assert!(got.contains(reason), "{got} should mention {reason}");
        assert!(offset.parse::<i64>().is_ok());
    }
    assert!(w
        .metrics
        .render()
        .contains(r#"rescorer_events_total{outcome="dead_lettered",topic="feature_updates"} 4"#));
    w.stop().await.unwrap();
}
