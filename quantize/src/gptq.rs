//! Hessian-aware rounding of the int8 codes (GPTQ, Frantar et al. 2022, adapted to Double
//! Rounding).
//!
//! A linear layer's output error over calibration inputs X is ‖(Ŵ − W)Xᵀ‖², a quadratic in each
//! row of Ŵ with Hessian H = XᵀX. GPTQ rounds one input column at a time and moves the columns
//! not yet rounded to cancel the error made, through the upper Cholesky factor U of H⁻¹:
//! `w[j+1..] −= (w[j] − ŵ[j]) / U[j,j] · U[j, j+1..]`. Columns are taken by decreasing H[j,j]
//! (`act_order`); the scales are the searched ones ([`crate::ptq`]), fixed before rounding, so the
//! column order does not interact with groups.
//!
//! Under Double Rounding one int8 code serves every bit-width, so rounding follows a priority order
//! of bit-widths (e.g. `4,8`). Each keeps its own compensated copy of the row. The first picks
//! its level nearest its copy; that narrows the int8 codes to the interval giving that level; the
//! next picks the level nearest its copy among those left; 8 bits, always last, fixes the code.
//! Each copy is then compensated with its own error. With `8` alone this is plain GPTQ at 8 bits
//! (the lower precisions are second roundings of it); `4,8` makes 4 bits GPTQ-rounded and 8 bits
//! the best code inside each 4-bit level.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use kernels::{check_bits, codes_keeping, LevelCodes, QuantizedWeight, TieRule, STORED_BITS};
use model::transformer::InputObserver;
use model::weights::{EMBED, LM_HEAD};
use model::{FloatModel, KvCache, ModelConfig, Transformer, Weights};

use crate::model_ptq::QuantizedModel;
use crate::report::OutputError;
use rayon::prelude::*;

/// GPTQ settings: the priority order of bit-widths, the dampening and the column order.
#[derive(Debug, Clone, PartialEq)]
pub struct GptqSpec {
    /// Bit-widths in priority order, each once, ending with 8.
    pub order: Vec<u32>,
    /// Added to H's diagonal, as a fraction of its mean (GPTQ's `percdamp`).
    pub damp: f64,
    /// Round columns by decreasing H[j,j] (GPTQ's `act_order`) instead of left to right.
    pub act_order: bool,
}

impl GptqSpec {
    /// `order` as given, with 8 appended when missing (8 bits fix the code).
    pub fn new(mut order: Vec<u32>) -> Result<Self> {
        ensure!(!order.is_empty(), "GPTQ needs at least one bit-width");
        for (i, &b) in order.iter().enumerate() {
            check_bits(b)?;
            ensure!(!order[..i].contains(&b), "bit-width {b} listed twice in the GPTQ order");
        }
        if order.last() != Some(&STORED_BITS) {
            ensure!(!order.contains(&STORED_BITS), "8 bits fix the code: put 8 last in the GPTQ order");
            order.push(STORED_BITS);
        }
        Ok(GptqSpec { order, damp: 0.01, act_order: true })
    }

    /// Checks the dampening (positive, finite).
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.damp > 0.0 && self.damp.is_finite(),
            "GPTQ dampening must be a positive number (got {})",
            self.damp
        );
        Ok(())
    }
}

impl FromStr for GptqSpec {
    type Err = anyhow::Error;

    /// A comma-separated priority order, e.g. `4,8` or `8`.
    fn from_str(s: &str) -> Result<Self> {
        let order = s
            .split(',')
            .map(|b| b.trim().parse::<u32>().with_context(|| format!("GPTQ order {s:?}: {b:?} is not a bit-width")))
            .collect::<Result<Vec<_>>>()?;
        GptqSpec::new(order)
    }
}

impl fmt::Display for GptqSpec {
    /// As stored in a checkpoint's `rounding`: `gptq:4,8`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let order: Vec<String> = self.order.iter().map(u32::to_string).collect();
        write!(f, "gptq:{}", order.join(","))
    }
}

/// Σ x xᵀ over every calibration input row of one linear layer, `[in, in]` row-major, and the
/// number of rows summed.
#[derive(Debug, Clone)]
pub struct InputMoments {
    pub gram: Vec<f64>,
    pub dim: usize,
    pub rows: usize,
}

/// Accumulates [`InputMoments`] for the weights it is asked about.
struct MomentCollector {
    wanted: HashSet<String>,
    sums: Mutex<HashMap<String, (Tensor, usize)>>,
}

