//! Hessian traces of the loss, one per quantized matrix: HASB's sensitivities (METHOD.md §3).
//!
//! Hutchinson's estimator: for Rademacher probes v (entries ±1), E[vᵀHv] = Tr(H), and the
//! block of the sum over one matrix's entries estimates that matrix's diagonal Hessian block's
//! trace, so one probe over all matrices at once estimates every trace. Candle has no second
//! derivatives, so Hv is a central difference of gradients. Each matrix is perturbed by
//! ε_l = ε·rms(W_l) (one step size would be too large for some matrices and lost in rounding
//! for others): with D = diag(ε_l), (g(W + Dv) − g(W − Dv)) / 2 ≈ H D v, and
//! v_lᵀ(H D v)_l / ε_l still has expectation Tr(H_ll) because the cross terms v_lᵀH_lm v_m have
//! mean zero. Each probe also draws its own calibration batch, so the estimate is of the
//! expected Hessian over the calibration text and its standard error covers both sources of
//! noise.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use model::{FloatModel, KvCache, OpsMode, Transformer, Weights};
use serde::{Deserialize, Serialize};

use crate::train::data::{splitmix64, TokenBlocks};

/// When to stop probing, and how.
#[derive(Debug, Clone, Copy)]
pub struct TraceConfig {
    /// Probes taken at least before the tolerance is checked.
    pub min_probes: usize,
    /// Probes at most (reference implementations use ~100).
    pub max_probes: usize,
    /// Stop when every matrix's standard error of Tr(H_l)/n_l is at most this fraction of it
    /// (or of the model's ΣTr(H_l)/Σn_l, where that is larger).
    pub tolerance: f64,
    /// Finite-difference step relative to each matrix's RMS.
    pub epsilon: f64,
    /// Calibration blocks per probe.
    pub batch: usize,
    pub seed: u64,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self { min_probes: 8, max_probes: 100, tolerance: 0.1, epsilon: 1e-3, batch: 4, seed: 0 }
    }
}

impl TraceConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.min_probes >= 2 && self.min_probes <= self.max_probes,
            "probes: at least 2, and the minimum at most the maximum"
        );
        ensure!(self.tolerance > 0.0 && self.tolerance.is_finite(), "the tolerance must be positive");
        ensure!(self.epsilon > 0.0 && self.epsilon < 1.0, "epsilon must be in (0, 1)");
        ensure!(self.batch >= 1, "the batch must hold at least one block");
        Ok(())
    }
}

/// The estimate for one matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerTrace {
    pub name: String,
    /// Number of weights n_l.
    pub params: usize,
    /// Tr(H_l) and its standard error.
    pub trace: f64,
    pub trace_se: f64,
    /// Tr(H_l) / n_l (the sensitivity per weight the allocation uses) and its standard error.
    pub per_weight: f64,
    pub per_weight_se: f64,
}

/// What `drq-hasb traces` writes: the estimates and how they were taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TraceReport {
    /// The float model's source and its sha256 (a checkpoint's provenance must match).
    pub source: String,
    pub source_sha256: String,
    pub probes: usize,
    /// Whether every matrix reached the tolerance before the probe limit.
    pub converged: bool,
    pub tolerance: f64,
    pub epsilon: f64,
    pub tokens_per_probe: usize,
    pub seconds: f64,
    pub layers: Vec<LayerTrace>,
}

impl TraceReport {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read traces {}", path.display()))?;
        let report: Self =
            serde_json::from_str(&text).with_context(|| format!("{} is not a traces file", path.display()))?;
        for l in &report.layers {
            ensure!(
                l.per_weight.is_finite() && l.params > 0,
                "{}: `{}` has no finite trace per weight",
                path.display(),
                l.name
            );
        }
        Ok(report)
    }

    /// Refuses traces measured on another model than the one with `sha256` (`what` names it).
    pub fn ensure_model(&self, sha256: &str, what: &str) -> Result<()> {
        ensure!(
            self.source_sha256 == sha256,
            "the traces were measured on {} (sha256 {}), not on {what} (sha256 {sha256})",
            self.source,
            self.source_sha256
        );
        Ok(())
    }

    /// The sensitivity per weight the allocation uses for `name`: Tr(H_l)/n_l, or its standard
    /// error where the estimate is smaller (a trace not distinguishable from zero, or negative:
    /// the loss is not at a minimum of every matrix, and a zero or negative cost would invite
    /// the fewest bits on the strength of noise).
    pub fn sensitivity(&self, name: &str) -> Result<f64> {
        self.layers
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.per_weight.max(l.per_weight_se))
            .with_context(|| format!("the traces have no entry for `{name}`"))
    }
}

