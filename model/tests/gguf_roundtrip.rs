//! GGUF import against tiny models written the way llama.cpp's `convert_hf_to_gguf.py` writes
//! them: llama.cpp tensor names, Q/K rows permuted for `llama` (not for `qwen2`), `{arch}.*`
//! hyper-parameters, a `gpt2` tokenizer padded to the embedding rows with `[PADn]` tokens, and no
//! `output.weight` for tied embeddings. Loading must give back the original model's logits.

use drq_tests::max_abs_diff;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use drq_tests::{tiny_model, tiny_tokenizer};
use model::source::gguf::{load, permute_rows};
use model::{Architecture, FloatModel, ModelConfig, ModelSource};

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const UNUSED: i32 = 5;

/// How to write the file; the defaults are llama.cpp's.
struct Options {
    dtype: GgmlDType,
    /// Apply the Q/K row permutation: `None` as llama.cpp does (llama only), else always/never.
    permute: Option<bool>,
    /// Metadata keys to leave out.
    drop: Vec<&'static str>,
    /// Overrides of metadata values.
    set: Vec<(&'static str, Value)>,
    /// Extra tensors (llama.cpp name, tensor).
    extra: Vec<(&'static str, Tensor)>,
}

impl Default for Options {
    fn default() -> Self {
        Self { dtype: GgmlDType::F32, permute: None, drop: vec![], set: vec![], extra: vec![] }
    }
}

/// The llama.cpp name of a Hugging Face tensor name.
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (part, kind) = rest.rsplit_once('.').unwrap();
    let part = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("unknown tensor {other}"),
    };
    format!("blk.{layer}.{part}.{kind}")
}

/// `tokenizer.ggml.*` from the tiny tokenizer, padded to `vocab_size` as llama.cpp does.
fn tokenizer_metadata(vocab_size: usize, pre: &str) -> Vec<(String, Value)> {
    let tokenizer = tiny_tokenizer();
    let mut by_id: Vec<(u32, String)> = tokenizer.get_vocab(true).into_iter().map(|(t, id)| (id, t)).collect();
    by_id.sort();
    let mut tokens = Vec::new();
    let mut types = Vec::new();
    for i in 0..vocab_size as u32 {
        match by_id.iter().find(|(id, _)| *id == i) {
            Some((_, t)) => {
                tokens.push(t.clone());
                types.push(if t == "<|endoftext|>" { CONTROL } else { NORMAL });
            }
            None => {
                tokens.push(format!("[PAD{i}]"));
                types.push(UNUSED);
            }
        }
    }
    let json: serde_json::Value = serde_json::from_str(&tokenizer.to_string(false).unwrap()).unwrap();
    let merges: Vec<String> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(pair) => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
            other => panic!("unexpected merge {other}"),
        })
        .collect();
    assert_eq!(merges, ["t h", "th e"]);
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ]
}

/// Writes `model` as llama.cpp would convert it.
fn write_gguf(model: &FloatModel, path: &Path, options: Options) {
    let c = &model.config;
    let arch = match c.architecture {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
    };
    let k = |key: &str| format!("{arch}.{key}");
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String("tiny".into())),
        (k("vocab_size"), Value::U32(c.vocab_size as u32)),
        (k("context_length"), Value::U32(c.max_position_embeddings as u32)),
        (k("embedding_length"), Value::U32(c.hidden_size as u32)),
        (k("block_count"), Value::U32(c.num_hidden_layers as u32)),
        (k("feed_forward_length"), Value::U32(c.intermediate_size as u32)),
        (k("rope.dimension_count"), Value::U32(c.head_dim as u32)),
        (k("attention.head_count"), Value::U32(c.num_attention_heads as u32)),
        (k("attention.head_count_kv"), Value::U32(c.num_key_value_heads as u32)),
        (k("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(c.rms_norm_eps as f32)),
    ];
    let pre = if c.architecture == Architecture::Qwen2 { "qwen2" } else { "gpt-2" };
    metadata.extend(tokenizer_metadata(c.vocab_size, pre));
    metadata.retain(|(key, _)| !options.drop.contains(&key.as_str()));
    for (key, value) in options.set {
        match metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => metadata.push((key.to_string(), value)),
        }
    }

    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in model.weights.iter() {
        let gguf = gguf_name(name);
        let mut t = t.clone();
        if options.permute.unwrap_or(c.architecture == Architecture::Llama) {
            if gguf.ends_with("attn_q.weight") {
                t = permute_rows(&t, c.num_attention_heads).unwrap();
            } else if gguf.ends_with("attn_k.weight") {
                t = permute_rows(&t, c.num_key_value_heads).unwrap();
            }
        }
        // llama.cpp keeps 1-D tensors (norms, biases) in f32.
        let dtype = if t.rank() == 1 { GgmlDType::F32 } else { options.dtype };
        tensors.push((gguf, QTensor::quantize(&t, dtype).unwrap()));
    }
    for (name, t) in options.extra {
        tensors.push((name.to_string(), QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    let metadata_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata_refs, &tensor_refs).unwrap();
}

fn written(model: &FloatModel, options: Options) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(model, &path, options);
    (dir, path)
}

