//! `drq-quantize` as a user runs it: one real quantization of SmolLM2-135M, and bad input of
//! every kind, each refused with a non-zero exit, a message on stderr naming the problem, and no
//! output file (or temporary) left behind.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use model::checkpoint::{Checkpoint, WideRows, WideRowsSpec};
use model::Weights;

const BIN: &str = env!("CARGO_BIN_EXE_drq-quantize");

fn drq_quantize<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(BIN)
        .args(args)
        // Never reach the network from a test.
        .env("HF_HUB_OFFLINE", "1")
        .env("RUST_LOG", "info")
        .output()
        .expect("runs drq-quantize")
}

fn gguf() -> PathBuf {
    drq_tests::smollm2_gguf()
}

fn profile(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../configs/profiles/{name}.toml"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Files in `dir` whose name ends in `.tmp`.
fn tmp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect()
}

/// A run that must fail cleanly: non-zero exit (not a panic), every needle on stderr, `out`
/// not created, no `.tmp` in `dir`.
#[track_caller]
fn assert_refused(output: &Output, needles: &[&str], dir: &Path, out: &Path) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let code = output.status.code();
    assert!(code.is_some_and(|c| c != 0 && c != 101), "exit {code:?} (expected a clean failure); stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "panicked:\n{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "stderr does not mention {needle:?}:\n{stderr}");
    }
    assert!(!out.exists(), "{} was created", out.display());
    assert!(tmp_files(dir).is_empty(), "left {:?}", tmp_files(dir));
}