/// Running mean and variance (Welford) of each matrix's per-probe samples.
#[derive(Debug, Clone)]
struct Running {
    n: usize,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl Running {
    fn new(layers: usize) -> Self {
        Self { n: 0, mean: vec![0.0; layers], m2: vec![0.0; layers] }
    }

    fn push(&mut self, samples: &[f64]) {
        self.n += 1;
        for ((mean, m2), &x) in self.mean.iter_mut().zip(&mut self.m2).zip(samples) {
            let delta = x - *mean;
            *mean += delta / self.n as f64;
            *m2 += delta * (x - *mean);
        }
    }

    /// Standard error of each mean.
    fn standard_errors(&self) -> Vec<f64> {
        let n = self.n as f64;
        self.m2.iter().map(|m2| (m2 / (n - 1.0).max(1.0) / n).sqrt()).collect()
    }

    /// The largest standard error of a trace per weight, relative to that trace per weight or,
    /// where it is smaller, to the model's (a matrix of little curvature needs no more than
    /// the absolute precision the others get).
    fn worst_relative_error(&self, sizes: &[usize]) -> f64 {
        let total: f64 = self.mean.iter().sum::<f64>().abs() / sizes.iter().sum::<usize>() as f64;
        self.standard_errors()
            .iter()
            .zip(&self.mean)
            .zip(sizes)
            .map(|((&se, &m), &n)| (se / n as f64) / (m.abs() / n as f64).max(total))
            .fold(0.0, f64::max)
    }
}

/// A Rademacher vector (±1) per matrix, from (seed, probe): the same on every platform.
pub fn rademacher(sizes: &[usize], seed: u64, probe: u64) -> Vec<Vec<f32>> {
    let mut next = splitmix64(seed ^ probe.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5851_F42D_4C95_7F2D);
    sizes
        .iter()
        .map(|&n| {
            let mut v = Vec::with_capacity(n);
            while v.len() < n {
                let bits = next();
                v.extend((0..64.min(n - v.len())).map(|i| if bits >> i & 1 == 1 { 1.0 } else { -1.0 }));
            }
            v
        })
        .collect()
}

/// Per-matrix traces (mean, standard error), the probes taken, and whether they converged.
pub struct Estimate {
    pub traces: Vec<(f64, f64)>,
    pub probes: usize,
    pub converged: bool,
}

/// Hutchinson's estimator over an operator: `sample(probe, v)` returns, for each matrix l, the
/// probe's sample v_lᵀ(Hv)_l. `on_probe(probes, worst relative standard error)` reports progress.
pub fn hutchinson(
    sizes: &[usize],
    cfg: &TraceConfig,
    mut sample: impl FnMut(usize, &[Vec<f32>]) -> Result<Vec<f64>>,
    mut on_probe: impl FnMut(usize, f64),
) -> Result<Estimate> {
    cfg.validate()?;
    let mut running = Running::new(sizes.len());
    let mut converged = false;
    for probe in 0..cfg.max_probes {
        let v = rademacher(sizes, cfg.seed, probe as u64);
        let samples = sample(probe, &v)?;
        ensure!(samples.len() == sizes.len(), "{} samples for {} matrices", samples.len(), sizes.len());
        if let Some(i) = samples.iter().position(|s| !s.is_finite()) {
            anyhow::bail!("probe {probe}: the Hessian-vector product of matrix {i} is not finite");
        }
        running.push(&samples);
        let worst = running.worst_relative_error(sizes);
        on_probe(probe + 1, worst);
        if probe + 1 >= cfg.min_probes && worst <= cfg.tolerance {
            converged = true;
            break;
        }
    }
    let se = running.standard_errors();
    Ok(Estimate { traces: running.mean.into_iter().zip(se).collect(), probes: running.n, converged })
}

/// Hessian-vector products of the mean next-token cross-entropy with respect to some matrices
/// of a float model, by central differences of gradients through the one `Transformer` in
/// differentiable mode.
pub struct LossHessian<'a> {
    config: &'a model::ModelConfig,
    /// The float model's weights, on `device` once.
    weights: Weights,
    names: Vec<String>,
    sizes: Vec<usize>,
    /// ε_l: each matrix's finite-difference step.
    steps: Vec<f64>,
    device: Device,
}

