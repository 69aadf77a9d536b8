//! One test's world: a broker, a `redis-server`, random topic names, group id and key prefix,
//! producers, and workers started in-process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use rdkafka::{Offset, TopicPartitionList};
use redis::Commands;
use rescorer::config::Settings;
use rescorer::metrics::Metrics;
use tokio_util::sync::CancellationToken;

use super::services::{free_port, Broker, Engine, RedisServer};

pub struct Harness {
    pub broker: Broker,
    pub redis: RedisServer,
    pub settings: Settings,
    /// One record per batch (`linger.ms=0`, each send awaited): exact, step-by-step tests.
    pub producer: FutureProducer,
    /// Batches as production producers do (`linger.ms=5`, sends in flight together), so
    /// commits and resumes land inside record batches: [`Harness::send_batched`].
    pub batching: FutureProducer,
    pub partitions: i32,
    /// One past the highest offset produced, per (topic, partition).
    produced: Mutex<HashMap<(String, i32), i64>>,
}

/// A worker running in this process.
pub struct WorkerHandle {
    pub token: CancellationToken,
    pub join: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub metrics: Metrics,
    pub http: SocketAddr,
}

impl WorkerHandle {
    /// Graceful stop (as on SIGTERM); returns the worker's result.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.join)
            .await
            .expect("worker drains within 30 s")
            .expect("worker task did not panic")
    }

    pub async fn http_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.http)
            .await
            .expect("http connects");
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        let status = buf[9..12].parse().unwrap();
        let body = buf
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }
}

fn suffix() -> String {
    let n: u64 = rand::rng().random();
    format!("{n:x}")
}

impl Harness {
    /// Starts the services (the broker on its memory engine) and creates the four topics with
    /// `partitions` partitions each.
    pub async fn new(partitions: i32) -> Self {
        Self::with_engine(Engine::Memory, partitions).await
    }

    /// Same, on the broker engine given: `Engine::Sqlite` for tests that kill, restart or
    /// rebalance a worker (see [`Engine`]).
    pub async fn with_engine(engine: Engine, partitions: i32) -> Self {
        Self::with_services(Broker::start_with(engine), RedisServer::start(), partitions).await
    }

    /// Same, with this `redis-server` (TLS, a password) as `settings.redis`.
    pub async fn with_redis(partitions: i32, redis: RedisServer) -> Self {
        Self::with_services(Broker::start(), redis, partitions).await
    }

