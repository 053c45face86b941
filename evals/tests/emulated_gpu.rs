//! `--device cuda` where there is no GPU: `drq-bench` and `drq-eval` on the emulated driver
//! (`kernels::cuda::emulation`: the CUDA kernels' own source run on the CPU behind a libcuda that
//! checks every driver call as a GPU would). The whole decode step runs on the "GPU" (embedding
//! lookup and lm_head in two row ranges, biases, every precision, batches wider than one launch,
//! CUDA graphs replayed or launches one by one) and must give what the CPU gives.

use std::path::{Path, PathBuf};
use std::process::Command;

use drq_tests::sharp_tiny_model;
use kernels::Granularity;
use model::checkpoint::WideRowsSpec;
use model::source::Provenance;
use model::Architecture;
use quantize::{quantize_model, write_checkpoint, QuantSpec};

/// A tiny checkpoint of `architecture` (tied embeddings or not, [`sharp_tiny_model`]) at 8, 4
/// and 2 bits, the first 100 rows of its embedding (tied) or lm_head one bit wider.
fn sharp_checkpoint(dir: &Path, architecture: Architecture, tied: bool) -> PathBuf {
    let float = sharp_tiny_model(architecture, tied, 11);
    let spec = QuantSpec { granularity: Granularity::Group(32), ..QuantSpec::default() };
    let mut q = quantize_model(&float, &spec, &[], |_| {}).unwrap();
    q.quantization.widen_rows(&WideRowsSpec::Head { rows: 100, extra_bits: 1 }, &float.config).unwrap();
    let ckpt = dir.join(format!("{architecture:?}-{tied}.safetensors"));
    write_checkpoint(&ckpt, &float, &Provenance { source: "test".into(), sha256: "0".repeat(64) }, &q).unwrap();
    ckpt
}

fn emulated_driver(dir: &Path) -> PathBuf {
    kernels::cuda::emulation::build_driver(&dir.join("cuda")).unwrap()
}

#[test]
fn greedy_decoding_on_the_emulated_gpu_is_the_cpus() {
    let dir = tempfile::tempdir().unwrap();
    let driver = emulated_driver(dir.path());
    let runs = [
        (Architecture::Llama, true, 1, "1"),
        (Architecture::Llama, true, 9, "0"),
        (Architecture::Qwen2, false, 3, "1"),
    ];
    for (architecture, tied, batch, graphs) in runs {
        let ckpt = sharp_checkpoint(dir.path(), architecture, tied);
        let json = dir.path().join("gpu.json");
        let gen = 12;
        let out = Command::new(env!("CARGO_BIN_EXE_drq-bench"))
            .arg("--model")
            .arg(&ckpt)
            .args(["--device", "cuda", "--precision", "8,7,6,5,4,3,2", "--prompt-tokens", "8", "--repeat", "1"])
            .args(["--gen-tokens", &gen.to_string(), "--batch", &batch.to_string(), "--json"])
            .arg(&json)
            .env("LD_LIBRARY_PATH", &driver)
            .env("DRQ_CUDA_GRAPHS", graphs)
            .output()
            .unwrap();
        let what = format!("{architecture:?} batch {batch} graphs {graphs}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}: {stderr}");
        assert!(stderr.contains("drq CUDA emulator"), "{what}: {stderr}");
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let rows = report["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 7, "{what}");
        for r in rows {
            assert_eq!(r["greedy_equal_to_cpu"], gen, "{what}, precision {}", r["precision"]);
        }
    }
}

#[test]
fn perplexity_on_the_emulated_gpu_is_the_cpus() {
    let dir = tempfile::tempdir().unwrap();
    let driver = emulated_driver(dir.path());
    let text = dir.path().join("text.txt");
    let words = ["the", "cat", "sat", "on", "a", "mat", "while", "rain", "fell", "softly"];
    let body: Vec<&str> = (0..400).map(|i| words[(i * 7 + i / 3) % words.len()]).collect();
    std::fs::write(&text, body.join(" ")).unwrap();
    let ckpt = sharp_checkpoint(dir.path(), Architecture::Llama, true);
    let perplexities = |device: &str| -> serde_json::Value {
        let json = dir.path().join(format!("{device}.json"));
        let out = Command::new(env!("CARGO_BIN_EXE_drq-eval"))
            .arg("perplexity")
            .arg("--model")
            .arg(&ckpt)
            .arg("--file")
            .arg(&text)
            .args(["--precision", "8,4,3,2", "--ctx", "96", "--max-windows", "3", "--activations", "f32"])
            .args(["--device", device, "--json"])
            .arg(&json)
            .env("LD_LIBRARY_PATH", &driver)
            .output()
            .unwrap();
        assert!(out.status.success(), "{device}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
    };
    let (gpu, cpu) = (perplexities("cuda"), perplexities("cpu"));
    assert_eq!(gpu["runtime"]["device"], "cuda");
    let (gpu, cpu) = (gpu["results"].as_array().unwrap(), cpu["results"].as_array().unwrap());
    assert_eq!(gpu.len(), 4);
    for (g, c) in gpu.iter().zip(cpu) {
        assert_eq!(g["label"], c["label"]);
        assert_eq!(g["tokens_scored"], c["tokens_scored"]);
        let (g_nll, c_nll) = (g["mean_nll"].as_f64().unwrap(), c["mean_nll"].as_f64().unwrap());
        assert!(
            (g_nll - c_nll).abs() <= 1e-5 * c_nll.abs().max(1.0),
            "precision {}: GPU mean NLL {g_nll}, CPU {c_nll}",
            g["label"]
        );
    }
}

#[test]
fn a_driver_older_than_the_kernels_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let driver = emulated_driver(dir.path());
    let ckpt = sharp_checkpoint(dir.path(), Architecture::Llama, true);
    let out = Command::new(env!("CARGO_BIN_EXE_drq-bench"))
        .arg("--model")
        .arg(&ckpt)
        .args(["--device", "cuda", "--gen-tokens", "2"])
        .env("LD_LIBRARY_PATH", &driver)
        .env("DRQ_EMULATED_CUDA_VERSION", "11080")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("supports CUDA 11.8") && stderr.contains("need CUDA 12.0 or later"), "{stderr}");
}
