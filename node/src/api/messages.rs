//! `/v1/messages`: Anthropic's Messages API (what the `anthropic` SDKs and
//! Claude Code speak) over the same generation as chat completions, here
//! or on a peer.
//!
//! Served: `system` (a string or text blocks), `messages` of text content
//! (a string or `text` blocks), `max_tokens`, `stop_sequences` (the one
//! that matched comes back as `stop_sequence`), `temperature`, `top_p`,
//! `top_k`, `stream`, `metadata`, and tool use: `tools` (custom tools,
//! with `input_schema`), `tool_choice` (`auto`, `any`, `tool`, `none`,
//! `disable_parallel_tool_use`), `tool_use` blocks in assistant messages
//! and `tool_result` blocks in user messages; the model's calls come back
//! as `tool_use` blocks with `stop_reason: tool_use` (the same tool
//! calling as chat completions, see `inference::tools`). Refused with a
//! 400 naming them, as everywhere on this node: server tools, images and
//! documents, extended thinking, a last `assistant` message (a prefill the
//! chat template would close instead of continuing), and any field this
//! node does not know. Errors come in Anthropic's shape
//! (`{"type": "error", "error": {...}}`). A stream is Anthropic's event
//! sequence: `message_start`, content blocks (a text block's
//! `content_block_start`, `text_delta`s, `content_block_stop`; a
//! `tool_use` block's start, its input as one `input_json_delta`, stop),
//! `message_delta` with the stop reason and usage, `message_stop`; the
//! prompt's token count, which a seeder learns first, comes in
//! `message_delta`'s usage.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use hypha_engine::{Finish, FinishReason, TokenLogprob};

use crate::api::errors::{ApiError, OpenAiJson};
use crate::api::generate::{event, new_id, reply, submit, Dialect, Events, Started};
use crate::api::openai::{Checked, EdgePrompt, SamplingFields, StopField};
use crate::api::state::AppState;
use crate::inference::convert::{check_message_count, check_tool_fields};
use crate::inference::tools::{self, ToolCall, ToolSet};

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
            // The end user's id; a capacity preference; read by `tools`.
            "metadata" | "service_tier" | "tools" | "tool_choice" => true,
            "mcp_servers" => v.is_null() || v.as_array().is_some_and(Vec::is_empty),
            "thinking" => v.is_null() || kind == Some("disabled"),
            _ => false,
        };
        if neutral {
            continue;
        }
        let what = match field.as_str() {
            "mcp_servers" => "MCP servers are not supported by this node",
            "thinking" => "extended thinking is not supported by this node",
            _ => "this field is not known to this node",
        };
        return Err(ApiError::unsupported(field, what));
    }
    Ok(())
}

/// What one message's content blocks hold: text, calls (an assistant's
/// `tool_use` blocks) and results (a user's `tool_result` blocks, each
/// the id of the call it answers and its text).
#[derive(Default)]
struct Parts {
    text: String,
    calls: Vec<ToolCall>,
    results: Vec<(String, String)>,
}

/// A block field that is taken and changes nothing: `cache_control` is a
/// hint the engine's prefix reuse makes moot.
fn check_block_fields(b: &Block, known: &[&str], at: &str) -> Result<(), ApiError> {
    match b
        .other
        .iter()
        .find(|(f, v)| *f != "cache_control" && !known.contains(&f.as_str()) && !v.is_null())
    {
        Some((field, _)) => Err(ApiError::unsupported(
            at,
            &format!("the {} block field `{field}` is not supported", b.kind),
        )),
        None => Ok(()),
    }
}

/// The text of a `tool_result`'s content: a string or text blocks.
fn result_text(v: Option<&serde_json::Value>, at: &str) -> Result<String, ApiError> {
    use serde_json::Value as V;
    match v {
        None | Some(V::Null) => Ok(String::new()),
        Some(V::String(s)) => Ok(s.clone()),
        Some(V::Array(blocks)) => {
            let mut s = String::new();
            for b in blocks {
                match (
                    b.get("type").and_then(V::as_str),
                    b.get("text").and_then(V::as_str),
                ) {
                    (Some("text"), Some(t)) => s.push_str(t),
                    _ => {
                        return Err(ApiError::unsupported(
                            at,
                            "a tool_result's content may hold only text blocks",
                        ))
                    }
                }
            }
            Ok(s)
        }
        Some(_) => Err(ApiError::invalid("a tool_result's content must be text").param(at)),
    }
}

