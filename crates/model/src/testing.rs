//! Helpers for tests, benchmarks and evals that use the project's `../shared` folder (the real
//! model, reference outputs and texts). Never used at run time.

use std::path::PathBuf;

/// `../shared` next to the workspace root. Panics with a clear message when it is missing:
/// tests that need it must fail loudly, never skip.
pub fn shared_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
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
