//! The joint W8/W4/W2 fine-tuning loop (METHOD.md §2) on the one [`model::Transformer`]: every
//! quantized weight is replaced by its fake-quantized form ([`FakeQuant`]) at the step's
//! bit-width and the transformer is built in [`OpsMode::Differentiable`] over those tensors.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use kernels::{ScaleLayout, TieRule};
use model::checkpoint::Checkpoint;
use model::{FloatModel, KvCache, OpsMode, Transformer, Weights};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model_ptq::{quantizable, quantization_meta, QuantizedModel};
use crate::ptq::{quantize_weight, reconstruction_error};
use crate::report::LayerReport;
use crate::train::config::{LoopMode, ScaleMoments, Teacher, TrainConfig};
use crate::train::data::TokenBlocks;
use crate::train::fakequant::{export_weight, FakeQuant};
use crate::train::optim::{clip_factor, schedule, AdamState};

/// A tensor the trainer holds: a candle variable when it trains (so backward reaches it).
#[derive(Debug, Clone)]
struct Param {
    tensor: Tensor,
    trainable: bool,
}

impl Param {
    fn new(t: Tensor, trainable: bool) -> Result<Self> {
        let tensor = if trainable { Var::from_tensor(&t)?.into_inner() } else { t };
        Ok(Self { tensor, trainable })
    }

    fn values(&self) -> Result<Vec<f32>> {
        Ok(self.tensor.flatten_all()?.to_vec1()?)
    }

    fn set(&mut self, values: Vec<f32>) -> Result<()> {
        let (shape, device) = (self.tensor.shape().clone(), self.tensor.device().clone());
        self.tensor = if self.trainable {
            Var::from_vec(values, shape, &device)?.into_inner()
        } else {
            Tensor::from_vec(values, shape, &device)?
        };
        Ok(())
    }
}

/// A quantized weight: latent float weight and latent scales.
#[derive(Debug, Clone)]
struct QLayer {
    name: String,
    layout: ScaleLayout,
    w: Param,
    s: Param,
}

/// What one call of [`Trainer::step`] did.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Steps done after this one (1 for the first).
    pub step: u64,
    /// Learning rate of weights, norms and biases at this step.
    pub lr: f64,
    /// Scale learning rate used for each bit-width (ALRS).
    pub scale_lr: BTreeMap<u32, f64>,
    /// The optimized loss per bit-width (CE, or the KD mix).
    pub loss: BTreeMap<u32, f64>,
    /// Next-token cross-entropy per bit-width.
    pub ce: BTreeMap<u32, f64>,
    /// ALRS gradient term G_b per bit-width (mean over layers of min(max|clip(∇s,1)|, 1)).
    pub alrs_g: BTreeMap<u32, f64>,
    /// L2 norm of the scale gradients per bit-width, before clipping.
    pub scale_grad_norm: BTreeMap<u32, f64>,
    /// L2 norm of the weight/norm gradients per bit-width, before clipping (0 when none train).
    pub weight_grad_norm: BTreeMap<u32, f64>,
    /// Tokens of this mini-batch (each seen once per bit-width).
    pub tokens: usize,
    /// Per bit-width, the layers bit-switching ran at another bit-width (absent when none).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub switched: BTreeMap<u32, usize>,
}

/// Held-out next-token cross-entropy (nats per token) at each bit-width.
pub type EvalReport = BTreeMap<u32, f64>;

/// The state of a training run: latent weights and scales, optimizer moments, step.
pub struct Trainer {
    cfg: TrainConfig,
    float: FloatModel,
    tie: TieRule,
    layers: Vec<QLayer>,
    /// Norms, biases and float-kept matrices, by name.
    floats: BTreeMap<String, Param>,
    /// Moments of every trainable weight, norm and bias, by tensor name.
    adam: BTreeMap<String, AdamState>,
    /// Moments of the scales, by layer name: one map, or one per bit-width (`scale_moments`).
    adam_scales: Vec<BTreeMap<String, AdamState>>,
    step: u64,
    /// How the initial codes and scales were made, when not by the recipe's PTQ search (the
    /// `scale_method` of the checkpoint a run started from).
    origin: Option<String>,
    teacher: Option<Transformer>,
    /// Where the model's tensors and the mini-batches live (the optimizer runs on the host).
    device: Device,
    /// Per layer, whether bit-switching treats it as sensitive (empty without switching).
    sensitive: Vec<bool>,
}

