//! The one decoder definition shared by evaluation, serving and training: Llama-family and
//! Qwen2 blocks (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP), batched, with a KV cache.
//!
//! Two ways to hold the weights, one forward: [`Transformer::new`] takes float [`Weights`] (the
//! training path, and the reference path of a checkpoint decoded with
//! [`crate::checkpoint::Checkpoint::weights_at`]); [`Transformer::from_resident`] serves the
//! quantized weights of a [`ResidentModel`] through the bit-plane kernels at any precision,
//! sharing the resident copy. Only [`Linear`] and the embedding lookup differ between the two.

use std::ops::Range;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use kernels::{KernelConfig, MatmulPart, PlanarWeight, WeightParts, MAX_BATCH};

use crate::checkpoint::LeadingRows;
use crate::config::{Llama3RopeScaling, ModelConfig};
use crate::precision::Precision;
use crate::resident::ResidentModel;
use crate::weights::{Weights, EMBED, FINAL_NORM, LM_HEAD};

pub mod cuda;
mod fused;

/// Which implementation of the element-wise ops to use. candle's fused RMSNorm, RoPE and
/// softmax are fast but have no backward pass; training needs the composed versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpsMode {
    Inference,
    Differentiable,
}

/// Sees the inputs of the dense linear layers of a [`Transformer::observed`] model: calibration
/// statistics such as the input second moments that Hessian-aware rounding needs.
pub trait InputObserver: Send + Sync {
    /// `x` is the layer's input, `[rows, in]`; `weight` the weight's name
    /// (`model.layers.0.mlp.up_proj.weight`).
    fn observe(&self, weight: &str, x: &Tensor) -> Result<()>;
}

/// An [`InputObserver`] attached to one weight.
#[derive(Clone)]
pub struct Observer {
    weight: String,
    sink: Arc<dyn InputObserver>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer").field("weight", &self.weight).finish_non_exhaustive()
    }
}

/// `y = x·Wᵀ (+ b)` over the last dimension.
#[derive(Debug, Clone)]
pub enum Linear {
    /// A float weight `[out, in]`, multiplied by candle (differentiable; the reference path),
    /// its inputs shown to `observer` when there is one.
    Dense { weight: Tensor, bias: Option<Tensor>, observer: Option<Observer> },
    /// A resident bit-plane weight served at `bits` by the kernels (inference only), its
    /// `lead`ing rows wider when the checkpoint says so.
    Planar {
        weight: Arc<PlanarWeight>,
        bits: u32,
        lead: Option<LeadingRows>,
        kernel: KernelConfig,
        bias: Option<Vec<f32>>,
    },
}

impl Linear {
    /// A dense (float) linear layer.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear::Dense { weight, bias, observer: None }
    }

    /// A linear layer served by the kernels from a resident weight at `bits`, rows
    /// `0..lead.rows` at `lead.bits` when there is a `lead`.
    pub fn planar(
        weight: Arc<PlanarWeight>,
        bits: u32,
        lead: Option<LeadingRows>,
        kernel: KernelConfig,
        bias: Option<Tensor>,
    ) -> Result<Self> {
        kernels::check_bits(bits)?;
        if let Some(l) = lead {
            kernels::check_bits(l.bits)?;
            ensure!(l.rows <= weight.rows(), "{} leading rows of a weight of {} rows", l.rows, weight.rows());
        }
        ensure!(kernel.backend.is_available(), "kernel backend {} is not supported by this CPU", kernel.backend);
        let bias = match bias {
            Some(b) => {
                ensure!(
                    b.dims() == [weight.rows()],
                    "bias of shape {:?} for a weight of {} rows",
                    b.dims(),
                    weight.rows()
                );
                Some(b.to_dtype(DType::F32)?.to_vec1()?)
            }
            None => None,
        };
        Ok(Linear::Planar { weight, bits, lead, kernel, bias })
    }

    /// Output features (rows of the weight).
    pub fn out_features(&self) -> usize {
        match self {
            Linear::Dense { weight, .. } => weight.dims()[0],
            Linear::Planar { weight, .. } => weight.rows(),
        }
    }

    /// The resident weight and its bit-width, for the kernel path.
    pub fn planar_weight(&self) -> Option<(&Arc<PlanarWeight>, u32)> {
        match self {
            Linear::Dense { .. } => None,
            Linear::Planar { weight, bits, .. } => Some((weight, *bits)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let inner = *dims.last().expect("activations have at least one dimension");
        let rows = x.elem_count() / inner.max(1);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = self.out_features();
        match self {
            Linear::Dense { weight, bias, observer } => {
                let x = x.reshape((rows, inner))?;
                if let Some(o) = observer {
                    o.sink.observe(&o.weight, &x)?;
                }
                let y = x.matmul(&weight.t()?)?;
                let y = match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                Ok(y.reshape(out_dims)?)
            }
            Linear::Planar { .. } => {
                let x: Vec<f32> = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                let mut y = vec![0f32; rows * self.out_features()];
                self.forward_rows(&x, rows, &mut y)?;
                Ok(Tensor::from_vec(y, out_dims, &Device::Cpu)?)
            }
        }
    }

    /// `y = x·Wᵀ (+ b)` on plain rows: `x` is `[rows, in]`, `y` is `[rows, out]` (the fused
    /// runtime's form; a dense weight goes through candle).
    pub(crate) fn forward_rows(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        let out = self.out_features();
        ensure!(y.len() == rows * out, "output of {} values for {rows} rows of {out}", y.len());
        match self {
            Linear::Dense { weight, .. } => {
                let inner = weight.dims()[1];
                ensure!(x.len() == rows * inner, "activations of {} values for {rows} rows of {inner}", x.len());
                let xt = Tensor::from_slice(x, (rows, inner), weight.device())?.to_dtype(weight.dtype())?;
                let yt = self.forward(&xt)?.to_dtype(DType::F32)?.flatten_all()?.to_device(&Device::Cpu)?;
                y.copy_from_slice(&yt.to_vec1::<f32>()?);
            }
            Linear::Planar { .. } => forward_rows_mixed(&[(self, rows)], x, y)?,
        }
        Ok(())
    }

    /// Where this layer's rows change precision: `Some(k)` when rows `0..k` are served wider
    /// than the rest (`0 < k < rows`).
    fn split_row(&self) -> Option<usize> {
        match self {
            Linear::Planar { weight, lead: Some(l), .. } if l.rows > 0 && l.rows < weight.rows() => Some(l.rows),
            _ => None,
        }
    }

    /// The bit-width of row `row` of a planar layer.
    fn bits_of_row(&self, row: usize) -> u32 {
        match self {
            Linear::Planar { lead: Some(l), .. } if row < l.rows => l.bits,
            Linear::Planar { bits, .. } => *bits,
            Linear::Dense { .. } => unreachable!("asked for planar layers only"),
        }
    }
}

/// `y = x·Wᵀ (+ b)` for consecutive row ranges each served by its own layer: `parts[i] = (layer,
/// n_i)` takes the next `n_i` rows of `x` (`[Σ n_i, in]`) into the same rows of `y`. When every
/// layer serves one resident weight with one kernel configuration (the same layer of
/// transformers at different precisions), the kernels make one pass over it for all of them
/// ([`PlanarWeight::matmul_multi`]); the rows get the same bits as each layer alone.
pub(crate) fn forward_rows_mixed(parts: &[(&Linear, usize)], x: &[f32], y: &mut [f32]) -> Result<()> {
    forward_rows_grouped(&mut [(parts, y)], x)
}

/// One layer group of [`forward_rows_grouped`]: its `(layer, rows)` parts as for
/// [`forward_rows_mixed`], and its output.
pub(crate) type LayerRows<'l, 'y> = (&'l [(&'l Linear, usize)], &'y mut [f32]);

