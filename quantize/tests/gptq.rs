//! Hessian-aware rounding (`quantize::gptq`): the input statistics it collects are the layers'
//! true inputs, its output-error measure is the direct one, it reduces to nearest rounding when
//! inputs are uncorrelated, lowers the output error of the bit-width it is asked to favour when
//! they are not, and leaves a checkpoint that says how its codes were rounded.

use candle_core::{Device, Tensor};
use drq_tests::tiny_model;
use kernels::{first_round, second_round, Granularity, QuantizedWeight, TieRule};
use model::{Architecture, KvCache, OpsMode, Transformer};
use quantize::blockwise::refit_stored_codes;
use quantize::gptq::{
    collect_moments, round_model, round_weight, round_weight_within, GptqSpec, InputMoments, OutputErrorMeter,
};
use quantize::{quantize_model, quantize_weight, QuantSpec, SearchObjective};

/// A deterministic N(0, 1) stream (splitmix64 + Box–Muller).
fn normals(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 + 0.5 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect()
}

fn spec(bits: &[u32]) -> QuantSpec {
    QuantSpec {
        bits: bits.to_vec(),
        granularity: Granularity::Group(32),
        tie: TieRule::HalfEven,
        objective: SearchObjective::Normalized,
        ..QuantSpec::default()
    }
}

/// `Σ x xᵀ` of the rows of `x` (`[n, dim]`).
fn moments_of(x: &[f32], dim: usize) -> InputMoments {
    let n = x.len() / dim;
    let mut gram = vec![0f64; dim * dim];
    for row in x.chunks(dim) {
        for i in 0..dim {
            for k in 0..dim {
                gram[i * dim + k] += f64::from(row[i]) * f64::from(row[k]);
            }
        }
    }
    InputMoments { gram, dim, rows: n }
}

/// Inputs whose columns are strongly correlated: `z · A` with a random mixing `A`, plus a few
/// loud columns, as LLM activations have.
fn correlated_inputs(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let z = normals(seed, n * dim);
    let a = normals(seed + 1, dim * dim);
    let mut x = vec![0f32; n * dim];
    for r in 0..n {
        for c in 0..dim {
            let mut v = z[r * dim + c];
            for k in 0..dim {
                v += 0.3 * z[r * dim + k] * a[k * dim + c];
            }
            x[r * dim + c] = if c % 13 == 0 { 8.0 * v } else { v };
        }
    }
    x
}

/// `‖(Ŵ − W)Xᵀ‖² / ‖W Xᵀ‖²` computed from the inputs themselves.
fn direct_output_error(w: &[f32], q: &QuantizedWeight, x: &[f32], bits: u32) -> f64 {
    let (rows, cols) = (q.layout.rows, q.layout.cols);
    let deq = q.dequantize(bits, TieRule::HalfEven).unwrap();
    let (mut err, mut total) = (0f64, 0f64);
    for xr in x.chunks(cols) {
        for r in 0..rows {
            let (mut y, mut yq) = (0f64, 0f64);
            for c in 0..cols {
                y += f64::from(w[r * cols + c]) * f64::from(xr[c]);
                yq += f64::from(deq[r * cols + c]) * f64::from(xr[c]);
            }
            err += (yq - y).powi(2);
            total += y * y;
        }
    }
    err / total
}

#[test]
fn spec_parses_a_priority_order_ending_in_8() {
    assert_eq!("4,8".parse::<GptqSpec>().unwrap().order, vec![4, 8]);
    assert_eq!("4".parse::<GptqSpec>().unwrap().order, vec![4, 8], "8 is appended");
    assert_eq!("8".parse::<GptqSpec>().unwrap().order, vec![8]);
    assert_eq!("2, 4".parse::<GptqSpec>().unwrap().to_string(), "gptq:2,4,8");
    for bad in ["8,4", "4,4", "9", "1", "", "four"] {
        assert!(bad.parse::<GptqSpec>().is_err(), "{bad:?} accepted");
    }
}

#[test]
fn output_error_is_the_direct_one() {
    let (rows, cols) = (6, 64);
    let w = normals(1, rows * cols);
    let x = correlated_inputs(200, cols, 2);
    let q = quantize_weight(&w, rows, cols, &spec(&[8, 4, 2])).unwrap();
    let m = moments_of(&x, cols);
    for bits in [8, 4, 2] {
        let fast = OutputErrorMeter::new(&w, &m).unwrap().relative(&q, bits, TieRule::HalfEven).unwrap();
        let direct = direct_output_error(&w, &q, &x, bits);
        assert!((fast - direct).abs() <= 1e-9 + 1e-6 * direct, "W{bits}: {fast} vs {direct}");
    }
}

