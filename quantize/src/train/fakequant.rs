//! Fake quantization along the double-rounded path, differentiable (METHOD.md §2).
//!
//! Forward, for a weight `W` with scales `s` (one per row or per group of columns) at `bits`:
//!
//! ```text
//! s16 = f16(s)                               the scale as a checkpoint stores it
//! q_h = first_round(W · (1/s16))             exactly as the PTQ writer derives codes
//! Ŵ_b = level_b[q_h] · s16                   level_b[q] = q_b · 2^Δ (kernels::level_table)
//! ```
//!
//! so the fake-quantized weight is bit for bit what the checkpoint written from the same `W` and
//! `s` serves at `bits` (checked in tests). Backward is the straight-through estimator with LSQ
//! scale gradients, taking the f16 rounding of the scale as identity too. With `v = W/s16`,
//! `lo = −128` and `hi_b = (2^(b−1) − 1)·2^Δ` (the clip range of both roundings in units of the
//! stored scale: `lo_b·2^Δ = −128` for every b, and `hi_b ≤ 127`):
//!
//! ```text
//! dŴ_b/dW = 1 if lo ≤ v ≤ hi_b, else 0
//! dŴ_b/ds = 2^Δ·q_b − v inside,  2^Δ·q_b (= the clip bound of b) outside
//! ```
//!
//! summed over the weights that share a scale.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use kernels::{code_index, first_round, level_table, QuantizedWeight, ScaleLayout, TieRule};

pub use crate::ptq::stored_scale as served_scale;

/// Upper clip bound of bit-width `bits` in units of the stored scale: `(2^(b−1) − 1)·2^Δ`.
pub fn clip_high(bits: u32) -> f32 {
    (((1i32 << (bits - 1)) - 1) << (kernels::STORED_BITS - bits)) as f32
}

/// Lower clip bound of every bit-width in units of the stored scale: `−2^(b−1)·2^Δ = −128`.
pub const CLIP_LOW: f32 = -128.0;

/// The differentiable fake quantizer of one weight at one bit-width (a candle custom op of the
/// weight `[rows, cols]` and its scales `[rows, n_groups]`).
#[derive(Debug, Clone)]
pub struct FakeQuant {
    bits: u32,
    layout: ScaleLayout,
    table: [f32; 256],
}

impl FakeQuant {
    pub fn new(bits: u32, tie: TieRule, layout: ScaleLayout) -> anyhow::Result<Self> {
        let table = level_table(bits, tie).map_err(|e| anyhow::anyhow!("{e}"))?;
        layout.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self { bits, layout, table })
    }

    /// `Ŵ_b` of `w` (`[rows, cols]`) with latent scales `scales` (`[rows, n_groups]`), recorded
    /// for backpropagation when either is a variable.
    pub fn apply(&self, w: &Tensor, scales: &Tensor) -> anyhow::Result<Tensor> {
        let l = self.layout;
        anyhow::ensure!(
            w.dims() == [l.rows, l.cols],
            "weight of shape {:?} for a {}x{} layout",
            w.dims(),
            l.rows,
            l.cols
        );
        anyhow::ensure!(
            scales.dims() == [l.rows, l.n_groups()],
            "scales of shape {:?} for a {}x{} layout with {} groups per row",
            scales.dims(),
            l.rows,
            l.cols,
            l.n_groups()
        );
        if w.device().is_cpu() {
            Ok(w.contiguous()?.apply_op2(&scales.contiguous()?, self.clone())?)
        } else {
            self.apply_composed(w, scales)
        }
    }

    /// The same forward and gradients from candle's primitive ops, for devices without the fused
    /// CPU op (a GPU): every value is computed by the same f32 operations (the reciprocal of the
    /// f16 scale, round-half-even by the 1.5·2^23 trick, the level table), so `Ŵ_b` is bit for bit
    /// the fused op's; the STE/LSQ gradients come from terms that are zero in value:
    /// `Ŵ_b + mask·(W − sg(W)) + (level − mask·v)·(s − sg(s))` (sg: stop-gradient, `mask`:
    /// `lo ≤ v ≤ hi_b`). Tests check it against the fused op on the CPU.
    pub fn apply_composed(&self, w: &Tensor, scales: &Tensor) -> anyhow::Result<Tensor> {
        const MAGIC: f64 = 12_582_912.0; // 1.5 · 2^23, as kernels::first_round
        let l = self.layout;
        let device = w.device();
        let group_of_col: Vec<u32> = (0..l.n_groups()).flat_map(|g| l.group_cols(g).map(move |_| g as u32)).collect();
        let group_of_col = Tensor::from_vec(group_of_col, l.cols, device)?;
        let s = scales.index_select(&group_of_col, 1)?; // [rows, cols], differentiable
        let min = f64::from(half::f16::MIN_POSITIVE.to_f32());
        // As `served_scale`: the nearest f16, at least the smallest normal f16 in magnitude, its
        // sign kept.
        let s16 = s.detach().to_dtype(DType::F16)?.to_dtype(DType::F32)?;
        let sign = ((s16.ge(0.0)?.to_dtype(DType::F32)? * 2.0)? - 1.0)?;
        let s16 = (s16.abs()?.maximum(min)? * sign)?;
        let v = (w.detach() * s16.recip()?)?;
        let code = ((v.clamp(CLIP_LOW, 127f32)? + MAGIC)? - MAGIC)?;
        let index = (code + 128.0)?.to_dtype(DType::U32)?.flatten_all()?;
        let table = Tensor::from_slice(&self.table, 256, device)?;
        let level = table.index_select(&index, 0)?.reshape((l.rows, l.cols))?;
        let value = (&level * &s16)?;
        let mask = (v.ge(CLIP_LOW)?.to_dtype(DType::F32)? * v.le(clip_high(self.bits))?.to_dtype(DType::F32)?)?;
        let weight_path = (&mask * (w - w.detach())?)?;
        let scale_path = ((level - (&mask * &v)?)? * (&s - s.detach())?)?;
        Ok(((value + weight_path)? + scale_path)?)
    }

    /// The forward on plain slices: `out = Ŵ_b`.
    pub fn forward_slice(&self, w: &[f32], scales: &[f32], out: &mut [f32]) {
        let l = self.layout;
        let ng = l.n_groups();
        par_rows(l.rows, l.cols, |r0, r1| {
            // Each worker fills its own rows; they are copied into `out` in order below.
            let mut part = vec![0f32; (r1 - r0) * l.cols];
            for r in r0..r1 {
                let row = &w[r * l.cols..(r + 1) * l.cols];
                let prow = &mut part[(r - r0) * l.cols..(r - r0 + 1) * l.cols];
                for (g, &s) in scales[r * ng..(r + 1) * ng].iter().enumerate() {
                    let s16 = served_scale(s);
                    let inv = 1.0 / s16;
                    for c in l.group_cols(g) {
                        prow[c] = self.table[code_index(first_round(row[c] * inv))] * s16;
                    }
                }
            }
            part
        })
        .into_iter()
        .fold(0, |at, part| {
            out[at..at + part.len()].copy_from_slice(&part);
            at + part.len()
        });
    }

    /// The gradients of `Σ grad·Ŵ_b` with respect to `w` and the latent scales (STE + LSQ).
    pub fn backward_slice(&self, w: &[f32], scales: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let l = self.layout;
        let ng = l.n_groups();
        let hi = clip_high(self.bits);
        let parts = par_rows(l.rows, l.cols, |r0, r1| {
            let mut gw = vec![0f32; (r1 - r0) * l.cols];
            let mut gs = vec![0f32; (r1 - r0) * ng];
            for r in r0..r1 {
                let base = r * l.cols;
                for (g, &s) in scales[r * ng..(r + 1) * ng].iter().enumerate() {
                    let s16 = served_scale(s);
                    let inv = 1.0 / s16;
                    let mut acc = 0f64;
                    for c in l.group_cols(g) {
                        let v = w[base + c] * inv;
                        let level = self.table[code_index(first_round(v))];
                        let gr = grad[base + c];
                        if (CLIP_LOW..=hi).contains(&v) {
                            gw[(r - r0) * l.cols + c] = gr;
                            acc += f64::from(gr) * f64::from(level - v);
                        } else {
                            acc += f64::from(gr) * f64::from(level);
                        }
                    }
                    gs[(r - r0) * ng + g] = acc as f32;
                }
            }
            (gw, gs)
        });
        let mut gw = Vec::with_capacity(w.len());
        let mut gs = Vec::with_capacity(scales.len());
        for (a, b) in parts {
            gw.extend(a);
            gs.extend(b);
        }
        (gw, gs)
    }
}

