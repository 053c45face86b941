//! Per-precision corrections: for a bit-width `b` below 8, factors that rescale the scales `b` is
//! served with, fitted so that the weight served at `b` bits is closest to the float weight in
//! its output over calibration inputs. One factor per output row, or one per scale group
//! (`α_g`, the row's served values in group `g` being `p_g`):
//!
//! ```text
//! α = argmin_a ‖X (w_r − Σ_g a_g p_g)ᵀ‖²   ⇔   A α = c,   A_gh = p_g H p_hᵀ,  c_g = p_g H w_rᵀ,  H = XᵀX
//! ```
//!
//! (a row is the case of one group), or in weight space (`H = I`) when no calibration inputs are
//! given. A small ridge towards 1 keeps the system solvable where a group's served values are all
//! zero. The stored codes do not change; the kernels serve the corrected scales instead of the
//! stored ones (free at serving time). Factors are stored as f16, 16 bits per row or per group
//! and corrected bit-width.

use std::collections::{BTreeMap, HashMap};

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use kernels::{QuantizedWeight, TieRule};
use model::checkpoint::CorrectionGranularity;
use model::FloatModel;

use crate::gptq::InputMoments;
use crate::model_ptq::QuantizedModel;
use crate::ptq::reconstruction_error;

/// Relative weight of the ridge towards α = 1 (of the mean diagonal of each row's system).
const RIDGE: f64 = 1e-6;

/// The corrections of `q` (the quantization of the float weight `w`, `[rows, cols]` row-major)
/// for each of `bits`, one factor per row or per scale group, fitted to the output over `moments`
/// (or the weight itself).
pub fn fit_corrections(
    w: &[f32],
    q: &QuantizedWeight,
    bits: &[u32],
    tie: TieRule,
    moments: Option<&InputMoments>,
    granularity: CorrectionGranularity,
) -> Result<BTreeMap<u32, Vec<f32>>> {
    let layout = q.layout;
    let (rows, cols) = (layout.rows, layout.cols);
    ensure!(w.len() == rows * cols, "a weight of {} values for a {rows}x{cols} quantization", w.len());
    let h = match moments {
        Some(m) => {
            ensure!(m.dim == cols, "input moments of dimension {} for a weight of {cols} columns", m.dim);
            Some(Tensor::from_vec(m.gram.clone(), (cols, cols), &Device::Cpu)?)
        }
        None => None,
    };
    // The column ranges one factor covers.
    let spans: Vec<std::ops::Range<usize>> = match granularity {
        CorrectionGranularity::Row => std::iter::once(0..cols).collect(),
        CorrectionGranularity::Group => (0..layout.n_groups()).map(|g| layout.group_cols(g)).collect(),
    };
    let k = spans.len();
    let w64: Vec<f64> = w.iter().map(|&x| f64::from(x)).collect();
    // w H (or w itself), shared by every bit-width.
    let hw = weighted(&w64, rows, cols, h.as_ref(), 0..cols)?;
    let mut out = BTreeMap::new();
    for &b in bits {
        // Without corrections: each factor is fitted to the plain second rounding (stored scales).
        let mut served = vec![0f32; w.len()];
        kernels::dequantize(&q.codes, &q.scales, &layout, b, tie, &mut served).map_err(|e| anyhow::anyhow!("{e}"))?;
        let p: Vec<f64> = served.iter().map(|&x| f64::from(x)).collect();
        // a[r][g][h] = p_g H p_hᵀ, c[r][g] = p_g H w_rᵀ.
        let mut a = vec![0f64; rows * k * k];
        let mut c = vec![0f64; rows * k];
        for (hi, span_h) in spans.iter().enumerate() {
            // p_h H: the products of group h's served values with H, for every row.
            let hp = match &h {
                Some(_) => Some(weighted(&p, rows, cols, h.as_ref(), span_h.clone())?),
                None => None,
            };
            for r in 0..rows {
                let row = r * cols;
                for (gi, span_g) in spans.iter().enumerate() {
                    let dot = match &hp {
                        Some(hp) => span_g.clone().map(|i| p[row + i] * hp[row + i]).sum(),
                        // H = I: groups are independent.
                        None if gi == hi => span_g.clone().map(|i| p[row + i] * p[row + i]).sum(),
                        None => 0.0,
                    };
                    a[(r * k + gi) * k + hi] = dot;
                }
            }
        }
        for r in 0..rows {
            let row = r * cols;
            for (gi, span_g) in spans.iter().enumerate() {
                c[r * k + gi] = span_g.clone().map(|i| p[row + i] * hw[row + i]).sum();
            }
        }
        let mut alpha = Vec::with_capacity(rows * k);
        for r in 0..rows {
            let solved = solve_ridged(&mut a[r * k * k..(r + 1) * k * k], &mut c[r * k..(r + 1) * k]);
            alpha.extend(solved.iter().map(|&x| stored_correction(x)));
        }
        out.insert(b, alpha);
    }
    Ok(out)
}

