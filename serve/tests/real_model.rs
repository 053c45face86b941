//! The real SmolLM2-135M-Instruct (from ../shared), quantized per channel and served: at 8, 4
//! and 2 bits the server's greedy completion equals the runtime's own greedy decoding (its plain
//! `forward` with a KV cache, token by token), and the chat endpoint answers with ChatML.

mod support;

use kernels::{Granularity, KernelConfig, TieRule};
use model::checkpoint::Checkpoint;
use model::source::{self, ModelSource};
use model::{Precision, ResidentModel, Transformer};
use quantize::{quantize_model, write_checkpoint, QuantSpec, SearchObjective};
use serde_json::json;
use serve::engine::EngineOptions;
use serve::http::DEFAULT_BODY_LIMIT;
use support::{runtime_greedy, TestServer};

#[test]
fn served_greedy_text_equals_the_runtime_at_every_precision() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = drq_tests::smollm2_gguf();
    let (float, provenance) = source::load_float(&ModelSource::Gguf(gguf)).unwrap();
    let spec = QuantSpec {
        bits: vec![8, 4, 2],
        granularity: Granularity::Channel,
        tie: TieRule::HalfEven,
        objective: SearchObjective::Normalized,
        ..QuantSpec::default()
    };
    let q = quantize_model(&float, &spec, &[], |_| {}).unwrap();
    let path = dir.path().join("smollm2.safetensors");
    write_checkpoint(&path, &float, &provenance, &q).unwrap();
    drop((float, q));

    let options = EngineOptions { max_context: 512, ..EngineOptions::default() };
    let s = TestServer::start(&path, options, None, DEFAULT_BODY_LIMIT);
    let checkpoint = Checkpoint::open(&path).unwrap();
    let resident = ResidentModel::from_checkpoint(&checkpoint).unwrap();
    let tokenizer = checkpoint.tokenizer().unwrap();
    let eos = checkpoint.config().eos_token_ids.clone();
    let prompt_text = "The three primary colors are";
    let prompt = tokenizer.encode(prompt_text, false).unwrap().get_ids().to_vec();
    assert!(!checkpoint.add_bos(), "SmolLM2 uses no BOS");

    let mut texts = Vec::new();
    for bits in [8u32, 4, 2] {
        let t = Transformer::from_resident(&resident, &Precision::Bits(bits), &KernelConfig::default()).unwrap();
        let ids = runtime_greedy(&t, &prompt, 24, &eos);
        let expected = tokenizer.decode(&ids, true).unwrap();
        let (status, c, _) = s.post(
            "/v1/completions",
            &json!({"prompt": prompt_text, "max_tokens": 24, "temperature": 0, "precision": bits}),
        );
        assert_eq!(status, 200, "{c}");
        let served = c["choices"][0]["text"].as_str().unwrap();
        println!("W{bits}: {served:?}");
        assert_eq!(served, expected, "precision {bits}");
        assert_eq!(c["usage"]["completion_tokens"].as_u64().unwrap() as usize, ids.len() + usize::from(ids.len() < 24));
        texts.push(served.to_string());
    }
    assert!(texts[0].len() > 20, "8-bit greedy text is too short to be meaningful: {:?}", texts[0]);

    // Chat through the model's own template (ChatML): a non-empty answer that stops by itself.
    let (status, c, _) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "What is 2+2? Answer with one number."}], "max_tokens": 40, "temperature": 0}),
    );
    assert_eq!(status, 200, "{c}");
    let answer = c["choices"][0]["message"]["content"].as_str().unwrap();
    println!("chat W8: {answer:?}");
    assert!(!answer.is_empty() && !answer.contains("<|im_end|>"), "{answer:?}");
    assert_eq!(c["choices"][0]["finish_reason"], "stop", "{c}");
}
