//! x86_64 kernels: AVX-512 (F + BW + VNNI, faster with VBMI + GFNI) and AVX2 (+ FMA). Entered
//! only after run-time detection ([`super::Backend::is_available`]).
//!
//! Decoding builds the bytes of 64 weights from the plane words. With VBMI + GFNI (Ice Lake, Zen 4
//! and later) the AVX-512 backend loads 8 consecutive words of every plane read, transposes them
//! (qwords with single-µop shuffles, then bytes with `vpermb`) so that each qword holds byte k of
//! the `l + 1` planes, and turns
//! each qword into 8 codes with one `vgf2p8affineqb` (a bit-matrix transpose); rounding and
//! saturation are then `min(avg(v, 0), 2^l − 1)` on the top `l + 1` bits. Without them it adds
//! each plane's weight 2^k under the plane's 64-bit mask (`vpaddb`). AVX2 spreads each 32-bit
//! half-word to 0x00/0xFF bytes (`vpshufb` + `vpand` + `vpcmpeqb`) and accumulates Horner-style
//! (`v = 2v − spread`) with saturation in the carry mask.
//!
//! The AVX-512 backend decodes a small block of rows (the plane words of consecutive rows are
//! contiguous; software prefetch keeps the `l + 1` streams ahead), then its int8 path dots 8 (one
//! activation row) or 4 weight rows × up to 3 activation rows at a time with `vpdpbusd`, and reduces
//! the rows' lanes of a scale group together (one transposing reduction instead of a horizontal sum
//! per row); from 4 activation rows on it repacks 16 decoded rows into a panel whose vectors hold
//! one column quad of all 16 rows, so that each `vpdpbusd` with a broadcast activation quad adds to
//! 16 rows' sums and no reduction is needed ([`int8_gemm`]). With one activation scale per 16
//! columns (`Int8Fine`) the same two shapes reduce per word instead ([`int8_fine_rows4`]: the four
//! blocks of 4 rows in one vector) or per 16-column block of the panel ([`fine_gemm_tile`]), and
//! combine in f32 lane by lane, blocks of the same position in their word in one accumulator (the
//! AVX2 backend one weight row at a time, [`fine_row_avx2`]); its f32 path
//! converts the codes to scaled f32 (in registers, and into an f32 tile when more than 3
//! activation rows share them) and runs a register-blocked FMA microkernel ([`f32_acc`]) over all
//! activation rows, in one summation order for every batch size.

use super::{
    by_bits, combine_int, dequant_row, Acts, AlignedF32, Job, PlanarWeight, Prec, Scratch, INT_CHUNK, SLACK, WORD_BITS,
};
use std::arch::x86_64::*;
use std::ops::Range;

// ---------------------------------------------------------------------------------------------
// AVX-512

/// Whether the CPU also has AVX-512 VBMI and GFNI (Ice Lake, Zen 4 and later): then the
/// AVX-512 backend decodes with byte permutes and bit-matrix transposes
/// ([`decode_words_vbmi`]) instead of one masked add per plane.
pub(super) fn has_vbmi_gfni() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512vbmi") && std::arch::is_x86_feature_detected!("gfni")
    })
}

/// Software prefetch distance of the VBMI decoder, in plane words (1 KiB per plane stream;
/// 64–128 words measured best on DRAM-resident weights, ~1.5× faster than none).
const PREFETCH_WORDS: usize = 128;

/// The byte transpose that ends [`transpose8`]: within each qword k of the output, byte b is byte
/// k of input qword b (an 8 × 8 byte transpose, one `vpermb`).
#[repr(C, align(64))]
struct ByteTranspose([u8; 64]);

static BYTE_TRANSPOSE: ByteTranspose = {
    let mut t = [0u8; 64];
    let mut o = 0;
    while o < 64 {
        t[o] = (8 * (o % 8) + o / 8) as u8;
        o += 1;
    }
    ByteTranspose(t)
};

/// Transposes 8 words of `M ≤ 8` planes (`p[i]` = words of plane i, zero for `i ≥ M`) into 8
/// vectors: vector w, qword k, byte b = byte k of word w of plane `7 − b`, so that a GF(2)
/// affine transform with the matrix operand turns each qword into the 8 codes of weights
/// 8k .. 8k+8 (bit i of code j = bit j of plane i).
///
/// First an 8 × 8 transpose of qwords (`vpunpck[lh]qdq`, then two rounds of `vshufi64x2`), so
/// that vector w holds word w of plane `7 − j` in qword j, skipping the stages whose inputs are
/// all zero; then one `vpermb` per vector transposes its 8 × 8 bytes. All single-µop shuffles:
/// 1.3–1.7× faster on an Intel Xeon (4 to 8 planes the most) than the same transpose in stages of
/// two-source `vpermt2b` (3 µops each there).
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
#[inline]
fn transpose8<const M: usize>(p: &[__m512i; 8]) -> [__m512i; 8] {
    let z = _mm512_setzero_si512();
    // Row j of the qword transpose is plane 7 − j; rows j < 8 − M are zero. Everything below
    // is unrolled at compile time (a run-time `M` left the loops and arrays on the stack).
    let row = |j: usize| if 7 - j < M { p[7 - j] } else { z };
    let pair_used = |a: usize| 6 - 2 * a < M;
    // s[2a + h], lane L = word 2L + h of rows 2a, 2a + 1.
    let s: [__m512i; 8] = std::array::from_fn(|i| {
        let a = i / 2;
        match (pair_used(a), i % 2) {
            (false, _) => z,
            (true, 0) => _mm512_unpacklo_epi64(row(2 * a), row(2 * a + 1)),
            (true, _) => _mm512_unpackhi_epi64(row(2 * a), row(2 * a + 1)),
        }
    });
    // A 4 × 4 transpose of 128-bit lanes over s[h], s[2 + h], s[4 + h], s[6 + h]: vector 2L + h
    // takes lane L of each.
    let low_pairs = pair_used(1);
    let t: [[__m512i; 4]; 2] = std::array::from_fn(|h| {
        [
            if low_pairs { _mm512_shuffle_i64x2::<0b01_00_01_00>(s[h], s[2 + h]) } else { z },
            if low_pairs { _mm512_shuffle_i64x2::<0b11_10_11_10>(s[h], s[2 + h]) } else { z },
            _mm512_shuffle_i64x2::<0b01_00_01_00>(s[4 + h], s[6 + h]),
            _mm512_shuffle_i64x2::<0b11_10_11_10>(s[4 + h], s[6 + h]),
        ]
    });
    // SAFETY: 64 readable bytes, 64-byte aligned (`ByteTranspose` is `align(64)`).
    let idx = unsafe { _mm512_load_si512(BYTE_TRANSPOSE.0.as_ptr().cast()) };
    std::array::from_fn(|w| {
        let [t0, t1, t2, t3] = t[w % 2];
        let q = match w / 2 {
            0 => _mm512_shuffle_i64x2::<0b10_00_10_00>(t0, t2),
            1 => _mm512_shuffle_i64x2::<0b11_01_11_01>(t0, t2),
            2 => _mm512_shuffle_i64x2::<0b10_00_10_00>(t1, t3),
            _ => _mm512_shuffle_i64x2::<0b11_01_11_01>(t1, t3),
        };
        _mm512_permutexvar_epi8(idx, q)
    })
}

/// Decodes the `nwords` plane words starting at flat word `f0` (word `f0 + i` of every plane;
/// rows are contiguous, so this may span rows) at precision `L` into `out[64·i ..]`: `u_l`
/// bytes, or `q_l` as i8 bytes when `signed`. Loads 8 words of every plane read at once,
/// transposes them with byte permutes ([`transpose8`]) and turns each qword into 8 codes with one
/// `vgf2p8affineqb`; below 8 bits `u_l = min((v + 1) >> 1, 2^l − 1)` on the top `l + 1` bits `v`
/// (`vpavgb`, `vpminub`), at 8 bits the d word is added as a byte mask.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VBMI and GFNI. Bounds are checked (panics otherwise).
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,gfni")]
#[inline]
unsafe fn decode_words_vbmi_n<const L: usize, const SIGNED: bool>(
    w: &PlanarWeight,
    f0: usize,
    nwords: usize,
    out: &mut [u8],
) {
    let per_plane = w.rows() * w.wpr;
    let stride = super::plane_stride(per_plane);
    assert!(f0 + nwords <= per_plane && out.len() >= 64 * nwords);
    assert!(w.planes.len() >= w.n_planes() * stride);
    let m = if L < 8 { L + 1 } else { 8 };
    let lo = if L < 8 { 7 - L } else { 0 };
    let has_d = L == 8 && w.has_d;
    let base = w.planes.as_ptr();
    // Plane p spans words p·stride .. p·stride + per_plane, and every load below is masked to
    // f0 + f + (< nb) < f0 + nwords ≤ per_plane (asserted above).
    // SAFETY: p < n_planes and f0 ≤ per_plane keep the offset inside `planes` (asserted above).
    let plane = |p: usize| unsafe { base.add(p * stride + f0) };
    let x = _mm512_set1_epi64(0x8040_2010_0804_0201u64 as i64);
    let z = _mm512_setzero_si512();
    let lim = _mm512_set1_epi8(((1u32 << L) - 1) as u8 as i8);
    let one = _mm512_set1_epi8(1);
    let off = _mm512_set1_epi8(if SIGNED { (1u32 << (L - 1)) as u8 as i8 } else { 0 });
    let po = out.as_mut_ptr();
    let mut f = 0;
    while f < nwords {
        let nb = (nwords - f).min(8);
        let km: __mmask8 = if nb == 8 { 0xFF } else { (1u8 << nb) - 1 };
        let mut p = [z; 8];
        for (i, v) in p.iter_mut().enumerate().take(m) {
            // SAFETY: the mask keeps the load to words f .. f + nb < nwords of the plane (above).
            *v = unsafe { _mm512_maskz_loadu_epi64(km, plane(lo + i).add(f).cast()) };
        }
        // The hardware prefetchers do not run far enough ahead on these l + 1 (or 9) streams,
        // and nothing is read while a block's rows are dotted: fetch PREFETCH_WORDS ahead.
        for i in 0..m {
            _mm_prefetch::<_MM_HINT_T0>(plane(lo + i).wrapping_add(f + PREFETCH_WORDS).cast());
        }
        if has_d {
            _mm_prefetch::<_MM_HINT_T0>(plane(8).wrapping_add(f + PREFETCH_WORDS).cast());
        }
        let a = match m {
            3 => transpose8::<3>(&p),
            4 => transpose8::<4>(&p),
            5 => transpose8::<5>(&p),
            6 => transpose8::<6>(&p),
            7 => transpose8::<7>(&p),
            _ => transpose8::<8>(&p),
        };
        let emit = |wv: usize| {
            let mut v = _mm512_gf2p8affine_epi64_epi8::<0>(x, a[wv]);
            if L < 8 {
                v = _mm512_min_epu8(_mm512_avg_epu8(v, z), lim);
            } else if has_d {
                // SAFETY: f + wv < nwords: the d word of this plane word.
                let d: __mmask64 = unsafe { plane(8).add(f + wv).read_unaligned() };
                v = _mm512_mask_add_epi8(v, d, v, one);
            }
            if SIGNED {
                v = _mm512_sub_epi8(v, off);
            }
            // SAFETY: f + wv < nwords and out holds 64 · nwords bytes.
            unsafe { _mm512_storeu_si512(po.add(64 * (f + wv)).cast(), v) };
        };
        if nb == 8 {
            for wv in 0..8 {
                emit(wv);
            }
        } else {
            for wv in 0..nb {
                emit(wv);
            }
        }
        f += nb;
    }
}

