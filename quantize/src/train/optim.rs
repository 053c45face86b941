//! AdamW on flat f32 buffers, the learning-rate schedule and gradient clipping: plain loops, so
//! the optimizer state is a few vectors that a training state saves and restores exactly.

use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters shared by every parameter group (the learning rate and weight decay
/// are given per step and group).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamParams {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// The moments of one parameter tensor and the number of steps taken with them.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub t: u64,
}

impl AdamState {
    pub fn new(n: usize) -> Self {
        Self { m: vec![0.0; n], v: vec![0.0; n], t: 0 }
    }

    /// One AdamW step (decoupled weight decay, as PyTorch's AdamW):
    /// `p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + eps)`, with `grad` already multiplied by `grad_scale`
    /// (the clipping factor).
    pub fn step(&mut self, p: &mut [f32], grad: &[f32], grad_scale: f32, lr: f64, wd: f64, h: &AdamParams) {
        assert_eq!(p.len(), grad.len());
        assert_eq!(p.len(), self.m.len());
        let update = self.begin(lr, h);
        let decay = (1.0 - lr * wd) as f32;
        for (((p, &g), m), v) in p.iter_mut().zip(grad).zip(&mut self.m).zip(&mut self.v) {
            *p = *p * decay - update.apply(m, v, g * grad_scale, 1.0);
        }
    }

    /// One Adam step (no weight decay) whose size is measured per element in `unit`: element
    /// `i` moves by about `lr · unit[i]` (Adam's normalised step times its own unit), so
    /// parameters on different scales move at the same relative pace.
    pub fn step_scaled(&mut self, p: &mut [f32], grad: &[f32], lr: f64, unit: &[f32], h: &AdamParams) {
        assert_eq!(p.len(), grad.len());
        assert_eq!(p.len(), unit.len());
        assert_eq!(p.len(), self.m.len());
        let update = self.begin(lr, h);
        for ((((p, &g), m), v), &u) in p.iter_mut().zip(grad).zip(&mut self.m).zip(&mut self.v).zip(unit) {
            *p -= update.apply(m, v, g, u);
        }
    }

    /// Starts step `t + 1`: its bias corrections folded as in PyTorch (step = lr/bc1,
    /// denominator √v/√bc2 + eps).
    fn begin(&mut self, lr: f64, h: &AdamParams) -> Update {
        self.t += 1;
        let bc1 = 1.0 - h.beta1.powi(self.t as i32);
        let bc2 = 1.0 - h.beta2.powi(self.t as i32);
        Update {
            b1: h.beta1 as f32,
            b2: h.beta2 as f32,
            step: (lr / bc1) as f32,
            sqrt_bc2: bc2.sqrt() as f32,
            eps: h.eps as f32,
        }
    }
}

/// The constants of one Adam step.
struct Update {
    b1: f32,
    b2: f32,
    step: f32,
    sqrt_bc2: f32,
    eps: f32,
}

impl Update {
    /// Moves the moments `m`, `v` by the gradient `g` and returns the parameter's decrement,
    /// `step · unit · m̂ / (√v̂ + eps)`.
    #[inline]
    fn apply(&self, m: &mut f32, v: &mut f32, g: f32, unit: f32) -> f32 {
        *m = self.b1 * *m + (1.0 - self.b1) * g;
        *v = self.b2 * *v + (1.0 - self.b2) * g * g;
        self.step * unit * *m / (v.sqrt() / self.sqrt_bc2 + self.eps)
    }
}

/// Linear warmup to the peak over `warmup` steps, then a cosine decay to `min_ratio`·peak at
/// `total` steps. Returns the multiplier of the peak learning rate at step `step` (0-based).
pub fn schedule(step: u64, warmup: u64, total: u64, min_ratio: f64) -> f64 {
    if step < warmup {
        return (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The factor that brings the global L2 norm of `grads` down to `max_norm` (1 when below it, or
/// when `max_norm` is 0: no clipping), and the norm itself.
pub fn clip_factor<'a>(grads: impl IntoIterator<Item = &'a [f32]>, max_norm: f64) -> (f32, f64) {
    let norm = grads.into_iter().flat_map(|g| g.iter()).map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    let factor = if max_norm > 0.0 && norm > max_norm { (max_norm / (norm + 1e-6)) as f32 } else { 1.0 };
    (factor, norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_step_is_lr_times_sign_and_decays() {
        let h = AdamParams::default();
        let mut p = vec![1.0f32, -2.0, 0.5];
        let mut s = AdamState::new(3);
        s.step(&mut p, &[0.3, -4.0, 0.0], 1.0, 0.1, 0.0, &h);
        // m̂ = g, v̂ = g²: the first step is lr·sign(g) (0 for g = 0).
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] + 1.9).abs() < 1e-6 && p[2] == 0.5, "{p:?}");
        let mut q = vec![1.0f32];
        let mut s = AdamState::new(1);
        s.step(&mut q, &[0.0], 1.0, 0.1, 0.5, &h);
        assert!((q[0] - 0.95).abs() < 1e-7, "decoupled decay: {q:?}");
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        assert!((schedule(0, 4, 20, 0.1) - 0.25).abs() < 1e-12);
        assert!((schedule(3, 4, 20, 0.1) - 1.0).abs() < 1e-12);
        assert!((schedule(4, 4, 20, 0.1) - 1.0).abs() < 1e-12);
        assert!((schedule(12, 4, 20, 0.1) - 0.55).abs() < 1e-12);
        assert!((schedule(20, 4, 20, 0.1) - 0.1).abs() < 1e-12);
        assert!((schedule(0, 0, 10, 0.0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let a = [3.0f32];
        let b = [4.0f32];
        let (f, n) = clip_factor([&a[..], &b[..]], 1.0);
        assert!((n - 5.0).abs() < 1e-12 && (f - 0.2).abs() < 1e-6);
        assert_eq!(clip_factor([&a[..]], 0.0).0, 1.0);
        assert_eq!(clip_factor([&a[..]], 10.0).0, 1.0);
    }
}
