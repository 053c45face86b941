//! The transformer runtime on tiny random models of every supported layout (Llama with tied and
//! untied embeddings, Qwen2 with q/k/v biases): agreement with an independent f64 reference
//! forward, KV-cache and batch consistency, inference vs differentiable ops, gradients against
//! finite differences, RoPE scaling, and errors for bad inputs and bad weights.

use candle_core::{DType, Device, Tensor, Var};
use drq_tests::max_abs_diff;
use drq_tests::tiny_model;
use model::config::Llama3RopeScaling;
use model::{Architecture, FloatModel, KvCache, ModelConfig, OpsMode, Transformer, Weights};

/// (label, architecture, tied embeddings, seed): the three layouts every check runs on.
const LAYOUTS: [(&str, Architecture, bool, u64); 3] = [
    ("llama tied", Architecture::Llama, true, 1),
    ("llama untied", Architecture::Llama, false, 2),
    ("qwen2", Architecture::Qwen2, false, 3),
];

/// A fixed prompt of `n` ids below the tiny vocabulary of 300 (including ids the tokenizer
/// never produces).
fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + salt * 101 + 11) % 300).collect()
}

fn tokens(rows: &[&[u32]]) -> Tensor {
    let len = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), len), &Device::Cpu).unwrap()
}

fn build(model: &FloatModel, mode: OpsMode) -> Transformer {
    Transformer::new(&model.config, &model.weights, mode).unwrap()
}

/// Logits `[seq, vocab]` of every position of one sequence, from an empty cache.
fn all_logits(t: &Transformer, ids: &[u32]) -> Tensor {
    let mut cache = KvCache::new(t.config());
    t.forward(&tokens(&[ids]), &mut cache, 0).unwrap().squeeze(0).unwrap()
}

/// A copy of `weights` with `name` replaced by `f(values)`.
fn with_tensor(weights: &Weights, name: &str, f: impl FnOnce(&mut Vec<f32>)) -> Weights {
    let (_, t) = weights.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no tensor {name}"));
    let mut values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    f(&mut values);
    let replaced = Tensor::from_vec(values, t.dims(), &Device::Cpu).unwrap();
    let mut out = weights.clone();
    out.insert(name, replaced).unwrap();
    out
}

/// `model` with other weights.
fn reweighted(model: &FloatModel, weights: Weights) -> FloatModel {
    FloatModel {
        config: model.config.clone(),
        tokenizer: model.tokenizer.clone(),
        add_bos: model.add_bos,
        chat_template: model.chat_template.clone(),
        weights,
    }
}

/// `weights` without the tensor `name`.
fn without(weights: &Weights, name: &str) -> Weights {
    let mut out = Weights::new();
    for (n, t) in weights.iter().filter(|(n, _)| *n != name) {
        out.insert(n.clone(), t.clone()).unwrap();
    }
    assert_eq!(out.len() + 1, weights.len(), "{name} was present");
    out
}

// ---------------------------------------------------------------------------------------------
// An independent reference forward: plain f64 loops over the Hugging Face definitions
// (LlamaForCausalLM / Qwen2ForCausalLM), sharing no code with the runtime.

struct Reference<'a> {
    c: &'a ModelConfig,
    w: &'a Weights,
}

