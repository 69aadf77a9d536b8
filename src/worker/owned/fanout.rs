//! Candidate updates of the owned loop: applied to the shared candidate table (guarded by event
//! time), then fanned out over the reverse index as rescore requests to the members' partitions.
//!
//! A candidate fans out at most once per `batch.fanout_min_interval_ms` (one interval per
//! `batch.fanout_interval_members` members its last fan-out covered); its updates in between
//! merge into the next fan-out, as of the latest. An applied update's fan-out intent is recorded
//! in Redis (`fanouts:{part-P}`: candidate → as_of and the partition's highest offset it covers)
//! before its offset is stored, so a waiting fan-out holds no offset; the intent is cleared once
//! a fan-out that took the update in has its requests acknowledged. Whoever owns the partition
//! next (after a stop, a crash or a rebalance) resumes the recorded fan-outs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::FutureProducer;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{handled, produce_acked, OutRecord, Owned};
use crate::coalesce::MsgRef;
use crate::decode::{Event, FeatureUpdate};
use crate::metrics::Metrics;
use crate::owned::route::{partition_of, RescoreRequest};
use crate::store::{Applied, Store};
use crate::worker::health::Health;
use crate::worker::retry::{retry, Stop};
use crate::worker::Worker;

/// A candidate's fan-out waiting for its interval.
#[derive(Debug)]
struct Pending {
    as_of: i64,
    timestamp_ms: Option<i64>,
    /// The recorded intents it fulfils: each partition's highest offset merged in.
    covers: Covers,
    not_before: Instant,
}

/// Partition → the highest offset of that partition's updates a fan-out takes in.
pub(in crate::worker) type Covers = BTreeMap<i32, i64>;

/// Candidates' fan-outs: waiting ones, and when each candidate may fan out next.
#[derive(Debug)]
pub(in crate::worker) struct Fanouts {
    pending: BTreeMap<String, Pending>,
    /// When each candidate that fanned out may fan out again, and the members it covered.
    last: HashMap<String, (Instant, usize)>,
    min_interval: Duration,
    members_per_interval: usize,
    /// How many times the interval is stretched (1 ..= [`MAX_STRETCH`]): by the rows waiting to
    /// be written, in windows of `batch.max_pairs`.
    stretch: u32,
}

/// The most a fan-out interval is stretched under load.
pub(in crate::worker) const MAX_STRETCH: u32 = 8;

/// The most candidates one round of fan-outs takes (the longest waiting first): a round is
/// awaited by a rebalance or a stop, and after a takeover thousands of resumed intents are due
/// at once.
pub(in crate::worker) const MAX_ROUND: usize = 1024;

/// A fan-out to run: candidate, as_of, Kafka timestamp for its requests, the intents it fulfils.
type Due = (String, i64, Option<i64>, Covers);

impl Fanouts {
    pub(in crate::worker) fn new(min_interval: Duration, members_per_interval: usize) -> Self {
        Self {
            pending: BTreeMap::new(),
            last: HashMap::new(),
            min_interval,
            members_per_interval: members_per_interval.max(1),
            stretch: 1,
        }
    }

    /// The writer's load: `waiting` rows not yet written (the window being filled and the one
    /// in flight) against windows of `max_pairs`. Each window's worth past the first stretches
    /// the next intervals by one more (at most [`MAX_STRETCH`] times): under load a hot
    /// candidate's updates merge into fewer fan-outs, and fresh member events keep the writer.
    pub(in crate::worker) fn set_load(&mut self, waiting: usize, max_pairs: usize) {
        let windows = waiting / max_pairs.max(1);
        self.stretch = u32::try_from(windows)
            .unwrap_or(u32::MAX)
            .clamp(1, MAX_STRETCH);
    }

    /// One interval per `members_per_interval` members (a hot candidate costs at most that many
    /// rows an interval), stretched by the load. The merged updates' offsets are stored at once
    /// (their intents are recorded), so a long interval delays the candidate's rescoring only.
    fn interval_after(&self, members: usize) -> Duration {
        let n = members.div_ceil(self.members_per_interval).max(1);
        self.min_interval * u32::try_from(n).unwrap_or(u32::MAX) * self.stretch
    }

