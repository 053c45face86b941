//! Block-wise reconstruction for Double Rounding (the block-wise objective of OmniQuant and of
//! EfficientQAT's Block-AP phase), every precision of the bit set at once.
//!
//! The model is quantized one transformer block at a time. For block `i`, calibration sequences
//! give its float input `X_f` and the float block's output `Y = block_f(X_f)` (the target). The
//! block's latent weights, scales and (optionally) norms and biases are trained so that at every
//! bit-width `b` of the set the fake-quantized block maps its input to `Y`:
//!
//! ```text
//! L = Σ_b w_b · MSE(block_b(X_b), Y) / MSE_b⁰          MSE_b⁰: the PTQ block's error at b
//! ```
//!
//! Each precision counts by how far it is from its own starting point (as the PTQ search's
//! `normalized` objective), so 2 bits do not drown 8. `X_b` is the output of the blocks before,
//! quantized at `b` (`inputs = "quantized"`: each precision learns to correct the error it
//! receives) or the float stream (`"float"`). The scale gradients of each precision are weighted
//! by ALRS (`eta`: η_b) before the one Adam step per mini-batch. Learning rates are relative:
//! a weight moves at most about `weight_lr` of its group's 8-bit step per update (so every
//! layer moves at the same pace relative to its grid), a scale about `scale_lr` of itself.
//!
//! Blocks are the unit of work and of resumption: each trained block is saved in the run
//! directory, and a resumed run rebuilds the inputs of the next block from the saved ones.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use kernels::{LevelCodes, QuantizedWeight, ScaleLayout, TieRule};
use model::checkpoint::{CorrectionGranularity, WideRowsSpec};
use model::weights::{BLOCK_LINEARS, EMBED, LM_HEAD};
use model::{FloatModel, ModelConfig, OpsMode, Transformer, Weights};
use serde::{Deserialize, Serialize};

use crate::model_ptq::{quantizable, quantization_meta, QuantizedModel};
use crate::ptq::{quantize_weight, reconstruction_error, Grid, QuantSpec, SearchObjective};
use crate::report::LayerReport;
use crate::train::alrs::AlrsPolicy;
use crate::train::data::permutation;
use crate::train::fakequant::{export_weight, FakeQuant};
use crate::train::optim::{AdamParams, AdamState};

/// Where a block's training inputs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockInputs {
    /// At each bit-width, the output of the blocks before quantized at that bit-width.
    #[default]
    Quantized,
    /// The float model's hidden states.
    Float,
}

impl std::fmt::Display for BlockInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BlockInputs::Quantized => "quantized",
            BlockInputs::Float => "float",
        })
    }
}

impl std::str::FromStr for BlockInputs {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "quantized" => Ok(BlockInputs::Quantized),
            "float" => Ok(BlockInputs::Float),
            _ => bail!("inputs {s:?} (expected \"quantized\" or \"float\")"),
        }
    }
}

/// How a block's output error is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockLoss {
    /// Mean squared error over every position and channel: the positions with the largest
    /// hidden states (attention sinks, 10³–10⁵ times a typical token's energy) dominate it.
    Mse,
    /// Each position's squared error relative to its float output's energy, averaged over the
    /// positions: every token counts alike.
    #[default]
    TokenRelative,
}

impl std::fmt::Display for BlockLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BlockLoss::Mse => "mse",
            BlockLoss::TokenRelative => "token-relative",
        })
    }
}

impl std::str::FromStr for BlockLoss {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mse" => Ok(BlockLoss::Mse),
            "token-relative" => Ok(BlockLoss::TokenRelative),
            _ => bail!("loss {s:?} (expected \"mse\" or \"token-relative\")"),
        }
    }
}

impl BlockLoss {
    /// The error of `out` against `target` (`[batch, seq, hidden]`), a scalar tensor.
    fn of(self, out: &Tensor, target: &Tensor) -> Result<Tensor> {
        let sq = (out - target)?.sqr()?;
        Ok(match self {
            BlockLoss::Mse => sq.mean_all()?,
            BlockLoss::TokenRelative => {
                let energy = (target.sqr()?.sum_keepdim(2)? + 1e-6)?;
                sq.sum_keepdim(2)?.div(&energy)?.mean_all()?
            }
        })
    }
}

/// A block-wise reconstruction recipe (`configs/blockwise/*.toml`); every field has a default
/// and a flag of the same name in `drq-reconstruct`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlockwiseConfig {
    /// Bit-widths reconstructed jointly (each 2..8).
    pub bits: Vec<u32>,
    /// Loss weight of each bit-width, in the order of `bits`. Empty: 0.1 for 8 bits (near
    /// lossless already, and refitted afterwards) and for 2 bits (far from usable at any weight),
    /// 1 for the others: on SmolLM2 a larger 8-bit weight holds W8 at the cost of W4 and a
    /// smaller one the reverse (docs/RESULTS.md).
    pub bit_weights: Vec<f64>,
    /// Initial scales (PTQ search) and layout: as in `configs/ptq/`.
    pub granularity: String,
    /// Name pattern → granularity for the weights laid out otherwise (as in `configs/ptq/`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub granularity_overrides: BTreeMap<String, String>,
    pub tie: String,
    pub objective: String,
    pub grid: String,
    /// Weights whose name contains one of these stay in float.
    pub keep_float: Vec<String>,
    /// Calibration sequences.
    pub samples: usize,
    /// Tokens per calibration sequence.
    pub seq_len: usize,
    /// Passes over the calibration sequences per block.
    pub epochs: usize,
    /// Sequences per mini-batch.
    pub batch: usize,
    /// Peak per-update move of a latent weight, in units of its group's 8-bit step (|s|).
    pub weight_lr: f64,
    /// Peak per-update move of a scale, relative to the scale.
    pub scale_lr: f64,
    /// Peak per-update move of a norm gain or bias (absolute); 0 keeps them frozen.
    pub norm_lr: f64,
    /// Weighting of each precision's scale gradients (`none` or `eta`).
    pub alrs: AlrsPolicy,
    pub inputs: BlockInputs,
    /// What the block's output error is.
    pub loss: BlockLoss,
    /// After training, move each 8-bit code to the one nearest the float weight among the codes
    /// that keep every lower precision's trained level: the lower precisions are unchanged and
    /// 8 bits gets back what training for them cost it.
    pub refit_8bit: bool,
    /// After the blocks (before the corrections, with the same calibration inputs), re-round the
    /// 8-bit codes by GPTQ towards each layer's float output, each code kept within every lower
    /// trained precision's level: only 8 bits (and the untrained 7..5) change.
    pub gptq_8bit: bool,
    /// Passes over the calibration sequences training the lm_head (a tied embedding in its
    /// lm_head role) before the blocks: its latent weights and scales fitted so that the
    /// next-token distribution at every bit-width matches the float model's on the float final
    /// hidden states (KL, normalised and weighted per bit-width as the blocks). 0: PTQ.
    pub head_epochs: usize,
    /// Sequences per mini-batch of the lm_head stage; absent: `batch`. The two stages' step
    /// counts are set apart: the blocks measured best at one sequence per step, while the lm_head
    /// stage was only measured at four.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_batch: Option<usize>,
    /// Per-precision corrections fitted after the reconstruction (bit-widths below 8).
    pub corrections: Vec<u32>,
    /// What one correction factor covers: an output row or a scale group.
    pub correction_granularity: CorrectionGranularity,
    /// The leading lm_head rows served wider (`ROWS:+BITS` or `none`), written with the
    /// checkpoint: nothing trains for them.
    pub wide_rows: WideRowsSpec,
    pub seed: u64,
}

