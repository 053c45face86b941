use super::*;
use crate::double_rounding::{second_round, Granularity};

const TIES: [TieRule; 2] = [TieRule::HalfEven, TieRule::HalfUp];

/// splitmix64: a tiny deterministic generator (the crate has no dependencies).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [−1, 1).
    pub(crate) fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Codes: mostly uniform, with extra weight on the edges and on tie codes.
    fn code(&mut self) -> i8 {
        let v = self.next();
        match v % 8 {
            0 => [-128i8, 127, -127, 126, 0, 1, -1, -64, 64, 96, -96, 32, -32][(v >> 8) as usize % 13],
            _ => (v >> 16) as u8 as i8,
        }
    }
}

pub(crate) fn random_weight(rng: &mut Rng, rows: usize, cols: usize, gran: Granularity) -> QuantizedWeight {
    let layout = gran.layout(rows, cols).unwrap();
    let codes = (0..layout.n_weights()).map(|_| rng.code()).collect();
    let scales = (0..layout.n_scales()).map(|_| 1e-3 + 2e-2 * (rng.f32() + 1.0)).collect();
    QuantizedWeight::new(codes, scales, layout)
}

/// Activations in [−1, 1) with an occasional outlier of ±20.
pub(crate) fn random_x(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let v = rng.f32();
            if rng.next().is_multiple_of(97) {
                20.0 * v.signum()
            } else {
                v
            }
        })
        .collect()
}

/// Naive `y[b][r] = Σ_c w[r][c] · x[b][c]` in f64, and `Σ_c |w[r][c] · x[b][c]|`.
pub(crate) fn naive(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0f64; n * rows];
    let mut mag = vec![0f64; n * rows];
    for b in 0..n {
        for r in 0..rows {
            for c in 0..cols {
                let p = f64::from(w[r * cols + c]) * f64::from(x[b * cols + c]);
                y[b * rows + r] += p;
                mag[b * rows + r] += p.abs();
            }
        }
    }
    (y, mag)
}

/// f32 path tolerance. A recursive f32 sum of `k` rounded products is off by at most
/// `≈ k · ε · Σ|w·x|`; the kernels sum `cols` products in 8 (scalar), 32 (AVX2) or 16 (AVX-512)
/// interleaved partial sums and add those pairwise, so each is within
/// `(cols / 8 + 4) · ε · Σ|w·x|` of the exact sum and two of them within `(cols / 4 + 8)`; we
/// allow `min(cols, cols / 4 + 16) · ε · Σ|w·x|` (at most the `cols · ε` of a plain recursive
/// sum).
pub(crate) fn f32_tol(cols: usize, mag: f64) -> f64 {
    let k = cols.clamp(1, cols / 4 + 16);
    (k as f64) * f64::from(f32::EPSILON) * mag + 1e-30
}

#[test]
fn fast_rounding_matches_round_ties_even() {
    let mut ys: Vec<f32> = (-2600..=2600).map(|i| i as f32 * 0.05).collect();
    ys.extend((-255..=255).map(|i| i as f32 * 0.5)); // every tie in range
    ys.extend([127.00001, -127.00001, 1e-30, -1e-30, 0.5 - f32::EPSILON / 4.0]);
    let mut rng = Rng(13);
    ys.extend((0..100_000).map(|_| rng.f32() * 128.0));
    for y in ys {
        let (a, b) = (round_ties_even_small(y), y.round_ties_even());
        assert!(a == b, "{y}: {a} vs {b}");
    }
}

#[test]
fn tie_identity_is_exhaustive() {
    for tie in TIES {
        for q in i8::MIN..=i8::MAX {
            let (u, d) = encode_code(q, tie);
            assert!(d <= 1);
            if tie == TieRule::HalfUp {
                assert_eq!(d, 0);
            }
            // r = q − d never underflows and u is its offset binary.
            let r = i16::from(q) - i16::from(d);
            assert!(r >= -128, "q={q}");
            assert_eq!(i16::from(u), r + 128, "q={q} {tie}");
            // A nonzero code is a tie at exactly one level, and d = 1 only at such a level.
            let tie_levels: Vec<u32> = (2..=7)
                .filter(|&l| {
                    let delta = 8 - l;
                    q != 0 && i32::from(q).rem_euclid(1 << delta) == 1 << (delta - 1)
                })
                .collect();
            assert!(tie_levels.len() <= 1, "q={q}: ties at {tie_levels:?}");
            if d == 1 {
                assert_eq!(tie_levels.len(), 1);
            }
            for bits in 2..=8 {
                assert_eq!(decode_code(u, d, bits), second_round(q, bits, tie), "q={q} bits={bits} {tie}");
                if bits < 8 {
                    // The brief's signed form: sat((r >> Δ) + bit_{Δ−1}(r)) on r.
                    let delta = 8 - bits;
                    let hi = (1i16 << (bits - 1)) - 1;
                    let v = ((r >> delta) + ((r >> (delta - 1)) & 1)).min(hi);
                    assert_eq!(v, i16::from(second_round(q, bits, tie)), "q={q} bits={bits}");
                }
            }
        }
    }
}

const GRANS: [Granularity; 5] = [
    Granularity::Channel,
    Granularity::Group(32),
    Granularity::Group(64),
    Granularity::Group(128),
    Granularity::Group(40),
];

#[test]
fn codes_at_matches_second_round() {
    let mut rng = Rng(1);
    for (rows, cols) in [(3, 65), (5, 1), (2, 200)] {
        for tie in TIES {
            let qw = random_weight(&mut rng, rows, cols, Granularity::Group(40));
            let pw = PlanarWeight::from_quantized(&qw, tie).unwrap();
            assert_eq!(pw.to_codes(), qw.codes);
            for bits in 2..=8 {
                let expected: Vec<i8> = qw.codes.iter().map(|&q| second_round(q, bits, tie)).collect();
                assert_eq!(pw.codes_at(bits).unwrap(), expected, "bits={bits} {tie}");
            }
            // Every precision decoded by the SWAR row decoder matches too (padding decodes to 0).
            for bits in 2..=8 {
                let prec = Prec::new(bits).unwrap();
                let mut buf = vec![0u8; pw.cols_padded()];
                for r in 0..rows {
                    scalar::decode_row(&pw, r, prec, true, &mut buf);
                    for (c, &b) in buf.iter().enumerate() {
                        let want = if c < cols { second_round(qw.codes[r * cols + c], bits, tie) } else { 0 };
                        assert_eq!(b as i8, want, "r={r} c={c} bits={bits} {tie}");
                    }
                }
            }
        }
    }
    assert_eq!(
        PlanarWeight::from_quantized(&random_weight(&mut rng, 1, 1, Granularity::Channel), TieRule::HalfUp)
            .unwrap()
            .codes_at(9),
        Err(KernelError::InvalidBits(9))
    );
}

