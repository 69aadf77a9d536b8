//! The score script against a real `redis-server`: event-time guards, repeats within one call,
//! tombstones, the top-N set, and members with more pairs than one slice of script arguments.

mod common;

use std::time::Duration;

use redis::AsyncCommands;
use rescorer::decode::{Event, PairRemove, PairUpsert};
use rescorer::model::FeatureMap;
use rescorer::store::{Keys, ScoreWrite, Store, WriteFlag};

use common::services::RedisServer;

const TOP_N: usize = 100;

async fn store(redis: &RedisServer) -> Store {
    let conn = rescorer::store::connect(&redis.url(), false, Duration::from_secs(5))
        .await
        .expect("redis connects");
    let store = Store::new(conn, Keys::new("t", 4));
    store.load_scripts().await.expect("scripts load");
    store
}

async fn upsert_pairs(store: &Store, member: &str, candidates: &[String]) {
    let events: Vec<Event> = candidates
        .iter()
        .map(|c| {
            Event::Upsert(PairUpsert {
                member_id: member.into(),
                candidate_id: c.clone(),
                reason: "job_change".into(),
                pair_features: FeatureMap::new(),
                ts: 10,
            })
        })
        .collect();
    let refs: Vec<(&Event, i64)> = events.iter().zip(0..).collect();
    store.apply(&refs, TOP_N).await.expect("pairs stored");
}

fn write(candidate: &str, score: f32, as_of: i64) -> ScoreWrite {
    ScoreWrite {
        candidate: candidate.into(),
        score,
        as_of,
    }
}

async fn scores(store: &Store, member: &str) -> Vec<(String, f64)> {
    let mut c = store.conn();
    c.zrevrange_withscores(store.keys().scores(member), 0, -1)
        .await
        .expect("top-N read")
}

#[tokio::test]
async fn guards_repeats_and_tombstones_in_one_call() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let cands: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    upsert_pairs(&store, "m", &cands).await;
    let first = store
        .write_scores(
            "x:1",
            TOP_N,
            60_000,
            1,
            &[("m", vec![write("a", 0.5, 100)])],
        )
        .await
        .unwrap();
    assert_eq!(first, vec![vec![WriteFlag::Written]]);

    // c is removed; "zz" never existed.
    let rm = Event::Remove(PairRemove {
        member_id: "m".into(),
        candidate_id: "c".into(),
        ts: 20,
    });
    store.apply(&[(&rm, 99)], TOP_N).await.unwrap();

    let flags = store
        .write_scores(
            "x:1",
            TOP_N,
            60_000,
            2,
            &[(
                "m",
                vec![
                    write("a", 0.1, 50),  // older than the stored as_of 100
                    write("b", 0.2, 200), // new
                    write("b", 0.9, 150), // a repeat, older than the one just before it
                    write("b", 0.3, 300), // a repeat, newer: wins
                    write("c", 0.7, 400), // tombstoned
                    write("zz", 0.7, 400),
                ],
            )],
        )
        .await
        .unwrap();
    assert_eq!(
        flags,
        vec![vec![
            WriteFlag::Superseded(100),
            WriteFlag::Written,
            WriteFlag::Superseded(200),
            WriteFlag::Written,
            WriteFlag::Gone,
            WriteFlag::Gone,
        ]]
    );
    check_split(&store, "m", 2).await;
    let top = scores(&store, "m").await;
    let top: Vec<(&str, f32)> = top.iter().map(|(c, s)| (c.as_str(), *s as f32)).collect();
    assert_eq!(top, vec![("a", 0.5), ("b", 0.3)]);
    let mut c = store.conn();
    let as_of: Option<String> = c.hget(store.keys().scored_as_of("m"), "b").await.unwrap();
    assert_eq!(as_of.as_deref(), Some("300"));
    let meta_as_of: Option<String> = c.hget(store.keys().meta("m"), "as_of").await.unwrap();
    assert_eq!(meta_as_of.as_deref(), Some("300"));
}

