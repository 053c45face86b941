//! The decode step on an NVIDIA GPU (`kernels::cuda`): the forward of [`Transformer`] on device
//! buffers, every token from the embedding lookup to the greedy pick without leaving the GPU.
//! Built from a transformer (its configuration, weights and precisions), so it is the same model
//! as the CPU runtimes serve; a [`GpuResident`] uploads each resident weight once, so the
//! transformers of every precision share one copy on the device, as on the host.
//!
//! A step takes up to [`MAX_BATCH`] rows: positions of any sequences, each in a slot of a
//! [`KvArena`] (decode: one row per sequence; prefill: consecutive positions of one, chunked).
//! Rows of one sequence in one step attend causally to each other, so a prefill split into
//! chunks gives what one step would.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use kernels::cuda::{CudaPlanarWeight, CudaRuntime, CudaSlice, KvArena};
use kernels::ops::AttentionShape;
use kernels::{PlanarWeight, MAX_BATCH};

use super::{Block, Embedding, Linear, Transformer};
use crate::config::ModelConfig;

/// The resident weights of one model on one GPU: each [`PlanarWeight`] uploaded once, whatever
/// the number of transformers (precisions) built over it.
pub struct GpuResident {
    rt: Arc<CudaRuntime>,
    /// Keyed by the host weight's address; the host `Arc` is kept so the address stays its own.
    planar: HashMap<usize, (Arc<PlanarWeight>, Arc<CudaPlanarWeight>)>,
}

impl GpuResident {
    pub fn new(rt: Arc<CudaRuntime>) -> Self {
        GpuResident { rt, planar: HashMap::new() }
    }

    pub fn runtime(&self) -> &Arc<CudaRuntime> {
        &self.rt
    }

    fn planar(&mut self, w: &Arc<PlanarWeight>) -> Result<Arc<CudaPlanarWeight>> {
        let key = Arc::as_ptr(w) as usize;
        if let Some((_, gpu)) = self.planar.get(&key) {
            return Ok(Arc::clone(gpu));
        }
        let gpu = Arc::new(self.rt.upload(w)?);
        self.planar.insert(key, (Arc::clone(w), Arc::clone(&gpu)));
        Ok(gpu)
    }

    fn tensor(&self, t: &Tensor) -> Result<CudaSlice<f32>> {
        let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?;
        Ok(self.rt.upload_f32(&values)?)
    }
}

enum GpuLinear {
    Planar { weight: Arc<CudaPlanarWeight>, bits: u32, bias: Option<CudaSlice<f32>> },
    Dense { weight: CudaSlice<f32>, rows: usize, cols: usize, bias: Option<CudaSlice<f32>> },
}

impl GpuLinear {
    fn new(gpu: &mut GpuResident, linear: &Linear) -> Result<Self> {
        Ok(match linear {
            Linear::Planar { weight, bits, bias, .. } => GpuLinear::Planar {
                weight: gpu.planar(weight)?,
                bits: *bits,
                bias: bias.as_deref().map(|b| gpu.rt.upload_f32(b)).transpose()?,
            },
            Linear::Dense { weight, bias, .. } => {
                let (rows, cols) = weight.dims2()?;
                GpuLinear::Dense {
                    weight: gpu.tensor(weight)?,
                    rows,
                    cols,
                    bias: bias.as_ref().map(|b| gpu.tensor(b)).transpose()?,
                }
            }
        })
    }

    fn rows(&self) -> usize {
        match self {
            GpuLinear::Planar { weight, .. } => weight.rows(),
            GpuLinear::Dense { rows, .. } => *rows,
        }
    }

