//! Bit-plane resident layout: one copy of the weights, built once at load from the INT8 codes,
//! the scales and the tie rule, that serves every precision `l ∈ 2..=8` (and so any per-layer
//! mix), reading only `l + 1` bits per weight, and `y = Ŵ_l · x` kernels over it.
//!
//! # The identity
//!
//! Round-half-UP of the second rounding only looks at the top `l + 1` bits of a code `r`:
//!
//! ```text
//! HalfUp(r, l) = sat((r >> Δ) + bit_{Δ−1}(r))        Δ = 8 − l,  sat = clip to [−2^(l−1), 2^(l−1) − 1]
//! ```
//!
//! Round-half-EVEN differs from it only on exact ties (`r mod 2^Δ == 2^(Δ−1)`) whose floor is
//! even: those round down. A nonzero code is a tie at exactly ONE level (its lowest set bit is
//! bit `Δ − 1`), and `r − 1` rounds half-up like `r` at every level where `r` is not a tie. So for
//! HalfEven the layout stores `r = q − 1` for codes that are a tie rounding down at their level
//! `l ∈ 2..=7`, else `r = q`, and `HalfUp(r, l) == HalfEven(q, l)` for every `l ∈ 2..=7`, clipping
//! included (`q = −128` is never a tie for `l ≥ 2`, so `r` never underflows). The exact code is
//! `q = r + d` with a 9th plane `d ∈ {0, 1}`, all zero (and not stored) for HalfUp.
//! [`encode_code`] / [`decode_code`] are the per-weight form; a test proves them for all 256 codes,
//! every precision and both tie rules.
//!
//! # The layout
//!
//! ```text
//!  q (int8) ──tie adjust──► r = q − d ──offset binary──► u = r + 128 ∈ 0..=255 (sign bit flipped)
//!
//!  rows × cols weights, cols padded to a multiple of 64; bit j of word w of a row = weight 64·w + j
//!
//!               row 0           row 1                 row R−1
//!  plane 7  [ w0 w1 … wW−1 | w0 w1 … wW−1 | … | w0 w1 … wW−1 ]   ← MSB of u: one contiguous stream
//!  plane 6  [ …                                              ]
//!    ⋮
//!  plane 0  [ …                                              ]   ← LSB of u
//!  plane d  [ …                                              ]   ← HalfEven only (q = r + d)
//!
//!  precision l (Δ = 8 − l) reads planes 7 … Δ   (the top l bits of u)
//!                               + plane  Δ − 1  (the rounding bit)      = l + 1 streams
//!  precision 8 reads planes 7 … 0 + plane d (if stored)                 = 9 (8) streams
//!
//!  decoding one word (64 weights) of a row at precision l < 8, no per-weight branch:
//!    top_k  = plane[7 − k][row][w]                k = 0 … l−1
//!    carry  = plane[Δ − 1][row][w] & !(top_0 & … & top_{l−1})    ← saturation, in the mask domain
//!    u_l[j] = Σ_k bit_j(top_k) · 2^(l−1−k) + bit_j(carry)        ∈ 0 … 2^l − 1
//!    q_l[j] = u_l[j] − 2^(l−1)                                   (= second_round(q, l, tie))
//!  at l = 8: u_8[j] = u[j] + bit_j(d) ≤ 255 and q_8 = u_8 − 128 = q.
//! ```
//!
//! `u_l = min((u >> Δ) + bit_{Δ−1}(u), 2^l − 1)` is the offset-binary form of the identity
//! (`(r >> Δ) + 2^(l−1) = u >> Δ`); the clip only bites when the top `l` bits are all ones and the
//! rounding bit is set, which is what the `carry` mask removes.
//!
//! Planes of at least [`PLANE_GAP_MIN_BYTES`] are followed by a gap of [`PLANE_GAP_WORDS`] unused
//! words (so the streams read together do not alias in cache sets and DRAM banks); each plane
//! stays one contiguous stream, `plane(p)` returns it without the gap.
//!
//! Words are `u64` in memory; on a little-endian host the buffer is also an array of 32-bit words
//! (word `2w + h` holds weights `64w + 32h ..`), the unit a CUDA kernel would load.
//!
//! Padding columns (`cols .. cols_padded`) are encoded as `q = 0` (`u = 128`), which decodes to
//! `q_l = 0` at every precision, and the kernels also pad every activation row with zeros, so
//! padding contributes exactly 0 on both numeric paths.
//!
//! Resident size: `n_planes · rows · cols_padded / 8` bytes of planes (`n_planes` = 9 for
//! HalfEven, 8 for HalfUp, i.e. 9/8 or 8/8 of the int8 codes; plus 576 bytes of gap per plane of
//! at least 64 KiB) plus the scales as f32.
//!
//! # Kernels
//!
//! [`PlanarWeight::matvec`] and [`PlanarWeight::matmul`] compute `y = Ŵ_l · x` for 1 ..= 64
//! activation rows, on one of two numeric paths ([`ActPath`]) and one of three implementations
//! ([`Backend`]), with rows split across threads ([`KernelConfig`]):
//!
//! - [`ActPath::F32`]: each weight row is decoded to `q_l`, dequantized to f32 exactly as
//!   [`crate::dequantize`] does (`(q_l · 2^Δ) · s`, bit-identical), and dotted with the f32
//!   activations: the result equals `dequantize` + a naive f32 mat-vec up to summation order.
//! - [`ActPath::Int8`]: each activation row is quantized on the fly with one absmax scale per
//!   *weight scale group* (per row for per-channel weights; per group for group-scaled ones, at no
//!   extra cost because the kernel reduces once per weight group anyway), to `x_q ∈ [−127, 127]`
//!   (round half to even). Per group `g` the exact integer `T_g = Σ_j q_l[j] · x_q[j]` is
//!   computed — AVX-512 as `Σ u_l·x_q − 2^(l−1)·Σ x_q` with `vpdpbusd` (u8 × i8 → i32), the group
//!   sums `Σ x_q` computed once per activation row and shared by every weight row; AVX2 as `Σ q_l·x_q`
//!   with `vpmaddubsw` on `|q_l|` and `sign(x_q, q_l)` (no saturation since `|x_q| ≤ 127`) — and
//!   `y = 2^Δ · Σ_g T_g · (s_g · a_g)` in f32 in a fixed order. All backends therefore return
//!   bit-identical results on this path.
//! - [`ActPath::Int8Fine`]: int8 activations with one absmax scale per 16 columns, whatever the
//!   weight groups (SmolLM2's outlier channels need them: +0.12% perplexity at 8 bits where one
//!   scale per 128 columns costs +0.8%). Per 16-column block `k` the exact `T_k` as above, then
//!   `Y_{k mod 4} += (T_k · a_k) · s_{g(k)}` (a fused multiply-add) in f32 over the blocks in order and
//!   `y = 2^Δ · ((Y_0 + Y_2) + (Y_1 + Y_3))`: four accumulators, because the AVX-512 kernel
//!   holds the four blocks of a 64-column word of four weight rows in one vector. Bit-identical
//!   across backends. Weights whose groups are not a multiple of 16 columns take
//!   [`ActPath::Int8`].
//!
//! Weight rows are decoded once per call into small L1-resident scratch (the AVX-512 backend a
//! block of ~4 KiB, at least 8 rows, at once: the plane words of consecutive rows are contiguous,
//! and software prefetch keeps the `l + 1` streams ahead) and then dotted with every activation
//! row. AVX-512 int8: one activation row with per-channel or 64·k-column groups takes 8 weight
//! rows per pass (8 `vpdpbusd` chains, one folded transposing reduction per group, the f32
//! combination in 8 lanes); otherwise 4 weight rows × up to 4 activation rows per pass (groups of
//! 16 and 32 are lane-aligned sub-word segments; other group sizes take a generic per-group loop).
//! AVX-512 f32 is one register-blocked FMA microkernel for every batch size: the codes are
//! widened, converted and scaled in registers (8 weight rows × 1–3 activation rows), or, for 4–64
//! activation rows, once per block into a 64-byte aligned f32 tile (during the first pass) that
//! passes of 4 weight rows × up to 6 activation rows (24 accumulators) then read, so the decode
//! and the conversion are shared by all activation rows and the FMA units are the limit. Every
//! output is one 16-lane FMA chain over its row (lane i sums the columns ≡ i mod 16 in order)
//! reduced by one fixed tree, whatever the pass shape. Each output depends only on its weight row
//! and its activation row: not on the batch size, the row's position in the batch or the thread
//! count (bit for bit, on both paths), so batched decoding is reproducible.
//!
//! Threads: [`KernelConfig::threads`] splits the weight rows into contiguous shares, at most one
//! per [`MIN_SHARE_BYTES`] of work, claimed by the calling thread and a small persistent pool (std
//! only, started lazily; idle workers spin briefly, then sleep), because spawning threads per
//! call costs about as much as a whole 576×576 mat-vec.
//!
//! Cost model (AVX-512 with VBMI + GFNI, int8, per 64 weights of one row at `l` bits): `l + 1`
//! plane words loaded 8 at a time (plus the d word at 8 bits), 1.25 (`l = 2`) … 3 (`l ≥ 7`) byte
//! permutes for the transpose, 1 `vgf2p8affineqb`, 2 ops for rounding (`l < 8`) or 1 masked add
//! for d (8 bits), a store and a reload, 1 `vpdpbusd`, and per 8 rows a reduction and the f32
//! combination: ~6–9 vector ops. Measured on one Zen 5 core with the weight in L1/L2: 1536×576
//! (13 824 plane words) in ~21 µs at 8 bits and ~16 µs at 2 bits, i.e. the 8-bit mat-vec is
//! bound by the DRAM read of its 9 plane streams (~1 MB at ~30 GB/s) and the 2–4-bit ones by
//! the per-word work that does not shrink with `l` (transpose, `vpdpbusd`, reductions).

