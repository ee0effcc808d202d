//! Canopy's HTTP front: the OpenAI-compatible API, `/health` and `/metrics`.
//!
//! Request flow: the body is read under a size cap and decoded to an OpenAI
//! request (a 400 or 413 JSON error otherwise), turned into tokens, and
//! submitted to the engine. The engine's event stream becomes either one
//! JSON response or an SSE stream. The HTTP body owns the engine's
//! `Generation`: when a client disconnects, hyper drops the body, the
//! generation handle goes with it, and the engine frees the slot at its next
//! step.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use serde_json::json;

use hypha_engine::{Engine, Event, FinishReason, GenerateRequest, Generation};

use crate::metrics::{Gauges, Metrics};
use crate::openai::{
    ChatRequest, CompletionRequest, ModelCard, ModelList, ModelMeta, PromptField, SamplingFields,
    Usage,
};

/// Largest request body accepted: long prompts fit, runaway uploads do not.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Seconds a client is told to wait when every slot and the queue are full.
const RETRY_AFTER_S: u64 = 1;

/// What every handler shares.
pub struct AppState {
    pub engine: Engine,
    pub model_id: String,
    pub aliases: Vec<String>,
    pub api_key: Option<String>,
    pub metrics: Metrics,
    pub started: SystemTime,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE
            || self.status == StatusCode::TOO_MANY_REQUESTS
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        }
        resp
    }
}

impl From<hypha_engine::Error> for ApiError {
    fn from(e: hypha_engine::Error) -> Self {
        use hypha_engine::Error as E;
        match e {
            E::ContextExceeded { .. } => Self::invalid(e.to_string())
                .code("context_length_exceeded")
                .param("messages"),
            E::InvalidRequest(_) | E::PromptTooLarge | E::Template(_) => {
                Self::invalid(e.to_string())
            }
            E::QueueFull { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_busy",
                e.to_string(),
            )
            .code("queue_full"),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
            ),
        }
    }
}

/// A JSON body decoded with OpenAI-style errors for every failure.
pub struct OpenAiJson<T>(pub T);

impl<T, S> FromRequest<S> for OpenAiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    format!("request body is larger than {MAX_BODY_BYTES} bytes"),
                )
                .code("request_too_large")
            } else {
                ApiError::invalid(format!("cannot read the request body: {rej}"))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(OpenAiJson)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")).code("invalid_json"))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    // A failing system RNG leaves zeros: ids are labels, not secrets.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{prefix}-{hex}")
}

impl AppState {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Compare in constant time so the key cannot be guessed byte by byte.
        let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes()));
        if ok {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing or wrong API key (send Authorization: Bearer KEY)",
            )
            .code("invalid_api_key"))
        }
    }

    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model_id || self.aliases.iter().any(|a| a == model) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "the model {model:?} does not exist on this node; it serves {:?}",
                    self.model_id
                ),
            )
            .code("model_not_found")
            .param("model"))
        }
    }
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown endpoint",
    )
    .code("unknown_url")
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let stats = st.engine.stats();
    Json(json!({
        "status": "ok",
        "model": st.model_id,
        "slots_busy": stats.slots_busy.load(Ordering::Relaxed),
        "slots_total": st.engine.info().parallel,
        "queue_depth": stats.queued.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let stats = st.engine.stats();
    let text = st.metrics.render(&Gauges {
        queue_depth: stats.queued.load(Ordering::Relaxed),
        slots_busy: stats.slots_busy.load(Ordering::Relaxed),
        slots_total: st.engine.info().parallel,
        prompt_tokens_reused: stats.prompt_tokens_reused.load(Ordering::Relaxed),
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn list_models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = st.authorize(&headers) {
        return e.into_response();
    }
    let info = st.engine.info();
    let created = st
        .started
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: st.model_id.clone(),
            object: "model",
            created,
            owned_by: "hypha",
            meta: ModelMeta {
                architecture: info.architecture.clone(),
                context_length: info.ctx_per_slot,
                context_length_train: info.n_ctx_train,
                n_params: info.n_params,
                size_bytes: info.size_bytes,
                device: info.device.clone(),
                slots: info.parallel,
            },
        }],
    })
    .into_response()
}

