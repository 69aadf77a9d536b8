//! The benchmark report as markdown.

use super::{BacklogLive, Freshness, Report};

impl Report {
    pub fn markdown(&self) -> String {
        let c = &self.ceilings;
        let rows = self.sustained.rows_per_event;
        // Every ceiling in pairs/s: the consume ceiling carries rows/event pairs per message.
        // Redis's, for the worker's whole write pattern: each event costs one state write and
        // rows/event score writes, in Redis time 1/apply + rows/score.
        let redis_events = 1.0
            / (1.0 / c.redis_apply_events_per_s.max(1e-9) + rows / c.redis_pairs_per_s.max(1e-9));
        let mut ceilings = vec![
            ("consume", c.consume_msgs_per_s * rows),
            ("model", c.model_rows_per_s),
            ("redis score writes", c.redis_pairs_per_s),
        ];
        if c.redis_apply_events_per_s > 0.0 {
            ceilings.push(("redis state + score writes", redis_events * rows));
        }
        let narrowest = ceilings
            .into_iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or(("none", 0.0));
        let samples = c
            .redis_samples
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(" before and ")
            + " after the default drain";
        let mut s = format!(
            "# End-to-end benchmark\n\nMachine: {}. Broker (tansu), redis-server and the worker share it. {} pairs stored before \
             each run; backlog {} events, {} partitions per topic, Zipf traffic.\n\n\
             ## Ceilings (same run)\n\n| ceiling | rate |\n|---|---:|\n\
             | consume (plain consumer) | {:.0} msgs/s |\n| model, batch {} | {:.0} rows/s |\n| Redis score writes, worker's script (8 pairs a call, members of the stored size; mean of {}) | {:.0} pairs/s |\n\
             | Redis state writes, worker's scripts (the apply stage: the drain's event mix, 512 a pipeline) | {:.0} events/s |\n\
             | Redis plain writes: `ZADD` of one pair to a member's top-N set, 1,024 a pipeline, the worker's client (raw) | {:.0} writes/s |\n\
             | broker produce → consume at 200/s, worker's fetch settings (a freshness floor) | p50 {:.0} ms, p99 {:.0} ms |\n\n",
            self.machine, self.preloaded_pairs, self.backlog_events, self.partitions, c.consume_msgs_per_s, self.batch_default, c.model_rows_per_s, samples, c.redis_pairs_per_s,
            c.redis_apply_events_per_s, c.redis_plain_writes_per_s, c.broker_p50_ms, c.broker_p99_ms
        );
        s += "## Backlog drains\n\n| run | events/s | pairs/s | model rows / event | peak RSS MiB | complete |\n|---|---:|---:|---:|---:|---|\n";
        let drains = std::iter::once(&self.sustained)
            .chain(self.no_coalescing.as_ref())
            .chain(self.batch_sizes.iter().map(|(_, d)| d));
        for d in drains {
            s += &format!(
                "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {} |\n",
                d.label,
                d.events_per_s,
                d.pairs_per_s,
                d.rows_per_event,
                d.peak_rss_mib,
                if d.timed_out {
                    "no (time limit)"
                } else {
                    "yes"
                }
            );
        }
        s += &format!(
            "\nSustained pairs/s vs the narrowest ceiling ({}, {:.0} pairs/s at {:.2} rows/event): **{:.0}%**.",
            narrowest.0,
            narrowest.1,
            rows,
            100.0 * self.sustained.pairs_per_s / narrowest.1.max(1.0),
        );
        if c.redis_apply_events_per_s > 0.0 {
            s += &format!(
                " Redis's ceiling for the whole write pattern (one state write and {rows:.2} score writes an event) is {redis_events:.0} events/s: the drain reached {:.0}% of it, and {:.0}% of the score writes' ceiling alone.",
                100.0 * self.sustained.events_per_s / redis_events.max(1.0),
                100.0 * self.sustained.pairs_per_s / c.redis_pairs_per_s.max(1.0),
            );
        }
        if let Some(off) = &self.no_coalescing {
            s += &format!(
                " Coalescing cuts model rows per event {:.1}×.",
                off.rows_per_event / rows.max(1e-9)
            );
            if let Some(once) = self.sustained.once_per_trigger_rows_per_event {
                s += &format!(
                    " Scoring each distinct trigger of this stream exactly once (every member, candidate \
                     fan-out and pair it touches, at the final state's sizes) would cost {:.2} rows/event: \
                     no coalescing can cut more than {:.1}× here.",
                    once,
                    off.rows_per_event / once.max(1e-9)
                );
            }
        }
        s += "\n\n";
        if let Some(t) = &self.tick {
            s += &format!(
                "## A full rescoring after a tick\n\n{} members × 50 pairs stored through the worker, \
                 then one tick per partition with every pair due: {} pairs rescored in {:.2} s, \
                 **{:.0} pairs/s** ({} of the model's ceiling at batch 1024), peak RSS {:.0} MiB{}.\n\n",
                t.members,
                t.pairs,
                t.seconds,
                t.pairs_per_s,
                format_args!(
                    "{:.1}%",
                    100.0 * t.pairs_per_s / self.ceilings.model_rows_per_s.max(1.0)
                ),
                t.peak_rss_mib,
                if t.complete { "" } else { " (the phase limit ran out first)" }
            );
        }
        if let Some(t) = &self.takeover {
            s += &format!(
                "## A takeover\n\nA worker owning nothing yet starts on partitions holding {} stored \
                 pairs: assigned {:.2} s after its start; the first fresh event (a member update \
                 produced right then) had its scores published **{:.0} ms** after it was produced, \
                 {:.2} s after the start. {} members never touched, one after another: p50 {:.0} ms, \
                 max {:.0} ms.\n\n",
                t.stored_pairs,
                t.assigned_s,
                t.first_ms,
                t.start_to_first_s,
                t.probes,
                t.p50_ms,
                t.max_ms
            );
        }
        if self.freshness.is_empty() {
            return s;
        }
        s += &freshness_table(&self.freshness);
        if let Some(b) = &self.backlog_live {
            s += &b.markdown();
            s += "Throughput against batch size: `e2e-batch.svg`.\n";
        }
        s
    }
}

