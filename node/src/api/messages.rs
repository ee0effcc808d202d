//! `/v1/messages`: Anthropic's Messages API (what the `anthropic` SDKs and
//! Claude Code speak) over the same generation as chat completions, here
//! or on a peer.
//!
//! Served: `system` (a string or text blocks), `messages` of text content
//! (a string or `text` blocks), `max_tokens`, `stop_sequences` (the one
//! that matched comes back as `stop_sequence`), `temperature`, `top_p`,
//! `top_k`, `stream`, and `metadata`. Refused with a 400 naming them, as
//! everywhere on this node: tools and tool blocks, images and documents,
//! extended thinking, a last `assistant` message (a prefill the chat
//! template would close instead of continuing), and any field this node
//! does not know. Errors come in Anthropic's shape
//! (`{"type": "error", "error": {...}}`). A stream is Anthropic's event
//! sequence: `message_start`, one text block (`content_block_start`,
//! `content_block_delta`s, `content_block_stop`), `message_delta` with the
//! stop reason and usage, `message_stop`; the prompt's token count, which a
//! seeder learns first, comes in `message_delta`'s usage.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use hypha_engine::{ChatMessage, Finish, FinishReason, TokenLogprob};

use crate::api::errors::{ApiError, OpenAiJson};
use crate::api::generate::{event, new_id, reply, submit, Dialect, Events, Started};
use crate::api::openai::{Checked, EdgePrompt, SamplingFields, StopField};
use crate::api::state::AppState;
use crate::inference::convert::check_message_count;
use crate::inference::tools::ToolCall;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

/// A content block: only `text` ones are served.
#[derive(Debug, Deserialize)]
pub struct Block {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
    /// Every other field of the block.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    pub model: String,
    pub max_tokens: u32,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub system: Option<Content>,
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    pub stream: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    /// Every other field, checked by [`check_other`].
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Refuses the first field beyond those read that asks for something this
/// node does not do.
fn check_other(other: &serde_json::Map<String, serde_json::Value>) -> Result<(), ApiError> {
    use serde_json::Value as V;
    for (field, v) in other {
        let kind = v.get("type").and_then(V::as_str);
        let neutral = match field.as_str() {
            // The end user's id; a capacity preference.
            "metadata" | "service_tier" => true,
            "tools" | "mcp_servers" => v.is_null() || v.as_array().is_some_and(Vec::is_empty),
            "tool_choice" => v.is_null() || kind == Some("none") || kind == Some("auto"),
            "thinking" => v.is_null() || kind == Some("disabled"),
            _ => false,
        };
        if neutral {
            continue;
        }
        let what = match field.as_str() {
            "tools" | "tool_choice" | "mcp_servers" => "tool use is not supported by this node yet",
            "thinking" => "extended thinking is not supported by this node",
            _ => "this field is not known to this node",
        };
        return Err(ApiError::unsupported(field, what));
    }
    Ok(())
}

/// The text of `content`, or why it cannot be served (`at` names it).
fn text_of(content: &Content, at: &str) -> Result<String, ApiError> {
    let blocks = match content {
        Content::Text(t) => return Ok(t.clone()),
        Content::Blocks(b) => b,
    };
    let mut s = String::new();
    for b in blocks {
        match b.kind.as_str() {
            "text" => {}
            "tool_use" | "tool_result" | "server_tool_use" => {
                return Err(ApiError::unsupported(
                    at,
                    &format!(
                        "{} blocks: tool use is not supported by this node yet",
                        b.kind
                    ),
                ))
            }
            other => {
                return Err(ApiError::unsupported(
                    at,
                    &format!("content blocks of type {other:?} are not supported"),
                ))
            }
        }
        // `cache_control` is a hint the engine's prefix reuse makes moot;
        // anything else a block carries is refused.
        if let Some((field, _)) = b
            .other
            .iter()
            .find(|(f, v)| *f != "cache_control" && !v.is_null())
        {
            return Err(ApiError::unsupported(
                at,
                &format!("the text block field `{field}` is not supported"),
            ));
        }
        s.push_str(b.text.as_deref().unwrap_or_default());
    }
    Ok(s)
}

impl MessagesRequest {
    /// The sampling fields of the request, as chat completions has them.
    fn fields(&self) -> SamplingFields {
        SamplingFields {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            max_tokens: Some(self.max_tokens),
            stop: self.stop_sequences.clone().map(StopField::Many),
            stream: self.stream,
            ..SamplingFields::default()
        }
    }