/// [`forward_rows_mixed`] for several layers that read the same input `x` (a block's q, k and
/// v, or its gate and up), each into its own output: the resident weights among them, each
/// served with one kernel configuration, in one call of the kernels' threads when they share
/// it ([`kernels::matmul_group`]); every output gets the same bits as its layer alone.
pub(crate) fn forward_rows_grouped(layers: &mut [LayerRows<'_, '_>], x: &[f32]) -> Result<()> {
    let mut shapes = Vec::with_capacity(layers.len());
    for (parts, y) in layers.iter() {
        shapes.push(check_rows(parts, x, y.len())?);
    }
    let shared: Vec<Option<SharedWeight<'_>>> = layers.iter().map(|(parts, _)| shared_weight(parts)).collect();
    // A group whose rows change precision at a split row computes the rows on each side into
    // its own buffer, copied into the output after.
    let mut split_outputs: Vec<[Vec<f32>; 2]> = shapes
        .iter()
        .zip(&shared)
        .map(|(&(inner, out), sh)| match sh.as_ref().and_then(|sh| sh.split) {
            Some(k) => {
                let n = x.len() / inner.max(1);
                [vec![0f32; n * k], vec![0f32; n * (out - k)]]
            }
            None => [Vec::new(), Vec::new()],
        })
        .collect();
    let mut calls = Vec::new();
    for ((((parts, y), &(inner, out)), sh), split_out) in
        layers.iter_mut().zip(&shapes).zip(&shared).zip(split_outputs.iter_mut())
    {
        match sh {
            Some(SharedWeight { weight, kernel, split: None }) => {
                calls.push((*weight, *kernel, 0..out, planar_parts(parts, x, inner, 0..out, y)))
            }
            Some(SharedWeight { weight, kernel, split: Some(k) }) => {
                let [lo, hi] = split_out;
                calls.push((*weight, *kernel, 0..*k, planar_parts(parts, x, inner, 0..*k, lo)));
                calls.push((*weight, *kernel, *k..out, planar_parts(parts, x, inner, *k..out, hi)));
            }
            // Layer by layer (float weights, or several resident ones): each adds its own bias.
            None => {
                let (mut xs, mut ys) = (x, &mut **y);
                for &(layer, n) in parts.iter() {
                    let (xh, xt) = xs.split_at(n * inner);
                    let (yh, yt) = ys.split_at_mut(n * out);
                    layer.forward_rows(xh, n, yh)?;
                    (xs, ys) = (xt, yt);
                }
            }
        }
    }
    let mut groups: Vec<(&KernelConfig, Vec<WeightParts<'_, '_, '_>>)> = Vec::new();
    for (weight, kernel, rows, parts) in calls.iter_mut() {
        let call = WeightParts { weight: Arc::as_ref(*weight), rows: rows.clone(), parts: parts.as_mut_slice() };
        match groups.last_mut() {
            Some((k, group)) if *k == *kernel => group.push(call),
            _ => groups.push((*kernel, vec![call])),
        }
    }
    for (kernel, group) in groups.iter_mut() {
        kernels::matmul_group(group, kernel)?;
    }
    drop(groups);
    drop(calls);
    for ((((parts, y), &(_, out)), sh), [lo, hi]) in layers.iter_mut().zip(&shapes).zip(&shared).zip(&split_outputs) {
        if sh.is_none() {
            continue;
        }
        if let Some(SharedWeight { split: Some(k), .. }) = sh {
            for ((row, lo), hi) in y.chunks_exact_mut(out).zip(lo.chunks_exact(*k)).zip(hi.chunks_exact(out - k)) {
                row[..*k].copy_from_slice(lo);
                row[*k..].copy_from_slice(hi);
            }
        }
        let mut ys = &mut **y;
        for &(layer, n) in parts.iter() {
            let (yh, yt) = ys.split_at_mut(n * out);
            if let Linear::Planar { bias: Some(b), kernel, .. } = layer {
                for row in yh.chunks_exact_mut(out.max(1)) {
                    kernels::ops::add_assign(kernel.backend, row, b);
                }
            }
            ys = yt;
        }
    }
    Ok(())
}

/// The `(in, out)` features of a layer group of [`forward_rows_grouped`] (its first layer's), checked
/// against `x` and an output of `y_len` values.
fn check_rows(parts: &[(&Linear, usize)], x: &[f32], y_len: usize) -> Result<(usize, usize)> {
    let Some(&(first, _)) = parts.first() else { return Ok((0, 0)) };
    let (inner, out) = match first {
        Linear::Dense { weight, .. } => (weight.dims()[1], weight.dims()[0]),
        Linear::Planar { weight, .. } => (weight.cols(), weight.rows()),
    };
    let total: usize = parts.iter().map(|&(_, n)| n).sum();
    ensure!(x.len() == total * inner, "activations of {} values for {total} rows of {inner}", x.len());
    ensure!(y_len == total * out, "output of {y_len} values for {total} rows of {out}");
    Ok((inner, out))
}

/// The resident weight every layer of a group of [`forward_rows_grouped`] serves.
struct SharedWeight<'l> {
    weight: &'l Arc<PlanarWeight>,
    kernel: &'l KernelConfig,
    /// The row where the layers' precision changes, if it does.
    split: Option<usize>,
}

