//! When a backlog is done: the worker group's committed offsets have reached the log ends as they
//! were when the backlog had been written (every backlog message scored, written and committed),
//! whatever live traffic came after it.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::config::Settings;

pub struct BacklogEnd {
    consumer: Arc<BaseConsumer>,
    ends: TopicPartitionList,
}

impl BacklogEnd {
    /// The input topics' log ends now (call it right after writing the backlog). The consumer
    /// only reads the group's committed offsets; it never joins the group.
    pub async fn now(s: &Settings, partitions: i32) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &s.kafka.bootstrap_servers)
            .set("group.id", &s.kafka.group_id)
            .set("enable.auto.commit", "false")
            .create()?;
        let consumer = Arc::new(consumer);
        let topics = [
            s.topics.feature_updates.clone(),
            s.topics.new_candidates.clone(),
            s.topics.decay_ticks.clone(),
        ];
        let c = consumer.clone();
        let ends = tokio::task::spawn_blocking(move || -> anyhow::Result<TopicPartitionList> {
            let mut ends = TopicPartitionList::new();
            for t in &topics {
                for p in 0..partitions {
                    let (_, high) = c.fetch_watermarks(t, p, Duration::from_secs(10))?;
                    ends.add_partition_offset(t, p, Offset::Offset(high))?;
                }
            }
            Ok(ends)
        })
        .await??;
        Ok(Self { consumer, ends })
    }

    /// Whether the group has committed up to every end (an error reads as not yet).
    pub async fn reached(&self) -> bool {
        let (c, ends) = (self.consumer.clone(), self.ends.clone());
        let committed = tokio::task::spawn_blocking(move || {
            c.committed_offsets(ends.clone(), Duration::from_secs(5))
                .map(|got| (ends, got))
        })
        .await;
        let Ok(Ok((ends, got))) = committed else {
            return false;
        };
        ends.elements().iter().all(|e| {
            let Offset::Offset(end) = e.offset() else {
                return true;
            };
            match got
                .find_partition(e.topic(), e.partition())
                .map(|g| g.offset())
            {
                Some(Offset::Offset(at)) => at >= end,
                // Nothing committed: done only if there was nothing to read.
                _ => end == 0,
            }
        })
    }
}
