//! Models in the Hugging Face layout: `config.json`, `tokenizer.json`, optional
//! `tokenizer_config.json`, and `model.safetensors` or shards listed in
//! `model.safetensors.index.json`. Used for local directories and hub downloads alike.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use tokenizers::Tokenizer;

use super::FloatModel;
use crate::config::ModelConfig;
use crate::weights::{Weights, LM_HEAD};

/// The files of a model in the Hugging Face layout.
#[derive(Debug, Clone)]
pub struct HfFiles {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub weights: Vec<PathBuf>,
}

impl HfFiles {
    /// Finds the files of a local directory.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let config = dir.join("config.json");
        let tokenizer = dir.join("tokenizer.json");
        for required in [&config, &tokenizer] {
            if !required.is_file() {
                bail!("{} is not a Hugging Face model directory: {} is missing", dir.display(), required.display());
            }
        }
        let tokenizer_config = Some(dir.join("tokenizer_config.json")).filter(|p| p.is_file());
        let single = dir.join("model.safetensors");
        let weights = if single.is_file() {
            vec![single]
        } else {
            let index = dir.join("model.safetensors.index.json");
            if !index.is_file() {
                bail!("{}: neither model.safetensors nor model.safetensors.index.json found", dir.display());
            }
            shard_names(&index)?.into_iter().map(|name| dir.join(name)).collect()
        };
        Ok(Self { config, tokenizer, tokenizer_config, weights })
    }
}

/// The shard file names of a `model.safetensors.index.json`, deduplicated, in first-use order.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no `weight_map` object", index.display()))?;
    let mut names: Vec<String> = Vec::new();
    for file in map.values() {
        let file =
            file.as_str().with_context(|| format!("{}: weight_map values must be file names", index.display()))?;
        if file.contains('/') || file.contains("..") {
            bail!("{}: shard name `{file}` must be a plain file name", index.display());
        }
        if !names.iter().any(|n| n == file) {
            names.push(file.to_string());
        }
    }
    Ok(names)
}

/// Loads a float model from Hugging Face files.
pub fn load(files: &HfFiles) -> Result<FloatModel> {
    let config_text =
        std::fs::read_to_string(&files.config).with_context(|| format!("cannot read {}", files.config.display()))?;
    let config =
        ModelConfig::from_hf_json(&config_text).with_context(|| format!("reading {}", files.config.display()))?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer)
        .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", files.tokenizer.display()))?;
    let (chat_template, add_bos) = match &files.tokenizer_config {
        Some(path) => read_tokenizer_config(path)?,
        None => (None, false),
    };
    let mut weights = Weights::new();
    for file in &files.weights {
        let tensors = candle_core::safetensors::load(file, &Device::Cpu)
            .with_context(|| format!("cannot read safetensors file {}", file.display()))?;
        for (name, tensor) in tensors {
            // Buffers some exporters save, and the duplicate of a tied embedding.
            if name.ends_with("rotary_emb.inv_freq") || (config.tie_word_embeddings && name == LM_HEAD) {
                continue;
            }
            weights.insert(name, tensor)?;
        }
    }
    weights.validate(&config).with_context(|| {
        format!(
            "{}: tensors do not match config.json",
            files.weights.first().map(|p| p.display().to_string()).unwrap_or_default()
        )
    })?;
    Ok(FloatModel { config, tokenizer, add_bos, chat_template, weights })
}

/// The chat template and `add_bos_token` of a `tokenizer_config.json`.
fn read_tokenizer_config(path: &Path) -> Result<(Option<String>, bool)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let template = json.get("chat_template").and_then(|t| t.as_str()).map(str::to_string);
    let add_bos = json.get("add_bos_token").and_then(|b| b.as_bool()).unwrap_or(false);
    Ok((template, add_bos))
}