/// The resident weight and kernel configuration every layer of a group serves, if they share one,
/// and the row where their precision changes, if one does (they must agree on it).
fn shared_weight<'l>(parts: &[(&'l Linear, usize)]) -> Option<SharedWeight<'l>> {
    let Some(&(Linear::Planar { weight, kernel, .. }, _)) = parts.first() else { return None };
    let mut splits = parts.iter().filter_map(|(l, _)| l.split_row());
    let split = splits.next();
    let one_split = splits.all(|k| Some(k) == split);
    (one_split
        && parts.iter().all(
            |(l, _)| matches!(l, Linear::Planar { weight: w, kernel: k, .. } if Arc::ptr_eq(w, weight) && k == kernel),
        ))
    .then_some(SharedWeight { weight, kernel, split })
}

/// The kernels' parts of a group whose layers share one resident weight, for the weight's rows
/// `rows` (`y` is `[Σ n, rows.len()]`): each layer's rows at its precision there, at most
/// [`MAX_BATCH`] activation rows per part.
fn planar_parts<'a>(
    parts: &[(&Linear, usize)],
    x: &'a [f32],
    inner: usize,
    rows: Range<usize>,
    y: &'a mut [f32],
) -> Vec<MatmulPart<'a>> {
    let out = rows.len();
    let mut calls = Vec::new();
    let (mut xs, mut ys) = (x, y);
    for &(layer, n) in parts {
        let bits = layer.bits_of_row(rows.start);
        let (xh, xt) = xs.split_at(n * inner);
        let (yh, yt) = ys.split_at_mut(n * out);
        for (xc, yc) in xh.chunks(MAX_BATCH * inner.max(1)).zip(yh.chunks_mut(MAX_BATCH * out.max(1))) {
            calls.push(MatmulPart { bits, x: xc, n: yc.len() / out.max(1), y: yc });
        }
        (xs, ys) = (xt, yt);
    }
    calls
}

/// The token embedding: a float table, or a resident weight whose rows are decoded on lookup
/// (rows `0..lead.rows` at `lead.bits` when there is a `lead`).
#[derive(Debug, Clone)]
enum Embedding {
    Dense(Tensor),
    Planar { weight: Arc<PlanarWeight>, bits: u32, lead: Option<LeadingRows> },
}

impl Embedding {
    /// Rows `ids` (u32, flat) of the table, `[ids.len(), hidden]`.
    fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Embedding::Dense(table) => Ok(table.index_select(ids, 0)?),
            Embedding::Planar { weight, .. } => {
                let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                Ok(Tensor::from_vec(self.lookup_rows(&ids)?, (ids.len(), weight.cols()), &Device::Cpu)?)
            }
        }
    }

    /// Rows `ids` of the table as plain values, `[ids.len(), hidden]` (the fused runtime).
    fn lookup_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        match self {
            Embedding::Dense(table) => {
                let ids = Tensor::from_slice(ids, ids.len(), table.device())?;
                Ok(self.lookup(&ids)?.to_dtype(DType::F32)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?)
            }
            Embedding::Planar { weight, bits, lead } => {
                let cols = weight.cols();
                let mut out = vec![0f32; ids.len() * cols];
                let lead = lead.unwrap_or(LeadingRows { rows: 0, bits: *bits });
                // Runs of ids on one side of the lead decode in one call each.
                let mut start = 0;
                while start < ids.len() {
                    let wide = (ids[start] as usize) < lead.rows;
                    let len = ids[start..].iter().take_while(|&&i| ((i as usize) < lead.rows) == wide).count();
                    let rows: Vec<usize> = ids[start..start + len].iter().map(|&i| i as usize).collect();
                    let at = if wide { lead.bits } else { *bits };
                    weight.dequantize_rows(at, &rows, &mut out[start * cols..(start + len) * cols])?;
                    start += len;
                }
                Ok(out)
            }
        }
    }
}

/// A weight as a source hands it to the builder.
enum Param {
    Float(Tensor),
    /// A resident weight at its bits, with its wider leading rows if any.
    Planar(Arc<PlanarWeight>, u32, Option<LeadingRows>),
}

/// Where [`Transformer::build`] takes its weights from.
trait ParamSource {
    /// The weight `name`, checked against `shape`.
    fn param(&self, name: &str, shape: &[usize]) -> Result<Param>;
    /// The kernel configuration of planar weights.
    fn kernel(&self) -> KernelConfig;