/// What `content` holds, or why it cannot be served (`at` names it);
/// `role` says which blocks may stand in it.
fn parts_of(content: &Content, at: &str, role: &str) -> Result<Parts, ApiError> {
    use serde_json::Value as V;
    let blocks = match content {
        Content::Text(t) => {
            return Ok(Parts {
                text: t.clone(),
                ..Parts::default()
            })
        }
        Content::Blocks(b) => b,
    };
    let mut parts = Parts::default();
    for b in blocks {
        match (b.kind.as_str(), role) {
            ("text", _) => {
                check_block_fields(b, &[], at)?;
                parts.text.push_str(b.text.as_deref().unwrap_or_default());
            }
            ("tool_use", "assistant") => {
                check_block_fields(b, &["id", "name", "input"], at)?;
                let id = b.other.get("id").and_then(V::as_str);
                let name = b.other.get("name").and_then(V::as_str);
                let input = b.other.get("input").filter(|i| i.is_object());
                let (Some(id), Some(name), Some(input)) = (id, name, input) else {
                    return Err(ApiError::invalid(
                        "a tool_use block needs an id, a name and an input object",
                    )
                    .param(at));
                };
                parts.calls.push(ToolCall {
                    id: id.to_owned(),
                    name: name.to_owned(),
                    arguments: input.to_string(),
                });
            }
            ("tool_result", "user") => {
                check_block_fields(b, &["tool_use_id", "content", "is_error"], at)?;
                let Some(id) = b.other.get("tool_use_id").and_then(V::as_str) else {
                    return Err(
                        ApiError::invalid("a tool_result block needs a tool_use_id").param(at)
                    );
                };
                let mut text = result_text(b.other.get("content"), at)?;
                if b.other.get("is_error") == Some(&V::Bool(true)) {
                    text = format!("Error: {text}");
                }
                parts.results.push((id.to_owned(), text));
            }
            ("tool_use" | "tool_result", _) => {
                return Err(ApiError::invalid(format!(
                    "{} blocks belong in {} messages",
                    b.kind,
                    if b.kind == "tool_use" {
                        "assistant"
                    } else {
                        "user"
                    }
                ))
                .param(at))
            }
            (other, _) => {
                return Err(ApiError::unsupported(
                    at,
                    &format!("content blocks of type {other:?} are not supported"),
                ))
            }
        }
    }
    Ok(parts)
}

/// The text of `content`, which may hold text blocks only (`system`).
fn text_of(content: &Content, at: &str) -> Result<String, ApiError> {
    parts_of(content, at, "system").map(|p| p.text)
}

/// Anthropic's `tools` and `tool_choice` as the tool set chat completions
/// checks: custom tools only; `any` is `required`, `tool` a named one.
fn tool_set(
    tools: Option<&serde_json::Value>,
    choice: Option<&serde_json::Value>,
) -> Result<Option<ToolSet>, ApiError> {
    use serde_json::Value as V;
    let list = match tools {
        None | Some(V::Null) => return Ok(None),
        Some(V::Array(a)) if a.is_empty() => return Ok(None),
        Some(V::Array(a)) => a,
        Some(_) => return Err(ApiError::invalid("`tools` must be an array").param("tools")),
    };
    let mut functions = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let Some(o) = t.as_object() else {
            return Err(ApiError::invalid(format!("tools[{i}] must be an object")).param("tools"));
        };
        match o.get("type").and_then(V::as_str) {
            None | Some("custom") => {}
            Some(other) => {
                return Err(ApiError::unsupported(
                    "tools",
                    &format!("server tools ({other}) are not supported: only custom tools"),
                ))
            }
        }
        const FIELDS: [&str; 5] = [
            "type",
            "name",
            "description",
            "input_schema",
            "cache_control",
        ];
        if let Some(k) = o.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(ApiError::unsupported(
                "tools",
                &format!("the tool field `{k}` is not supported"),
            ));
        }
        let mut f = serde_json::Map::new();
        for (from, to) in [
            ("name", "name"),
            ("description", "description"),
            ("input_schema", "parameters"),
        ] {
            if let Some(v) = o.get(from) {
                f.insert(to.into(), v.clone());
            }
        }
        functions.push(json!({"type": "function", "function": f}));
    }
    let (openai_choice, parallel) = match choice {
        None | Some(V::Null) => (json!("auto"), true),
        Some(c) => {
            let parallel = !c
                .get("disable_parallel_tool_use")
                .and_then(V::as_bool)
                .unwrap_or(false);
            let kind = c.get("type").and_then(V::as_str);
            let openai = match kind {
                Some("auto") => json!("auto"),
                Some("any") => json!("required"),
                Some("none") => json!("none"),
                Some("tool") => {
                    let name = c.get("name").and_then(V::as_str).ok_or_else(|| {
                        ApiError::invalid("tool_choice of type tool needs a name")
                            .param("tool_choice")
                    })?;
                    json!({"type": "function", "function": {"name": name}})
                }
                _ => {
                    return Err(ApiError::invalid(
                        "tool_choice's type must be auto, any, tool or none",
                    )
                    .param("tool_choice"))
                }
            };
            (openai, parallel)
        }
    };
    ToolSet::from_openai(
        Some(&serde_json::Value::Array(functions)),
        Some(&openai_choice),
        Some(&json!(parallel)),
    )
    .map_err(|(field, m)| ApiError::invalid(m).param(field))
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

    /// The edge's checks: the chat to template, the stop strings and the
    /// tools.
    fn check(&self, fields: &SamplingFields) -> Result<Checked, ApiError> {
        check_other(&self.other)?;
        let tools = tool_set(self.other.get("tools"), self.other.get("tool_choice"))?;
        let stops = fields.check()?;
        check_message_count(self.messages.len())
            .map_err(|m| ApiError::invalid(m).param("messages"))?;
        let mut chat = Vec::with_capacity(self.messages.len() + 1);
        let msg = |role: &str, content: String| tools::Message {
            role: role.to_owned(),
            content,
            tool_calls: Vec::new(),
            tool_call_id: None,
        };
        if let Some(system) = &self.system {
            chat.push(msg("system", text_of(system, "system")?));
        }
        for (i, m) in self.messages.iter().enumerate() {
            let at = format!("messages[{i}].content");
            if m.role != "user" && m.role != "assistant" {
                return Err(ApiError::invalid(format!(
                    "unknown message role {:?}: messages are from the user or the assistant (system text goes in `system`)",
                    m.role
                ))
                .param(format!("messages[{i}].role")));
            }
            let parts = parts_of(&m.content, &at, &m.role)?;
            // A user's tool results come first, each a `tool` message,
            // then its text, if any.
            for (id, text) in parts.results {
                chat.push(tools::Message {
                    tool_call_id: Some(id),
                    ..msg("tool", text)
                });
            }
            if m.role == "assistant"
                || !parts.text.is_empty()
                || chat.last().is_none_or(|l| l.role != "tool")
            {
                chat.push(tools::Message {
                    tool_calls: parts.calls,
                    ..msg(&m.role, parts.text)
                });
            }
        }
        for (i, m) in chat.iter().enumerate() {
            check_tool_fields(i, m).map_err(|e| ApiError::invalid(e).param("messages"))?;
        }
        if self.messages.last().is_some_and(|m| m.role == "assistant") {
            return Err(ApiError::unsupported(
                "messages",
                "a last assistant message (a prefill to continue) is not supported by this node yet",
            ));
        }
        let prompt = EdgePrompt::of_chat(chat, tools.clone());
        Ok(Checked {
            prompt,
            stops,
            json_schema: None,
            tools,
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
                blocks: 0,
                text_open: false,
                called: false,
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
    /// Content blocks started so far (a stream's).
    blocks: usize,
    /// The last block started is a text block not yet stopped.
    text_open: bool,
    /// The model called a tool.
    called: bool,
}

/// A call as a `tool_use` block.
fn tool_use(c: &ToolCall) -> serde_json::Value {
    let input: serde_json::Value = serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}));
    json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input})
}

