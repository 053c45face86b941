//! The differentiable fake quantizer (`quantize::train::FakeQuant`): its forward is exactly what
//! a checkpoint written from the same weights and scales serves; its backward is the STE with
//! LSQ scale gradients along the double-rounded path (METHOD.md §2), checked element by element
//! against an independent f64 formula, and through a whole tiny transformer against central
//! finite differences of the straight-through surrogate, for channel and group scales.

use candle_core::{DType, Device, Tensor, Var};
use drq_tests::tiny_model;
use kernels::{dequantize, first_round, second_round, Granularity, TieRule};
use model::{Architecture, KvCache, OpsMode, Transformer, Weights};
use quantize::model_ptq::quantizable;
use quantize::train::fakequant::{export_weight, served_scale};
use quantize::train::FakeQuant;
use quantize::{quantize_weight, QuantSpec};

/// Weights with outliers (so every bit-width clips some) and scales from the PTQ search.
fn weight_and_scales(
    rows: usize,
    cols: usize,
    granularity: Granularity,
    seed: u64,
) -> (Vec<f32>, Vec<f32>, kernels::ScaleLayout) {
    let mut state = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let w: Vec<f32> = (0..rows * cols).map(|i| if i % 37 == 0 { 0.2 * next() } else { 0.02 * next() }).collect();
    let spec = QuantSpec { granularity, ..QuantSpec::default() };
    let q = quantize_weight(&w, rows, cols, &spec).unwrap();
    // Latent scales slightly off their f16 values: training moves them anywhere.
    let scales = q.scales.iter().enumerate().map(|(i, &s)| s * (1.0 + 3e-4 * ((i % 5) as f32 - 2.0))).collect();
    (w, scales, q.layout)
}

#[test]
fn forward_is_what_the_checkpoint_serves() {
    for granularity in [Granularity::Channel, Granularity::Group(16), Granularity::Group(24)] {
        let (w, s, layout) = weight_and_scales(12, 40, granularity, 1);
        let stored = export_weight(&w, &s, layout);
        assert!(stored.scales.iter().all(|&x| half::f16::from_f32(x).to_f32() == x), "stored scales are f16 values");
        for tie in [TieRule::HalfEven, TieRule::HalfUp] {
            for bits in 2..=8 {
                let fq = FakeQuant::new(bits, tie, layout).unwrap();
                let mut out = vec![0f32; w.len()];
                fq.forward_slice(&w, &s, &mut out);
                let mut served = vec![0f32; w.len()];
                dequantize(&stored.codes, &stored.scales, &layout, bits, tie, &mut served).unwrap();
                assert_eq!(out, served, "{granularity} {tie} W{bits}");
                // The candle op gives the same values.
                let t = fq
                    .apply(
                        &Tensor::from_slice(&w, (12, 40), &Device::Cpu).unwrap(),
                        &Tensor::from_slice(&s, (12, layout.n_groups()), &Device::Cpu).unwrap(),
                    )
                    .unwrap();
                assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), served);
            }
        }
    }
}

#[test]
fn backward_is_ste_with_lsq_scale_gradients_along_the_double_rounded_path() {
    for granularity in [Granularity::Channel, Granularity::Group(16)] {
        let (w, s, layout) = weight_and_scales(10, 48, granularity, 2);
        let grad: Vec<f32> = (0..w.len()).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        for tie in [TieRule::HalfEven, TieRule::HalfUp] {
            let mut clipped_seen = [0usize; 9];
            for bits in [8, 6, 4, 3, 2] {
                let (gw, gs) = FakeQuant::new(bits, tie, layout).unwrap().backward_slice(&w, &s, &grad);
                let delta = 8 - bits;
                let step = f64::from(1u32 << delta);
                let (lo_b, hi_b) = (-(1i32 << (bits - 1)), (1i32 << (bits - 1)) - 1);
                let mut expect_s = vec![0f64; s.len()];
                for r in 0..layout.rows {
                    for c in 0..layout.cols {
                        let i = r * layout.cols + c;
                        let g = r * layout.n_groups() + c / layout.group;
                        let s16 = served_scale(s[g]);
                        let v = w[i] * (1.0 / s16);
                        let q_l = second_round(first_round(v), bits, tie);
                        // Inside both clip ranges (first rounding at 8 bits, second at b bits),
                        // in units of the stored scale.
                        let inside = f64::from(v) >= -128.0
                            && f64::from(v) <= 127.0
                            && f64::from(v) / step >= f64::from(lo_b)
                            && f64::from(v) / step <= f64::from(hi_b);
                        if inside {
                            assert_eq!(gw[i], grad[i], "W{bits} dŴ/dW = 1 inside at {i}");
                            expect_s[g] += f64::from(grad[i]) * (step * f64::from(q_l) - f64::from(v));
                        } else {
                            assert_eq!(gw[i], 0.0, "W{bits} dŴ/dW = 0 when clipped at {i}");
                            // Clipped: the code is the bound of b.
                            assert!(i32::from(q_l) == lo_b || i32::from(q_l) == hi_b, "W{bits}: clipped code {q_l}");
                            expect_s[g] += f64::from(grad[i]) * step * f64::from(q_l);
                            clipped_seen[bits as usize] += 1;
                        }
                    }
                }
                for (g, (&a, &e)) in gs.iter().zip(&expect_s).enumerate() {
                    assert!(
                        (f64::from(a) - e).abs() <= 1e-4 * e.abs().max(1.0),
                        "{granularity} {tie} W{bits} scale {g}: {a} vs {e}"
                    );
                }
            }
            assert!(clipped_seen[2] > 0 && clipped_seen[8] > 0, "the fixture clips at 8 and 2 bits: {clipped_seen:?}");
        }
    }
}

