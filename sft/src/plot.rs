//! The loss curve as a standalone SVG: train loss per logged step, validation loss per eval.
//!
//! Hand-written because the picture is two polylines and some text, and every plotting crate
//! would bring a font stack into a static binary.

use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 48.0;

/// Renders `(step, loss)` series. Non-finite points are skipped; an empty plot still renders.
pub fn loss_svg(title: &str, train: &[(u64, f64)], val: &[(u64, f64)]) -> String {
    let points = train.iter().chain(val).filter(|(_, y)| y.is_finite());
    let (mut x_max, mut y_min, mut y_max) = (1u64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    if y_max - y_min < 1e-9 {
        y_max = y_min + 1.0;
    }
    let pad = 0.05 * (y_max - y_min);
    let (y_lo, y_hi) = ((y_min - pad).max(0.0), y_max + pad);
    let px = |x: u64| LEFT + (W - LEFT - RIGHT) * x as f64 / x_max as f64;
    let py = |y: f64| TOP + (H - TOP - BOTTOM) * (1.0 - (y - y_lo) / (y_hi - y_lo));

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    // Axes, ticks and grid.
    let (x0, x1, y0, y1) = (LEFT, W - RIGHT, TOP, H - BOTTOM);
    let _ = writeln!(
        s,
        r#"<path d="M{x0},{y0} L{x0},{y1} L{x1},{y1}" stroke="black" fill="none"/>"#
    );
    for i in 0..=5 {
        let y = y_lo + (y_hi - y_lo) * i as f64 / 5.0;
        let yy = py(y);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{yy:.1}" x2="{x1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 - 6.0,
            yy + 4.0,
            tick(y)
        );
        let x = (x_max as f64 * i as f64 / 5.0).round() as u64;
        let xx = px(x);
        let _ = writeln!(
            s,
            r#"<text x="{xx:.1}" y="{}" text-anchor="middle">{x}</text>"#,
            y1 + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">optimizer step</text>"#,
        (x0 + x1) / 2.0,
        H - 10.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">loss</text>"#,
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0
    );
    for (series, colour, name, marker) in [
        (train, "#1f77b4", "train", false),
        (val, "#d62728", "validation", true),
    ] {
        let pts: Vec<String> = series
            .iter()
            .filter(|(_, y)| y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="1.5"/>"#,
            pts.join(" ")
        );
        if marker {
            for p in &pts {
                let (cx, cy) = p.split_once(',').expect("formatted above");
                let _ = writeln!(s, r#"<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}"/>"#);
            }
        }
        let ly = if name == "train" {
            TOP + 8.0
        } else {
            TOP + 26.0
        };
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
            x1 - 110.0,
            x1 - 86.0,
            x1 - 80.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn tick(y: f64) -> String {
    if y.abs() >= 100.0 {
        format!("{y:.0}")
    } else if y.abs() >= 1.0 {
        format!("{y:.2}")
    } else {
        format!("{y:.3}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_both_series_and_skips_non_finite_points() {
        let train = [(1, 3.0), (2, 2.5), (3, f64::NAN), (4, 1.5)];
        let val = [(2, 2.8), (4, 2.0)];
        let svg = loss_svg("run <a>", &train, &val);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("run &lt;a&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        // Three finite train points, two validation points with markers.
        let train_line = svg
            .lines()
            .find(|l| l.contains("#1f77b4\" stroke-width=\"1.5"))
            .unwrap();
        assert_eq!(train_line.matches(',').count(), 3);
        assert_eq!(svg.matches("<circle").count(), 2);
    }

    #[test]
    fn empty_and_flat_series_still_render() {
        assert!(loss_svg("empty", &[], &[]).contains("</svg>"));
        let svg = loss_svg("flat", &[(1, 2.0), (2, 2.0)], &[]);
        assert!(svg.contains("<polyline"));
    }
}
