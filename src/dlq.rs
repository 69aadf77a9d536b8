//! Dead-letter stage: an invalid message goes to the DLQ topic with its original key, value and
//! headers, and the reason and source coordinates in `rescorer.*` headers.
//!
//! Guarantee: the message counts as done only after the broker acknowledged the DLQ record, so a
//! bad event is never lost; a crash before that replays it (one duplicate DLQ record at most per
//! replay). An original too large to carry whole (value over [`MAX_VALUE_BYTES`], key over
//! [`MAX_KEY_BYTES`], headers over [`MAX_HEADER_BYTES`] in all) is cut: the record keeps the first
//! bytes, the original length and its SHA-256, and `rescorer.truncated` names what was cut (a
//! broker accepted a 64 KiB cut on its own but refused it as too large in the hostile-input test,
//! so the cut is kept small). The source message fitted the broker, but the envelope (original
//! plus headers) may not: without the cut the broker would refuse the dead letter for ever and
//! block the partition. Limits: a broker
//! whose `message.max.bytes` is below the cut sizes gets a second, bare envelope (reason and
//! coordinates only); if even that is refused, or the broker refuses the DLQ topic itself
//! (authorization, unknown topic), the failure is fatal, since no retry can succeed.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use sha2::{Digest, Sha256};

/// Header names written on every DLQ record.
pub const H_REASON: &str = "rescorer.error";
pub const H_TOPIC: &str = "rescorer.source.topic";
pub const H_PARTITION: &str = "rescorer.source.partition";
pub const H_OFFSET: &str = "rescorer.source.offset";
pub const H_TIMESTAMP: &str = "rescorer.source.timestamp";
/// Written only when something was cut: a comma-separated list of `key`, `value`, `headers`.
pub const H_TRUNCATED: &str = "rescorer.truncated";
/// The original value's length in bytes and its SHA-256 (hex), when the value was cut.
pub const H_VALUE_BYTES: &str = "rescorer.original.value.bytes";
pub const H_VALUE_SHA256: &str = "rescorer.original.value.sha256";
/// The same for the key.
pub const H_KEY_BYTES: &str = "rescorer.original.key.bytes";
pub const H_KEY_SHA256: &str = "rescorer.original.key.sha256";
/// How many original headers were dropped, and their size in bytes (names and values).
pub const H_HEADERS_DROPPED: &str = "rescorer.original.headers.count";
pub const H_HEADERS_BYTES: &str = "rescorer.original.headers.bytes";

/// Longest original value a dead letter carries; a longer one is cut to its first 8 KiB (enough
/// to see what was wrong; the length and SHA-256 identify the original).
pub const MAX_VALUE_BYTES: usize = 8 * 1024;
/// Longest original key a dead letter carries.
pub const MAX_KEY_BYTES: usize = 1024;
/// Most bytes of original headers (names and values) a dead letter carries; more are dropped.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Longest reason (`rescorer.error`): a reason quotes the offending input, which may be huge.
pub const MAX_REASON_BYTES: usize = 1024;

/// `s` cut to at most `max` bytes on a character boundary, with "…" when cut.
fn cut_reason(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

/// Why a dead letter could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// Worth retrying: the broker is unreachable, busy, or timed out.
    #[error("dead-letter write failed (will retry): {0}")]
    Transient(KafkaError),
    /// No retry can succeed (the DLQ topic refused or unknown, or even a bare envelope too large).
    #[error("dead-letter write to topic `{topic}` can never succeed: {error}")]
    Fatal { topic: String, error: KafkaError },
}

/// What a dead letter carried of the original.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// Something was cut (see `rescorer.truncated`).
    pub truncated: bool,
}

/// How much of the original to carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Envelope {
    /// The original, cut to the limits above.
    Original,
    /// Reason and coordinates only (the broker refused the cut original as too large).
    Bare,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::MessageBatchTooLarge
        )
    )
}

/// Errors no retry of the same record can fix.
pub(crate) fn permanent(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::MessageBatchTooLarge
        )
    )
}