    /// A tensor that must be float (norm, bias).
    fn float(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self.param(name, shape)? {
            Param::Float(t) => Ok(t),
            Param::Planar(..) => bail!("`{name}` must be a float tensor, but it is quantized"),
        }
    }

    /// Whether the weights are a resident model's (served by the fused runtime).
    fn resident(&self) -> bool {
        false
    }

    /// Who sees the inputs of the float linear layer of weight `name` (calibration); none by default.
    fn observer(&self, _name: &str) -> Option<Observer> {
        None
    }

    fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let bias = if bias { Some(self.float(&format!("{prefix}.bias"), &[out])?) } else { None };
        let name = format!("{prefix}.weight");
        match self.param(&name, &[out, inp])? {
            Param::Float(weight) => Ok(Linear::Dense { weight, bias, observer: self.observer(&name) }),
            Param::Planar(weight, bits, lead) => Linear::planar(weight, bits, lead, self.kernel(), bias),
        }
    }
}

impl ParamSource for Weights {
    fn param(&self, name: &str, shape: &[usize]) -> Result<Param> {
        Ok(Param::Float(self.get(name, shape)?))
    }

    fn kernel(&self) -> KernelConfig {
        KernelConfig::default()
    }
}

/// Float weights whose dense linear layers show their inputs to an observer.
struct ObservedSource<'a> {
    weights: &'a Weights,
    sink: Arc<dyn InputObserver>,
}

impl ParamSource for ObservedSource<'_> {
    fn param(&self, name: &str, shape: &[usize]) -> Result<Param> {
        self.weights.param(name, shape)
    }

    fn kernel(&self) -> KernelConfig {
        KernelConfig::default()
    }

    fn observer(&self, name: &str) -> Option<Observer> {
        Some(Observer { weight: name.to_string(), sink: self.sink.clone() })
    }
}

/// A resident model with a bit-width per quantized weight.
struct ResidentSource<'a, F> {
    model: &'a ResidentModel,
    bits: F,
    kernel: KernelConfig,
}

impl<F: Fn(&str) -> Option<u32>> ParamSource for ResidentSource<'_, F> {
    fn param(&self, name: &str, shape: &[usize]) -> Result<Param> {
        if let Some(w) = self.model.planar(name) {
            ensure!(
                [w.rows(), w.cols()] == shape,
                "resident weight `{name}` is {}x{}, expected {shape:?}",
                w.rows(),
                w.cols()
            );
            let bits = (self.bits)(name).with_context(|| {
                format!("no bit-width for the quantized weight `{name}` (a checkpoint stores no float copy of its quantized weights)")
            })?;
            return Ok(Param::Planar(w.clone(), bits, self.model.leading_rows(name, bits)));
        }
        let t = self.model.float(name).with_context(|| format!("missing tensor `{name}`"))?;
        ensure!(t.dims() == shape, "tensor `{name}` has shape {:?}, expected {shape:?}", t.dims());
        Ok(Param::Float(t.clone()))
    }

    fn kernel(&self) -> KernelConfig {
        self.kernel
    }

    fn resident(&self) -> bool {
        true
    }
}

struct Block {
    input_norm: Tensor,
    post_attention_norm: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// Keys and values of the tokens seen so far, per layer.
///
/// Decoding appends one position per step; copying the whole cache each time (a `cat`) would
/// make a sequence of n tokens cost O(n²) bytes moved, so both forms below keep spare capacity
/// and write new positions in place. A cache starts empty and takes the form of the runtime that
/// first fills it: candle tensors for float models, plain buffers for the fused runtime of
/// resident weights ([`Transformer::from_resident`]); the other runtime refuses it.
#[derive(Debug)]
pub struct KvCache {
    layers: usize,
    store: CacheStore,
}

#[derive(Debug)]
enum CacheStore {
    Empty,
    /// Per layer, `[batch, kv_heads, capacity, head_dim]` tensors valid up to `len`; the first
    /// append stores its tensors as they are (no copy, and gradients flow through them in
    /// training), later ones double the capacity when full.
    Tensors(Vec<Option<LayerCache>>),
    /// Per batch row, plain position-major buffers (the fused runtime).
    Host(Vec<HostSequence>),
}

#[derive(Debug)]
struct LayerCache {
    /// `[batch, kv_heads, capacity, head_dim]`, valid up to `len`.
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// One sequence's cache in the fused runtime, per layer: the keys transposed
/// ([`kernels::ops::CacheView`]: `[kv_heads · head_dim, capacity]`, so scoring a query is a
/// reduction-free pass over positions) and the values position-major (`[len, kv_heads ·
/// head_dim]`, so weighting them is one pass over each position's contiguous values).
#[derive(Debug)]
pub(crate) struct HostSequence {
    len: usize,
    /// Positions each row of `keys` has room for (a multiple of 16).
    capacity: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new(config: &ModelConfig) -> Self {
        Self { layers: config.num_hidden_layers, store: CacheStore::Empty }
    }

