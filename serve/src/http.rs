//! The HTTP surface (axum): OpenAI-compatible endpoints over an [`Engine`]. Handlers only
//! translate: JSON in, a [`GenerationRequest`] to the engine, its events out as JSON or
//! server-sent events. Every error is OpenAI's error object.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::{Engine, Event, FinishReason, GenerationRequest, SubmitError, TokenLogprob};
use crate::metrics::Metrics;
use crate::openai::{
    chat_logprobs, chat_messages, completion_logprobs, ChatLogprobs, ChatRequest, ChatTokenLogprob, ChatTopLogprob,
    CompletionLogprobs, CompletionRequest, InvalidRequest, Prompt, Usage,
};

/// Request bodies larger than this are refused with 413.
pub const DEFAULT_BODY_LIMIT: usize = 4 << 20;

/// What every handler shares.
pub struct AppState {
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    /// The model id clients name (and `/v1/models` lists).
    pub model_id: String,
    pub api_key: Option<String>,
    /// Unix time the model was loaded (`created` of `/v1/models`).
    pub created: u64,
}

pub fn router(state: Arc<AppState>, body_limit: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// An error response in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into(), param: None, code: None }
    }
}

impl From<InvalidRequest> for ApiError {
    fn from(e: InvalidRequest) -> Self {
        if e.param == Some("model") {
            return Self {
                code: Some("model_not_found"),
                param: e.param,
                ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", e.message)
            };
        }
        Self { param: e.param, ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", e.message) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        let mut response = (self.status, Json(body)).into_response();
        if matches!(self.status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS) {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// `Json<T>` whose rejections (bad JSON, wrong type, too large) are OpenAI errors.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    // axum answers 422 for well-formed JSON of the wrong shape; OpenAI answers 400.
    let status = match rejection.status() {
        StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
        s => s,
    };
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "the request body is too large".to_string(),
        _ => rejection.body_text(),
    };
    ApiError::new(status, "invalid_request_error", message)
}

async fn require_api_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            let mut e = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "Incorrect or missing API key (Authorization: Bearer ...)",
            );
            e.code = Some("invalid_api_key");
            return e.into_response();
        }
    }
    next.run(request).await
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "no such endpoint")
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
        .into_response()
}

async fn list_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let info = state.engine.info();
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_id,
            "object": "model",
            "created": state.created,
            "owned_by": "drq",
            "precisions": info.precision_names(),
            "profiles": info.profiles,
            "calibrated_bits": info.calibrated_bits,
            "default_precision": info.default_precision.to_string(),
            "context_length": info.max_context,
        }]
    }))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>())
}

fn submit(state: &AppState, request: GenerationRequest) -> Result<UnboundedReceiver<Event>, ApiError> {
    state.engine.submit(request).map_err(|e| match e {
        SubmitError::Invalid(e) => e.into(),
        SubmitError::QueueFull => {
            let mut e =
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is overloaded; retry later");
            e.code = Some("overloaded");
            e
        }
        SubmitError::Stopped => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is shutting down")
        }
    })
}

/// Which endpoint a response is for: the two differ only in their JSON.
#[derive(Clone, Copy)]
enum Endpoint {
    Completions,
    Chat,
}

/// Everything a response needs besides the events.
#[derive(Clone)]
struct Meta {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    precision: String,
    prompt_tokens: usize,
    n: usize,
    include_usage: bool,
    logprobs: bool,
}

async fn completions(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    if body.echo {
        return Err(InvalidRequest::new("echo", "echo is not supported").into());
    }
    let prompt = match &body.prompt {
        Prompt::Text(t) => state.engine.encode_prompt(t),
        Prompt::Texts(v) if v.len() == 1 => state.engine.encode_prompt(&v[0]),
        Prompt::Texts(_) => return Err(InvalidRequest::new("prompt", "send one prompt per request").into()),
        Prompt::Tokens(ids) => Ok(ids.clone()),
    }
    .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("{e:#}")))?;
    let logprobs = completion_logprobs(body.logprobs)?;
    let request =
        body.common.to_request(state.engine.info(), &state.model_id, prompt, body.common.max_tokens, logprobs)?;
    respond(&state, request, Endpoint::Completions, body.common.stream, body.common.include_usage()).await
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let messages = chat_messages(&body.messages)?;
    let prompt = state.engine.encode_chat(&messages).map_err(|e| ApiError {
        param: Some("messages"),
        ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("{e:#}"))
    })?;
    let logprobs = chat_logprobs(body.logprobs, body.top_logprobs)?;
    let max_tokens = body.max_completion_tokens.or(body.common.max_tokens);
    let request = body.common.to_request(state.engine.info(), &state.model_id, prompt, max_tokens, logprobs)?;
    respond(&state, request, Endpoint::Chat, body.common.stream, body.common.include_usage()).await
}

