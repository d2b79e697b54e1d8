//! The overview's chart, drawn by the server as SVG: registrations per minute over the
//! last hour, stacked by result (assigned, failed, refused).

use std::fmt::Write as _;

use provisio_engine::stats::MinuteCounts;

const WIDTH: u32 = 720;
const HEIGHT: u32 = 220;
const LEFT: u32 = 44;
const BOTTOM: u32 = 28;
const TOP: u32 = 12;

/// A series: its label, its colour, and its value in a minute.
type Series = (&'static str, &'static str, fn(&MinuteCounts) -> u64);

/// The series, bottom to top.
const SERIES: [Series; 3] = [
    ("assigned", "#2e7d32", |c| c.assigned),
    ("failed", "#ef6c00", |c| c.failed),
    ("refused", "#c62828", |c| c.refused),
];

/// A rounded maximum for the axis: 1, 2 or 5 times a power of ten.
fn nice_max(v: u64) -> u64 {
    let mut step = 1u64;
    loop {
        for m in [1, 2, 5] {
            if step * m >= v.max(1) {
                return step * m;
            }
        }
        step = step.saturating_mul(10);
    }
}

/// `HH:MM` (UTC) of a Unix minute.
fn clock(minute: i64) -> String {
    let m = minute.rem_euclid(24 * 60);
    format!("{:02}:{:02}", m / 60, m % 60)
}

/// The chart of `minutes` (oldest first).
#[must_use]
pub(crate) fn svg(minutes: &[(i64, MinuteCounts)]) -> String {
    let max = nice_max(minutes.iter().map(|(_, c)| c.total()).max().unwrap_or(0));
    let total: u64 = minutes.iter().map(|(_, c)| c.total()).sum();
    let plot_w = WIDTH - LEFT - 8;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let n = u32::try_from(minutes.len().max(1)).unwrap_or(60);
    let slot = f64::from(plot_w) / f64::from(n);
    let bar = (slot * 0.8).max(1.0);
    let mut s = String::with_capacity(16 * 1024);
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-labelledby="t d"><title id="t">Registrations per minute, last hour</title><desc id="d">{total} registrations in the last hour, by result: assigned, failed, refused.</desc><style>text{{font:11px sans-serif;fill:#444}}</style>"##
    );
    // Axis and grid.
    // Grid steps that divide the maximum, so that every label is exact and whole.
    let steps = [4u32, 5, 2].into_iter().find(|d| max.is_multiple_of(u64::from(*d))).unwrap_or(1);
    for i in 0..=steps {
        let y = TOP + plot_h - plot_h * i / steps;
        let v = max * u64::from(i) / u64::from(steps);
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{v}</text>"##,
            WIDTH - 8,
            LEFT - 4,
            y + 4
        );
    }
    for (i, (minute, counts)) in minutes.iter().enumerate() {
        let i = u32::try_from(i).unwrap_or(0);
        let x = f64::from(LEFT) + f64::from(i) * slot + (slot - bar) / 2.0;
        let mut base = 0u64;
        for (label, colour, value) in SERIES {
            let v = value(counts);
            if v == 0 {
                continue;
            }
            let scale = |n: u64| (n as f64) * f64::from(plot_h) / (max as f64);
            let y = f64::from(TOP + plot_h) - scale(base + v);
            let h = scale(v);
            let _ = write!(
                s,
                r##"<rect x="{x:.1}" y="{y:.1}" width="{bar:.1}" height="{h:.1}" fill="{colour}"><title>{} UTC: {v} {label}</title></rect>"##,
                clock(*minute)
            );
            base += v;
        }
        if i % 10 == 0 {
            let _ = write!(
                s,
                r##"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"##,
                x + bar / 2.0,
                HEIGHT - 10,
                clock(*minute)
            );
        }
    }
    // The legend.
    for (k, (label, colour, _)) in SERIES.iter().enumerate() {
        let x = LEFT + 8 + u32::try_from(k).unwrap_or(0) * 90;
        let _ = write!(
            s,
            r##"<rect x="{x}" y="2" width="10" height="10" fill="{colour}"/><text x="{}" y="11">{label}</text>"##,
            x + 14
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_stack_by_result_and_the_axis_rounds_up() {
        assert_eq!(
            (nice_max(0), nice_max(1), nice_max(3), nice_max(7), nice_max(11), nice_max(2_000)),
            (1, 1, 5, 10, 20, 2_000)
        );
        let mut minutes: Vec<(i64, MinuteCounts)> =
            (0..60).map(|m| (29_000_000 + m, MinuteCounts::default())).collect();
        minutes[59].1 = MinuteCounts { assigned: 3, failed: 1, refused: 2 };
        let svg = svg(&minutes);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("6 registrations in the last hour"));
        assert_eq!(svg.matches("<rect").count(), 3 + 3, "three bars and three legend keys");
        assert!(svg.contains(": 3 assigned</title>") && svg.contains(": 2 refused</title>"));
        assert!(!svg.contains("NaN"));
        // Grid labels are exact: a bar of 6 rounds the axis up to 10, in steps of 2.
        for v in [0, 2, 4, 6, 8, 10] {
            assert!(svg.contains(&format!(r#"text-anchor="end">{v}</text>"#)), "label {v}");
        }
        let empty = super::svg(&[]);
        assert!(empty.contains("0 registrations"));
    }
}