impl Default for BlockwiseConfig {
    fn default() -> Self {
        Self {
            bits: vec![8, 4, 2],
            bit_weights: Vec::new(),
            granularity: "group:128".into(),
            granularity_overrides: BTreeMap::new(),
            tie: "even".into(),
            objective: "normalized".into(),
            grid: "max-negative".into(),
            keep_float: Vec::new(),
            samples: 64,
            seq_len: 512,
            epochs: 2,
            batch: 4,
            weight_lr: 0.05,
            scale_lr: 2e-3,
            norm_lr: 1e-4,
            alrs: AlrsPolicy::None,
            inputs: BlockInputs::Quantized,
            loss: BlockLoss::default(),
            refit_8bit: true,
            gptq_8bit: false,
            head_epochs: 0,
            head_batch: None,
            corrections: Vec::new(),
            correction_granularity: CorrectionGranularity::Row,
            wide_rows: WideRowsSpec::DEFAULT,
            seed: 0,
        }
    }
}

impl BlockwiseConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read recipe {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid recipe {}", path.display()))
    }

    /// The PTQ spec of the initial scales.
    pub fn quant_spec(&self) -> Result<QuantSpec> {
        let spec = QuantSpec {
            bits: self.bits.clone(),
            granularity: self.granularity.parse().map_err(|e| anyhow::anyhow!("recipe: {e}"))?,
            granularity_overrides: QuantSpec::parse_overrides(&self.granularity_overrides)
                .map_err(|e| anyhow::anyhow!("recipe: granularity_overrides: {e}"))?,
            tie: self.tie.parse::<TieRule>().map_err(|e| anyhow::anyhow!("recipe: {e}"))?,
            objective: self.objective.parse::<SearchObjective>().map_err(|e| anyhow::anyhow!("recipe: {e}"))?,
            grid: self.grid.parse::<Grid>().map_err(|e| anyhow::anyhow!("recipe: {e}"))?,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every field; errors name the field.
    pub fn validate(&self) -> Result<()> {
        self.quant_spec()?;
        ensure!(
            self.bit_weights.is_empty() || self.bit_weights.len() == self.bits.len(),
            "bit_weights has {} entries for {} bit-widths",
            self.bit_weights.len(),
            self.bits.len()
        );
        ensure!(self.bit_weights.iter().all(|w| w.is_finite() && *w >= 0.0), "bit_weights must be ≥ 0");
        ensure!(self.samples >= 1 && self.seq_len >= 2, "samples must be at least 1 and seq_len at least 2");
        ensure!(self.epochs >= 1 && self.batch >= 1, "epochs and batch must be at least 1");
        ensure!(self.batch <= self.samples, "batch ({}) exceeds samples ({})", self.batch, self.samples);
        if let Some(b) = self.head_batch {
            ensure!(
                (1..=self.samples).contains(&b),
                "head_batch ({b}) must be between 1 and samples ({})",
                self.samples
            );
        }
        for (name, lr) in [("weight_lr", self.weight_lr), ("scale_lr", self.scale_lr), ("norm_lr", self.norm_lr)] {
            ensure!(lr.is_finite() && lr >= 0.0, "{name} must be ≥ 0");
        }
        ensure!(
            matches!(self.alrs, AlrsPolicy::None | AlrsPolicy::Eta),
            "alrs `{}`: block-wise reconstruction weights scale gradients by `none` or `eta`",
            self.alrs.name()
        );
        for &b in &self.corrections {
            kernels::check_bits(b).map_err(|e| anyhow::anyhow!("corrections: {e}"))?;
            ensure!(b < kernels::STORED_BITS, "corrections: {b} bits are the stored codes themselves");
        }
        Ok(())
    }

    fn bit_weight(&self, i: usize) -> f64 {
        match (self.bit_weights.get(i), self.bits[i]) {
            (Some(&w), _) => w,
            (None, 8 | 2) => 0.1,
            (None, _) => 1.0,
        }
    }

    /// Mini-batches per block.
    pub fn steps_per_block(&self) -> usize {
        self.epochs * self.samples.div_ceil(self.batch)
    }

    /// Sequences per mini-batch of the lm_head stage.
    pub fn head_batch(&self) -> usize {
        self.head_batch.unwrap_or(self.batch)
    }

    /// Mini-batches of the lm_head stage.
    pub fn head_steps(&self) -> usize {
        self.head_epochs * self.samples.div_ceil(self.head_batch())
    }
}

/// What training one block did, per bit-width: the output error (the recipe's loss) over every
/// calibration sequence before (PTQ scales, float weights) and after (the block as the checkpoint
/// serves it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockReport {
    pub block: usize,
    pub mse_before: BTreeMap<u32, f64>,
    pub mse_after: BTreeMap<u32, f64>,
    pub seconds: f64,
}

