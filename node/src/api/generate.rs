//! What every generating endpoint shares: a checked request started on the
//! local engine or a peer ([`submit`]), and its events written out by a
//! [`Dialect`] (OpenAI chat or text completions, Anthropic Messages, the
//! Responses API) as one JSON body or as an SSE stream, with the metrics
//! of each generation.
//!
//! The HTTP body owns the running job: when a client disconnects, hyper
//! drops the body and the job with it.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde_json::json;

use hypha_engine::{Engine, Event, Finish, GenerateRequest, Generation, TokenLogprob};
use hypha_wire::NodeId;

use crate::api::errors::ApiError;
use crate::api::openai::{wire_request, Checked, EdgePrompt, SamplingFields};
use crate::api::state::{AppState, Route};
use crate::inference::prep::Input;
use crate::inference::remote::{RemoteEvent, RemoteGeneration};
use crate::inference::schema::grammar_for;
use crate::inference::tools::{self, Parser, Piece, ToolCall, ToolFormat, ToolSet};
use crate::util::unix_ms;

/// Header naming the peer that served a remote request.
pub const PEER_HEADER: &str = "x-hypha-peer";
/// Header with the micro-credits a remote request was charged (whole
/// responses; a stream carries them in its usage chunk).
pub const CREDITS_HEADER: &str = "x-hypha-credits";

/// Seconds since the Unix epoch, for `created` fields.
pub fn unix_now() -> u64 {
    unix_ms() / 1000
}

/// A fresh response id: `prefix` and 24 hex digits (`sep` between them).
pub fn new_id(prefix: &str, sep: char) -> String {
    let mut b = [0u8; 12];
    // A failing system RNG leaves zeros: ids are labels, not secrets.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{prefix}{sep}{hex}")
}

/// SSE events a dialect has written and the stream has not sent yet.
pub type Events = VecDeque<SseEvent>;

/// An SSE event with JSON data and, where the dialect names its events
/// (Anthropic, the Responses API), an event name.
pub fn event(name: Option<&str>, data: &serde_json::Value) -> SseEvent {
    let e = SseEvent::default().data(data.to_string());
    match name {
        Some(n) => e.event(n),
        None => e,
    }
}

/// How one API writes a generation.
pub trait Dialect: Send + 'static {
    /// The endpoint's label in `hypha_requests_total`.
    const METRIC: &'static str;

    /// An error before or instead of a generation, in this API's shape.
    fn error_response(e: ApiError) -> Response {
        e.into_response()
    }

    /// The whole answer as one JSON body; `logprobs` has one entry per
    /// token when the request asked for them; `calls` are the tools the
    /// model called (only for a dialect whose requests may offer tools).
    fn body(
        &self,
        text: String,
        calls: Vec<ToolCall>,
        logprobs: Vec<TokenLogprob>,
        finish: &Finish,
        credits: Option<u64>,
    ) -> serde_json::Value;

    /// Events for one call of a tool, the `index`th of the answer. Only
    /// dialects whose edge takes tools see calls: others refuse a request
    /// with tools by name, so no call reaches them.
    fn tool_call(&mut self, _index: usize, _call: &ToolCall, _out: &mut Events) {}

    /// Events before the first text.
    fn opening(&mut self, out: &mut Events);

    /// Events for more text, or for tokens' logprobs (one of them is not
    /// empty; the logprobs only when the request asked for them).
    fn text(&mut self, text: &str, logprobs: &[TokenLogprob], out: &mut Events);

    /// The closing events of a generation that ended.
    fn done(&mut self, finish: &Finish, credits: Option<u64>, out: &mut Events);

    /// The closing events of a generation that failed.
    fn failed(&mut self, message: &str, out: &mut Events);
}

/// A running generation, here or on a peer.
pub enum Run {
    Local(Generation),
    Remote(Box<RemoteGeneration>),
}

/// A running generation, and the reading of tool calls out of its text
/// when its request offered tools.
pub struct Job {
    run: Run,
    tools: Option<ToolStream>,
    /// Events read and not yet taken.
    queued: VecDeque<Out>,
}

/// The tool calls of an answer as they are read.
struct ToolStream {
    parser: Parser,
    format: ToolFormat,
    /// Calls so far.
    calls: usize,
}

/// One event of a job.
enum Out {
    Token(String, Vec<TokenLogprob>),
    /// A call of a tool, its index among the answer's calls.
    Call(usize, ToolCall),
    /// Text held to the end, the summary, and the micro-credits charged
    /// (remote requests with a recorded receipt).
    Done(String, Finish, Option<u64>),
    Failed(String),
}

/// An id for a call: Mistral's templates demand nine letters and digits,
/// others take OpenAI's `call_` and 24 hex digits.
fn call_id(format: ToolFormat) -> String {
    let id = new_id("call", '_');
    match format {
        ToolFormat::Mistral => id.chars().rev().take(9).collect(),
        _ => id,
    }
}