/// [`decode_words_vbmi_n`] for `prec.bits`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VBMI and GFNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,gfni")]
#[inline]
unsafe fn decode_words_vbmi(w: &PlanarWeight, f0: usize, nwords: usize, prec: Prec, signed: bool, out: &mut [u8]) {
    // SAFETY: the same CPU features as this function's (its contract).
    unsafe {
        match (prec.bits, signed) {
            (2, false) => decode_words_vbmi_n::<2, false>(w, f0, nwords, out),
            (3, false) => decode_words_vbmi_n::<3, false>(w, f0, nwords, out),
            (4, false) => decode_words_vbmi_n::<4, false>(w, f0, nwords, out),
            (5, false) => decode_words_vbmi_n::<5, false>(w, f0, nwords, out),
            (6, false) => decode_words_vbmi_n::<6, false>(w, f0, nwords, out),
            (7, false) => decode_words_vbmi_n::<7, false>(w, f0, nwords, out),
            (_, false) => decode_words_vbmi_n::<8, false>(w, f0, nwords, out),
            (2, true) => decode_words_vbmi_n::<2, true>(w, f0, nwords, out),
            (3, true) => decode_words_vbmi_n::<3, true>(w, f0, nwords, out),
            (4, true) => decode_words_vbmi_n::<4, true>(w, f0, nwords, out),
            (5, true) => decode_words_vbmi_n::<5, true>(w, f0, nwords, out),
            (6, true) => decode_words_vbmi_n::<6, true>(w, f0, nwords, out),
            (7, true) => decode_words_vbmi_n::<7, true>(w, f0, nwords, out),
            (_, true) => decode_words_vbmi_n::<8, true>(w, f0, nwords, out),
        }
    }
}

/// Decodes row `r` at `prec` with `N` top planes into `out[..cols_padded]`: `u_l` bytes, or `q_l`
/// as i8 bytes when `signed`.
///
/// # Safety
/// The CPU must support AVX-512 F and BW. Bounds are checked (panics otherwise).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn decode_row_avx512_n<const N: usize>(w: &PlanarWeight, r: usize, prec: Prec, signed: bool, out: &mut [u8]) {
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

/// [`decode_row_avx512_n`] for `prec.bits`.
///
/// # Safety
/// The CPU must support AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn decode_row_avx512(w: &PlanarWeight, r: usize, prec: Prec, signed: bool, out: &mut [u8]) {
    // SAFETY: the same CPU features as this function's (its contract).
    unsafe { by_bits!(prec.bits, decode_row_avx512_n(w, r, prec, signed, out)) }
}

/// `Σ_j u[j] · x_b[j]` over `range` for `B` activation rows at once (u unsigned, x signed),
/// exactly: `vpdpbusd` in i32 lanes (each u vector loaded once for all B rows), reduced to i64
/// every `INT_CHUNK` columns.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI. Bounds are checked (panics otherwise).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn dot_u8i8_avx512<const B: usize>(u: &[u8], xs: [&[i8]; B], range: Range<usize>) -> [i64; B] {
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

/// How the int8 path of the AVX-512 backend splits a row into exact partial sums: whole words
/// per scale group (per-channel, or groups a multiple of 64 wide; the zero activation padding
/// makes partial last words exact), or 2 / 4 groups per word (groups of 32 / 16, lane-aligned
/// since `vpdpbusd` lanes cover 4 columns). Other group sizes use the generic per-group dot.
#[derive(Clone, Copy)]
pub(super) enum Segments {
    /// `words` plane words per group.
    Words { words: usize },
    /// `per_word` groups per plane word (2 or 4).
    Sub { per_word: usize },
}

impl Segments {
    fn of(w: &PlanarWeight) -> Option<Self> {
        let (ng, group) = (w.layout.n_groups(), w.layout.group);
        if group.min(w.cols()) > 64 * SEG_CHUNK {
            None
        } else if ng <= 1 {
            Some(Segments::Words { words: w.wpr })
        } else if group.is_multiple_of(64) {
            Some(Segments::Words { words: group / 64 })
        } else if group == 32 || group == 16 {
            Some(Segments::Sub { per_word: 64 / group })
        } else {
            None
        }
    }
}

/// Most words of one group on the fast int8 path, so that its exact sums, `Σ u·x` and
/// `2^(l−1) · Σ x`, fit i32: `512 · 64 · 255 · 127 < 2^31`.
const SEG_CHUNK: usize = 512;

/// Per-lane i32 sums `Σ_w vpdpbusd(u_r[w], x_b[w])` over words `w0 .. w1` for 4 weight rows and
/// `B` activation rows: `acc[b][r]`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI, and every pointer must have `64 · w1` readable
/// bytes behind it.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn acc4<const B: usize>(u: [*const u8; 4], x: [*const i8; B], w0: usize, w1: usize) -> [[__m512i; 4]; B] {
    let z = _mm512_setzero_si512();
    let mut acc = [[z; 4]; B];
    // SAFETY: the caller guarantees 64 · w1 readable bytes behind every pointer.
    unsafe {
        if B == 1 {
            // Two sets of accumulators hide the vpdpbusd latency.
            let mut acc2 = [z; 4];
            let mut w = w0;
            while w + 2 <= w1 {
                let x0 = _mm512_loadu_si512(x[0].add(64 * w).cast());
                let x1 = _mm512_loadu_si512(x[0].add(64 * w + 64).cast());
                for r in 0..4 {
                    let u0 = _mm512_loadu_si512(u[r].add(64 * w).cast());
                    let u1 = _mm512_loadu_si512(u[r].add(64 * w + 64).cast());
                    acc[0][r] = _mm512_dpbusd_epi32(acc[0][r], u0, x0);
                    acc2[r] = _mm512_dpbusd_epi32(acc2[r], u1, x1);
                }
                w += 2;
            }
            if w < w1 {
                let x0 = _mm512_loadu_si512(x[0].add(64 * w).cast());
                for r in 0..4 {
                    let u0 = _mm512_loadu_si512(u[r].add(64 * w).cast());
                    acc[0][r] = _mm512_dpbusd_epi32(acc[0][r], u0, x0);
                }
            }
            for r in 0..4 {
                acc[0][r] = _mm512_add_epi32(acc[0][r], acc2[r]);
            }
        } else {
            for w in w0..w1 {
                let uv: [__m512i; 4] = std::array::from_fn(|r| _mm512_loadu_si512(u[r].add(64 * w).cast()));
                for b in 0..B {
                    let xv = _mm512_loadu_si512(x[b].add(64 * w).cast());
                    for r in 0..4 {
                        acc[b][r] = _mm512_dpbusd_epi32(acc[b][r], uv[r], xv);
                    }
                }
            }
        }
    }
    acc
}

/// For 4 vectors of i32 lanes: 128-bit lane l of the result holds the sums of lanes
/// `4l .. 4l + 4` of `a[0]`, `a[1]`, `a[2]`, `a[3]` (in that order).
#[target_feature(enable = "avx512f")]
#[inline]
fn lane_sums4(a: [__m512i; 4]) -> __m512i {
    let t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
    let t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
    _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1))
}

/// The int8-path outputs of rows `r0 .. r0 + nr` (decoded as `u_l` in `bytes`, `cols_padded`
/// apart; output index `i0` for row `r0`), 4 weight rows × up to 4 activation rows at a time:
/// per group one 4-way transposing reduction of the `vpdpbusd` lanes gives the exact sums of 4
/// rows, and the f32 combination of [`super::combine_int`] runs for the 4 rows in 4 lanes
/// (same operations in the same order: the same outputs bit for bit).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI. Bounds are checked (panics otherwise).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn int8_rows4(
    job: &Job<'_>,
    segs: &Segments,
    bytes: &[u8],
    (r0, nr, i0): (usize, usize, usize),
    out: &mut [&mut [f32]],
) {
    let Acts::Int8 { xq, stride, scale, sum } = job.acts else {
        return;
    };
    let stride = *stride;
    let w = job.w;
    let (cp, ng, n) = (w.cols_padded(), w.layout.n_groups(), out.len());
    assert!(bytes.len() >= nr * cp && xq.len() >= n * stride && stride >= cp);
    assert!(job.scales.len() >= (r0 + nr) * ng && scale.len() >= n * ng && sum.len() >= n * ng);
    let half = job.prec.half as i32;
    let step = _mm_set1_ps(job.prec.step);
    let mut k = 0;
    while k < nr {
        let nrow = (nr - k).min(4);
        // Missing rows of the last quad repeat row k (computed, not stored).
        let rows: [usize; 4] = std::array::from_fn(|j| k + if j < nrow { j } else { 0 });
        let u: [*const u8; 4] = rows.map(|j| bytes[j * cp..].as_ptr());
        let srow: [usize; 4] = rows.map(|j| (r0 + j) * ng);
        let mut b = 0;
        while b < n {
            let nb = (n - b).min(4);
            let xp = |j: usize| xq[(b + j) * stride..].as_ptr();
            let mut facc = [_mm_setzero_ps(); 4];
            // Exact sums of group g for the 4 rows and activation row b + j → f32 accumulators.
            let mut add = |g: usize, j: usize, t: __m128i| {
                let bb = b + j;
                let t = _mm_sub_epi32(t, _mm_set1_epi32(half * sum[bb * ng + g] as i32));
                // Indices asserted above.
                let s = _mm_setr_ps(
                    job.scales[srow[0] + g],
                    job.scales[srow[1] + g],
                    job.scales[srow[2] + g],
                    job.scales[srow[3] + g],
                );
                let sa = _mm_mul_ps(s, _mm_set1_ps(scale[bb * ng + g]));
                facc[j] = _mm_add_ps(facc[j], _mm_mul_ps(_mm_cvtepi32_ps(t), sa));
            };
            // SAFETY: every row pointer has cp = 64 · wpr bytes, every x row `stride ≥ cp`.
            unsafe {
                match nb {
                    4 => seg_sums::<4>(segs, u, std::array::from_fn(xp), w.wpr, ng, 0, &mut add),
                    3 => seg_sums::<3>(segs, u, std::array::from_fn(xp), w.wpr, ng, 0, &mut add),
                    2 => seg_sums::<2>(segs, u, std::array::from_fn(xp), w.wpr, ng, 0, &mut add),
                    _ => seg_sums::<1>(segs, u, [xp(0)], w.wpr, ng, 0, &mut add),
                }
            }
            for (j, &f) in facc.iter().enumerate().take(nb) {
                let y = _mm_mul_ps(f, step);
                let o = &mut out[b + j][i0 + k..i0 + k + nrow];
                if nrow == 4 {
                    // SAFETY: `o` holds 4 f32.
                    unsafe { _mm_storeu_ps(o.as_mut_ptr(), y) };
                } else {
                    let mut t = [0f32; 4];
                    // SAFETY: 16 bytes.
                    unsafe { _mm_storeu_ps(t.as_mut_ptr(), y) };
                    for (d, v) in o.iter_mut().zip(t) {
                        *d = v;
                    }
                }
            }
            b += nb;
        }
        k += 4;
    }
}

