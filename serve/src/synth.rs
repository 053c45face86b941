//! Distillation text sampled from the model itself (LLM-QAT's data-free recipe, Liu et al. 2023):
//! each sequence starts from a token drawn uniformly from the vocabulary and continues by
//! sampling the model. Quantization-aware training that distils from the float model on such
//! text sees the contexts the model itself produces, across whatever it knows, instead of one
//! corpus's.
//!
//! The text of sequence `i` depends only on the model, the precision, the sampling settings and
//! `seed + i`: the engine gives every sequence the logits it would get alone, so the batch size
//! does not change the output.

use anyhow::{anyhow, bail, ensure, Result};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenizers::Tokenizer;

use crate::engine::{Engine, Event, GenerationRequest, SubmitError};
use crate::sampling::SamplingParams;

/// What to sample.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub sequences: usize,
    /// Tokens generated per sequence at most (a sequence ends early at an end-of-sequence token).
    pub max_tokens: usize,
    /// A precision the engine serves.
    pub precision: model::Precision,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

impl SynthOptions {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.sequences >= 1, "--sequences must be at least 1");
        ensure!(self.max_tokens >= 1, "--max-tokens must be at least 1");
        ensure!(self.temperature.is_finite() && self.temperature >= 0.0, "--temperature must be ≥ 0 (0 is greedy)");
        ensure!(self.top_p > 0.0 && self.top_p <= 1.0, "--top-p must be in (0, 1]");
        Ok(())
    }
}

/// One sampled sequence: its start token's text followed by what the model generated.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub text: String,
    /// Generated tokens (the start token not counted).
    pub tokens: usize,
}

/// Samples `options.sequences` sequences through `engine`, at most `engine.info().max_batch` at a
/// time, and returns them in index order; `on_sequence` sees each as it completes.
pub async fn synthesize(
    engine: &Engine,
    options: &SynthOptions,
    on_sequence: impl Fn(&Sequence),
) -> Result<Vec<Sequence>> {
    options.validate()?;
    let starts = start_tokens(engine.tokenizer(), engine.info().vocab_size, options.sequences, options.seed)?;
    let on_sequence = &on_sequence;
    stream::iter(starts.into_iter().enumerate())
        .map(|(i, start)| async move {
            let sequence = sample_one(engine, &start, options, options.seed.wrapping_add(i as u64)).await?;
            on_sequence(&sequence);
            anyhow::Ok(sequence)
        })
        .buffered(engine.info().max_batch)
        .try_collect()
        .await
}

/// The text of `count` start tokens drawn uniformly (seeded) from the tokens of the vocabulary
/// that decode to text (special tokens do not).
fn start_tokens(tokenizer: &Tokenizer, vocab_size: usize, count: usize, seed: u64) -> Result<Vec<String>> {
    let candidates: Vec<String> = (0..vocab_size as u32)
        .filter_map(|id| tokenizer.decode(&[id], true).ok())
        .filter(|text| !text.trim().is_empty() && !text.contains('\u{fffd}'))
        .collect();
    ensure!(!candidates.is_empty(), "no token of the vocabulary decodes to text");
    let mut rng = StdRng::seed_from_u64(seed);
    Ok((0..count).map(|_| candidates[rng.random_range(0..candidates.len())].clone()).collect())
}

async fn sample_one(engine: &Engine, start: &str, options: &SynthOptions, seed: u64) -> Result<Sequence> {
    let request = GenerationRequest {
        prompt: engine.encode_prompt(start)?,
        precision: options.precision.clone(),
        n: 1,
        max_tokens: options.max_tokens,
        sampling: SamplingParams {
            temperature: options.temperature,
            top_p: options.top_p,
            seed,
            ..SamplingParams::default()
        },
        stop: Vec::new(),
        logprobs: None,
        arrived: std::time::Instant::now(),
    };
    let mut events = engine.submit(request).map_err(|e| match e {
        SubmitError::Invalid(e) => anyhow!("{e}"),
        SubmitError::QueueFull => anyhow!("the engine's queue is full"),
        SubmitError::Stopped => anyhow!("the engine stopped"),
    })?;
    let mut text = start.to_string();
    while let Some(event) = events.recv().await {
        match event {
            Event::Token { text: piece, .. } => text.push_str(&piece),
            Event::Finished { text: rest, completion_tokens, .. } => {
                text.push_str(&rest);
                return Ok(Sequence { text, tokens: completion_tokens });
            }
            Event::Failed { message, .. } => bail!("generation failed: {message}"),
        }
    }
    bail!("the engine stopped before the sequence finished")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_tokens_are_seeded_and_never_special() {
        let tokenizer = drq_tests::tiny_tokenizer();
        let special = tokenizer.decode(&[0], false).unwrap();
        assert_eq!(special, "<|endoftext|>");
        let a = start_tokens(&tokenizer, 300, 2000, 1).unwrap();
        assert_eq!(a, start_tokens(&tokenizer, 300, 2000, 1).unwrap());
        assert_ne!(a, start_tokens(&tokenizer, 300, 2000, 2).unwrap());
        assert!(a.iter().all(|t| !t.contains("endoftext") && !t.trim().is_empty()));
        // Uniform over the candidates: 2000 draws reach most of them.
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 100, "{} distinct start tokens", distinct.len());
    }
}