/// The tensor of the training state file that holds its metadata (JSON bytes).
const STATE_META: &str = "drq_train_meta";
const STATE_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct StateMeta {
    version: u32,
    step: u64,
    config: TrainConfig,
    data_fingerprint: u64,
    source_sha256: String,
    adam_t: BTreeMap<String, u64>,
    #[serde(default)]
    origin: Option<String>,
}

impl Trainer {
    /// A run starting from `float`, on `device`: initial scales by the PTQ search of the recipe.
    pub fn new(float: FloatModel, cfg: TrainConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let spec = cfg.quant_spec()?;
        let mut scales = BTreeMap::new();
        for (name, rows, cols) in quantizable(&float.config, &cfg.keep_float) {
            let w: Vec<f32> = float.weights.get(&name, &[rows, cols])?.flatten_all()?.to_vec1()?;
            let q = quantize_weight(&w, rows, cols, &spec.for_weight(&name)?)
                .with_context(|| format!("initial scales of `{name}`"))?;
            scales.insert(name, Tensor::from_vec(q.scales, (rows, q.layout.n_groups()), &Device::Cpu)?);
        }
        Self::build(float, cfg, scales, BTreeMap::new(), 0, device)
    }

    /// A run starting from a checkpoint of `float` (a block-wise reconstruction, say): its
    /// scales, its 8-bit codes dequantized as the latent weights (so every precision starts
    /// exactly where the checkpoint serves it) and its float tensors (norms, biases). The float
    /// model stays the teacher. The checkpoint's layout and tie rule must be the recipe's, and
    /// it may not carry corrections (training does not model them).
    pub fn from_checkpoint(float: FloatModel, cfg: TrainConfig, ckpt: &Checkpoint, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let spec = cfg.quant_spec()?;
        let q = ckpt.quantization();
        let path = ckpt.path().display();
        ensure!(ckpt.config() == &float.config, "{path} is a checkpoint of another model architecture");
        let targets = quantizable(&float.config, &cfg.keep_float);
        let mut names: Vec<String> = targets.iter().map(|(name, ..)| name.clone()).collect();
        names.sort();
        ensure!(
            q.granularity == spec.granularity.to_string()
                && q.granularity_overrides == spec.stored_overrides(&names)?
                && q.tie()? == spec.tie,
            "{path} has granularity {} and tie rule {}, the recipe {spec}",
            q.granularity_summary(),
            q.tie_rule,
        );
        ensure!(
            q.corrected_bits.is_empty(),
            "{path} carries corrections at bits {:?}, which training does not model: start from the \
             checkpoint without them and fit them afterwards",
            q.corrected_bits
        );
        ensure!(
            names.iter().eq(q.quantized.iter()),
            "{path} quantizes other weights than the recipe (keep_float {:?})",
            cfg.keep_float
        );
        let (mut scales, mut trained) = (BTreeMap::new(), BTreeMap::new());
        for (name, rows, cols) in &targets {
            let w = ckpt.quantized(name)?;
            let latent = w.dequantize(kernels::STORED_BITS, spec.tie).map_err(|e| anyhow::anyhow!("`{name}`: {e}"))?;
            trained.insert(name.clone(), Tensor::from_vec(latent, (*rows, *cols), &Device::Cpu)?);
            scales.insert(name.clone(), Tensor::from_vec(w.scales, (*rows, w.layout.n_groups()), &Device::Cpu)?);
        }
        for (name, _) in float.weights.iter() {
            if !ckpt.is_quantized(name) {
                trained.insert(name.clone(), ckpt.float_tensor(name)?);
            }
        }
        let mut trainer = Self::build(float, cfg, scales, trained, 0, device)?;
        trainer.origin = Some(q.scale_method.clone());
        Ok(trainer)
    }