/// How [`int8_fine_rows4`] gets the weight scales of a 64-column word's four 16-column blocks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FineScales {
    /// One scale group per word (per channel, or groups a multiple of 64 columns).
    Word,
    /// Groups of 16 or 32 columns: 4 or 2 consecutive scales of each row.
    Sub16,
    Sub32,
    /// Other multiples of 16: block by block.
    Blocks,
}

/// Lanes (L, e) ← (e, L) of a 4 × 4 matrix held as 16 lanes (`4L + e` ← `4e + L`).
const TRANSPOSE4: [i32; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];
/// Lanes (L, e) ← element L / 2 of 128-bit lane e (the two scales of each row, per block pair).
const PAIRS4: [i32; 16] = [0, 4, 8, 12, 0, 4, 8, 12, 1, 5, 9, 13, 1, 5, 9, 13];

/// The weight scales of word `wi`'s four blocks for 4 rows (scale index of row e's first group:
/// `srow[e]`): lane `4L + e` = the scale of row e's group of block `4wi + L`
/// ([`PlanarWeight::fine_block_group`]).
///
/// # Safety
/// The CPU must support AVX-512 F; `srow[e] + ng ≤ job.scales.len()`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fine_wscales(job: &Job<'_>, srow: [usize; 4], wi: usize, kind: FineScales) -> __m512 {
    let w = job.w;
    let sp = job.scales.as_ptr();
    // A last word with padding blocks takes the padding's clamped group, block by block.
    let kind = if 64 * (wi + 1) > w.layout.cols && kind != FineScales::Word { FineScales::Blocks } else { kind };
    // SAFETY: every index is `srow[e] + g` with g < ng: a block of a word inside the columns
    // (Sub16: groups 4wi + L < ng; Sub32: 2wi + 1 < ng), or `fine_block_group` (< ng).
    unsafe {
        match kind {
            FineScales::Word => {
                let g = w.fine_block_group(4 * wi);
                let v =
                    _mm_setr_ps(*sp.add(srow[0] + g), *sp.add(srow[1] + g), *sp.add(srow[2] + g), *sp.add(srow[3] + g));
                _mm512_broadcast_f32x4(v)
            }
            FineScales::Sub16 => {
                let r: [__m128; 4] = std::array::from_fn(|e| _mm_loadu_ps(sp.add(srow[e] + 4 * wi)));
                let v = _mm512_insertf32x4::<3>(
                    _mm512_insertf32x4::<2>(_mm512_insertf32x4::<1>(_mm512_castps128_ps512(r[0]), r[1]), r[2]),
                    r[3],
                );
                _mm512_permutexvar_ps(_mm512_loadu_si512(TRANSPOSE4.as_ptr().cast()), v)
            }
            FineScales::Sub32 => {
                let r: [__m128; 4] =
                    std::array::from_fn(|e| _mm_castpd_ps(_mm_load_sd(sp.add(srow[e] + 2 * wi).cast::<f64>())));
                let v = _mm512_insertf32x4::<3>(
                    _mm512_insertf32x4::<2>(_mm512_insertf32x4::<1>(_mm512_castps128_ps512(r[0]), r[1]), r[2]),
                    r[3],
                );
                _mm512_permutexvar_ps(_mm512_loadu_si512(PAIRS4.as_ptr().cast()), v)
            }
            FineScales::Blocks => {
                let mut t = [0f32; 16];
                for l in 0..4 {
                    let g = w.fine_block_group(4 * wi + l);
                    for e in 0..4 {
                        t[4 * l + e] = *sp.add(srow[e] + g);
                    }
                }
                _mm512_loadu_ps(t.as_ptr())
            }
        }
    }
}

/// Per-lane f32 sums of [`int8_fine_rows4`] for 4 weight rows (decoded `u_l` behind `u`, 64 · wpr
/// bytes each) and activation rows `b .. b + B` (with their [`Acts::Int8Fine`] block scales and
/// offsets): for each word, the rows' `vpdpbusd` lanes reduced to the word's four block sums
/// ([`lane_sums4`]: 128-bit lane L = block L, element e = row e), made exact signed sums by the
/// offsets, then `Y += (T · a) · s` in f32, lane by lane.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI; `u` with 64 · wpr readable bytes, activation rows
/// `b + B ≤ n` with `stride ≥ cp`, `srow[e] + ng ≤ job.scales.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn fine_tile<const B: usize>(
    job: &Job<'_>,
    (u, srow, kind): ([*const u8; 4], [usize; 4], FineScales),
    b: usize,
) -> [__m512; B] {
    let Acts::Int8Fine { xq, stride, scale, offset } = job.acts else {
        return [_mm512_setzero_ps(); B];
    };
    let per_row = job.w.cols_padded() / 4;
    let x: [*const i8; B] = std::array::from_fn(|j| xq[(b + j) * stride..].as_ptr());
    let a: [*const f32; B] = std::array::from_fn(|j| scale[(b + j) * per_row..].as_ptr());
    let off: [*const i32; B] = std::array::from_fn(|j| offset[(b + j) * per_row..].as_ptr());
    let z = _mm512_setzero_si512();
    let mut y = [_mm512_setzero_ps(); B];
    let mut ws = _mm512_setzero_ps();
    let mut ws_group = usize::MAX;
    for wi in 0..job.w.wpr {
        // SAFETY: wi < wpr, and this function's contract.
        unsafe {
            // One group per word: the scales change only with the group.
            let group = if kind == FineScales::Word { job.w.fine_block_group(4 * wi) } else { usize::MAX };
            if kind != FineScales::Word || group != ws_group {
                ws_group = group;
                ws = fine_wscales(job, srow, wi, kind);
            }
            let uv: [__m512i; 4] = std::array::from_fn(|r| _mm512_loadu_si512(u[r].add(64 * wi).cast()));
            for j in 0..B {
                let xv = _mm512_loadu_si512(x[j].add(64 * wi).cast());
                let t = lane_sums4(uv.map(|v| _mm512_dpbusd_epi32(z, v, xv)));
                let t = _mm512_sub_epi32(t, _mm512_loadu_si512(off[j].add(16 * wi).cast()));
                let f = _mm512_mul_ps(_mm512_cvtepi32_ps(t), _mm512_loadu_ps(a[j].add(16 * wi)));
                y[j] = _mm512_fmadd_ps(f, ws, y[j]);
            }
        }
    }
    y
}

/// The [`super::ActPath::Int8Fine`] outputs of rows `r0 .. r0 + nr` (decoded as `u_l` in `bytes`,
/// `cp` apart; output index `i0` for row `r0`), 4 weight rows × up to 4 activation rows at a
/// time ([`fine_tile`]), for every batch size: the f32 operations of [`super::combine_fine`] in
/// its order, the four block accumulators in the four 128-bit lanes (bit for bit the same).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI. Bounds are checked (panics otherwise).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn int8_fine_rows4(job: &Job<'_>, bytes: &[u8], (r0, nr, i0): (usize, usize, usize), out: &mut [&mut [f32]]) {
    let Acts::Int8Fine { xq, stride, scale, offset } = job.acts else {
        return;
    };
    let w = job.w;
    let (cp, ng, n, stride) = (w.cols_padded(), w.layout.n_groups(), out.len(), *stride);
    let per_row = cp / 4;
    assert!(w.fine_blocks_fit() && bytes.len() >= nr * cp && xq.len() >= n * stride && stride >= cp);
    assert!(scale.len() >= n * per_row && offset.len() >= n * per_row && job.scales.len() >= (r0 + nr) * ng);
    let kind = match w.layout.group {
        _ if ng <= 1 || w.layout.group.is_multiple_of(64) => FineScales::Word,
        16 => FineScales::Sub16,
        32 => FineScales::Sub32,
        _ => FineScales::Blocks,
    };
    let step = _mm_set1_ps(job.prec.step);
    let mut k = 0;
    while k < nr {
        let nrow = (nr - k).min(4);
        // Missing rows of the last quad repeat row k (computed, not stored).
        let rows: [usize; 4] = std::array::from_fn(|j| k + if j < nrow { j } else { 0 });
        let quad = (rows.map(|j| bytes[j * cp..].as_ptr()), rows.map(|j| (r0 + j) * ng), kind);
        let mut b = 0;
        while b < n {
            let nb = (n - b).min(4);
            let mut y = [_mm512_setzero_ps(); 4];
            // SAFETY: every row pointer has cp = 64 · wpr bytes, every x row `stride ≥ cp`, every
            // scale and offset row cp / 4 = 16 · wpr values (asserted), b + nb ≤ n.
            unsafe {
                match nb {
                    4 => y = fine_tile::<4>(job, quad, b),
                    3 => y[..3].copy_from_slice(&fine_tile::<3>(job, quad, b)),
                    2 => y[..2].copy_from_slice(&fine_tile::<2>(job, quad, b)),
                    _ => y[0] = fine_tile::<1>(job, quad, b)[0],
                }
            }
            for (j, v) in y.into_iter().enumerate().take(nb) {
                let even = _mm_add_ps(_mm512_extractf32x4_ps::<0>(v), _mm512_extractf32x4_ps::<2>(v));
                let odd = _mm_add_ps(_mm512_extractf32x4_ps::<1>(v), _mm512_extractf32x4_ps::<3>(v));
                let r = _mm_mul_ps(_mm_add_ps(even, odd), step);
                let mut t = [0f32; 4];
                // SAFETY: 16 bytes.
                unsafe { _mm_storeu_ps(t.as_mut_ptr(), r) };
                out[b + j][i0 + k..i0 + k + nrow].copy_from_slice(&t[..nrow]);
            }
            b += nb;
        }
        k += 4;
    }
}

