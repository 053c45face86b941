//! Scale search against brute-force references and edge cases. Timings and error tables:
//! `cargo bench -p quantize --bench ptq`.

use kernels::{first_round, second_round, Granularity, QuantizedWeight, ScaleLayout, TieRule};
use model::checkpoint::CorrectionGranularity;
use quantize::{quantize_weight, reconstruction_error, Grid, PtqError, QuantSpec, SearchObjective};

#[path = "support/random.rs"]
mod random;
use random::{gaussian, heavy_tailed, spec};

/// Reference per-bit sums of squared errors of a group at scale `s`, in f64 through the scalar
/// second rounding.
fn ref_errors(w: &[f32], s: f32, bits: &[u32], tie: TieRule) -> Vec<f64> {
    let inv = 1.0 / s;
    bits.iter()
        .map(|&b| {
            let step = f64::from(1u32 << (8 - b));
            w.iter()
                .map(|&x| {
                    let q = second_round(first_round(x * inv), b, tie);
                    (f64::from(q) * step * f64::from(s) - f64::from(x)).powi(2)
                })
                .sum()
        })
        .collect()
}

/// Scales are stored as f16, so the search only considers f16 values.
fn f16_scale(s: f32) -> f32 {
    half::f16::from_f32(s).to_f32()
}

fn objective(errors: &[f64], best: &[f64], objective: SearchObjective) -> f64 {
    match objective {
        SearchObjective::Sum => errors.iter().sum(),
        SearchObjective::Normalized => errors.iter().zip(best).map(|(e, m)| e / m).sum(),
    }
}

/// Every group of `q`: (weights, scale).
fn groups<'a>(w: &'a [f32], q: &'a QuantizedWeight) -> impl Iterator<Item = (&'a [f32], f32)> + 'a {
    let l = q.layout;
    (0..l.rows).flat_map(move |r| {
        (0..l.n_groups()).map(move |g| {
            let cols = l.group_cols(g);
            (&w[r * l.cols + cols.start..r * l.cols + cols.end], q.scales[r * l.n_groups() + g])
        })
    })
}

#[test]
fn chosen_scale_beats_absmax_and_a_dense_grid() {
    let objectives = [SearchObjective::Sum, SearchObjective::Normalized];
    let cases = [(Granularity::Channel, 96), (Granularity::Group(32), 96), (Granularity::Group(40), 100)];
    let mut worst_gap = 0f64;
    for (case, &(granularity, cols)) in cases.iter().enumerate() {
        for (seed, data) in [(1, gaussian(6 * cols, case as u64)), (2, heavy_tailed(6 * cols, case as u64))] {
            for objective_kind in objectives {
                for tie in [TieRule::HalfEven, TieRule::HalfUp] {
                    let bits = [8, 4, 2];
                    let q = quantize_weight(&data, 6, cols, &spec(&bits, granularity, tie, objective_kind)).unwrap();
                    for (w, s) in groups(&data, &q) {
                        let absmax = w.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                        let grid: Vec<Vec<f64>> = (1..=1000)
                            .map(|k| ref_errors(w, f16_scale(absmax * k as f32 / 1000.0), &bits, tie))
                            .collect();
                        let chosen = ref_errors(w, s, &bits, tie);
                        let best: Vec<f64> =
                            (0..bits.len()).map(|b| grid.iter().map(|e| e[b]).fold(chosen[b], f64::min)).collect();
                        let ours = objective(&chosen, &best, objective_kind);
                        let at_absmax = objective(&grid[999], &best, objective_kind);
                        let grid_best =
                            grid.iter().map(|e| objective(e, &best, objective_kind)).fold(f64::INFINITY, f64::min);
                        let ctx = format!("{granularity} seed {seed} {objective_kind} {tie}");
                        assert!(ours <= at_absmax * (1.0 + 1e-3), "{ctx}: {ours} vs absmax {at_absmax}");
                        assert!(ours <= grid_best * 1.05, "{ctx}: {ours} vs dense grid {grid_best}");
                        worst_gap = worst_gap.max(ours / grid_best - 1.0);
                    }
                }
            }
        }
    }
    println!("worst gap to the 1000-point grid: {:.3}%", worst_gap * 100.0);
}