/// The one real-model run of this file: SmolLM2 at group:128 for bits 8,4,2.
#[test]
fn quantizes_the_real_model_with_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-g128.safetensors");
    let report = dir.path().join("report.json");
    let output = drq_quantize([
        "--model",
        s(&gguf()),
        "--bits",
        "8,4,2",
        "--granularity",
        "group:128",
        "--out",
        s(&out),
        "--report",
        s(&report),
        "--profile",
        s(&profile("w4-embed8")),
        "--profile",
        s(&profile("w3-attn4")),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(tmp_files(dir.path()).is_empty(), "left {:?}", tmp_files(dir.path()));

    // The checkpoint.
    let ckpt = Checkpoint::open(&out).unwrap_or_else(|e| panic!("{e:#}"));
    let config = ckpt.config();
    assert_eq!(config.num_hidden_layers, 30);
    assert!(config.tie_word_embeddings);
    let q = ckpt.quantization();
    assert_eq!(q.bits, [8, 4, 2]);
    assert_eq!(q.granularity, "group:128");
    assert_eq!(q.tie_rule, "even");
    // Without --config: every tool's default recipe (the max-negative grid).
    assert_eq!(q.scale_method, "search:normalized:max-negative");
    assert_eq!(q.quantized.len(), 30 * 7 + 1, "every block linear and the tied embedding");
    assert!(q.quantized.iter().any(|n| n == "model.embed_tokens.weight"));
    // The tied embedding's first 4,096 rows one bit wider: counted in bits per weight.
    let want = WideRows { weight: "model.embed_tokens.weight".into(), rows: 4096, extra_bits: 1 };
    assert_eq!(q.wide_rows, Some(want));
    let mut narrow = Checkpoint::open(&out).unwrap();
    narrow.widen_rows(&WideRowsSpec::None).unwrap();
    let added = ckpt.bits_per_weight(&model::Precision::Bits(4)).unwrap()
        - narrow.bits_per_weight(&model::Precision::Bits(4)).unwrap();
    assert!((0.016..0.018).contains(&added), "{added}");
    let p = ckpt.provenance();
    assert_eq!(p.source, gguf().display().to_string());
    assert_eq!(p.source_sha256, model::source::sha256_files(&[gguf()]).unwrap());
    assert_eq!(p.tool, format!("drq-quantize {}", env!("CARGO_PKG_VERSION")));
    let tokenizer = ckpt.tokenizer().unwrap();
    assert_eq!(tokenizer.get_vocab_size(true), config.vocab_size);
    // The shipped profiles, resolved per weight.
    let w4e8 = &q.profiles["w4-embed8"];
    assert_eq!(w4e8["model.embed_tokens.weight"], 8);
    assert_eq!(w4e8["model.layers.3.mlp.up_proj.weight"], 4);
    assert_eq!(q.profiles["w3-attn4"]["model.layers.3.self_attn.k_proj.weight"], 4);
    assert!(stderr.contains("rule `lm_head` matches no quantized weight"), "the tied model has no lm_head: {stderr}");
    // The 2-bit decode works and has the model's shapes.
    ckpt.weights_at(&model::Precision::Bits(2)).unwrap().validate(config).unwrap();

    // The report: one entry per quantized weight, with its shape, errors falling with bits.
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let entries = json.as_array().expect("the report is a JSON array");
    assert_eq!(entries.len(), 211);
    let shapes: std::collections::HashMap<String, Vec<usize>> = Weights::expected_shapes(config).into_iter().collect();
    let mut names: Vec<String> = Vec::new();
    for e in entries {
        let name = e["name"].as_str().unwrap().to_string();
        let shape = &shapes[&name];
        assert_eq!([e["rows"].as_u64().unwrap() as usize, e["cols"].as_u64().unwrap() as usize], shape[..], "{name}");
        let errs: Vec<(u64, f64)> = e["relative_error"]
            .as_array()
            .unwrap()
            .iter()
            .map(|pair| (pair[0].as_u64().unwrap(), pair[1].as_f64().unwrap()))
            .collect();
        assert_eq!(errs.iter().map(|(b, _)| *b).collect::<Vec<_>>(), [8, 4, 2], "{name}");
        let (e8, e4, e2) = (errs[0].1, errs[1].1, errs[2].1);
        assert!(e8.is_finite() && e8 > 0.0 && e8 < 1e-3, "{name}: W8 error {e8}");
        assert!(e8 < e4 && e4 < e2 && e2 < 1.0, "{name}: errors do not fall with bits: {errs:?}");
        assert!(stdout.contains(&name), "the printed report lists {name}");
        names.push(name);
    }
    names.sort();
    assert_eq!(names, q.quantized, "the report covers exactly the quantized weights");
    assert!(stdout.contains("mean (weighted by size)"), "{stdout}");
}

#[test]
fn rejects_bad_profiles() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\ndefault = 12\n").unwrap();
    let output = drq_quantize(["--model", s(&gguf()), "--profile", s(&bad), "--out", s(&out)]);
    assert_refused(&output, &["invalid profile", "bad.toml", "12"], dir.path(), &out);
    let output = drq_quantize(["--model", s(&gguf()), "--profile", "/nonexistent.toml", "--out", s(&out)]);
    assert_refused(&output, &["cannot read profile /nonexistent.toml"], dir.path(), &out);
}

#[test]
fn rejects_bad_bit_widths() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    for (bits, needle) in [
        ("9", "bit-width 9 is outside 2..=8"),
        ("1", "bit-width 1 is outside 2..=8"),
        ("0", "bit-width 0 is outside 2..=8"),
        ("8,4,9", "bit-width 9"),
        ("8,4,4", "bit-width 4 listed twice"),
        ("x", "invalid value 'x' for '--bits"),
        ("8,-4", "invalid value '-4' for '--bits"),
    ] {
        let output = drq_quantize(["--model", s(&gguf()), "--bits", bits, "--out", s(&out)]);
        assert_refused(&output, &[needle], dir.path(), &out);
    }
}

#[test]
fn rejects_bad_granularity_tie_and_objective() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    for (flag, value, needle) in [
        ("--granularity", "group:0", "unknown granularity \"group:0\""),
        ("--granularity", "rows", "unknown granularity \"rows\""),
        ("--granularity", "group:", "unknown granularity \"group:\""),
        ("--granularity", "group:-8", "group:-8"),
        ("--granularity-override", "embed_tokens", "expected NAME=GRANULARITY"),
        ("--granularity-override", "=group:32", "expected NAME=GRANULARITY"),
        ("--granularity-override", "embed_tokens=rows", "unknown granularity \"rows\""),
        ("--tie", "sideways", "unknown tie rule \"sideways\""),
        ("--objective", "best", "search objective \"best\""),
        ("--wide-rows", "4096", "expected ROWS:+BITS"),
        ("--wide-rows", "4096:+7", "7 extra bits (1..=6)"),
    ] {
        let output = drq_quantize(["--model", s(&gguf()), flag, value, "--out", s(&out)]);
        assert_refused(&output, &[needle, flag], dir.path(), &out);
    }
}

