//! The drq checkpoint format (docs/CHECKPOINT.md) end to end: what `quantize_model` +
//! `write_checkpoint` produce reads back exactly, the file holds what the spec says, and every
//! kind of damaged or inconsistent file is refused on open with an error naming the problem.
//! Damaged files are built by rewriting a valid checkpoint with the `safetensors` crate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use drq_tests::tiny_model;
use kernels::{Granularity, TieRule};
use model::checkpoint::{
    Checkpoint, CorrectionGranularity, LeadingRows, WideRows, WideRowsSpec, CODES_SUFFIX, FORMAT, FORMAT_VERSION,
    SCALES_SUFFIX, TOKENIZER_TENSOR,
};
use model::source::{FloatModel, Provenance};
use model::{Architecture, ModelSource, Precision, Weights};
use quantize::{quantize_model, write_checkpoint, QuantSpec, QuantizedModel, SearchObjective};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn spec(bits: &[u32], granularity: Granularity, tie: TieRule) -> QuantSpec {
    QuantSpec { bits: bits.to_vec(), granularity, tie, objective: SearchObjective::Normalized, ..QuantSpec::default() }
}

fn provenance() -> Provenance {
    Provenance { source: "tiny-fixture/seed-7".to_string(), sha256: "0123456789abcdef".repeat(4) }
}

/// A tiny model (Llama, untied unless asked) and its quantization.
fn quantized(arch: Architecture, tied: bool, spec: &QuantSpec, keep_float: &[&str]) -> (FloatModel, QuantizedModel) {
    let float = tiny_model(arch, tied, 7);
    let keep: Vec<String> = keep_float.iter().map(|s| s.to_string()).collect();
    let q = quantize_model(&float, spec, &keep, |_| {}).expect("quantizes the tiny model");
    (float, q)
}

/// A valid checkpoint of the untied tiny Llama at `group:32` (two groups on 64 columns, three on
/// 96), written to `dir/name`.
fn valid_checkpoint(dir: &Path, name: &str) -> PathBuf {
    let (float, q) =
        quantized(Architecture::Llama, false, &spec(&[8, 4, 2], Granularity::Group(32), TieRule::HalfEven), &[]);
    let path = dir.join(name);
    write_checkpoint(&path, &float, &provenance(), &q).expect("writes");
    path
}

/// Files in `dir` whose name ends in `.tmp`.
fn tmp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect()
}

/// Opens `path`, which must fail without panicking; the full error chain must contain every
/// one of `needles`. Returns the message.
#[track_caller]
fn expect_invalid(path: &Path, needles: &[&str]) -> String {
    let result = std::panic::catch_unwind(|| Checkpoint::open(path).map(|_| ()));
    let err = match result {
        Err(_) => panic!("Checkpoint::open panicked on {} (expected an error containing {needles:?})", path.display()),
        Ok(Ok(())) => panic!("Checkpoint::open accepted {} (expected an error containing {needles:?})", path.display()),
        Ok(Err(e)) => format!("{e:#}"),
    };
    for needle in needles {
        assert!(err.contains(needle), "error for {} does not mention {needle:?}: {err}", path.display());
    }
    err
}

/// Error-message fragments, as owned strings.
macro_rules! needles {
    ($($e:expr),* $(,)?) => { vec![$($e.to_string()),*] };
}

// ----- raw safetensors rewriting --------------------------------------------------------------

/// A checkpoint as plain safetensors: tensors (name, dtype, shape, bytes) and metadata.
struct Raw {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    metadata: HashMap<String, String>,
}