/// A tiny model whose attention is not a plain average (q/k weights ×12, as the float-model
/// gradient check), so every layer's gradient is well above f32 noise.
fn sharp_model(seed: u64) -> model::FloatModel {
    let mut m = tiny_model(Architecture::Llama, true, seed);
    let mut weights = Weights::new();
    for (name, t) in m.weights.iter() {
        let t = if name.contains("q_proj") || name.contains("k_proj") { (t * 12.0).unwrap() } else { t.clone() };
        weights.insert(name.clone(), t).unwrap();
    }
    m.weights = weights;
    m
}

/// Mean next-token cross-entropy of `ids` under `weights`.
fn loss(config: &model::ModelConfig, weights: &Weights, ids: &[u32]) -> Tensor {
    let t = Transformer::new(config, weights, OpsMode::Differentiable).unwrap();
    let n = ids.len() - 1;
    let tokens = Tensor::new(&ids[..n], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = t.forward(&tokens, &mut KvCache::new(config), 0).unwrap().reshape((n, config.vocab_size)).unwrap();
    candle_nn::loss::cross_entropy(&logits, &Tensor::new(&ids[1..], &Device::Cpu).unwrap()).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn model_gradients_match_finite_differences_of_the_straight_through_surrogate() {
    let ids: Vec<u32> = (0..14u32).map(|i| (i * 53 + 7) % 300).collect();
    for (granularity, bits) in
        [(Granularity::Channel, 8), (Granularity::Channel, 2), (Granularity::Group(16), 4), (Granularity::Group(16), 2)]
    {
        let model = sharp_model(11);
        let config = &model.config;
        let spec = QuantSpec { granularity, ..QuantSpec::default() };
        // Every quantized weight (the tied embedding included) as variables W and s.
        let mut vars = Vec::new();
        let mut weights = Weights::new();
        for (name, rows, cols) in quantizable(config, &[]) {
            let w: Vec<f32> =
                model.weights.get(&name, &[rows, cols]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let q = quantize_weight(&w, rows, cols, &spec).unwrap();
            let wv = Var::from_slice(&w, (rows, cols), &Device::Cpu).unwrap();
            let sv = Var::from_slice(&q.scales, (rows, q.layout.n_groups()), &Device::Cpu).unwrap();
            let fq = FakeQuant::new(bits, TieRule::HalfEven, q.layout).unwrap();
            weights.insert(name.clone(), fq.apply(wv.as_tensor(), sv.as_tensor()).unwrap()).unwrap();
            vars.push((name, w, q.scales, q.layout, wv, sv));
        }
        for (name, t) in model.weights.iter() {
            if !weights.contains(name) {
                weights.insert(name.clone(), t.clone()).unwrap();
            }
        }
        let l = loss(config, &weights, &ids);
        let grads = l.backward().unwrap();
        // Ŵ at the point, as plain values: the base of the surrogate.
        let w_hat = |name: &str| -> Vec<f32> {
            weights.iter().find(|(n, _)| *n == name).unwrap().1.flatten_all().unwrap().to_vec1().unwrap()
        };

        let mut checked = 0;
        for (name, w, s, layout, wv, sv) in &vars {
            if !(name.contains("q_proj") || name.contains("down_proj") || name.contains("embed"))
                || name.contains("layers.1")
            {
                continue;
            }
            // The straight-through surrogate around (W0, s0): Ŵ(W, s) = Ŵ0 + (W − W0)·1[inside]
            // + (s − s0)·(2^Δ·q_b − 1[inside]·v0), built from the kernels' roundings.
            let n_groups = layout.n_groups();
            let step = f32::from(1u16 << (8 - bits));
            let hi = (((1i32 << (bits - 1)) - 1) as f32) * step;
            let dir = |i: usize| -> (f32, f32) {
                let s16 = served_scale(s[(i / layout.cols) * n_groups + (i % layout.cols) / layout.group]);
                let v = w[i] * (1.0 / s16);
                let level = f32::from(second_round(first_round(v), bits, TieRule::HalfEven)) * step;
                let inside = (-128.0..=hi).contains(&v);
                (if inside { 1.0 } else { 0.0 }, if inside { level - v } else { level })
            };
            let base = w_hat(name);
            let shape = (layout.rows, layout.cols);
            let loss_with = |delta: &[f32]| -> f64 {
                let mut ws = weights.clone();
                let moved: Vec<f32> = base.iter().zip(delta).map(|(a, d)| a + d).collect();
                ws.insert(name.clone(), Tensor::from_vec(moved, shape, &Device::Cpu).unwrap()).unwrap();
                scalar(&loss(config, &ws, &ids))
            };
            let rms = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
            let central = |d: Vec<f32>| -> f64 {
                // Step so that the largest weight change is 5% of the layer's RMS: small against
                // the weights, large against f32 rounding of the loss.
                let m = d.iter().fold(0f32, |m, x| m.max(x.abs()));
                let eps = 0.05 * rms / m;
                let plus: Vec<f32> = d.iter().map(|x| x * eps).collect();
                let minus: Vec<f32> = d.iter().map(|x| -x * eps).collect();
                (loss_with(&plus) - loss_with(&minus)) / (2.0 * f64::from(eps))
            };
            // The scale with the largest gradient.
            let gs: Vec<f32> = grads.get(sv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let (gi, &ga) = gs.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap();
            let (r, g) = (gi / n_groups, gi % n_groups);
            let mut d = vec![0f32; base.len()];
            for c in layout.group_cols(g) {
                d[r * layout.cols + c] = dir(r * layout.cols + c).1;
            }
            let fd = central(d);
            let rel = (fd - f64::from(ga)).abs() / f64::from(ga).abs();
            assert!(
                ga.abs() > 1e-3 && rel < 1e-2,
                "{granularity} W{bits} d loss/d s[{gi}] of {name}: backward {ga}, finite difference {fd} (rel {rel})"
            );
            // The latent weight with the largest gradient (inside the clip range by construction).
            let gw: Vec<f32> = grads.get(wv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let (wi, &wa) = gw.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap();
            assert_eq!(dir(wi).0, 1.0);
            let mut d = vec![0f32; base.len()];
            d[wi] = 1.0;
            let fd = central(d);
            let rel = (fd - f64::from(wa)).abs() / f64::from(wa).abs();
            assert!(
                wa.abs() > 1e-4 && rel < 1e-2,
                "{granularity} W{bits} d loss/d W[{wi}] of {name}: backward {wa}, finite difference {fd} (rel {rel})"
            );
            // A clipped weight gets no gradient.
            if let Some(ci) = (0..w.len()).find(|&i| dir(i).0 == 0.0) {
                assert_eq!(gw[ci], 0.0, "{name}: clipped weight {ci} has a gradient");
            }
            checked += 1;
        }
        assert_eq!(checked, 3, "embedding, a q_proj and a down_proj");
    }
}

/// The composed op (what a GPU runs) gives the fused CPU op's values and weight gradients bit for
/// bit and its scale gradients up to f32 summation order, for ragged groups too (24 ∤ 40).
#[test]
fn composed_op_matches_the_fused_op() {
    for granularity in [Granularity::Channel, Granularity::Group(16), Granularity::Group(24)] {
        let (w, s, layout) = weight_and_scales(12, 40, granularity, 3);
        let grad: Vec<f32> = (0..w.len()).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        let upstream = Tensor::from_slice(&grad, (12, 40), &Device::Cpu).unwrap();
        for tie in [TieRule::HalfEven, TieRule::HalfUp] {
            for bits in [8, 4, 3, 2] {
                let fq = FakeQuant::new(bits, tie, layout).unwrap();
                let run = |composed: bool| {
                    let wv = Var::from_slice(&w, (12, 40), &Device::Cpu).unwrap();
                    let sv = Var::from_slice(&s, (12, layout.n_groups()), &Device::Cpu).unwrap();
                    let out = if composed {
                        fq.apply_composed(wv.as_tensor(), sv.as_tensor())
                    } else {
                        fq.apply(wv.as_tensor(), sv.as_tensor())
                    }
                    .unwrap();
                    let grads = (&out * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
                    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    (flat(&out), flat(grads.get(wv.as_tensor()).unwrap()), flat(grads.get(sv.as_tensor()).unwrap()))
                };
                let (fused, fused_gw, fused_gs) = run(false);
                let (composed, composed_gw, composed_gs) = run(true);
                assert_eq!(composed, fused, "{granularity} {tie} W{bits} values");
                assert_eq!(composed_gw, fused_gw, "{granularity} {tie} W{bits} weight gradients");
                for (g, (a, b)) in composed_gs.iter().zip(&fused_gs).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{granularity} {tie} W{bits} scale gradient {g}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