async fn respond(
    state: &AppState,
    request: GenerationRequest,
    endpoint: Endpoint,
    stream: bool,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let meta = Meta {
        endpoint,
        id: request_id(match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        }),
        created: now(),
        model: state.model_id.clone(),
        precision: request.precision.to_string(),
        prompt_tokens: request.prompt.len(),
        n: request.n,
        include_usage,
        logprobs: request.logprobs.is_some(),
    };
    let events = submit(state, request)?;
    if stream {
        Ok(Sse::new(sse_stream(meta, events)).keep_alive(KeepAlive::default()).into_response())
    } else {
        collect(meta, events).await.map(|v| Json(v).into_response())
    }
}

/// One choice being assembled for a non-streaming response.
#[derive(Default)]
struct ChoiceAcc {
    text: String,
    finish: Option<FinishReason>,
    tokens: usize,
    logprobs: Vec<TokenLogprob>,
}

/// Waits for every choice to finish. If the client goes away this future is dropped, and with
/// it the receiver, which cancels the request in the engine.
async fn collect(meta: Meta, mut events: UnboundedReceiver<Event>) -> Result<Value, ApiError> {
    let mut choices: Vec<ChoiceAcc> = (0..meta.n).map(|_| ChoiceAcc::default()).collect();
    while choices.iter().any(|c| c.finish.is_none()) {
        match events.recv().await {
            Some(Event::Token { choice, text, logprob }) => {
                let c = &mut choices[choice];
                c.text.push_str(&text);
                c.logprobs.extend(logprob);
            }
            Some(Event::Finished { choice, reason, text, completion_tokens }) => {
                let c = &mut choices[choice];
                c.text.push_str(&text);
                c.finish = Some(reason);
                c.tokens = completion_tokens;
            }
            Some(Event::Failed { message, .. }) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message));
            }
            None => return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the engine stopped")),
        }
    }
    let completion_tokens = choices.iter().map(|c| c.tokens).sum();
    let usage = Usage::new(meta.prompt_tokens, completion_tokens);
    let items: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let finish = c.finish.map(FinishReason::as_str);
            match meta.endpoint {
                Endpoint::Completions => json!({
                    "index": index,
                    "text": c.text,
                    "logprobs": meta.logprobs.then(|| completion_logprobs_json(&c.logprobs, 0)),
                    "finish_reason": finish,
                }),
                Endpoint::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": meta.logprobs.then(|| chat_logprobs_json(&c.logprobs)),
                    "finish_reason": finish,
                }),
            }
        })
        .collect();
    Ok(json!({
        "id": meta.id,
        "object": match meta.endpoint { Endpoint::Completions => "text_completion", Endpoint::Chat => "chat.completion" },
        "created": meta.created,
        "model": meta.model,
        "precision": meta.precision,
        "choices": items,
        "usage": usage,
    }))
}

fn completion_logprobs_json(entries: &[TokenLogprob], start_offset: usize) -> Value {
    let mut out = CompletionLogprobs::default();
    let mut offset = start_offset;
    for e in entries {
        out.tokens.push(e.token.clone());
        out.token_logprobs.push(e.logprob);
        out.top_logprobs.push(e.top.iter().map(|(t, l)| (t.clone(), json!(l))).collect::<Map<String, Value>>());
        out.text_offset.push(offset);
        offset += e.token.len();
    }
    serde_json::to_value(out).expect("plain data serializes")
}

fn chat_logprobs_json(entries: &[TokenLogprob]) -> Value {
    let content = entries
        .iter()
        .map(|e| ChatTokenLogprob {
            token: e.token.clone(),
            logprob: e.logprob,
            bytes: e.token.as_bytes().to_vec(),
            top_logprobs: e
                .top
                .iter()
                .map(|(t, l)| ChatTopLogprob { token: t.clone(), logprob: *l, bytes: t.as_bytes().to_vec() })
                .collect(),
        })
        .collect();
    serde_json::to_value(ChatLogprobs { content }).expect("plain data serializes")
}

