//! The run's JSONL log (one record per step and per evaluation) and its SVG plot: training
//! cross-entropy and held-out perplexity per precision over steps, drawn by hand (no plotting
//! dependency).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One line of `log.jsonl`: `{"kind": "step", ...}` or `{"kind": "eval", ...}`. Maps are keyed
/// by bit-width.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A training step (`step` = steps done after it).
    Step {
        step: u64,
        lr: f64,
        #[serde(deserialize_with = "bits_map")]
        scale_lr: BTreeMap<u32, f64>,
        #[serde(deserialize_with = "bits_map")]
        loss: BTreeMap<u32, f64>,
        #[serde(deserialize_with = "bits_map")]
        ce: BTreeMap<u32, f64>,
        #[serde(deserialize_with = "bits_map")]
        alrs_g: BTreeMap<u32, f64>,
        #[serde(deserialize_with = "bits_map")]
        scale_grad_norm: BTreeMap<u32, f64>,
        #[serde(deserialize_with = "bits_map")]
        weight_grad_norm: BTreeMap<u32, f64>,
        tokens: usize,
        tokens_per_s: f64,
        elapsed_s: f64,
    },
    /// A held-out evaluation after `step` steps: cross-entropy and perplexity per bit-width, and
    /// the float model's perplexity (the teacher's, constant) when known.
    Eval {
        step: u64,
        #[serde(deserialize_with = "bits_map")]
        ce: BTreeMap<u32, f64>,
        #[serde(deserialize_with = "bits_map")]
        ppl: BTreeMap<u32, f64>,
        float_ppl: Option<f64>,
    },
}

/// A map keyed by bit-width, read from JSON's string keys. (serde's internally tagged enums
/// buffer their content, after which integer keys no longer parse from strings by themselves.)
fn bits_map<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<u32, f64>, D::Error> {
    let raw = BTreeMap::<String, f64>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| k.parse::<u32>().map(|b| (b, v)).map_err(|_| serde::de::Error::custom(format!("{k:?} is not a bit-width"))))
        .collect()
}

impl Record {
    pub fn step(&self) -> u64 {
        match self {
            Record::Step { step, .. } | Record::Eval { step, .. } => *step,
        }
    }
}

/// Reads every record of a log (a missing file is an empty log).
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| parse(l).with_context(|| format!("{} line {}: not a log record", path.display(), i + 1)))
        .collect()
}

/// One record.
pub fn parse(line: &str) -> Result<Record> {
    Ok(serde_json::from_str(line)?)
}

/// Keeps only the records up to `step` (a resumed run rewrites what came after its state),
/// rewriting the file atomically. Kept lines are copied as they are (serde_json's default float
/// parsing is not always exact to the last digit, so records are not re-serialized).
pub fn truncate(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut kept = String::new();
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let r = parse(line).with_context(|| format!("{} line {}: not a log record", path.display(), i + 1))?;
        if r.step() <= step {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    model::checkpoint::write_atomically(path, kept.as_bytes())
}

/// Appends one record.
pub fn append(path: &Path, record: &Record) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(record)?).with_context(|| format!("cannot write {}", path.display()))
}

/// A line of (step, value) points with a label.
struct Series {
    label: String,
    color: &'static str,
    points: Vec<(f64, f64)>,
}

const COLORS: [&str; 7] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"];