impl Raw {
    fn read(path: &Path) -> Raw {
        let bytes = std::fs::read(path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let metadata = header.metadata().clone().expect("a checkpoint has metadata");
        let mut tensors: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.dtype(), view.shape().to_vec(), view.data().to_vec()))
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Raw { tensors, metadata }
    }

    fn write(&self, path: &Path) {
        let views: Vec<(&str, TensorView)> = self
            .tensors
            .iter()
            .map(|(name, dtype, shape, data)| (name.as_str(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, Some(self.metadata.clone()), path).unwrap();
    }

    fn tensor_mut(&mut self, name: &str) -> &mut (String, Dtype, Vec<usize>, Vec<u8>) {
        self.tensors.iter_mut().find(|t| t.0 == name).unwrap_or_else(|| panic!("no tensor {name}"))
    }

    fn remove(&mut self, name: &str) {
        let before = self.tensors.len();
        self.tensors.retain(|t| t.0 != name);
        assert_eq!(self.tensors.len(), before - 1, "no tensor {name}");
    }

    fn set_meta(&mut self, key: &str, value: &str) {
        self.metadata.insert(key.to_string(), value.to_string());
    }

    /// Edits the JSON metadata value `key`.
    fn edit_json(&mut self, key: &str, edit: impl FnOnce(&mut serde_json::Value)) {
        let mut json: serde_json::Value = serde_json::from_str(&self.metadata[key]).unwrap();
        edit(&mut json);
        self.set_meta(key, &json.to_string());
    }
}

/// A named corruption of a valid checkpoint and the words its error must contain.
type RewriteCase = (&'static str, Box<dyn FnOnce(&mut Raw)>, Vec<String>);

/// Rewrites the valid checkpoint `src` through `edit` into `dir/name`, and checks that the
/// result is a well-formed safetensors file (so the reader's own checks are what reject it).
fn rewritten(src: &Path, dir: &Path, name: &str, edit: impl FnOnce(&mut Raw)) -> PathBuf {
    let mut raw = Raw::read(src);
    edit(&mut raw);
    let path = dir.join(name);
    raw.write(&path);
    SafeTensors::deserialize(&std::fs::read(&path).unwrap()).expect("the rewritten file is valid safetensors");
    path
}

// ----- round trip -----------------------------------------------------------------------------

/// Bitwise f32 slice equality (so -0.0 vs 0.0 or NaN payloads would count as differences).
fn bits_eq(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn flat(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn round_trip_reproduces_the_quantized_model_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Architecture, bool, QuantSpec, &[&str]); 5] = [
        (
            "llama-tied-channel",
            Architecture::Llama,
            true,
            spec(&[8, 4, 2], Granularity::Channel, TieRule::HalfEven),
            &[],
        ),
        ("llama-group32", Architecture::Llama, false, spec(&[8, 4, 2], Granularity::Group(32), TieRule::HalfEven), &[]),
        // 64 = 40 + 24 and 96 = 40 + 40 + 16: a shorter last group in every row.
        ("qwen2-ragged-up", Architecture::Qwen2, false, spec(&[8, 6, 3], Granularity::Group(40), TieRule::HalfUp), &[]),
        (
            "llama-tied-up-keep-embed",
            Architecture::Llama,
            true,
            spec(&[4], Granularity::Group(64), TieRule::HalfUp),
            &["embed_tokens"],
        ),
        (
            "qwen2-sum-group1",
            Architecture::Qwen2,
            true,
            QuantSpec { objective: SearchObjective::Sum, ..spec(&[2, 8], Granularity::Group(1), TieRule::HalfEven) },
            &[],
        ),
    ];
    for (label, arch, tied, spec, keep) in cases {
        let (mut float, q) = quantized(arch, tied, &spec, keep);
        // Exercise the optional metadata too.
        float.add_bos = tied;
        float.chat_template = tied.then(|| "{% for m in messages %}{{ m.content }}{% endfor %}".to_string());
        let path = dir.path().join(format!("{label}.safetensors"));
        write_checkpoint(&path, &float, &provenance(), &q).unwrap_or_else(|e| panic!("{label}: {e:#}"));
        let ckpt = Checkpoint::open(&path).unwrap_or_else(|e| panic!("{label}: {e:#}"));

        // Metadata.
        assert_eq!(ckpt.config(), &float.config, "{label}");
        assert_eq!(ckpt.quantization(), &q.quantization, "{label}");
        assert_eq!(ckpt.quantization().bits, spec.bits, "{label}");
        assert_eq!(ckpt.quantization().granularity, spec.granularity.to_string(), "{label}");
        assert_eq!(ckpt.quantization().tie_rule, spec.tie.to_string(), "{label}");
        assert_eq!(ckpt.quantization().scale_method, format!("search:{}", spec.objective), "{label}");
        assert_eq!(ckpt.tie_rule(), spec.tie, "{label}");
        assert_eq!(ckpt.provenance().source, provenance().source, "{label}");
        assert_eq!(ckpt.provenance().source_sha256, provenance().sha256, "{label}");
        assert_eq!(ckpt.provenance().tool, format!("drq-quantize {}", env!("CARGO_PKG_VERSION")), "{label}");
        assert_eq!(ckpt.add_bos(), float.add_bos, "{label}");
        assert_eq!(ckpt.chat_template(), float.chat_template.as_deref(), "{label}");
        assert_eq!(ckpt.path(), path.as_path());

        // Tokenizer: same serialization and same encodings.
        let tok = ckpt.tokenizer().unwrap();
        assert_eq!(tok.to_string(false).unwrap(), float.tokenizer.to_string(false).unwrap(), "{label}");
        let text = "the theory of <|endoftext|> everything, ünïcödé";
        assert_eq!(
            tok.encode(text, false).unwrap().get_ids(),
            float.tokenizer.encode(text, false).unwrap().get_ids(),
            "{label}"
        );

        // Which weights are quantized: every matrix but those kept in float.
        let matrices: Vec<String> = Weights::expected_shapes(&float.config)
            .into_iter()
            .filter(|(n, s)| s.len() == 2 && !keep.iter().any(|k| n.contains(k)))
            .map(|(n, _)| n)
            .collect();
        let expected_quantized = 2 * 7 + usize::from(keep.is_empty()) + usize::from(!tied);
        assert_eq!(matrices.len(), expected_quantized, "{label}");
        let mut sorted = matrices.clone();
        sorted.sort();
        assert_eq!(ckpt.quantization().quantized, sorted, "{label}: the quantized list is every matrix, sorted");

        // Stored codes and scales are the in-memory ones, bit for bit.
        for name in &matrices {
            let mem = &q.quantized[name];
            let stored = ckpt.quantized(name).unwrap();
            assert_eq!(stored.layout, mem.layout, "{label} {name}");
            assert_eq!(
                stored.layout.n_groups(),
                mem.layout.cols.div_ceil(spec.granularity.layout(1, mem.layout.cols).unwrap().group)
            );
            assert_eq!(stored.codes, mem.codes, "{label} {name}: codes");
            assert!(bits_eq(&stored.scales, &mem.scales), "{label} {name}: scales");
            assert!(stored.corrections.is_empty(), "{label} {name}: no corrections were asked for");
        }
        // A float tensor is not quantized.
        assert!(ckpt.quantized("model.norm.weight").is_err(), "{label}");

        // Every precision decodes to exactly what the kernel computes from the in-memory codes.
        let originals: HashMap<String, Vec<f32>> = float.weights.iter().map(|(n, t)| (n.clone(), flat(t))).collect();
        let mut rel_err = Vec::new();
        for b in 2..=8 {
            let weights = ckpt.weights_at(&Precision::Bits(b)).unwrap_or_else(|e| panic!("{label} W{b}: {e:#}"));
            weights.validate(&float.config).unwrap_or_else(|e| panic!("{label} W{b}: {e:#}"));
            let (mut err, mut energy) = (0f64, 0f64);
            for (name, shape) in Weights::expected_shapes(&float.config) {
                let got = flat(&weights.get(&name, &shape).unwrap());
                if let Some(mem) = q.quantized.get(&name) {
                    let mut want = vec![0f32; mem.codes.len()];
                    kernels::dequantize(&mem.codes, &mem.scales, &mem.layout, b, spec.tie, &mut want).unwrap();
                    assert!(bits_eq(&got, &want), "{label} W{b} {name}: differs from kernels::dequantize");
                    for (x, y) in originals[&name].iter().zip(&got) {
                        err += f64::from(x - y).powi(2);
                        energy += f64::from(*x).powi(2);
                    }
                } else {
                    assert!(bits_eq(&got, &originals[&name]), "{label} W{b} {name}: float tensor changed");
                }
            }
            rel_err.push(err / energy);
        }
        // The decoded weights are the model's (not, say, all zeros), better with more bits.
        assert!(rel_err[6] < 1e-3, "{label}: W8 relative error {}", rel_err[6]);
        // (Not with one scale per weight: a scale can then make a weight exact at every width.)
        if spec.granularity != Granularity::Group(1) {
            assert!(rel_err.windows(2).all(|w| w[0] > w[1]), "{label}: errors do not fall with bits: {rel_err:?}");
        }

        // The float model is not stored, and 1 or 9 bits are not servable: errors, not panics.
        let err = format!("{:#}", ckpt.weights_at(&Precision::Float).expect_err("fp must fail"));
        assert!(err.contains("precision `fp` is not available from a checkpoint"), "{err}");
        for b in [0, 1, 9, 16] {
            let err = format!("{:#}", ckpt.weights_at(&Precision::Bits(b)).expect_err("bad bits must fail"));
            assert!(err.contains(&format!("bit-width {b}")), "{err}");
        }
    }
}

/// The file holds exactly what docs/CHECKPOINT.md lists: I8 codes, F16 scales of
/// `[rows, ceil(cols / g)]`, F32 float tensors, a U8 tokenizer, and the metadata keys.
#[test]
fn file_layout_matches_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let (mut float, q) =
        quantized(Architecture::Qwen2, false, &spec(&[8, 4, 2], Granularity::Group(40), TieRule::HalfUp), &[]);
    float.chat_template = Some("{{ messages }}".to_string());
    let path = dir.path().join("layout.safetensors");
    write_checkpoint(&path, &float, &provenance(), &q).unwrap();
    let raw = Raw::read(&path);

    let mut expected: Vec<(String, Dtype, Vec<usize>)> = Vec::new();
    for (name, shape) in Weights::expected_shapes(&float.config) {
        if shape.len() == 2 {
            expected.push((format!("{name}{CODES_SUFFIX}"), Dtype::I8, shape.clone()));
            expected.push((format!("{name}{SCALES_SUFFIX}"), Dtype::F16, vec![shape[0], shape[1].div_ceil(40)]));
        } else {
            expected.push((name, Dtype::F32, shape));
        }
    }
    let tokenizer_json = float.tokenizer.to_string(false).unwrap();
    expected.push((TOKENIZER_TENSOR.to_string(), Dtype::U8, vec![tokenizer_json.len()]));
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    let got: Vec<(String, Dtype, Vec<usize>)> =
        raw.tensors.iter().map(|(n, d, s, _)| (n.clone(), *d, s.clone())).collect();
    assert_eq!(got, expected);
    // Ragged groups really are there: 96 columns in groups of 40 → 3 scales per row.
    assert!(got.iter().any(|(n, _, s)| n.ends_with("down_proj.weight.scales") && s[1] == 3));
    let tok = raw.tensors.iter().find(|t| t.0 == TOKENIZER_TENSOR).unwrap();
    assert_eq!(tok.3, tokenizer_json.as_bytes());

    // Codes and scales bytes are the in-memory values (two's complement i8, little-endian f16).
    let name = "model.layers.1.mlp.down_proj.weight";
    let mem = &q.quantized[name];
    let codes = &raw.tensors.iter().find(|t| t.0 == format!("{name}.codes")).unwrap().3;
    assert_eq!(codes.iter().map(|&c| c as i8).collect::<Vec<_>>(), mem.codes);
    let scales = &raw.tensors.iter().find(|t| t.0 == format!("{name}.scales")).unwrap().3;
    let scales: Vec<f32> = scales.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
    assert!(bits_eq(&scales, &mem.scales));

    let mut keys: Vec<&str> = raw.metadata.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["add_bos", "chat_template", "format", "format_version", "model_config", "provenance", "quantization"]
    );
    assert_eq!(raw.metadata["format"], FORMAT);
    assert_eq!(raw.metadata["format"], "drq-checkpoint");
    assert_eq!(raw.metadata["format_version"], FORMAT_VERSION.to_string());
    assert_eq!(raw.metadata["format_version"], "1");
    assert_eq!(raw.metadata["add_bos"], "false");
    assert_eq!(raw.metadata["chat_template"], "{{ messages }}");
    let quantization: serde_json::Value = serde_json::from_str(&raw.metadata["quantization"]).unwrap();
    assert_eq!(quantization["granularity"], "group:40");
    assert_eq!(quantization["tie_rule"], "up");
    assert_eq!(quantization["bits"], serde_json::json!([8, 4, 2]));
    let config: serde_json::Value = serde_json::from_str(&raw.metadata["model_config"]).unwrap();
    assert_eq!(config["architecture"], "qwen2");
    assert_eq!(config["hidden_size"], 64);

    // Readable by others (safetensors' own temporary file is 0600).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join("no-template.safetensors");
        let (float, q) =
            quantized(Architecture::Llama, true, &spec(&[8], Granularity::Channel, TieRule::HalfEven), &[]);
        write_checkpoint(&path, &float, &provenance(), &q).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
    }

    // Without a chat template the key is absent.
    let (float, q) = quantized(Architecture::Llama, true, &spec(&[8], Granularity::Channel, TieRule::HalfEven), &[]);
    let path = dir.path().join("no-template.safetensors");
    write_checkpoint(&path, &float, &provenance(), &q).unwrap();
    assert!(!Raw::read(&path).metadata.contains_key("chat_template"));
    assert_eq!(Checkpoint::open(&path).unwrap().chat_template(), None);
}

