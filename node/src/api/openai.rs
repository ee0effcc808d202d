//! OpenAI request and response shapes, and their translation to engine
//! requests.
//!
//! Requests are decoded strictly enough to turn a wrong type into a clear
//! 400. A field hypha does not honour is refused with a 400 naming it
//! (`unsupported_parameter`), never ignored: the deprecated `functions`,
//! logit biases and any field it does not know. Fields that change nothing
//! a node does (`user`, `metadata`) are taken, and so are the neutral
//! values of fields it does not implement (`logit_bias: {}`, ...).
//! `response_format` `json_object` and `json_schema` are served: the
//! output is sampled within the schema's grammar (see
//! `inference::schema`, which refuses what it would not enforce). Chat's
//! `tools`, `tool_choice` and `parallel_tool_calls` are served (see
//! `inference::tools`), and so are calls and tool results in the history.

use serde::{Deserialize, Serialize};

use hypha_engine::SamplingParams;
use hypha_wire::{InferenceRequest, Prompt};

use crate::api::errors::ApiError;
use crate::inference::convert::{
    chat_role, check_message_count, check_stops, check_tool_fields, message_to_wire,
    sampling_to_wire,
};
use crate::inference::schema::{check_schema, ANY_OBJECT};
use crate::inference::tools::{Message, ToolCall, ToolChat, ToolSet};

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by chat and text completions.
#[derive(Debug, Deserialize, Default)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    #[serde(alias = "repeat_penalty")]
    pub repetition_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    /// `true` (chat) or how many alternatives (text completions).
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    pub top_logprobs: Option<u32>,
    /// Every other field of the request, checked by [`check_other_fields`].
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// True for null, an empty array and an empty object.
fn empty_value(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Fields that change nothing a node does: an end user's id and the
/// client's own tags.
const INFORMATIONAL_FIELDS: [&str; 2] = ["user", "metadata"];

/// True when `v` asks nothing of `field` hypha would have to do: the field
/// left at its neutral value.
fn neutral(field: &str, v: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    let empty = empty_value(v);
    match field {
        "tools" | "functions" | "logit_bias" => empty,
        "tool_choice" | "function_call" => empty || v.as_str() == Some("none"),
        // Meaningless without tools.
        "parallel_tool_calls" => v.is_boolean() || v.is_null(),
        "store" => empty || *v == V::Bool(false),
        "modalities" => empty || *v == serde_json::json!(["text"]),
        _ => false,
    }
}

/// Refuses, naming it, the first field of `other` (what a request carries
/// beyond the fields hypha reads) that asks for something hypha does not
/// do; the `handled` ones are read elsewhere.
pub fn check_other_fields(
    other: &serde_json::Map<String, serde_json::Value>,
    handled: &[&str],
) -> Result<(), ApiError> {
    for (field, v) in other {
        if INFORMATIONAL_FIELDS.contains(&field.as_str())
            || handled.contains(&field.as_str())
            || neutral(field, v)
        {
            continue;
        }
        let what = match field.as_str() {
            "tools" | "tool_choice" | "parallel_tool_calls" => {
                "tools are served by /v1/chat/completions, not by this endpoint"
            }
            "functions" | "function_call" => {
                "the deprecated functions API is not served: send tools and tool_choice"
            }
            "logit_bias" => "logit_bias is not supported",
            "store" => "this node stores no completions",
            "modalities" => "only text output is supported",
            _ => "this field is not known to this node",
        };
        return Err(ApiError::unsupported(field, what));
    }
    Ok(())
}

/// A refusal of a response format, naming `field`.
fn bad_format(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(message)
        .param(field.to_owned())
        .code("invalid_response_format")
}

/// The JSON schema a structured-output request's format asks for: `None`
/// for text, [`ANY_OBJECT`] for `json_object`, the checked schema's text
/// for `json_schema`. `format` is the format object (OpenAI's
/// `response_format`, or the Responses API's `text.format`, whose schema
/// fields are not nested under `json_schema`), `field` its name.
pub fn schema_of_format(
    format: Option<&serde_json::Value>,
    field: &str,
    nested: bool,
) -> Result<Option<String>, ApiError> {
    use serde_json::Value as V;
    let Some(f) = format.filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    let Some(obj) = f.as_object() else {
        return Err(bad_format(field, format!("`{field}` must be an object")));
    };
    let kind = obj.get("type").and_then(V::as_str).unwrap_or_default();
    let only = |allowed: &[&str], o: &serde_json::Map<String, V>, at: &str| match o
        .keys()
        .find(|k| !allowed.contains(&k.as_str()))
    {
        Some(k) => Err(bad_format(
            field,
            format!("unsupported field `{k}` in `{at}`"),
        )),
        None => Ok(()),
    };
    const SCHEMA_FIELDS: [&str; 4] = ["name", "description", "schema", "strict"];
    match kind {
        "text" => only(&["type"], obj, field).map(|()| None),
        "json_object" => only(&["type"], obj, field).map(|()| Some(ANY_OBJECT.to_owned())),
        "json_schema" => {
            let (spec, at) = if nested {
                only(&["type", "json_schema"], obj, field)?;
                let at = format!("{field}.json_schema");
                let spec = obj
                    .get("json_schema")
                    .and_then(V::as_object)
                    .ok_or_else(|| bad_format(field, format!("`{at}` must be an object")))?;
                only(&SCHEMA_FIELDS, spec, &at)?;
                (spec, at)
            } else {
                let mut allowed = SCHEMA_FIELDS.to_vec();
                allowed.push("type");
                only(&allowed, obj, field)?;
                (obj, field.to_owned())
            };
            let schema = spec
                .get("schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| {
                    bad_format(field, format!("`{at}.schema` must be a JSON schema object"))
                })?;
            let text = schema.to_string();
            check_schema(&text).map_err(|m| bad_format(field, m).code("unsupported_schema"))?;
            Ok(Some(text))
        }
        other => Err(bad_format(
            field,
            format!(
                "unsupported response format type {other:?}: text, json_object and json_schema are"
            ),
        )),
    }
}