impl InputObserver for MomentCollector {
    fn observe(&self, weight: &str, x: &Tensor) -> Result<()> {
        if !self.wanted.contains(weight) {
            return Ok(());
        }
        let x = x.to_dtype(DType::F32)?;
        let gram = x.t()?.matmul(&x)?;
        let mut sums = self.sums.lock().expect("no panic while holding the lock");
        match sums.get_mut(weight) {
            Some((sum, rows)) => {
                *sum = (&*sum + gram)?;
                *rows += x.dims()[0];
            }
            None => {
                sums.insert(weight.to_string(), (gram, x.dims()[0]));
            }
        }
        Ok(())
    }
}

/// Runs the float model over `blocks` (token sequences of one length) in batches of `batch` and
/// returns the input moments of each weight of `targets` that is a linear layer's, a tied
/// embedding's being those of its lm_head role (the lookup has no input). `on_batch(blocks
/// done)` reports progress.
///
/// Every position counts, the first too, although as an attention sink its MLP input can carry
/// 10⁵ times a typical token's energy and dominate a layer's moments: leaving it out lets GPTQ
/// spoil the sink's output, which costs more (docs/RESULTS.md).
pub fn collect_moments(
    config: &ModelConfig,
    weights: &Weights,
    targets: &[String],
    blocks: &[&[u32]],
    batch: usize,
    mut on_batch: impl FnMut(usize),
) -> Result<HashMap<String, InputMoments>> {
    ensure!(!blocks.is_empty(), "no calibration blocks");
    let seq = blocks[0].len();
    ensure!(seq > 0, "empty calibration blocks");
    let collector =
        Arc::new(MomentCollector { wanted: targets.iter().cloned().collect(), sums: Mutex::new(HashMap::new()) });
    let model = Transformer::observed(config, weights, collector.clone())?;
    // Only the inputs matter: an lm_head that is not a target need not see every position.
    let head = |t: &String| t == LM_HEAD || (config.tie_word_embeddings && t == EMBED);
    let logits_from = if targets.iter().any(head) { 0 } else { seq - 1 };
    let mut done = 0;
    for chunk in blocks.chunks(batch.max(1)) {
        ensure!(chunk.iter().all(|b| b.len() == seq), "calibration blocks differ in length");
        let ids: Vec<u32> = chunk.iter().flat_map(|b| b.iter().copied()).collect();
        let tokens = Tensor::from_vec(ids, (chunk.len(), seq), &Device::Cpu)?;
        model.forward(&tokens, &mut KvCache::new(config), logits_from)?;
        done += chunk.len();
        on_batch(done);
    }
    drop(model);
    let sums = std::mem::take(&mut *collector.sums.lock().expect("no panic while holding the lock"));
    sums.into_iter()
        .map(|(name, (gram, rows))| {
            let dim = gram.dims()[0];
            let gram = gram.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
            Ok((name, InputMoments { gram, dim, rows }))
        })
        .collect()
}

/// The columns in rounding order and the upper Cholesky factor U of the dampened H⁻¹ in that
/// order (row-major, f32).
fn inverse_factor(moments: &InputMoments, spec: &GptqSpec) -> Result<(Vec<usize>, Vec<f32>)> {
    let n = moments.dim;
    ensure!(moments.gram.len() == n * n, "input moments of {} values for dimension {n}", moments.gram.len());
    let mut h = moments.gram.clone();
    // A column no input ever reaches has no effect: a unit diagonal keeps H invertible.
    for j in 0..n {
        if h[j * n + j] <= 0.0 {
            h[j * n + j] = 1.0;
        }
    }
    let mean_diag = (0..n).map(|j| h[j * n + j]).sum::<f64>() / n as f64;
    for j in 0..n {
        h[j * n + j] += spec.damp * mean_diag;
    }
    let mut order: Vec<usize> = (0..n).collect();
    if spec.act_order {
        order.sort_by(|&a, &b| h[b * n + b].total_cmp(&h[a * n + a]));
    }
    let permuted = nalgebra::DMatrix::from_fn(n, n, |i, k| h[order[i] * n + order[k]]);
    let inverse =
        permuted.cholesky().context("the input Hessian is not positive definite (raise the dampening)")?.inverse();
    let lower = inverse
        .cholesky()
        .context("the inverse input Hessian is not positive definite (raise the dampening)")?
        .unpack();
    // U = Lᵀ: row j of U is column j of L.
    let mut u = vec![0f32; n * n];
    for j in 0..n {
        for k in j..n {
            u[j * n + k] = lower[(k, j)] as f32;
        }
    }
    Ok((order, u))
}

