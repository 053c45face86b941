//! `fetch_hub_model_with` against a fake hub on localhost, with a temporary hub cache. Settings
//! are passed explicitly, so the tests never touch the process environment and run in parallel.

mod support {
    pub mod fake_hub;
    pub mod server;
}

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use model::source::hub::{fetch_hub_model_with, HubError, HubFiles, HubSettings};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use support::fake_hub::{self, FakeFile, FakeRepo};

const CONFIG: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":8,"num_hidden_layers":1}"#;
const TOKENIZER: &str = r#"{"version":"1.0","model":{"type":"BPE","vocab":{"a":0,"b":1},"merges":[]}}"#;
const TOKENIZER_CONFIG: &str = r#"{"bos_token":"<s>","eos_token":"</s>"}"#;

/// A safetensors file with one f32 tensor per name, values derived from `seed`.
fn safetensors(names: &[&str], seed: f32) -> Vec<u8> {
    let data: Vec<Vec<u8>> =
        (0..names.len()).map(|i| (0..6).flat_map(|j| (seed + (i * 6 + j) as f32).to_le_bytes()).collect()).collect();
    let tensors =
        names.iter().zip(&data).map(|(name, bytes)| (*name, TensorView::new(Dtype::F32, vec![2, 3], bytes).unwrap()));
    safetensors::serialize(tensors, None).unwrap()
}

fn single_repo() -> FakeRepo {
    FakeRepo::new(
        "tiny/single",
        vec![
            FakeFile::new("config.json", CONFIG),
            FakeFile::new("tokenizer.json", TOKENIZER),
            FakeFile::new("tokenizer_config.json", TOKENIZER_CONFIG),
            FakeFile::new("model.safetensors", safetensors(&["embed.weight", "norm.weight"], 1.0)),
            FakeFile::new("README.md", "# tiny"),
        ],
    )
}

const SHARD_1: &str = "model-00001-of-00002.safetensors";
const SHARD_2: &str = "model-00002-of-00002.safetensors";

/// Two shards; the index maps several tensors to each, and lists shard 2 first by tensor name.
fn sharded_repo() -> FakeRepo {
    let index = serde_json::json!({
        "metadata": { "total_size": 144 },
        "weight_map": {
            "a.lm_head.weight": SHARD_2,
            "b.layers.0.weight": SHARD_1,
            "b.layers.1.weight": SHARD_1,
            "c.norm.weight": SHARD_2,
        }
    });
    FakeRepo::new(
        "tiny/sharded",
        vec![
            FakeFile::new("config.json", CONFIG),
            FakeFile::new("tokenizer.json", TOKENIZER),
            FakeFile::new("model.safetensors.index.json", index.to_string()),
            FakeFile::new(SHARD_1, safetensors(&["b.layers.0.weight", "b.layers.1.weight"], 10.0)),
            FakeFile::new(SHARD_2, safetensors(&["a.lm_head.weight", "c.norm.weight"], 20.0)),
        ],
    )
}

fn settings(endpoint: &str, home: &Path) -> HubSettings {
    HubSettings {
        endpoint: endpoint.to_string(),
        cache_dir: home.join("hub"),
        token: None,
        offline: false,
        progress: false,
    }
}

fn offline(home: &Path) -> HubSettings {
    HubSettings { offline: true, ..settings("http://127.0.0.1:9", home) }
}

/// A URL nothing listens on.
fn closed_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