/// Where [`f32_acc`] takes its weights from: the f32 tile, or the decoded codes (`q_l` as i8)
/// widened, converted and scaled in registers (`q · (2^Δ · s)`: the same single rounding of the
/// same product as `(q · 2^Δ) · s` in [`super::dequant_row`]), optionally also stored to the tile.
const SRC_TILE: u8 = 0;
const SRC_CODES: u8 = 1;
const SRC_CODES_STORE: u8 = 2;

/// Geometry of the f32 path: 16-column chunks per row and per scale group.
#[derive(Clone, Copy)]
struct F32Geo {
    /// `cols_padded / 16`.
    chunks: usize,
    /// Chunks per scale group (`group / 16`; `chunks` for per-channel scales). The last group
    /// runs to the end of the row (padding codes are 0).
    group_chunks: usize,
    /// Scale groups per row.
    ng: usize,
    /// 2^Δ.
    step: f32,
}

/// The f32 microkernel: per weight row j and activation row b one 16-lane accumulator, lane i
/// summing `w_j[c] · x_b[c]` over the columns `c ≡ i (mod 16)` in increasing order with FMAs,
/// here over the 16-column chunks `c0 .. c1`, continuing from `acc`.
/// This order (and [`reduce8`] / [`reduce4`] after it) is the same for every `R`, `B` and `SRC`,
/// so an output depends only on its weight row and activation row, never on the batch.
///
/// # Safety
/// Every pointer must have `16 · geo.chunks` f32 / i8 behind it (`q` for `SRC ≠ SRC_TILE`, `t`
/// for `SRC ≠ SRC_CODES`), `s[j]` `geo.ng` scales (for `SRC ≠ SRC_TILE`), and `x[b]` must be
/// 64-byte aligned.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn f32_acc<const R: usize, const B: usize, const SRC: u8>(
    q: [*const i8; R],
    t: [*mut f32; R],
    s: [*const f32; R],
    x: [*const f32; B],
    geo: F32Geo,
    mut acc: [[__m512; R]; B],
    (c0, c1): (usize, usize),
) -> [[__m512; R]; B] {
    let mut c = c0;
    let mut g = if geo.ng <= 1 { 0 } else { (c0 / geo.group_chunks).min(geo.ng - 1) };
    while c < c1 {
        let ce = if g + 1 >= geo.ng { c1 } else { ((g + 1) * geo.group_chunks).min(c1) };
        let mut sv = [_mm512_setzero_ps(); R];
        if SRC != SRC_TILE {
            let mut j = 0;
            while j < R {
                // SAFETY: g < ng scales behind s[j].
                sv[j] = _mm512_set1_ps(geo.step * unsafe { *s[j].add(g) });
                j += 1;
            }
        }
        while c < ce {
            // SAFETY: every access is below chunk c < chunks of each row (the caller's contract).
            unsafe {
                let mut xv = [_mm512_setzero_ps(); B];
                let mut b = 0;
                while b < B {
                    xv[b] = _mm512_load_ps(x[b].add(16 * c));
                    b += 1;
                }
                let mut j = 0;
                while j < R {
                    let wv = if SRC == SRC_TILE {
                        _mm512_loadu_ps(t[j].add(16 * c))
                    } else {
                        let qv = _mm_loadu_si128(q[j].add(16 * c).cast());
                        let wv = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(qv)), sv[j]);
                        if SRC == SRC_CODES_STORE {
                            _mm512_storeu_ps(t[j].add(16 * c), wv);
                        }
                        wv
                    };
                    let mut b = 0;
                    while b < B {
                        acc[b][j] = _mm512_fmadd_ps(wv, xv[b], acc[b][j]);
                        b += 1;
                    }
                    j += 1;
                }
            }
            c += 1;
        }
        g += 1;
    }
    acc
}

/// For 4 vectors: 128-bit lane L of the result holds in element e the sum of lanes
/// `4L .. 4L + 4` of `a[e]` as `(v₀ + v₂) + (v₁ + v₃)`.
#[target_feature(enable = "avx512f")]
#[inline]
fn lane_sums4_ps(a: [__m512; 4]) -> __m512 {
    let t0 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    let t1 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    let (t0, t1) = (_mm512_castps_pd(t0), _mm512_castps_pd(t1));
    _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(t0, t1)), _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t1)))
}

/// The lane sums of 8 vectors (element e of the result = the sum of `a[e]`), each summed as
/// `(L₀ + L₁) + (L₂ + L₃)` over its 128-bit lanes `L` summed as in [`lane_sums4_ps`]: the order
/// of [`tree16`], as in [`reduce4`].
#[target_feature(enable = "avx512f")]
#[inline]
fn reduce8(a: [__m512; 8]) -> __m256 {
    let s0 = lane_sums4_ps([a[0], a[1], a[2], a[3]]);
    let s1 = lane_sums4_ps([a[4], a[5], a[6], a[7]]);
    // [s0.L0 + s0.L1, s0.L2 + s0.L3, s1.L0 + s1.L1, s1.L2 + s1.L3]
    let u = _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(s0, s1), _mm512_shuffle_f32x4::<0b11_01_11_01>(s0, s1));
    // [u.L0 + u.L1, u.L2 + u.L3, …]
    let v = _mm512_add_ps(_mm512_shuffle_f32x4::<0b00_00_10_00>(u, u), _mm512_shuffle_f32x4::<0b00_00_11_01>(u, u));
    _mm512_castps512_ps256(v)
}

/// [`reduce8`] for 4 vectors (the same order).
#[target_feature(enable = "avx512f")]
#[inline]
fn reduce4(a: [__m512; 4]) -> __m128 {
    let s = lane_sums4_ps(a);
    // [s.L0 + s.L1, s.L2 + s.L3, …]
    let u = _mm512_add_ps(_mm512_shuffle_f32x4::<0b00_00_10_00>(s, s), _mm512_shuffle_f32x4::<0b00_00_11_01>(s, s));
    _mm_add_ps(_mm512_castps512_ps128(u), _mm512_extractf32x4_ps::<1>(u))
}

/// The sum of 16 lanes in the order of [`reduce8`] and [`reduce4`].
#[cfg(test)]
pub(super) fn tree16(v: &[f32; 16]) -> f32 {
    let l = |k: usize| (v[4 * k] + v[4 * k + 2]) + (v[4 * k + 1] + v[4 * k + 3]);
    (l(0) + l(1)) + (l(2) + l(3))
}

/// [`reduce8`] / [`reduce4`] of `a`, as in the kernels, for tests.
#[cfg(test)]
pub(super) fn test_reduce(a: &[[f32; 16]]) -> Vec<f32> {
    assert!(a.len() == 4 || a.len() == 8);
    // SAFETY: only reached when AVX-512 F is available (the caller checks).
    unsafe {
        let v: Vec<__m512> = a.iter().map(|x| _mm512_loadu_ps(x.as_ptr())).collect();
        let mut out = vec![0f32; a.len()];
        if a.len() == 8 {
            _mm256_storeu_ps(out.as_mut_ptr(), reduce8(std::array::from_fn(|i| v[i])));
        } else {
            _mm_storeu_ps(out.as_mut_ptr(), reduce4(std::array::from_fn(|i| v[i])));
        }
        out
    }
}

/// Most activation rows per pass of 4 weight rows (24 accumulators).
const F32_TILE_B: usize = 6;

/// Writes the `nrow ≤ R` first outputs of `R` weight rows for one activation row, reduced from
/// their accumulators, to `o`.
///
/// # Safety
/// `o` must have room for `nrow` f32.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_outs<const R: usize>(acc: [__m512; R], o: *mut f32, nrow: usize) {
    debug_assert!(nrow <= R);
    let v = if R == 8 {
        _mm512_castps256_ps512(reduce8(std::array::from_fn(|i| acc[i])))
    } else {
        _mm512_castps128_ps512(reduce4(std::array::from_fn(|i| acc[i])))
    };
    // SAFETY: the mask covers the `nrow` f32 behind `o` (the caller's contract).
    unsafe { _mm512_mask_storeu_ps(o, ((1u32 << nrow) - 1) as u16, v) };
}

/// Base pointers of one block on the f32 path (bounds checked once per block by [`f32_block`]).
#[derive(Clone, Copy)]
struct F32Block {
    /// Decoded codes of the block's rows, `cp` apart.
    q: *const i8,
    /// The f32 tile, rows `cp` apart.
    t: *mut f32,
    /// Scales of the block's first row, rows `ng` apart.
    s: *const f32,
    /// Activation rows, `stride` apart, 64-byte aligned.
    x: *const f32,
    stride: usize,
    /// Saved accumulators between column chunks: 16 f32 per (activation row, block row),
    /// `a_rows` block rows per activation row, 64-byte aligned.
    a: *mut f32,
    a_rows: usize,
}

/// One pass of [`f32_acc`] over the block's weight rows `rows` and activation rows
/// `b0 .. b0 + B`, over the column chunks `kc`: starting from zero or from the accumulators
/// saved in `blk.a` by the previous chunk, and ending with the outputs of the first `nrow` rows
/// at `out[b][i ..]` (last chunk) or by saving the accumulators (exactly: the order is that of
/// one pass over the whole row).
///
/// # Safety
/// The bounds [`f32_block`] checks.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn f32_pass<const R: usize, const B: usize, const SRC: u8>(
    blk: &F32Block,
    geo: F32Geo,
    (rows, nrow, i): ([usize; R], usize, usize),
    b0: usize,
    kc: KChunk,
    out: &mut [&mut [f32]],
) {
    let cp = 16 * geo.chunks;
    // SAFETY: every offset stays in bounds: rows < nr ≤ block rows and b0 + B ≤ n (checked by the
    // caller).
    unsafe {
        let q = rows.map(|j| blk.q.add(j * cp));
        let t = rows.map(|j| blk.t.add(j * cp));
        let s = rows.map(|j| blk.s.add(j * geo.ng));
        let x: [*const f32; B] = std::array::from_fn(|b| blk.x.add((b0 + b) * blk.stride));
        let slot = |b: usize, j: usize| blk.a.add(16 * ((b0 + b) * blk.a_rows + rows[j]));
        let mut acc = [[_mm512_setzero_ps(); R]; B];
        if kc.c0 > 0 {
            for (b, ab) in acc.iter_mut().enumerate() {
                for (j, a) in ab.iter_mut().enumerate() {
                    *a = _mm512_load_ps(slot(b, j));
                }
            }
        }
        let acc = f32_acc::<R, B, SRC>(q, t, s, x, geo, acc, (kc.c0, kc.c1));
        for (b, a) in acc.into_iter().enumerate() {
            if kc.c1 == geo.chunks {
                store_outs::<R>(a, out.get_unchecked_mut(b0 + b).as_mut_ptr().add(i), nrow);
            } else {
                for (j, &v) in a.iter().enumerate() {
                    _mm512_store_ps(slot(b, j), v);
                }
            }
        }
    }
}

