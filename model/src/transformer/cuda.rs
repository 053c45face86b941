//! The decode step on an NVIDIA GPU (`kernels::cuda`): the forward of [`Transformer`] on device
//! buffers, every token from the embedding lookup to the greedy pick or a temperature draw without
//! leaving the GPU.
//! Built from a transformer (its configuration, weights and precisions), so it is the same model
//! as the CPU runtimes serve; a [`GpuResident`] uploads each resident weight once, so the
//! transformers of every precision share one copy on the device, as on the host.
//!
//! A step runs up to [`MAX_BATCH`] rows (longer lists are run in pieces): positions of any sequences, each in a slot of a
//! [`KvArena`] (decode: one row per sequence; prefill: consecutive positions of one, chunked).
//! Rows of one sequence in one step attend causally to each other, so a prefill split into
//! chunks gives what one step would.
//!
//! A step's ~300 kernel launches would cost more than its bytes: the buffers of a step are
//! allocated once per arena, and the launches for each (rows, picked rows, arena) are captured
//! once into a CUDA graph and replayed (`DRQ_CUDA_GRAPHS=0` launches them one by one instead). Only
//! the rows' tokens, slots and positions are copied in before a step (and the draws' temperatures
//! and uniforms after it), and the picked tokens out.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use kernels::cuda::{CudaPlanarWeight, CudaRuntime, CudaSlice, DeviceIds, KvArena, StepGraph, StepRows};
use kernels::ops::AttentionShape;
use kernels::{PlanarWeight, MAX_BATCH};

use super::{Block, Embedding, Linear, Transformer};
use crate::checkpoint::LeadingRows;
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
    /// Row ranges at their bit-widths ([`LeadingRows::ranges`]: two when the leading rows are wider).
    Planar {
        weight: Arc<CudaPlanarWeight>,
        ranges: Vec<(Range<usize>, u32)>,
        bias: Option<CudaSlice<f32>>,
    },
    Dense {
        weight: CudaSlice<f32>,
        rows: usize,
        cols: usize,
        bias: Option<CudaSlice<f32>>,
    },
}