mod pool;
mod scalar;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::double_rounding::{check_bits, corrected_scales, KernelError, QuantizedWeight, ScaleLayout, TieRule};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

/// Weights per plane word.
pub const WORD_BITS: usize = 64;
/// Largest number of activation rows one [`PlanarWeight::matmul`] call accepts.
pub const MAX_BATCH: usize = 64;
/// Words left unused after every plane of at least [`PLANE_GAP_MIN_BYTES`] (576 bytes, 9 cache
/// lines), so that the `l + 1` plane streams a kernel reads at once do not start at addresses
/// equal modulo large powers of two (a 4096×4096 weight has 2 MiB planes): aliasing streams share
/// cache sets and DRAM banks. Measured on the 9 streams of a 4096×4096 weight, one Zen 5 core:
/// 26 GB/s read without the gap, 38 GB/s with it.
pub const PLANE_GAP_WORDS: usize = 72;
/// Plane size (bytes) from which planes get the gap; smaller weights stay cache-resident.
pub const PLANE_GAP_MIN_BYTES: usize = 64 << 10;

/// Words from the start of one plane to the next, for planes of `words` words.
#[inline]
pub(crate) fn plane_stride(words: usize) -> usize {
    if words * 8 >= PLANE_GAP_MIN_BYTES {
        words + PLANE_GAP_WORDS
    } else {
        words
    }
}

/// Bytes of every plane read that a kernel call prefetches before preparing its activations.
const START_PREFETCH_BYTES: usize = 1024;
/// Extra bytes after every scratch / activation row so SIMD tails may load a full vector.
const SLACK: usize = 64;
/// Columns per exact-i32 chunk of an integer dot product: `255 · 127 · 32768 < 2^31`.
const INT_CHUNK: usize = 32768;

/// Layout encoding of one code: `(u, d)` with `u = r + 128` (offset binary of the tie-adjusted
/// code `r`) and `d = q − r ∈ {0, 1}`; see the module docs. `d` is always 0 for HalfUp.
#[inline]
pub fn encode_code(q: i8, tie: TieRule) -> (u8, u8) {
    let d = match tie {
        TieRule::HalfUp => 0,
        TieRule::HalfEven => {
            // q ≠ 0 is a tie exactly at Δ = (index of its lowest set bit) + 1; served levels
            // l = 8 − Δ ∈ 2..=7 ⇔ Δ ∈ 1..=6. It rounds down under HalfEven iff q >> Δ is even.
            let delta = (q as u8).trailing_zeros() + 1; // 9 for q = 0
            u8::from((1..=6).contains(&delta) && (q >> delta) & 1 == 0)
        }
    };
    ((q as u8 ^ 0x80).wrapping_sub(d), d)
}

/// `q_l` from a layout encoding `(u, d)` (see [`encode_code`]):
/// `min((u >> Δ) + bit_{Δ−1}(u), 2^l − 1) − 2^(l−1)` for `bits < 8`, `u + d − 128` for 8.
///
/// # Panics
/// If `bits` is outside `2..=8` (like [`crate::second_round`]).
#[inline]
pub fn decode_code(u: u8, d: u8, bits: u32) -> i8 {
    assert!((2..=8).contains(&bits), "bit-width {bits} outside 2..=8");
    let ul = if bits == 8 {
        u16::from(u) + u16::from(d)
    } else {
        let delta = 8 - bits;
        ((u16::from(u) >> delta) + u16::from((u >> (delta - 1)) & 1)).min((1 << bits) - 1)
    };
    (ul as i16 - (1i16 << (bits - 1))) as i8
}

/// Implementation of the kernels. Every backend gives the same results on [`ActPath::Int8`]
/// (bit for bit) and the same up to f32 summation order on [`ActPath::F32`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Portable Rust (SWAR decoding); the reference.
    Scalar,
    /// x86_64 AVX2 + FMA.
    Avx2,
    /// x86_64 AVX-512 F + BW + VNNI.
    Avx512,
}

impl Backend {
    /// Every backend, slowest first.
    pub const ALL: [Backend; 3] = [Backend::Scalar, Backend::Avx2, Backend::Avx512];

