//! Perplexity, KL divergence and top-1 agreement over a token stream, for several precisions of
//! one model in lockstep (each window runs through every precision, so KL to the float model
//! needs no stored logits).

use std::time::Instant;

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor, D};
use kernels::cuda::KvArena;
use model::transformer::cuda::{CudaTransformer, GpuRow};
use model::{KvCache, Transformer};
use serde::Serialize;

/// How a token stream is cut into windows and which predictions are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// llama.cpp's `llama-perplexity`: non-overlapping windows of `ctx` tokens (BOS first when the
    /// model uses one), only the second half of each window scored.
    LlamaCpp,
    /// Windows of `ctx` tokens every `stride` tokens; each target is scored once, in the first
    /// window that contains it, with as much context as that window gives. With `stride == ctx`
    /// the first token of each window has no context inside it and is not scored.
    Strided { stride: usize },
}

/// One forward pass: positions `score_from..tokens.len() - 1` predict the token after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub tokens: Vec<u32>,
    pub score_from: usize,
}

impl Window {
    pub fn scored(&self) -> usize {
        self.tokens.len() - 1 - self.score_from
    }
}

/// Cuts `tokens` (the whole text, without BOS) into windows.
pub fn windows(tokens: &[u32], ctx: usize, protocol: Protocol, bos: Option<u32>) -> Result<Vec<Window>> {
    ensure!(ctx >= 2, "context length must be at least 2 tokens");
    match protocol {
        Protocol::LlamaCpp => {
            // llama.cpp tokenizes with BOS in front, cuts the stream into n_ctx chunks, and puts
            // BOS at the start of every chunk (replacing the token there).
            let mut stream = Vec::with_capacity(tokens.len() + 1);
            stream.extend(bos);
            stream.extend_from_slice(tokens);
            let n = stream.len() / ctx;
            ensure!(n > 0, "the text has {} tokens, fewer than one window of {ctx}", stream.len());
            Ok((0..n)
                .map(|i| {
                    let mut w = stream[i * ctx..(i + 1) * ctx].to_vec();
                    if let Some(b) = bos {
                        w[0] = b;
                    }
                    Window { tokens: w, score_from: ctx / 2 }
                })
                .collect())
        }
        Protocol::Strided { stride } => {
            ensure!(stride >= 1 && stride <= ctx, "stride must be between 1 and the context length");
            let mut stream = Vec::with_capacity(tokens.len() + 1);
            stream.extend(bos);
            stream.extend_from_slice(tokens);
            ensure!(stream.len() >= 2, "the text has fewer than two tokens");
            let mut out = Vec::new();
            let mut next_target = 1; // index in `stream` of the first target not yet scored
            let mut begin = 0;
            while next_target < stream.len() {
                let end = (begin + ctx).min(stream.len());
                let first_target = next_target.max(begin + 1);
                if first_target < end {
                    out.push(Window { tokens: stream[begin..end].to_vec(), score_from: first_target - 1 - begin });
                }
                next_target = end;
                begin += stride;
            }
            Ok(out)
        }
    }
}

/// Running sums for one precision.
#[derive(Debug, Clone, Default)]
struct Sums {
    tokens: u64,
    nll: f64,
    nll_sq: f64,
    kl: f64,
    kl_tokens: u64,
    top1_agree: u64,
    seconds: f64,
}

/// The result for one precision.
#[derive(Debug, Clone, Serialize)]
pub struct PrecisionReport {
    pub label: String,
    pub perplexity: f64,
    /// Standard error of the perplexity (delta method on the mean NLL, as llama.cpp reports).
    pub perplexity_stderr: f64,
    pub mean_nll: f64,
    pub tokens_scored: u64,
    /// Mean KL(p_reference ‖ p_this) per scored token, in nats; `None` without a reference.
    pub mean_kl: Option<f64>,
    /// Fraction of scored positions whose top-1 token equals the reference's.
    pub top1_agreement: Option<f64>,
    /// Wall-clock seconds spent in this candidate's forward passes (and log-softmax).
    pub seconds: f64,
    /// Bits per weight of the model's matrices as stored at this precision (scales included);
    /// set by callers that know the storage (`drq-eval`: checkpoint precisions), else `None`.
    pub bits_per_weight: Option<f64>,
}

