//! HASB: Hutchinson's estimator against exact traces (a known matrix, and a tiny transformer's
//! Hessian diagonal taken coordinate by coordinate), and the allocation on a tiny checkpoint.

use std::collections::BTreeMap;

use candle_core::Device;
use model::checkpoint::Checkpoint;
use model::{Architecture, Precision};
use quantize::hasb::allocate::Weighting;
use quantize::hasb::traces::{hutchinson, model_traces, LossHessian, TraceConfig};
use quantize::hasb::{checkpoint_errors, AllocationSpec, Problem};
use quantize::train::data::TokenBlocks;
use quantize::{quantize_model, write_checkpoint, QuantSpec};

/// A symmetric matrix with a known diagonal per block: the estimator's mean converges to each
/// block's trace within its standard error, and stops at the tolerance.
#[test]
fn hutchinson_estimates_each_block_trace_of_a_known_matrix() {
    let sizes = [5usize, 8, 3];
    let n: usize = sizes.iter().sum();
    let mut next = quantize::train::data::splitmix64(11);
    // Entry (i, j) of the lower triangle is draw i(i+1)/2 + j; the matrix mirrors it.
    let draws: Vec<f64> = (0..n * (n + 1) / 2).map(|_| (next() >> 11) as f64 / (1u64 << 53) as f64 - 0.5).collect();
    let h: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    let x = draws[i.max(j) * (i.max(j) + 1) / 2 + i.min(j)];
                    if i == j {
                        2.0 + 4.0 * x
                    } else {
                        x
                    }
                })
                .collect()
        })
        .collect();
    let mut offsets = vec![0];
    for s in sizes {
        offsets.push(offsets.last().unwrap() + s);
    }
    let exact: Vec<f64> = (0..sizes.len()).map(|l| (offsets[l]..offsets[l + 1]).map(|i| h[i][i]).sum()).collect();
    let sample = |_: usize, v: &[Vec<f32>]| -> anyhow::Result<Vec<f64>> {
        let flat: Vec<f64> = v.iter().flatten().map(|&x| f64::from(x)).collect();
        let hv: Vec<f64> = h.iter().map(|row| row.iter().zip(&flat).map(|(a, b)| a * b).sum()).collect();
        Ok((0..sizes.len()).map(|l| (offsets[l]..offsets[l + 1]).map(|i| flat[i] * hv[i]).sum()).collect())
    };
    let cfg = TraceConfig { min_probes: 4000, max_probes: 4000, tolerance: 1e-9, ..TraceConfig::default() };
    let est = hutchinson(&sizes, &cfg, sample, |_, _| {}).unwrap();
    assert_eq!((est.probes, est.converged), (4000, false));
    for ((mean, se), exact) in est.traces.iter().zip(&exact) {
        assert!(*se > 0.0 && (mean - exact).abs() <= 4.0 * se, "{mean} ± {se} vs exact {exact}");
        assert!(*se < 0.1 * exact.abs(), "{se} for a trace of {exact}");
    }
    // A loose tolerance stops early and says so.
    let cfg = TraceConfig { min_probes: 4, max_probes: 4000, tolerance: 0.2, ..TraceConfig::default() };
    let est = hutchinson(&sizes, &cfg, sample, |_, _| {}).unwrap();
    assert!(est.converged && est.probes < 4000, "{} probes", est.probes);
    // Bad settings are refused.
    let bad = TraceConfig { min_probes: 1, ..TraceConfig::default() };
    assert!(hutchinson(&sizes, &bad, sample, |_, _| {}).is_err());
}

/// Column `k` of the Sylvester–Hadamard matrix of order `n` (a power of two): ±1 entries, and
/// Σ_k h_k h_kᵀ = n·I, so (1/n)·Σ_k h_kᵀHh_k is exactly Tr(H).
fn hadamard_column(n: usize, k: usize) -> Vec<f32> {
    (0..n).map(|i| if (i & k).count_ones().is_multiple_of(2) { 1.0 } else { -1.0 }).collect()
}