impl SamplingFields {
    pub fn sampling(&self) -> SamplingParams {
        let d = SamplingParams::default();
        SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_p: self.top_p.unwrap_or(d.top_p),
            top_k: self.top_k.unwrap_or(d.top_k),
            min_p: self.min_p.unwrap_or(d.min_p),
            repeat_penalty: self.repetition_penalty.unwrap_or(d.repeat_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            seed: self.seed.map(|s| s as u64),
        }
    }

    pub fn max_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    /// The alternatives per token the request asks logprobs of (`Some(0)`:
    /// the chosen token's alone), or `None`: chat's `logprobs: true` with
    /// `top_logprobs`, or text completions' `logprobs: N`.
    pub fn logprobs(&self) -> Result<Option<u8>, String> {
        use serde_json::Value as V;
        let max = hypha_engine::MAX_TOP_LOGPROBS;
        let top = match self.top_logprobs {
            None => None,
            Some(n) => Some(
                u8::try_from(n)
                    .ok()
                    .filter(|n| *n <= max)
                    .ok_or_else(|| format!("top_logprobs may be at most {max}"))?,
            ),
        };
        match &self.logprobs {
            None | Some(V::Null) | Some(V::Bool(false)) => match top {
                None | Some(0) => Ok(None),
                Some(_) => Err("top_logprobs needs logprobs: true".into()),
            },
            Some(V::Bool(true)) => Ok(Some(top.unwrap_or(0))),
            Some(V::Number(n)) if top.is_none() => n
                .as_u64()
                .and_then(|n| u8::try_from(n).ok())
                .filter(|n| *n <= max)
                .map(Some)
                .ok_or_else(|| format!("logprobs must be a whole number up to {max}")),
            Some(_) => Err("logprobs must be true or false (with top_logprobs), or a count".into()),
        }
    }

    /// Checks what the engine cannot: fields hypha does not implement;
    /// the stop strings.
    pub fn check(&self) -> Result<Vec<String>, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                "unsupported parameter `n`: one completion per request; ask again for more",
            )
            .param("n")
            .code("unsupported_parameter"));
        }
        self.logprobs()
            .map_err(|m| ApiError::invalid(m).param("logprobs"))?;
        if self.max_tokens() == Some(0) {
            return Err(ApiError::invalid("max_tokens must be at least 1").param("max_tokens"));
        }
        match self.sampling().validate() {
            Ok(()) => {}
            Err(hypha_engine::Error::InvalidRequest(m)) => return Err(ApiError::invalid(m)),
            Err(e) => return Err(ApiError::invalid(e.to_string())),
        }
        let stops = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        check_stops(&stops).map_err(|m| ApiError::invalid(m).param("stop"))?;
        Ok(stops)
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Every other field: only empty ones are taken (clients send back an
    /// assistant message's `refusal: null` or `tool_calls: []`).
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<RequestMessage>,
    #[serde(flatten)]
    pub fields: SamplingFields,
}

