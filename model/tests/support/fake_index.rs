//! A fake PyPI simple index: `GET /simple/{project}/` answers PEP 691 JSON with relative file URLs
//! (as the PEP allows), `GET /files/{filename}` serves the files.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;

use super::server::Server;

pub const PEP691_JSON: &str = "application/vnd.pypi.simple.v1+json";

/// A file on the index page.
pub struct IndexedFile {
    pub filename: String,
    pub bytes: Vec<u8>,
    /// The sha256 the index advertises (wrong on purpose in some tests).
    pub sha256: String,
}

/// Serves `files` as the only release files of `project` (a normalized name).
pub fn start(project: &str, files: Vec<IndexedFile>) -> Server {
    let (project, page) = (project.to_string(), format!("/simple/{project}/"));
    Server::start(move |request| {
        if request.path == page {
            let entries: Vec<_> = files
                .iter()
                .map(|f| {
                    serde_json::json!({
                        "filename": f.filename,
                        "url": format!("../../files/{}", f.filename),
                        "hashes": { "sha256": f.sha256 },
                        "yanked": false,
                    })
                })
                .collect();
            let body = serde_json::json!({
                "meta": { "api-version": "1.1" },
                "name": project,
                "files": entries,
            });
            return Response::builder().header("content-type", PEP691_JSON).body(Body::from(body.to_string())).unwrap();
        }
        let file = request.path.strip_prefix("/files/").and_then(|name| files.iter().find(|f| f.filename == name));
        match file {
            Some(file) => Response::builder()
                .header("content-type", "application/octet-stream")
                .header("content-length", file.bytes.len())
                .body(Body::from(file.bytes.clone()))
                .unwrap(),
            None => Response::builder().status(StatusCode::NOT_FOUND).body(Body::empty()).unwrap(),
        }
    })
}
