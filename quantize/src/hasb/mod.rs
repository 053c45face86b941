//! HASB, Hessian-aware mixed precision (METHOD.md §3): the loss Hessian's trace per quantized
//! matrix ([`traces`]), and a bit-width per matrix under a budget chosen from those traces and
//! each matrix's quantization error ([`allocate`]), stored as named profiles of the checkpoint.

pub mod allocate;
pub mod traces;

pub use allocate::{
    checkpoint_errors, hasb_profiles, AllocationSpec, NamedAllocation, Problem, ProfileRequest, Weighting,
};
pub use traces::{TraceConfig, TraceReport};
