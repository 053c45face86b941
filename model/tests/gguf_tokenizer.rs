//! `model::tokenizer` against the oracle transformers built from SmolLM2's GGUF (byte-level BPE),
//! on hand-made SentencePiece and byte-level vocabularies, and on malformed metadata.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{self, Value};
use model::tokenizer::{chat_template_from_gguf, special_tokens_from_gguf, tokenizer_from_gguf, SpecialTokens};
use serde_json::Value as Json;
use tokenizers::Tokenizer;

/// A file under `../shared`; panics when it is missing, since these tests must never pass vacuously.
fn shared(relative: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared").join(relative);
    assert!(
        path.exists(),
        "{} is missing: these tests need the read-only shared data at ../shared next to the workspace root",
        path.display()
    );
    path
}

fn reference_dir(file: &str) -> PathBuf {
    shared(&format!("reference/smollm2-135m-instruct/{file}"))
}

/// SmolLM2's GGUF metadata (the header only; tensor data is never read).
fn smollm_metadata() -> &'static HashMap<String, Value> {
    static METADATA: OnceLock<HashMap<String, Value>> = OnceLock::new();
    METADATA.get_or_init(|| {
        let path = shared("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let mut file = std::fs::File::open(&path).expect("opening the GGUF");
        gguf_file::Content::read(&mut file).expect("reading the GGUF header").metadata
    })
}

fn smollm() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| tokenizer_from_gguf(smollm_metadata()).expect("building SmolLM2's tokenizer"))
}

fn oracle() -> Tokenizer {
    Tokenizer::from_file(reference_dir("tokenizer.json")).expect("loading the oracle tokenizer.json")
}

fn reference() -> Json {
    let text = std::fs::read_to_string(reference_dir("reference.json")).expect("reading reference.json");
    serde_json::from_str(&text).expect("parsing reference.json")
}

fn ids(json: &Json) -> Vec<u32> {
    json.as_array().expect("an id array").iter().map(|id| id.as_u64().expect("an id") as u32).collect()
}

fn encode(tokenizer: &Tokenizer, text: &str, add_special_tokens: bool) -> Vec<u32> {
    tokenizer.encode(text, add_special_tokens).expect("encoding").get_ids().to_vec()
}

fn decode(tokenizer: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> String {
    tokenizer.decode(ids, skip_special_tokens).expect("decoding")
}

fn to_json(tokenizer: &Tokenizer) -> Json {
    serde_json::from_str(&tokenizer.to_string(false).expect("serializing")).expect("parsing")
}

#[test]
fn smollm_serializes_exactly_like_the_oracle() {
    let ours = to_json(smollm());
    let text = std::fs::read_to_string(reference_dir("tokenizer.json")).expect("reading the oracle");
    let oracle: Json = serde_json::from_str(&text).expect("parsing the oracle");
    // Field by field so a failure names the part that differs instead of dumping 49k tokens.
    let (ours, oracle) = (ours.as_object().unwrap(), oracle.as_object().unwrap());
    let keys = |map: &serde_json::Map<String, Json>| map.keys().cloned().collect::<std::collections::BTreeSet<_>>();
    assert_eq!(keys(ours), keys(oracle));
    for (key, expected) in oracle {
        if key == "model" {
            for (field, expected) in expected.as_object().unwrap() {
                assert!(ours["model"][field] == *expected, "model.{field} differs from the oracle");
            }
            assert_eq!(ours["model"].as_object().unwrap().len(), expected.as_object().unwrap().len());
        } else {
            assert_eq!(ours[key], *expected, "`{key}` differs from the oracle");
        }
    }
}

#[test]
fn smollm_encode_cases_match_the_reference() {
    let reference = reference();
    let cases = reference["encode_cases"].as_array().expect("encode_cases");
    assert_eq!(cases.len(), 10);
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let expected = ids(&case["ids"]);
        // The reference ids carry no BOS (`add_bos_token` is false), and the tokenizer adds none
        // even when asked for special tokens: both settings must give the reference ids.
        assert_eq!(encode(smollm(), text, false), expected, "encoding {text:?}");
        assert_eq!(encode(smollm(), text, true), expected, "encoding {text:?} with special tokens");
        assert_eq!(decode(smollm(), &expected, false), text, "decoding the ids of {text:?}");
    }
}

