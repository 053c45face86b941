//! Tokenizers built from GGUF metadata.
//!
//! A GGUF file carries its tokenizer as `tokenizer.ggml.*` keys written by llama.cpp. This module
//! rebuilds from them the Hugging Face tokenizer that transformers' GGUF converter produces:
//! byte-level BPE for `gpt2` vocabularies (SmolLM2, Llama 3, Qwen2) and SentencePiece-style BPE
//! (`▁` for spaces, byte fallback) for `llama` ones (Llama 2, TinyLlama, Mistral).
//!
//! The tokenizer never inserts BOS/EOS itself, whatever `add_special_tokens` says: whether a
//! sequence starts with BOS is the caller's decision, made from [`special_tokens_from_gguf`].

use std::collections::{HashMap, HashSet};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

const MODEL: &str = "tokenizer.ggml.model";
const PRE: &str = "tokenizer.ggml.pre";
const TOKENS: &str = "tokenizer.ggml.tokens";
const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const SCORES: &str = "tokenizer.ggml.scores";
const MERGES: &str = "tokenizer.ggml.merges";
const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// llama.cpp's `llama_token_type` values that matter here.
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// SentencePiece's stand-in for a space.
const SPM_SPACE: &str = "▁";

/// Llama 3's pre-tokenizer regex, from its `tokenizer.json`: digits in groups of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer regex, from its `tokenizer.json`: every digit on its own.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The ids a caller needs to frame a sequence, from `tokenizer.ggml.*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// Whether sequences start with BOS (`tokenizer.ggml.add_bos_token`; when absent, llama.cpp's
    /// default: true for SentencePiece `llama` vocabularies, false otherwise).
    pub add_bos: bool,
}

/// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
///
/// Errors name the key at fault: a missing or mistyped key, an unsupported `tokenizer.ggml.model`,
/// arrays of different lengths, duplicate tokens, or merges naming tokens the vocabulary lacks.
pub fn tokenizer_from_gguf(metadata: &HashMap<String, Value>) -> Result<Tokenizer> {
    let model = string(required(metadata, MODEL)?, MODEL)?;
    let vocab = Vocabulary::read(metadata)?;
    let mut tokenizer = match model {
        "gpt2" => byte_level_bpe(metadata, &vocab)?,
        "llama" => sentencepiece_bpe(metadata, &vocab)?,
        other => bail!("unsupported `{MODEL}` `{other}` (supported: gpt2, llama)"),
    };
    // The builder's defaults are `$A` and `$A:0 $B:1` with no special tokens, as in the oracle
    // transformers writes: an explicit statement that nothing is added around the text.
    let template = TemplateProcessing::builder().build().map_err(|e| anyhow!("building the post-processor: {e}"))?;
    tokenizer.with_post_processor(Some(template));
    // Added after the normalizer is set: tokenizers re-normalizes added tokens on every change.
    let (special, user) = vocab.added_tokens(metadata)?;
    tokenizer.add_special_tokens(special).map_err(|e| anyhow!("adding control tokens: {e}"))?;
    tokenizer.add_tokens(user).map_err(|e| anyhow!("adding user-defined tokens: {e}"))?;
    Ok(tokenizer)
}

/// The chat template (`tokenizer.chat_template`), if any.
pub fn chat_template_from_gguf(metadata: &HashMap<String, Value>) -> Option<String> {
    match metadata.get(CHAT_TEMPLATE)? {
        Value::String(s) => Some(s.clone()),
        other => {
            tracing::warn!("ignoring `{CHAT_TEMPLATE}`: a {:?}, not a string", other.value_type());
            None
        }
    }
}

/// BOS/EOS ids and whether BOS is added; a mistyped key is ignored with a warning.
pub fn special_tokens_from_gguf(metadata: &HashMap<String, Value>) -> SpecialTokens {
    let id = |key: &str| {
        let value = metadata.get(key)?;
        u32_value(value, key).map_err(|e| tracing::warn!("ignoring `{key}`: {e:#}")).ok()
    };
    let spm = matches!(metadata.get(MODEL), Some(Value::String(m)) if m == "llama");
    let add_bos = match metadata.get(ADD_BOS) {
        None => spm,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            tracing::warn!("ignoring `{ADD_BOS}`: a {:?}, not a bool", other.value_type());
            spm
        }
    };
    SpecialTokens { bos: id(BOS_ID), eos: id(EOS_ID), add_bos }
}