    /// The number of positions already cached.
    pub fn len(&self) -> usize {
        match &self.store {
            CacheStore::Empty => 0,
            CacheStore::Tensors(layers) => layers[0].as_ref().map_or(0, |l| l.len),
            CacheStore::Host(seqs) => seqs[0].len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The batch size of the cached sequences (`None` while empty).
    fn batch(&self) -> Option<usize> {
        match &self.store {
            CacheStore::Empty => None,
            CacheStore::Tensors(layers) => layers[0].as_ref().map(|l| l.k.dims()[0]),
            CacheStore::Host(seqs) => Some(seqs.len()),
        }
    }

    /// Appends `k`, `v` (`[batch, kv_heads, t, head_dim]`) to `layer` and returns every cached
    /// position of it.
    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if matches!(self.store, CacheStore::Empty) {
            self.store = CacheStore::Tensors((0..self.layers).map(|_| None).collect());
        }
        let CacheStore::Tensors(layers) = &mut self.store else {
            bail!(
                "this cache was filled by the kernel runtime of a resident model; the float runtime cannot continue it"
            );
        };
        let t = k.dim(2)?;
        let slot = &mut layers[layer];
        let Some(cache) = slot else {
            *slot = Some(LayerCache { k: k.clone(), v: v.clone(), len: t });
            return Ok((k, v));
        };
        let needed = cache.len + t;
        if needed > cache.k.dim(2)? {
            let capacity = needed.max(2 * cache.k.dim(2)?).max(64);
            let grow = |old: &Tensor| -> Result<Tensor> {
                let mut dims = old.dims().to_vec();
                dims[2] = capacity;
                let buffer = Tensor::zeros(dims, old.dtype(), old.device())?;
                buffer.slice_set(&old.narrow(2, 0, cache.len)?.contiguous()?, 2, 0)?;
                Ok(buffer)
            };
            cache.k = grow(&cache.k)?;
            cache.v = grow(&cache.v)?;
        }
        cache.k.slice_set(&k.contiguous()?, 2, cache.len)?;
        cache.v.slice_set(&v.contiguous()?, 2, cache.len)?;
        cache.len = needed;
        Ok((cache.k.narrow(2, 0, needed)?, cache.v.narrow(2, 0, needed)?))
    }

    /// The per-row caches of the fused runtime for a batch of `batch` rows (made on first use).
    fn host(&mut self, batch: usize) -> Result<&mut [HostSequence]> {
        if matches!(self.store, CacheStore::Empty) {
            let seq = || HostSequence {
                len: 0,
                capacity: 0,
                keys: (0..self.layers).map(|_| Vec::new()).collect(),
                values: (0..self.layers).map(|_| Vec::new()).collect(),
            };
            self.store = CacheStore::Host((0..batch).map(|_| seq()).collect());
        }
        match &mut self.store {
            CacheStore::Host(seqs) => {
                ensure!(seqs.len() == batch, "a cache of batch {} cannot take a batch of {batch}", seqs.len());
                Ok(seqs)
            }
            _ => bail!(
                "this cache was filled by the float runtime; the kernel runtime of a resident model cannot continue it"
            ),
        }
    }
}

/// One sequence's share of a [`Transformer::forward_batch`] step.
pub struct SequenceStep<'a> {
    /// The sequence's new tokens (at least one), following the positions in `cache`.
    pub tokens: &'a [u32],
    /// The sequence's own cache (batch 1).
    pub cache: &'a mut KvCache,
}

/// The sequences one transformer runs in a [`Transformer::forward_batches`] step.
pub struct Batch<'t, 's, 'a> {
    pub transformer: &'t Transformer,
    pub steps: &'s mut [SequenceStep<'a>],
}

