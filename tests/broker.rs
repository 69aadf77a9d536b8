//! The test broker itself: what the worker's crash, restart and rebalance tests rely on it for.

mod common;

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use common::services::{Broker, Engine};

/// The engine the crash, restart and rebalance tests run on.
const CRASH_TESTS_ENGINE: Engine = Engine::Sqlite;

/// A consumer that resumes inside a record batch (a committed offset after a crash, a restart,
/// a rebalance) gets the rest of that batch, as from Kafka. 100 records go to one partition in
/// one batch; a consumer assigned at offset 25 must receive offsets 25 to 99.
///
/// If this fails, the broker is at fault, not the worker: the worker's crash and rebalance
/// tests would then lose records inside the broker. tansu 0.6.0's memory engine fails it (it
/// answers a fetch inside a batch with nothing from that batch); its SQLite engine passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_from_inside_a_record_batch_returns_the_rest_of_the_batch() {
    let broker = Broker::start_with(CRASH_TESTS_ENGINE);
    let topic = format!("one-batch-{:x}", rand::random::<u64>());
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .expect("admin client");
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topics");
    assert!(created.iter().all(Result::is_ok), "{created:?}");

    // Every record queued at once with a long linger: one produce request, one batch.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("linger.ms", "500")
        .create()
        .expect("producer");
    let sends = (0..100).map(|i| {
        let (topic, value) = (&topic, format!("record {i}"));
        let producer = &producer;
        async move {
            let rec = FutureRecord::to(topic)
                .partition(0)
                .key("k")
                .payload(value.as_bytes());
            producer
                .send(rec, Duration::from_secs(10))
                .await
                .expect("delivered")
                .offset
        }
    });
    let offsets = futures::future::join_all(sends).await;
    assert_eq!(offsets, (0..100).collect::<Vec<i64>>());

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", format!("one-batch-reader-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(25))
        .unwrap();
    consumer.assign(&tpl).expect("assign");
    let mut got = Vec::new();
    let until = Instant::now() + Duration::from_secs(20);
    while got.len() < 75 && Instant::now() < until {
        if let Some(m) = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(200))) {
            got.push(m.expect("consumed").offset());
        }
    }
    assert_eq!(
        got,
        (25..100).collect::<Vec<i64>>(),
        "a consumer assigned at offset 25 of a 100-record batch must receive offsets 25 to 99 \
         (the broker's {:?} engine lost records; the worker is not at fault)",
        broker.engine
    );
}
