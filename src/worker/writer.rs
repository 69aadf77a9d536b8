//! Handing windows to the writer: a taken window is loaded, scored and written on a task of its
//! own; when it ends, its messages (and those of jobs it finished) are acknowledged.

use tokio_util::sync::CancellationToken;

use super::retry::{retry, Stop};
use super::{chrono_now_ms, Lane, Run, Worker};
use crate::coalesce::MsgRef;
use crate::flush::{FlushStats, Flusher};
use crate::internal_events::ScoresWritten;
use crate::store::StoreError;

pub(super) type FlushResult =
    Result<Result<(FlushStats, Vec<MsgRef>), Stop>, tokio::task::JoinError>;

/// The window being written.
pub(super) struct InFlight {
    pub(super) seq: u64,
    pub(super) lane: Lane,
    pub(super) handle: tokio::task::JoinHandle<Result<(FlushStats, Vec<MsgRef>), Stop>>,
}

impl Worker {
    /// Takes the current window and writes it on a task of its own, so intake (decode and
    /// apply) goes on while it loads, scores and writes. One window is written at a time, in
    /// order: a later window reads state after the earlier one's writes and wins every tie.
    pub(super) fn start_flush(
        &self,
        run: &mut Run,
        lane: Lane,
        hard_stop: &CancellationToken,
    ) -> InFlight {
        let window = run.window_mut(lane).take();
        match lane {
            Lane::Live => run.counts.live_windows += 1,
            Lane::Backlog => run.counts.backlog_windows += 1,
        }
        run.seq += 1;
        // Each lane's jobs put their chunks in that lane's window.
        match lane {
            Lane::Live => run.jobs.window_taken(run.seq),
            Lane::Backlog => run.backlog_jobs.window_taken(run.seq),
        }
        let (store, scorer, settings) = (
            self.store.clone(),
            self.scorer.clone(),
            self.settings.clone(),
        );
        let (metrics, health, hard_stop) =
            (self.metrics.clone(), self.health.clone(), hard_stop.clone());
        let give_up = self.give_up_after();
        let handle = tokio::spawn(async move {
            let flusher = Flusher {
                store: &store,
                scorer: &scorer,
                output: &settings.output,
                decay: &settings.decay,
                max_pairs: settings.batch.max_pairs,
            };
            let stats = retry("flush", &metrics, &health, give_up, &hard_stop, || async {
                flusher
                    .flush(&window, chrono_now_ms())
                    .await
                    .map_err(|e| match e {
                        crate::flush::FlushError::Store(s) => s,
                        crate::flush::FlushError::Model(m) => {
                            StoreError::Protocol(format!("model: {m}"))
                        }
                    })
            })
            .await?;
            Ok((stats, window.messages))
        });
        InFlight {
            seq: run.seq,
            lane,
            handle,
        }
    }

    /// A window's write ended: acknowledges its messages and those of jobs it finished.
    pub(super) fn finish_flush(&self, run: &mut Run, seq: u64, lane: Lane, result: FlushResult) {
        let (stats, mut msgs) = match result {
            Ok(Ok(done)) => done,
            // Hard stop during an outage: nothing acknowledged, replayed by the next owner. The
            // jobs whose chunks were in it are dropped: a later window's write must not finish
            // them (their intents stay recorded, their ticks unacknowledged).
            Ok(Err(Stop::Cancelled)) => {
                self.window_lost(run, seq);
                return;
            }
            Ok(Err(Stop::Fatal(e))) => {
                self.window_lost(run, seq);
                run.fatal.get_or_insert(e);
                return;
            }
            Err(e) => {
                // A panic in the write or the model: nothing of it is acknowledged, and going on
                // would leave its messages pinned for good. Exit to be restarted.
                self.window_lost(run, seq);
                run.fatal
                    .get_or_insert(anyhow::anyhow!("flush task failed: {e}"));
                return;
            }
        };
        self.health
            .last_progress_ms
            .store(super::chrono_now_ms(), std::sync::atomic::Ordering::Relaxed);
        run.shares
            .written(lane == Lane::Backlog, stats.pairs_scored);
        // Windows are written one at a time in `seq` order, so every earlier window is written too.
        msgs.extend(run.jobs.window_written(seq));
        msgs.extend(run.backlog_jobs.window_written(seq));
        let mut done = run.jobs.take_done_fanouts();
        done.extend(run.backlog_jobs.take_done_fanouts());
        if !done.is_empty() {
            // Clearing is cleanup: an intent left behind only repeats a finished fan-out after
            // a restart (idempotent), so a failure is logged, not retried.
            let store = self.store.clone();
            tokio::spawn(async move {
                let intents: Vec<(i32, &str, i64, i64)> = done
                    .iter()
                    .map(|(p, c, o)| (*p, c.as_str(), 0, *o))
                    .collect();
                if let Err(e) = store.fanout_intents(false, &intents).await {
                    tracing::warn!(error = %e, fanouts = intents.len(), "clearing finished fan-out intents failed; a restart repeats them");
                }
            });
        }
        if stats.member_triggers > 0 {
            // Windows are sized in estimated rows: follow the recent pairs per member.
            let seen = stats.member_rows as f64 / stats.member_triggers as f64;
            let weight = run.member_weight.map_or(seen, |w| 0.8 * w + 0.2 * seen);
            run.member_weight = Some(weight);
            let w = (weight.round() as usize).clamp(1, self.settings.batch.max_pairs);
            run.window.set_member_weight(w);
            run.backlog.set_member_weight(w);
        }
        ScoresWritten {
            stats: &stats,
            messages: msgs.len(),
            lane: match lane {
                Lane::Live => "live",
                Lane::Backlog => "backlog",
            },
        }
        .emit(&self.metrics);
        self.complete(run, &msgs, true);
    }

    /// Window `seq` will never be written: its jobs go (see [`crate::expand::Jobs::window_lost`]).
    fn window_lost(&self, run: &mut Run, seq: u64) {
        let dropped = run.jobs.window_lost(seq) + run.backlog_jobs.window_lost(seq);
        if dropped > 0 {
            tracing::warn!(
                window = seq,
                jobs = dropped,
                "window not written: its fan-outs and ticks are left for replay"
            );
        }
    }

    /// Writes the current window and waits for it (shutdown).
    pub(super) async fn flush_now(&self, run: &mut Run, lane: Lane, hard_stop: &CancellationToken) {
        let f = self.start_flush(run, lane, hard_stop);
        let result = f.handle.await;
        self.finish_flush(run, f.seq, f.lane, result);
    }
}
