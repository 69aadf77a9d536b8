//! The key layout. Output keys are the Catch Up service's contract:
//! `<prefix>:scores:{<member>}` (top-N sorted set) and `<prefix>:meta:{<member>}` (hash).
//! Everything else is the worker's own state. Braces are Redis Cluster hash tags.
//!
//! One exception keeps every id working on a cluster: an id that begins with `}` would make the
//! tag empty (`{}x}`), and Redis Cluster then hashes the whole key, so one member's keys would
//! land in different slots. Such an id is keyed `<prefix>:scores:~{<16 hex digits>}<id>`, the
//! digits being the id's 64-bit FNV-1a hash: the tag is the hash, and the `~` before the brace
//! keeps these keys apart from every ordinary key (an ordinary key has `{` right after the
//! second colon; the prefix holds no braces, see config validation).

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

/// The part of a key that names one member or candidate: `{id}`, the hash tag, or for an id that
/// begins with `}` (an empty tag) `~{<fnv1a hex>}id`.
pub fn tagged(id: &str) -> String {
    if id.starts_with('}') {
        format!("~{{{:016x}}}{id}", fnv1a(id))
    } else {
        format!("{{{id}}}")
    }
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
        format!("{}:scores:{}", self.prefix, tagged(member))
    }
    /// The member's meta hash: model, as_of, updated_at, ttl_set_at (output).
    pub fn meta(&self, member: &str) -> String {
        format!("{}:meta:{}", self.prefix, tagged(member))
    }
    /// candidate → pair state JSON (including removal tombstones).
    pub fn pairs(&self, member: &str) -> String {
        format!("{}:pairs:{}", self.prefix, tagged(member))
    }
    /// candidate → as_of (ms) of the pair's stored score.
    pub fn scored_as_of(&self, member: &str) -> String {
        format!("{}:asof:{}", self.prefix, tagged(member))
    }
    /// Scored candidates of the member outside the top N (each scored candidate is in exactly one
    /// of this set and the top-N set).
    pub fn rest_scores(&self, member: &str) -> String {
        format!("{}:rest:{}", self.prefix, tagged(member))
    }
    pub fn member_features(&self, member: &str) -> String {
        format!("{}:mf:{}", self.prefix, tagged(member))
    }
    pub fn member_versions(&self, member: &str) -> String {
        format!("{}:mv:{}", self.prefix, tagged(member))
    }
    pub fn candidate_features(&self, candidate: &str) -> String {
        format!("{}:cf:{}", self.prefix, tagged(candidate))
    }
    pub fn candidate_versions(&self, candidate: &str) -> String {
        format!("{}:cv:{}", self.prefix, tagged(candidate))
    }
    /// Members that have this candidate (reverse index for candidate fan-out).
    pub fn reverse(&self, candidate: &str) -> String {
        format!("{}:rev:{}", self.prefix, tagged(candidate))
    }

    /// Member → `ts:offset` of the last reverse-index change applied (the order guard).
    pub fn reverse_versions(&self, candidate: &str) -> String {
        format!("{}:revv:{}", self.prefix, tagged(candidate))
    }

    /// Fan-out intents of one partition of the feature-updates topic: candidate → event time.
    pub fn fanouts(&self, partition: i32) -> String {
        format!("{}:fanouts:{{part-{partition}}}", self.prefix)
    }

    /// The generation of the member's owner that last took it (owned state: a writer with an
    /// older generation is a zombie and is refused).
    pub fn owner(&self, member: &str) -> String {
        format!("{}:own:{}", self.prefix, tagged(member))
    }

    /// Owned state: the generation counter of one member partition (taken on assignment).
    pub fn generation(&self, partition: i32) -> String {
        format!("{}:gen:{{part-{partition}}}", self.prefix)
    }

    /// Owned state: the decay schedule of one member partition, pairs by due time (ms), members
    /// `["member","candidate"]` JSON.
    pub fn partition_due(&self, partition: i32) -> String {
        format!("{}:pdue:{{part-{partition}}}", self.prefix)
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

/// The member a schedule entry of `pdue:{part-p}` names, and whether it is an entry of the
/// earlier layout (one per pair, `["member","candidate"]`), which is removed once read.
pub fn scheduled_member(entry: &str) -> (String, bool) {
    if entry.starts_with('[') {
        if let Ok((m, _)) = serde_json::from_str::<(String, String)>(entry) {
            return (m, true);
        }
    }
    (entry.to_owned(), false)
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

    /// The slot Redis Cluster hashes a key to is chosen by its hash tag: the bytes between the
    /// first `{` and the first `}` after it, when there are any, else the whole key.
    fn cluster_tag(key: &str) -> &str {
        if let Some(open) = key.find('{') {
            if let Some(len) = key[open + 1..].find('}') {
                if len > 0 {
                    return &key[open + 1..open + 1 + len];
                }
            }
        }
        key
    }

    #[test]
    fn every_key_of_an_id_shares_one_non_empty_hash_tag_whatever_its_braces() {
        let k = Keys::new("catchup", 8);
        for id in [
            "m42", "}x", "}", "}}", "{", "{}", "a}b", "{x}", "}{", "x{", "~{0}",
        ] {
            let member_keys = [
                k.scores(id),
                k.meta(id),
                k.pairs(id),
                k.scored_as_of(id),
                k.rest_scores(id),
                k.member_features(id),
                k.member_versions(id),
            ];
            let tag = cluster_tag(&member_keys[0]);
            assert_ne!(tag, member_keys[0], "{id}: the tag is not empty");
            for key in &member_keys {
                assert_eq!(cluster_tag(key), tag, "{id}: {key}");
            }
            let cand_keys = [
                k.candidate_features(id),
                k.candidate_versions(id),
                k.reverse(id),
                k.reverse_versions(id),
            ];
            for key in &cand_keys {
                assert_eq!(cluster_tag(key), tag, "{id}: {key}");
            }
        }
        assert_eq!(
            k.scores("}x"),
            format!("catchup:scores:~{{{:016x}}}}}x", fnv1a("}x"))
        );
        // An escaped key never equals an ordinary one: ordinary keys have `{` after the colon.
        let ordinary = format!("~{{{:016x}}}}}x", fnv1a("}x"));
        assert_ne!(k.scores(&ordinary), k.scores("}x"));
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

    #[test]
    fn schedule_entries_name_members_and_pair_entries_of_the_earlier_layout_are_read_as_theirs() {
        assert_eq!(scheduled_member("m1"), ("m1".to_owned(), false));
        assert_eq!(scheduled_member(r#"["m1","c2"]"#), ("m1".to_owned(), true));
        // Not a pair: a member id that happens to start with a bracket.
        assert_eq!(scheduled_member("[m1"), ("[m1".to_owned(), false));
    }
}
