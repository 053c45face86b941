//! `drq-serve --device cuda` where there is no GPU: the server on the emulated driver
//! (`kernels::cuda::emulation`: the CUDA kernels' own source run on the CPU behind a libcuda that
//! checks every driver call as a GPU would). Concurrent requests at mixed precisions (a per-layer
//! profile among them), more than the batch holds so that GPU cache slots are reused, streamed or
//! not, greedy or sampled (tokens picked on the GPU, each draw's uniform from the request's own
//! generator) or with logprobs (logits copied back), must get the text the CPU server gives.

mod support;

use std::process::Command;

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_drq-serve");

/// The text and finish reason of a completion (its stream concatenated when `stream` is set).
fn complete(addr: &str, body: &Value) -> (String, String) {
    let url = format!("http://{addr}/v1/completions");
    if body["stream"] == true {
        let (text, parsed) = support::stream_text(&support::stream_at(&url, body));
        let finish = parsed.iter().rev().find_map(|c| c["choices"][0]["finish_reason"].as_str()).unwrap_or_default();
        return (text, finish.to_string());
    }
    let (status, v, _) = support::response(ureq::post(&url).send_json(body.clone()));
    assert_eq!(status, 200, "{body}: {v}");
    (
        v["choices"][0]["text"].as_str().unwrap().to_string(),
        v["choices"][0]["finish_reason"].as_str().unwrap().to_string(),
    )
}

/// A spawned server, killed when dropped (also when an assertion fails first).
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_emulated_gpu_serves_mixed_precisions_as_the_cpu_does() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = support::sharp_checkpoint(dir.path());
    let driver = kernels::cuda::emulation::build_driver(&dir.path().join("cuda")).unwrap();
    let spawn = |device: &str| {
        let mut command = Command::new(BIN);
        command
            .arg("--model")
            .arg(&checkpoint)
            .args(["--port", "0", "--device", device, "--activations", "f32", "--max-batch", "4"])
            .args(["--wide-rows", "100:+1"])
            .env("LD_LIBRARY_PATH", &driver);
        let (child, addr) = drq_tests::spawn_server(command);
        (Server(child), addr)
    };
    let requests: Vec<Value> = ["8", "4", "2", "mix", "3", "8", "mix", "4"]
        .iter()
        .enumerate()
        .map(|(i, precision)| {
            let prompt = ["the cat", "once upon a time", "rain fell", "a b c d e f"][i % 4];
            let mut r = json!({"prompt": prompt, "max_tokens": 10, "temperature": 0, "precision": precision, "stream": i % 2 == 1});
            // A sampled request (drawn on the GPU) and one with logprobs (logits copied back).
            if i == 5 {
                r["temperature"] = json!(0.7);
                r["seed"] = json!(7);
            }
            if i == 2 {
                r["logprobs"] = json!(2);
            }
            r
        })
        .collect();
    let (gpu, gpu_addr) = spawn("cuda");
    let on_gpu: Vec<(String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = requests.iter().map(|r| s.spawn(|| complete(&gpu_addr, r))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let metrics = ureq::get(&format!("http://{gpu_addr}/metrics")).call().unwrap().into_string().unwrap();
    drop(gpu);
    let (_cpu, cpu_addr) = spawn("cpu");
    for (request, got) in requests.iter().zip(&on_gpu) {
        assert_eq!(got, &complete(&cpu_addr, request), "{request}");
        assert!(!got.0.is_empty(), "{request}");
    }
    assert!(metrics.contains("drq_"), "{metrics}");
}
