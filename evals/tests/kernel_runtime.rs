//! The kernel runtime (`Transformer::from_resident`: every quantized weight served from one
//! resident bit-plane copy) against the reference path (`Transformer::new` over
//! `Checkpoint::weights_at`, candle matmuls on dequantized f32 weights):
//! - tiny models, every precision 2..=8, channel and group:32, tied and untied, Llama and Qwen2
//!   (biases): f32-activation logits equal the reference within 1e-4 relative, int8-activation
//!   logits close with mostly the same argmax; per-layer mixes too;
//! - the resident copy is shared: transformers at different precisions hold the same `Arc`s;
//! - the real SmolLM2 at channel and group:128: perplexity over the first two 128-token windows of
//!   the reference sample agrees to 1e-3 relative at 8, 4 and 2 bits (kernels, f32 activations),
//!   and within a few percent with int8 activations at 8 and 4 bits (printed with --nocapture).

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor, D};
use drq_tests::tiny_model;
use evals::perplexity::{evaluate, windows, Candidate, Protocol};
use kernels::{ActPath, Granularity, KernelConfig, TieRule};
use model::checkpoint::{Checkpoint, WideRowsSpec};
use model::source::Provenance;
use model::{Architecture, Batch, KvCache, OpsMode, Precision, ResidentModel, SequenceStep, Transformer, Weights};
use quantize::{quantize_model, write_checkpoint, QuantSpec, SearchObjective};

fn spec(granularity: Granularity) -> QuantSpec {
    QuantSpec {
        bits: vec![8, 4, 2],
        granularity,
        tie: TieRule::HalfEven,
        objective: SearchObjective::Normalized,
        ..QuantSpec::default()
    }
}

fn provenance() -> Provenance {
    Provenance { source: "test".to_string(), sha256: "0".repeat(64) }
}

/// A tiny model quantized with `quantize_model` and written to `dir`, opened.
fn tiny_checkpoint(dir: &Path, arch: Architecture, tied: bool, granularity: Granularity) -> Checkpoint {
    let float = tiny_model(arch, tied, 3);
    let q = quantize_model(&float, &spec(granularity), &[], |_| {}).unwrap();
    let path = dir.join(format!("{arch:?}-{tied}-{}.safetensors", granularity.to_string().replace(':', "")));
    write_checkpoint(&path, &float, &provenance(), &q).unwrap();
    Checkpoint::open(&path).unwrap()
}

fn kernel(path: ActPath) -> KernelConfig {
    KernelConfig { path, ..KernelConfig::default() }
}

/// Tokens `[batch, len]` below 300 (the tiny vocabulary), deterministic.
fn tokens(batch: usize, len: usize, seed: u32) -> Tensor {
    let ids: Vec<u32> = (0..(batch * len) as u32).map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) % 300).collect();
    Tensor::from_vec(ids, (batch, len), &Device::Cpu).unwrap()
}

/// Logits of a prefill of `[2, 70]` tokens (140 activation rows: kernel chunks of 64, 64, 12), a
/// batched decode step `[2, 1]`, and a single-sequence prefill `[1, 5]` + decode step `[1, 1]`
/// (the mat-vec path), flattened to `[positions, vocab]`.
fn run(model: &Transformer) -> Tensor {
    let config = model.config();
    let mut out = Vec::new();
    let mut cache = KvCache::new(config);
    out.push(model.forward(&tokens(2, 70, 1), &mut cache, 0).unwrap());
    out.push(model.forward(&tokens(2, 1, 2), &mut cache, 0).unwrap());
    let mut cache = KvCache::new(config);
    out.push(model.forward(&tokens(1, 5, 3), &mut cache, 0).unwrap());
    out.push(model.forward(&tokens(1, 1, 4), &mut cache, 0).unwrap());
    let flat: Vec<Tensor> = out.iter().map(|t| t.flatten_to(1).unwrap()).collect();
    Tensor::cat(&flat, 0).unwrap()
}

/// `max |a − b| / max |b|`.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    drq_tests::max_abs_diff(a, b) / scale
}

/// Fraction of positions whose argmax agrees.
fn argmax_agreement(a: &Tensor, b: &Tensor) -> f64 {
    let eq: Vec<u8> = a.argmax(D::Minus1).unwrap().eq(&b.argmax(D::Minus1).unwrap()).unwrap().to_vec1().unwrap();
    eq.iter().map(|&v| f64::from(v)).sum::<f64>() / eq.len() as f64
}

