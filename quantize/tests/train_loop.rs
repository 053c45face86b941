//! The joint training loop (`quantize::train::Trainer`) on a tiny model: the loss falls at every
//! precision on a small overfit task, scales (and norms) get no weight decay, each ALRS policy
//! gives its documented per-precision scale learning rate, `train` selects what moves,
//! distillation and the summed-loss loop work, the exported checkpoint serves exactly what
//! training evaluated, and a saved and resumed run equals an uninterrupted one bit for bit.

use std::collections::BTreeMap;

use candle_core::Device;
use drq_tests::tiny_model;
use model::checkpoint::Checkpoint;
use model::source::Provenance;
use model::{Architecture, FloatModel, Precision};
use quantize::model_ptq::write_checkpoint_as;
use quantize::train::alrs::eta;
use quantize::train::{AlrsPolicy, LoopMode, TokenBlocks, TrainConfig, Trainable, Trainer};

const Q_PROJ: &str = "model.layers.0.self_attn.q_proj.weight";
const NORM: &str = "model.layers.1.post_attention_layernorm.weight";

fn model() -> FloatModel {
    tiny_model(Architecture::Llama, true, 5)
}

/// A repeated 23-token phrase: a task a tiny model can learn in a few dozen steps. The held-out
/// slice is more of the same text.
fn overfit_data(seq_len: usize) -> TokenBlocks {
    let phrase: Vec<u32> = (0..23u32).map(|i| (i * 97 + 13) % 300).collect();
    let ids: Vec<u32> = phrase.iter().copied().cycle().take(40 * (seq_len + 1)).collect();
    TokenBlocks::from_tokens(&ids, seq_len, 4).unwrap()
}

fn tiny_config() -> TrainConfig {
    TrainConfig {
        bits: vec![8, 4, 2],
        train: Trainable::All,
        steps: 40,
        batch: 4,
        seq_len: 16,
        lr: 3e-3,
        scale_lr: 3e-3,
        warmup_steps: 2,
        min_lr_ratio: 0.1,
        alrs: AlrsPolicy::None,
        heldout_blocks: 4,
        ..TrainConfig::default()
    }
}

fn run(cfg: &TrainConfig, steps: u64) -> (Trainer, Vec<quantize::train::StepReport>) {
    let data = overfit_data(cfg.seq_len);
    let mut t = Trainer::new(model(), cfg.clone(), &Device::Cpu).unwrap();
    let reports = (0..steps).map(|_| t.step(&data).unwrap()).collect();
    (t, reports)
}

#[test]
fn loss_decreases_at_every_precision_on_a_tiny_overfit_task() {
    for (train, alrs, loop_mode, factor) in [
        (Trainable::All, AlrsPolicy::None, LoopMode::PerPrecision, 0.5),
        (Trainable::All, AlrsPolicy::Eta, LoopMode::PerPrecision, 0.5),
        // One step per mini-batch instead of three.
        (Trainable::All, AlrsPolicy::None, LoopMode::Summed, 0.7),
        // Norms and scales of a random model can do little, but still lower the loss.
        (Trainable::ScalesNorms, AlrsPolicy::None, LoopMode::PerPrecision, 0.999),
    ] {
        let cfg = TrainConfig { train, alrs, loop_mode, ..tiny_config() };
        let data = overfit_data(cfg.seq_len);
        let mut t = Trainer::new(model(), cfg.clone(), &Device::Cpu).unwrap();
        let before = t.evaluate(&data).unwrap();
        let reports: Vec<_> = (0..cfg.steps).map(|_| t.step(&data).unwrap()).collect();
        let after = t.evaluate(&data).unwrap();
        for b in [8, 4, 2] {
            assert!(
                after[&b] < factor * before[&b],
                "{train} {alrs} {loop_mode:?} W{b}: held-out CE {} → {} (expected below {factor}×)",
                before[&b],
                after[&b]
            );
            let first = reports[0].ce[&b];
            let last = reports.last().unwrap().ce[&b];
            eprintln!(
                "{train} {alrs} {loop_mode:?} W{b}: held-out {:.3} → {:.3}, train {first:.3} → {last:.3}",
                before[&b], after[&b]
            );
            assert!(last < first, "{train} {alrs} W{b}: training CE {first} → {last}");
        }
    }
}

#[test]
fn what_trains_is_selectable() {
    let base = Trainer::new(model(), tiny_config(), &Device::Cpu).unwrap();
    let layer_scales = |t: &Trainer| t.scales(Q_PROJ).unwrap();
    for train in [Trainable::Scales, Trainable::ScalesNorms, Trainable::All] {
        let (t, _) = run(&TrainConfig { train, ..tiny_config() }, 3);
        assert_ne!(layer_scales(&t), layer_scales(&base), "{train}: scales always train");
        assert_eq!(t.float_tensor(NORM).unwrap() != base.float_tensor(NORM).unwrap(), train.norms(), "{train}: norms");
        assert_eq!(
            t.latent_weight(Q_PROJ).unwrap() != base.latent_weight(Q_PROJ).unwrap(),
            train.weights(),
            "{train}: weights"
        );
    }
}