/// A call in an assistant message of the history, OpenAI's shape.
fn history_call(v: &serde_json::Value) -> Result<ToolCall, String> {
    use serde_json::Value as V;
    let f = v.get("function").and_then(V::as_object);
    let name = f.and_then(|f| f.get("name")).and_then(V::as_str);
    let arguments = f.and_then(|f| f.get("arguments"));
    let (Some(name), Some(arguments)) = (name, arguments) else {
        return Err("a tool call must have function.name and function.arguments".into());
    };
    let arguments = match arguments {
        V::String(s) => s.clone(),
        // Some clients send the object itself.
        V::Object(_) => arguments.to_string(),
        _ => return Err("function.arguments must be a JSON object's text".into()),
    };
    Ok(ToolCall {
        id: v
            .get("id")
            .and_then(V::as_str)
            .unwrap_or_default()
            .to_owned(),
        name: name.to_owned(),
        arguments,
    })
}

impl ChatRequest {
    pub fn messages(&self) -> Result<Vec<Message>, String> {
        check_message_count(self.messages.len())?;
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = chat_role(&m.role)?.to_owned();
                let mut tool_calls = Vec::new();
                let mut tool_call_id = None;
                for (field, v) in &m.other {
                    match field.as_str() {
                        "tool_calls" if !empty_value(v) => {
                            let calls = v.as_array().ok_or("tool_calls must be an array")?;
                            tool_calls = calls
                                .iter()
                                .map(history_call)
                                .collect::<Result<_, _>>()
                                .map_err(|e| format!("messages[{i}].tool_calls: {e}"))?;
                        }
                        "tool_call_id" if !v.is_null() => {
                            tool_call_id = Some(
                                v.as_str()
                                    .ok_or("tool_call_id must be a string")?
                                    .to_owned(),
                            );
                        }
                        // The function's name on a tool message: the
                        // call's id says which call it answers.
                        "name" if m.role == "tool" || v.is_null() => {}
                        _ if empty_value(v) => {}
                        _ => {
                            return Err(format!(
                                "message field `{field}` is not supported by this node"
                            ))
                        }
                    }
                }
                let content = match &m.content {
                    None => String::new(),
                    Some(MessageContent::Text(t)) => t.clone(),
                    Some(MessageContent::Parts(parts)) => {
                        let mut s = String::new();
                        for p in parts {
                            if p.kind != "text" {
                                return Err(format!(
                                    "content part type {:?} is not supported",
                                    p.kind
                                ));
                            }
                            s.push_str(p.text.as_deref().unwrap_or_default());
                        }
                        s
                    }
                };
                let msg = Message {
                    role,
                    content,
                    tool_calls,
                    tool_call_id,
                };
                check_tool_fields(i, &msg)?;
                Ok(msg)
            })
            .collect()
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i32>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptField,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub fields: SamplingFields,
}

/// What a request asks to be tokenized, as the edge checked it.
#[derive(Debug, Clone, PartialEq)]
pub enum EdgePrompt {
    Chat(Vec<hypha_engine::ChatMessage>),
    /// A chat with tools offered or tool calls in its history.
    Tools(ToolChat),
    Text(String),
    /// Token ids of the model this node runs (a `prompt` of integers).
    Tokens(Vec<i32>),
}

impl EdgePrompt {
    /// A chat's prompt: with tools offered or calls in its history, one
    /// for the tool-aware templating; else a plain chat, which keeps
    /// llama.cpp's own template code.
    pub fn of_chat(messages: Vec<Message>, tools: Option<ToolSet>) -> Self {
        let history = messages
            .iter()
            .any(|m| !m.tool_calls.is_empty() || m.tool_call_id.is_some());
        if tools.is_some() || history {
            return Self::Tools(ToolChat { messages, tools });
        }
        Self::Chat(
            messages
                .into_iter()
                .map(|m| hypha_engine::ChatMessage {
                    role: m.role,
                    content: m.content,
                })
                .collect(),
        )
    }

    /// The prompt as a seeder receives it: token ids cannot cross, as they
    /// depend on the model's vocabulary.
    pub fn to_wire(&self) -> Result<Prompt, ApiError> {
        match self {
            Self::Chat(messages) => Ok(Prompt::Chat(
                messages
                    .iter()
                    .map(|m| hypha_wire::ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                        tool_calls: Vec::new(),
                        tool_call_id: None,
                    })
                    .collect(),
            )),
            Self::Tools(chat) => Ok(Prompt::Chat(
                chat.messages.iter().map(message_to_wire).collect(),
            )),
            Self::Text(t) => Ok(Prompt::Text(t.clone())),
            Self::Tokens(_) => Err(ApiError::invalid(
                "token-id prompts depend on the model's vocabulary; send text to a model served by a peer",
            )
            .param("prompt")),
        }
    }
}

/// A request that passed the edge's checks: its prompt, stop strings, the
/// JSON schema of its output, if it asks for one, and the tools it offers.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub prompt: EdgePrompt,
    pub stops: Vec<String>,
    pub json_schema: Option<String>,
    pub tools: Option<ToolSet>,
}