#[test]
fn codes_are_the_first_rounding_of_the_chosen_scale() {
    let (rows, cols) = (5, 576);
    let w = heavy_tailed(rows * cols, 7);
    for granularity in [Granularity::Channel, Granularity::Group(128), Granularity::Group(32)] {
        let q = quantize_weight(
            &w,
            rows,
            cols,
            &spec(&[8, 4, 2], granularity, TieRule::HalfEven, SearchObjective::Normalized),
        )
        .unwrap();
        let expected_layout = granularity.layout(rows, cols).unwrap();
        assert_eq!(q.layout, expected_layout);
        assert_eq!(q.codes.len(), rows * cols);
        assert_eq!(q.scales.len(), rows * expected_layout.n_groups());
        if granularity == Granularity::Group(128) {
            assert_eq!(q.layout.n_groups(), 5); // 4 × 128 + 64
        }
        let mut i = 0;
        for (group, s) in groups(&w, &q) {
            assert!(s.is_finite() && s > 0.0);
            let absmax = group.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(s <= f16_scale(absmax / 127.0), "scale above absmax/127 (as f16)");
            for &x in group {
                assert_eq!(q.codes[i], first_round(x * (1.0 / s)));
                i += 1;
            }
        }
        // Row-major order of groups: the walk above visited every code once.
        assert_eq!(i, rows * cols);
    }
}

#[test]
fn sum_favours_two_bits_and_normalized_eight_bits() {
    let (rows, cols) = (96, 576);
    let w = gaussian(rows * cols, 11);
    for granularity in [Granularity::Channel, Granularity::Group(128)] {
        let err = |objective| {
            let q =
                quantize_weight(&w, rows, cols, &spec(&[8, 4, 2], granularity, TieRule::HalfEven, objective)).unwrap();
            [8, 4, 2].map(|b| reconstruction_error(&w, &q, b, TieRule::HalfEven).unwrap())
        };
        let (sum, norm) = (err(SearchObjective::Sum), err(SearchObjective::Normalized));
        assert!(sum[2] < norm[2], "{granularity}: 2-bit sum {} normalized {}", sum[2], norm[2]);
        assert!(norm[0] < sum[0], "{granularity}: 8-bit sum {} normalized {}", sum[0], norm[0]);
    }
}

#[test]
fn errors_decrease_with_bits() {
    let (rows, cols) = (32, 256);
    let w = heavy_tailed(rows * cols, 3);
    let all = [8, 7, 6, 5, 4, 3, 2];
    for objective in [SearchObjective::Sum, SearchObjective::Normalized] {
        for tie in [TieRule::HalfEven, TieRule::HalfUp] {
            let q = quantize_weight(&w, rows, cols, &spec(&all, Granularity::Group(64), tie, objective)).unwrap();
            let errs: Vec<f64> = all.iter().map(|&b| reconstruction_error(&w, &q, b, tie).unwrap()).collect();
            for pair in errs.windows(2) {
                assert!(pair[0] < pair[1], "{objective} {tie}: {errs:?}");
            }
            assert!(errs[6] < 1.0, "{objective} {tie}: {errs:?}");
            // Sum clips hard for the sake of 2 bits; Normalized keeps 8 bits near-lossless.
            if objective == SearchObjective::Normalized {
                assert!(errs[0] < 1e-4, "{tie}: {errs:?}");
            }
        }
    }
}

#[test]
fn threaded_result_equals_row_by_row() {
    // Large enough to be split across threads, with rows that do not divide evenly.
    let (rows, cols) = (157, 576);
    let w = heavy_tailed(rows * cols, 5);
    let s = spec(&[8, 4, 2], Granularity::Group(128), TieRule::HalfUp, SearchObjective::Normalized);
    let whole = quantize_weight(&w, rows, cols, &s).unwrap();
    for r in 0..rows {
        let row = quantize_weight(&w[r * cols..(r + 1) * cols], 1, cols, &s).unwrap();
        assert_eq!(row.codes[..], whole.codes[r * cols..(r + 1) * cols]);
        assert_eq!(row.scales[..], whole.scales[r * 5..(r + 1) * 5]);
    }
}