#[test]
fn tiny_models_match_the_reference_at_every_precision() {
    let dir = tempfile::tempdir().unwrap();
    let mut worst_f32 = 0f32;
    let (mut worst_int8, mut worst_agree) = (0f32, 1f64);
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        for tied in [false, true] {
            for granularity in [Granularity::Channel, Granularity::Group(32)] {
                let ckpt = tiny_checkpoint(dir.path(), arch, tied, granularity);
                // Everything is quantized, the embedding (and untied lm_head) included.
                assert!(ckpt.is_quantized("model.embed_tokens.weight"));
                assert_eq!(ckpt.is_quantized("lm_head.weight"), !tied);
                let resident = ResidentModel::from_checkpoint(&ckpt).unwrap();
                for bits in 2..=8 {
                    let p = Precision::Bits(bits);
                    let case = format!("{arch:?} tied={tied} {granularity} {bits} bits");
                    let reference =
                        Transformer::new(ckpt.config(), &ckpt.weights_at(&p).unwrap(), OpsMode::Inference).unwrap();
                    let want = run(&reference);
                    let f32_model = Transformer::from_resident(&resident, &p, &kernel(ActPath::F32)).unwrap();
                    let got = run(&f32_model);
                    let d = rel_diff(&got, &want);
                    assert!(d < 1e-4, "{case}: f32 kernels differ from the reference by {d:e} (relative)");
                    worst_f32 = worst_f32.max(d);

                    let int8_model = Transformer::from_resident(&resident, &p, &kernel(ActPath::Int8)).unwrap();
                    let got = run(&int8_model);
                    let d = rel_diff(&got, &want);
                    let agree = argmax_agreement(&got, &want);
                    assert!(d < 0.05, "{case}: int8 kernels differ from the reference by {d:e} (relative)");
                    assert!(agree >= 0.9, "{case}: int8 argmax agrees on only {:.1}% of positions", agree * 100.0);
                    worst_int8 = worst_int8.max(d);
                    worst_agree = worst_agree.min(agree);
                }
            }
        }
    }
    eprintln!(
        "worst relative logit difference: f32 {worst_f32:e}, int8 {worst_int8:e}; worst int8 argmax agreement {:.1}%",
        worst_agree * 100.0
    );
}

/// Wide lm_head rows (the first 100 of 300 two bits wider): the kernels split the head (and a tied
/// embedding's lookup) at that row and match the reference decoded the same way, which differs
/// from the plain precision below 8 bits.
#[test]
fn wide_rows_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let wide = WideRowsSpec::Head { rows: 100, extra_bits: 2 };
    for (arch, tied) in [(Architecture::Llama, true), (Architecture::Qwen2, false)] {
        let plain = tiny_checkpoint(dir.path(), arch, tied, Granularity::Group(32));
        let mut ckpt = Checkpoint::open(plain.path()).unwrap();
        ckpt.widen_rows(&wide).unwrap();
        let head = if tied { "model.embed_tokens.weight" } else { "lm_head.weight" };
        assert_eq!(ckpt.quantization().wide_rows.as_ref().map(|w| w.weight.as_str()), Some(head));
        let (resident, plain_resident) =
            (ResidentModel::from_checkpoint(&ckpt).unwrap(), ResidentModel::from_checkpoint(&plain).unwrap());
        for bits in [2, 3, 4, 7, 8] {
            let p = Precision::Bits(bits);
            let case = format!("{arch:?} tied={tied} {bits} bits");
            let weights = ckpt.weights_at(&p).unwrap();
            // The reference decodes the head's first rows at the wider bits, the others at `bits`.
            let wider = plain.weights_at(&Precision::Bits((bits + 2).min(8))).unwrap();
            let narrow = plain.weights_at(&p).unwrap();
            let rows = |w: &Weights, r: std::ops::Range<usize>| {
                w.get(head, &[300, 64]).unwrap().narrow(0, r.start, r.len()).unwrap()
            };
            assert_eq!(rel_diff(&rows(&weights, 0..100), &rows(&wider, 0..100)), 0.0, "{case}");
            assert_eq!(rel_diff(&rows(&weights, 100..300), &rows(&narrow, 100..300)), 0.0, "{case}");

            let want = run(&Transformer::new(ckpt.config(), &weights, OpsMode::Inference).unwrap());
            let got = run(&Transformer::from_resident(&resident, &p, &kernel(ActPath::F32)).unwrap());
            let d = rel_diff(&got, &want);
            assert!(d < 1e-4, "{case}: f32 kernels differ from the reference by {d:e} (relative)");
            let without = run(&Transformer::from_resident(&plain_resident, &p, &kernel(ActPath::F32)).unwrap());
            match bits {
                8 => assert_eq!(rel_diff(&got, &without), 0.0, "{case}: nothing to widen at 8 bits"),
                7 => assert!(rel_diff(&got, &without) > 0.0, "{case}: rows at 8 bits changed nothing"),
                _ => assert!(rel_diff(&got, &without) > 1e-3, "{case}: wide rows changed nothing"),
            }
        }
        // Counted: 100 rows × 64 columns × 2 bits more at 4 bits, nothing at 8.
        let (rows, cols) = (300usize, 64usize);
        let added = |b: u32| {
            ckpt.quantization().matrix_bits(head, rows, cols, b).unwrap()
                - plain.quantization().matrix_bits(head, rows, cols, b).unwrap()
        };
        assert_eq!((added(4), added(7), added(8)), (100 * 64 * 2, 100 * 64, 0));
    }
}

