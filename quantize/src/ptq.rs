//! Post-training scale search for Double Rounding (METHOD.md §1, "Initial scales").
//!
//! Each row/group gets one scale `s`, chosen among clip ratios `r` of `absmax / 127` (or, on the
//! [`Grid::MaxNegative`] grid, of `absmax / 128` with the sign that puts the largest magnitude on
//! the negative side) so that the reconstruction error summed over every served bit-width
//! (through the double-rounded path) is minimal. The first rounding is round half to even ([`kernels::first_round`]); ties have measure
//! zero for float weights, so the choice only matters for exact reproducibility.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use kernels::{
    check_bits, code_index, first_round, level_table, Granularity, KernelError, QuantizedWeight, ScaleLayout, TieRule,
};

/// What the scale search minimises over the bit set B, per row/group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SearchObjective {
    /// Σ_b MSE_b. The lowest bit-width's error is orders of magnitude larger than the others, so
    /// this is in effect a search for the lowest bit-width alone.
    Sum,
    /// Σ_b MSE_b / MSE_b*, with MSE_b* the best error reachable at bit b alone among the evaluated
    /// scales: every precision counts by how far it is from its own optimum. The default, because
    /// it keeps 8 bits near-lossless (Sum clips outliers hard at 8 bits to help 2 bits).
    #[default]
    Normalized,
}

impl fmt::Display for SearchObjective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SearchObjective::Sum => "sum",
            SearchObjective::Normalized => "normalized",
        })
    }
}

impl FromStr for SearchObjective {
    type Err = PtqError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sum" => Ok(SearchObjective::Sum),
            "normalized" => Ok(SearchObjective::Normalized),
            _ => Err(PtqError::Parse(format!("search objective {s:?} (expected \"sum\" or \"normalized\")"))),
        }
    }
}

/// Where a group's codes sit relative to its weights: the sign of its scale.
///
/// A b-bit code spans `−2^(b−1) ..= 2^(b−1) − 1`: the negative side has one level more. Symmetric
/// grids leave it to chance; llama.cpp's Q4_0 puts each block's largest-magnitude weight there.
/// With Double Rounding the same choice carries to every precision: a weight coded −128 at 8 bits
/// is −8 at 4 bits and −2 at 2 bits, so the extra level lands where the largest weight is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Grid {
    /// Positive scales; clip ratio 1 codes the largest magnitude as ±127.
    #[default]
    Symmetric,
    /// The scale's sign puts the group's largest-magnitude weight on the negative side; clip
    /// ratio 1 codes it as −128 (llama.cpp Q4_0's trick, at every bit-width).
    MaxNegative,
}

impl fmt::Display for Grid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Grid::Symmetric => "symmetric",
            Grid::MaxNegative => "max-negative",
        })
    }
}

impl FromStr for Grid {
    type Err = PtqError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "symmetric" => Ok(Grid::Symmetric),
            "max-negative" => Ok(Grid::MaxNegative),
            _ => Err(PtqError::Parse(format!("grid {s:?} (expected \"symmetric\" or \"max-negative\")"))),
        }
    }
}

/// How to quantize: the served bit set, the scale granularity, the second-rounding tie rule, the
/// scale-search objective and the grid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantSpec {
    /// Served bit-widths, each in 2..=8, no duplicates (e.g. `[8, 4, 2]`).
    pub bits: Vec<u32>,
    pub granularity: Granularity,
    /// Weights whose name contains the key get that granularity instead (e.g. `embed_tokens` →
    /// `group:32`: the tied embedding is a fifth of SmolLM2's weights and its most sensitive
    /// matrix at 4 bits). A name may match one key at most.
    pub granularity_overrides: BTreeMap<String, Granularity>,
    pub tie: TieRule,
    pub objective: SearchObjective,
    pub grid: Grid,
}