/// A tiny transformer: the trace of two matrices' Hessian blocks, exactly (through all n
/// Hadamard directions of each block, by the same finite differences; a basis vector would move
/// the gradient by less than f32 resolves), against Hutchinson's estimate.
#[test]
fn traces_of_a_tiny_transformer_match_the_exact_traces() {
    let float = drq_tests::tiny_model(Architecture::Llama, true, 3);
    let names = ["model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"].map(String::from);
    let ids: Vec<u32> = (0..33u32).map(|i| (i * 37 + 11) % 300).collect();
    let data = TokenBlocks::from_tokens(&ids, 32, 0).unwrap();
    assert_eq!(data.train.len(), 1, "every probe sees the same block");
    let blocks = [data.train[0].as_slice()];
    let hessian = LossHessian::new(&float, &names, 1e-3, &Device::Cpu).unwrap();
    let sizes = hessian.sizes().to_vec();
    let direction = |l: usize, k: usize| -> Vec<Vec<f32>> {
        sizes.iter().enumerate().map(|(m, &n)| if m == l { hadamard_column(n, k) } else { vec![0.0; n] }).collect()
    };
    let mut exact = vec![0f64; names.len()];
    for (l, &n) in sizes.iter().enumerate() {
        assert!(n.is_power_of_two());
        for k in 0..n {
            exact[l] += hessian.samples(&direction(l, k), &blocks).unwrap()[l] / n as f64;
        }
    }
    // The finite differences are in their accurate range: a 3x larger step agrees.
    let coarser = LossHessian::new(&float, &names, 3e-3, &Device::Cpu).unwrap();
    let v = direction(1, 7);
    let (a, b) = (hessian.samples(&v, &blocks).unwrap()[1], coarser.samples(&v, &blocks).unwrap()[1]);
    assert!((a - b).abs() <= 1e-2 * a.abs(), "h_7ᵀHh_7: {a} at ε, {b} at 3ε");

    // The operator's scale, independently: hᵀHh from the second difference of the loss itself.
    let loss_along = |delta: f32| -> f64 {
        let mut weights = model::Weights::new();
        for (name, t) in float.weights.iter() {
            let t = if name == &names[1] {
                (t + candle_core::Tensor::from_vec(v[1].iter().map(|x| x * delta).collect(), t.shape(), &Device::Cpu)
                    .unwrap())
                .unwrap()
            } else {
                t.clone()
            };
            weights.insert(name.clone(), t).unwrap();
        }
        let t = model::Transformer::new(&float.config, &weights, model::OpsMode::Inference).unwrap();
        let tokens = candle_core::Tensor::new(&blocks[0][..32], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let targets = candle_core::Tensor::new(&blocks[0][1..], &Device::Cpu).unwrap();
        let logits = t.forward(&tokens, &mut model::KvCache::new(&float.config), 0).unwrap().squeeze(0).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        f64::from(loss.to_scalar::<f32>().unwrap())
    };
    // (Smaller steps drown in the loss's f32 rounding, larger ones in its higher derivatives.)
    let delta = 0.003f32;
    let second = (loss_along(delta) - 2.0 * loss_along(0.0) + loss_along(-delta)) / f64::from(delta * delta);
    assert!((second - a).abs() <= 0.03 * a.abs(), "hᵀHh: {a} from gradients, {second} from the loss");

    let cfg = TraceConfig { min_probes: 300, max_probes: 300, batch: 1, ..TraceConfig::default() };
    let (layers, est) = model_traces(&float, &names, &data, &cfg, &Device::Cpu, |_, _| {}).unwrap();
    assert_eq!(est.probes, 300);
    for (layer, exact) in layers.iter().zip(&exact) {
        assert!(exact.abs() > 0.0);
        assert!(
            (layer.trace - exact).abs() <= 4.0 * layer.trace_se + 1e-3 * exact.abs(),
            "{}: {} ± {} vs exact {exact}",
            layer.name,
            layer.trace,
            layer.trace_se
        );
        assert!((layer.per_weight * layer.params as f64 - layer.trace).abs() <= 1e-9 * layer.trace.abs());
    }
}

/// The allocation on a tiny checkpoint: within every budget as the checkpoint counts bits, never
/// worse at a larger budget, floors and tied inputs kept, the most sensitive matrix given the
/// most bits, random allocations within budget, and profiles that survive a save.
#[test]
fn allocations_respect_budgets_floors_and_sensitivities() {
    let float = drq_tests::tiny_model(Architecture::Llama, false, 4);
    let spec = QuantSpec { granularity: "group:32".parse().unwrap(), ..QuantSpec::default() };
    let q = quantize_model(&float, &spec, &[], |_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.safetensors");
    let provenance = model::source::Provenance { source: "tiny".into(), sha256: "0".into() };
    write_checkpoint(&path, &float, &provenance, &q).unwrap();
    let mut ckpt = Checkpoint::open(&path).unwrap();
    let all = AllocationSpec::default();
    let errors = checkpoint_errors(&ckpt, &float.weights, &all.bits).unwrap();
    for (name, e) in &errors {
        assert!(e.windows(2).all(|w| w[0] >= w[1]), "{name}: errors {e:?} must fall with bits");
    }
    let meta = ckpt.quantization().clone();
    let sensitive = "model.layers.1.mlp.down_proj.weight";
    let sensitivity = |name: &str| Ok(if name == sensitive { 1e3 } else { 1.0 });
    let problem = Problem::new(&meta, &float.config, &errors, sensitivity, &all).unwrap();

    let mut previous = f64::INFINITY;
    for budget in [2.6, 3.0, 4.0, 5.5, 8.6] {
        let a = problem.allocate(budget).unwrap();
        assert!(a.exact && a.mean_bits <= budget, "budget {budget}: {} bits per weight", a.mean_bits);
        assert!(a.objective <= previous, "budget {budget}: objective {} after {previous}", a.objective);
        previous = a.objective;
        assert_eq!(a.bits[sensitive], *a.bits.values().max().unwrap(), "budget {budget}: {:?}", a.bits);
        let name = format!("hasb-{budget}");
        ckpt.add_profile(&name, a.bits.clone()).unwrap();
        let counted = ckpt.bits_per_weight(&Precision::Profile(name)).unwrap();
        assert!((counted - a.mean_bits).abs() < 1e-12, "{counted} counted, {} allocated", a.mean_bits);
        for seed in 0..3 {
            let r = problem.random(budget, seed).unwrap();
            assert!(r.mean_bits <= budget);
            assert!(r.objective >= a.objective - 1e-12, "a random allocation beat the optimum");
        }
    }
    let err = problem.allocate(2.0).unwrap_err().to_string();
    assert!(err.contains("budget 2"), "{err}");
    assert!(problem.allocate(f64::NAN).is_err());

    // Floors and tied inputs.
    let tied = AllocationSpec { floors: vec![("embed_tokens".into(), 6)], tie_inputs: true, ..all.clone() };
    let problem = Problem::new(&meta, &float.config, &errors, sensitivity, &tied).unwrap();
    let a = problem.allocate(3.5).unwrap();
    assert!(a.mean_bits <= 3.5 && a.bits["model.embed_tokens.weight"] >= 6, "{:?}", a.bits);
    for layer in 0..2 {
        let attn = |p: &str| a.bits[&format!("model.layers.{layer}.self_attn.{p}_proj.weight")];
        let mlp = |p: &str| a.bits[&format!("model.layers.{layer}.mlp.{p}_proj.weight")];
        assert!(attn("q") == attn("k") && attn("k") == attn("v"), "{:?}", a.bits);
        assert_eq!(mlp("gate"), mlp("up"));
    }
    // The plain mean of bit-widths.
    let matrices = AllocationSpec { weighting: Weighting::Matrices, ..all.clone() };
    let problem = Problem::new(&meta, &float.config, &errors, sensitivity, &matrices).unwrap();
    let a = problem.allocate(3.0).unwrap();
    let mean = a.bits.values().sum::<u32>() as f64 / a.bits.len() as f64;
    assert!((mean - a.mean_bits).abs() < 1e-12 && mean <= 3.0);
    // A floor no bit-width meets, and a missing sensitivity, are errors.
    let impossible = AllocationSpec { bits: vec![2, 3], floors: vec![("q_proj".into(), 4)], ..all.clone() };
    assert!(Problem::new(&meta, &float.config, &errors, sensitivity, &impossible).is_err());
    let missing = |name: &str| if name.contains("q_proj") { anyhow::bail!("no trace") } else { Ok(1.0) };
    assert!(Problem::new(&meta, &float.config, &errors, missing, &all).is_err());

    // The profiles are written into the file and read back.
    ckpt.save_as(&path).unwrap();
    let reopened = Checkpoint::open(&path).unwrap();
    let stored: BTreeMap<_, _> = reopened.quantization().profiles.clone();
    assert_eq!(stored.len(), 5);
    assert_eq!(stored, ckpt.quantization().profiles);
}