const PROMPT: [u32; 20] = [0, 17, 258, 42, 199, 3, 77, 123, 257, 5, 88, 240, 160, 31, 299, 9, 64, 111, 2, 270];

fn logits(model: &FloatModel) -> Tensor {
    drq_tests::float_logits(model, &PROMPT)
}

/// Everything but the f32-rounded epsilon must come back exactly.
fn assert_same_config(loaded: &ModelConfig, original: &ModelConfig) {
    assert!((loaded.rms_norm_eps - original.rms_norm_eps).abs() < 1e-12, "{loaded:?}");
    let loaded = ModelConfig { rms_norm_eps: original.rms_norm_eps, ..loaded.clone() };
    assert_eq!(&loaded, original);
}

const SAMPLE: &str = "Hello there, the theme of the day: <|endoftext|> bye";

fn check_roundtrip(original: &FloatModel) {
    let (_dir, path) = written(original, Options::default());
    let loaded = load(&path).unwrap();
    assert_same_config(&loaded.config, &original.config);
    assert_eq!(loaded.weights.len(), original.weights.len());
    assert_eq!(loaded.weights.contains("lm_head.weight"), !original.config.tie_word_embeddings);
    let diff = max_abs_diff(&logits(&loaded), &logits(original));
    assert!(diff < 1e-5, "{:?}: logits differ by {diff}", original.config.architecture);
    // Every tensor comes back bit for bit under its Hugging Face name.
    for (name, t) in original.weights.iter() {
        let back = loaded.weights.get(name, t.dims()).unwrap();
        assert_eq!(max_abs_diff(&back, t), 0.0, "{name}");
    }
    // The tokenizer rebuilt from `tokenizer.ggml.*` cuts text as the original does.
    let ids = |t: &tokenizers::Tokenizer| t.encode(SAMPLE, false).unwrap().get_ids().to_vec();
    let expected = ids(&original.tokenizer);
    assert!(expected.contains(&258) && expected.contains(&0), "the sample uses a merge and the special token");
    assert_eq!(ids(&loaded.tokenizer), expected);
    assert!(!loaded.add_bos);
}

#[test]
fn llama_tied_roundtrips_through_a_llama_cpp_gguf() {
    check_roundtrip(&tiny_model(Architecture::Llama, true, 21));
}

#[test]
fn llama_untied_roundtrips_through_a_llama_cpp_gguf() {
    check_roundtrip(&tiny_model(Architecture::Llama, false, 22));
}

#[test]
fn qwen2_roundtrips_with_biases_and_unpermuted_rows() {
    let original = tiny_model(Architecture::Qwen2, false, 23);
    check_roundtrip(&original);
    // Sensitivity: had the Q/K rows been permuted (as for llama), the loader, which leaves
    // qwen2 rows alone, would give other logits.
    let (_dir, path) = written(&original, Options { permute: Some(true), ..Default::default() });
    let permuted = load(&path).unwrap();
    let diff = max_abs_diff(&logits(&permuted), &logits(&original));
    assert!(diff > 1e-6, "permuted qwen2 rows went unnoticed ({diff})");
}

#[test]
fn the_q_k_permutation_is_what_the_loader_undoes() {
    // Sensitivity: a llama GGUF written without llama.cpp's permutation loads with the wrong
    // rows, and the logits show it.
    let original = tiny_model(Architecture::Llama, false, 24);
    let (_dir, path) = written(&original, Options { permute: Some(false), ..Default::default() });
    let loaded = load(&path).unwrap();
    let diff = max_abs_diff(&logits(&loaded), &logits(&original));
    assert!(diff > 1e-6, "un-permuting an unpermuted file should change the logits ({diff})");
    let q = "model.layers.0.self_attn.q_proj.weight";
    let shape = [64, 64];
    assert!(max_abs_diff(&loaded.weights.get(q, &shape).unwrap(), &original.weights.get(q, &shape).unwrap()) > 0.0);
}