    /// Whether this CPU can run the backend (run-time detection).
    pub fn is_available(self) -> bool {
        match self {
            Backend::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The backends this CPU can run, slowest first.
    pub fn available() -> Vec<Backend> {
        Self::ALL.into_iter().filter(|b| b.is_available()).collect()
    }

    /// The fastest available backend (detected once, then cached).
    pub fn best() -> Backend {
        static BEST: OnceLock<Backend> = OnceLock::new();
        *BEST.get_or_init(|| *Self::available().last().expect("the scalar backend is always available"))
    }

    /// "scalar", "avx2" or "avx512".
    pub fn name(self) -> &'static str {
        match self {
            Backend::Scalar => "scalar",
            Backend::Avx2 => "avx2",
            Backend::Avx512 => "avx512",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Numeric path of the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ActPath {
    /// f32 activations: decode, dequantize exactly, f32 FMA.
    #[default]
    F32,
    /// int8 activations (absmax per weight scale group, quantized on the fly), exact integer dot
    /// products per scale group, f32 only to combine groups.
    Int8,
    /// int8 activations with one absmax scale per 16 columns whatever the weight groups, exact
    /// integer dot products per 16 columns combined in f32 ([`ActPath::Int8`] for weights whose
    /// groups are not a multiple of 16 columns).
    Int8Fine,
    /// [`ActPath::Int8`] at [`INT8_MAX_BITS`] bits and below, where the weights' own rounding
    /// dominates (SmolLM2, WikiText-2 slice: +0.9% perplexity at 4 bits for ~1.4× decode speed);
    /// [`ActPath::Int8Fine`] above on the AVX-512 backend, where one activation scale per weight
    /// group would cost +0.8% at 8 bits and 16-column blocks cost +0.12%, 1.0–1.2× the f32 path's
    /// speed (docs/RESULTS.md, docs/BENCHMARKS.md); [`ActPath::F32`] above on the others.
    Auto,
}

/// Highest precision [`ActPath::Auto`] serves with int8 activations.
pub const INT8_MAX_BITS: u32 = 4;

impl ActPath {
    /// The numeric path of a call at `bits` on `backend`: [`ActPath::Auto`] resolved, the others as
    /// they are. Above [`INT8_MAX_BITS`] `Auto` takes [`ActPath::Int8Fine`] only on the AVX-512
    /// backend: the AVX2 kernel for it (per-row horizontal adds per 16-column block) measured
    /// 1.2–1.6× slower than AVX2's f32 path on SmolLM2's shapes, and the portable backend has none.
    pub fn at(self, bits: u32, backend: Backend) -> ActPath {
        match self {
            ActPath::Auto if bits <= INT8_MAX_BITS => ActPath::Int8,
            ActPath::Auto if backend == Backend::Avx512 => ActPath::Int8Fine,
            ActPath::Auto => ActPath::F32,
            path => path,
        }
    }
}

/// How a kernel call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelConfig {
    pub backend: Backend,
    pub path: ActPath,
    /// Threads the weight rows are split across in contiguous equal shares, claimed by the
    /// calling thread and the crate's persistent worker pool (started lazily, spinning briefly
    /// when idle). 0 counts as 1; at most one share per row, and at most one per
    /// [`MIN_SHARE_BYTES`] of work (plane bytes read × activation rows): handing over a share
    /// costs more than it saves on tiny mat-vecs. Results do not depend on the number of shares.
    pub threads: usize,
}

impl Default for KernelConfig {
    /// [`Backend::best`], [`ActPath::F32`], 1 thread.
    fn default() -> Self {
        KernelConfig { backend: Backend::best(), path: ActPath::F32, threads: 1 }
    }
}

impl KernelConfig {
    pub fn new(backend: Backend, path: ActPath, threads: usize) -> Self {
        KernelConfig { backend, path, threads }
    }
}

/// Decoding parameters of one precision.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prec {
    pub bits: u32,
    /// 2^(l−1): the offset of the unsigned `u_l`.
    pub half: u8,
    /// 2^Δ as f32.
    pub step: f32,
}

impl Prec {
    fn new(bits: u32) -> Result<Self, KernelError> {
        check_bits(bits)?;
        Ok(Prec { bits, half: 1 << (bits - 1), step: (1u32 << (8 - bits)) as f32 })
    }
}

/// The plane words one row needs at one precision.
pub(crate) struct RowPlanes<'a> {
    /// Top planes, most significant first: `top[k]` is plane `7 − k`, `k < n_top`.
    pub top: [&'a [u64]; 8],
    pub n_top: usize,
    /// Rounding plane (`bits < 8`) or d plane (`bits == 8`, HalfEven).
    pub extra: Option<&'a [u64]>,
    /// Whether `extra` is a rounding plane (carry = extra & !all-ones-top) or the d plane.
    pub extra_is_round: bool,
}

impl RowPlanes<'_> {
    /// The `N = n_top` top plane words (most significant first) and the carry word of word `w`:
    /// the rounding bit where the top bits are not all ones (`bits < 8`), or the d bit (8).
    #[inline(always)]
    pub fn word<const N: usize>(&self, w: usize) -> ([u64; N], u64) {
        debug_assert_eq!(N, self.n_top);
        let mut tops = [0u64; N];
        let mut all = !0u64;
        for (t, plane) in tops.iter_mut().zip(&self.top) {
            *t = plane[w];
            all &= *t;
        }
        let carry = match self.extra {
            Some(e) if self.extra_is_round => e[w] & !all,
            Some(d) => d[w],
            None => 0,
        };
        (tops, carry)
    }
}

/// Calls `$f::<N>($args)` with `N = $bits` (validated, 2..=8) as a constant, so the per-word
/// plane loops unroll.
macro_rules! by_bits {
    ($bits:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $bits {
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            _ => $f::<8>($($arg),*),
        }
    };
}
pub(crate) use by_bits;

/// A weight in the bit-plane layout (module docs), serving every precision 2..=8.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanarWeight {
    layout: ScaleLayout,
    tie: TieRule,
    /// Words per row, `cols_padded / 64`.
    wpr: usize,
    /// `[n_planes][plane_stride]`, plane p = `[rows][wpr]` then the gap: planes 0..8 of `u`, then
    /// d when `has_d`.
    planes: Vec<u64>,
    has_d: bool,
    scales: Vec<f32>,
    /// The scales of each corrected precision ([`crate::corrected_scales`]): what the kernels
    /// read at that precision instead of `scales`.
    corrected: BTreeMap<u32, Vec<f32>>,
}

fn mismatch(what: &'static str, expected: usize, got: usize) -> KernelError {
    KernelError::LengthMismatch { what, expected, got }
}

impl PlanarWeight {
    /// Builds the layout from int8 codes, scales and the tie rule of the checkpoint.
    pub fn from_quantized(w: &QuantizedWeight, tie: TieRule) -> Result<Self, KernelError> {
        let layout = w.layout;
        layout.validate()?;
        if w.codes.len() != layout.n_weights() {
            return Err(mismatch("codes", layout.n_weights(), w.codes.len()));
        }
        if w.scales.len() != layout.n_scales() {
            return Err(mismatch("scales", layout.n_scales(), w.scales.len()));
        }
        w.validate_corrections()?;
        let (rows, cols) = (layout.rows, layout.cols);
        let wpr = cols.div_ceil(WORD_BITS);
        let too_large = KernelError::TooLarge { rows, cols };
        let words = wpr.checked_mul(WORD_BITS).and_then(|_| rows.checked_mul(wpr)).ok_or(too_large.clone())?;
        let mut table = [(0u8, 0u8); 256];
        for (i, e) in table.iter_mut().enumerate() {
            *e = encode_code((i as u8 ^ 0x80) as i8, tie);
        }
        let enc = |q: i8| table[usize::from(q as u8 ^ 0x80)];
        let has_d = w.codes.iter().any(|&q| enc(q).1 != 0);
        let n_planes = 8 + usize::from(has_d);
        let stride = plane_stride(words);
        let mut planes = vec![0u64; stride.checked_mul(n_planes).ok_or(too_large)?];
        for r in 0..rows {
            let row = &w.codes[r * cols..(r + 1) * cols];
            for wi in 0..wpr {
                let mut pw = [0u64; 9];
                for j in 0..WORD_BITS {
                    // Padding encodes q = 0: u = 128, d = 0.
                    let (u, d) = row.get(wi * WORD_BITS + j).map_or((128, 0), |&q| enc(q));
                    for (p, word) in pw.iter_mut().enumerate().take(8) {
                        *word |= u64::from((u >> p) & 1) << j;
                    }
                    pw[8] |= u64::from(d) << j;
                }
                for (p, &word) in pw.iter().enumerate().take(n_planes) {
                    planes[p * stride + r * wpr + wi] = word;
                }
            }
        }
        Ok(PlanarWeight {
            layout,
            tie,
            wpr,
            planes,
            has_d,
            scales: w.scales.clone(),
            corrected: w.corrections.iter().map(|(&b, a)| (b, corrected_scales(&w.scales, a, &layout))).collect(),
        })
    }