#[test]
fn rejects_bad_corrections() {
    let dir = tempfile::tempdir().unwrap();
    let (out, model) = (dir.path().join("x.safetensors"), gguf());
    for (args, needle) in [
        (&["--corrections", "8"][..], "the stored 8-bit codes need none"),
        (&["--corrections", "1"], "bit-width 1 is outside 2..=8"),
        (&["--corrections", "4", "--correction-granularity", "column"], "unknown correction granularity \"column\""),
        (&["--correction-granularity", "group"], "--correction-granularity without --corrections"),
    ] {
        let mut argv = vec!["--model", s(&model), "--out", s(&out)];
        argv.extend_from_slice(args);
        let output = drq_quantize(argv);
        assert_refused(&output, &[needle], dir.path(), &out);
    }
    let recipe = dir.path().join("recipe.toml");
    std::fs::write(&recipe, "corrections = [4]\ncorrection_granularity = \"cols\"").unwrap();
    let output = drq_quantize(["--model", s(&gguf()), "--config", s(&recipe), "--out", s(&out)]);
    assert_refused(&output, &["correction_granularity", "cols"], dir.path(), &out);
}

#[test]
fn rejects_bad_recipes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let missing = dir.path().join("nope.toml");
    let output = drq_quantize(["--model", s(&gguf()), "--config", s(&missing), "--out", s(&out)]);
    assert_refused(&output, &["cannot read recipe", s(&missing)], dir.path(), &out);

    for (i, (text, needle)) in [
        ("bitz = [8]", "bitz"),
        ("bits = [8, 9]", "bit-width 9"),
        ("granularity = \"rows\"", "rows"),
        ("granularity_overrides = { embed_tokens = \"group:0\" }", "granularity_overrides"),
        ("tie = \"sideways\"", "sideways"),
        ("bits = \"8,4\"", "invalid recipe"),
        ("not toml at all [", "invalid recipe"),
    ]
    .into_iter()
    .enumerate()
    {
        let recipe = dir.path().join(format!("recipe-{i}.toml"));
        std::fs::write(&recipe, text).unwrap();
        let output = drq_quantize(["--model", s(&gguf()), "--config", s(&recipe), "--out", s(&out)]);
        assert_refused(&output, &[needle], dir.path(), &out);
    }
}

#[test]
fn rejects_missing_and_unusable_models() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");

    // A path that does not exist (absolute, so it cannot pass for a hub repo id).
    let missing = dir.path().join("nope.gguf");
    let output = drq_quantize(["--model", s(&missing), "--out", s(&out)]);
    assert_refused(&output, &["not found", s(&missing)], dir.path(), &out);

    // A directory that is not a Hugging Face model.
    let empty = dir.path().join("empty-model");
    std::fs::create_dir(&empty).unwrap();
    let output = drq_quantize(["--model", s(&empty), "--out", s(&out)]);
    assert_refused(&output, &["is not a Hugging Face model directory", "config.json is missing"], dir.path(), &out);

    // A file that is neither GGUF nor a checkpoint.
    let text = dir.path().join("model.bin");
    std::fs::write(&text, b"hello").unwrap();
    let output = drq_quantize(["--model", s(&text), "--out", s(&out)]);
    assert_refused(&output, &["neither a GGUF file nor a drq checkpoint"], dir.path(), &out);
}

#[test]
fn rejects_a_truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let bytes = std::fs::read(gguf()).unwrap();
    // Cut inside the metadata (the tokenizer alone is over 1 MB), and inside the tensor data.
    for (name, len) in [("head.gguf", 1 << 20), ("tail.gguf", bytes.len() - (1 << 20))] {
        let truncated = dir.path().join(name);
        std::fs::write(&truncated, &bytes[..len]).unwrap();
        let output = drq_quantize(["--model", s(&truncated), "--out", s(&out)]);
        assert_refused(&output, &[s(&truncated)], dir.path(), &out);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("is not a readable GGUF file") || stderr.contains("cannot read tensor"),
            "{name}: {stderr}"
        );
    }
}

