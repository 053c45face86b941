//! Double Rounding quantization: the scale search ([`ptq`]) and whole-model PTQ into one INT8
//! checkpoint ([`model_ptq`]), Hessian-aware rounding of its codes ([`gptq`]), what each measured
//! per weight ([`report`]); PTQ recipes ([`recipe`]) and per-layer precision profiles
//! ([`profile`]) from `configs/`; joint W8/W4/W2 fine-tuning with ALRS ([`train`]); Hessian traces
//! and per-layer bit allocations ([`hasb`]).

pub mod blockwise;
pub mod corrections;
pub mod gptq;
pub mod hasb;
pub mod model_ptq;
pub mod profile;
pub mod ptq;
pub mod recipe;
pub mod report;
pub mod train;

pub use model_ptq::{quantize_model, write_checkpoint, QuantizedModel};
pub use ptq::{quantize_weight, reconstruction_error, Grid, PtqError, QuantSpec, SearchObjective};
pub use report::{LayerReport, OutputError};
