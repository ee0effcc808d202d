//! `/v1/chat/completions` and `/v1/completions`: a request routed to the
//! local engine or a peer, answered as one JSON body or an SSE stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde_json::json;

use hypha_engine::{Engine, Event, Finish, FinishReason, GenerateRequest, Generation};
use hypha_wire::NodeId;

use crate::api::errors::{ApiError, OpenAiJson};
use crate::api::openai::{
    wire_request, ChatRequest, Checked, CompletionRequest, EdgePrompt, SamplingFields, Usage,
};
use crate::api::state::{AppState, Route};
use crate::inference::prep::Input;
use crate::inference::remote::{RemoteEvent, RemoteGeneration};
use crate::util::unix_ms;

/// Header naming the peer that served a remote request.
pub const PEER_HEADER: &str = "x-hypha-peer";
/// Header with the micro-credits a remote request was charged (whole
/// responses; a stream carries them in its usage chunk).
pub const CREDITS_HEADER: &str = "x-hypha-credits";

fn unix_now() -> u64 {
    unix_ms() / 1000
}

fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    // A failing system RNG leaves zeros: ids are labels, not secrets.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{prefix}-{hex}")
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

pub(crate) async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: Result<OpenAiJson<ChatRequest>, ApiError>,
) -> Response {
    let received = Instant::now();
    let prepared = async {
        let OpenAiJson(req) = body?;
        let route = st.route(&req.model)?;
        let checked = req.check()?;
        let job = submit(&st, route, &req.model, checked, &req.fields).await?;
        start(&st, Kind::Chat, req.model, job, &req.fields, received)
    }
    .await;
    reply(&st, Kind::Chat, prepared).await
}

pub(crate) async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<OpenAiJson<CompletionRequest>, ApiError>,
) -> Response {
    let received = Instant::now();
    let prepared = async {
        let OpenAiJson(req) = body?;
        let route = st.route(&req.model)?;
        let checked = req.check()?;
        let job = submit(&st, route, &req.model, checked, &req.fields).await?;
        start(&st, Kind::Text, req.model, job, &req.fields, received)
    }
    .await;
    reply(&st, Kind::Text, prepared).await
}

/// Starts a checked request on this node's engine or a peer's.
async fn submit(
    st: &AppState,
    route: Route<'_>,
    model: &str,
    checked: Checked,
    fields: &SamplingFields,
) -> Result<Job, ApiError> {
    let Checked { prompt, stops } = checked;
    match route {
        Route::Local(engine) => {
            let tokens = match prompt {
                EdgePrompt::Chat(messages) => {
                    st.prep.tokens(engine, None, Input::Chat(messages)).await?
                }
                EdgePrompt::Text(t) => st.prep.tokens(engine, None, Input::Text(t)).await?,
                EdgePrompt::Tokens(t) => t,
            };
            submit_local(engine, tokens, stops, fields)
        }
        Route::Remote(peers) => {
            let req = wire_request(
                peers.next_request_id().0,
                model,
                prompt.to_wire()?,
                stops,
                fields,
            );
            Ok(Job::Remote(Box::new(peers.start(req).await?)))
        }
    }
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

/// A running generation, here or on a peer.
enum Job {
    Local(Generation),
    Remote(Box<RemoteGeneration>),
}

/// One event of a job.
enum Out {
    Token(String),
    /// Text held to the end, the summary, and the micro-credits charged
    /// (remote requests with a recorded receipt).
    Done(String, Finish, Option<u64>),
    Failed(String),
}

impl Job {
    async fn next(&mut self) -> Option<Out> {
        match self {
            Job::Local(g) => g.next().await.map(|e| match e {
                Event::Token { text, .. } => Out::Token(text),
                Event::Done { text, finish } => Out::Done(text, finish, None),
                Event::Failed(e) => Out::Failed(e.to_string()),
            }),
            Job::Remote(g) => g.next().await.map(|e| match e {
                RemoteEvent::Token(text) => Out::Token(text),
                RemoteEvent::Done {
                    text,
                    finish,
                    credits,
                } => Out::Done(text, finish, credits),
                RemoteEvent::Failed(m) => Out::Failed(m),
            }),
        }
    }

    fn peer(&self) -> Option<NodeId> {
        match self {
            Job::Local(_) => None,
            Job::Remote(g) => Some(g.peer()),
        }
    }
}

fn submit_local(
    engine: &Engine,
    prompt: Vec<hypha_engine::Token>,
    stop: Vec<String>,
    fields: &SamplingFields,
) -> Result<Job, ApiError> {
    Ok(Job::Local(engine.submit(GenerateRequest {
        prompt,
        sampling: fields.sampling(),
        max_tokens: fields.max_tokens(),
        stop,
        // The node's own users come before the peers it serves.
        priority: i64::MAX,
        preemptible: false,
    })?))
}

fn start(
    st: &Arc<AppState>,
    kind: Kind,
    model: String,
    job: Job,
    fields: &SamplingFields,
    received: Instant,
) -> Result<Started, ApiError> {
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
        Ok(Started::Stream(stream_response(reply, job)))
    } else {
        Ok(Started::Whole(reply, job))
    }
}

