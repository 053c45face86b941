//! Adaptive learning rate scaling (ALRS, METHOD.md §2): the scale learning rate of bit-width b.
//!
//! ```text
//! η_b = 10^(−Δ/2) if Δ even, 5·10^(−(Δ+1)/2) if Δ odd        Δ = 8 − b   (8→1, 6→0.1, 4→0.01, 2→0.001)
//! G_b = (1/L) Σ_i min(max|clip(∇s_b^i, 1)|, 1)                 over the L quantized layers
//!
//! none       λ_b = λ_s
//! eta        λ_b = η_b·λ_s
//! relative   λ_b = η_b·λ_s·(1 − G_b)
//! literal    λ_b = max(0, η_b·(λ_s − G_b))                       (the paper's formula, floored at 0)
//! ```
//!
//! `λ_s` is the base scale learning rate at this step (after warmup and cosine schedule).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which ALRS rule sets the scale learning rate of each bit-width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlrsPolicy {
    /// No ALRS: every bit-width's scales step with the base scale learning rate.
    None,
    /// `η_b·λ_s`.
    #[default]
    Eta,
    /// `η_b·λ_s·(1 − G_b)`.
    Relative,
    /// `max(0, η_b·(λ_s − G_b))`, the formula as printed.
    Literal,
}

impl AlrsPolicy {
    pub const ALL: [AlrsPolicy; 4] = [AlrsPolicy::None, AlrsPolicy::Eta, AlrsPolicy::Relative, AlrsPolicy::Literal];

    pub fn name(self) -> &'static str {
        match self {
            AlrsPolicy::None => "none",
            AlrsPolicy::Eta => "eta",
            AlrsPolicy::Relative => "relative",
            AlrsPolicy::Literal => "literal",
        }
    }

    /// The scale learning rate of `bits` given the base scale learning rate and this step's raw
    /// scale gradients, one slice per quantized layer.
    pub fn scale_lr(self, base: f64, bits: u32, layer_grads: &[&[f32]]) -> f64 {
        match self {
            AlrsPolicy::None => base,
            AlrsPolicy::Eta => eta(bits) * base,
            AlrsPolicy::Relative => eta(bits) * base * (1.0 - gradient_term(layer_grads)),
            AlrsPolicy::Literal => (eta(bits) * (base - gradient_term(layer_grads))).max(0.0),
        }
    }

    /// Whether the policy reads the gradients (`relative`, `literal`).
    pub fn uses_gradients(self) -> bool {
        matches!(self, AlrsPolicy::Relative | AlrsPolicy::Literal)
    }
}

impl fmt::Display for AlrsPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AlrsPolicy {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown ALRS policy {s:?} (expected none, eta, relative or literal)"))
    }
}

/// `η_b` for Δ = 8 − bits: 1, 0.5, 0.1, 0.05, 0.01, 0.005, 0.001 for bits 8..2.
pub fn eta(bits: u32) -> f64 {
    let delta = kernels::STORED_BITS.saturating_sub(bits) as i32;
    if delta % 2 == 0 {
        10f64.powi(-delta / 2)
    } else {
        5.0 * 10f64.powi(-(delta + 1) / 2)
    }
}

/// `G_b = (1/L) Σ_i min(max|clip(∇s^i, 1)|, 1)`: per layer, the largest scale-gradient magnitude
/// clipped at 1; averaged over layers (0 for no layers). A NaN gradient counts as 1.
pub fn gradient_term(layer_grads: &[&[f32]]) -> f64 {
    if layer_grads.is_empty() {
        return 0.0;
    }
    let sum: f64 = layer_grads
        .iter()
        .map(|g| {
            g.iter()
                .fold(0f64, |m, &x| if x.is_nan() { 1.0 } else { m.max(f64::from(x.clamp(-1.0, 1.0).abs())) })
                .min(1.0)
        })
        .sum();
    sum / layer_grads.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_matches_the_method() {
        let expected = [(8, 1.0), (7, 0.5), (6, 0.1), (5, 0.05), (4, 0.01), (3, 0.005), (2, 0.001)];
        for (b, e) in expected {
            assert!((eta(b) - e).abs() < 1e-15, "η_{b} = {} (expected {e})", eta(b));
        }
    }

    #[test]
    fn policies_give_the_documented_rates() {
        // Two layers: max |g| clipped at 1 → 0.25 and 1 (from 3.0): G = 0.625.
        let a = [0.1f32, -0.25, 0.2];
        let b = [3.0f32, 0.0];
        let grads: [&[f32]; 2] = [&a, &b];
        assert!((gradient_term(&grads) - 0.625).abs() < 1e-12);
        let base = 5e-4;
        for bits in [8, 4, 2] {
            let e = eta(bits);
            assert_eq!(AlrsPolicy::None.scale_lr(base, bits, &grads), base);
            assert!((AlrsPolicy::Eta.scale_lr(base, bits, &grads) - e * base).abs() < 1e-18);
            assert!((AlrsPolicy::Relative.scale_lr(base, bits, &grads) - e * base * 0.375).abs() < 1e-18);
            // As printed, λ − G is negative here: floored at 0.
            assert_eq!(AlrsPolicy::Literal.scale_lr(base, bits, &grads), 0.0);
        }
        // Small gradients keep the literal rate positive: η·(λ − G).
        let tiny = [1e-5f32];
        let g: [&[f32]; 1] = [&tiny];
        let lit = AlrsPolicy::Literal.scale_lr(base, 4, &g);
        assert!((lit - 0.01 * (base - 1e-5)).abs() < 1e-6 * lit, "{lit}");
        for p in AlrsPolicy::ALL {
            assert_eq!(p.name().parse::<AlrsPolicy>().unwrap(), p);
        }
        assert!("paper".parse::<AlrsPolicy>().is_err());
    }
}