#[test]
fn smollm_sample_matches_the_reference() {
    let reference = reference();
    let sample = &reference["sample"];
    let text =
        std::fs::read_to_string(reference_dir(sample["file"].as_str().expect("file"))).expect("reading the sample");
    let expected_first = ids(&sample["ids_first_301"]);
    assert_eq!(expected_first.len(), 301);

    let got = encode(smollm(), &text, false);
    assert_eq!(got.len() as u64, sample["n_ids_total"].as_u64().expect("n_ids_total"));
    assert_eq!(got[..301], expected_first[..]);
    assert_eq!(decode(smollm(), &got, false), text);
}

#[test]
fn smollm_matches_the_oracle_on_sample_and_wikitext() {
    let oracle = oracle();
    let sample = std::fs::read_to_string(reference_dir("sample.txt")).expect("reading the sample");
    let wiki = std::fs::read_to_string(shared("data/wikitext-2-raw/wiki.test.raw")).expect("reading wikitext");
    // About 200 kB, cut on a line boundary so the chunk is valid UTF-8 and ends cleanly.
    let end = wiki.as_bytes()[..200_000].iter().rposition(|&b| b == b'\n').expect("a newline") + 1;
    let chunk = &wiki[..end];
    for (name, text) in [("sample.txt", sample.as_str()), ("wiki.test.raw chunk", chunk)] {
        let expected = encode(&oracle, text, true);
        let got = encode(smollm(), text, true);
        assert!(got.len() > 100, "{name} should give many tokens");
        if let Some(at) = got.iter().zip(&expected).position(|(a, b)| a != b) {
            panic!("{name}: first difference at token {at}: ours {} vs oracle {}", got[at], expected[at]);
        }
        assert_eq!(got.len(), expected.len(), "{name}: token counts differ");
        assert_eq!(decode(smollm(), &got, false), text, "{name}: decode round trip");
        assert_eq!(decode(smollm(), &got, true), decode(&oracle, &got, true), "{name}: decode vs oracle");
    }
}

#[test]
fn smollm_special_tokens_and_chat_template() {
    let reference = reference();
    let special = special_tokens_from_gguf(smollm_metadata());
    assert_eq!(
        special,
        SpecialTokens {
            bos: reference["special"]["bos_id"].as_u64().map(|id| id as u32),
            eos: reference["special"]["eos_id"].as_u64().map(|id| id as u32),
            add_bos: false,
        }
    );
    assert_eq!(smollm().id_to_token(1).as_deref(), Some("<|im_start|>"));
    assert_eq!(smollm().id_to_token(2).as_deref(), Some("<|im_end|>"));
    // Control tokens are special: skipped on request, kept otherwise.
    let ids = encode(smollm(), "<|im_start|>user\nHi<|im_end|>", false);
    assert_eq!(decode(smollm(), &ids, true), "user\nHi");
    assert_eq!(decode(smollm(), &ids, false), "<|im_start|>user\nHi<|im_end|>");

    let template = chat_template_from_gguf(smollm_metadata()).expect("SmolLM2 has a chat template");
    assert!(template.starts_with("{% for message in messages %}"), "{template}");
    assert!(template.contains("<|im_start|>"));
    assert_eq!(chat_template_from_gguf(&HashMap::new()), None);
}

fn string(s: &str) -> Value {
    Value::String(s.to_owned())
}

fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| string(s)).collect())
}