impl Anthropic {
    /// `stop_reason` and `stop_sequence`; `called`: the model called a
    /// tool.
    fn stop(&self, finish: &Finish, called: bool) -> (&'static str, Option<&str>) {
        match (finish.reason, finish.stop_sequence) {
            (FinishReason::Length, _) => ("max_tokens", None),
            (FinishReason::Stop, _) if called => ("tool_use", None),
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

impl Anthropic {
    fn start_text(&mut self, out: &mut Events) {
        let block = json!({
            "type": "content_block_start",
            "index": self.blocks,
            "content_block": {"type": "text", "text": ""},
        });
        out.push_back(event(Some("content_block_start"), &block));
        self.blocks += 1;
        self.text_open = true;
    }

    fn stop_text(&mut self, out: &mut Events) {
        if self.text_open {
            let stop = json!({"type": "content_block_stop", "index": self.blocks - 1});
            out.push_back(event(Some("content_block_stop"), &stop));
            self.text_open = false;
        }
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
        calls: Vec<ToolCall>,
        _logprobs: Vec<TokenLogprob>,
        finish: &Finish,
        credits: Option<u64>,
    ) -> serde_json::Value {
        let (reason, sequence) = self.stop(finish, !calls.is_empty());
        let mut content = Vec::with_capacity(calls.len() + 1);
        if !text.is_empty() || calls.is_empty() {
            content.push(json!({"type": "text", "text": text}));
        }
        content.extend(calls.iter().map(tool_use));
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
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
        self.start_text(out);
    }

    fn text(&mut self, text: &str, _logprobs: &[TokenLogprob], out: &mut Events) {
        if !self.text_open {
            self.start_text(out);
        }
        let delta = json!({
            "type": "content_block_delta",
            "index": self.blocks - 1,
            "delta": {"type": "text_delta", "text": text},
        });
        out.push_back(event(Some("content_block_delta"), &delta));
    }

    fn tool_call(&mut self, _index: usize, call: &ToolCall, out: &mut Events) {
        self.called = true;
        self.stop_text(out);
        let index = self.blocks;
        self.blocks += 1;
        let mut block = tool_use(call);
        block["input"] = json!({});
        let start = json!({"type": "content_block_start", "index": index, "content_block": block});
        out.push_back(event(Some("content_block_start"), &start));
        let delta = json!({
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "input_json_delta", "partial_json": call.arguments},
        });
        out.push_back(event(Some("content_block_delta"), &delta));
        let stop = json!({"type": "content_block_stop", "index": index});
        out.push_back(event(Some("content_block_stop"), &stop));
    }

    fn done(&mut self, finish: &Finish, credits: Option<u64>, out: &mut Events) {
        self.stop_text(out);
        let (reason, sequence) = self.stop(finish, self.called);
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
