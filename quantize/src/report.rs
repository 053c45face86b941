//! What quantizing a model measured, per weight: the reconstruction error at every bit-width
//! and, for Hessian-aware rounding, the output error over calibration inputs. Written by
//! [`crate::model_ptq`], [`crate::gptq`] and the trainer; printed and saved by `drq-quantize`.

use serde::Serialize;

/// Reconstruction error of one quantized weight at each bit-width of the spec.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    /// `(bits, ‖Ŵ_b − W‖² / ‖W‖²)` for every bit-width of the spec.
    pub relative_error: Vec<(u32, f64)>,
    /// Output error over calibration inputs, the codes before GPTQ (nearest rounding, or
    /// block-wise reconstruction's) against GPTQ's (GPTQ-rounded weights only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_error: Option<OutputError>,
}

/// A layer's relative output error over the calibration inputs, `(bits, tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))`,
/// with the codes before GPTQ and with GPTQ's.
#[derive(Debug, Clone, Serialize)]
pub struct OutputError {
    pub nearest: Vec<(u32, f64)>,
    pub gptq: Vec<(u32, f64)>,
}