/// Which OpenAI endpoint a generation answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn metric(self) -> &'static str {
        match self {
            Kind::Chat => "chat_completions",
            Kind::Text => "completions",
        }
    }
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<OpenAiJson<ChatRequest>, ApiError>,
) -> Response {
    let prepared = async {
        st.authorize(&headers)?;
        let OpenAiJson(req) = body?;
        st.check_model(&req.model)?;
        let stops = req.fields.check().map_err(ApiError::invalid)?;
        let messages = req
            .messages()
            .map_err(|m| ApiError::invalid(m).param("messages"))?;
        let engine = st.engine.clone();
        let prompt = engine.apply_chat_template(&messages)?;
        let tokens = engine.tokenize(&prompt)?;
        start(&st, Kind::Chat, req.model, tokens, stops, &req.fields)
    }
    .await;
    reply(&st, Kind::Chat, prepared).await
}

async fn completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<OpenAiJson<CompletionRequest>, ApiError>,
) -> Response {
    let prepared = async {
        st.authorize(&headers)?;
        let OpenAiJson(req) = body?;
        st.check_model(&req.model)?;
        let stops = req.fields.check().map_err(ApiError::invalid)?;
        if req.echo {
            return Err(ApiError::invalid("echo is not supported").param("echo"));
        }
        let tokens = match &req.prompt {
            PromptField::Text(t) => st.engine.tokenize(t)?,
            PromptField::Texts(v) if v.len() == 1 => st.engine.tokenize(&v[0])?,
            PromptField::Texts(_) => {
                return Err(
                    ApiError::invalid("exactly one prompt per request is supported")
                        .param("prompt"),
                )
            }
            PromptField::Tokens(t) => t.clone(),
        };
        start(&st, Kind::Text, req.model, tokens, stops, &req.fields)
    }
    .await;
    reply(&st, Kind::Text, prepared).await
}

/// Produces the response for a prepared request (or its error) and counts it.
async fn reply(st: &AppState, kind: Kind, prepared: Result<Started, ApiError>) -> Response {
    let result = match prepared {
        Ok(started) => respond(started).await,
        Err(e) => Err(e),
    };
    let resp = result.unwrap_or_else(IntoResponse::into_response);
    st.metrics
        .count_request(kind.metric(), resp.status().as_u16());
    resp
}

/// Everything a response needs besides the generation itself.
struct Reply {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    received: Instant,
    state: Arc<AppState>,
}

fn start(
    st: &Arc<AppState>,
    kind: Kind,
    model: String,
    prompt: Vec<hypha_engine::Token>,
    stop: Vec<String>,
    fields: &SamplingFields,
) -> Result<Started, ApiError> {
    let received = Instant::now();
    let generation = st.engine.submit(GenerateRequest {
        prompt,
        sampling: fields.sampling(),
        max_tokens: fields.max_tokens(),
        stop,
    })?;
    let reply = Reply {
        kind,
        id: new_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        model,
        created: unix_now(),
        include_usage: fields.include_usage(),
        received,
        state: st.clone(),
    };
    if fields.stream {
        Ok(Started::Stream(stream_response(reply, generation)))
    } else {
        Ok(Started::Whole(reply, generation))
    }
}

enum Started {
    Stream(Response),
    Whole(Reply, Generation),
}

/// Produces the response. A non-streaming reply is awaited here: when the
/// client leaves, hyper drops this future and the generation with it.
async fn respond(started: Started) -> Result<Response, ApiError> {
    match started {
        Started::Stream(resp) => Ok(resp),
        Started::Whole(reply, generation) => collect(reply, generation).await,
    }
}

/// Records one generation in the metrics: time to first token and between
/// tokens, token counts when it ends, and a cancellation when it is dropped
/// before it ended (the client went away).
struct Tracker {
    state: Arc<AppState>,
    first: bool,
    last: Instant,
    ended: bool,
}

impl Tracker {
    fn new(state: Arc<AppState>, received: Instant) -> Self {
        Self {
            state,
            first: true,
            last: received,
            ended: false,
        }
    }

    fn token(&mut self) {
        let now = Instant::now();
        let m = &self.state.metrics;
        if self.first {
            m.ttft.observe(now - self.last);
            self.first = false;
        } else {
            m.inter_token.observe(now - self.last);
        }
        self.last = now;
    }

    fn finished(&mut self, finish: &hypha_engine::Finish) {
        let m = &self.state.metrics;
        m.prompt_tokens
            .fetch_add(u64::from(finish.prompt_tokens), Ordering::Relaxed);
        m.completion_tokens
            .fetch_add(u64::from(finish.completion_tokens), Ordering::Relaxed);
        self.ended = true;
    }

    fn failed(&mut self) {
        self.ended = true;
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.ended {
            self.state.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The JSON of a server-side failure, as a response body or an SSE event.
fn server_error_json(message: &str) -> serde_json::Value {
    json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}})
}

