//! Hugging Face hub downloads through `hf-hub`.
//!
//! `hf-hub` 0.4.3 reads only `HF_HOME`, `HF_ENDPOINT` and the `$HF_HOME/token` file by itself, and
//! panics when it cannot find a home directory. [`HubSettings::from_env`] resolves the rest of the
//! environment the way Python's `huggingface_hub` does (`HF_HUB_CACHE`, `XDG_CACHE_HOME`,
//! `HF_TOKEN`, `HF_HUB_OFFLINE`, `HF_HUB_DISABLE_PROGRESS_BARS`) and hands `hf-hub` explicit values.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const DEFAULT_REVISION: &str = "main";
const CONFIG: &str = "config.json";
const TOKENIZER: &str = "tokenizer.json";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
const SAFETENSORS: &str = "model.safetensors";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
/// Resumed attempts after a body download breaks off (`hf-hub` keeps the `.part` file).
const DOWNLOAD_RETRIES: usize = 2;
/// What error messages call the repository info request.
const METADATA: &str = "repository metadata";

/// A model repository in the Hugging Face layout, on local disk (hub cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFiles {
    pub repo_id: String,
    /// The commit the files come from.
    pub commit: Option<String>,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    /// `model.safetensors`, or the shards of `model.safetensors.index.json` in name order.
    pub weights: Vec<PathBuf>,
}

/// Where the hub is, where its cache lives and how to authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// Hub base URL (`HF_ENDPOINT`), without a trailing slash.
    pub endpoint: String,
    /// The hub cache: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// Bearer token: `HF_TOKEN`, else the `token` file in `HF_HOME` that `hf auth login` writes.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: files come from the cache only, without any request.
    pub offline: bool,
    /// Download progress bars (off with `HF_HUB_DISABLE_PROGRESS_BARS`).
    pub progress: bool,
}

impl HubSettings {
    /// Settings from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Settings from an environment given as a lookup function; empty values count as unset.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |name: &str| var(name).filter(|value| !value.is_empty());
        let hf_home = match (var("HF_HOME"), var("XDG_CACHE_HOME"), var("HOME")) {
            (Some(home), _, _) => PathBuf::from(home),
            (None, Some(xdg), _) => Path::new(&xdg).join("huggingface"),
            (None, None, Some(home)) => Path::new(&home).join(".cache").join("huggingface"),
            (None, None, None) => {
                bail!("cannot locate the Hugging Face cache: set HF_HOME, XDG_CACHE_HOME or HOME")
            }
        };
        let cache_dir = var("HF_HUB_CACHE").map_or_else(|| hf_home.join("hub"), PathBuf::from);
        let token = var("HF_TOKEN")
            .or_else(|| std::fs::read_to_string(hf_home.join("token")).ok())
            .map(|token| token.trim().to_string())
            .filter(|token| !token.is_empty());
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Ok(Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            cache_dir,
            token,
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v)),
            progress: !var("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| is_true(&v)),
        })
    }
}

/// `huggingface_hub`'s reading of boolean environment variables.
fn is_true(value: &str) -> bool {
    ["1", "ON", "YES", "TRUE"].contains(&value.trim().to_ascii_uppercase().as_str())
}

/// Why a hub request failed, for callers that react differently (e.g. fall back to PyPI only
/// when the hub is unreachable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error("hub repo {repo}: not found at {endpoint} (a private or gated repo also needs HF_TOKEN)")]
    RepoNotFound { repo: String, endpoint: String },
    #[error("hub repo {repo}: revision {revision} not found")]
    RevisionNotFound { repo: String, revision: String },
    #[error("hub repo {repo}: {file} not found at revision {revision}")]
    FileNotFound { repo: String, revision: String, file: String },
    #[error("hub repo {repo}: access to {file} denied (HTTP {status}{detail}); set HF_TOKEN to a token with access")]
    AccessDenied { repo: String, file: String, status: u16, detail: String },
    #[error("hub repo {repo}: {file}: HTTP {status} from {endpoint}{detail}")]
    Http { repo: String, file: String, endpoint: String, status: u16, detail: String },
    #[error("hub repo {repo}: {file}: cannot reach {endpoint}: {cause}")]
    Unreachable { repo: String, file: String, endpoint: String, cause: String },
    #[error("hub repo {repo}@{revision}: {file} is not in the hub cache {cache} and HF_HUB_OFFLINE is set")]
    NotCached { repo: String, revision: String, file: String, cache: PathBuf },
}