    /// `y = x · Wᵀ (+ bias)` for `n ≤ MAX_BATCH` rows, into a new buffer.
    fn forward(&self, rt: &CudaRuntime, x: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<f32>> {
        let mut y = rt.zeros_f32(n * self.rows())?;
        let bias = match self {
            GpuLinear::Planar { weight, bits, bias } => {
                rt.matmul(weight, *bits, x, n, &mut y)?;
                bias
            }
            GpuLinear::Dense { weight, rows, cols, bias } => {
                rt.dense_matmul(weight, *rows, *cols, x, n, &mut y)?;
                bias
            }
        };
        if let Some(b) = bias {
            rt.add_bias(&mut y, b, n)?;
        }
        Ok(y)
    }
}

enum GpuEmbedding {
    Planar { weight: Arc<CudaPlanarWeight>, bits: u32 },
    Dense { table: CudaSlice<f32> },
}

struct GpuBlock {
    norms: [CudaSlice<f32>; 2],
    q: GpuLinear,
    k: GpuLinear,
    v: GpuLinear,
    o: GpuLinear,
    gate: GpuLinear,
    up: GpuLinear,
    down: GpuLinear,
}

/// A [`Transformer`] on a GPU (see the module docs).
pub struct CudaTransformer {
    rt: Arc<CudaRuntime>,
    config: ModelConfig,
    embed: GpuEmbedding,
    blocks: Vec<GpuBlock>,
    final_norm: CudaSlice<f32>,
    lm_head: GpuLinear,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    /// Positions the RoPE tables cover.
    positions: usize,
}

/// One row of a GPU step: `token` at position `pos` of the sequence in slot `slot`; `pick`: return
/// the greedy next token after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuRow {
    pub slot: usize,
    pub pos: usize,
    pub token: u32,
    pub pick: bool,
}

impl Transformer {
    /// This transformer on the GPU of `gpu`, its weights uploaded there once (shared with the
    /// other transformers built through the same [`GpuResident`]).
    pub fn to_cuda(&self, gpu: &mut GpuResident) -> Result<CudaTransformer> {
        let block = |b: &Block, gpu: &mut GpuResident| -> Result<GpuBlock> {
            Ok(GpuBlock {
                norms: [gpu.tensor(&b.input_norm)?, gpu.tensor(&b.post_attention_norm)?],
                q: GpuLinear::new(gpu, &b.q_proj)?,
                k: GpuLinear::new(gpu, &b.k_proj)?,
                v: GpuLinear::new(gpu, &b.v_proj)?,
                o: GpuLinear::new(gpu, &b.o_proj)?,
                gate: GpuLinear::new(gpu, &b.gate_proj)?,
                up: GpuLinear::new(gpu, &b.up_proj)?,
                down: GpuLinear::new(gpu, &b.down_proj)?,
            })
        };
        let embed = match &self.embed {
            Embedding::Planar { weight, bits } => GpuEmbedding::Planar { weight: gpu.planar(weight)?, bits: *bits },
            Embedding::Dense(table) => GpuEmbedding::Dense { table: gpu.tensor(table)? },
        };
        let blocks = self.blocks.iter().map(|b| block(b, gpu)).collect::<Result<Vec<_>>>()?;
        Ok(CudaTransformer {
            rt: Arc::clone(&gpu.rt),
            config: self.config.clone(),
            embed,
            blocks,
            final_norm: gpu.tensor(&self.final_norm)?,
            lm_head: GpuLinear::new(gpu, &self.lm_head)?,
            cos: gpu.tensor(&self.cos)?,
            sin: gpu.tensor(&self.sin)?,
            positions: self.cos.dims()[0],
        })
    }
}

impl CudaTransformer {
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// A key/value cache for `slots` sequences of up to `capacity` positions (at most what the
    /// model's position tables cover).
    pub fn kv_arena(&self, slots: usize, capacity: usize) -> Result<KvArena> {
        ensure!(
            capacity >= 1 && capacity <= self.positions,
            "a cache of {capacity} positions: the model covers 1..={}",
            self.positions
        );
        let c = &self.config;
        Ok(self.rt.kv_arena(c.num_hidden_layers, slots, capacity, c.num_key_value_heads * c.head_dim)?)
    }