/// Runs `f(first_row, end_row)` over row ranges, on up to the available cores for large weights,
/// and returns the parts in row order. The split never changes a result (rows are independent).
fn par_rows<T: Send>(rows: usize, cols: usize, f: impl Fn(usize, usize) -> T + Sync) -> Vec<T> {
    const MIN_PER_THREAD: usize = 1 << 16;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cores.min((rows * cols).div_ceil(MIN_PER_THREAD)).clamp(1, rows.max(1));
    if threads <= 1 {
        return vec![f(0, rows)];
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..rows)
            .step_by(per)
            .map(|r0| {
                let f = &f;
                scope.spawn(move || f(r0, (r0 + per).min(rows)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("fake-quant worker panicked")).collect()
    })
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else { candle_core::bail!("fake quantization takes f32 tensors") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fake quantization takes contiguous tensors"),
    }
}

impl CustomOp2 for FakeQuant {
    fn name(&self) -> &'static str {
        "drq-fake-quant"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = contiguous_f32(s1, l1)?;
        let s = contiguous_f32(s2, l2)?;
        let mut out = vec![0f32; w.len()];
        self.forward_slice(w, s, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        w: &Tensor,
        s: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let sv: Vec<f32> = s.flatten_all()?.to_vec1()?;
        let gv: Vec<f32> = grad.flatten_all()?.to_vec1()?;
        let (gw, gs) = self.backward_slice(&wv, &sv, &gv);
        Ok((Some(Tensor::from_vec(gw, w.shape(), w.device())?), Some(Tensor::from_vec(gs, s.shape(), s.device())?)))
    }
}

/// The stored form of a trained weight: int8 codes re-derived from `w` and the served (f16)
/// scales, exactly as [`FakeQuant`] rounds them, so the checkpoint serves what training saw.
pub fn export_weight(w: &[f32], scales: &[f32], layout: ScaleLayout) -> QuantizedWeight {
    let ng = layout.n_groups();
    let served: Vec<f32> = scales.iter().map(|&s| served_scale(s)).collect();
    let mut codes = vec![0i8; w.len()];
    for r in 0..layout.rows {
        for (g, &s16) in served[r * ng..(r + 1) * ng].iter().enumerate() {
            let inv = 1.0 / s16;
            for c in layout.group_cols(g) {
                codes[r * layout.cols + c] = first_round(w[r * layout.cols + c] * inv);
            }
        }
    }
    QuantizedWeight::new(codes, served, layout)
}