/// A tiny SentencePiece vocabulary the way llama.cpp writes Llama 2's: `<unk>`, `<s>`, `</s>`,
/// optionally the 256 byte tokens, then pieces whose scores order the merges.
fn spm_metadata(with_bytes: bool) -> HashMap<String, Value> {
    let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    if with_bytes {
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        types.extend([6; 256]);
        scores.extend([0.0; 256]);
    }
    let pieces = [
        ("ll", -1.0),
        ("he", -2.0),
        ("▁h", -3.0),
        ("llo", -4.0),
        ("▁he", -5.0),
        ("▁hello", -6.0),
        ("▁w", -7.0),
        ("or", -8.0),
        ("▁wor", -9.0),
        ("ld", -10.0),
        ("▁world", -11.0),
        ("▁", -20.0),
        ("h", -21.0),
        ("e", -22.0),
        ("l", -23.0),
        ("o", -24.0),
        ("w", -25.0),
        ("r", -26.0),
        ("d", -27.0),
    ];
    for (piece, score) in pieces {
        tokens.push(piece.to_owned());
        types.push(1);
        scores.push(score);
    }
    HashMap::from([
        ("tokenizer.ggml.model".to_owned(), string("llama")),
        ("tokenizer.ggml.tokens".to_owned(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".to_owned(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.scores".to_owned(), Value::Array(scores.into_iter().map(Value::F32).collect())),
        ("tokenizer.ggml.bos_token_id".to_owned(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".to_owned(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".to_owned(), Value::U32(0)),
    ])
}

fn id(tokenizer: &Tokenizer, token: &str) -> u32 {
    tokenizer.token_to_id(token).unwrap_or_else(|| panic!("`{token}` is not in the vocabulary"))
}

fn pieces(tokenizer: &Tokenizer, tokens: &[&str]) -> Vec<u32> {
    tokens.iter().map(|t| id(tokenizer, t)).collect()
}

#[test]
fn spm_merges_follow_scores_like_transformers() {
    let tokenizer = tokenizer_from_gguf(&spm_metadata(true)).unwrap();
    let json = to_json(&tokenizer);
    let merges: Vec<(String, String)> = serde_json::from_value(json["model"]["merges"].clone()).unwrap();
    // Ranked by the merged piece's score; `▁he` has two splits, ordered by their halves' scores
    // (`▁h` -3 beats `▁` -20). Byte and control tokens have no splits into two tokens.
    let expected = [
        ("l", "l"),
        ("h", "e"),
        ("▁", "h"),
        ("ll", "o"),
        ("▁h", "e"),
        ("▁", "he"),
        ("▁he", "llo"),
        ("▁", "w"),
        ("o", "r"),
        ("▁w", "or"),
        ("l", "d"),
        ("▁wor", "ld"),
    ];
    let expected: Vec<(String, String)> = expected.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    assert_eq!(merges, expected);
    assert_eq!(json["model"]["byte_fallback"], true);
    assert_eq!(json["model"]["fuse_unk"], true);
    assert_eq!(json["model"]["unk_token"], "<unk>");
}

#[test]
fn spm_encodes_with_a_prefix_space_and_byte_fallback() {
    let t = tokenizer_from_gguf(&spm_metadata(true)).unwrap();
    // "▁hello▁world": ll, he, llo, then ▁+he, ▁he+llo, and ▁w, or, ▁w+or, ld, ▁wor+ld.
    assert_eq!(encode(&t, "hello world", true), pieces(&t, &["▁hello", "▁world"]));
    // A leading space is kept: "▁▁hello" leaves the first `▁` alone.
    assert_eq!(encode(&t, " hello", false), pieces(&t, &["▁", "▁hello"]));
    // "▁hell": no `▁hell` or `llo` can form, so `▁he` + `ll`.
    assert_eq!(encode(&t, "hell", false), pieces(&t, &["▁he", "ll"]));
    // `i` and `é` are not pieces: their UTF-8 bytes stand in.
    assert_eq!(encode(&t, "hi", false), pieces(&t, &["▁h", "<0x69>"]));
    assert_eq!(encode(&t, "é", false), pieces(&t, &["▁", "<0xC3>", "<0xA9>"]));
    // Control tokens are matched in raw text, and the text after one gets its own prefix space,
    // as in llama.cpp and Llama 2's own tokenizer.json.
    let framed = encode(&t, "<s>hello</s>", false);
    assert_eq!(framed, vec![1, id(&t, "▁hello"), 2]);
    assert_eq!(decode(&t, &framed, true), "hello");
    assert_eq!(decode(&t, &framed, false), "<s> hello</s>");
    assert_eq!(encode(&t, "", true), Vec::<u32>::new());

    for text in ["hello world", " hello", "hell", "hi", "é", "hello  wörld\n", "  "] {
        let ids = encode(&t, text, false);
        assert_eq!(decode(&t, &ids, false), text, "round trip of {text:?} via {ids:?}");
    }
}

#[test]
fn spm_without_byte_tokens_fuses_unknowns() {
    let t = tokenizer_from_gguf(&spm_metadata(false)).unwrap();
    assert_eq!(encode(&t, "hiii", false), vec![id(&t, "▁h"), 0]);
    assert_eq!(decode(&t, &encode(&t, "hello", false), false), "hello");
}

#[test]
fn spm_without_prefix_space() {
    let mut metadata = spm_metadata(true);
    metadata.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false));
    let t = tokenizer_from_gguf(&metadata).unwrap();
    assert_eq!(encode(&t, "hello", false), pieces(&t, &["he", "llo"]));
    assert_eq!(encode(&t, "hello world", false), pieces(&t, &["he", "llo", "▁world"]));
    assert_eq!(decode(&t, &encode(&t, " hello world", false), false), " hello world");
}

