//! `--model` given a float source: quantized once, cached by source hash and recipe, reused on
//! the next start, re-made when the cached file is unusable or the recipe differs.

use drq_tests::tiny_model;
use kernels::Granularity;
use model::checkpoint::{CorrectionGranularity, WideRows, WideRowsSpec};
use model::Architecture;
use quantize::recipe::PtqSettings;
use quantize::QuantSpec;
use serve::load::open_or_quantize;

#[test]
fn a_float_source_is_quantized_once_and_cached() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    model::export::write_hf_dir(&tiny_model(Architecture::Qwen2, false, 4), &hf).unwrap();
    let cache = dir.path().join("cache");
    let spec = PtqSettings {
        spec: QuantSpec::default(),
        keep_float: Vec::new(),
        corrections: Vec::new(),
        correction_granularity: CorrectionGranularity::Row,
        wide_rows: WideRowsSpec::None,
    };
    let first = open_or_quantize(hf.to_str().unwrap(), &spec, &cache).unwrap();
    let path = first.path().to_path_buf();
    assert!(path.starts_with(&cache));
    let written = std::fs::metadata(&path).unwrap().modified().unwrap();
    drop(first);
    std::thread::sleep(std::time::Duration::from_millis(20));

    let again = open_or_quantize(hf.to_str().unwrap(), &spec, &cache).unwrap();
    assert_eq!(again.path(), path);
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), written, "the cached checkpoint is reused");

    // Another recipe is another entry.
    let g32 =
        PtqSettings { spec: QuantSpec { granularity: Granularity::Group(32), ..QuantSpec::default() }, ..spec.clone() };
    let other = open_or_quantize(hf.to_str().unwrap(), &g32, &cache).unwrap();
    assert_ne!(other.path(), path);
    assert_eq!(other.quantization().granularity, "group:32");
    // So are corrections, per row or per group, which the checkpoint then carries.
    let corrected = PtqSettings { corrections: vec![4, 2], ..spec.clone() };
    let third = open_or_quantize(hf.to_str().unwrap(), &corrected, &cache).unwrap();
    assert!(third.path() != path && third.path() != other.path());
    assert_eq!(third.quantization().corrected_bits, [4, 2]);
    let per_group = PtqSettings { correction_granularity: CorrectionGranularity::Group, ..corrected.clone() };
    let fourth = open_or_quantize(hf.to_str().unwrap(), &per_group, &cache).unwrap();
    assert!(fourth.path() != third.path());
    assert_eq!(fourth.quantization().correction_granularity, CorrectionGranularity::Group);
    // And wide lm_head rows (on the lm_head of this untied model, at most its vocabulary).
    assert_eq!(fourth.quantization().wide_rows, None);
    let wide = PtqSettings { wide_rows: WideRowsSpec::DEFAULT, ..spec.clone() };
    let fifth = open_or_quantize(hf.to_str().unwrap(), &wide, &cache).unwrap();
    assert!(fifth.path() != path && fifth.path() != other.path() && fifth.path() != third.path());
    let vocab = fifth.config().vocab_size;
    let want = WideRows { weight: "lm_head.weight".into(), rows: vocab.min(4096), extra_bits: 1 };
    assert_eq!(fifth.quantization().wide_rows, Some(want));

    // A damaged cache entry is replaced, not served.
    std::fs::write(&path, b"garbage").unwrap();
    let repaired = open_or_quantize(hf.to_str().unwrap(), &spec, &cache).unwrap();
    assert_eq!(repaired.path(), path);
    assert_eq!(repaired.quantization().granularity, "channel");

    // A checkpoint is opened as it is, without touching the cache.
    let direct = open_or_quantize(path.to_str().unwrap(), &g32, &dir.path().join("unused")).unwrap();
    assert_eq!(direct.quantization().granularity, "channel");
    assert!(!dir.path().join("unused").exists());
}
