//! Joint multi-precision fine-tuning with ALRS (METHOD.md §2): fake quantization along the
//! double-rounded path with STE/LSQ gradients ([`fakequant`]).

pub mod fakequant;

pub use fakequant::FakeQuant;