impl Sums {
    fn report(&self, label: &str, with_reference: bool) -> PrecisionReport {
        let n = self.tokens as f64;
        let mean = self.nll / n;
        let var = (self.nll_sq / n - mean * mean).max(0.0);
        let stderr_nll = if self.tokens > 1 { (var / (n - 1.0)).sqrt() } else { 0.0 };
        let ppl = mean.exp();
        PrecisionReport {
            label: label.to_string(),
            perplexity: ppl,
            perplexity_stderr: ppl * stderr_nll,
            mean_nll: mean,
            tokens_scored: self.tokens,
            mean_kl: with_reference.then(|| self.kl / self.kl_tokens.max(1) as f64),
            top1_agreement: with_reference.then(|| self.top1_agree as f64 / self.kl_tokens.max(1) as f64),
            seconds: self.seconds,
            bits_per_weight: None,
        }
    }
}

/// A model under evaluation at one precision.
pub struct Candidate<'a> {
    /// How the results name it, e.g. `fp`, `4`, `4 group:128`.
    pub label: String,
    pub model: &'a Transformer,
    /// The same transformer on a GPU (`kernels::cuda`): its logits are computed there instead.
    pub gpu: Option<&'a CudaTransformer>,
}

impl<'a> Candidate<'a> {
    /// A candidate that runs where its transformer is.
    pub fn new(label: impl Into<String>, model: &'a Transformer) -> Self {
        Candidate { label: label.into(), model, gpu: None }
    }
}

/// Logits of positions `score_from..tokens.len()` of one window on the GPU, `[rows, vocab]` on
/// the host: the window's positions in slot 0 of `arena`.
fn gpu_window_logits(gpu: &CudaTransformer, arena: &mut KvArena, tokens: &[u32], score_from: usize) -> Result<Tensor> {
    let rows: Vec<GpuRow> = tokens
        .iter()
        .enumerate()
        .map(|(pos, &token)| GpuRow { slot: 0, pos, token, pick: pos >= score_from })
        .collect();
    let logits = gpu.step_logits(arena, &rows)?;
    let vocab = gpu.config().vocab_size;
    Ok(Tensor::from_vec(logits, (tokens.len() - score_from, vocab), &Device::Cpu)?)
}

