//! x86_64 kernels: AVX-512 (F + BW + VNNI) and AVX2 (+ FMA). Entered only after run-time
//! detection ([`super::Backend::is_available`]).
//!
//! Decoding builds the bytes of 64 weights from the plane words: AVX-512 with one masked byte add
//! per plane (`vpaddb` under the plane's 64-bit mask, adding that plane's weight 2^k), AVX2 by
//! spreading each 32-bit half-word to 0x00/0xFF bytes (`vpshufb` + `vpand` + `vpcmpeqb`) and
//! accumulating Horner-style (`v = 2v − spread`). Saturation is already in the carry mask.

use super::{
    by_bits, combine_int, dequant_row, Acts, Job, PlanarWeight, Prec, Scratch, INT_CHUNK, WORD_BITS,
};
use std::arch::x86_64::*;
use std::ops::Range;

// ---------------------------------------------------------------------------------------------
// AVX-512

#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn decode_row_avx512_n<const N: usize>(
    w: &PlanarWeight,
    r: usize,
    prec: Prec,
    signed: bool,
    out: &mut [u8],
) {
    let rp = w.row_planes(r, prec.bits);
    let mut add = [_mm512_setzero_si512(); N];
    for (t, a) in add.iter_mut().enumerate() {
        *a = _mm512_set1_epi8((1u8 << (N - 1 - t)) as i8);
    }
    let one = _mm512_set1_epi8(1);
    let off = _mm512_set1_epi8(if signed { prec.half as i8 } else { 0 });
    let out = &mut out[..w.cols_padded()];
    for (wi, chunk) in out.chunks_exact_mut(WORD_BITS).enumerate() {
        let (tops, carry) = rp.word::<N>(wi);
        let mut v = _mm512_setzero_si512();
        for (&m, &a) in tops.iter().zip(&add) {
            v = _mm512_mask_add_epi8(v, m, v, a);
        }
        v = _mm512_mask_add_epi8(v, carry, v, one);
        v = _mm512_sub_epi8(v, off);
        // SAFETY: `chunk` is 64 bytes.
        unsafe { _mm512_storeu_si512(chunk.as_mut_ptr().cast(), v) };
    }
}

#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn decode_row_avx512(w: &PlanarWeight, r: usize, prec: Prec, signed: bool, out: &mut [u8]) {
    unsafe { by_bits!(prec.bits, decode_row_avx512_n(w, r, prec, signed, out)) }
}

/// `Σ_j u[j] · x_b[j]` over `range` for `B` activation rows at once (u unsigned, x signed),
/// exactly: `vpdpbusd` in i32 lanes (each u vector loaded once for all B rows), reduced to i64
/// every `INT_CHUNK` columns.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn dot_u8i8_avx512<const B: usize>(
    u: &[u8],
    xs: [&[i8]; B],
    range: Range<usize>,
) -> [i64; B] {
    let (mut j, end) = (range.start, range.end);
    assert!(j <= end && end <= u.len() && xs.iter().all(|x| end <= x.len()));
    let pu = u.as_ptr();
    let px = xs.map(|x| x.as_ptr());
    let mut total = [0i64; B];
    while j < end {
        let ce = end.min(j + INT_CHUNK);
        let mut acc = [[_mm512_setzero_si512(); 2]; B];
        // SAFETY: every load stays inside `..ce ≤ end` (full loads) or is masked to it.
        unsafe {
            while j + 128 <= ce {
                let u0 = _mm512_loadu_si512(pu.add(j).cast());
                let u1 = _mm512_loadu_si512(pu.add(j + 64).cast());
                for (a, p) in acc.iter_mut().zip(px) {
                    a[0] = _mm512_dpbusd_epi32(a[0], u0, _mm512_loadu_si512(p.add(j).cast()));
                    a[1] = _mm512_dpbusd_epi32(a[1], u1, _mm512_loadu_si512(p.add(j + 64).cast()));
                }
                j += 128;
            }
            if j + 64 <= ce {
                let u0 = _mm512_loadu_si512(pu.add(j).cast());
                for (a, p) in acc.iter_mut().zip(px) {
                    a[0] = _mm512_dpbusd_epi32(a[0], u0, _mm512_loadu_si512(p.add(j).cast()));
                }
                j += 64;
            }
            if j < ce {
                let m = !0u64 >> (64 - (ce - j));
                let u0 = _mm512_maskz_loadu_epi8(m, pu.add(j).cast());
                for (a, p) in acc.iter_mut().zip(px) {
                    a[1] = _mm512_dpbusd_epi32(a[1], u0, _mm512_maskz_loadu_epi8(m, p.add(j)));
                }
                j = ce;
            }
        }
        for (t, a) in total.iter_mut().zip(&acc) {
            *t += i64::from(_mm512_reduce_add_epi32(_mm512_add_epi32(a[0], a[1])));
        }
    }
    total
}