impl ToolStream {
    fn new(format: ToolFormat, set: &ToolSet) -> Self {
        Self {
            parser: Parser::new(format, set),
            format,
            calls: 0,
        }
    }

    /// Queues the events of `pieces`: text as tokens, calls with ids.
    fn queue(&mut self, pieces: Vec<Piece>, out: &mut VecDeque<Out>) {
        for p in pieces {
            match p {
                Piece::Text(t) => out.push_back(Out::Token(t, Vec::new())),
                Piece::Call { name, arguments } => {
                    let call = ToolCall {
                        id: call_id(self.format),
                        name,
                        arguments,
                    };
                    out.push_back(Out::Call(self.calls, call));
                    self.calls += 1;
                }
            }
        }
    }
}

impl Job {
    fn new(run: Run, tools: Option<ToolStream>) -> Self {
        Self {
            run,
            tools,
            queued: VecDeque::new(),
        }
    }

    async fn next(&mut self) -> Option<Out> {
        if let Some(o) = self.queued.pop_front() {
            return Some(o);
        }
        let out = self.run.next().await?;
        let Some(tools) = self.tools.as_mut() else {
            return Some(out);
        };
        match out {
            Out::Token(text, logprobs) => {
                let pieces = tools.parser.push(&text);
                tools.queue(pieces, &mut self.queued);
                // One token event per token, for the metrics, with the
                // first piece's text when there is one.
                match self.queued.pop_front() {
                    Some(Out::Token(t, _)) => Some(Out::Token(t, logprobs)),
                    Some(other) => {
                        self.queued.push_front(other);
                        Some(Out::Token(String::new(), logprobs))
                    }
                    None => Some(Out::Token(String::new(), logprobs)),
                }
            }
            Out::Done(text, finish, credits) => {
                let mut pieces = tools.parser.push(&text);
                pieces.extend(tools.parser.finish());
                tools.queue(pieces, &mut self.queued);
                self.queued
                    .push_back(Out::Done(String::new(), finish, credits));
                self.queued.pop_front()
            }
            other => Some(other),
        }
    }

    fn peer(&self) -> Option<NodeId> {
        self.run.peer()
    }
}

impl Run {
    async fn next(&mut self) -> Option<Out> {
        match self {
            Run::Local(g) => g.next().await.map(|e| match e {
                Event::Token { text, logprob, .. } => {
                    Out::Token(text, logprob.map(|l| vec![*l]).unwrap_or_default())
                }
                Event::Done { text, finish } => Out::Done(text, finish, None),
                Event::Failed(e) => Out::Failed(e.to_string()),
            }),
            Run::Remote(g) => g.next().await.map(|e| match e {
                RemoteEvent::Token(text, logprobs) => Out::Token(text, logprobs),
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
            Run::Local(_) => None,
            Run::Remote(g) => Some(g.peer()),
        }
    }
}

/// Starts a checked request on this node's engine or a peer's.
pub async fn submit(
    st: &AppState,
    route: Route<'_>,
    model: &str,
    checked: Checked,
    fields: &SamplingFields,
) -> Result<Job, ApiError> {
    let Checked {
        prompt,
        stops,
        json_schema,
        tools,
    } = checked;
    match route {
        Route::Local(engine) => {
            let format = tools::format_of_template(engine.info().chat_template.as_deref());
            let grammar = match (&json_schema, &tools) {
                (Some(s), _) => Some(hypha_engine::Grammar::whole(grammar_for(s).map_err(
                    |m| {
                        ApiError::invalid(m)
                            .param("response_format")
                            .code("unsupported_schema")
                    },
                )?)),
                (None, Some(set)) => Some(
                    tools::grammar(set, format)
                        .map_err(|m| ApiError::invalid(m).param("tools").code("invalid_tools"))?,
                ),
                (None, None) => None,
            };
            let tokens = match prompt {
                EdgePrompt::Chat(messages) => {
                    st.prep.tokens(engine, None, Input::Chat(messages)).await?
                }
                EdgePrompt::Tools(chat) => {
                    st.prep
                        .tokens(engine, None, Input::Tools(chat, format))
                        .await?
                }
                EdgePrompt::Text(t) => st.prep.tokens(engine, None, Input::Text(t)).await?,
                EdgePrompt::Tokens(t) => t,
            };
            let run = submit_local(engine, tokens, stops, grammar, fields)?;
            let stream = tools.as_ref().map(|set| ToolStream::new(format, set));
            Ok(Job::new(run, stream))
        }
        Route::Remote(peers) => {
            let req = wire_request(
                peers.next_request_id().0,
                model,
                prompt.to_wire()?,
                stops,
                json_schema,
                tools.as_ref(),
                fields,
            );
            let g = peers.start(req).await?;
            let stream = match (&tools, g.tool_format()) {
                (None, _) => None,
                (Some(set), Some(format)) => Some(ToolStream::new(format, set)),
                (Some(_), None) => {
                    return Err(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "server_error",
                        "the seeder did not say how its model writes tool calls",
                    ))
                }
            };
            Ok(Job::new(Run::Remote(Box::new(g)), stream))
        }
    }
}

fn submit_local(
    engine: &Engine,
    prompt: Vec<hypha_engine::Token>,
    stop: Vec<String>,
    grammar: Option<hypha_engine::Grammar>,
    fields: &SamplingFields,
) -> Result<Run, ApiError> {
    Ok(Run::Local(engine.submit(GenerateRequest {
        prompt,
        sampling: fields.sampling(),
        max_tokens: fields.max_tokens(),
        stop,
        grammar,
        logprobs: fields.logprobs().map_err(ApiError::invalid)?,
        // The node's own users come before the peers it serves.
        priority: i64::MAX,
        preemptible: false,
    })?))
}

/// A started job and how to answer it.
pub struct Started<D> {
    pub dialect: D,
    pub job: Job,
    pub stream: bool,
    /// When the request arrived (for time to first token).
    pub received: Instant,
}

/// Produces the response for a started request (or its error) and counts
/// it. A non-streaming reply is awaited here: when the client leaves,
/// hyper drops this future and the generation with it.
pub async fn reply<D: Dialect>(
    st: &Arc<AppState>,
    prepared: Result<Started<D>, ApiError>,
) -> Response {
    let result = match prepared {
        Ok(s) if s.stream => Ok(stream_response(st.clone(), s)),
        Ok(s) => collect(st.clone(), s).await,
        Err(e) => Err(e),
    };
    let resp = result.unwrap_or_else(D::error_response);
    st.metrics.count_request(D::METRIC, resp.status().as_u16());
    resp
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

/// The JSON of a server-side failure, OpenAI's shape.
pub fn server_error_json(message: &str) -> serde_json::Value {
    json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}})
}