#[test]
fn simd_decoders_match_scalar() {
    let mut rng = Rng(2);
    let qw = random_weight(&mut rng, 4, 1000, Granularity::Channel);
    for tie in TIES {
        let pw = PlanarWeight::from_quantized(&qw, tie).unwrap();
        for bits in 2..=8 {
            let prec = Prec::new(bits).unwrap();
            for signed in [false, true] {
                for r in 0..4 {
                    let mut want = vec![0u8; pw.cols_padded()];
                    scalar::decode_row(&pw, r, prec, signed, &mut want);
                    #[cfg(target_arch = "x86_64")]
                    for backend in Backend::available() {
                        let mut got = vec![0u8; pw.cols_padded()];
                        // SAFETY: the backend is available.
                        unsafe {
                            match backend {
                                Backend::Avx512 => x86::test_decode_avx512(&pw, r, prec, signed, &mut got),
                                Backend::Avx2 => x86::test_decode_avx2(&pw, r, prec, signed, &mut got),
                                Backend::Scalar => continue,
                            }
                        }
                        assert_eq!(got, want, "{backend} bits={bits} signed={signed}");
                    }
                }
            }
        }
    }
}

/// The VBMI + GFNI decoder of flat word ranges (which span rows, and end in partial 8-word
/// blocks) matches the scalar row decoder, at every precision, signed and unsigned, both ties.
#[cfg(target_arch = "x86_64")]
#[test]
fn vbmi_decoder_matches_scalar() {
    if !(Backend::Avx512.is_available() && x86::has_vbmi_gfni()) {
        return;
    }
    let mut rng = Rng(12);
    for (rows, cols) in [(5, 1000), (13, 64), (7, 130), (3, 576)] {
        let qw = random_weight(&mut rng, rows, cols, Granularity::Channel);
        for tie in TIES {
            let pw = PlanarWeight::from_quantized(&qw, tie).unwrap();
            let (cp, wpr) = (pw.cols_padded(), pw.cols_padded() / 64);
            for bits in 2..=8 {
                let prec = Prec::new(bits).unwrap();
                for signed in [false, true] {
                    let mut want = vec![0u8; rows * cp];
                    for r in 0..rows {
                        scalar::decode_row(&pw, r, prec, signed, &mut want[r * cp..]);
                    }
                    let total = rows * wpr;
                    for (f0, nw) in [(0, total), (1, total - 1), (0, 1), (total - 3, 3), (2, 9)] {
                        if f0 + nw > total {
                            continue;
                        }
                        let mut got = vec![0xAAu8; 64 * nw];
                        // SAFETY: checked above.
                        unsafe { x86::test_decode_words_vbmi(&pw, f0, nw, prec, signed, &mut got) };
                        assert_eq!(
                            got,
                            want[64 * f0..64 * (f0 + nw)],
                            "{rows}x{cols} {tie} bits={bits} signed={signed} words {f0}+{nw}"
                        );
                    }
                }
            }
        }
    }
}

/// Runs every available backend on both paths and checks: the scalar f32 path against
/// `dequantize` + a naive mat-vec; every f32 path against the scalar one; every int8 path against
/// the scalar one bit for bit; the int8 path against the f32 path within the activation
/// quantization error bound.
/// A backend and whether its fast decoder was allowed, for messages.
struct BackendVariant(Backend, bool);

impl fmt::Display for BackendVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.0, if self.1 { "" } else { " (no vbmi)" })
    }
}

fn check_shape(rng: &mut Rng, rows: usize, cols: usize, gran: Granularity, tie: TieRule, batches: &[usize]) {
    let qw = random_weight(rng, rows, cols, gran);
    check_weight(rng, &qw, tie, batches);
}

/// Every backend, path and thread count against the naive product of [`QuantizedWeight::dequantize`]
/// at every precision (the f32 path within summation-order tolerance, the int8 path within its
/// activation-rounding bound and bit for bit across backends).
fn check_weight(rng: &mut Rng, qw: &QuantizedWeight, tie: TieRule, batches: &[usize]) {
    let (rows, cols, gran) = (qw.layout.rows, qw.layout.cols, qw.layout);
    let gran = if gran.group >= cols { "channel".to_string() } else { format!("group:{}", gran.group) };
    let pw = PlanarWeight::from_quantized(qw, tie).unwrap();
    let backends = Backend::available();
    for bits in 2..=8u32 {
        let n = batches[bits as usize % batches.len()];
        let x = random_x(rng, n * cols);
        let what = format!("{rows}x{cols} {gran} {tie} bits={bits} n={n}");
        let wd = qw.dequantize(bits, tie).unwrap();
        let (exact, mag) = naive(&wd, rows, cols, &x, n);

        let run = |backend, path, threads| {
            let mut y = vec![f32::NAN; n * rows];
            pw.matmul(bits, &x, n, &mut y, &KernelConfig::new(backend, path, threads)).unwrap();
            y
        };
        let f32_ref = run(Backend::Scalar, ActPath::F32, 1);
        for i in 0..n * rows {
            let err = (f64::from(f32_ref[i]) - exact[i]).abs();
            assert!(err <= f32_tol(cols, mag[i]), "{what} scalar f32 vs naive at {i}: {err}");
        }
        let int_ref = run(Backend::Scalar, ActPath::Int8, 1);
        // Activation quantization moves each x by at most half a step a_g/2, so
        // |y_int − y| ≤ Σ_c |Ŵ[r,c]| · a_g(c)/2 (+ f32 rounding of both).
        let layout = &qw.layout;
        for b in 0..n {
            for r in 0..rows {
                let mut bound = 0f64;
                for g in 0..layout.n_groups() {
                    let range = layout.group_cols(g);
                    let xs = &x[b * cols..][range.clone()];
                    let a = f64::from(xs.iter().fold(0f32, |m, v| m.max(v.abs()))) / 127.0;
                    let wsum: f64 = wd[r * cols..][range].iter().map(|v| f64::from(v.abs())).sum();
                    bound += wsum * a / 2.0;
                }
                let i = b * rows + r;
                let err = (f64::from(int_ref[i]) - exact[i]).abs();
                let tol = bound * 1.001 + 2.0 * f32_tol(cols, mag[i] + bound) + 1e-6 * exact[i].abs();
                assert!(err <= tol, "{what} int8 vs exact at {i}: {err} > {tol}");
            }
        }
        // Blocks of 16 columns: within the same kind of bound per block; weights whose groups are
        // not a multiple of 16 take the per-group int8 path.
        let fine_ref = run(Backend::Scalar, ActPath::Int8Fine, 1);
        if pw.fine_blocks_fit() {
            for b in 0..n {
                for r in 0..rows {
                    let mut bound = 0f64;
                    for (xs, ws) in x[b * cols..(b + 1) * cols].chunks(16).zip(wd[r * cols..(r + 1) * cols].chunks(16))
                    {
                        let a = f64::from(xs.iter().fold(0f32, |m, v| m.max(v.abs()))) / 127.0;
                        bound += ws.iter().map(|v| f64::from(v.abs())).sum::<f64>() * a / 2.0;
                    }
                    let i = b * rows + r;
                    let err = (f64::from(fine_ref[i]) - exact[i]).abs();
                    let tol = bound * 1.001 + 2.0 * f32_tol(cols, mag[i] + bound) + 1e-6 * exact[i].abs();
                    assert!(err <= tol, "{what} int8 per 16 vs exact at {i}: {err} > {tol}");
                }
            }
        } else {
            assert!(fine_ref.iter().zip(&int_ref).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: not per group");
        }
        // (backend, fast decoder allowed): the AVX-512 backend also without VBMI + GFNI.
        let variants = backends.iter().flat_map(|&b| {
            let slow = (b == Backend::Avx512).then_some((b, false));
            std::iter::once((b, true)).chain(slow)
        });
        for (backend, fast) in variants {
            let run = |backend, path, threads| {
                let mut y = vec![f32::NAN; n * rows];
                let cfg = KernelConfig::new(backend, path, threads);
                pw.matmul_impl(bits, &x, n, &mut y, &cfg, (fast, 0)).unwrap();
                y
            };
            let backend = BackendVariant(backend, fast);
            for threads in [1, 3] {
                let y = run(backend.0, ActPath::Int8, threads);
                assert!(
                    y.iter().zip(&int_ref).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what} {backend} t={threads}: int8 path differs from scalar"
                );
                let y = run(backend.0, ActPath::Int8Fine, threads);
                let first = y.iter().zip(&fine_ref).position(|(a, b)| a.to_bits() != b.to_bits());
                assert!(
                    first.is_none(),
                    "{what} {backend} t={threads}: int8 per 16 differs from scalar at {first:?}: {} vs {}",
                    y[first.unwrap_or(0)],
                    fine_ref[first.unwrap_or(0)]
                );
                let y = run(backend.0, ActPath::F32, threads);
                for i in 0..n * rows {
                    let err = (f64::from(y[i]) - f64::from(f32_ref[i])).abs();
                    assert!(err <= f32_tol(cols, mag[i]), "{what} {backend} f32 at {i}: {err}");
                }
            }
        }
    }
}

