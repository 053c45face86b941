//! Next-token choice from logits: OpenAI's frequency/presence penalties, temperature, top-k,
//! top-p, and a per-request seeded generator (same seed, precision and prompt: same tokens).

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How a request samples. `temperature == 0` is greedy (the lowest id wins a tie).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 keeps every token.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 keeps every token.
    pub top_k: usize,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, frequency_penalty: 0.0, presence_penalty: 0.0, seed: 0 }
    }
}

/// One sequence's sampler: its parameters, generator and the counts of the tokens it produced.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    counts: HashMap<u32, u32>,
}

/// Candidates kept before sorting for top-p: sorting the whole vocabulary (49k entries) at every
/// step would cost more than the model's forward pass on small models.
const TOP_P_PREFILTER: usize = 1024;

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng, counts: HashMap::new() }
    }

    /// How a GPU picks this sampler's next token without the logits reaching the host: `Some(0)`
    /// for greedy (temperature 0), `Some(1 / temperature)` for sampling over the whole vocabulary
    /// (`kernels::cuda::CudaRuntime::sample_rows` draws as [`Self::sample`] does, with
    /// [`Self::next_uniform`]); `None` with penalties, top-k or top-p, which need the logits here.
    pub fn device_inv_temperature(&self) -> Option<f32> {
        let p = &self.params;
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            return None;
        }
        if p.temperature == 0.0 {
            return Some(0.0);
        }
        (p.top_k == 0 && p.top_p >= 1.0).then(|| 1.0 / p.temperature)
    }

    /// The uniform of the next draw, taken from the generator where [`Self::sample`] would take it
    /// (for a draw made on a GPU).
    pub fn next_uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// Records `token`, picked elsewhere (on a GPU), as [`Self::sample`] would have.
    pub fn accept(&mut self, token: u32) {
        *self.counts.entry(token).or_default() += 1;
    }

    /// Picks the next token from `logits` (modified in place by the penalties and temperature)
    /// and records it for the penalties.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&token, &count) in &self.counts {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l -= p.frequency_penalty * count as f32 + p.presence_penalty;
                }
            }
        }
        let token = if p.temperature == 0.0 { argmax(logits) } else { self.draw(logits) };
        self.accept(token);
        token
    }

    fn draw(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if p.top_k == 0 && p.top_p >= 1.0 {
            // Plain sampling over the whole vocabulary: one pass, no sort.
            let mut total = 0.0f64;
            for l in logits.iter_mut() {
                *l = ((*l - max) * inv_t).exp();
                total += f64::from(*l);
            }
            let mut target = self.rng.random::<f64>() * total;
            for (i, &w) in logits.iter().enumerate() {
                target -= f64::from(w);
                if target <= 0.0 {
                    return i as u32;
                }
            }
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        let keep = if p.top_k > 0 { p.top_k.min(candidates.len()) } else { candidates.len() };
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        // Sort only the head: the top-k, or (top-p alone) a prefilter that is widened while it
        // holds too little of the mass.
        let mut head = if p.top_k > 0 { keep } else { keep.min(TOP_P_PREFILTER) };
        let weights = loop {
            if head < candidates.len() {
                candidates.select_nth_unstable_by(head - 1, by_logit);
            }
            let mut top: Vec<(u32, f32)> = candidates[..head].to_vec();
            top.sort_by(by_logit);
            let total_all: f64 = if head < candidates.len() {
                candidates.iter().map(|c| f64::from(((c.1 - max) * inv_t).exp())).sum()
            } else {
                0.0
            };
            let w: Vec<(u32, f64)> = top.iter().map(|&(i, l)| (i, f64::from(((l - max) * inv_t).exp()))).collect();
            let head_mass: f64 = w.iter().map(|x| x.1).sum();
            let total = if head < candidates.len() { total_all } else { head_mass };
            if head >= keep || head_mass >= f64::from(p.top_p) * total {
                // Renormalise over the top-k (or everything) before applying top-p.
                let kept_total = if keep < candidates.len() { head_mass } else { total };
                break nucleus(w, f64::from(p.top_p) * kept_total);
            }
            head = (head * 8).min(keep);
        };
        let total: f64 = weights.iter().map(|w| w.1).sum();
        let mut target = self.rng.random::<f64>() * total;
        for &(i, w) in &weights {
            target -= w;
            if target <= 0.0 {
                return i;
            }
        }
        weights[0].0
    }
}

/// The smallest prefix of `sorted` (descending) whose weight reaches `mass` (at least one).
fn nucleus(mut sorted: Vec<(u32, f64)>, mass: f64) -> Vec<(u32, f64)> {
    let mut acc = 0.0;
    let mut keep = sorted.len();
    for (n, &(_, w)) in sorted.iter().enumerate() {
        acc += w;
        if acc >= mass {
            keep = n + 1;
            break;
        }
    }
    sorted.truncate(keep.max(1));
    sorted
}

/// Index of the largest value; the lowest index among equals; NaN never wins.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || values[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// `log_softmax(logits)`.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_sum = sum.ln() as f32 + max;
    logits.iter().map(|&l| l - log_sum).collect()
}

