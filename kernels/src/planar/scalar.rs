//! Portable kernels (the reference): SWAR decoding 8 weights at a time, i64 integer dot
//! products, f32 dot products with 8 independent partial sums.

use super::{
    by_bits, combine_fine, combine_int, dequant_row, Acts, Job, PlanarWeight, Prec, Scratch, FINE_BLOCK, WORD_BITS,
};
use std::ops::Range;

/// `SPREAD[b]` has bit `k` of `b` in the low bit of byte `k`.
const SPREAD: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 8 {
            t[b] |= (((b >> k) & 1) as u64) << (8 * k);
            k += 1;
        }
        b += 1;
    }
    t
};

/// Decodes row `r` at precision `N` into `out[..cols_padded]`: `u_l` bytes, or `q_l` as i8
/// bytes when `signed`.
fn decode_row_n<const N: usize>(w: &PlanarWeight, r: usize, prec: Prec, signed: bool, out: &mut [u8]) {
    let rp = w.row_planes(r, prec.bits);
    let off = if signed { prec.half } else { 0 };
    for (wi, chunk) in out[..w.cols_padded()].chunks_exact_mut(WORD_BITS).enumerate() {
        let (tops, carry) = rp.word::<N>(wi);
        for (k, dst) in chunk.chunks_exact_mut(8).enumerate() {
            let byte = |m: u64| SPREAD[((m >> (8 * k)) & 0xFF) as usize];
            let mut v = 0u64;
            for (t, &m) in tops.iter().enumerate() {
                v |= byte(m) << (N - 1 - t);
            }
            // No byte overflows: u_l ≤ 2^l − 1 below 8 bits (carry is masked), u + d ≤ 255 at 8.
            v += byte(carry);
            for (o, b) in dst.iter_mut().zip(v.to_le_bytes()) {
                *o = b.wrapping_sub(off);
            }
        }
    }
}

pub(super) fn decode_row(w: &PlanarWeight, r: usize, prec: Prec, signed: bool, out: &mut [u8]) {
    by_bits!(prec.bits, decode_row_n(w, r, prec, signed, out))
}

/// Σ_j q[j] · x[j] over `range`, exactly.
fn dot_i8(q: &[u8], x: &[i8], range: Range<usize>) -> i64 {
    q[range.clone()].iter().zip(&x[range]).map(|(&a, &b)| i64::from(a as i8) * i64::from(b)).sum()
}

/// Σ_j w[j] · x[j] with 8 partial sums (lengths are multiples of 64).
fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (a, b) in w.chunks_exact(8).zip(x.chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += a[k] * b[k];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

pub(super) fn run(job: &Job<'_>, range: Range<usize>, out: &mut [&mut [f32]]) {
    let w = job.w;
    let cp = w.cols_padded();
    let ng = w.layout.n_groups();
    let mut sc = Scratch::new(cp, 0);
    for (i, r) in range.enumerate() {
        decode_row(w, r, job.prec, true, &mut sc.bytes);
        match job.acts {
            Acts::F32 { x, stride } => {
                dequant_row(job, r, &sc.bytes, &mut sc.wrow);
                for (b, o) in out.iter_mut().enumerate() {
                    o[i] = dot_f32(&sc.wrow, &x[b * stride..b * stride + cp]);
                }
            }
            Acts::Int8 { xq, stride, scale, .. } => {
                for (b, o) in out.iter_mut().enumerate() {
                    let xb = &xq[b * stride..(b + 1) * stride];
                    o[i] = combine_int(job, r, &scale[b * ng..(b + 1) * ng], |g| {
                        dot_i8(&sc.bytes, xb, w.layout.group_cols(g))
                    });
                }
            }
            Acts::Int8Fine { xq, stride, scale, .. } => {
                let per_row = cp / 4;
                for (b, o) in out.iter_mut().enumerate() {
                    let xb = &xq[b * stride..(b + 1) * stride];
                    o[i] = combine_fine(job, r, &scale[b * per_row..(b + 1) * per_row], |k| {
                        // |Σ| ≤ 16 · 128 · 127: exact in i32.
                        dot_i8(&sc.bytes, xb, FINE_BLOCK * k..FINE_BLOCK * (k + 1)) as i32
                    });
                }
            }
        }
    }
}