/// Corrections per row and per group at some precisions, and scales of both signs (the
/// max-negative grid): the kernels serve `q_b · 2^Δ · (s[r, g] · α_b)` like `dequantize`, on
/// every path, and the embedding lookup too.
#[test]
fn kernels_apply_corrections_and_negative_scales() {
    let mut rng = Rng(77);
    for (rows, cols, gran) in [(9, 130, Granularity::Group(32)), (12, 64, Granularity::Channel)] {
        for per_group in [false, true] {
            for tie in TIES {
                let mut qw = random_weight(&mut rng, rows, cols, gran);
                for s in qw.scales.iter_mut() {
                    if rng.next().is_multiple_of(2) {
                        *s = -*s;
                    }
                }
                let n = if per_group { qw.layout.n_scales() } else { rows };
                for bits in [2, 4, 7] {
                    qw.corrections.insert(bits, (0..n).map(|_| 1.0 + 0.5 * rng.f32()).collect());
                }
                check_weight(&mut rng, &qw, tie, &[1, 3, 5]);
                let pw = PlanarWeight::from_quantized(&qw, tie).unwrap();
                let ng = qw.layout.n_groups();
                for bits in 2..=8 {
                    // The corrected scale of row r, group g is s[r, g] · α[r] or · α[r, g].
                    let scales = pw.scales_at(bits);
                    for (i, (&c, &s)) in scales.iter().zip(&qw.scales).enumerate() {
                        let a = qw.correction(bits).map_or(1.0, |a| a[if per_group { i } else { i / ng }]);
                        assert_eq!(c.to_bits(), (s * a).to_bits(), "bits {bits} scale {i}");
                    }
                    let served = QuantizedWeight::new(qw.codes.clone(), scales.to_vec(), qw.layout);
                    let with = qw.dequantize(bits, tie).unwrap();
                    assert_eq!(with, served.dequantize(bits, tie).unwrap(), "bits {bits}");
                    let mut rows_out = vec![0f32; rows * cols];
                    pw.dequantize_rows(bits, &(0..rows).collect::<Vec<_>>(), &mut rows_out).unwrap();
                    assert!(rows_out.iter().zip(&with).all(|(a, b)| a.to_bits() == b.to_bits()), "bits {bits}");
                }
                // A corrected precision reads its own scales instead of the stored ones: no more bytes.
                assert_eq!(
                    pw.bytes_read(4).unwrap(),
                    pw.bytes_read(5).unwrap() - pw.plane_bytes_read(5).unwrap() + pw.plane_bytes_read(4).unwrap()
                );
            }
        }
    }
    // Bad corrections are refused when the layout is built.
    let mut qw = random_weight(&mut rng, 4, 130, Granularity::Group(64));
    qw.corrections.insert(4, vec![1.0; 5]);
    assert_eq!(
        PlanarWeight::from_quantized(&qw, TieRule::HalfEven),
        Err(KernelError::CorrectionCount { bits: 4, rows: 4, groups: 12, got: 5 })
    );
    qw.corrections.insert(4, vec![1.0, 0.0, 1.0, 1.0]);
    assert_eq!(
        PlanarWeight::from_quantized(&qw, TieRule::HalfEven),
        Err(KernelError::BadCorrection { bits: 4, index: 1 })
    );
    qw.corrections.insert(4, vec![1.0; 12]);
    assert!(PlanarWeight::from_quantized(&qw, TieRule::HalfEven).is_ok(), "one per group");
    qw.corrections.insert(9, vec![1.0; 4]);
    assert_eq!(PlanarWeight::from_quantized(&qw, TieRule::HalfEven), Err(KernelError::InvalidBits(9)));
}

#[test]
fn kernels_agree_small_shapes() {
    let mut rng = Rng(3);
    for rows in [1, 3] {
        for cols in [1, 63, 65, 576, 1000] {
            for gran in GRANS {
                for tie in TIES {
                    check_shape(&mut rng, rows, cols, gran, tie, &[1, 2, 7, 64]);
                }
            }
        }
    }
}

#[test]
fn kernels_agree_192_rows() {
    let mut rng = Rng(4);
    for cols in [1, 63, 65, 576, 1000] {
        for (i, gran) in GRANS.into_iter().enumerate() {
            let tie = TIES[i % 2];
            let batches: &[usize] = if cols >= 576 { &[1, 2, 7] } else { &[1, 2, 7, 64] };
            check_shape(&mut rng, 192, cols, gran, tie, batches);
        }
    }
}

