//! Routing for owned state: which partition owns a member, and the rescore requests a candidate
//! update sends to the owners of its members.
//!
//! A member's partition is the one the Kafka Java client's default partitioner (murmur2) and
//! librdkafka's `murmur2_random` pick for the member id as key: producers that key member events
//! by member id with that partitioner put them where their owner reads.

use serde::{Deserialize, Serialize};

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = 0x9747_b28c ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition (of `partitions`) that owns `id`: what the Java client's default partitioner
/// and librdkafka's `murmur2_random` choose for `id` as key.
pub fn partition_of(id: &str, partitions: i32) -> i32 {
    (murmur2(id.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
}

/// Header on a message forwarded to its owner's partition: `topic/partition/offset` it came from.
pub const FORWARDED_FROM: &str = "rescorer.forwarded-from";

/// `catchup.rescore-requests`: rescore these members' pairs with `candidate` as of `as_of`, with
/// the candidate's features as they are in Redis when the request is handled (at least as new as
/// the update that sent it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RescoreRequest {
    pub candidate: String,
    pub as_of: i64,
    pub members: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas_test_vectors() {
        // From Kafka's UtilsTest.
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (s, want) in cases {
            assert_eq!(murmur2(s.as_bytes()), want, "{s}");
        }
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        for id in ["m1", "", "}x", "member-with-a-long-id-0001"] {
            let p = partition_of(id, 7);
            assert!((0..7).contains(&p));
            assert_eq!(p, partition_of(id, 7));
        }
    }
}
