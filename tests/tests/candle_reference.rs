//! candle-transformers as an independent reference for drq's one `Transformer` at float
//! precision: Hugging Face's own Rust implementations of Llama (`models::llama`) and Qwen2
//! (`models::qwen2`) read the same Hugging Face directory, and both must give the same logits
//! for a prompt (prefill) and then token by token through their KV caches (decode).

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, qwen2};
use drq_tests::{smollm2_gguf, tiny_model, workspace_bin};
use model::source::{self, ModelSource};
use model::{Architecture, KvCache, OpsMode, Transformer};

/// Largest logit difference allowed, relative to the reference's largest logit magnitude.
const TOLERANCE: f32 = 1e-4;
/// Tokens decoded one at a time after the prompt.
const DECODE_STEPS: usize = 8;

/// Prefill then greedy decode through drq's `Transformer` (from drq's own reading of `dir`) and
/// through `reference` (prompt or one token, its position → the last position's logits),
/// comparing the last position's logits at every step. Returns the worst relative difference.
fn agree(dir: &Path, prompt: &[u32], mut reference: impl FnMut(&Tensor, usize) -> Tensor) -> f32 {
    let (float, _) = source::load_float(&ModelSource::HfDir(dir.to_path_buf())).unwrap();
    let drq = Transformer::new(&float.config, &float.weights, OpsMode::Inference).unwrap();
    let mut cache = KvCache::new(&float.config);
    let mut input = prompt.to_vec();
    let mut position = 0;
    let mut worst = 0f32;
    for step in 0..=DECODE_STEPS {
        let tokens = Tensor::new(input.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let ours = drq.forward(&tokens, &mut cache, input.len() - 1).unwrap().flatten_all().unwrap();
        let theirs = reference(&tokens, position).flatten_all().unwrap();
        let ours_v: Vec<f32> = ours.to_vec1().unwrap();
        let theirs_v: Vec<f32> = theirs.to_vec1().unwrap();
        assert_eq!(ours_v.len(), theirs_v.len(), "vocabulary sizes differ");
        let scale = theirs_v.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = ours_v.iter().zip(&theirs_v).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let relative = diff / scale;
        let what = if step == 0 { format!("prefill of {} tokens", input.len()) } else { format!("decode step {step}") };
        assert!(
            relative <= TOLERANCE,
            "{what}: logits differ by {diff} (relative {relative:.2e}, tolerance {TOLERANCE:.0e})"
        );
        worst = worst.max(relative);
        position += input.len();
        let next = ours_v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap();
        input = vec![next];
    }
    worst
}

fn var_builder(dir: &Path) -> VarBuilder<'static> {
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)
}

fn read_config<T: serde::de::DeserializeOwned>(dir: &Path) -> T {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// SmolLM2-135M-Instruct from `../shared`, written as a Hugging Face directory by `drq-export`.
#[test]
fn llama_smollm2_matches_candle_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("smollm2");
    let output = Command::new(workspace_bin("drq-export"))
        .arg("--model")
        .arg(smollm2_gguf())
        .arg("--out")
        .arg(&hf)
        .output()
        .unwrap();
    assert!(output.status.success(), "drq-export: {}", String::from_utf8_lossy(&output.stderr));

    let config = read_config::<llama::LlamaConfig>(&hf).into_config(false);
    assert!(config.tie_word_embeddings, "SmolLM2 ties its embeddings");
    let reference = llama::Llama::load(var_builder(&hf), &config).unwrap();
    let mut cache = llama::Cache::new(true, DType::F32, &config, &Device::Cpu).unwrap();
    // "The capital of France is" under SmolLM2's tokenizer, BOS-free as the model is used.
    let (float, _) = source::load_float(&ModelSource::HfDir(hf.clone())).unwrap();
    let prompt =
        float.tokenizer.encode("The capital of France is Paris, and the capital of", false).unwrap().get_ids().to_vec();
    let worst = agree(&hf, &prompt, |tokens, position| reference.forward(tokens, position, &mut cache).unwrap());
    println!("SmolLM2 (Llama): worst relative logit difference {worst:.2e}");
}

/// A small random-weight Qwen2 (attention biases, untied lm_head), written as a Hugging Face
/// directory.
#[test]
fn qwen2_random_model_matches_candle_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("qwen2");
    let float = tiny_model(Architecture::Qwen2, false, 11);
    assert!(float.config.attention_bias && !float.config.tie_word_embeddings);
    model::export::write_hf_dir(&float, &hf).unwrap();

    let config: qwen2::Config = read_config(&hf);
    let mut reference = qwen2::ModelForCausalLM::new(&config, var_builder(&hf)).unwrap();
    let prompt: Vec<u32> = (0..23).map(|i| (i * 37 + 5) % 300).collect();
    let worst = agree(&hf, &prompt, |tokens, position| reference.forward(tokens, position).unwrap());
    println!("random Qwen2: worst relative logit difference {worst:.2e}");
}
