//! The HTTP layer: OpenAI-compatible `/v1/completions` and `/v1/chat/completions`
//! (streamed as server-sent events, or whole), `/v1/models`, `/health` and `/metrics`
//! (Prometheus text).
//!
//! A prompt is text, tokenized with the model's tokenizer (through its chat template for
//! chat), or token ids. Every refusal is a 4xx with an OpenAI error body (`{"error":
//! {"message", "type", "param", "code"}}`): malformed JSON or a bad field 400, an
//! unknown model 404, a request over the context 400 (`context_length_exceeded`).
//! A response stops at an end-of-sequence id, a stop string, or `max_tokens`. A client
//! that disconnects drops its response stream, and with it the request's event
//! receiver: the model thread cancels it before its next step.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fusec_text::{ChatTemplate, Message, SamplingOptions, Tokenizer};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::error::SubmitError;
use crate::openai::{
    ChatRequest, CompletionRequest, Content, Decoding, ErrorBody, ErrorDetail, Prompt, Usage,
};
use crate::scheduler::{Event, Request};
use crate::text::{Detokenizer, StopText};
use crate::worker::Worker;

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    pub worker: Worker,
    /// The name clients give as `model`.
    pub model: String,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub chat: Option<ChatTemplate>,
    /// The most positions a sequence may hold.
    pub max_context: usize,
    /// The seed of the next sampled request that gives none: each such request
    /// draws from a generator of its own.
    pub next_seed: AtomicU64,
}

/// The server's routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// A refusal: a status and an OpenAI error body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param,
            code: None,
        }
    }

    fn body(&self) -> ErrorBody {
        let kind = match self.status.as_u16() {
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind,
                param: self.param,
                code: self.code,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        let (status, param, code) = match e {
            SubmitError::OverContext { .. } | SubmitError::OverCapacity { .. } => (
                StatusCode::BAD_REQUEST,
                Some("messages"),
                Some("context_length_exceeded"),
            ),
            SubmitError::NoTokens => (StatusCode::BAD_REQUEST, Some("max_tokens"), None),
            SubmitError::EmptyPrompt | SubmitError::BadToken { .. } => {
                (StatusCode::BAD_REQUEST, Some("prompt"), None)
            }
            SubmitError::Sampling(_) => (StatusCode::BAD_REQUEST, Some("temperature"), None),
            SubmitError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, None, None),
        };
        ApiError {
            status,
            message: e.to_string(),
            param,
            code,
        }
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint".into(),
        param: None,
        code: None,
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: "this endpoint does not take that method".into(),
        param: None,
        code: None,
    }
}

/// The request body, or the refusal of one too large or unreadable as a JSON error.
fn body_of(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| ApiError {
        status: e.status(),
        message: format!("cannot read the request body: {}", e.body_text()),
        param: None,
        code: None,
    })
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.model, "object": "model", "created": 0, "owned_by": "fusec"}]
    }))
}