/// A per-layer mix (layer 0 at 3 bits, layer 1 at 6, embedding 8, lm_head 4) through
/// `from_resident_with` equals the reference built from each weight decoded at its own bits.
#[test]
fn per_layer_mix_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let ckpt = tiny_checkpoint(dir.path(), arch, false, Granularity::Group(32));
        let bits_for = |name: &str| -> Option<u32> {
            Some(if name.starts_with("model.layers.0.") {
                3
            } else if name.starts_with("model.layers.1.") {
                6
            } else if name.starts_with("model.embed_tokens") {
                8
            } else {
                4
            })
        };
        let mut weights = Weights::new();
        let decoded: Vec<(u32, Weights)> =
            (2..=8).map(|b| (b, ckpt.weights_at(&Precision::Bits(b)).unwrap())).collect();
        for (name, shape) in Weights::expected_shapes(ckpt.config()) {
            let bits = if ckpt.is_quantized(&name) { bits_for(&name).unwrap() } else { 8 };
            let w = &decoded.iter().find(|(b, _)| *b == bits).unwrap().1;
            weights.insert(name.clone(), w.get(&name, &shape).unwrap()).unwrap();
        }
        let want = run(&Transformer::new(ckpt.config(), &weights, OpsMode::Inference).unwrap());
        let resident = ResidentModel::from_checkpoint(&ckpt).unwrap();
        let mixed = Transformer::from_resident_with(&resident, bits_for, &kernel(ActPath::F32)).unwrap();
        let served: Vec<u32> = mixed.planar_weights().iter().map(|(_, b)| *b).collect();
        assert_eq!(served.first(), Some(&8));
        assert_eq!(served.last(), Some(&4));
        assert!(served.contains(&3) && served.contains(&6));
        let d = rel_diff(&run(&mixed), &want);
        assert!(d < 1e-4, "{arch:?}: per-layer mix differs by {d:e}");
    }
}