/// A range of 16-column chunks of the rows, `c0 .. c1`.
#[derive(Clone, Copy)]
struct KChunk {
    c0: usize,
    c1: usize,
}

/// Most 16-column chunks (512 columns) the f32 tile passes take at once when a row is longer
/// than [`F32_K_SPLIT`] chunks: the block's tile columns and the activation rows of a pass stay
/// in L1 (a 1536-column row is 6 KiB of f32).
const F32_K_CHUNK: usize = 32;
/// Rows of up to this many 16-column chunks (768 columns) are not split.
const F32_K_SPLIT: usize = 48;

/// The f32-path outputs of rows `r0 .. r0 + nr` (decoded as signed `q_l` in `bytes`, `cols_padded`
/// apart; output index `i0` for row `r0`) for every activation row. With a scale uniform per 16
/// columns the codes are converted in registers: for up to 3 activation rows 8 weight rows at a
/// time; else 4 weight rows × up to 6 activation rows per pass, the first pass storing the
/// converted rows to the f32 `tile` that the next passes read. Otherwise the rows are
/// dequantized into the tile first ([`super::dequant_row`]). Every pass sums in the order of
/// [`f32_acc`].
///
/// # Safety
/// The CPU must support AVX-512 F and BW. Bounds are checked (panics otherwise).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn f32_block(
    job: &Job<'_>,
    bytes: &[u8],
    (tile, accs): (&mut [f32], &mut [f32]),
    (r0, nr, i0): (usize, usize, usize),
    out: &mut [&mut [f32]],
) {
    let Acts::F32 { x, stride } = job.acts else {
        return;
    };
    let w = job.w;
    let (cp, ng, n, group) = (w.cols_padded(), w.layout.n_groups(), out.len(), w.layout.group);
    let geo = F32Geo {
        chunks: cp / 16,
        group_chunks: if ng <= 1 { cp / 16 } else { group / 16 },
        ng: ng.max(1),
        step: job.prec.step,
    };
    assert!(out.iter().all(|o| o.len() >= i0 + nr));
    if cp == 0 {
        for o in out.iter_mut() {
            o[i0..i0 + nr].fill(0.0);
        }
        return;
    }
    // Every pointer the passes derive stays inside these.
    let in_regs = ng <= 1 || group.is_multiple_of(16);
    assert!(bytes.len() >= nr * cp && (tile.len() >= nr * cp || (in_regs && n <= 3)));
    assert!(job.scales.len() >= (r0 + nr) * geo.ng && ng == geo.ng);
    assert!(x.len() >= n * stride && *stride >= cp && stride.is_multiple_of(16));
    assert!(x.as_ptr().align_offset(64) == 0);
    let kchunk =
        if geo.chunks <= F32_K_SPLIT { geo.chunks } else { geo.chunks.div_ceil(geo.chunks.div_ceil(F32_K_CHUNK)) };
    assert!(
        kchunk == geo.chunks
            || (in_regs && n <= 3)
            || (accs.len() >= 16 * n * nr && accs.as_ptr().align_offset(64) == 0)
    );
    let blk = F32Block {
        q: bytes.as_ptr().cast(),
        t: tile.as_mut_ptr(),
        s: job.scales[r0 * ng..].as_ptr(),
        x: x.as_ptr(),
        stride: *stride,
        a: accs.as_mut_ptr(),
        a_rows: nr,
    };
    let whole = KChunk { c0: 0, c1: geo.chunks };
    if !in_regs {
        for k in 0..nr {
            dequant_row(job, r0 + k, &bytes[k * cp..], &mut tile[k * cp..(k + 1) * cp]);
        }
    }
    if in_regs && n <= 3 {
        // Straight from the codes, 8 weight rows at a time (8 FMA chains even for one row).
        let mut k = 0;
        while k < nr {
            let nrow = (nr - k).min(8);
            let rows: [usize; 8] = std::array::from_fn(|j| k + if j < nrow { j } else { 0 });
            let rr = (rows, nrow, i0 + k);
            // SAFETY: bounds checked above.
            unsafe {
                match n {
                    1 => f32_pass::<8, 1, SRC_CODES>(&blk, geo, rr, 0, whole, out),
                    2 => f32_pass::<8, 2, SRC_CODES>(&blk, geo, rr, 0, whole, out),
                    _ => f32_pass::<8, 3, SRC_CODES>(&blk, geo, rr, 0, whole, out),
                }
            }
            k += 8;
        }
        return;
    }
    // 4 weight rows × up to 6 activation rows per pass, the activation rows split into passes
    // as evenly as possible; the first pass converts the codes (and stores them to the tile when
    // more passes follow), the others read the tile.
    let passes = n.div_ceil(F32_TILE_B);
    let mut c0 = 0;
    while c0 < geo.chunks {
        let kc = KChunk { c0, c1: (c0 + kchunk).min(geo.chunks) };
        let mut b = 0;
        for p in 0..passes {
            // The larger passes last: the first one also converts the codes (fewer registers free).
            let nb = n / passes + usize::from(p >= passes - n % passes);
            let src = match (in_regs, p, passes) {
                (false, _, _) | (true, 1.., _) => SRC_TILE,
                (true, 0, 1) => SRC_CODES,
                (true, 0, _) => SRC_CODES_STORE,
            };
            let mut k = 0;
            while k < nr {
                let nrow = (nr - k).min(4);
                let rows: [usize; 4] = std::array::from_fn(|j| k + if j < nrow { j } else { 0 });
                let rr = (rows, nrow, i0 + k);
                macro_rules! go {
                    ($($nb:literal)*) => {
                        match (nb, src) {
                            $(
                                ($nb, SRC_TILE) => f32_pass::<4, $nb, SRC_TILE>(&blk, geo, rr, b, kc, out),
                                ($nb, SRC_CODES) => f32_pass::<4, $nb, SRC_CODES>(&blk, geo, rr, b, kc, out),
                                ($nb, _) => f32_pass::<4, $nb, SRC_CODES_STORE>(&blk, geo, rr, b, kc, out),
                            )*
                            _ => unreachable!(),
                        }
                    };
                }
                // SAFETY: bounds checked above.
                unsafe { go!(1 2 3 4 5 6) };
                k += 4;
            }
            b += nb;
        }
        c0 = kc.c1;
    }
}

/// [`int8_rows4`] for one activation row, 8 weight rows at a time: 8 independent `vpdpbusd`
/// chains, two transposing reductions folded into one vector of 8 sums per group, and the f32
/// combination in 8 lanes (the same operations in the same order as [`super::combine_int`], so
/// the same outputs bit for bit). Whole-word groups (per-channel, multiples of 64) reduce once per
/// group; groups of 32 or 16 once per word, which holds 2 or 4 of them in its 128-bit lanes.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI. Bounds are checked (panics otherwise).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn int8_rows8_matvec(
    job: &Job<'_>,
    segs: Segments,
    bytes: &[u8],
    (r0, nr, i0): (usize, usize, usize),
    out: &mut [&mut [f32]],
) {
    let Acts::Int8 { xq, scale, sum, .. } = job.acts else {
        return;
    };
    let w = job.w;
    let (cp, wpr, ng) = (w.cols_padded(), w.wpr, w.layout.n_groups());
    assert!(bytes.len() >= nr * cp && xq.len() >= cp && out.len() == 1);
    assert!(job.scales.len() >= (r0 + nr) * ng && scale.len() >= ng && sum.len() >= ng);
    let half = job.prec.half as i32;
    let step = _mm256_set1_ps(job.prec.step);
    let px = xq.as_ptr();
    let out = &mut *out[0];
    let mut k = 0;
    while k < nr {
        let nrow = (nr - k).min(8);
        // Missing rows of the last octet repeat row k (computed, not stored).
        let rows: [usize; 8] = std::array::from_fn(|j| k + if j < nrow { j } else { 0 });
        let u: [*const u8; 8] = rows.map(|j| bytes[j * cp..].as_ptr());
        let mut facc = _mm256_setzero_ps();
        // Index of each row's first scale: one gather loads a group's 8 scales.
        let first = rows.map(|j| i32::try_from((r0 + j) * ng).expect("scale index fits i32"));
        // SAFETY: `first` holds 8 i32 (32 bytes).
        let first = unsafe { _mm256_loadu_si256(first.as_ptr().cast()) };
        // Adds group g's term for the 8 rows, given their exact sums Σ u·x.
        let mut combine = |g: usize, t: __m256i| {
            let t = _mm256_sub_epi32(t, _mm256_set1_epi32(half * sum[g] as i32));
            // SAFETY: (r0 + rows[j]) · ng + g < (r0 + nr) · ng ≤ job.scales.len() (asserted).
            let s = unsafe { _mm256_i32gather_ps::<4>(job.scales.as_ptr().add(g), first) };
            let sa = _mm256_mul_ps(s, _mm256_set1_ps(scale[g]));
            facc = _mm256_add_ps(facc, _mm256_mul_ps(_mm256_cvtepi32_ps(t), sa));
        };
        // The 8 rows' lane sums over words w0 .. w1: 128-bit lane L of the two results holds
        // rows 0..4 and 4..8 summed over bytes 16L .. 16L + 16 of each word.
        let lane_sums = |w0: usize, w1: usize| {
            let z = _mm512_setzero_si512();
            let mut acc = [z; 8];
            for wi in w0..w1 {
                // SAFETY: wi < wpr: every row pointer has 64 · wpr bytes, x has stride ≥ cp.
                unsafe {
                    let xv = _mm512_loadu_si512(px.add(64 * wi).cast());
                    for (a, &p) in acc.iter_mut().zip(&u) {
                        *a = _mm512_dpbusd_epi32(*a, _mm512_loadu_si512(p.add(64 * wi).cast()), xv);
                    }
                }
            }
            (lane_sums4([acc[0], acc[1], acc[2], acc[3]]), lane_sums4([acc[4], acc[5], acc[6], acc[7]]))
        };
        // 128-bit lanes [l0.0 + l0.1, l0.2 + l0.3, l1.0 + l1.1, l1.2 + l1.3]: the sums over
        // each half word, rows 0..4 then 4..8.
        let halves = |l0: __m512i, l1: __m512i| {
            _mm512_add_epi32(
                _mm512_shuffle_i64x2::<0b10_00_10_00>(l0, l1),
                _mm512_shuffle_i64x2::<0b11_01_11_01>(l0, l1),
            )
        };
        match segs {
            Segments::Words { words } => {
                for g in 0..ng {
                    let (l0, l1) = lane_sums(g * words, ((g + 1) * words).min(wpr));
                    let t = halves(l0, l1);
                    // … then [rows 0..4, rows 4..8] in the low 256 bits.
                    let t = _mm512_add_epi32(t, _mm512_shuffle_i64x2::<0b11_11_11_01>(t, t));
                    let t = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 4, 5, 0, 1, 4, 5), t);
                    combine(g, _mm512_castsi512_si256(t));
                }
            }
            Segments::Sub { per_word: 2 } => {
                for wi in 0..wpr {
                    let (l0, l1) = lane_sums(wi, wi + 1);
                    // [first half rows 0..8, second half rows 0..8].
                    let t = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 4, 5, 2, 3, 6, 7), halves(l0, l1));
                    for (h, t) in [_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64::<1>(t)].into_iter().enumerate()
                    {
                        if 2 * wi + h < ng {
                            combine(2 * wi + h, t);
                        }
                    }
                }
            }
            Segments::Sub { .. } => {
                for wi in 0..wpr {
                    let (l0, l1) = lane_sums(wi, wi + 1);
                    // Lane L of l0 and l1: group 4·wi + L, rows 0..4 and 4..8.
                    let quarters = [
                        (_mm512_extracti32x4_epi32::<0>(l0), _mm512_extracti32x4_epi32::<0>(l1)),
                        (_mm512_extracti32x4_epi32::<1>(l0), _mm512_extracti32x4_epi32::<1>(l1)),
                        (_mm512_extracti32x4_epi32::<2>(l0), _mm512_extracti32x4_epi32::<2>(l1)),
                        (_mm512_extracti32x4_epi32::<3>(l0), _mm512_extracti32x4_epi32::<3>(l1)),
                    ];
                    for (q, (lo, hi)) in quarters.into_iter().enumerate() {
                        if 4 * wi + q < ng {
                            combine(4 * wi + q, _mm256_set_m128i(hi, lo));
                        }
                    }
                }
            }
        }
        let y = _mm256_mul_ps(facc, step);
        let o = &mut out[i0 + k..i0 + k + nrow];
        if nrow == 8 {
            // SAFETY: `o` holds 8 f32.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), y) };
        } else {
            let mut t = [0f32; 8];
            // SAFETY: 32 bytes.
            unsafe { _mm256_storeu_ps(t.as_mut_ptr(), y) };
            for (d, v) in o.iter_mut().zip(t) {
                *d = v;
            }
        }
        k += 8;
    }
}