impl Reference<'_> {
    fn vec(&self, name: &str) -> Vec<f64> {
        let (_, t) = self.w.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no tensor {name}"));
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect()
    }

    /// `W·x (+ b)` for a row-major `[out, in]` weight.
    fn linear(&self, name: &str, x: &[f64], bias: bool) -> Vec<f64> {
        let w = self.vec(&format!("{name}.weight"));
        let inp = x.len();
        let mut y: Vec<f64> = w.chunks(inp).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect();
        if bias {
            for (y, b) in y.iter_mut().zip(self.vec(&format!("{name}.bias"))) {
                *y += b;
            }
        }
        y
    }

    fn rms_norm(&self, name: &str, x: &[f64]) -> Vec<f64> {
        let w = self.vec(name);
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + self.c.rms_norm_eps).sqrt();
        x.iter().zip(w).map(|(v, w)| v * r * w).collect()
    }

    fn inv_freq(&self) -> Vec<f64> {
        let d = self.c.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / self.c.rope_theta.powf(2.0 * i as f64 / d as f64);
                match &self.c.rope_scaling {
                    None => f,
                    Some(s) => {
                        // transformers' `_compute_llama3_parameters`.
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let old = s.original_max_position_embeddings as f64;
                        if wavelen < old / s.high_freq_factor {
                            f
                        } else if wavelen > old / s.low_freq_factor {
                            f / s.factor
                        } else {
                            let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * f / s.factor + smooth * f
                        }
                    }
                }
            })
            .collect()
    }

    /// Rotate-half RoPE of every head of `x` (`heads * head_dim`) at position `pos`.
    fn rope(&self, x: &mut [f64], pos: usize) {
        let d = self.c.head_dim;
        let freqs = self.inv_freq();
        for head in x.chunks_mut(d) {
            for (i, f) in freqs.iter().enumerate() {
                let (s, c) = (pos as f64 * f).sin_cos();
                let (a, b) = (head[i], head[i + d / 2]);
                head[i] = a * c - b * s;
                head[i + d / 2] = b * c + a * s;
            }
        }
    }

    /// Logits of every position, `[seq][vocab]`.
    fn logits(&self, ids: &[u32]) -> Vec<Vec<f64>> {
        let c = self.c;
        let (h, d, hq, hkv) = (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let embed = self.vec("model.embed_tokens.weight");
        let mut xs: Vec<Vec<f64>> = ids.iter().map(|&t| embed[t as usize * h..(t as usize + 1) * h].to_vec()).collect();
        for layer in 0..c.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let normed: Vec<Vec<f64>> =
                xs.iter().map(|x| self.rms_norm(&format!("{p}.input_layernorm.weight"), x)).collect();
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for (pos, x) in normed.iter().enumerate() {
                let mut q = self.linear(&format!("{p}.self_attn.q_proj"), x, c.attention_bias);
                let mut k = self.linear(&format!("{p}.self_attn.k_proj"), x, c.attention_bias);
                self.rope(&mut q, pos);
                self.rope(&mut k, pos);
                qs.push(q);
                ks.push(k);
                vs.push(self.linear(&format!("{p}.self_attn.v_proj"), x, c.attention_bias));
            }
            for i in 0..xs.len() {
                let mut attn = vec![0.0; hq * d];
                for head in 0..hq {
                    let kvh = head / (hq / hkv);
                    let q = &qs[i][head * d..(head + 1) * d];
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            q.iter().zip(&ks[j][kvh * d..(kvh + 1) * d]).map(|(a, b)| a * b).sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = exps.iter().sum();
                    for (j, e) in exps.iter().enumerate() {
                        for k in 0..d {
                            attn[head * d + k] += e / total * vs[j][kvh * d + k];
                        }
                    }
                }
                let o = self.linear(&format!("{p}.self_attn.o_proj"), &attn, false);
                for (x, o) in xs[i].iter_mut().zip(o) {
                    *x += o;
                }
                let n = self.rms_norm(&format!("{p}.post_attention_layernorm.weight"), &xs[i]);
                let gate = self.linear(&format!("{p}.mlp.gate_proj"), &n, false);
                let up = self.linear(&format!("{p}.mlp.up_proj"), &n, false);
                let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                let down = self.linear(&format!("{p}.mlp.down_proj"), &act, false);
                for (x, y) in xs[i].iter_mut().zip(down) {
                    *x += y;
                }
            }
        }
        let head = if c.tie_word_embeddings { "model.embed_tokens" } else { "lm_head" };
        xs.iter().map(|x| self.linear(head, &self.rms_norm("model.norm.weight", x), false)).collect()
    }
}

fn reference_logits(model: &FloatModel, ids: &[u32]) -> Tensor {
    let rows = Reference { c: &model.config, w: &model.weights }.logits(ids);
    let flat: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
    Tensor::from_vec(flat, (ids.len(), model.config.vocab_size), &Device::Cpu).unwrap()
}

/// Makes attention non-trivial: with N(0, 0.02²) q/k weights every score is ~0 and attention is
/// a plain average, which would hide RoPE, masking and head-mapping mistakes.
fn sharpen_attention(model: &mut FloatModel) {
    let names: Vec<String> =
        model.weights.iter().map(|(n, _)| n.clone()).filter(|n| n.contains("q_proj") || n.contains("k_proj")).collect();
    for name in names {
        model.weights = with_tensor(&model.weights, &name, |v| v.iter_mut().for_each(|x| *x *= 12.0));
    }
}

