//! Random weights and specs shared by `tests/ptq.rs` and `benches/ptq.rs` (included with `#[path]`).

use kernels::{Granularity, TieRule};
use quantize::{QuantSpec, SearchObjective};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// N(0, 1) samples (Box–Muller; rand_distr is not a dependency).
pub fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
            let v: f64 = rng.random();
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

/// Student-t-like heavy tails: Gaussian divided by a random scale, as LLM weights with outliers.
pub fn heavy_tailed(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    gaussian(n, seed).into_iter().map(|x| x / rng.random_range(0.2f32..1.0)).collect()
}

pub fn spec(bits: &[u32], granularity: Granularity, tie: TieRule, objective: SearchObjective) -> QuantSpec {
    QuantSpec { bits: bits.to_vec(), granularity, tie, objective, ..QuantSpec::default() }
}