impl ChatRequest {
    /// The edge's checks of a chat request.
    pub fn check(&self) -> Result<Checked, ApiError> {
        let other = &self.fields.other;
        check_other_fields(
            other,
            &[
                "response_format",
                "tools",
                "tool_choice",
                "parallel_tool_calls",
            ],
        )?;
        let json_schema = schema_of_format(other.get("response_format"), "response_format", true)?;
        let tools = ToolSet::from_openai(
            other.get("tools"),
            other.get("tool_choice"),
            other.get("parallel_tool_calls"),
        )
        .map_err(|(field, m)| ApiError::invalid(m).param(field).code("invalid_tools"))?;
        let stops = self.fields.check()?;
        if tools.is_some() {
            if json_schema.is_some() {
                return Err(ApiError::unsupported(
                    "response_format",
                    "a JSON schema cannot be combined with tools",
                ));
            }
            if self.fields.logprobs().ok().flatten().is_some() {
                return Err(ApiError::unsupported(
                    "logprobs",
                    "logprobs cannot be combined with tools",
                ));
            }
        }
        let messages = self
            .messages()
            .map_err(|m| ApiError::invalid(m).param("messages"))?;
        let prompt = EdgePrompt::of_chat(messages, tools.clone());
        Ok(Checked {
            prompt,
            stops,
            json_schema,
            tools,
        })
    }
}

impl CompletionRequest {
    /// The edge's checks of a text completion request.
    pub fn check(&self) -> Result<Checked, ApiError> {
        check_other_fields(&self.fields.other, &["response_format"])?;
        let json_schema = schema_of_format(
            self.fields.other.get("response_format"),
            "response_format",
            true,
        )?;
        let stops = self.fields.check()?;
        if self.echo {
            return Err(ApiError::invalid("echo is not supported").param("echo"));
        }
        let prompt = match &self.prompt {
            PromptField::Text(t) => EdgePrompt::Text(t.clone()),
            PromptField::Texts(v) => match v.as_slice() {
                [t] => EdgePrompt::Text(t.clone()),
                _ => {
                    return Err(
                        ApiError::invalid("exactly one prompt per request is supported")
                            .param("prompt"),
                    )
                }
            },
            PromptField::Tokens(t) => EdgePrompt::Tokens(t.clone()),
        };
        Ok(Checked {
            prompt,
            stops,
            json_schema,
            tools: None,
        })
    }
}

/// The request a consumer sends a seeder for a checked request.
pub fn wire_request(
    request_id: u64,
    model: &str,
    prompt: Prompt,
    stop: Vec<String>,
    json_schema: Option<String>,
    tools: Option<&ToolSet>,
    fields: &SamplingFields,
) -> InferenceRequest {
    InferenceRequest {
        request_id,
        model: model.to_owned(),
        prompt,
        sampling: sampling_to_wire(&fields.sampling()),
        stop,
        max_tokens: fields.max_tokens(),
        json_schema,
        logprobs: fields.logprobs().ok().flatten(),
        // Routing sets this node's own cap.
        max_credits: None,
        tools: tools.map(ToolSet::to_wire),
    }
}

#[derive(Debug, Serialize, Clone, Copy)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// hypha extension: micro-credits charged for a request a peer served,
    /// as recorded in the ledger's receipt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<u64>,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32, credits: Option<u64>) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            credits,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Tokens one request may hold (prompt and completion): this node's
    /// per-slot context for its own model, the smallest its providers
    /// published for a peer's (absent when no record of them is known).
    pub context_length: Option<u32>,
    /// What the model can be asked for: see [`CAPABILITIES`].
    pub capabilities: &'static [&'static str],
    /// Details of a model this node runs itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<ModelMeta>,
    /// Node ids of the peers known to serve the model (this node
    /// included when it runs it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<String>,
    /// How many nodes are known to serve the model.
    pub provider_count: usize,
}

/// What every model on hypha serves: chat (chat completions, the
/// Responses API, Anthropic Messages), text completions, structured
/// output (JSON schemas) and tools (tool calling on all three chat APIs).
pub const CAPABILITIES: [&str; 4] = ["chat", "completion", "structured_output", "tools"];

/// [`CAPABILITIES`] and `embeddings`: a model this node runs with
/// `--embeddings`.
pub const CAPABILITIES_EMBEDDING: [&str; 5] = [
    "chat",
    "completion",
    "structured_output",
    "tools",
    "embeddings",
];

#[derive(Debug, Serialize)]
pub struct ModelMeta {
    pub architecture: String,
    pub context_length: u32,
    pub context_length_train: u32,
    pub n_params: u64,
    pub size_bytes: u64,
    pub device: String,
    pub slots: u32,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}