fn hub_error(result: anyhow::Result<HubFiles>) -> (HubError, String) {
    let err = result.expect_err("the fetch should fail");
    let message = format!("{err:#}");
    let hub_error = err.downcast::<HubError>().unwrap_or_else(|e| panic!("not a HubError: {e:#}"));
    (hub_error, message)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn downloads_a_single_file_repo_into_the_hf_hub_cache() {
    let repo = single_repo();
    let (commit, weights) = (repo.commit.clone(), repo.file("model.safetensors").bytes.clone());
    let weights_sha = repo.file("model.safetensors").sha256();
    let config_sha = repo.file("config.json").sha256();
    let server = fake_hub::start(vec![repo]);
    let home = tempfile::tempdir().unwrap();

    let files = fetch_hub_model_with(&settings(&server.url, home.path()), "tiny/single", None).unwrap();

    assert_eq!(files.repo_id, "tiny/single");
    assert_eq!(files.commit.as_deref(), Some(commit.as_str()));
    assert_eq!(read(&files.config), CONFIG.as_bytes());
    assert_eq!(read(&files.tokenizer), TOKENIZER.as_bytes());
    assert_eq!(read(files.tokenizer_config.as_ref().unwrap()), TOKENIZER_CONFIG.as_bytes());
    assert_eq!(files.weights.len(), 1);
    assert_eq!(read(&files.weights[0]), weights);

    // hf-hub's layout: refs/main holds the commit, snapshots/<commit>/<file> are relative links
    // to blobs/<etag>, and an LFS file's blob is named by its sha256.
    let repo_dir = home.path().join("hub").join("models--tiny--single");
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), commit);
    let snapshot = repo_dir.join("snapshots").join(&commit);
    assert_eq!(files.config, snapshot.join("config.json"));
    assert_eq!(files.weights[0], snapshot.join("model.safetensors"));
    for (file, blob) in [("model.safetensors", &weights_sha), ("config.json", &config_sha)] {
        let link = std::fs::read_link(snapshot.join(file)).unwrap();
        assert_eq!(link, Path::new("../../blobs").join(blob));
        assert_eq!(read(&repo_dir.join("blobs").join(blob)), read(&snapshot.join(file)));
    }
    assert!(!snapshot.join("README.md").exists(), "only the model files are fetched");

    // One metadata request, a metadata probe and a download per file; the weights via the CDN.
    let requests = server.requests();
    assert_eq!(requests[0].path, "/api/models/tiny/single/revision/main");
    assert!(requests.iter().all(|r| r.method == "GET"));
    assert!(requests.iter().any(|r| r.path == format!("/cdn/{weights_sha}")));

    // A second online call asks for the commit again but downloads nothing.
    let before = server.requests().len();
    let again = fetch_hub_model_with(&settings(&server.url, home.path()), "tiny/single", None).unwrap();
    assert_eq!(again, files);
    let new: Vec<String> = server.requests()[before..].iter().map(|r| r.path.clone()).collect();
    assert_eq!(new, ["/api/models/tiny/single/revision/main"]);
}

#[test]
fn downloads_the_shards_listed_in_the_index() {
    let repo = sharded_repo();
    let shards = [repo.file(SHARD_1).bytes.clone(), repo.file(SHARD_2).bytes.clone()];
    let server = fake_hub::start(vec![repo]);
    let home = tempfile::tempdir().unwrap();

    let files = fetch_hub_model_with(&settings(&server.url, home.path()), "tiny/sharded", None).unwrap();

    let names: Vec<_> = files.weights.iter().map(|p| p.file_name().unwrap().to_owned()).collect();
    assert_eq!(names, [SHARD_1, SHARD_2], "deduplicated, in shard order");
    assert_eq!(read(&files.weights[0]), shards[0]);
    assert_eq!(read(&files.weights[1]), shards[1]);
    assert_eq!(read(&files.config), CONFIG.as_bytes());
    assert_eq!(files.tokenizer_config, None);
    let requests = server.requests();
    assert!(
        requests.iter().all(|r| !r.path.ends_with("tokenizer_config.json")),
        "a file the repo does not list is not requested"
    );
    assert!(requests.iter().all(|r| !r.path.ends_with("/model.safetensors")));

    let cached = fetch_hub_model_with(&offline(home.path()), "tiny/sharded", None).unwrap();
    assert_eq!(cached, files);
}

