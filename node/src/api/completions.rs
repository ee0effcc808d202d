//! `/v1/chat/completions` and `/v1/completions`: OpenAI's two dialects of
//! a generation, as one JSON body or an SSE stream of chunks ending in
//! `[DONE]`; chat's tool calls as `message.tool_calls` or `tool_calls`
//! deltas (each call whole in one delta), with `finish_reason:
//! tool_calls`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::Response;
use serde_json::json;

use hypha_engine::{Finish, FinishReason, TokenLogprob};

use crate::api::errors::{ApiError, OpenAiJson};
use crate::api::generate::{
    event, new_id, reply, server_error_json, submit, unix_now, Dialect, Events, Started,
};
use crate::api::openai::{ChatRequest, CompletionRequest, SamplingFields, Usage};
use crate::api::state::AppState;
use crate::inference::tools::ToolCall;

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
        Ok(Started {
            dialect: Chat {
                o: OpenAi::new("chatcmpl", req.model, &req.fields),
                called: false,
            },
            job,
            stream: req.fields.stream,
            received,
        })
    }
    .await;
    reply(&st, prepared).await
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
        Ok(Started {
            dialect: Text(OpenAi::new("cmpl", req.model, &req.fields), 0),
            job,
            stream: req.fields.stream,
            received,
        })
    }
    .await;
    reply(&st, prepared).await
}

/// What both OpenAI dialects put in every chunk.
struct OpenAi {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    /// The request asked for logprobs.
    logprobs: bool,
}

impl OpenAi {
    fn new(prefix: &str, model: String, fields: &SamplingFields) -> Self {
        Self {
            id: new_id(prefix, '-'),
            model,
            created: unix_now(),
            include_usage: fields.include_usage(),
            logprobs: fields.logprobs().ok().flatten().is_some(),
        }
    }

    fn usage_chunk(&self, object: &str, usage: Usage) -> serde_json::Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        })
    }

    /// The chunks after the last text: the finish reason, the usage when
    /// asked for, and `[DONE]`.
    fn close(
        &self,
        object: &str,
        last: serde_json::Value,
        finish: &Finish,
        credits: Option<u64>,
        out: &mut Events,
    ) {
        out.push_back(event(None, &last));
        if self.include_usage {
            let usage = Usage::new(finish.prompt_tokens, finish.completion_tokens, credits);
            out.push_back(event(None, &self.usage_chunk(object, usage)));
        }
        out.push_back(axum::response::sse::Event::default().data("[DONE]"));
    }
}

/// A token as chat's logprobs show it: its text (lossy where the token is
/// part of a character), its bytes and its log-probability.
fn chat_token(bytes: &[u8], logprob: f32) -> serde_json::Value {
    json!({"token": String::from_utf8_lossy(bytes), "logprob": logprob, "bytes": bytes})
}

