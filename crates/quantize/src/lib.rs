//! Double Rounding post-training quantization.
pub mod ptq;

pub use ptq::{quantize_weight, reconstruction_error, PtqError, QuantSpec, SearchObjective};
