//! Dead-letter stage: an invalid message goes to the DLQ topic with its original key, value and
//! headers, and the reason and source coordinates in `rescorer.*` headers.
//!
//! Guarantee: the message counts as done only after the broker acknowledged the DLQ record, so a
//! bad event is never lost; a crash before that replays it (one duplicate DLQ record at most per
//! replay).

use std::time::Duration;

use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;

/// Header names written on every DLQ record.
pub const H_REASON: &str = "rescorer.error";
pub const H_TOPIC: &str = "rescorer.source.topic";
pub const H_PARTITION: &str = "rescorer.source.partition";
pub const H_OFFSET: &str = "rescorer.source.offset";
pub const H_TIMESTAMP: &str = "rescorer.source.timestamp";

/// Sends one DLQ record and waits for the broker's acknowledgement.
pub async fn send(
    producer: &FutureProducer,
    dlq_topic: &str,
    msg: &BorrowedMessage<'_>,
    reason: &str,
) -> Result<(), rdkafka::error::KafkaError> {
    let mut headers = OwnedHeaders::new();
    if let Some(h) = msg.headers() {
        for i in 0..h.count() {
            let hd = h.get(i);
            headers = headers.insert(Header {
                key: hd.key,
                value: hd.value,
            });
        }
    }
    let partition = msg.partition().to_string();
    let offset = msg.offset().to_string();
    let ts = msg
        .timestamp()
        .to_millis()
        .map(|t| t.to_string())
        .unwrap_or_default();
    headers = headers
        .insert(Header {
            key: H_REASON,
            value: Some(reason),
        })
        .insert(Header {
            key: H_TOPIC,
            value: Some(msg.topic()),
        })
        .insert(Header {
            key: H_PARTITION,
            value: Some(&partition),
        })
        .insert(Header {
            key: H_OFFSET,
            value: Some(&offset),
        })
        .insert(Header {
            key: H_TIMESTAMP,
            value: Some(&ts),
        });
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(dlq_topic).headers(headers);
    if let Some(k) = msg.key() {
        record = record.key(k);
    }
    if let Some(v) = msg.payload() {
        record = record.payload(v);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(e, _)| e)
}