#[tokio::test]
async fn a_member_with_thousands_of_pairs_is_written_exactly_in_several_script_calls() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    // 5,000 pairs: five script calls of at most SCORE_CALL_PAIRS, each several slices of script
    // arguments (Lua's unpack takes a few thousand values).
    let cands: Vec<String> = (0..5000).map(|i| format!("c{i}")).collect();
    upsert_pairs(&store, "big", &cands).await;
    let writes: Vec<ScoreWrite> = cands
        .iter()
        .enumerate()
        .map(|(i, c)| write(c, (i % 997) as f32 / 997.0, 1_000 + i as i64))
        .collect();
    let flags = store
        .write_scores("x:1", TOP_N, 60_000, 1, &[("big", writes.clone())])
        .await
        .unwrap();
    assert_eq!(flags.len(), 1);
    assert!(flags[0].iter().all(|f| *f == WriteFlag::Written));

    check_split(&store, "big", 5000).await;
    let mut c = store.conn();
    let stored: Vec<Option<String>> = c
        .hget(store.keys().scored_as_of("big"), &["c0", "c4999"])
        .await
        .unwrap();
    assert_eq!(
        stored,
        vec![Some("1000".to_string()), Some("5999".to_string())]
    );

    // Lower the best scores below the rest: the top must follow (entries swap sets).
    let mut best: Vec<ScoreWrite> = writes.clone();
    best.sort_by(|a, b| b.score.total_cmp(&a.score));
    let lowered: Vec<ScoreWrite> = best[..150]
        .iter()
        .map(|w| write(&w.candidate, w.score / 100.0, w.as_of + 10_000))
        .collect();
    store
        .write_scores("x:1", TOP_N, 60_000, 2, &[("big", lowered)])
        .await
        .unwrap();
    check_split(&store, "big", 5000).await;
    let top = scores(&store, "big").await;
    assert!(
        top.iter()
            .all(|(c, _)| best[..150].iter().all(|w| &w.candidate != c)),
        "no lowered candidate stays in the top"
    );

    // Removing a top candidate promotes the best of the rest.
    let gone = top[0].0.clone();
    let rm = Event::Remove(PairRemove {
        member_id: "big".into(),
        candidate_id: gone.clone(),
        ts: 20,
    });
    store.apply(&[(&rm, 10_000)], TOP_N).await.unwrap();
    check_split(&store, "big", 4999).await;
    assert!(scores(&store, "big").await.iter().all(|(c, _)| *c != gone));
}

/// The top-N set and the rest are disjoint, hold `total` candidates between them, and the top is
/// exactly the N best of both in ZREVRANGE order (score, then member bytes, descending).
async fn check_split(store: &Store, member: &str, total: usize) {
    check_split_n(store, member, total, TOP_N).await
}

async fn check_split_n(store: &Store, member: &str, total: usize, n: usize) {
    let mut c = store.conn();
    let top = scores(store, member).await;
    let rest: Vec<(String, f64)> = c
        .zrevrange_withscores(store.keys().rest_scores(member), 0, -1)
        .await
        .unwrap();
    let mut all: Vec<(String, f64)> = top.iter().chain(&rest).cloned().collect();
    all.sort_by(|a, b| {
        b.1.total_cmp(&a.1)
            .then_with(|| b.0.as_bytes().cmp(a.0.as_bytes()))
    });
    assert_eq!(all.len(), total, "every scored candidate in one set");
    let mut names: Vec<&String> = all.iter().map(|(c, _)| c).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), total, "no candidate in both sets");
    assert_eq!(top.len(), n.min(total));
    assert_eq!(top, all[..top.len()].to_vec(), "the top is the N best");
}