/// What the lm_head stage did, per bit-width: KL(float ‖ quantized) of the next-token
/// distribution over every calibration position (float final hidden states), before (PTQ) and
/// after (the weight as the checkpoint serves it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadReport {
    pub weight: String,
    pub kl_before: BTreeMap<u32, f64>,
    pub kl_after: BTreeMap<u32, f64>,
    pub seconds: f64,
}

/// What a reconstruction did: the lm_head stage (when the recipe has one) and every block.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reconstruction {
    pub head: Option<HeadReport>,
    pub blocks: Vec<BlockReport>,
}

/// A stage of the reconstruction, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Head,
    Block(usize),
}

/// Progress of a reconstruction, for a progress bar: `(stage, step within the stage)`.
pub type Progress<'a> = &'a mut dyn FnMut(Stage, usize);

/// The weight the lm_head stage trains: an untied lm_head, or a tied embedding (the same
/// matrix), when it is quantized.
pub fn head_weight(config: &ModelConfig, keep_float: &[String]) -> Option<String> {
    let name = if config.tie_word_embeddings { EMBED } else { LM_HEAD };
    quantizable(config, keep_float).iter().any(|(n, _, _)| n == name).then(|| name.to_string())
}

/// One quantized weight being trained: latent weights and scales.
struct Layer {
    name: String,
    layout: ScaleLayout,
    w: Var,
    s: Var,
    adam_w: AdamState,
    adam_s: AdamState,
}

impl Layer {
    /// Starts from the float weight and the scales of its PTQ `q`.
    fn new(float: &FloatModel, name: &str, q: &QuantizedWeight, device: &Device) -> Result<Self> {
        let (rows, cols) = (q.layout.rows, q.layout.cols);
        Ok(Layer {
            name: name.to_string(),
            layout: q.layout,
            w: Var::from_tensor(&float.weights.get(name, &[rows, cols])?)?,
            s: Var::from_vec(q.scales.clone(), (rows, q.layout.n_groups()), device)?,
            adam_w: AdamState::new(q.layout.n_weights()),
            adam_s: AdamState::new(q.layout.n_scales()),
        })
    }

    /// `Ŵ_b` as the fake quantizer serves it, recorded for backpropagation.
    fn fake_quantized(&self, bits: u32, tie: TieRule) -> Result<Tensor> {
        FakeQuant::new(bits, tie, self.layout)?.apply(self.w.as_tensor(), self.s.as_tensor())
    }

    /// One Adam step on the summed gradients `gw` (weights) and `gs` (scales), the learning rates
    /// relative (`cfg.weight_lr` of the group's 8-bit step, `cfg.scale_lr` of the scale) times
    /// the schedule's `mult`.
    fn update(&mut self, gw: &[f32], gs: &[f32], cfg: &BlockwiseConfig, mult: f64, adam: &AdamParams) -> Result<()> {
        let l = self.layout;
        let s: Vec<f32> = self.s.as_tensor().flatten_all()?.to_vec1()?;
        // Per-weight units: its group's 8-bit step |s|.
        let unit_w: Vec<f32> = (0..l.rows)
            .flat_map(|r| (0..l.cols).map(move |c| (r, c)))
            .map(|(r, c)| s[r * l.n_groups() + c / l.group].abs())
            .collect();
        let mut w: Vec<f32> = self.w.as_tensor().flatten_all()?.to_vec1()?;
        self.adam_w.step_scaled(&mut w, gw, cfg.weight_lr * mult, &unit_w, adam);
        let unit_s: Vec<f32> = s.iter().map(|x| x.abs()).collect();
        let mut s_new = s.clone();
        self.adam_s.step_scaled(&mut s_new, gs, cfg.scale_lr * mult, &unit_s, adam);
        // A scale keeps its sign and stays away from zero.
        for (x, &old) in s_new.iter_mut().zip(&s) {
            if !x.is_finite() || x.signum() != old.signum() || x.abs() < 1e-3 * old.abs() {
                *x = old;
            }
        }
        let device = self.w.as_tensor().device();
        self.w.set(&Tensor::from_vec(w, (l.rows, l.cols), device)?)?;
        self.s.set(&Tensor::from_vec(s_new, (l.rows, l.n_groups()), device)?)?;
        Ok(())
    }

    /// The trained tensors: latent weights (`NAME`) and scales (`NAME.scales`).
    fn params(&self, out: &mut BTreeMap<String, Tensor>) {
        out.insert(self.name.clone(), self.w.as_tensor().detach());
        out.insert(format!("{}{SCALES}", self.name), self.s.as_tensor().detach());
    }
}

/// A norm gain or bias of the block being trained.
struct Float {
    name: String,
    t: Var,
    adam: AdamState,
}

/// Hidden states of every calibration sequence, `[samples, seq, hidden]`.
type Stream = Tensor;

/// A block's inputs at each bit-width: its own quantized stream, or the float one.
struct Inputs<'s> {
    quantized: &'s BTreeMap<u32, Stream>,
    float: &'s Stream,
}

impl<'s> Inputs<'s> {
    fn at(&self, bits: u32) -> &'s Stream {
        self.quantized.get(&bits).unwrap_or(self.float)
    }
}

