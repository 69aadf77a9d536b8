//! Synthetic Catch Up traffic: Zipf-skewed members and candidates (a few hot ones, as in real
//! social graphs), a mix of feature updates, new candidates and removals, deterministic per seed.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Which topic an event goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    FeatureUpdates,
    NewCandidates,
}

/// One event ready to publish.
#[derive(Debug, Clone)]
pub struct Generated {
    pub target: Target,
    pub key: String,
    pub value: Value,
}

/// Zipf(s) over `n` ranks, sampled by inverse CDF.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n.max(1))
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Self { cdf }
    }

    pub fn len(&self) -> usize {
        self.cdf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cdf.is_empty()
    }

    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

/// The event mix, in percent (the rest are new candidates).
#[derive(Debug, Clone)]
pub struct Mix {
    pub member_updates: u32,
    pub candidate_updates: u32,
    pub removals: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            member_updates: 25,
            candidate_updates: 15,
            removals: 5,
        }
    }
}

const REASONS: &[&str] = &[
    "job_change",
    "promotion",
    "work_anniversary",
    "birthday",
    "new_post",
];

/// A deterministic generator of Catch Up events.
pub struct Traffic {
    rng: SmallRng,
    members: Zipf,
    candidates: Zipf,
    mix: Mix,
}

impl Traffic {
    pub fn new(seed: u64, members: usize, candidates: usize, zipf_s: f64, mix: Mix) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(seed),
            members: Zipf::new(members, zipf_s),
            candidates: Zipf::new(candidates, zipf_s),
            mix,
        }
    }

    /// The next event, with event time `ts_ms`. Feature updates pick Zipf-hot members (active
    /// members update often); new candidates pick members uniformly, so no member collects
    /// thousands of candidates, and Zipf-hot candidates (popular people appear for many members).
    pub fn next(&mut self, ts_ms: i64) -> Generated {
        let roll = self.rng.random_range(0..100);
        let member_rank = if roll < self.mix.member_updates {
            self.members.sample(&mut self.rng)
        } else {
            self.rng.random_range(0..self.members.len())
        };
        let m = format!("m{member_rank}");
        let c = format!("c{}", self.candidates.sample(&mut self.rng));
        let r = &mut self.rng;
        if roll < self.mix.member_updates {
            let v = json!({"entity": "member", "id": m, "ts": ts_ms, "features": {
                "sessions_7d": r.random_range(0..30),
                "connections": r.random_range(20..3000),
            }});
            Generated {
                target: Target::FeatureUpdates,
                key: m,
                value: v,
            }
        } else if roll < self.mix.member_updates + self.mix.candidate_updates {
            let v = json!({"entity": "candidate", "id": c, "ts": ts_ms, "features": {
                "profile_completeness": (r.random_range(0.0..1.0f64) * 100.0).round() / 100.0,
                "connections": r.random_range(20..3000),
            }});
            Generated {
                target: Target::FeatureUpdates,
                key: c,
                value: v,
            }
        } else if roll < self.mix.member_updates + self.mix.candidate_updates + self.mix.removals {
            let v = json!({"member_id": m, "candidate_id": c, "op": "remove", "ts": ts_ms});
            Generated {
                target: Target::NewCandidates,
                key: m,
                value: v,
            }
        } else {
            let v = json!({"member_id": m, "candidate_id": c, "ts": ts_ms,
            "reason": REASONS[r.random_range(0..REASONS.len())],
            "pair_features": {
                "affinity": (r.random_range(0.0..1.0f64) * 1000.0).round() / 1000.0,
                "mutual_connections": r.random_range(0..80),
                "messages_90d": r.random_range(0..20),
            }});
            Generated {
                target: Target::NewCandidates,
                key: m,
                value: v,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_is_skewed_and_deterministic() {
        let z = Zipf::new(1000, 1.1);
        let mut rng = SmallRng::seed_from_u64(1);
        let draws: Vec<usize> = (0..10_000).map(|_| z.sample(&mut rng)).collect();
        let top = draws.iter().filter(|&&d| d < 10).count();
        assert!(
            top > 3000,
            "the 10 hottest of 1000 get a large share: {top}"
        );
        assert!(draws.iter().all(|&d| d < 1000));
        let mut a = Traffic::new(7, 100, 100, 1.1, Mix::default());
        let mut b = Traffic::new(7, 100, 100, 1.1, Mix::default());
        for _ in 0..50 {
            assert_eq!(a.next(1).value, b.next(1).value);
        }
    }
}