    pub fn rows(&self) -> usize {
        self.layout.rows
    }

    pub fn cols(&self) -> usize {
        self.layout.cols
    }

    /// Columns rounded up to a multiple of 64 (the plane word).
    pub fn cols_padded(&self) -> usize {
        self.wpr * WORD_BITS
    }

    /// Whether [`ActPath::Int8Fine`] serves this weight: every 16-column activation block inside
    /// one scale group.
    pub(crate) fn fine_blocks_fit(&self) -> bool {
        self.layout.n_groups() <= 1 || self.layout.group.is_multiple_of(FINE_BLOCK)
    }

    /// The scale group of 16-column block `k` on [`ActPath::Int8Fine`] (blocks in the padding
    /// take the last column's group: they add `(0 · 0) · s`).
    #[inline(always)]
    pub(crate) fn fine_block_group(&self, k: usize) -> usize {
        if self.layout.n_groups() <= 1 {
            0
        } else {
            (FINE_BLOCK * k).min(self.layout.cols.saturating_sub(1)) / self.layout.group
        }
    }

    pub fn layout(&self) -> &ScaleLayout {
        &self.layout
    }

    pub fn tie(&self) -> TieRule {
        self.tie
    }

    /// Scales, row-major `[rows, n_groups]` as in [`QuantizedWeight`].
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The scales served at `bits`: [`Self::scales`], or their corrected values where the
    /// checkpoint corrects `bits` (same layout).
    pub fn scales_at(&self, bits: u32) -> &[f32] {
        self.corrected.get(&bits).map_or(&self.scales, Vec::as_slice)
    }