/// A tiny GGUF with the given metadata and one F32 tensor.
fn write_gguf(path: &Path, metadata: &[(&str, candle_core::quantized::gguf_file::Value)]) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let t = candle_core::Tensor::zeros((4, 8), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
    let meta: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta, &[("token_embd.weight", &q)]).unwrap();
}

#[test]
fn rejects_unsupported_gguf_architectures() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");

    let gpt2 = dir.path().join("gpt2.gguf");
    write_gguf(&gpt2, &[("general.architecture", Value::String("gpt2".into()))]);
    let output = drq_quantize(["--model", s(&gpt2), "--out", s(&out)]);
    assert_refused(&output, &["unsupported GGUF architecture `gpt2`", s(&gpt2)], dir.path(), &out);

    // A supported architecture with its hyper-parameters missing.
    let bare = dir.path().join("bare-llama.gguf");
    write_gguf(&bare, &[("general.architecture", Value::String("llama".into()))]);
    let output = drq_quantize(["--model", s(&bare), "--out", s(&out)]);
    assert_refused(&output, &["GGUF metadata is missing `llama.", s(&bare)], dir.path(), &out);

    // No architecture at all.
    let none = dir.path().join("none.gguf");
    write_gguf(&none, &[("general.name", Value::String("x".into()))]);
    let output = drq_quantize(["--model", s(&none), "--out", s(&out)]);
    assert_refused(&output, &["general.architecture"], dir.path(), &out);
}