impl HubError {
    /// The hub could not be reached or failed on its side: a cached copy or another source may do.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Http { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// Downloads (or finds in the cache) a model's config, tokenizer and safetensors weights,
/// with the settings of [`HubSettings::from_env`]. `revision` defaults to `main`.
pub fn fetch_hub_model(repo_id: &str, revision: Option<&str>) -> Result<HubFiles> {
    fetch_hub_model_with(&HubSettings::from_env()?, repo_id, revision)
}

/// [`fetch_hub_model`] with explicit settings. Online, one metadata request pins the revision to a
/// commit and lists the repo; files of that commit already in the cache are not downloaded again.
/// If the hub is unreachable, a complete cached snapshot of the revision is used instead.
pub fn fetch_hub_model_with(settings: &HubSettings, repo_id: &str, revision: Option<&str>) -> Result<HubFiles> {
    check_repo_id(repo_id)?;
    let revision = revision.unwrap_or(DEFAULT_REVISION);
    check_revision(repo_id, revision)?;
    // Absolute, so returned paths stay valid when the working directory changes.
    let cache_dir = std::path::absolute(&settings.cache_dir)
        .with_context(|| format!("hub cache directory {}", settings.cache_dir.display()))?;
    let cache = Cache::new(cache_dir);
    if settings.offline {
        return from_cache(&cache, repo_id, revision).map_err(Into::into);
    }
    match fetch_online(settings, &cache, repo_id, revision) {
        Err(err) if err.downcast_ref::<HubError>().is_some_and(HubError::is_unreachable) => {
            match from_cache(&cache, repo_id, revision) {
                Ok(files) => {
                    tracing::warn!(repo = repo_id, revision, "{err:#}; using the cached snapshot");
                    Ok(files)
                }
                Err(_) => Err(err),
            }
        }
        result => result,
    }
}

fn fetch_online(settings: &HubSettings, cache: &Cache, repo_id: &str, revision: &str) -> Result<HubFiles> {
    let api = ApiBuilder::from_cache(cache.clone())
        .with_endpoint(settings.endpoint.clone())
        .with_token(settings.token.clone())
        .with_progress(settings.progress)
        .with_retries(DOWNLOAD_RETRIES)
        .build()
        .with_context(|| format!("hub repo {repo_id}: building the HTTP client"))?;
    let ctx = Ctx { settings, repo_id, revision };
    let info = api.repo(model_repo(repo_id, revision)).info().map_err(|err| ctx.error(METADATA, err))?;
    if !is_commit_hash(&info.sha) {
        bail!("hub repo {repo_id}: the hub reported an invalid commit {:?}", info.sha);
    }
    let commit = info.sha;
    tracing::info!(repo = repo_id, revision, commit = %commit, "resolved hub revision");
    let listed: HashSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let fetcher = Fetcher { api: &api, cache, ctx, commit: &commit };

    let config = fetcher.get(CONFIG)?;
    let tokenizer = fetcher.get(TOKENIZER)?;
    // Not every repo has one; the listing says so without a 404 round trip.
    let tokenizer_config = if listed.contains(TOKENIZER_CONFIG) { Some(fetcher.get(TOKENIZER_CONFIG)?) } else { None };
    let weights = if listed.contains(SAFETENSORS) {
        vec![fetcher.get(SAFETENSORS)?]
    } else if listed.contains(SAFETENSORS_INDEX) {
        let index = fetcher.get(SAFETENSORS_INDEX)?;
        shard_names(repo_id, &index)?.iter().map(|shard| fetcher.get(shard)).collect::<Result<_>>()?
    } else {
        bail!("hub repo {repo_id}@{revision}: no {SAFETENSORS} or {SAFETENSORS_INDEX}");
    };
    // `hf-hub` records only `refs/<commit>` for a pinned download; the requested revision must
    // point at the commit too, for offline use.
    cache
        .repo(model_repo(repo_id, revision))
        .create_ref(&commit)
        .with_context(|| format!("hub repo {repo_id}: recording ref {revision} in the cache"))?;
    Ok(HubFiles { repo_id: repo_id.to_string(), commit: Some(commit), config, tokenizer, tokenizer_config, weights })
}

/// Downloads files of one commit, reusing the cached snapshot.
struct Fetcher<'a> {
    api: &'a Api,
    cache: &'a Cache,
    ctx: Ctx<'a>,
    commit: &'a str,
}

