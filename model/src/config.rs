//! Model configuration: one struct for every supported architecture, read from a Hugging Face
//! `config.json` or from GGUF metadata, and written back as `config.json` on export.

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

/// The decoder families this runtime implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3, SmolLM/SmolLM2, TinyLlama, Mistral: no attention biases.
    Llama,
    /// Qwen2/Qwen2.5: biases on the q, k and v projections.
    Qwen2,
}

impl Architecture {
    /// The Hugging Face `model_type` / `architectures` pair written on export.
    fn hf_names(self) -> (&'static str, &'static str) {
        match self {
            Architecture::Llama => ("llama", "LlamaForCausalLM"),
            Architecture::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        }
    }

    fn from_model_type(model_type: &str) -> Result<Self> {
        match model_type {
            "llama" | "mistral" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            other => {
                bail!("unsupported architecture `{other}`: drq supports the Llama family (llama, mistral) and qwen2")
            }
        }
    }
}

/// Llama 3.1-style frequency-dependent RoPE scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Everything the runtime needs to build a model. Field names follow Hugging Face's
/// `config.json` so the struct round-trips through export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (always true for Qwen2, optional for Llama).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// The subset of a Hugging Face `config.json` drq reads.
#[derive(Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<serde_json::Value>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_max_positions() -> usize {
    2048
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(text).context("invalid config.json")?;
        let architecture = Architecture::from_model_type(&hf.model_type)?;
        let rope_scaling = match &hf.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("");
                match kind {
                    "llama3" => Some(
                        serde_json::from_value::<Llama3RopeScaling>(v.clone())
                            .context("invalid llama3 rope_scaling in config.json")?,
                    ),
                    "default" => None,
                    other => bail!("unsupported rope_scaling type `{other}` in config.json"),
                }
            }
        };
        let eos_token_ids = match hf.eos_token_id {
            None | Some(serde_json::Value::Null) => vec![],
            Some(serde_json::Value::Number(n)) => {
                vec![n.as_u64().context("eos_token_id must be a non-negative integer")? as u32]
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().map(|x| x as u32))
                .collect::<Option<Vec<_>>>()
                .context("eos_token_id must be a list of non-negative integers")?,
            Some(other) => bail!("invalid eos_token_id {other} in config.json"),
        };
        let num_key_value_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        ensure!(hf.num_attention_heads > 0, "num_attention_heads must be positive");
        let config = ModelConfig {
            architecture,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads,
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads),
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            attention_bias: architecture == Architecture::Qwen2 || hf.attention_bias.unwrap_or(false),
            bos_token_id: hf.bos_token_id,
            eos_token_ids,
        };
        config.validate()?;
        Ok(config)
    }

    /// Writes a Hugging Face `config.json` that [`ModelConfig::from_hf_json`] reads back.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (model_type, class) = self.architecture.hf_names();
        let mut v = serde_json::json!({
            "architectures": [class],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if let Some(bos) = self.bos_token_id {
            v["bos_token_id"] = bos.into();
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => v["eos_token_id"] = (*one).into(),
            many => v["eos_token_id"] = many.into(),
        }
        if self.architecture == Architecture::Qwen2 {
            // drq attends to the whole context: say so in the keys Qwen2 readers expect.
            v["use_sliding_window"] = false.into();
            v["sliding_window"] = self.max_position_embeddings.into();
            v["max_window_layers"] = self.num_hidden_layers.into();
        }
        if let Some(rs) = &self.rope_scaling {
            let mut r = serde_json::to_value(rs).expect("plain struct serializes");
            r["rope_type"] = "llama3".into();
            v["rope_scaling"] = r;
        }
        v
    }

    /// Reads the configuration from GGUF metadata (`general.architecture` and its keys).
    /// `vocab_size` falls back to the tokenizer's token count, `output.weight`'s absence
    /// (`has_output`) means tied embeddings.
    pub fn from_gguf(metadata: &HashMap<String, gguf_file::Value>, has_output: bool) -> Result<Self> {
        let arch_name = gguf_string(metadata, "general.architecture")?;
        let architecture = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => bail!("unsupported GGUF architecture `{other}`: drq reads llama and qwen2 GGUF files"),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let usize_of = |k: &str| -> Result<usize> { Ok(gguf_u64(metadata, &key(k))? as usize) };
        let hidden_size = usize_of("embedding_length")?;
        let num_attention_heads = usize_of("attention.head_count")?;
        ensure!(num_attention_heads > 0, "GGUF attention.head_count must be positive");
        let num_key_value_heads = match metadata.get(&key("attention.head_count_kv")) {
            Some(_) => usize_of("attention.head_count_kv")?,
            None => num_attention_heads,
        };
        let head_dim = match metadata.get(&key("attention.key_length")) {
            Some(_) => usize_of("attention.key_length")?,
            None => hidden_size / num_attention_heads,
        };
        let vocab_size = match metadata.get(&key("vocab_size")) {
            Some(_) => usize_of("vocab_size")?,
            None => metadata
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
                .context("GGUF has neither a vocab_size nor tokenizer.ggml.tokens")?,
        };
        let rope_theta = match metadata.get(&key("rope.freq_base")) {
            Some(v) => v.to_f32().context("rope.freq_base must be a float")? as f64,
            None => default_rope_theta(),
        };
        let rms_norm_eps = gguf_f64(metadata, &key("attention.layer_norm_rms_epsilon"))?;
        let optional_u32 = |k: &str| metadata.get(k).and_then(|v| v.to_u32().ok());
        let config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            num_hidden_layers: usize_of("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling: None,
            max_position_embeddings: usize_of("context_length")?,
            tie_word_embeddings: !has_output,
            attention_bias: architecture == Architecture::Qwen2,
            bos_token_id: optional_u32("tokenizer.ggml.bos_token_id"),
            eos_token_ids: optional_u32("tokenizer.ggml.eos_token_id").into_iter().collect(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the invariants the runtime relies on.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            ensure!(value > 0, "model config: {name} must be positive");
        }
        ensure!(
            self.num_attention_heads.is_multiple_of(self.num_key_value_heads),
            "model config: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
            self.num_attention_heads,
            self.num_key_value_heads
        );
        ensure!(self.head_dim.is_multiple_of(2), "model config: head_dim ({}) must be even for RoPE", self.head_dim);
        ensure!(
            self.rms_norm_eps > 0.0 && self.rope_theta > 0.0,
            "model config: rms_norm_eps and rope_theta must be positive"
        );
        Ok(())
    }
}

fn gguf_value<'a>(metadata: &'a HashMap<String, gguf_file::Value>, key: &str) -> Result<&'a gguf_file::Value> {
    metadata.get(key).with_context(|| format!("GGUF metadata is missing `{key}`"))
}