/// The block-wise reconstruction of `float` on `samples` (token sequences of `cfg.seq_len`),
/// saving each trained stage (the lm_head when the recipe trains it, then every block) in
/// `run_dir` and resuming from the stages saved there. Returns the quantized model (its tensors
/// on the CPU) and what each stage did.
///
/// Training runs on `device`, where `float`'s weights must be (`Weights::to_device`); the
/// optimizer steps, the export and the saved stages stay on the host.
pub fn reconstruct(
    float: &FloatModel,
    cfg: &BlockwiseConfig,
    samples: &[Vec<u32>],
    run_dir: &Path,
    device: &Device,
    progress: Progress<'_>,
) -> Result<(QuantizedModel, Reconstruction)> {
    cfg.validate()?;
    ensure!(samples.len() == cfg.samples, "{} calibration sequences for a recipe of {}", samples.len(), cfg.samples);
    ensure!(samples.iter().all(|s| s.len() == cfg.seq_len), "calibration sequences must have seq_len tokens");
    let spec = cfg.quant_spec()?;
    let config = &float.config;
    let targets = quantizable(config, &cfg.keep_float);
    ensure!(
        float.weights.iter().all(|(_, t)| t.device().same_device(device)),
        "the float weights are not on {device:?}"
    );
    std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;

    // The initial scales of every quantized weight (the embedding and an untied lm_head keep them).
    let mut quantized = BTreeMap::new();
    for (name, rows, cols) in &targets {
        let w: Vec<f32> = float.weights.get(name, &[*rows, *cols])?.flatten_all()?.to_vec1()?;
        let q = quantize_weight(&w, *rows, *cols, &spec.for_weight(name)?)
            .with_context(|| format!("initial scales of `{name}`"))?;
        quantized.insert(name.clone(), q);
    }
    let tokens: Vec<u32> = samples.iter().flatten().copied().collect();
    let tokens = Tensor::from_vec(tokens, (samples.len(), cfg.seq_len), device)?;
    let float_model = Transformer::new(config, &float.weights, OpsMode::Inference)?;
    // The lm_head first: a tied embedding's codes are also the blocks' first input.
    let head = match head_weight(config, &cfg.keep_float) {
        Some(name) if cfg.head_epochs > 0 => {
            let stage = HeadStage { float, cfg, spec: &spec, name: &name, float_model: &float_model, run_dir, device };
            Some(stage.run(&tokens, &mut quantized, progress)?)
        }
        _ => None,
    };
    let mut stream_f = batched(cfg.batch, &tokens, |t| float_model.embed(t))?;
    // Quantized streams start at the embedding served at each bit-width.
    let mut streams: BTreeMap<u32, Stream> = BTreeMap::new();
    if cfg.inputs == BlockInputs::Quantized {
        for &b in &cfg.bits {
            let weights =
                with_served(&float.weights, &quantized, b, spec.tie, device, |n| !n.starts_with("model.layers."))?;
            let t = Transformer::new(config, &weights, OpsMode::Inference)?;
            streams.insert(b, batched(cfg.batch, &tokens, |x| t.embed(x))?);
        }
    }
    // Trained norms and biases; trained quantized weights go into `quantized` as exported.
    let mut trained: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut reports = Vec::new();
    for block in 0..config.num_hidden_layers {
        let started = std::time::Instant::now();
        let target = batched(cfg.batch, &stream_f, |x| float_model.block_forward(block, x))?;
        let inputs = Inputs { quantized: &streams, float: &stream_f };
        let saved = block_path(run_dir, block);
        let report = if saved.is_file() {
            let params: BTreeMap<String, Tensor> = candle_core::safetensors::load(&saved, device)
                .with_context(|| format!("cannot read the saved block {}", saved.display()))?
                .into_iter()
                .collect();
            export_params(float, cfg, &spec, &params, &mut quantized, &mut trained)?;
            progress(Stage::Block(block), cfg.steps_per_block());
            read_json(&report_path(run_dir, block))?
        } else {
            let mut trainer = BlockTrainer::new(float, cfg, &spec, block, &quantized, &targets, device)?;
            let mse_before = trainer.mse_all(&inputs, &target)?;
            trainer.train(&inputs, &target, &mse_before, &mut |step| progress(Stage::Block(block), step))?;
            let params = trainer.params()?;
            drop(trainer);
            export_params(float, cfg, &spec, &params, &mut quantized, &mut trained)?;
            let mut mse_after = BTreeMap::new();
            for &b in &cfg.bits {
                let t = Transformer::new(
                    config,
                    &served_block(float, &trained, &quantized, block, b, spec.tie, device)?,
                    OpsMode::Inference,
                )?;
                let x = inputs.at(b);
                let mut total = 0f64;
                for i in (0..x.dim(0)?).step_by(cfg.batch) {
                    let k = cfg.batch.min(x.dim(0)? - i);
                    let err = cfg.loss.of(&t.block_forward(block, &x.narrow(0, i, k)?)?, &target.narrow(0, i, k)?)?;
                    total += err.to_dtype(DType::F64)?.to_scalar::<f64>()? * k as f64;
                }
                mse_after.insert(b, total / x.dim(0)? as f64);
            }
            let report = BlockReport { block, mse_before, mse_after, seconds: started.elapsed().as_secs_f64() };
            save_stage(&block_path(run_dir, block), &report_path(run_dir, block), &params, &report)?;
            report
        };
        tracing::info!(
            "block {block}: output error {}",
            report
                .mse_before
                .iter()
                .map(|(b, before)| format!("W{b} {before:.3e} → {:.3e}", report.mse_after[b]))
                .collect::<Vec<_>>()
                .join(", ")
        );
        // The next block's inputs: the float stream, and each precision through this block as
        // the checkpoint serves it.
        for (&b, stream) in streams.iter_mut() {
            let t = Transformer::new(
                config,
                &served_block(float, &trained, &quantized, block, b, spec.tie, device)?,
                OpsMode::Inference,
            )?;
            *stream = batched(cfg.batch, stream, |x| t.block_forward(block, x))?;
        }
        stream_f = target;
        reports.push(report);
    }
    let model = export(float, cfg, &spec, &targets, quantized, &trained)?;
    Ok((model, Reconstruction { head, blocks: reports }))
}

/// The lm_head stage of a reconstruction (see [`BlockwiseConfig::head_epochs`]).
struct HeadStage<'a> {
    float: &'a FloatModel,
    cfg: &'a BlockwiseConfig,
    spec: &'a QuantSpec,
    name: &'a str,
    float_model: &'a Transformer,
    run_dir: &'a Path,
    device: &'a Device,
}

