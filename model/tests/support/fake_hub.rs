//! A fake Hugging Face hub that answers the requests `hf-hub` 0.4.3 makes the way huggingface.co
//! does: `GET /api/models/{repo}/revision/{rev}` for the commit and file list, and
//! `GET /{repo}/resolve/{rev}/{file}` with `Range`, answered with `x-repo-commit`, `etag` and
//! `content-range`; LFS files (`*.safetensors`) redirect to an absolute CDN URL with
//! `x-linked-etag` (the sha256), and the CDN serves the bytes. Unknown repos, and private repos
//! without the right bearer token, get the hub's 401 `RepositoryNotFound`.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use sha2::{Digest, Sha256};

use super::server::{Recorded, Server};

pub struct FakeFile {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl FakeFile {
    pub fn new(name: &str, bytes: impl Into<Vec<u8>>) -> Self {
        Self { name: name.to_string(), bytes: bytes.into() }
    }

    /// Stored in Git LFS, as weights are on the hub.
    fn is_lfs(&self) -> bool {
        self.name.ends_with(".safetensors")
    }

    pub fn sha256(&self) -> String {
        sha256_hex(&self.bytes)
    }
}

pub struct FakeRepo {
    pub id: String,
    /// 40 hex digits, derived from the contents.
    pub commit: String,
    pub files: Vec<FakeFile>,
    /// Bearer token a private repo requires.
    pub token: Option<String>,
}

impl FakeRepo {
    pub fn new(id: &str, files: Vec<FakeFile>) -> Self {
        let mut hasher = Sha256::new();
        for file in &files {
            hasher.update(file.name.as_bytes());
            hasher.update(&file.bytes);
        }
        let commit = format!("{:x}", hasher.finalize())[..40].to_string();
        Self { id: id.to_string(), commit, files, token: None }
    }

    pub fn private(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    pub fn file(&self, name: &str) -> &FakeFile {
        self.files.iter().find(|f| f.name == name).expect("file of the fake repo")
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Starts a hub serving `repos`.
pub fn start(repos: Vec<FakeRepo>) -> Server {
    Server::start(move |request| handle(&repos, request))
}

fn handle(repos: &[FakeRepo], request: &Recorded) -> Response {
    let path = request.path.as_str();
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((id, revision)) = rest.rsplit_once("/revision/") else {
            return hub_error(StatusCode::NOT_FOUND, "EntryNotFound", "no such endpoint");
        };
        let Some(repo) = authorized(repos, id, request) else {
            return repo_not_found();
        };
        if !has_revision(repo, revision) {
            return hub_error(StatusCode::NOT_FOUND, "RevisionNotFound", "Invalid rev id");
        }
        let siblings: Vec<_> = repo.files.iter().map(|f| serde_json::json!({ "rfilename": f.name })).collect();
        let body = serde_json::json!({ "id": repo.id, "sha": repo.commit, "siblings": siblings });
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
    }
    if let Some(sha) = path.strip_prefix("/cdn/") {
        // The CDN takes presigned URLs, not the hub's token.
        let file = repos.iter().flat_map(|r| &r.files).find(|f| f.sha256() == sha);
        return match file {
            Some(file) => serve_range(&file.bytes, request, Response::builder()),
            None => hub_error(StatusCode::NOT_FOUND, "EntryNotFound", "no such object"),
        };
    }
    let Some((id, rest)) = path.trim_start_matches('/').split_once("/resolve/") else {
        return hub_error(StatusCode::NOT_FOUND, "EntryNotFound", "no such endpoint");
    };
    let Some(repo) = authorized(repos, id, request) else {
        return repo_not_found();
    };
    let Some((revision, name)) = rest.split_once('/') else {
        return hub_error(StatusCode::NOT_FOUND, "EntryNotFound", "no file");
    };
    if !has_revision(repo, revision) {
        return hub_error(StatusCode::NOT_FOUND, "RevisionNotFound", "Invalid rev id");
    }
    let Some(file) = repo.files.iter().find(|f| f.name == name) else {
        return hub_error(StatusCode::NOT_FOUND, "EntryNotFound", "Entry not found");
    };
    let headers = Response::builder().header("x-repo-commit", &repo.commit).header("accept-ranges", "bytes");
    if file.is_lfs() {
        let host = request.header("host").unwrap_or_default();
        return headers
            .status(StatusCode::FOUND)
            .header("location", format!("http://{host}/cdn/{}", file.sha256()))
            .header("x-linked-etag", format!("\"{}\"", file.sha256()))
            .header("x-linked-size", file.bytes.len())
            // The etag of the LFS pointer file, which `x-linked-etag` overrides.
            .header("etag", format!("\"{}\"", &sha256_hex(file.name.as_bytes())[..40]))
            .body(Body::empty())
            .unwrap();
    }
    serve_range(&file.bytes, request, headers.header("etag", format!("\"{}\"", file.sha256())))
}

/// The repo, unless it does not exist or is private and the bearer token is not its own.
fn authorized<'a>(repos: &'a [FakeRepo], id: &str, request: &Recorded) -> Option<&'a FakeRepo> {
    repos.iter().find(|r| r.id == id).filter(|repo| match &repo.token {
        Some(token) => request.header("authorization") == Some(&format!("Bearer {token}")),
        None => true,
    })
}

/// The hub's answer for both, so as not to reveal private repos.
fn repo_not_found() -> Response {
    hub_error(StatusCode::UNAUTHORIZED, "RepositoryNotFound", "Repository not found")
}

fn has_revision(repo: &FakeRepo, revision: &str) -> bool {
    revision == "main" || revision == repo.commit
}

fn hub_error(status: StatusCode, code: &str, message: &str) -> Response {
    Response::builder()
        .status(status)
        .header("x-error-code", code)
        .header("x-error-message", message)
        .body(Body::from(message.to_string()))
        .unwrap()
}

/// Answers `Range: bytes=a-b` or `bytes=a-` with 206, no range with 200.
fn serve_range(bytes: &[u8], request: &Recorded, builder: axum::http::response::Builder) -> Response {
    let Some(range) = request.header("range") else {
        return builder.header("content-length", bytes.len()).body(Body::from(bytes.to_vec())).unwrap();
    };
    let parsed = range.strip_prefix("bytes=").and_then(|r| r.split_once('-')).and_then(|(a, b)| {
        let start: usize = a.parse().ok()?;
        let end = if b.is_empty() { bytes.len() - 1 } else { b.parse::<usize>().ok()?.min(bytes.len() - 1) };
        (start <= end).then_some((start, end))
    });
    let Some((start, end)) = parsed else {
        return builder.status(StatusCode::RANGE_NOT_SATISFIABLE).body(Body::empty()).unwrap();
    };
    builder
        .status(StatusCode::PARTIAL_CONTENT)
        .header("content-range", format!("bytes {start}-{end}/{}", bytes.len()))
        .header("content-length", end + 1 - start)
        .body(Body::from(bytes[start..=end].to_vec()))
        .unwrap()
}