/// Chat's `logprobs` of some tokens: `{"content": [...], "refusal": null}`.
fn chat_logprobs(logprobs: &[TokenLogprob]) -> serde_json::Value {
    let content: Vec<serde_json::Value> = logprobs
        .iter()
        .map(|lp| {
            let mut e = chat_token(&lp.bytes, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|(b, l)| chat_token(b, *l)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// A tool call as chat's message shows it.
fn call_json(c: &ToolCall) -> serde_json::Value {
    json!({
        "id": c.id,
        "type": "function",
        "function": {"name": c.name, "arguments": c.arguments},
    })
}

/// Chat's finish reason: `tool_calls` when the model called tools and
/// stopped of itself.
fn finish_reason(finish: &Finish, called: bool) -> &'static str {
    if called && finish.reason == FinishReason::Stop {
        "tool_calls"
    } else {
        finish.reason.as_str()
    }
}

/// `/v1/chat/completions`; `called` once the answer called a tool.
struct Chat {
    o: OpenAi,
    called: bool,
}

impl Chat {
    fn chunk(
        &self,
        delta: serde_json::Value,
        logprobs: Option<&[TokenLogprob]>,
        finish: Option<&str>,
    ) -> serde_json::Value {
        let o = &self.o;
        json!({
            "id": o.id,
            "object": "chat.completion.chunk",
            "created": o.created,
            "model": o.model,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": logprobs.map(chat_logprobs),
                "finish_reason": finish,
            }],
        })
    }
}

impl Dialect for Chat {
    const METRIC: &'static str = "chat_completions";

    fn body(
        &self,
        text: String,
        calls: Vec<ToolCall>,
        logprobs: Vec<TokenLogprob>,
        finish: &Finish,
        credits: Option<u64>,
    ) -> serde_json::Value {
        let o = &self.o;
        let mut message = json!({"role": "assistant", "content": text});
        if !calls.is_empty() {
            if text.is_empty() {
                message["content"] = serde_json::Value::Null;
            }
            message["tool_calls"] = calls.iter().map(call_json).collect();
        }
        json!({
            "id": o.id,
            "object": "chat.completion",
            "created": o.created,
            "model": o.model,
            "choices": [{
                "index": 0,
                "message": message,
                "logprobs": o.logprobs.then(|| chat_logprobs(&logprobs)),
                "finish_reason": finish_reason(finish, !calls.is_empty()),
            }],
            "usage": Usage::new(finish.prompt_tokens, finish.completion_tokens, credits),
        })
    }

    fn opening(&mut self, out: &mut Events) {
        let c = self.chunk(json!({"role": "assistant", "content": ""}), None, None);
        out.push_back(event(None, &c));
    }

    fn text(&mut self, text: &str, logprobs: &[TokenLogprob], out: &mut Events) {
        let lp = self.o.logprobs.then_some(logprobs);
        let c = self.chunk(json!({"content": text}), lp, None);
        out.push_back(event(None, &c));
    }

    fn tool_call(&mut self, index: usize, call: &ToolCall, out: &mut Events) {
        self.called = true;
        let mut c = call_json(call);
        c["index"] = json!(index);
        let chunk = self.chunk(json!({"tool_calls": [c]}), None, None);
        out.push_back(event(None, &chunk));
    }

    fn done(&mut self, finish: &Finish, credits: Option<u64>, out: &mut Events) {
        let last = self.chunk(json!({}), None, Some(finish_reason(finish, self.called)));
        self.o
            .close("chat.completion.chunk", last, finish, credits, out);
    }

    fn failed(&mut self, message: &str, out: &mut Events) {
        out.push_back(event(None, &server_error_json(message)));
    }
}

/// `/v1/completions`; `offset` counts the characters of the tokens whose
/// logprobs were sent (their `text_offset`).
struct Text(OpenAi, usize);

/// Text completions' `logprobs` of some tokens, the first at character
/// `offset` of the completion; the offset after them.
fn text_logprobs(logprobs: &[TokenLogprob], mut offset: usize) -> (serde_json::Value, usize) {
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for lp in logprobs {
        let t = String::from_utf8_lossy(&lp.bytes).into_owned();
        offsets.push(offset);
        offset += t.chars().count();
        tokens.push(t);
        lps.push(lp.logprob);
        let top: serde_json::Map<String, serde_json::Value> = lp
            .top
            .iter()
            .map(|(b, l)| (String::from_utf8_lossy(b).into_owned(), json!(l)))
            .collect();
        tops.push(top);
    }
    let v = json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets});
    (v, offset)
}

impl Text {
    fn chunk(
        &self,
        text: &str,
        logprobs: Option<serde_json::Value>,
        finish: Option<FinishReason>,
    ) -> serde_json::Value {
        let o = &self.0;
        json!({
            "id": o.id,
            "object": "text_completion",
            "created": o.created,
            "model": o.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish.map(FinishReason::as_str),
            }],
        })
    }
}

impl Dialect for Text {
    const METRIC: &'static str = "completions";

    fn body(
        &self,
        text: String,
        _calls: Vec<ToolCall>,
        logprobs: Vec<TokenLogprob>,
        finish: &Finish,
        credits: Option<u64>,
    ) -> serde_json::Value {
        let o = &self.0;
        json!({
            "id": o.id,
            "object": "text_completion",
            "created": o.created,
            "model": o.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": o.logprobs.then(|| text_logprobs(&logprobs, 0).0),
                "finish_reason": finish.reason.as_str(),
            }],
            "usage": Usage::new(finish.prompt_tokens, finish.completion_tokens, credits),
        })
    }

    fn opening(&mut self, _out: &mut Events) {}

    fn text(&mut self, text: &str, logprobs: &[TokenLogprob], out: &mut Events) {
        let lp = self.0.logprobs.then(|| {
            let (v, next) = text_logprobs(logprobs, self.1);
            self.1 = next;
            v
        });
        out.push_back(event(None, &self.chunk(text, lp, None)));
    }

    fn done(&mut self, finish: &Finish, credits: Option<u64>, out: &mut Events) {
        let last = self.chunk("", None, Some(finish.reason));
        self.0.close("text_completion", last, finish, credits, out);
    }

    fn failed(&mut self, message: &str, out: &mut Events) {
        out.push_back(event(None, &server_error_json(message)));
    }
}