    fn build(
        mut float: FloatModel,
        cfg: TrainConfig,
        scales: BTreeMap<String, Tensor>,
        trained: BTreeMap<String, Tensor>,
        step: u64,
        device: &Device,
    ) -> Result<Self> {
        let spec = cfg.quant_spec()?;
        // Everything the model reads goes to `device` once, here.
        float.weights = float.weights.to_device(device)?;
        let on_device = |map: BTreeMap<String, Tensor>| -> Result<BTreeMap<String, Tensor>> {
            map.into_iter().map(|(name, t)| Ok((name, t.to_device(device)?))).collect()
        };
        let (mut scales, mut trained) = (on_device(scales)?, on_device(trained)?);
        let targets = quantizable(&float.config, &cfg.keep_float);
        let mut layers = Vec::with_capacity(targets.len());
        for (name, rows, cols) in &targets {
            let layout =
                spec.granularity_of(name)?.layout(*rows, *cols).map_err(|e| anyhow::anyhow!("`{name}`: {e}"))?;
            let w = match trained.remove(name) {
                Some(t) => t,
                None => float.weights.get(name, &[*rows, *cols])?,
            };
            let s = scales.remove(name).with_context(|| format!("no scales for `{name}`"))?;
            ensure!(s.dims() == [*rows, layout.n_groups()], "scales of `{name}` have shape {:?}", s.dims());
            layers.push(QLayer {
                name: name.clone(),
                layout,
                w: Param::new(w, cfg.train.weights())?,
                s: Param::new(s, true)?,
            });
        }
        layers.sort_by(|a, b| a.name.cmp(&b.name));
        let mut floats = BTreeMap::new();
        for (name, t) in float.weights.iter() {
            if layers.binary_search_by(|l| l.name.as_str().cmp(name)).is_ok() {
                continue;
            }
            let is_norm_or_bias = t.rank() == 1;
            let t = trained.remove(name).unwrap_or_else(|| t.clone());
            floats.insert(name.clone(), Param::new(t, is_norm_or_bias && cfg.train.norms())?);
        }
        ensure!(
            trained.is_empty(),
            "the training state holds unknown tensors: {:?}",
            trained.keys().collect::<Vec<_>>()
        );
        let mut adam = BTreeMap::new();
        for l in &layers {
            if l.w.trainable {
                adam.insert(l.name.clone(), AdamState::new(l.layout.n_weights()));
            }
        }
        for (name, p) in &floats {
            if p.trainable {
                adam.insert(name.clone(), AdamState::new(p.tensor.elem_count()));
            }
        }
        let sets = match cfg.scale_moments {
            ScaleMoments::Shared => 1,
            ScaleMoments::PerPrecision => cfg.bits.len(),
        };
        let adam_scales = (0..sets)
            .map(|_| layers.iter().map(|l| (l.name.clone(), AdamState::new(l.layout.n_scales()))).collect())
            .collect();
        let sensitive = if cfg.bit_switching.sigma > 0.0 {
            sensitive_layers(&cfg.bit_switching.traces, &layers)?
        } else {
            Vec::new()
        };
        let teacher = if cfg.kd.weight > 0.0 && cfg.kd.teacher == Teacher::Float {
            Some(Transformer::new(&float.config, &float.weights, OpsMode::Inference)?)
        } else {
            None
        };
        Ok(Self {
            tie: spec.tie,
            cfg,
            float,
            layers,
            floats,
            adam,
            adam_scales,
            step,
            origin: None,
            teacher,
            device: device.clone(),
            sensitive,
        })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    pub fn float_model(&self) -> &FloatModel {
        &self.float
    }

    /// Steps done.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Number of quantized layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Latent scales of a quantized weight.
    pub fn scales(&self, name: &str) -> Result<Vec<f32>> {
        self.layer(name)?.s.values()
    }

    /// Latent float weight of a quantized weight.
    pub fn latent_weight(&self, name: &str) -> Result<Vec<f32>> {
        self.layer(name)?.w.values()
    }

    /// A float tensor (norm, bias, float-kept matrix).
    pub fn float_tensor(&self, name: &str) -> Result<Vec<f32>> {
        self.floats.get(name).with_context(|| format!("no float tensor `{name}`"))?.values()
    }

    /// The quantized layers' names, in the order of [`Trainer::layer_bits`].
    pub fn layer_names(&self) -> Vec<&str> {
        self.layers.iter().map(|l| l.name.as_str()).collect()
    }

    fn layer(&self, name: &str) -> Result<&QLayer> {
        self.layers.iter().find(|l| l.name == name).with_context(|| format!("`{name}` is not a quantized layer"))
    }

    /// The model's weights at `bits`: every quantized weight fake-quantized (recorded for
    /// backpropagation when `graph`; plain values otherwise).
    pub fn weights_at(&self, bits: u32, graph: bool) -> Result<Weights> {
        self.weights_with(&vec![bits; self.layers.len()], graph)
    }

    /// The model's weights with each quantized layer at its own bit-width (in name order).
    fn weights_with(&self, bits: &[u32], graph: bool) -> Result<Weights> {
        let mut weights = Weights::new();
        for (l, &bits) in self.layers.iter().zip(bits) {
            let fq = FakeQuant::new(bits, self.tie, l.layout)?;
            let t = if graph {
                fq.apply(&l.w.tensor, &l.s.tensor)?
            } else {
                fq.apply(&l.w.tensor.detach(), &l.s.tensor.detach())?
            };
            weights.insert(l.name.clone(), t)?;
        }
        for (name, p) in &self.floats {
            weights.insert(name.clone(), if graph { p.tensor.clone() } else { p.tensor.detach() })?;
        }
        Ok(weights)
    }

    /// Logits `[batch·seq, vocab]` of `inputs` (`[batch, seq]`).
    fn logits(&self, weights: &Weights, mode: OpsMode, inputs: &Tensor) -> Result<Tensor> {
        let t = Transformer::new(&self.float.config, weights, mode)?;
        let (b, s) = inputs.dims2()?;
        let logits = t.forward(inputs, &mut KvCache::new(&self.float.config), 0)?;
        Ok(logits.reshape((b * s, self.float.config.vocab_size))?)
    }

    /// The teacher's logits of a mini-batch, when distilling.
    fn teacher_logits(&self, inputs: &Tensor) -> Result<Option<Tensor>> {
        if self.cfg.kd.weight == 0.0 {
            return Ok(None);
        }
        let (b, s) = inputs.dims2()?;
        let logits = match self.cfg.kd.teacher {
            Teacher::Float => {
                let t = self.teacher.as_ref().expect("built with KD");
                t.forward(inputs, &mut KvCache::new(&self.float.config), 0)?
                    .reshape((b * s, self.float.config.vocab_size))?
            }
            Teacher::W8 => self.logits(&self.weights_at(8, false)?, OpsMode::Inference, inputs)?,
        };
        Ok(Some(logits.detach()))
    }

    /// (objective, cross-entropy) of `logits` against `targets`, with distillation when set.
    fn loss(&self, logits: &Tensor, targets: &Tensor, teacher: Option<&Tensor>) -> Result<(Tensor, f64)> {
        let ce = candle_nn::loss::cross_entropy(logits, targets)?;
        let ce_value = ce.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let Some(teacher) = teacher else { return Ok((ce, ce_value)) };
        let kd = self.cfg.kd;
        let t = kd.temperature;
        let log_p_s = candle_nn::ops::log_softmax(&(logits / t)?, D::Minus1)?;
        let log_p_t = candle_nn::ops::log_softmax(&(teacher / t)?, D::Minus1)?;
        let p_t = log_p_t.exp()?;
        let n = logits.dim(0)? as f64;
        let kl = ((p_t * (log_p_t - log_p_s)?)?.sum_all()? / n)?;
        let total = ((ce * (1.0 - kd.weight))? + (kl * (kd.weight * t * t))?)?;
        Ok((total, ce_value))
    }

    /// Inputs `[batch, seq]` and flat targets of a list of blocks.
    fn batch_tensors(&self, blocks: &[&[u32]]) -> Result<(Tensor, Tensor)> {
        let seq = blocks[0].len() - 1;
        let inputs: Vec<u32> = blocks.iter().flat_map(|b| b[..seq].iter().copied()).collect();
        let targets: Vec<u32> = blocks.iter().flat_map(|b| b[1..].iter().copied()).collect();
        Ok((
            Tensor::from_vec(inputs, (blocks.len(), seq), &self.device)?,
            Tensor::from_vec(targets, blocks.len() * seq, &self.device)?,
        ))
    }

    /// Learning-rate multiplier of the current step.
    pub fn lr_multiplier(&self) -> f64 {
        schedule(self.step, self.cfg.warmup_steps, self.cfg.steps, self.cfg.min_lr_ratio)
    }

    /// One mini-batch: per bit-width forward, backward and step (or one summed step).
    pub fn step(&mut self, data: &TokenBlocks) -> Result<StepReport> {
        ensure!(
            data.seq_len == self.cfg.seq_len,
            "data blocks of {} tokens for a recipe of seq_len {}",
            data.seq_len,
            self.cfg.seq_len
        );
        let blocks = data.batch(self.cfg.seed, self.step, self.cfg.batch);
        let (inputs, targets) = self.batch_tensors(&blocks)?;
        let teacher = self.teacher_logits(&inputs)?;
        let mult = self.lr_multiplier();
        let lr = self.cfg.lr * mult;
        let base_scale_lr = self.cfg.scale_lr * mult;
        let mut report = StepReport {
            step: self.step + 1,
            lr,
            scale_lr: BTreeMap::new(),
            loss: BTreeMap::new(),
            ce: BTreeMap::new(),
            alrs_g: BTreeMap::new(),
            scale_grad_norm: BTreeMap::new(),
            weight_grad_norm: BTreeMap::new(),
            tokens: inputs.elem_count(),
            switched: BTreeMap::new(),
        };
        let bits = self.cfg.bits.clone();
        let mut summed: Option<Grads> = None;
        for (bi, &b) in bits.iter().enumerate() {
            let layer_bits = self.layer_bits(b, bi);
            let switched = layer_bits.iter().filter(|&&x| x != b).count();
            if switched > 0 {
                report.switched.insert(b, switched);
            }
            let weights = self.weights_with(&layer_bits, true)?;
            let logits = self.logits(&weights, OpsMode::Differentiable, &inputs)?;
            let (loss, ce) = self.loss(&logits, &targets, teacher.as_ref())?;
            let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            ensure!(loss_value.is_finite(), "the loss at {b} bits is {loss_value} at step {}", self.step + 1);
            let grads = self.gradients(&loss)?;
            drop((weights, logits, loss));
            let layer_grads: Vec<&[f32]> = grads.scales.iter().map(Vec::as_slice).collect();
            report.alrs_g.insert(b, crate::train::alrs::gradient_term(&layer_grads));
            report.loss.insert(b, loss_value);
            report.ce.insert(b, ce);
            report.scale_grad_norm.insert(b, clip_factor(layer_grads.iter().copied(), 0.0).1);
            report.weight_grad_norm.insert(b, clip_factor(grads.params.values().map(Vec::as_slice), 0.0).1);
            match self.cfg.loop_mode {
                LoopMode::PerPrecision => {
                    let scale_lr = self.cfg.alrs.scale_lr(base_scale_lr, b, &layer_grads);
                    report.scale_lr.insert(b, scale_lr);
                    let set = if self.cfg.scale_moments == ScaleMoments::PerPrecision { bi } else { 0 };
                    self.apply(&grads, lr, scale_lr, set)?;
                }
                LoopMode::Summed => match &mut summed {
                    None => summed = Some(grads),
                    Some(acc) => acc.add(&grads),
                },
            }
        }
        if let Some(total) = summed {
            for &b in &bits {
                report.scale_lr.insert(b, base_scale_lr);
            }
            self.apply(&total, lr, base_scale_lr, 0)?;
        }
        self.step += 1;
        Ok(report)
    }

    /// Each quantized layer's bit-width (in [`Trainer::layer_names`] order) in the pass at `b`
    /// (the `bi`-th of the step): `b`, or with
    /// bit-switching, with probability σ·(step+1)/steps, one drawn for the layer (sensitive
    /// layers favour high bits). A pure function of (seed, step, bi): a resumed run draws the same.
    pub fn layer_bits(&self, b: u32, bi: usize) -> Vec<u32> {
        let sw = &self.cfg.bit_switching;
        if sw.sigma == 0.0 {
            return vec![b; self.layers.len()];
        }
        let sigma = sw.sigma * (self.step + 1) as f64 / self.cfg.steps as f64;
        let mut next = crate::train::data::splitmix64(
            self.cfg.seed
                ^ self.step.wrapping_mul(0xA076_1D64_78BD_642F)
                ^ (bi as u64 + 1).wrapping_mul(0xE703_7ED1_A0B4_28DB),
        );
        let mut uniform = move || (next() >> 11) as f64 / (1u64 << 53) as f64;
        let bit_set = &self.cfg.bits;
        self.sensitive
            .iter()
            .map(|&sensitive| {
                if uniform() >= sigma {
                    return b;
                }
                let weight = |x: u32| if sensitive { f64::from(x) } else { 1.0 };
                let mut u = uniform() * bit_set.iter().map(|&x| weight(x)).sum::<f64>();
                for &x in bit_set {
                    u -= weight(x);
                    if u < 0.0 {
                        return x;
                    }
                }
                *bit_set.last().expect("a validated recipe has bits")
            })
            .collect()
    }

    /// The gradients of `loss` for every trainable tensor (zeros where the loss does not reach).
    fn gradients(&self, loss: &Tensor) -> Result<Grads> {
        let store = loss.backward()?;
        let get = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(match store.get(t) {
                Some(g) => g.flatten_all()?.to_vec1()?,
                None => vec![0.0; t.elem_count()],
            })
        };
        let mut params = BTreeMap::new();
        for l in &self.layers {
            if l.w.trainable {
                params.insert(l.name.clone(), get(&l.w.tensor)?);
            }
        }
        for (name, p) in &self.floats {
            if p.trainable {
                params.insert(name.clone(), get(&p.tensor)?);
            }
        }
        let scales = self.layers.iter().map(|l| get(&l.s.tensor)).collect::<Result<_>>()?;
        Ok(Grads { params, scales })
    }