/// Calls `add(g, b0 + b, sums)` for every group g in order (and activation row b), with the
/// exact sums `Σ_{j ∈ g} u_r[j] · x_b[j]` of the 4 rows r as i32 lanes.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI, and every pointer must have `64 · wpr` readable
/// bytes behind it.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn seg_sums<const B: usize>(
    segs: &Segments,
    u: [*const u8; 4],
    x: [*const i8; B],
    wpr: usize,
    ng: usize,
    b0: usize,
    add: &mut impl FnMut(usize, usize, __m128i),
) {
    match *segs {
        Segments::Words { words } => {
            for g in 0..ng {
                let (w0, w1) = (g * words, ((g + 1) * words).min(wpr));
                // SAFETY: w1 ≤ wpr, and 64 · wpr bytes are readable (this function's contract).
                let acc = unsafe { acc4::<B>(u, x, w0, w1) };
                for (b, a) in acc.into_iter().enumerate() {
                    let l = lane_sums4(a);
                    let s = _mm512_add_epi32(l, _mm512_shuffle_i64x2::<0b01_00_11_10>(l, l));
                    let s = _mm512_add_epi32(s, _mm512_shuffle_i64x2::<0b10_11_00_01>(s, s));
                    add(g, b0 + b, _mm512_castsi512_si128(s));
                }
            }
        }
        Segments::Sub { per_word } => {
            for wi in 0..wpr {
                // SAFETY: wi + 1 ≤ wpr, and 64 · wpr bytes are readable (this function's contract).
                let acc = unsafe { acc4::<B>(u, x, wi, wi + 1) };
                for (b, a) in acc.into_iter().enumerate() {
                    let l = lane_sums4(a);
                    if per_word == 4 {
                        let lanes = [
                            _mm512_extracti32x4_epi32::<0>(l),
                            _mm512_extracti32x4_epi32::<1>(l),
                            _mm512_extracti32x4_epi32::<2>(l),
                            _mm512_extracti32x4_epi32::<3>(l),
                        ];
                        for (lane, v) in lanes.into_iter().enumerate() {
                            if 4 * wi + lane < ng {
                                add(4 * wi + lane, b0 + b, v);
                            }
                        }
                    } else {
                        let s = _mm512_add_epi32(l, _mm512_shuffle_i64x2::<0b10_11_00_01>(l, l));
                        if 2 * wi < ng {
                            add(2 * wi, b0 + b, _mm512_castsi512_si128(s));
                        }
                        if 2 * wi + 1 < ng {
                            add(2 * wi + 1, b0 + b, _mm512_extracti32x4_epi32::<2>(s));
                        }
                    }
                }
            }
        }
    }
}

/// Activation rows from which the AVX-512 int8 path runs [`int8_gemm`] (weights repacked into
/// 16-row panels) instead of 4 weight rows × 4 activation rows per pass.
const GEMM_MIN_BATCH: usize = 4;

/// Weight rows of one [`int8_gemm`] panel: the 16 i32 lanes of a vector.
const PANEL: usize = 16;

/// Whether [`int8_gemm`] takes `w`: every scale group a whole number of 4-column quads (one
/// `vpdpbusd` lane each; per-channel rows end in zero-padded quads), its sums within i32.
fn gemm_fits(w: &PlanarWeight) -> bool {
    let (ng, group) = (w.layout.n_groups(), w.layout.group);
    group.min(w.cols()) <= 64 * SEG_CHUNK && (ng <= 1 || group.is_multiple_of(4))
}

/// Repacks `np ≤ 16` decoded rows (`u_l` bytes, `cp` apart from `bytes[0]`) into a panel: the 4
/// bytes of row j, quad q at `panel[64·q + 4·j ..]` (one gather per quad); lanes of missing rows
/// repeat row 0.
///
/// # Safety
/// The CPU must support AVX-512 F. Bounds are checked (panics otherwise).
#[target_feature(enable = "avx512f")]
unsafe fn pack_panel(bytes: &[u8], cp: usize, np: usize, panel: &mut [u8]) {
    assert!((1..=PANEL).contains(&np) && cp.is_multiple_of(4));
    assert!(bytes.len() >= (np - 1) * cp + cp && panel.len() >= 16 * cp);
    let offsets: [i32; PANEL] = std::array::from_fn(|j| if j < np { (j * cp) as i32 } else { 0 });
    // SAFETY: 16 i32 are readable behind `offsets`.
    let idx = unsafe { _mm512_loadu_si512(offsets.as_ptr().cast()) };
    for q in 0..cp / 4 {
        // SAFETY: every offset + 4q + 4 ≤ (np − 1)·cp + cp ≤ bytes.len() (asserted), and the panel
        // holds 16·cp ≥ 64·q + 64 bytes.
        unsafe {
            let v = _mm512_i32gather_epi32::<1>(idx, bytes.as_ptr().add(4 * q).cast());
            _mm512_storeu_si512(panel.as_mut_ptr().add(64 * q).cast(), v);
        }
    }
}

/// The int8-path outputs of rows `r0 .. r0 + nr` (decoded as `u_l` in `bytes`, `cp` apart;
/// output index `i0` for row `r0`) for every activation row, as a GEMM: each panel of 16 rows is
/// repacked ([`pack_panel`]) so that one vector holds a quad of columns of all 16 rows, and each
/// `vpdpbusd` with a broadcast activation quad adds to 16 rows' exact group sums at once; up to 8
/// activation rows share every weight load. No horizontal reduction: per group, the 16 sums
/// go straight into the f32 combination of [`super::combine_int`] (same operations in the same
/// order: the same outputs bit for bit as every other path).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI, and `w` must fit [`gemm_fits`]. Bounds are
/// checked (panics otherwise).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn int8_gemm(
    job: &Job<'_>,
    bytes: &[u8],
    (panel, svals): (&mut [u8], &mut [f32]),
    (r0, nr, i0): (usize, usize, usize),
    out: &mut [&mut [f32]],
) {
    let w = job.w;
    let (cp, ng, n) = (w.cols_padded(), w.layout.n_groups(), out.len());
    assert!(bytes.len() >= nr * cp && svals.len() >= PANEL * ng && job.scales.len() >= (r0 + nr) * ng);
    let mut p0 = 0;
    while p0 < nr {
        let np = (nr - p0).min(PANEL);
        // SAFETY: AVX-512 F is available (this function's contract); bounds asserted inside.
        unsafe { pack_panel(&bytes[p0 * cp..], cp, np, panel) };
        for g in 0..ng {
            for j in 0..PANEL {
                let r = r0 + p0 + if j < np { j } else { 0 };
                svals[g * PANEL + j] = job.scales[r * ng + g];
            }
        }
        // Activation rows per tile: 8, or 4 with 16-column activation scales (four accumulator
        // sets per row).
        let fine = matches!(job.acts, Acts::Int8Fine { .. });
        let mut b = 0;
        while b < n {
            let nb = (n - b).min(if fine { 4 } else { 8 });
            let tile = (b, np, i0 + p0);
            // SAFETY: AVX-512 F, BW and VNNI are available (this function's contract); the panel
            // holds the 16 rows' quads of all `cp` columns; an `Int8Fine` weight fits
            // `fine_blocks_fit` (asserted inside).
            unsafe {
                match (fine, nb) {
                    (true, 4) => fine_gemm_tile::<4>(job, panel, svals, tile, out),
                    (true, 3) => fine_gemm_tile::<3>(job, panel, svals, tile, out),
                    (true, 2) => fine_gemm_tile::<2>(job, panel, svals, tile, out),
                    (true, _) => fine_gemm_tile::<1>(job, panel, svals, tile, out),
                    (false, 8) => gemm_tile::<8>(job, panel, svals, tile, out),
                    (false, 7) => gemm_tile::<7>(job, panel, svals, tile, out),
                    (false, 6) => gemm_tile::<6>(job, panel, svals, tile, out),
                    (false, 5) => gemm_tile::<5>(job, panel, svals, tile, out),
                    (false, 4) => gemm_tile::<4>(job, panel, svals, tile, out),
                    (false, 3) => gemm_tile::<3>(job, panel, svals, tile, out),
                    (false, 2) => gemm_tile::<2>(job, panel, svals, tile, out),
                    (false, _) => gemm_tile::<1>(job, panel, svals, tile, out),
                }
            }
            b += nb;
        }
        p0 += np;
    }
}