#[tokio::test]
async fn equal_scores_split_at_the_boundary_as_zrevrange_orders_them() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let cands: Vec<String> = (0..150).map(|i| format!("c{i:03}")).collect();
    upsert_pairs(&store, "m", &cands).await;
    // Written in three calls, out of order, every score equal.
    for (round, part) in [(1, 100..150), (2, 0..50), (3, 50..100)] {
        let writes: Vec<ScoreWrite> = cands[part].iter().map(|c| write(c, 0.25, round)).collect();
        store
            .write_scores("x:1", TOP_N, 60_000, round, &[("m", writes)])
            .await
            .unwrap();
        check_split(
            &store,
            "m",
            if round == 1 { 50 } else { 50 * round as usize },
        )
        .await;
    }
    // Raise two candidates of the rest, lower two of the top, to the same new value.
    let writes = ["c000", "c001", "c149", "c148"]
        .iter()
        .map(|c| write(c, if c.starts_with("c00") { 0.5 } else { 0.1 }, 10))
        .collect();
    store
        .write_scores("x:1", TOP_N, 60_000, 10, &[("m", writes)])
        .await
        .unwrap();
    check_split(&store, "m", 150).await;
    let top = scores(&store, "m").await;
    assert_eq!(top[0].0, "c001");
    assert_eq!(top[1].0, "c000");
}

#[tokio::test]
async fn a_top_short_of_n_fills_up_in_order() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let cands: Vec<String> = (0..120).map(|i| format!("c{i:03}")).collect();
    upsert_pairs(&store, "m", &cands).await;
    // 99 high scores, then one call with a low new score first and a higher one after it.
    let writes: Vec<ScoreWrite> = cands[..99].iter().map(|c| write(c, 0.9, 1)).collect();
    store
        .write_scores("x:1", TOP_N, 60_000, 1, &[("m", writes)])
        .await
        .unwrap();
    let writes = vec![
        write("c100", 0.1, 2),
        write("c101", 0.2, 2),
        write("c102", 0.05, 2),
    ];
    store
        .write_scores("x:1", TOP_N, 60_000, 2, &[("m", writes)])
        .await
        .unwrap();
    check_split(&store, "m", 102).await;
    let top = scores(&store, "m").await;
    assert_eq!(top.last().map(|t| t.0.as_str()), Some("c101"));
}

#[tokio::test]
async fn random_writes_and_removals_keep_the_top_exact() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    const N: usize = 10;
    let cands: Vec<String> = (0..40).map(|i| format!("c{i:02}")).collect();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |k: u64| {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (seed >> 33) % k
    };
    let mut live: std::collections::BTreeSet<String> = Default::default();
    let mut scored: std::collections::BTreeSet<String> = Default::default();
    let mut ts = 100;
    for _ in 0..400 {
        ts += 1;
        let c = cands[next(40) as usize].clone();
        match next(10) {
            0 => {
                let rm = Event::Remove(PairRemove {
                    member_id: "m".into(),
                    candidate_id: c.clone(),
                    ts,
                });
                store.apply(&[(&rm, ts)], N).await.unwrap();
                live.remove(&c);
                scored.remove(&c);
            }
            1 | 2 if !live.contains(&c) => {
                let up = Event::Upsert(PairUpsert {
                    member_id: "m".into(),
                    candidate_id: c.clone(),
                    reason: "job_change".into(),
                    pair_features: FeatureMap::new(),
                    ts,
                });
                store.apply(&[(&up, ts)], N).await.unwrap();
                live.insert(c);
            }
            _ => {
                // A call of up to 6 scores (few distinct values, so ties happen), some lower.
                let k = 1 + next(6) as usize;
                let writes: Vec<ScoreWrite> = (0..k)
                    .map(|_| {
                        let c = &cands[next(40) as usize];
                        write(c, next(8) as f32 / 8.0, ts)
                    })
                    .collect();
                let flags = store
                    .write_scores("x:1", N, 60_000, ts, &[("m", writes.clone())])
                    .await
                    .unwrap();
                for (w, f) in writes.iter().zip(&flags[0]) {
                    assert_eq!(*f == WriteFlag::Written, live.contains(&w.candidate));
                    if *f == WriteFlag::Written {
                        scored.insert(w.candidate.clone());
                    }
                }
            }
        }
        check_split_n(&store, "m", scored.len(), N).await;
    }
    assert!(
        scored.len() > N,
        "the walk should leave more than N scored pairs"
    );
}