/// `Σ_j w[j] · x_b[j]` for `B` activation rows at once (w loaded once), over equal lengths that
/// are a multiple of 64. Each row's summation order does not depend on `B`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dot_f32_avx512<const B: usize>(w: &[f32], xs: [&[f32]; B]) -> [f32; B] {
    assert!(w.len().is_multiple_of(64) && xs.iter().all(|x| x.len() == w.len()));
    let pw = w.as_ptr();
    let px = xs.map(|x| x.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 4]; B];
    // Plain index loops (same order as iterator loops): the dev profile (opt-level 1) keeps
    // `iter_mut().zip()` accumulators in memory, ~4x slower; release compiles both alike.
    let mut j = 0;
    while j < w.len() {
        let mut k = 0;
        while k < 4 {
            // SAFETY: j + 16k + 16 ≤ len for all four loads of a 64-float chunk.
            unsafe {
                let vw = _mm512_loadu_ps(pw.add(j + 16 * k));
                let mut b = 0;
                while b < B {
                    acc[b][k] =
                        _mm512_fmadd_ps(vw, _mm512_loadu_ps(px[b].add(j + 16 * k)), acc[b][k]);
                    b += 1;
                }
            }
            k += 1;
        }
        j += 64;
    }
    acc.map(|a| {
        let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
        _mm512_reduce_add_ps(s)
    })
}