/// One [`int8_gemm`] tile: the panel's 16 rows × activation rows `b .. b + B`, written to
/// `out[b + j][o0 .. o0 + np]`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI; `panel` must hold `cp` packed bytes per row.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn gemm_tile<const B: usize>(
    job: &Job<'_>,
    panel: &[u8],
    svals: &[f32],
    (b, np, o0): (usize, usize, usize),
    out: &mut [&mut [f32]],
) {
    let Acts::Int8 { xq, stride, scale, sum } = job.acts else {
        return;
    };
    let layout = &job.w.layout;
    let (cp, ng) = (job.w.cols_padded(), layout.n_groups());
    assert!(xq.len() >= (b + B) * stride && *stride >= cp && panel.len() >= 16 * cp);
    assert!(scale.len() >= (b + B) * ng && sum.len() >= (b + B) * ng && svals.len() >= PANEL * ng);
    let half = job.prec.half as i32;
    let x: [*const i8; B] = std::array::from_fn(|j| xq[(b + j) * stride..].as_ptr());
    let mut facc = [_mm512_setzero_ps(); B];
    for g in 0..ng {
        let cols = layout.group_cols(g);
        let (q0, q1) = (cols.start / 4, cols.end.div_ceil(4));
        let mut acc = [_mm512_setzero_si512(); B];
        for q in q0..q1 {
            // SAFETY: q < cp/4: 64·q + 64 ≤ 16·cp panel bytes, 4·q + 4 ≤ cp ≤ stride x bytes.
            unsafe {
                let wv = _mm512_loadu_si512(panel.as_ptr().add(64 * q).cast());
                for j in 0..B {
                    let xv = _mm512_set1_epi32(x[j].add(4 * q).cast::<i32>().read_unaligned());
                    acc[j] = _mm512_dpbusd_epi32(acc[j], wv, xv);
                }
            }
        }
        // SAFETY: 16 f32 at svals[16·g ..] (asserted length).
        let s = unsafe { _mm512_loadu_ps(svals.as_ptr().add(g * PANEL)) };
        for j in 0..B {
            let bb = b + j;
            let t = _mm512_sub_epi32(acc[j], _mm512_set1_epi32(half * sum[bb * ng + g] as i32));
            let sa = _mm512_mul_ps(s, _mm512_set1_ps(scale[bb * ng + g]));
            facc[j] = _mm512_add_ps(facc[j], _mm512_mul_ps(_mm512_cvtepi32_ps(t), sa));
        }
    }
    let step = _mm512_set1_ps(job.prec.step);
    for (j, f) in facc.into_iter().enumerate() {
        let o = &mut out[b + j][o0..o0 + np];
        // SAFETY: `o` holds np ≤ 16 f32; the mask writes only those.
        unsafe { _mm512_mask_storeu_ps(o.as_mut_ptr(), ((1u32 << np) - 1) as u16, _mm512_mul_ps(f, step)) };
    }
}

/// One [`int8_gemm`] tile on [`super::ActPath::Int8Fine`]: the panel's 16 rows × activation rows
/// `b .. b + B`, written to `out[b + j][o0 .. o0 + np]`. Per 16-column block the 4 quads' exact
/// sums of the 16 rows in one vector, then [`super::combine_fine`]'s f32 operations with one
/// accumulator per block position in its word, lane by lane (bit for bit the same).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI; `panel` must hold `cp` packed bytes per row.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn fine_gemm_tile<const B: usize>(
    job: &Job<'_>,
    panel: &[u8],
    svals: &[f32],
    (b, np, o0): (usize, usize, usize),
    out: &mut [&mut [f32]],
) {
    let Acts::Int8Fine { xq, stride, scale, offset } = job.acts else {
        return;
    };
    let w = job.w;
    let (cp, ng) = (w.cols_padded(), w.layout.n_groups());
    let per_row = cp / 4;
    assert!(w.fine_blocks_fit() && xq.len() >= (b + B) * stride && *stride >= cp && panel.len() >= 16 * cp);
    assert!(scale.len() >= (b + B) * per_row && offset.len() >= (b + B) * per_row && svals.len() >= PANEL * ng);
    let x: [*const i8; B] = std::array::from_fn(|j| xq[(b + j) * stride..].as_ptr());
    // Block k of the panel into `$y`, the accumulators of its position in the word (a macro, not
    // a closure: each set of accumulators stays in registers).
    macro_rules! block {
        ($k:expr, $y:ident) => {{
            let k = $k;
            // SAFETY: fine_block_group(k) < ng: 16 f32 at svals[16·g ..] (asserted length).
            let ws = unsafe { _mm512_loadu_ps(svals.as_ptr().add(PANEL * w.fine_block_group(k))) };
            let at = 16 * (k / 4) + 4 * (k % 4);
            // Starting from −offset, the sums come out signed and exact.
            let mut acc: [__m512i; B] = std::array::from_fn(|j| _mm512_set1_epi32(-offset[(b + j) * per_row + at]));
            for q in 4 * k..4 * k + 4 {
                // SAFETY: q < cp/4: 64·q + 64 ≤ 16·cp panel bytes, 4·q + 4 ≤ cp ≤ stride x bytes.
                unsafe {
                    let wv = _mm512_loadu_si512(panel.as_ptr().add(64 * q).cast());
                    for j in 0..B {
                        let xv = _mm512_set1_epi32(x[j].add(4 * q).cast::<i32>().read_unaligned());
                        acc[j] = _mm512_dpbusd_epi32(acc[j], wv, xv);
                    }
                }
            }
            for j in 0..B {
                let f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[j]), _mm512_set1_ps(scale[(b + j) * per_row + at]));
                $y[j] = _mm512_fmadd_ps(f, ws, $y[j]);
            }
        }};
    }
    let (mut y0, mut y1, mut y2, mut y3) =
        ([_mm512_setzero_ps(); B], [_mm512_setzero_ps(); B], [_mm512_setzero_ps(); B], [_mm512_setzero_ps(); B]);
    for wi in 0..cp / 64 {
        block!(4 * wi, y0);
        block!(4 * wi + 1, y1);
        block!(4 * wi + 2, y2);
        block!(4 * wi + 3, y3);
    }
    let step = _mm512_set1_ps(job.prec.step);
    for j in 0..B {
        let v = _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(y0[j], y2[j]), _mm512_add_ps(y1[j], y3[j])), step);
        let o = &mut out[b + j][o0..o0 + np];
        // SAFETY: `o` holds np ≤ 16 f32; the mask writes only those.
        unsafe { _mm512_mask_storeu_ps(o.as_mut_ptr(), ((1u32 << np) - 1) as u16, v) };
    }
}

/// Bytes of decoded weight rows decoded at once by the AVX-512 backend (at least 8 rows, the unit
/// of the int8 mat-vec kernel): small blocks keep the plane streams flowing between the decode and
/// the dot phases (measured: 4 KiB beat 16 KiB on 1536×576).
const BLOCK_BYTES: usize = 4 << 10;

