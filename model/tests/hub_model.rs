//! A tiny model exported with `model::export::write_hf_dir`, served by the fake hub of
//! `tests/support`, fetched with `fetch_hub_model_with` and loaded with `hf_dir::load`: the logits
//! must be the original model's, single-file and sharded, online and then offline from the cache.

#[allow(dead_code)]
mod support {
    pub mod fake_hub;
    pub mod server;
}

use drq_tests::max_abs_diff;
use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use drq_tests::tiny_model;
use model::source::hf_dir::{self, HfFiles};
use model::source::hub::{fetch_hub_model_with, HubFiles, HubSettings};
use model::{Architecture, FloatModel};
use support::fake_hub::{self, FakeFile, FakeRepo};

fn settings(endpoint: &str, home: &Path, offline: bool) -> HubSettings {
    HubSettings { endpoint: endpoint.to_string(), cache_dir: home.join("hub"), token: None, offline, progress: false }
}

fn hf_files(files: &HubFiles) -> HfFiles {
    HfFiles {
        config: files.config.clone(),
        tokenizer: files.tokenizer.clone(),
        tokenizer_config: files.tokenizer_config.clone(),
        weights: files.weights.clone(),
    }
}

const IDS: [u32; 24] =
    [0, 45, 258, 17, 290, 3, 77, 123, 257, 5, 88, 240, 160, 31, 299, 9, 64, 111, 2, 270, 8, 150, 42, 1];

fn logits(model: &FloatModel) -> Tensor {
    drq_tests::float_logits(model, &IDS)
}

/// The files of `model` exported as a Hugging Face directory, ready to serve.
fn exported_files(model: &FloatModel) -> Vec<FakeFile> {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("export");
    model::export::write_hf_dir(model, &dir).unwrap();
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]);
    names.iter().map(|n| FakeFile::new(n, std::fs::read(dir.join(n)).unwrap())).collect()
}

/// The exported files with `model.safetensors` split into two shards and an index, as
/// transformers' `save_pretrained(max_shard_size=...)` writes them.
fn sharded_files(model: &FloatModel) -> Vec<FakeFile> {
    let shard_name = |i: usize| format!("model-{:05}-of-00002.safetensors", i + 1);
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (name, t) in model.weights.iter() {
        // Layer 1 and the head in the second shard, the rest in the first.
        let i =
            usize::from(name.starts_with("model.layers.1.") || name == "lm_head.weight" || name == "model.norm.weight");
        shards[i].insert(name.clone(), t.clone());
        weight_map.insert(name.clone(), shard_name(i).into());
    }
    let dir = tempfile::tempdir().unwrap();
    let mut files: Vec<FakeFile> =
        exported_files(model).into_iter().filter(|f| f.name != "model.safetensors").collect();
    for (i, shard) in shards.iter().enumerate() {
        assert!(!shard.is_empty());
        let path = dir.path().join(shard_name(i));
        candle_core::safetensors::save(shard, &path).unwrap();
        files.push(FakeFile::new(&shard_name(i), std::fs::read(&path).unwrap()));
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    files.push(FakeFile::new("model.safetensors.index.json", index.to_string()));
    files
}

#[test]
fn an_exported_model_served_by_the_hub_loads_with_the_same_logits() {
    let llama = tiny_model(Architecture::Llama, false, 41);
    let qwen = tiny_model(Architecture::Qwen2, false, 42);
    let repos = vec![
        FakeRepo::new("tiny/llama", exported_files(&llama)),
        FakeRepo::new("tiny/qwen2-sharded", sharded_files(&qwen)),
    ];
    let commits: Vec<String> = repos.iter().map(|r| r.commit.clone()).collect();
    let server = fake_hub::start(repos);
    let home = tempfile::tempdir().unwrap();

    for ((repo, original, shards), commit) in
        [("tiny/llama", &llama, 1), ("tiny/qwen2-sharded", &qwen, 2)].into_iter().zip(&commits)
    {
        let files = fetch_hub_model_with(&settings(&server.url, home.path(), false), repo, None).unwrap();
        assert_eq!(files.commit.as_deref(), Some(commit.as_str()));
        assert_eq!(files.weights.len(), shards, "{repo}");
        assert!(files.tokenizer_config.is_some());
        let loaded = hf_dir::load(&hf_files(&files)).unwrap();
        assert_eq!(loaded.config, original.config, "{repo}");
        assert_eq!(loaded.weights.len(), original.weights.len(), "{repo}");
        assert_eq!(max_abs_diff(&logits(&loaded), &logits(original)), 0.0, "{repo}");
        let sample = "the theme";
        assert_eq!(
            loaded.tokenizer.encode(sample, false).unwrap().get_ids(),
            original.tokenizer.encode(sample, false).unwrap().get_ids()
        );

        // Offline, from the cache alone (pinned to the commit and by branch), the same model.
        let requests = server.requests().len();
        for revision in [None, Some(commit.as_str())] {
            let cached =
                fetch_hub_model_with(&settings("http://127.0.0.1:9", home.path(), true), repo, revision).unwrap();
            assert_eq!(cached, files, "{repo} @ {revision:?}");
            let again = hf_dir::load(&hf_files(&cached)).unwrap();
            assert_eq!(max_abs_diff(&logits(&again), &logits(original)), 0.0, "{repo}");
        }
        assert_eq!(server.requests().len(), requests, "offline fetches make no request");
    }
    // The two repos did not mix: the weights differ.
    assert!(max_abs_diff(&logits(&llama), &logits(&qwen)) > 1e-3);
}

#[test]
fn a_shard_missing_a_tensor_is_reported_by_name() {
    let model = tiny_model(Architecture::Llama, true, 43);
    let mut files = sharded_files(&model);
    // The index still lists the tensor, but the second shard no longer holds it.
    let shard = files.iter_mut().find(|f| f.name == "model-00002-of-00002.safetensors").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shard.safetensors");
    std::fs::write(&path, &shard.bytes).unwrap();
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert!(tensors.remove("model.norm.weight").is_some());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    shard.bytes = std::fs::read(&path).unwrap();

    let server = fake_hub::start(vec![FakeRepo::new("tiny/broken", files)]);
    let home = tempfile::tempdir().unwrap();
    let fetched = fetch_hub_model_with(&settings(&server.url, home.path(), false), "tiny/broken", None).unwrap();
    assert_eq!(fetched.weights.len(), 2);
    let err = hf_dir::load(&hf_files(&fetched)).err().expect("a model without its final norm loaded");
    assert!(format!("{err:#}").contains("model.norm.weight"), "{err:#}");
}