    /// The precisions the checkpoint corrects (whose [`Self::scales_at`] are not [`Self::scales`]).
    pub fn corrected_precisions(&self) -> impl Iterator<Item = u32> + '_ {
        self.corrected.keys().copied()
    }

    /// Every plane word, planes one after the other (each `rows · cols_padded / 64` words, then
    /// its gap, see [`PLANE_GAP_WORDS`]): what a GPU upload copies.
    pub fn plane_words(&self) -> &[u64] {
        &self.planes
    }

    /// Whether the d plane is stored (HalfEven with at least one adjusted code).
    pub fn has_d_plane(&self) -> bool {
        self.has_d
    }

    /// Number of stored planes: 8, or 9 with the d plane.
    pub fn n_planes(&self) -> usize {
        8 + usize::from(self.has_d)
    }

    /// Plane `p` (0..8 = bit p of `u`, 8 = d), `[rows][cols_padded / 64]` words; `None` if absent.
    pub fn plane(&self, p: usize) -> Option<&[u64]> {
        let n = self.rows() * self.wpr;
        let start = p * plane_stride(n);
        (p < self.n_planes()).then(|| &self.planes[start..start + n])
    }

    /// Bytes held: planes (with the gaps between large planes, see [`PLANE_GAP_WORDS`]) plus f32
    /// scales and the corrected scales of each corrected precision.
    pub fn resident_bytes(&self) -> usize {
        self.planes.len() * 8 + self.scales.len() * 4 + self.corrected.values().map(|a| a.len() * 4).sum::<usize>()
    }

    /// Planes read at `bits`: `bits + 1` below 8; at 8 the 8 planes of `u` plus d if stored.
    pub fn planes_read(&self, bits: u32) -> Result<usize, KernelError> {
        check_bits(bits)?;
        Ok(if bits == 8 { self.n_planes() } else { bits as usize + 1 })
    }

    /// Plane bytes one pass over the weight at `bits` reads: `planes_read(bits) · rows ·
    /// cols_padded / 8`, i.e. `(bits + 1)/8` of the (padded) int8 codes.
    pub fn plane_bytes_read(&self, bits: u32) -> Result<usize, KernelError> {
        Ok(self.planes_read(bits)? * self.rows() * self.wpr * 8)
    }

    /// All bytes one pass at `bits` reads: [`Self::plane_bytes_read`] plus the f32 scales of that
    /// precision (corrected or not, the same count).
    pub fn bytes_read(&self, bits: u32) -> Result<usize, KernelError> {
        Ok(self.plane_bytes_read(bits)? + self.scales_at(bits).len() * 4)
    }

    /// Starts fetching the first [`START_PREFETCH_BYTES`] from row `first` of every plane read at
    /// `bits`, so that the DRAM latency of a call's first plane words overlaps the activation
    /// preparation.
    #[inline]
    fn prefetch_start(&self, bits: u32, first: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let per_plane = self.rows() * self.wpr;
            let stride = plane_stride(per_plane);
            let start = first.min(self.rows()) * self.wpr;
            let lines = ((per_plane - start) * 8).min(START_PREFETCH_BYTES).div_ceil(64);
            let lo = if bits < 8 { 7 - bits as usize } else { 0 };
            let hi = if bits == 8 { self.n_planes() } else { 8 };
            for p in lo..hi {
                let base = self.planes[p * stride + start..].as_ptr().cast::<u8>();
                for l in 0..lines {
                    // SAFETY: prefetching never faults; the addresses stay inside plane p anyway
                    // (l · 64 < (per_plane − start) · 8 rounded up to a line).
                    unsafe {
                        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                        _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(64 * l).cast());
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (bits, first);
    }

    /// Plane `p`, row `r`.
    #[inline]
    fn plane_row(&self, p: usize, r: usize) -> &[u64] {
        let start = p * plane_stride(self.rows() * self.wpr) + r * self.wpr;
        &self.planes[start..start + self.wpr]
    }

    /// The planes row `r` needs at precision `bits` (validated).
    #[inline]
    pub(crate) fn row_planes(&self, r: usize, bits: u32) -> RowPlanes<'_> {
        let n_top = bits as usize;
        let mut top = [&[][..]; 8];
        for (k, t) in top.iter_mut().enumerate().take(n_top) {
            *t = self.plane_row(7 - k, r);
        }
        let (extra, extra_is_round) = if bits < 8 {
            (Some(self.plane_row(7 - n_top, r)), true)
        } else if self.has_d {
            (Some(self.plane_row(8, r)), false)
        } else {
            (None, false)
        };
        RowPlanes { top, n_top, extra, extra_is_round }
    }

    /// `(u, d)` of weight `(r, c)`, `c < cols_padded`, by gathering single bits (slow, simple).
    fn encoded_at(&self, r: usize, c: usize) -> (u8, u8) {
        let (w, j) = (c / WORD_BITS, c % WORD_BITS);
        let bit = |p: usize| ((self.plane_row(p, r)[w] >> j) & 1) as u8;
        let u = (0..8).fold(0u8, |u, p| u | (bit(p) << p));
        let d = if self.has_d { bit(8) } else { 0 };
        (u, d)
    }

    /// The exact int8 codes (row-major `[rows, cols]`).
    pub fn to_codes(&self) -> Vec<i8> {
        self.collect_codes(|u, d| (u.wrapping_add(d) ^ 0x80) as i8)
    }

    /// The codes served at `bits`, `second_round(q, bits, tie)` for every weight, decoded from the
    /// planes one weight at a time with [`decode_code`] (a reference for tests, not a kernel).
    pub fn codes_at(&self, bits: u32) -> Result<Vec<i8>, KernelError> {
        check_bits(bits)?;
        Ok(self.collect_codes(|u, d| decode_code(u, d, bits)))
    }

    fn collect_codes(&self, f: impl Fn(u8, u8) -> i8) -> Vec<i8> {
        let (rows, cols) = (self.rows(), self.cols());
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for c in 0..cols {
                let (u, d) = self.encoded_at(r, c);
                out.push(f(u, d));
            }
        }
        out
    }

    /// Rows `rows` of the weight served at `bits`, dequantized: `out[i·cols..(i+1)·cols]` is row
    /// `rows[i]` of `Ŵ_bits = (q_l · 2^Δ) · s`, bit for bit what [`crate::dequantize`] gives for
    /// those rows (scale included). An embedding lookup: only the rows asked for are decoded.
    pub fn dequantize_rows(&self, bits: u32, rows: &[usize], out: &mut [f32]) -> Result<(), KernelError> {
        let prec = Prec::new(bits)?;
        let cols = self.cols();
        if out.len() != rows.len() * cols {
            return Err(mismatch("out", rows.len() * cols, out.len()));
        }
        if let Some(&row) = rows.iter().find(|&&r| r >= self.rows()) {
            return Err(KernelError::RowOutOfRange { row, rows: self.rows() });
        }
        if cols == 0 {
            return Ok(());
        }
        let mut q = vec![0u8; self.cols_padded() + SLACK];
        let scales = self.scales_at(bits);
        for (&r, dst) in rows.iter().zip(out.chunks_exact_mut(cols)) {
            scalar::decode_row(self, r, prec, true, &mut q);
            for g in 0..self.layout.n_groups() {
                let s = scales[r * self.layout.n_groups() + g];
                let range = self.layout.group_cols(g);
                for (o, &v) in dst[range.clone()].iter_mut().zip(&q[range]) {
                    *o = f32::from(v as i8) * prec.step * s;
                }
            }
        }
        Ok(())
    }

    /// `y = Ŵ_bits · x` for one activation row: `x` has `cols` values, `y` has `rows`.
    pub fn matvec(&self, bits: u32, x: &[f32], y: &mut [f32], cfg: &KernelConfig) -> Result<(), KernelError> {
        self.matmul(bits, x, 1, y, cfg)
    }

    /// `Y = X · Ŵ_bitsᵀ` for `n ∈ 1..=64` activation rows: `x` is row-major `[n, cols]`, `y` is
    /// row-major `[n, rows]` (`y[b·rows + r] = Σ_c Ŵ[r, c] · x[b·cols + c]`).
    pub fn matmul(&self, bits: u32, x: &[f32], n: usize, y: &mut [f32], cfg: &KernelConfig) -> Result<(), KernelError> {
        self.matmul_impl(bits, x, n, y, cfg, (true, MIN_SHARE_BYTES))
    }

    /// `Y_i = X_i · Ŵ_{bits_i}ᵀ` for several activation batches, each at its own precision, in one
    /// pass over the weight: every thread walks its share of the rows a block at a time and
    /// serves every part from the block's plane words while they are in cache, so the planes are
    /// read from memory once for all precisions (not once per precision) and the worker pool is
    /// handed one job. Each part's results are bit for bit those of [`Self::matmul`] on it alone
    /// (an output depends only on its weight row and activation row). Parts may repeat a
    /// precision; each takes 1..=64 activation rows.
    pub fn matmul_multi(&self, parts: &mut [MatmulPart<'_>], cfg: &KernelConfig) -> Result<(), KernelError> {
        self.multi_impl(parts, cfg, (true, MIN_SHARE_BYTES))
    }

    /// [`Self::matmul`] with `(fast_decode, min_share)`: `fast_decode: false` keeps the AVX-512
    /// backend on its AVX-512 F + BW decoder even where VBMI and GFNI are available, and
    /// `min_share` is the least work per thread (0: split as asked), so tests cover every path.
    pub(crate) fn matmul_impl(
        &self,
        bits: u32,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        cfg: &KernelConfig,
        tuning: (bool, usize),
    ) -> Result<(), KernelError> {
        self.multi_impl(&mut [MatmulPart { bits, x, n, y }], cfg, tuning)
    }

    /// [`Self::matmul_multi`] with the tuning of [`Self::matmul_impl`].
    pub(crate) fn multi_impl(
        &self,
        parts: &mut [MatmulPart<'_>],
        cfg: &KernelConfig,
        tuning: (bool, usize),
    ) -> Result<(), KernelError> {
        group_impl(&mut [WeightParts::all(self, parts)], cfg, tuning)
    }

    /// Checks `parts` against this weight; returns each part's precision and the work of all
    /// (plane bytes read × activation rows).
    fn check_parts(&self, rows: &Range<usize>, parts: &[MatmulPart<'_>]) -> Result<(Vec<Prec>, usize), KernelError> {
        crate::double_rounding::check_row_range(rows, self.rows())?;
        let (rows, cols) = (rows.len(), self.cols());
        let mut precs = Vec::with_capacity(parts.len());
        let mut work = 0usize;
        for part in parts {
            let prec = Prec::new(part.bits)?;
            if !(1..=MAX_BATCH).contains(&part.n) {
                return Err(KernelError::InvalidBatch(part.n));
            }
            if part.x.len() != part.n * cols {
                return Err(mismatch("x", part.n * cols, part.x.len()));
            }
            if part.y.len() != part.n * rows {
                return Err(mismatch("y", part.n * rows, part.y.len()));
            }
            precs.push(prec);
            let bytes = self.plane_bytes_read(part.bits)?.saturating_mul(rows) / self.rows().max(1);
            work = work.saturating_add(bytes.saturating_mul(part.n));
        }
        Ok((precs, work))
    }

    /// The activations of every part, prepared once for all threads.
    fn prepare_acts(&self, parts: &[MatmulPart<'_>], precs: &[Prec], cfg: &KernelConfig) -> Vec<Acts> {
        let cols = self.cols();
        parts
            .iter()
            .zip(precs)
            .map(|(p, prec)| match cfg.path.at(p.bits, cfg.backend) {
                ActPath::Int8Fine if self.fine_blocks_fit() => {
                    Acts::int8_fine(p.x, p.n, cols, self.cols_padded(), prec.half)
                }
                ActPath::Int8 | ActPath::Int8Fine => Acts::int8(p.x, p.n, &self.layout, self.cols_padded()),
                _ => Acts::f32(p.x, p.n, cols, self.cols_padded()),
            })
            .collect()
    }
}

/// One weight of a [`matmul_group`] call and its activation batches (as for
/// [`PlanarWeight::matmul_multi`]), over the weight's rows `rows` only: each part's `y` is
/// `[n, rows.len()]` (the outputs of those rows). A weight may appear several times over
/// disjoint row ranges, each at its own precisions (a head whose leading rows are served wider).
#[derive(Debug)]
pub struct WeightParts<'w, 'p, 'a> {
    pub weight: &'w PlanarWeight,
    pub rows: Range<usize>,
    pub parts: &'p mut [MatmulPart<'a>],
}

impl<'w, 'p, 'a> WeightParts<'w, 'p, 'a> {
    /// Every row of `weight`.
    pub fn all(weight: &'w PlanarWeight, parts: &'p mut [MatmulPart<'a>]) -> Self {
        WeightParts { weight, rows: 0..weight.rows(), parts }
    }
}

/// [`PlanarWeight::matmul_multi`] for several weights in one hand-over to the worker pool: the
/// threads split the weights' rows taken end to end, so weights that share their input (a
/// layer's q, k and v, or its gate and up) cost one hand-over instead of one each, and a weight
/// too small to split on its own (SmolLM2's 192-row k and v at low precision) no longer runs on
/// one thread while the others wait. Every output is bit for bit that of the weight's own call.
pub fn matmul_group(calls: &mut [WeightParts<'_, '_, '_>], cfg: &KernelConfig) -> Result<(), KernelError> {
    group_impl(calls, cfg, (true, MIN_SHARE_BYTES))
}

/// [`matmul_group`] with the tuning of [`PlanarWeight::matmul_impl`].
pub(crate) fn group_impl(
    calls: &mut [WeightParts<'_, '_, '_>],
    cfg: &KernelConfig,
    (fast_decode, min_share): (bool, usize),
) -> Result<(), KernelError> {
    if !cfg.backend.is_available() {
        return Err(KernelError::BackendUnavailable(cfg.backend.name()));
    }
    let checked: Vec<(Vec<Prec>, usize)> =
        calls.iter().map(|c| c.weight.check_parts(&c.rows, c.parts)).collect::<Result<_, _>>()?;
    let fast_decode = fast_decode && cfg.backend == Backend::Avx512 && vbmi_gfni();
    // The weights with something to compute, in the row order the threads split.
    struct Active {
        call: usize,
        /// First row in the threads' row order.
        start: usize,
        /// The weight's own number of the first row computed.
        first: usize,
        rows: usize,
        /// Rows per block of a several-precision call.
        block: usize,
        widest: u32,
    }
    let mut active = Vec::new();
    let (mut total_rows, mut work) = (0usize, 0usize);
    for (i, (call, (_, w))) in calls.iter().zip(&checked).enumerate() {
        let (Some(widest), rows) = (call.parts.iter().map(|p| p.bits).max(), call.rows.len()) else { continue };
        if rows == 0 {
            continue;
        }
        // One part: the kernels' own blocking over the whole share. Several: blocks whose
        // planes stay in cache while every part reads them.
        let block = if call.parts.len() == 1 {
            rows
        } else {
            let row_bytes = call.weight.planes_read(widest)? * call.weight.wpr * 8;
            (MULTI_BLOCK_BYTES / row_bytes.max(1)).max(1).next_multiple_of(16)
        };
        active.push(Active { call: i, start: total_rows, first: call.rows.start, rows, block, widest });
        total_rows += rows;
        work = work.saturating_add(*w);
    }
    let Some(first) = active.first() else {
        return Ok(());
    };
    calls[first.call].weight.prefetch_start(first.widest, first.first);
    let acts: Vec<Vec<Acts>> =
        calls.iter().zip(&checked).map(|(c, (precs, _))| c.weight.prepare_acts(c.parts, precs, cfg)).collect();
    let jobs: Vec<Vec<Job<'_>>> = calls
        .iter()
        .zip(&checked)
        .zip(&acts)
        .map(|((c, (precs, _)), acts)| {
            c.parts
                .iter()
                .zip(precs)
                .zip(acts)
                .map(|((p, &prec), acts)| Job {
                    w: c.weight,
                    scales: c.weight.scales_at(p.bits),
                    prec,
                    acts,
                    backend: cfg.backend,
                    fast_decode,
                })
                .collect()
        })
        .collect();
    let threads = share_count(cfg.threads, total_rows, work, min_share);
    let bounds: Vec<Range<usize>> =
        (0..threads).map(|t| t * total_rows / threads..(t + 1) * total_rows / threads).collect();
    // Thread t's rows of an active weight, in the weight's own row numbers (maybe none).
    let local = |t: usize, a: &Active| {
        let lo = bounds[t].start.clamp(a.start, a.start + a.rows);
        let hi = bounds[t].end.clamp(lo, a.start + a.rows);
        lo - a.start + a.first..hi - a.start + a.first
    };
    // outs[t][a][part][b]: thread t's rows of activation row b of a part of active weight a.
    type ThreadOuts<'y> = Vec<Vec<Vec<&'y mut [f32]>>>;
    let mut outs: Vec<ThreadOuts<'_>> = (0..threads).map(|_| Vec::with_capacity(active.len())).collect();
    // `active` is in call order, one entry per call at most.
    for (i, call) in calls.iter_mut().enumerate() {
        let Some(a) = active.iter().find(|a| a.call == i) else { continue };
        for out in outs.iter_mut() {
            out.push(Vec::with_capacity(call.parts.len()));
        }
        for part in call.parts.iter_mut() {
            for out in outs.iter_mut() {
                out.last_mut().expect("pushed above").push(Vec::with_capacity(part.n));
            }
            for yb in part.y.chunks_exact_mut(a.rows) {
                let mut rest = yb;
                for (t, out) in outs.iter_mut().enumerate() {
                    let (head, tail) = rest.split_at_mut(local(t, a).len());
                    out.last_mut().and_then(|w| w.last_mut()).expect("pushed above").push(head);
                    rest = tail;
                }
            }
        }
    }
    let run = |t: usize, out: &mut [Vec<Vec<&mut [f32]>>]| {
        for (a, out) in active.iter().zip(out.iter_mut()) {
            let (jobs, range, block) = (&jobs[a.call], local(t, a), a.block);
            if range.is_empty() {
                continue;
            }
            if range.len() <= block {
                for (job, part) in jobs.iter().zip(out.iter_mut()) {
                    job.run(range.clone(), part);
                }
                continue;
            }
            let mut r0 = range.start;
            while r0 < range.end {
                let r1 = (r0 + block).min(range.end);
                let (lo, hi) = (r0 - range.start, r1 - range.start);
                for (job, part) in jobs.iter().zip(out.iter_mut()) {
                    let mut sub: Vec<&mut [f32]> = part.iter_mut().map(|o| &mut o[lo..hi]).collect();
                    job.run(r0..r1, &mut sub);
                }
                r0 = r1;
            }
        }
    };
    if threads == 1 {
        run(0, &mut outs[0]);
    } else {
        let shares: Vec<std::sync::Mutex<ThreadOuts<'_>>> = outs.into_iter().map(std::sync::Mutex::new).collect();
        pool::run(threads, |t| {
            let mut out = shares[t].lock().unwrap_or_else(|e| e.into_inner());
            run(t, &mut out);
        });
    }
    Ok(())
}

/// One batch of activation rows of a [`PlanarWeight::matmul_multi`] call, served at `bits`: `x`
/// is row-major `[n, cols]`, `y` receives `[n, rows]`.
#[derive(Debug)]
pub struct MatmulPart<'a> {
    pub bits: u32,
    pub x: &'a [f32],
    pub n: usize,
    pub y: &'a mut [f32],
}

/// Plane bytes per row block of a several-precision [`PlanarWeight::matmul_multi`]: every part
/// runs over a block before the next, so the block's planes are read from memory once and from
/// cache by the other parts. 1 MiB stays in L2 or L3; smaller blocks cost more in per-call setup
/// than they save (measured on the Intel Xeon VM, `drq-bench --mixed -b 5`, 1 thread: 64 KiB
/// 8% slower than one call per precision, 1 MiB equal).
const MULTI_BLOCK_BYTES: usize = 1 << 20;

/// Runs `f(0), …, f(n − 1)` on the calling thread and the kernels' worker pool (the pool the
/// mat-vecs split their rows over), returning when all have finished: for other per-step work
/// that splits into independent shares, such as attention over many positions. A panic in a
/// share is re-raised here.
pub fn run_shares<F: Fn(usize) + Sync>(n: usize, f: F) {
    pool::run(n, f)
}

/// Least work (plane bytes read × activation rows) per thread of a kernel call. With the pool's
/// spinning workers a share costs well under a microsecond to hand over; measured on a 2-vCPU
/// Zen 5 (SmolLM2 decode, 2 threads, `drq-bench`): 64 KiB gave 1.4–1.7× one thread on the f32
/// path (1.2–1.4× int8), 256 KiB and 2 MiB less (the 576×576 mat-vecs stayed on one thread).
pub const MIN_SHARE_BYTES: usize = 64 << 10;

/// Threads for a call: `threads` (0 counts as 1), at most one per row and, if `min_share > 0`,
/// one per `min_share` bytes of `work`.
fn share_count(threads: usize, rows: usize, work: usize, min_share: usize) -> usize {
    let by_work = work.checked_div(min_share).unwrap_or(usize::MAX).max(1);
    threads.clamp(1, rows.max(1)).min(by_work)
}

/// Whether the CPU has AVX-512 VBMI and GFNI (the AVX-512 backend's fast decoder).
fn vbmi_gfni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::has_vbmi_gfni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Columns per activation scale on [`ActPath::Int8Fine`].
pub(crate) const FINE_BLOCK: usize = 16;

/// Activations prepared once per call, shared by all threads. Rows are `stride` apart, zero
/// padded from `cols` to `stride = cols_padded + SLACK`.
pub(crate) enum Acts {
    F32 {
        /// 64-byte aligned (and `stride` is a multiple of 16): every 16-column chunk is one
        /// aligned vector.
        x: AlignedF32,
        stride: usize,
    },
    Int8 {
        /// Quantized activations in `[−127, 127]`.
        xq: Vec<i8>,
        stride: usize,
        /// Activation scale per row per weight scale group, `[n, n_groups]`.
        scale: Vec<f32>,
        /// `Σ x_q` per row per group, `[n, n_groups]`.
        sum: Vec<i64>,
    },
    /// [`ActPath::Int8Fine`]: per activation row, one scale per 16-column block `k`, laid out as
    /// the AVX-512 kernel reads them: for 64-column word `w`, block `4w + L` at `16w + 4L + e`
    /// for `e` in 0..4 (repeated for the 4 weight rows of a vector), `cols_padded / 4` per row.
    Int8Fine {
        /// Quantized activations in `[−127, 127]`.
        xq: Vec<i8>,
        stride: usize,
        /// The block's activation scale (absmax / 127; NaN for a non-finite block, 0 for an
        /// all-zero one), `[n, cols_padded / 4]`.
        scale: Vec<f32>,
        /// `2^(l−1) · Σ x_q` of the block (what `Σ u_l · x_q` exceeds the signed sum by),
        /// `[n, cols_padded / 4]`.
        offset: Vec<i32>,
    },
}

impl Acts {
    fn f32(x: &[f32], n: usize, cols: usize, cols_padded: usize) -> Self {
        let stride = cols_padded + SLACK;
        let mut buf = AlignedF32::zeroed(n * stride);
        for (dst, src) in buf.chunks_exact_mut(stride).zip(x.chunks_exact(cols.max(1))) {
            dst[..cols].copy_from_slice(&src[..cols]);
        }
        Acts::F32 { x: buf, stride }
    }

    /// Absmax int8 quantization per row per weight scale group. A group with a non-finite value
    /// gets scale NaN (so the outputs it touches are NaN); an all-zero group gets scale 0.
    fn int8(x: &[f32], n: usize, layout: &ScaleLayout, cols_padded: usize) -> Self {
        let (cols, ng) = (layout.cols, layout.n_groups());
        let stride = cols_padded + SLACK;
        let mut xq = vec![0i8; n * stride];
        let mut scale = vec![0f32; n * ng];
        let mut sum = vec![0i64; n * ng];
        if cols > 0 {
            for (b, src) in x.chunks_exact(cols).enumerate() {
                for g in 0..ng {
                    let range = layout.group_cols(g);
                    let xs = &src[range.clone()];
                    let dst = &mut xq[b * stride..][range];
                    let (a, s) = quantize_absmax(xs, dst);
                    scale[b * ng + g] = a;
                    sum[b * ng + g] = s;
                }
            }
        }
        Acts::Int8 { xq, stride, scale, sum }
    }

    /// Absmax int8 quantization per row per 16 columns ([`Acts::Int8Fine`]); `half` = 2^(l−1)
    /// of the call's precision.
    fn int8_fine(x: &[f32], n: usize, cols: usize, cols_padded: usize, half: u8) -> Self {
        let stride = cols_padded + SLACK;
        let per_row = cols_padded / 4;
        let mut xq = vec![0i8; n * stride];
        let mut scale = vec![0f32; n * per_row];
        let mut offset = vec![0i32; n * per_row];
        if cols > 0 {
            for (b, src) in x.chunks_exact(cols).enumerate() {
                for (k, xs) in src.chunks(FINE_BLOCK).enumerate() {
                    let dst = &mut xq[b * stride + FINE_BLOCK * k..][..xs.len()];
                    let (a, s) = match <&[f32; FINE_BLOCK]>::try_from(xs) {
                        Ok(whole) => quantize_block16(whole, dst.try_into().expect("as long as xs")),
                        Err(_) => quantize_absmax(xs, dst),
                    };
                    // |Σ x_q| ≤ 16 · 127: the product fits i32.
                    let o = i32::from(half) * s as i32;
                    let at = b * per_row + 16 * (k / 4) + 4 * (k % 4);
                    scale[at..at + 4].fill(a);
                    offset[at..at + 4].fill(o);
                }
            }
        }
        Acts::Int8Fine { xq, stride, scale, offset }
    }
}

/// [`quantize_absmax`] of one whole 16-column block, in fixed-size lanes (the per-call overhead
/// of the general loop dominated at this size).
#[inline]
fn quantize_block16(xs: &[f32; FINE_BLOCK], dst: &mut [i8; FINE_BLOCK]) -> (f32, i64) {
    let abs = xs.map(f32::abs);
    // NaN and ±inf fail `a <= MAX`.
    if !abs.iter().all(|&a| a <= f32::MAX) {
        return (f32::NAN, 0);
    }
    let absmax = abs.iter().fold(0f32, |m, &a| if a > m { a } else { m });
    if absmax == 0.0 {
        return (0.0, 0);
    }
    let inv = 127.0 / absmax;
    let mut s = 0i32;
    for (o, &v) in dst.iter_mut().zip(xs) {
        let q = quantize_value(v, inv);
        *o = q as i8;
        s += q;
    }
    (absmax / 127.0, i64::from(s))
}

/// `round(v · inv)` clamped to [−127, 127], branch-free (the loops over it vectorize), for a
/// finite `v` with `|v · inv| ≤ 127 (1 + ε)`: the clamp never sees a NaN.
#[inline(always)]
fn quantize_value(v: f32, inv: f32) -> i32 {
    let y = round_ties_even_small(v * inv);
    let y = if y > 127.0 { 127.0 } else { y };
    let y = if y < -127.0 { -127.0 } else { y };
    // SAFETY: y is an integer in [−127, 127].
    unsafe { y.to_int_unchecked::<i32>() }
}

/// Quantizes `xs` into `dst` with one absmax scale: returns the scale (absmax / 127; NaN if a
/// value is not finite, leaving `dst` zero; 0 for all zeros) and `Σ x_q`.
fn quantize_absmax(xs: &[f32], dst: &mut [i8]) -> (f32, i64) {
    let Some(absmax) = finite_absmax(xs) else {
        return (f32::NAN, 0);
    };
    if absmax == 0.0 {
        return (0.0, 0);
    }
    let inv = 127.0 / absmax;
    let mut s = 0i64;
    // Branch-free lanes (the loops vectorize); i32 sums per 2^16 values are exact.
    for (dc, xc) in dst.chunks_mut(1 << 16).zip(xs.chunks(1 << 16)) {
        let mut s32 = 0i32;
        for (o, &v) in dc.iter_mut().zip(xc) {
            let q = quantize_value(v, inv);
            *o = q as i8;
            s32 += q;
        }
        s += i64::from(s32);
    }
    (absmax / 127.0, s)
}

/// A zeroed f32 buffer whose first element is 64-byte aligned (a cache line, an AVX-512 vector).
pub(crate) struct AlignedF32 {
    buf: Vec<Line>,
    len: usize,
}

/// One cache line of f32.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

impl AlignedF32 {
    pub fn zeroed(len: usize) -> Self {
        AlignedF32 { buf: vec![Line([0.0; 16]); len.div_ceil(16)], len }
    }
}

impl std::ops::Deref for AlignedF32 {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `buf` holds `16 · buf.len() ≥ len` initialized f32 (`Line` is `repr(C)`).
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedF32 {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr().cast(), self.len) }
    }
}

/// `max |x|` if every value is finite (`None` otherwise), in lanes that vectorize.
#[inline]
fn finite_absmax(xs: &[f32]) -> Option<f32> {
    let mut m = [0f32; 16];
    let mut ok = [true; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for k in 0..16 {
            let a = c[k].abs();
            // NaN and ±inf fail `a <= MAX`; a NaN never wins `a > m`.
            ok[k] &= a <= f32::MAX;
            m[k] = if a > m[k] { a } else { m[k] };
        }
    }
    for &v in chunks.remainder() {
        let a = v.abs();
        ok[0] &= a <= f32::MAX;
        m[0] = if a > m[0] { a } else { m[0] };
    }
    ok.iter().all(|&o| o).then(|| m.iter().fold(0f32, |a, &b| a.max(b)))
}

/// `y.round_ties_even()` for `|y| ≤ 2^22` (here `|y| ≤ 127 · (1 + ε)`), without a libm call
/// (`rintf` on the baseline x86_64 target): adding and removing `1.5 · 2^23` rounds to the
/// nearest integer, ties to even, in the default rounding mode. (It may give +0 for −0.x where
/// `round_ties_even` gives −0; both convert to the same `0i8`.)
#[inline(always)]
fn round_ties_even_small(y: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (y + MAGIC) - MAGIC
}

/// One call's work, shared by its threads.
#[derive(Clone, Copy)]
pub(crate) struct Job<'a> {
    pub w: &'a PlanarWeight,
    /// The scales of this precision ([`PlanarWeight::scales_at`]).
    pub scales: &'a [f32],
    pub prec: Prec,
    pub acts: &'a Acts,
    pub backend: Backend,
    /// AVX-512 only: decode with VBMI + GFNI (checked available).
    pub fast_decode: bool,
}

