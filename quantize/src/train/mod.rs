//! Joint multi-precision fine-tuning with ALRS (METHOD.md §2): fake quantization along the
//! double-rounded path with STE/LSQ gradients ([`fakequant`]), the per-precision loop with AdamW,
//! schedule, clipping, ALRS ([`alrs`]) and optional distillation ([`trainer`]), text data in
//! fixed-length blocks ([`data`]), recipes ([`config`]), and the run's log and plot ([`log`]).

pub mod alrs;
pub mod config;
pub mod data;
pub mod fakequant;
pub mod log;
pub mod optim;
pub mod trainer;

pub use alrs::AlrsPolicy;
pub use config::{KdConfig, LoopMode, ScaleMoments, Teacher, TrainConfig, Trainable};
pub use data::TokenBlocks;
pub use fakequant::FakeQuant;
pub use trainer::{EvalReport, StepReport, Trainer};