impl Fetcher<'_> {
    fn get(&self, file: &str) -> Result<PathBuf> {
        let repo_id = self.ctx.repo_id;
        let path = snapshot_dir(self.cache, repo_id, self.commit).join(file);
        if path.exists() {
            tracing::debug!(repo = repo_id, file, "hub cache hit");
            return Ok(path);
        }
        // A link whose blob was deleted would make `hf-hub`'s symlink creation fail.
        if path.symlink_metadata().is_ok() {
            std::fs::remove_file(&path)
                .with_context(|| format!("hub repo {repo_id}: removing dangling {}", path.display()))?;
        }
        tracing::info!(repo = repo_id, file, commit = self.commit, "downloading from the hub");
        self.api.repo(model_repo(repo_id, self.commit)).download(file).map_err(|err| self.ctx.error(file, err))
    }
}

/// What a request was about, to turn `hf-hub` errors into [`HubError`]s.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    settings: &'a HubSettings,
    repo_id: &'a str,
    revision: &'a str,
}

impl Ctx<'_> {
    fn error(&self, file: &str, err: ApiError) -> anyhow::Error {
        let (repo, endpoint) = (self.repo_id.to_string(), self.settings.endpoint.clone());
        let request = match err {
            ApiError::RequestError(request) => *request,
            ApiError::TooManyRetries(last) => return self.error(file, *last),
            // `info()` reports a body that is not the expected JSON as an I/O error.
            ApiError::IoError(io) if file == METADATA => {
                return anyhow!("hub repo {repo}: invalid {METADATA} from {endpoint}: {io}")
            }
            other => return anyhow!("hub repo {repo}: {file}: {other}"),
        };
        let response = match request {
            ureq::Error::Transport(transport) => {
                let cause = transport.to_string();
                return HubError::Unreachable { repo, file: file.to_string(), endpoint, cause }.into();
            }
            ureq::Error::Status(_, response) => response,
        };
        let status = response.status();
        let code = response.header("x-error-code").unwrap_or_default().to_string();
        let detail = response.header("x-error-message").map_or_else(String::new, |message| format!(": {message}"));
        let file = file.to_string();
        let revision = self.revision.to_string();
        // The hub answers 401 for repos that do not exist (so as not to reveal private ones).
        match (status, code.as_str()) {
            (_, "RepositoryNotFound") => HubError::RepoNotFound { repo, endpoint },
            (_, "RevisionNotFound") => HubError::RevisionNotFound { repo, revision },
            (_, "EntryNotFound") => HubError::FileNotFound { repo, revision, file },
            (_, "GatedRepo") | (401 | 403, _) => HubError::AccessDenied { repo, file, status, detail },
            (404, _) if file == METADATA => HubError::RepoNotFound { repo, endpoint },
            (404, _) => HubError::FileNotFound { repo, revision, file },
            _ => HubError::Http { repo, file, endpoint, status, detail },
        }
        .into()
    }
}

