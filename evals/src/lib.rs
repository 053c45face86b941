//! Offline evaluation of drq models: perplexity, KL divergence and top-1 agreement with the float
//! model, at every precision, through the same runtime that serves them.

pub mod candle_baseline;
pub mod kernel_bench;
pub mod perplexity;
