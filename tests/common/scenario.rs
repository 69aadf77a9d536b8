//! A seeded random Catch Up event stream and a reference of its final state, to check the
//! worker's central guarantee: after every event and a tick at T that makes every pair due, each
//! stored score equals the model's score of the final state as of T.

use std::collections::HashMap;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::harness::Harness;

const REASONS: &[&str] = &[
    "job_change",
    "promotion",
    "work_anniversary",
    "birthday",
    "new_post",
    "endorsement",
];
const MEMBER_FEATURES: &[&str] = &["sessions_7d", "connections"];
const CANDIDATE_FEATURES: &[&str] = &["profile_completeness", "connections"];

/// One event: (topic role, key, value).
#[derive(Debug, Clone)]
pub enum Ev {
    Feature(String, Value),
    Pair(String, Value),
}

type Feats = HashMap<String, f64>;

#[derive(Debug, Default)]
pub struct Scenario {
    pub events: Vec<Ev>,
    members: HashMap<String, Feats>,
    candidates: HashMap<String, Feats>,
    /// Live pairs: (member, candidate) → (reason, pair features, moment ts).
    pairs: HashMap<(String, String), (String, Feats, i64)>,
    pub last_ts: i64,
}

impl Scenario {
    /// `n` events over `members` × `candidates`, event times strictly increasing from `t0`.
    pub fn generate(seed: u64, n: usize, members: usize, candidates: usize, t0: i64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut s = Scenario::default();
        for i in 0..n {
            let ts = t0 + i as i64 * 60_000;
            let m = format!("m{}", rng.random_range(0..members));
            let c = format!("c{}", rng.random_range(0..candidates));
            match rng.random_range(0..10) {
                0..=1 => {
                    let mut f = serde_json::Map::new();
                    let entry = s.members.entry(m.clone()).or_default();
                    for name in MEMBER_FEATURES {
                        if rng.random_bool(0.6) {
                            if rng.random_bool(0.15) {
                                f.insert(name.to_string(), Value::Null);
                                entry.remove(*name);
                            } else {
                                let v = (rng.random_range(0.0..500.0f64) * 100.0).round() / 100.0;
                                f.insert(name.to_string(), json!(v));
                                entry.insert(name.to_string(), v);
                            }
                        }
                    }
                    s.events.push(Ev::Feature(
                        m.clone(),
                        json!({"entity": "member", "id": m, "features": f, "ts": ts}),
                    ));
                }
                2..=3 => {
                    let mut f = serde_json::Map::new();
                    let entry = s.candidates.entry(c.clone()).or_default();
                    for name in CANDIDATE_FEATURES {
                        if rng.random_bool(0.7) {
                            let v = (rng.random_range(0.0..1.0f64) * 1000.0).round() / 1000.0;
                            f.insert(name.to_string(), json!(v));
                            entry.insert(name.to_string(), v);
                        }
                    }
                    s.events.push(Ev::Feature(
                        c.clone(),
                        json!({"entity": "candidate", "id": c, "features": f, "ts": ts}),
                    ));
                }
                4 => {
                    s.pairs.remove(&(m.clone(), c.clone()));
                    s.events.push(Ev::Pair(
                        m.clone(),
                        json!({"member_id": m, "candidate_id": c, "op": "remove", "ts": ts}),
                    ));
                }
                _ => {
                    let reason = REASONS[rng.random_range(0..REASONS.len())].to_string();
                    let mut pf = Feats::new();
                    pf.insert(
                        "affinity".into(),
                        (rng.random_range(0.0..1.0f64) * 1000.0).round() / 1000.0,
                    );
                    if rng.random_bool(0.5) {
                        pf.insert("mutual_connections".into(), rng.random_range(0..60) as f64);
                    }
                    s.events.push(Ev::Pair(
                        m.clone(),
                        json!({"member_id": m, "candidate_id": c, "reason": reason, "pair_features": pf, "ts": ts}),
                    ));
                    s.pairs.insert((m, c), (reason, pf, ts));
                }
            }
            s.last_ts = ts;
        }
        s
    }

    /// The same stream with ids renamed (`m<i>` → `members[i]`, `c<i>` → `candidates[i]`), e.g.
    /// to ids with braces; `generate`'s counts must match the lists' lengths.
    pub fn with_ids(mut self, members: &[&str], candidates: &[&str]) -> Self {
        let rename = |id: &str| -> String {
            let (list, n) = match id.split_at(1) {
                ("m", n) => (members, n),
                ("c", n) => (candidates, n),
                _ => return id.to_owned(),
            };
            n.parse::<usize>()
                .ok()
                .and_then(|i| list.get(i))
                .map_or_else(|| id.to_owned(), |s| s.to_string())
        };
        let fix = |v: &mut Value| {
            for field in ["id", "member_id", "candidate_id"] {
                if let Some(Value::String(s)) = v.get_mut(field) {
                    *s = rename(s);
                }
            }
        };
        for ev in &mut self.events {
            match ev {
                Ev::Feature(k, v) | Ev::Pair(k, v) => {
                    *k = rename(k);
                    fix(v);
                }
            }
        }
        self.members = std::mem::take(&mut self.members)
            .into_iter()
            .map(|(k, v)| (rename(&k), v))
            .collect();
        self.candidates = std::mem::take(&mut self.candidates)
            .into_iter()
            .map(|(k, v)| (rename(&k), v))
            .collect();
        self.pairs = std::mem::take(&mut self.pairs)
            .into_iter()
            .map(|((m, c), v)| ((rename(&m), rename(&c)), v))
            .collect();
        self
    }