impl HeadStage<'_> {
    /// Trains the head weight (or takes it from the run directory), exports it into `quantized`
    /// and reports what it did.
    fn run(
        &self,
        tokens: &Tensor,
        quantized: &mut BTreeMap<String, QuantizedWeight>,
        progress: Progress<'_>,
    ) -> Result<HeadReport> {
        let (cfg, spec) = (self.cfg, self.spec);
        let (saved, report_file) = (self.run_dir.join("head.safetensors"), self.run_dir.join("head.json"));
        let mut unused = BTreeMap::new();
        if saved.is_file() {
            let params = candle_core::safetensors::load(&saved, self.device)
                .with_context(|| format!("cannot read the saved lm_head {}", saved.display()))?
                .into_iter()
                .collect();
            export_params(self.float, cfg, spec, &params, quantized, &mut unused)?;
            progress(Stage::Head, cfg.head_steps());
            return read_json(&report_file);
        }
        let started = std::time::Instant::now();
        let batch = cfg.head_batch();
        let mut x = batched(batch, tokens, |t| self.float_model.embed(t))?;
        for block in 0..self.float.config.num_hidden_layers {
            x = batched(batch, &x, |h| self.float_model.block_forward(block, h))?;
        }
        let hidden = batched(batch, &x, |h| self.float_model.head_input(h))?;
        drop(x);
        let float_w = self.float.weights.get(self.name, &[quantized[self.name].layout.rows, hidden.dim(2)?])?;
        let kl_before = self.kl_served(&hidden, &float_w, &quantized[self.name])?;
        let mut layer = Layer::new(self.float, self.name, &quantized[self.name], self.device)?;
        let adam = AdamParams::default();
        let (n, total) = (hidden.dim(0)?, cfg.head_steps());
        let mut step = 0;
        for epoch in 0..cfg.head_epochs {
            // Another seed stream than the blocks' (which take the block index in the high bits).
            for chunk in permutation(n, cfg.seed ^ (u64::MAX << 32), epoch as u64).chunks(batch) {
                let ids = Tensor::from_vec(chunk.to_vec(), chunk.len(), self.device)?;
                let h = hidden.index_select(&ids, 0)?.flatten_to(1)?;
                let target = Target::new(&h, &float_w)?;
                let mut gw = vec![0f32; layer.layout.n_weights()];
                let mut gs = vec![0f32; layer.layout.n_scales()];
                for (bi, &b) in cfg.bits.iter().enumerate() {
                    if cfg.bit_weight(bi) == 0.0 {
                        continue;
                    }
                    let kl = target.kl(&h.matmul(&layer.fake_quantized(b, spec.tie)?.t()?)?)?;
                    let loss = (kl * (cfg.bit_weight(bi) / kl_before[&b].max(f64::MIN_POSITIVE)))?;
                    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    ensure!(value.is_finite(), "lm_head stage: the loss at {b} bits is {value}");
                    let grads = loss.backward()?;
                    let get = |t: &Tensor| gradient(&grads, t);
                    add(&mut gw, &get(layer.w.as_tensor())?, 1.0);
                    add(&mut gs, &get(layer.s.as_tensor())?, cfg.alrs.scale_lr(1.0, b, &[]) as f32);
                }
                let mult = crate::train::optim::schedule(step as u64, 0, total as u64, 0.0);
                layer.update(&gw, &gs, cfg, mult, &adam)?;
                step += 1;
                progress(Stage::Head, step);
            }
        }
        let mut params = BTreeMap::new();
        layer.params(&mut params);
        drop(layer);
        export_params(self.float, cfg, spec, &params, quantized, &mut unused)?;
        let kl_after = self.kl_served(&hidden, &float_w, &quantized[self.name])?;
        let report =
            HeadReport { weight: self.name.to_string(), kl_before, kl_after, seconds: started.elapsed().as_secs_f64() };
        save_stage(&saved, &report_file, &params, &report)?;
        tracing::info!(
            "lm_head ({}): KL to the float model {}",
            self.name,
            report
                .kl_before
                .iter()
                .map(|(b, before)| format!("W{b} {before:.4} → {:.4}", report.kl_after[b]))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(report)
    }

    /// KL(float ‖ `q` served at each bit-width) over every position of `hidden`.
    fn kl_served(&self, hidden: &Tensor, float_w: &Tensor, q: &QuantizedWeight) -> Result<BTreeMap<u32, f64>> {
        let served = self
            .cfg
            .bits
            .iter()
            .map(|&b| {
                let values = q.dequantize(b, self.spec.tie).map_err(|e| anyhow::anyhow!("`{}`: {e}", self.name))?;
                Ok(Tensor::from_vec(values, (q.layout.rows, q.layout.cols), self.device)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let n = hidden.dim(0)?;
        let mut totals = vec![0f64; served.len()];
        let batch = self.cfg.head_batch();
        for i in (0..n).step_by(batch) {
            let k = batch.min(n - i);
            let h = hidden.narrow(0, i, k)?.flatten_to(1)?;
            // The float distribution once per batch, for every bit-width.
            let target = Target::new(&h, float_w)?;
            for (total, w) in totals.iter_mut().zip(&served) {
                let kl = target.kl(&h.matmul(&w.t()?)?)?;
                *total += kl.to_dtype(DType::F64)?.to_scalar::<f64>()? * k as f64;
            }
        }
        Ok(self.cfg.bits.iter().copied().zip(totals.into_iter().map(|t| t / n as f64)).collect())
    }
}

/// The float model's next-token distribution at some positions (`[positions, vocab]`).
struct Target {
    log_p: Tensor,
    p: Tensor,
}

impl Target {
    /// From the lm_head inputs `h` (`[positions, hidden]`) and the float head weight.
    fn new(h: &Tensor, float_w: &Tensor) -> Result<Self> {
        let log_p = candle_nn::ops::log_softmax(&h.matmul(&float_w.t()?)?, candle_core::D::Minus1)?.detach();
        Ok(Self { p: log_p.exp()?, log_p })
    }

    /// Mean over the positions of KL(p ‖ softmax(`logits`)), differentiable in `logits`.
    fn kl(&self, logits: &Tensor) -> Result<Tensor> {
        let log_q = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?;
        Ok((&self.p * (&self.log_p - log_q)?)?.sum(1)?.mean_all()?)
    }
}

/// Trained tensors as the checkpoint stores them: codes re-derived from each trained latent
/// weight (`NAME` in `params`) and its scales (`NAME.scales`), exactly as the fake quantizer
/// served them, 8-bit codes refitted if the recipe asks, into `quantized`; trained norms and
/// biases into `trained`.
fn export_params(
    float: &FloatModel,
    cfg: &BlockwiseConfig,
    spec: &QuantSpec,
    params: &BTreeMap<String, Tensor>,
    quantized: &mut BTreeMap<String, QuantizedWeight>,
    trained: &mut BTreeMap<String, Tensor>,
) -> Result<()> {
    for (name, t) in params {
        if name.ends_with(SCALES) {
            continue;
        }
        let Some(q) = quantized.get(name) else {
            trained.insert(name.clone(), t.clone());
            continue;
        };
        let scales: Vec<f32> = params
            .get(&format!("{name}{SCALES}"))
            .with_context(|| format!("no saved scales for `{name}`"))?
            .flatten_all()?
            .to_vec1()?;
        ensure!(scales.len() == q.layout.n_scales(), "saved `{name}` has {} scales", scales.len());
        let mut exported = export_weight(&t.flatten_all()?.to_vec1()?, &scales, q.layout);
        if cfg.refit_8bit {
            let w: Vec<f32> = float.weights.get(name, &[q.layout.rows, q.layout.cols])?.flatten_all()?.to_vec1()?;
            refit_stored_codes(&mut exported, &w, &spec.bits, spec.tie);
        }
        quantized.insert(name.clone(), exported);
    }
    Ok(())
}

/// The weights for running block `block` as the checkpoint serves it at `bits`: its exported
/// quantized weights and its trained norms and biases (the float model elsewhere).
fn served_block(
    float: &FloatModel,
    trained: &BTreeMap<String, Tensor>,
    quantized: &BTreeMap<String, QuantizedWeight>,
    block: usize,
    bits: u32,
    tie: TieRule,
    device: &Device,
) -> Result<Weights> {
    let prefix = format!("model.layers.{block}.");
    let mut weights = float.weights.clone();
    for (name, t) in trained.iter().filter(|(n, _)| n.starts_with(&prefix)) {
        weights.insert(name.clone(), t.clone())?;
    }
    with_served(&weights, quantized, bits, tie, device, |n| n.starts_with(&prefix))
}

/// `f` over `input` in chunks of `batch` along the first dimension, concatenated.
fn batched(batch: usize, input: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let n = input.dim(0)?;
    let parts = (0..n).step_by(batch).map(|i| f(&input.narrow(0, i, batch.min(n - i))?)).collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// Suffix of a weight's scales in a saved block.
const SCALES: &str = ".scales";

fn block_path(run_dir: &Path, block: usize) -> PathBuf {
    run_dir.join(format!("block-{block:03}.safetensors"))
}

fn report_path(run_dir: &Path, block: usize) -> PathBuf {
    run_dir.join(format!("block-{block:03}.json"))
}

/// Saves a trained stage (latent tensors and scales) and its report, each atomically; the
/// report last, so a stage counts as done only when both are complete.
fn save_stage(
    tensors: &Path,
    report_file: &Path,
    params: &BTreeMap<String, Tensor>,
    report: &impl Serialize,
) -> Result<()> {
    let map = params
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?)))
        .collect::<Result<HashMap<String, Tensor>>>()?;
    model::checkpoint::write_through_tmp(tensors, |tmp| {
        candle_core::safetensors::save(&map, tmp).with_context(|| format!("cannot write {}", tmp.display()))
    })?;
    let json = serde_json::to_string_pretty(report)?;
    model::checkpoint::write_through_tmp(report_file, |tmp| {
        std::fs::write(tmp, &json).with_context(|| format!("cannot write {}", tmp.display()))
    })
}

/// A saved stage's report.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{} is missing beside its saved tensors: remove them to retrain", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a stage report", path.display()))
}