    /// One AdamW step: weights/norms/biases at `lr` (decay on latent weights only), scales at
    /// `scale_lr` with moment set `set` and no decay; each group clipped to `clip_grad`. The
    /// tensors come to the host one by one (from a GPU), are updated there in parallel, and go
    /// back; the result does not depend on the number of threads.
    fn apply(&mut self, grads: &Grads, lr: f64, scale_lr: f64, set: usize) -> Result<()> {
        let h = self.cfg.adam();
        let (fw, _) = clip_factor(grads.params.values().map(Vec::as_slice), self.cfg.clip_grad);
        let (fs, _) = clip_factor(grads.scales.iter().map(Vec::as_slice), self.cfg.clip_grad);
        let mut moments: BTreeMap<&String, &mut AdamState> = self.adam.iter_mut().collect();
        let mut scale_moments: BTreeMap<&String, &mut AdamState> = self.adam_scales[set].iter_mut().collect();
        let mut updates = Vec::new();
        for (l, gs) in self.layers.iter_mut().zip(&grads.scales) {
            if l.w.trainable {
                let moments = moments.remove(&l.name).expect("state per trainable");
                updates.push(Update {
                    param: &mut l.w,
                    moments,
                    grad: &grads.params[&l.name],
                    clip: fw,
                    lr,
                    decay: self.cfg.weight_decay,
                    scale: false,
                });
            }
            let moments = scale_moments.remove(&l.name).expect("state per layer");
            updates.push(Update {
                param: &mut l.s,
                moments,
                grad: gs,
                clip: fs,
                lr: scale_lr,
                decay: 0.0,
                scale: true,
            });
        }
        for (name, p) in self.floats.iter_mut().filter(|(_, p)| p.trainable) {
            let moments = moments.remove(name).expect("state per trainable");
            updates.push(Update {
                param: p,
                moments,
                grad: &grads.params[name],
                clip: fw,
                lr,
                decay: 0.0,
                scale: false,
            });
        }
        let mut values = updates.iter().map(|u| u.param.values()).collect::<Result<Vec<_>>>()?;
        let min = half::f16::MIN_POSITIVE.to_f32();
        values.par_iter_mut().zip(updates.par_iter_mut()).for_each(|(v, u)| {
            let before = if u.scale { v.clone() } else { Vec::new() };
            u.moments.step(v, u.grad, u.clip, u.lr, u.decay, &h);
            // Scales keep their sign and stay away from zero (a checkpoint stores nonzero f16
            // scales): a step that would cross zero, or come within the smallest normal f16 of
            // it, stops there.
            for (x, &old) in v.iter_mut().zip(&before) {
                if x.is_nan() || x.signum() != old.signum() || x.abs() < min {
                    *x = min.copysign(old);
                }
            }
        });
        for (u, v) in updates.into_iter().zip(values) {
            u.param.set(v)?;
        }
        Ok(())
    }

