//! Unit tests of the owner's in-memory state.

use super::*;
use crate::decode::Entity;
use crate::decode::FeatureUpdate;
use crate::store::{MemberKey, WriteOp};

fn pair(ts: i64, o: i64, rm: bool) -> PairState {
    PairState {
        reason: "job_change".into(),
        pair_features: FeatureMap::new(),
        ts,
        o,
        rm,
    }
}

#[test]
fn features_and_pairs_are_last_writer_wins_by_time_then_offset() {
    let mut m = Member::default();
    let upd = |ts, x| FeatureUpdate {
        entity: Entity::Member,
        id: "m".into(),
        features: vec![("f".into(), x)],
        ts,
    };
    assert_eq!(m.apply_features(&upd(10, Some(1.0)), 5), 1);
    assert_eq!(m.apply_features(&upd(9, Some(2.0)), 9), 0, "older");
    assert_eq!(
        m.apply_features(&upd(10, Some(3.0)), 4),
        0,
        "same time, lower offset"
    );
    assert_eq!(
        m.apply_features(&upd(10, Some(1.0)), 5),
        1,
        "a replay applies again"
    );
    assert_eq!(m.apply_features(&upd(11, None), 0), 1);
    assert!(!m.features.contains_key("f"));

    assert!(m.apply_pair("c", pair(10, 1, false)).applied);
    assert!(
        !m.apply_pair("c", pair(9, 7, true)).applied,
        "an older removal"
    );
    let r = m.apply_pair("c", pair(12, 0, true));
    assert!(r.applied && r.was_live && !r.is_live);
    assert!(
        !m.apply_pair("c", pair(11, 3, false)).applied,
        "the tombstone holds"
    );
    assert!(!m.set_score("c", 1.0, 20), "a removed pair is not scored");
}

#[test]
fn the_plan_writes_the_ranking_diff_and_nothing_when_nothing_changed() {
    let mut m = Member::default();
    for (i, c) in ["a", "b", "c"].iter().enumerate() {
        m.apply_pair(c, pair(1, i as i64, false));
        m.set_score(c, i as f64, 5);
    }
    let ops = m.plan("model", 2, 1000, 7);
    let zadd = |key| {
        ops.iter()
            .filter(|o: &&WriteOp| o.key == key && o.cmd == "ZADD")
            .collect::<Vec<_>>()
    };
    let top = zadd(MemberKey::Top);
    assert_eq!(top.len(), 1);
    assert_eq!(top[0].args, vec!["2", "c", "1", "b"]);
    let rest = zadd(MemberKey::Rest);
    assert_eq!(rest[0].args, vec!["0", "a"]);
    let expire: Vec<&WriteOp> = ops.iter().filter(|o| o.cmd == "PEXPIRE").collect();
    assert_eq!(expire.len(), 3, "a first write sets the output's TTL");
    assert!(
        m.plan("model", 2, 1000, 8).is_empty(),
        "nothing changed since"
    );

    // "a" rises into the top: it leaves the rest, "b" goes down.
    m.set_score("a", 5.0, 6);
    let ops = m.plan("model", 2, 1000, 9);
    let cmds: Vec<(MemberKey, &str, Vec<String>)> = ops
        .iter()
        .filter(|o| matches!(o.key, MemberKey::Top | MemberKey::Rest))
        .map(|o| (o.key, o.cmd, o.args.clone()))
        .collect();
    assert!(cmds.contains(&(MemberKey::Top, "ZREM", vec!["b".into()])));
    assert!(cmds.contains(&(MemberKey::Top, "ZADD", vec!["5".into(), "a".into()])));
    assert!(cmds.contains(&(MemberKey::Rest, "ZREM", vec!["a".into()])));
    assert!(cmds.contains(&(MemberKey::Rest, "ZADD", vec!["1".into(), "b".into()])));
    assert!(ops
        .iter()
        .any(|o| o.key == MemberKey::Meta && o.cmd == "HSET"));
    assert!(
        !ops.iter().any(|o| o.cmd == "PEXPIRE"),
        "the TTL is set again only once a 64th of it has passed"
    );

    // Half the TTL later the output may have expired: the whole ranking is written again.
    m.set_score("b", 3.0, 7);
    let ops = m.plan("model", 2, 1000, 600);
    let top = ops
        .iter()
        .find(|o| o.key == MemberKey::Top && o.cmd == "ZADD")
        .expect("the top written");
    assert_eq!(top.args, vec!["5", "a", "3", "b"]);
    assert_eq!(ops.iter().filter(|o| o.cmd == "PEXPIRE").count(), 3);
}

