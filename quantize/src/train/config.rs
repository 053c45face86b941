//! Training recipes: TOML files in `configs/train/` (every field optional, defaults below);
//! `drq-train` flags override them. The resolved recipe is stored in the training state and
//! in the run directory, so a run can be reproduced and resumed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{ensure, Context, Result};
use kernels::{Granularity, TieRule};
use serde::{Deserialize, Serialize};

use crate::ptq::{Grid, QuantSpec, SearchObjective};
use crate::train::alrs::AlrsPolicy;
use crate::train::optim::AdamParams;

/// What the optimizer updates. Scales always train; tensors kept in float by `keep_float`
/// (e.g. an unquantized embedding) never do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Trainable {
    /// The quantization scales only.
    #[serde(rename = "scales")]
    Scales,
    /// Scales, RMSNorm weights and biases.
    #[default]
    #[serde(rename = "scales+norms")]
    ScalesNorms,
    /// Scales, norms, biases and the latent weights of every quantized layer.
    #[serde(rename = "all")]
    All,
}

impl Trainable {
    pub fn name(self) -> &'static str {
        match self {
            Trainable::Scales => "scales",
            Trainable::ScalesNorms => "scales+norms",
            Trainable::All => "all",
        }
    }
    pub fn norms(self) -> bool {
        self != Trainable::Scales
    }
    pub fn weights(self) -> bool {
        self == Trainable::All
    }
}

impl FromStr for Trainable {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        [Trainable::Scales, Trainable::ScalesNorms, Trainable::All]
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown `train` {s:?} (expected scales, scales+norms or all)"))
    }
}

impl fmt::Display for Trainable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the precisions of a mini-batch are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoopMode {
    /// The paper's loop: per bit-width, forward, backward and an optimizer step (weights at λ,
    /// scales at λ_b).
    #[default]
    PerPrecision,
    /// One step on the summed loss of every bit-width (the baseline; no ALRS).
    Summed,
}

impl FromStr for LoopMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "per-precision" => Ok(LoopMode::PerPrecision),
            "summed" => Ok(LoopMode::Summed),
            _ => anyhow::bail!("unknown loop {s:?} (expected per-precision or summed)"),
        }
    }
}

/// Adam moments of the scales: one set shared by every bit-width (one optimizer, as the paper),
/// or one set per bit-width (each precision's scale gradients normalised by their own history).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScaleMoments {
    #[default]
    Shared,
    PerPrecision,
}

impl FromStr for ScaleMoments {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "shared" => Ok(ScaleMoments::Shared),
            "per-precision" => Ok(ScaleMoments::PerPrecision),
            _ => anyhow::bail!("unknown scale_moments {s:?} (expected shared or per-precision)"),
        }
    }
}

/// The teacher of knowledge distillation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Teacher {
    /// The float model training started from.
    #[default]
    Float,
    /// The current model at 8 bits (no gradient through it).
    W8,
}

impl FromStr for Teacher {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "float" => Ok(Teacher::Float),
            "w8" => Ok(Teacher::W8),
            _ => anyhow::bail!("unknown KD teacher {s:?} (expected float or w8)"),
        }
    }
}

/// Knowledge distillation: loss = (1 − weight)·CE + weight·T²·KL(teacher_T ‖ student_T).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KdConfig {
    /// 0 disables distillation.
    pub weight: f64,
    pub temperature: f64,
    pub teacher: Teacher,
}

impl Default for KdConfig {
    fn default() -> Self {
        Self { weight: 0.0, temperature: 1.0, teacher: Teacher::Float }
    }
}

/// Hessian-aware stochastic bit-switching (HASB, METHOD.md §3): at each step and bit-width b,
/// each layer runs at b, or with probability σ·step/steps at a bit-width of its own drawn from
/// the recipe's: sensitive layers (Tr(H_l)/n_l at least the mean over layers) draw b with
/// probability b/Σb, the others uniformly. The checkpoint learns to run mixed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BitSwitching {
    /// The final probability σ that a layer draws its own bit-width; 0 disables switching.
    pub sigma: f64,
    /// Traces of the float model (`drq-hasb traces`) that say which layers are sensitive.
    pub traces: String,
}

impl Default for BitSwitching {
    fn default() -> Self {
        Self { sigma: 0.0, traces: String::new() }
    }
}