enum Started {
    Stream(Response),
    Whole(Reply, Job),
}

/// Produces the response. A non-streaming reply is awaited here: when the
/// client leaves, hyper drops this future and the generation with it.
async fn respond(started: Started) -> Result<Response, ApiError> {
    match started {
        Started::Stream(resp) => Ok(resp),
        Started::Whole(reply, job) => collect(reply, job).await,
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

async fn collect(reply: Reply, mut job: Job) -> Result<Response, ApiError> {
    let mut tracker = Tracker::new(reply.state.clone(), reply.received);
    let mut text = String::new();
    let outcome = loop {
        match job.next().await {
            Some(Out::Token(t)) => {
                tracker.token();
                text.push_str(&t);
            }
            Some(Out::Done(t, finish, credits)) => {
                text.push_str(&t);
                tracker.finished(&finish);
                break Ok((finish, credits));
            }
            Some(Out::Failed(e)) => break Err(e),
            None => break Err("the engine stopped".to_owned()),
        }
    };
    let (finish, credits) = outcome.map_err(|m| {
        tracker.failed();
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m)
    })?;
    let usage = Usage::new(finish.prompt_tokens, finish.completion_tokens, credits);
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
    let mut resp = Json(body).into_response();
    add_peer_header(&mut resp, job.peer());
    if let Some(c) = credits {
        resp.headers_mut()
            .insert(CREDITS_HEADER, HeaderValue::from(c));
    }
    Ok(resp)
}

fn add_peer_header(resp: &mut Response, peer: Option<NodeId>) {
    if let Some(v) = peer.and_then(|p| HeaderValue::from_str(&p.to_string()).ok()) {
        resp.headers_mut().insert(PEER_HEADER, v);
    }
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
    job: Job,
    tracker: Tracker,
    phase: Phase,
    pending: std::collections::VecDeque<String>,
}

fn stream_response(reply: Reply, job: Job) -> Response {
    let peer = job.peer();
    let state = StreamState {
        tracker: Tracker::new(reply.state.clone(), reply.received),
        reply,
        job,
        phase: Phase::Start,
        pending: std::collections::VecDeque::with_capacity(4),
    };
    let mut resp = Sse::new(sse_events(state)).into_response();
    add_peer_header(&mut resp, peer);
    resp
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
                Phase::Running => match s.job.next().await {
                    Some(Out::Token(text)) => {
                        s.tracker.token();
                        if !text.is_empty() {
                            let c = chunk(&s.reply, Some(&text), false, None);
                            s.pending.push_back(c);
                        }
                    }
                    Some(Out::Done(text, finish, credits)) => {
                        s.tracker.finished(&finish);
                        if !text.is_empty() {
                            let c = chunk(&s.reply, Some(&text), false, None);
                            s.pending.push_back(c);
                        }
                        let c = chunk(&s.reply, None, false, Some(finish.reason));
                        s.pending.push_back(c);
                        if s.reply.include_usage {
                            let usage =
                                Usage::new(finish.prompt_tokens, finish.completion_tokens, credits);
                            let c = usage_chunk(&s.reply, usage);
                            s.pending.push_back(c);
                        }
                        s.pending.push_back("[DONE]".to_owned());
                        s.phase = Phase::Ended;
                    }
                    ended @ (Some(Out::Failed(_)) | None) => {
                        s.tracker.failed();
                        let message = match ended {
                            Some(Out::Failed(e)) => e,
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