fn gguf_string(metadata: &HashMap<String, gguf_file::Value>, key: &str) -> Result<String> {
    Ok(gguf_value(metadata, key)?
        .to_string()
        .map_err(|_| anyhow::anyhow!("GGUF metadata `{key}` must be a string"))?
        .clone())
}

/// Integer metadata of any width (writers differ in which they use).
fn gguf_u64(metadata: &HashMap<String, gguf_file::Value>, key: &str) -> Result<u64> {
    use gguf_file::Value as V;
    match gguf_value(metadata, key)? {
        V::U8(v) => Ok(*v as u64),
        V::U16(v) => Ok(*v as u64),
        V::U32(v) => Ok(*v as u64),
        V::U64(v) => Ok(*v),
        V::I8(v) if *v >= 0 => Ok(*v as u64),
        V::I16(v) if *v >= 0 => Ok(*v as u64),
        V::I32(v) if *v >= 0 => Ok(*v as u64),
        V::I64(v) if *v >= 0 => Ok(*v as u64),
        other => bail!("GGUF metadata `{key}` must be a non-negative integer, found {other:?}"),
    }
}

fn gguf_f64(metadata: &HashMap<String, gguf_file::Value>, key: &str) -> Result<f64> {
    use gguf_file::Value as V;
    match gguf_value(metadata, key)? {
        V::F32(v) => Ok(*v as f64),
        V::F64(v) => Ok(*v),
        other => bail!("GGUF metadata `{key}` must be a float, found {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_json_round_trips() {
        let text = r#"{"model_type":"qwen2","vocab_size":100,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-6,
            "rope_theta":1000000.0,"tie_word_embeddings":false,"eos_token_id":[5,6],
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let c = ModelConfig::from_hf_json(text).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen2);
        assert!(c.attention_bias);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.eos_token_ids, vec![5, 6]);
        let back = ModelConfig::from_hf_json(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn rejects_unknown_architecture_and_bad_heads() {
        let base = r#"{"model_type":"MT","vocab_size":10,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":HEADS,"num_key_value_heads":3,"rms_norm_eps":1e-5}"#;
        let err = ModelConfig::from_hf_json(&base.replace("MT", "gpt_neox").replace("HEADS", "3")).unwrap_err();
        assert!(err.to_string().contains("gpt_neox"), "{err}");
        let err = ModelConfig::from_hf_json(&base.replace("MT", "llama").replace("HEADS", "4")).unwrap_err();
        assert!(err.to_string().contains("multiple of num_key_value_heads"), "{err}");
    }
}