    /// Held-out cross-entropy at every bit-width of the recipe.
    pub fn evaluate(&self, data: &TokenBlocks) -> Result<EvalReport> {
        let mut out = BTreeMap::new();
        for &b in &self.cfg.bits {
            out.insert(b, self.heldout_ce(&self.weights_at(b, false)?, data)?);
        }
        Ok(out)
    }

    /// Held-out cross-entropy of the float model training started from.
    pub fn evaluate_float(&self, data: &TokenBlocks) -> Result<f64> {
        self.heldout_ce(&self.float.weights, data)
    }

    fn heldout_ce(&self, weights: &Weights, data: &TokenBlocks) -> Result<f64> {
        let t = Transformer::new(&self.float.config, weights, OpsMode::Inference)?;
        let (mut sum, mut n) = (0f64, 0usize);
        let blocks: Vec<&[u32]> = data.heldout.iter().map(Vec::as_slice).collect();
        for chunk in blocks.chunks(self.cfg.batch) {
            let (inputs, targets) = self.batch_tensors(chunk)?;
            let (b, s) = inputs.dims2()?;
            let logits = t
                .forward(&inputs, &mut KvCache::new(&self.float.config), 0)?
                .reshape((b * s, self.float.config.vocab_size))?;
            let ce = candle_nn::loss::cross_entropy(&logits, &targets)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            sum += ce * (b * s) as f64;
            n += b * s;
        }
        Ok(sum / n as f64)
    }