impl Default for QuantSpec {
    fn default() -> Self {
        QuantSpec {
            bits: vec![8, 4, 2],
            granularity: Granularity::default(),
            granularity_overrides: BTreeMap::new(),
            tie: TieRule::default(),
            objective: SearchObjective::default(),
            grid: Grid::default(),
        }
    }
}

impl fmt::Display for QuantSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits: Vec<String> = self.bits.iter().map(u32::to_string).collect();
        write!(f, "bits {} {} tie {} objective {}", bits.join(","), self.granularity, self.tie, self.objective)?;
        for (pattern, g) in &self.granularity_overrides {
            write!(f, " {pattern} {g}")?;
        }
        if self.grid != Grid::Symmetric {
            write!(f, " grid {}", self.grid)?;
        }
        Ok(())
    }
}

impl QuantSpec {
    /// How the scales were found, as checkpoints record it (`search:normalized`, with
    /// `:max-negative` on that grid).
    pub fn scale_method(&self) -> String {
        match self.grid {
            Grid::Symmetric => format!("search:{}", self.objective),
            grid => format!("search:{}:{grid}", self.objective),
        }
    }
}

impl QuantSpec {
    /// Checks the bit set (non-empty, each in 2..=8, no duplicates) and the granularity.
    pub fn validate(&self) -> Result<(), PtqError> {
        if self.bits.is_empty() {
            return Err(PtqError::Spec("empty bit set".into()));
        }
        for (i, &b) in self.bits.iter().enumerate() {
            check_bits(b)?;
            if self.bits[..i].contains(&b) {
                return Err(PtqError::Spec(format!("bit-width {b} listed twice")));
            }
        }
        if self.granularity == Granularity::Group(0)
            || self.granularity_overrides.values().any(|g| *g == Granularity::Group(0))
        {
            return Err(KernelError::ZeroGroup.into());
        }
        if self.granularity_overrides.keys().any(String::is_empty) {
            return Err(PtqError::Spec("a granularity override with an empty name pattern".into()));
        }
        Ok(())
    }

    /// The granularity of the weight `name`: its override's, else the spec's.
    pub fn granularity_of(&self, name: &str) -> Result<Granularity, PtqError> {
        let mut matches = self.granularity_overrides.iter().filter(|(pattern, _)| name.contains(pattern.as_str()));
        match (matches.next(), matches.next()) {
            (None, _) => Ok(self.granularity),
            (Some((_, &g)), None) => Ok(g),
            (Some((a, _)), Some((b, _))) => {
                Err(PtqError::Spec(format!("`{name}` matches the granularity overrides `{a}` and `{b}`")))
            }
        }
    }

    /// The spec that quantizes the weight `name`: its granularity resolved, no overrides left.
    pub fn for_weight(&self, name: &str) -> Result<QuantSpec, PtqError> {
        Ok(QuantSpec {
            granularity: self.granularity_of(name)?,
            granularity_overrides: BTreeMap::new(),
            ..self.clone()
        })
    }

    /// What a checkpoint of the weights `names` records: each weight whose granularity differs
    /// from the spec's, by full name.
    pub fn stored_overrides<'a>(
        &self,
        names: impl IntoIterator<Item = &'a String>,
    ) -> Result<BTreeMap<String, String>, PtqError> {
        let mut stored = BTreeMap::new();
        for name in names {
            let g = self.granularity_of(name)?;
            if g != self.granularity {
                stored.insert(name.clone(), g.to_string());
            }
        }
        Ok(stored)
    }

    /// Parses a recipe's `granularity_overrides` table (name pattern → `channel` or `group:N`).
    pub fn parse_overrides(table: &BTreeMap<String, String>) -> Result<BTreeMap<String, Granularity>, PtqError> {
        table.iter().map(|(pattern, g)| Ok((pattern.clone(), g.parse::<Granularity>()?))).collect()
    }

    /// Parses `PATTERN=GRANULARITY` (the command lines' `--granularity-override`).
    pub fn parse_override(text: &str) -> Result<(String, Granularity), PtqError> {
        let (pattern, g) = text.split_once('=').filter(|(pattern, _)| !pattern.is_empty()).ok_or_else(|| {
            PtqError::Parse(format!(
                "granularity override {text:?} (expected NAME=GRANULARITY, e.g. embed_tokens=group:32)"
            ))
        })?;
        Ok((pattern.to_string(), g.parse::<Granularity>()?))
    }
}