/// A training recipe, fully resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Bit-widths trained jointly (each 2..8), in loop order.
    pub bits: Vec<u32>,
    /// Scale granularity: `channel` or `group:N`.
    pub granularity: String,
    /// Name pattern → granularity for the weights laid out otherwise (as in `configs/ptq/`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub granularity_overrides: BTreeMap<String, String>,
    /// Second-rounding tie rule: `even` or `up`.
    pub tie: String,
    /// PTQ objective of the initial scales: `normalized` or `sum`.
    pub objective: String,
    /// Grid of the initial scales: `symmetric` or `max-negative` (scales keep their sign).
    pub grid: String,
    /// Weights whose name contains one of these stay in float (and frozen).
    pub keep_float: Vec<String>,
    /// What trains.
    pub train: Trainable,
    pub steps: u64,
    /// Sequences per mini-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate λ of the latent weights, norms and biases.
    pub lr: f64,
    /// Peak base learning rate λ_s of the scales (ALRS scales it per bit-width). In absolute
    /// units (Adam steps are ~lr), so it must be small against the scales (~5e-3 for SmolLM2).
    pub scale_lr: f64,
    pub warmup_steps: u64,
    /// The cosine schedule ends at `min_lr_ratio`·peak.
    pub min_lr_ratio: f64,
    /// Decoupled weight decay of the latent weights (never of scales, norms or biases).
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Global L2 gradient clipping, per group (weights+norms, scales); 0 disables.
    pub clip_grad: f64,
    pub alrs: AlrsPolicy,
    #[serde(rename = "loop")]
    pub loop_mode: LoopMode,
    pub scale_moments: ScaleMoments,
    pub kd: KdConfig,
    /// Seed of the data shuffle.
    pub seed: u64,
    /// Evaluate the held-out slice every this many steps (and at the start and end); 0: only
    /// at the start and end.
    pub eval_every: u64,
    /// Blocks (of `seq_len + 1` tokens) at the end of the text held out for evaluation.
    pub heldout_blocks: usize,
    /// Save the training state every this many steps; 0: only at the end and on Ctrl-C.
    pub save_every: u64,
    pub bit_switching: BitSwitching,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            bits: vec![8, 4, 2],
            granularity: "channel".into(),
            granularity_overrides: BTreeMap::new(),
            tie: "even".into(),
            objective: "normalized".into(),
            grid: "symmetric".into(),
            keep_float: Vec::new(),
            train: Trainable::default(),
            steps: 1000,
            batch: 4,
            seq_len: 256,
            lr: 5e-5,
            scale_lr: 1e-5,
            warmup_steps: 50,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            clip_grad: 1.0,
            alrs: AlrsPolicy::default(),
            loop_mode: LoopMode::default(),
            scale_moments: ScaleMoments::default(),
            kd: KdConfig::default(),
            seed: 0,
            eval_every: 100,
            heldout_blocks: 16,
            save_every: 200,
            bit_switching: BitSwitching::default(),
        }
    }
}

impl TrainConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read recipe {}", path.display()))?;
        let cfg: Self = toml::from_str(&text).with_context(|| format!("invalid recipe {}", path.display()))?;
        Ok(cfg)
    }

    /// The quantization spec of the initial PTQ (and of the output checkpoint's metadata).
    pub fn quant_spec(&self) -> Result<QuantSpec> {
        let spec = QuantSpec {
            bits: self.bits.clone(),
            granularity: self.granularity.parse::<Granularity>().map_err(|e| anyhow::anyhow!("recipe: {e}"))?,
            granularity_overrides: QuantSpec::parse_overrides(&self.granularity_overrides)
                .map_err(|e| anyhow::anyhow!("recipe: granularity_overrides: {e}"))?,
            tie: self.tie.parse::<TieRule>().map_err(|e| anyhow::anyhow!("recipe: {e}"))?,
            objective: self.objective.parse::<SearchObjective>().map_err(|e| anyhow::anyhow!("recipe: {e}"))?,
            grid: self.grid.parse::<Grid>().map_err(|e| anyhow::anyhow!("recipe: {e}"))?,
        };
        spec.validate()?;
        Ok(spec)
    }

    pub fn adam(&self) -> AdamParams {
        AdamParams { beta1: self.adam_beta1, beta2: self.adam_beta2, eps: self.adam_eps }
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        self.quant_spec()?;
        ensure!(self.steps >= 1, "steps must be at least 1");
        ensure!(self.batch >= 1 && self.seq_len >= 2, "batch must be ≥ 1 and seq_len ≥ 2");
        for (name, v) in [
            ("lr", self.lr),
            ("scale_lr", self.scale_lr),
            ("weight_decay", self.weight_decay),
            ("clip_grad", self.clip_grad),
        ] {
            ensure!(v.is_finite() && v >= 0.0, "{name} must be a non-negative number, not {v}");
        }
        ensure!((0.0..=1.0).contains(&self.min_lr_ratio), "min_lr_ratio must be in [0, 1]");
        ensure!(
            (0.0..1.0).contains(&self.adam_beta1) && (0.0..1.0).contains(&self.adam_beta2),
            "Adam betas must be in [0, 1)"
        );
        ensure!(self.adam_eps > 0.0, "adam_eps must be positive");
        ensure!((0.0..=1.0).contains(&self.kd.weight), "kd.weight must be in [0, 1]");
        ensure!(self.kd.temperature > 0.0, "kd.temperature must be positive");
        ensure!(self.heldout_blocks >= 1, "heldout_blocks must be at least 1");
        ensure!(
            !(self.loop_mode == LoopMode::Summed && self.alrs != AlrsPolicy::None),
            "ALRS applies to the per-precision loop: with loop = \"summed\" set alrs = \"none\""
        );
        ensure!(
            !(self.kd.weight > 0.0 && self.kd.teacher == Teacher::W8 && !self.bits.contains(&8)),
            "the w8 teacher needs 8 in the bit set"
        );
        let sw = &self.bit_switching;
        ensure!((0.0..=1.0).contains(&sw.sigma), "bit_switching.sigma must be in [0, 1], not {}", sw.sigma);
        ensure!(
            sw.sigma == 0.0 || !sw.traces.is_empty(),
            "bit_switching needs the float model's traces (`drq-hasb traces`) to tell sensitive layers"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_recipe_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/train");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            TrainConfig::load(&path).unwrap().validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
        assert!(n >= 2, "expected the shipped recipes in {}", dir.display());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(toml::from_str::<TrainConfig>("stepz = 3").unwrap_err().to_string().contains("stepz"));
        let c: TrainConfig =
            toml::from_str("alrs = \"relative\"\ntrain = \"all\"\nloop = \"summed\"\n[kd]\nweight = 0.5").unwrap();
        assert_eq!(
            (c.alrs, c.train, c.loop_mode, c.kd.weight),
            (AlrsPolicy::Relative, Trainable::All, LoopMode::Summed, 0.5)
        );
        assert!(c.validate().unwrap_err().to_string().contains("summed"));
        assert!(toml::from_str::<TrainConfig>("alrs = \"paper\"").is_err());
        let c: TrainConfig = toml::from_str("bits = [9]").unwrap();
        assert!(c.validate().is_err());
    }
}