// ----- ModelSource ----------------------------------------------------------------------------

#[test]
fn model_source_recognises_checkpoints_only() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = valid_checkpoint(dir.path(), "model.safetensors");
    let spec = ckpt.to_str().unwrap();
    assert_eq!(spec.parse::<ModelSource>().unwrap(), ModelSource::Checkpoint(ckpt.clone()));
    // A checkpoint cannot be loaded as a float model.
    let err = format!("{:#}", model::source::load_float(&ModelSource::Checkpoint(ckpt.clone())).err().unwrap());
    assert!(err.contains("is a drq checkpoint"), "{err}");

    // A plain safetensors file (no metadata, or other metadata) is not a checkpoint.
    let data = vec![0u8; 16];
    let plain = dir.path().join("plain.safetensors");
    safetensors::serialize_to_file([("w", TensorView::new(Dtype::F32, vec![2, 2], &data).unwrap())], None, &plain)
        .unwrap();
    let err = format!("{:#}", plain.to_str().unwrap().parse::<ModelSource>().expect_err("not a checkpoint"));
    assert!(err.contains("is a safetensors file but not a drq checkpoint"), "{err}");
    expect_invalid(&plain, &["no metadata", "not a drq checkpoint"]);

    let other = dir.path().join("other.safetensors");
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        [("w", TensorView::new(Dtype::F32, vec![2, 2], &data).unwrap())],
        Some(meta),
        &other,
    )
    .unwrap();
    let err = format!("{:#}", other.to_str().unwrap().parse::<ModelSource>().expect_err("not a checkpoint"));
    assert!(err.contains("not a drq checkpoint"), "{err}");
    expect_invalid(&other, &["metadata `format` is `pt`, not `drq-checkpoint`"]);

    // A corrupted `.safetensors` file is not taken for a checkpoint either.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"definitely not safetensors").unwrap();
    let err = format!("{:#}", junk.to_str().unwrap().parse::<ModelSource>().expect_err("junk"));
    assert!(err.contains("not a drq checkpoint"), "{err}");
    // An empty file of any name is neither GGUF nor a checkpoint.
    let empty = dir.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let err = format!("{:#}", empty.to_str().unwrap().parse::<ModelSource>().expect_err("empty"));
    assert!(err.contains("neither a GGUF file nor a drq checkpoint"), "{err}");
}

// ----- damaged files --------------------------------------------------------------------------

#[test]
fn truncated_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = valid_checkpoint(dir.path(), "good.safetensors");
    let bytes = std::fs::read(&ckpt).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data_len = bytes.len() - 8 - header;
    assert!(header > 100 && data_len > 100);
    let cuts = [
        ("empty", 0),
        ("inside the length", 5),
        ("after the length", 8),
        ("one header byte", 9),
        ("mid header", 8 + header / 2),
        ("header minus one", 8 + header - 1),
        ("no data", 8 + header),
        ("one data byte", 8 + header + 1),
        ("mid data", 8 + header + data_len / 2),
        ("last byte missing", bytes.len() - 1),
    ];
    for (what, len) in cuts {
        let path = dir.path().join(format!("cut-{len}.safetensors"));
        std::fs::write(&path, &bytes[..len]).unwrap();
        let err = expect_invalid(&path, &["not a complete safetensors file"]);
        assert!(err.contains(&path.display().to_string()), "{what}: the error names the file: {err}");
    }
    // One byte too many is damage too.
    let path = dir.path().join("long.safetensors");
    let mut long = bytes.clone();
    long.push(0);
    std::fs::write(&path, &long).unwrap();
    expect_invalid(&path, &["not a complete safetensors file"]);
}

#[test]
fn corrupted_headers_and_random_bytes_are_rejected() {
    use rand::{RngCore, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let ckpt = valid_checkpoint(dir.path(), "good.safetensors");
    let bytes = std::fs::read(&ckpt).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;

    let corrupt = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = bytes.clone();
        edit(&mut b);
        let path = dir.path().join(name);
        std::fs::write(&path, &b).unwrap();
        expect_invalid(&path, &["not a complete safetensors file"]);
    };
    corrupt("brace.safetensors", &|b| b[8] = b'[');
    corrupt("nul.safetensors", &|b| b[8 + header / 2] = 0);
    corrupt("quote.safetensors", &|b| {
        // Drop the closing quote of the first string: the JSON no longer parses.
        let first = b[8..].iter().position(|&c| c == b'"').unwrap() + 8;
        let second = b[first + 1..].iter().position(|&c| c == b'"').unwrap() + first + 1;
        b[second] = b' ';
    });
    corrupt("offsets.safetensors", &|b| {
        // A data offset that runs past the buffer.
        let text = String::from_utf8(b[8..8 + header].to_vec()).unwrap();
        let i = text.find("\"data_offsets\":[").unwrap() + "\"data_offsets\":[".len();
        b[8 + i] = b'9';
    });
    corrupt("len-too-long.safetensors", &|b| {
        let len = b.len() as u64;
        b[..8].copy_from_slice(&len.to_le_bytes());
    });
    corrupt("len-huge.safetensors", &|b| b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes()));
    corrupt("len-max.safetensors", &|b| b[..8].copy_from_slice(&u64::MAX.to_le_bytes()));
    corrupt("len-zero.safetensors", &|b| b[..8].copy_from_slice(&0u64.to_le_bytes()));

    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for (i, len) in [1usize, 7, 8, 64, 4096, 1 << 20].into_iter().enumerate() {
        let mut random = vec![0u8; len];
        rng.fill_bytes(&mut random);
        let path = dir.path().join(format!("random-{i}.safetensors"));
        std::fs::write(&path, &random).unwrap();
        expect_invalid(&path, &["not a complete safetensors file"]);
        // A small header length in front of random bytes: the length is plausible, the JSON is not.
        random[..8.min(len)].copy_from_slice(&16u64.to_le_bytes()[..8.min(len)]);
        std::fs::write(&path, &random).unwrap();
        expect_invalid(&path, &["not a complete safetensors file"]);
    }
}