#[test]
fn uncorrelated_inputs_give_nearest_rounding() {
    let (rows, cols) = (8, 96);
    let w = normals(3, rows * cols);
    let nearest = quantize_weight(&w, rows, cols, &spec(&[8, 4, 2])).unwrap();
    // A diagonal Hessian: rounding one column tells nothing about another.
    let mut gram = vec![0f64; cols * cols];
    for j in 0..cols {
        gram[j * cols + j] = 1.0 + j as f64;
    }
    let m = InputMoments { gram, dim: cols, rows: 1 };

    let mut q = nearest.clone();
    round_weight(&w, &mut q, &m, &"8".parse().unwrap(), TieRule::HalfEven).unwrap();
    assert_eq!(q.codes, nearest.codes, "GPTQ at 8 bits with a diagonal Hessian is nearest rounding");

    // 4 first: each 4-bit level is the nearest 4-bit level of the weight itself (no double
    // rounding loss), and the code is the nearest 8-bit one inside that level.
    let mut q = nearest.clone();
    round_weight(&w, &mut q, &m, &"4,8".parse().unwrap(), TieRule::HalfEven).unwrap();
    let groups = q.layout.n_groups();
    let mut moved = 0;
    for r in 0..rows {
        for c in 0..cols {
            let i = r * cols + c;
            let s = q.scales[r * groups + c / 32];
            let direct4 = (w[i] / (16.0 * s)).round().clamp(-8.0, 7.0) as i8;
            let code = q.codes[i];
            assert_eq!(second_round(code, 4, TieRule::HalfEven), direct4, "row {r} col {c}");
            let nearest8 = first_round(w[i] / s);
            if code != nearest8 {
                moved += 1;
                // Only moved to the edge of the 4-bit level, no further.
                assert_ne!(
                    second_round(nearest8, 4, TieRule::HalfEven),
                    direct4,
                    "row {r} col {c}: moved inside the level"
                );
                let step = if code > nearest8 { -1 } else { 1 };
                assert_ne!(
                    second_round(code + step, 4, TieRule::HalfEven),
                    direct4,
                    "row {r} col {c}: not the nearest code in the level"
                );
            }
        }
    }
    assert!(moved > 0, "double rounding of nearest 8-bit codes never differed from direct 4-bit rounding");
}

#[test]
fn correlated_inputs_lower_the_favoured_precisions_output_error() {
    let (rows, cols) = (16, 128);
    let w = normals(5, rows * cols);
    let x = correlated_inputs(400, cols, 6);
    let m = moments_of(&x, cols);
    let nearest = quantize_weight(&w, rows, cols, &spec(&[8, 4, 2])).unwrap();
    let meter = OutputErrorMeter::new(&w, &m).unwrap();
    let err = |q: &QuantizedWeight, bits| meter.relative(q, bits, TieRule::HalfEven).unwrap();

    let mut g8 = nearest.clone();
    round_weight(&w, &mut g8, &m, &"8".parse().unwrap(), TieRule::HalfEven).unwrap();
    let mut g48 = nearest.clone();
    round_weight(&w, &mut g48, &m, &"4,8".parse().unwrap(), TieRule::HalfEven).unwrap();
    assert_eq!(g8.scales, nearest.scales, "scales are not changed");

    assert!(err(&g8, 8) < 0.7 * err(&nearest, 8), "W8: GPTQ {} vs nearest {}", err(&g8, 8), err(&nearest, 8));
    assert!(err(&g48, 4) < 0.7 * err(&nearest, 4), "W4: GPTQ {} vs nearest {}", err(&g48, 4), err(&nearest, 4));
    assert!(err(&g48, 4) < err(&g8, 4), "favouring 4 bits helps 4 bits more than favouring 8");
    assert!(err(&g8, 8) < err(&g48, 8), "favouring 8 bits helps 8 bits more than favouring 4");
}

#[test]
fn within_levels_only_8_bits_move_and_their_output_error_falls() {
    let (rows, cols) = (16, 128);
    let w = normals(7, rows * cols);
    let x = correlated_inputs(400, cols, 8);
    let m = moments_of(&x, cols);
    let tie = TieRule::HalfEven;
    // Levels as training leaves them: one weight in five moved a 4-bit level off its nearest,
    // then each 8-bit code the nearest to its weight inside its 4- and 2-bit levels.
    let mut trained = quantize_weight(&w, rows, cols, &spec(&[8, 4, 2])).unwrap();
    for (i, c) in trained.codes.iter_mut().enumerate() {
        if i % 5 == 0 {
            *c = if i % 2 == 0 { c.saturating_add(16) } else { c.saturating_sub(16) };
        }
    }
    refit_stored_codes(&mut trained, &w, &[8, 4, 2], tie);
    let meter = OutputErrorMeter::new(&w, &m).unwrap();
    let err = |q: &QuantizedWeight, bits| meter.relative(q, bits, tie).unwrap();

    let mut within = trained.clone();
    round_weight_within(&w, &mut within, &m, &"8".parse().unwrap(), tie, &[8, 4, 2]).unwrap();
    for bits in [4, 2] {
        assert_eq!(within.dequantize(bits, tie).unwrap(), trained.dequantize(bits, tie).unwrap(), "W{bits} changed");
    }
    assert_ne!(within.codes, trained.codes, "no 8-bit code moved");
    assert!(err(&within, 8) < 0.7 * err(&trained, 8), "W8: GPTQ {} vs refit {}", err(&within, 8), err(&trained, 8));

    // Without levels to keep it is plain GPTQ at 8 bits, which moves the 4-bit levels back.
    let mut free = trained.clone();
    round_weight_within(&w, &mut free, &m, &"8".parse().unwrap(), tie, &[]).unwrap();
    assert_ne!(free.dequantize(4, tie).unwrap(), trained.dequantize(4, tie).unwrap());
    assert!(
        err(&free, 8) < err(&within, 8),
        "keeping the levels cost 8 bits nothing: {} vs {}",
        err(&free, 8),
        err(&within, 8)
    );
}

