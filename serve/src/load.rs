//! What `--model` names, made into a checkpoint: a drq checkpoint is opened as it is; any other
//! model source (hub id, Hugging Face directory, GGUF, `default`) is quantized with a PTQ recipe
//! first and the result cached, keyed by the source's sha256 and the recipe, so the next start
//! is immediate.

use std::path::Path;

use anyhow::{Context, Result};
use model::checkpoint::Checkpoint;
use model::source::{self, ModelSource};
use quantize::model_ptq::quantize_with;
use quantize::recipe::{PtqRecipe, PtqSettings};
use quantize::write_checkpoint;
use sha2::{Digest, Sha256};

/// The PTQ settings for a float `--model`: the recipe at `config`, or every tool's default
/// ([`PtqRecipe::default_recipe`]). A recipe asking for Hessian-aware rounding is refused: it
/// needs calibration text, which quantizing on load does not have.
pub fn ptq_settings(config: Option<&Path>) -> Result<PtqSettings> {
    let recipe = match config {
        Some(path) => PtqRecipe::load(path)?,
        None => PtqRecipe::default_recipe(),
    };
    if let Some(g) = recipe.gptq()? {
        anyhow::bail!("the recipe asks for {g} rounding, which needs calibration text: make a checkpoint with drq-quantize --gptq and use that");
    }
    recipe.settings()
}

/// Opens `model` as a checkpoint, quantizing (and caching under `cache`) when it is a float
/// source.
pub fn open_or_quantize(model: &str, settings: &PtqSettings, cache: &Path) -> Result<Checkpoint> {
    let source: ModelSource = model.parse()?;
    if let ModelSource::Checkpoint(path) = &source {
        return Checkpoint::open(path);
    }
    tracing::info!("loading {source}");
    let (float, provenance) = source::load_float(&source)?;
    let key = {
        let mut h = Sha256::new();
        h.update(provenance.sha256.as_bytes());
        h.update(settings.to_string().as_bytes());
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
    let n = quantize::model_ptq::quantizable(&float.config, &settings.keep_float).len();
    let bar = cli::progress_bar(n as u64, "quantizing");
    let quantized = quantize_with(&float, settings, |name| {
        bar.set_prefix(name.to_string());
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    // Written to a temporary name and renamed: a crash never leaves a half-written cache entry.
    write_checkpoint(&path, &float, &provenance, &quantized)?;
    tracing::info!("quantized {source} ({settings}) into {}", path.display());
    Checkpoint::open(&path)
}
