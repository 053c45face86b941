//! drq-serve: an OpenAI-compatible HTTP server that decodes each request at the precision it
//! asks for (2..8 bits) from one resident INT8 Double Rounding checkpoint.
//!
//! - [`engine`]: the scheduler (continuous batching across precisions) over the shared runtime;
//! - [`http`]: axum routes, OpenAI errors, server-sent events; [`openai`]: request and response
//!   shapes and their validation;
//! - [`sampling`], [`text`] (detokenization and stop strings), [`chat`] (templates),
//!   [`metrics`] (Prometheus), [`load`] (a checkpoint, or any model source quantized and cached);
//! - [`synth`]: distillation text sampled from the model through the engine (`drq-synth`).

pub mod chat;
pub mod engine;
pub mod http;
pub mod load;
pub mod metrics;
pub mod openai;
pub mod sampling;
pub mod synth;
pub mod text;