/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI, and VBMI and GFNI if `job.fast_decode`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn run_avx512(job: &Job<'_>, range: Range<usize>, out: &mut [&mut [f32]]) {
    let w = job.w;
    let cp = w.cols_padded();
    let ng = w.layout.n_groups();
    let n = out.len();
    let signed = matches!(job.acts, Acts::F32 { .. });
    // Rows are decoded a block at a time (the plane words of consecutive rows are contiguous),
    // into L1-resident scratch, then dotted with every activation row.
    let gemm = n >= GEMM_MIN_BATCH && !signed && gemm_fits(w);
    let unit = if gemm { PANEL } else { 8 };
    let block_rows = (BLOCK_BYTES / cp.max(1)).max(1).next_multiple_of(unit).min(range.len());
    let segs = Segments::of(w);
    // int8 GEMM: one panel of repacked rows and its rows' scales per group.
    let (mut panel, mut svals) =
        if gemm { (vec![0u8; PANEL * cp], vec![0f32; PANEL * ng]) } else { (Vec::new(), Vec::new()) };
    let mut sc = Scratch::new(cp, n * ng);
    sc.bytes.resize(block_rows * cp + SLACK, 0);
    // f32 path: the block's dequantized rows (when more than 3 activation rows, or when the scale
    // is not uniform per 16 columns), 64-byte aligned.
    // Not needed (nor zeroed) when the codes are converted in registers for up to 3 rows.
    let tile_needed = n > 3 || (ng > 1 && !w.layout.group.is_multiple_of(16));
    let mut tile = if signed && tile_needed { AlignedF32::zeroed(block_rows * cp) } else { AlignedF32::zeroed(0) };
    // f32 path with rows split into column chunks: the accumulators saved between chunks.
    let mut accs = if signed && tile_needed && cp / 16 > F32_K_SPLIT {
        AlignedF32::zeroed(16 * n * block_rows)
    } else {
        AlignedF32::zeroed(0)
    };
    let mut r0 = range.start;
    while r0 < range.end {
        let nr = block_rows.min(range.end - r0);
        if job.fast_decode {
            // SAFETY: `fast_decode` is only set when VBMI and GFNI are available.
            unsafe { decode_words_vbmi(w, r0 * w.wpr, nr * w.wpr, job.prec, signed, &mut sc.bytes) };
        } else {
            for k in 0..nr {
                // SAFETY: AVX-512 F and BW are available (this function's contract).
                unsafe { decode_row_avx512(w, r0 + k, job.prec, signed, &mut sc.bytes[k * cp..]) };
            }
        }
        let rows = (r0, nr, r0 - range.start);
        if signed {
            // SAFETY: AVX-512 F and BW are available (this function's contract).
            unsafe { f32_block(job, &sc.bytes, (&mut tile, &mut accs), rows, out) };
            r0 += nr;
            continue;
        }
        if let (Acts::Int8Fine { .. }, false) = (job.acts, gemm) {
            // SAFETY: AVX-512 F, BW and VNNI are available (this function's contract).
            unsafe { int8_fine_rows4(job, &sc.bytes, rows, out) };
            r0 += nr;
            continue;
        }
        if gemm {
            // SAFETY: AVX-512 F, BW and VNNI are available (this function's contract); `gemm`
            // checked `gemm_fits`.
            unsafe { int8_gemm(job, &sc.bytes, (&mut panel, &mut svals), rows, out) };
            r0 += nr;
            continue;
        }
        // Rows the int8 kernels below do not take, one at a time.
        for k in (0..nr).filter(|_| segs.is_none()) {
            let (r, i) = (r0 + k, r0 + k - range.start);
            let row = &sc.bytes[k * cp..];
            if let Acts::Int8 { xq, stride, scale, sum } = job.acts {
                let xrow = |b: usize| &xq[b * stride..(b + 1) * stride];
                let half = i64::from(job.prec.half);
                for g in 0..ng {
                    let cols = w.layout.group_cols(g);
                    let mut b = 0;
                    while b < n {
                        let nb = if n - b >= 4 { 4 } else { 1 };
                        let t = if nb == 4 {
                            // SAFETY: AVX-512 F, BW and VNNI are available (this function's
                            // contract); the dot product checks its bounds.
                            unsafe { dot_u8i8_avx512::<4>(row, std::array::from_fn(|k| xrow(b + k)), cols.clone()) }
                        } else {
                            // SAFETY: as in the branch above.
                            let [t] = unsafe { dot_u8i8_avx512::<1>(row, [xrow(b)], cols.clone()) };
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
        if let (Some(segs), Acts::Int8 { .. }) = (&segs, job.acts) {
            match *segs {
                // SAFETY: AVX-512 F, BW and VNNI are available (this function's contract).
                _ if n == 1 => unsafe { int8_rows8_matvec(job, *segs, &sc.bytes, rows, out) },
                // SAFETY: as above.
                _ => unsafe { int8_rows4(job, segs, &sc.bytes, rows, out) },
            }
        }
        r0 += nr;
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
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    );
    let sel = _mm256_shuffle_epi8(v, shuf);
    let bm = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(sel, bm), bm)
}

/// [`decode_row_avx512_n`] with AVX2.
///
/// # Safety
/// The CPU must support AVX2. Bounds are checked (panics otherwise).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn decode_row_avx2_n<const N: usize>(w: &PlanarWeight, r: usize, prec: Prec, signed: bool, out: &mut [u8]) {
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

/// [`decode_row_avx2_n`] for `prec.bits`.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn decode_row_avx2(w: &PlanarWeight, r: usize, prec: Prec, signed: bool, out: &mut [u8]) {
    // SAFETY: the same CPU features as this function's (its contract).
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

/// The [`ActPath::Int8Fine`] accumulators of one weight row (signed codes `q`) and one
/// activation row `x`, as [`super::combine_fine`] orders them: `[Y_0, Y_2, Y_1, Y_3]`. Per 64-column
/// word the four 16-column block sums are exact (`vpmaddubsw(|q|, sign(x, q))`, `vpmaddwd` by 1,
/// two horizontal adds give blocks 4w, 4w + 2, 4w + 1, 4w + 3 in one vector), then in f32
/// `Y ← fma(t · a, s, Y)` lane by lane, with `ascale` and `wscale` the blocks' activation and
/// weight scales in that order (4 per word).
///
/// # Safety
/// The CPU must support AVX2 and FMA. Bounds are checked (panics otherwise).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn fine_row_avx2(q: &[u8], x: &[i8], ascale: &[f32], wscale: &[f32]) -> [f32; 4] {
    let words = ascale.len() / 4;
    assert!(wscale.len() == 4 * words && q.len() >= WORD_BITS * words && x.len() >= WORD_BITS * words);
    let (pq, px) = (q.as_ptr(), x.as_ptr());
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm_setzero_ps();
    for wi in 0..words {
        let j = WORD_BITS * wi;
        // SAFETY: j + 64 ≤ 64 · words ≤ both lengths (asserted above).
        let (q0, q1, x0, x1) = unsafe {
            (
                _mm256_loadu_si256(pq.add(j).cast()),
                _mm256_loadu_si256(pq.add(j + 32).cast()),
                _mm256_loadu_si256(px.add(j).cast()),
                _mm256_loadu_si256(px.add(j + 32).cast()),
            )
        };
        // Sums of 4 columns: lanes 0–3 of m0 block 4w, 4–7 block 4w + 1; m1 blocks 4w + 2, 4w + 3.
        let m0 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q0, q0), _mm256_sign_epi8(x0, q0)), ones);
        let m1 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q1, q1), _mm256_sign_epi8(x1, q1)), ones);
        let h = _mm256_hadd_epi32(m0, m1);
        let t = _mm_hadd_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
        // SAFETY: 4 · wi + 4 ≤ 4 · words = both lengths.
        let (a, s) = unsafe { (_mm_loadu_ps(ascale.as_ptr().add(4 * wi)), _mm_loadu_ps(wscale.as_ptr().add(4 * wi))) };
        acc = _mm_fmadd_ps(_mm_mul_ps(_mm_cvtepi32_ps(t), a), s, acc);
    }
    let mut y = [0f32; 4];
    // SAFETY: 4 floats into 4.
    unsafe { _mm_storeu_ps(y.as_mut_ptr(), acc) };
    y
}

/// `Σ_j q[j] · x_b[j]` over `range` for `B` activation rows at once (both signed, `|x| ≤ 127`),
/// exactly: `vpmaddubsw(|q|, sign(x, q))` (pairs ≤ 2 · 128 · 127 < 2^15, no saturation),
/// `vpmaddwd` by 1 to i32. Loads may read up to 31 bytes past `range.end` (the activations are
/// masked there), so every slice needs that much slack.
///
/// # Safety
/// The CPU must support AVX2. Bounds and the slack are checked (panics otherwise).
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
///
/// # Safety
/// The CPU must support AVX2 and FMA. Lengths are checked (panics otherwise).
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
                    acc[b][k] = _mm256_fmadd_ps(vw, _mm256_loadu_ps(px[b].add(j + 8 * k)), acc[b][k]);
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
    // Int8Fine: every activation row's block scales, and each weight row's, in the order
    // `fine_row_avx2` takes them (blocks 4w, 4w + 2, 4w + 1, 4w + 3 of word w).
    let words = cp / WORD_BITS;
    let fine_order = |k: usize| 4 * (k / 4) + [0, 2, 1, 3][k % 4];
    let ascales: Vec<f32> = match job.acts {
        Acts::Int8Fine { scale, .. } => (0..n)
            .flat_map(|b| (0..4 * words).map(move |k| (b, fine_order(k))))
            .map(|(b, k)| scale[b * (cp / 4) + 16 * (k / 4) + 4 * (k % 4)])
            .collect(),
        _ => Vec::new(),
    };
    let mut wscales = vec![0f32; 4 * words];
    for (i, r) in range.enumerate() {
        // SAFETY: AVX2 and FMA are available (this function's contract), as for every call below;
        // the callees check their bounds.
        unsafe { decode_row_avx2(w, r, job.prec, true, &mut sc.bytes) };
        match job.acts {
            Acts::F32 { x, stride } => {
                let xrow = |b: usize| &x[b * stride..b * stride + cp];
                dequant_row(job, r, &sc.bytes, &mut sc.wrow);
                let mut b = 0;
                while b < n {
                    if n - b >= 4 {
                        // SAFETY: as for the decode above.
                        let y = unsafe { dot_f32_avx2::<4>(&sc.wrow, std::array::from_fn(|k| xrow(b + k))) };
                        for (k, v) in y.into_iter().enumerate() {
                            out[b + k][i] = v;
                        }
                        b += 4;
                    } else {
                        // SAFETY: as above.
                        out[b][i] = unsafe { dot_f32_avx2::<1>(&sc.wrow, [xrow(b)]) }[0];
                        b += 1;
                    }
                }
            }
            Acts::Int8Fine { xq, stride, .. } => {
                for (k, s) in wscales.iter_mut().enumerate() {
                    *s = job.scale(r, w.fine_block_group(fine_order(k)));
                }
                for (b, o) in out.iter_mut().enumerate() {
                    let (xb, ab) = (&xq[b * stride..(b + 1) * stride], &ascales[b * 4 * words..][..4 * words]);
                    // SAFETY: as above.
                    let y = unsafe { fine_row_avx2(&sc.bytes, xb, ab, &wscales) };
                    o[i] = ((y[0] + y[1]) + (y[2] + y[3])) * job.prec.step;
                }
            }
            Acts::Int8 { xq, stride, scale, .. } => {
                let xrow = |b: usize| &xq[b * stride..(b + 1) * stride];
                for g in 0..ng {
                    let cols = w.layout.group_cols(g);
                    let mut b = 0;
                    while b < n {
                        let nb = if n - b >= 4 { 4 } else { 1 };
                        let t = if nb == 4 {
                            // SAFETY: as above.
                            unsafe { dot_i8i8_avx2::<4>(&sc.bytes, std::array::from_fn(|k| xrow(b + k)), cols.clone()) }
                        } else {
                            // SAFETY: as above.
                            let [t] = unsafe { dot_i8i8_avx2::<1>(&sc.bytes, [xrow(b)], cols.clone()) };
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

/// [`decode_row_avx512`] for the tests.
///
/// # Safety
/// The CPU must support AVX-512 F and BW.
#[cfg(test)]
pub(super) unsafe fn test_decode_avx512(w: &PlanarWeight, r: usize, prec: Prec, signed: bool, out: &mut [u8]) {
    // SAFETY: this function's contract.
    unsafe { decode_row_avx512(w, r, prec, signed, out) }
}

/// [`decode_words_vbmi`] for the tests.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VBMI and GFNI.
#[cfg(test)]
pub(super) unsafe fn test_decode_words_vbmi(
    w: &PlanarWeight,
    f0: usize,
    nwords: usize,
    prec: Prec,
    signed: bool,
    out: &mut [u8],
) {
    // SAFETY: this function's contract.
    unsafe { decode_words_vbmi(w, f0, nwords, prec, signed, out) }
}

/// [`decode_row_avx2`] for the tests.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(test)]
pub(super) unsafe fn test_decode_avx2(w: &PlanarWeight, r: usize, prec: Prec, signed: bool, out: &mut [u8]) {
    // SAFETY: this function's contract.
    unsafe { decode_row_avx2(w, r, prec, signed, out) }
}