/// The metrics in Prometheus' text format.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = state.worker.metrics();
    let s = &m.scheduler;
    let rows: [(&str, &str, &str, String); 16] = [
        (
            "fusec_queue_length",
            "gauge",
            "Requests waiting to be admitted.",
            s.waiting.to_string(),
        ),
        (
            "fusec_running_sequences",
            "gauge",
            "Sequences in the engine.",
            s.running.to_string(),
        ),
        (
            "fusec_kv_blocks_used",
            "gauge",
            "KV blocks the sequences hold.",
            s.blocks_in_use.to_string(),
        ),
        (
            "fusec_kv_blocks_total",
            "gauge",
            "KV blocks in all.",
            s.total_blocks.to_string(),
        ),
        (
            "fusec_kv_block_size",
            "gauge",
            "Positions per KV block.",
            s.block_size.to_string(),
        ),
        (
            "fusec_tokens_per_second",
            "gauge",
            "Tokens fed per second (prompt and generated), over the last 10 s of steps.",
            format!("{:.3}", m.tokens_per_s),
        ),
        (
            "fusec_generated_tokens_per_second",
            "gauge",
            "Tokens generated per second, over the last 10 s of steps.",
            format!("{:.3}", m.generated_per_s),
        ),
        (
            "fusec_requests_submitted_total",
            "counter",
            "Requests accepted.",
            m.requests_submitted.to_string(),
        ),
        (
            "fusec_requests_refused_total",
            "counter",
            "Requests refused by the scheduler (context, capacity).",
            m.requests_refused.to_string(),
        ),
        (
            "fusec_requests_finished_total",
            "counter",
            "Requests that ran to a stop id or max_tokens.",
            s.finished.to_string(),
        ),
        (
            "fusec_requests_failed_total",
            "counter",
            "Requests failed by an engine error.",
            s.failed.to_string(),
        ),
        (
            "fusec_requests_cancelled_total",
            "counter",
            "Requests cancelled (client gone, or a stop string).",
            s.cancelled.to_string(),
        ),
        (
            "fusec_preemptions_total",
            "counter",
            "Sequences evicted for recompute when KV blocks ran out.",
            s.preemptions.to_string(),
        ),
        (
            "fusec_steps_total",
            "counter",
            "Engine steps.",
            s.steps.to_string(),
        ),
        (
            "fusec_tokens_fed_total",
            "counter",
            "Tokens fed to the engine.",
            s.tokens_fed.to_string(),
        ),
        (
            "fusec_tokens_generated_total",
            "counter",
            "Tokens generated.",
            s.tokens_generated.to_string(),
        ),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in rows {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The body as JSON of type `T`, whatever the content type says.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "invalid request",
            _ => "invalid JSON body",
        };
        ApiError::bad(format!("{what}: {e}"), None)
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl AppState {
    /// The request's sampling options (see [`Decoding::sampling`]), a refusal naming
    /// the field at fault.
    fn sampling(&self, decoding: &Decoding) -> Result<SamplingOptions, ApiError> {
        decoding
            .sampling(self.next_seed.fetch_add(1, Ordering::Relaxed))
            .map_err(|(m, p)| ApiError::bad(m, Some(p)))
    }

    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model {
            return Ok(());
        }
        Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "the model `{model}` does not exist: this server serves `{}`",
                self.model
            ),
            param: Some("model"),
            code: Some("model_not_found"),
        })
    }

    fn tokenizer(&self) -> Result<&Tokenizer, ApiError> {
        self.tokenizer.as_deref().ok_or_else(|| {
            ApiError::bad(
                "this server has no tokenizer: give the prompt as token ids",
                Some("prompt"),
            )
        })
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, ApiError> {
        self.tokenizer()?
            .encode(text, special)
            .map_err(|e| ApiError::bad(format!("cannot tokenize the prompt: {e}"), Some("prompt")))
    }

    fn stop_ids(&self) -> Vec<u32> {
        self.tokenizer
            .as_ref()
            .map(|t| t.eos_ids().to_vec())
            .unwrap_or_default()
    }

    /// `max_tokens` as asked, or the default: `default` tokens, or all the context left.
    fn max_tokens(&self, asked: Option<u64>, prompt: usize, default: Option<usize>) -> usize {
        match asked {
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            None => default.unwrap_or_else(|| self.max_context.saturating_sub(prompt).max(1)),
        }
    }
}

/// Which endpoint a response is for.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(completion_request(&state, body).await)
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(chat_request(&state, body).await)
}