/// State of a streaming response.
struct StreamState {
    meta: Meta,
    events: Option<UnboundedReceiver<Event>>,
    /// Choices that still owe their opening chunk (chat sends the role first).
    opened: Vec<bool>,
    /// Per choice: where the next token starts in the completion text (`text_offset`).
    offsets: Vec<usize>,
    completion_tokens: usize,
    finished: usize,
    done: bool,
}

/// Server-sent events: one chunk per token (or per released piece of text), a final chunk per
/// choice with its finish_reason, the usage chunk if asked for, then `data: [DONE]`. When the
/// client disconnects axum drops this stream, and the engine sees the receiver closed.
fn sse_stream(meta: Meta, events: UnboundedReceiver<Event>) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let n = meta.n;
    let state = StreamState {
        meta,
        events: Some(events),
        opened: vec![false; n],
        offsets: vec![0; n],
        completion_tokens: 0,
        finished: 0,
        done: false,
    };
    stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let Some(events) = s.events.as_mut() else {
            s.done = true;
            return Some((vec![SseEvent::default().data("[DONE]")], s));
        };
        let out = match events.recv().await {
            Some(Event::Token { choice, text, logprob }) => {
                let logprobs: Vec<TokenLogprob> = logprob.into_iter().collect();
                if text.is_empty() && logprobs.is_empty() {
                    Vec::new()
                } else {
                    vec![s.chunk(choice, Some(text), &logprobs, None)]
                }
            }
            Some(Event::Finished { choice, reason, text, completion_tokens }) => {
                s.completion_tokens += completion_tokens;
                s.finished += 1;
                let mut out = Vec::new();
                if !text.is_empty() {
                    out.push(s.chunk(choice, Some(text), &[], None));
                }
                out.push(s.chunk(choice, None, &[], Some(reason)));
                if s.finished == s.meta.n {
                    s.events = None;
                    if s.meta.include_usage {
                        out.push(s.usage_chunk());
                    }
                }
                out
            }
            Some(Event::Failed { message, .. }) => {
                s.events = None;
                vec![SseEvent::default().data(
                    json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}})
                        .to_string(),
                )]
            }
            None => {
                s.events = None;
                Vec::new()
            }
        };
        Some((out, s))
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)))
}

impl StreamState {
    fn chunk(
        &mut self,
        choice: usize,
        text: Option<String>,
        logprobs: &[TokenLogprob],
        finish: Option<FinishReason>,
    ) -> SseEvent {
        let start = self.offsets[choice];
        self.offsets[choice] += logprobs.iter().map(|e| e.token.len()).sum::<usize>();
        let m = &self.meta;
        let finish = finish.map(FinishReason::as_str);
        let body = match m.endpoint {
            Endpoint::Completions => json!({
                "id": m.id, "object": "text_completion", "created": m.created, "model": m.model, "precision": m.precision,
                "choices": [{
                    "index": choice,
                    "text": text.unwrap_or_default(),
                    "logprobs": (m.logprobs && !logprobs.is_empty()).then(|| completion_logprobs_json(logprobs, start)),
                    "finish_reason": finish,
                }],
            }),
            Endpoint::Chat => {
                let mut delta = Map::new();
                if !self.opened[choice] {
                    self.opened[choice] = true;
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({
                    "id": m.id, "object": "chat.completion.chunk", "created": m.created, "model": m.model, "precision": m.precision,
                    "choices": [{
                        "index": choice,
                        "delta": delta,
                        "logprobs": (m.logprobs && !logprobs.is_empty()).then(|| chat_logprobs_json(logprobs)),
                        "finish_reason": finish,
                    }],
                })
            }
        };
        SseEvent::default().data(body.to_string())
    }

    fn usage_chunk(&self) -> SseEvent {
        let m = &self.meta;
        let object = match m.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion.chunk",
        };
        let usage = Usage::new(m.prompt_tokens, self.completion_tokens);
        SseEvent::default().data(
            json!({"id": m.id, "object": object, "created": m.created, "model": m.model, "precision": m.precision, "choices": [], "usage": usage})
                .to_string(),
        )
    }
}