impl Job<'_> {
    /// Computes rows `range` for every activation row: `out[b][i]` = row `range.start + i`.
    fn run(&self, range: Range<usize>, out: &mut [&mut [f32]]) {
        if range.is_empty() {
            return;
        }
        match self.backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => {
                // SAFETY: `matmul` checked `Backend::Avx512.is_available()`.
                unsafe { x86::run_avx512(self, range, out) }
            }
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => {
                // SAFETY: `matmul` checked `Backend::Avx2.is_available()`.
                unsafe { x86::run_avx2(self, range, out) }
            }
            _ => scalar::run(self, range, out),
        }
    }

    /// Scale of row `r`, group `g`.
    #[inline(always)]
    pub fn scale(&self, r: usize, g: usize) -> f32 {
        self.scales[r * self.w.layout.n_groups() + g]
    }
}

/// Writes the dequantized row `(q_l · 2^Δ) · s` (the expression of [`crate::dequantize`]) into
/// `wrow[..cols]` from the decoded signed codes `q` (bytes holding `q_l` as i8); `wrow[cols..]`
/// must already be zero.
#[inline(always)]
pub(crate) fn dequant_row(job: &Job<'_>, r: usize, q: &[u8], wrow: &mut [f32]) {
    let layout = &job.w.layout;
    let step = job.prec.step;
    for g in 0..layout.n_groups() {
        let s = job.scale(r, g);
        let range = layout.group_cols(g);
        for (o, &v) in wrow[range.clone()].iter_mut().zip(&q[range]) {
            *o = f32::from(v as i8) * step * s;
        }
    }
}

