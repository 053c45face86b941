//! The run's JSONL log (one record per step and per evaluation) and its SVG plot: training
//! cross-entropy and held-out perplexity per precision over steps (`model::plot`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use cli::plot::{document, panel, Panel, Series, COLORS};
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
        .map(|(k, v)| {
            k.parse::<u32>().map(|b| (b, v)).map_err(|_| serde::de::Error::custom(format!("{k:?} is not a bit-width")))
        })
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
    cli::write_atomically(path, kept.as_bytes())
}

/// Appends one record.
pub fn append(path: &Path, record: &Record) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(record)?).with_context(|| format!("cannot write {}", path.display()))
}

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
        train.push(Series { label: format!("W{b}"), color: color(b), points: pts, point_labels: Vec::new() });
        let pts = records
            .iter()
            .filter_map(|r| match r {
                Record::Eval { step, ppl, .. } => ppl.get(&b).map(|v| (*step as f64, *v)),
                _ => None,
            })
            .collect();
        heldout.push(Series { label: format!("W{b}"), color: color(b), points: pts, point_labels: Vec::new() });
    }
    let float_ppl = records.iter().find_map(|r| match r {
        Record::Eval { float_ppl: Some(p), .. } => Some(*p),
        _ => None,
    });
    document(1000.0, 420.0, title, |svg| {
        let train_panel = Panel {
            title: "training cross-entropy (nats/token)",
            x_label: "step",
            log_y: false,
            reference: None,
            marks: Vec::new(),
        };
        panel(svg, (60.0, 40.0, 400.0, 330.0), &train_panel, &train);
        let reference = float_ppl.map(|p| (p, format!("float {p:.3}")));
        let heldout_panel = Panel {
            title: "held-out perplexity (log scale)",
            x_label: "step",
            log_y: true,
            reference,
            marks: Vec::new(),
        };
        panel(svg, (560.0, 40.0, 400.0, 330.0), &heldout_panel, &heldout);
    })
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
        let eval = |step, a, b| Record::Eval {
            step,
            ce: bits_map(&[(8, a), (2, b)]),
            ppl: bits_map(&[(8, a.exp()), (2, b.exp())]),
            float_ppl: Some(9.0),
        };
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
        assert!(
            svg.contains("W8") && svg.contains("W2") && svg.contains("float 9.000") && svg.contains("run &lt;1&gt;")
        );
        assert_eq!(svg.matches("<polyline").count(), 4, "two series per panel");
        truncate(&path, 2).unwrap();
        assert_eq!(read(&path).unwrap().iter().map(Record::step).collect::<Vec<_>>(), vec![0, 1, 2]);
        // An empty log still plots (axes only).
        assert!(plot_svg(&[], "empty").contains("</svg>"));
    }
}