/// Member-wide calls that lower many top entries at once, and N raised and lowered between calls:
/// the top is exact after every call, and each call's flags say which scores it kept out.
#[tokio::test]
async fn member_wide_rewrites_and_a_changed_n_keep_the_top_exact() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let cands: Vec<String> = (0..60).map(|i| format!("c{i:02}")).collect();
    upsert_pairs(&store, "m", &cands[..50]).await;
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |k: u64| {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (seed >> 33) % k
    };
    let mut scored: std::collections::BTreeSet<String> = Default::default();
    let mut moved = 0;
    for step in 0..120i64 {
        // N steps between 8, 20 and 35; most calls rewrite most of the member, some few pairs.
        let n = [8, 20, 35][(step / 10 % 3) as usize];
        let k = if next(4) == 0 {
            1 + next(3)
        } else {
            30 + next(30)
        } as usize;
        let writes: Vec<ScoreWrite> = (0..k)
            .map(|_| {
                write(
                    &cands[next(60) as usize],
                    next(16) as f32 / 16.0,
                    100 + step,
                )
            })
            .collect();
        let before = scores(&store, "m").await;
        let flags = store
            .write_scores("x:1", n, 60_000, 100 + step, &[("m", writes.clone())])
            .await
            .unwrap();
        for (w, f) in writes.iter().zip(&flags[0]) {
            // Candidates 50..59 were never stored: gone; the rest written (as_of only grows).
            let stored = w.candidate.as_str() < "c50";
            assert_eq!(*f == WriteFlag::Gone, !stored, "{}", w.candidate);
            assert_eq!(*f == WriteFlag::Written, stored, "{}", w.candidate);
            if stored {
                scored.insert(w.candidate.clone());
            }
        }
        check_split_n(&store, "m", scored.len(), n).await;
        let after = scores(&store, "m").await;
        moved += after.iter().filter(|e| !before.contains(e)).count();
    }
    assert!(
        moved > 500,
        "the walk should reorder the top often ({moved})"
    );
}

/// A call with one stale score among written ones flags exactly that one.
#[tokio::test]
async fn only_scores_kept_out_are_flagged() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let cands: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    upsert_pairs(&store, "m", &cands).await;
    store
        .write_scores(
            "x:1",
            TOP_N,
            60_000,
            50,
            &[("m", vec![write("c2", 0.5, 50)])],
        )
        .await
        .unwrap();
    let writes = vec![
        write("c0", 0.1, 40),
        write("c1", 0.2, 40),
        write("c2", 0.3, 40),
        write("gone", 0.4, 40),
        write("c4", 0.6, 40),
    ];
    let flags = store
        .write_scores("x:1", TOP_N, 60_000, 60, &[("m", writes)])
        .await
        .unwrap();
    assert_eq!(
        flags[0],
        vec![
            WriteFlag::Written,
            WriteFlag::Written,
            WriteFlag::Superseded(50),
            WriteFlag::Gone,
            WriteFlag::Written,
        ]
    );
    check_split(&store, "m", 4).await;
}

#[tokio::test]
async fn ttls_are_set_on_creation_and_again_once_a_64th_of_the_ttl_has_passed() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let cands: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    upsert_pairs(&store, "m", &cands).await;
    let ttl: u64 = 6_400_000; // a 64th: 100 s
    let (top, rest, meta) = (
        store.keys().scores("m"),
        store.keys().rest_scores("m"),
        store.keys().meta("m"),
    );
    let mut c = store.conn();
    let pttl = |k: String| {
        let mut c = store.conn();
        async move { c.pttl::<_, i64>(k).await.unwrap() }
    };
    store
        .write_scores("x:1", 2, ttl, 1_000, &[("m", vec![write("a", 0.5, 1)])])
        .await
        .unwrap();
    assert!(pttl(top.clone()).await > 6_300_000);
    assert!(pttl(meta.clone()).await > 6_300_000);
    let set_at: String = c.hget(&meta, "ttl_set_at").await.unwrap();
    assert_eq!(set_at, "1000");

    // 50 s later (worker clock): no refresh, but the rest set made now gets the time left.
    let _: () = c.pexpire(&top, 5_000_000).await.unwrap();
    store
        .write_scores(
            "x:1",
            2,
            ttl,
            51_000,
            &[("m", vec![write("b", 0.4, 2), write("c", 0.3, 2)])],
        )
        .await
        .unwrap();
    assert!(pttl(top.clone()).await <= 5_000_000, "not refreshed yet");
    let rest_ttl = pttl(rest.clone()).await;
    assert!(
        rest_ttl > 6_300_000 && rest_ttl <= 6_350_000,
        "the rest set expires with the others: {rest_ttl}"
    );
    let set_at: String = c.hget(&meta, "ttl_set_at").await.unwrap();
    assert_eq!(set_at, "1000");

    // 200 s after the last refresh: every key's TTL is set again.
    store
        .write_scores("x:1", 2, ttl, 201_000, &[("m", vec![write("a", 0.6, 3)])])
        .await
        .unwrap();
    for k in [&top, &rest, &meta] {
        assert!(pttl(k.clone()).await > 6_300_000, "{k} refreshed");
    }
    let set_at: String = c.hget(&meta, "ttl_set_at").await.unwrap();
    assert_eq!(set_at, "201000");
}

