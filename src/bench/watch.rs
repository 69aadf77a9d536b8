//! Freshness seen from the producer's side: for member updates the load generator sampled, poll
//! the member's published `as_of` (the meta hash next to its top-N) until it reaches the event's
//! time. Independent of the worker's own histogram; it bounds what a reader of Redis sees.
//!
//! Limit: a member's `as_of` can also reach the event's time through a later event of the same
//! member (a new candidate, a candidate's fan-out) scored first, so a sample is "the member's
//! scores are as of at least this event's time", which is what a reader relies on.

use std::time::{Duration, Instant};

use redis::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cli::loadgen::Watched;
use crate::store::Store;

/// How long to go on watching after the load generator stopped.
const LINGER: Duration = Duration::from_secs(30);

/// Poll period: the resolution of the measurement for a sample younger than
/// `PERIOD` × `RESOLUTION`.
const PERIOD: Duration = Duration::from_millis(2);

/// An older sample is polled once per this fraction of its age (a 2 s old one every 100 ms), so
/// its measure is within 1/`RESOLUTION` of its latency: samples that are never seen (a member
/// with no pair publishes no `as_of`) would otherwise be polled every 2 ms until `give_up`, and
/// those reads took a share of the Redis under test.
const RESOLUTION: u32 = 20;

#[derive(Debug, Default, Clone)]
pub struct Observed {
    /// (seconds since the watch started at send time, send → visible in ms) per sample.
    pub points: Vec<(f64, f64)>,
    pub unobserved: usize,
}

impl Observed {
    /// Quantile `q` of the latencies (ms), 0 when there are none.
    pub fn quantile(&self, q: f64) -> f64 {
        let mut v: Vec<f64> = self.points.iter().map(|p| p.1).collect();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    }
}

/// Watches until `stop` fires and every sample is seen (at most `LINGER` longer); a sample not
/// seen `give_up` after it was sent, or by the end, is counted as unobserved.
pub async fn watch(
    store: Store,
    mut rx: mpsc::UnboundedReceiver<Watched>,
    stop: CancellationToken,
    give_up: Duration,
) -> Observed {
    let started = Instant::now();
    // Samples not seen yet, each with when it is polled next.
    let mut pending: Vec<(Watched, Instant)> = Vec::new();
    let mut out = Observed::default();
    let mut stopped_at: Option<Instant> = None;
    loop {
        while let Ok(w) = rx.try_recv() {
            let at = w.sent;
            pending.push((w, at));
        }
        if stop.is_cancelled() && stopped_at.is_none() {
            stopped_at = Some(Instant::now());
        }
        if stopped_at.is_some_and(|t| pending.is_empty() || t.elapsed() > LINGER) {
            out.unobserved += pending.len();
            return out;
        }
        let polled = Instant::now();
        let due: Vec<usize> = (0..pending.len())
            .filter(|i| pending[*i].1 <= polled)
            .collect();
        if !due.is_empty() {
            let mut pipe = redis::pipe();
            for i in &due {
                pipe.cmd("HGET")
                    .arg(store.keys().meta(&pending[*i].0.member))
                    .arg("as_of");
            }
            let mut conn = store.conn();
            if let Ok(vals) = pipe.query_async::<Vec<Value>>(&mut conn).await {
                let now = Instant::now();
                let mut gone = vec![false; pending.len()];
                for (i, v) in due.into_iter().zip(vals) {
                    let (w, next) = &mut pending[i];
                    let as_of: Option<i64> = redis::from_redis_value(&v).ok().flatten();
                    let age = now.duration_since(w.sent);
                    if as_of.is_some_and(|a| a >= w.ts) {
                        out.points.push((
                            w.sent.duration_since(started).as_secs_f64(),
                            age.as_secs_f64() * 1000.0,
                        ));
                        gone[i] = true;
                    } else if age > give_up {
                        out.unobserved += 1;
                        gone[i] = true;
                    } else {
                        *next = now + (age / RESOLUTION).max(PERIOD);
                    }
                }
                let mut i = 0;
                pending.retain(|_| {
                    i += 1;
                    !gone[i - 1]
                });
            }
        }
        tokio::time::sleep(PERIOD).await;
    }
}

/// Every n-th member update is watched from the producer's side.
pub(super) const WATCH_EVERY: u64 = 5;

/// Starts watching for the scores of sampled member updates of phase `s`.
pub(super) async fn watcher(
    s: &crate::config::Settings,
    give_up: Duration,
) -> anyhow::Result<(
    tokio::sync::mpsc::UnboundedSender<crate::cli::loadgen::Watched>,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<Observed>,
)> {
    let store = super::ceilings::scratch_store(s, &s.output.key_prefix).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(watch(store, rx, stop.clone(), give_up));
    Ok((tx, stop, handle))
}