    /// A tick time that makes every pair due (past the 24 h max interval).
    pub fn final_tick(&self) -> i64 {
        self.last_ts + 25 * 3_600_000
    }

    pub async fn send(&self, h: &Harness, range: std::ops::Range<usize>) {
        let (f, p) = (
            h.settings.topics.feature_updates.clone(),
            h.settings.topics.new_candidates.clone(),
        );
        for ev in &self.events[range] {
            match ev {
                Ev::Feature(k, v) => h.send(&f, k, v.clone()).await,
                Ev::Pair(k, v) => h.send(&p, k, v.clone()).await,
            }
        }
    }

    /// Sends a range without waiting for each acknowledgement (in order: each send is queued
    /// when first polled, and `join_all` polls them in order), for large backlogs.
    pub async fn send_pipelined(&self, h: &Harness, range: std::ops::Range<usize>) {
        let (f, p) = (
            h.settings.topics.feature_updates.clone(),
            h.settings.topics.new_candidates.clone(),
        );
        let sends = self.events[range].iter().map(|ev| {
            let (f, p) = (&f, &p);
            async move {
                match ev {
                    Ev::Feature(k, v) => h.send(f, k, v.clone()).await,
                    Ev::Pair(k, v) => h.send(p, k, v.clone()).await,
                }
            }
        });
        futures::future::join_all(sends).await;
    }

    /// Sends a range as production producers do: batched, every send in flight at once (see
    /// [`Harness::send_batched`]), so a worker's commits and resumes land inside batches.
    pub async fn send_batched(&self, h: &Harness, range: std::ops::Range<usize>) {
        let (f, p) = (
            &h.settings.topics.feature_updates,
            &h.settings.topics.new_candidates,
        );
        let records: Vec<(String, String, String)> = self.events[range]
            .iter()
            .map(|ev| match ev {
                Ev::Feature(k, v) => (f.clone(), k.clone(), v.to_string()),
                Ev::Pair(k, v) => (p.clone(), k.clone(), v.to_string()),
            })
            .collect();
        h.send_batched(&records).await;
    }

    /// The model's score of every live pair's final state as of `t`, by member.
    pub fn expected(
        &self,
        scorer: &rescorer::score::Scorer,
        t: i64,
    ) -> HashMap<String, Vec<(String, f64)>> {
        let empty = Feats::new();
        let mut out: HashMap<String, Vec<(String, f64)>> = HashMap::new();
        for ((m, c), (reason, pf, ts)) in &self.pairs {
            let input = rescorer::model::PairInput {
                member: self.members.get(m).unwrap_or(&empty),
                candidate: self.candidates.get(c).unwrap_or(&empty),
                pair: pf,
                reason,
                moment_ts_ms: *ts,
                as_of_ms: t,
            };
            let s = f64::from(scorer.engine().score_pairs(&[input]).unwrap()[0]);
            out.entry(m.clone()).or_default().push((c.clone(), s));
        }
        out
    }

    /// Asserts Redis holds exactly the expected scores for every member.
    pub fn check(&self, h: &Harness, scorer: &rescorer::score::Scorer, t: i64) {
        self.check_with(&mut |m: &str| (h.scores(m), h.meta(m)), scorer, t);
    }

    /// Same, reading the output keys through `conn` (another Redis, a cluster).
    pub fn check_in(
        &self,
        conn: &mut dyn redis::ConnectionLike,
        keys: &rescorer::store::Keys,
        scorer: &rescorer::score::Scorer,
        t: i64,
    ) {
        self.check_with(
            &mut |m: &str| {
                let scores: Vec<(String, f64)> = redis::cmd("ZREVRANGE")
                    .arg(keys.scores(m))
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query(conn)
                    .unwrap();
                let meta: HashMap<String, String> =
                    redis::cmd("HGETALL").arg(keys.meta(m)).query(conn).unwrap();
                (scores, meta)
            },
            scorer,
            t,
        );
    }

    /// Same, reading each member's (scores, meta) through `read`.
    pub fn check_with(
        &self,
        read: &mut dyn FnMut(&str) -> (Vec<(String, f64)>, HashMap<String, String>),
        scorer: &rescorer::score::Scorer,
        t: i64,
    ) {
        let expected = self.expected(scorer, t);
        let members: std::collections::HashSet<String> = self
            .events
            .iter()
            .filter_map(|e| match e {
                Ev::Pair(m, _) => Some(m.clone()),
                Ev::Feature(..) => None,
            })
            .collect();
        let mut checked = 0;
        for m in members {
            let (mut got, meta) = read(&m);
            got.sort_by(|a, b| a.0.cmp(&b.0));
            let mut want = expected.get(&m).cloned().unwrap_or_default();
            want.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(
                got, want,
                "member {m}: stored scores differ from the model's final-state scores"
            );
            if !want.is_empty() {
                assert_eq!(meta["as_of"], t.to_string(), "member {m}");
            }
            checked += want.len();
        }
        assert!(
            checked > 10,
            "the scenario should leave pairs to check ({checked})"
        );
    }
}