/// Ragged shapes (partial 4- and 8-row passes, partial last words) with 4 ..= 64 activation rows,
/// so that the AVX-512 f32 path runs its tile passes (4 weight rows × 1 ..= 6 activation rows)
/// after the in-register conversion pass, for every scale layout.
#[test]
fn kernels_agree_many_activation_rows() {
    let mut rng = Rng(15);
    for (rows, cols, gran) in [
        (37, 576, Granularity::Channel),
        (19, 1000, Granularity::Group(128)),
        (45, 100, Granularity::Group(32)),
        (11, 65, Granularity::Group(40)),
        (70, 64, Granularity::Group(64)),
        (6, 200, Granularity::Group(16)),
        // Rows split into column chunks on the AVX-512 f32 path (> 768 columns).
        (9, 1600, Granularity::Channel),
        (7, 2100, Granularity::Group(32)),
        (5, 1300, Granularity::Group(40)),
    ] {
        for tie in TIES {
            check_shape(&mut rng, rows, cols, gran, tie, &[4, 16, 64, 13, 6, 33, 7]);
        }
    }
}

/// The f32 reductions of the AVX-512 kernels sum every accumulator in the order of `tree16`,
/// whichever its position among the 4 or 8 reduced together.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_f32_reductions_share_one_order() {
    if !Backend::Avx512.is_available() {
        return;
    }
    let mut rng = Rng(16);
    for _ in 0..200 {
        for count in [4, 8] {
            // Magnitudes spread over many binades, so that the order shows in the rounding.
            let a: Vec<[f32; 16]> =
                (0..count).map(|_| std::array::from_fn(|_| rng.f32() * (1u64 << (rng.next() % 40)) as f32)).collect();
            let got = x86::test_reduce(&a);
            for (i, v) in a.iter().enumerate() {
                assert_eq!(got[i].to_bits(), x86::tree16(v).to_bits(), "{count} vectors, #{i}");
            }
        }
    }
}