async fn collect<D: Dialect>(st: Arc<AppState>, s: Started<D>) -> Result<Response, ApiError> {
    let Started {
        dialect,
        mut job,
        received,
        ..
    } = s;
    let mut tracker = Tracker::new(st, received);
    let mut text = String::new();
    let mut calls = Vec::new();
    let mut logprobs = Vec::new();
    let outcome = loop {
        match job.next().await {
            Some(Out::Token(t, lp)) => {
                tracker.token();
                text.push_str(&t);
                logprobs.extend(lp);
            }
            Some(Out::Call(_, call)) => calls.push(call),
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
    let mut resp = Json(dialect.body(text, calls, logprobs, &finish, credits)).into_response();
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

enum Phase {
    Start,
    Running,
    Ended,
}

struct StreamState<D> {
    dialect: D,
    job: Job,
    tracker: Tracker,
    phase: Phase,
    pending: Events,
}

fn stream_response<D: Dialect>(st: Arc<AppState>, s: Started<D>) -> Response {
    let peer = s.job.peer();
    let state = StreamState {
        tracker: Tracker::new(st, s.received),
        dialect: s.dialect,
        job: s.job,
        phase: Phase::Start,
        pending: VecDeque::with_capacity(8),
    };
    let mut resp = Sse::new(sse_events(state)).into_response();
    add_peer_header(&mut resp, peer);
    resp
}

fn sse_events<D: Dialect>(
    state: StreamState<D>,
) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> + Send {
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(e) = s.pending.pop_front() {
                return Some((Ok(e), s));
            }
            match s.phase {
                Phase::Ended => return None,
                Phase::Start => {
                    s.phase = Phase::Running;
                    s.dialect.opening(&mut s.pending);
                }
                Phase::Running => match s.job.next().await {
                    Some(Out::Token(text, logprobs)) => {
                        s.tracker.token();
                        if !text.is_empty() || !logprobs.is_empty() {
                            s.dialect.text(&text, &logprobs, &mut s.pending);
                        }
                    }
                    Some(Out::Call(index, call)) => {
                        s.dialect.tool_call(index, &call, &mut s.pending);
                    }
                    Some(Out::Done(text, finish, credits)) => {
                        s.tracker.finished(&finish);
                        if !text.is_empty() {
                            s.dialect.text(&text, &[], &mut s.pending);
                        }
                        s.dialect.done(&finish, credits, &mut s.pending);
                        s.phase = Phase::Ended;
                    }
                    ended @ (Some(Out::Failed(_)) | None) => {
                        s.tracker.failed();
                        let message = match ended {
                            Some(Out::Failed(e)) => e,
                            _ => "the engine stopped".to_owned(),
                        };
                        s.dialect.failed(&message, &mut s.pending);
                        s.phase = Phase::Ended;
                    }
                },
            }
        }
    })
}
