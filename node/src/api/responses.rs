//! `/v1/responses`: OpenAI's Responses API, stateless, over the same
//! generation as chat completions, here or on a peer.
//!
//! Served: `input` (a string, or message items of text: `input_text`
//! parts, and `output_text` ones of earlier assistant turns),
//! `instructions`, `max_output_tokens`, `temperature`, `top_p`, `stream`,
//! `text.format` (text, `json_object`, `json_schema`: structured output),
//! `metadata`, `user`, function tools (`tools` of type `function`,
//! `tool_choice`, `parallel_tool_calls`, `function_call` and
//! `function_call_output` input items: the same tool calling as chat
//! completions, see `inference::tools`) and the neutral values of what it
//! does not do. The node keeps no responses: `store` is taken as false
//! (and `store: true` refused), and `previous_response_id` is refused; so
//! are other kinds of tools, reasoning, images and files, and any field
//! this node does not know, each named. A stream is the event sequence
//! the OpenAI SDKs and Codex parse: `response.created`,
//! `response.in_progress`, the message item and its text part added, the
//! `response.output_text.delta`s, the text, part and item done; each call
//! a `function_call` item (added, its arguments as one
//! `response.function_call_arguments.delta`, arguments done, item done);
//! then `response.completed` (or `response.incomplete` when the token
//! limit cut it short, `response.failed` when it failed), with usage.
//! With tools the message item is added only once text comes.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use hypha_engine::{ChatMessage, Finish, FinishReason, TokenLogprob};

use crate::api::errors::{ApiError, OpenAiJson};
use crate::api::generate::{event, new_id, reply, submit, unix_now, Dialect, Events, Started};
use crate::api::openai::{schema_of_format, Checked, EdgePrompt, SamplingFields, Usage};
use crate::api::state::AppState;
use crate::inference::convert::{chat_role, check_message_count, check_tool_fields};
use crate::inference::tools::{self, ToolCall, ToolSet};

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Items(Vec<Item>),
}

/// An input item: only messages are served.
#[derive(Debug, Deserialize)]
pub struct Item {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub content: Option<ItemContent>,
    /// Every other field of the item.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ItemContent {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    pub model: String,
    pub input: Input,
    #[serde(default)]
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    #[serde(default)]
    pub stream: bool,
    /// Every other field, checked by [`check_other`].
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Fields that change nothing this node does: labels and hints.
const INFORMATIONAL: [&str; 6] = [
    "metadata",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
    "stream_options",
];

/// Refuses the first field beyond those read that asks for something this
/// node does not do.
fn check_other(other: &serde_json::Map<String, serde_json::Value>) -> Result<(), ApiError> {
    use serde_json::Value as V;
    for (field, v) in other {
        let empty = match v {
            V::Null => true,
            V::Array(a) => a.is_empty(),
            V::Object(o) => o.is_empty(),
            _ => false,
        };
        let neutral = INFORMATIONAL.contains(&field.as_str())
            || match field.as_str() {
                "include" => empty,
                // Read by `tool_set`.
                "tools" | "tool_choice" | "parallel_tool_calls" => true,
                "max_tool_calls" => v.is_null(),
                "store" | "background" => empty || *v == V::Bool(false),
                "truncation" => empty || v.as_str() == Some("disabled"),
                "top_logprobs" => empty || v.as_u64() == Some(0),
                // Read by `check`.
                "text" => true,
                "reasoning" => empty || v.as_object().is_some_and(|o| o.values().all(V::is_null)),
                _ => false,
            };
        if neutral {
            continue;
        }
        let what = match field.as_str() {
            "max_tool_calls" => "a cap on tool calls is not supported by this node",
            "previous_response_id" | "conversation" => {
                "this node keeps no responses: send the whole conversation as input"
            }
            "store" | "background" => "this node keeps no responses",
            "reasoning" => "reasoning settings are not supported by this node",
            "include" => "this node has no extra output to include",
            "top_logprobs" => "logprobs are not supported by this node yet",
            "truncation" => "only `truncation: disabled` is supported",
            _ => "this field is not known to this node",
        };
        return Err(ApiError::unsupported(field, what));
    }
    Ok(())
}

/// The JSON schema `text` (the output's settings) asks for: its `format`
/// (text, `json_object`, or `json_schema` with the schema beside `type`);
/// any other setting of it is refused.
fn schema_of_text(v: Option<&serde_json::Value>) -> Result<Option<String>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let Some(o) = v.as_object() else {
        return Err(ApiError::unsupported("text", "it must be an object"));
    };
    if let Some((k, _)) = o.iter().find(|(k, x)| *k != "format" && !x.is_null()) {
        return Err(ApiError::unsupported(
            "text",
            &format!("the setting `{k}` is not supported by this node"),
        ));
    }
    schema_of_format(o.get("format"), "text.format", false)
}

