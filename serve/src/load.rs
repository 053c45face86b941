//! What `--model` names, made into a checkpoint: a drq checkpoint is opened as it is; any other
//! model source (hub id, Hugging Face directory, GGUF, `default`) is quantized with a PTQ recipe
//! first and the result cached, keyed by the source's sha256 and the recipe, so the next start
//! is immediate.

use std::path::Path;

use anyhow::{Context, Result};
use model::checkpoint::Checkpoint;
use model::source::{self, ModelSource};
use quantize::recipe::PtqRecipe;
use quantize::{quantize_model, write_checkpoint, QuantSpec};
use sha2::{Digest, Sha256};

/// The PTQ settings for a float `--model`: the recipe at `config`, or group:128 with bits 8,4,2
/// (on SmolLM2 W8 +0.44% and W4 43.7 perplexity vs +0.92% and 75.0 per channel, at the same
/// kernel speed). A recipe asking for Hessian-aware rounding is refused: it needs calibration
/// text, which quantizing on load does not have.
pub fn ptq_settings(config: Option<&Path>) -> Result<(QuantSpec, Vec<String>)> {
    let recipe = match config {
        Some(path) => PtqRecipe::load(path)?,
        None => PtqRecipe { granularity: Some("group:128".to_string()), ..PtqRecipe::default() },
    };
    if let Some(g) = recipe.gptq()? {
        anyhow::bail!("the recipe asks for {g} rounding, which needs calibration text: make a checkpoint with drq-quantize --gptq and use that");
    }
    recipe.resolve()
}

/// Opens `model` as a checkpoint, quantizing (and caching under `cache`) when it is a float
/// source.
pub fn open_or_quantize(model: &str, spec: &QuantSpec, keep_float: &[String], cache: &Path) -> Result<Checkpoint> {
    let source: ModelSource = model.parse()?;
    if let ModelSource::Checkpoint(path) = &source {
        return Checkpoint::open(path);
    }
    tracing::info!("loading {source}");
    let (float, provenance) = source::load_float(&source)?;
    let key = {
        let mut h = Sha256::new();
        h.update(provenance.sha256.as_bytes());
        h.update(format!("{spec}|keep_float={}", keep_float.join(",")).as_bytes());
        let digest = h.finalize();
        digest.iter().take(12).map(|b| format!("{b:02x}")).collect::<String>()
    };
    let path = cache.join(format!("{key}.drq.safetensors"));
    if path.is_file() {
        match Checkpoint::open(&path) {
            Ok(c) => {
                tracing::info!("using the cached quantization {}", path.display());
                return Ok(c);
            }
            Err(e) => tracing::warn!("re-quantizing: the cached {} is unusable: {e:#}", path.display()),
        }
    }
    std::fs::create_dir_all(cache).with_context(|| format!("cannot create the cache directory {}", cache.display()))?;
    let n = quantize::model_ptq::quantizable(&float.config, keep_float).len();
    let bar = cli::progress_bar(n as u64, "quantizing");
    let quantized = quantize_model(&float, spec, keep_float, |name| {
        bar.set_prefix(name.to_string());
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    // Written to a temporary name and renamed: a crash never leaves a half-written cache entry.
    write_checkpoint(&path, &float, &provenance, &quantized)?;
    tracing::info!("quantized {source} ({spec}) into {}", path.display());
    Checkpoint::open(&path)
}