#[test]
fn zero_and_constant_groups() {
    let (rows, cols) = (3, 64);
    let mut w = gaussian(rows * cols, 9);
    w[..cols].fill(0.0); // row 0 all zero
    w[cols..cols + 32].fill(0.25); // first group of row 1 constant
    for objective in [SearchObjective::Sum, SearchObjective::Normalized] {
        let q =
            quantize_weight(&w, rows, cols, &spec(&[8, 4, 2], Granularity::Group(32), TieRule::HalfEven, objective))
                .unwrap();
        assert_eq!(&q.scales[..2], &[1.0, 1.0]);
        assert!(q.codes[..cols].iter().all(|&c| c == 0));
        assert!(q.scales.iter().all(|s| s.is_finite() && *s > 0.0));
        for bits in [8, 4, 2] {
            let e = reconstruction_error(&w, &q, bits, TieRule::HalfEven).unwrap();
            assert!(e.is_finite(), "{objective} bits {bits}: {e}");
        }
        // The constant group is exact at 8 bits up to the f16 rounding of its scale.
        let w8 = q.dequantize(8, TieRule::HalfEven).unwrap();
        assert!(w8[cols..cols + 32].iter().all(|&x| (x - 0.25).abs() < 0.25 * 1e-3), "{objective}");
    }
    let zeros = vec![0f32; 4 * 8];
    let q = quantize_weight(&zeros, 4, 8, &QuantSpec::default()).unwrap();
    assert_eq!(reconstruction_error(&zeros, &q, 2, TieRule::HalfEven).unwrap(), 0.0);
    assert!(q.scales.iter().all(|&s| s == 1.0) && q.codes.iter().all(|&c| c == 0));
}

#[test]
fn empty_tensors() {
    for (rows, cols) in [(0, 16), (4, 0), (0, 0)] {
        let q = quantize_weight(&[], rows, cols, &QuantSpec::default()).unwrap();
        assert!(q.codes.is_empty() && q.scales.is_empty());
        assert_eq!(reconstruction_error(&[], &q, 4, TieRule::HalfUp).unwrap(), 0.0);
    }
}

#[test]
fn bad_input_is_an_error() {
    let w = gaussian(4 * 8, 1);
    let ok = QuantSpec::default();
    assert_eq!(quantize_weight(&w, 4, 7, &ok), Err(PtqError::Shape { rows: 4, cols: 7, len: 32 }));
    for (i, bad) in [(3, f32::NAN), (17, f32::INFINITY), (31, f32::NEG_INFINITY)] {
        let mut v = w.clone();
        v[i] = bad;
        match quantize_weight(&v, 4, 8, &ok) {
            Err(PtqError::NonFinite { index, .. }) => assert_eq!(index, i),
            other => panic!("expected NonFinite, got {other:?}"),
        }
    }
    for bits in [vec![], vec![8, 1], vec![9, 4], vec![8, 4, 4]] {
        let s = QuantSpec { bits: bits.clone(), ..QuantSpec::default() };
        assert!(quantize_weight(&w, 4, 8, &s).is_err(), "bits {bits:?}");
    }
    let s = QuantSpec { granularity: Granularity::Group(0), ..QuantSpec::default() };
    assert!(quantize_weight(&w, 4, 8, &s).is_err());

    let q = quantize_weight(&w, 4, 8, &ok).unwrap();
    assert!(matches!(reconstruction_error(&w[..31], &q, 4, TieRule::HalfEven), Err(PtqError::Shape { .. })));
    assert!(matches!(reconstruction_error(&w, &q, 1, TieRule::HalfEven), Err(PtqError::Kernel(_))));
    let broken = QuantizedWeight { scales: vec![1.0; 3], ..q };
    assert!(reconstruction_error(&w, &broken, 4, TieRule::HalfEven).is_err());
    let message = quantize_weight(&w, 4, 7, &ok).unwrap_err().to_string();
    assert_eq!(message, "weight has 32 elements, expected 4x7");
}

