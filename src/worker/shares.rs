//! Fair shares of the writer between the two lanes, by rows written.

/// A deficit counter: the rows the backlog lane has written beyond its share, bounded by one
/// backlog window either way. A due backlog window goes ahead of a due live one only when the
/// counter is not positive; when no live window is due the backlog writes anyway (and builds up
/// credit for the live lane, up to the bound).
#[derive(Debug, Clone)]
pub struct LaneShares {
    /// The backlog's share of rows while both lanes have work (0 to 1, exclusive).
    share: f64,
    /// One backlog window's weight: the counter stays within ± this.
    bound: f64,
    debt: f64,
}

impl LaneShares {
    pub fn new(backlog_share: f64, backlog_window_rows: usize) -> Self {
        Self {
            share: backlog_share,
            bound: backlog_window_rows.max(1) as f64 * (1.0 - backlog_share),
            debt: 0.0,
        }
    }

    /// May a due backlog window go ahead of a due live one?
    pub fn backlog_first(&self) -> bool {
        self.debt <= 0.0
    }

    /// A window of `rows` was written (an empty one counts as one row, so it is never free).
    pub fn written(&mut self, backlog: bool, rows: usize) {
        let rows = rows.max(1) as f64;
        self.debt = if backlog {
            self.debt + rows * (1.0 - self.share)
        } else {
            self.debt - rows * self.share
        }
        .clamp(-self.bound, self.bound);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both lanes always due: replays the worker's choice and counts rows per lane.
    fn saturated(
        share: f64,
        live_rows: usize,
        backlog_rows: usize,
        windows: usize,
    ) -> (usize, usize) {
        let mut s = LaneShares::new(share, backlog_rows);
        let (mut live, mut backlog) = (0, 0);
        for _ in 0..windows {
            if s.backlog_first() {
                s.written(true, backlog_rows);
                backlog += backlog_rows;
            } else {
                s.written(false, live_rows);
                live += live_rows;
            }
        }
        (live, backlog)
    }

    #[test]
    fn equal_shares_by_rows_not_by_turns() {
        // A backlog window is 4× a live one: alternating turns would give the live lane a fifth.
        let (live, backlog) = saturated(0.5, 1024, 4096, 1000);
        let ratio = live as f64 / backlog as f64;
        assert!((0.9..1.1).contains(&ratio), "live {live} backlog {backlog}");
    }

    #[test]
    fn a_smaller_share_gives_the_backlog_less() {
        let (live, backlog) = saturated(0.2, 512, 4096, 2000);
        let share = backlog as f64 / (live + backlog) as f64;
        assert!((0.15..0.25).contains(&share), "backlog share {share}");
    }

    #[test]
    fn credit_from_an_idle_live_lane_is_bounded() {
        let mut s = LaneShares::new(0.5, 4096);
        // The backlog writes alone for a long time...
        for _ in 0..100 {
            s.written(true, 4096);
        }
        assert!(!s.backlog_first());
        // ...then the live lane gets at most one backlog window's worth of rows ahead.
        let mut live_windows = 0;
        while !s.backlog_first() {
            s.written(false, 1024);
            live_windows += 1;
        }
        assert_eq!(live_windows, 4);
    }

    #[test]
    fn empty_windows_are_not_free() {
        let mut s = LaneShares::new(0.5, 4096);
        s.written(true, 0);
        assert!(
            !s.backlog_first(),
            "an empty backlog window still costs a row"
        );
        s.written(false, 0);
        assert!(s.backlog_first(), "and an empty live window pays it back");
    }
}