#[test]
fn tombstones_go_once_the_member_has_an_event_past_the_horizon() {
    let mut m = Member::default();
    m.set_tombstone_horizon(Some(100));
    m.apply_pair("gone", pair(10, 0, false));
    m.set_score("gone", 1.0, 10);
    m.apply_pair("gone", pair(20, 1, true));
    m.apply_pair("kept", pair(50, 2, false));
    let ops = m.plan("model", 10, 1000, 0);
    assert!(!ops.iter().any(|o| o.cmd == "HDEL"), "within the horizon");
    assert!(m.has_pair("gone"));
    m.apply_pair("new", pair(121, 3, false));
    let ops = m.plan("model", 10, 1000, 0);
    let hdel: Vec<(MemberKey, Vec<String>)> = ops
        .iter()
        .filter(|o| o.cmd == "HDEL")
        .map(|o| (o.key, o.args.clone()))
        .collect();
    assert_eq!(
        hdel,
        [
            (MemberKey::Pairs, vec!["gone".to_owned()]),
            (MemberKey::AsOf, vec!["gone".to_owned()])
        ]
    );
    assert!(!m.has_pair("gone") && m.as_of("gone").is_none());
    // Out of contract from now on: an upsert older than the tombstone brings the pair back.
    assert!(m.apply_pair("gone", pair(15, 0, false)).applied);
}

#[test]
fn equal_scores_rank_by_candidate_bytes_like_zrevrange() {
    let mut m = Member::default();
    for c in ["x", "y", "z"] {
        m.apply_pair(c, pair(1, 0, false));
        m.set_score(c, 1.0, 5);
    }
    let (top, rest) = m.ranking(2);
    assert_eq!(
        top.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
        ["z", "y"]
    );
    assert_eq!(rest[0].0, "x");
}

#[test]
fn eviction_keeps_dirty_members_and_candidate_features_follow_their_members() {
    let mut cache = Cache::new(1);
    let mut a = Member::default();
    a.apply_pair("c1", pair(1, 0, false));
    assert!(!a.plan("m", 10, 1000, 0).is_empty());
    cache.insert("a", a);
    assert_eq!(
        cache.evict(|_| false),
        0,
        "a member with a write in flight stays"
    );
    cache.acknowledged("a");
    assert_eq!(cache.unknown_candidates(), vec!["c1".to_owned()]);
    cache.set_candidate("c1", FeatureMap::from([("x".into(), 1.0)]));
    assert!(cache.candidate("c1").is_some());
    let mut b = Member::default();
    b.apply_pair("c2", pair(1, 0, false)); // not written: dirty
    cache.insert("b", b);
    assert_eq!(
        cache.evict(|m| m == "a"),
        0,
        "a clean member the window holds stays"
    );
    assert_eq!(cache.evict(|_| false), 1, "only the clean member goes");
    assert!(!cache.contains("a") && cache.contains("b"));
    assert!(
        !cache.has_candidate("c1"),
        "no cached member has c1 any more"
    );
    let r = cache.apply_pair("b", "c2", pair(2, 0, true));
    assert!(r.applied && !cache.has_candidate("c2"));
}

#[test]
fn a_tombstone_expired_in_the_plan_that_removes_it_still_leaves_the_ranking() {
    let mut m = Member::default();
    m.set_tombstone_horizon(Some(100));
    m.apply_pair("a", pair(10, 0, false));
    m.apply_pair("b", pair(10, 1, false));
    m.set_score("a", 2.0, 10);
    m.set_score("b", 1.0, 10);
    m.plan("model", 1, 1000, 0);
    // Removed, and in the same window an event far past the horizon: the plan both drops the
    // tombstone and takes the pair out of the ranking Redis holds.
    m.apply_pair("a", pair(20, 2, true));
    m.apply_pair("c", pair(500, 3, false));
    let ops = m.plan("model", 1, 1000, 0);
    let of = |cmd: &str, key: MemberKey| -> Vec<String> {
        ops.iter()
            .filter(|o| o.cmd == cmd && o.key == key)
            .flat_map(|o| o.args.clone())
            .collect()
    };
    assert_eq!(of("ZREM", MemberKey::Top), vec!["a".to_owned()]);
    assert_eq!(of("HDEL", MemberKey::Pairs), vec!["a".to_owned()]);
    assert_eq!(of("ZADD", MemberKey::Top), vec!["1", "b"]);
    assert!(!m.has_pair("a"));
    // Nothing left to write: the slot is gone altogether.
    assert!(m.plan("model", 1, 1000, 0).is_empty());
}

