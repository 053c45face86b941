//! `drq-hasb` and `drq-quantize --hasb` as a user runs them, on a tiny model written as a
//! Hugging Face directory: traces, profiles in the checkpoint and as TOML files, and bad input
//! refused with a clear message and nothing written.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use model::checkpoint::Checkpoint;
use model::Precision;
use quantize::profile::ProfileRules;

fn run<I, S>(bin: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(bin).args(args).env("HF_HUB_OFFLINE", "1").output().expect("runs the tool")
}

fn hasb<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(args: I) -> Output {
    run(env!("CARGO_BIN_EXE_drq-hasb"), args)
}

fn quantize<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(args: I) -> Output {
    run(env!("CARGO_BIN_EXE_drq-quantize"), args)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

#[track_caller]
fn assert_ok(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Non-zero exit (not a panic) naming every needle; no `.tmp` left in `dir`.
#[track_caller]
fn assert_refused(output: &Output, needles: &[&str], dir: &Path) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let code = output.status.code();
    assert!(code.is_some_and(|c| c != 0 && c != 101), "exit {code:?}; stderr:\n{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "stderr does not mention {needle:?}:\n{stderr}");
    }
    let tmp: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "left {tmp:?}");
}

#[test]
fn traces_then_profiles_in_the_checkpoint_and_as_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model_dir = d.join("tiny");
    model::export::write_hf_dir(&drq_tests::tiny_model(model::Architecture::Llama, true, 5), &model_dir).unwrap();
    let text = d.join("calibration.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog. ".repeat(60)).unwrap();

    // Traces of every matrix, a JSON and a plot.
    let traces = d.join("traces.json");
    let plot = d.join("traces.svg");
    let probes = ["--seq-len", "32", "--batch", "1", "--min-probes", "4", "--max-probes", "6"];
    let mut args = vec!["traces", "--model", s(&model_dir), "--calibration", s(&text), "--out", s(&traces)];
    args.extend(probes);
    args.extend(["--plot", s(&plot)]);
    let stdout = assert_ok(&hasb(&args));
    assert!(stdout.contains("Tr(H)/n") && stdout.contains("model.layers.1.mlp.down_proj.weight"), "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&traces).unwrap()).unwrap();
    let layers = json["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1 + 2 * 7, "the tied embedding and 7 matrices per block");
    assert!((4..=6).contains(&json["probes"].as_u64().unwrap()));
    assert!(layers.iter().all(|l| l["trace"].as_f64().unwrap().is_finite() && l["trace_se"].as_f64().unwrap() >= 0.0));
    assert!(std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));

    // drq-quantize stores HASB profiles within their budgets.
    let ckpt_path = d.join("tiny.safetensors");
    // No wide rows: 4,096 of them would be the whole 300-token vocabulary, making the embedding
    // one bit wider everywhere and the 3.5-bit budget below infeasible with its 6-bit floor.
    let base = ["--model", s(&model_dir), "--granularity", "group:32", "--wide-rows", "none"];
    let mut args = base.to_vec();
    args.extend(["--hasb", s(&traces), "--budgets", "3,4.5", "--out", s(&ckpt_path)]);
    assert_ok(&quantize(&args));
    let ckpt = Checkpoint::open(&ckpt_path).unwrap();
    for (name, budget) in [("hasb-3.0", 3.0), ("hasb-4.5", 4.5)] {
        let bits = ckpt.bits_per_weight(&Precision::Profile(name.into())).unwrap();
        assert!(bits <= budget && bits > budget - 0.6, "{name}: {bits} bits per weight");
    }

    // drq-hasb allocate on that checkpoint: baselines, floors, tied inputs, TOML files.
    // A directory that does not exist yet is created.
    let profiles_dir = d.join("profiles").join("new");
    let out = d.join("tiny-more.safetensors");
    let args = [
        "allocate",
        s(&ckpt_path),
        "--traces",
        s(&traces),
        "--budgets",
        "3.5",
        "--trace-free",
        "--random",
        "2",
        "--floor",
        "embed_tokens=6",
        "--tie-inputs",
        "--profiles-dir",
        s(&profiles_dir),
        "--out",
        s(&out),
    ];
    let stdout = assert_ok(&hasb(args));
    assert!(stdout.contains("hasb-3.5") && stdout.contains("tracefree-3.5") && stdout.contains("random-3.5-s1"));
    let more = Checkpoint::open(&out).unwrap();
    let names: Vec<&String> = more.quantization().profiles.keys().collect();
    assert_eq!(names, ["hasb-3.0", "hasb-3.5", "hasb-4.5", "random-3.5-s0", "random-3.5-s1", "tracefree-3.5"]);
    for (name, bits) in &more.quantization().profiles {
        let file = profiles_dir.join(format!("{name}.toml"));
        if name == "hasb-3.0" || name == "hasb-4.5" {
            assert!(!file.exists());
            continue;
        }
        assert!(more.bits_per_weight(&Precision::Profile(name.clone())).unwrap() <= 3.5);
        assert!(bits["model.embed_tokens.weight"] >= 6, "{name}: {bits:?}");
        let q = |p: &str| bits[&format!("model.layers.0.self_attn.{p}_proj.weight")];
        assert!(q("q") == q("k") && q("k") == q("v"), "{name}: {bits:?}");
        let rules = ProfileRules::load(&file).unwrap();
        assert_eq!(&rules.resolve(&more.quantization().quantized).unwrap(), bits, "{name}");
    }

    // Bad input: refused, and the checkpoint is left as it was.
    let before = std::fs::read(&ckpt_path).unwrap();
    let allocate = |extra: &[&str]| {
        let mut args = vec!["allocate", s(&ckpt_path), "--traces", s(&traces)];
        args.extend_from_slice(extra);
        hasb(args)
    };
    assert_refused(&allocate(&["--budgets", "1"]), &["budget 1"], d);
    assert_refused(&allocate(&["--budgets", "3"]), &["hasb-3.0", "--replace"], d);
    assert_refused(&allocate(&["--budgets", "3", "--floor", "embed_tokens=9"]), &["9"], d);
    assert_refused(&allocate(&["--budgets", "3", "--prefix", "3x"]), &["3x"], d);
    let mut other: serde_json::Value = json.clone();
    other["source_sha256"] = "feed".into();
    let other_traces = d.join("other.json");
    std::fs::write(&other_traces, other.to_string()).unwrap();
    let output = hasb(["allocate", s(&ckpt_path), "--traces", s(&other_traces), "--budgets", "3"]);
    assert_refused(&output, &["sha256", "feed"], d);
    assert_eq!(std::fs::read(&ckpt_path).unwrap(), before, "a refused allocation changed the checkpoint");
    // --replace rewrites in place, atomically.
    assert_ok(&allocate(&["--budgets", "3", "--replace"]));
    assert_eq!(Checkpoint::open(&ckpt_path).unwrap().quantization().profiles.len(), 2);

    let mut args = vec!["traces", "--model", s(&model_dir), "--calibration", s(&text), "--out", s(&traces)];
    args.extend(["--tolerance", "0"]);
    assert_refused(&hasb(&args), &["tolerance"], d);
    let bad_out = d.join("nowhere/traces.json");
    let args = ["traces", "--model", s(&model_dir), "--calibration", s(&text), "--out", s(&bad_out)];
    assert_refused(&hasb(args), &["nowhere"], d);
    let x = d.join("x.safetensors");
    let mut args = base.to_vec();
    args.extend(["--budgets", "3", "--out", s(&x)]);
    assert_refused(&quantize(&args), &["--hasb"], d);
    let mut args = base.to_vec();
    args.extend(["--hasb", s(&other_traces), "--budgets", "3", "--out", s(&x)]);
    assert_refused(&quantize(&args), &["feed"], d);
    assert!(!x.exists());
}