/// PTQ errors: bad arguments or non-finite weights.
#[derive(Debug, Clone, PartialEq)]
pub enum PtqError {
    Kernel(KernelError),
    /// An invalid `QuantSpec`.
    Spec(String),
    /// A name that does not parse.
    Parse(String),
    /// A weight buffer whose length is not `rows · cols`.
    Shape {
        rows: usize,
        cols: usize,
        len: usize,
    },
    /// A NaN or infinite weight.
    NonFinite {
        index: usize,
        value: f32,
    },
}

impl fmt::Display for PtqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PtqError::Kernel(e) => e.fmt(f),
            PtqError::Spec(m) => write!(f, "invalid quantization spec: {m}"),
            PtqError::Parse(m) => write!(f, "cannot parse {m}"),
            PtqError::Shape { rows, cols, len } => {
                write!(f, "weight has {len} elements, expected {rows}x{cols}")
            }
            PtqError::NonFinite { index, value } => {
                write!(f, "weight element {index} is {value}, not finite")
            }
        }
    }
}

impl std::error::Error for PtqError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PtqError::Kernel(e) => Some(e),
            _ => None,
        }
    }
}

impl From<KernelError> for PtqError {
    fn from(e: KernelError) -> Self {
        PtqError::Kernel(e)
    }
}

/// Quantizes a row-major `[rows, cols]` weight: per row/group, searches the scale for `spec`'s
/// objective over the double-rounded path at every bit of the set, then stores the int8 codes.
/// All-zero groups get scale 1 and codes 0. Rows are split across the available cores.
pub fn quantize_weight(w: &[f32], rows: usize, cols: usize, spec: &QuantSpec) -> Result<QuantizedWeight, PtqError> {
    spec.validate()?;
    let layout = spec.granularity.layout(rows, cols)?;
    if w.len() != layout.n_weights() {
        return Err(PtqError::Shape { rows, cols, len: w.len() });
    }
    if let Some(index) = w.iter().position(|x| !x.is_finite()) {
        return Err(PtqError::NonFinite { index, value: w[index] });
    }
    let searcher = Searcher::new(spec)?;
    let mut codes = vec![0i8; w.len()];
    let mut scales = vec![0f32; layout.n_scales()];
    if !w.is_empty() {
        // Spawning costs more than searching a small tensor.
        const MIN_WEIGHTS_PER_THREAD: usize = 1 << 15;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = cores.min(w.len().div_ceil(MIN_WEIGHTS_PER_THREAD)).clamp(1, rows);
        let rows_per = rows.div_ceil(threads);
        let n_groups = layout.n_groups();
        std::thread::scope(|scope| {
            let chunks = w
                .chunks(rows_per * cols)
                .zip(codes.chunks_mut(rows_per * cols))
                .zip(scales.chunks_mut(rows_per * n_groups));
            for ((w, codes), scales) in chunks {
                let searcher = &searcher;
                scope.spawn(move || searcher.quantize_rows(w, codes, scales, &layout));
            }
        });
    }
    Ok(QuantizedWeight::new(codes, scales, layout))
}

/// Relative reconstruction error at `bits`: ‖Ŵ_b − W‖² / ‖W‖² (0 when both are zero, infinite
/// when only W is).
pub fn reconstruction_error(w: &[f32], q: &QuantizedWeight, bits: u32, tie: TieRule) -> Result<f64, PtqError> {
    let layout = q.layout;
    layout.validate()?;
    if w.len() != layout.n_weights() {
        return Err(PtqError::Shape { rows: layout.rows, cols: layout.cols, len: w.len() });
    }
    let w_hat = q.dequantize(bits, tie)?;
    let (err, energy) = w.iter().zip(&w_hat).fold((0f64, 0f64), |(e, n), (&x, &y)| {
        let d = f64::from(y) - f64::from(x);
        (e + d * d, n + f64::from(x) * f64::from(x))
    });
    Ok(if err == 0.0 { 0.0 } else { err / energy })
}