#[test]
fn moments_are_the_layers_inputs() {
    let float = tiny_model(Architecture::Llama, false, 11);
    let config = &float.config;
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 % 300) as u32).collect();
    let blocks = [&ids[..12], &ids[12..]];
    let targets = vec![
        "model.layers.0.self_attn.q_proj.weight".to_string(),
        "model.layers.0.self_attn.k_proj.weight".to_string(),
        "lm_head.weight".to_string(),
    ];
    let moments = collect_moments(config, &float.weights, &targets, &blocks, 2, |_| {}).unwrap();
    assert_eq!(moments.len(), 3, "only the weights asked for");

    // Layer 0's attention input is the RMS-normalised embedding.
    let norm = float.weights.get("model.layers.0.input_layernorm.weight", &[64]).unwrap();
    let embed = float.weights.get("model.embed_tokens.weight", &[300, 64]).unwrap();
    let mut rows = Vec::new();
    for b in blocks {
        let e = embed.index_select(&Tensor::new(b, &Device::Cpu).unwrap(), 0).unwrap();
        let rms = e.sqr().unwrap().mean_keepdim(1).unwrap().affine(1.0, config.rms_norm_eps).unwrap().sqrt().unwrap();
        rows.push(e.broadcast_div(&rms).unwrap().broadcast_mul(&norm).unwrap());
    }
    let x: Vec<f32> = Tensor::cat(&rows, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let expected = moments_of(&x, 64);
    let q = &moments["model.layers.0.self_attn.q_proj.weight"];
    assert_eq!((q.dim, q.rows), (64, 24));
    let worst = q.gram.iter().zip(&expected.gram).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    assert!(worst < 1e-3, "gram differs by {worst}");
    assert_eq!(q.gram, moments["model.layers.0.self_attn.k_proj.weight"].gram, "q and k share their input");
    assert_eq!(moments["lm_head.weight"].dim, 64);

    // Observing changes nothing the model computes.
    let plain = Transformer::new(config, &float.weights, OpsMode::Inference).unwrap();
    let tokens = Tensor::new(&ids[..12], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let a = plain.forward(&tokens, &mut KvCache::new(config), 0).unwrap();
    let observed = Transformer::observed(config, &float.weights, std::sync::Arc::new(NoOp)).unwrap();
    let b = observed.forward(&tokens, &mut KvCache::new(config), 0).unwrap();
    assert_eq!(drq_tests::max_abs_diff(&a, &b), 0.0);
}

struct NoOp;

impl model::transformer::InputObserver for NoOp {
    fn observe(&self, _: &str, _: &Tensor) -> anyhow::Result<()> {
        Ok(())
    }
}

#[test]
fn a_rounded_model_records_its_rounding_and_gains_at_its_favoured_bits() {
    let float = tiny_model(Architecture::Llama, true, 13);
    let mut q = quantize_model(&float, &spec(&[8, 4, 2]), &[], |_| {}).unwrap();
    let ids: Vec<u32> = (0..8 * 33).map(|i| ((i * 7919 + i / 5) % 300) as u32).collect();
    let blocks: Vec<&[u32]> = ids.chunks(33).collect();
    let moments =
        collect_moments(&float.config, &float.weights, &q.quantization.quantized, &blocks, 4, |_| {}).unwrap();
    // A tied embedding's moments are its lm_head role's: the final hidden states, every position.
    let head = &moments["model.embed_tokens.weight"];
    assert_eq!((head.dim, head.rows), (float.config.hidden_size, 8 * 33));
    assert_eq!(moments.len(), 15, "7 linear layers × 2 blocks and the tied head");
    let before = q.quantized.clone();
    round_model(&float, &mut q, &moments, &"4,8".parse().unwrap(), &[], |_| {}).unwrap();
    assert_eq!(q.quantization.rounding, "gptq:4,8");
    assert_eq!(
        q.quantized["model.embed_tokens.weight"], before["model.embed_tokens.weight"],
        "the embedding keeps nearest rounding"
    );
    let mut gained = 0;
    for layer in &q.report {
        let Some(e) = &layer.output_error else {
            assert_eq!(layer.name, "model.embed_tokens.weight");
            continue;
        };
        let (nearest, gptq) = (e.nearest[1], e.gptq[1]);
        assert_eq!((nearest.0, gptq.0), (4, 4));
        gained += usize::from(gptq.1 < nearest.1);
        assert_ne!(q.quantized[&layer.name].codes, before[&layer.name].codes, "{}: codes unchanged", layer.name);
    }
    assert!(gained >= 12, "W4 output error lower in only {gained} of 14 layers");
}
