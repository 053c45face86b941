//! A server on 127.0.0.1 over a tiny random checkpoint, and a small HTTP client for the tests.
#![allow(dead_code)] // each test file uses part of this

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use drq_tests::tiny_model;
use kernels::{Granularity, TieRule};
use model::checkpoint::Checkpoint;
use model::source::Provenance;
use model::Architecture;
use quantize::{quantize_model, write_checkpoint, QuantSpec, SearchObjective};
use serde_json::Value;
use serve::engine::{Engine, EngineOptions};
use serve::http::{router, AppState};
use serve::metrics::Metrics;

/// ChatML, as SmolLM2-Instruct's.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A tiny Llama (vocabulary 300, context 256) quantized per channel, with a chat template and a
/// per-layer profile `mix` (MLPs at 6 bits, the rest at 3).
pub fn tiny_checkpoint(dir: &Path) -> PathBuf {
    checkpoint_of(tiny_model(Architecture::Llama, true, 21), &dir.join("tiny.safetensors"))
}

/// [`tiny_checkpoint`] of [`drq_tests::sharp_tiny_model`]: greedy tokens that depend on every
/// part of a step, for comparing runtimes.
pub fn sharp_checkpoint(dir: &Path) -> PathBuf {
    checkpoint_of(drq_tests::sharp_tiny_model(Architecture::Llama, true, 21), &dir.join("sharp.safetensors"))
}

fn checkpoint_of(mut float: model::FloatModel, path: &Path) -> PathBuf {
    float.chat_template = Some(CHATML.to_string());
    let spec = QuantSpec {
        bits: vec![8, 4, 2],
        granularity: Granularity::Channel,
        tie: TieRule::HalfEven,
        objective: SearchObjective::Normalized,
        ..QuantSpec::default()
    };
    let mut q = quantize_model(&float, &spec, &[], |_| {}).unwrap();
    let mix = q.quantization.quantized.iter().map(|w| (w.clone(), if w.contains("mlp") { 6 } else { 3 })).collect();
    q.quantization.profiles.insert("mix".into(), mix);
    write_checkpoint(path, &float, &Provenance { source: "test".into(), sha256: "0".repeat(64) }, &q).unwrap();
    path.to_path_buf()
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    pub fn start(checkpoint: &Path, options: EngineOptions, api_key: Option<&str>, body_limit: usize) -> Self {
        let checkpoint = Checkpoint::open(checkpoint).unwrap();
        let metrics = Arc::new(Metrics::new());
        let engine = Engine::start(&checkpoint, options, metrics.clone()).unwrap();
        let state = Arc::new(AppState {
            engine,
            metrics,
            model_id: "tiny".into(),
            api_key: api_key.map(String::from),
            created: 1,
        });
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(state.clone(), body_limit);
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, state, runtime: Some(runtime) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `(status, body as JSON, Retry-After)`.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value, Option<String>) {
        self.post_raw(path, &body.to_string(), &[])
    }

    pub fn post_raw(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value, Option<String>) {
        let mut req = ureq::post(&self.url(path)).set("Content-Type", "application/json");
        for (k, v) in headers {
            req = req.set(k, v);
        }
        response(req.send_string(body))
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        match ureq::get(&self.url(path)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    /// The `data:` payloads of a streaming request, `[DONE]` included.
    pub fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        stream_at(&self.url(path), body)
    }

    /// The value of a metric line starting with `prefix` (labels included), 0 if absent.
    pub fn metric(&self, prefix: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .unwrap_or(0.0)
    }
}

impl TestServer {
    /// Waits (up to 10 s) until the metric reaches `value`: the scheduler updates its gauges
    /// just after the responses go out.
    pub fn wait_for_metric(&self, prefix: &str, value: f64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.metric(prefix) != value {
            assert!(
                std::time::Instant::now() < deadline,
                "{prefix} never reached {value}:\n{}",
                self.get("/metrics").1
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The `data:` payloads of a streaming request to `url` (any server), `[DONE]` included.
pub fn stream_at(url: &str, body: &Value) -> Vec<String> {
    let r = ureq::post(url).send_json(body.clone()).unwrap_or_else(|e| panic!("POST {url}: {e}"));
    assert_eq!(r.header("Content-Type"), Some("text/event-stream"));
    BufReader::new(r.into_reader())
        .lines()
        .map(|l| l.unwrap())
        .filter_map(|l| l.strip_prefix("data: ").map(String::from))
        .collect()
}

pub fn response(result: Result<ureq::Response, ureq::Error>) -> (u16, Value, Option<String>) {
    let r = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = r.status();
    let retry = r.header("Retry-After").map(String::from);
    let text = r.into_string().unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, json, retry)
}

/// The concatenated text of a completions or chat stream, and its chunks parsed.
pub fn stream_text(chunks: &[String]) -> (String, Vec<Value>) {
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"), "a stream ends with [DONE]");
    let parsed: Vec<Value> = chunks[..chunks.len() - 1].iter().map(|c| serde_json::from_str(c).unwrap()).collect();
    let mut text = String::new();
    for c in &parsed {
        for choice in c["choices"].as_array().unwrap() {
            if let Some(t) = choice["text"].as_str() {
                text.push_str(t);
            }
            if let Some(t) = choice["delta"]["content"].as_str() {
                text.push_str(t);
            }
        }
    }
    (text, parsed)
}

/// Greedy decoding through `Transformer::forward` token by token, independent of the engine's
/// batching; stops before an end-of-sequence token.
pub fn runtime_greedy(t: &model::Transformer, prompt: &[u32], max_tokens: usize, eos: &[u32]) -> Vec<u32> {
    let mut cache = model::KvCache::new(t.config());
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max_tokens {
        let ids = candle_core::Tensor::new(input.as_slice(), &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = t.forward(&ids, &mut cache, input.len() - 1).unwrap();
        let row: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        let next = serve::sampling::argmax(&row);
        if eos.contains(&next) {
            break;
        }
        out.push(next);
        input = vec![next];
    }
    out
}