/// Coarse clip ratios: 1 (absmax itself), (COARSE_STEPS − 1)/COARSE_STEPS, …, 1/COARSE_STEPS.
const COARSE_STEPS: u32 = 20;
/// Refinement passes around the best ratio so far: step sizes, each tried at ±1..=REFINE_SPAN
/// steps. Each span is shorter than the previous step, so no ratio is evaluated twice.
const REFINE_STEPS: [f32; 2] = [0.01, 0.002];
const REFINE_SPAN: u32 = 4;
/// A lower bound of every ratio the grids above can reach (1/20 − 4·0.01 − 4·0.002 = 0.002).
const MIN_RATIO: f32 = 1e-3;
/// Most bit-widths in a set (2..=8).
const MAX_BITS: usize = 7;

/// `s` rounded to the nearest f16, the precision checkpoints store scales in: candidates are
/// evaluated, codes computed and training's fake quantizer run with exactly the scale that will
/// be served. Never below the smallest normal f16 in magnitude, so a scale cannot round to zero
/// (and `1/s` stays finite); the sign is kept ([`Grid::MaxNegative`] uses negative scales).
pub fn stored_scale(s: f32) -> f32 {
    let magnitude = half::f16::from_f32(s.abs()).to_f32().max(half::f16::MIN_POSITIVE.to_f32());
    magnitude.copysign(s)
}

/// Per-bit sums of squared errors of one candidate scale.
type Errors = [f64; MAX_BITS];

/// The scale search of one `QuantSpec`, shared by the worker threads.
struct Searcher {
    /// Per served bit-width, each code's level in units of the stored scale.
    tables: Vec<[f32; 256]>,
    objective: SearchObjective,
    grid: Grid,
}

/// Per-thread buffers, reused across groups.
#[derive(Default)]
struct Scratch {
    /// Code indices of the group at the candidate being evaluated.
    idx: Vec<u8>,
    /// Evaluated (ratio, per-bit errors).
    candidates: Vec<(f32, Errors)>,
}

impl Searcher {
    fn new(spec: &QuantSpec) -> Result<Self, PtqError> {
        let tables = spec.bits.iter().map(|&b| level_table(b, spec.tie)).collect::<Result<_, _>>()?;
        Ok(Searcher { tables, objective: spec.objective, grid: spec.grid })
    }

    /// Quantizes whole rows: `w` and `codes` hold `k` rows, `scales` their `k · n_groups` scales.
    fn quantize_rows(&self, w: &[f32], codes: &mut [i8], scales: &mut [f32], layout: &ScaleLayout) {
        let mut scratch = Scratch::default();
        let n_groups = layout.n_groups();
        let rows = w.chunks_exact(layout.cols).zip(codes.chunks_exact_mut(layout.cols));
        for ((w_row, code_row), row_scales) in rows.zip(scales.chunks_exact_mut(n_groups)) {
            let groups = w_row.chunks(layout.group).zip(code_row.chunks_mut(layout.group));
            for ((w_group, code_group), scale) in groups.zip(row_scales) {
                *scale = self.search(w_group, &mut scratch);
                let inv = 1.0 / *scale;
                for (c, &x) in code_group.iter_mut().zip(w_group) {
                    *c = first_round(x * inv);
                }
            }
        }
    }