    /// Runs 1..=[`MAX_BATCH`] rows through the model, writing their keys and values into
    /// `arena`, and returns the greedy next token after each row with `pick`, in row order.
    pub fn step_greedy(&self, arena: &mut KvArena, rows: &[GpuRow]) -> Result<Vec<u32>> {
        let n = rows.len();
        ensure!((1..=MAX_BATCH).contains(&n), "a GPU step takes 1..={MAX_BATCH} rows, got {n}");
        let c = &self.config;
        if let Some(r) = rows.iter().find(|r| r.token as usize >= c.vocab_size) {
            anyhow::bail!("token {} is outside the vocabulary of {}", r.token, c.vocab_size);
        }
        let rt = &*self.rt;
        let shape =
            AttentionShape { heads: c.num_attention_heads, kv_heads: c.num_key_value_heads, head_dim: c.head_dim };
        let (h, m, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps as f32);
        let step_rows = rt.step_rows(arena, &rows.iter().map(|r| (r.slot, r.pos)).collect::<Vec<_>>())?;
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let mut x = rt.zeros_f32(n * h)?;
        match &self.embed {
            GpuEmbedding::Planar { weight, bits } => rt.planar_rows(weight, *bits, &tokens, &mut x)?,
            GpuEmbedding::Dense { table } => rt.gather_rows(table, h, &tokens, &mut x)?,
        }
        let mut normed = rt.zeros_f32(n * h)?;
        let mut attn = rt.zeros_f32(n * shape.q_dim())?;
        let mut scores = rt.zeros_f32(n * shape.heads * arena.capacity())?;
        for (layer, b) in self.blocks.iter().enumerate() {
            rt.rms_norm(&x, &b.norms[0], eps, n, &mut normed)?;
            let mut q = b.q.forward(rt, &normed, n)?;
            let mut k = b.k.forward(rt, &normed, n)?;
            let v = b.v.forward(rt, &normed, n)?;
            rt.rope(&mut q, shape.heads, shape.head_dim, &step_rows, &self.cos, &self.sin)?;
            rt.rope(&mut k, shape.kv_heads, shape.head_dim, &step_rows, &self.cos, &self.sin)?;
            rt.store_kv(&k, &v, &step_rows, arena, layer)?;
            rt.attend(&q, shape, &step_rows, arena, layer, &mut scores, &mut attn)?;
            let o = b.o.forward(rt, &attn, n)?;
            rt.add_assign(&mut x, &o, n * h)?;
            rt.rms_norm(&x, &b.norms[1], eps, n, &mut normed)?;
            let mut gate = b.gate.forward(rt, &normed, n)?;
            let up = b.up.forward(rt, &normed, n)?;
            rt.silu_mul(&mut gate, &up, n * m)?;
            let down = b.down.forward(rt, &gate, n)?;
            rt.add_assign(&mut x, &down, n * h)?;
        }
        // The final norm and the lm_head only for the rows whose next token is wanted.
        let picked: Vec<u32> = rows.iter().enumerate().filter(|(_, r)| r.pick).map(|(i, _)| i as u32).collect();
        if picked.is_empty() {
            rt.synchronize()?;
            return Ok(Vec::new());
        }
        let mut last = rt.zeros_f32(picked.len() * h)?;
        rt.gather_rows(&x, h, &picked, &mut last)?;
        let mut last_normed = rt.zeros_f32(picked.len() * h)?;
        rt.rms_norm(&last, &self.final_norm, eps, picked.len(), &mut last_normed)?;
        let logits = self.lm_head.forward(rt, &last_normed, picked.len())?;
        let mut ids = rt.zeros_u32(picked.len())?;
        rt.argmax_rows(&logits, picked.len(), c.vocab_size, &mut ids)?;
        let mut out = vec![0u32; picked.len()];
        rt.download_u32(&ids, &mut out).context("the step's greedy tokens")?;
        Ok(out)
    }
}
