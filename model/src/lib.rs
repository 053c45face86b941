//! Model sources (hub, HF directory, GGUF), architectures, the drq checkpoint format and the
//! runtime shared by `evals` and `serve`.

pub mod checkpoint;
pub mod config;
pub mod export;
pub mod precision;
pub mod resident;
pub mod source;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use precision::Precision;
pub use resident::ResidentModel;
pub use source::{FloatModel, ModelSource};
pub use transformer::{Batch, KvCache, Linear, OpsMode, SequenceStep, Transformer};
pub use weights::Weights;