/// One resident copy serves every precision: transformers at 8 and 3 bits (and int8 activations)
/// hold the very same `Arc`s as the resident model, the tied lm_head is the embedding itself, and
/// nothing else holds a copy.
#[test]
fn transformers_share_the_resident_weights() {
    let dir = tempfile::tempdir().unwrap();
    for tied in [true, false] {
        let ckpt = tiny_checkpoint(dir.path(), Architecture::Llama, tied, Granularity::Channel);
        let resident = ResidentModel::from_checkpoint(&ckpt).unwrap();
        drop(ckpt);
        let n_quantized = resident.planar_weights().count();
        // Embedding + 7 linears per layer (+ lm_head when untied).
        assert_eq!(n_quantized, 1 + 7 * 2 + usize::from(!tied));
        let a = Transformer::from_resident(&resident, &Precision::Bits(8), &kernel(ActPath::F32)).unwrap();
        let b = Transformer::from_resident(&resident, &Precision::Bits(3), &kernel(ActPath::Int8)).unwrap();
        let (wa, wb) = (a.planar_weights(), b.planar_weights());
        // Embedding, 14 linears, lm_head (the embedding again when tied).
        assert_eq!(wa.len(), 16);
        assert_eq!(wb.len(), 16);
        for ((x, bx), (y, by)) in wa.iter().zip(&wb) {
            assert!(Arc::ptr_eq(x, y), "a weight was copied between precisions");
            assert_eq!((*bx, *by), (8, 3));
            assert!(resident.planar_weights().any(|(_, r)| Arc::ptr_eq(r, x)), "a weight is not the resident one");
        }
        assert_eq!(Arc::ptr_eq(wa[0].0, wa[15].0), tied, "tied lm_head must be the resident embedding");
        for (name, w) in resident.planar_weights() {
            // The resident model's reference plus one per use in each of the two transformers.
            let uses = if tied && name == "model.embed_tokens.weight" { 2 } else { 1 };
            assert_eq!(Arc::strong_count(w), 1 + 2 * uses, "{name}");
        }
        drop((a, b));
        assert!(resident.planar_weights().all(|(_, w)| Arc::strong_count(w) == 1));
        // The float precision cannot be served from a checkpoint.
        let err = Transformer::from_resident(&resident, &Precision::Float, &KernelConfig::default()).err().unwrap();
        let msg = format!("{err:#}");
        assert!(msg.contains("no bit-width") && msg.contains("precision `fp`"), "{msg}");
    }
}

// ----- the real model -------------------------------------------------------------------------

/// Every matrix quantized round-to-nearest with absmax scales (f16-rounded, as checkpoints store
/// them): a valid checkpoint without `quantize_model`'s scale search, which costs ~15 s per
/// granularity on SmolLM2 in the dev profile. What is tested here is that the kernels serve the
/// checkpoint exactly as the reference path does, whatever its scales.
fn round_to_nearest(float: &model::FloatModel, granularity: Granularity) -> quantize::QuantizedModel {
    let mut quantized = std::collections::BTreeMap::new();
    for (name, rows, cols) in quantize::model_ptq::quantizable(&float.config, &[]) {
        let w: Vec<f32> = float.weights.get(&name, &[rows, cols]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let layout = granularity.layout(rows, cols).unwrap();
        let mut codes = vec![0i8; rows * cols];
        let mut scales = Vec::with_capacity(layout.n_scales());
        for r in 0..rows {
            for g in 0..layout.n_groups() {
                let range = layout.group_cols(g);
                let absmax = w[r * cols..][range.clone()].iter().fold(0f32, |m, x| m.max(x.abs()));
                let s = half::f16::from_f32(absmax / 127.0).to_f32().max(half::f16::MIN_POSITIVE.to_f32());
                for c in range {
                    codes[r * cols + c] = kernels::first_round(w[r * cols + c] / s);
                }
                scales.push(s);
            }
        }
        quantized.insert(name, kernels::QuantizedWeight::new(codes, scales, layout));
    }
    let float_tensors = float
        .weights
        .iter()
        .filter(|(n, _)| !quantized.contains_key(*n))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let names = quantized.keys().cloned().collect();
    let quantization = model::checkpoint::QuantizationMeta::nearest(
        &[8, 4, 2],
        granularity,
        TieRule::HalfEven,
        "absmax".into(),
        names,
    );
    quantize::QuantizedModel { quantization, quantized, float: float_tensors, report: Vec::new() }
}

/// Perplexity over the first two 128-token windows (llama.cpp protocol) of the reference sample:
/// reference path vs kernels with f32 and int8 activations, at 8, 4 and 2 bits.
fn real_model_agrees(granularity: Granularity) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("smollm2.safetensors");
    {
        let (float, provenance) =
            model::source::load_float(&model::ModelSource::Gguf(drq_tests::smollm2_gguf())).unwrap();
        write_checkpoint(&path, &float, &provenance, &round_to_nearest(&float, granularity)).unwrap();
    }
    let ckpt = Checkpoint::open(&path).unwrap();
    let resident = ResidentModel::from_checkpoint(&ckpt).unwrap();
    let text_path = drq_tests::shared_dir().join("reference/smollm2-135m-instruct/sample.txt");
    let text = std::fs::read_to_string(&text_path).unwrap();
    let ids = ckpt.tokenizer().unwrap().encode(text.as_str(), false).unwrap().get_ids().to_vec();
    let bos = if ckpt.add_bos() { ckpt.config().bos_token_id } else { None };
    let mut wins = windows(&ids, 128, Protocol::LlamaCpp, bos).unwrap();
    wins.truncate(2);
    assert_eq!(wins.len(), 2);
    let ppl = |m: &Transformer| evaluate(&[Candidate::new("", m)], None, &wins, |_| {}).unwrap()[0].perplexity;
    for bits in [8, 4, 2] {
        let p = Precision::Bits(bits);
        let reference =
            ppl(&Transformer::new(ckpt.config(), &ckpt.weights_at(&p).unwrap(), OpsMode::Inference).unwrap());
        let f32_ppl = ppl(&Transformer::from_resident(&resident, &p, &kernel(ActPath::F32)).unwrap());
        let rel = (f32_ppl / reference - 1.0).abs();
        // 2 bits is scored too (the PTQ model is destroyed there, perplexity ~1e7, but the kernels
        // must still compute exactly what the reference computes); int8 activations only where the
        // perplexity means something.
        let int8_ppl =
            (bits >= 4).then(|| ppl(&Transformer::from_resident(&resident, &p, &kernel(ActPath::Int8)).unwrap()));
        eprintln!(
            "{granularity} {bits} bits: reference {reference:.4}, kernels f32 {f32_ppl:.4} (rel {rel:.1e}), kernels int8 {}",
            int8_ppl.map_or("-".to_string(), |v| format!("{v:.4} ({:+.2}%)", (v / reference - 1.0) * 100.0))
        );
        assert!(rel < 1e-3, "{granularity} {bits} bits: kernels f32 {f32_ppl} vs reference {reference}");
        if let Some(v) = int8_ppl {
            // int8 activations are quantized with one absmax per weight scale group: per
            // channel that is one scale per whole 576- or 1536-wide row, which SmolLM2's outlier
            // channels make coarse. Measured on this round-to-nearest checkpoint: +7.6% / +11.8%
            // at 8 / 4 bits per channel, +4.8% / −0.9% with groups of 128 (the int8 path is
            // bit-exact across backends, so these are reproducible).
            let tol = match (granularity, bits) {
                (Granularity::Channel, 4) => 0.25,
                _ => 0.10,
            };
            assert!(
                (v / reference - 1.0).abs() < tol,
                "{granularity} {bits} bits: kernels int8 {v} vs reference {reference}"
            );
        }
    }
}