/// `x H` restricted to the columns `span` of `x` (`[rows, cols]` row-major), i.e. `x[:, span] ·
/// H[span, :]`, or `x` itself (`H = I`) when `h` is `None`.
fn weighted(x: &[f64], rows: usize, cols: usize, h: Option<&Tensor>, span: std::ops::Range<usize>) -> Result<Vec<f64>> {
    let Some(h) = h else { return Ok(x.to_vec()) };
    let x = Tensor::from_slice(x, (rows, cols), &Device::Cpu)?.narrow(1, span.start, span.len())?;
    Ok(x.contiguous()?.matmul(&h.narrow(0, span.start, span.len())?.contiguous()?)?.flatten_all()?.to_vec1()?)
}

/// Solves `(A + λI) α = c + λ·1` (`A` `k×k` row-major, symmetric positive semi-definite) in place
/// by Gaussian elimination with partial pivoting; λ = [`RIDGE`] · mean diagonal. All-zero systems
/// (no served value in the row) give α = 1.
fn solve_ridged(a: &mut [f64], c: &mut [f64]) -> Vec<f64> {
    let k = c.len();
    let lambda = RIDGE * (0..k).map(|i| a[i * k + i]).sum::<f64>() / k as f64;
    if !(lambda > 0.0 && lambda.is_finite()) {
        return vec![1.0; k];
    }
    for i in 0..k {
        a[i * k + i] += lambda;
        c[i] += lambda;
    }
    for col in 0..k {
        let pivot = (col..k).max_by(|&x, &y| a[x * k + col].abs().total_cmp(&a[y * k + col].abs())).unwrap_or(col);
        if pivot != col {
            for j in 0..k {
                a.swap(col * k + j, pivot * k + j);
            }
            c.swap(col, pivot);
        }
        let d = a[col * k + col];
        for row in col + 1..k {
            let f = a[row * k + col] / d;
            for j in col..k {
                a[row * k + j] -= f * a[col * k + j];
            }
            c[row] -= f * c[col];
        }
    }
    let mut x = vec![0f64; k];
    for i in (0..k).rev() {
        let tail: f64 = (i + 1..k).map(|j| a[i * k + j] * x[j]).sum();
        x[i] = (c[i] - tail) / a[i * k + i];
    }
    if x.iter().all(|v| v.is_finite()) {
        x
    } else {
        vec![1.0; k]
    }
}

/// `a` as an f16 value a checkpoint stores, never zero (a row whose best factor is 0 or negative
/// keeps the smallest positive one: its output is then ~0, as the fit asks).
fn stored_correction(a: f64) -> f32 {
    let h = half::f16::from_f64(a);
    if h.is_finite() && h.to_f32() > 0.0 {
        h.to_f32()
    } else if a > 0.0 {
        half::f16::MAX.to_f32()
    } else {
        half::f16::MIN_POSITIVE.to_f32()
    }
}

/// Fits corrections (per row or per group) for `bits` to every quantized weight of `q`: to its
/// output over the calibration inputs where `moments` has the weight's (linear layers, a tied
/// embedding in its lm_head role), else in weight space (no calibration). Records them in the
/// metadata and refreshes the report's relative errors (which then include them). `on_weight` is
/// called after each.
pub fn correct_model(
    float: &FloatModel,
    q: &mut QuantizedModel,
    bits: &[u32],
    granularity: CorrectionGranularity,
    moments: Option<&HashMap<String, InputMoments>>,
    mut on_weight: impl FnMut(&str),
) -> Result<()> {
    ensure!(!bits.is_empty(), "no bit-widths to correct");
    for &b in bits {
        kernels::check_bits(b).map_err(|e| anyhow::anyhow!("corrections: {e}"))?;
        ensure!(b < kernels::STORED_BITS, "corrections: {b} bits are the stored codes themselves");
    }
    let tie = q.quantization.tie()?;
    for layer in q.report.iter_mut() {
        let weight =
            q.quantized.get_mut(&layer.name).with_context(|| format!("no quantized weight `{}`", layer.name))?;
        let w: Vec<f32> = float.weights.get(&layer.name, &[layer.rows, layer.cols])?.flatten_all()?.to_vec1()?;
        let layer_moments = moments.and_then(|m| m.get(&layer.name));
        weight.corrections = fit_corrections(&w, weight, bits, tie, layer_moments, granularity)
            .with_context(|| format!("corrections of `{}`", layer.name))?;
        layer.relative_error = layer
            .relative_error
            .iter()
            .map(|&(b, _)| Ok((b, reconstruction_error(&w, weight, b, tie)?)))
            .collect::<Result<Vec<_>, crate::PtqError>>()?;
        on_weight(&layer.name);
    }
    let mut corrected = bits.to_vec();
    corrected.sort_unstable_by(|a, b| b.cmp(a));
    corrected.dedup();
    q.quantization.corrected_bits = corrected;
    q.quantization.correction_granularity = granularity;
    Ok(())
}