#[test]
fn reconstruction_error_is_relative_mse() {
    let w = [1.0f32, -2.0, 0.5, 0.0];
    let q = QuantizedWeight::new(vec![64, -128, 32, 0], vec![1.0 / 64.0], ScaleLayout::new(1, 4, 4).unwrap());
    // 8 bits: [1, -2, 0.5, 0] exactly; 2 bits (Δ = 6, step 1): [1, -2, 0 (tie → even), 0].
    assert_eq!(reconstruction_error(&w, &q, 8, TieRule::HalfEven).unwrap(), 0.0);
    let e = reconstruction_error(&w, &q, 2, TieRule::HalfEven).unwrap();
    assert!((e - 0.25 / 5.25).abs() < 1e-12, "{e}");
    // Half up rounds the tie to 1: error 0.25 as well.
    let e = reconstruction_error(&w, &q, 2, TieRule::HalfUp).unwrap();
    assert!((e - 0.25 / 5.25).abs() < 1e-12, "{e}");
}

#[test]
fn names_round_trip() {
    for g in [Granularity::Channel, Granularity::Group(32), Granularity::Group(128), Granularity::Group(7)] {
        assert_eq!(g.to_string().parse::<Granularity>(), Ok(g));
    }
    assert_eq!("group:64".parse(), Ok(Granularity::Group(64)));
    for bad in ["group:0", "group:", "group:-1", "grp:32", "Channel", "group: 32"] {
        assert!(bad.parse::<Granularity>().is_err(), "{bad}");
    }
    for o in [SearchObjective::Sum, SearchObjective::Normalized] {
        assert_eq!(o.to_string().parse::<SearchObjective>(), Ok(o));
    }
    assert_eq!("sum".parse(), Ok(SearchObjective::Sum));
    assert!("mean".parse::<SearchObjective>().is_err());
}

/// The max-negative grid puts each group's largest-magnitude weight on the negative side, where
/// every bit-width has its extra level: a group lying on a 2-bit grid with that level in use is
/// reproduced exactly at 2 bits, which no positive scale can do.
#[test]
fn max_negative_grid_uses_the_extra_level() {
    let w = [1.0f32, 0.5, 0.0, -0.5, 1.0, 0.5, 0.0, -0.5];
    let layout = Granularity::Group(4);
    for (grid, exact) in [(Grid::Symmetric, false), (Grid::MaxNegative, true)] {
        let spec = QuantSpec { bits: vec![2], granularity: layout, grid, ..QuantSpec::default() };
        let q = quantize_weight(&w, 2, 4, &spec).unwrap();
        let e = reconstruction_error(&w, &q, 2, TieRule::HalfEven).unwrap();
        assert_eq!(e == 0.0, exact, "{grid}: 2-bit error {e}");
        if grid == Grid::MaxNegative {
            // The largest weight (+1) needs a negative scale to be coded −128.
            assert!(q.scales.iter().all(|&s| s < 0.0), "{:?}", q.scales);
            assert_eq!(q.codes[0], -128);
        }
    }
    // Whatever the signs, the largest magnitude of each group lands on the negative side.
    let mut state = 5u64;
    let w: Vec<f32> = (0..64 * 96)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * if state.is_multiple_of(7) { 8.0 } else { 1.0 }
        })
        .collect();
    let spec = QuantSpec { granularity: Granularity::Group(32), grid: Grid::MaxNegative, ..QuantSpec::default() };
    let q = quantize_weight(&w, 64, 96, &spec).unwrap();
    for (g, (chunk, &s)) in w.chunks(32).zip(&q.scales).enumerate() {
        let top = chunk.iter().fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
        assert!(top * s < 0.0, "group {g}: largest {top}, scale {s}");
    }
    // The grid's best is never worse than the symmetric one at the lowest bit-width on average.
    let sym = quantize_weight(&w, 64, 96, &QuantSpec { granularity: Granularity::Group(32), ..QuantSpec::default() })
        .unwrap();
    let (e_sym, e_neg) = (
        reconstruction_error(&w, &sym, 2, TieRule::HalfEven).unwrap(),
        reconstruction_error(&w, &q, 2, TieRule::HalfEven).unwrap(),
    );
    assert!(e_neg < e_sym, "2 bits: max-negative {e_neg} vs symmetric {e_sym}");
    assert_eq!(spec.scale_method(), "search:normalized:max-negative");
    assert_eq!("max-negative".parse::<Grid>().unwrap(), Grid::MaxNegative);
    assert!("negative".parse::<Grid>().is_err());
}