fn sharp_model(arch: Architecture, tied: bool, seed: u64) -> FloatModel {
    let mut m = tiny_model(arch, tied, seed);
    sharpen_attention(&mut m);
    m
}

// ---------------------------------------------------------------------------------------------

#[test]
fn matches_an_independent_f64_reference() {
    for (label, arch, tied, seed) in LAYOUTS {
        let model = sharp_model(arch, tied, seed);
        let ids = prompt(24, 0);
        let expected = reference_logits(&model, &ids);
        // Guard: the logits must carry signal, and attention must not be uniform (a model whose
        // attention ignored positions would give the same last logits for a shuffled prefix).
        let spread = expected.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(spread > 0.05, "{label}: reference logits too small to compare ({spread})");
        for mode in [OpsMode::Inference, OpsMode::Differentiable] {
            let got = all_logits(&build(&model, mode), &ids);
            let diff = max_abs_diff(&got, &expected);
            assert!(diff < 1e-5, "{label} {mode:?}: runtime vs reference differ by {diff}");
        }
    }
}

#[test]
fn attention_is_causal() {
    // A later token never changes earlier positions, and does change its own and later ones.
    for (label, arch, tied, seed) in LAYOUTS {
        let t = build(&sharp_model(arch, tied, seed), OpsMode::Inference);
        let ids = prompt(12, 1);
        let mut edited = ids.clone();
        edited[8] = (edited[8] + 1) % 300;
        let (a, b) = (all_logits(&t, &ids), all_logits(&t, &edited));
        let past = max_abs_diff(&a.narrow(0, 0, 8).unwrap(), &b.narrow(0, 0, 8).unwrap());
        assert!(past < 1e-6, "{label}: the future leaks into the past ({past})");
        for pos in 8..12 {
            let diff = max_abs_diff(&a.get(pos).unwrap(), &b.get(pos).unwrap());
            assert!(diff > 1e-4, "{label}: position {pos} ignores token 8 ({diff})");
        }
    }
}

#[test]
fn kv_cache_token_by_token_and_in_chunks_match_one_forward() {
    for (label, arch, tied, seed) in LAYOUTS {
        let model = sharp_model(arch, tied, seed);
        let t = build(&model, OpsMode::Inference);
        let ids = prompt(20, 2);
        let full = all_logits(&t, &ids);

        // One token at a time: each step's logits equal that position's in the full forward.
        let mut cache = KvCache::new(&model.config);
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(cache.len(), i);
            let step = t.forward(&tokens(&[&[id]]), &mut cache, 0).unwrap();
            assert_eq!(step.dims(), &[1, 1, 300]);
            let diff = max_abs_diff(&step.squeeze(0).unwrap().squeeze(0).unwrap(), &full.get(i).unwrap());
            assert!(diff < 1e-4, "{label}: token {i} one at a time differs by {diff}");
        }
        assert_eq!(cache.len(), ids.len());

        // Prefix, then the rest (a multi-token chunk after cached positions needs the offset mask).
        for split in [1, 7, 13] {
            let mut cache = KvCache::new(&model.config);
            let first = t.forward(&tokens(&[&ids[..split]]), &mut cache, 0).unwrap().squeeze(0).unwrap();
            let rest = t.forward(&tokens(&[&ids[split..]]), &mut cache, 0).unwrap().squeeze(0).unwrap();
            let chunked = Tensor::cat(&[&first, &rest], 0).unwrap();
            let diff = max_abs_diff(&chunked, &full);
            assert!(diff < 1e-4, "{label}: split at {split} differs by {diff}");
        }

        // `logits_from` returns exactly the tail of the positions.
        let mut cache = KvCache::new(&model.config);
        let tail = t.forward(&tokens(&[&ids]), &mut cache, 15).unwrap().squeeze(0).unwrap();
        assert_eq!(tail.dims(), &[5, 300]);
        assert!(max_abs_diff(&tail, &full.narrow(0, 15, 5).unwrap()) < 1e-5, "{label}: logits_from");
    }
}