#[test]
fn real_model_channel_perplexity_matches_the_reference() {
    real_model_agrees(Granularity::Channel);
}

#[test]
fn real_model_group128_perplexity_matches_the_reference() {
    real_model_agrees(Granularity::Group(128));
}

/// Continuous batching's step: sequences of different lengths, cache positions and phases
/// (prefill chunks and single-token decodes) in one `forward_batch` give each sequence the logits
/// it gets alone. On the kernel path they are bit-identical: a row's result does not depend on
/// the other rows of the call, so a served answer does not depend on who else is being served.
#[test]
fn forward_batch_equals_each_sequence_alone() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, tied, granularity) in
        [(Architecture::Llama, true, Granularity::Channel), (Architecture::Qwen2, false, Granularity::Group(32))]
    {
        let checkpoint = tiny_checkpoint(dir.path(), arch, tied, granularity);
        let resident = ResidentModel::from_checkpoint(&checkpoint).unwrap();
        let float = Transformer::new(
            checkpoint.config(),
            &checkpoint.weights_at(&Precision::Bits(4)).unwrap(),
            OpsMode::Inference,
        )
        .unwrap();
        let planar = Transformer::from_resident(&resident, &Precision::Bits(4), &KernelConfig::default()).unwrap();
        for (label, t, exact) in [("reference", &float, false), ("kernels", &planar, true)] {
            let ids =
                |n: usize, seed: u32| -> Vec<u32> { tokens(1, n, seed).flatten_all().unwrap().to_vec1().unwrap() };
            // Three sequences: a, b already have 9 and 3 cached positions; c starts empty.
            let (a0, b0) = (ids(9, 11), ids(3, 12));
            let (a1, b1, c1) = (ids(1, 13), ids(4, 14), ids(70, 15));
            let alone = |prefix: &[u32], new: &[u32]| -> Tensor {
                let mut cache = KvCache::new(t.config());
                if !prefix.is_empty() {
                    t.forward(&Tensor::new(prefix, &Device::Cpu).unwrap().unsqueeze(0).unwrap(), &mut cache, 0)
                        .unwrap();
                }
                let logits = t
                    .forward(&Tensor::new(new, &Device::Cpu).unwrap().unsqueeze(0).unwrap(), &mut cache, new.len() - 1)
                    .unwrap();
                logits.flatten_to(1).unwrap().squeeze(0).unwrap()
            };
            let expected = Tensor::stack(&[alone(&a0, &a1), alone(&b0, &b1), alone(&[], &c1)], 0).unwrap();

            let (mut ca, mut cb, mut cc) =
                (KvCache::new(t.config()), KvCache::new(t.config()), KvCache::new(t.config()));
            t.forward_batch(&mut [
                SequenceStep { tokens: &a0, cache: &mut ca },
                SequenceStep { tokens: &b0, cache: &mut cb },
            ])
            .unwrap();
            let batched = t
                .forward_batch(&mut [
                    SequenceStep { tokens: &a1, cache: &mut ca },
                    SequenceStep { tokens: &b1, cache: &mut cb },
                    SequenceStep { tokens: &c1, cache: &mut cc },
                ])
                .unwrap();
            assert_eq!(batched.dims(), expected.dims());
            assert_eq!((ca.len(), cb.len(), cc.len()), (10, 7, 70));
            let diff = rel_diff(&batched, &expected);
            if exact {
                assert_eq!(diff, 0.0, "{arch:?} {label}: batched logits differ from each sequence alone");
            } else {
                assert!(diff < 1e-5, "{arch:?} {label}: batched logits differ by {diff} (relative)");
            }

            // Errors name the sequence and change nothing.
            let err = t.forward_batch(&mut [SequenceStep { tokens: &[], cache: &mut ca }]).unwrap_err();
            assert!(err.to_string().contains("no new tokens"), "{err}");
            let err = t
                .forward_batch(&mut [
                    SequenceStep { tokens: &a1, cache: &mut ca },
                    SequenceStep { tokens: &[300], cache: &mut cb },
                ])
                .unwrap_err();
            assert!(format!("{err:#}").contains("sequence 1") && format!("{err:#}").contains("vocabulary"), "{err:#}");
            assert_eq!((ca.len(), cb.len()), (10, 7));
        }
    }
}