#[test]
fn inconsistent_metadata_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_checkpoint(dir.path(), "good.safetensors");
    Checkpoint::open(&good).expect("the source of every rewrite is valid");
    // The rewrite itself is faithful: an unmodified rewrite opens and decodes identically.
    let same = rewritten(&good, dir.path(), "same.safetensors", |_| {});
    let (a, b) = (Checkpoint::open(&good).unwrap(), Checkpoint::open(&same).unwrap());
    let (wa, wb) = (a.weights_at(&Precision::Bits(4)).unwrap(), b.weights_at(&Precision::Bits(4)).unwrap());
    for (name, t) in wa.iter() {
        assert!(bits_eq(&flat(t), &flat(&wb.get(name, t.dims()).unwrap())), "{name}");
    }

    let w = "model.layers.0.mlp.down_proj.weight"; // [64, 96], group:32 → scales [64, 3]
    let cases: Vec<RewriteCase> = vec![
        // Identity and version.
        (
            "format-gguf",
            Box::new(|r| r.set_meta("format", "gguf")),
            needles!["metadata `format` is `gguf`, not `drq-checkpoint`"],
        ),
        (
            "format-missing",
            Box::new(|r| {
                r.metadata.remove("format");
            }),
            needles!["metadata field `format` is missing"],
        ),
        ("no-metadata", Box::new(|r| r.metadata.clear()), needles!["metadata field `format` is missing"]),
        (
            "version-2",
            Box::new(|r| r.set_meta("format_version", "2")),
            needles!["format version 2 is not supported", "reads version 1"],
        ),
        ("version-0", Box::new(|r| r.set_meta("format_version", "0")), needles!["format version 0 is not supported"]),
        (
            "version-text",
            Box::new(|r| r.set_meta("format_version", "one")),
            needles!["`format_version` `one` is not a number"],
        ),
        // Granularity overrides: of quantized weights only, and agreeing with the stored scales.
        (
            "granularity-override-of-a-float-tensor",
            Box::new(|r| {
                r.edit_json("quantization", |q| {
                    q["granularity_overrides"] = serde_json::json!({"model.norm.weight": "group:16"})
                })
            }),
            needles!["granularity_overrides` names `model.norm.weight`, which is not a quantized weight"],
        ),
        (
            "granularity-override-disagrees-with-scales",
            Box::new(|r| {
                r.edit_json("quantization", |q| {
                    q["granularity_overrides"] = serde_json::json!({"model.layers.0.mlp.down_proj.weight": "group:16"})
                })
            }),
            needles!["model.layers.0.mlp.down_proj.weight.scales"],
        ),
        (
            "granularity-override-unparsable",
            Box::new(|r| {
                r.edit_json("quantization", |q| {
                    q["granularity_overrides"] = serde_json::json!({"model.layers.0.mlp.down_proj.weight": "group:0"})
                })
            }),
            needles!["granularity_overrides of `model.layers.0.mlp.down_proj.weight`"],
        ),
        // Wide rows: of a quantized weight, inside it, 1..=6 bits wider.
        (
            "wide-rows-of-a-float-tensor",
            Box::new(|r| {
                r.edit_json("quantization", |q| {
                    q["wide_rows"] = serde_json::json!({"weight": "model.norm.weight", "rows": 4, "extra_bits": 1})
                })
            }),
            needles!["wide_rows` names `model.norm.weight`, which is not a quantized weight"],
        ),
        (
            "wide-rows-past-the-weight",
            Box::new(|r| {
                r.edit_json("quantization", |q| {
                    q["wide_rows"] =
                        serde_json::json!({"weight": "model.embed_tokens.weight", "rows": 301, "extra_bits": 1})
                })
            }),
            needles!["301 rows of `model.embed_tokens.weight`, which has 300"],
        ),
        (
            "wide-rows-extra-bits",
            Box::new(|r| {
                r.edit_json("quantization", |q| {
                    q["wide_rows"] =
                        serde_json::json!({"weight": "model.embed_tokens.weight", "rows": 8, "extra_bits": 7})
                })
            }),
            needles!["7 extra bits (1..=6)"],
        ),
        (
            "wide-rows-malformed",
            Box::new(|r| r.edit_json("quantization", |q| q["wide_rows"] = serde_json::json!({"rows": 8}))),
            needles!["quantization"],
        ),
        // Per-layer profiles: a bit-width for exactly the quantized weights, each in 2..=8.
        (
            "profile-missing-weight",
            Box::new(|r| {
                r.edit_json("quantization", |q| {
                    q["profiles"] = serde_json::json!({"mix": {"model.embed_tokens.weight": 4}})
                })
            }),
            needles!["profile `mix` must give a bit-width to exactly the quantized weights"],
        ),
        (
            "profile-bad-bits",
            Box::new(|r| {
                r.edit_json("quantization", |q| {
                    let all: serde_json::Map<String, serde_json::Value> = q["quantized"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|n| (n.as_str().unwrap().to_string(), serde_json::json!(9)))
                        .collect();
                    q["profiles"] = serde_json::json!({ "mix": all });
                })
            }),
            needles!["profile `mix`", "9 bits", "outside 2..=8"],
        ),
        (
            "profile-bad-name",
            Box::new(|r| {
                r.edit_json("quantization", |q| {
                    let all: serde_json::Map<String, serde_json::Value> = q["quantized"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|n| (n.as_str().unwrap().to_string(), serde_json::json!(4)))
                        .collect();
                    q["profiles"] = serde_json::json!({ "4": all });
                })
            }),
            needles!["profile name `4` is invalid"],
        ),
        (
            "version-missing",
            Box::new(|r| {
                r.metadata.remove("format_version");
            }),
            needles!["metadata field `format_version` is missing"],
        ),
        // Tensor dtypes and shapes.
        (
            "codes-f32",
            Box::new(move |r| {
                let t = r.tensor_mut(&format!("{w}.codes"));
                t.1 = Dtype::F32;
                t.3 = vec![0u8; 64 * 96 * 4];
            }),
            needles![format!("tensor `{w}.codes` has dtype F32, expected I8")],
        ),
        (
            "codes-u8",
            Box::new(move |r| r.tensor_mut(&format!("{w}.codes")).1 = Dtype::U8),
            needles!["has dtype U8, expected I8"],
        ),
        (
            "codes-transposed",
            Box::new(move |r| r.tensor_mut(&format!("{w}.codes")).2 = vec![96, 64]),
            needles![format!("tensor `{w}.codes` has shape [96, 64], expected [64, 96]")],
        ),
        (
            "scales-wrong-groups",
            Box::new(move |r| {
                let t = r.tensor_mut(&format!("{w}.scales"));
                t.2 = vec![64, 4];
                t.3 = vec![0x3c; 64 * 4 * 2];
            }),
            needles![format!("tensor `{w}.scales` has shape [64, 4], expected [64, 3]")],
        ),
        (
            "scales-zero",
            Box::new(move |r| r.tensor_mut(&format!("{w}.scales")).3[..2].copy_from_slice(&[0, 0])),
            needles![format!("`{w}.scales` holds the scale 0"), "nonzero and finite"],
        ),
        (
            "scales-nan",
            Box::new(move |r| {
                r.tensor_mut(&format!("{w}.scales")).3[2..4].copy_from_slice(&half::f16::NAN.to_le_bytes())
            }),
            needles!["holds the scale NaN"],
        ),
        (
            "quantized-list-unsorted",
            Box::new(|r| r.edit_json("quantization", |q| q["quantized"].as_array_mut().unwrap().reverse())),
            needles!["must be sorted without duplicates"],
        ),
        (
            "scales-transposed",
            Box::new(move |r| r.tensor_mut(&format!("{w}.scales")).2 = vec![3, 64]),
            needles!["has shape [3, 64], expected [64, 3]"],
        ),
        (
            "scales-flat",
            Box::new(move |r| r.tensor_mut(&format!("{w}.scales")).2 = vec![192]),
            needles!["has shape [192], expected [64, 3]"],
        ),
        (
            "scales-f32",
            Box::new(move |r| {
                let t = r.tensor_mut(&format!("{w}.scales"));
                t.1 = Dtype::F32;
                t.3 = vec![0u8; 64 * 3 * 4];
            }),
            needles!["has dtype F32, expected F16"],
        ),
        (
            "norm-f16",
            Box::new(|r| {
                let t = r.tensor_mut("model.norm.weight");
                t.1 = Dtype::F16;
                t.3.truncate(64 * 2);
            }),
            needles!["tensor `model.norm.weight` has dtype F16, expected F32"],
        ),
        (
            "norm-long",
            Box::new(|r| {
                let t = r.tensor_mut("model.norm.weight");
                t.2 = vec![65];
                t.3.extend([0u8; 4]);
            }),
            needles!["tensor `model.norm.weight` has shape [65], expected [64]"],
        ),
        (
            "tokenizer-i8",
            Box::new(|r| r.tensor_mut(TOKENIZER_TENSOR).1 = Dtype::I8),
            needles!["`drq.tokenizer_json` must be U8"],
        ),
        // Missing and extra tensors.
        (
            "missing-norm",
            Box::new(|r| r.remove("model.norm.weight")),
            needles!["tensor `model.norm.weight` is missing"],
        ),
        (
            "missing-codes",
            Box::new(move |r| r.remove(&format!("{w}.codes"))),
            needles![format!("tensor `{w}.codes` is missing")],
        ),
        (
            "missing-scales",
            Box::new(move |r| r.remove(&format!("{w}.scales"))),
            needles![format!("tensor `{w}.scales` is missing")],
        ),
        (
            "missing-lm-head",
            Box::new(|r| {
                r.remove("lm_head.weight.codes");
                r.remove("lm_head.weight.scales");
            }),
            needles!["tensor `lm_head.weight.codes` is missing"],
        ),
        ("missing-tokenizer", Box::new(|r| r.remove(TOKENIZER_TENSOR)), needles!["the tokenizer tensor is missing"]),
        (
            "extra-layer",
            Box::new(|r| {
                r.tensors.push(("model.layers.9.input_layernorm.weight".into(), Dtype::F32, vec![64], vec![0; 256]))
            }),
            needles!["unexpected tensor `model.layers.9.input_layernorm.weight`"],
        ),
        (
            "extra-float-copy",
            Box::new(move |r| r.tensors.push((w.to_string(), Dtype::F32, vec![64, 96], vec![0; 64 * 96 * 4]))),
            needles![format!("unexpected tensor `{w}`")],
        ),
        (
            "extra-codes-of-norm",
            Box::new(|r| r.tensors.push(("model.norm.weight.codes".into(), Dtype::I8, vec![64], vec![0; 64]))),
            needles!["unexpected tensor `model.norm.weight.codes`"],
        ),
        // The quantized list and the tensors disagree.
        (
            "listed-unknown",
            Box::new(|r| {
                r.edit_json("quantization", |q| {
                    q["quantized"].as_array_mut().unwrap().push("model.layers.5.mlp.up_proj.weight".into());
                })
            }),
            needles!["`model.layers.5.mlp.up_proj.weight` is listed as quantized but is not a weight of this model"],
        ),
        (
            "listed-norm",
            Box::new(|r| {
                r.edit_json("quantization", |q| {
                    q["quantized"].as_array_mut().unwrap().push("model.norm.weight".into());
                })
            }),
            needles!["`model.norm.weight` is listed as quantized but is not a matrix"],
        ),
        (
            "listed-missing",
            Box::new(move |r| {
                r.edit_json("quantization", |q| {
                    q["quantized"].as_array_mut().unwrap().retain(|n| n != w);
                })
            }),
            needles![format!("tensor `{w}` is missing")],
        ),
        // The quantization parameters.
        (
            "bits-9",
            Box::new(|r| r.edit_json("quantization", |q| q["bits"] = serde_json::json!([8, 9]))),
            needles!["quantization.bits", "bit-width 9 is outside 2..=8"],
        ),
        (
            "bits-1",
            Box::new(|r| r.edit_json("quantization", |q| q["bits"] = serde_json::json!([1]))),
            needles!["quantization.bits", "bit-width 1 is outside 2..=8"],
        ),
        (
            "bits-empty",
            Box::new(|r| r.edit_json("quantization", |q| q["bits"] = serde_json::json!([]))),
            needles!["`quantization.bits` is empty"],
        ),
        (
            "bits-negative",
            Box::new(|r| r.edit_json("quantization", |q| q["bits"] = serde_json::json!([-4]))),
            needles!["metadata `quantization` is not valid"],
        ),
        (
            "tie-sideways",
            Box::new(|r| r.edit_json("quantization", |q| q["tie_rule"] = "sideways".into())),
            needles!["tie_rule", "unknown tie rule \"sideways\""],
        ),
        (
            "granularity-rows",
            Box::new(|r| r.edit_json("quantization", |q| q["granularity"] = "rows".into())),
            needles!["granularity", "\"rows\""],
        ),
        (
            "granularity-group0",
            Box::new(|r| r.edit_json("quantization", |q| q["granularity"] = "group:0".into())),
            needles!["granularity", "\"group:0\""],
        ),
        // Metadata that says group:16 over scales stored for group:32.
        (
            "granularity-mismatch",
            Box::new(|r| r.edit_json("quantization", |q| q["granularity"] = "group:16".into())),
            needles!["has shape", "expected"],
        ),
        (
            "quantization-json",
            Box::new(|r| r.set_meta("quantization", "{\"bits\": [8, 4")),
            needles!["metadata `quantization` is not valid"],
        ),
        (
            "quantization-missing-field",
            Box::new(|r| {
                r.edit_json("quantization", |q| {
                    q.as_object_mut().unwrap().remove("tie_rule");
                })
            }),
            needles!["metadata `quantization` is not valid", "tie_rule"],
        ),
        // The model config.
        (
            "config-json",
            Box::new(|r| r.set_meta("model_config", "{not json")),
            needles!["metadata `model_config` is not valid"],
        ),
        (
            "config-missing-field",
            Box::new(|r| {
                r.edit_json("model_config", |c| {
                    c.as_object_mut().unwrap().remove("hidden_size");
                })
            }),
            needles!["metadata `model_config` is not valid", "hidden_size"],
        ),
        (
            "config-architecture",
            Box::new(|r| r.edit_json("model_config", |c| c["architecture"] = "gpt2".into())),
            needles!["metadata `model_config` is not valid", "gpt2"],
        ),
        (
            "config-odd-head-dim",
            Box::new(|r| r.edit_json("model_config", |c| c["head_dim"] = 15.into())),
            needles!["head_dim (15) must be even"],
        ),
        (
            "config-zero-layers",
            Box::new(|r| r.edit_json("model_config", |c| c["num_hidden_layers"] = 0.into())),
            needles!["num_hidden_layers must be positive"],
        ),
        (
            "config-heads",
            Box::new(|r| r.edit_json("model_config", |c| c["num_key_value_heads"] = 3.into())),
            needles!["must be a multiple of num_key_value_heads"],
        ),
        (
            "config-more-layers",
            Box::new(|r| r.edit_json("model_config", |c| c["num_hidden_layers"] = 3.into())),
            needles!["model.layers.2.", "is missing"],
        ),
        (
            "config-wider",
            Box::new(|r| r.edit_json("model_config", |c| c["hidden_size"] = 128.into())),
            needles!["has shape", "expected"],
        ),
        (
            "config-tied",
            Box::new(|r| r.edit_json("model_config", |c| c["tie_word_embeddings"] = true.into())),
            needles!["`lm_head.weight` is listed as quantized but is not a weight of this model"],
        ),
        (
            "config-missing",
            Box::new(|r| {
                r.metadata.remove("model_config");
            }),
            needles!["metadata field `model_config` is missing"],
        ),
        // The rest of the metadata.
        (
            "provenance-json",
            Box::new(|r| r.set_meta("provenance", "[]")),
            needles!["metadata `provenance` is not valid"],
        ),
        (
            "provenance-missing",
            Box::new(|r| {
                r.metadata.remove("provenance");
            }),
            needles!["metadata field `provenance` is missing"],
        ),
        (
            "add-bos-yes",
            Box::new(|r| r.set_meta("add_bos", "yes")),
            needles!["metadata `add_bos` must be true or false"],
        ),
        (
            "add-bos-missing",
            Box::new(|r| {
                r.metadata.remove("add_bos");
            }),
            needles!["metadata field `add_bos` is missing"],
        ),
    ];
    let n = cases.len();
    for (name, edit, needles) in cases {
        let path = rewritten(&good, dir.path(), &format!("{name}.safetensors"), edit);
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        let err = expect_invalid(&path, &needles);
        assert!(err.contains("invalid checkpoint"), "{name}: {err}");
        assert!(err.contains(&path.display().to_string()), "{name}: the error names the file: {err}");
    }
    assert!(n >= 45);
}

