//! `drq-reconstruct` as a user runs it, on a tiny model exported as a Hugging Face directory:
//! every block's output error falls at every precision, the checkpoint it writes serves what the
//! blocks were trained to, a stopped run resumes from its saved blocks to the same checkpoint,
//! and bad input is refused before any work.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use drq_tests::tiny_model;
use kernels::TieRule;
use model::checkpoint::{Checkpoint, CorrectionGranularity};
use model::{Architecture, Precision};
use quantize::blockwise::{BlockReport, HeadReport};

const BIN: &str = env!("CARGO_BIN_EXE_drq-reconstruct");

/// A tiny model directory (Qwen2: attention biases train too) and a text file in `dir`.
fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let model_dir = dir.join("tiny");
    model::export::write_hf_dir(&tiny_model(Architecture::Qwen2, true, 4), &model_dir).unwrap();
    let text: String = (0..600)
        .map(|i| {
            ["the cat sat on the mat. ", "a dog ran in the park. ", "the end of the day.\n\n", "she said: yes. "][i % 4]
        })
        .collect();
    let data = dir.join("corpus.txt");
    std::fs::write(&data, text).unwrap();
    (model_dir, data)
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("HF_HUB_OFFLINE", "1").env("RUST_LOG", "info").output().expect("runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[track_caller]
fn assert_ok(o: &Output) {
    assert!(o.status.success(), "exit {:?}\nstderr:\n{}", o.status.code(), String::from_utf8_lossy(&o.stderr));
}

const RECIPE: [&str; 16] = [
    "--samples",
    "8",
    "--seq-len",
    "24",
    "--epochs",
    "3",
    "--batch",
    "2",
    "--granularity",
    "group:32",
    "--bits",
    "8,4,2",
    "--bit-weights",
    "0,1,1",
    "--weight-lr",
    "0.2",
];

fn reports(run_dir: &Path, blocks: usize) -> Vec<BlockReport> {
    (0..blocks)
        .map(|b| {
            let text = std::fs::read_to_string(run_dir.join(format!("block-{b:03}.json"))).unwrap();
            serde_json::from_str(&text).unwrap()
        })
        .collect()
}

#[test]
fn reconstructs_every_precision_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, data) = fixture(dir.path());
    let (run_dir, out) = (dir.path().join("run"), dir.path().join("rec.safetensors"));
    let mut args = vec!["--model", s(&model_dir), "--data", s(&data), "--run-dir", s(&run_dir), "--out", s(&out)];
    args.extend(RECIPE);
    args.extend(["--corrections", "4,2"]);
    assert_ok(&run(&args));

    // Every block's objective (4 and 2 bits, each relative to its PTQ error) fell, as the
    // checkpoint serves the block; 8 bits (refitted, not trained) stay far better than 4.
    for r in reports(&run_dir, 2) {
        let objective: f64 = [4, 2].iter().map(|b| r.mse_after[b] / r.mse_before[b]).sum();
        assert!(objective < 2.0, "block {}: {:?} → {:?}", r.block, r.mse_before, r.mse_after);
        assert!(r.mse_after[&4] < r.mse_before[&4], "block {}: {:?} → {:?}", r.block, r.mse_before, r.mse_after);
        assert!(r.mse_after[&8] < 0.1 * r.mse_after[&4], "block {}: {:?}", r.block, r.mse_after);
    }
    let ckpt = Checkpoint::open(&out).unwrap();
    let q = ckpt.quantization();
    assert!(q.scale_method.contains("+blockwise:samples=8x24:epochs=3:inputs=quantized"), "{}", q.scale_method);
    assert_eq!(q.corrected_bits, [4, 2]);
    assert_eq!(ckpt.provenance().tool.split_whitespace().next(), Some("drq-reconstruct"));
    // Trained biases and norms are stored; every precision decodes.
    for p in [8, 4, 2] {
        ckpt.weights_at(&Precision::Bits(p)).unwrap();
    }

    // Stop after block 0 (remove the later block), resume: the same checkpoint.
    let first = Checkpoint::open(&out).unwrap().quantized("model.layers.1.mlp.down_proj.weight").unwrap();
    std::fs::remove_file(run_dir.join("block-001.safetensors")).unwrap();
    std::fs::remove_file(run_dir.join("block-001.json")).unwrap();
    let again = dir.path().join("again.safetensors");
    let resumed =
        ["--model", s(&model_dir), "--data", s(&data), "--run-dir", s(&run_dir), "--out", s(&again), "--resume"];
    assert_ok(&run(&resumed));
    let second = Checkpoint::open(&again).unwrap().quantized("model.layers.1.mlp.down_proj.weight").unwrap();
    assert_eq!(first, second, "a resumed run retrains the missing block identically");

    // A finished run resumed with other corrections: the same trained codes and scales, the
    // corrections fitted anew (per group here).
    let regrouped = dir.path().join("regrouped.safetensors");
    let mut a = resumed.to_vec();
    a[7] = s(&regrouped);
    a.extend(["--corrections", "4", "--correction-granularity", "group"]);
    assert_ok(&run(&a));
    let ckpt = Checkpoint::open(&regrouped).unwrap();
    assert_eq!(ckpt.quantization().corrected_bits, [4]);
    assert_eq!(ckpt.quantization().correction_granularity, CorrectionGranularity::Group);
    let third = ckpt.quantized("model.layers.1.mlp.down_proj.weight").unwrap();
    assert_eq!((&third.codes, &third.scales), (&first.codes, &first.scales));
    assert_eq!(third.correction(4).unwrap().len(), third.layout.n_scales());

    // ... and with its 8-bit codes re-rounded by GPTQ: every trained precision served as before,
    // 8 bits moved, and the checkpoint says how its codes were rounded.
    let rerounded = dir.path().join("rerounded.safetensors");
    let mut a = resumed.to_vec();
    a[7] = s(&rerounded);
    a.extend(["--gptq-8bit", "true"]);
    assert_ok(&run(&a));
    let ckpt = Checkpoint::open(&rerounded).unwrap();
    assert_eq!(ckpt.quantization().rounding, "gptq:8");
    let fourth = ckpt.quantized("model.layers.1.mlp.down_proj.weight").unwrap();
    let tie = TieRule::HalfEven;
    for b in [4, 2] {
        assert_eq!(fourth.dequantize(b, tie).unwrap(), first.dequantize(b, tie).unwrap(), "W{b} changed");
    }
    assert_ne!(fourth.codes, first.codes, "no 8-bit code moved");

    // Refusals, each before any work and leaving nothing behind.
    let other = dir.path().join("other.safetensors");
    for (extra, needle) in [
        (vec!["--resume", "--epochs", "1"], "--resume continues the saved recipe"),
        (vec!["--epochs", "0"], "epochs and batch must be at least 1"),
        (vec!["--alrs", "relative"], "`none` or `eta`"),
        (vec!["--corrections", "8"], "corrections: 8 bits"),
        (vec!["--samples", "100000"], "the recipe asks for 100000"),
        (vec!["--inputs", "sideways"], "inputs \"sideways\""),
        (vec!["--head-epochs", "1", "--head-batch", "0"], "head_batch (0) must be between 1 and samples"),
        (vec!["--device", "cuda:7"], "--device cuda:7"),
    ] {
        let mut a = vec!["--model", s(&model_dir), "--data", s(&data), "--run-dir", s(&run_dir), "--out", s(&other)];
        a.extend(extra.iter().copied());
        let o = run(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle) && !err.contains("panicked"), "{extra:?}: {err}");
        assert!(!other.exists(), "{extra:?} wrote a checkpoint");
    }
    // A run directory with blocks is not started over silently.
    let o = run(&args.iter().map(|a| if *a == s(&out) { s(&other) } else { a }).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--resume") && err.contains("--force"), "{err}");
}