#[test]
fn spm_special_tokens_default_to_adding_bos() {
    let mut metadata = spm_metadata(true);
    assert_eq!(special_tokens_from_gguf(&metadata), SpecialTokens { bos: Some(1), eos: Some(2), add_bos: true });
    metadata.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(false));
    assert!(!special_tokens_from_gguf(&metadata).add_bos);
    // A mistyped id is ignored rather than fatal.
    metadata.insert("tokenizer.ggml.bos_token_id".into(), string("1"));
    assert_eq!(special_tokens_from_gguf(&metadata).bos, None);
    assert_eq!(special_tokens_from_gguf(&HashMap::new()), SpecialTokens { bos: None, eos: None, add_bos: false });
}

/// A byte-level vocabulary of digits whose merges make each `tokenizer.ggml.pre` split visible.
fn digits_metadata(pre: Option<&str>) -> HashMap<String, Value> {
    let mut metadata = HashMap::from([
        ("tokenizer.ggml.model".to_owned(), string("gpt2")),
        (
            "tokenizer.ggml.tokens".to_owned(),
            strings(&["1", "2", "3", "4", "12", "34", "123", "a", "b", "ab", "<tool>", "<|eot|>"]),
        ),
        (
            "tokenizer.ggml.token_type".to_owned(),
            Value::Array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 3].map(Value::I32).to_vec()),
        ),
        ("tokenizer.ggml.merges".to_owned(), strings(&["1 2", "3 4", "12 3"])),
    ]);
    if let Some(pre) = pre {
        metadata.insert("tokenizer.ggml.pre".to_owned(), string(pre));
    }
    metadata
}

fn byte_level_tokens(pre: Option<&str>, text: &str) -> Vec<String> {
    let t = tokenizer_from_gguf(&digits_metadata(pre)).unwrap();
    let ids = encode(&t, text, true);
    ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect()
}

#[test]
fn byte_level_pre_tokenizer_follows_tokenizer_ggml_pre() {
    // GPT-2's split keeps "1234" whole: 1+2, then 3+4 outranks 12+3.
    for pre in [Some("gpt-2"), Some("smollm"), Some("no-such-pre"), None] {
        assert_eq!(byte_level_tokens(pre, "1234"), ["12", "34"], "pre {pre:?}");
        assert_eq!(byte_level_tokens(pre, "ab"), ["a", "b"], "pre {pre:?}");
    }
    // Llama 3 cuts digits in threes, and looks a whole word up before merging (no `a b` merge).
    assert_eq!(byte_level_tokens(Some("llama-bpe"), "1234"), ["123", "4"]);
    assert_eq!(byte_level_tokens(Some("llama-bpe"), "ab"), ["ab"]);
    // Qwen2 cuts every digit.
    assert_eq!(byte_level_tokens(Some("qwen2"), "1234"), ["1", "2", "3", "4"]);
}

#[test]
fn byte_level_added_tokens_by_type() {
    let t = tokenizer_from_gguf(&digits_metadata(Some("gpt-2"))).unwrap();
    let ids = encode(&t, "1<tool>2<|eot|>", false);
    assert_eq!(ids, [0, 10, 1, 11]);
    // User-defined tokens are matched but are not special; control tokens are.
    assert_eq!(decode(&t, &ids, true), "1<tool>2");
    assert_eq!(decode(&t, &ids, false), "1<tool>2<|eot|>");
}