    async fn with_services(broker: Broker, redis: RedisServer, partitions: i32) -> Self {
        let id = suffix();
        let mut settings = Settings::default();
        settings.kafka.bootstrap_servers = broker.bootstrap.clone();
        settings.kafka.group_id = format!("rescorer-test-{id}");
        settings.topics.feature_updates = format!("features-{id}");
        settings.topics.new_candidates = format!("candidates-{id}");
        settings.topics.decay_ticks = format!("ticks-{id}");
        settings.topics.dlq = format!("dlq-{id}");
        settings.topics.rescore_requests = format!("requests-{id}");
        settings.redis.url = redis.url();
        settings.redis.timeout_ms = 500;
        settings.output.key_prefix = format!("t{id}");
        settings.model.spec = super::model_spec();
        settings.batch.max_wait_ms = 10;
        settings.decay.shards = 4;
        // RESCORER_TEST_STATE_MODE=owned|remote runs the suite on that state mode.
        if let Ok(mode) = std::env::var("RESCORER_TEST_STATE_MODE") {
            settings.state.mode = match mode.as_str() {
                "owned" => rescorer::config::StateMode::Owned,
                "remote" => rescorer::config::StateMode::Remote,
                other => panic!("RESCORER_TEST_STATE_MODE={other}: owned or remote"),
            };
        }
        rescorer::bench::create_topics(&settings, partitions)
            .await
            .expect("topics created");
        // Keyed by entity id with the Java client's partitioner, as topics/README.md asks.
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &broker.bootstrap)
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "0")
            .create()
            .expect("producer");
        let batching = ClientConfig::new()
            .set("bootstrap.servers", &broker.bootstrap)
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .create()
            .expect("batching producer");
        Self {
            broker,
            redis,
            settings,
            producer,
            batching,
            partitions,
            produced: Mutex::new(HashMap::new()),
        }
    }

    /// Produces one message (value and key as given) and waits for the broker's acknowledgement.
    pub async fn send_raw(
        &self,
        topic: &str,
        key: Option<&str>,
        value: Option<&[u8]>,
        partition: Option<i32>,
    ) {
        let mut rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        self.deliver(topic, rec).await;
    }

    /// Produces one message with this Kafka timestamp (ms) and waits for the acknowledgement.
    pub async fn send_stamped(&self, topic: &str, key: &str, value: serde_json::Value, ts: i64) {
        let payload = value.to_string();
        let rec = FutureRecord::to(topic)
            .key(key)
            .payload(payload.as_bytes())
            .timestamp(ts);
        self.deliver(topic, rec).await;
    }

    /// Produces (topic, key, value) records through the batching producer, all in flight at
    /// once (each is queued when first polled, and `join_all` polls them in order), and waits
    /// for every acknowledgement. Records of one partition share batches of up to thousands.
    pub async fn send_batched(&self, records: &[(String, String, String)]) {
        let sends = records.iter().map(|(topic, key, value)| async move {
            let rec = FutureRecord::to(topic)
                .key(key.as_str())
                .payload(value.as_bytes());
            self.deliver_via(&self.batching, topic, rec).await
        });
        futures::future::join_all(sends).await;
    }

    /// Sends a record, waits for the broker's acknowledgement and notes the offset produced.
    async fn deliver(&self, topic: &str, rec: FutureRecord<'_, str, [u8]>) {
        self.deliver_via(&self.producer, topic, rec).await
    }

    /// Same, through another producer (e.g. one that compresses or batches).
    pub async fn deliver_via(
        &self,
        producer: &FutureProducer,
        topic: &str,
        rec: FutureRecord<'_, str, [u8]>,
    ) {
        let delivery = producer
            .send(rec, Duration::from_secs(30))
            .await
            .expect("delivered");
        let mut produced = self.produced.lock().unwrap();
        let e = produced
            .entry((topic.to_owned(), delivery.partition))
            .or_insert(0);
        *e = (*e).max(delivery.offset + 1);
    }

    pub async fn send(&self, topic: &str, key: &str, value: serde_json::Value) {
        self.send_raw(topic, Some(key), Some(value.to_string().as_bytes()), None)
            .await;
    }

    pub async fn feature(&self, entity: &str, id: &str, features: serde_json::Value, ts: i64) {
        let v = serde_json::json!({"entity": entity, "id": id, "features": features, "ts": ts});
        self.send(&self.settings.topics.feature_updates.clone(), id, v)
            .await;
    }

    pub async fn upsert(
        &self,
        member: &str,
        cand: &str,
        reason: &str,
        pf: serde_json::Value,
        ts: i64,
    ) {
        let v = serde_json::json!({"member_id": member, "candidate_id": cand, "reason": reason,
            "pair_features": pf, "ts": ts});
        self.send(&self.settings.topics.new_candidates.clone(), member, v)
            .await;
    }

    pub async fn remove(&self, member: &str, cand: &str, ts: i64) {
        let v = serde_json::json!({"member_id": member, "candidate_id": cand, "op": "remove", "ts": ts});
        self.send(&self.settings.topics.new_candidates.clone(), member, v)
            .await;
    }

    /// One tick to every partition of the ticks topic, published by `rescorer tick`'s code.
    pub async fn tick(&self, ts: i64) {
        let n = rescorer::tick::publish(&self.settings, &self.producer, ts)
            .await
            .expect("tick published");
        assert_eq!(n as i32, self.partitions);
        let topic = self.settings.topics.decay_ticks.clone();
        let mut produced = self.produced.lock().unwrap();
        for p in 0..self.partitions {
            *produced.entry((topic.clone(), p)).or_insert(0) += 1;
        }
    }

    /// Starts a worker with these settings.
    pub async fn start_worker_with(&self, mut settings: Settings) -> WorkerHandle {
        let port = free_port();
        settings.http.listen = format!("127.0.0.1:{port}");
        let metrics = Metrics::new();
        let token = CancellationToken::new();
        let join = tokio::spawn(rescorer::app::run_worker(
            settings,
            metrics.clone(),
            token.clone(),
        ));
        let http: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(http).await.is_err() {
            assert!(Instant::now() < until, "worker http did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        WorkerHandle {
            token,
            join,
            metrics,
            http,
        }
    }

    pub async fn start_worker(&self) -> WorkerHandle {
        self.start_worker_with(self.settings.clone()).await
    }

    /// Waits until the group has committed every message produced so far (everything consumed,
    /// applied and acknowledged by Redis).
    pub async fn wait_consumed(&self) {
        self.wait_consumed_by(&self.settings.kafka.group_id.clone())
            .await;
    }

    /// One past the highest offset produced so far, per (topic, partition).
    pub fn produced(&self) -> HashMap<(String, i32), i64> {
        self.produced.lock().unwrap().clone()
    }

    /// A client that reads the group's committed offsets ([`Harness::committed_with`]).
    pub fn offset_reader(&self) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.broker.bootstrap)
            .set("group.id", &self.settings.kafka.group_id)
            .create()
            .expect("offset reader")
    }

    /// The group's committed offset of each input topic's partitions (absent: none committed).
    pub async fn committed(&self) -> HashMap<(String, i32), i64> {
        self.committed_with(&self.offset_reader()).await
    }

    /// Same, through a reader from [`Harness::offset_reader`].
    pub async fn committed_with(&self, consumer: &BaseConsumer) -> HashMap<(String, i32), i64> {
        let t = &self.settings.topics;
        let mut tpl = TopicPartitionList::new();
        for topic in [&t.feature_updates, &t.new_candidates, &t.decay_ticks] {
            for p in 0..self.partitions {
                tpl.add_partition(topic, p);
            }
        }
        let committed = tokio::task::block_in_place(|| {
            consumer.committed_offsets(tpl, Duration::from_secs(10))
        })
        .expect("committed offsets");
        committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
                _ => None,
            })
            .collect()
    }

    /// Same, for another consumer group: every message produced so far, and every message the
    /// workers sent on (forwarded to a member's partition, rescore requests), is committed. The
    /// committed offsets are read before the log ends, so a message sent on by a worker before
    /// it committed what caused it is inside the ends read.
    pub async fn wait_consumed_by(&self, group: &str) {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.broker.bootstrap)
            .set("group.id", group)
            .create()
            .expect("offset reader");
        let t = &self.settings.topics;
        let topics = [
            &t.feature_updates,
            &t.new_candidates,
            &t.decay_ticks,
            &t.rescore_requests,
        ];
        let mut tpl = TopicPartitionList::new();
        for topic in topics {
            for p in 0..self.partitions {
                tpl.add_partition(topic, p);
            }
        }
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let expected = self.produced.lock().unwrap().clone();
            let committed = tokio::task::block_in_place(|| {
                consumer.committed_offsets(tpl.clone(), Duration::from_secs(5))
            });
            let lagging: Vec<String> = match &committed {
                Ok(c) => c
                    .elements()
                    .iter()
                    .filter_map(|e| {
                        let (topic, p) = (e.topic().to_owned(), e.partition());
                        let end = tokio::task::block_in_place(|| {
                            consumer.fetch_watermarks(&topic, p, Duration::from_secs(5))
                        })
                        .map(|(_, high)| high)
                        .unwrap_or(i64::MAX);
                        let want = end.max(expected.get(&(topic, p)).copied().unwrap_or(0));
                        match e.offset() {
                            Offset::Offset(o) if o >= want => None,
                            _ if want == 0 => None,
                            other => Some(format!(
                                "{}/{}: {:?} < {want}",
                                e.topic(),
                                e.partition(),
                                other
                            )),
                        }
                    })
                    .collect(),
                Err(e) => vec![e.to_string()],
            };
            if lagging.is_empty() {
                return;
            }
            assert!(
                Instant::now() < until,
                "not consumed within 60 s: {lagging:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The worker's key layout for this test's prefix.
    pub fn keys(&self) -> rescorer::store::Keys {
        rescorer::store::Keys::new(
            self.settings.output.key_prefix.clone(),
            self.settings.decay.shards,
        )
    }

    /// The member's top-N scores, best first.
    pub fn scores(&self, member: &str) -> Vec<(String, f64)> {
        let key = self.keys().scores(member);
        self.redis
            .client()
            .zrevrange_withscores(key, 0, -1)
            .expect("zrange")
    }

    pub fn meta(&self, member: &str) -> HashMap<String, String> {
        let key = self.keys().meta(member);
        self.redis.client().hgetall(key).expect("hgetall")
    }

    /// Every output key (scores and meta), for replay comparisons.
    pub fn output_snapshot(&self) -> Vec<(String, Vec<(String, f64)>)> {
        let mut c = self.redis.client();
        let pattern = format!("{}:scores:*", self.settings.output.key_prefix);
        let mut keys: Vec<String> = c.keys(pattern).expect("keys");
        keys.sort();
        keys.into_iter()
            .map(|k| {
                let v: Vec<(String, f64)> = c.zrevrange_withscores(&k, 0, -1).expect("zrange");
                (k, v)
            })
            .collect()
    }
}
