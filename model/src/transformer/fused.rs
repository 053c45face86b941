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

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use kernels::ops::{self, AttentionShape};
use kernels::KernelConfig;

use super::{Block, HostSequence, Transformer};

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

impl Transformer {
    /// Runs every sequence's new tokens through the model, appending their keys and values to
    /// the sequences' caches, and returns the logits of the positions asked for, sequence after
    /// sequence, `[rows, vocab]`. Callers have checked the tokens and positions. On an error
    /// the caches are left as they were.
    pub(super) fn fused_forward(&self, fused: &Fused, seqs: &mut [Sequence<'_>]) -> Result<Tensor> {
        let starts: Vec<usize> = seqs.iter().map(|s| s.cache.len).collect();
        let result = self.fused_steps(fused, seqs);
        for (s, &start) in seqs.iter_mut().zip(&starts) {
            match result {
                Ok(_) => s.cache.len = start + s.tokens.len(),
                // Keys past `len` are never read; the values are cut back.
                Err(_) => {
                    let kv_dim = self.config.num_key_value_heads * self.config.head_dim;
                    for buf in s.cache.values.iter_mut() {
                        buf.truncate(start * kv_dim);
                    }
                }
            }
        }
        result
    }

    fn fused_steps(&self, fused: &Fused, seqs: &mut [Sequence<'_>]) -> Result<Tensor> {
        let c = &self.config;
        let shape =
            AttentionShape { heads: c.num_attention_heads, kv_heads: c.num_key_value_heads, head_dim: c.head_dim };
        let (h, m, half) = (c.hidden_size, c.intermediate_size, c.head_dim / 2);
        let (q_dim, kv_dim) = (shape.q_dim(), shape.kv_dim());
        let backend = fused.kernel.backend;
        let rows: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        for s in seqs.iter_mut() {
            s.cache.reserve(s.cache.len + s.tokens.len(), kv_dim);
        }
        let longest = seqs.iter().map(|s| s.cache.capacity).max().unwrap_or(0);
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let mut b = Buffers {
            x: self.embed.lookup_rows(&ids)?,
            normed: vec![0.0; rows * h],
            q: vec![0.0; rows * q_dim],
            k: vec![0.0; rows * kv_dim],
            v: vec![0.0; rows * kv_dim],
            attn: vec![0.0; rows * q_dim],
            gate: vec![0.0; rows * m],
            up: vec![0.0; rows * m],
            scores: vec![0.0; longest],
        };
        ensure!(b.x.len() == rows * h, "embedding rows of {} values, expected {h}", b.x.len() / rows.max(1));
        for (layer, (block, [input_norm, post_norm])) in self.blocks.iter().zip(&fused.norms).enumerate() {
            ops::rms_norm(backend, &b.x, input_norm, c.rms_norm_eps as f32, &mut b.normed);
            block.q_proj.forward_rows(&b.normed, rows, &mut b.q)?;
            block.k_proj.forward_rows(&b.normed, rows, &mut b.k)?;
            block.v_proj.forward_rows(&b.normed, rows, &mut b.v)?;
            let mut offset = 0;
            for s in seqs.iter_mut() {
                let (start, t) = (s.cache.len, s.tokens.len());
                for i in 0..t {
                    let (row, pos) = (offset + i, start + i);
                    let (cos, sin) = (&fused.cos[pos * half..][..half], &fused.sin[pos * half..][..half]);
                    ops::rope(backend, &mut b.q[row * q_dim..][..q_dim], c.head_dim, cos, sin);
                    ops::rope(backend, &mut b.k[row * kv_dim..][..kv_dim], c.head_dim, cos, sin);
                }
                let stride = s.cache.capacity;
                let (keys, values) = (&mut s.cache.keys[layer], &mut s.cache.values[layer]);
                for i in 0..t {
                    ops::store_key(keys, stride, start + i, &b.k[(offset + i) * kv_dim..][..kv_dim]);
                }
                values.extend_from_slice(&b.v[offset * kv_dim..(offset + t) * kv_dim]);
                let cache = ops::CacheView { keys, stride, values, len: start };
                let rows = offset * q_dim..(offset + t) * q_dim;
                attend_positions(fused.kernel, shape, &b.q[rows.clone()], cache, &mut b.scores, &mut b.attn[rows]);
                offset += t;
            }
            block.o_proj.forward_rows(&b.attn, rows, &mut b.normed)?;
            ops::add_assign(backend, &mut b.x, &b.normed);
            ops::rms_norm(backend, &b.x, post_norm, c.rms_norm_eps as f32, &mut b.normed);
            block.gate_proj.forward_rows(&b.normed, rows, &mut b.gate)?;
            block.up_proj.forward_rows(&b.normed, rows, &mut b.up)?;
            ops::silu_mul(backend, &mut b.gate, &b.up);
            block.down_proj.forward_rows(&b.gate, rows, &mut b.normed)?;
            ops::add_assign(backend, &mut b.x, &b.normed);
        }
        // The final norm and the lm_head only for the positions whose logits are wanted.
        let mut last = Vec::new();
        let mut offset = 0;
        for s in seqs.iter() {
            last.extend_from_slice(&b.x[(offset + s.logits_from) * h..(offset + s.tokens.len()) * h]);
            offset += s.tokens.len();
        }
        let out_rows = last.len() / h;
        let mut normed = vec![0.0; last.len()];
        ops::rms_norm(backend, &last, &fused.final_norm, c.rms_norm_eps as f32, &mut normed);
        let mut logits = vec![0.0; out_rows * c.vocab_size];
        self.lm_head.forward_rows(&normed, out_rows, &mut logits)?;
        Ok(Tensor::from_vec(logits, (out_rows, c.vocab_size), &Device::Cpu)?)
    }
}

/// Causal attention of `q`'s consecutive new positions (`[t, heads · head_dim]`), the first
/// after the `cache.len` positions before them (whose keys and values, and the new positions',
/// are in `cache`), into `out`. Position `i` attends to the first `cache.len + i + 1` cached
/// positions, computed alone, so the result does not depend on how positions are grouped or
/// shared out. Many positions (a prefill, an evaluation window) are split over the kernel
/// threads in contiguous shares of about equal work.
fn attend_positions(
    kernel: KernelConfig,
    shape: AttentionShape,
    q: &[f32],
    cache: ops::CacheView<'_>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let q_dim = shape.q_dim();
    let (t, start) = (q.len() / q_dim, cache.len);
    let attend = |i: usize, scores: &mut [f32], out: &mut [f32]| {
        let cache = ops::CacheView { len: start + i + 1, ..cache };
        ops::attend(kernel.backend, shape, &q[i * q_dim..][..q_dim], cache, scores, out);
    };
    // Below this many positions a second thread costs more than it saves.
    const MIN_POSITIONS_TO_SPLIT: usize = 16;
    let shares = if t >= MIN_POSITIONS_TO_SPLIT { kernel.threads.clamp(1, t) } else { 1 };
    if shares == 1 {
        for (i, o) in out.chunks_exact_mut(q_dim).enumerate() {
            attend(i, scores, o);
        }
        return;
    }
    // Position i costs ~ start + i + 1: cut where the running cost passes each share's part.
    let total: usize = (0..t).map(|i| start + i + 1).sum();
    let mut bounds = vec![0];
    let mut cost = 0;
    for i in 0..t {
        cost += start + i + 1;
        if bounds.len() < shares && cost * shares >= total * bounds.len() {
            bounds.push(i + 1);
        }
    }
    bounds.push(t);
    bounds.dedup();
    let mut parts = Vec::with_capacity(bounds.len() - 1);
    let mut rest = out;
    for w in bounds.windows(2) {
        let (head, tail) = rest.split_at_mut((w[1] - w[0]) * q_dim);
        parts.push(std::sync::Mutex::new((head, vec![0f32; scores.len()])));
        rest = tail;
    }
    kernels::run_shares(parts.len(), |s| {
        let mut part = parts[s].lock().unwrap_or_else(|e| e.into_inner());
        let (out, scores) = &mut *part;
        for (k, o) in out.chunks_exact_mut(q_dim).enumerate() {
            attend(bounds[s] + k, scores, o);
        }
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
