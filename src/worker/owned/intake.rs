//! Intake of the owned loop: route each message to its owner, load the members it touches (once),
//! apply it in memory, and fold its triggers into the window. Candidate updates are applied to the
//! shared candidate table and fanned out as rescore requests to their members' owners.

use std::collections::HashSet;

use rdkafka::message::BorrowedMessage;
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

use super::{
    decode_input, fresh, handled, is_forwarded, label, member_of, produce_acked, Decoded, Input,
    OutRecord, Owned, TickJob,
};
use crate::coalesce::MsgRef;
use crate::decode::{Entity, Event, FeatureUpdate};
use crate::internal_events::EventHandled;
use crate::owned::cache::Member;
use crate::owned::route::{partition_of, RescoreRequest};
use crate::store::{Loaded, PairState};
use crate::worker::Worker;

/// Most members loaded in one round trip.
const LOAD_CHUNK: usize = 512;

impl Worker {
    pub(super) async fn intake_owned(
        &self,
        st: &mut Owned,
        msgs: &[BorrowedMessage<'_>],
        hard_stop: &CancellationToken,
    ) {
        let n = st.partitions;
        let mut events: Vec<(Event, MsgRef)> = Vec::new();
        let mut candidate_updates: Vec<(FeatureUpdate, MsgRef)> = Vec::new();
        let mut requests: Vec<(RescoreRequest, MsgRef)> = Vec::new();
        let mut forwards: Vec<(OutRecord, MsgRef)> = Vec::new();
        for msg in msgs {
            let Some(&input) = st.kinds.get(msg.topic()) else {
                continue;
            };
            // A partition a later owner took: left to it.
            if st.fenced.contains_key(&msg.partition()) {
                continue;
            }
            let tp = (msg.topic().to_owned(), msg.partition());
            let timestamp_ms = msg.timestamp().to_millis();
            if !fresh(st.tracker.received(&tp, msg.offset(), timestamp_ms)) {
                continue;
            }
            let mref = MsgRef {
                tp,
                offset: msg.offset(),
                timestamp_ms,
                topic_label: label(input),
                backlog: false,
                late: false,
                acked: false,
            };
            let topic = match input {
                Input::Events(k) => k.label(),
                Input::Requests => "rescore_requests",
            };
            // Taken in: a message's outcome may be logged after later ones' (a candidate update's
            // after the member events of its intake), or not at all if the worker dies first.
            tracing::debug!(
                target: "rescorer::internal_events",
                topic,
                partition = mref.tp.1,
                offset = mref.offset,
                "message received"
            );
            let reason = match decode_input(input, msg.payload()) {
                Ok(Decoded::Request(r)) => {
                    requests.push((r, mref));
                    continue;
                }
                Ok(Decoded::Event(Event::Tick(t))) => {
                    handled(topic, "applied", &mref).emit(&self.metrics);
                    st.ticks
                        .push_back(TickJob::new(msg.partition(), t.ts, mref));
                    continue;
                }
                Ok(Decoded::Event(Event::Features(u))) if u.entity == Entity::Candidate => {
                    candidate_updates.push((u, mref));
                    continue;
                }
                Ok(Decoded::Event(ev)) => {
                    let owner = partition_of(member_of(&ev).unwrap_or_default(), n);
                    if owner == msg.partition() {
                        events.push((ev, mref));
                        continue;
                    }
                    if !is_forwarded(msg) {
                        forwards.push((OutRecord::forward(msg, owner), mref));
                        continue;
                    }
                    format!(
                        "forwarded to partition {} but its member's partition is {owner}: did the partition count change?",
                        msg.partition()
                    )
                }
                Err(reason) => reason,
            };
            match self.dead_letter(msg, &reason, hard_stop).await {
                Ok(sent) => {
                    if sent.truncated {
                        self.metrics.dlq_truncated_total.inc();
                    }
                }
                Err(None) => return,
                Err(Some(fatal)) => {
                    st.fatal.get_or_insert(fatal);
                    return;
                }
            }
            EventHandled {
                topic,
                outcome: "dead_lettered",
                partition: mref.tp.1,
                offset: mref.offset,
                reason: Some(&reason),
            }
            .emit(&self.metrics);
            self.complete_tracked(&mut st.tracker, &[mref], false);
        }

        if !forwards.is_empty() {
            let (records, refs): (Vec<_>, Vec<_>) = forwards.into_iter().unzip();
            match produce_acked(&self.producer, records, hard_stop).await {
                Ok(()) => {
                    for m in &refs {
                        handled(m.topic_label, "forwarded", m).emit(&self.metrics);
                    }
                    self.complete_tracked(&mut st.tracker, &refs, false);
                }
                Err(None) => return,
                Err(Some(fatal)) => {
                    st.fatal.get_or_insert(fatal);
                    return;
                }
            }
        }

        // Every member this run touches, loaded once (a cached member costs no read).
        let mut wanted: Vec<String> = events
            .iter()
            .filter_map(|(e, _)| member_of(e).map(str::to_owned))
            .collect();
        for (r, m) in &requests {
            wanted.extend(
                r.members
                    .iter()
                    .filter(|x| partition_of(x, n) == m.tp.1)
                    .cloned(),
            );
        }
        let (n_events, n_requests, n_updates) =
            (events.len(), requests.len(), candidate_updates.len());
        let started = std::time::Instant::now();
        if !self.ensure_loaded(st, wanted, hard_stop).await {
            return;
        }
        let loaded = started.elapsed();
        let size0 = st.window.size();
        self.apply_owned(st, events, hard_stop).await;
        if st.fatal.is_some() {
            return;
        }
        let applied = started.elapsed();
        let size1 = st.window.size();
        let request_members: usize = requests.iter().map(|(r, _)| r.members.len()).sum();
        self.requests_owned(st, requests, hard_stop).await;
        let requested = started.elapsed();
        let size2 = st.window.size();
        if !candidate_updates.is_empty() && st.fatal.is_none() {
            self.fan_out(st, candidate_updates, hard_stop).await;
        }
        tracing::debug!(
            messages = msgs.len(),
            events = n_events,
            requests = n_requests,
            candidate_updates = n_updates,
            load_us = loaded.as_micros() as u64,
            apply_us = (applied - loaded).as_micros() as u64,
            requests_us = (requested - applied).as_micros() as u64,
            candidates_us = (started.elapsed() - requested).as_micros() as u64,
            window_from_events = size1.saturating_sub(size0),
            request_members,
            window_from_requests = size2.saturating_sub(size1),
            "intake"
        );
    }

    /// Loads the members not cached yet (taking this worker's generation of their partitions),
    /// then the features of their candidates not known yet. False when stopped (hard stop, fatal).
    pub(super) async fn ensure_loaded(
        &self,
        st: &mut Owned,
        mut members: Vec<String>,
        hard_stop: &CancellationToken,
    ) -> bool {
        let n = st.partitions;
        members.sort_unstable();
        members.dedup();
        members.retain(|m| !st.cache.contains(m) && !st.fenced.contains_key(&partition_of(m, n)));
        for chunk in members.chunks(LOAD_CHUNK) {
            let mut with_gen: Vec<(&str, u64, i32)> = Vec::with_capacity(chunk.len());
            for m in chunk {
                let p = partition_of(m, n);
                if st.fenced.contains_key(&p) {
                    continue;
                }
                match self.generation(st, p, hard_stop).await {
                    Some(g) => with_gen.push((m, g, p)),
                    None => return false,
                }
            }
            let args: Vec<(&str, u64)> = with_gen.iter().map(|(m, g, _)| (*m, *g)).collect();
            let Some(loaded) = self
                .attempt(&mut st.fatal, "load members", hard_stop, || {
                    self.store.load_owned(&args)
                })
                .await
            else {
                return false;
            };
            for ((m, _, p), l) in with_gen.iter().zip(loaded) {
                if st.fenced.contains_key(p) {
                    continue;
                }
                match l {
                    Loaded::Taken(l) => st.cache.insert(m, Member::from_load(*p, *l)),
                    Loaded::Fenced(newer) => st.fence(*p, Some(newer)),
                }
            }
        }
        self.refresh_candidates(st, st.cache.unknown_candidates(), hard_stop)
            .await
    }

    /// Reads the features of these candidates (those a cached member has) from Redis.
    pub(super) async fn refresh_candidates(
        &self,
        st: &mut Owned,
        mut candidates: Vec<String>,
        hard_stop: &CancellationToken,
    ) -> bool {
        candidates.retain(|c| st.cache.has_candidate(c));
        if candidates.is_empty() {
            return true;
        }
        let refs: Vec<&str> = candidates.iter().map(String::as_str).collect();
        let Some(features) = self
            .attempt(&mut st.fatal, "load candidates", hard_stop, || {
                self.store.load_candidates(&refs)
            })
            .await
        else {
            return false;
        };
        for (c, f) in candidates.iter().zip(features) {
            st.cache.set_candidate(c, f);
        }
        true
    }

    /// Applies member events in order to their cached members; pair changes update the reverse
    /// index at once (reading the candidate's features in the same call).
    async fn apply_owned(
        &self,
        st: &mut Owned,
        events: Vec<(Event, MsgRef)>,
        hard_stop: &CancellationToken,
    ) {
        let mut rev: Vec<(String, String, i64, i64, bool)> = Vec::new();
        for (ev, mref) in events {
            let p = mref.tp.1;
            let member = member_of(&ev).unwrap_or_default().to_owned();
            if st.fenced.contains_key(&p) || !st.cache.contains(&member) {
                continue;
            }
            let topic = mref.topic_label;
            let offset = mref.offset;
            let ts = match &ev {
                Event::Features(u) => u.ts,
                Event::Upsert(u) => u.ts,
                Event::Remove(r) => r.ts,
                Event::Tick(t) => t.ts,
            };
            // A member dormant until this event (no decay for `decay.active_horizon_secs`) has
            // all its pairs rescored and scheduled again.
            let woke = st
                .cache
                .get(&member)
                .is_some_and(|m| self.settings.decay.dormant(m.last_event, ts));
            let applied = match &ev {
                Event::Features(u) => {
                    let Some(m) = st.cache.get_mut(&member) else {
                        continue;
                    };
                    let n = m.apply_features(u, offset);
                    let applied = n > 0 || u.features.is_empty();
                    if applied {
                        st.window.member(&member, u.ts);
                    }
                    applied
                }
                Event::Upsert(u) => {
                    let state = PairState {
                        reason: u.reason.clone(),
                        pair_features: u.pair_features.clone(),
                        ts: u.ts,
                        o: offset,
                        rm: false,
                    };
                    let r = st.cache.apply_pair(&member, &u.candidate_id, state);
                    if r.applied {
                        rev.push((u.candidate_id.clone(), member.clone(), u.ts, offset, true));
                        st.window.pair(&member, &u.candidate_id, u.ts);
                    }
                    r.applied
                }
                Event::Remove(r) => {
                    let state = PairState {
                        reason: String::new(),
                        pair_features: Default::default(),
                        ts: r.ts,
                        o: offset,
                        rm: true,
                    };
                    let a = st.cache.apply_pair(&member, &r.candidate_id, state);
                    if a.applied {
                        rev.push((r.candidate_id.clone(), member.clone(), r.ts, offset, false));
                    }
                    a.applied
                }
                Event::Tick(_) => false,
            };
            if applied {
                if woke {
                    st.window.member(&member, ts);
                }
                handled(topic, "applied", &mref).emit(&self.metrics);
                st.touched.insert(member);
                st.window.message(mref);
            } else {
                handled(topic, "stale", &mref).emit(&self.metrics);
                self.complete_tracked(&mut st.tracker, &[mref], false);
            }
        }
        if rev.is_empty() {
            return;
        }
        let n = st.partitions;
        loop {
            rev.retain(|(_, m, ..)| !st.fenced.contains_key(&partition_of(m, n)));
            if rev.is_empty() {
                return;
            }
            let ops: Vec<(&str, &str, i64, i64, bool)> = rev
                .iter()
                .map(|(c, m, t, o, a)| (c.as_str(), m.as_str(), *t, *o, *a))
                .collect();
            let mut gens: Vec<(i32, u64)> = rev
                .iter()
                .filter_map(|(_, m, ..)| {
                    let p = partition_of(m, n);
                    Some((p, *st.gens.get(&p)?))
                })
                .collect();
            gens.sort_unstable();
            gens.dedup();
            let tx = st.tx.clone();
            let applied = self
                .attempt(&mut st.fatal, "reverse index", hard_stop, || {
                    self.store.rev_and_features(&tx, &gens, &ops)
                })
                .await;
            match applied {
                None => return,
                Some(Ok(features)) => {
                    for ((c, ..), f) in rev.iter().zip(features) {
                        st.cache.set_candidate(c, f);
                    }
                    return;
                }
                Some(Err(taken)) => {
                    for p in taken {
                        st.fence(p, None);
                    }
                }
            }
        }
    }

    /// Rescore requests: the listed members' pairs with the candidate, with its features read
    /// again (at least as new as the update that sent the request).
    async fn requests_owned(
        &self,
        st: &mut Owned,
        requests: Vec<(RescoreRequest, MsgRef)>,
        hard_stop: &CancellationToken,
    ) {
        if requests.is_empty() {
            return;
        }
        let n = st.partitions;
        let candidates: HashSet<String> =
            requests.iter().map(|(r, _)| r.candidate.clone()).collect();
        if !self
            .refresh_candidates(st, candidates.into_iter().collect(), hard_stop)
            .await
        {
            return;
        }
        for (r, mref) in requests {
            if st.fenced.contains_key(&mref.tp.1) {
                continue;
            }
            for m in &r.members {
                let owned = partition_of(m, n) == mref.tp.1;
                if owned
                    && st
                        .cache
                        .get(m)
                        .is_some_and(|x| x.live(&r.candidate).is_some())
                {
                    st.window.pair(m, &r.candidate, r.as_of);
                }
            }
            handled("rescore_requests", "applied", &mref).emit(&self.metrics);
            st.window.message(mref);
        }
    }
}
