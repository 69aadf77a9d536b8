//! Candidate updates of the owned loop: applied to the shared candidate table (guarded by event
//! time), then fanned out over the reverse index as rescore requests to the members' partitions.
//!
//! A candidate fans out at most once per `batch.fanout_min_interval_ms` (one interval per
//! `batch.fanout_interval_members` members its last fan-out covered); its updates in between
//! merge into the next fan-out, as of the latest. Their offsets are stored once the broker
//! acknowledged every request of that fan-out, so a merged update holds its partition's offsets
//! for at most the interval; a stop or a revocation meanwhile leaves it to be replayed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{handled, OutRecord, Owned};
use crate::coalesce::MsgRef;
use crate::decode::{Event, FeatureUpdate};
use crate::owned::route::{partition_of, RescoreRequest};
use crate::store::Applied;
use crate::worker::Worker;

/// A candidate's fan-out waiting for its interval.
#[derive(Debug)]
struct Pending {
    as_of: i64,
    timestamp_ms: Option<i64>,
    msgs: Vec<MsgRef>,
    not_before: Instant,
}

/// Candidates' fan-outs: waiting ones, and when each candidate last fanned out.
#[derive(Debug)]
pub(in crate::worker) struct Fanouts {
    pending: BTreeMap<String, Pending>,
    /// When each candidate's last fan-out ran, and the members it covered.
    last: HashMap<String, (Instant, usize)>,
    min_interval: Duration,
    members_per_interval: usize,
}

/// A fan-out to run: candidate, as_of, Kafka timestamp for its requests, its messages.
type Due = (String, i64, Option<i64>, Vec<MsgRef>);

impl Fanouts {
    pub(in crate::worker) fn new(min_interval: Duration, members_per_interval: usize) -> Self {
        Self {
            pending: BTreeMap::new(),
            last: HashMap::new(),
            min_interval,
            members_per_interval: members_per_interval.max(1),
        }
    }

    fn interval_after(&self, members: usize) -> Duration {
        let n = members.div_ceil(self.members_per_interval).max(1);
        self.min_interval * u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Merges an applied update of `candidate` into its next fan-out.
    fn add(&mut self, candidate: String, as_of: i64, msg: MsgRef, now: Instant) {
        let not_before = self
            .last
            .get(&candidate)
            .map(|(t, n)| *t + self.interval_after(*n))
            .filter(|t| *t > now)
            .unwrap_or(now);
        let p = self.pending.entry(candidate).or_insert(Pending {
            as_of: i64::MIN,
            timestamp_ms: None,
            msgs: Vec::new(),
            not_before,
        });
        p.as_of = p.as_of.max(as_of);
        p.timestamp_ms = p.timestamp_ms.max(msg.timestamp_ms);
        p.msgs.push(msg);
    }

    /// The fan-outs whose interval has passed, taken out.
    fn due(&mut self, now: Instant) -> Vec<Due> {
        let ready: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.not_before <= now)
            .map(|(c, _)| c.clone())
            .collect();
        ready
            .into_iter()
            .filter_map(|c| {
                let p = self.pending.remove(&c)?;
                Some((c, p.as_of, p.timestamp_ms, p.msgs))
            })
            .collect()
    }

    /// When the next waiting fan-out may run.
    pub(in crate::worker) fn next_wake(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.not_before).min()
    }

    pub(in crate::worker) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn ran(&mut self, candidate: &str, members: usize, started: Instant) {
        if self.last.len() > 100_000 {
            let (base, per) = (self.min_interval, self.members_per_interval);
            self.last.retain(|_, (t, n)| {
                started.duration_since(*t)
                    < base * u32::try_from(n.div_ceil(per).max(1)).unwrap_or(u32::MAX)
            });
        }
        self.last.insert(candidate.to_owned(), (started, members));
    }

    /// Forgets the messages of `partitions` (revoked, or taken by a later owner): their updates
    /// are replayed by the next owner; a fan-out left with no message is dropped.
    pub(in crate::worker) fn drop_partitions(&mut self, partitions: &HashSet<i32>) {
        self.pending.retain(|_, p| {
            p.msgs.retain(|m| !partitions.contains(&m.tp.1));
            !p.msgs.is_empty()
        });
    }
}

impl Worker {
    /// Applies candidate updates to the shared table and merges each applied one into its
    /// candidate's next fan-out; then runs the fan-outs that are due.
    pub(super) async fn fan_out(
        &self,
        st: &mut Owned,
        updates: Vec<(FeatureUpdate, MsgRef)>,
        hard_stop: &CancellationToken,
    ) {
        let events: Vec<Event> = updates
            .iter()
            .map(|(u, _)| Event::Features(u.clone()))
            .collect();
        let refs: Vec<(&Event, i64)> = events
            .iter()
            .zip(&updates)
            .map(|(e, (_, m))| (e, m.offset))
            .collect();
        let top_n = self.settings.output.top_n;
        let Some(applied) = self
            .attempt(&mut st.fatal, "apply candidate features", hard_stop, || {
                self.store.apply(&refs, top_n)
            })
            .await
        else {
            return;
        };
        let now = Instant::now();
        for ((u, mref), a) in updates.into_iter().zip(applied) {
            if matches!(a, Applied::Features(o) if o.applied == 0) && !u.features.is_empty() {
                handled(mref.topic_label, "stale", &mref).emit(&self.metrics);
                self.complete_tracked(&mut st.tracker, &[mref], false);
                continue;
            }
            handled(mref.topic_label, "applied", &mref).emit(&self.metrics);
            st.fanouts.add(u.id, u.ts, mref, now);
        }
        self.run_fanouts(st, hard_stop).await;
    }