impl<'a> LossHessian<'a> {
    /// Steps of `epsilon` times each matrix's RMS.
    pub fn new(float: &'a FloatModel, names: &[String], epsilon: f64, device: &Device) -> Result<Self> {
        let (mut sizes, mut steps) = (Vec::new(), Vec::new());
        for name in names {
            let w = float.weights.iter().find(|(n, _)| *n == name).map(|(_, t)| t);
            let values: Vec<f32> =
                w.with_context(|| format!("the model has no weight `{name}`"))?.flatten_all()?.to_vec1()?;
            let rms = (values.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / values.len() as f64).sqrt();
            ensure!(rms > 0.0, "`{name}` is all zeros: no step size to perturb it by");
            sizes.push(values.len());
            steps.push(epsilon * rms);
        }
        let weights = float.weights.to_device(device)?;
        Ok(Self { config: &float.config, weights, names: names.to_vec(), sizes, steps, device: device.clone() })
    }

    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// For each matrix l, v_lᵀ(H D v)_l / ε_l on `blocks` (each `seq + 1` tokens): Hutchinson's
    /// sample for Rademacher `v`, and exactly H_jj for the basis vector e_j.
    pub fn samples(&self, v: &[Vec<f32>], blocks: &[&[u32]]) -> Result<Vec<f64>> {
        ensure!(!blocks.is_empty() && blocks[0].len() >= 2, "no tokens to take the loss on");
        let seq = blocks[0].len() - 1;
        let inputs: Vec<u32> = blocks.iter().flat_map(|b| b[..seq].iter().copied()).collect();
        let targets: Vec<u32> = blocks.iter().flat_map(|b| b[1..].iter().copied()).collect();
        let inputs = Tensor::from_vec(inputs, (blocks.len(), seq), &self.device)?;
        let targets = Tensor::from_vec(targets, blocks.len() * seq, &self.device)?;
        let shift = |sign: f64| -> Vec<Vec<f32>> {
            v.iter().zip(&self.steps).map(|(v, &e)| v.iter().map(|&x| (sign * e) as f32 * x).collect()).collect()
        };
        let plus = self.gradient(&shift(1.0), &inputs, &targets)?;
        let minus = self.gradient(&shift(-1.0), &inputs, &targets)?;
        Ok(v.iter()
            .zip(plus.iter().zip(&minus))
            .zip(&self.steps)
            .map(|((v, (p, m)), &e)| {
                let dot: f64 =
                    v.iter().zip(p.iter().zip(m)).map(|(&v, (&p, &m))| f64::from(v) * f64::from(p - m)).sum();
                dot / (2.0 * e)
            })
            .collect())
    }

    /// The loss gradient of each matrix, each shifted by `shift[l]`.
    fn gradient(&self, shift: &[Vec<f32>], inputs: &Tensor, targets: &Tensor) -> Result<Vec<Vec<f32>>> {
        let mut weights = Weights::new();
        let mut vars = Vec::with_capacity(self.names.len());
        for (name, tensor) in self.weights.iter() {
            match self.names.iter().position(|n| n == name) {
                Some(l) => {
                    let delta = Tensor::from_slice(&shift[l], tensor.shape(), &self.device)?;
                    let var = Var::from_tensor(&(tensor + delta)?)?.into_inner();
                    vars.push((l, var.clone()));
                    weights.insert(name.clone(), var)?;
                }
                None => weights.insert(name.clone(), tensor.clone())?,
            }
        }
        let config = self.config;
        let t = Transformer::new(config, &weights, OpsMode::Differentiable)?;
        let (b, s) = inputs.dims2()?;
        let logits = t.forward(inputs, &mut KvCache::new(config), 0)?.reshape((b * s, config.vocab_size))?;
        let loss = candle_nn::loss::cross_entropy(&logits, targets)?;
        let store = loss.backward()?;
        let mut grads = vec![Vec::new(); self.names.len()];
        for (l, var) in vars {
            grads[l] = match store.get(&var) {
                Some(g) => g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                None => vec![0.0; var.elem_count()],
            };
        }
        Ok(grads)
    }
}

/// Hutchinson traces of the calibration loss's Hessian for each of `names` (matrices of `float`),
/// each probe on `cfg.batch` blocks of `data`. `on_probe` as in [`hutchinson`].
pub fn model_traces(
    float: &FloatModel,
    names: &[String],
    data: &TokenBlocks,
    cfg: &TraceConfig,
    device: &Device,
    on_probe: impl FnMut(usize, f64),
) -> Result<(Vec<LayerTrace>, Estimate)> {
    ensure!(!data.train.is_empty(), "no calibration blocks");
    let hessian = LossHessian::new(float, names, cfg.epsilon, device)?;
    let estimate = hutchinson(
        hessian.sizes(),
        cfg,
        |probe, v| hessian.samples(v, &data.batch(cfg.seed, probe as u64, cfg.batch)),
        on_probe,
    )?;
    let layers = names
        .iter()
        .zip(hessian.sizes())
        .zip(&estimate.traces)
        .map(|((name, &n), &(trace, se))| LayerTrace {
            name: name.clone(),
            params: n,
            trace,
            trace_se: se,
            per_weight: trace / n as f64,
            per_weight_se: se / n as f64,
        })
        .collect();
    Ok((layers, estimate))
}

/// Runs [`model_traces`] and packs the report `drq-hasb traces` writes.
pub fn trace_report(
    float: &FloatModel,
    provenance: &model::source::Provenance,
    names: &[String],
    data: &TokenBlocks,
    cfg: &TraceConfig,
    device: &Device,
    on_probe: impl FnMut(usize, f64),
) -> Result<TraceReport> {
    let started = Instant::now();
    let (layers, estimate) = model_traces(float, names, data, cfg, device, on_probe)?;
    Ok(TraceReport {
        source: provenance.source.clone(),
        source_sha256: provenance.sha256.clone(),
        probes: estimate.probes,
        converged: estimate.converged,
        tolerance: cfg.tolerance,
        epsilon: cfg.epsilon,
        tokens_per_probe: cfg.batch * data.seq_len,
        seconds: started.elapsed().as_secs_f64(),
        layers,
    })
}