/// A stored tokenizer that is not a tokenizer: the checkpoint opens (the header is fine), asking
/// for the tokenizer is a clear error.
#[test]
fn invalid_stored_tokenizer_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_checkpoint(dir.path(), "good.safetensors");
    let path = rewritten(&good, dir.path(), "bad-tokenizer.safetensors", |r| {
        let t = r.tensor_mut(TOKENIZER_TENSOR);
        t.3 = b"{\"not\": \"a tokenizer\"}".to_vec();
        t.2 = vec![t.3.len()];
    });
    let ckpt = Checkpoint::open(&path).unwrap();
    let err = format!("{:#}", ckpt.tokenizer().expect_err("invalid tokenizer"));
    assert!(err.contains("the stored tokenizer is invalid"), "{err}");
    // The weights are still readable.
    ckpt.weights_at(&Precision::Bits(8)).unwrap();
}

// ----- writing --------------------------------------------------------------------------------

#[test]
fn writes_are_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let (float, q) =
        quantized(Architecture::Llama, false, &spec(&[8, 4, 2], Granularity::Group(32), TieRule::HalfEven), &[]);

    // Into a directory that does not exist: an error naming the path, nothing created.
    let missing = dir.path().join("missing").join("x.safetensors");
    let err = format!("{:#}", write_checkpoint(&missing, &float, &provenance(), &q).expect_err("no such directory"));
    assert!(err.contains("cannot write") && err.contains("x.safetensors.tmp"), "{err}");
    assert!(!dir.path().join("missing").exists());
    assert!(tmp_files(dir.path()).is_empty());

    // Onto a path that is a directory: an error, the directory untouched, no temporary left.
    let as_dir = dir.path().join("d.safetensors");
    std::fs::create_dir(&as_dir).unwrap();
    std::fs::write(as_dir.join("inside"), b"keep").unwrap();
    let err = format!("{:#}", write_checkpoint(&as_dir, &float, &provenance(), &q).expect_err("a directory"));
    assert!(err.contains("d.safetensors"), "{err}");
    assert!(as_dir.is_dir());
    assert_eq!(std::fs::read(as_dir.join("inside")).unwrap(), b"keep");
    assert!(tmp_files(dir.path()).is_empty(), "left {:?}", tmp_files(dir.path()));

    // A successful write leaves exactly the checkpoint, even over a stale temporary.
    let path = dir.path().join("ok.safetensors");
    std::fs::write(dir.path().join("ok.safetensors.tmp"), b"stale partial write").unwrap();
    write_checkpoint(&path, &float, &provenance(), &q).unwrap();
    assert!(tmp_files(dir.path()).is_empty(), "left {:?}", tmp_files(dir.path()));
    let mut names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["d.safetensors", "ok.safetensors"]);
    let big = Checkpoint::open(&path).unwrap();
    assert_eq!(big.quantization().granularity, "group:32");
    drop(big);

    // Overwriting replaces the file whole: a smaller checkpoint of another model over a bigger
    // one is byte-for-byte the size of the same checkpoint written fresh, and reads as it.
    let (float2, q2) = quantized(Architecture::Llama, true, &spec(&[8], Granularity::Channel, TieRule::HalfUp), &[]);
    let fresh = dir.path().join("fresh.safetensors");
    write_checkpoint(&fresh, &float2, &provenance(), &q2).unwrap();
    let old_len = std::fs::metadata(&path).unwrap().len();
    write_checkpoint(&path, &float2, &provenance(), &q2).unwrap();
    let new_len = std::fs::metadata(&path).unwrap().len();
    assert!(new_len < old_len, "the replacement is smaller ({new_len} vs {old_len})");
    assert_eq!(new_len, std::fs::metadata(&fresh).unwrap().len());
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.config(), &float2.config);
    assert_eq!(ckpt.quantization(), &q2.quantization);
    assert_eq!(ckpt.tie_rule(), TieRule::HalfUp);

    // Over a non-checkpoint file too.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, vec![0xab; 4 << 20]).unwrap();
    write_checkpoint(&junk, &float2, &provenance(), &q2).unwrap();
    assert_eq!(std::fs::metadata(&junk).unwrap().len(), new_len);
    Checkpoint::open(&junk).unwrap();
    assert!(tmp_files(dir.path()).is_empty());
}