/// A serving step across precisions (`Transformer::forward_batches`: transformers of one
/// resident model at 8, 4, 3 and 2 bits, each linear layer one pass of the kernels for all of
/// them) gives every sequence the bits `forward_batch` gives its precision alone, over a prefill
/// step and a decode step, tied and untied, with biases, int8 and f32 activations, two threads.
/// A float transformer among them runs on its own; a bad sequence is an error that names its
/// batch and changes no cache.
#[test]
fn forward_batches_across_precisions_equal_each_precision_alone() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, tied, granularity) in
        [(Architecture::Llama, true, Granularity::Channel), (Architecture::Qwen2, false, Granularity::Group(32))]
    {
        let mut checkpoint = tiny_checkpoint(dir.path(), arch, tied, granularity);
        if tied {
            // Wide lm_head rows: the precisions' heads split their rows at the same row (8 bits
            // has none), and one step serves them all.
            checkpoint.widen_rows(&WideRowsSpec::Head { rows: 100, extra_bits: 1 }).unwrap();
        }
        let resident = ResidentModel::from_checkpoint(&checkpoint).unwrap();
        let cfg = KernelConfig { threads: 2, ..kernel(ActPath::Auto) };
        let bits = [8, 4, 3, 2];
        let models: Vec<Transformer> =
            bits.iter().map(|&b| Transformer::from_resident(&resident, &Precision::Bits(b), &cfg).unwrap()).collect();
        let ids = |n: usize, seed: u32| -> Vec<u32> { tokens(1, n, seed).flatten_all().unwrap().to_vec1().unwrap() };
        // Per precision, two sequences: a prompt of 5 + k tokens and one of 70 (two kernel chunks).
        let prompts: Vec<[Vec<u32>; 2]> =
            (0..bits.len() as u32).map(|k| [ids(5 + k as usize, k), ids(70, 40 + k)]).collect();
        let next: Vec<[Vec<u32>; 2]> = (0..bits.len() as u32).map(|k| [ids(1, 80 + k), ids(1, 90 + k)]).collect();
        let fresh = |t: &Transformer| [KvCache::new(t.config()), KvCache::new(t.config())];
        // Each precision alone.
        let mut expected = Vec::new();
        for ((t, p), n) in models.iter().zip(&prompts).zip(&next) {
            let [mut c0, mut c1] = fresh(t);
            let first = t
                .forward_batch(&mut [
                    SequenceStep { tokens: &p[0], cache: &mut c0 },
                    SequenceStep { tokens: &p[1], cache: &mut c1 },
                ])
                .unwrap();
            let second = t
                .forward_batch(&mut [
                    SequenceStep { tokens: &n[0], cache: &mut c0 },
                    SequenceStep { tokens: &n[1], cache: &mut c1 },
                ])
                .unwrap();
            expected.push((first, second));
        }
        // All precisions in one step.
        let mut caches: Vec<[KvCache; 2]> = models.iter().map(fresh).collect();
        let together = |inputs: &[[Vec<u32>; 2]], caches: &mut [[KvCache; 2]]| -> Vec<Tensor> {
            let mut steps: Vec<Vec<SequenceStep<'_>>> = inputs
                .iter()
                .zip(caches.iter_mut())
                .map(|(toks, [c0, c1])| {
                    vec![SequenceStep { tokens: &toks[0], cache: c0 }, SequenceStep { tokens: &toks[1], cache: c1 }]
                })
                .collect();
            let mut batches: Vec<Batch<'_, '_, '_>> =
                models.iter().zip(steps.iter_mut()).map(|(transformer, steps)| Batch { transformer, steps }).collect();
            Transformer::forward_batches(&mut batches).unwrap()
        };
        let first = together(&prompts, &mut caches);
        let second = together(&next, &mut caches);
        for (k, (want, (a, b))) in expected.iter().zip(first.iter().zip(&second)).enumerate() {
            assert_eq!(
                rel_diff(a, &want.0),
                0.0,
                "{arch:?} {} bits: prefill differs from the precision alone",
                bits[k]
            );
            assert_eq!(rel_diff(b, &want.1), 0.0, "{arch:?} {} bits: decode differs from the precision alone", bits[k]);
        }
        for (k, [c0, c1]) in caches.iter().enumerate() {
            assert_eq!((c0.len(), c1.len()), (6 + k, 71));
        }

        // A float transformer shares the step (it runs on its own) and gets its own logits.
        let float = Transformer::new(
            checkpoint.config(),
            &checkpoint.weights_at(&Precision::Bits(4)).unwrap(),
            OpsMode::Inference,
        )
        .unwrap();
        let (mut cf, mut ck) = (KvCache::new(float.config()), KvCache::new(float.config()));
        let want_float = float
            .forward_batch(&mut [SequenceStep { tokens: &prompts[1][0], cache: &mut KvCache::new(float.config()) }])
            .unwrap();
        let (mut sf, mut sk) = (
            [SequenceStep { tokens: &prompts[1][0], cache: &mut cf }],
            [SequenceStep { tokens: &prompts[1][0], cache: &mut ck }],
        );
        let out = Transformer::forward_batches(&mut [
            Batch { transformer: &float, steps: &mut sf },
            Batch { transformer: &models[1], steps: &mut sk },
        ])
        .unwrap();
        assert_eq!(rel_diff(&out[0], &want_float), 0.0);
        assert!(rel_diff(&out[1], &expected[1].0.narrow(0, 0, 1).unwrap()) == 0.0);

        // A bad token in the second batch: an error naming it, no cache moved.
        let (mut c0, mut c1) = (KvCache::new(checkpoint.config()), KvCache::new(checkpoint.config()));
        let (mut s0, mut s1) = (
            [SequenceStep { tokens: &prompts[0][0], cache: &mut c0 }],
            [SequenceStep { tokens: &[300], cache: &mut c1 }],
        );
        let err = Transformer::forward_batches(&mut [
            Batch { transformer: &models[0], steps: &mut s0 },
            Batch { transformer: &models[2], steps: &mut s1 },
        ])
        .unwrap_err();
        assert!(format!("{err:#}").contains("batch 1") && format!("{err:#}").contains("vocabulary"), "{err:#}");
        assert_eq!((c0.len(), c1.len()), (0, 0));
    }
}