/// An SVG of two panels: training cross-entropy per precision over steps, and held-out
/// perplexity per precision (log scale) with the float model's as a dashed line.
pub fn plot_svg(records: &[Record], title: &str) -> String {
    let mut bits: Vec<u32> = records
        .iter()
        .flat_map(|r| match r {
            Record::Step { ce, .. } => ce.keys().copied().collect::<Vec<_>>(),
            Record::Eval { ppl, .. } => ppl.keys().copied().collect(),
        })
        .collect();
    bits.sort_unstable_by(|a, b| b.cmp(a));
    bits.dedup();
    let color = |b: u32| COLORS[bits.iter().position(|&x| x == b).unwrap_or(0) % COLORS.len()];
    let mut train = Vec::new();
    let mut heldout = Vec::new();
    for &b in &bits {
        let pts = records
            .iter()
            .filter_map(|r| match r {
                Record::Step { step, ce, .. } => ce.get(&b).map(|v| (*step as f64, *v)),
                _ => None,
            })
            .collect();
        train.push(Series { label: format!("W{b}"), color: color(b), points: pts });
        let pts = records
            .iter()
            .filter_map(|r| match r {
                Record::Eval { step, ppl, .. } => ppl.get(&b).map(|v| (*step as f64, *v)),
                _ => None,
            })
            .collect();
        heldout.push(Series { label: format!("W{b}"), color: color(b), points: pts });
    }
    let float_ppl = records.iter().find_map(|r| match r {
        Record::Eval { float_ppl: Some(p), .. } => Some(*p),
        _ => None,
    });
    let (w, h) = (1000.0, 420.0);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(svg, r#"<text x="{}" y="20" text-anchor="middle" font-size="15">{}</text>"#, w / 2.0, escape(title));
    panel(&mut svg, (60.0, 40.0, 400.0, 330.0), "training cross-entropy (nats/token)", &train, None, false);
    panel(&mut svg, (560.0, 40.0, 400.0, 330.0), "held-out perplexity (log scale)", &heldout, float_ppl, true);
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
fn panel(svg: &mut String, (x0, y0, pw, ph): (f64, f64, f64, f64), title: &str, series: &[Series], reference: Option<f64>, log: bool) {
    let tf = |v: f64| if log { v.max(1e-12).log10() } else { v };
    let values = series.iter().flat_map(|s| s.points.iter().map(|p| tf(p.1))).chain(reference.map(tf)).filter(|v| v.is_finite());
    let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let steps = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
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
    let _ = writeln!(svg, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, x0 + pw / 2.0, y0 - 6.0, escape(title));
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
    let _ = writeln!(svg, r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#, x0 + pw / 2.0, y0 + ph + 32.0);
    if let Some(r) = reference.filter(|r| r.is_finite()) {
        let y = py(r);
        let _ = writeln!(
            svg,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#000" stroke-dasharray="5,4"/><text x="{:.1}" y="{:.1}" text-anchor="end">float {r:.3}</text>"##,
            x0 + pw,
            x0 + pw - 4.0,
            y - 4.0
        );
    }
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s.points.iter().filter(|p| tf(p.1).is_finite()).map(|&(a, b)| format!("{:.1},{:.1}", px(a), py(b))).collect();
        if pts.len() > 1 {
            let _ = writeln!(svg, r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#, s.color, pts.join(" "));
        }
        if s.points.len() <= 60 {
            for p in &pts {
                let (cx, cy) = p.split_once(',').expect("formatted as x,y");
                let _ = writeln!(svg, r#"<circle cx="{cx}" cy="{cy}" r="2.5" fill="{}"/>"#, s.color);
            }
        }
        let (lx, ly) = (x0 + pw - 60.0, y0 + 16.0 + 16.0 * i as f64);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bits_map(v: &[(u32, f64)]) -> BTreeMap<u32, f64> {
        v.iter().copied().collect()
    }

    #[test]
    fn log_round_trips_truncates_and_plots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let eval = |step, a, b| Record::Eval { step, ce: bits_map(&[(8, a), (2, b)]), ppl: bits_map(&[(8, a.exp()), (2, b.exp())]), float_ppl: Some(9.0) };
        append(&path, &eval(0, 2.5, 4.0)).unwrap();
        for step in 1..=4u64 {
            let ce = bits_map(&[(8, 3.0 - 0.1 * step as f64), (2, 5.0 - 0.2 * step as f64)]);
            let r = Record::Step {
                step,
                lr: 1e-4,
                scale_lr: bits_map(&[(8, 1e-4), (2, 1e-7)]),
                loss: ce.clone(),
                ce,
                alrs_g: BTreeMap::new(),
                scale_grad_norm: BTreeMap::new(),
                weight_grad_norm: BTreeMap::new(),
                tokens: 64,
                tokens_per_s: 100.0,
                elapsed_s: step as f64,
            };
            append(&path, &r).unwrap();
        }
        append(&path, &eval(4, 2.2, 3.5)).unwrap();
        let records = read(&path).unwrap();
        assert_eq!(records.len(), 6);
        let svg = plot_svg(&records, "run <1>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("W8") && svg.contains("W2") && svg.contains("float 9.000") && svg.contains("run &lt;1&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 4, "two series per panel");
        truncate(&path, 2).unwrap();
        assert_eq!(read(&path).unwrap().iter().map(Record::step).collect::<Vec<_>>(), vec![0, 1, 2]);
        // An empty log still plots (axes only).
        assert!(plot_svg(&[], "empty").contains("</svg>"));
    }
}