    /// Merges an applied update of `candidate` (recorded as an intent of `partition` at
    /// `offset`) into its next fan-out.
    pub(in crate::worker) fn add(
        &mut self,
        candidate: String,
        as_of: i64,
        timestamp_ms: Option<i64>,
        (partition, offset): (i32, i64),
        now: Instant,
    ) {
        let not_before = self
            .last
            .get(&candidate)
            .map(|(t, _)| *t)
            .filter(|t| *t > now)
            .unwrap_or(now);
        let p = self.pending.entry(candidate).or_insert(Pending {
            as_of: i64::MIN,
            timestamp_ms: None,
            covers: Covers::new(),
            not_before,
        });
        p.as_of = p.as_of.max(as_of);
        p.timestamp_ms = p.timestamp_ms.max(timestamp_ms);
        let o = p.covers.entry(partition).or_insert(offset);
        *o = (*o).max(offset);
    }

    /// The fan-outs whose interval has passed (at most [`MAX_ROUND`], the longest waiting
    /// first), taken out.
    fn due(&mut self, now: Instant) -> Vec<Due> {
        let mut ready: Vec<(Instant, String)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.not_before <= now)
            .map(|(c, p)| (p.not_before, c.clone()))
            .collect();
        ready.sort_unstable();
        ready.truncate(MAX_ROUND);
        ready
            .into_iter()
            .filter_map(|(_, c)| {
                let p = self.pending.remove(&c)?;
                Some((c, p.as_of, p.timestamp_ms, p.covers))
            })
            .collect()
    }

    /// When the next waiting fan-out may run.
    pub(in crate::worker) fn next_wake(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.not_before).min()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// A candidate's fan-out starts: an update meanwhile waits at least the interval of its
    /// last fan-out's members (the members this one covers are not known yet).
    fn starting(&mut self, candidate: &str, started: Instant) {
        let members = self.last.get(candidate).map_or(0, |(_, n)| *n);
        let next = started + self.interval_after(members);
        self.last.insert(candidate.to_owned(), (next, members));
    }

    /// A candidate's fan-out that started at `started` covered `members`: its next one waits an
    /// interval for each `members_per_interval` of them.
    fn ran(&mut self, candidate: &str, members: usize, started: Instant) {
        let next = started + self.interval_after(members);
        if let Some(p) = self.pending.get_mut(candidate) {
            p.not_before = p.not_before.max(next);
        }
        if self.last.len() > 100_000 {
            let now = Instant::now();
            self.last.retain(|_, (t, _)| *t > now);
        }
        self.last.insert(candidate.to_owned(), (next, members));
    }

    /// Forgets the intents of `partitions` (revoked, or taken by a later owner): the next owner
    /// resumes them; a fan-out left with none is dropped.
    pub(in crate::worker) fn drop_partitions(&mut self, partitions: &HashSet<i32>) {
        self.pending.retain(|_, p| {
            p.covers.retain(|part, _| !partitions.contains(part));
            !p.covers.is_empty()
        });
    }
}