/// Every activation row's result is the same bit for bit whatever the batch it is in: 1 ..= 64
/// rows, every precision and scale layout, one and several threads (the f32 path's in-register
/// and tile passes, the int8 path's kernels).
#[test]
fn every_batch_size_gives_the_same_rows() {
    let mut rng = Rng(17);
    for (rows, cols, gran) in [
        (37, 576, Granularity::Channel),
        (29, 200, Granularity::Group(32)),
        (13, 1000, Granularity::Group(128)),
        (21, 130, Granularity::Group(40)),
        (9, 64, Granularity::Group(16)),
        (10, 208, Granularity::Group(16)),
        (11, 1600, Granularity::Channel),
        (6, 2100, Granularity::Group(32)),
    ] {
        let qw = random_weight(&mut rng, rows, cols, gran);
        let pw = PlanarWeight::from_quantized(&qw, TieRule::HalfEven).unwrap();
        let x = random_x(&mut rng, MAX_BATCH * cols);
        for backend in Backend::available() {
            for path in [ActPath::F32, ActPath::Int8, ActPath::Int8Fine] {
                for bits in 2..=8 {
                    let one = |b: usize| {
                        let mut y = vec![0f32; rows];
                        let cfg = KernelConfig::new(backend, path, 1);
                        pw.matvec(bits, &x[b * cols..(b + 1) * cols], &mut y, &cfg).unwrap();
                        y
                    };
                    let alone: Vec<Vec<f32>> = (0..MAX_BATCH).map(one).collect();
                    let ns = [2, 3, 4, 5, 6, 7, 8, 12, 13, 16, 17, 31, 64];
                    let n = ns[(bits as usize + rows) % ns.len()];
                    for (threads, n) in [(1, n), (3, n), (1, MAX_BATCH)] {
                        let mut y = vec![f32::NAN; n * rows];
                        let cfg = KernelConfig::new(backend, path, threads);
                        pw.matmul_impl(bits, &x[..n * cols], n, &mut y, &cfg, (true, 0)).unwrap();
                        for (b, want) in alone.iter().enumerate().take(n) {
                            let same =
                                want.iter().zip(&y[b * rows..(b + 1) * rows]).all(|(a, c)| a.to_bits() == c.to_bits());
                            assert!(
                                same,
                                "{rows}x{cols} {gran} {backend} {path:?} bits={bits} n={n} \
                                 t={threads} row {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Planes of at least `PLANE_GAP_MIN_BYTES` are spaced by a gap; accessors, codes and every
/// kernel path see the same weight.
#[test]
fn large_planes_have_a_gap_and_kernels_agree() {
    let mut rng = Rng(14);
    // 520 · 16 words · 8 bytes = 66 560 bytes per plane.
    let (rows, cols) = (520, 1000);
    for (gran, tie) in [
        (Granularity::Channel, TieRule::HalfEven),
        (Granularity::Group(128), TieRule::HalfUp),
        (Granularity::Group(32), TieRule::HalfEven),
    ] {
        let qw = random_weight(&mut rng, rows, cols, gran);
        let pw = PlanarWeight::from_quantized(&qw, tie).unwrap();
        let words = rows * pw.cols_padded() / 64;
        assert!(words * 8 >= PLANE_GAP_MIN_BYTES);
        assert_eq!(pw.resident_bytes(), pw.n_planes() * (words + PLANE_GAP_WORDS) * 8 + 4 * qw.scales.len());
        assert_eq!(pw.plane(pw.n_planes() - 1).unwrap().len(), words);
        assert_eq!(pw.to_codes(), qw.codes);
        check_shape(&mut rng, rows, cols, gran, tie, &[1, 2, 5]);
    }
}

/// The activation quantization of the int8 path against a plain per-value reference: absmax per
/// row and group, `round_ties_even(x · 127 / absmax)` clamped to ±127, the sums, NaN scales for
/// groups with a non-finite value.
#[test]
fn int8_activation_quantization_matches_reference() {
    let mut rng = Rng(18);
    for (cols, gran) in [
        (1000, Granularity::Group(128)),
        (100, Granularity::Group(40)),
        (577, Granularity::Channel),
        (5, Granularity::Group(2)),
    ] {
        let layout = gran.layout(1, cols).unwrap();
        let n = 3;
        let mut x = random_x(&mut rng, n * cols);
        x[cols + 7] = f32::NAN;
        x[2 * cols + cols / 2] = f32::NEG_INFINITY;
        for v in &mut x[2 * cols..2 * cols + cols.min(40)] {
            *v = 0.0;
        }
        let cp = cols.div_ceil(64) * 64;
        let Acts::Int8 { xq, stride, scale, sum } = Acts::int8(&x, n, &layout, cp) else { unreachable!() };
        let ng = layout.n_groups();
        for b in 0..n {
            for g in 0..ng {
                let xs = &x[b * cols..][layout.group_cols(g)];
                let (sc, sm) = (scale[b * ng + g], sum[b * ng + g]);
                if xs.iter().any(|v| !v.is_finite()) {
                    assert!(sc.is_nan());
                    continue;
                }
                let absmax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let want: Vec<i8> = if absmax == 0.0 {
                    vec![0; xs.len()]
                } else {
                    xs.iter().map(|&v| (v * (127.0 / absmax)).round_ties_even().clamp(-127.0, 127.0) as i8).collect()
                };
                let got = &xq[b * stride..][layout.group_cols(g)];
                assert_eq!(got, &want[..], "cols={cols} b={b} g={g}");
                let want_scale = if absmax == 0.0 { 0.0 } else { absmax / 127.0 };
                assert_eq!(sc.to_bits(), want_scale.to_bits());
                assert_eq!(sm, want.iter().map(|&q| i64::from(q)).sum::<i64>());
            }
        }
    }
}

/// The 16-column blocks of [`ActPath::Int8Fine`]: each block quantized like the per-group path
/// quantizes a group (a partial last block too), its scale and `2^(l−1) · Σ x_q` repeated for the
/// four weight rows of a vector at `16w + 4L + e`.
#[test]
fn int8_fine_blocks_match_the_group_quantization() {
    let mut rng = Rng(22);
    let (n, cols) = (3usize, 100usize);
    let cp = cols.div_ceil(64) * 64;
    let mut x = random_x(&mut rng, n * cols);
    x[20..36].fill(0.0);
    x[cols + 50] = f32::NAN;
    let Acts::Int8Fine { xq, stride, scale, offset } = Acts::int8_fine(&x, n, cols, cp, 8) else { unreachable!() };
    let layout = Granularity::Group(16).layout(1, cols).unwrap();
    let Acts::Int8 { xq: gq, stride: gs, scale: gscale, sum: gsum } = Acts::int8(&x, n, &layout, cp) else {
        unreachable!()
    };
    let ng = layout.n_groups();
    for b in 0..n {
        assert_eq!(xq[b * stride..b * stride + cp], gq[b * gs..b * gs + cp], "row {b}");
        for k in 0..cp / 16 {
            let (want_a, want_o) = if k < ng { (gscale[b * ng + k], 8 * gsum[b * ng + k] as i32) } else { (0.0, 0) };
            for e in 0..4 {
                let at = b * (cp / 4) + 16 * (k / 4) + 4 * (k % 4) + e;
                assert_eq!(scale[at].to_bits(), want_a.to_bits(), "b={b} k={k}");
                assert_eq!(offset[at], want_o, "b={b} k={k}");
            }
        }
    }
}

#[test]
fn int8_path_handles_zero_and_non_finite_activations() {
    let mut rng = Rng(5);
    let qw = random_weight(&mut rng, 3, 100, Granularity::Group(32));
    let pw = PlanarWeight::from_quantized(&qw, TieRule::HalfEven).unwrap();
    for (backend, path) in Backend::available().into_iter().flat_map(|b| [(b, ActPath::Int8), (b, ActPath::Int8Fine)]) {
        let cfg = KernelConfig::new(backend, path, 1);
        let mut y = vec![1f32; 3];
        pw.matvec(4, &[0f32; 100], &mut y, &cfg).unwrap();
        assert_eq!(y, [0.0; 3]);
        let mut x = vec![0.5f32; 100];
        x[40] = f32::INFINITY;
        pw.matvec(4, &x, &mut y, &cfg).unwrap();
        assert!(y.iter().all(|v| v.is_nan()), "{backend} {path:?}: {y:?}");
    }
}

/// What the 16-column activation blocks are for: an outlier channel (SmolLM2's hidden states have
/// a few, ~100× the rest) costs every other column of its block its resolution, so finer blocks
/// keep the product much closer to the f32 one than one scale per 128-column weight group.
#[test]
fn int8_per_16_columns_resolves_outlier_channels() {
    let mut rng = Rng(21);
    let (rows, cols) = (64, 576);
    let qw = random_weight(&mut rng, rows, cols, Granularity::Group(128));
    let pw = PlanarWeight::from_quantized(&qw, TieRule::HalfEven).unwrap();
    let mut x = random_x(&mut rng, cols);
    for c in [7, 300] {
        x[c] *= 200.0;
    }
    let run = |path| {
        let mut y = vec![0f32; rows];
        pw.matvec(8, &x, &mut y, &KernelConfig::new(Backend::best(), path, 1)).unwrap();
        y
    };
    let exact = run(ActPath::F32);
    let err = |y: &[f32]| y.iter().zip(&exact).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>().sqrt();
    let (group, fine) = (err(&run(ActPath::Int8)), err(&run(ActPath::Int8Fine)));
    assert!(fine * 2.0 < group, "per 16 columns {fine:.3e} vs per group {group:.3e}");
}

#[test]
fn sizes_and_bytes_read() {
    let mut rng = Rng(6);
    for (gran, tie) in [
        (Granularity::Channel, TieRule::HalfEven),
        (Granularity::Group(32), TieRule::HalfEven),
        (Granularity::Group(128), TieRule::HalfUp),
    ] {
        let (rows, cols) = (96, 576);
        let qw = random_weight(&mut rng, rows, cols, gran);
        let pw = PlanarWeight::from_quantized(&qw, tie).unwrap();
        let codes = rows * cols;
        let scales = qw.scales.len();
        // Against the checkpoint (f16 scales) and against int8 codes + f32 scales in memory.
        assert!(pw.resident_bytes() as f64 <= 1.3 * (codes + 2 * scales) as f64);
        assert!(pw.resident_bytes() as f64 <= 1.3 * (codes + 4 * scales) as f64);
        assert_eq!(pw.has_d_plane(), tie == TieRule::HalfEven);
        assert_eq!(pw.resident_bytes(), pw.n_planes() * codes / 8 + 4 * scales);
        for bits in 2..=8u32 {
            let planes = if bits == 8 { pw.n_planes() } else { bits as usize + 1 };
            assert_eq!(pw.plane_bytes_read(bits).unwrap() * 8, planes * codes);
            assert_eq!(pw.bytes_read(bits).unwrap(), planes * codes / 8 + 4 * scales);
            if bits < 8 {
                assert_eq!(pw.plane_bytes_read(bits).unwrap() * 8, (bits as usize + 1) * codes);
            }
        }
        assert_eq!(pw.plane(8).is_some(), pw.has_d_plane());
        assert_eq!(pw.plane(7).unwrap().len(), rows * cols / 64);
    }
    assert_eq!(
        PlanarWeight::from_quantized(&random_weight(&mut rng, 2, 64, Granularity::Channel), TieRule::HalfUp)
            .unwrap()
            .bytes_read(1),
        Err(KernelError::InvalidBits(1))
    );
}

#[test]
fn bad_inputs_are_errors() {
    let mut rng = Rng(7);
    let qw = random_weight(&mut rng, 4, 10, Granularity::Group(4));
    let pw = PlanarWeight::from_quantized(&qw, TieRule::HalfEven).unwrap();
    let cfg = KernelConfig::new(Backend::Scalar, ActPath::F32, 1);
    let x = vec![0.1f32; 20];
    let mut y = vec![0f32; 8];
    assert!(pw.matmul(4, &x, 2, &mut y, &cfg).is_ok());
    assert_eq!(
        pw.matvec(4, &x[..9], &mut y[..4], &cfg),
        Err(KernelError::LengthMismatch { what: "x", expected: 10, got: 9 })
    );
    assert_eq!(
        pw.matvec(4, &x[..10], &mut y[..3], &cfg),
        Err(KernelError::LengthMismatch { what: "y", expected: 4, got: 3 })
    );
    for bits in [0, 1, 9] {
        assert_eq!(pw.matvec(bits, &x[..10], &mut y[..4], &cfg), Err(KernelError::InvalidBits(bits)));
    }
    assert_eq!(pw.matmul(4, &[], 0, &mut [], &cfg), Err(KernelError::InvalidBatch(0)));
    let big = vec![0f32; 65 * 10];
    let mut ybig = vec![0f32; 65 * 4];
    assert_eq!(pw.matmul(4, &big, 65, &mut ybig, &cfg), Err(KernelError::InvalidBatch(65)));
    assert!(pw.matmul(4, &big[..640], 64, &mut ybig[..256], &cfg).is_ok());
    for backend in Backend::ALL {
        let r = pw.matvec(4, &x[..10], &mut y[..4], &KernelConfig::new(backend, ActPath::Int8, 0));
        if backend.is_available() {
            assert!(r.is_ok());
        } else {
            assert_eq!(r, Err(KernelError::BackendUnavailable(backend.name())));
        }
    }
    // Layout errors at build time.
    let mut bad = qw.clone();
    bad.codes.pop();
    assert!(matches!(
        PlanarWeight::from_quantized(&bad, TieRule::HalfUp),
        Err(KernelError::LengthMismatch { what: "codes", .. })
    ));
    let mut bad = qw.clone();
    bad.scales.push(1.0);
    assert!(matches!(
        PlanarWeight::from_quantized(&bad, TieRule::HalfUp),
        Err(KernelError::LengthMismatch { what: "scales", .. })
    ));
    let mut bad = qw;
    bad.layout.group = 0;
    assert_eq!(PlanarWeight::from_quantized(&bad, TieRule::HalfUp), Err(KernelError::ZeroGroup));
}

#[test]
fn empty_shapes() {
    for (rows, cols) in [(0, 5), (3, 0), (0, 0)] {
        let layout = ScaleLayout::per_channel(rows, cols).unwrap();
        let qw = QuantizedWeight::new(vec![0; rows * cols], vec![1.0; layout.n_scales()], layout);
        let pw = PlanarWeight::from_quantized(&qw, TieRule::HalfEven).unwrap();
        for backend in Backend::available() {
            for path in [ActPath::F32, ActPath::Int8, ActPath::Int8Fine] {
                let mut y = vec![1f32; rows];
                pw.matvec(3, &vec![1.0; cols], &mut y, &KernelConfig::new(backend, path, 4)).unwrap();
                assert!(y.iter().all(|&v| v == 0.0));
            }
        }
    }
}

#[test]
fn backend_best_is_available() {
    assert!(Backend::best().is_available());
    assert!(Backend::Scalar.is_available());
    assert_eq!(Backend::available().last(), Some(&Backend::best()));
    assert_eq!(KernelConfig::default().backend, Backend::best());
}

/// A batch row's result does not depend on the batch size, its position or the thread count
/// (bit for bit, on both paths): batched decoding is reproducible.
#[test]
fn results_do_not_depend_on_batch_or_threads() {
    let mut rng = Rng(8);
    let (rows, cols) = (37, 300);
    let qw = random_weight(&mut rng, rows, cols, Granularity::Group(40));
    let pw = PlanarWeight::from_quantized(&qw, TieRule::HalfEven).unwrap();
    let n = 11;
    let x = random_x(&mut rng, n * cols);
    for backend in Backend::available() {
        for path in [ActPath::F32, ActPath::Int8, ActPath::Int8Fine] {
            for bits in [2, 5, 8] {
                let mut y = vec![0f32; n * rows];
                let cfg = KernelConfig::new(backend, path, 4);
                pw.matmul_impl(bits, &x, n, &mut y, &cfg, (true, 0)).unwrap();
                for b in 0..n {
                    let mut yb = vec![0f32; rows];
                    let cfg = KernelConfig::new(backend, path, 1);
                    pw.matvec(bits, &x[b * cols..(b + 1) * cols], &mut yb, &cfg).unwrap();
                    let same = yb.iter().zip(&y[b * rows..]).all(|(a, c)| a.to_bits() == c.to_bits());
                    assert!(same, "{backend} {path:?} bits={bits} row {b}");
                }
            }
        }
    }
}

/// Several precisions in one pass over the weight give every part exactly what a call of its
/// own gives, whatever the parts, blocks, decoder and threads.
#[test]
fn multi_precision_pass_matches_separate_calls() {
    let mut rng = Rng(21);
    // 2000 rows of 1000 columns: several blocks of 1 MiB of planes per thread.
    for (rows, cols, gran, tie) in
        [(2000, 1000, Granularity::Group(64), TieRule::HalfEven), (37, 300, Granularity::Channel, TieRule::HalfUp)]
    {
        let qw = random_weight(&mut rng, rows, cols, gran);
        let pw = PlanarWeight::from_quantized(&qw, tie).unwrap();
        // Every precision, one twice; batches on every kernel path (mat-vec, 4 × 4, GEMM, f32).
        let plan = [(8, 3), (4, 6), (2, 1), (4, 2), (3, 64), (5, 2), (6, 1), (7, 5)];
        let xs: Vec<Vec<f32>> = plan.iter().map(|&(_, n)| random_x(&mut rng, n * cols)).collect();
        for backend in Backend::available() {
            for path in [ActPath::F32, ActPath::Int8, ActPath::Int8Fine, ActPath::Auto] {
                for (threads, fast) in [(1, true), (3, true), (2, false)] {
                    let cfg = KernelConfig::new(backend, path, threads);
                    let mut ys: Vec<Vec<f32>> = plan.iter().map(|&(_, n)| vec![f32::NAN; n * rows]).collect();
                    let mut parts: Vec<MatmulPart<'_>> = plan
                        .iter()
                        .zip(&xs)
                        .zip(ys.iter_mut())
                        .map(|((&(bits, n), x), y)| MatmulPart { bits, x, n, y })
                        .collect();
                    pw.multi_impl(&mut parts, &cfg, (fast, 0)).unwrap();
                    for ((&(bits, n), x), y) in plan.iter().zip(&xs).zip(&ys) {
                        let mut want = vec![0f32; n * rows];
                        pw.matmul_impl(bits, x, n, &mut want, &KernelConfig::new(backend, path, 1), (fast, 0)).unwrap();
                        let same = want.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{rows}x{cols} {backend} {path:?} threads={threads} bits={bits} n={n}");
                    }
                }
            }
        }
        // A bad part is an error, and nothing is computed.
        let x = random_x(&mut rng, cols);
        let (mut y1, mut y2) = (vec![0f32; rows], vec![0f32; rows + 1]);
        let mut parts =
            [MatmulPart { bits: 4, x: &x, n: 1, y: &mut y1 }, MatmulPart { bits: 2, x: &x, n: 1, y: &mut y2 }];
        assert!(pw.matmul_multi(&mut parts, &KernelConfig::default()).is_err());
        assert!(y1.iter().all(|&v| v == 0.0));
        let mut parts = [MatmulPart { bits: 9, x: &x, n: 1, y: &mut y1 }];
        assert!(pw.matmul_multi(&mut parts, &KernelConfig::default()).is_err());
        assert!(pw.matmul_multi(&mut [], &KernelConfig::default()).is_ok());
    }
}

#[test]
fn concurrent_callers_share_the_pool() {
    let mut rng = Rng(9);
    let (rows, cols) = (64, 200);
    let qw = random_weight(&mut rng, rows, cols, Granularity::Channel);
    let pw = PlanarWeight::from_quantized(&qw, TieRule::HalfUp).unwrap();
    let x = random_x(&mut rng, 3 * cols);
    let cfg = KernelConfig::new(Backend::best(), ActPath::Int8, 3);
    let mut want = vec![0f32; 3 * rows];
    pw.matmul_impl(3, &x, 3, &mut want, &cfg, (true, 0)).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..20 {
                    let mut y = vec![0f32; 3 * rows];
                    pw.matmul_impl(3, &x, 3, &mut y, &cfg, (true, 0)).unwrap();
                    assert_eq!(y, want);
                }
            });
        }
    });
}

#[test]
fn threads_are_capped_by_rows_and_work() {
    assert_eq!(share_count(0, 10, 1 << 30, MIN_SHARE_BYTES), 1);
    assert_eq!(share_count(4, 3, 1 << 30, MIN_SHARE_BYTES), 3);
    assert_eq!(share_count(4, 1000, MIN_SHARE_BYTES / 2, MIN_SHARE_BYTES), 1);
    assert_eq!(share_count(4, 1000, 5 * MIN_SHARE_BYTES, MIN_SHARE_BYTES), 4);
    assert_eq!(share_count(4, 1000, 2 * MIN_SHARE_BYTES, MIN_SHARE_BYTES), 2);
    assert_eq!(share_count(4, 1000, 0, 0), 4);
    assert_eq!(share_count(4, 0, 0, MIN_SHARE_BYTES), 1);
}

#[test]
fn pool_propagates_panics_and_survives() {
    let r = std::panic::catch_unwind(|| pool::run(3, |i| assert_ne!(i, 2, "share 2 fails")));
    assert!(r.is_err());
    let r = std::panic::catch_unwind(|| pool::run(3, |i| assert_ne!(i, 0, "share 0 fails")));
    assert!(r.is_err());
    let hits = std::sync::atomic::AtomicUsize::new(0);
    pool::run(5, |i| {
        hits.fetch_add(1 << (4 * i), std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(hits.into_inner(), 0x11111);
    // Workers that went to sleep (idle longer than they spin) wake for the next job.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let hits = std::sync::atomic::AtomicUsize::new(0);
    pool::run(3, |i| {
        hits.fetch_add(1 << (4 * i), std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(hits.into_inner(), 0x111);
}

#[test]
fn dequantize_rows_matches_dequantize() {
    let mut rng = Rng(11);
    for (rows, cols) in [(7, 200), (3, 64), (5, 1)] {
        for gran in GRANS {
            for tie in TIES {
                let qw = random_weight(&mut rng, rows, cols, gran);
                let pw = PlanarWeight::from_quantized(&qw, tie).unwrap();
                // Any order, repeats allowed, as an embedding lookup asks.
                let pick: Vec<usize> = (0..2 * rows).map(|_| rng.next() as usize % rows).collect();
                for bits in 2..=8 {
                    let full = qw.dequantize(bits, tie).unwrap();
                    let mut got = vec![f32::NAN; pick.len() * cols];
                    pw.dequantize_rows(bits, &pick, &mut got).unwrap();
                    for (i, &r) in pick.iter().enumerate() {
                        let want = &full[r * cols..(r + 1) * cols];
                        let have = &got[i * cols..(i + 1) * cols];
                        assert!(
                            want.iter().zip(have).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{rows}x{cols} {gran} {tie} bits={bits} row {r}"
                        );
                    }
                }
            }
        }
    }
    let pw =
        PlanarWeight::from_quantized(&random_weight(&mut rng, 4, 10, Granularity::Channel), TieRule::HalfEven).unwrap();
    let mut out = vec![0f32; 20];
    pw.dequantize_rows(4, &[], &mut []).unwrap();
    assert_eq!(pw.dequantize_rows(4, &[0, 4], &mut out), Err(KernelError::RowOutOfRange { row: 4, rows: 4 }));
    assert_eq!(
        pw.dequantize_rows(4, &[0], &mut out),
        Err(KernelError::LengthMismatch { what: "out", expected: 10, got: 20 })
    );
    assert_eq!(pw.dequantize_rows(1, &[0, 1], &mut out), Err(KernelError::InvalidBits(1)));
}

/// `ActPath::Auto` is the int8 path at `INT8_MAX_BITS` and below and above it the 16-column int8
/// path on AVX-512, the f32 path elsewhere, bit for bit.
#[test]
fn auto_activations_pick_int8_for_low_bits_only() {
    let mut rng = Rng(12);
    let (rows, cols) = (19, 200);
    let qw = random_weight(&mut rng, rows, cols, Granularity::Group(64));
    let pw = PlanarWeight::from_quantized(&qw, TieRule::HalfEven).unwrap();
    let x = random_x(&mut rng, 2 * cols);
    for backend in Backend::available() {
        let run = |bits, path| {
            let mut y = vec![0f32; 2 * rows];
            pw.matmul(bits, &x, 2, &mut y, &KernelConfig::new(backend, path, 1)).unwrap();
            y
        };
        for bits in 2..=8 {
            let want = match bits {
                b if b <= super::INT8_MAX_BITS => ActPath::Int8,
                _ if backend == Backend::Avx512 => ActPath::Int8Fine,
                _ => ActPath::F32,
            };
            assert_eq!(ActPath::Auto.at(bits, backend), want);
            assert_eq!(run(bits, ActPath::Auto), run(bits, want), "{backend} bits {bits}");
        }
        assert_ne!(run(4, ActPath::Int8), run(4, ActPath::Int8Fine), "the two paths should differ somewhere");
    }
}

/// Several weights in one call (threads splitting their rows end to end, so a thread's share may
/// start in one weight and end in the next) give every part exactly what a call of its own gives.
#[test]
fn weight_group_matches_separate_calls() {
    let mut rng = Rng(22);
    // q, k, v of a layer (one input), a weight with no parts, a tiny one, and one with other columns.
    let shapes = [(576, 576, 2), (192, 576, 2), (192, 576, 1), (40, 576, 0), (3, 576, 1), (300, 130, 2)];
    let pws: Vec<PlanarWeight> = shapes
        .iter()
        .map(|&(rows, cols, _)| {
            let qw = random_weight(&mut rng, rows, cols, Granularity::Group(64));
            PlanarWeight::from_quantized(&qw, TieRule::HalfEven).unwrap()
        })
        .collect();
    let x576 = random_x(&mut rng, 5 * 576);
    let x130 = random_x(&mut rng, 2 * 130);
    // Per weight, its parts: (bits, rows of x).
    let plans: Vec<Vec<(u32, usize)>> =
        shapes.iter().map(|&(_, _, k)| [(4, 2), (8, 1), (2, 5)][..k].to_vec()).collect();
    let input = |cols: usize, n: usize| if cols == 576 { &x576[..n * cols] } else { &x130[..n * cols] };
    for backend in Backend::available() {
        for path in [ActPath::F32, ActPath::Int8, ActPath::Int8Fine] {
            for (threads, min_share) in [(1, 0), (2, 0), (3, 0), (2, MIN_SHARE_BYTES)] {
                let cfg = KernelConfig::new(backend, path, threads);
                let mut ys: Vec<Vec<Vec<f32>>> = plans
                    .iter()
                    .zip(&shapes)
                    .map(|(plan, &(rows, ..))| plan.iter().map(|&(_, n)| vec![f32::NAN; n * rows]).collect())
                    .collect();
                let mut parts: Vec<Vec<MatmulPart<'_>>> = plans
                    .iter()
                    .zip(&shapes)
                    .zip(ys.iter_mut())
                    .map(|((plan, &(_, cols, _)), ys)| {
                        plan.iter()
                            .zip(ys.iter_mut())
                            .map(|(&(bits, n), y)| MatmulPart { bits, x: input(cols, n), n, y })
                            .collect()
                    })
                    .collect();
                let mut calls: Vec<WeightParts<'_, '_, '_>> =
                    pws.iter().zip(parts.iter_mut()).map(|(weight, parts)| WeightParts::all(weight, parts)).collect();
                group_impl(&mut calls, &cfg, (true, min_share)).unwrap();
                for ((pw, plan), ys) in pws.iter().zip(&plans).zip(&ys) {
                    for (&(bits, n), y) in plan.iter().zip(ys) {
                        let mut want = vec![0f32; n * pw.rows()];
                        let alone = KernelConfig::new(backend, path, 1);
                        pw.matmul(bits, input(pw.cols(), n), n, &mut want, &alone).unwrap();
                        let same = want.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{}x{} {backend} {path:?} threads={threads} bits={bits}", pw.rows(), pw.cols());
                    }
                }
            }
        }
    }
    // A bad part anywhere is an error before anything is computed.
    let mut y0 = vec![0f32; 576];
    let mut y1 = vec![0f32; 191];
    let (mut p0, mut p1) = (
        [MatmulPart { bits: 4, x: &x576[..576], n: 1, y: &mut y0 }],
        [MatmulPart { bits: 4, x: &x576[..576], n: 1, y: &mut y1 }],
    );
    let mut calls = [WeightParts::all(&pws[0], &mut p0), WeightParts::all(&pws[1], &mut p1)];
    assert!(matmul_group(&mut calls, &KernelConfig::default()).is_err());
    assert!(y0.iter().all(|&v| v == 0.0));
    assert!(matmul_group(&mut [], &KernelConfig::default()).is_ok());
}

/// A weight split into row ranges, each at its own precision in one group call (a head whose
/// leading rows are served wider), gives each range's rows exactly what a whole-weight call at
/// that precision gives them; ranges outside the weight are errors.
#[test]
fn row_ranges_match_whole_weight_calls() {
    let mut rng = Rng(23);
    let (rows, cols) = (300, 576);
    let qw = random_weight(&mut rng, rows, cols, Granularity::Group(64));
    let pw = PlanarWeight::from_quantized(&qw, TieRule::HalfEven).unwrap();
    let x = random_x(&mut rng, 3 * cols);
    for backend in Backend::available() {
        for path in [ActPath::F32, ActPath::Int8, ActPath::Int8Fine] {
            for (threads, min_share) in [(1, 0), (2, 0), (3, 0), (2, MIN_SHARE_BYTES)] {
                let cfg = KernelConfig::new(backend, path, threads);
                for (split, (wide, narrow), n) in [(64, (4, 3), 1), (1, (8, 2), 3), (299, (5, 4), 2), (0, (4, 3), 1)] {
                    let (mut y_wide, mut y_narrow) = (vec![f32::NAN; n * split], vec![f32::NAN; n * (rows - split)]);
                    let mut pa = [MatmulPart { bits: wide, x: &x[..n * cols], n, y: &mut y_wide }];
                    let mut pb = [MatmulPart { bits: narrow, x: &x[..n * cols], n, y: &mut y_narrow }];
                    let mut calls = [
                        WeightParts { weight: &pw, rows: 0..split, parts: &mut pa },
                        WeightParts { weight: &pw, rows: split..rows, parts: &mut pb },
                    ];
                    group_impl(&mut calls, &cfg, (true, min_share)).unwrap();
                    let alone = KernelConfig::new(backend, path, 1);
                    for (bits, range, got) in [(wide, 0..split, &y_wide), (narrow, split..rows, &y_narrow)] {
                        let mut want = vec![0f32; n * rows];
                        pw.matmul(bits, &x[..n * cols], n, &mut want, &alone).unwrap();
                        for b in 0..n {
                            let want = &want[b * rows..][range.clone()];
                            let got = &got[b * range.len()..(b + 1) * range.len()];
                            let same = want.iter().zip(got).all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{backend} {path:?} threads={threads} rows {range:?} at {bits} bits");
                        }
                    }
                }
            }
        }
    }
    let mut y = vec![0f32; 10];
    for bad in [295..305, Range { start: 10, end: 0 }] {
        let mut p = [MatmulPart { bits: 4, x: &x[..cols], n: 1, y: &mut y }];
        let err = matmul_group(
            &mut [WeightParts { weight: &pw, rows: bad.clone(), parts: &mut p }],
            &KernelConfig::default(),
        );
        assert!(matches!(err, Err(KernelError::RowOutOfRange { .. })), "{bad:?}: {err:?}");
    }
}