#[test]
fn scales_and_norms_get_no_weight_decay() {
    // Frozen weights: weight decay must change nothing at all.
    let plain = TrainConfig { train: Trainable::ScalesNorms, weight_decay: 0.0, ..tiny_config() };
    let decayed = TrainConfig { weight_decay: 0.5, ..plain.clone() };
    let (a, _) = run(&plain, 3);
    let (b, _) = run(&decayed, 3);
    assert_eq!(a.scales(Q_PROJ).unwrap(), b.scales(Q_PROJ).unwrap());
    assert_eq!(a.float_tensor(NORM).unwrap(), b.float_tensor(NORM).unwrap());
    // Trained weights: it shrinks them (and so, through the loss, the rest moves too).
    let (c, _) = run(&TrainConfig { train: Trainable::All, ..plain.clone() }, 3);
    let (d, _) = run(&TrainConfig { train: Trainable::All, ..decayed }, 3);
    let norm = |v: Vec<f32>| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>();
    assert!(norm(d.latent_weight(Q_PROJ).unwrap()) < norm(c.latent_weight(Q_PROJ).unwrap()));
}

#[test]
fn alrs_policies_give_the_documented_scale_learning_rates() {
    for alrs in AlrsPolicy::ALL {
        let cfg = TrainConfig { alrs, train: Trainable::Scales, scale_lr: 2e-3, warmup_steps: 0, ..tiny_config() };
        let (t, reports) = run(&cfg, 3);
        for (k, r) in reports.iter().enumerate() {
            let base = cfg.scale_lr * quantize::train::optim::schedule(k as u64, 0, cfg.steps, cfg.min_lr_ratio);
            for &b in &cfg.bits {
                let g = r.alrs_g[&b];
                assert!((0.0..=1.0).contains(&g));
                let expected = match alrs {
                    AlrsPolicy::None => base,
                    AlrsPolicy::Eta => eta(b) * base,
                    AlrsPolicy::Relative => eta(b) * base * (1.0 - g),
                    AlrsPolicy::Literal => (eta(b) * (base - g)).max(0.0),
                };
                let got = r.scale_lr[&b];
                assert!(
                    (got - expected).abs() <= 1e-12 * expected.abs().max(1e-30),
                    "{alrs} W{b} step {k}: λ_b = {got}, expected {expected}"
                );
            }
        }
        assert_eq!(t.step_count(), 3);
        // What ALRS corrects: the 2-bit scale gradient is the larger.
        let r = &reports[0];
        assert!(
            r.scale_grad_norm[&2] > r.scale_grad_norm[&8],
            "{alrs}: |∇s| W2 {} vs W8 {}",
            r.scale_grad_norm[&2],
            r.scale_grad_norm[&8]
        );
    }
}

#[test]
fn distillation_mixes_kl_to_the_float_teacher() {
    let cfg = TrainConfig { train: Trainable::Scales, ..tiny_config() };
    let (_, plain) = run(&cfg, 1);
    assert_eq!(plain[0].loss, plain[0].ce, "without KD the loss is the cross-entropy");
    let mut kd = TrainConfig { train: Trainable::Scales, ..tiny_config() };
    kd.kd.weight = 1.0;
    kd.kd.temperature = 2.0;
    let (_, distilled) = run(&kd, 1);
    let r = &distilled[0];
    assert_eq!(r.ce[&8], plain[0].ce[&8], "same model and batch before the first step");
    // KL to the float model: near zero at 8 bits, larger at 2 bits.
    assert!(r.loss[&8] >= 0.0 && r.loss[&8] < 0.01 * r.ce[&8], "W8 KD loss {}", r.loss[&8]);
    assert!(r.loss[&2] > 10.0 * r.loss[&8], "W2 KD loss {} vs W8 {}", r.loss[&2], r.loss[&8]);
    kd.kd.teacher = quantize::train::Teacher::W8;
    let (_, w8) = run(&kd, 1);
    // The 8-bit model against itself (the teacher runs the fused inference ops: not bit-equal).
    assert!(w8[0].loss[&8].abs() < 1e-6, "W8 against itself: {}", w8[0].loss[&8]);
    assert!(w8[0].loss[&2] > 1e-3, "W2 against W8: {}", w8[0].loss[&2]);
}

