//! Fan-outs and decay ticks, a chunk at a time, into the lane's window.

use tokio_util::sync::CancellationToken;

use super::retry::{backoff, GiveUp};
use super::{Lane, Run, Worker};

impl Worker {
    /// The most fan-out and tick pairs a fresh window takes: `batch.job_pairs`, never more than
    /// `batch.max_pairs`, and no more than `catchup.job_pairs` while a backlog drains (split
    /// partitions, backlog work queued or held).
    pub(super) fn live_job_pairs(&self, run: &Run) -> usize {
        let b = &self.settings.batch;
        let cap = b.job_pairs.min(b.max_pairs);
        let draining = !run.catching_up.is_empty()
            || !run.backlog.is_empty()
            || !run.backlog_jobs.is_empty()
            || run.backlog_hold.held() > 0;
        if draining {
            cap.min(self.settings.catchup.job_pairs)
        } else {
            cap
        }
    }

    /// Advances one fan-out or tick by a chunk, retrying Redis until the hard stop.
    pub(super) async fn step_jobs(&self, run: &mut Run, lane: Lane, hard_stop: &CancellationToken) {
        let (mut fc, mut tc) = (self.settings.batch.fanout_chunk, self.settings.decay.chunk);
        let cap = self.live_job_pairs(run);
        let mut attempt = 0;
        let mut give_up = GiveUp::new(self.give_up_after());
        let mut stopped = None;
        let (jobs, window) = match lane {
            Lane::Live => (&mut run.jobs, &mut run.window),
            Lane::Backlog => (&mut run.backlog_jobs, &mut run.backlog),
        };
        if lane == Lane::Live {
            // A chunk takes no more than the fresh window has room for jobs.
            let room = cap.saturating_sub(window.size()).max(1);
            (fc, tc) = (fc.min(room), tc.min(room));
        }
        while let Err(e) = jobs.step(&self.store, window, fc, tc).await {
            attempt += 1;
            if let Some(fatal) = give_up.failed("expand", &e) {
                tracing::error!(error = %fatal, "giving up: exiting so the worker is restarted");
                stopped = Some(fatal);
                break;
            }
            if !backoff(
                "expand",
                &e.to_string(),
                attempt,
                &self.metrics,
                &self.health,
                hard_stop,
            )
            .await
            {
                break;
            }
        }
        if let Some(fatal) = stopped {
            run.fatal.get_or_insert(fatal);
        }
    }
}