/// `tokenizer.ggml.tokens` with the per-token arrays that must match it in length.
struct Vocabulary {
    tokens: Vec<String>,
    types: Option<Vec<i64>>,
    scores: Option<Vec<f32>>,
}

impl Vocabulary {
    fn read(metadata: &HashMap<String, Value>) -> Result<Self> {
        let tokens = array(required(metadata, TOKENS)?, TOKENS)?
            .iter()
            .enumerate()
            .map(|(i, v)| string(v, TOKENS).map(str::to_owned).with_context(|| format!("`{TOKENS}` entry {i}")))
            .collect::<Result<Vec<_>>>()?;
        if tokens.is_empty() {
            bail!("`{TOKENS}` is empty");
        }
        let types = optional_array(metadata, TOKEN_TYPE, tokens.len(), |v| int_value(v, TOKEN_TYPE))?;
        let scores = optional_array(metadata, SCORES, tokens.len(), |v| match v {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            other => bail!("`{SCORES}` entries must be floats, found a {:?}", other.value_type()),
        })?;
        Ok(Self { tokens, types, scores })
    }

    /// Token → id; a repeated token would leave one of its ids unreachable.
    fn ids(&self) -> Result<Vocab> {
        let mut ids = Vocab::default();
        for (id, token) in self.tokens.iter().enumerate() {
            if let Some(first) = ids.insert(token.clone(), id as u32) {
                bail!("`{TOKENS}` holds `{token}` twice (ids {first} and {id})");
            }
        }
        Ok(ids)
    }

    /// The token at the id stored under `key`, if the key is present.
    fn token_at(&self, metadata: &HashMap<String, Value>, key: &str) -> Result<Option<&str>> {
        let Some(value) = metadata.get(key) else {
            return Ok(None);
        };
        let id = u32_value(value, key)? as usize;
        match self.tokens.get(id) {
            Some(token) => Ok(Some(token)),
            None => bail!("`{key}` = {id} is out of range for {} tokens", self.tokens.len()),
        }
    }

    /// Tokens matched verbatim in raw text: (special, user-defined). Control and unknown tokens
    /// are special (skipped by `decode(.., true)`); user-defined ones, which llama.cpp also always
    /// matches, are not. Without `token_type`, transformers falls back to BOS, EOS and UNK.
    fn added_tokens(&self, metadata: &HashMap<String, Value>) -> Result<(Vec<AddedToken>, Vec<AddedToken>)> {
        let added = |t: &str, special: bool| AddedToken::from(t, special).normalized(false);
        let Some(types) = &self.types else {
            let mut special = Vec::new();
            for key in [UNK_ID, BOS_ID, EOS_ID] {
                if let Some(token) = self.token_at(metadata, key)? {
                    special.push(added(token, true));
                }
            }
            return Ok((special, Vec::new()));
        };
        let with_type = |wanted: &[i64], special: bool| {
            self.tokens
                .iter()
                .zip(types)
                .filter(|(_, ty)| wanted.contains(ty))
                .map(|(t, _)| added(t, special))
                .collect::<Vec<_>>()
        };
        Ok((with_type(&[TYPE_UNKNOWN, TYPE_CONTROL], true), with_type(&[TYPE_USER_DEFINED], false)))
    }
}

/// How a byte-level vocabulary cuts text into words before BPE (`tokenizer.ggml.pre`).
enum WordSplit {
    /// GPT-2's regex, the one built into the `ByteLevel` pre-tokenizer.
    Gpt2,
    /// Llama 3's regex; its vocabulary is also looked up whole before merging (`ignore_merges`).
    Llama3,
    /// Qwen2's regex, after NFC normalization.
    Qwen2,
}