/// The text of a message item's content.
fn text_of(content: &Option<ItemContent>, at: &str) -> Result<String, ApiError> {
    let parts = match content {
        None => return Ok(String::new()),
        Some(ItemContent::Text(t)) => return Ok(t.clone()),
        Some(ItemContent::Parts(p)) => p,
    };
    let mut s = String::new();
    for p in parts {
        if p.kind != "input_text" && p.kind != "output_text" {
            return Err(ApiError::unsupported(
                at,
                &format!("content parts of type {:?} are not supported", p.kind),
            ));
        }
        // Output text handed back carries its annotations and logprobs.
        let extra = p.other.iter().find(|(f, v)| {
            let known = *f == "annotations" || *f == "logprobs";
            !(v.is_null() || known && v.as_array().is_some_and(Vec::is_empty))
        });
        if let Some((field, _)) = extra {
            return Err(ApiError::unsupported(
                at,
                &format!("the content part field `{field}` is not supported"),
            ));
        }
        s.push_str(p.text.as_deref().unwrap_or_default());
    }
    Ok(s)
}

/// The Responses API's function tools as the tool set chat completions
/// checks (the same fields, not nested under `function`).
fn tool_set(
    other: &serde_json::Map<String, serde_json::Value>,
) -> Result<Option<ToolSet>, ApiError> {
    use serde_json::Value as V;
    let list = match other.get("tools") {
        None | Some(V::Null) => return Ok(None),
        Some(V::Array(a)) => a,
        Some(_) => return Err(ApiError::invalid("`tools` must be an array").param("tools")),
    };
    let mut functions = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let o = t.as_object().ok_or_else(|| {
            ApiError::invalid(format!("tools[{i}] must be an object")).param("tools")
        })?;
        match o.get("type").and_then(V::as_str) {
            Some("function") => {}
            other => {
                return Err(ApiError::unsupported(
                    "tools",
                    &format!(
                        "tools of type {} are not supported: only function tools",
                        other.map_or("(none)".to_owned(), |o| format!("{o:?}"))
                    ),
                ))
            }
        }
        let mut f = o.clone();
        f.remove("type");
        functions.push(json!({"type": "function", "function": f}));
    }
    let choice = match other.get("tool_choice") {
        // `{"type": "function", "name": ..}`, flat here.
        Some(V::Object(c)) if c.get("type").and_then(V::as_str) == Some("function") => {
            Some(json!({"type": "function", "function": {"name": c.get("name")}}))
        }
        Some(V::Object(_)) => {
            return Err(ApiError::unsupported(
                "tool_choice",
                "only auto, none, required or a function may be chosen",
            ))
        }
        c => c.cloned(),
    };
    ToolSet::from_openai(
        Some(&V::Array(functions)),
        choice.as_ref(),
        other.get("parallel_tool_calls"),
    )
    .map_err(|(field, m)| ApiError::invalid(m).param(field))
}

impl ResponsesRequest {
    fn fields(&self) -> SamplingFields {
        SamplingFields {
            temperature: self.temperature,
            top_p: self.top_p,
            max_tokens: self.max_output_tokens,
            stream: self.stream,
            ..SamplingFields::default()
        }
    }

    fn check(&self, fields: &SamplingFields) -> Result<Checked, ApiError> {
        check_other(&self.other)?;
        let json_schema = schema_of_text(self.other.get("text"))?;
        let tools = tool_set(&self.other)?;
        if tools.is_some() && json_schema.is_some() {
            return Err(ApiError::unsupported(
                "text",
                "a JSON schema cannot be combined with tools",
            ));
        }
        let stops = fields.check()?;
        let plain = |role: &str, content: String| tools::Message {
            role: role.to_owned(),
            content,
            tool_calls: Vec::new(),
            tool_call_id: None,
        };
        let mut chat: Vec<tools::Message> = Vec::new();
        if let Some(i) = &self.instructions {
            chat.push(plain("system", i.clone()));
        }
        match &self.input {
            Input::Text(t) => chat.push(plain("user", t.clone())),
            Input::Items(items) => {
                check_message_count(items.len())
                    .map_err(|m| ApiError::invalid(m).param("input"))?;
                for (i, item) in items.iter().enumerate() {
                    match item_of(item, i)? {
                        // Calls join the assistant turn they follow.
                        Turn::Call(call) => match chat.last_mut() {
                            Some(last) if last.role == "assistant" => last.tool_calls.push(call),
                            _ => chat.push(tools::Message {
                                tool_calls: vec![call],
                                ..plain("assistant", String::new())
                            }),
                        },
                        Turn::Output(id, output) => chat.push(tools::Message {
                            tool_call_id: Some(id),
                            ..plain("tool", output)
                        }),
                        Turn::Message(m) => chat.push(m),
                    }
                }
            }
        }
        for (i, m) in chat.iter().enumerate() {
            check_tool_fields(i, m).map_err(|e| ApiError::invalid(e).param("input"))?;
        }
        let prompt = EdgePrompt::of_chat(chat, tools.clone());
        Ok(Checked {
            prompt,
            stops,
            json_schema,
            tools,
        })
    }
}