#[test]
fn a_batch_row_equals_the_sequence_alone() {
    for (label, arch, tied, seed) in LAYOUTS {
        let model = sharp_model(arch, tied, seed);
        let t = build(&model, OpsMode::Inference);
        let (a, b) = (prompt(16, 3), prompt(16, 4));
        assert_ne!(a, b);
        let mut batch_cache = KvCache::new(&model.config);
        let batch = t.forward(&tokens(&[&a, &b]), &mut batch_cache, 0).unwrap();
        assert_eq!(batch.dims(), &[2, 16, 300]);
        let alone_a = all_logits(&t, &a);
        let alone_b = all_logits(&t, &b);
        assert!(max_abs_diff(&batch.get(0).unwrap(), &alone_a) < 1e-4, "{label}: row 0");
        assert!(max_abs_diff(&batch.get(1).unwrap(), &alone_b) < 1e-4, "{label}: row 1");
        assert!(max_abs_diff(&alone_a, &alone_b) > 1e-3, "{label}: the two rows must differ");

        // Decoding one more (different) token per row from the batched cache.
        let next = t.forward(&tokens(&[&[5], &[250]]), &mut batch_cache, 0).unwrap();
        let full_a = all_logits(&t, &[a.clone(), vec![5]].concat());
        let full_b = all_logits(&t, &[b.clone(), vec![250]].concat());
        assert!(max_abs_diff(&next.get(0).unwrap().squeeze(0).unwrap(), &full_a.get(16).unwrap()) < 1e-4, "{label}");
        assert!(max_abs_diff(&next.get(1).unwrap().squeeze(0).unwrap(), &full_b.get(16).unwrap()) < 1e-4, "{label}");
    }
}

#[test]
fn differentiable_ops_match_inference_ops() {
    for (label, arch, tied, seed) in LAYOUTS {
        let model = sharp_model(arch, tied, seed);
        let ids = prompt(18, 5);
        let fast = all_logits(&build(&model, OpsMode::Inference), &ids);
        let slow = build(&model, OpsMode::Differentiable);
        let diff = max_abs_diff(&fast, &all_logits(&slow, &ids));
        assert!(diff < 1e-4, "{label}: {diff}");
        // With a cache too (RoPE tables narrowed at an offset).
        let mut cache = KvCache::new(&model.config);
        slow.forward(&tokens(&[&ids[..10]]), &mut cache, 0).unwrap();
        let rest = slow.forward(&tokens(&[&ids[10..]]), &mut cache, 0).unwrap().squeeze(0).unwrap();
        let diff = max_abs_diff(&rest, &fast.narrow(0, 10, 8).unwrap());
        assert!(diff < 1e-4, "{label}: cached differentiable forward differs by {diff}");
    }
}

