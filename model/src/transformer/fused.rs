//! The fused runtime of a resident model: the same forward as the candle ops of
//! [`Transformer::forward`], run on plain preallocated buffers. The linear layers are the
//! bit-plane kernels; RMSNorm, RoPE, attention over the cache, SiLU·mul and the residual adds are
//! [`kernels::ops`]; nothing allocates per op. A decode step of a 135M model is ~200 small
//! mat-vecs and ~450 element-wise ops: through a tensor library the latter cost about as much
//! as the mat-vecs, here a small fraction of them.
//!
//! Every position's output depends only on its sequence (attention of each new position is
//! computed alone, over its own prefix of the cache), so a sequence decodes to the same bits
//! whatever else shares its step.

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use kernels::ops::{self, AttentionShape};
use kernels::KernelConfig;

use super::{forward_rows_grouped, forward_rows_mixed, Block, HostSequence, Linear, Transformer};

/// What the fused runtime keeps beside the transformer's weights: the norms and the RoPE tables
/// as plain values.
pub(super) struct Fused {
    /// Per block, the input and post-attention norm weights.
    norms: Vec<[Vec<f32>; 2]>,
    final_norm: Vec<f32>,
    /// `[max_positions, head_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    kernel: KernelConfig,
}

impl Fused {
    pub(super) fn new(
        blocks: &[Block],
        final_norm: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        kernel: KernelConfig,
    ) -> Result<Self> {
        let values = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?)
        };
        Ok(Fused {
            norms: blocks
                .iter()
                .map(|b| Ok([values(&b.input_norm)?, values(&b.post_attention_norm)?]))
                .collect::<Result<_>>()?,
            final_norm: values(final_norm)?,
            cos: values(cos)?,
            sin: values(sin)?,
            kernel,
        })
    }
}

/// One sequence of a fused step: new tokens after the positions of its cache, and the first of
/// them whose logits are wanted.
pub(super) struct Sequence<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut HostSequence,
    pub logits_from: usize,
}

/// The step's activations, `[rows, width]` each.
struct Buffers {
    x: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    scores: Vec<f32>,
}

/// The sequences one transformer runs in a fused step. Several segments share a step when
/// they are transformers of one resident model at different precisions: their linear layers
/// then make one pass over each weight for all of them.
pub(super) struct Segment<'t, 's, 'a> {
    /// A resident transformer (one with a fused runtime).
    pub model: &'t Transformer,
    pub seqs: &'s mut [Sequence<'a>],
}