#[test]
fn a_member_is_due_at_its_earliest_pair_and_a_refused_pair_waits() {
    let next_due = |as_of: i64, _ts: i64| as_of + 100;
    let mut m = Member::default();
    m.apply_pair("a", pair(0, 0, false));
    m.apply_pair("b", pair(0, 1, false));
    assert_eq!(
        m.next_due(next_due),
        Some(i64::MIN),
        "never scored: due at once"
    );
    m.set_score("a", 1.0, 50);
    m.set_score("b", 1.0, 20);
    assert_eq!(m.next_due(next_due), Some(120));
    assert_eq!(m.due_by(130, next_due), vec!["b".to_owned()]);
    // Refused at 130: tried again at 500, and no longer due meanwhile.
    m.refuse("b", 500);
    assert_eq!(m.next_due(next_due), Some(150));
    assert!(m.due_by(200, next_due).contains(&"a".to_owned()));
    assert!(!m.due_by(200, next_due).contains(&"b".to_owned()));
    // Scored again: due by its as_of once more.
    m.set_score("b", 1.0, 300);
    assert_eq!(m.next_due(next_due), Some(150));
    let mut due = m.due_by(400, next_due);
    due.sort();
    assert_eq!(due, ["a", "b"]);
    // No live pair: not scheduled.
    m.apply_pair("a", pair(1, 2, true));
    m.apply_pair("b", pair(1, 3, true));
    assert_eq!(m.next_due(next_due), None);
}

#[test]
fn a_member_rescored_whole_rewrites_its_sets_best_first_and_a_single_change_is_a_diff() {
    let ids: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    let mut m = Member::default();
    for (i, c) in ids.iter().enumerate() {
        m.apply_pair(c, pair(0, i as i64, false));
        m.set_score(c, i as f64, 10);
    }
    m.plan("model", 1, 1_000_000, 0);
    for (i, c) in ids.iter().enumerate() {
        m.set_score(c, i as f64 / 2.0, 20);
    }
    let rest_ops = |m: &mut Member| -> Vec<(&'static str, Vec<String>)> {
        m.plan("model", 1, 1_000_000, 0)
            .into_iter()
            .filter(|o| o.key == MemberKey::Rest)
            .map(|o| (o.cmd, o.args))
            .collect()
    };
    let rest = rest_ops(&mut m);
    // The top is c9; the rest, best first, each insert at the head of the new set.
    let all: Vec<String> = (0..9)
        .rev()
        .flat_map(|i| [(i as f64 / 2.0).to_string(), format!("c{i}")])
        .collect();
    assert_eq!(
        rest,
        [
            ("DEL", vec![]),
            ("ZADD", all),
            ("PEXPIRE", vec!["1000000".to_owned()]),
        ]
    );
    m.set_score("c0", 0.25, 30);
    assert_eq!(
        rest_ops(&mut m),
        [("ZADD", vec!["0.25".to_owned(), "c0".to_owned()])]
    );
}

#[test]
fn a_cached_pair_gives_back_the_stored_pair_and_its_features_by_name() {
    use crate::model::Lookup;
    let stored = PairState {
        reason: "job_change".into(),
        pair_features: FeatureMap::from([("affinity".into(), 0.5), ("messages".into(), 3.0)]),
        ts: 7,
        o: 2,
        rm: false,
    };
    let cached = super::CachedPair::from(stored.clone());
    assert_eq!(cached.state(), stored);
    assert_eq!(cached.features.feature("messages"), Some(3.0));
    assert_eq!(cached.features.feature("absent"), None);
}
