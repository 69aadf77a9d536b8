//! Owned state (`state.mode = "owned"`): the central guarantee with each member's state held in
//! memory by the owner of its partition and written behind, under misrouted messages, replays,
//! eviction, two workers, and a zombie owner.

mod common;

use std::time::Duration;

use common::harness::Harness;
use common::scenario::{Ev, Scenario};
use common::services::Engine;
use rescorer::config::{Settings, StateMode};
use rescorer::owned::route::partition_of;
use rescorer::store::{Keys, Loaded, MemberKey, MemberWrite, Store, WriteOp};

const T0: i64 = 1_764_000_000_000;

fn owned(h: &Harness) -> Settings {
    let mut s = h.settings.clone();
    s.state.mode = StateMode::Owned;
    s
}

/// Sends the scenario's events; every `misroute`-th member event goes to a partition that does
/// not own its member (as an explicit partition, or a producer keyed otherwise would).
async fn send_misrouting(h: &Harness, s: &Scenario, misroute: usize) -> usize {
    let (f, p) = (
        h.settings.topics.feature_updates.clone(),
        h.settings.topics.new_candidates.clone(),
    );
    let mut misrouted = 0;
    for (i, ev) in s.events.iter().enumerate() {
        let (topic, key, value) = match ev {
            Ev::Feature(k, v) => (&f, k, v),
            Ev::Pair(k, v) => (&p, k, v),
        };
        let is_member = value.get("member_id").is_some() || value["entity"] == "member";
        let partition = if is_member && i % misroute == 0 {
            misrouted += 1;
            Some((partition_of(key, h.partitions) + 1) % h.partitions)
        } else {
            None
        };
        let bytes = value.to_string();
        h.send_raw(topic, Some(key), Some(bytes.as_bytes()), partition)
            .await;
    }
    misrouted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_state_is_exact_with_misrouted_messages_and_a_replay_reproduces_it() {
    let h = Harness::new(4).await;
    let scorer = common::scorer();
    let s = Scenario::generate(21, 400, 10, 12, T0);
    let mut settings = owned(&h);
    settings.batch.max_pairs = 16;
    let w = h.start_worker_with(settings.clone()).await;
    let misrouted = send_misrouting(&h, &s, 7).await;
    assert!(misrouted > 20, "{misrouted}");
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    s.check(&h, &scorer, t);
    let text = w.metrics.render();
    assert!(
        text.lines()
            .any(|l| l.contains("outcome=\"forwarded\"") && !l.ends_with(" 0")),
        "misrouted messages were forwarded: {text}"
    );
    let first = h.output_snapshot();
    w.stop().await.unwrap();

    // Replay into an empty Redis with other batching: the same output.
    redis::cmd("FLUSHALL")
        .query::<()>(&mut h.redis.client())
        .unwrap();
    settings.kafka.group_id = format!("{}-replay", settings.kafka.group_id);
    settings.batch.max_pairs = 1024;
    let group = settings.kafka.group_id.clone();
    let w = h.start_worker_with(settings).await;
    h.wait_consumed_by(&group).await;
    h.tick(t).await;
    h.wait_consumed_by(&group).await;
    s.check(&h, &scorer, t);
    assert_eq!(h.output_snapshot(), first, "a replay reproduces the scores");
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_smaller_than_the_state_evicts_and_reads_back_to_the_same_scores() {
    let h = Harness::new(2).await;
    let scorer = common::scorer();
    let s = Scenario::generate(22, 400, 16, 10, T0);
    let mut settings = owned(&h);
    settings.state.cache_bytes = 1; // every written member is evicted at once
    settings.batch.max_pairs = 8;
    let w = h.start_worker_with(settings).await;
    s.send(&h, 0..s.events.len()).await;
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    s.check(&h, &scorer, t);
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_owned_workers_split_the_partitions_and_the_survivor_finishes() {
    let h = Harness::with_engine(Engine::Sqlite, 4).await;
    let scorer = common::scorer();
    let s = Scenario::generate(23, 300, 12, 10, T0);
    let a = h.start_worker_with(owned(&h)).await;
    let b = h.start_worker_with(owned(&h)).await;
    let assigned = |w: &common::harness::WorkerHandle| w.metrics.assigned_partitions.get();
    let until = std::time::Instant::now() + Duration::from_secs(60);
    // 4 topics (three inputs and the requests) × 4 partitions.
    while !(assigned(&a) > 0 && assigned(&b) > 0 && assigned(&a) + assigned(&b) == 16) {
        assert!(std::time::Instant::now() < until, "the group did not split");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.send_batched(&h, 0..150).await;
    h.wait_consumed().await;
    let scored = |w: &common::harness::WorkerHandle| w.metrics.pairs_scored_total.get();
    assert!(scored(&a) > 0 && scored(&b) > 0, "both workers scored");
    let rest = s.send_batched(&h, 150..s.events.len());
    let (stopped, ()) = tokio::join!(a.stop(), rest);
    stopped.unwrap();
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    s.check(&h, &scorer, t);
    b.stop().await.unwrap();
}

fn member_write(generation: u64, score: &str) -> MemberWrite {
    MemberWrite {
        member: "m1".into(),
        partition: 3,
        generation,
        ops: vec![WriteOp {
            key: MemberKey::Top,
            cmd: "ZADD",
            args: vec![score.into(), "c1".into()],
        }],
    }
}

/// A store connected by URL: fenced transactions on a single Redis.
async fn transactional_store(redis: &common::services::RedisServer, prefix: &str) -> Store {
    Store::connect(
        &redis.url(),
        false,
        Duration::from_secs(2),
        None,
        Keys::new(prefix, 1),
    )
    .await
    .unwrap()
}

fn top_of(redis: &common::services::RedisServer, store: &Store) -> Vec<(String, f64)> {
    top_of_member(redis, store, "m1")
}

fn top_of_member(
    redis: &common::services::RedisServer,
    store: &Store,
    member: &str,
) -> Vec<(String, f64)> {
    redis::cmd("ZRANGE")
        .arg(store.keys().scores(member))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut redis.client())
        .unwrap()
}

/// The cluster's fence, on real Redis (per-member fenced script calls, as on a cluster, where a
/// write must stay in one slot): once a later owner has loaded a member, an earlier owner's write
/// is refused whole, and loading it again tells the earlier owner who has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_owner_cannot_write_a_member_a_later_owner_has_loaded() {
    let redis = common::services::RedisServer::start();
    let conn = rescorer::store::connect(&redis.url(), false, Duration::from_secs(2))
        .await
        .unwrap();
    // Not connected by URL: the per-member scripts, as a cluster uses them.
    let store = Store::new(conn, Keys::new("fence", 1));
    assert!(!store.transactional());
    store.load_scripts().await.unwrap();
    let tx = store.tx_conn();
    let old = store.take_generation(3).await.unwrap();
    let new = store.take_generation(3).await.unwrap();
    assert!(new > old);
    assert!(matches!(
        &store.load_owned(&[("m1", old)]).await.unwrap()[0],
        Loaded::Taken(_)
    ));
    let write = |g: u64, s: &'static str| {
        let (store, tx) = (store.clone(), tx.clone());
        async move {
            store
                .write_owned(&tx, &[(3, g)], &[member_write(g, s)], &[], &[])
                .await
        }
    };
    assert_eq!(write(old, "1").await.unwrap(), [true]);
    // The new owner loads the member: from now on the old one is a zombie for it.
    assert!(matches!(
        &store.load_owned(&[("m1", new)]).await.unwrap()[0],
        Loaded::Taken(l) if l.top == [("c1".to_owned(), 1.0)]
    ));
    assert_eq!(write(old, "9").await.unwrap(), [false]);
    assert_eq!(write(new, "2").await.unwrap(), [true]);
    assert!(matches!(
        &store.load_owned(&[("m1", old)]).await.unwrap()[0],
        Loaded::Fenced(g) if *g == new
    ));
    assert_eq!(
        top_of(&redis, &store),
        [("c1".to_owned(), 2.0)],
        "the zombie's write left no trace"
    );
}

/// A single Redis's fence, on real Redis: a window is one transaction watched on the partition's
/// generation; once a later owner has taken the generation, an earlier owner's window is refused
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_owners_transaction_is_refused_once_a_later_owner_took_the_partition() {
    let redis = common::services::RedisServer::start();
    let store = transactional_store(&redis, "fence").await;
    assert!(store.transactional());
    let (tx, other) = (store.tx_conn(), store.tx_conn());
    let old = store.take_generation(3).await.unwrap();
    let write = |tx: &rescorer::store::TxConn, g, s| {
        let (store, tx) = (store.clone(), tx.clone());
        async move {
            store
                .write_owned(
                    &tx,
                    &[(3, g)],
                    &[member_write(g, s)],
                    &[(3, "m1", 100)],
                    &[],
                )
                .await
                .unwrap()
        }
    };
    assert_eq!(write(&tx, old, "1").await, [true]);
    let new = store.take_generation(3).await.unwrap();
    assert_eq!(
        write(&tx, old, "9").await,
        [false],
        "the old generation is refused"
    );
    assert_eq!(write(&other, new, "2").await, [true]);
    assert_eq!(
        top_of(&redis, &store),
        [("c1".to_owned(), 2.0)],
        "the zombie's write left no trace"
    );
    // The reverse index's transactions are fenced the same way: after another owner's INCR,
    // nothing of the earlier generation's change is applied.
    let r = store
        .rev_and_features(&tx, &[(3, new)], &[("c1", "m1", 1, 1, true)])
        .await
        .unwrap();
    assert!(r.is_ok(), "the current owner's change applies");
    store.take_generation(3).await.unwrap();
    let r = store
        .rev_and_features(&tx, &[(3, new)], &[("c2", "m1", 1, 1, true)])
        .await
        .unwrap();
    assert_eq!(r, Err(vec![3]));
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(store.keys().reverse("c2"))
        .query(&mut redis.client())
        .unwrap();
    assert!(
        members.is_empty(),
        "nothing of a refused transaction is applied"
    );
}

/// A window's write larger than one transaction's worth of commands goes out as several fenced
/// transactions: all of it lands for the owner, and none of it for a zombie once a later owner
/// took the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_of_several_transactions_lands_whole_and_a_zombies_is_refused_whole() {
    let redis = common::services::RedisServer::start();
    let store = transactional_store(&redis, "chunks").await;
    let tx = store.tx_conn();
    let writes = |g: u64, score: &str| -> Vec<MemberWrite> {
        (0..5000)
            .map(|i| MemberWrite {
                member: format!("m{i}"),
                partition: 3,
                generation: g,
                ops: vec![WriteOp {
                    key: MemberKey::Top,
                    cmd: "ZADD",
                    args: vec![score.into(), "c1".into()],
                }],
            })
            .collect()
    };
    let top = |m: &str| top_of_member(&redis, &store, m);
    let old = store.take_generation(3).await.unwrap();
    let w = writes(old, "1");
    let flags = store
        .write_owned(&tx, &[(3, old)], &w, &[(3, "m4999", 100)], &[])
        .await
        .unwrap();
    assert!(flags.iter().all(|f| *f) && flags.len() == 5000);
    for m in ["m0", "m2500", "m4999"] {
        assert_eq!(top(m), [("c1".to_owned(), 1.0)], "{m} written");
    }
    let due: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(store.keys().partition_due(3))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut redis.client())
        .unwrap();
    assert_eq!(due, [("m4999".to_owned(), 100.0)], "the schedule too");
    store.take_generation(3).await.unwrap();
    let flags = store
        .write_owned(&tx, &[(3, old)], &writes(old, "9"), &[], &[])
        .await
        .unwrap();
    assert!(flags.iter().all(|f| !*f), "the zombie's write is refused");
    for m in ["m0", "m2500", "m4999"] {
        assert_eq!(top(m), [("c1".to_owned(), 1.0)], "{m} left as it was");
    }
}

