//! `drq-eval perplexity` as a user runs it: bad input of every kind is refused with a non-zero
//! exit and a message naming the problem; a checkpoint evaluated against its float reference
//! gives sane numbers.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_drq-eval");

fn drq_eval<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(BIN)
        .arg("perplexity")
        .args(args)
        // Never reach the network from a test.
        .env("HF_HUB_OFFLINE", "1")
        .env("RUST_LOG", "info")
        .output()
        .expect("runs drq-eval")
}

fn gguf() -> PathBuf {
    drq_tests::smollm2_gguf()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// The first (at most) 5000 bytes of WikiText-2's test split, cut at a character boundary,
/// written to `dir/wiki.txt`.
fn small_text(dir: &Path) -> PathBuf {
    let path = drq_tests::shared_dir().join("data/wikitext-2-raw/wiki.test.raw");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut end = 5000.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let out = dir.join("wiki.txt");
    std::fs::write(&out, &text[..end]).unwrap();
    out
}

/// A run that must fail cleanly: non-zero exit (not a panic), every needle on stderr.
#[track_caller]
fn assert_refused(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let code = output.status.code();
    assert!(code.is_some_and(|c| c != 0 && c != 101), "exit {code:?} (expected a clean failure); stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "panicked:\n{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "stderr does not mention {needle:?}:\n{stderr}");
    }
}

#[test]
fn rejects_bad_runtime_options() {
    let dir = tempfile::tempdir().unwrap();
    let text = small_text(dir.path());
    for (args, needle) in [
        (&["--runtime", "reference", "--activations", "int8"][..], "--activations int8 needs --runtime kernels"),
        (&["--runtime", "reference", "--threads", "2"][..], "--threads applies to --runtime kernels only"),
        (&["--threads", "0"][..], "--threads must be at least 1"),
        (&["--runtime", "gpu"][..], "invalid value 'gpu'"),
        (&["--activations", "int4"][..], "invalid value 'int4'"),
        (&["--device", "tpu"][..], "expected `cpu`, `cuda` or `cuda:N`"),
        // No GPU where the tests run, whether or not the binary was built with `cuda`.
        (&["--runtime", "reference", "--device", "cuda"][..], "--device cuda: "),
        (&["--device", "cuda", "--activations", "int8"][..], "the GPU kernels take f32 activations"),
        (&["--device", "cuda", "--threads", "2"][..], "--threads applies to the CPU kernels"),
        (
            &["--plot", "/nonexistent-dir/p.svg"][..],
            "--plot /nonexistent-dir/p.svg: directory /nonexistent-dir does not exist",
        ),
    ] {
        let output = drq_eval(
            ["--model", s(&gguf()), "--file", s(&text), "--precision", "8"].iter().copied().chain(args.iter().copied()),
        );
        assert_refused(&output, &[needle]);
    }
    // The GPU kernels without a driver: a clear error once the model is loaded.
    if !kernels::cuda::driver_available() {
        let output = drq_eval(["--model", s(&gguf()), "--file", s(&text), "--precision", "8", "--device", "cuda"]);
        assert_refused(&output, &["no NVIDIA driver"]);
    }
}

#[test]
fn rejects_bad_precisions() {
    let dir = tempfile::tempdir().unwrap();
    let text = small_text(dir.path());
    let json = dir.path().join("out.json");
    let usage = "use `fp`, a bit-width from 2 to 8, or a profile name";
    for (precision, needles) in [
        ("9", ["precision `9` is invalid", usage]),
        ("1", ["precision `1` is invalid", usage]),
        ("fp,8,9", ["precision `9` is invalid", usage]),
        ("0", ["precision `0` is invalid", usage]),
        ("8,,4", ["precision `` is invalid", usage]),
        // A name reads as a per-layer profile, which this model does not have.
        ("four", ["profile `four` is not in this checkpoint", "it has: none"]),
    ] {
        let output =
            drq_eval(["--model", s(&gguf()), "--file", s(&text), "--precision", precision, "--json", s(&json)]);
        assert_refused(&output, &needles);
        assert!(!json.exists());
    }
}

#[test]
fn rejects_unreadable_text_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-text.txt");
    let output = drq_eval(["--model", s(&gguf()), "--file", s(&missing), "--precision", "fp"]);
    assert_refused(&output, &["cannot read text file", s(&missing)]);

    let a_dir = dir.path().join("texts");
    std::fs::create_dir(&a_dir).unwrap();
    let output = drq_eval(["--model", s(&gguf()), "--file", s(&a_dir), "--precision", "fp"]);
    assert_refused(&output, &["cannot read text file", s(&a_dir)]);

    // Latin-1 text (é as one byte 0xE9) is not UTF-8.
    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait, cr\xe8me br\xfbl\xe9e").unwrap();
    let output = drq_eval(["--model", s(&gguf()), "--file", s(&latin1), "--precision", "fp"]);
    assert_refused(&output, &["is not UTF-8 text", s(&latin1)]);
}