/// Corrections fitted to the output over calibration inputs (or, with `H = I`, to the weight)
/// lower every row's output error `(w − ŵ) H (w − ŵ)ᵀ` against the uncorrected row; per group
/// they lower it further than per row; and they are the minimum: moving any one factor by 1%
/// makes the total error larger.
#[test]
fn corrections_minimise_the_output_error() {
    let (rows, cols) = (16, 64);
    let mut state = 9u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 40) as f64 / (1u64 << 24) as f64 - 0.5
    };
    let w: Vec<f32> = (0..rows * cols).map(|_| next() as f32).collect();
    let q = quantize_weight(&w, rows, cols, &QuantSpec { granularity: Granularity::Group(32), ..QuantSpec::default() })
        .unwrap();
    // Correlated inputs: x = A z with a random A, H = Σ x xᵀ over 256 samples.
    let a: Vec<f64> = (0..cols * cols).map(|_| next()).collect();
    let mut gram = vec![0f64; cols * cols];
    for _ in 0..256 {
        let z: Vec<f64> = (0..cols).map(|_| next()).collect();
        let x: Vec<f64> = (0..cols).map(|i| (0..cols).map(|k| a[i * cols + k] * z[k]).sum()).collect();
        for i in 0..cols {
            for j in 0..cols {
                gram[i * cols + j] += x[i] * x[j];
            }
        }
    }
    let moments = quantize::gptq::InputMoments { gram: gram.clone(), dim: cols, rows: 256 };
    let out_err = |row: &[f32], served: &[f32], h: bool| -> f64 {
        let d: Vec<f64> = row.iter().zip(served).map(|(&x, &y)| f64::from(x) - f64::from(y)).collect();
        if !h {
            return d.iter().map(|x| x * x).sum();
        }
        (0..cols).map(|i| (0..cols).map(|j| d[i] * gram[i * cols + j] * d[j]).sum::<f64>()).sum()
    };
    let total = |qw: &QuantizedWeight, bits: u32, h: bool| -> Vec<f64> {
        let served = qw.dequantize(bits, TieRule::HalfEven).unwrap();
        (0..rows).map(|r| out_err(&w[r * cols..(r + 1) * cols], &served[r * cols..(r + 1) * cols], h)).collect()
    };
    for moments in [Some(&moments), None] {
        let h = moments.is_some();
        let mut per_granularity = Vec::new();
        for granularity in [CorrectionGranularity::Row, CorrectionGranularity::Group] {
            let fitted =
                quantize::corrections::fit_corrections(&w, &q, &[4, 2], TieRule::HalfEven, moments, granularity)
                    .unwrap();
            let mut corrected = q.clone();
            corrected.corrections = fitted.clone();
            let mut sums = Vec::new();
            for &bits in fitted.keys() {
                let (before, after) = (total(&q, bits, h), total(&corrected, bits, h));
                for r in 0..rows {
                    assert!(
                        after[r] <= before[r] * 1.0001,
                        "{granularity} bits {bits} row {r}: {after:?} > {before:?}"
                    );
                }
                let sum: f64 = after.iter().sum();
                assert!(sum < before.iter().sum::<f64>(), "{granularity} bits {bits}");
                // Any one factor moved by 1% either way makes the error larger.
                for index in [0, fitted[&bits].len() / 2, fitted[&bits].len() - 1] {
                    for factor in [0.99, 1.01] {
                        let mut moved = corrected.clone();
                        moved.corrections.get_mut(&bits).unwrap()[index] *= factor;
                        let moved_sum: f64 = total(&moved, bits, h).iter().sum();
                        assert!(moved_sum > sum, "{granularity} bits {bits} factor {index} × {factor}");
                    }
                }
                sums.push(sum);
            }
            per_granularity.push(sums);
        }
        for (row, group) in per_granularity[0].iter().zip(&per_granularity[1]) {
            assert!(group < row, "per group {group} vs per row {row} (H: {h})");
        }
    }
}
