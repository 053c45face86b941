//! OpenAI's request and response shapes for completions and chat completions, plus the
//! extension field `precision`, and their validation into a [`GenerationRequest`].

use std::time::Instant;

use model::Precision;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chat::ChatMessage;
pub use crate::engine::InvalidRequest;
use crate::engine::{GenerationRequest, ModelInfo};
use crate::sampling::SamplingParams;

/// `"stop": "x"` or `["x", "y"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A completion prompt: text, one text in a list, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields both endpoints share.
#[derive(Debug, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; accepted as vLLM and llama.cpp do.
    pub top_k: Option<i64>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<OneOrMany>,
    pub seed: Option<i64>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    /// Extension: the weight precision, a bit-width (a number or a string) or a profile name.
    pub precision: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// Log-probabilities of the sampled tokens and this many alternatives (0..=20).
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// Message content: a string or a list of parts (only text parts are supported).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<RequestMessage>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub common: CommonParams,
}

const MAX_LOGPROBS: i64 = 20;
const MAX_STOPS: usize = 4;

impl CommonParams {
    /// Reads the fields into a request: sampling fields are checked against OpenAI's ranges here,
    /// the rest against the served model by [`ModelInfo::validate`]; `prompt` is already
    /// tokenized. `max_tokens` defaults to the rest of the context.
    pub fn to_request(
        &self,
        info: &ModelInfo,
        served_id: &str,
        prompt: Vec<u32>,
        max_tokens: Option<i64>,
        logprobs: Option<usize>,
    ) -> Result<GenerationRequest, InvalidRequest> {
        if let Some(model) = &self.model {
            if model != served_id {
                return Err(InvalidRequest::new(
                    "model",
                    format!("The model `{model}` does not exist; this server serves `{served_id}`"),
                ));
            }
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(InvalidRequest::new(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(InvalidRequest::new("top_p", format!("top_p must be in (0, 1], got {top_p}")));
        }
        let top_k = self.top_k.unwrap_or(0);
        if top_k < 0 {
            return Err(InvalidRequest::new("top_k", format!("top_k must be 0 (off) or positive, got {top_k}")));
        }
        for (name, value) in
            [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)]
        {
            if let Some(v) = value {
                if !(-2.0..=2.0).contains(&v) {
                    return Err(InvalidRequest::new(name, format!("{name} must be between -2 and 2, got {v}")));
                }
            }
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOPS {
            return Err(InvalidRequest::new("stop", format!("at most {MAX_STOPS} stop sequences, got {}", stop.len())));
        }
        let precision = parse_precision(self.precision.as_ref(), info)?;
        // Negative counts become 0, which the validation refuses.
        let count = |v: i64| usize::try_from(v).unwrap_or(0);
        let max_tokens = max_tokens.map_or(info.max_context.saturating_sub(prompt.len()), count);
        let seed = match self.seed {
            Some(s) => s as u64,
            None => rand::random(),
        };
        let request = GenerationRequest {
            prompt,
            precision,
            n: self.n.map_or(1, count),
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k: top_k as usize,
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                seed,
            },
            stop,
            logprobs,
            arrived: Instant::now(),
        };
        info.validate(&request)?;
        Ok(request)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

/// `precision`: absent (the default), a number, or a string, read once into the typed
/// [`Precision`] the engine takes (whether it is served is [`ModelInfo::validate`]'s to say).
fn parse_precision(value: Option<&Value>, info: &ModelInfo) -> Result<Precision, InvalidRequest> {
    let name = match value {
        None | Some(Value::Null) => return Ok(info.default_precision.clone()),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.trim().to_string(),
        Some(other) => {
            return Err(InvalidRequest::new(
                "precision",
                format!("precision must be a number or a string, got {other}"),
            ))
        }
    };
    name.parse().map_err(|_| info.not_served(&name))
}

pub fn completion_logprobs(value: Option<i64>) -> Result<Option<usize>, InvalidRequest> {
    match value {
        None => Ok(None),
        Some(k) if (0..=MAX_LOGPROBS).contains(&k) => Ok(Some(k as usize)),
        Some(k) => {
            Err(InvalidRequest::new("logprobs", format!("logprobs must be between 0 and {MAX_LOGPROBS}, got {k}")))
        }
    }
}

pub fn chat_logprobs(logprobs: bool, top: Option<i64>) -> Result<Option<usize>, InvalidRequest> {
    match (logprobs, top) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err(InvalidRequest::new("top_logprobs", "top_logprobs requires logprobs: true")),
        (true, None) => Ok(Some(0)),
        (true, Some(k)) if (0..=MAX_LOGPROBS).contains(&k) => Ok(Some(k as usize)),
        (true, Some(k)) => Err(InvalidRequest::new(
            "top_logprobs",
            format!("top_logprobs must be between 0 and {MAX_LOGPROBS}, got {k}"),
        )),
    }
}

/// The chat messages as the template sees them.
pub fn chat_messages(messages: &[RequestMessage]) -> Result<Vec<ChatMessage>, InvalidRequest> {
    if messages.is_empty() {
        return Err(InvalidRequest::new("messages", "messages must not be empty"));
    }
    messages
        .iter()
        .map(|m| {
            if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
                return Err(InvalidRequest::new("messages", format!("unknown role `{}`", m.role)));
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(InvalidRequest::new(
                                    "messages",
                                    format!("content parts of type `{kind}` are not supported (text only)"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            // `developer` is OpenAI's newer name for `system`.
            let role = if m.role == "developer" { "system".to_string() } else { m.role.clone() };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

#[derive(Debug, Serialize, Deserialize, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// Legacy completions' `logprobs` object.
#[derive(Debug, Serialize, Default, Clone)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<serde_json::Map<String, Value>>,
    pub text_offset: Vec<usize>,
}

/// Chat's per-token log-probability entry.
#[derive(Debug, Serialize, Clone)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Serialize, Clone)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Serialize, Default, Clone)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ModelInfo {
        ModelInfo {
            precisions: (2..=8).map(Precision::Bits).collect(),
            profiles: Vec::new(),
            calibrated_bits: vec![8, 4, 2],
            default_precision: Precision::Bits(8),
            max_context: 100,
            vocab_size: 300,
            max_batch: 16,
        }
    }

    fn params(json: &str) -> CommonParams {
        serde_json::from_str(json).unwrap()
    }

    fn check(json: &str, prompt_len: usize, max_tokens: Option<i64>) -> Result<GenerationRequest, InvalidRequest> {
        params(json).to_request(&info(), "m", vec![1; prompt_len], max_tokens, None)
    }

    #[test]
    fn defaults_and_precision_forms() {
        let r = check("{}", 10, None).unwrap();
        assert_eq!((&r.precision, r.n, r.max_tokens, r.sampling.temperature), (&Precision::Bits(8), 1, 90, 1.0));
        assert_eq!(check(r#"{"precision": 4}"#, 10, None).unwrap().precision, Precision::Bits(4));
        assert_eq!(check(r#"{"precision": " 2"}"#, 10, None).unwrap().precision, Precision::Bits(2));
        assert_eq!(check(r#"{"seed": 5}"#, 10, None).unwrap().sampling.seed, 5);
    }

    #[test]
    fn out_of_range_fields_name_their_parameter() {
        for (json, param) in [
            (r#"{"precision": 9}"#, "precision"),
            (r#"{"precision": 4.5}"#, "precision"),
            (r#"{"precision": [4]}"#, "precision"),
            (r#"{"precision": "fp"}"#, "precision"),
            (r#"{"precision": "mix"}"#, "precision"),
            (r#"{"temperature": -0.1}"#, "temperature"),
            (r#"{"temperature": 2.5}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"top_k": -1}"#, "top_k"),
            (r#"{"n": 0}"#, "n"),
            (r#"{"n": -1}"#, "n"),
            (r#"{"n": 17}"#, "n"),
            (r#"{"presence_penalty": 3}"#, "presence_penalty"),
            (r#"{"stop": ["a","b","c","d","e"]}"#, "stop"),
            (r#"{"model": "other"}"#, "model"),
        ] {
            let err = check(json, 10, None).unwrap_err();
            assert_eq!(err.param, Some(param), "{json}: {err:?}");
        }
        assert_eq!(check("{}", 100, None).unwrap_err().param, Some("prompt"));
        assert_eq!(check("{}", 10, Some(91)).unwrap_err().param, Some("max_tokens"));
        assert_eq!(check("{}", 10, Some(0)).unwrap_err().param, Some("max_tokens"));
        assert_eq!(check("{}", 10, Some(-3)).unwrap_err().param, Some("max_tokens"));
        assert_eq!(check("{}", 0, None).unwrap_err().param, Some("prompt"));
        assert_eq!(params("{}").to_request(&info(), "m", vec![300], None, None).unwrap_err().param, Some("prompt"));
        assert_eq!(check("{}", 10, Some(90)).unwrap().max_tokens, 90);
    }

    #[test]
    fn logprob_fields_and_messages() {
        assert_eq!(completion_logprobs(Some(3)).unwrap(), Some(3));
        assert!(completion_logprobs(Some(21)).is_err());
        assert_eq!(chat_logprobs(true, None).unwrap(), Some(0));
        assert!(chat_logprobs(false, Some(2)).is_err());
        let msgs: Vec<RequestMessage> = serde_json::from_str(
            r#"[{"role":"developer","content":"be brief"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]"#,
        )
        .unwrap();
        let m = chat_messages(&msgs).unwrap();
        assert_eq!(m[0], ChatMessage { role: "system".into(), content: "be brief".into() });
        assert_eq!(m[1].content, "ab");
        let bad: Vec<RequestMessage> =
            serde_json::from_str(r#"[{"role":"user","content":[{"type":"image_url"}]}]"#).unwrap();
        assert!(chat_messages(&bad).unwrap_err().message.contains("image_url"));
        assert!(chat_messages(&[]).is_err());
    }
}