/// The text or the window options do not give one window to score. Most cases load the real
/// float model first (a second or two each).
#[test]
fn rejects_bad_windows() {
    let dir = tempfile::tempdir().unwrap();
    let text = small_text(dir.path());
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "The quick brown fox jumps over the lazy dog.").unwrap();
    let output = drq_eval(["--model", s(&gguf()), "--file", s(&short), "--precision", "fp", "--ctx", "512"]);
    assert_refused(&output, &["fewer than one window of 512"]);

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let output = drq_eval(["--model", s(&gguf()), "--file", s(&empty), "--precision", "fp", "--ctx", "64"]);
    assert_refused(&output, &["fewer than one window of 64"]);

    let output = drq_eval(["--model", s(&gguf()), "--file", s(&text), "--precision", "fp", "--limit-tokens", "0"]);
    assert_refused(&output, &["the text has 0 tokens"]);

    for ctx in ["0", "1"] {
        let output = drq_eval(["--model", s(&gguf()), "--file", s(&text), "--precision", "fp", "--ctx", ctx]);
        assert_refused(&output, &["context length must be at least 2 tokens"]);
    }

    // Zero windows would "succeed" with a NaN perplexity.
    let json = dir.path().join("out.json");
    let output = drq_eval([
        "--model",
        s(&gguf()),
        "--file",
        s(&text),
        "--precision",
        "fp",
        "--max-windows",
        "0",
        "--json",
        s(&json),
    ]);
    assert_refused(&output, &["--max-windows must be at least 1"]);
    assert!(!json.exists());

    // An explicit stride of 0 is refused, not silently replaced.
    for (stride, ctx) in [("0", "64"), ("65", "64")] {
        let output = drq_eval([
            "--model",
            s(&gguf()),
            "--file",
            s(&text),
            "--precision",
            "fp",
            "--protocol",
            "strided",
            "--stride",
            stride,
            "--ctx",
            ctx,
        ]);
        assert_refused(&output, &["stride must be between 1 and the context length"]);
    }

    // A window longer than the model's context (8192 for SmolLM2).
    let wiki = drq_tests::shared_dir().join("data/wikitext-2-raw/wiki.test.raw");
    let output = drq_eval([
        "--model",
        s(&gguf()),
        "--file",
        s(&wiki),
        "--precision",
        "fp",
        "--ctx",
        "9000",
        "--limit-tokens",
        "9500",
        "--max-windows",
        "1",
    ]);
    assert_refused(&output, &["exceeds the model's context of 8192"]);
}