/// `--head-epochs`: the tied embedding is trained in its lm_head role before the blocks; its KL
/// to the float model falls at the trained precisions as the checkpoint serves it, the run
/// directory keeps it, and a resumed run takes it from there unchanged.
#[test]
fn trains_the_lm_head_first_and_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, data) = fixture(dir.path());
    let (run_dir, out) = (dir.path().join("run"), dir.path().join("head.safetensors"));
    let mut args = vec!["--model", s(&model_dir), "--data", s(&data), "--run-dir", s(&run_dir), "--out", s(&out)];
    args.extend(RECIPE);
    args.extend(["--head-epochs", "4"]);
    assert_ok(&run(&args));

    let text = std::fs::read_to_string(run_dir.join("head.json")).unwrap();
    let head: HeadReport = serde_json::from_str(&text).unwrap();
    assert_eq!(head.weight, "model.embed_tokens.weight");
    let objective: f64 = [4, 2].iter().map(|b| head.kl_after[b] / head.kl_before[b]).sum();
    assert!(objective < 1.9, "{:?} → {:?}", head.kl_before, head.kl_after);
    assert!(head.kl_after[&4] < head.kl_before[&4], "{:?} → {:?}", head.kl_before, head.kl_after);

    // The trained embedding differs from its PTQ (a run without the stage).
    let (plain_dir, plain) = (dir.path().join("plain-run"), dir.path().join("plain.safetensors"));
    let mut a = vec!["--model", s(&model_dir), "--data", s(&data), "--run-dir", s(&plain_dir), "--out", s(&plain)];
    a.extend(RECIPE);
    assert_ok(&run(&a));
    let embed = |p: &Path| Checkpoint::open(p).unwrap().quantized("model.embed_tokens.weight").unwrap();
    let trained = embed(&out);
    assert_ne!(trained.codes, embed(&plain).codes, "the lm_head stage changed no code");

    // Resumed with the last block removed: the saved head is taken as is.
    std::fs::remove_file(run_dir.join("block-001.safetensors")).unwrap();
    std::fs::remove_file(run_dir.join("block-001.json")).unwrap();
    let again = dir.path().join("again.safetensors");
    assert_ok(&run(&[
        "--model",
        s(&model_dir),
        "--data",
        s(&data),
        "--run-dir",
        s(&run_dir),
        "--out",
        s(&again),
        "--resume",
    ]));
    assert_eq!(embed(&again), trained);
}