/// The error `tokenizer_from_gguf` gives once `change` is applied, with its whole context chain.
fn error_after(mut metadata: HashMap<String, Value>, change: impl FnOnce(&mut HashMap<String, Value>)) -> String {
    change(&mut metadata);
    match tokenizer_from_gguf(&metadata) {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn malformed_metadata_gives_errors_naming_the_problem() {
    let gpt2 = || digits_metadata(Some("gpt-2"));
    let cases: Vec<(String, &[&str])> = vec![
        (error_after(gpt2(), |m| drop(m.remove("tokenizer.ggml.model"))), &["missing", "tokenizer.ggml.model"]),
        (
            error_after(gpt2(), |m| drop(m.insert("tokenizer.ggml.model".into(), Value::U32(2)))),
            &["tokenizer.ggml.model", "string"],
        ),
        (
            error_after(gpt2(), |m| drop(m.insert("tokenizer.ggml.model".into(), string("bert")))),
            &["unsupported", "bert"],
        ),
        (error_after(gpt2(), |m| drop(m.remove("tokenizer.ggml.tokens"))), &["missing", "tokenizer.ggml.tokens"]),
        (
            error_after(gpt2(), |m| drop(m.insert("tokenizer.ggml.tokens".into(), string("1 2 3")))),
            &["tokenizer.ggml.tokens", "array"],
        ),
        (
            error_after(gpt2(), |m| drop(m.insert("tokenizer.ggml.tokens".into(), Value::Array(vec![Value::U8(1)])))),
            &["tokenizer.ggml.tokens", "entry 0", "string"],
        ),
        (
            error_after(gpt2(), |m| {
                m.insert("tokenizer.ggml.tokens".into(), strings(&["1", "2", "1"]));
                m.remove("tokenizer.ggml.token_type");
            }),
            &["tokenizer.ggml.tokens", "`1` twice", "ids 0 and 2"],
        ),
        (
            error_after(gpt2(), |m| {
                drop(m.insert("tokenizer.ggml.token_type".into(), Value::Array(vec![Value::I32(1)])))
            }),
            &["tokenizer.ggml.token_type", "1 entries", "12"],
        ),
        (
            error_after(gpt2(), |m| {
                drop(m.insert("tokenizer.ggml.scores".into(), Value::Array(vec![Value::F32(0.0); 3])))
            }),
            &["tokenizer.ggml.scores", "3 entries"],
        ),
        (error_after(gpt2(), |m| drop(m.remove("tokenizer.ggml.merges"))), &["missing", "tokenizer.ggml.merges"]),
        (
            error_after(gpt2(), |m| drop(m.insert("tokenizer.ggml.merges".into(), strings(&["1 9"])))),
            &["tokenizer.ggml.merges", "entry 0", "`9`"],
        ),
        (
            error_after(gpt2(), |m| drop(m.insert("tokenizer.ggml.merges".into(), strings(&["2 3"])))),
            &["tokenizer.ggml.merges", "`23`"],
        ),
        (
            error_after(gpt2(), |m| drop(m.insert("tokenizer.ggml.merges".into(), strings(&["12"])))),
            &["tokenizer.ggml.merges", "separated by a space"],
        ),
        (
            error_after(gpt2(), |m| drop(m.insert("tokenizer.ggml.pre".into(), Value::Bool(true)))),
            &["tokenizer.ggml.pre", "string"],
        ),
        (
            error_after(spm_metadata(true), |m| drop(m.remove("tokenizer.ggml.scores"))),
            &["tokenizer.ggml.scores", "required"],
        ),
        (
            error_after(spm_metadata(true), |m| {
                drop(m.insert("tokenizer.ggml.scores".into(), Value::Array(vec![Value::U32(0); 278])))
            }),
            &["tokenizer.ggml.scores", "float"],
        ),
        (
            error_after(spm_metadata(true), |m| {
                drop(m.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(9999)))
            }),
            &["tokenizer.ggml.unknown_token_id", "out of range"],
        ),
        (
            error_after(spm_metadata(true), |m| {
                drop(m.insert("tokenizer.ggml.unknown_token_id".into(), Value::I32(-1)))
            }),
            &["tokenizer.ggml.unknown_token_id", "-1"],
        ),
        (
            error_after(spm_metadata(true), |m| drop(m.insert("tokenizer.ggml.add_space_prefix".into(), Value::U8(1)))),
            &["tokenizer.ggml.add_space_prefix", "bool"],
        ),
    ];
    for (error, needles) in cases {
        for needle in needles {
            assert!(error.contains(needle), "error {error:?} should mention {needle:?}");
        }
    }
}