/// The fused runtime's view of checked steps: each sequence's host cache, logits of its last
/// new position.
fn fused_sequences<'s>(steps: &'s mut [SequenceStep<'_>]) -> Result<Vec<fused::Sequence<'s>>> {
    steps
        .iter_mut()
        .map(|step| {
            let cache = &mut step.cache.host(1)?[0];
            Ok(fused::Sequence { tokens: step.tokens, cache, logits_from: step.tokens.len() - 1 })
        })
        .collect()
}

/// A decoder-only transformer over float [`Weights`] or a [`ResidentModel`].
pub struct Transformer {
    config: ModelConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    final_norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    mode: OpsMode,
    /// The plain-buffer runtime of a resident model (`None` for float weights).
    fused: Option<fused::Fused>,
}

impl Transformer {
    /// A transformer over float weights, multiplied by candle: the training path (with
    /// [`OpsMode::Differentiable`]) and the reference path of a checkpoint.
    pub fn new(config: &ModelConfig, weights: &Weights, mode: OpsMode) -> Result<Self> {
        Self::build(config, weights, mode)
    }

    /// A float transformer (inference) whose linear layers show their inputs to `sink` on every
    /// forward: calibration. A tied lm_head shows its inputs (the final hidden states, normed)
    /// under the embedding's name.
    pub fn observed(config: &ModelConfig, weights: &Weights, sink: Arc<dyn InputObserver>) -> Result<Self> {
        Self::build(config, &ObservedSource { weights, sink }, OpsMode::Inference)
    }

    /// A transformer serving `resident` at `precision` through the kernels: every quantized weight
    /// at `precision.bits_for(name, profiles)` bits, sharing the resident copy (nothing is decoded or
    /// copied here). Inference only.
    pub fn from_resident(resident: &ResidentModel, precision: &Precision, kernel: &KernelConfig) -> Result<Self> {
        // Resolve every weight once, up front, so an unknown profile is reported as such.
        let mut bits = std::collections::HashMap::new();
        for (name, _) in resident.planar_weights() {
            if let Some(b) =
                precision.bits_for(name, resident.profiles()).with_context(|| format!("precision `{precision}`"))?
            {
                bits.insert(name, b);
            }
        }
        Self::from_resident_with(resident, |name| bits.get(name).copied(), kernel)
            .with_context(|| format!("precision `{precision}`"))
    }

    /// [`Self::from_resident`] with a bit-width per quantized weight name (per-layer profiles);
    /// `None` for a quantized weight is an error.
    pub fn from_resident_with(
        resident: &ResidentModel,
        bits: impl Fn(&str) -> Option<u32>,
        kernel: &KernelConfig,
    ) -> Result<Self> {
        let source = ResidentSource { model: resident, bits, kernel: *kernel };
        Self::build(resident.config(), &source, OpsMode::Inference)
    }

    fn build(config: &ModelConfig, src: &impl ParamSource, mode: OpsMode) -> Result<Self> {
        config.validate()?;
        let h = config.hidden_size;
        let q_dim = config.num_attention_heads * config.head_dim;
        let kv_dim = config.num_key_value_heads * config.head_dim;
        let m = config.intermediate_size;
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let ab = config.attention_bias;
            blocks.push(Block {
                input_norm: src.float(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_attention_norm: src.float(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                q_proj: src.linear(&format!("{p}.self_attn.q_proj"), q_dim, h, ab)?,
                k_proj: src.linear(&format!("{p}.self_attn.k_proj"), kv_dim, h, ab)?,
                v_proj: src.linear(&format!("{p}.self_attn.v_proj"), kv_dim, h, ab)?,
                o_proj: src.linear(&format!("{p}.self_attn.o_proj"), h, q_dim, false)?,
                gate_proj: src.linear(&format!("{p}.mlp.gate_proj"), m, h, false)?,
                up_proj: src.linear(&format!("{p}.mlp.up_proj"), m, h, false)?,
                down_proj: src.linear(&format!("{p}.mlp.down_proj"), h, m, false)?,
            });
        }
        let (embed, lm_head) = match src.param(EMBED, &[config.vocab_size, h])? {
            Param::Float(table) => {
                let head = if config.tie_word_embeddings {
                    // Observed (calibration) under the embedding's name: its output role's inputs.
                    Linear::Dense { weight: table.clone(), bias: None, observer: src.observer(EMBED) }
                } else {
                    src.linear(lm_head_prefix(), config.vocab_size, h, false)?
                };
                (Embedding::Dense(table), head)
            }
            Param::Planar(weight, bits, lead) => {
                let head = if config.tie_word_embeddings {
                    // The tied head is the resident embedding itself, at the embedding's bits.
                    Linear::planar(weight.clone(), bits, lead, src.kernel(), None)?
                } else {
                    src.linear(lm_head_prefix(), config.vocab_size, h, false)?
                };
                (Embedding::Planar { weight, bits, lead }, head)
            }
        };
        // The tables live where the activations will: a float model may sit on a GPU (training).
        let device = match &embed {
            Embedding::Dense(table) => table.device().clone(),
            Embedding::Planar { .. } => Device::Cpu,
        };
        let (cos, sin) = rope_tables(config, &device)?;
        let final_norm = src.float(FINAL_NORM, &[h])?;
        let fused = match src.resident() {
            true => Some(fused::Fused::new(&blocks, &final_norm, &cos, &sin, src.kernel())?),
            false => None,
        };
        Ok(Self { config: config.clone(), embed, blocks, final_norm, lm_head, cos, sin, mode, fused })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Where the activations live: the float weights' device (the kernels run on the CPU).
    pub fn device(&self) -> &Device {
        self.cos.device()
    }

    /// Every resident weight this transformer serves through the kernels, with its bit-width, in
    /// a fixed order (embedding, each block's q, k, v, o, gate, up, down, then the lm_head, which
    /// is the embedding again when tied); empty on the float path.
    pub fn planar_weights(&self) -> Vec<(&Arc<PlanarWeight>, u32)> {
        let mut out = Vec::new();
        if let Embedding::Planar { weight, bits, .. } = &self.embed {
            out.push((weight, *bits));
        }
        for b in &self.blocks {
            for l in [&b.q_proj, &b.k_proj, &b.v_proj, &b.o_proj, &b.gate_proj, &b.up_proj, &b.down_proj] {
                out.extend(l.planar_weight());
            }
        }
        out.extend(self.lm_head.planar_weight());
        out
    }

    /// Runs `tokens` (`[batch, seq]`, u32) after the positions already in `cache`, appends their
    /// keys and values to it, and returns the logits of positions `logits_from..seq`
    /// (`[batch, seq - logits_from, vocab]`). Skipping the lm_head on positions nobody reads
    /// matters: on a 135M model it is a fifth of the work.
    pub fn forward(&self, tokens: &Tensor, cache: &mut KvCache, logits_from: usize) -> Result<Tensor> {
        let (batch, seq) = tokens.dims2()?;
        ensure!(seq > 0, "forward needs at least one token");
        ensure!(logits_from < seq, "logits_from ({logits_from}) must be below the sequence length ({seq})");
        let start = cache.len();
        self.check_positions(start, seq)?;
        let ids = tokens.flatten_all()?;
        self.check_ids(&ids.to_vec1::<u32>()?)?;
        if let Some(cached) = cache.batch() {
            ensure!(cached == batch, "a cache of batch {cached} cannot take a batch of {batch}");
        }
        if self.fused.is_some() {
            let ids = ids.to_vec1::<u32>()?;
            let mut seqs: Vec<fused::Sequence<'_>> = ids
                .chunks_exact(seq)
                .zip(cache.host(batch)?)
                .map(|(tokens, cache)| fused::Sequence { tokens, cache, logits_from })
                .collect();
            let logits = self.fused_forward(&mut seqs)?;
            return Ok(logits.reshape((batch, seq - logits_from, self.config.vocab_size))?);
        }
        let mut x = self.embed.lookup(&ids)?.reshape((batch, seq, self.config.hidden_size))?;
        let cos = self.cos.narrow(0, start, seq)?;
        let sin = self.sin.narrow(0, start, seq)?;
        let mask = causal_mask(seq, start, x.device())?;
        for (i, block) in self.blocks.iter().enumerate() {
            let h = self.rms_norm(&x, &block.input_norm)?;
            let (q, k, v) = (block.q_proj.forward(&h)?, block.k_proj.forward(&h)?, block.v_proj.forward(&h)?);
            let attn = self.self_attention(i, &q, &k, &v, &cos, &sin, mask.as_ref(), cache)?;
            x = self.block_tail(block, &x, &attn)?;
        }
        let x = x.narrow(1, logits_from, seq - logits_from)?;
        let x = self.rms_norm(&x, &self.final_norm)?;
        self.lm_head.forward(&x)
    }

    /// The embedding rows of `tokens` (`[batch, seq]`): the hidden states entering block 0.
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (batch, seq) = tokens.dims2()?;
        let ids = tokens.flatten_all()?;
        self.check_ids(&ids.to_vec1::<u32>()?)?;
        Ok(self.embed.lookup(&ids)?.reshape((batch, seq, self.config.hidden_size))?)
    }

    /// Block `layer` over whole sequences that start at position 0: its input hidden states
    /// `x` (`[batch, seq, hidden]`) to its output, with causal attention and no cache kept. The
    /// same operations as [`Self::forward`] runs for that block, so a model can be fitted (or
    /// checked) one block at a time.
    pub fn block_forward(&self, layer: usize, x: &Tensor) -> Result<Tensor> {
        let block = self.blocks.get(layer).with_context(|| format!("block {layer} of {}", self.blocks.len()))?;
        let (_, seq, _) = x.dims3()?;
        self.check_positions(0, seq)?;
        let (cos, sin) = (self.cos.narrow(0, 0, seq)?, self.sin.narrow(0, 0, seq)?);
        let mask = causal_mask(seq, 0, x.device())?;
        let h = self.rms_norm(x, &block.input_norm)?;
        let (q, k, v) = (block.q_proj.forward(&h)?, block.k_proj.forward(&h)?, block.v_proj.forward(&h)?);
        let attn =
            self.self_attention(layer, &q, &k, &v, &cos, &sin, mask.as_ref(), &mut KvCache::new(&self.config))?;
        self.block_tail(block, x, &attn)
    }

    /// The logits of hidden states leaving the last block: final norm, then the lm_head.
    /// [`Self::forward`] is `logits` of every block's [`Self::block_forward`] of [`Self::embed`].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(&self.head_input(hidden)?)
    }

    /// The final norm of hidden states leaving the last block: the lm_head's input.
    pub fn head_input(&self, hidden: &Tensor) -> Result<Tensor> {
        self.rms_norm(hidden, &self.final_norm)
    }

    /// One step over several independent sequences, each after the positions of its own cache:
    /// every linear layer multiplies the new rows of all sequences at once (the weights are read
    /// once per step, whatever the number of sequences), attention runs per sequence. Returns the
    /// logits of each sequence's last new position, `[steps.len(), vocab]`. Continuous batching
    /// is built on this: sequences of any length and progress share a step.
    pub fn forward_batch(&self, steps: &mut [SequenceStep<'_>]) -> Result<Tensor> {
        self.check_steps(steps)?;
        if self.fused.is_some() {
            return self.fused_forward(&mut fused_sequences(steps)?);
        }
        let mut ids = Vec::new();
        let mut spans = Vec::with_capacity(steps.len());
        for step in steps.iter() {
            spans.push((ids.len(), step.tokens.len(), step.cache.len()));
            ids.extend_from_slice(step.tokens);
        }
        let total = ids.len();
        let device = Device::Cpu;
        let mut x =
            self.embed.lookup(&Tensor::from_vec(ids, total, &device)?)?.reshape((1, total, self.config.hidden_size))?;
        let ropes = spans
            .iter()
            .map(|&(_, t, start)| {
                Ok((self.cos.narrow(0, start, t)?, self.sin.narrow(0, start, t)?, causal_mask(t, start, &device)?))
            })
            .collect::<Result<Vec<_>>>()?;
        for (i, block) in self.blocks.iter().enumerate() {
            let h = self.rms_norm(&x, &block.input_norm)?;
            let (q, k, v) = (block.q_proj.forward(&h)?, block.k_proj.forward(&h)?, block.v_proj.forward(&h)?);
            let mut parts = Vec::with_capacity(steps.len());
            for ((step, &(offset, t, _)), (cos, sin, mask)) in steps.iter_mut().zip(&spans).zip(&ropes) {
                let rows = |y: &Tensor| y.narrow(1, offset, t);
                parts.push(self.self_attention(
                    i,
                    &rows(&q)?,
                    &rows(&k)?,
                    &rows(&v)?,
                    cos,
                    sin,
                    mask.as_ref(),
                    step.cache,
                )?);
            }
            let attn = if parts.len() == 1 { parts.pop().unwrap() } else { Tensor::cat(&parts, 1)? };
            x = self.block_tail(block, &x, &attn)?;
        }
        let last: Vec<u32> = spans.iter().map(|&(offset, t, _)| (offset + t - 1) as u32).collect();
        let n = last.len();
        let x = x.squeeze(0)?.index_select(&Tensor::from_vec(last, n, &device)?, 0)?;
        let x = self.rms_norm(&x, &self.final_norm)?;
        self.lm_head.forward(&x)
    }

    /// One step over several batches, each through its own transformer: the precisions a
    /// server offers, built from one [`ResidentModel`]. Every batch gets what
    /// [`Self::forward_batch`] gives it alone (bit for bit), but the step runs once: each linear
    /// layer is one pass of the kernels over its resident weight for the rows of every precision
    /// (the planes read once, not once per precision), the other ops over all rows at once.
    /// Transformers that are not resident, or whose configurations differ, run one after the
    /// other. Returns each batch's logits, `[steps.len(), vocab]`, in order.
    pub fn forward_batches(batches: &mut [Batch<'_, '_, '_>]) -> Result<Vec<Tensor>> {
        for (i, batch) in batches.iter().enumerate() {
            batch.transformer.check_steps(batch.steps).with_context(|| format!("batch {i}"))?;
        }
        let shared = batches
            .iter()
            .all(|b| b.transformer.fused.is_some() && b.transformer.config == batches[0].transformer.config);
        if !shared {
            return batches.iter_mut().map(|b| b.transformer.forward_batch(b.steps)).collect();
        }
        let models: Vec<&Transformer> = batches.iter().map(|b| b.transformer).collect();
        let mut seqs = batches.iter_mut().map(|b| fused_sequences(b.steps)).collect::<Result<Vec<_>>>()?;
        let mut segments: Vec<fused::Segment<'_, '_, '_>> =
            models.into_iter().zip(seqs.iter_mut()).map(|(model, seqs)| fused::Segment { model, seqs }).collect();
        fused::fused_forward(&mut segments)
    }

    /// The checks of a [`Self::forward_batch`] step: at least one sequence, each with new tokens
    /// in the vocabulary, within the context, and a cache of batch 1.
    fn check_steps(&self, steps: &[SequenceStep<'_>]) -> Result<()> {
        ensure!(!steps.is_empty(), "forward_batch needs at least one sequence");
        for (n, step) in steps.iter().enumerate() {
            ensure!(!step.tokens.is_empty(), "sequence {n} of the batch has no new tokens");
            if let Some(cached) = step.cache.batch() {
                ensure!(cached == 1, "sequence {n}: forward_batch needs caches of batch 1, not {cached}");
            }
            self.check_positions(step.cache.len(), step.tokens.len()).with_context(|| format!("sequence {n}"))?;
            self.check_ids(step.tokens).with_context(|| format!("sequence {n}"))?;
        }
        Ok(())
    }

    fn check_positions(&self, start: usize, seq: usize) -> Result<()> {
        let max = self.config.max_position_embeddings;
        ensure!(start + seq <= max, "sequence of {} tokens exceeds the model's context of {max}", start + seq);
        Ok(())
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            bail!("token id {bad} is outside the vocabulary of {}", self.config.vocab_size);
        }
        Ok(())
    }

    /// The rest of a block after attention: output projection, residual, MLP, residual.
    fn block_tail(&self, block: &Block, x: &Tensor, attn: &Tensor) -> Result<Tensor> {
        let x1 = (x + block.o_proj.forward(attn)?)?;
        let h = self.rms_norm(&x1, &block.post_attention_norm)?;
        let gate = block.gate_proj.forward(&h)?;
        let up = block.up_proj.forward(&h)?;
        let h = block.down_proj.forward(&(candle_nn::ops::silu(&gate)? * up)?)?;
        Ok((x1 + h)?)
    }

    /// Attention of projected `q`, `k`, `v` (`[b, t, heads·head_dim]`) over the cached positions
    /// and themselves; appends `k`, `v` to the cache. Returns `[b, t, heads·head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn self_attention(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let c = &self.config;
        let (hq, hkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let heads =
            |y: &Tensor, n: usize| -> Result<Tensor> { Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?) };
        let q = self.rope(&heads(q, hq)?, cos, sin)?;
        let k = self.rope(&heads(k, hkv)?, cos, sin)?;
        let (k, v) = cache.append(layer, k, heads(v, hkv)?)?;
        let s = k.dim(2)?;
        // Grouped-query attention without copying K/V: query head h uses KV head h / rep, so
        // fold the rep query heads of each KV head into the sequence dimension.
        let rep = hq / hkv;
        let q = q.reshape((b, hkv, rep * t, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = match mask {
            Some(m) => scores.reshape((b, hkv, rep, t, s))?.broadcast_add(m)?.reshape((b, hkv, rep * t, s))?,
            None => scores,
        };
        let probs = match self.mode {
            OpsMode::Inference => candle_nn::ops::softmax_last_dim(&scores)?,
            OpsMode::Differentiable => candle_nn::ops::softmax(&scores, D::Minus1)?,
        };
        let out = probs.matmul(&v)?; // [b, hkv, rep*t, d]
        Ok(out.reshape((b, hq, t, d))?.transpose(1, 2)?.reshape((b, t, hq * d))?)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps as f32;
        Ok(match self.mode {
            OpsMode::Inference => candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps)?,
            OpsMode::Differentiable => candle_nn::ops::rms_norm_slow(x, weight, eps)?,
        })
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(match self.mode {
            OpsMode::Inference => candle_nn::rotary_emb::rope(x, cos, sin)?,
            OpsMode::Differentiable => candle_nn::rotary_emb::rope_slow(x, cos, sin)?,
        })
    }
}

/// [`LM_HEAD`] without `.weight`.
fn lm_head_prefix() -> &'static str {
    LM_HEAD.strip_suffix(".weight").expect("weight names end in .weight")
}

/// `[seq, start + seq]` additive mask hiding future positions; `None` when nothing is hidden.
fn causal_mask(seq: usize, start: usize, device: &Device) -> Result<Option<Tensor>> {
    if seq == 1 {
        return Ok(None);
    }
    let total = start + seq;
    let mask: Vec<f32> =
        (0..seq).flat_map(|i| (0..total).map(move |j| if j > start + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Some(Tensor::from_vec(mask, (seq, total), device)?))
}

/// Cosine and sine tables `[max_positions, head_dim / 2]` in the Hugging Face (rotate-half)
/// convention, with Llama 3 frequency scaling when configured.
fn rope_tables(config: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let d = config.head_dim;
    let mut inv_freq: Vec<f64> = (0..d / 2).map(|i| 1.0 / config.rope_theta.powf(2.0 * i as f64 / d as f64)).collect();
    if let Some(scaling) = &config.rope_scaling {
        inv_freq = inv_freq.into_iter().map(|f| llama3_scale(f, scaling)).collect();
    }
    let n = config.max_position_embeddings;
    let mut cos = Vec::with_capacity(n * d / 2);
    let mut sin = Vec::with_capacity(n * d / 2);
    for p in 0..n {
        for f in &inv_freq {
            let angle = p as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((Tensor::from_vec(cos, (n, d / 2), device)?, Tensor::from_vec(sin, (n, d / 2), device)?))
}

/// Llama 3.1's rule: keep high frequencies, divide low ones by `factor`, blend in between.
fn llama3_scale(freq: f64, s: &Llama3RopeScaling) -> f64 {
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (s.original_max_position_embeddings as f64 / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}