#[test]
fn writer_rejects_scales_that_are_not_positive_f16_values() {
    let dir = tempfile::tempdir().unwrap();
    let (float, q) =
        quantized(Architecture::Llama, false, &spec(&[8, 4, 2], Granularity::Channel, TieRule::HalfEven), &[]);
    let name = "model.layers.1.self_attn.o_proj.weight";
    let s0 = q.quantized[name].scales[3];
    assert_eq!(half::f16::from_f32(s0).to_f32(), s0, "the quantizer stores f16 scales");
    let not_f16 = f32::from_bits(s0.to_bits() + 1); // between two f16 values
    for (what, bad) in [
        ("between f16 values", not_f16),
        ("zero", 0.0),
        ("NaN", f32::NAN),
        ("infinite", f32::INFINITY),
        ("beyond f16 range", 1e6),
        ("below f16 subnormals", 1e-10),
    ] {
        let mut bad_q = QuantizedModel {
            quantization: q.quantization.clone(),
            quantized: q.quantized.clone(),
            float: q.float.clone(),
            report: Vec::new(),
        };
        bad_q.quantized.get_mut(name).unwrap().scales[3] = bad;
        let path = dir.path().join("bad.safetensors");
        let err = format!(
            "{:#}",
            write_checkpoint(&path, &float, &provenance(), &bad_q).err().unwrap_or_else(|| panic!("{what}: accepted"))
        );
        assert!(err.contains(name) && err.contains("is not a nonzero f16 value"), "{what}: {err}");
        assert!(!path.exists(), "{what}: a file was written");
        assert!(tmp_files(dir.path()).is_empty(), "{what}: a temporary was left");
    }
}

#[test]
fn writer_rejects_inconsistent_contents() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    let (float, q) =
        quantized(Architecture::Llama, false, &spec(&[8, 4, 2], Granularity::Group(32), TieRule::HalfEven), &[]);
    let clone = |q: &QuantizedModel| QuantizedModel {
        quantization: q.quantization.clone(),
        quantized: q.quantized.clone(),
        float: q.float.clone(),
        report: Vec::new(),
    };
    let name = "model.layers.0.mlp.up_proj.weight";

    let mut bad = clone(&q);
    bad.quantization.quantized.pop();
    let err = format!("{:#}", write_checkpoint(&path, &float, &provenance(), &bad).unwrap_err());
    assert!(err.contains("must list exactly the quantized tensors"), "{err}");

    let mut bad = clone(&q);
    bad.quantization.quantized.reverse();
    let err = format!("{:#}", write_checkpoint(&path, &float, &provenance(), &bad).unwrap_err());
    assert!(err.contains("in name order"), "{err}");

    let mut bad = clone(&q);
    bad.quantized.get_mut(name).unwrap().codes.pop();
    let err = format!("{:#}", write_checkpoint(&path, &float, &provenance(), &bad).unwrap_err());
    assert!(err.contains(name) && err.contains("codes"), "{err}");

    let mut bad = clone(&q);
    bad.quantized.get_mut(name).unwrap().scales.push(1.0);
    let err = format!("{:#}", write_checkpoint(&path, &float, &provenance(), &bad).unwrap_err());
    assert!(err.contains(name) && err.contains("scales"), "{err}");

    let mut bad = clone(&q);
    bad.quantization.granularity = "group:16".into();
    let err = format!("{:#}", write_checkpoint(&path, &float, &provenance(), &bad).unwrap_err());
    assert!(err.contains(name) || err.contains("granularity"), "{err}");

    assert!(!path.exists());
    assert!(tmp_files(dir.path()).is_empty());
}