/// Rows rounded together: U's row is read once per tile (it stays in cache across the tile).
const ROW_TILE: usize = 16;

/// Re-rounds the codes of `q` (a quantization of the `[rows, cols]` weight `w` with its scales
/// already chosen) by GPTQ with the input moments of its layer. The scales are not changed.
pub fn round_weight(
    w: &[f32],
    q: &mut QuantizedWeight,
    moments: &InputMoments,
    spec: &GptqSpec,
    tie: TieRule,
) -> Result<()> {
    round_weight_within(w, q, moments, spec, tie, &[])
}

/// [`round_weight`], each code kept among those that serve its current level at every bit-width
/// of `keep`: after block-wise reconstruction trained the lower precisions' levels, the 8-bit
/// codes (order `8`) move only inside them, towards the float layer's output instead of the
/// nearest float weight.
pub fn round_weight_within(
    w: &[f32],
    q: &mut QuantizedWeight,
    moments: &InputMoments,
    spec: &GptqSpec,
    tie: TieRule,
    keep: &[u32],
) -> Result<()> {
    for &b in keep {
        check_bits(b)?;
    }
    let kept: Vec<LevelCodes> = keep.iter().filter(|&&b| b < STORED_BITS).map(|&b| LevelCodes::new(b, tie)).collect();
    let layout = q.layout;
    let (rows, cols) = (layout.rows, layout.cols);
    ensure!(w.len() == rows * cols && q.codes.len() == rows * cols, "weight of {} values for {rows}x{cols}", w.len());
    ensure!(moments.dim == cols, "input moments of dimension {} for a weight of {cols} columns", moments.dim);
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    if spec.order.last() != Some(&STORED_BITS) {
        bail!("the GPTQ order must end with 8");
    }
    let (order, u) = inverse_factor(moments, spec)?;
    let levels: Vec<LevelCodes> = spec.order.iter().map(|&b| LevelCodes::new(b, tie)).collect();
    let n_groups = layout.n_groups();
    let scales = &q.scales;
    q.codes.par_chunks_mut(ROW_TILE * cols).zip(w.par_chunks(ROW_TILE * cols)).enumerate().for_each(
        |(tile, (codes, w))| {
            let first_row = tile * ROW_TILE;
            let tile_rows = codes.len() / cols;
            // copies[r][p]: row r's compensated copy for the p-th bit-width, in rounding order.
            let mut copies: Vec<Vec<Vec<f32>>> = (0..tile_rows)
                .map(|r| {
                    let row: Vec<f32> = order.iter().map(|&c| w[r * cols + c]).collect();
                    vec![row; levels.len()]
                })
                .collect();
            for (j, &col) in order.iter().enumerate() {
                let u_row = &u[j * cols..(j + 1) * cols];
                let d = u_row[j];
                for (r, copy) in copies.iter_mut().enumerate() {
                    let s = scales[(first_row + r) * n_groups + col / layout.group];
                    let (lo, hi) = codes_keeping(codes[r * cols + col], &kept);
                    let code = if s != 0.0 { pick_code(&levels, copy, j, s, (lo, hi)) } else { 0.clamp(lo, hi) };
                    codes[r * cols + col] = code;
                    for (lv, row) in levels.iter().zip(copy.iter_mut()) {
                        let err = (row[j] - f32::from(lv.level(code)) * lv.step() * s) / d;
                        for (x, &h) in row[j + 1..].iter_mut().zip(&u_row[j + 1..]) {
                            *x -= err * h;
                        }
                    }
                }
            }
        },
    );
    Ok(())
}

/// The code of column `j` within `[lo, hi]`: each bit-width in turn picks its level nearest its
/// own copy among the codes the previous ones left.
fn pick_code(levels: &[LevelCodes], copy: &[Vec<f32>], j: usize, s: f32, (mut lo, mut hi): (i8, i8)) -> i8 {
    for (lv, row) in levels.iter().zip(copy) {
        let target = (row[j] / (lv.step() * s)).round();
        let (min, max) = (lv.level(lo), lv.level(hi));
        let level =
            if target.is_nan() { 0.clamp(min, max) } else { target.clamp(f32::from(min), f32::from(max)) as i8 };
        let (first, last) = lv.codes_of(level);
        (lo, hi) = (lo.max(first), hi.min(last));
        debug_assert!(lo <= hi, "bits {}: empty code interval", lv.bits());
    }
    lo
}

