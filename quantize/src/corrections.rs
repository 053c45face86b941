//! Per-precision row corrections: for a bit-width `b` below 8 and each output row `r`, the
//! factor `α_b[r]` that makes `α_b[r] · ŵ_b,r` (the row served at `b` bits) closest to the float
//! row `w_r` in the row's output over calibration inputs:
//!
//! ```text
//! α = argmin_a ‖X (w_r − a ŵ_r)ᵀ‖² = (ŵ_r H w_rᵀ) / (ŵ_r H ŵ_rᵀ),    H = XᵀX
//! ```
//!
//! or in weight space (`H = I`) when no calibration inputs are given. The stored codes do not
//! change; a correction rescales one output row at one precision, which the kernels apply after
//! the row's dot product (free at serving time). Factors are stored as f16 (a checkpoint's
//! precision), 16 bits per row per corrected bit-width.

use std::collections::{BTreeMap, HashMap};

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use kernels::{QuantizedWeight, TieRule};
use model::FloatModel;

use crate::gptq::InputMoments;
use crate::model_ptq::QuantizedModel;
use crate::ptq::reconstruction_error;

/// The row corrections of `q` (the quantization of the float weight `w`, `[rows, cols]`
/// row-major) for each of `bits`, fitted to the output over `moments` (or the weight itself).
/// Rows whose served values are all zero keep the factor 1.
pub fn fit_row_corrections(
    w: &[f32],
    q: &QuantizedWeight,
    bits: &[u32],
    tie: TieRule,
    moments: Option<&InputMoments>,
) -> Result<BTreeMap<u32, Vec<f32>>> {
    let (rows, cols) = (q.layout.rows, q.layout.cols);
    ensure!(w.len() == rows * cols, "a weight of {} values for a {rows}x{cols} quantization", w.len());
    let h = match moments {
        Some(m) => {
            ensure!(m.dim == cols, "input moments of dimension {} for a weight of {cols} columns", m.dim);
            Some(Tensor::from_vec(m.gram.clone(), (cols, cols), &Device::Cpu)?)
        }
        None => None,
    };
    // Without corrections: each factor is fitted to the plain second rounding.
    let plain = QuantizedWeight::new(q.codes.clone(), q.scales.clone(), q.layout);
    let w64: Vec<f64> = w.iter().map(|&x| f64::from(x)).collect();
    let mut out = BTreeMap::new();
    for &b in bits {
        let served = plain.dequantize(b, tie).map_err(|e| anyhow::anyhow!("{e}"))?;
        let served64: Vec<f64> = served.iter().map(|&x| f64::from(x)).collect();
        // ŵ H (or ŵ itself): each row's product with the input second moments.
        let weighted = match &h {
            Some(h) => Tensor::from_vec(served64.clone(), (rows, cols), &Device::Cpu)?
                .matmul(h)?
                .flatten_all()?
                .to_vec1::<f64>()?,
            None => served64.clone(),
        };
        let mut alpha = Vec::with_capacity(rows);
        for r in 0..rows {
            let span = r * cols..(r + 1) * cols;
            let hw = &weighted[span.clone()];
            let num: f64 = hw.iter().zip(&w64[span.clone()]).map(|(a, b)| a * b).sum();
            let den: f64 = hw.iter().zip(&served64[span]).map(|(a, b)| a * b).sum();
            let a = if den > 0.0 && num.is_finite() { num / den } else { 1.0 };
            alpha.push(stored_correction(a));
        }
        out.insert(b, alpha);
    }
    Ok(out)
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

/// Fits row corrections for `bits` to every quantized weight of `q`: to its output over the
/// calibration inputs where `moments` has the weight's (linear layers), else in weight space (a
/// tied embedding, or no calibration). Records them in the metadata and refreshes the report's
/// relative errors (which then include them). `on_weight` is called after each.
pub fn correct_model(
    float: &FloatModel,
    q: &mut QuantizedModel,
    bits: &[u32],
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
        weight.corrections = fit_row_corrections(&w, weight, bits, tie, layer_moments)
            .with_context(|| format!("row corrections of `{}`", layer.name))?;
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
    Ok(())
}
