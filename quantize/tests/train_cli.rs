//! `drq-train` as a user runs it, on a tiny model exported as a Hugging Face directory: a run
//! stopped and resumed writes the same checkpoint, byte for byte, as an uninterrupted one (and
//! the same losses in its log); Ctrl-C saves the state and exits 130; bad input is refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use drq_tests::tiny_model;
use model::checkpoint::Checkpoint;
use model::{Architecture, Precision};
use quantize::train::log::{read, Record};

const BIN: &str = env!("CARGO_BIN_EXE_drq-train");

/// A tiny model directory and a text file in `dir`.
fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let model_dir = dir.join("tiny");
    model::export::write_hf_dir(&tiny_model(Architecture::Llama, true, 3), &model_dir).unwrap();
    let text: String = (0..400)
        .map(|i| {
            ["the cat sat on the mat. ", "a dog ran in the park. ", "the end of the day.\n\n", "she said: yes. "][i % 4]
        })
        .collect();
    let data = dir.join("corpus.txt");
    std::fs::write(&data, text).unwrap();
    (model_dir, data)
}

fn drq_train(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("HF_HUB_OFFLINE", "1").env("RUST_LOG", "info").output().expect("runs drq-train")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const RECIPE: [&str; 16] = [
    "--steps",
    "6",
    "--batch",
    "2",
    "--seq-len",
    "12",
    "--heldout-blocks",
    "2",
    "--eval-every",
    "2",
    "--save-every",
    "2",
    "--lr",
    "1e-3",
    "--train",
    "all",
];

#[track_caller]
fn assert_ok(o: &Output) {
    assert!(o.status.success(), "exit {:?}\nstderr:\n{}", o.status.code(), String::from_utf8_lossy(&o.stderr));
}

/// The losses of every step record of a log, and the steps of its evaluations.
fn log_summary(path: &Path) -> (Vec<String>, Vec<u64>) {
    let records = read(path).unwrap();
    let losses = records
        .iter()
        .filter_map(|r| match r {
            Record::Step { step, loss, scale_lr, .. } => Some(format!("{step} {loss:?} {scale_lr:?}")),
            _ => None,
        })
        .collect();
    let evals = records.iter().filter(|&r| matches!(r, Record::Eval { .. })).map(Record::step).collect();
    (losses, evals)
}

/// Same tensors (names, dtypes, shapes, bytes) and the same metadata. (Whole files are not
/// compared: the safetensors header serializes its metadata map in hash order, which differs
/// between processes.)
#[track_caller]
fn assert_same_checkpoint(a: &Path, b: &Path) {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let (ta, tb) =
        (safetensors::SafeTensors::deserialize(&a).unwrap(), safetensors::SafeTensors::deserialize(&b).unwrap());
    let (mut na, mut nb) = (ta.names(), tb.names());
    na.sort();
    nb.sort();
    assert_eq!(na, nb);
    for name in na {
        let (x, y) = (ta.tensor(name).unwrap(), tb.tensor(name).unwrap());
        assert_eq!((x.dtype(), x.shape()), (y.dtype(), y.shape()), "{name}");
        assert!(x.data() == y.data(), "tensor {name} differs");
    }
    let meta = |bytes: &[u8]| safetensors::SafeTensors::read_metadata(bytes).unwrap().1.metadata().clone();
    assert_eq!(meta(&a), meta(&b));
}

#[test]
fn a_stopped_and_resumed_run_writes_the_same_checkpoint_as_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, data) = fixture(dir.path());
    let (run_a, out_a) = (dir.path().join("a"), dir.path().join("a.safetensors"));
    // A per-layer profile stored in the output (given again on resume: it is not part of the recipe).
    let profile = dir.path().join("mix.toml");
    std::fs::write(&profile, "name = \"mix\"\ndefault = 2\n[[rule]]\nmatch = \"embed_tokens\"\nbits = 8\n").unwrap();
    let mut args = vec![
        "--model",
        s(&model_dir),
        "--data",
        s(&data),
        "--run-dir",
        s(&run_a),
        "--out",
        s(&out_a),
        "--alrs",
        "relative",
        "--profile",
        s(&profile),
    ];
    args.extend(RECIPE);
    assert_ok(&drq_train(&args));

    let (run_b, out_b) = (dir.path().join("b"), dir.path().join("b.safetensors"));
    let mut args = vec![
        "--model",
        s(&model_dir),
        "--data",
        s(&data),
        "--run-dir",
        s(&run_b),
        "--out",
        s(&out_b),
        "--alrs",
        "relative",
    ];
    args.extend(RECIPE);
    args.extend(["--stop-at-step", "3"]);
    let o = drq_train(&args);
    assert_ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("stopped at step 3/6"));
    assert!(!out_b.exists(), "no checkpoint before the run completes");
    assert!(run_b.join("state.safetensors").is_file());
    // Recipe flags cannot change a resumed run.
    let o = drq_train(&[
        "--model",
        s(&model_dir),
        "--data",
        s(&data),
        "--run-dir",
        s(&run_b),
        "--out",
        s(&out_b),
        "--resume",
        "--lr",
        "1",
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--resume continues the saved recipe"));
    let o = drq_train(&[
        "--model",
        s(&model_dir),
        "--data",
        s(&data),
        "--run-dir",
        s(&run_b),
        "--out",
        s(&out_b),
        "--resume",
        "--profile",
        s(&profile),
    ]);
    assert_ok(&o);

    assert_same_checkpoint(&out_a, &out_b);
    let (losses_a, evals_a) = log_summary(&run_a.join("log.jsonl"));
    let (losses_b, evals_b) = log_summary(&run_b.join("log.jsonl"));
    assert_eq!(losses_a.len(), 6);
    assert_eq!(losses_a, losses_b);
    assert_eq!(evals_a, vec![0, 2, 4, 6]);
    assert_eq!(evals_b, evals_a);
    for run in [&run_a, &run_b] {
        let svg = std::fs::read_to_string(run.join("plot.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("held-out perplexity") && svg.contains("W2"));
        assert!(std::fs::read_to_string(run.join("recipe.toml")).unwrap().contains("alrs = \"relative\""));
    }
    // The output is a checkpoint like any other, served at every precision of its set.
    let ckpt = Checkpoint::open(&out_a).unwrap();
    assert_eq!(ckpt.quantization().bits, vec![8, 4, 2]);
    assert!(ckpt.provenance().tool.starts_with("drq-train"));
    for b in [8, 4, 2] {
        ckpt.weights_at(&Precision::Bits(b)).unwrap();
    }
    let mix = &ckpt.quantization().profiles["mix"];
    assert_eq!(mix.len(), ckpt.quantization().quantized.len());
    assert_eq!(mix["model.embed_tokens.weight"], 8);
    assert_eq!(mix.values().filter(|&&b| b == 2).count(), mix.len() - 1);
    ckpt.weights_at(&Precision::Profile("mix".into())).unwrap();
    // A finished run cannot be resumed; a run directory with a state is not silently reused.
    let o = drq_train(&[
        "--model",
        s(&model_dir),
        "--data",
        s(&data),
        "--run-dir",
        s(&run_a),
        "--out",
        s(&dir.path().join("c.safetensors")),
        "--resume",
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("complete"));
    let o = drq_train(&[
        "--model",
        s(&model_dir),
        "--data",
        s(&data),
        "--run-dir",
        s(&run_a),
        "--out",
        s(&dir.path().join("c.safetensors")),
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--resume"));
}

#[test]
fn ctrl_c_saves_the_state_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, data) = fixture(dir.path());
    let run = dir.path().join("run");
    let out = dir.path().join("out.safetensors");
    let child = Command::new(BIN)
        .args(["--model", s(&model_dir), "--data", s(&data), "--run-dir", s(&run), "--out", s(&out)])
        .args([
            "--steps",
            "100000",
            "--batch",
            "2",
            "--seq-len",
            "12",
            "--heldout-blocks",
            "2",
            "--save-every",
            "0",
            "--eval-every",
            "0",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a few steps in the log, then interrupt.
    let log = run.join("log.jsonl");
    let start = Instant::now();
    while read(&log).map(|r| r.iter().filter(|r| matches!(r, Record::Step { .. })).count()).unwrap_or(0) < 3 {
        assert!(start.elapsed() < Duration::from_secs(120), "no training steps logged");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "stderr:\n{stderr}");
    assert!(stderr.contains("interrupted at step"), "{stderr}");
    assert!(!out.exists());
    let state = quantize::train::Trainer::state_config(&run.join("state.safetensors")).unwrap();
    assert_eq!(state.steps, 100000);
    let last = read(&log).unwrap().iter().map(Record::step).max().unwrap();
    assert!(
        stderr.contains(&format!("interrupted at step {last}/")),
        "the state is at the log's last step {last}: {stderr}"
    );
}

#[test]
fn bad_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, data) = fixture(dir.path());
    let run = dir.path().join("run");
    let wiki = dir.path().join("wikitext-2-raw");
    std::fs::create_dir(&wiki).unwrap();
    std::fs::write(wiki.join("wiki.train.txt"), "text").unwrap();
    let out = dir.path().join("o.safetensors");
    let bad_profile = dir.path().join("bad.toml");
    std::fs::write(&bad_profile, "name = \"w9\"\ndefault = 9\n").unwrap();
    for (extra, needle) in [
        (vec!["--data", s(&data), "--profile", s(&bad_profile)], "invalid profile"),
        (vec!["--data", s(&wiki)], "WikiText"),
        (vec!["--data", s(&data), "--alrs", "paper"], "paper"),
        (vec!["--data", s(&data), "--loop", "summed"], "alrs"),
        (vec!["--data", s(&data), "--resume"], "no training state"),
        (vec!["--data", s(&data), "--bits", "9"], "9"),
        (vec!["--data", s(&data), "--seq-len", "100000"], "blocks"),
        (vec!["--data", s(&data), "--device", "tpu"], "expected `cpu`, `cuda` or `cuda:N`"),
        // No GPU where the tests run, whether or not the binary was built with `cuda`.
        (vec!["--data", s(&data), "--device", "cuda"], "--device cuda: "),
    ] {
        let mut args = vec!["--model", s(&model_dir), "--run-dir", s(&run), "--out", s(&out)];
        args.extend(extra.iter().copied());
        let o = drq_train(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.code().is_some_and(|c| c != 0 && c != 101), "{extra:?}: exit {:?}\n{stderr}", o.status.code());
        assert!(stderr.contains(needle), "{extra:?}: stderr does not mention {needle:?}:\n{stderr}");
        assert!(!out.exists());
    }
    let help = drq_train(&["--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in ["--resume", "--alrs", "--kd-weight", "--train", "--stop-at-step", "--loop", "--device", "--profile"] {
        assert!(text.contains(flag), "--help lacks {flag}");
    }
}

/// `--init` continues from a checkpoint of the same model (here a finished run's): the new
/// checkpoint records where it started; a checkpoint of another model, or `--init` with
/// `--resume`, is refused before any training.
#[test]
fn a_run_starts_from_a_checkpoint_with_init() {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, data) = fixture(dir.path());
    let first = dir.path().join("first.safetensors");
    let run1 = dir.path().join("run1");
    let mut args = vec!["--model", s(&model_dir), "--data", s(&data), "--run-dir", s(&run1), "--out", s(&first)];
    args.extend(RECIPE);
    assert_ok(&drq_train(&args));

    let second = dir.path().join("second.safetensors");
    let run2 = dir.path().join("run2");
    let short = ["--steps", "2", "--batch", "2", "--seq-len", "12", "--heldout-blocks", "2", "--train", "scales"];
    let mut cont = vec!["--model", s(&model_dir), "--data", s(&data), "--run-dir", s(&run2), "--out", s(&second)];
    cont.extend(["--init", s(&first)]);
    cont.extend(short);
    assert_ok(&drq_train(&cont));
    let start = Checkpoint::open(&first).unwrap().quantization().scale_method.clone();
    let method = Checkpoint::open(&second).unwrap().quantization().scale_method.clone();
    assert!(method.starts_with(&format!("{start}+train:scales")), "{method}");

    let other_dir = dir.path().join("other");
    model::export::write_hf_dir(&tiny_model(Architecture::Llama, true, 4), &other_dir).unwrap();
    let third = dir.path().join("third.safetensors");
    for (model, extra, needle) in [
        (s(&other_dir), vec![], "was made from another model"),
        (s(&model_dir), vec!["--resume"], "--resume"),
        (s(&model_dir), vec!["--init", s(&third)], "--init"),
    ] {
        let run3 = dir.path().join("run3");
        let mut a = vec!["--model", model, "--data", s(&data), "--run-dir", s(&run3), "--out", s(&third)];
        if extra.first() != Some(&"--init") {
            a.extend(["--init", s(&first)]);
        }
        a.extend(extra.iter().copied());
        a.extend(short);
        let o = drq_train(&a);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains(needle) && !stderr.contains("panicked"), "{needle}: {stderr}");
        assert!(!third.exists());
    }
}
