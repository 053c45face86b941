//! Helpers for tests, benchmarks and evals that use the project's `../shared` folder (the real
//! model, reference outputs and texts). Never used at run time.

use std::path::PathBuf;

/// `../shared` next to the workspace root. Panics with a clear message when it is missing:
/// tests that need it must fail loudly, never skip.
pub fn shared_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    assert!(
        dir.join("README.md").is_file(),
        "../shared is missing (looked in {}); these tests need the project's shared data",
        dir.display()
    );
    dir
}

/// The real SmolLM2-135M-Instruct GGUF in `../shared/models`.
pub fn smollm2_gguf() -> PathBuf {
    shared_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// `../shared/reference/smollm2-135m-instruct/reference.json`, parsed.
pub fn smollm2_reference() -> serde_json::Value {
    let path = shared_dir().join("reference/smollm2-135m-instruct/reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference.json is valid JSON")
}

/// A tiny byte-level BPE tokenizer: the 256 byte tokens (GPT-2 byte alphabet), a few merges, and
/// `<|endoftext|>` as special token 0; ids stay below 300.
pub fn tiny_tokenizer() -> tokenizers::Tokenizer {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer};
    let alphabet: Vec<String> = {
        let mut chars: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        chars.sort();
        chars.into_iter().map(String::from).collect()
    };
    let mut vocab = tokenizers::models::bpe::Vocab::new();
    vocab.insert("<|endoftext|>".into(), 0);
    for (i, c) in alphabet.iter().enumerate() {
        vocab.insert(c.clone(), i as u32 + 1);
    }
    let merges = vec![("t".to_string(), "h".to_string()), ("th".to_string(), "e".to_string())];
    let next = vocab.len() as u32;
    vocab.insert("th".into(), next);
    vocab.insert("the".into(), next + 1);
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().expect("valid tiny BPE");
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.add_special_tokens([AddedToken::from("<|endoftext|>", true)]).expect("adds one token");
    tokenizer
}

/// A tiny random model of the given architecture: 2 layers, hidden 64, 4 query / 2 KV heads,
/// vocabulary 300 (covers [`tiny_tokenizer`]), weights ~N(0, 0.02²) from `seed`.
pub fn tiny_model(architecture: model::Architecture, tie_word_embeddings: bool, seed: u64) -> model::FloatModel {
    use candle_core::{Device, Tensor};
    let config = model::ModelConfig {
        architecture,
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 256,
        tie_word_embeddings,
        attention_bias: architecture == model::Architecture::Qwen2,
        bos_token_id: Some(0),
        eos_token_ids: vec![0],
    };
    // A small deterministic generator keeps the fixture independent of `rand`'s versions.
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut normal = move || {
        let mut uniform = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (u, v) = (uniform(), uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    };
    let mut weights = model::Weights::new();
    for (name, shape) in model::Weights::expected_shapes(&config) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            (0..n).map(|_| 1.0 + 0.1 * normal()).collect()
        } else {
            (0..n).map(|_| 0.02 * normal()).collect()
        };
        weights.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap();
    }
    model::FloatModel { config, tokenizer: tiny_tokenizer(), add_bos: false, chat_template: None, weights }
}

/// [`tiny_model`] with its matrices scaled from N(0, 0.02²) to N(0, 0.5²): attention and the
/// logits are peaked, so its greedy tokens depend on every part of a step (positions included)
/// rather than on the bias of a near-uniform model. For tests that compare two runtimes.
pub fn sharp_tiny_model(architecture: model::Architecture, tie_word_embeddings: bool, seed: u64) -> model::FloatModel {
    let mut float = tiny_model(architecture, tie_word_embeddings, seed);
    let mut weights = model::Weights::new();
    for (name, t) in float.weights.iter() {
        let t = if t.rank() == 2 { (t * 25.0).expect("scales a matrix") } else { t.clone() };
        weights.insert(name.clone(), t).expect("same name and shape");
    }
    float.weights = weights;
    float
}

/// The largest absolute element difference of two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "tensors of different shapes");
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_dtype(candle_core::DType::F32))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("f32 tensors on the CPU")
}

/// Logits `[1, ids.len(), vocab]` of the float model on one sequence, from an empty cache.
pub fn float_logits(model: &model::FloatModel, ids: &[u32]) -> candle_core::Tensor {
    let t = model::Transformer::new(&model.config, &model.weights, model::OpsMode::Inference).expect("valid model");
    let tokens = candle_core::Tensor::new(ids, &candle_core::Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids");
    t.forward(&tokens, &mut model::KvCache::new(&model.config), 0).expect("forward")
}

/// The path of the workspace binary `name` (`drq-serve`, …), built like the tests that run it.
///
/// Cargo builds a package's binaries for that package's own integration tests only, so the
/// end-to-end suite asks cargo for every workspace binary once per test process, in the
/// profile and target directory of the running test (a no-op after `cargo test --workspace`,
/// which has built them already). Panics with cargo's output if the build fails.
pub fn workspace_bin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // target/<profile>/deps/<test binary>
        let exe = std::env::current_exe().expect("the test binary's path");
        let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps").to_path_buf();
        let target_dir = profile_dir.parent().expect("target/<profile>");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev".to_string(),
            Some(other) => other.to_string(),
            None => panic!("unexpected target directory {}", profile_dir.display()),
        };
        let out = std::process::Command::new(env!("CARGO"))
            .args(["build", "--workspace", "--bins", "--quiet", "--profile", &profile, "--target-dir"])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cargo runs");
        assert!(
            out.status.success(),
            "cargo build --workspace --bins failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        profile_dir
    });
    let path = dir.join(name);
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// Starts `command` (a `drq-serve` with `--port 0`) with its log on a pipe and waits for the
/// "serving `…` on http://ADDR" line; returns the process and ADDR. The log is drained in the
/// background afterwards so that the server never blocks on a full pipe. Panics with the log if
/// the server exits first.
#[allow(clippy::zombie_processes)] // the caller owns the child and waits for it
pub fn spawn_server(mut command: std::process::Command) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = command
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the server starts");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut log = String::new();
    loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).expect("the server's log") == 0 {
            let status = child.wait().expect("the server's exit status");
            panic!("the server exited ({status}) before listening:\n{log}");
        }
        log.push_str(&line);
        if let Some(rest) = line.split("on http://").nth(1) {
            let addr = rest.split_whitespace().next().unwrap_or_default().to_string();
            std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
            return (child, addr);
        }
    }
}

/// The exit status of `child` within `timeout`; past it the child is killed and this panics.
pub fn wait_with_timeout(child: &mut std::process::Child, timeout: std::time::Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("the child's status") {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit within {timeout:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