#[tokio::test]
async fn reverse_index_changes_applied_out_of_order_leave_the_newest() {
    // On a cluster the reverse-index changes of one apply run concurrently, so a pair's removal
    // may reach Redis before its upsert: the script keeps the newest by (ts, offset).
    let redis = RedisServer::start();
    let mut c = redis.client();
    let script = redis::Script::new(include_str!("../src/store/rev.lua"));
    let keys = Keys::new("t", 4);
    let run = |c: &mut redis::Connection, member: &str, ts: i64, offset: i64, op: &str| -> i64 {
        script
            .key(keys.reverse("c1"))
            .key(keys.reverse_versions("c1"))
            .arg(member)
            .arg(ts)
            .arg(offset)
            .arg(op)
            .invoke(c)
            .unwrap()
    };
    // Removal (ts 20) first, then the older upsert (ts 10): the member stays out.
    assert_eq!(run(&mut c, "m1", 20, 5, "rem"), 1);
    assert_eq!(run(&mut c, "m1", 10, 4, "add"), 0);
    // Upsert (ts 30) first, then an older removal: the member stays in.
    assert_eq!(run(&mut c, "m2", 30, 7, "add"), 1);
    assert_eq!(run(&mut c, "m2", 25, 6, "rem"), 0);
    // Equal ts: the later offset wins; a replay of the same change applies again.
    assert_eq!(run(&mut c, "m3", 40, 9, "add"), 1);
    assert_eq!(run(&mut c, "m3", 40, 8, "rem"), 0);
    assert_eq!(run(&mut c, "m3", 40, 9, "add"), 1);
    let mut members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys.reverse("c1"))
        .query(&mut c)
        .unwrap();
    members.sort();
    assert_eq!(members, vec!["m2".to_string(), "m3".to_string()]);
}

#[tokio::test]
async fn a_fanout_intent_is_cleared_only_by_a_run_that_covered_its_offset() {
    // A second update with the same ts arrives after the first fan-out started: that run
    // covered offset 10 only, so its clear must leave the intent for the follow-up run.
    let redis = RedisServer::start();
    let store = store(&redis).await;
    store
        .fanout_intents(true, &[(0, "c", 200, 10)])
        .await
        .unwrap();
    store
        .fanout_intents(true, &[(0, "c", 200, 12)])
        .await
        .unwrap();
    store
        .fanout_intents(false, &[(0, "c", 0, 10)])
        .await
        .unwrap();
    assert_eq!(
        store.fanout_intents_of(0).await.unwrap(),
        vec![("c".to_string(), 200, 12)]
    );
    // An older update recorded later keeps the larger as_of and offset.
    store
        .fanout_intents(true, &[(0, "c", 150, 11)])
        .await
        .unwrap();
    assert_eq!(
        store.fanout_intents_of(0).await.unwrap(),
        vec![("c".to_string(), 200, 12)]
    );
    store
        .fanout_intents(false, &[(0, "c", 0, 12)])
        .await
        .unwrap();
    assert!(store.fanout_intents_of(0).await.unwrap().is_empty());
}