/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn run_avx512(job: &Job<'_>, range: Range<usize>, out: &mut [&mut [f32]]) {
    let w = job.w;
    let cp = w.cols_padded();
    let ng = w.layout.n_groups();
    let n = out.len();
    let mut sc = Scratch::new(cp, n * ng);
    match job.acts {
        Acts::F32 { x, stride } => {
            let xrow = |b: usize| &x[b * stride..b * stride + cp];
            for (i, r) in range.enumerate() {
                unsafe { decode_row_avx512(w, r, job.prec, true, &mut sc.bytes) };
                dequant_row(job, r, &sc.bytes, &mut sc.wrow);
                let mut b = 0;
                while b < n {
                    if n - b >= 4 {
                        let y = unsafe {
                            dot_f32_avx512::<4>(&sc.wrow, std::array::from_fn(|k| xrow(b + k)))
                        };
                        for (k, v) in y.into_iter().enumerate() {
                            out[b + k][i] = v;
                        }
                        b += 4;
                    } else {
                        out[b][i] = unsafe { dot_f32_avx512::<1>(&sc.wrow, [xrow(b)]) }[0];
                        b += 1;
                    }
                }
            }
        }
        Acts::Int8 {
            xq,
            stride,
            scale,
            sum,
        } => {
            let xrow = |b: usize| &xq[b * stride..(b + 1) * stride];
            let half = i64::from(job.prec.half);
            for (i, r) in range.enumerate() {
                unsafe { decode_row_avx512(w, r, job.prec, false, &mut sc.bytes) };
                for g in 0..ng {
                    let cols = w.layout.group_cols(g);
                    let mut b = 0;
                    while b < n {
                        let nb = if n - b >= 4 { 4 } else { 1 };
                        let t = if nb == 4 {
                            unsafe {
                                dot_u8i8_avx512::<4>(
                                    &sc.bytes,
                                    std::array::from_fn(|k| xrow(b + k)),
                                    cols.clone(),
                                )
                            }
                        } else {
                            let [t] =
                                unsafe { dot_u8i8_avx512::<1>(&sc.bytes, [xrow(b)], cols.clone()) };
                            [t, 0, 0, 0]
                        };
                        for k in 0..nb {
                            sc.tsum[(b + k) * ng + g] = t[k] - half * sum[(b + k) * ng + g];
                        }
                        b += nb;
                    }
                }
                for (b, o) in out.iter_mut().enumerate() {
                    let ts = &sc.tsum[b * ng..(b + 1) * ng];
                    o[i] = combine_int(job, r, &scale[b * ng..(b + 1) * ng], |g| ts[g]);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2

/// 0xFF in byte k where bit k of `bits` is set, else 0x00.
#[target_feature(enable = "avx2")]
#[inline]
fn spread_avx2(bits: u32) -> __m256i {
    let v = _mm256_set1_epi32(bits as i32);
    let shuf = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let sel = _mm256_shuffle_epi8(v, shuf);
    let bm = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(sel, bm), bm)
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn decode_row_avx2_n<const N: usize>(
    w: &PlanarWeight,
    r: usize,
    prec: Prec,
    signed: bool,
    out: &mut [u8],
) {
    let rp = w.row_planes(r, prec.bits);
    let off = _mm256_set1_epi8(if signed { prec.half as i8 } else { 0 });
    let out = &mut out[..w.cols_padded()];
    for (wi, chunk) in out.chunks_exact_mut(WORD_BITS).enumerate() {
        let (tops, carry) = rp.word::<N>(wi);
        for h in 0..2 {
            let mut v = _mm256_setzero_si256();
            for &m in &tops {
                // v = 2v + bit (spread is −1 where the bit is set)
                v = _mm256_sub_epi8(_mm256_add_epi8(v, v), spread_avx2((m >> (32 * h)) as u32));
            }
            v = _mm256_sub_epi8(v, spread_avx2((carry >> (32 * h)) as u32));
            v = _mm256_sub_epi8(v, off);
            // SAFETY: `chunk` is 64 bytes, the store covers bytes 32h .. 32h + 32.
            unsafe { _mm256_storeu_si256(chunk.as_mut_ptr().add(32 * h).cast(), v) };
        }
    }
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn decode_row_avx2(w: &PlanarWeight, r: usize, prec: Prec, signed: bool, out: &mut [u8]) {
    unsafe { by_bits!(prec.bits, decode_row_avx2_n(w, r, prec, signed, out)) }
}

/// 32 × 0xFF then 32 × 0x00: a load at `32 − n` keeps the first n bytes.
static TAIL_MASK: [u8; 64] = {
    let mut t = [0u8; 64];
    let mut i = 0;
    while i < 32 {
        t[i] = 0xFF;
        i += 1;
    }
    t
};

#[target_feature(enable = "avx2")]
#[inline]
fn hsum_epi32_avx2(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// `Σ_j q[j] · x_b[j]` over `range` for `B` activation rows at once (both signed, `|x| ≤ 127`),
/// exactly: `vpmaddubsw(|q|, sign(x, q))` (pairs ≤ 2 · 128 · 127 < 2^15, no saturation),
/// `vpmaddwd` by 1 to i32. Loads may read up to 31 bytes past `range.end` (the activations are
/// masked there), so every slice needs that much slack.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dot_i8i8_avx2<const B: usize>(q: &[u8], xs: [&[i8]; B], range: Range<usize>) -> [i64; B] {
    let (mut j, end) = (range.start, range.end);
    assert!(j <= end && end + 32 <= q.len() && xs.iter().all(|x| end + 32 <= x.len()));
    let pq = q.as_ptr();
    let px = xs.map(|x| x.as_ptr());
    let ones = _mm256_set1_epi16(1);
    let mut total = [0i64; B];
    let step = |acc: __m256i, qa: __m256i, qv: __m256i, xv: __m256i| {
        let p = _mm256_maddubs_epi16(qa, _mm256_sign_epi8(xv, qv));
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones))
    };
    while j < end {
        let ce = end.min(j + INT_CHUNK);
        let mut acc = [[_mm256_setzero_si256(); 2]; B];
        // SAFETY: loads start below `ce ≤ end` and end within `end + 32 ≤ len`.
        unsafe {
            while j + 64 <= ce {
                let q0 = _mm256_loadu_si256(pq.add(j).cast());
                let q1 = _mm256_loadu_si256(pq.add(j + 32).cast());
                let (a0, a1) = (_mm256_sign_epi8(q0, q0), _mm256_sign_epi8(q1, q1));
                for (a, p) in acc.iter_mut().zip(px) {
                    a[0] = step(a[0], a0, q0, _mm256_loadu_si256(p.add(j).cast()));
                    a[1] = step(a[1], a1, q1, _mm256_loadu_si256(p.add(j + 32).cast()));
                }
                j += 64;
            }
            while j < ce {
                let n = (ce - j).min(32);
                let mask = _mm256_loadu_si256(TAIL_MASK.as_ptr().add(32 - n).cast());
                let q0 = _mm256_loadu_si256(pq.add(j).cast());
                let a0 = _mm256_sign_epi8(q0, q0);
                for (a, p) in acc.iter_mut().zip(px) {
                    let x0 = _mm256_and_si256(_mm256_loadu_si256(p.add(j).cast()), mask);
                    a[0] = step(a[0], a0, q0, x0);
                }
                j += n;
            }
        }
        for (t, a) in total.iter_mut().zip(&acc) {
            *t += i64::from(hsum_epi32_avx2(_mm256_add_epi32(a[0], a[1])));
        }
    }
    total
}

/// `Σ_j w[j] · x_b[j]` for `B` activation rows at once, lengths a multiple of 64; each row's
/// summation order does not depend on `B`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_f32_avx2<const B: usize>(w: &[f32], xs: [&[f32]; B]) -> [f32; B] {
    assert!(w.len().is_multiple_of(64) && xs.iter().all(|x| x.len() == w.len()));
    let pw = w.as_ptr();
    let px = xs.map(|x| x.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 4]; B];
    // Plain index loops (same order as iterator loops): the dev profile (opt-level 1) keeps
    // `iter_mut().zip()` accumulators in memory, ~4x slower; release compiles both alike.
    let mut j = 0;
    while j < w.len() {
        let mut k = 0;
        while k < 4 {
            // SAFETY: j + 8k + 8 ≤ len for all four loads of a 32-float chunk.
            unsafe {
                let vw = _mm256_loadu_ps(pw.add(j + 8 * k));
                let mut b = 0;
                while b < B {
                    acc[b][k] =
                        _mm256_fmadd_ps(vw, _mm256_loadu_ps(px[b].add(j + 8 * k)), acc[b][k]);
                    b += 1;
                }
            }
            k += 1;
        }
        j += 32;
    }
    acc.map(|a| {
        let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    })
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn run_avx2(job: &Job<'_>, range: Range<usize>, out: &mut [&mut [f32]]) {
    let w = job.w;
    let cp = w.cols_padded();
    let ng = w.layout.n_groups();
    let n = out.len();
    let mut sc = Scratch::new(cp, n * ng);
    for (i, r) in range.enumerate() {
        unsafe { decode_row_avx2(w, r, job.prec, true, &mut sc.bytes) };
        match job.acts {
            Acts::F32 { x, stride } => {
                let xrow = |b: usize| &x[b * stride..b * stride + cp];
                dequant_row(job, r, &sc.bytes, &mut sc.wrow);
                let mut b = 0;
                while b < n {
                    if n - b >= 4 {
                        let y = unsafe {
                            dot_f32_avx2::<4>(&sc.wrow, std::array::from_fn(|k| xrow(b + k)))
                        };
                        for (k, v) in y.into_iter().enumerate() {
                            out[b + k][i] = v;
                        }
                        b += 4;
                    } else {
                        out[b][i] = unsafe { dot_f32_avx2::<1>(&sc.wrow, [xrow(b)]) }[0];
                        b += 1;
                    }
                }
            }
            Acts::Int8 {
                xq, stride, scale, ..
            } => {
                let xrow = |b: usize| &xq[b * stride..(b + 1) * stride];
                for g in 0..ng {
                    let cols = w.layout.group_cols(g);
                    let mut b = 0;
                    while b < n {
                        let nb = if n - b >= 4 { 4 } else { 1 };
                        let t = if nb == 4 {
                            unsafe {
                                dot_i8i8_avx2::<4>(
                                    &sc.bytes,
                                    std::array::from_fn(|k| xrow(b + k)),
                                    cols.clone(),
                                )
                            }
                        } else {
                            let [t] =
                                unsafe { dot_i8i8_avx2::<1>(&sc.bytes, [xrow(b)], cols.clone()) };
                            [t, 0, 0, 0]
                        };
                        for (k, &v) in t[..nb].iter().enumerate() {
                            sc.tsum[(b + k) * ng + g] = v;
                        }
                        b += nb;
                    }
                }
                for (b, o) in out.iter_mut().enumerate() {
                    let ts = &sc.tsum[b * ng..(b + 1) * ng];
                    o[i] = combine_int(job, r, &scale[b * ng..(b + 1) * ng], |g| ts[g]);
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) unsafe fn test_decode_avx512(
    w: &PlanarWeight,
    r: usize,
    prec: Prec,
    signed: bool,
    out: &mut [u8],
) {
    unsafe { decode_row_avx512(w, r, prec, signed, out) }
}

#[cfg(test)]
pub(super) unsafe fn test_decode_avx2(
    w: &PlanarWeight,
    r: usize,
    prec: Prec,
    signed: bool,
    out: &mut [u8],
) {
    unsafe { decode_row_avx2(w, r, prec, signed, out) }
}