/// The fused runtime decodes a sequence token by token (the mat-vec path, the cache growing past
/// its first capacity of 64 positions, keys re-laid out) to the same bits as one prefill of the
/// whole sequence (the 64-row matmul path), at both activation paths and with two threads.
#[test]
fn token_by_token_decoding_equals_one_prefill() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path(), Architecture::Qwen2, false, Granularity::Group(32));
    let resident = ResidentModel::from_checkpoint(&checkpoint).unwrap();
    let ids: Vec<u32> = tokens(1, 150, 21).flatten_all().unwrap().to_vec1().unwrap();
    for (path, threads) in [(ActPath::F32, 1), (ActPath::Int8, 2)] {
        let cfg = KernelConfig { threads, ..kernel(path) };
        let t = Transformer::from_resident(&resident, &Precision::Bits(5), &cfg).unwrap();
        let mut cache = KvCache::new(t.config());
        let whole = t.forward(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), &mut cache, 0);
        let whole = whole.unwrap().squeeze(0).unwrap();
        let mut cache = KvCache::new(t.config());
        let mut steps = Vec::new();
        for &id in &ids {
            steps.push(t.forward_batch(&mut [SequenceStep { tokens: &[id], cache: &mut cache }]).unwrap());
        }
        assert_eq!(cache.len(), ids.len());
        let stepped = Tensor::cat(&steps, 0).unwrap();
        assert_eq!(rel_diff(&stepped, &whole), 0.0, "{path:?}: decoding token by token differs from one prefill");
    }
}