/// A granularity override lays out the weights it names otherwise (here the embedding per 16
/// columns, the rest per 32): recorded by full name, read back with that layout, decoded with it,
/// counted in the bits per weight; two overrides matching one weight are refused.
#[test]
fn granularity_overrides_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(&[8, 4, 2], Granularity::Group(32), TieRule::HalfEven);
    s.granularity_overrides.insert("embed_tokens".into(), Granularity::Group(16));
    let (float, q) = quantized(Architecture::Llama, true, &s, &[]);
    let embedding = "model.embed_tokens.weight";
    assert_eq!(q.quantization.granularity_overrides, [(embedding.to_string(), "group:16".to_string())].into());
    assert_eq!(q.quantized[embedding].layout.group, 16);
    let path = dir.path().join("overrides.safetensors");
    write_checkpoint(&path, &float, &provenance(), &q).unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.quantization(), &q.quantization);
    for (name, w) in &q.quantized {
        let read = ckpt.quantized(name).unwrap();
        assert_eq!(read.layout, w.layout, "{name}");
        assert_eq!(read.scales, w.scales, "{name}");
    }
    let w4 = ckpt.weights_at(&Precision::Bits(4)).unwrap();
    let decoded = q.quantized[embedding].dequantize(4, TieRule::HalfEven).unwrap();
    assert!(bits_eq(&flat(&w4.get(embedding, &[300, 64]).unwrap()), &decoded));
    // Bits per weight at 4: every matrix's codes plus one f16 scale per group of its own size.
    let (mut bits, mut weights) = (0.0, 0.0);
    for (name, shape) in Weights::expected_shapes(ckpt.config()) {
        let &[rows, cols] = shape.as_slice() else { continue };
        let group = if name == embedding { 16 } else { 32 };
        bits += (rows * cols * 4 + 16 * rows * cols.div_ceil(group)) as f64;
        weights += (rows * cols) as f64;
    }
    assert!((ckpt.bits_per_weight(&Precision::Bits(4)).unwrap() - bits / weights).abs() < 1e-12);
    // Without the override the checkpoint is smaller at every precision.
    let (_, plain) =
        quantized(Architecture::Llama, true, &spec(&[8, 4, 2], Granularity::Group(32), TieRule::HalfEven), &[]);
    assert!(plain.quantized[embedding].scales.len() * 2 == q.quantized[embedding].scales.len());

    let mut ambiguous = s.clone();
    ambiguous.granularity_overrides.insert("embed".into(), Granularity::Channel);
    let err = quantize_model(&float, &ambiguous, &[], |_| {}).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("matches the granularity overrides `embed` and `embed_tokens`"), "{err}");
}

#[test]
fn profiles_round_trip_and_decode_per_weight() {
    let dir = tempfile::tempdir().unwrap();
    let (float, mut q) =
        quantized(Architecture::Llama, false, &spec(&[8, 4, 2], Granularity::Channel, TieRule::HalfEven), &[]);
    let rules: quantize::profile::ProfileRules =
        toml::from_str("name = \"mix\"\ndefault = 3\n[[rule]]\nmatch = \"mlp\"\nbits = 6\n").unwrap();
    let bits = rules.resolve(&q.quantization.quantized).unwrap();
    q.quantization.profiles.insert("mix".into(), bits.clone());
    let path = dir.path().join("profiles.safetensors");
    write_checkpoint(&path, &float, &provenance(), &q).unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.quantization().profiles["mix"], bits);
    // Decoding the profile = each weight at its own bits.
    let mix = ckpt.weights_at(&Precision::Profile("mix".into())).unwrap();
    let (w3, w6) = (ckpt.weights_at(&Precision::Bits(3)).unwrap(), ckpt.weights_at(&Precision::Bits(6)).unwrap());
    for (name, t) in mix.iter() {
        let expected = match bits.get(name) {
            Some(6) => w6.get(name, t.dims()).unwrap(),
            _ => w3.get(name, t.dims()).unwrap(),
        };
        assert!(bits_eq(&flat(t), &flat(&expected)), "{name}");
    }
    // Bits per weight: every matrix of this model is quantized, so each bit added to every weight
    // adds exactly one; the profile adds 3 bits on the MLP's share of the weights.
    let bpw = |p: Precision| ckpt.bits_per_weight(&p).unwrap();
    assert!((bpw(Precision::Bits(6)) - bpw(Precision::Bits(3)) - 3.0).abs() < 1e-9);
    let size = |name: &str| w3.iter().find(|(n, _)| n.as_str() == name).unwrap().1.elem_count();
    let all: usize = bits.keys().map(|n| size(n)).sum();
    let mlp: usize = bits.iter().filter(|(_, &b)| b == 6).map(|(n, _)| size(n)).sum();
    assert!(mlp > 0 && mlp < all);
    let expected = bpw(Precision::Bits(3)) + 3.0 * mlp as f64 / all as f64;
    assert!(
        (bpw(Precision::Profile("mix".into())) - expected).abs() < 1e-9,
        "{} vs {expected}",
        bpw(Precision::Profile("mix".into()))
    );
    assert!(ckpt.bits_per_weight(&Precision::Float).is_err());
    let err = format!("{:#}", ckpt.weights_at(&Precision::Profile("other".into())).err().unwrap());
    assert!(err.contains("profile `other` is not in this checkpoint") && err.contains("mix"), "{err}");
    // A profile added to an open checkpoint (in memory) decodes like a stored one; a taken
    // name or a profile that misses a weight is refused.
    let mut ckpt = ckpt;
    let mut low = bits.clone();
    low.values_mut().for_each(|b| *b = 3);
    let err = format!("{:#}", ckpt.add_profile("mix", low.clone()).unwrap_err());
    assert!(err.contains("a profile named `mix` exists already"), "{err}");
    ckpt.add_profile("all3", low.clone()).unwrap();
    let all3 = ckpt.weights_at(&Precision::Profile("all3".into())).unwrap();
    assert!(all3.iter().all(|(name, t)| bits_eq(&flat(t), &flat(&w3.get(name, t.dims()).unwrap()))));
    low.pop_first();
    let err = format!("{:#}", ckpt.add_profile("short", low).unwrap_err());
    assert!(err.contains("profile `short` must give a bit-width to exactly the quantized weights"), "{err}");
    // The writer refuses a profile that misses a weight.
    q.quantization.profiles.get_mut("mix").unwrap().pop_first();
    let err = write_checkpoint(&dir.path().join("bad.safetensors"), &float, &provenance(), &q).unwrap_err().to_string();
    assert!(err.contains("exactly the quantized weights"), "{err}");
}

