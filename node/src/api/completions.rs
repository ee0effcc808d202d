//! `/v1/chat/completions` and `/v1/completions`: OpenAI's two dialects of
//! a generation, as one JSON body or an SSE stream of chunks ending in
//! `[DONE]`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::Response;
use serde_json::json;

use hypha_engine::{Finish, FinishReason};

use crate::api::errors::{ApiError, OpenAiJson};
use crate::api::generate::{
    event, new_id, reply, server_error_json, submit, unix_now, Dialect, Events, Started,
};
use crate::api::openai::{ChatRequest, CompletionRequest, SamplingFields, Usage};
use crate::api::state::AppState;

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
            dialect: Chat(OpenAi::new("chatcmpl", req.model, &req.fields)),
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
            dialect: Text(OpenAi::new("cmpl", req.model, &req.fields)),
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
}

impl OpenAi {
    fn new(prefix: &str, model: String, fields: &SamplingFields) -> Self {
        Self {
            id: new_id(prefix, '-'),
            model,
            created: unix_now(),
            include_usage: fields.include_usage(),
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

/// `/v1/chat/completions`.
struct Chat(OpenAi);

impl Chat {
    fn chunk(&self, delta: serde_json::Value, finish: Option<FinishReason>) -> serde_json::Value {
        let o = &self.0;
        json!({
            "id": o.id,
            "object": "chat.completion.chunk",
            "created": o.created,
            "model": o.model,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish.map(FinishReason::as_str),
            }],
        })
    }
}

impl Dialect for Chat {
    const METRIC: &'static str = "chat_completions";

    fn body(&self, text: String, finish: &Finish, credits: Option<u64>) -> serde_json::Value {
        let o = &self.0;
        json!({
            "id": o.id,
            "object": "chat.completion",
            "created": o.created,
            "model": o.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish.reason.as_str(),
            }],
            "usage": Usage::new(finish.prompt_tokens, finish.completion_tokens, credits),
        })
    }

    fn opening(&mut self, out: &mut Events) {
        let c = self.chunk(json!({"role": "assistant", "content": ""}), None);
        out.push_back(event(None, &c));
    }

    fn text(&mut self, text: &str, out: &mut Events) {
        let c = self.chunk(json!({"content": text}), None);
        out.push_back(event(None, &c));
    }

    fn done(&mut self, finish: &Finish, credits: Option<u64>, out: &mut Events) {
        let last = self.chunk(json!({}), Some(finish.reason));
        self.0
            .close("chat.completion.chunk", last, finish, credits, out);
    }

    fn failed(&mut self, message: &str, out: &mut Events) {
        out.push_back(event(None, &server_error_json(message)));
    }
}

/// `/v1/completions`.
struct Text(OpenAi);

impl Text {
    fn chunk(&self, text: &str, finish: Option<FinishReason>) -> serde_json::Value {
        let o = &self.0;
        json!({
            "id": o.id,
            "object": "text_completion",
            "created": o.created,
            "model": o.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish.map(FinishReason::as_str),
            }],
        })
    }
}

impl Dialect for Text {
    const METRIC: &'static str = "completions";

    fn body(&self, text: String, finish: &Finish, credits: Option<u64>) -> serde_json::Value {
        let o = &self.0;
        json!({
            "id": o.id,
            "object": "text_completion",
            "created": o.created,
            "model": o.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish.reason.as_str(),
            }],
            "usage": Usage::new(finish.prompt_tokens, finish.completion_tokens, credits),
        })
    }

    fn opening(&mut self, _out: &mut Events) {}

    fn text(&mut self, text: &str, out: &mut Events) {
        out.push_back(event(None, &self.chunk(text, None)));
    }

    fn done(&mut self, finish: &Finish, credits: Option<u64>, out: &mut Events) {
        let last = self.chunk("", Some(finish.reason));
        self.0.close("text_completion", last, finish, credits, out);
    }

    fn failed(&mut self, message: &str, out: &mut Events) {
        out.push_back(event(None, &server_error_json(message)));
    }
}