/// A cache belongs to the runtime that filled it: handing it to the other is an error (not a
/// panic), and the cache is left as it was.
#[test]
fn a_cache_cannot_change_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path(), Architecture::Llama, true, Granularity::Channel);
    let resident = ResidentModel::from_checkpoint(&checkpoint).unwrap();
    let planar = Transformer::from_resident(&resident, &Precision::Bits(8), &KernelConfig::default()).unwrap();
    let float =
        Transformer::new(checkpoint.config(), &checkpoint.weights_at(&Precision::Bits(8)).unwrap(), OpsMode::Inference)
            .unwrap();
    for (first, second) in [(&planar, &float), (&float, &planar)] {
        let mut cache = KvCache::new(first.config());
        first.forward(&tokens(1, 4, 5), &mut cache, 0).unwrap();
        let err = second.forward(&tokens(1, 1, 6), &mut cache, 0).unwrap_err();
        assert!(format!("{err:#}").contains("cannot continue it"), "{err:#}");
        assert_eq!(cache.len(), 4);
        first.forward(&tokens(1, 1, 6), &mut cache, 0).unwrap();
        assert_eq!(cache.len(), 5);
    }
}

/// Weights kept in float (`--keep-float embed_tokens` / `lm_head`) run through the fused runtime's
/// dense path (candle matmul on plain rows, the embedding looked up from the float table) and
/// match the reference path.
#[test]
fn kept_float_weights_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, tied, keep, name) in [
        (Architecture::Llama, true, "embed_tokens", "model.embed_tokens.weight"),
        (Architecture::Qwen2, false, "lm_head", "lm_head.weight"),
    ] {
        let float = tiny_model(arch, tied, 3);
        let keep_float = [keep.to_string()];
        let q = quantize_model(&float, &spec(Granularity::Group(32)), &keep_float, |_| {}).unwrap();
        let path = dir.path().join(format!("{arch:?}-keep-{keep}.safetensors"));
        write_checkpoint(&path, &float, &provenance(), &q).unwrap();
        let checkpoint = Checkpoint::open(&path).unwrap();
        assert!(!checkpoint.is_quantized(name) && checkpoint.is_quantized("model.layers.0.mlp.up_proj.weight"));
        let resident = ResidentModel::from_checkpoint(&checkpoint).unwrap();
        let planar = Transformer::from_resident(&resident, &Precision::Bits(4), &kernel(ActPath::F32)).unwrap();
        let reference = Transformer::new(
            checkpoint.config(),
            &checkpoint.weights_at(&Precision::Bits(4)).unwrap(),
            OpsMode::Inference,
        )
        .unwrap();
        let d = rel_diff(&run(&planar), &run(&reference));
        assert!(d < 1e-4, "{arch:?} keeping {keep} in float: kernels differ from the reference by {d:e}");
    }
}