/// Output errors of quantizations of one weight `w` over its layer's calibration inputs, relative
/// to the weight's own output energy: `tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`. H and the energy are built
/// once per weight, however many codes and bit-widths are measured.
pub struct OutputErrorMeter<'a> {
    w: &'a [f32],
    h: Tensor,
    energy: f64,
}

impl<'a> OutputErrorMeter<'a> {
    pub fn new(w: &'a [f32], moments: &InputMoments) -> Result<Self> {
        let dim = moments.dim;
        ensure!(
            dim > 0 && w.len().is_multiple_of(dim),
            "a weight of {} values for input moments of dimension {dim}",
            w.len()
        );
        let h = Tensor::from_vec(moments.gram.clone(), (dim, dim), &Device::Cpu)?;
        let mut meter = OutputErrorMeter { w, h, energy: 1.0 };
        meter.energy = meter.energy_of(w.iter().map(|&x| f64::from(x)).collect())?;
        Ok(meter)
    }

    /// `tr(M H Mᵀ)` of a `[rows, dim]` matrix.
    fn energy_of(&self, m: Vec<f64>) -> Result<f64> {
        let dim = self.h.dims()[0];
        let rows = m.len() / dim;
        let m = Tensor::from_vec(m, (rows, dim), &Device::Cpu)?;
        Ok(m.matmul(&self.h)?.mul(&m)?.sum_all()?.to_scalar::<f64>()?)
    }

    /// The relative output error of `q` served at `bits`.
    pub fn relative(&self, q: &QuantizedWeight, bits: u32, tie: TieRule) -> Result<f64> {
        ensure!(
            q.codes.len() == self.w.len(),
            "a quantization of {} values for a weight of {}",
            q.codes.len(),
            self.w.len()
        );
        if self.energy <= 0.0 {
            return Ok(0.0);
        }
        let diff =
            q.dequantize(bits, tie)?.into_iter().zip(self.w).map(|(d, &x)| f64::from(d) - f64::from(x)).collect();
        Ok(self.energy_of(diff)? / self.energy)
    }
}

/// Re-rounds every quantized weight of `q` that has input moments (every linear layer; a tied
/// embedding keeps its nearest rounding) and records, per weight and bit-width of the spec, the
/// relative output error of the rounding before and of GPTQ's. Each code is kept within its level
/// at every bit-width of `keep` ([`round_weight_within`]). `on_weight` is called after each.
pub fn round_model(
    float: &FloatModel,
    q: &mut QuantizedModel,
    moments: &HashMap<String, InputMoments>,
    spec: &GptqSpec,
    keep: &[u32],
    mut on_weight: impl FnMut(&str),
) -> Result<()> {
    let tie = q.quantization.tie()?;
    let bits = q.quantization.bits.clone();
    for layer in q.report.iter_mut() {
        let Some(m) = moments.get(&layer.name) else { continue };
        // A tied embedding's codes also serve the lookup, which these moments (its lm_head
        // role's) do not see: it keeps its nearest rounding.
        if layer.name == EMBED {
            continue;
        }
        let weight =
            q.quantized.get_mut(&layer.name).with_context(|| format!("no quantized weight `{}`", layer.name))?;
        let w: Vec<f32> = float.weights.get(&layer.name, &[layer.rows, layer.cols])?.flatten_all()?.to_vec1()?;
        let meter = OutputErrorMeter::new(&w, m)?;
        let nearest = bits.iter().map(|&b| meter.relative(weight, b, tie)).collect::<Result<Vec<_>>>()?;
        round_weight_within(&w, weight, m, spec, tie, keep)
            .with_context(|| format!("GPTQ rounding of `{}`", layer.name))?;
        let gptq = bits.iter().map(|&b| meter.relative(weight, b, tie)).collect::<Result<Vec<_>>>()?;
        layer.relative_error = bits
            .iter()
            .map(|&b| Ok((b, crate::reconstruction_error(&w, weight, b, tie)?)))
            .collect::<Result<Vec<_>, crate::PtqError>>()?;
        layer.output_error = Some(OutputError {
            nearest: bits.iter().copied().zip(nearest).collect(),
            gptq: bits.iter().copied().zip(gptq).collect(),
        });
        on_weight(&layer.name);
    }
    q.quantization.rounding = spec.to_string();
    Ok(())
}
