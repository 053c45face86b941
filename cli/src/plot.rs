//! SVG line charts drawn by hand (no plotting dependency), shared by the tools: `drq-train`'s
//! training curves and `drq-eval`'s perplexity against bits per weight.

use std::fmt::Write as _;

/// A line of (x, y) points with a label.
pub struct Series {
    pub label: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
    /// A short label beside each point (e.g. its precision), or none.
    pub point_labels: Vec<String>,
}

/// A labelled point drawn apart from the series (e.g. another tool's result on the same axes).
pub struct Mark {
    pub x: f64,
    pub y: f64,
    pub label: String,
}

/// Colors of successive series.
pub const COLORS: [&str; 7] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"];

/// One panel's text and scales.
pub struct Panel<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    /// Logarithmic y axis.
    pub log_y: bool,
    /// A dashed horizontal line at this y, with its label.
    pub reference: Option<(f64, String)>,
    /// Labelled points, drawn as grey squares.
    pub marks: Vec<Mark>,
}

/// An SVG document of `width` × `height` with a title; `draw` adds the panels.
pub fn document(width: f64, height: f64, title: &str, draw: impl FnOnce(&mut String)) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="15">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    draw(&mut svg);
    svg.push_str("</svg>\n");
    svg
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw.is_nan() || raw <= 0.0 || raw.is_infinite() {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * mag).find(|&v| v >= raw).unwrap_or(10.0 * mag)
}

/// A short axis label: three significant digits, scientific notation when large or small.
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e4).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// One panel at (x, y, width, height): axes with ticks, a polyline (and dots) per series, a
/// legend, and an optional dashed reference line.
pub fn panel(svg: &mut String, (x0, y0, pw, ph): (f64, f64, f64, f64), panel: &Panel, series: &[Series]) {
    let (title, log) = (panel.title, panel.log_y);
    let reference = panel.reference.as_ref().map(|r| r.0);
    let tf = |v: f64| if log { v.max(1e-12).log10() } else { v };
    let values = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| tf(p.1)))
        .chain(panel.marks.iter().map(|m| tf(m.y)))
        .chain(reference.map(tf))
        .filter(|v| v.is_finite());
    let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let steps = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).chain(panel.marks.iter().map(|m| m.x));
    let (mut s_lo, mut s_hi) = steps.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if !s_lo.is_finite() {
        (s_lo, s_hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    if s_hi - s_lo < 1e-9 {
        s_hi = s_lo + 1.0;
    }
    let pad = 0.05 * (hi - lo);
    let (lo, hi) = (lo - pad, hi + pad);
    let px = |s: f64| x0 + (s - s_lo) / (s_hi - s_lo) * pw;
    let py = |v: f64| y0 + ph - (tf(v) - lo) / (hi - lo) * ph;
    let _ =
        writeln!(svg, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, x0 + pw / 2.0, y0 - 6.0, escape(title));
    let _ = writeln!(svg, r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##);
    for i in 0..=5 {
        let t = lo + (hi - lo) * f64::from(i) / 5.0;
        let y = y0 + ph - (t - lo) / (hi - lo) * ph;
        let label = tick_label(if log { 10f64.powf(t) } else { t });
        let _ = writeln!(
            svg,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"##,
            x0 + pw,
            x0 - 4.0,
            y + 4.0
        );
    }
    let step_tick = nice_step((s_hi - s_lo) / 5.0).max(1.0);
    let mut s = (s_lo / step_tick).ceil() * step_tick;
    while s <= s_hi + 1e-9 {
        let x = px(s);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#444"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            y0 + ph,
            y0 + ph + 4.0,
            y0 + ph + 17.0,
            s.round()
        );
        s += step_tick;
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        x0 + pw / 2.0,
        y0 + ph + 32.0,
        escape(panel.x_label)
    );
    if let Some((r, label)) = panel.reference.as_ref().filter(|r| r.0.is_finite()) {
        let y = py(*r);
        let _ = writeln!(
            svg,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#000" stroke-dasharray="5,4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 + pw,
            x0 + pw - 4.0,
            y - 4.0,
            escape(label)
        );
    }
    let mut marks: Vec<&Mark> = panel.marks.iter().filter(|m| tf(m.y).is_finite() && m.x.is_finite()).collect();
    marks.sort_by(|a, b| a.x.total_cmp(&b.x));
    for (i, m) in marks.into_iter().enumerate() {
        let (x, y) = (px(m.x), py(m.y));
        // Neighbours' labels alternate below and above their marks; near the right edge they
        // end at the mark.
        let label_y = if i % 2 == 0 { y + 14.0 } else { y - 7.0 };
        let (label_x, anchor) = if x > x0 + pw - 120.0 { (x - 6.0, "end") } else { (x + 6.0, "start") };
        let _ = writeln!(
            svg,
            r##"<rect x="{:.1}" y="{:.1}" width="7" height="7" fill="#888"/><text x="{label_x:.1}" y="{label_y:.1}" font-size="11" fill="#555" text-anchor="{anchor}">{}</text>"##,
            x - 3.5,
            y - 3.5,
            escape(&m.label)
        );
    }
    // The legend sits in the top right corner, as wide as its longest label (~7 px a character).
    let legend_x = x0 + pw - 30.0 - 7.0 * series.iter().map(|s| s.label.chars().count()).max().unwrap_or(0) as f64;
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s
            .points
            .iter()
            .filter(|p| tf(p.1).is_finite())
            .map(|&(a, b)| format!("{:.1},{:.1}", px(a), py(b)))
            .collect();
        if pts.len() > 1 {
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
                s.color,
                pts.join(" ")
            );
        }
        if s.points.len() <= 60 {
            for p in &pts {
                let (cx, cy) = p.split_once(',').expect("formatted as x,y");
                let _ = writeln!(svg, r#"<circle cx="{cx}" cy="{cy}" r="2.5" fill="{}"/>"#, s.color);
            }
        }
        for (&(a, b), label) in s.points.iter().zip(&s.point_labels).filter(|(p, _)| tf(p.1).is_finite()) {
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" font-size="11" fill="{}">{}</text>"#,
                px(a) + 4.0,
                py(b) - 5.0,
                s.color,
                escape(label)
            );
        }
        let (lx, ly) = (legend_x, y0 + 16.0 + 16.0 * i as f64);
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            lx + 18.0,
            s.color,
            lx + 22.0,
            ly + 4.0,
            escape(&s.label)
        );
    }
}