impl Worker {
    /// Applies candidate updates to the shared table and merges each applied one into its
    /// candidate's next fan-out (the loop starts the fan-outs that are due).
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
        let mut recorded: Vec<(FeatureUpdate, MsgRef)> = Vec::new();
        for ((u, mref), a) in updates.into_iter().zip(applied) {
            if matches!(a, Applied::Features(o) if o.applied == 0) && !u.features.is_empty() {
                handled(mref.topic_label, "stale", &mref).emit(&self.metrics);
                self.complete_tracked(&mut st.tracker, &[mref], false);
                continue;
            }
            recorded.push((u, mref));
        }
        if recorded.is_empty() {
            return;
        }
        // The intents are recorded before the offsets are stored: a fan-out waiting for its
        // interval holds no offset, and a crash leaves it to the partition's next owner.
        let intents: Vec<(i32, &str, i64, i64)> = recorded
            .iter()
            .map(|(u, m)| (m.tp.1, u.id.as_str(), u.ts, m.offset))
            .collect();
        if self
            .attempt(&mut st.fatal, "record fan-out intents", hard_stop, || {
                self.store.fanout_intents(true, &intents)
            })
            .await
            .is_none()
        {
            // Not recorded: the offsets stay unstored and the messages are replayed.
            return;
        }
        let now = Instant::now();
        for (u, mref) in recorded {
            handled(mref.topic_label, "applied", &mref).emit(&self.metrics);
            st.fanouts
                .add(u.id, u.ts, mref.timestamp_ms, (mref.tp.1, mref.offset), now);
            self.complete_tracked(&mut st.tracker, &[mref], false);
        }
    }

    /// Takes in the fan-out intents recorded for the feature-updates partitions assigned here
    /// and not taken in yet (a previous owner's, unfinished when it stopped, crashed or gave the
    /// partition up). The assignment is read from the consumer's own record, so a lost rebalance
    /// event delays this by a second at most.
    pub(super) async fn resume_owned_fanouts(&self, st: &mut Owned, hard_stop: &CancellationToken) {
        let topic = &self.settings.topics.feature_updates;
        let (assigned, _) = self.shared.snapshot();
        let now: HashSet<i32> = assigned
            .iter()
            .filter(|(t, p)| t == topic && !st.fenced.contains_key(p))
            .map(|(_, p)| *p)
            .collect();
        st.resumed.retain(|p| now.contains(p));
        let mut new: Vec<i32> = now.difference(&st.resumed).copied().collect();
        new.sort_unstable();
        for p in new {
            let Some(intents) = self
                .attempt(&mut st.fatal, "resume fan-out intents", hard_stop, || {
                    self.store.fanout_intents_of(p)
                })
                .await
            else {
                return;
            };
            if !intents.is_empty() {
                tracing::info!(
                    partition = p,
                    fanouts = intents.len(),
                    "resuming recorded fan-outs"
                );
            }
            let at = Instant::now();
            for (candidate, as_of, offset) in intents {
                st.fanouts.add(candidate, as_of, None, (p, offset), at);
            }
            st.resumed.insert(p);
        }
    }

    /// Starts every fan-out whose interval has passed on a task of its own (None: none due):
    /// intake goes on while its members are read from the reverse index and its requests
    /// produced. One runs at a time; updates meanwhile merge into the next.
    pub(super) fn start_fanouts(
        &self,
        st: &mut Owned,
        hard_stop: &CancellationToken,
    ) -> Option<Fanning> {
        let started = Instant::now();
        let fan = st.fanouts.due(started);
        if fan.is_empty() {
            return None;
        }
        for (candidate, ..) in &fan {
            st.fanouts.starting(candidate, started);
        }
        let jobs: Vec<(String, i64, Option<i64>)> = fan
            .iter()
            .map(|(c, as_of, ts, _)| (c.clone(), *as_of, *ts))
            .collect();
        let fulfils: Vec<(i32, String, i64)> = fan
            .iter()
            .flat_map(|(c, _, _, covers)| covers.iter().map(|(p, o)| (*p, c.clone(), *o)))
            .collect();
        let run = FanoutRun {
            store: self.store.clone(),
            producer: self.producer.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            give_up: self.give_up_after(),
            hard_stop: hard_stop.clone(),
            topic: self.settings.topics.rescore_requests.clone(),
            chunk: self.settings.batch.fanout_chunk,
            partitions: st.partitions,
        };
        Some(Fanning {
            fan,
            started,
            handle: tokio::spawn(run.run(jobs, fulfils)),
        })
    }

    /// Waits for the fan-out in flight, if any, and finishes it (a rebalance, a shutdown).
    pub(super) async fn finish_fanning(&self, st: &mut Owned, fanning: &mut Option<Fanning>) {
        if let Some(mut f) = fanning.take() {
            let result = f.wait().await;
            self.finish_fanouts(st, f, result);
        }
    }

    /// A fan-out ended: its candidates' intervals follow the members it covered.
    pub(super) fn finish_fanouts(
        &self,
        st: &mut Owned,
        f: Fanning,
        result: Result<HashMap<String, usize>, Stop>,
    ) {
        let covered = match result {
            Ok(c) => c,
            // Hard stop: nothing acknowledged, replayed later.
            Err(Stop::Cancelled) => return,
            Err(Stop::Fatal(e)) => {
                st.fatal.get_or_insert(e);
                return;
            }
        };
        tracing::debug!(
            candidates = f.fan.len(),
            members = covered.values().sum::<usize>(),
            fan_out_us = f.started.elapsed().as_micros() as u64,
            "fan-out produced"
        );
        for (candidate, ..) in f.fan {
            let members = covered.get(&candidate).copied().unwrap_or(0);
            st.fanouts.ran(&candidate, members, f.started);
        }
    }
}