#[test]
fn rejects_bad_output_paths() {
    let dir = tempfile::tempdir().unwrap();

    for name in ["x.gguf", "x", "x.safetensors.bak", "safetensors"] {
        let out = dir.path().join(name);
        let output = drq_quantize(["--model", s(&gguf()), "--out", s(&out)]);
        assert_refused(&output, &["--out must end in .safetensors", name], dir.path(), &out);
    }

    // An existing output is left untouched without --force.
    let existing = dir.path().join("existing.safetensors");
    std::fs::write(&existing, b"keep me").unwrap();
    let output = drq_quantize(["--model", s(&gguf()), "--out", s(&existing)]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.code().is_some_and(|c| c != 0 && c != 101), "{stderr}");
    assert!(
        stderr.contains("exists; pass --force to overwrite it") && stderr.contains("existing.safetensors"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    assert!(tmp_files(dir.path()).is_empty());

    // Output locations are checked before the model is loaded and quantized.
    let in_missing = dir.path().join("missing").join("x.safetensors");
    let output = drq_quantize(["--model", s(&gguf()), "--out", s(&in_missing)]);
    assert_refused(&output, &["--out", "does not exist"], dir.path(), &in_missing);
    assert!(!dir.path().join("missing").exists());
    let out = dir.path().join("x.safetensors");
    let report = dir.path().join("missing").join("report.json");
    let output = drq_quantize(["--model", s(&gguf()), "--out", s(&out), "--report", s(&report)]);
    assert_refused(&output, &["--report", "does not exist"], dir.path(), &out);
    assert!(!dir.path().join("missing").exists());
    let a_dir = dir.path().join("d.safetensors");
    std::fs::create_dir(&a_dir).unwrap();
    let output = drq_quantize(["--model", s(&gguf()), "--out", s(&a_dir), "--force"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.code().is_some_and(|c| c != 0 && c != 101), "{stderr}");
    assert!(stderr.contains("is a directory"), "{stderr}");
    assert!(a_dir.is_dir() && tmp_files(dir.path()).is_empty());

    // A missing --out is a usage error.
    let output = drq_quantize(["--model", s(&gguf())]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.code().is_some_and(|c| c != 0 && c != 101), "{stderr}");
    assert!(stderr.contains("--out"), "{stderr}");
}

/// `--gptq` on a tiny model written as a Hugging Face directory: the checkpoint records the
/// rounding, the report gives each linear weight its output errors, and bad calibration settings
/// are refused before any work.
#[test]
fn gptq_rounds_with_calibration_text_and_refuses_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("tiny");
    model::export::write_hf_dir(&drq_tests::tiny_model(model::Architecture::Llama, true, 5), &model_dir).unwrap();
    let text = dir.path().join("calibration.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog. ".repeat(60)).unwrap();
    let out = dir.path().join("tiny-gptq.safetensors");
    let report = dir.path().join("report.json");
    let base =
        ["--model", s(&model_dir), "--granularity", "group:32", "--calibration-blocks", "4", "--calibration-seq", "64"];
    let run = |extra: &[&str], out: &Path| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", s(out)]);
        drq_quantize(args)
    };

    let output = run(&["--gptq", "4,8", "--calibration", s(&text), "--report", s(&report)], &out);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    let ckpt = Checkpoint::open(&out).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(ckpt.quantization().rounding, "gptq:4,8");
    assert!(stdout.contains("output error over the calibration inputs") && stdout.contains("W4: nearest"), "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    for e in json.as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        let rounded = e.get("output_error").is_some();
        assert_eq!(rounded, name != "model.embed_tokens.weight", "{name}: output_error present = {rounded}");
    }
    // A recipe can ask for GPTQ too; the flag's order overrides it.
    let from_recipe = dir.path().join("recipe.safetensors");
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/ptq/group128-gptq8.toml");
    let output = run(&["--config", s(&recipe), "--calibration", s(&text)], &from_recipe);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(Checkpoint::open(&from_recipe).unwrap().quantization().rounding, "gptq:8");
    let output = run(&["--config", s(&recipe), "--gptq", "2", "--calibration", s(&text)], &from_recipe);
    assert_ne!(output.status.code(), Some(0), "exists without --force");
    let output = run(&["--config", s(&recipe), "--gptq", "2", "--calibration", s(&text), "--force"], &from_recipe);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(Checkpoint::open(&from_recipe).unwrap().quantization().rounding, "gptq:2,8");
    // Without --gptq the codes are rounded to nearest, and the checkpoint says so.
    let nearest = dir.path().join("tiny.safetensors");
    assert_eq!(run(&[], &nearest).status.code(), Some(0));
    assert_eq!(Checkpoint::open(&nearest).unwrap().quantization().rounding, "nearest");

    let bad = dir.path().join("bad.safetensors");
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    let medium = dir.path().join("medium.txt");
    std::fs::write(&medium, "the quick brown fox jumps over the lazy dog. ".repeat(3)).unwrap();
    let wiki = dir.path().join("wiki.test.raw");
    std::fs::write(&wiki, "the quick brown fox ".repeat(100)).unwrap();
    let missing = dir.path().join("missing.txt");
    for (extra, needles) in [
        (vec!["--gptq", "4,8"], vec!["needs calibration text", "--calibration"]),
        (vec!["--gptq", "8,4", "--calibration", s(&text)], vec!["put 8 last"]),
        (vec!["--gptq", "9", "--calibration", s(&text)], vec!["9"]),
        (vec!["--gptq", "4", "--bits", "8,2", "--calibration", s(&text)], vec!["--gptq 4", "not in the bit set"]),
        (vec!["--gptq", "4", "--gptq-damp", "0", "--calibration", s(&text)], vec!["--gptq-damp"]),
        (vec!["--config", s(&recipe)], vec!["gptq:8", "--calibration"]),
        (vec!["--gptq", "4", "--calibration", s(&short)], vec!["--calibration", "too few"]),
        (
            vec!["--gptq", "4", "--calibration", s(&medium)],
            vec!["--calibration holds", "--calibration-blocks asks for 4"],
        ),
        (vec!["--gptq", "4", "--calibration", s(&missing)], vec!["missing.txt", "does not exist"]),
        (vec!["--gptq", "4", "--calibration", s(&wiki)], vec!["WikiText-2"]),
        (vec!["--gptq", "4", "--calibration", s(&text), "--calibration-seq", "1"], vec!["--calibration-seq"]),
    ] {
        assert_refused(&run(&extra, &bad), &needles, dir.path(), &bad);
    }
}