    /// The best scale of one group: a coarse grid of clip ratios, then finer grids around the
    /// best ratio so far.
    fn search(&self, w: &[f32], scratch: &mut Scratch) -> f32 {
        let (argmax, absmax) =
            w.iter().enumerate().fold((0, 0f32), |m, (i, x)| if x.abs() > m.1 { (i, x.abs()) } else { m });
        let base = match self.grid {
            Grid::Symmetric => absmax / 127.0,
            // A positive largest weight needs a negative scale to be coded −128.
            Grid::MaxNegative if w.get(argmax).is_some_and(|&x| x > 0.0) => -absmax / 128.0,
            Grid::MaxNegative => absmax / 128.0,
        };
        // All-zero, or so tiny that some candidate scale would be subnormal (and 1/s overflow):
        // code it as zeros, the error is below f32 resolution anyway.
        if !(base.abs() * MIN_RATIO).is_normal() {
            return 1.0;
        }
        let energy: f64 = w.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        scratch.candidates.clear();
        for k in (1..=COARSE_STEPS).rev() {
            let ratio = k as f32 / COARSE_STEPS as f32;
            let errors = self.errors(w, stored_scale(ratio * base), &mut scratch.idx);
            scratch.candidates.push((ratio, errors));
        }
        for step in REFINE_STEPS {
            let center = scratch.candidates[self.best(&scratch.candidates, energy)].0;
            for j in 1..=REFINE_SPAN {
                for ratio in [center - j as f32 * step, center + j as f32 * step] {
                    if ratio > 0.0 && ratio <= 1.0 {
                        let errors = self.errors(w, stored_scale(ratio * base), &mut scratch.idx);
                        scratch.candidates.push((ratio, errors));
                    }
                }
            }
        }
        stored_scale(scratch.candidates[self.best(&scratch.candidates, energy)].0 * base)
    }

    /// Index of the candidate minimising the objective; the first one on ties, so absmax (evaluated
    /// first) wins any tie and a refinement must be strictly better to be chosen.
    fn best(&self, candidates: &[(f32, Errors)], energy: f64) -> usize {
        let n = self.tables.len();
        let mut weights = [1f64; MAX_BITS];
        if self.objective == SearchObjective::Normalized {
            // A floor keeps the ratio finite where some scale reproduces the group exactly.
            let floor = energy * 1e-12 + f64::MIN_POSITIVE;
            for (b, weight) in weights[..n].iter_mut().enumerate() {
                let best = candidates.iter().map(|c| c.1[b]).fold(f64::INFINITY, f64::min);
                *weight = 1.0 / best.max(floor);
            }
        }
        let objective = |e: &Errors| -> f64 { (0..n).map(|b| e[b] * weights[b]).sum() };
        let mut best = (0, f64::INFINITY);
        for (i, (_, e)) in candidates.iter().enumerate() {
            let value = objective(e);
            if value < best.1 {
                best = (i, value);
            }
        }
        best.0
    }

    /// Sum of squared errors of the group at every served bit-width with scale `s`.
    fn errors(&self, w: &[f32], s: f32, idx: &mut Vec<u8>) -> Errors {
        let inv = 1.0 / s;
        idx.clear();
        idx.extend(w.iter().map(|&x| code_index(first_round(x * inv)) as u8));
        let mut out = [0f64; MAX_BITS];
        for (table, out) in self.tables.iter().zip(&mut out) {
            // Error in units of s: table[q] − x/s. Four lanes keep the f32 sums short and let
            // the additions overlap.
            let mut acc = [0f32; 4];
            let (w4, w_tail) = w.split_at(w.len() - w.len() % 4);
            let (i4, i_tail) = idx.split_at(w4.len());
            for (x, q) in w4.chunks_exact(4).zip(i4.chunks_exact(4)) {
                for lane in 0..4 {
                    let d = table[usize::from(q[lane])] - x[lane] * inv;
                    acc[lane] += d * d;
                }
            }
            let tail: f32 = w_tail.iter().zip(i_tail).map(|(&x, &q)| (table[usize::from(q)] - x * inv).powi(2)).sum();
            let units: f64 = acc.iter().map(|&a| f64::from(a)).sum::<f64>() + f64::from(tail);
            *out = units * f64::from(s) * f64::from(s);
        }
        out
    }
}
