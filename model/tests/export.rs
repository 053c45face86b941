//! `model::export::write_hf_dir` and reading the result back as a Hugging Face directory: the real
//! SmolLM2 GGUF (from `../shared`) and tiny untied/Qwen2 models must come back identical.

use drq_tests::max_abs_diff;
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use drq_tests::{smollm2_gguf, tiny_model};
use model::source::{hf_dir, load_float};
use model::{Architecture, FloatModel, ModelSource};

fn logits(model: &FloatModel, ids: &[u32]) -> Tensor {
    drq_tests::float_logits(model, ids)
}

/// The tensor names of a safetensors file, from its header alone.
fn safetensors_names(path: &Path) -> Vec<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).unwrap();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).unwrap();
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    file.read_exact(&mut header).unwrap();
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header).unwrap();
    let mut names: Vec<String> = header.into_iter().map(|(k, _)| k).filter(|k| k != "__metadata__").collect();
    names.sort();
    names
}

/// Every entry under `dir` (recursively): the bytes of small files, the size and modification
/// time of large ones (re-reading half a gigabyte of weights proves little more).
fn snapshot(dir: &Path) -> BTreeMap<String, (u64, std::time::SystemTime, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.strip_prefix(dir).unwrap().display().to_string();
        let meta = std::fs::metadata(&path).unwrap();
        if meta.is_dir() {
            out.insert(format!("{name}/"), (0, meta.modified().unwrap(), vec![]));
            for (inner, entry) in snapshot(&path) {
                out.insert(format!("{name}/{inner}"), entry);
            }
        } else {
            let bytes = if meta.len() < 1 << 20 { std::fs::read(&path).unwrap() } else { vec![] };
            out.insert(name, (meta.len(), meta.modified().unwrap(), bytes));
        }
    }
    out
}

fn assert_same_weights(a: &FloatModel, b: &FloatModel) {
    assert_eq!(a.weights.len(), b.weights.len());
    for (name, t) in a.weights.iter() {
        let other = b.weights.get(name, t.dims()).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(max_abs_diff(t, &other), 0.0, "{name}");
    }
}

#[test]
fn the_real_gguf_exports_and_reloads_identically() {
    let (original, _) = load_float(&ModelSource::Gguf(smollm2_gguf())).unwrap();
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("smollm2-hf");
    model::export::write_hf_dir(&original, &dir).unwrap();

    // Only the export itself is left: no temporary sibling.
    let siblings: Vec<_> = std::fs::read_dir(parent.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(siblings, [std::ffi::OsString::from("smollm2-hf")]);
    let mut files: Vec<String> = snapshot(&dir).into_keys().collect();
    files.sort();
    assert_eq!(files, ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]);

    let source: ModelSource = dir.to_str().unwrap().parse().unwrap();
    assert_eq!(source, ModelSource::HfDir(dir.clone()));
    let (reloaded, provenance) = load_float(&source).unwrap();
    assert_eq!(provenance.source, dir.display().to_string());

    assert_eq!(reloaded.config, original.config);
    assert!(original.config.tie_word_embeddings, "SmolLM2 ties its embeddings");
    // A tied export stores the embedding once.
    let names = safetensors_names(&dir.join("model.safetensors"));
    assert!(!names.contains(&"lm_head.weight".to_string()));
    assert_eq!(names.len(), original.weights.len());
    assert_same_weights(&original, &reloaded);
    assert_eq!(reloaded.add_bos, original.add_bos);
    assert!(original.chat_template.is_some(), "SmolLM2's GGUF has a chat template");
    assert_eq!(reloaded.chat_template, original.chat_template);
    let tokenizer_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    let token = |id: u32| serde_json::Value::from(original.tokenizer.id_to_token(id).unwrap());
    assert_eq!(tokenizer_config["bos_token"], token(original.config.bos_token_id.unwrap()));
    assert_eq!(tokenizer_config["eos_token"], token(original.config.eos_token_ids[0]));

    // The tokenizer cuts the same ids, special tokens included, and decodes them back.
    let sample = "<|im_start|>user\nOnce upon a time, there were 12345 cats — naïve café 🙂.<|im_end|>\n";
    for add_special in [false, true] {
        let a = original.tokenizer.encode(sample, add_special).unwrap();
        let b = reloaded.tokenizer.encode(sample, add_special).unwrap();
        assert_eq!(a.get_ids(), b.get_ids());
    }
    let ids = original.tokenizer.encode(sample, false).unwrap().get_ids().to_vec();
    assert!(ids.len() >= 25, "{} tokens", ids.len());
    assert_eq!(reloaded.tokenizer.decode(&ids, false).unwrap(), sample);

    // Bit-identical logits.
    let (a, b) = (logits(&original, &ids), logits(&reloaded, &ids));
    assert_eq!(a.dims(), &[1, ids.len(), 49152]);
    assert_eq!(max_abs_diff(&a, &b), 0.0);

    // Exporting again into the existing directory fails and changes nothing in it.
    let before = snapshot(&dir);
    let err = model::export::write_hf_dir(&original, &dir).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err:#}");
    assert!(snapshot(&dir) == before, "the existing export was modified");
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 1, "no temporary directory left behind");
}

#[test]
fn exporting_into_an_existing_directory_leaves_it_untouched() {
    let model = tiny_model(Architecture::Llama, true, 31);
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("taken");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("config.json"), "precious").unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    let before = snapshot(&dir);
    let err = model::export::write_hf_dir(&model, &dir).unwrap_err();
    assert!(err.to_string().contains(&dir.display().to_string()), "{err:#}");
    assert_eq!(snapshot(&dir), before);
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 1);
    // An existing empty directory too; and an existing file.
    let empty = parent.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(model::export::write_hf_dir(&model, &empty).is_err());
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    let file = parent.path().join("file");
    std::fs::write(&file, "x").unwrap();
    assert!(model::export::write_hf_dir(&model, &file).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

#[test]
fn untied_and_qwen2_tiny_models_keep_lm_head_and_biases() {
    for (arch, seed) in [(Architecture::Llama, 32), (Architecture::Qwen2, 33)] {
        let original = tiny_model(arch, false, seed);
        let parent = tempfile::tempdir().unwrap();
        // A directory whose parents do not exist yet.
        let dir = parent.path().join("a/b/export");
        model::export::write_hf_dir(&original, &dir).unwrap();

        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["tie_word_embeddings"], false);
        let names = safetensors_names(&dir.join("model.safetensors"));
        assert!(names.contains(&"lm_head.weight".to_string()));
        assert_eq!(names.iter().any(|n| n.ends_with("q_proj.bias")), arch == Architecture::Qwen2);

        let reloaded = hf_dir::load(&hf_dir::HfFiles::in_dir(&dir).unwrap()).unwrap();
        assert_eq!(reloaded.config, original.config);
        assert!(!reloaded.config.tie_word_embeddings);
        assert_same_weights(&original, &reloaded);
        let ids: Vec<u32> = (0..30).map(|i| (i * 53 + 7) % 300).collect();
        assert_eq!(max_abs_diff(&logits(&original, &ids), &logits(&reloaded, &ids)), 0.0, "{arch:?}");
        // lm_head is really used: the reloaded model's logits are not the tied ones.
        let mut tied = hf_dir::load(&hf_dir::HfFiles::in_dir(&dir).unwrap()).unwrap();
        tied.config.tie_word_embeddings = true;
        let tied_logits = logits(&tied, &ids);
        assert!(max_abs_diff(&tied_logits, &logits(&reloaded, &ids)) > 1e-3);
    }
}