/// A worker paused past its session timeout (as a long GC-like pause would) loses its partitions
/// without knowing; resumed, it still holds members and a window it was writing, and writes with
/// its old generation: every write for a member the new owner has touched is refused, it drops
/// those partitions, rejoins, and the final state is exact. To pause it with a write in flight,
/// Redis is frozen first (its writes and loads time out and retry), then the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_resumed_as_a_zombie_leaves_the_exact_final_state() {
    let mut h = Harness::with_engine(Engine::Sqlite, 2).await;
    h.settings.state.mode = StateMode::Owned;
    let scorer = common::scorer();
    let s = Scenario::generate(26, 1200, 6, 10, T0);
    let logs = tempfile::tempdir().unwrap();
    let sets: Vec<String> = vec![
        "kafka.options.session.timeout.ms=\"3000\"".into(),
        "kafka.options.heartbeat.interval.ms=\"300\"".into(),
        "kafka.options.auto.commit.interval.ms=\"100\"".into(),
        "batch.max_pairs=8".into(),
    ];
    let mut a =
        common::process::WorkerProcess::spawn(&h.settings, &sets, &logs.path().join("a.log"));
    s.send_batched(&h, 0..300).await;
    a.wait_consuming(Duration::from_secs(60)).await;
    // Paused with more taken in than written: Redis freezes under a burst, then the worker.
    s.send_batched(&h, 300..900).await;
    h.redis.signal("STOP");
    tokio::time::sleep(Duration::from_millis(700)).await;
    a.signal("STOP");
    h.redis.signal("CONT");
    let mut b =
        common::process::WorkerProcess::spawn(&h.settings, &sets, &logs.path().join("b.log"));
    b.wait_consuming(Duration::from_secs(60)).await;
    // The new owner has taken over and touched the members; then the zombie wakes up.
    h.wait_consumed().await;
    s.send_batched(&h, 900..1000).await;
    a.signal("CONT");
    s.send_batched(&h, 1000..s.events.len()).await;
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;
    a.assert_running();
    b.assert_running();
    let fenced = a.log().contains("a later owner has taken this partition");
    eprintln!("the resumed worker was fenced: {fenced}");
    s.check(&h, &scorer, t);
    assert!(
        fenced,
        "the resumed worker wrote nothing a later owner had touched: the drill missed its case; its log ends:\n{}",
        a.log_tail()
    );
}