/// The model taken apart (embedding, each block, then final norm and lm_head) gives the forward
/// pass's logits bit for bit, in both op modes and for a batch: what block-wise quantization
/// relies on when it fits one block at a time.
#[test]
fn block_by_block_equals_the_forward_pass() {
    for (label, arch, tied, seed) in LAYOUTS {
        let model = sharp_model(arch, tied, seed);
        let rows = [prompt(14, 1), prompt(14, 2)];
        let batch = tokens(&[&rows[0], &rows[1]]);
        for mode in [OpsMode::Inference, OpsMode::Differentiable] {
            let t = build(&model, mode);
            let whole = t.forward(&batch, &mut KvCache::new(t.config()), 0).unwrap();
            let mut x = t.embed(&batch).unwrap();
            for layer in 0..model.config.num_hidden_layers {
                x = t.block_forward(layer, &x).unwrap();
            }
            let parts = t.logits(&x).unwrap();
            assert_eq!(max_abs_diff(&whole, &parts), 0.0, "{label} {mode:?}");
        }
        let t = build(&model, OpsMode::Inference);
        assert!(t.block_forward(model.config.num_hidden_layers, &t.embed(&batch).unwrap()).is_err(), "{label}");
        let too_long = Tensor::zeros(
            (1, model.config.max_position_embeddings + 1, model.config.hidden_size),
            candle_core::DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert!(t.block_forward(0, &too_long).is_err(), "{label}: past the context");
    }
}

// ---------------------------------------------------------------------------------------------
// Training: gradients through the differentiable ops.

const TRAIN_LEN: usize = 12;

/// Mean next-token cross-entropy of `ids` under `weights`.
fn loss(config: &ModelConfig, weights: &Weights, ids: &[u32]) -> Tensor {
    let t = Transformer::new(config, weights, OpsMode::Differentiable).unwrap();
    let mut cache = KvCache::new(config);
    let n = ids.len() - 1;
    let logits = t.forward(&tokens(&[&ids[..n]]), &mut cache, 0).unwrap().reshape((n, config.vocab_size)).unwrap();
    let targets = Tensor::new(&ids[1..], &Device::Cpu).unwrap();
    candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// The index of the largest-magnitude entry of a gradient.
fn argmax_abs(grad: &Tensor) -> (usize, f32) {
    let values: Vec<f32> = grad.flatten_all().unwrap().to_vec1().unwrap();
    values.iter().copied().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap()
}

#[test]
fn gradients_match_finite_differences_and_descend() {
    for (label, arch, tied, seed) in LAYOUTS {
        let model = sharp_model(arch, tied, seed);
        let config = &model.config;
        let ids = prompt(TRAIN_LEN, 6);

        // Weights that are `Var`s: the graph records every op on them.
        let mut vars = Vec::new();
        let mut var_weights = Weights::new();
        for (name, t) in model.weights.iter() {
            let var = Var::from_tensor(t).unwrap();
            var_weights.insert(name.clone(), var.as_tensor().clone()).unwrap();
            vars.push((name.clone(), var));
        }
        let l = loss(config, &var_weights, &ids);
        let l0 = scalar(&l);
        assert!(l0.is_finite() && l0 > 4.0, "{label}: near-uniform loss expected, got {l0}");
        let grads = l.backward().unwrap();
        let grad_of = |name: &str| {
            let (_, var) = vars.iter().find(|(n, _)| n == name).unwrap();
            grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{label}: no gradient for {name}")).clone()
        };
        // Every weight takes part in the loss.
        for (name, _) in &vars {
            let g = grad_of(name);
            let norm = scalar(&g.sqr().unwrap().sum_all().unwrap()).sqrt();
            assert!(norm > 0.0 && norm.is_finite(), "{label}: gradient of {name} is {norm}");
        }

        // Central differences on the largest-gradient element of a q_proj (deep in attention:
        // through RoPE and softmax), a layer norm, the final norm, and a k bias for Qwen2.
        let mut checked = vec![
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.input_layernorm.weight",
            "model.norm.weight",
        ];
        if config.attention_bias {
            checked.push("model.layers.0.self_attn.k_proj.bias");
        }
        for name in checked {
            let g = grad_of(name);
            let (index, analytic) = argmax_abs(&g);
            let eps = 1e-2f32;
            let shifted = |delta: f32| {
                let w = with_tensor(&model.weights, name, |v| v[index] += delta);
                scalar(&loss(config, &w, &ids))
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
            let rel = (numeric - analytic as f64).abs() / (analytic as f64).abs();
            assert!(
                analytic.abs() > 1e-3 && rel < 1e-2,
                "{label}: d loss / d {name}[{index}]: backward {analytic}, finite difference {numeric} (rel {rel})"
            );
        }

        // A small step along −grad lowers the loss, by about lr·|grad|² (first order); lr is
        // chosen for a predicted decrease of 0.02, far above f32 noise and small enough for
        // the first-order term to dominate.
        let grad_sq: f64 = vars.iter().map(|(name, _)| scalar(&grad_of(name).sqr().unwrap().sum_all().unwrap())).sum();
        let lr = 0.02 / grad_sq;
        let predicted = lr * grad_sq;
        let mut stepped = Weights::new();
        for (name, var) in &vars {
            stepped.insert(name.clone(), (var.as_tensor() - (grad_of(name) * lr).unwrap()).unwrap()).unwrap();
        }
        let l1 = scalar(&loss(config, &stepped, &ids));
        let decrease = l0 - l1;
        assert!(
            decrease > 0.8 * predicted && decrease < 1.2 * predicted,
            "{label}: loss {l0} -> {l1}, first-order prediction −{predicted}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// What each layout's parameters do.

#[test]
fn qwen2_q_bias_changes_the_logits() {
    let model = sharp_model(Architecture::Qwen2, false, 8);
    assert!(model.config.attention_bias);
    let ids = prompt(10, 7);
    let base = all_logits(&build(&model, OpsMode::Inference), &ids);
    let name = "model.layers.0.self_attn.q_proj.bias";
    let zeroed = reweighted(&model, with_tensor(&model.weights, name, |v| v.iter_mut().for_each(|x| *x = 0.0)));
    let changed = all_logits(&build(&zeroed, OpsMode::Inference), &ids);
    // Position 0 attends to itself only: a q bias cannot change it there.
    assert!(max_abs_diff(&base.get(0).unwrap(), &changed.get(0).unwrap()) < 1e-6);
    let diff = max_abs_diff(&base.narrow(0, 1, 9).unwrap(), &changed.narrow(0, 1, 9).unwrap());
    assert!(diff > 1e-4, "zeroing {name} changed the logits by only {diff}");

    // A Qwen2 model must have its biases.
    let err = Transformer::new(&model.config, &without(&model.weights, name), OpsMode::Inference)
        .err()
        .expect("missing bias");
    assert!(format!("{err:#}").contains(name), "{err:#}");
    // A Llama config with `attention_bias` reads and uses them as well.
    let mut llama = tiny_model(Architecture::Llama, false, 9);
    llama.config.attention_bias = true;
    let err = Transformer::new(&llama.config, &llama.weights, OpsMode::Inference).err().expect("no biases");
    assert!(format!("{err:#}").contains("q_proj.bias"), "{err:#}");
}

#[test]
fn tied_lm_head_is_the_embedding_and_untied_is_not() {
    let ids = prompt(8, 8);
    assert!(!ids.contains(&299) && !ids.contains(&123), "the edited rows must not be embedded");
    let last =
        |m: &FloatModel| all_logits(&build(m, OpsMode::Inference), &ids).get(7).unwrap().to_vec1::<f32>().unwrap();
    let bump = |w: &Weights, name: &str, row: usize| {
        with_tensor(w, name, |v| v[row * 64..(row + 1) * 64].iter_mut().for_each(|x| *x += 0.5))
    };
    let changed =
        |a: &[f32], b: &[f32]| -> Vec<usize> { (0..a.len()).filter(|&i| (a[i] - b[i]).abs() > 1e-6).collect() };

    // Tied: embedding row 299 is also output row 299, and only logit 299 moves.
    let tied = tiny_model(Architecture::Llama, true, 10);
    assert!(!tied.weights.contains("lm_head.weight"));
    let base = last(&tied);
    let edited = reweighted(&tied, bump(&tied.weights, "model.embed_tokens.weight", 299));
    assert_eq!(changed(&base, &last(&edited)), vec![299]);

    // Untied: an embedding row of an unseen token changes nothing; lm_head row 123 moves logit 123.
    let untied = tiny_model(Architecture::Llama, false, 11);
    let base = last(&untied);
    let edited = reweighted(&untied, bump(&untied.weights, "model.embed_tokens.weight", 299));
    assert_eq!(changed(&base, &last(&edited)), Vec::<usize>::new());
    let edited = reweighted(&untied, bump(&untied.weights, "lm_head.weight", 123));
    assert_eq!(changed(&base, &last(&edited)), vec![123]);
    // …and an untied config needs its lm_head.
    let err = Transformer::new(&untied.config, &without(&untied.weights, "lm_head.weight"), OpsMode::Inference)
        .err()
        .expect("no lm_head");
    assert!(format!("{err:#}").contains("lm_head.weight"), "{err:#}");
}

#[test]
fn llama3_rope_scaling_changes_long_positions_only_as_configured() {
    let base = sharp_model(Architecture::Llama, false, 12);
    let ids = prompt(130, 9);
    let plain = all_logits(&build(&base, OpsMode::Inference), &ids);
    let with_scaling = |factor: f64| {
        let mut m = sharp_model(Architecture::Llama, false, 12);
        m.config.rope_scaling = Some(Llama3RopeScaling {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16,
        });
        m
    };
    let scaled_model = with_scaling(8.0);
    let scaled = all_logits(&build(&scaled_model, OpsMode::Inference), &ids);
    // Position 0 has no rotation at all; positions past 100 rotate differently.
    assert!(max_abs_diff(&plain.get(0).unwrap(), &scaled.get(0).unwrap()) < 1e-6);
    let late = max_abs_diff(&plain.narrow(0, 100, 30).unwrap(), &scaled.narrow(0, 100, 30).unwrap());
    assert!(late > 1e-3, "llama3 scaling left positions > 100 unchanged ({late})");
    // The scaled frequencies are transformers' (the reference implements them independently)…
    let diff = max_abs_diff(&scaled, &reference_logits(&scaled_model, &ids));
    assert!(diff < 1e-4, "scaled RoPE vs reference: {diff}");
    // …and a factor of 1 is no scaling at all.
    let unit = all_logits(&build(&with_scaling(1.0), OpsMode::Inference), &ids);
    assert!(max_abs_diff(&unit, &plain) < 1e-5);
}

// ---------------------------------------------------------------------------------------------
// Errors, not panics.

#[test]
fn bad_tokens_and_overlong_sequences_are_errors_that_leave_the_cache_usable() {
    let model = tiny_model(Architecture::Llama, true, 13);
    let t = build(&model, OpsMode::Inference);
    let mut cache = KvCache::new(&model.config);
    t.forward(&tokens(&[&[1, 2, 3]]), &mut cache, 0).unwrap();

    let err = t.forward(&tokens(&[&[4, 300]]), &mut cache, 0).unwrap_err();
    assert!(err.to_string().contains("300") && err.to_string().contains("vocabulary"), "{err}");
    let err = t.forward(&tokens(&[&[4], &[u32::MAX]]), &mut cache, 0).unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
    assert_eq!(cache.len(), 3, "a rejected forward must not touch the cache");

    let err = t.forward(&Tensor::zeros((1, 0), DType::U32, &Device::Cpu).unwrap(), &mut cache, 0).unwrap_err();
    assert!(err.to_string().contains("at least one token"), "{err}");
    let err = t.forward(&tokens(&[&[4, 5]]), &mut cache, 2).unwrap_err();
    assert!(err.to_string().contains("logits_from"), "{err}");

    // The context is 256 positions: 253 more fit after 3, 254 do not.
    let long: Vec<u32> = prompt(254, 10);
    let err = t.forward(&tokens(&[&long]), &mut cache, 0).unwrap_err();
    assert!(err.to_string().contains("exceeds") && err.to_string().contains("256"), "{err}");
    assert_eq!(cache.len(), 3);
    let fits = t.forward(&tokens(&[&long[..253]]), &mut cache, 252).unwrap();
    assert_eq!(fits.dims(), &[1, 1, 300]);
    assert_eq!(cache.len(), 256);
    let err = t.forward(&tokens(&[&[1]]), &mut cache, 0).unwrap_err();
    assert!(err.to_string().contains("exceeds"), "{err}");
    // In one go from an empty cache, too.
    let err = t.forward(&tokens(&[&prompt(257, 11)]), &mut KvCache::new(&model.config), 0).unwrap_err();
    assert!(err.to_string().contains("257"), "{err}");
}

#[test]
fn missing_or_misshapen_weights_are_named() {
    let model = tiny_model(Architecture::Qwen2, false, 14);
    let new = |w: &Weights| Transformer::new(&model.config, w, OpsMode::Inference).err().map(|e| format!("{e:#}"));
    assert_eq!(new(&model.weights), None);
    for name in [
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.self_attn.v_proj.bias",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ] {
        let err = new(&without(&model.weights, name)).unwrap_or_else(|| panic!("missing {name} accepted"));
        assert!(err.contains(name), "{err}");
    }
    // up_proj is [96, 64]; the transpose has the same element count.
    let name = "model.layers.0.mlp.up_proj.weight";
    let mut wrong = model.weights.clone();
    let t = model.weights.iter().find(|(n, _)| *n == name).unwrap().1.t().unwrap();
    wrong.insert(name, t).unwrap();
    let err = new(&wrong).expect("transposed up_proj accepted");
    assert!(err.contains(name) && err.contains("[64, 96]") && err.contains("[96, 64]"), "{err}");
    // An invalid config is an error before any tensor is read.
    let mut config = model.config.clone();
    config.num_key_value_heads = 3;
    let err = Transformer::new(&config, &model.weights, OpsMode::Inference).err().expect("bad heads accepted");
    assert!(err.to_string().contains("num_key_value_heads"), "{err}");
}