impl BacklogLive {
    /// The backlog + live section: totals, then the phase in 30-second slices.
    pub fn markdown(&self) -> String {
        let b = self;
        let mut s = format!(
            "\n## Backlog with live traffic on top\n\nBacklog: {} events ({} events/s stamped over the minutes before the start); live: {} events/s \
             from readiness on ({} sent). Backlog done (every backlog message committed) after: **{}**; \
             drained (backlog consumed, less than 1 s of live traffic behind) after: **{}**.\n\n\
             | live events | p50 ms | p95 ms | p99 ms |\n|---|---:|---:|---:|\n\
             | worker histogram, live lane (every fresh event, candidate updates waiting for their fan-out included) | {:.1} | {:.1} | {:.1} |\n\
             | seen in Redis (member updates), sent before the backlog was done ({} samples, {} unobserved) | {:.1} | {:.1} | {:.1} |\n\n\
             Backlog-lane events: p50 {:.1} s after their timestamp. Peak RSS {:.0} MiB. Lag and freshness over time: `e2e-backlog.svg`.\n",
            b.backlog_events,
            b.live_rate,
            b.live_rate,
            b.live_sent,
            b.backlog_done_after_s
                .map(|d| format!("{d:.1} s"))
                .unwrap_or_else(|| "not within the phase".into()),
            b.drained_after_s
                .map(|d| format!("{d:.1} s"))
                .unwrap_or_else(|| "not within the phase limit".into()),
            b.worker_live_p50_ms,
            b.worker_live_p95_ms,
            b.worker_live_p99_ms,
            b.seen_during_drain.samples,
            b.seen_during_drain.unobserved,
            b.seen_during_drain.p50_ms,
            b.seen_during_drain.p95_ms,
            b.seen_during_drain.p99_ms,
            b.worker_backlog_p50_ms / 1000.0,
            b.peak_rss_mib
        );
        s += "\nOver time (seconds since the worker started; seen = live events sent in the slice):\n\n\
              | slice s | events/s | lag at end (messages) | split partitions | seen p50 ms | seen p99 ms |\n\
              |---|---:|---:|---:|---:|---:|\n";
        const SLICE: f64 = 30.0;
        let end = b.series.last().map(|x| x.t).unwrap_or(0.0);
        let mut from = 0.0;
        let mut prev_events = 0.0;
        while from < end {
            let to = from + SLICE;
            let Some(last) = b.series.iter().rev().find(|x| x.t < to) else {
                break;
            };
            let span = last.t - from;
            if span < 1.0 {
                break;
            }
            let mut seen: Vec<f64> = b
                .seen_points
                .iter()
                .filter(|p| p.0 >= from && p.0 < to)
                .map(|p| p.1)
                .collect();
            seen.sort_by(f64::total_cmp);
            let q = |p: f64| {
                if seen.is_empty() {
                    f64::NAN
                } else {
                    seen[((seen.len() as f64 * p).ceil() as usize).clamp(1, seen.len()) - 1]
                }
            };
            s += &format!(
                "| {:.0}–{:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
                from,
                to.min(last.t),
                (last.events - prev_events) / span.max(1e-9),
                last.lag_messages,
                last.catchup_partitions,
                q(0.5),
                q(0.99)
            );
            prev_events = last.events;
            from = to;
        }
        s
    }
}

/// The open-loop freshness section.
pub fn freshness_table(levels: &[Freshness]) -> String {
    let mut s = String::from(
        "## Freshness, open loop\n\nWorker: its histogram, Kafka timestamp → Redis acknowledgement. Seen: the load generator's side, \
         send → the member's published `as_of` reaches the event's time (every 5th member update, polled every 2 ms, or once per twentieth of its age when that is longer).\n\n\
         Broker alone: the raw floor at the same rate, a plain consumer with the worker's fetch settings and no worker running.\n\n\
         | load | events/s | worker p50 ms | p95 | p99 | seen p50 ms | p95 | p99 | samples (unobserved) | broker alone p50 / p99 ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for f in levels {
        s += &format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} ({}) | {:.1} / {:.1} |\n",
            if f.target_fraction > 0.0 {
                format!("{:.0}%", f.target_fraction * 100.0)
            } else {
                "given".into()
            },
            f.rate,
            f.p50_ms,
            f.p95_ms,
            f.p99_ms,
            f.seen.p50_ms,
            f.seen.p95_ms,
            f.seen.p99_ms,
            f.seen.samples,
            f.seen.unobserved,
            f.broker_p50_ms,
            f.broker_p99_ms
        );
    }
    if let Some(w) = levels.iter().map(|f| f.warmup_s).max().filter(|w| *w > 0) {
        s += &format!(
            "\nEach level's quantiles leave out its first {w} s of traffic (a warm-up at the same rate, other events): the worker's cache has warmed up.\n"
        );
    }
    s
}