/// A member with no event for `decay.active_horizon_secs` is no longer decayed: a tick takes its
/// pairs off the schedule without rescoring them (so its output's TTL can run out), and its next
/// event rescores every pair and schedules them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dormant_member_leaves_the_schedule_and_its_next_event_rescores_it_whole() {
    let h = Harness::new(2).await;
    let mut settings = owned(&h);
    settings.decay.active_horizon_secs = 2 * 86_400;
    let w = h.start_worker_with(settings).await;
    let hour = 3_600_000;
    for c in ["c1", "c2"] {
        h.upsert("m1", c, "job_change", serde_json::json!({}), T0)
            .await;
    }
    h.upsert(
        "m2",
        "c1",
        "job_change",
        serde_json::json!({}),
        T0 + 70 * hour,
    )
    .await;
    h.wait_consumed().await;
    let k = h.keys();
    let p = partition_of("m1", h.partitions);
    let scheduled = |m: &str| -> usize {
        let due: Vec<String> = redis::cmd("ZRANGE")
            .arg(k.partition_due(partition_of(m, h.partitions)))
            .arg(0)
            .arg(-1)
            .query(&mut h.redis.client())
            .unwrap();
        // One entry per member, at its earliest due pair.
        due.iter().filter(|e| *e == m).count()
    };
    let as_of = |m: &str| h.meta(m).get("as_of").cloned().unwrap_or_default();
    assert_eq!(scheduled("m1"), 1);
    // Within the horizon (2 days after its last event): decayed as usual.
    h.tick(T0 + 25 * hour).await;
    h.wait_consumed().await;
    assert_eq!(as_of("m1"), (T0 + 25 * hour).to_string());
    // Three days after: dormant, not rescored, off the schedule; m2 is active and decayed.
    h.tick(T0 + 72 * hour).await;
    h.wait_consumed().await;
    assert_eq!(as_of("m1"), (T0 + 25 * hour).to_string(), "not rescored");
    assert_eq!(scheduled("m1"), 0, "off the schedule (partition {p})");
    assert_eq!(as_of("m2"), (T0 + 72 * hour).to_string());
    assert_eq!(scheduled("m2"), 1);
    // Its next event rescores all of its pairs and schedules them again.
    h.upsert(
        "m1",
        "c3",
        "job_change",
        serde_json::json!({}),
        T0 + 73 * hour,
    )
    .await;
    h.wait_consumed().await;
    assert_eq!(as_of("m1"), (T0 + 73 * hour).to_string());
    let asof: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(k.scored_as_of("m1"))
        .query(&mut h.redis.client())
        .unwrap();
    for c in ["c1", "c2", "c3"] {
        assert_eq!(asof[c], (T0 + 73 * hour).to_string(), "{c}");
    }
    assert_eq!(scheduled("m1"), 1);
    w.stop().await.unwrap();
}