/// The files of a revision from the cache alone.
fn from_cache(cache: &Cache, repo_id: &str, revision: &str) -> Result<HubFiles, HubError> {
    let not_cached = |file: &str| HubError::NotCached {
        repo: repo_id.to_string(),
        revision: revision.to_string(),
        file: file.to_string(),
        cache: cache.path().clone(),
    };
    let commit = cached_commit(cache, repo_id, revision).ok_or_else(|| not_cached(CONFIG))?;
    let dir = snapshot_dir(cache, repo_id, &commit);
    let file = |name: &str| Some(dir.join(name)).filter(|path| path.exists());
    let require = |name: &str| file(name).ok_or_else(|| not_cached(name));
    let weights = match (file(SAFETENSORS), file(SAFETENSORS_INDEX)) {
        (Some(single), _) => vec![single],
        (None, Some(index)) => shard_names(repo_id, &index)
            .map_err(|_| not_cached(SAFETENSORS_INDEX))?
            .iter()
            .map(|shard| require(shard))
            .collect::<Result<_, _>>()?,
        (None, None) => return Err(not_cached(SAFETENSORS)),
    };
    tracing::info!(repo = repo_id, revision, commit = %commit, "using the hub cache");
    Ok(HubFiles {
        repo_id: repo_id.to_string(),
        config: require(CONFIG)?,
        tokenizer: require(TOKENIZER)?,
        tokenizer_config: file(TOKENIZER_CONFIG),
        weights,
        commit: Some(commit),
    })
}

/// The commit a revision points to in the cache; a commit hash stands for itself, since
/// Python's `huggingface_hub` writes no ref for it.
fn cached_commit(cache: &Cache, repo_id: &str, revision: &str) -> Option<String> {
    let refs = repo_dir(cache, repo_id).join("refs").join(revision);
    match std::fs::read_to_string(refs) {
        Ok(commit) => Some(commit.trim().to_string()).filter(|c| is_commit_hash(c)),
        Err(_) => is_commit_hash(revision).then(|| revision.to_string()),
    }
}

fn model_repo(repo_id: &str, revision: &str) -> Repo {
    Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string())
}

fn repo_dir(cache: &Cache, repo_id: &str) -> PathBuf {
    cache.path().join(model_repo(repo_id, DEFAULT_REVISION).folder_name())
}

fn snapshot_dir(cache: &Cache, repo_id: &str, commit: &str) -> PathBuf {
    repo_dir(cache, repo_id).join("snapshots").join(commit)
}

/// The distinct shard files of a safetensors index, sorted by name.
fn shard_names(repo_id: &str, index: &Path) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let context = || format!("hub repo {repo_id}: reading {}", index.display());
    let text = std::fs::read_to_string(index).with_context(context)?;
    let index: Index = serde_json::from_str(&text).with_context(context)?;
    let shards: BTreeSet<String> = index.weight_map.into_values().collect();
    if shards.is_empty() {
        bail!("hub repo {repo_id}: {SAFETENSORS_INDEX} lists no weights");
    }
    for shard in &shards {
        // Shard names become cache paths: refuse anything that could leave the snapshot.
        if !is_relative_path(shard) {
            bail!("hub repo {repo_id}: {SAFETENSORS_INDEX} names an invalid shard {shard:?}");
        }
    }
    Ok(shards.into_iter().collect())
}

/// `owner/name` or `name` as the hub allows them; anything else could escape the cache directory.
fn check_repo_id(repo_id: &str) -> Result<()> {
    let parts: Vec<&str> = repo_id.split('/').collect();
    let valid_part = |part: &&str| {
        !part.is_empty()
            && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !part.starts_with(['-', '.'])
            && !part.ends_with(['-', '.'])
    };
    let valid = parts.len() <= 2
        && parts.iter().all(valid_part)
        && !repo_id.contains("--")
        && !repo_id.contains("..")
        && repo_id.len() <= 96;
    if !valid {
        bail!("invalid hub repo id {repo_id:?} (expected `owner/name`)");
    }
    Ok(())
}

/// Branch, tag or commit: it names a file under `refs/`, so `..` and odd characters are refused.
fn check_revision(repo_id: &str, revision: &str) -> Result<()> {
    let chars_ok = revision.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if !chars_ok || !is_relative_path(revision) {
        bail!("hub repo {repo_id}: invalid revision {revision:?}");
    }
    Ok(())
}

/// A non-empty `/`-separated relative path without `.` or `..` components.
fn is_relative_path(path: &str) -> bool {
    !path.contains('\\') && path.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