impl Transformer {
    /// Runs every sequence's new tokens through the model, appending their keys and values to
    /// the sequences' caches, and returns the logits of the positions asked for, sequence after
    /// sequence, `[rows, vocab]`. Callers have checked the tokens and positions. On an error
    /// the caches are left as they were.
    pub(super) fn fused_forward(&self, seqs: &mut [Sequence<'_>]) -> Result<Tensor> {
        let mut logits = fused_forward(&mut [Segment { model: self, seqs }])?;
        Ok(logits.pop().expect("one segment, one result"))
    }
}

/// [`Transformer::fused_forward`] for several segments (transformers of one configuration) in
/// one step: the logits of each segment, in order.
pub(super) fn fused_forward(segments: &mut [Segment<'_, '_, '_>]) -> Result<Vec<Tensor>> {
    let starts: Vec<Vec<usize>> = segments.iter().map(|g| g.seqs.iter().map(|s| s.cache.len).collect()).collect();
    let result = fused_steps(segments);
    for (g, starts) in segments.iter_mut().zip(&starts) {
        let c = &g.model.config;
        for (s, &start) in g.seqs.iter_mut().zip(starts) {
            match result {
                Ok(_) => s.cache.len = start + s.tokens.len(),
                // Keys past `len` are never read; the values are cut back.
                Err(_) => {
                    let kv_dim = c.num_key_value_heads * c.head_dim;
                    for buf in s.cache.values.iter_mut() {
                        buf.truncate(start * kv_dim);
                    }
                }
            }
        }
    }
    result
}

fn fused_steps(segments: &mut [Segment<'_, '_, '_>]) -> Result<Vec<Tensor>> {
    // The segments' models, apart from their sequences (which the step mutates).
    let models = segments
        .iter()
        .map(|g| Ok((g.model, g.model.fused.as_ref().context("a fused step needs resident transformers")?)))
        .collect::<Result<Vec<(&Transformer, &Fused)>>>()?;
    let Some(&(first, first_fused)) = models.first() else { return Ok(Vec::new()) };
    let c = &first.config;
    ensure!(
        models.iter().all(|(t, _)| t.config == *c),
        "the transformers of one step must share one model configuration"
    );
    let shape = AttentionShape { heads: c.num_attention_heads, kv_heads: c.num_key_value_heads, head_dim: c.head_dim };
    let (h, m, half) = (c.hidden_size, c.intermediate_size, c.head_dim / 2);
    let (q_dim, kv_dim) = (shape.q_dim(), shape.kv_dim());
    let eps = c.rms_norm_eps as f32;
    // Rows of each segment (its sequences' new tokens), consecutive in the step's buffers.
    let seg_rows: Vec<usize> = segments.iter().map(|g| g.seqs.iter().map(|s| s.tokens.len()).sum()).collect();
    let rows: usize = seg_rows.iter().sum();
    let mut x = Vec::with_capacity(rows * h);
    let mut longest = 0;
    for g in segments.iter_mut() {
        for s in g.seqs.iter_mut() {
            s.cache.reserve(s.cache.len + s.tokens.len(), kv_dim);
            longest = longest.max(s.cache.capacity);
        }
        let ids: Vec<u32> = g.seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        x.extend(g.model.embed.lookup_rows(&ids)?);
    }
    ensure!(x.len() == rows * h, "embedding rows of {} values, expected {h}", x.len() / rows.max(1));
    let mut b = Buffers {
        x,
        normed: vec![0.0; rows * h],
        q: vec![0.0; rows * q_dim],
        k: vec![0.0; rows * kv_dim],
        v: vec![0.0; rows * kv_dim],
        attn: vec![0.0; rows * q_dim],
        gate: vec![0.0; rows * m],
        up: vec![0.0; rows * m],
        scores: vec![0.0; longest],
    };
    let backend = first_fused.kernel.backend;
    for layer in 0..c.num_hidden_layers {
        norm_rows(&models, &seg_rows, h, eps, |f| &f.norms[layer][0], &b.x, &mut b.normed);
        let linear = |pick: fn(&Block) -> &Linear| -> Vec<(&Linear, usize)> {
            models.iter().zip(&seg_rows).map(|((t, _), &n)| (pick(&t.blocks[layer]), n)).collect()
        };
        let (q, k, v) = (linear(|b| &b.q_proj), linear(|b| &b.k_proj), linear(|b| &b.v_proj));
        let (o, gate, up, down) =
            (linear(|b| &b.o_proj), linear(|b| &b.gate_proj), linear(|b| &b.up_proj), linear(|b| &b.down_proj));
        // q, k and v in one call of the kernel threads: k and v alone are too small to split
        // at low precision (W2 +3–8% in drq-bench with 2 threads; gate and up, each large
        // enough to split, gained nothing grouped).
        forward_rows_grouped(&mut [(&q, &mut b.q), (&k, &mut b.k), (&v, &mut b.v)], &b.normed)?;
        // RoPE and the new keys and values into each sequence's cache, then attention of every
        // new position of the step over its own prefix, split over the kernel threads.
        let mut offset = 0;
        for (g, &(_, fused)) in segments.iter_mut().zip(&models) {
            for s in g.seqs.iter_mut() {
                let (start, t) = (s.cache.len, s.tokens.len());
                for i in 0..t {
                    let (row, pos) = (offset + i, start + i);
                    let (cos, sin) = (&fused.cos[pos * half..][..half], &fused.sin[pos * half..][..half]);
                    ops::rope(fused.kernel.backend, &mut b.q[row * q_dim..][..q_dim], c.head_dim, cos, sin);
                    ops::rope(fused.kernel.backend, &mut b.k[row * kv_dim..][..kv_dim], c.head_dim, cos, sin);
                }
                let stride = s.cache.capacity;
                let (keys, values) = (&mut s.cache.keys[layer], &mut s.cache.values[layer]);
                for i in 0..t {
                    ops::store_key(keys, stride, start + i, &b.k[(offset + i) * kv_dim..][..kv_dim]);
                }
                values.extend_from_slice(&b.v[offset * kv_dim..(offset + t) * kv_dim]);
                offset += t;
            }
        }
        let caches: Vec<(ops::CacheView<'_>, usize)> = segments
            .iter()
            .flat_map(|g| g.seqs.iter())
            .map(|s| {
                let (keys, values) = (&s.cache.keys[layer], &s.cache.values[layer]);
                (ops::CacheView { keys, stride: s.cache.capacity, values, len: s.cache.len }, s.tokens.len())
            })
            .collect();
        attend_rows(first_fused.kernel, shape, &b.q, &caches, &mut b.scores, &mut b.attn);
        forward_rows_mixed(&o, &b.attn, &mut b.normed)?;
        ops::add_assign(backend, &mut b.x, &b.normed);
        norm_rows(&models, &seg_rows, h, eps, |f| &f.norms[layer][1], &b.x, &mut b.normed);
        forward_rows_mixed(&gate, &b.normed, &mut b.gate)?;
        forward_rows_mixed(&up, &b.normed, &mut b.up)?;
        ops::silu_mul(backend, &mut b.gate, &b.up);
        forward_rows_mixed(&down, &b.gate, &mut b.normed)?;
        ops::add_assign(backend, &mut b.x, &b.normed);
    }
    // The final norm and the lm_head only for the positions whose logits are wanted.
    let mut last = Vec::new();
    let mut out_rows = Vec::with_capacity(segments.len());
    let mut offset = 0;
    for g in segments.iter() {
        let before = last.len();
        for s in g.seqs.iter() {
            last.extend_from_slice(&b.x[(offset + s.logits_from) * h..(offset + s.tokens.len()) * h]);
            offset += s.tokens.len();
        }
        out_rows.push((last.len() - before) / h);
    }
    let mut normed = vec![0.0; last.len()];
    norm_rows(&models, &out_rows, h, eps, |f| &f.final_norm, &last, &mut normed);
    let at: usize = out_rows.iter().sum();
    let heads: Vec<(&Linear, usize)> = models.iter().zip(&out_rows).map(|((t, _), &n)| (&t.lm_head, n)).collect();
    let mut logits = vec![0.0; at * c.vocab_size];
    forward_rows_mixed(&heads, &normed, &mut logits)?;
    let mut out = Vec::with_capacity(segments.len());
    let mut rest = logits;
    for &n in &out_rows {
        let tail = rest.split_off(n * c.vocab_size);
        out.push(Tensor::from_vec(rest, (n, c.vocab_size), &Device::Cpu)?);
        rest = tail;
    }
    Ok(out)
}

/// RMSNorm of each segment's `rows[i]` consecutive rows of `x` into `out`, with the weight
/// `weight` picks from the segment's fused runtime.
fn norm_rows(
    models: &[(&Transformer, &Fused)],
    rows: &[usize],
    width: usize,
    eps: f32,
    weight: impl Fn(&Fused) -> &[f32],
    x: &[f32],
    out: &mut [f32],
) {
    let mut offset = 0;
    for ((_, fused), &n) in models.iter().zip(rows) {
        let r = offset * width..(offset + n) * width;
        ops::rms_norm(fused.kernel.backend, &x[r.clone()], weight(fused), eps, &mut out[r]);
        offset += n;
    }
}

/// Causal attention of every new position of a step: `caches[i]` is sequence `i`'s cache (its
/// `len` the positions before this step's, whose keys and values it already holds too) and its
/// number of new positions, whose queries are the next rows of `q` (`[rows, heads · head_dim]`,
/// sequence after sequence); the outputs go to the same rows of `out`; `scores` is scratch for
/// the longest cache. Position `j` of a
/// sequence attends to the first `len + j + 1` cached positions, computed alone, so the result
/// depends neither on the other sequences nor on how the rows are shared out: many rows (the
/// sequences of a batched decode step, a prefill) are split over the kernel threads in
/// contiguous shares of about equal work.
fn attend_rows(
    kernel: KernelConfig,
    shape: AttentionShape,
    q: &[f32],
    caches: &[(ops::CacheView<'_>, usize)],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let q_dim = shape.q_dim();
    // Each row's cache view (the positions it attends to) and cost.
    let rows: Vec<ops::CacheView<'_>> = caches
        .iter()
        .flat_map(|&(cache, t)| (0..t).map(move |i| ops::CacheView { len: cache.len + i + 1, ..cache }))
        .collect();
    let attend = |first: usize, out: &mut [f32], scores: &mut [f32]| {
        for (k, o) in out.chunks_exact_mut(q_dim).enumerate() {
            let r = first + k;
            ops::attend(kernel.backend, shape, &q[r * q_dim..][..q_dim], rows[r], scores, o);
        }
    };
    let total: usize = rows.iter().map(|c| c.len).sum();
    // Below this many cached positions attended in all, a second thread costs more than it saves.
    const MIN_POSITIONS_TO_SPLIT: usize = 256;
    let shares = if total >= MIN_POSITIONS_TO_SPLIT { kernel.threads.clamp(1, rows.len().max(1)) } else { 1 };
    if shares == 1 {
        attend(0, out, scores);
        return;
    }
    // Cut where the running cost passes each share's part.
    let mut bounds = vec![0];
    let mut cost = 0;
    for (r, c) in rows.iter().enumerate() {
        cost += c.len;
        if bounds.len() < shares && cost * shares >= total * bounds.len() {
            bounds.push(r + 1);
        }
    }
    bounds.push(rows.len());
    bounds.dedup();
    let mut parts = Vec::with_capacity(bounds.len() - 1);
    let mut rest = out;
    for w in bounds.windows(2) {
        let (head, tail) = rest.split_at_mut((w[1] - w[0]) * q_dim);
        parts.push(std::sync::Mutex::new(head));
        rest = tail;
    }
    kernels::run_shares(parts.len(), |s| {
        let mut part = parts[s].lock().unwrap_or_else(|e| e.into_inner());
        attend(bounds[s], &mut part, &mut vec![0f32; scores.len()]);
    });
}

impl HostSequence {
    /// Makes room for `positions` cached positions: the transposed keys' rows are re-laid out
    /// with a capacity at least doubled (a multiple of 16), so appending stays amortized O(1).
    fn reserve(&mut self, positions: usize, kv_dim: usize) {
        if positions <= self.capacity {
            return;
        }
        let capacity = positions.max(2 * self.capacity).max(64).next_multiple_of(16);
        for keys in &mut self.keys {
            let mut grown = vec![0f32; kv_dim * capacity];
            if self.capacity > 0 {
                for (new, old) in grown.chunks_exact_mut(capacity).zip(keys.chunks_exact(self.capacity)) {
                    new[..self.len].copy_from_slice(&old[..self.len]);
                }
            }
            *keys = grown;
        }
        for values in &mut self.values {
            values.reserve(kv_dim * (capacity - self.len));
        }
        self.capacity = capacity;
    }
}