/// Wide rows are stored, read back, decoded by the reference path (the first rows wider) and
/// counted in bits per weight; `none` clears them, and the writer refuses bad ones.
#[test]
fn wide_rows_round_trip_and_count() {
    let dir = tempfile::tempdir().unwrap();
    let (float, mut q) =
        quantized(Architecture::Llama, true, &spec(&[8, 4, 2], Granularity::Group(32), TieRule::HalfEven), &[]);
    let plain_path = dir.path().join("plain.safetensors");
    write_checkpoint(&plain_path, &float, &provenance(), &q).unwrap();
    q.quantization.widen_rows(&"4096:+1".parse().unwrap(), &float.config).unwrap();
    let embed = "model.embed_tokens.weight";
    // At most the vocabulary (300 here), on the tied embedding.
    let want = WideRows { weight: embed.into(), rows: 300, extra_bits: 1 };
    assert_eq!(q.quantization.wide_rows, Some(want));
    q.quantization.widen_rows(&"64:+2".parse().unwrap(), &float.config).unwrap();
    let path = dir.path().join("wide.safetensors");
    write_checkpoint(&path, &float, &provenance(), &q).unwrap();
    let (ckpt, plain) = (Checkpoint::open(&path).unwrap(), Checkpoint::open(&plain_path).unwrap());
    assert_eq!(ckpt.quantization().wide_rows, Some(WideRows { weight: embed.into(), rows: 64, extra_bits: 2 }));
    let at = |c: &Checkpoint, b: u32| flat(&c.weights_at(&Precision::Bits(b)).unwrap().get(embed, &[300, 64]).unwrap());
    let (w3, p3, p5) = (at(&ckpt, 3), at(&plain, 3), at(&plain, 5));
    assert!(bits_eq(&w3[..64 * 64], &p5[..64 * 64]) && bits_eq(&w3[64 * 64..], &p3[64 * 64..]));
    assert!(!bits_eq(&w3, &p3));
    // Bits per weight: 64 rows × 64 columns × 2 bits more over every matrix's weights, at 8 none.
    let weights: usize = Weights::expected_shapes(ckpt.config())
        .iter()
        .filter(|(_, s)| s.len() == 2)
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let added = |b: u32| {
        ckpt.bits_per_weight(&Precision::Bits(b)).unwrap() - plain.bits_per_weight(&Precision::Bits(b)).unwrap()
    };
    assert!((added(3) - (64 * 64 * 2) as f64 / weights as f64).abs() < 1e-12, "{}", added(3));
    assert_eq!(added(8), 0.0);
    // `none` clears them in memory; the writer refuses rows past the weight.
    let mut reopened = Checkpoint::open(&path).unwrap();
    reopened.widen_rows(&"none".parse().unwrap()).unwrap();
    assert_eq!(reopened.quantization().wide_rows, None);
    q.quantization.wide_rows = Some(WideRows { weight: embed.into(), rows: 301, extra_bits: 1 });
    let err = write_checkpoint(&dir.path().join("bad.safetensors"), &float, &provenance(), &q).unwrap_err();
    assert!(format!("{err:#}").contains("301 rows of `model.embed_tokens.weight`"), "{err:#}");
    // Bad specs are clear errors.
    for (bad, needle) in [("4096", "expected ROWS:+BITS"), ("4096:+7", "7 extra bits"), ("x:+1", "expected ROWS:+BITS")]
    {
        let err = format!("{:#}", bad.parse::<WideRowsSpec>().unwrap_err());
        assert!(err.contains(needle), "{bad}: {err}");
    }
    assert_eq!("0:+1".parse::<WideRowsSpec>().unwrap(), WideRowsSpec::None);
    assert_eq!(WideRowsSpec::DEFAULT.to_string().parse::<WideRowsSpec>().unwrap(), WideRowsSpec::DEFAULT);
}

/// The row ranges a GPU launch per precision covers (`LeadingRows::ranges`): the leading rows at
/// their bits, then the rest; empty ranges dropped, leading rows past the weight clamped.
#[test]
fn leading_rows_split_a_weight_into_ranges() {
    let lead = |rows, bits| Some(LeadingRows { rows, bits });
    assert_eq!(LeadingRows::ranges(None, 100, 3), vec![(0..100, 3)]);
    assert_eq!(LeadingRows::ranges(lead(40, 4), 100, 3), vec![(0..40, 4), (40..100, 3)]);
    assert_eq!(LeadingRows::ranges(lead(0, 4), 100, 3), vec![(0..100, 3)]);
    assert_eq!(LeadingRows::ranges(lead(100, 4), 100, 3), vec![(0..100, 4)]);
    assert_eq!(LeadingRows::ranges(lead(300, 4), 100, 3), vec![(0..100, 4)]);
}

/// Corrections per row and per group (fitted in weight space) and the max-negative grid's
/// negative scales are stored, read back bit for bit, decoded by the reference path as the
/// kernels serve them, and counted in bits per weight (16 bits per factor at each corrected
/// precision).
#[test]
fn corrections_and_negative_scales_round_trip() {
    corrections_round_trip(CorrectionGranularity::Row);
    corrections_round_trip(CorrectionGranularity::Group);
}

fn corrections_round_trip(granularity: CorrectionGranularity) {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec(&[8, 4, 2], Granularity::Group(32), TieRule::HalfEven);
    spec.grid = quantize::Grid::MaxNegative;
    let (float, mut q) = quantized(Architecture::Llama, true, &spec, &[]);
    assert!(q.quantized.values().any(|w| w.scales.iter().any(|&s| s < 0.0)), "the grid gives negative scales");
    let plain = q.clone();
    quantize::corrections::correct_model(&float, &mut q, &[4, 2, 3], granularity, None, |_| {}).unwrap();
    assert_eq!(q.quantization.corrected_bits, [4, 3, 2]);
    assert_eq!(q.quantization.correction_granularity, granularity);
    let path = dir.path().join("corrected.safetensors");
    write_checkpoint(&path, &float, &provenance(), &q).unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.quantization().corrected_bits, [4, 3, 2]);
    assert_eq!(ckpt.quantization().scale_method, "search:normalized:max-negative");
    for (name, mem) in &q.quantized {
        let stored = ckpt.quantized(name).unwrap();
        assert_eq!(&stored, mem, "{name}");
        let factors = match granularity {
            CorrectionGranularity::Row => mem.layout.rows,
            CorrectionGranularity::Group => mem.layout.n_scales(),
        };
        for b in [4, 3, 2] {
            assert_eq!(stored.correction(b).map(<[f32]>::len), Some(factors), "{name} {b}");
        }
        assert!(stored.correction(8).is_none() && stored.correction(5).is_none());
    }
    // The reference runtime decodes what the kernels serve: corrections included.
    for bits in [8, 4, 2] {
        let weights = ckpt.weights_at(&Precision::Bits(bits)).unwrap();
        for (name, mem) in &q.quantized {
            let t = weights.get(name, &[mem.layout.rows, mem.layout.cols]).unwrap();
            assert!(bits_eq(&flat(&t), &mem.dequantize(bits, TieRule::HalfEven).unwrap()), "{name} at {bits}");
        }
    }
    // Corrections fitted in weight space never make a weight's error worse (up to f16 rounding).
    for (layer, before) in q.report.iter().zip(&plain.report) {
        for ((b, after), (_, before)) in layer.relative_error.iter().zip(&before.relative_error) {
            assert!(*after <= before * 1.0001 + 1e-12, "{} at {b} bits: {after} > {before}", layer.name);
        }
    }
    // 16 bits per factor at a corrected precision, nothing at the others.
    let plain_path = dir.path().join("plain.safetensors");
    write_checkpoint(&plain_path, &float, &provenance(), &plain).unwrap();
    let plain_ckpt = Checkpoint::open(&plain_path).unwrap();
    let factors: usize = q.quantized.values().map(|w| w.correction(4).unwrap().len()).sum();
    let total: usize =
        Weights::expected_shapes(&float.config).iter().filter(|(_, s)| s.len() == 2).map(|(_, s)| s[0] * s[1]).sum();
    for (bits, extra) in [(4, 16.0 * factors as f64 / total as f64), (8, 0.0), (5, 0.0)] {
        let (with, without) = (
            ckpt.bits_per_weight(&Precision::Bits(bits)).unwrap(),
            plain_ckpt.bits_per_weight(&Precision::Bits(bits)).unwrap(),
        );
        assert!((with - without - extra).abs() < 1e-9, "{bits} bits: {with} vs {without} + {extra}");
    }
    // A zero correction in the file, corrections the metadata does not list, and listed ones that
    // are missing, are all refused.
    let w = "model.layers.0.mlp.down_proj.weight";
    let corrections = format!("{w}.corrections");
    let zero = rewritten(&path, dir.path(), "zero.safetensors", |r| {
        r.tensor_mut(&corrections).3[..2].copy_from_slice(&[0, 0])
    });
    expect_invalid(&zero, &[&corrections, "nonzero and finite"]);
    let unlisted = rewritten(&path, dir.path(), "unlisted.safetensors", |r| {
        r.edit_json("quantization", |q| q["corrected_bits"] = serde_json::json!([]))
    });
    expect_invalid(&unlisted, &["unexpected tensor", ".corrections`"]);
    let missing = rewritten(&path, dir.path(), "missing.safetensors", |r| r.remove(&corrections));
    expect_invalid(&missing, &[&corrections, "missing"]);
    // Factors of the other granularity than the metadata says have the wrong shape.
    let other = match granularity {
        CorrectionGranularity::Row => "group",
        CorrectionGranularity::Group => "row",
    };
    let relabelled = rewritten(&path, dir.path(), "relabelled.safetensors", |r| {
        r.edit_json("quantization", |q| q["correction_granularity"] = serde_json::json!(other))
    });
    expect_invalid(&relabelled, &[".corrections` has shape", "expected"]);
}