    /// The trained model as a checkpoint's contents: codes re-derived from the latent weights
    /// and the f16 scales, the trained norms and biases in float.
    pub fn quantized_model(&self) -> Result<QuantizedModel> {
        let mut quantized = BTreeMap::new();
        let mut report = Vec::new();
        for l in &self.layers {
            let w = l.w.values()?;
            let q = export_weight(&w, &l.s.values()?, l.layout);
            let relative_error = self
                .cfg
                .bits
                .iter()
                .map(|&b| Ok((b, reconstruction_error(&w, &q, b, self.tie)?)))
                .collect::<Result<Vec<_>, crate::PtqError>>()?;
            report.push(LayerReport {
                name: l.name.clone(),
                rows: l.layout.rows,
                cols: l.layout.cols,
                relative_error,
                output_error: None,
            });
            quantized.insert(l.name.clone(), q);
        }
        let float = self
            .floats
            .iter()
            .map(|(n, p)| Ok((n.clone(), p.tensor.detach().to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let c = &self.cfg;
        let spec = c.quant_spec()?;
        let scale_method = format!(
            "{}+train:{}:alrs={}:loop={}:steps={}:kd={}",
            self.origin.clone().unwrap_or_else(|| spec.scale_method()),
            c.train,
            c.alrs,
            match c.loop_mode {
                LoopMode::PerPrecision => "per-precision",
                LoopMode::Summed => "summed",
            },
            self.step,
            c.kd.weight
        );
        let quantization = quantization_meta(&spec, scale_method, quantized.keys().cloned().collect())?;
        Ok(QuantizedModel { quantization, quantized, float, report })
    }

    /// Writes the training state (latent weights and scales, trained floats, optimizer moments,
    /// step, recipe) to `path` atomically (`PATH.tmp`, then renamed).
    pub fn save_state(&self, path: &Path, data: &TokenBlocks, source_sha256: &str) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let mut adam_t = BTreeMap::new();
        let mut put_adam =
            |key: String, st: &AdamState, shape: &[usize], tensors: &mut HashMap<String, Tensor>| -> Result<()> {
                tensors.insert(format!("adam.m.{key}"), Tensor::from_slice(&st.m, shape, &Device::Cpu)?);
                tensors.insert(format!("adam.v.{key}"), Tensor::from_slice(&st.v, shape, &Device::Cpu)?);
                adam_t.insert(key, st.t);
                Ok(())
            };
        let host = |t: &Tensor| t.detach().to_device(&Device::Cpu);
        for l in &self.layers {
            tensors.insert(format!("s.{}", l.name), host(&l.s.tensor)?);
            if l.w.trainable {
                tensors.insert(format!("w.{}", l.name), host(&l.w.tensor)?);
                put_adam(format!("w.{}", l.name), &self.adam[&l.name], l.w.tensor.dims(), &mut tensors)?;
            }
            for (i, set) in self.adam_scales.iter().enumerate() {
                put_adam(format!("s{i}.{}", l.name), &set[&l.name], l.s.tensor.dims(), &mut tensors)?;
            }
        }
        for (name, p) in &self.floats {
            if p.trainable {
                tensors.insert(format!("f.{name}"), host(&p.tensor)?);
                put_adam(format!("f.{name}"), &self.adam[name], p.tensor.dims(), &mut tensors)?;
            }
        }
        let meta = StateMeta {
            version: STATE_VERSION,
            step: self.step,
            config: self.cfg.clone(),
            data_fingerprint: data.fingerprint,
            source_sha256: source_sha256.to_string(),
            adam_t,
            origin: self.origin.clone(),
        };
        let json = serde_json::to_vec(&meta)?;
        let n = json.len();
        tensors.insert(STATE_META.to_string(), Tensor::from_vec(json, n, &Device::Cpu)?);
        model::checkpoint::write_through_tmp(path, |tmp| {
            candle_core::safetensors::save(&tensors, tmp).with_context(|| format!("cannot write {}", tmp.display()))
        })
    }

    /// The recipe stored in a training state.
    pub fn state_config(path: &Path) -> Result<TrainConfig> {
        Ok(read_meta(&load_state_tensors(path)?)?.config)
    }

    /// Continues a run from a state written by [`Self::save_state`], checking that the float
    /// model and the data are the ones it was trained on.
    pub fn resume(
        float: FloatModel,
        path: &Path,
        data: &TokenBlocks,
        source_sha256: &str,
        device: &Device,
    ) -> Result<Self> {
        let mut tensors = load_state_tensors(path)?;
        let meta = read_meta(&tensors)?;
        ensure!(
            meta.source_sha256 == source_sha256,
            "{}: the state was trained from a model with sha256 {}, not {source_sha256}",
            path.display(),
            meta.source_sha256
        );
        ensure!(
            meta.data_fingerprint == data.fingerprint,
            "{}: the training data differ from the run's (token fingerprint {:016x}, now {:016x})",
            path.display(),
            meta.data_fingerprint,
            data.fingerprint
        );
        let mut take = |prefix: &str| -> BTreeMap<String, Tensor> {
            let keys: Vec<String> = tensors.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
            keys.into_iter().map(|k| (k[prefix.len()..].to_string(), tensors.remove(&k).unwrap())).collect()
        };
        let scales = take("s.");
        let mut trained = take("w.");
        trained.extend(take("f."));
        let m = take("adam.m.");
        let v = take("adam.v.");
        let mut me = Self::build(float, meta.config, scales, trained, meta.step, device)?;
        me.origin = meta.origin;
        let restore = |key: &str, st: &mut AdamState| -> Result<()> {
            let get = |map: &BTreeMap<String, Tensor>| -> Result<Vec<f32>> {
                Ok(map
                    .get(key)
                    .with_context(|| format!("the state has no moments for `{key}`"))?
                    .flatten_all()?
                    .to_vec1()?)
            };
            let (mv, vv) = (get(&m)?, get(&v)?);
            ensure!(mv.len() == st.m.len() && vv.len() == st.v.len(), "moments of `{key}` have the wrong size");
            st.m = mv;
            st.v = vv;
            st.t = *meta.adam_t.get(key).with_context(|| format!("no step count for `{key}`"))?;
            Ok(())
        };
        for (name, st) in me.adam.iter_mut() {
            let key = if me.layers.iter().any(|l| &l.name == name) { format!("w.{name}") } else { format!("f.{name}") };
            restore(&key, st)?;
        }
        for (i, set) in me.adam_scales.iter_mut().enumerate() {
            for (name, st) in set.iter_mut() {
                restore(&format!("s{i}.{name}"), st)?;
            }
        }
        ensure!(m.len() == meta.adam_t.len(), "the state holds moments of tensors this run does not train");
        Ok(me)
    }
}

fn load_state_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read the training state {}", path.display()))
}

fn read_meta(tensors: &HashMap<String, Tensor>) -> Result<StateMeta> {
    let bytes: Vec<u8> = tensors.get(STATE_META).context("not a drq training state (no metadata)")?.to_vec1()?;
    let meta: StateMeta = serde_json::from_slice(&bytes).context("the training state's metadata is invalid")?;
    if meta.version != STATE_VERSION {
        bail!("training state version {} is not supported (this drq reads version {STATE_VERSION})", meta.version);
    }
    Ok(meta)
}

/// One tensor's part of an optimizer step.
struct Update<'a> {
    param: &'a mut Param,
    moments: &'a mut AdamState,
    grad: &'a [f32],
    /// Gradient clipping factor of its group.
    clip: f32,
    lr: f64,
    decay: f64,
    /// Scales are kept positive after the step.
    scale: bool,
}

/// Which of `layers` are sensitive for bit-switching: Tr(H_l)/n_l (from the traces at `path`)
/// at least the mean over the layers.
fn sensitive_layers(path: &str, layers: &[QLayer]) -> Result<Vec<bool>> {
    let traces = crate::hasb::TraceReport::load(Path::new(path)).context("bit_switching.traces")?;
    let s: Vec<f64> = layers.iter().map(|l| traces.sensitivity(&l.name)).collect::<Result<_>>()?;
    let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
    Ok(s.iter().map(|&x| x >= mean).collect())
}

/// Gradients of one backward pass.
struct Grads {
    /// Trainable weights, norms and biases, by tensor name.
    params: BTreeMap<String, Vec<f32>>,
    /// Scales, per layer in layer order.
    scales: Vec<Vec<f32>>,
}

impl Grads {
    fn add(&mut self, other: &Grads) {
        for (k, g) in &mut self.params {
            for (a, b) in g.iter_mut().zip(&other.params[k]) {
                *a += b;
            }
        }
        for (g, o) in self.scales.iter_mut().zip(&other.scales) {
            for (a, b) in g.iter_mut().zip(o) {
                *a += b;
            }
        }
    }
}
