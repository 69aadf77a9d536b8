//! Intake: a run of messages is decoded (invalid ones dead-lettered), applied to Redis in one
//! round trip, and its triggers folded into the lane's window or jobs.

use std::time::Duration;

use futures::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::Message;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use super::retry::{retry, Stop};
use super::{Lane, Run, Source, Worker, INITIAL_MEMBER_WEIGHT, MAX_INTAKE};
use crate::coalesce::MsgRef;
use crate::consume::Ctx;
use crate::decode::{decode, Entity, Event};
use crate::internal_events::EventHandled;
use crate::offsets::{Received, Tp};
use crate::store::Applied;

impl Worker {
    /// Decodes a run of messages, dead-letters the invalid ones, applies the rest to Redis in one
    /// round trip (in order), then folds their triggers into the window or the jobs.
    pub(super) async fn handle_batch(
        &self,
        run: &mut Run,
        msgs: &[BorrowedMessage<'_>],
        source: Source,
        hard_stop: &CancellationToken,
    ) {
        // Input is pending from now on, even if this intake then waits on Redis for long (the
        // loop's once-a-second check does not run meanwhile): `/healthz` can see a stall.
        if !msgs.is_empty() {
            self.health.set_pending(true, super::chrono_now_ms());
        }
        let mut valid: Vec<(Event, MsgRef)> = Vec::with_capacity(msgs.len());
        // Read already `catchup.lag_ms` behind (0: only split partitions' backlog is behind).
        let lag_ms = self.settings.catchup.lag_ms as i64;
        let late_before = (lag_ms > 0).then(|| super::chrono_now_ms() - lag_ms);
        for msg in msgs {
            let tp: Tp = (msg.topic().to_owned(), msg.partition());
            let Some(&kind) = run.kinds.get(msg.topic()) else {
                continue;
            };
            let timestamp_ms = msg.timestamp().to_millis();
            let lane = match source {
                Source::Group => match run.tracker.received(&tp, msg.offset(), timestamp_ms) {
                    Received::Live => Lane::Live,
                    Received::Backlog => Lane::Backlog,
                    Received::Duplicate => continue,
                },
                Source::Head if run.tracker.received_head(&tp, msg.offset(), timestamp_ms) => {
                    Lane::Live
                }
                // Not taken from the head reader: the group's reader covers it.
                Source::Head => continue,
            };
            let mref = MsgRef {
                tp,
                offset: msg.offset(),
                timestamp_ms,
                topic_label: kind.label(),
                backlog: lane == Lane::Backlog,
                late: matches!((timestamp_ms, late_before), (Some(t), Some(b)) if t <= b),
                acked: false,
            };
            match decode(kind, msg.payload()) {
                Ok(ev) => valid.push((ev, mref)),
                Err(e) => {
                    match self.dead_letter(msg, &e.0, hard_stop).await {
                        Ok(sent) => {
                            if sent.truncated {
                                self.metrics.dlq_truncated_total.inc();
                            }
                        }
                        // Not acknowledged by the broker: stays uncommitted, replayed.
                        Err(None) => return,
                        Err(Some(fatal)) => {
                            run.fatal.get_or_insert(fatal);
                            return;
                        }
                    }
                    EventHandled {
                        topic: kind.label(),
                        outcome: "dead_lettered",
                        partition: msg.partition(),
                        offset: msg.offset(),
                        reason: Some(&e.0),
                    }
                    .emit(&self.metrics);
                    self.complete(run, &[mref], false);
                }
            }
        }
        if valid.is_empty() {
            return;
        }
        let refs: Vec<(&Event, i64)> = valid.iter().map(|(e, m)| (e, m.offset)).collect();
        let top_n = self.settings.output.top_n;
        let applied = match retry(
            "apply",
            &self.metrics,
            &self.health,
            self.give_up_after(),
            hard_stop,
            || self.store.apply(&refs, top_n),
        )
        .await
        {
            Ok(applied) => applied,
            // Hard stop during an outage: nothing acknowledged, replayed later.
            Err(Stop::Cancelled) => return,
            Err(Stop::Fatal(e)) => {
                run.fatal.get_or_insert(e);
                return;
            }
        };
        // Candidate updates whose fan-outs go to the jobs: their intents are recorded first.
        let mut fanouts: Vec<(Lane, String, i64, MsgRef)> = Vec::new();
        for ((event, mref), applied) in valid.into_iter().zip(applied) {
            let lane = if mref.backlog {
                Lane::Backlog
            } else {
                Lane::Live
            };
            let handled = |outcome| EventHandled {
                topic: mref.topic_label,
                outcome,
                partition: mref.tp.1,
                offset: mref.offset,
                reason: None,
            };
            match (event, applied) {
                (Event::Features(u), Applied::Features(out)) => {
                    if out.applied == 0 && !u.features.is_empty() {
                        handled("stale").emit(&self.metrics);
                        self.complete(run, &[mref], false);
                        continue;
                    }
                    handled("applied").emit(&self.metrics);
                    match u.entity {
                        Entity::Member if lane == Lane::Backlog => {
                            run.backlog_hold.member(&mut run.backlog, &u.id, u.ts, mref)
                        }
                        Entity::Member => {
                            let w = run.window_mut(lane);
                            w.member(&u.id, u.ts);
                            w.message(mref);
                        }
                        Entity::Candidate => fanouts.push((lane, u.id, u.ts, mref)),
                    }
                }
                (Event::Upsert(u), Applied::Pair(true)) => {
                    handled("applied").emit(&self.metrics);
                    if lane == Lane::Backlog {
                        let (m, c) = (&u.member_id, &u.candidate_id);
                        run.backlog_hold.pair(&mut run.backlog, m, c, u.ts, mref);
                    } else {
                        let w = run.window_mut(lane);
                        w.pair(&u.member_id, &u.candidate_id, u.ts);
                        w.message(mref);
                    }
                }
                (Event::Remove(_), Applied::Pair(true)) => {
                    handled("applied").emit(&self.metrics);
                    self.complete(run, &[mref], false);
                }
                (Event::Upsert(_) | Event::Remove(_), _) => {
                    handled("stale").emit(&self.metrics);
                    self.complete(run, &[mref], false);
                }
                (Event::Tick(t), _) => {
                    let shards = self.tick_shards(run, &mref.tp.0, mref.tp.1).await;
                    handled("applied").emit(&self.metrics);
                    run.jobs_mut(lane).tick(shards, t.ts, mref);
                }
                (Event::Features(_), other) => {
                    tracing::error!(
                        ?other,
                        "broken invariant: a feature update applied as something else"
                    );
                }
            }
        }
        if !fanouts.is_empty() {
            self.record_fanouts(run, fanouts, hard_stop).await;
        }
    }

    /// Records the fan-out intents of candidate updates in Redis, then stores their offsets and
    /// queues the fan-outs: a fan-out waiting for its interval or a free slot no longer holds its
    /// messages' offsets (the lag it pinned was the fan-out's, not the partition's). After a
    /// crash or a rebalance the partition's next owner resumes the recorded fan-outs.
    async fn record_fanouts(
        &self,
        run: &mut Run,
        fanouts: Vec<(Lane, String, i64, MsgRef)>,
        hard_stop: &CancellationToken,
    ) {
        let intents: Vec<(i32, &str, i64, i64)> = fanouts
            .iter()
            .map(|(_, c, ts, m)| (m.tp.1, c.as_str(), *ts, m.offset))
            .collect();
        match retry(
            "fanout intents",
            &self.metrics,
            &self.health,
            self.give_up_after(),
            hard_stop,
            || self.store.fanout_intents(true, &intents),
        )
        .await
        {
            Ok(()) => {}
            // Not recorded: their offsets stay unstored and the messages are replayed.
            Err(Stop::Cancelled) => return,
            Err(Stop::Fatal(e)) => {
                run.fatal.get_or_insert(e);
                return;
            }
        }
        for (lane, candidate, ts, mref) in fanouts {
            self.complete(run, std::slice::from_ref(&mref), false);
            let mref = MsgRef {
                acked: true,
                ..mref
            };
            run.jobs_mut(lane).fanout(&candidate, ts, mref);
        }
    }

    /// Queues the fan-outs recorded for newly assigned partitions of the feature-updates topic
    /// (a previous owner's, unfinished when it crashed or gave the partition up). False when it
    /// stopped before loading them all (hard stop, fatal).
    pub(super) async fn resume_fanouts(
        &self,
        run: &mut Run,
        partitions: &[i32],
        hard_stop: &CancellationToken,
    ) -> bool {
        for &p in partitions {
            let loaded = retry(
                "resume fanouts",
                &self.metrics,
                &self.health,
                self.give_up_after(),
                hard_stop,
                || self.store.fanout_intents_of(p),
            )
            .await;
            match loaded {
                Ok(intents) => {
                    if !intents.is_empty() {
                        tracing::info!(
                            partition = p,
                            fanouts = intents.len(),
                            "resuming recorded fan-outs"
                        );
                    }
                    for (candidate, ts, offset) in intents {
                        run.jobs.resume_fanout(&candidate, ts, p, offset);
                    }
                }
                Err(Stop::Cancelled) => return false,
                Err(Stop::Fatal(e)) => {
                    run.fatal.get_or_insert(e);
                    return false;
                }
            }
        }
        true
    }

    /// The decay-schedule shards a tick on `partition` covers: s with s mod partitions = p.
    async fn tick_shards(&self, run: &mut Run, topic: &str, partition: i32) -> Vec<u32> {
        let known = run.tick_partitions.filter(|n| partition < *n);
        let n = match known {
            Some(n) => n,
            None => {
                let consumer = self.consumer.clone();
                let topic = topic.to_owned();
                let n = tokio::task::spawn_blocking(move || {
                    consumer
                        .fetch_metadata(Some(&topic), Duration::from_secs(10))
                        .ok()
                        .and_then(|md| md.topics().first().map(|t| t.partitions().len() as i32))
                })
                .await
                .ok()
                .flatten()
                .filter(|n| *n > partition)
                .unwrap_or(partition + 1);
                run.tick_partitions = Some(n);
                n
            }
        };
        (0..self.store.keys().shards())
            .filter(|s| (*s as i32) % n == partition)
            .collect()
    }

    /// Sends to the DLQ until the broker acknowledges: Err(None) when the hard stop fires first,
    /// Err(Some) when no retry can succeed (the worker exits so the orchestrator restarts it).
    pub(super) async fn dead_letter(
        &self,
        msg: &BorrowedMessage<'_>,
        reason: &str,
        hard_stop: &CancellationToken,
    ) -> Result<crate::dlq::Sent, Option<anyhow::Error>> {
        let mut delay = Duration::from_millis(100);
        loop {
            match crate::dlq::send(&self.producer, &self.settings.topics.dlq, msg, reason).await {
                Ok(sent) => return Ok(sent),
                Err(e @ crate::dlq::DlqError::Fatal { .. }) => {
                    tracing::error!(error = %e, "dead-letter write can never succeed; exiting");
                    return Err(Some(e.into()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "dead-letter write failed; retrying");
                    tokio::select! {
                        _ = hard_stop.cancelled() => return Err(None),
                        _ = sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// `first` and whatever else `consumer` has already fetched, up to `room` messages, so one Redis
/// round trip applies a run of events.
pub(super) fn take_fetched<'a, C: rdkafka::consumer::ConsumerContext + 'static>(
    consumer: &'a StreamConsumer<C>,
    first: BorrowedMessage<'a>,
    room: usize,
) -> Vec<BorrowedMessage<'a>> {
    let mut batch = vec![first];
    while batch.len() < room {
        match consumer.recv().now_or_never() {
            Some(Ok(m)) => batch.push(m),
            _ => break,
        }
    }
    batch
}

impl Worker {
    /// A message from the group's reader, and whatever else it has fetched: one Redis round trip
    /// applies a run of events (bounded by the windows' room).
    pub(super) async fn group_intake(
        &self,
        run: &mut Run,
        consumer: &StreamConsumer<Ctx>,
        msg: rdkafka::error::KafkaResult<BorrowedMessage<'_>>,
        live_cap: usize,
        hard_stop: &CancellationToken,
    ) {
        match msg {
            Ok(first) => {
                let backlog = self.settings.catchup.max_pairs;
                let room = self.intake_room(
                    run,
                    live_cap
                        .saturating_sub(run.window.size())
                        .min(backlog.saturating_sub(run.backlog.size())),
                );
                let batch = take_fetched(consumer, first, room);
                run.head_turn_taken = false;
                run.counts.group_batches += 1;
                run.counts.group_messages += batch.len() as u32;
                self.handle_batch(run, &batch, Source::Group, hard_stop)
                    .await;
                self.catchup_progress(run);
                // A partition far behind is split as soon as its messages show it.
                self.split_lagging(run);
            }
            Err(e) => {
                tracing::warn!(error = %e, "consumer error; librdkafka retries");
                sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Messages to take for `rows` of room in a window. Counting each message as one row lets a
    /// window of member updates overshoot (each costs many rows), which is cheaper than the extra
    /// Redis round trips of smaller intake batches (measured: a third fewer events/s); merging
    /// bounds it to the members' pairs. With coalescing off nothing merges, so each message
    /// counts as a member's pairs (else one intake could put 512 member-wide rescorings in a
    /// window, and the window's rows, hence memory, grow without bound).
    pub(super) fn intake_room(&self, run: &Run, rows: usize) -> usize {
        let per_message = if self.settings.batch.coalesce {
            1
        } else {
            run.member_weight
                .map_or(INITIAL_MEMBER_WEIGHT, |w| w.round() as usize)
                .max(1)
        };
        (rows / per_message).clamp(1, MAX_INTAKE)
    }
}