/// A response, or the refusal as an OpenAI error body.
fn answer(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn completion_request(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(&body_of(body)?)?;
    state.check_model(&req.model)?;
    let sampling = state.sampling(&req.decoding)?;
    let one = |n: usize| {
        (n == 1)
            .then_some(())
            .ok_or_else(|| ApiError::bad("give one prompt per request", Some("prompt")))
    };
    let prompt = match req.prompt {
        Prompt::Text(t) => state.encode(&t, true)?,
        Prompt::Ids(ids) => ids,
        Prompt::Texts(mut v) => {
            one(v.len())?;
            state.encode(&v.remove(0), true)?
        }
        Prompt::IdLists(mut v) => {
            one(v.len())?;
            v.remove(0)
        }
    };
    let max_tokens = state.max_tokens(req.max_tokens, prompt.len(), Some(16));
    respond(
        state,
        Kind::Completion,
        prompt,
        max_tokens,
        sampling,
        req.decoding,
    )
    .await
}

async fn chat_request(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(&body_of(body)?)?;
    state.check_model(&req.model)?;
    let sampling = state.sampling(&req.decoding)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let messages: Vec<Message> = req
        .messages
        .iter()
        .map(|m| {
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::bad(
                                    format!("content parts of type `{kind}` are not supported"),
                                    Some("messages"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(Message::new(&m.role, &content))
        })
        .collect::<Result<_, _>>()?;
    let template = state.chat.as_ref().ok_or_else(|| {
        ApiError::bad(
            "this model has no chat template: use /v1/completions",
            Some("messages"),
        )
    })?;
    let rendered = template
        .render(&messages, true)
        .map_err(|e| ApiError::bad(format!("{e}"), Some("messages")))?;
    let prompt = state.encode(&rendered, false)?;
    let max_tokens = state.max_tokens(
        req.max_completion_tokens.or(req.max_tokens),
        prompt.len(),
        None,
    );
    respond(
        state,
        Kind::Chat,
        prompt,
        max_tokens,
        sampling,
        req.decoding,
    )
    .await
}

/// A piece of a response as it is produced.
#[derive(Debug)]
enum Piece {
    /// Text to send, with the ids that made it.
    Text(String, Vec<u32>),
    /// The end: the finish reason.
    End(&'static str),
    /// The request failed after it started.
    Failed(String),
}

/// A request's events turned into text: detokenized, checked for stop strings.
#[derive(Debug)]
struct Output {
    events: Option<mpsc::UnboundedReceiver<Event>>,
    tokenizer: Option<Arc<Tokenizer>>,
    detok: Detokenizer,
    decoded: String,
    stop: StopText,
    pending: VecDeque<Piece>,
    ended: bool,
    generated: usize,
}

impl Output {
    fn push_text(&mut self, text: &str, ids: Vec<u32>) {
        let out = self.stop.push(text);
        if !out.is_empty() || !ids.is_empty() {
            self.pending.push_back(Piece::Text(out, ids));
        }
    }

    fn end(&mut self, reason: &'static str) {
        let tail = self.stop.finish();
        if !tail.is_empty() {
            self.pending.push_back(Piece::Text(tail, Vec::new()));
        }
        self.pending.push_back(Piece::End(reason));
        self.ended = true;
        // Dropping the receiver cancels the request if it is still running.
        self.events = None;
    }

    async fn next(&mut self) -> Option<Piece> {
        loop {
            if let Some(p) = self.pending.pop_front() {
                return Some(p);
            }
            if self.ended {
                return None;
            }
            let event = match self.events.as_mut() {
                Some(rx) => rx.recv().await,
                None => None,
            };
            match event {
                Some(Event::Token { token, .. }) => {
                    self.generated += 1;
                    let piece = match &self.tokenizer {
                        Some(t) => match self.detok.step(t, token) {
                            Ok(p) => p,
                            Err(e) => {
                                self.fail(format!("cannot decode token {token}: {e}"));
                                continue;
                            }
                        },
                        None => String::new(),
                    };
                    self.decoded.push_str(&piece);
                    self.push_text(&piece, vec![token]);
                    if self.stop.stopped() {
                        self.end("stop");
                    }
                }
                Some(Event::Finished { reason, .. }) => {
                    // Bytes held back for a character that never completed, as the
                    // whole decode writes them.
                    if let Some(t) = &self.tokenizer {
                        if let Ok(rest) = self.detok.rest(t, &self.decoded) {
                            self.push_text(&rest, Vec::new());
                        }
                    }
                    let reason = if self.stop.stopped() {
                        "stop"
                    } else {
                        reason.as_str()
                    };
                    self.end(reason);
                }
                Some(Event::Failed { error, .. }) => self.fail(error),
                None => self.fail("the model thread stopped".into()),
            }
        }
    }

    fn fail(&mut self, error: String) {
        self.pending.push_back(Piece::Failed(error));
        self.ended = true;
        self.events = None;
    }
}

/// Submits the request and answers it, streamed or whole.
async fn respond(
    state: &Arc<AppState>,
    kind: Kind,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingOptions,
    decoding: Decoding,
) -> Result<Response, ApiError> {
    let prompt_tokens = prompt.len();
    let request = Request {
        prompt,
        max_tokens,
        stop_ids: match decoding.ignore_eos {
            true => Vec::new(),
            false => state.stop_ids(),
        },
        sampling,
    };
    let (id, events) = state.worker.submit(request).await?;
    let output = Output {
        events: Some(events),
        tokenizer: state.tokenizer.clone(),
        detok: Detokenizer::new(),
        decoded: String::new(),
        stop: StopText::new(
            decoding
                .stop
                .clone()
                .map(|s| s.into_vec())
                .unwrap_or_default(),
        ),
        pending: VecDeque::new(),
        ended: false,
        generated: 0,
    };
    let chunk = Chunk {
        id: match kind {
            Kind::Completion => format!("cmpl-{}", id.0),
            Kind::Chat => format!("chatcmpl-{}", id.0),
        },
        created: now(),
        model: state.model.clone(),
        kind,
    };
    if decoding.stream {
        Ok(stream(
            chunk,
            output,
            prompt_tokens,
            decoding.include_usage(),
        ))
    } else {
        whole(chunk, output, prompt_tokens).await
    }
}

/// The fields every response object of one request shares.
#[derive(Debug, Clone)]
struct Chunk {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Chunk {
    fn object(&self, streamed: bool) -> &'static str {
        match (self.kind, streamed) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// A streamed chunk with one choice.
    fn delta(&self, text: Option<&str>, ids: &[u32], finish: Option<&str>, role: bool) -> Value {
        let choice = match self.kind {
            Kind::Completion => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null,
                "finish_reason": finish, "token_ids": ids,
            }),
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({
                    "index": 0, "delta": delta, "logprobs": null,
                    "finish_reason": finish, "token_ids": ids,
                })
            }
        };
        json!({
            "id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [choice],
        })
    }
}

async fn whole(
    chunk: Chunk,
    mut output: Output,
    prompt_tokens: usize,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut finish = "length";
    while let Some(piece) = output.next().await {
        match piece {
            Piece::Text(t, i) => {
                text.push_str(&t);
                ids.extend(i);
            }
            Piece::End(reason) => finish = reason,
            Piece::Failed(error) => {
                return Err(ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: format!("generation failed: {error}"),
                    param: None,
                    code: None,
                })
            }
        }
    }
    let usage = Usage::new(prompt_tokens, output.generated);
    let choice = match chunk.kind {
        Kind::Completion => json!({
            "index": 0, "text": text, "logprobs": null, "finish_reason": finish, "token_ids": ids,
        }),
        Kind::Chat => json!({
            "index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": null, "finish_reason": finish, "token_ids": ids,
        }),
    };
    Ok(Json(json!({
        "id": chunk.id, "object": chunk.object(false), "created": chunk.created,
        "model": chunk.model, "choices": [choice], "usage": usage,
    }))
    .into_response())
}

/// The response as server-sent events: one chunk per piece of text, the finish reason,
/// the usage if asked, then `data: [DONE]`. A failure after the start is an `error`
/// object in the stream.
fn stream(chunk: Chunk, output: Output, prompt_tokens: usize, include_usage: bool) -> Response {
    struct St {
        chunk: Chunk,
        output: Output,
        queue: VecDeque<SseEvent>,
        started: bool,
        done: bool,
        prompt_tokens: usize,
        include_usage: bool,
    }
    let data = |v: &Value| SseEvent::default().data(v.to_string());
    let st = St {
        chunk,
        output,
        queue: VecDeque::new(),
        started: false,
        done: false,
        prompt_tokens,
        include_usage,
    };
    let events = futures_util::stream::unfold(st, move |mut st| async move {
        loop {
            if let Some(e) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.done {
                return None;
            }
            if !st.started && st.chunk.kind == Kind::Chat {
                st.started = true;
                let first = st.chunk.delta(Some(""), &[], None, true);
                st.queue.push_back(data(&first));
                continue;
            }
            st.started = true;
            match st.output.next().await {
                Some(Piece::Text(t, ids)) => {
                    let v = st.chunk.delta(Some(&t), &ids, None, false);
                    st.queue.push_back(data(&v));
                }
                Some(Piece::End(reason)) => {
                    let text = match st.chunk.kind {
                        Kind::Completion => Some(""),
                        Kind::Chat => None,
                    };
                    let v = st.chunk.delta(text, &[], Some(reason), false);
                    st.queue.push_back(data(&v));
                }
                Some(Piece::Failed(error)) => {
                    let body = ApiError {
                        status: StatusCode::INTERNAL_SERVER_ERROR,
                        message: format!("generation failed: {error}"),
                        param: None,
                        code: None,
                    }
                    .body();
                    st.queue.push_back(data(&json!(body)));
                }
                None => {
                    if st.include_usage {
                        let usage = Usage::new(st.prompt_tokens, st.output.generated);
                        let v = json!({
                            "id": st.chunk.id, "object": st.chunk.object(true),
                            "created": st.chunk.created, "model": st.chunk.model,
                            "choices": [], "usage": usage,
                        });
                        st.queue.push_back(data(&v));
                    }
                    st.queue.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