/// `weights` with every quantized weight whose name passes `which` replaced by its value served
/// at `bits` (plain tensors, no gradient).
fn with_served(
    weights: &Weights,
    quantized: &BTreeMap<String, QuantizedWeight>,
    bits: u32,
    tie: TieRule,
    device: &Device,
    which: impl Fn(&str) -> bool,
) -> Result<Weights> {
    let mut out = weights.clone();
    for (name, q) in quantized.iter().filter(|(n, _)| which(n)) {
        let values = q.dequantize(bits, tie).map_err(|e| anyhow::anyhow!("`{name}`: {e}"))?;
        out.insert(name.clone(), Tensor::from_vec(values, (q.layout.rows, q.layout.cols), device)?)?;
    }
    Ok(out)
}

/// Training of one block.
struct BlockTrainer<'a> {
    float: &'a FloatModel,
    cfg: &'a BlockwiseConfig,
    tie: TieRule,
    block: usize,
    layers: Vec<Layer>,
    floats: Vec<Float>,
    /// Mini-batches done.
    step: usize,
}

impl<'a> BlockTrainer<'a> {
    fn new(
        float: &'a FloatModel,
        cfg: &'a BlockwiseConfig,
        spec: &QuantSpec,
        block: usize,
        quantized: &BTreeMap<String, QuantizedWeight>,
        targets: &[(String, usize, usize)],
        device: &Device,
    ) -> Result<Self> {
        let prefix = format!("model.layers.{block}.");
        let layers = targets
            .iter()
            .filter(|(n, _, _)| n.starts_with(&prefix))
            .map(|(name, _, _)| Layer::new(float, name, &quantized[name], device))
            .collect::<Result<Vec<_>>>()?;
        ensure!(
            layers.len() <= BLOCK_LINEARS.len(),
            "block {block}: {} quantized layers, a block has {}",
            layers.len(),
            BLOCK_LINEARS.len()
        );
        let mut floats = Vec::new();
        if cfg.norm_lr > 0.0 {
            for (name, t) in float.weights.iter().filter(|(n, t)| n.starts_with(&prefix) && t.rank() == 1) {
                floats.push(Float {
                    name: name.clone(),
                    t: Var::from_tensor(t)?,
                    adam: AdamState::new(t.elem_count()),
                });
            }
        }
        Ok(Self { float, cfg, tie: spec.tie, block, layers, floats, step: 0 })
    }