    /// Runs every fan-out whose interval has passed: its requests produced (all candidates'
    /// scans advance together: one Redis round trip and one round of produce acknowledgements a
    /// chunk), then its messages done.
    pub(super) async fn run_fanouts(&self, st: &mut Owned, hard_stop: &CancellationToken) {
        let now = Instant::now();
        let fan = st.fanouts.due(now);
        if fan.is_empty() {
            return;
        }
        let n = st.partitions;
        let chunk = self.settings.batch.fanout_chunk;
        let topic = self.settings.topics.rescore_requests.clone();
        // (candidate, as_of, timestamp, cursor, members covered)
        let mut active: Vec<(String, i64, Option<i64>, u64, usize)> = fan
            .iter()
            .map(|(c, as_of, ts, _)| (c.clone(), *as_of, *ts, 0, 0))
            .collect();
        let mut covered: HashMap<String, usize> = HashMap::new();
        while !active.is_empty() {
            let scans: Vec<(&str, u64)> = active
                .iter()
                .map(|(c, _, _, k, _)| (c.as_str(), *k))
                .collect();
            let Some(chunks) = self
                .attempt(&mut st.fatal, "scan reverse index", hard_stop, || {
                    self.store.scan_reverse_many(&scans, chunk)
                })
                .await
            else {
                return;
            };
            let mut records: Vec<OutRecord> = Vec::new();
            for ((candidate, as_of, timestamp_ms, cursor, seen), (next, members)) in
                active.iter_mut().zip(chunks)
            {
                *seen += members.len();
                let mut by_partition: HashMap<i32, Vec<String>> = HashMap::new();
                for m in members {
                    by_partition.entry(partition_of(&m, n)).or_default().push(m);
                }
                records.extend(by_partition.into_iter().map(|(p, members)| {
                    OutRecord {
                        topic: topic.clone(),
                        partition: p,
                        key: Some(candidate.as_bytes().to_vec()),
                        value: serde_json::to_vec(&RescoreRequest {
                            candidate: candidate.clone(),
                            as_of: *as_of,
                            members,
                        })
                        .ok(),
                        headers: Vec::new(),
                        timestamp_ms: *timestamp_ms,
                    }
                }));
                *cursor = next;
                if next == 0 {
                    covered.insert(candidate.clone(), *seen);
                }
            }
            match self.produce_acked(records, hard_stop).await {
                Ok(()) => {}
                Err(None) => return,
                Err(Some(fatal)) => {
                    st.fatal.get_or_insert(fatal);
                    return;
                }
            }
            active.retain(|(.., cursor, _)| *cursor != 0);
        }
        for (candidate, _, _, msgs) in fan {
            st.fanouts.ran(
                &candidate,
                covered.get(&candidate).copied().unwrap_or(0),
                now,
            );
            let msgs: Vec<MsgRef> = msgs
                .into_iter()
                .filter(|m| !st.fenced.contains_key(&m.tp.1))
                .collect();
            self.complete_tracked(&mut st.tracker, &msgs, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_candidate_fans_out_once_per_interval_and_its_updates_merge() {
        let mut f = Fanouts::new(Duration::from_secs(1), 250);
        let now = Instant::now();
        f.add("hot".into(), 10, MsgRef::for_test(0, false), now);
        let due = f.due(now);
        assert_eq!(due.len(), 1, "a first fan-out runs at once");
        f.ran("hot", 600, now);
        f.add("hot".into(), 20, MsgRef::for_test(1, false), now);
        f.add("hot".into(), 15, MsgRef::for_test(2, false), now);
        f.add("cold".into(), 5, MsgRef::for_test(3, false), now);
        let due = f.due(now);
        assert_eq!(due.len(), 1, "only the cold candidate runs now");
        assert_eq!(due[0].0, "cold");
        // 600 members: three intervals.
        assert_eq!(f.next_wake(), Some(now + Duration::from_secs(3)));
        tokio::time::advance(Duration::from_secs(3)).await;
        let due = f.due(Instant::now());
        assert_eq!(due.len(), 1);
        let (c, as_of, _, msgs) = &due[0];
        assert_eq!(
            (c.as_str(), *as_of, msgs.len()),
            ("hot", 20, 2),
            "merged as of the latest"
        );
        assert!(f.is_empty());
    }

    #[test]
    fn a_revoked_partitions_messages_leave_their_fan_outs() {
        let mut f = Fanouts::new(Duration::from_secs(1), 250);
        let now = Instant::now();
        f.ran("c", 10, now);
        f.add("c".into(), 1, MsgRef::for_test(0, false), now);
        f.drop_partitions(&HashSet::from([0]));
        assert!(
            f.is_empty(),
            "its only message was on the revoked partition"
        );
    }
}