/// What an input item stands for.
enum Turn {
    Message(tools::Message),
    /// A call the model made (a `function_call` item).
    Call(ToolCall),
    /// A call's output: its id and text.
    Output(String, String),
}

/// The turn an input item stands for.
fn item_of(item: &Item, i: usize) -> Result<Turn, ApiError> {
    use serde_json::Value as V;
    let at = format!("input[{i}]");
    let field = |name: &str| item.other.get(name).and_then(V::as_str);
    let only = |known: &[&str]| match item
        .other
        .iter()
        .find(|(f, v)| !known.contains(&f.as_str()) && !v.is_null())
    {
        Some((f, _)) => Err(ApiError::unsupported(
            &at,
            &format!("the item field `{f}` is not supported"),
        )),
        None => Ok(()),
    };
    match item.kind.as_deref() {
        Some("function_call") => {
            only(&["call_id", "name", "arguments", "id", "status"])?;
            let (Some(id), Some(name), Some(arguments)) =
                (field("call_id"), field("name"), field("arguments"))
            else {
                return Err(ApiError::invalid(
                    "a function_call item needs call_id, name and arguments",
                )
                .param(at));
            };
            return Ok(Turn::Call(ToolCall {
                id: id.to_owned(),
                name: name.to_owned(),
                arguments: arguments.to_owned(),
            }));
        }
        Some("function_call_output") => {
            only(&["call_id", "output", "id", "status"])?;
            let (Some(id), Some(output)) = (field("call_id"), field("output")) else {
                return Err(ApiError::invalid(
                    "a function_call_output item needs call_id and a text output",
                )
                .param(at));
            };
            return Ok(Turn::Output(id.to_owned(), output.to_owned()));
        }
        _ => {}
    }
    message_of(item, i).map(|m| {
        Turn::Message(tools::Message {
            role: m.role,
            content: m.content,
            tool_calls: Vec::new(),
            tool_call_id: None,
        })
    })
}

/// The chat message an input item stands for.
fn message_of(item: &Item, i: usize) -> Result<ChatMessage, ApiError> {
    let at = format!("input[{i}]");
    match item.kind.as_deref() {
        None | Some("message") => {}
        Some(kind @ ("custom_tool_call" | "custom_tool_call_output")) => {
            return Err(ApiError::unsupported(
                &at,
                &format!("{kind} items: only function tools are supported"),
            ))
        }
        Some(kind) => {
            return Err(ApiError::unsupported(
                &at,
                &format!("input items of type {kind:?} are not supported"),
            ))
        }
    }
    let role = item
        .role
        .as_deref()
        .ok_or_else(|| ApiError::invalid("a message item needs a role").param(at.clone()))?;
    let role = chat_role(role)
        .ok()
        .filter(|r| *r != "tool")
        .ok_or_else(|| {
            ApiError::invalid(format!("unknown message role {role:?}")).param(at.clone())
        })?;
    // An assistant item handed back carries its id and status.
    let extra = item
        .other
        .iter()
        .find(|(f, v)| *f != "id" && *f != "status" && !v.is_null());
    if let Some((field, _)) = extra {
        return Err(ApiError::unsupported(
            &at,
            &format!("the message field `{field}` is not supported"),
        ));
    }
    Ok(ChatMessage {
        role: role.to_owned(),
        content: text_of(&item.content, &format!("{at}.content"))?,
    })
}

