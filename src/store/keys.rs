//! The key layout. Output keys are the Catch Up service's contract:
//! `<prefix>:scores:{<member>}` (top-N sorted set) and `<prefix>:meta:{<member>}` (hash).
//! Everything else is the worker's own state. Braces are Redis Cluster hash tags.

/// Key names under one prefix (default `catchup`; tests and tenants use their own).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    shards: u32,
}

/// 64-bit FNV-1a: stable across processes and versions, so every worker agrees on the shard.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Keys {
    pub fn new(prefix: impl Into<String>, shards: u32) -> Self {
        Self {
            prefix: prefix.into(),
            shards: shards.max(1),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The member's top-N scores (output).
    pub fn scores(&self, member: &str) -> String {
        format!("{}:scores:{{{member}}}", self.prefix)
    }
    /// The member's meta hash: model, as_of, updated_at, ttl_set_at (output).
    pub fn meta(&self, member: &str) -> String {
        format!("{}:meta:{{{member}}}", self.prefix)
    }
    /// candidate → pair state JSON (including removal tombstones).
    pub fn pairs(&self, member: &str) -> String {
        format!("{}:pairs:{{{member}}}", self.prefix)
    }
    /// candidate → as_of (ms) of the pair's stored score.
    pub fn scored_as_of(&self, member: &str) -> String {
        format!("{}:asof:{{{member}}}", self.prefix)
    }
    /// Scored candidates of the member outside the top N (each scored candidate is in exactly one
    /// of this set and the top-N set).
    pub fn rest_scores(&self, member: &str) -> String {
        format!("{}:rest:{{{member}}}", self.prefix)
    }
    pub fn member_features(&self, member: &str) -> String {
        format!("{}:mf:{{{member}}}", self.prefix)
    }
    pub fn member_versions(&self, member: &str) -> String {
        format!("{}:mv:{{{member}}}", self.prefix)
    }
    pub fn candidate_features(&self, candidate: &str) -> String {
        format!("{}:cf:{{{candidate}}}", self.prefix)
    }
    pub fn candidate_versions(&self, candidate: &str) -> String {
        format!("{}:cv:{{{candidate}}}", self.prefix)
    }
    /// Members that have this candidate (reverse index for candidate fan-out).
    pub fn reverse(&self, candidate: &str) -> String {
        format!("{}:rev:{{{candidate}}}", self.prefix)
    }

    /// Number of decay-schedule shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }
    /// The decay-schedule shard a member's pairs live in.
    pub fn shard_of(&self, member: &str) -> u32 {
        (fnv1a(member) % u64::from(self.shards)) as u32
    }
    /// Pairs of one shard by due time (ms); members are `["member","candidate"]` JSON.
    pub fn due(&self, shard: u32) -> String {
        format!("{}:due:{{shard-{shard}}}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_keys_follow_the_contract_and_share_a_hash_tag() {
        let k = Keys::new("catchup", 8);
        assert_eq!(k.scores("m42"), "catchup:scores:{m42}");
        assert_eq!(k.meta("m42"), "catchup:meta:{m42}");
        assert!(k.pairs("m42").ends_with("{m42}"));
        assert!(k.candidate_features("m7").ends_with("{m7}"));
    }

    #[test]
    fn shards_are_stable_and_in_range() {
        let k = Keys::new("p", 8);
        assert_eq!(k.shard_of("m42"), k.shard_of("m42"));
        assert!((0..1000).all(|i| k.shard_of(&format!("m{i}")) < 8));
        let used: std::collections::HashSet<u32> =
            (0..1000).map(|i| k.shard_of(&format!("m{i}"))).collect();
        assert_eq!(used.len(), 8, "a thousand members use every shard");
    }
}