    /// The block's output at `bits` for inputs `x`: recorded for backpropagation (`train`), or
    /// plain values on the fused inference ops.
    fn forward(&self, bits: u32, x: &Tensor, train: bool) -> Result<Tensor> {
        let value = |v: &Var| if train { v.as_tensor().clone() } else { v.as_tensor().detach() };
        let mut weights = self.float.weights.clone();
        for l in &self.layers {
            weights
                .insert(l.name.clone(), FakeQuant::new(bits, self.tie, l.layout)?.apply(&value(&l.w), &value(&l.s))?)?;
        }
        for f in &self.floats {
            weights.insert(f.name.clone(), value(&f.t))?;
        }
        let mode = if train { OpsMode::Differentiable } else { OpsMode::Inference };
        Transformer::new(&self.float.config, &weights, mode)?.block_forward(self.block, x)
    }

    /// The output error at every bit-width over all calibration sequences (mean over batches).
    fn mse_all(&self, inputs: &Inputs<'_>, target: &Tensor) -> Result<BTreeMap<u32, f64>> {
        let mut out = BTreeMap::new();
        for &b in &self.cfg.bits {
            let x = inputs.at(b);
            let n = x.dim(0)?;
            let mut total = 0f64;
            for i in (0..n).step_by(self.cfg.batch) {
                let k = self.cfg.batch.min(n - i);
                let y = self.forward(b, &x.narrow(0, i, k)?, false)?;
                let err = self.cfg.loss.of(&y, &target.narrow(0, i, k)?)?;
                total += err.to_dtype(DType::F64)?.to_scalar::<f64>()? * k as f64;
            }
            out.insert(b, total / n as f64);
        }
        Ok(out)
    }