pub(crate) async fn responses(
    State(st): State<Arc<AppState>>,
    body: Result<OpenAiJson<ResponsesRequest>, ApiError>,
) -> Response {
    let received = Instant::now();
    let prepared = async {
        let OpenAiJson(req) = body?;
        let fields = req.fields();
        let checked = req.check(&fields)?;
        let route = st.route(&req.model)?;
        let job = submit(&st, route, &req.model, checked, &fields).await?;
        let mut dialect = Responses {
            id: new_id("resp", '_'),
            item_id: new_id("msg", '_'),
            created: unix_now(),
            sequence: 0,
            text: String::new(),
            tools: req
                .other
                .get("tools")
                .is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty())),
            message_index: None,
            calls: Vec::new(),
            next_index: 0,
            settings: json!({
                "instructions": req.instructions,
                "max_output_tokens": req.max_output_tokens,
                "model": req.model,
                "temperature": fields.sampling().temperature,
                "top_p": fields.sampling().top_p,
                "text": {"format": req.other.get("text")
                    .and_then(|t| t.get("format"))
                    .filter(|f| !f.is_null())
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "text"}))},
            }),
        };
        if dialect.tools {
            let o = &req.other;
            dialect.settings["tools"] = o.get("tools").cloned().unwrap_or_else(|| json!([]));
            dialect.settings["tool_choice"] = o
                .get("tool_choice")
                .filter(|c| !c.is_null())
                .cloned()
                .unwrap_or_else(|| json!("auto"));
            dialect.settings["parallel_tool_calls"] = json!(o
                .get("parallel_tool_calls")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(true));
        }
        Ok(Started {
            dialect,
            job,
            stream: req.stream,
            received,
        })
    }
    .await;
    reply(&st, prepared).await
}

/// The Responses API's writing of a generation.
struct Responses {
    id: String,
    /// The id of the output message.
    item_id: String,
    created: u64,
    /// The next event's `sequence_number`.
    sequence: u64,
    /// A stream's text so far (its closing events repeat it whole).
    text: String,
    /// The request offered tools: a stream adds its message item only
    /// once text comes (an answer may be calls alone).
    tools: bool,
    /// The output index of a stream's message item, once added.
    message_index: Option<usize>,
    /// A stream's `function_call` items, with their output indexes.
    calls: Vec<(usize, serde_json::Value)>,
    /// The next output index of a stream.
    next_index: usize,
    /// Echoed request settings: instructions, limits, model, sampling.
    settings: serde_json::Value,
}

/// How a generation ended, as a response's status.
enum Status {
    InProgress,
    Done(Finish, Option<u64>),
    Failed(String),
}

/// A call as a `function_call` output item.
fn call_item(c: &ToolCall, status: &str) -> serde_json::Value {
    json!({
        "type": "function_call",
        "id": format!("fc_{}", c.id.trim_start_matches("call_")),
        "call_id": c.id,
        "name": c.name,
        "arguments": if status == "completed" { c.arguments.as_str() } else { "" },
        "status": status,
    })
}

impl Responses {
    fn part(text: &str) -> serde_json::Value {
        json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    }

    fn item(&self, status: &str, content: Vec<serde_json::Value>) -> serde_json::Value {
        json!({
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": content,
        })
    }

    /// The response object in `status`: its output the message (at
    /// `message`, an output index, with `text`) and the `calls` (each at
    /// its index).
    fn response(
        &self,
        text: &str,
        message: Option<usize>,
        calls: &[(usize, serde_json::Value)],
        status: &Status,
    ) -> serde_json::Value {
        let (state, output, usage, error, incomplete) = match status {
            Status::InProgress => ("in_progress", vec![], None, None, None),
            Status::Done(finish, credits) => {
                let cut = finish.reason == FinishReason::Length;
                let state = if cut { "incomplete" } else { "completed" };
                let mut usage = json!({
                    "input_tokens": finish.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": finish.completion_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": Usage::new(finish.prompt_tokens, finish.completion_tokens, None).total_tokens,
                });
                if let Some(c) = credits {
                    usage["credits"] = json!(c);
                }
                let incomplete = cut.then(|| json!({"reason": "max_output_tokens"}));
                let mut items: Vec<(usize, serde_json::Value)> = calls.to_vec();
                if let Some(i) = message {
                    items.push((i, self.item(state, vec![Self::part(text)])));
                }
                items.sort_by_key(|(i, _)| *i);
                let output = items.into_iter().map(|(_, item)| item).collect();
                (state, output, Some(usage), None, incomplete)
            }
            Status::Failed(m) => (
                "failed",
                vec![],
                None,
                Some(json!({"code": "server_error", "message": m})),
                None,
            ),
        };
        let mut r = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": state,
            "error": error,
            "incomplete_details": incomplete,
            "output": output,
            "parallel_tool_calls": false,
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "store": false,
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "truncation": "disabled",
            "usage": usage,
            "metadata": {},
        });
        if let (Some(r), Some(s)) = (r.as_object_mut(), self.settings.as_object()) {
            r.extend(s.clone());
        }
        r
    }

    /// An event of `kind` with `fields`, numbered.
    fn push(&mut self, kind: &str, mut fields: serde_json::Value, out: &mut Events) {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        out.push_back(event(Some(kind), &fields));
    }

    /// Adds a stream's message item and its text part.
    fn open_message(&mut self, out: &mut Events) -> usize {
        if let Some(i) = self.message_index {
            return i;
        }
        let index = self.next_index;
        self.next_index += 1;
        self.message_index = Some(index);
        let item = self.item("in_progress", vec![]);
        self.push(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
            out,
        );
        let mut added = json!({"item_id": self.item_id, "output_index": index, "content_index": 0});
        added["part"] = Self::part("");
        self.push("response.content_part.added", added, out);
        index
    }
}

