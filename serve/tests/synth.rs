//! `drq-synth`: sampled training text is reproducible from its seed whatever the batch, follows
//! the flags, and bad flags are refused before anything is written.

mod support;

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_drq-synth");

fn synth(checkpoint: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(BIN).arg("--model").arg(checkpoint).arg("--out").arg(out).args(extra).output().unwrap()
}

fn ok(out: Output) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn samples_reproducibly_whatever_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = support::tiny_checkpoint(dir.path());
    let [a, b, c, d] = ["a.txt", "b.txt", "c.txt", "d.txt"].map(|f| dir.path().join(f));
    let flags = ["--sequences", "7", "--max-tokens", "12", "--seed", "5"];
    ok(synth(&checkpoint, &a, &[&flags[..], &["--max-batch", "3"]].concat()));
    ok(synth(&checkpoint, &b, &[&flags[..], &["--max-batch", "7", "--threads", "2"]].concat()));
    let text = std::fs::read_to_string(&a).unwrap();
    assert_eq!(text, std::fs::read_to_string(&b).unwrap(), "the batch size changed the sampled text");
    let sequences: Vec<&str> = text.split("\n\n").filter(|s| !s.is_empty()).collect();
    assert!(!sequences.is_empty() && sequences.len() <= 7, "{sequences:?}");
    assert!(!dir.path().join("a.txt.tmp").exists());

    // Another seed samples other text; greedy decoding from the same start tokens is the same
    // whatever the sampling seed would be.
    ok(synth(&checkpoint, &c, &["--sequences", "7", "--max-tokens", "12", "--seed", "6"]));
    assert_ne!(text, std::fs::read_to_string(&c).unwrap());
    ok(synth(&checkpoint, &d, &[&flags[..], &["--temperature", "0"]].concat()));
    assert_ne!(text, std::fs::read_to_string(&d).unwrap(), "temperature 0 should differ from sampling");
}

#[test]
fn bad_flags_are_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = support::tiny_checkpoint(dir.path());
    let out = dir.path().join("out.txt");
    for (args, needle) in [
        (vec!["--sequences", "0", "--max-tokens", "8"], "--sequences"),
        (vec!["--max-tokens", "0"], "--max-tokens"),
        (vec!["--temperature=-1", "--max-tokens", "8"], "--temperature"),
        (vec!["--top-p", "0", "--max-tokens", "8"], "--top-p"),
        (vec!["--precision", "9", "--max-tokens", "8"], "--precision 9"),
        (vec!["--max-tokens", "256"], "context is 256 tokens"),
    ] {
        let result = synth(&checkpoint, &out, &args);
        let err = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success() && err.contains(needle) && !err.contains("panicked"), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
    let missing = dir.path().join("no/such/dir/out.txt");
    let err = String::from_utf8_lossy(&synth(&checkpoint, &missing, &["--max-tokens", "8"]).stderr).to_string();
    assert!(err.contains("does not exist"), "{err}");
    // An existing output is kept unless --force.
    std::fs::write(&out, "keep me").unwrap();
    let result = synth(&checkpoint, &out, &["--sequences", "1", "--max-tokens", "2"]);
    assert!(!result.status.success() && String::from_utf8_lossy(&result.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "keep me");
    ok(synth(&checkpoint, &out, &["--sequences", "1", "--max-tokens", "2", "--force"]));
    assert_ne!(std::fs::read_to_string(&out).unwrap(), "keep me");
}
