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