impl Dialect for Responses {
    const METRIC: &'static str = "responses";

    fn body(
        &self,
        text: String,
        calls: Vec<ToolCall>,
        _logprobs: Vec<TokenLogprob>,
        finish: &Finish,
        credits: Option<u64>,
    ) -> serde_json::Value {
        let message = (!text.is_empty() || calls.is_empty()).then_some(0);
        let first = usize::from(message.is_some());
        let calls: Vec<(usize, serde_json::Value)> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| (first + i, call_item(c, "completed")))
            .collect();
        self.response(
            &text,
            message,
            &calls,
            &Status::Done(finish.clone(), credits),
        )
    }

    fn opening(&mut self, out: &mut Events) {
        let r = self.response("", None, &[], &Status::InProgress);
        self.push("response.created", json!({"response": r}), out);
        self.push("response.in_progress", json!({"response": r}), out);
        if !self.tools {
            self.open_message(out);
        }
    }

    fn text(&mut self, text: &str, _logprobs: &[TokenLogprob], out: &mut Events) {
        let index = self.open_message(out);
        self.text.push_str(text);
        let delta = json!({
            "item_id": self.item_id,
            "output_index": index,
            "content_index": 0,
            "delta": text,
            "logprobs": [],
        });
        self.push("response.output_text.delta", delta, out);
    }

    fn tool_call(&mut self, _index: usize, call: &ToolCall, out: &mut Events) {
        let index = self.next_index;
        self.next_index += 1;
        let added = call_item(call, "in_progress");
        let item_id = added["id"].clone();
        self.push(
            "response.output_item.added",
            json!({"output_index": index, "item": added}),
            out,
        );
        let at = json!({"item_id": item_id, "output_index": index});
        let mut delta = at.clone();
        delta["delta"] = json!(call.arguments);
        self.push("response.function_call_arguments.delta", delta, out);
        let mut done = at;
        done["arguments"] = json!(call.arguments);
        self.push("response.function_call_arguments.done", done, out);
        let item = call_item(call, "completed");
        self.push(
            "response.output_item.done",
            json!({"output_index": index, "item": item.clone()}),
            out,
        );
        self.calls.push((index, item));
    }

    fn done(&mut self, finish: &Finish, credits: Option<u64>, out: &mut Events) {
        let status = Status::Done(finish.clone(), credits);
        if let Some(index) = self.message_index {
            let at = json!({"item_id": self.item_id, "output_index": index, "content_index": 0});
            let mut text_done = at.clone();
            text_done["text"] = json!(self.text);
            text_done["logprobs"] = json!([]);
            self.push("response.output_text.done", text_done, out);
            let mut part_done = at;
            part_done["part"] = Self::part(&self.text);
            self.push("response.content_part.done", part_done, out);
            let state = if finish.reason == FinishReason::Length {
                "incomplete"
            } else {
                "completed"
            };
            let item = self.item(state, vec![Self::part(&self.text)]);
            self.push(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
                out,
            );
        }
        let r = self.response(&self.text, self.message_index, &self.calls, &status);
        let last = if finish.reason == FinishReason::Length {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.push(last, json!({"response": r}), out);
    }

    fn failed(&mut self, message: &str, out: &mut Events) {
        let r = self.response(
            &self.text,
            self.message_index,
            &self.calls,
            &Status::Failed(message.to_owned()),
        );
        self.push("response.failed", json!({"response": r}), out);
    }
}