async fn collect(reply: Reply, mut generation: Generation) -> Result<Response, ApiError> {
    let mut tracker = Tracker::new(reply.state.clone(), reply.received);
    let mut text = String::new();
    let outcome = loop {
        match generation.next().await {
            Some(Event::Token { text: t, .. }) => {
                tracker.token();
                text.push_str(&t);
            }
            Some(Event::Done { text: t, finish }) => {
                text.push_str(&t);
                tracker.finished(&finish);
                break Ok(finish);
            }
            Some(Event::Failed(e)) => break Err(e.to_string()),
            None => break Err("the engine stopped".to_owned()),
        }
    };
    let finish = outcome.map_err(|m| {
        tracker.failed();
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m)
    })?;
    let usage = Usage::new(finish.prompt_tokens, finish.completion_tokens);
    let reason = finish.reason.as_str();
    let body = match reply.kind {
        Kind::Chat => json!({
            "id": reply.id,
            "object": "chat.completion",
            "created": reply.created,
            "model": reply.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": reason,
            }],
            "usage": usage,
        }),
        Kind::Text => json!({
            "id": reply.id,
            "object": "text_completion",
            "created": reply.created,
            "model": reply.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": reason,
            }],
            "usage": usage,
        }),
    };
    Ok(Json(body).into_response())
}

fn chunk(reply: &Reply, text: Option<&str>, role: bool, finish: Option<FinishReason>) -> String {
    let reason = finish.map(FinishReason::as_str);
    let v = match reply.kind {
        Kind::Chat => {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = text {
                delta.insert("content".into(), json!(t));
            }
            json!({
                "id": reply.id,
                "object": "chat.completion.chunk",
                "created": reply.created,
                "model": reply.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason}],
            })
        }
        Kind::Text => json!({
            "id": reply.id,
            "object": "text_completion",
            "created": reply.created,
            "model": reply.model,
            "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": reason}],
        }),
    };
    v.to_string()
}

fn usage_chunk(reply: &Reply, usage: Usage) -> String {
    let object = match reply.kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Text => "text_completion",
    };
    json!({
        "id": reply.id,
        "object": object,
        "created": reply.created,
        "model": reply.model,
        "choices": [],
        "usage": usage,
    })
    .to_string()
}

enum Phase {
    Start,
    Running,
    Ended,
}

struct StreamState {
    reply: Reply,
    generation: Generation,
    tracker: Tracker,
    phase: Phase,
    pending: std::collections::VecDeque<String>,
}

fn stream_response(reply: Reply, generation: Generation) -> Response {
    let state = StreamState {
        tracker: Tracker::new(reply.state.clone(), reply.received),
        reply,
        generation,
        phase: Phase::Start,
        pending: std::collections::VecDeque::with_capacity(4),
    };
    Sse::new(sse_events(state)).into_response()
}

fn sse_events(
    state: StreamState,
) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> + Send {
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.pending.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), s));
            }
            match s.phase {
                Phase::Ended => return None,
                Phase::Start => {
                    s.phase = Phase::Running;
                    if s.reply.kind == Kind::Chat {
                        let c = chunk(&s.reply, Some(""), true, None);
                        s.pending.push_back(c);
                    }
                }
                Phase::Running => match s.generation.next().await {
                    Some(Event::Token { text, .. }) => {
                        s.tracker.token();
                        if !text.is_empty() {
                            let c = chunk(&s.reply, Some(&text), false, None);
                            s.pending.push_back(c);
                        }
                    }
                    Some(Event::Done { text, finish }) => {
                        s.tracker.finished(&finish);
                        if !text.is_empty() {
                            let c = chunk(&s.reply, Some(&text), false, None);
                            s.pending.push_back(c);
                        }
                        let c = chunk(&s.reply, None, false, Some(finish.reason));
                        s.pending.push_back(c);
                        if s.reply.include_usage {
                            let usage = Usage::new(finish.prompt_tokens, finish.completion_tokens);
                            let c = usage_chunk(&s.reply, usage);
                            s.pending.push_back(c);
                        }
                        s.pending.push_back("[DONE]".to_owned());
                        s.phase = Phase::Ended;
                    }
                    ended @ (Some(Event::Failed(_)) | None) => {
                        s.tracker.failed();
                        let message = match ended {
                            Some(Event::Failed(e)) => e.to_string(),
                            _ => "the engine stopped".to_owned(),
                        };
                        s.pending.push_back(server_error_json(&message).to_string());
                        s.phase = Phase::Ended;
                    }
                },
            }
        }
    })
}