impl WordSplit {
    fn from_pre(pre: Option<&str>) -> Self {
        match pre {
            // transformers applies GPT-2's split to `smollm` (that is what made the oracle), where
            // llama.cpp first isolates every digit; SmolLM2's vocabulary has no multi-digit or
            // space+digit tokens, so both cut the same ids.
            Some("gpt-2" | "phi-2" | "mpt" | "olmo" | "smollm") => Self::Gpt2,
            Some("llama3" | "llama-v3" | "llama-bpe") => Self::Llama3,
            Some("qwen2" | "deepseek-r1-qwen") => Self::Qwen2,
            Some(other) => {
                tracing::warn!("unknown `{PRE}` `{other}`: splitting words with GPT-2's regex");
                Self::Gpt2
            }
            None => {
                tracing::warn!("no `{PRE}`: splitting words with GPT-2's regex");
                Self::Gpt2
            }
        }
    }
}

/// Byte-level BPE as transformers' GPT-2 converter builds it, with the word split `pre` names.
fn byte_level_bpe(metadata: &HashMap<String, Value>, vocab: &Vocabulary) -> Result<Tokenizer> {
    let ids = vocab.ids()?;
    let merges = merges(required(metadata, MERGES)?, &ids)?;
    let pre = metadata.get(PRE).map(|v| string(v, PRE)).transpose()?;
    let split = WordSplit::from_pre(pre);
    let bpe = BPE::builder()
        .vocab_and_merges(ids, merges)
        // Empty rather than unset, as the converter writes them; BPE treats both alike.
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .ignore_merges(matches!(split, WordSplit::Llama3))
        .build()
        .map_err(|e| anyhow!("building BPE from `{TOKENS}` and `{MERGES}`: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let regex = match split {
        WordSplit::Gpt2 => None,
        WordSplit::Llama3 => Some(LLAMA3_SPLIT),
        WordSplit::Qwen2 => Some(QWEN2_SPLIT),
    };
    match regex {
        None => {
            let add_prefix_space = optional_bool(metadata, ADD_SPACE_PREFIX, false)?;
            tokenizer.with_pre_tokenizer(Some(ByteLevel::new(add_prefix_space, true, true)));
        }
        Some(regex) => {
            let split = Split::new(SplitPattern::Regex(regex.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| anyhow!("compiling the `{PRE}` regex: {e}"))?;
            let byte_level = ByteLevel::new(false, true, false);
            tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![split.into(), byte_level.into()])));
        }
    }
    if matches!(split, WordSplit::Qwen2) {
        tokenizer.with_normalizer(Some(NFC)).map_err(|e| anyhow!("setting the NFC normalizer: {e}"))?;
    }
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// SentencePiece BPE as transformers' GGUF Llama converter builds it (legacy layout: spaces become
/// `▁` in a normalizer that also prepends one to every run of text, as llama.cpp does).
fn sentencepiece_bpe(metadata: &HashMap<String, Value>, vocab: &Vocabulary) -> Result<Tokenizer> {
    let ids = vocab.ids()?;
    let merges = match metadata.get(MERGES) {
        Some(value) => merges(value, &ids)?,
        None => {
            let scores =
                vocab.scores.as_deref().with_context(|| format!("`{SCORES}` is required when `{MERGES}` is absent"))?;
            merges_from_scores(&vocab.tokens, scores)
        }
    };
    let mut builder = BPE::builder().vocab_and_merges(ids, merges).fuse_unk(true).byte_fallback(true);
    if let Some(unk) = vocab.token_at(metadata, UNK_ID)? {
        builder = builder.unk_token(unk.to_owned());
    }
    let bpe = builder.build().map_err(|e| anyhow!("building BPE from `{TOKENS}` and `{SCORES}`/`{MERGES}`: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);

    let add_prefix_space = optional_bool(metadata, ADD_SPACE_PREFIX, true)?;
    let replace = |from: &str, to: &str| Replace::new(from, to).map_err(|e| anyhow!("building a Replace: {e}"));
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_prefix_space {
        normalizers.push(Prepend::new(SPM_SPACE.into()).into());
    }
    normalizers.push(replace(" ", SPM_SPACE)?.into());
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| anyhow!("setting the normalizer: {e}"))?;

    let mut decoders: Vec<DecoderWrapper> =
        vec![ByteFallback::new().into(), Fuse::new().into(), replace(SPM_SPACE, " ")?.into()];
    if add_prefix_space {
        // Undo the prepended space.
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Parses `tokenizer.ggml.merges` ("left right" per entry), checking that both sides and their
/// concatenation are tokens.
fn merges(value: &Value, ids: &Vocab) -> Result<Merges> {
    let known: HashSet<&str> = ids.keys().map(String::as_str).collect();
    array(value, MERGES)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let entry = string(v, MERGES).with_context(|| format!("`{MERGES}` entry {i}"))?;
            let (left, right) = entry
                .split_once(' ')
                .with_context(|| format!("`{MERGES}` entry {i} `{entry}` is not two tokens separated by a space"))?;
            for part in [left, right, &format!("{left}{right}")] {
                if !known.contains(part) {
                    bail!("`{MERGES}` entry {i} `{entry}` needs `{part}`, which is not in `{TOKENS}`");
                }
            }
            Ok((left.to_owned(), right.to_owned()))
        })
        .collect()
}

/// SentencePiece merges rebuilt from scores, as transformers does for GGUF files without merges:
/// every split of a token into two tokens is a merge ranked by the whole token's score (highest
/// first), splits of one token ordered by their halves' scores; both sorts are stable.
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Merges {
    let score: HashMap<&str, f32> = tokens.iter().map(String::as_str).zip(scores.iter().copied()).collect();
    let mut ranked = Vec::new();
    for (token, &token_score) in tokens.iter().zip(scores) {
        let mut splits: Vec<(&str, &str)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(left, right)| score.contains_key(left) && score.contains_key(right))
            .collect();
        splits.sort_by(|a, b| score[b.0].total_cmp(&score[a.0]).then(score[b.1].total_cmp(&score[a.1])));
        ranked.extend(splits.into_iter().map(|(left, right)| (left, right, token_score)));
    }
    ranked.sort_by(|a, b| b.2.total_cmp(&a.2));
    ranked.into_iter().map(|(left, right, _)| (left.to_owned(), right.to_owned())).collect()
}

