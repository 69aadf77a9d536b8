//! Plots of a benchmark report as SVG files beside it: lag and freshness over time during the
//! backlog drain, throughput against batch size. Plain SVG elements (the viewer renders the
//! text), so drawing needs no fonts on this machine.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::Report;

/// One line (or set of dots) on a panel.
pub struct Series {
    pub label: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
    /// Dots instead of a line.
    pub dots: bool,
}

/// One panel: axes, and the series drawn on them.
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<Series>,
}

const WIDTH: f64 = 900.0;
const PANEL_HEIGHT: f64 = 260.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 45.0;

fn finite(
    points: &[(f64, f64)],
    log_x: bool,
    log_y: bool,
) -> impl Iterator<Item = (f64, f64)> + '_ {
    points.iter().copied().filter(move |(x, y)| {
        x.is_finite() && y.is_finite() && (!log_x || *x > 0.0) && (!log_y || *y > 0.0)
    })
}

/// Axis range and ticks: powers of ten on a log axis, about five round steps on a linear one.
fn axis(values: &[f64], log: bool) -> (f64, f64, Vec<f64>) {
    let (mut lo, mut hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(*v), b.max(*v))
        });
    if !lo.is_finite() {
        (lo, hi) = if log { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        let (lo, hi) = (
            lo.log10().floor(),
            hi.log10().ceil().max(lo.log10().floor() + 1.0),
        );
        let ticks = (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect();
        (10f64.powf(lo), 10f64.powf(hi), ticks)
    } else {
        let lo = lo.min(0.0);
        let hi = if hi <= lo { lo + 1.0 } else { hi };
        let raw = (hi - lo) / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw)
            .unwrap_or(10.0 * mag);
        let hi = (hi / step).ceil() * step;
        let ticks = (0..=((hi - lo) / step).round() as usize)
            .map(|i| lo + i as f64 * step)
            .collect();
        (lo, hi, ticks)
    }
}