/// The int8-path output of row `r` for activation row `b`, from the exact group dot products
/// `t(g) = Σ_{j ∈ g} q_l[j] · x_q[j]`. Shared by every backend so the f32 operations (and their
/// order) are identical.
#[inline(always)]
pub(crate) fn combine_int(job: &Job<'_>, r: usize, ascale: &[f32], mut t: impl FnMut(usize) -> i64) -> f32 {
    let mut acc = 0f32;
    for (g, &a) in ascale.iter().enumerate() {
        acc += t(g) as f32 * (job.scale(r, g) * a);
    }
    acc * job.prec.step
}

/// The [`ActPath::Int8Fine`] output of row `r` for one activation row, from the exact block sums
/// `t(k) = Σ_{j ∈ block k} q_l[j] · x_q[j]` and the row's block scales `ascale` (the
/// [`Acts::Int8Fine`] layout): `Y_{k mod 4} += (t(k) · a_k) · s_{g(k)}` (one fused multiply-add), then
/// `((Y_0 + Y_2) + (Y_1 + Y_3)) · 2^Δ`, the order the AVX-512 kernel keeps in its lanes.
#[inline(always)]
pub(crate) fn combine_fine(job: &Job<'_>, r: usize, ascale: &[f32], mut t: impl FnMut(usize) -> i32) -> f32 {
    let mut acc = [0f32; 4];
    for k in 0..job.w.cols_padded() / FINE_BLOCK {
        let a = ascale[16 * (k / 4) + 4 * (k % 4)];
        acc[k % 4] = (t(k) as f32 * a).mul_add(job.scale(r, job.w.fine_block_group(k)), acc[k % 4]);
    }
    ((acc[0] + acc[2]) + (acc[1] + acc[3])) * job.prec.step
}

/// Zero-initialised scratch of one thread: a decoded row (bytes), a dequantized row (f32) and the
/// exact group dot products of one weight row with every activation row (`[n, n_groups]`).
pub(crate) struct Scratch {
    pub bytes: Vec<u8>,
    pub wrow: Vec<f32>,
    pub tsum: Vec<i64>,
}

impl Scratch {
    pub fn new(cols_padded: usize, n_tsum: usize) -> Self {
        Scratch { bytes: vec![0; cols_padded + SLACK], wrow: vec![0.0; cols_padded], tsum: vec![0; n_tsum] }
    }
}
