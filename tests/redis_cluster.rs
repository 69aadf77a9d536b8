//! Redis Cluster with replicas: ids whose braces would break hash tags, and a failover during
//! traffic. The final scores must equal the model's scores of the final state, as on one node.

mod common;

use std::time::{Duration, Instant};

use common::harness::Harness;
use common::scenario::Scenario;

const T0: i64 = 1_764_000_000_000;

/// Ids that are valid (1–128 bytes) and full of hash-tag syntax.
const MEMBERS: &[&str] = &["}x", "{", "}", "{}", "a}b", "{m}", "}}{", "plain"];
const CANDIDATES: &[&str] = &["}c", "{c", "c}", "{}c", "}{", "{c}", "}", "c7"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_with_braces_and_a_failover_during_traffic_end_with_exact_scores() {
    let h = Harness::new(2).await;
    let cluster = common::services::RedisCluster::start_with_replicas(1);
    let scorer = common::scorer();
    let s = Scenario::generate(21, 240, MEMBERS.len(), CANDIDATES.len(), T0)
        .with_ids(MEMBERS, CANDIDATES);
    let mut settings = h.settings.clone();
    settings.redis.url = cluster.url();
    settings.redis.cluster = true;
    let w = h.start_worker_with(settings).await;
    s.send(&h, 0..120).await;
    h.wait_consumed().await;

    // A manual failover: a replica takes over its primary's slots while events keep coming.
    let replica = cluster.replicas()[0];
    let ok: String = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query(&mut cluster.node(replica))
        .expect("CLUSTER FAILOVER on a replica");
    assert_eq!(ok, "OK");
    let sending = s.send(&h, 120..s.events.len());
    let until = Instant::now() + Duration::from_secs(30);
    let promoted = async {
        while !cluster.replicas().iter().all(|p| *p != replica) {
            assert!(Instant::now() < until, "the replica was not promoted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::join!(sending, promoted);
    h.wait_consumed().await;
    let t = s.final_tick();
    h.tick(t).await;
    h.wait_consumed().await;

    s.check_in(&mut cluster.client(), &h.keys(), &scorer, t);
    assert_eq!(w.http_get("/healthz").await.0, 200);
    w.stop().await.unwrap();
}