/// One checkpoint of the real model (quantized in this process, as drq-quantize does), then:
/// `fp` without a float model, a damaged checkpoint, and a successful evaluation.
#[test]
fn evaluates_a_checkpoint_against_its_reference() {
    let dir = tempfile::tempdir().unwrap();
    let text = small_text(dir.path());
    let ckpt = dir.path().join("smollm2-channel.safetensors");
    {
        let (float, provenance) = model::source::load_float(&model::ModelSource::Gguf(gguf())).unwrap();
        let q = quantize::quantize_model(&float, &quantize::QuantSpec::default(), &[], |_| {}).unwrap();
        quantize::write_checkpoint(&ckpt, &float, &provenance, &q).unwrap();
    }

    // `fp` needs a float model; a checkpoint has none.
    let output = drq_eval(["--model", s(&ckpt), "--file", s(&text), "--precision", "fp,8", "--ctx", "64"]);
    assert_refused(&output, &["`fp` needs a float model", "--reference"]);

    // A checkpoint cut short is refused on open, naming the file.
    let bytes = std::fs::read(&ckpt).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    drop(bytes);
    let output = drq_eval(["--model", s(&cut), "--file", s(&text), "--precision", "8", "--ctx", "64"]);
    assert_refused(&output, &["invalid checkpoint", s(&cut), "not a complete safetensors file"]);

    // The real thing: fp and 8 bits over two windows of 64 tokens.
    let json = dir.path().join("out.json");
    let output = drq_eval([
        "--model",
        s(&ckpt),
        "--reference",
        s(&gguf()),
        "--file",
        s(&text),
        "--precision",
        "fp,8",
        "--ctx",
        "64",
        "--max-windows",
        "2",
        "--json",
        s(&json),
        "--plot",
        s(&dir.path().join("ppl.svg")),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(!dir.path().join("out.json.tmp").exists());
    // The plot: the checkpoint's one point, the float model as the reference line.
    let svg = std::fs::read_to_string(dir.path().join("ppl.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for needle in ["bits per weight", "smollm2-channel", "fp ", "<circle"] {
        assert!(svg.contains(needle), "the plot lacks {needle:?}");
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["windows"], 2);
    assert_eq!(report["ctx"], 64);
    assert_eq!(report["protocol"], "llama");
    let results = report["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{report:#}");
    let labels: Vec<&str> = results.iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["fp", "8"]);
    for r in results {
        let label = r["label"].as_str().unwrap();
        let ppl = r["perplexity"].as_f64().expect("a number");
        assert!(ppl.is_finite() && ppl > 1.0, "{label}: perplexity {ppl}");
        // llama.cpp protocol: the second half of each 64-token window, less the last position.
        assert_eq!(r["tokens_scored"], 2 * (64 - 1 - 32), "{label}");
        let kl = r["mean_kl"].as_f64().expect("KL against the reference");
        let top1 = r["top1_agreement"].as_f64().expect("top-1 agreement against the reference");
        assert!(kl.is_finite() && kl >= 0.0, "{label}: KL {kl}");
        assert!((0.0..=1.0).contains(&top1), "{label}: top-1 {top1}");
    }
    // The float model is not a stored precision: no bits per weight.
    assert!(results[0]["bits_per_weight"].is_null(), "{report:#}");
    // The reference against itself: no divergence, full agreement.
    assert_eq!(results[0]["mean_kl"].as_f64().unwrap(), 0.0);
    assert_eq!(results[0]["top1_agreement"].as_f64().unwrap(), 1.0);
    // 8 bits is close to the float model, but not the float model.
    let (ppl_fp, ppl_8) = (results[0]["perplexity"].as_f64().unwrap(), results[1]["perplexity"].as_f64().unwrap());
    assert!((ppl_8 / ppl_fp - 1.0).abs() < 0.05, "fp {ppl_fp} vs W8 {ppl_8}");
    assert!(results[1]["mean_kl"].as_f64().unwrap() < 0.05, "{report:#}");
    assert!(results[1]["top1_agreement"].as_f64().unwrap() > 0.8, "{report:#}");
    let checkpoints = report["checkpoints"].as_array().unwrap();
    assert_eq!(checkpoints.len(), 1);
    assert_eq!(checkpoints[0]["quantization"]["granularity"], "channel");
    // Checkpoint precisions ran through the kernels, with a timed thread count.
    let runtime = &report["runtime"];
    assert_eq!(runtime["runtime"], "kernels", "{report:#}");
    assert_eq!(runtime["activations"], "auto");
    assert!(matches!(runtime["threads"].as_u64(), Some(1 | 2)), "{report:#}");
    assert!(runtime["threads_timing_seconds"].is_object() || runtime["threads"] == 1, "{report:#}");
    assert!(results.iter().all(|r| r["seconds"].as_f64().is_some_and(|t| t > 0.0)), "{report:#}");

    // The reference path gives the kernels' 8-bit perplexity with f32 activations; the default
    // (int8 activations per 16 columns at 8 bits) and int8 per group close ones.
    let run = |precision: &str, extra: &[&str]| -> serde_json::Value {
        let json = dir.path().join("run.json");
        let args = [
            "--model",
            s(&ckpt),
            "--file",
            s(&text),
            "--precision",
            precision,
            "--ctx",
            "64",
            "--max-windows",
            "2",
            "--json",
            s(&json),
        ];
        let output = drq_eval(args.iter().chain(extra));
        assert_eq!(output.status.code(), Some(0), "stderr:\n{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
    };
    let reference = run("8", &["--runtime", "reference"]);
    assert_eq!(reference["runtime"]["runtime"], "reference");
    let ppl_ref = reference["results"][0]["perplexity"].as_f64().unwrap();
    let ppl_f32 = run("8", &["--activations", "f32"])["results"][0]["perplexity"].as_f64().unwrap();
    assert!((ppl_f32 / ppl_ref - 1.0).abs() < 1e-4, "kernels, f32 activations {ppl_f32} vs reference {ppl_ref}");
    assert!((ppl_8 / ppl_ref - 1.0).abs() < 0.05, "kernels, default activations {ppl_8} vs reference {ppl_ref}");
    // A profile given on the command line is evaluated by its name: 8 bits everywhere is W8.
    let all8 = dir.path().join("all8.toml");
    std::fs::write(&all8, "name = \"all8\"\ndefault = 8\n").unwrap();
    let profiled = run("all8,8", &["--profile", s(&all8)]);
    let labels: Vec<&str> =
        profiled["results"].as_array().unwrap().iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["all8", "8"]);
    assert_eq!(profiled["results"][0]["perplexity"], profiled["results"][1]["perplexity"], "{profiled:#}");
    // Bits per weight as stored: per-channel f16 scales add 16 bits per 576- or 1536-wide row.
    let bits = profiled["results"][1]["bits_per_weight"].as_f64().unwrap();
    assert!(bits > 8.0 + 16.0 / 1536.0 && bits < 8.0 + 16.0 / 576.0, "{bits}");
    assert_eq!(profiled["results"][0]["bits_per_weight"], profiled["results"][1]["bits_per_weight"]);
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"w9\"\ndefault = 9\n").unwrap();
    let output = drq_eval(["--model", s(&ckpt), "--file", s(&text), "--precision", "w9", "--profile", s(&bad)]);
    assert_refused(&output, &["invalid profile", s(&bad)]);
    let int8 = run("8", &["--activations", "int8", "--threads", "1"]);
    assert_eq!(int8["runtime"]["activations"], "int8");
    assert_eq!(int8["runtime"]["threads"], 1);
    let ppl_int8 = int8["results"][0]["perplexity"].as_f64().unwrap();
    assert!((ppl_int8 / ppl_ref - 1.0).abs() < 0.1, "int8 activations {ppl_int8} vs reference {ppl_ref}");
}
