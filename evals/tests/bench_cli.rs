//! `drq-bench` runs end to end on a tiny checkpoint (speed itself is measured by running it, not
//! in tests): a row per precision with positive rates, the peak memory, the JSON report; bad
//! input is refused cleanly.

use std::process::Command;

use drq_tests::tiny_model;
use kernels::{Granularity, TieRule};
use model::source::Provenance;
use model::Architecture;
use quantize::{quantize_model, write_checkpoint, QuantSpec, SearchObjective};

const BIN: &str = env!("CARGO_BIN_EXE_drq-bench");

#[test]
fn reports_every_precision_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let float = tiny_model(Architecture::Llama, true, 5);
    let spec = QuantSpec {
        bits: vec![8, 4, 2],
        granularity: Granularity::Group(32),
        tie: TieRule::HalfEven,
        objective: SearchObjective::Normalized,
        ..QuantSpec::default()
    };
    let q = quantize_model(&float, &spec, &[], |_| {}).unwrap();
    let ckpt = dir.path().join("tiny.safetensors");
    write_checkpoint(&ckpt, &float, &Provenance { source: "test".into(), sha256: "0".repeat(64) }, &q).unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(BIN)
        .arg("--model")
        .arg(&ckpt)
        .args([
            "--precision",
            "8,3,2",
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "6",
            "--batch",
            "3",
            "--repeat",
            "1",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("peak resident memory"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["precision"].as_str().unwrap()).collect::<Vec<_>>(), ["8", "3", "2"]);
    for r in rows {
        assert_eq!(r["batch"], 3);
        assert!(r["decode_tokens_per_s"].as_f64().unwrap() > 0.0 && r["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    assert!(report["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);

    for (args, needle) in [
        (vec!["--precision", "9"], "9"),
        (vec!["--precision", "fp"], "--reference"),
        (vec!["--batch", "0"], "at least 1"),
        (vec!["--prompt-tokens", "250", "--gen-tokens", "10"], "context"),
        (vec!["--device", "cuda", "--mixed", "--precision", "8,2"], "--mixed runs on the CPU"),
        (vec!["--candle", "q8_0"], "--candle needs --reference"),
        (vec!["--candle", "q3"], "q3"),
    ] {
        let out = Command::new(BIN).arg("--model").arg(&ckpt).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.code().is_some_and(|c| c != 0 && c != 101), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    // candle's models as baselines in the same run: its float Llama over the reference's weights;
    // its quantized Llama needs a GGUF file.
    let hf = dir.path().join("hf");
    model::export::write_hf_dir(&float, &hf).unwrap();
    let out = Command::new(BIN)
        .arg("--model")
        .arg(&ckpt)
        .arg("--reference")
        .arg(&hf)
        .args(["--candle", "f32", "--precision", "4", "--prompt-tokens", "4", "--gen-tokens", "4", "--batch", "2"])
        .args(["--repeat", "1", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let candle = &report["rows"][1];
    assert_eq!(candle["precision"], "candle f32");
    assert!(
        candle["decode_tokens_per_s"].as_f64().unwrap() > 0.0 && candle["prefill_tokens_per_s"].as_f64().unwrap() > 0.0
    );
    let out = Command::new(BIN)
        .arg("--model")
        .arg(&ckpt)
        .arg("--reference")
        .arg(&hf)
        .args(["--candle", "q8_0", "--gen-tokens", "4"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("reads a GGUF file"), "{stderr}");
    // Decoding on a GPU: without a driver a clear error (on a GPU machine, scripts/gpu-check.sh).
    let out =
        Command::new(BIN).arg("--model").arg(&ckpt).args(["--device", "cuda", "--gen-tokens", "4"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(101), "{stderr}");
    if !kernels::cuda::driver_available() {
        assert!(out.status.code() == Some(1) && stderr.contains("no NVIDIA driver"), "{stderr}");
    }
}

#[test]
fn kernels_mode_times_every_shape_and_the_gpu_is_a_clear_error_without_one() {
    let out = Command::new(BIN)
        .args(["--kernels", "--shapes", "16x64,8x100", "--precision", "8,2", "--batch", "2", "--threads", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for row in ["random 16x64", "random 8x100"] {
        assert_eq!(stdout.lines().filter(|l| l.contains(row)).count(), 2, "{row} at 8 and 2 bits: {stdout}");
    }
    for args in [vec!["--kernels", "--shapes", "8x0"], vec!["--kernels", "--shapes", "8x16", "--batch", "65"]] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert!(out.status.code().is_some_and(|c| c != 0 && c != 101), "{args:?}");
    }
    // The GPU path: without a driver a clear error; with one, whatever it finds, never a panic.
    let out = Command::new(BIN)
        .args(["--kernels", "--device", "cuda", "--shapes", "16x64", "--precision", "4"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(101), "{stderr}");
    if !kernels::cuda::driver_available() {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("no NVIDIA driver"), "{stderr}");
    }
    let out = Command::new(BIN).args(["--kernels", "--device", "tpu"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected `cpu`, `cuda` or `cuda:N`"));
}