#[test]
fn f16_and_q8_0_files_dequantize_close_to_the_original() {
    let original = tiny_model(Architecture::Llama, false, 25);
    let reference = logits(&original);
    for (dtype, weight_tol, logit_tol) in [(GgmlDType::F16, 1e-4, 1e-3), (GgmlDType::Q8_0, 1e-3, 1e-2)] {
        let (_dir, path) = written(&original, Options { dtype, ..Default::default() });
        let loaded = load(&path).unwrap();
        let mut worst = 0f32;
        for (name, t) in original.weights.iter() {
            worst = worst.max(max_abs_diff(&loaded.weights.get(name, t.dims()).unwrap(), t));
        }
        assert!(worst > 0.0 && worst < weight_tol, "{dtype:?}: weights off by {worst}");
        let diff = max_abs_diff(&logits(&loaded), &reference);
        assert!(diff < logit_tol, "{dtype:?}: logits off by {diff}");
    }
}

#[test]
fn a_gguf_path_is_recognised_and_loaded_as_a_source() {
    let original = tiny_model(Architecture::Llama, true, 26);
    let (_dir, path) = written(&original, Options::default());
    let source: ModelSource = path.to_str().unwrap().parse().unwrap();
    assert_eq!(source, ModelSource::Gguf(path.clone()));
    let (loaded, provenance) = model::source::load_float(&source).unwrap();
    assert_eq!(max_abs_diff(&logits(&loaded), &logits(&original)), 0.0);
    assert_eq!(provenance.sha256, model::source::sha256_files(&[path]).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Errors.

fn load_error(model: &FloatModel, options: Options) -> String {
    let (_dir, path) = written(model, options);
    match load(&path) {
        Ok(_) => panic!("the GGUF loaded"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn an_unsupported_architecture_is_named() {
    let model = tiny_model(Architecture::Llama, true, 27);
    let err = load_error(
        &model,
        Options { set: vec![("general.architecture", Value::String("gpt2".into()))], ..Default::default() },
    );
    assert!(err.contains("`gpt2`") && err.contains("architecture"), "{err}");
}

#[test]
fn a_missing_hyper_parameter_is_named() {
    let model = tiny_model(Architecture::Llama, true, 28);
    for key in [
        "llama.block_count",
        "llama.embedding_length",
        "llama.attention.layer_norm_rms_epsilon",
        "general.architecture",
    ] {
        let err = load_error(&model, Options { drop: vec![key], ..Default::default() });
        assert!(err.contains(key), "{key}: {err}");
    }
    // A block count that disagrees with the tensors.
    let err = load_error(&model, Options { set: vec![("llama.block_count", Value::U32(3))], ..Default::default() });
    assert!(err.contains("model.layers.2."), "{err}");
    // A mistyped one.
    let err = load_error(
        &model,
        Options { set: vec![("llama.block_count", Value::String("2".into()))], ..Default::default() },
    );
    assert!(err.contains("llama.block_count"), "{err}");
}

#[test]
fn unknown_tensors_and_rope_freqs_are_errors() {
    let model = tiny_model(Architecture::Llama, true, 29);
    let extra = Tensor::ones(8, candle_core::DType::F32, &Device::Cpu).unwrap();
    let err =
        load_error(&model, Options { extra: vec![("blk.0.attn_sinks.weight", extra.clone())], ..Default::default() });
    assert!(err.contains("blk.0.attn_sinks.weight"), "{err}");
    let err = load_error(&model, Options { extra: vec![("rope_freqs.weight", extra)], ..Default::default() });
    assert!(err.contains("rope_freqs"), "{err}");
}

#[test]
fn a_truncated_file_is_an_error_not_a_panic() {
    let model = tiny_model(Architecture::Llama, false, 30);
    let (dir, path) = written(&model, Options::default());
    let bytes = std::fs::read(&path).unwrap();
    // Inside the magic, the header, the metadata, the tensor infos, and the tensor data.
    for cut in [0, 3, 10, 100, 5_000, bytes.len() / 2, bytes.len() - 1] {
        let truncated = dir.path().join(format!("cut-{cut}.gguf"));
        std::fs::write(&truncated, &bytes[..cut]).unwrap();
        let result = std::panic::catch_unwind(|| load(&truncated).map(|_| ()));
        let result = result.unwrap_or_else(|_| panic!("loading a file cut at {cut} of {} bytes panicked", bytes.len()));
        let err = result.expect_err("a truncated file loaded");
        assert!(format!("{err:#}").contains(&truncated.display().to_string()), "{err:#}");
    }
}
