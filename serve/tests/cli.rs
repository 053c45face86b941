//! The `drq-serve` binary: help, bad flags, and a graceful SIGTERM (stop accepting, finish the
//! streams in flight, exit 0).

mod support;

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_drq-serve");

#[test]
fn help_lists_the_flags() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in ["--model", "--host", "--port", "--default-precision", "--max-batch", "--max-queue", "--api-key"] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn bad_flags_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = support::tiny_checkpoint(dir.path());
    for (args, needle) in [
        (vec!["--default-precision", "9"], "default precision `9`"),
        (vec!["--ctx", "100000"], "context 100000"),
        (vec!["--max-batch", "0"], "max batch"),
        (vec!["--host", "not a host"], "invalid --host"),
        (vec!["--device", "tpu"], "expected `cpu`, `cuda` or `cuda:N`"),
        (vec!["--device", "cuda", "--activations", "int8"], "the GPU kernels take f32 activations"),
    ] {
        let out = Command::new(BIN).arg("--model").arg(&checkpoint).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"w9\"\ndefault = 9\n").unwrap();
    let out = Command::new(BIN).arg("--model").arg(&checkpoint).arg("--profile").arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("invalid profile") && !err.contains("panicked"), "{err}");
    // A recipe asking for GPTQ rounding: serving quantizes in memory without calibration text.
    let recipe = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/ptq/group128-gptq8.toml");
    let out = Command::new(BIN).arg("--model").arg(&checkpoint).arg("--config").arg(&recipe).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("gptq:8")
            && err.contains("drq-quantize --gptq")
            && !err.contains("panicked"),
        "{err}"
    );
    let out = Command::new(BIN).args(["--model", "/nonexistent/model.gguf"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model.gguf"));
    // Serving on a GPU without a driver: a clear error at start (on a GPU machine the server
    // starts; scripts/gpu-check.sh covers that).
    if !kernels::cuda::driver_available() {
        let out = Command::new(BIN).arg("--model").arg(&checkpoint).args(["--device", "cuda"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("no NVIDIA driver") && !err.contains("panicked"), "{err}");
    }
}

#[cfg(unix)]
#[test]
fn sigterm_finishes_in_flight_streams_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = support::tiny_checkpoint(dir.path());
    let (mut child, addr) = spawn_listening(&checkpoint, &[], &[]);
    let url = format!("http://{addr}/v1/completions");
    // 16 choices x 200 tokens with 20 alternatives each: megabytes of events, more than the
    // socket buffers hold while this client does not read, so the stream is surely in flight
    // when the signal arrives.
    let body = json!({"prompt": "a", "n": 16, "max_tokens": 200, "logprobs": 20, "stream": true, "stop": "\u{1}never"});
    let response = ureq::post(&url).send_json(body).unwrap();
    let mut reader = BufReader::new(response.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");

    std::thread::sleep(Duration::from_millis(300));
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    // The stream in flight still runs to its end.
    let rest: Vec<String> = reader.lines().map(|l| l.unwrap()).filter(|l| l.starts_with("data: ")).collect();
    assert_eq!(rest.last().map(String::as_str), Some("data: [DONE]"));
    let finished = rest.iter().filter(|l| l.contains("\"finish_reason\":\"")).count();
    assert_eq!(finished, 16, "every choice ends with its finish_reason");
    // New connections are refused once it stopped accepting, and it exits 0.
    let status = drq_tests::wait_with_timeout(&mut child, Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
    assert!(ureq::get(&format!("http://{addr}/health")).call().is_err());
}

/// A profile given with --profile is listed and served by its name like a stored one.
#[test]
fn a_profile_flag_is_served_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = support::tiny_checkpoint(dir.path());
    // The checkpoint stores a profile `mix` already: the name cannot be taken twice.
    let clash = dir.path().join("mix.toml");
    std::fs::write(&clash, "name = \"mix\"\ndefault = 4\n").unwrap();
    let out = Command::new(BIN).arg("--model").arg(&checkpoint).arg("--profile").arg(&clash).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("a profile named `mix` exists already"), "{err}");

    let profile = dir.path().join("attn8.toml");
    std::fs::write(&profile, "name = \"attn8\"\ndefault = 3\n[[rule]]\nmatch = \"self_attn\"\nbits = 8\n").unwrap();
    let (mut child, addr) = spawn_listening(&checkpoint, &["--profile".as_ref(), profile.as_os_str()], &[]);
    let models: serde_json::Value = ureq::get(&format!("http://{addr}/v1/models")).call().unwrap().into_json().unwrap();
    let entry = &models["data"][0];
    assert!(entry["precisions"].as_array().unwrap().iter().any(|p| p == "attn8"), "{models:#}");
    assert!(entry["profiles"].as_array().unwrap().iter().any(|p| p["name"] == "attn8"), "{models:#}");
    let body = json!({"prompt": "the cat", "max_tokens": 3, "temperature": 0, "precision": "attn8"});
    let reply: serde_json::Value =
        ureq::post(&format!("http://{addr}/v1/completions")).send_json(body).unwrap().into_json().unwrap();
    assert_eq!(reply["precision"], "attn8", "{reply:#}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `drq-serve --model MODEL --port 0 ARGS` with `ENV`, once it listens: the process and its address.
fn spawn_listening(
    model: &std::path::Path,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &std::ffi::OsStr)],
) -> (std::process::Child, String) {
    let mut command = Command::new(BIN);
    command.arg("--model").arg(model).args(["--port", "0"]).args(args).envs(env.iter().copied());
    drq_tests::spawn_server(command)
}

#[test]
fn loadgen_reports_every_precision_without_errors() {
    let dir = tempfile::tempdir().unwrap();
    let options = serve::engine::EngineOptions { max_context: 256, ..Default::default() };
    let server = support::TestServer::start(
        &support::tiny_checkpoint(dir.path()),
        options,
        None,
        serve::http::DEFAULT_BODY_LIMIT,
    );
    let json = dir.path().join("load.json");
    let out = Command::new(env!("CARGO_BIN_EXE_drq-loadgen"))
        .args([
            "--url",
            &server.url(""),
            "--clients",
            "3",
            "--duration",
            "1",
            "--precisions",
            "8,4,2",
            "--max-tokens",
            "8",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["all"]["errors"], 0);
    for p in ["8", "4", "2"] {
        let row = &report["by_precision"][p];
        assert!(row["requests"].as_u64().unwrap() >= 1, "{report:#}");
        assert!(row["tokens_per_second"].as_f64().unwrap() > 0.0);
        assert!(row["ttft_p50_ms"].as_f64().unwrap() > 0.0);
    }
    // Against nothing: a clear error, not a hang or a panic.
    let out = Command::new(env!("CARGO_BIN_EXE_drq-loadgen"))
        .args(["--url", "http://127.0.0.1:9", "--duration", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("does not answer"), "{stderr}");
}

#[test]
fn a_float_source_is_quantized_with_the_default_recipe_and_cached() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    model::export::write_hf_dir(&drq_tests::tiny_model(model::Architecture::Llama, true, 8), &hf).unwrap();
    let cache = dir.path().join("cache");
    let (mut child, _) = spawn_listening(&hf, &[], &[("DRQ_CACHE", cache.as_os_str())]);
    child.kill().unwrap();
    child.wait().unwrap();
    let cached: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let checkpoint = model::checkpoint::Checkpoint::open(&cached[0]).unwrap();
    // The one default of every tool that quantizes without a recipe.
    let default = quantize::recipe::PtqRecipe::default_recipe().settings().unwrap();
    assert_eq!(checkpoint.quantization().granularity, default.spec.granularity.to_string());
    let q = checkpoint.quantization();
    assert_eq!(q.granularity_overrides, default.spec.stored_overrides(&q.quantized).unwrap());
    assert_eq!(checkpoint.quantization().scale_method, default.spec.scale_method());
    assert_eq!(checkpoint.quantization().bits, default.spec.bits);
}