    /// The edge's checks: the chat to template and the stop strings.
    fn check(&self, fields: &SamplingFields) -> Result<Checked, ApiError> {
        check_other(&self.other)?;
        let stops = fields.check()?;
        check_message_count(self.messages.len())
            .map_err(|m| ApiError::invalid(m).param("messages"))?;
        let mut chat = Vec::with_capacity(self.messages.len() + 1);
        if let Some(system) = &self.system {
            let content = text_of(system, "system")?;
            chat.push(ChatMessage {
                role: "system".into(),
                content,
            });
        }
        for (i, m) in self.messages.iter().enumerate() {
            let at = format!("messages[{i}].content");
            let role = match m.role.as_str() {
                "user" | "assistant" => m.role.clone(),
                other => {
                    return Err(ApiError::invalid(format!(
                        "unknown message role {other:?}: messages are from the user or the assistant (system text goes in `system`)"
                    ))
                    .param(format!("messages[{i}].role")))
                }
            };
            chat.push(ChatMessage {
                role,
                content: text_of(&m.content, &at)?,
            });
        }
        if self.messages.last().is_some_and(|m| m.role == "assistant") {
            return Err(ApiError::unsupported(
                "messages",
                "a last assistant message (a prefill to continue) is not supported by this node yet",
            ));
        }
        Ok(Checked {
            prompt: EdgePrompt::Chat(chat),
            stops,
            json_schema: None,
            tools: None,
        })
    }
}

pub(crate) async fn messages(
    State(st): State<Arc<AppState>>,
    body: Result<OpenAiJson<MessagesRequest>, ApiError>,
) -> Response {
    let received = Instant::now();
    let prepared = async {
        let OpenAiJson(req) = body?;
        let fields = req.fields();
        let checked = req.check(&fields)?;
        let stops = checked.stops.clone();
        let route = st.route(&req.model)?;
        let job = submit(&st, route, &req.model, checked, &fields).await?;
        Ok(Started {
            dialect: Anthropic {
                id: new_id("msg", '_'),
                model: req.model,
                stops,
            },
            job,
            stream: req.stream,
            received,
        })
    }
    .await;
    reply(&st, prepared).await
}

/// Anthropic's writing of a generation.
struct Anthropic {
    id: String,
    model: String,
    /// The request's stop strings: the one that matched is named.
    stops: Vec<String>,
}

impl Anthropic {
    /// `stop_reason` and `stop_sequence`.
    fn stop(&self, finish: &Finish) -> (&'static str, Option<&str>) {
        match (finish.reason, finish.stop_sequence) {
            (FinishReason::Length, _) => ("max_tokens", None),
            (FinishReason::Stop, Some(i)) => match self.stops.get(i) {
                Some(s) => ("stop_sequence", Some(s.as_str())),
                None => ("end_turn", None),
            },
            (FinishReason::Stop, None) => ("end_turn", None),
        }
    }

    fn usage(finish: &Finish, credits: Option<u64>) -> serde_json::Value {
        let mut u = json!({
            "input_tokens": finish.prompt_tokens,
            "output_tokens": finish.completion_tokens,
        });
        // hypha extension, as in OpenAI's usage.
        if let Some(c) = credits {
            u["credits"] = json!(c);
        }
        u
    }
}

impl Dialect for Anthropic {
    const METRIC: &'static str = "messages";

    fn error_response(e: ApiError) -> Response {
        e.anthropic_response()
    }

    fn body(
        &self,
        text: String,
        _calls: Vec<ToolCall>,
        _logprobs: Vec<TokenLogprob>,
        finish: &Finish,
        credits: Option<u64>,
    ) -> serde_json::Value {
        let (reason, sequence) = self.stop(finish);
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": Self::usage(finish, credits),
        })
    }

    fn opening(&mut self, out: &mut Events) {
        let start = json!({
            "type": "message_start",
            "message": {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            },
        });
        out.push_back(event(Some("message_start"), &start));
        let block = json!({
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        });
        out.push_back(event(Some("content_block_start"), &block));
    }

    fn text(&mut self, text: &str, _logprobs: &[TokenLogprob], out: &mut Events) {
        let delta = json!({
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": text},
        });
        out.push_back(event(Some("content_block_delta"), &delta));
    }

    fn done(&mut self, finish: &Finish, credits: Option<u64>, out: &mut Events) {
        let stop = json!({"type": "content_block_stop", "index": 0});
        out.push_back(event(Some("content_block_stop"), &stop));
        let (reason, sequence) = self.stop(finish);
        let delta = json!({
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": Self::usage(finish, credits),
        });
        out.push_back(event(Some("message_delta"), &delta));
        out.push_back(event(
            Some("message_stop"),
            &json!({"type": "message_stop"}),
        ));
    }

    fn failed(&mut self, message: &str, out: &mut Events) {
        let e = json!({"type": "error", "error": {"type": "api_error", "message": message}});
        out.push_back(event(Some("error"), &e));
    }
}