fn tick_label(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-2) {
        format!("{v:.0e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The panels stacked in one SVG document.
pub fn svg(panels: &[Panel]) -> String {
    let height = PANEL_HEIGHT * panels.len() as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (i, p) in panels.iter().enumerate() {
        let y0 = i as f64 * PANEL_HEIGHT;
        let (pw, ph) = (WIDTH - LEFT - RIGHT, PANEL_HEIGHT - TOP - BOTTOM);
        let xs: Vec<f64> = p
            .series
            .iter()
            .flat_map(|s| finite(&s.points, p.log_x, p.log_y).map(|q| q.0))
            .collect();
        let ys: Vec<f64> = p
            .series
            .iter()
            .flat_map(|s| finite(&s.points, p.log_x, p.log_y).map(|q| q.1))
            .collect();
        let (xlo, xhi, xticks) = axis(&xs, p.log_x);
        let (ylo, yhi, yticks) = axis(&ys, p.log_y);
        let t = |v: f64, lo: f64, hi: f64, log: bool| {
            if log {
                (v.log10() - lo.log10()) / (hi.log10() - lo.log10())
            } else {
                (v - lo) / (hi - lo)
            }
        };
        let px = |x: f64| LEFT + pw * t(x, xlo, xhi, p.log_x);
        let py = |y: f64| y0 + TOP + ph * (1.0 - t(y, ylo, yhi, p.log_y));
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" font-size=\"14\" text-anchor=\"middle\">{}</text>",
            LEFT + pw / 2.0,
            y0 + 18.0,
            escape(&p.title)
        );
        for x in &xticks {
            let _ = writeln!(
                out,
                "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1:.1}\" y2=\"{2:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{0:.1}\" y=\"{3:.1}\" text-anchor=\"middle\">{4}</text>",
                px(*x),
                y0 + TOP,
                y0 + TOP + ph,
                y0 + TOP + ph + 15.0,
                tick_label(*x)
            );
        }
        for y in &yticks {
            let _ = writeln!(
                out,
                "<line x1=\"{0:.1}\" x2=\"{1:.1}\" y1=\"{2:.1}\" y2=\"{2:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{3:.1}\" y=\"{4:.1}\" text-anchor=\"end\">{5}</text>",
                LEFT,
                LEFT + pw,
                py(*y),
                LEFT - 6.0,
                py(*y) + 4.0,
                tick_label(*y)
            );
        }
        let _ = writeln!(
            out,
            "<rect x=\"{LEFT}\" y=\"{:.1}\" width=\"{pw:.1}\" height=\"{ph:.1}\" fill=\"none\" stroke=\"black\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
             <text transform=\"translate(16 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
            y0 + TOP,
            LEFT + pw / 2.0,
            y0 + PANEL_HEIGHT - 8.0,
            escape(&p.x_label),
            y0 + TOP + ph / 2.0,
            escape(&p.y_label)
        );
        for (k, s) in p.series.iter().enumerate() {
            let pts: Vec<(f64, f64)> = finite(&s.points, p.log_x, p.log_y)
                .map(|(x, y)| (px(x), py(y)))
                .collect();
            if s.dots {
                for (x, y) in &pts {
                    let _ = write!(
                        out,
                        "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"1.8\" fill=\"{}\" fill-opacity=\"0.6\"/>",
                        s.color
                    );
                }
                out.push('\n');
            } else if !pts.is_empty() {
                let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                let _ = writeln!(
                    out,
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"/>",
                    path.join(" "),
                    s.color
                );
            }
            let ly = y0 + TOP + 14.0 + 16.0 * k as f64;
            let _ = writeln!(
                out,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"4\" fill=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"{ly:.1}\" text-anchor=\"end\">{}</text>",
                LEFT + pw - 16.0,
                ly - 5.0,
                s.color,
                LEFT + pw - 22.0,
                escape(&s.label)
            );
        }
    }
    out + "</svg>\n"
}

/// Writes `e2e-backlog.svg` and `e2e-batch.svg` (named after `out`'s stem) beside `out`.
pub fn write(report: &Report, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let stem = out
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("e2e")
        .to_owned();
    let dir = out.parent().unwrap_or(Path::new("."));
    let mut written = Vec::new();
    let mut draw = |name: &str, panels: Vec<Panel>| -> anyhow::Result<()> {
        let path = dir.join(format!("{stem}-{name}.svg"));
        std::fs::write(&path, svg(&panels))
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        written.push(path);
        Ok(())
    };
    if let Some(b) = &report.backlog_live {
        draw("backlog", backlog_panels(b))?;
    }
    if !report.batch_sizes.is_empty() {
        draw("batch", batch_panels(report))?;
    }
    Ok(written)
}

fn backlog_panels(b: &super::BacklogLive) -> Vec<Panel> {
    let series = |f: fn(&super::Sample) -> f64| b.series.iter().map(|s| (s.t, f(s))).collect();
    vec![
        Panel {
            title: format!(
                "Backlog of {} events with {} events/s of live traffic on top",
                b.backlog_events, b.live_rate
            ),
            x_label: "seconds since the worker started".into(),
            y_label: "lag, messages".into(),
            log_x: false,
            log_y: false,
            series: vec![Series {
                label: "consumer lag (all partitions)".into(),
                color: "#1f77b4",
                points: series(|s| s.lag_messages),
                dots: false,
            }],
        },
        Panel {
            title: "Age of the oldest unfinished message".into(),
            x_label: "seconds since the worker started".into(),
            y_label: "lag, seconds".into(),
            log_x: false,
            log_y: false,
            series: vec![Series {
                label: "largest partition lag".into(),
                color: "#ff7f0e",
                points: series(|s| s.lag_seconds),
                dots: false,
            }],
        },
        Panel {
            title: "Freshness of live events while the backlog drains".into(),
            x_label: "seconds since the worker started".into(),
            y_label: "event to score, ms (log)".into(),
            log_x: false,
            log_y: true,
            series: vec![
                Series {
                    label: "seen in Redis, per sampled event".into(),
                    color: "#2ca02c",
                    points: b.seen_points.clone(),
                    dots: true,
                },
                Series {
                    label: "worker p99 per 0.5 s (live lane)".into(),
                    color: "#d62728",
                    points: series(|s| s.live_p99_ms),
                    dots: false,
                },
            ],
        },
    ]
}

fn batch_panels(report: &Report) -> Vec<Panel> {
    let mut sizes: Vec<(f64, f64, f64)> = report
        .batch_sizes
        .iter()
        .map(|(n, d)| (*n as f64, d.events_per_s, d.pairs_per_s))
        .collect();
    sizes.push((
        report.batch_default as f64,
        report.sustained.events_per_s,
        report.sustained.pairs_per_s,
    ));
    sizes.sort_by(|a, b| a.0.total_cmp(&b.0));
    vec![Panel {
        title: "Backlog drain throughput against batch size (batch.max_pairs)".into(),
        x_label: "batch size (log)".into(),
        y_label: "per second (log)".into(),
        log_x: true,
        log_y: true,
        series: vec![
            Series {
                label: "pairs scored/s".into(),
                color: "#9467bd",
                points: sizes.iter().map(|s| (s.0, s.2)).collect(),
                dots: false,
            },
            Series {
                label: "events/s".into(),
                color: "#8c564b",
                points: sizes.iter().map(|s| (s.0, s.1)).collect(),
                dots: false,
            },
        ],
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_series_and_skips_what_a_log_axis_cannot_show() {
        let doc = svg(&[Panel {
            title: "t <1>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            log_x: false,
            log_y: true,
            series: vec![
                Series {
                    label: "line".into(),
                    color: "red",
                    points: vec![(0.0, 1.0), (1.0, 100.0), (2.0, f64::NAN), (3.0, 0.0)],
                    dots: false,
                },
                Series {
                    label: "dots".into(),
                    color: "blue",
                    points: vec![(0.5, 10.0), (1.5, 20.0)],
                    dots: true,
                },
            ],
        }]);
        assert!(doc.starts_with("<svg") && doc.ends_with("</svg>\n"));
        assert!(doc.contains("t &lt;1&gt;"), "text is escaped");
        let line = doc
            .lines()
            .find(|l| l.starts_with("<polyline"))
            .expect("a polyline");
        assert_eq!(
            line.matches(',').count(),
            2,
            "NaN and 0 are not drawn on a log axis"
        );
        assert_eq!(doc.matches("<circle").count(), 2);
        assert!(doc.contains(">100<") && doc.contains(">1<"), "decade ticks");
    }
}