#[test]
fn offline_mode_reads_the_cache_without_any_request() {
    let repo = single_repo();
    let commit = repo.commit.clone();
    let server = fake_hub::start(vec![repo]);
    let home = tempfile::tempdir().unwrap();
    let online = fetch_hub_model_with(&settings(&server.url, home.path()), "tiny/single", None).unwrap();
    let before = server.requests().len();

    let offline_settings = HubSettings { offline: true, ..settings(&server.url, home.path()) };
    let cached = fetch_hub_model_with(&offline_settings, "tiny/single", None).unwrap();
    assert_eq!(cached, online);
    // Pinned to the commit: found through the snapshot even without a ref of that name, as
    // Python's huggingface_hub leaves it (hf-hub writes one).
    let refs = home.path().join("hub/models--tiny--single/refs");
    std::fs::remove_file(refs.join(&commit)).unwrap();
    let pinned = fetch_hub_model_with(&offline_settings, "tiny/single", Some(&commit)).unwrap();
    assert_eq!(pinned, online);
    assert_eq!(server.requests().len(), before, "offline mode made a request");
}

#[test]
fn offline_mode_with_an_empty_cache_fails_naming_the_repo() {
    let home = tempfile::tempdir().unwrap();
    let (error, message) = hub_error(fetch_hub_model_with(&offline(home.path()), "tiny/single", None));
    assert!(matches!(error, HubError::NotCached { .. }), "{error:?}");
    assert!(message.contains("tiny/single") && message.contains("HF_HUB_OFFLINE"), "{message}");
}

#[test]
fn an_unknown_repo_is_reported_as_not_found() {
    let server = fake_hub::start(vec![single_repo()]);
    let home = tempfile::tempdir().unwrap();
    let result = fetch_hub_model_with(&settings(&server.url, home.path()), "tiny/missing", None);
    let (error, message) = hub_error(result);
    assert!(matches!(error, HubError::RepoNotFound { .. }), "{error:?}");
    assert!(!error.is_unreachable());
    assert!(message.contains("tiny/missing") && message.contains("not found"), "{message}");
}

#[test]
fn a_missing_revision_or_file_is_named() {
    let mut repo = single_repo();
    repo.files.retain(|f| f.name != "tokenizer.json");
    let server = fake_hub::start(vec![repo]);
    let home = tempfile::tempdir().unwrap();
    let settings = settings(&server.url, home.path());

    let (error, message) = hub_error(fetch_hub_model_with(&settings, "tiny/single", Some("v9")));
    assert!(matches!(error, HubError::RevisionNotFound { .. }), "{error:?}");
    assert!(message.contains("tiny/single") && message.contains("v9"), "{message}");

    let (error, message) = hub_error(fetch_hub_model_with(&settings, "tiny/single", None));
    assert!(matches!(&error, HubError::FileNotFound { file, .. } if file == "tokenizer.json"), "{error:?}");
    assert!(message.contains("tiny/single") && message.contains("tokenizer.json"), "{message}");
}

#[test]
fn hf_token_is_sent_as_a_bearer_token() {
    let server = fake_hub::start(vec![single_repo().private("hf_secret")]);
    let home = tempfile::tempdir().unwrap();

    let anonymous = fetch_hub_model_with(&settings(&server.url, home.path()), "tiny/single", None);
    let (error, message) = hub_error(anonymous);
    assert!(matches!(error, HubError::RepoNotFound { .. }), "{error:?}");
    assert!(message.contains("HF_TOKEN"), "{message}");

    let before = server.requests().len();
    let with_token = HubSettings { token: Some("hf_secret".into()), ..settings(&server.url, home.path()) };
    let files = fetch_hub_model_with(&with_token, "tiny/single", None).unwrap();
    assert_eq!(read(&files.config), CONFIG.as_bytes());
    let hub_requests: Vec<_> =
        server.requests().into_iter().skip(before).filter(|r| !r.path.starts_with("/cdn/")).collect();
    assert!(hub_requests.len() >= 5);
    for request in hub_requests {
        assert_eq!(request.header("authorization"), Some("Bearer hf_secret"), "{}", request.path);
    }
}

#[test]
fn an_unreachable_hub_falls_back_to_the_cache() {
    let server = fake_hub::start(vec![single_repo()]);
    let home = tempfile::tempdir().unwrap();
    let online = fetch_hub_model_with(&settings(&server.url, home.path()), "tiny/single", None).unwrap();

    let down = settings(&closed_url(), home.path());
    assert_eq!(fetch_hub_model_with(&down, "tiny/single", None).unwrap(), online);

    let (error, message) = hub_error(fetch_hub_model_with(&down, "tiny/other", None));
    assert!(matches!(error, HubError::Unreachable { .. }) && error.is_unreachable(), "{error:?}");
    assert!(message.contains("tiny/other") && message.contains("cannot reach"), "{message}");
}