/// Sends one DLQ record and waits for the broker's acknowledgement. A record the broker refuses
/// as too large is sent again cut to a bare envelope.
pub async fn send(
    producer: &FutureProducer,
    dlq_topic: &str,
    msg: &BorrowedMessage<'_>,
    reason: &str,
) -> Result<Sent, DlqError> {
    let first = send_envelope(producer, dlq_topic, msg, reason, Envelope::Original).await;
    let result = match first {
        Err(e) if too_large(&e) => {
            tracing::warn!(error = %e, topic = dlq_topic, "dead letter too large for the broker; sending reason and coordinates only");
            send_envelope(producer, dlq_topic, msg, reason, Envelope::Bare)
                .await
                .map(|_| Sent { truncated: true })
        }
        other => other,
    };
    result.map_err(|error| {
        if permanent(&error) {
            DlqError::Fatal {
                topic: dlq_topic.to_owned(),
                error,
            }
        } else {
            DlqError::Transient(error)
        }
    })
}

async fn send_envelope(
    producer: &FutureProducer,
    dlq_topic: &str,
    msg: &BorrowedMessage<'_>,
    reason: &str,
    envelope: Envelope,
) -> Result<Sent, KafkaError> {
    let mut cut: Vec<&str> = Vec::new();
    let mut extra: Vec<(&str, String)> = Vec::new();
    let mut headers = OwnedHeaders::new();
    let original_headers: Vec<(&str, Option<&[u8]>)> = msg
        .headers()
        .map(|h| h.iter().map(|hd| (hd.key, hd.value)).collect())
        .unwrap_or_default();
    let header_bytes: usize = original_headers
        .iter()
        .map(|(k, v)| k.len() + v.map_or(0, <[u8]>::len))
        .sum();
    if envelope == Envelope::Original && header_bytes <= MAX_HEADER_BYTES {
        for (key, value) in &original_headers {
            headers = headers.insert(Header { key, value: *value });
        }
    } else if !original_headers.is_empty() {
        cut.push("headers");
        extra.push((H_HEADERS_DROPPED, original_headers.len().to_string()));
        extra.push((H_HEADERS_BYTES, header_bytes.to_string()));
    }
    let limit = |max: usize| if envelope == Envelope::Bare { 0 } else { max };
    let key = msg.key().map(|k| {
        if k.len() > limit(MAX_KEY_BYTES) {
            cut.push("key");
            extra.push((H_KEY_BYTES, k.len().to_string()));
            extra.push((H_KEY_SHA256, sha256_hex(k)));
            &k[..limit(MAX_KEY_BYTES)]
        } else {
            k
        }
    });
    let value = msg.payload().map(|v| {
        if v.len() > limit(MAX_VALUE_BYTES) {
            cut.push("value");
            extra.push((H_VALUE_BYTES, v.len().to_string()));
            extra.push((H_VALUE_SHA256, sha256_hex(v)));
            &v[..limit(MAX_VALUE_BYTES)]
        } else {
            v
        }
    });
    let partition = msg.partition().to_string();
    let offset = msg.offset().to_string();
    let ts = msg
        .timestamp()
        .to_millis()
        .map(|t| t.to_string())
        .unwrap_or_default();
    let reason = cut_reason(reason, MAX_REASON_BYTES);
    let truncated = cut.join(",");
    let mut ours: Vec<(&str, &str)> = vec![
        (H_REASON, &reason),
        (H_TOPIC, msg.topic()),
        (H_PARTITION, &partition),
        (H_OFFSET, &offset),
        (H_TIMESTAMP, &ts),
    ];
    if !cut.is_empty() {
        ours.push((H_TRUNCATED, &truncated));
    }
    for (k, v) in &extra {
        ours.push((k, v));
    }
    for (key, value) in ours {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(dlq_topic).headers(headers);
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(v) = value {
        record = record.payload(v);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map(|_| Sent {
            truncated: !cut.is_empty(),
        })
        .map_err(|(e, _)| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_errors_are_permanent_and_outages_are_not() {
        let big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(too_large(&big) && permanent(&big));
        let down = KafkaError::MessageProduction(RDKafkaErrorCode::BrokerTransportFailure);
        assert!(!too_large(&down) && !permanent(&down));
        let timeout = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(!permanent(&timeout));
        let denied = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert!(permanent(&denied));
    }

    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary() {
        let long = format!(
            "field `entity` must be \"member\" or \"candidate\", got {:?}",
            "é".repeat(4000)
        );
        let cut = cut_reason(&long, MAX_REASON_BYTES);
        assert!(
            cut.len() <= MAX_REASON_BYTES && cut.ends_with('…'),
            "{}",
            cut.len()
        );
        assert_eq!(cut_reason("short", MAX_REASON_BYTES), "short");
    }

    #[test]
    fn the_hash_is_sha256_in_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