    /// `epochs` passes over the calibration sequences in seeded shuffled mini-batches: per
    /// mini-batch, each precision's normalised MSE is backpropagated, the gradients are summed
    /// (scale gradients weighted by ALRS) and one Adam step with cosine-decayed relative learning
    /// rates follows.
    fn train(
        &mut self,
        inputs: &Inputs<'_>,
        target: &Tensor,
        mse0: &BTreeMap<u32, f64>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<()> {
        let cfg = self.cfg;
        let n = target.dim(0)?;
        let total = cfg.steps_per_block();
        let adam = AdamParams::default();
        for epoch in 0..cfg.epochs {
            let order = permutation(n, cfg.seed ^ ((self.block as u64) << 32), epoch as u64);
            for chunk in order.chunks(cfg.batch) {
                let ids = Tensor::from_vec(chunk.to_vec(), chunk.len(), target.device())?;
                let y = target.index_select(&ids, 0)?;
                let mut gw: Vec<Vec<f32>> = self.layers.iter().map(|l| vec![0.0; l.layout.n_weights()]).collect();
                let mut gs: Vec<Vec<f32>> = self.layers.iter().map(|l| vec![0.0; l.layout.n_scales()]).collect();
                let mut gf: Vec<Vec<f32>> = self.floats.iter().map(|f| vec![0.0; f.t.elem_count()]).collect();
                for (bi, &b) in cfg.bits.iter().enumerate() {
                    if cfg.bit_weight(bi) == 0.0 {
                        // Not trained for (e.g. 8 bits, refitted afterwards): nothing to compute.
                        continue;
                    }
                    let x = inputs.at(b).index_select(&ids, 0)?;
                    let out = self.forward(b, &x, true)?;
                    let mse = cfg.loss.of(&out, &y)?;
                    let weight = cfg.bit_weight(bi) / mse0[&b].max(f64::MIN_POSITIVE);
                    let loss = (mse * weight)?;
                    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    ensure!(value.is_finite(), "block {}: the loss at {b} bits is {value}", self.block);
                    let grads = loss.backward()?;
                    let get = |t: &Tensor| gradient(&grads, t);
                    let scale_weight = cfg.alrs.scale_lr(1.0, b, &[]) as f32;
                    for (l, (gw, gs)) in self.layers.iter().zip(gw.iter_mut().zip(gs.iter_mut())) {
                        add(gw, &get(l.w.as_tensor())?, 1.0);
                        add(gs, &get(l.s.as_tensor())?, scale_weight);
                    }
                    for (f, g) in self.floats.iter().zip(gf.iter_mut()) {
                        add(g, &get(f.t.as_tensor())?, 1.0);
                    }
                }
                let mult = crate::train::optim::schedule(self.step as u64, 0, total as u64, 0.0);
                for (l, (gw, gs)) in self.layers.iter_mut().zip(gw.iter().zip(&gs)) {
                    l.update(gw, gs, cfg, mult, &adam)?;
                }
                for (f, g) in self.floats.iter_mut().zip(&gf) {
                    let mut v: Vec<f32> = f.t.as_tensor().flatten_all()?.to_vec1()?;
                    let ones = vec![1f32; v.len()];
                    f.adam.step_scaled(&mut v, g, cfg.norm_lr * mult, &ones, &adam);
                    f.t.set(&Tensor::from_vec(v, f.t.shape(), f.t.device())?)?;
                }
                self.step += 1;
                progress(self.step);
            }
        }
        Ok(())
    }

    /// The trained tensors: latent weights (`NAME`), scales (`NAME.scales`), norms and biases.
    fn params(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for l in &self.layers {
            l.params(&mut out);
        }
        for f in &self.floats {
            out.insert(f.name.clone(), f.t.as_tensor().detach());
        }
        Ok(out)
    }
}

/// The gradient of `t` as a flat vector (zeros where the loss does not depend on it).
fn gradient(grads: &candle_core::backprop::GradStore, t: &Tensor) -> Result<Vec<f32>> {
    Ok(match grads.get(t) {
        Some(g) => g.flatten_all()?.to_vec1()?,
        None => vec![0.0; t.elem_count()],
    })
}

fn add(acc: &mut [f32], g: &[f32], weight: f32) {
    acc.iter_mut().zip(g).for_each(|(a, &x)| *a += weight * x);
}

/// Moves every code of `q` to the one nearest `w / s` (the float weight) among the codes whose
/// second rounding at each bit-width of `bits` below 8 is the level `q` has there now: those
/// precisions serve exactly what they did, and the stored 8-bit codes get as close to the float
/// weights as that allows.
pub fn refit_stored_codes(q: &mut QuantizedWeight, w: &[f32], bits: &[u32], tie: TieRule) {
    let lower: Vec<LevelCodes> =
        bits.iter().filter(|&&b| b < kernels::STORED_BITS).map(|&b| LevelCodes::new(b, tie)).collect();
    let (cols, ng) = (q.layout.cols, q.layout.n_groups());
    for (i, code) in q.codes.iter_mut().enumerate() {
        let s = q.scales[(i / cols) * ng + (i % cols) / q.layout.group];
        let (lo, hi) = kernels::codes_keeping(*code, &lower);
        *code = kernels::first_round(w[i] / s).clamp(lo, hi);
    }
}

/// The reconstructed model as a checkpoint stores it (`quantized` holds every block's exported
/// weights, the embedding's PTQ), trained norms and biases, and every weight's error against the
/// float model.
fn export(
    float: &FloatModel,
    cfg: &BlockwiseConfig,
    spec: &QuantSpec,
    targets: &[(String, usize, usize)],
    quantized: BTreeMap<String, QuantizedWeight>,
    trained: &BTreeMap<String, Tensor>,
) -> Result<QuantizedModel> {
    let mut report = Vec::with_capacity(targets.len());
    for (name, rows, cols) in targets {
        let w: Vec<f32> = float.weights.get(name, &[*rows, *cols])?.flatten_all()?.to_vec1()?;
        let q = &quantized[name];
        let relative_error = spec
            .bits
            .iter()
            .map(|&b| Ok((b, reconstruction_error(&w, q, b, spec.tie)?)))
            .collect::<Result<Vec<_>, crate::PtqError>>()?;
        report.push(LayerReport { name: name.clone(), rows: *rows, cols: *cols, relative_error, output_error: None });
    }
    let float_tensors = float
        .weights
        .iter()
        .filter(|(name, _)| !quantized.contains_key(*name))
        .map(|(name, t)| Ok((name.clone(), trained.get(name).unwrap_or(t).to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let scale_method = format!(
        "{}+blockwise:samples={}x{}:epochs={}:inputs={}:loss={}:alrs={}",
        spec.scale_method(),
        cfg.samples,
        cfg.seq_len,
        cfg.epochs,
        cfg.inputs,
        cfg.loss,
        cfg.alrs.name()
    );
    let quantization = quantization_meta(spec, scale_method, quantized.keys().cloned().collect())?;
    Ok(QuantizedModel { quantization, quantized, float: float_tensors, report })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_recipe_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/blockwise");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let cfg = BlockwiseConfig::load(&path).unwrap();
            cfg.validate().unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            n += 1;
        }
        assert!(n >= 2, "expected the shipped recipes in {}", dir.display());
    }

    /// The lm_head stage takes its own mini-batches when the recipe says so, the blocks' otherwise,
    /// and a recipe naming it keeps it through a save and load.
    #[test]
    fn head_batch_sets_the_head_steps_only() {
        let mut cfg = BlockwiseConfig { samples: 128, batch: 1, epochs: 1, head_epochs: 2, ..Default::default() };
        assert_eq!((cfg.steps_per_block(), cfg.head_steps()), (128, 256));
        cfg.head_batch = Some(4);
        assert_eq!((cfg.steps_per_block(), cfg.head_steps()), (128, 64));
        cfg.validate().unwrap();
        let text = toml::to_string(&cfg).unwrap();
        assert!(text.contains("head_batch = 4"), "{text}");
        assert_eq!(toml::from_str::<BlockwiseConfig>(&text).unwrap(), cfg);
        assert!(!toml::to_string(&BlockwiseConfig::default()).unwrap().contains("head_batch"));
        for bad in [0, 129] {
            cfg.head_batch = Some(bad);
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("head_batch"), "{bad}: {err}");
        }
    }

    /// The refit keeps every lower precision's served values bit for bit and brings each 8-bit
    /// code at least as close to the float weight (here: on random codes far from the weights).
    #[test]
    fn refit_keeps_lower_levels_and_improves_8_bits() {
        let layout = ScaleLayout::new(3, 40, 16).unwrap();
        let mut state = 3u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let w: Vec<f32> = (0..layout.n_weights()).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
        let scales: Vec<f32> = (0..layout.n_scales()).map(|i| if i % 2 == 0 { 0.01 } else { -0.008 }).collect();
        for tie in [TieRule::HalfEven, TieRule::HalfUp] {
            let codes: Vec<i8> = (0..layout.n_weights()).map(|_| next() as u8 as i8).collect();
            let before = QuantizedWeight::new(codes, scales.clone(), layout);
            let mut after = before.clone();
            refit_stored_codes(&mut after, &w, &[8, 4, 2], tie);
            for b in [4, 2] {
                assert_eq!(after.dequantize(b, tie).unwrap(), before.dequantize(b, tie).unwrap(), "{tie} {b} bits");
            }
            let err = |q: &QuantizedWeight| -> Vec<f32> {
                q.dequantize(8, tie).unwrap().iter().zip(&w).map(|(a, b)| (a - b).abs()).collect()
            };
            let (e0, e1) = (err(&before), err(&after));
            assert!(e0.iter().zip(&e1).all(|(a, b)| b <= a), "{tie}: a code moved away from its weight");
            // Each refitted code is the best among all codes with the same 4- and 2-bit levels.
            let levels = |c: i8| (kernels::second_round(c, 4, tie), kernels::second_round(c, 2, tie));
            for (i, (&c, &x)) in after.codes.iter().zip(&w).enumerate() {
                let s = scales[(i / 40) * 3 + (i % 40) / 16];
                let best = (i8::MIN..=i8::MAX)
                    .filter(|&k| levels(k) == levels(c))
                    .map(|k| (f32::from(k) * s - x).abs())
                    .fold(f32::INFINITY, f32::min);
                assert!((f32::from(c) * s - x).abs() <= best * (1.0 + 1e-6) + 1e-9, "{tie}: weight {i}");
            }
        }
    }
}