#[test]
fn bad_repo_ids_revisions_and_shard_names_are_refused() {
    let index = serde_json::json!({ "weight_map": { "w": "../../escaped.safetensors" } });
    let evil = FakeRepo::new(
        "tiny/evil",
        vec![
            FakeFile::new("config.json", CONFIG),
            FakeFile::new("tokenizer.json", TOKENIZER),
            FakeFile::new("model.safetensors.index.json", index.to_string()),
        ],
    );
    let server = fake_hub::start(vec![evil]);
    let home = tempfile::tempdir().unwrap();
    let settings = settings(&server.url, home.path());

    for repo_id in ["", "../hub", "a/b/c", "a//b", "a--b/c", "a/b c"] {
        let err = fetch_hub_model_with(&settings, repo_id, None).unwrap_err();
        assert!(format!("{err}").contains("invalid hub repo id"), "{repo_id:?}: {err}");
    }
    for revision in ["../../x", "", "a b", "refs//x"] {
        let err = fetch_hub_model_with(&settings, "tiny/evil", Some(revision)).unwrap_err();
        assert!(format!("{err}").contains("invalid revision"), "{revision:?}: {err}");
    }
    assert!(server.requests().is_empty());

    let err = fetch_hub_model_with(&settings, "tiny/evil", None).unwrap_err();
    assert!(format!("{err}").contains("invalid shard"), "{err}");
    assert!(!home.path().join("escaped.safetensors").exists());
}

#[test]
fn settings_follow_the_hugging_face_environment_variables() {
    let home = tempfile::tempdir().unwrap();
    let home_str = home.path().to_str().unwrap().to_string();
    let lookup = |pairs: &[(&str, &str)]| {
        let vars: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        HubSettings::from_lookup(move |name| vars.get(name).cloned())
    };

    let defaults = lookup(&[("HOME", &home_str)]).unwrap();
    assert_eq!(
        defaults,
        HubSettings {
            endpoint: "https://huggingface.co".into(),
            cache_dir: home.path().join(".cache/huggingface/hub"),
            token: None,
            offline: false,
            progress: true,
        }
    );

    let xdg = lookup(&[("HOME", "/nowhere"), ("XDG_CACHE_HOME", &home_str)]).unwrap();
    assert_eq!(xdg.cache_dir, home.path().join("huggingface/hub"));

    // HF_HOME holds the cache and the token file that `hf auth login` writes.
    std::fs::write(home.path().join("token"), "hf_from_file\n").unwrap();
    let hf_home = lookup(&[("HF_HOME", &home_str), ("HF_ENDPOINT", "http://mirror.test/")]).unwrap();
    assert_eq!(hf_home.cache_dir, home.path().join("hub"));
    assert_eq!(hf_home.token.as_deref(), Some("hf_from_file"));
    assert_eq!(hf_home.endpoint, "http://mirror.test");

    let explicit = lookup(&[
        ("HF_HOME", &home_str),
        ("HF_HUB_CACHE", "/elsewhere/cache"),
        ("HF_TOKEN", "hf_from_env"),
        ("HF_HUB_OFFLINE", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "true"),
    ])
    .unwrap();
    assert_eq!(explicit.cache_dir, PathBuf::from("/elsewhere/cache"));
    assert_eq!(explicit.token.as_deref(), Some("hf_from_env"));
    assert!(explicit.offline && !explicit.progress);

    for (value, expected) in [("ON", true), ("yes", true), ("0", false), ("false", false), ("", false)] {
        let settings = lookup(&[("HOME", &home_str), ("HF_HUB_OFFLINE", value)]).unwrap();
        assert_eq!(settings.offline, expected, "HF_HUB_OFFLINE={value:?}");
    }

    let err = lookup(&[]).unwrap_err();
    assert!(format!("{err}").contains("HF_HOME"), "{err}");
}