fn required<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    metadata.get(key).with_context(|| format!("missing GGUF metadata key `{key}`"))
}

fn string<'a>(value: &'a Value, key: &str) -> Result<&'a str> {
    match value {
        Value::String(s) => Ok(s),
        other => bail!("`{key}` must be a string, found a {:?}", other.value_type()),
    }
}

fn array<'a>(value: &'a Value, key: &str) -> Result<&'a [Value]> {
    match value {
        Value::Array(values) => Ok(values),
        other => bail!("`{key}` must be an array, found a {:?}", other.value_type()),
    }
}

fn int_value(value: &Value, key: &str) -> Result<i64> {
    Ok(match value {
        Value::U8(x) => (*x).into(),
        Value::I8(x) => (*x).into(),
        Value::U16(x) => (*x).into(),
        Value::I16(x) => (*x).into(),
        Value::U32(x) => (*x).into(),
        Value::I32(x) => (*x).into(),
        Value::I64(x) => *x,
        Value::U64(x) => i64::try_from(*x).with_context(|| format!("`{key}` value {x} is too large"))?,
        other => bail!("`{key}` must be an integer, found a {:?}", other.value_type()),
    })
}

fn u32_value(value: &Value, key: &str) -> Result<u32> {
    let x = int_value(value, key)?;
    u32::try_from(x).with_context(|| format!("`{key}` value {x} is not a valid token id"))
}

fn optional_bool(metadata: &HashMap<String, Value>, key: &str, default: bool) -> Result<bool> {
    match metadata.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => bail!("`{key}` must be a bool, found a {:?}", other.value_type()),
    }
}

/// An optional per-token array, converted entry by entry and required to match `tokens` in length.
fn optional_array<T>(
    metadata: &HashMap<String, Value>,
    key: &str,
    len: usize,
    convert: impl Fn(&Value) -> Result<T>,
) -> Result<Option<Vec<T>>> {
    let Some(value) = metadata.get(key) else {
        return Ok(None);
    };
    let values = array(value, key)?;
    if values.len() != len {
        bail!("`{key}` has {} entries but `{TOKENS}` has {len}", values.len());
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| convert(v).with_context(|| format!("`{key}` entry {i}")))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}