#[test]
fn the_exported_checkpoint_serves_what_training_evaluated() {
    let (t, _) = run(&TrainConfig { granularity: "group:16".into(), ..tiny_config() }, 4);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trained.safetensors");
    let q = t.quantized_model().unwrap();
    let provenance = Provenance { source: "tiny".into(), sha256: "0".repeat(64) };
    write_checkpoint_as(&path, t.float_model(), &provenance, &q, "drq-train").unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    assert!(ckpt.provenance().tool.starts_with("drq-train "));
    assert!(ckpt.quantization().scale_method.contains("train:all"), "{}", ckpt.quantization().scale_method);
    for b in [8, 4, 2] {
        let served = ckpt.weights_at(&Precision::Bits(b)).unwrap();
        let trained = t.weights_at(b, false).unwrap();
        for (name, tensor) in trained.iter() {
            let s: Vec<f32> = served.get(name, tensor.dims()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let w: Vec<f32> = tensor.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(s, w, "W{b} `{name}`");
        }
    }
}

#[test]
fn a_saved_and_resumed_run_equals_an_uninterrupted_one() {
    for (train, kd) in [(Trainable::All, 0.0), (Trainable::ScalesNorms, 0.5)] {
        let mut cfg = TrainConfig {
            train,
            scale_moments: quantize::train::ScaleMoments::PerPrecision,
            alrs: AlrsPolicy::Relative,
            ..tiny_config()
        };
        cfg.kd.weight = kd;
        let data = overfit_data(cfg.seq_len);
        let (straight, straight_reports) = run(&cfg, 5);

        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.safetensors");
        let mut first = Trainer::new(model(), cfg.clone(), &Device::Cpu).unwrap();
        let mut reports: Vec<_> = (0..2).map(|_| first.step(&data).unwrap()).collect();
        first.save_state(&state, &data, "sha").unwrap();
        drop(first);
        let mut resumed = Trainer::resume(model(), &state, &data, "sha", &Device::Cpu).unwrap();
        assert_eq!(resumed.step_count(), 2);
        reports.extend((0..3).map(|_| resumed.step(&data).unwrap()));

        let losses =
            |r: &[quantize::train::StepReport]| r.iter().map(|r| r.loss.clone()).collect::<Vec<BTreeMap<u32, f64>>>();
        assert_eq!(losses(&reports), losses(&straight_reports), "{train}: losses");
        let a = straight.quantized_model().unwrap();
        let b = resumed.quantized_model().unwrap();
        assert_eq!(a.quantized, b.quantized, "{train}: codes and scales");
        for (name, t) in &a.float {
            let (x, y): (Vec<f32>, Vec<f32>) =
                (t.flatten_all().unwrap().to_vec1().unwrap(), b.float[name].flatten_all().unwrap().to_vec1().unwrap());
            assert_eq!(x, y, "{train}: {name}");
        }
        assert_eq!(straight.latent_weight(Q_PROJ).unwrap(), resumed.latent_weight(Q_PROJ).unwrap());
        assert_eq!(straight.scales(Q_PROJ).unwrap(), resumed.scales(Q_PROJ).unwrap());

        // Another model or other data are refused.
        let other = overfit_data(cfg.seq_len + 1);
        assert!(Trainer::resume(model(), &state, &other, "sha", &Device::Cpu)
            .err()
            .unwrap()
            .to_string()
            .contains("data"));
        assert!(Trainer::resume(model(), &state, &data, "other", &Device::Cpu)
            .err()
            .unwrap()
            .to_string()
            .contains("sha256"));
    }
}

/// A run started from a checkpoint (here a trained one, with norms that moved) serves at step 0
/// exactly what the checkpoint serves at every precision, records where it started, trains on
/// from there, and refuses checkpoints it cannot continue.
#[test]
fn a_run_starts_from_a_checkpoint_where_it_serves() {
    let cfg = TrainConfig { granularity: "group:16".into(), ..tiny_config() };
    let (t, _) = run(&cfg, 3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("start.safetensors");
    let provenance = Provenance { source: "tiny".into(), sha256: "0".repeat(64) };
    let mut q = t.quantized_model().unwrap();
    write_checkpoint_as(&path, t.float_model(), &provenance, &q, "drq-train").unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();

    let mut started = Trainer::from_checkpoint(model(), cfg.clone(), &ckpt, &Device::Cpu).unwrap();
    assert_ne!(
        started.float_tensor(NORM).unwrap(),
        model().weights.get(NORM, &[64]).unwrap().to_vec1::<f32>().unwrap()
    );
    for b in [8, 4, 3, 2] {
        let served = ckpt.weights_at(&Precision::Bits(b)).unwrap();
        for (name, tensor) in started.weights_at(b, false).unwrap().iter() {
            let s: Vec<f32> = served.get(name, tensor.dims()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(s, tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "W{b} `{name}`");
        }
    }
    let data = overfit_data(cfg.seq_len);
    let first = started.step(&data).unwrap();
    assert!(first.loss.values().all(|l| l.is_finite()));
    let method = started.quantized_model().unwrap().quantization.scale_method;
    assert!(method.starts_with(&format!("{}+train:all", ckpt.quantization().scale_method)), "{method}");

    // Another layout, or corrections, are refused.
    let other = TrainConfig { granularity: "group:32".into(), ..cfg.clone() };
    let err = Trainer::from_checkpoint(model(), other, &ckpt, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("granularity group:16") && err.contains("group:32"), "{err}");
    quantize::corrections::correct_model(
        t.float_model(),
        &mut q,
        &[4],
        model::checkpoint::CorrectionGranularity::Row,
        None,
        |_| {},
    )
    .unwrap();
    let corrected = dir.path().join("corrected.safetensors");
    write_checkpoint_as(&corrected, t.float_model(), &provenance, &q, "drq-quantize").unwrap();
    let err = Trainer::from_checkpoint(model(), cfg, &Checkpoint::open(&corrected).unwrap(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("corrections"), "{err}");
}

/// Hessian-aware bit-switching: no switching at σ = 0; with σ = 1, the share of switched layers
/// grows over the run, and at its end sensitive layers draw bit-width b with probability b/Σb,
/// the others uniformly. Bad settings are refused.
#[test]
fn bit_switching_draws_layer_bits_by_sensitivity() {
    use quantize::hasb::traces::{LayerTrace, TraceReport};
    let dir = tempfile::tempdir().unwrap();
    let base = Trainer::new(model(), tiny_config(), &Device::Cpu).unwrap();
    let names: Vec<String> = base.layer_names().into_iter().map(String::from).collect();
    assert!(base.layer_bits(4, 0).iter().all(|&b| b == 4));
    let sensitive = |name: &str| name.contains("layers.0.");
    let layers = names
        .iter()
        .map(|name| {
            let per_weight = if sensitive(name) { 1.0 } else { 1e-3 };
            LayerTrace {
                name: name.clone(),
                params: 1,
                trace: per_weight,
                trace_se: 0.0,
                per_weight,
                per_weight_se: 0.0,
            }
        })
        .collect();
    let report = TraceReport {
        source: "tiny".into(),
        source_sha256: "0".into(),
        probes: 1,
        converged: true,
        tolerance: 0.1,
        epsilon: 1e-3,
        tokens_per_probe: 1,
        seconds: 0.0,
        layers,
    };
    let traces = dir.path().join("traces.json");
    std::fs::write(&traces, serde_json::to_string(&report).unwrap()).unwrap();
    let mut cfg = tiny_config();
    cfg.steps = 12;
    cfg.bit_switching.sigma = 1.0;
    cfg.bit_switching.traces = traces.to_str().unwrap().into();
    let (t, reports) = run(&cfg, 12);
    let switched = |r: &quantize::train::StepReport| r.switched.values().sum::<usize>();
    let early: usize = reports[..4].iter().map(switched).sum();
    let late: usize = reports[8..].iter().map(switched).sum();
    assert!(late > early, "switched layers: {early} in the first steps, {late} in the last");
    // After the last step σ·(step+1)/steps ≥ 1: every layer draws. Count the draws.
    let mut counts: BTreeMap<(bool, u32), f64> = BTreeMap::new();
    let draws = 400;
    for bi in 0..draws {
        for (name, b) in names.iter().zip(t.layer_bits(4, bi)) {
            *counts.entry((sensitive(name), b)).or_default() += 1.0;
        }
    }
    let n_sensitive = names.iter().filter(|n| sensitive(n)).count() as f64 * draws as f64;
    let n_other = names.len() as f64 * draws as f64 - n_sensitive;
    for (b, expected) in [(8, 8.0 / 14.0), (4, 4.0 / 14.0), (2, 2.0 / 14.0)] {
        let got = counts.get(&(true, b)).copied().unwrap_or(0.0) / n_sensitive;
        assert!((got - expected).abs() < 0.04, "sensitive layers at {b} bits: {got} (expected {expected})");
        let got = counts.get(&(false, b)).copied().unwrap_or(0.0) / n_other;
        assert!((got - 1.0 / 3.0).abs() < 0.04, "other layers at {b} bits: {got} (expected 1/3)");
    }

    let mut bad = tiny_config();
    bad.bit_switching.sigma = 0.5;
    let err = Trainer::new(model(), bad.clone(), &Device::Cpu).err().expect("refused").to_string();
    assert!(err.contains("traces"), "{err}");
    bad.bit_switching.sigma = 1.5;
    assert!(bad.validate().unwrap_err().to_string().contains("sigma"));
    bad.bit_switching.sigma = 0.5;
    bad.bit_switching.traces = dir.path().join("missing.json").to_str().unwrap().into();
    assert!(Trainer::new(model(), bad, &Device::Cpu).is_err());
}