impl GpuLinear {
    fn new(gpu: &mut GpuResident, linear: &Linear) -> Result<Self> {
        Ok(match linear {
            Linear::Planar { weight, bits, lead, bias, .. } => GpuLinear::Planar {
                ranges: LeadingRows::ranges(*lead, weight.rows(), *bits),
                weight: gpu.planar(weight)?,
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

    /// `y = x · Wᵀ (+ bias)` for the first `n ≤ MAX_BATCH` rows of `x` into those of `y`.
    fn forward(&self, rt: &CudaRuntime, x: &CudaSlice<f32>, n: usize, y: &mut CudaSlice<f32>) -> Result<()> {
        let bias = match self {
            GpuLinear::Planar { weight, ranges, bias } => {
                for (rows, bits) in ranges {
                    rt.matmul_rows(weight, rows.clone(), *bits, x, n, y)?;
                }
                bias
            }
            GpuLinear::Dense { weight, rows, cols, bias } => {
                rt.dense_matmul(weight, *rows, *cols, x, n, y)?;
                bias
            }
        };
        if let Some(b) = bias {
            rt.add_bias(y, b, n)?;
        }
        Ok(())
    }
}

enum GpuEmbedding {
    /// Row ranges at their bit-widths, as [`GpuLinear::Planar`].
    Planar {
        weight: Arc<CudaPlanarWeight>,
        ranges: Vec<(Range<usize>, u32)>,
    },
    Dense {
        table: CudaSlice<f32>,
    },
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
    /// Buffers of the last arena stepped, and the graphs captured on them.
    steps: Mutex<Option<StepState>>,
    use_graphs: bool,
}

/// Every buffer a step touches, for [`MAX_BATCH`] rows over one arena.
struct StepBuffers {
    arena: u64,
    tokens: DeviceIds,
    rows: StepRows,
    picked: DeviceIds,
    x: CudaSlice<f32>,
    normed: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    out: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    scores: CudaSlice<f32>,
    last: CudaSlice<f32>,
    last_normed: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    ids: CudaSlice<u32>,
    /// Per picked row: 1 / temperature (0: greedy) and the uniform of its draw.
    inv_t: CudaSlice<f32>,
    uniform: CudaSlice<f64>,
}

struct StepState {
    buffers: StepBuffers,
    /// By (rows, picked rows).
    graphs: HashMap<(usize, usize), StepGraph>,
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

impl GpuRow {
    /// The rows of one sequence's new `tokens`, from position `start` of slot `slot`, picking the
    /// last (its next token).
    pub fn sequence(slot: usize, start: usize, tokens: &[u32]) -> impl Iterator<Item = GpuRow> + '_ {
        tokens.iter().enumerate().map(move |(i, &token)| GpuRow {
            slot,
            pos: start + i,
            token,
            pick: i + 1 == tokens.len(),
        })
    }
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
            Embedding::Planar { weight, bits, lead } => GpuEmbedding::Planar {
                ranges: LeadingRows::ranges(*lead, weight.rows(), *bits),
                weight: gpu.planar(weight)?,
            },
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
            steps: Mutex::new(None),
            use_graphs: std::env::var("DRQ_CUDA_GRAPHS").map_or(true, |v| v != "0"),
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

    /// Runs `rows` (at least one; steps of up to [`MAX_BATCH`]) through the model, writing their
    /// keys and values into `arena`, and returns the greedy next token after each row with
    /// `pick`, in row order.
    pub fn step_greedy(&self, arena: &mut KvArena, rows: &[GpuRow]) -> Result<Vec<u32>> {
        let picked = rows.iter().filter(|r| r.pick).count();
        self.step_sample(arena, rows, &vec![(0.0, 0.0); picked])
    }

    /// [`Self::step_greedy`] with each picked row's token drawn on the GPU: `draws` holds, per
    /// picked row in order, `(inv_t, u)`: `1 / temperature` and a uniform in [0, 1) for a sampled
    /// row (softmax of its logits · inv_t, drawn as `kernels::cuda::CudaRuntime::sample_rows`
    /// says), `inv_t = 0` for a greedy one. Only the tokens cross to the host.
    pub fn step_sample(&self, arena: &mut KvArena, rows: &[GpuRow], draws: &[(f32, f64)]) -> Result<Vec<u32>> {
        let picked = rows.iter().filter(|r| r.pick).count();
        ensure!(draws.len() == picked, "{} draws for {picked} picked rows", draws.len());
        let vocab = self.config.vocab_size;
        let mut out = Vec::with_capacity(picked);
        let mut draws = draws.iter();
        self.steps(arena, rows, |rt, b, picked| {
            let (inv_t, u): (Vec<f32>, Vec<f64>) = draws.by_ref().take(picked).copied().unzip();
            if inv_t.iter().any(|&t| t != 0.0) {
                rt.write_prefix(&inv_t, &mut b.inv_t)?;
                rt.write_prefix(&u, &mut b.uniform)?;
                rt.sample_rows(&b.logits, picked, vocab, &b.inv_t, &b.uniform, &mut b.ids)?;
            }
            let mut ids = vec![0u32; picked];
            rt.download_u32_prefix(&b.ids, &mut ids).context("the step's tokens")?;
            out.extend(ids);
            Ok(())
        })?;
        Ok(out)
    }

    /// [`Self::step_greedy`], returning the logits of each row with `pick` instead
    /// (`[picked, vocab]`, row-major), for sampling on the host and for perplexity.
    pub fn step_logits(&self, arena: &mut KvArena, rows: &[GpuRow]) -> Result<Vec<f32>> {
        let vocab = self.config.vocab_size;
        let mut out = Vec::with_capacity(rows.iter().filter(|r| r.pick).count() * vocab);
        self.steps(arena, rows, |rt, b, picked| {
            let mut logits = vec![0f32; picked * vocab];
            rt.download_f32_prefix(&b.logits, &mut logits).context("the step's logits")?;
            out.extend(logits);
            Ok(())
        })?;
        Ok(out)
    }

    /// [`Self::step`] over `rows` in pieces of [`MAX_BATCH`] (one sequence's rows may span two
    /// pieces: they attend causally), `read` called after each piece with its picked rows.
    fn steps(
        &self,
        arena: &mut KvArena,
        rows: &[GpuRow],
        mut read: impl FnMut(&CudaRuntime, &mut StepBuffers, usize) -> Result<()>,
    ) -> Result<()> {
        ensure!(!rows.is_empty(), "a GPU step takes at least one row");
        for chunk in rows.chunks(MAX_BATCH) {
            let picked = chunk.iter().filter(|r| r.pick).count();
            self.step(arena, chunk, |rt, b| read(rt, b, picked))?;
        }
        Ok(())
    }

    /// Runs a step (graph replay or launches) and hands its buffers to `read` (which waits).
    fn step(
        &self,
        arena: &mut KvArena,
        rows: &[GpuRow],
        read: impl FnOnce(&CudaRuntime, &mut StepBuffers) -> Result<()>,
    ) -> Result<()> {
        let n = rows.len();
        ensure!((1..=MAX_BATCH).contains(&n), "a GPU step takes 1..={MAX_BATCH} rows, got {n}");
        let c = &self.config;
        let rt = &*self.rt;
        let mut state = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        if state.as_ref().is_none_or(|s| s.buffers.arena != arena.id()) {
            // A new arena: new buffers (its capacity sizes the attention scratch), no graphs.
            *state = None;
            *state = Some(StepState { buffers: self.buffers(arena)?, graphs: HashMap::new() });
        }
        let StepState { buffers: b, graphs } = state.as_mut().expect("set above");
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        rt.write_ids(&mut b.tokens, &tokens, c.vocab_size).context("the step's tokens")?;
        rt.write_step_rows(&mut b.rows, arena, &rows.iter().map(|r| (r.slot, r.pos)).collect::<Vec<_>>())?;
        let picked: Vec<u32> = rows.iter().enumerate().filter(|(_, r)| r.pick).map(|(i, _)| i as u32).collect();
        rt.write_ids(&mut b.picked, &picked, n)?;
        if self.use_graphs {
            let graph = match graphs.entry((n, picked.len())) {
                std::collections::hash_map::Entry::Occupied(g) => g.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(rt.capture(|| self.queue_step(b, arena, n, picked.len()).map_err(to_shape_error))?)
                }
            };
            graph.launch().context("replaying the step's CUDA graph")?;
        } else {
            self.queue_step(b, arena, n, picked.len())?;
        }
        if picked.is_empty() {
            return Ok(rt.synchronize()?);
        }
        read(rt, b)
    }

    fn buffers(&self, arena: &KvArena) -> Result<StepBuffers> {
        let (rt, c, n) = (&*self.rt, &self.config, MAX_BATCH);
        let f = |len: usize| rt.zeros_f32(len);
        let (h, m, q_dim, kv_dim) = (
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        Ok(StepBuffers {
            arena: arena.id(),
            tokens: rt.device_ids(n)?,
            rows: rt.step_rows(n)?,
            picked: rt.device_ids(n)?,
            x: f(n * h)?,
            normed: f(n * h)?,
            q: f(n * q_dim)?,
            k: f(n * kv_dim)?,
            v: f(n * kv_dim)?,
            attn: f(n * q_dim)?,
            out: f(n * h)?,
            gate: f(n * m)?,
            up: f(n * m)?,
            scores: f(n * c.num_attention_heads * arena.capacity())?,
            last: f(n * h)?,
            last_normed: f(n * h)?,
            logits: f(n * c.vocab_size)?,
            ids: rt.zeros_u32(n)?,
            inv_t: f(n)?,
            uniform: rt.zeros_f64(n)?,
        })
    }

    /// Queues a step's launches on the runtime's stream (run now, or captured into a graph): `n`
    /// rows whose tokens, slots and positions are in `b`, `picked` of them (indices in
    /// `b.picked`) through the lm_head to their greedy token in `b.ids`.
    fn queue_step(&self, b: &mut StepBuffers, arena: &mut KvArena, n: usize, picked: usize) -> Result<()> {
        let (rt, c) = (&*self.rt, &self.config);
        let shape =
            AttentionShape { heads: c.num_attention_heads, kv_heads: c.num_key_value_heads, head_dim: c.head_dim };
        let (h, m, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps as f32);
        match &self.embed {
            GpuEmbedding::Planar { weight, ranges } => {
                for (rows, bits) in ranges {
                    rt.planar_rows(weight, rows.clone(), *bits, &b.tokens, &mut b.x)?;
                }
            }
            GpuEmbedding::Dense { table } => rt.gather_rows(table, h, &b.tokens, &mut b.x)?,
        }
        for (layer, blk) in self.blocks.iter().enumerate() {
            rt.rms_norm(&b.x, &blk.norms[0], eps, n, &mut b.normed)?;
            blk.q.forward(rt, &b.normed, n, &mut b.q)?;
            blk.k.forward(rt, &b.normed, n, &mut b.k)?;
            blk.v.forward(rt, &b.normed, n, &mut b.v)?;
            rt.rope(&mut b.q, shape.heads, shape.head_dim, &b.rows, &self.cos, &self.sin)?;
            rt.rope(&mut b.k, shape.kv_heads, shape.head_dim, &b.rows, &self.cos, &self.sin)?;
            rt.store_kv(&b.k, &b.v, &b.rows, arena, layer)?;
            rt.attend(&b.q, shape, &b.rows, arena, layer, &mut b.scores, &mut b.attn)?;
            blk.o.forward(rt, &b.attn, n, &mut b.out)?;
            rt.add_assign(&mut b.x, &b.out, n * h)?;
            rt.rms_norm(&b.x, &blk.norms[1], eps, n, &mut b.normed)?;
            blk.gate.forward(rt, &b.normed, n, &mut b.gate)?;
            blk.up.forward(rt, &b.normed, n, &mut b.up)?;
            rt.silu_mul(&mut b.gate, &b.up, n * m)?;
            blk.down.forward(rt, &b.gate, n, &mut b.out)?;
            rt.add_assign(&mut b.x, &b.out, n * h)?;
        }
        if picked == 0 {
            return Ok(());
        }
        // The final norm and the lm_head only for the rows whose next token is wanted.
        rt.gather_rows(&b.x, h, &b.picked, &mut b.last)?;
        rt.rms_norm(&b.last, &self.final_norm, eps, picked, &mut b.last_normed)?;
        self.lm_head.forward(rt, &b.last_normed, picked, &mut b.logits)?;
        rt.argmax_rows(&b.logits, picked, c.vocab_size, &mut b.ids)?;
        Ok(())
    }
}

/// Errors inside a graph capture, carried out through the runtime's error type.
fn to_shape_error(e: anyhow::Error) -> kernels::cuda::CudaError {
    kernels::cuda::CudaError::Shape(format!("{e:#}"))
}