/// Evaluates every candidate on every window. The candidate at index `reference` (normally the
/// float model) is the baseline for KL and top-1 agreement. `on_window` is called after each
/// window (progress reporting). All candidates run on one device (the CPU, or a GPU with the
/// reference runtime; only per-token sums leave it), except candidates with `gpu`, whose
/// logits come back from our GPU kernels.
pub fn evaluate(
    candidates: &[Candidate],
    reference: Option<usize>,
    windows: &[Window],
    mut on_window: impl FnMut(usize),
) -> Result<Vec<PrecisionReport>> {
    if let Some(r) = reference {
        ensure!(r < candidates.len(), "reference index out of range");
    }
    // Candidates on a GPU of ours hand back host logits: they count as the CPU here.
    let device_of = |c: &Candidate| if c.gpu.is_some() { Device::Cpu } else { c.model.device().clone() };
    let device = candidates.first().map_or(Device::Cpu, device_of);
    ensure!(
        candidates.iter().all(|c| device_of(c).same_device(&device)),
        "the models to compare are on different devices"
    );
    // One single-slot cache per GPU candidate, as long as the longest window.
    let longest = windows.iter().map(|w| w.tokens.len()).max().unwrap_or(1);
    let mut arenas: Vec<Option<KvArena>> =
        candidates.iter().map(|c| c.gpu.map(|g| g.kv_arena(1, longest)).transpose()).collect::<Result<_>>()?;
    let mut sums = vec![Sums::default(); candidates.len()];
    for (wi, window) in windows.iter().enumerate() {
        let n = window.tokens.len();
        let input = Tensor::new(window.tokens.as_slice(), &device)?.unsqueeze(0)?;
        let targets: Vec<u32> = window.tokens[window.score_from + 1..].to_vec();
        let targets_t = Tensor::new(targets.as_slice(), &device)?.unsqueeze(1)?;
        let log_probs = |c: &Candidate, arena: &mut Option<KvArena>, seconds: &mut f64| -> Result<Tensor> {
            let started = Instant::now();
            // Logits of positions score_from..n-1 (the last position predicts nothing).
            let logits = match (c.gpu, arena) {
                (Some(gpu), Some(arena)) => {
                    gpu_window_logits(gpu, arena, &window.tokens[..n - 1], window.score_from)?.unsqueeze(0)?
                }
                _ => {
                    let mut cache = KvCache::new(c.model.config());
                    c.model.forward(&input.narrow(1, 0, n - 1)?, &mut cache, window.score_from)?
                }
            };
            let lp = candle_nn::ops::log_softmax(&logits.squeeze(0)?.to_dtype(DType::F32)?, D::Minus1)?;
            *seconds += started.elapsed().as_secs_f64();
            Ok(lp)
        };
        let reference_lp = match reference {
            Some(r) => Some(log_probs(&candidates[r], &mut arenas[r], &mut sums[r].seconds)?),
            None => None,
        };
        for (ci, c) in candidates.iter().enumerate() {
            let lp = match (reference, &reference_lp) {
                (Some(r), Some(ref_lp)) if r == ci => ref_lp.clone(),
                _ => log_probs(c, &mut arenas[ci], &mut sums[ci].seconds)?,
            };
            let nll: Vec<f32> = lp.gather(&targets_t, 1)?.squeeze(1)?.neg()?.to_vec1()?;
            let s = &mut sums[ci];
            for v in &nll {
                if !v.is_finite() {
                    bail!("{}: non-finite log-likelihood in window {wi}", c.label);
                }
                s.tokens += 1;
                s.nll += *v as f64;
                s.nll_sq += (*v as f64) * (*v as f64);
            }
            if let Some(ref_lp) = &reference_lp {
                let kl: Vec<f32> = (ref_lp.exp()? * (ref_lp - &lp)?)?.sum(D::Minus1)?.to_vec1()?;
                let agree: Vec<u8> = ref_lp.argmax(D::Minus1)?.eq(&lp.argmax(D::Minus1)?)?.to_vec1()?;
                s.kl += kl.iter().map(|&k| k as f64).sum::<f64>();
                s.kl_tokens += kl.len() as u64;
                s.top1_agree += agree.iter().map(|&a| a as u64).sum::<u64>();
            }
        }
        on_window(wi + 1);
    }
    Ok(candidates.iter().zip(&sums).map(|(c, s)| s.report(&c.label, reference.is_some())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_windows_match_llama_cpp() {
        let tokens: Vec<u32> = (10..30).collect(); // 20 tokens
        let w = windows(&tokens, 8, Protocol::LlamaCpp, Some(1)).unwrap();
        // BOS + 20 tokens = 21 → 2 windows of 8; each starts with BOS in place of its first token.
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].tokens, vec![1, 10, 11, 12, 13, 14, 15, 16]);
        assert_eq!(w[1].tokens, vec![1, 18, 19, 20, 21, 22, 23, 24]);
        assert_eq!(w[0].score_from, 4);
        assert_eq!(w[0].scored(), 3);
        let w = windows(&tokens, 8, Protocol::LlamaCpp, None).unwrap();
        assert_eq!(w[1].tokens, (18..26).collect::<Vec<u32>>());
    }

    #[test]
    fn strided_windows_score_each_target_once() {
        let tokens: Vec<u32> = (0..23).collect();
        for (ctx, stride) in [(8, 4), (8, 8), (5, 1), (30, 7)] {
            let w = windows(&tokens, ctx, Protocol::Strided { stride }, None).unwrap();
            let mut scored = Vec::new();
            for win in &w {
                assert!(win.tokens.len() <= ctx);
                scored.extend(win.tokens[win.score_from + 1..].iter().copied());
            }
            let expected: Vec<u32> = (1..23).filter(|t| stride < ctx || t % ctx as u32 != 0).collect();
            assert_eq!(scored, expected, "ctx {ctx} stride {stride}");
        }
    }

    #[test]
    fn rejects_short_text() {
        assert!(windows(&[1, 2, 3], 8, Protocol::LlamaCpp, None).is_err());
        assert!(windows(&[1], 8, Protocol::Strided { stride: 4 }, None).is_err());
    }
}
