//! Writes a float model as a Hugging Face directory (`config.json`, `tokenizer.json`,
//! `tokenizer_config.json`, `model.safetensors` in f32), which [`crate::source::hf_dir`] and
//! Hugging Face transformers read back.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::source::FloatModel;

/// Writes `model` into the new directory `dir`. The files are written into a temporary sibling
/// directory that is renamed into place at the end, so `dir` is either complete or absent.
pub fn write_hf_dir(model: &FloatModel, dir: &Path) -> Result<()> {
    if dir.exists() {
        bail!("{} already exists; export writes a new directory", dir.display());
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".drq-export-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a temporary directory in {}", parent.display()))?;

    let config = serde_json::to_string_pretty(&model.config.to_hf_json())?;
    std::fs::write(tmp.path().join("config.json"), config)?;
    model
        .tokenizer
        .save(tmp.path().join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("cannot write tokenizer.json: {e}"))?;
    let mut tokenizer_config = serde_json::json!({ "add_bos_token": model.add_bos });
    if let Some(template) = &model.chat_template {
        tokenizer_config["chat_template"] = template.clone().into();
    }
    let token = |id: Option<u32>| id.and_then(|i| model.tokenizer.id_to_token(i));
    if let Some(bos) = token(model.config.bos_token_id) {
        tokenizer_config["bos_token"] = bos.into();
    }
    if let Some(eos) = token(model.config.eos_token_ids.first().copied()) {
        tokenizer_config["eos_token"] = eos.into();
    }
    std::fs::write(tmp.path().join("tokenizer_config.json"), serde_json::to_string_pretty(&tokenizer_config)?)?;
    let tensors: HashMap<String, candle_core::Tensor> =
        model.weights.iter().map(|(name, t)| (name.clone(), t.clone())).collect();
    candle_core::safetensors::save(&tensors, tmp.path().join("model.safetensors"))
        .context("cannot write model.safetensors")?;

    let tmp = tmp.keep();
    std::fs::rename(&tmp, dir).with_context(|| {
        let _ = std::fs::remove_dir_all(&tmp);
        format!("cannot move the export into {}", dir.display())
    })?;
    Ok(())
}