/// Fan-outs running on their task.
pub(in crate::worker) struct Fanning {
    fan: Vec<Due>,
    started: Instant,
    handle: JoinHandle<Result<HashMap<String, usize>, Stop>>,
}

impl Fanning {
    /// Stops the task (a fatal exit: its messages are replayed).
    pub(in crate::worker) fn abort(self) {
        self.handle.abort();
    }

    /// The members each candidate's fan-out covered (a panicked task is fatal).
    pub(in crate::worker) async fn wait(&mut self) -> Result<HashMap<String, usize>, Stop> {
        match (&mut self.handle).await {
            Ok(r) => r,
            Err(e) => Err(Stop::Fatal(anyhow::anyhow!("the fan-out task failed: {e}"))),
        }
    }
}

/// What a fan-out task needs of the worker.
struct FanoutRun {
    store: Store,
    producer: FutureProducer,
    metrics: Metrics,
    health: Arc<Health>,
    give_up: Duration,
    hard_stop: CancellationToken,
    topic: String,
    chunk: usize,
    partitions: i32,
}

impl FanoutRun {
    /// Every candidate's requests produced (all candidates' scans advance together: one Redis
    /// round trip and one round of produce acknowledgements a chunk), then the intents they
    /// fulfil cleared (each only up to the offset this round took in: a later update's stays);
    /// the members each covered.
    async fn run(
        self,
        jobs: Vec<(String, i64, Option<i64>)>,
        fulfils: Vec<(i32, String, i64)>,
    ) -> Result<HashMap<String, usize>, Stop> {
        let n = self.partitions;
        // (candidate, as_of, timestamp, cursor, members covered)
        let mut active: Vec<(String, i64, Option<i64>, u64, usize)> = jobs
            .into_iter()
            .map(|(c, as_of, ts)| (c, as_of, ts, 0, 0))
            .collect();
        let mut covered: HashMap<String, usize> = HashMap::new();
        while !active.is_empty() {
            let scans: Vec<(&str, u64)> = active
                .iter()
                .map(|(c, _, _, k, _)| (c.as_str(), *k))
                .collect();
            let chunks = retry(
                "scan reverse index",
                &self.metrics,
                &self.health,
                self.give_up,
                &self.hard_stop,
                || self.store.scan_reverse_many(&scans, self.chunk),
            )
            .await?;
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
                        topic: self.topic.clone(),
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
            match produce_acked(&self.producer, records, &self.hard_stop).await {
                Ok(()) => {}
                Err(None) => return Err(Stop::Cancelled),
                Err(Some(fatal)) => return Err(Stop::Fatal(fatal)),
            }
            active.retain(|(.., cursor, _)| *cursor != 0);
        }
        let intents: Vec<(i32, &str, i64, i64)> = fulfils
            .iter()
            .map(|(p, c, o)| (*p, c.as_str(), 0, *o))
            .collect();
        retry(
            "clear fan-out intents",
            &self.metrics,
            &self.health,
            self.give_up,
            &self.hard_stop,
            || self.store.fanout_intents(false, &intents),
        )
        .await?;
        Ok(covered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_candidate_fans_out_once_per_interval_and_its_updates_merge() {
        let mut f = Fanouts::new(Duration::from_secs(1), 250);
        let now = Instant::now();
        f.add("hot".into(), 10, None, (0, 0), now);
        let due = f.due(now);
        assert_eq!(due.len(), 1, "a first fan-out runs at once");
        f.ran("hot", 600, now);
        f.add("hot".into(), 20, None, (0, 1), now);
        f.add("hot".into(), 15, None, (0, 2), now);
        f.add("cold".into(), 5, None, (0, 3), now);
        let due = f.due(now);
        assert_eq!(due.len(), 1, "only the cold candidate runs now");
        assert_eq!(due[0].0, "cold");
        // 600 members: three intervals.
        assert_eq!(f.next_wake(), Some(now + Duration::from_secs(3)));
        tokio::time::advance(Duration::from_secs(3)).await;
        let due = f.due(Instant::now());
        assert_eq!(due.len(), 1);
        let (c, as_of, _, covers) = &due[0];
        assert_eq!(
            (c.as_str(), *as_of, covers.clone()),
            ("hot", 20, Covers::from([(0, 2)])),
            "merged as of the latest, fulfilling the partition's intents up to its last offset"
        );
        assert!(f.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_update_during_a_running_fan_out_waits_for_its_interval() {
        let mut f = Fanouts::new(Duration::from_secs(1), 250);
        let start = Instant::now();
        f.add("hot".into(), 10, None, (0, 0), start);
        assert_eq!(f.due(start).len(), 1);
        f.starting("hot", start);
        tokio::time::advance(Duration::from_millis(300)).await;
        f.add("hot".into(), 20, None, (0, 1), Instant::now());
        assert!(
            f.due(Instant::now()).is_empty(),
            "it does not run again while the first one is in flight"
        );
        assert_eq!(f.next_wake(), Some(start + Duration::from_secs(1)));
        // The running fan-out covered 600 members: three intervals from its start.
        f.ran("hot", 600, start);
        assert_eq!(f.next_wake(), Some(start + Duration::from_secs(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn intervals_stretch_with_the_rows_waiting_to_be_written() {
        let mut f = Fanouts::new(Duration::from_secs(1), 250);
        let now = Instant::now();
        f.set_load(500, 1024);
        f.ran("light", 10, now);
        f.set_load(3 * 1024 + 1, 1024);
        f.ran("loaded", 10, now);
        f.set_load(100 * 1024, 1024);
        f.ran("overloaded", 600, now);
        f.set_load(0, 1024);
        for c in ["light", "loaded", "overloaded"] {
            f.add(c.into(), 1, None, (0, 0), now);
        }
        let wake = |f: &Fanouts, c: &str| f.pending[c].not_before - now;
        assert_eq!(wake(&f, "light"), Duration::from_secs(1));
        assert_eq!(wake(&f, "loaded"), Duration::from_secs(3));
        assert_eq!(
            wake(&f, "overloaded"),
            Duration::from_secs(3 * u64::from(MAX_STRETCH)),
            "three intervals for 600 members, stretched at most MAX_STRETCH times"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_takes_the_longest_waiting_and_at_most_max_round() {
        let mut f = Fanouts::new(Duration::from_secs(1), 250);
        let start = Instant::now();
        f.add(
            "late".into(),
            1,
            None,
            (1, 7),
            start + Duration::from_secs(1),
        );
        for i in 0..MAX_ROUND {
            f.add(format!("c{i:05}"), 1, None, (0, i as i64), start);
        }
        f.add("c00000".into(), 2, None, (1, 3), start);
        tokio::time::advance(Duration::from_secs(2)).await;
        let due = f.due(Instant::now());
        assert_eq!(due.len(), MAX_ROUND);
        assert!(due.iter().all(|(c, ..)| c != "late"), "it waited least");
        assert_eq!(
            due.iter()
                .find(|(c, ..)| c == "c00000")
                .map(|d| d.3.clone()),
            Some(Covers::from([(0, 0), (1, 3)])),
            "intents of two partitions"
        );
        assert_eq!(
            f.due(Instant::now()).len(),
            1,
            "the next round takes the rest"
        );
    }

    #[test]
    fn a_revoked_partitions_intents_leave_their_fan_outs() {
        let mut f = Fanouts::new(Duration::from_secs(1), 250);
        let now = Instant::now();
        f.ran("c", 10, now);
        f.add("c".into(), 1, None, (0, 0), now);
        f.drop_partitions(&HashSet::from([0]));
        assert!(f.is_empty(), "its only intent was the revoked partition's");
    }
}