/// The `k` most likely `(token, logprob)` of a log-softmax, most likely first.
pub fn top_logprobs(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = logprobs.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let k = k.min(all.len());
    if k == 0 {
        return Vec::new();
    }
    let by = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k < all.len() {
        all.select_nth_unstable_by(k - 1, by);
    }
    all.truncate(k);
    all.sort_by(by);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_p, top_k, seed, ..SamplingParams::default() }
    }

    /// Draw frequencies of `n` samples from fresh copies of `logits`.
    fn frequencies(p: SamplingParams, logits: &[f32], n: usize) -> Vec<f64> {
        let mut s = Sampler::new(p);
        let mut f = vec![0.0; logits.len()];
        for _ in 0..n {
            s.counts.clear();
            f[s.sample(&mut logits.to_vec()) as usize] += 1.0 / n as f64;
        }
        f
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_ignores_the_seed() {
        let logits = [0.5, 2.0, -1.0, 2.0];
        for seed in 0..5 {
            assert_eq!(Sampler::new(params(0.0, 1.0, 0, seed)).sample(&mut logits.to_vec()), 1);
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.0]), 1);
    }

    #[test]
    fn a_gpu_picks_greedy_and_plain_draws_only() {
        assert_eq!(Sampler::new(params(0.0, 1.0, 0, 3)).device_inv_temperature(), Some(0.0));
        assert_eq!(Sampler::new(params(0.5, 1.0, 0, 3)).device_inv_temperature(), Some(2.0));
        assert_eq!(Sampler::new(params(0.5, 0.9, 0, 3)).device_inv_temperature(), None);
        assert_eq!(Sampler::new(params(0.5, 1.0, 40, 3)).device_inv_temperature(), None);
        let penalised = SamplingParams { presence_penalty: 0.5, ..params(0.0, 1.0, 0, 3) };
        assert_eq!(Sampler::new(penalised).device_inv_temperature(), None);
    }

    #[test]
    fn a_draw_takes_the_uniform_next_uniform_gives() {
        // The plain draw's only use of the generator is one uniform: a GPU given next_uniform()
        // stays on the host sampler's stream.
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let (mut host, mut device) = (Sampler::new(params(0.8, 1.0, 0, 9)), Sampler::new(params(0.8, 1.0, 0, 9)));
        for _ in 0..20 {
            let token = host.sample(&mut logits.clone());
            let u = device.next_uniform();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f64> = logits.iter().map(|&l| f64::from(((l - max) * 1.25).exp())).collect();
            let target = u * w.iter().sum::<f64>();
            let mut running = 0.0;
            let pick = w.iter().position(|&w| {
                running += w;
                running >= target
            });
            assert_eq!(pick, Some(token as usize));
            device.accept(token);
        }
    }

    #[test]
    fn same_seed_same_tokens_different_seed_different_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0.9, 0, seed));
            (0..40).map(|_| s.sample(&mut logits.clone())).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn plain_sampling_follows_the_softmax() {
        let logits = [0.0f32, (2.0f32).ln(), (5.0f32).ln()]; // probabilities 1/8, 2/8, 5/8
        let f = frequencies(params(1.0, 1.0, 0, 3), &logits, 20_000);
        for (got, want) in f.iter().zip([0.125, 0.25, 0.625]) {
            assert!((got - want).abs() < 0.015, "{f:?}");
        }
        // Temperature 0.5 squares the odds: 1:4:25.
        let f = frequencies(params(0.5, 1.0, 0, 4), &logits, 20_000);
        for (got, want) in f.iter().zip([1.0 / 30.0, 4.0 / 30.0, 25.0 / 30.0]) {
            assert!((got - want).abs() < 0.015, "{f:?}");
        }
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [0.0f32, (2.0f32).ln(), (5.0f32).ln(), (2.0f32).ln()]; // 1,2,5,2 of 10
        let f = frequencies(params(1.0, 1.0, 1, 5), &logits, 2_000);
        assert!((f[2] - 1.0).abs() < 1e-9, "top_k 1 is greedy: {f:?}");
        let f = frequencies(params(1.0, 1.0, 3, 6), &logits, 20_000);
        assert_eq!(f[0], 0.0, "top_k 3 drops the least likely");
        assert!((f[2] - 5.0 / 9.0).abs() < 0.015, "{f:?}");
        // top_p 0.6: 5/10 is not enough, 5+2 (the lower id of the tie first) is.
        let f = frequencies(params(1.0, 0.6, 0, 7), &logits, 20_000);
        assert_eq!((f[0], f[3]), (0.0, 0.0), "{f:?}");
        assert!((f[2] - 5.0 / 7.0).abs() < 0.015, "{f:?}");
    }

    #[test]
    fn top_p_over_a_large_flat_vocabulary_widens_its_prefilter() {
        // 5000 equal logits: the nucleus of 0.5 needs 2500 tokens, more than the prefilter.
        let logits = vec![0.0f32; 5000];
        let f = frequencies(params(1.0, 0.5, 0, 8), &logits, 20_000);
        let used = f.iter().filter(|&&x| x > 0.0).count();
        assert!((2000..=2500).contains(&used), "{used} tokens drawn");
        assert!(f[2500..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn penalties_follow_openai() {
        // After producing token 0 twice, frequency 1.0 lowers its logit by 2, presence 0.5 by 0.5.
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            frequency_penalty: 1.0,
            presence_penalty: 0.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut [3.0, 1.0, 0.0]), 0);
        assert_eq!(s.sample(&mut [3.0, 1.0, 0.0]), 0); // 3 − 1.5 = 1.5 > 1
        let mut logits = vec![3.0, 1.0, 0.0];
        assert_eq!(s.sample(&mut logits), 1); // 3 − 2.5 = 0.5 < 1
        assert_eq!(logits[0], 0.5);
    }

    #[test]
    fn log_softmax_and_top_logprobs() {
        let lp = log_softmax(&[1.0, 3.0, 2.0, 3.0]);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        let top = top_logprobs(&lp, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!(top_logprobs(&lp, 0).is_empty());
        assert_eq!(top_logprobs(&lp, 10).len(), 4);
    }
}
