//! Between the edges and the engine: the one request validator the HTTP
//! edge and a seeder share (stop strings, message count, roles, and the
//! JSON schema of structured output, in `schema`), a peer's
//! request checked and turned into what is to be tokenized (see
//! [`crate::inference::prep`]), engine errors as replies, sampling settings
//! both ways.

use hypha_engine::{ChatMessage, GenerateRequest, SamplingParams};
use hypha_wire::{ErrorReply, InferenceRequest, Refusal};

use crate::inference::prep::Input;
use crate::inference::schema::grammar_for;
use crate::inference::tools::{self, Message, ToolCall, ToolChat, ToolFormat, ToolSet};
use crate::inference::RequestId;

/// At most this many stop strings, as OpenAI allows.
pub const MAX_STOP_STRINGS: usize = 4;
/// A stop string longer than this is refused: matching holds back up to its
/// length of text per stream.
pub const MAX_STOP_BYTES: usize = 256;
/// At most this many messages in one chat request.
pub const MAX_MESSAGES: usize = 1024;

/// The one check of a request's stop strings, at the HTTP edge and at a
/// seeder alike.
pub fn check_stops(stops: &[String]) -> Result<(), String> {
    if stops.len() > MAX_STOP_STRINGS {
        return Err(format!(
            "at most {MAX_STOP_STRINGS} stop strings are allowed"
        ));
    }
    if stops.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(format!(
            "a stop string may be at most {MAX_STOP_BYTES} bytes"
        ));
    }
    Ok(())
}

/// The one check of a chat request's message count.
pub fn check_message_count(n: usize) -> Result<(), String> {
    if n == 0 {
        return Err("messages must not be empty".into());
    }
    if n > MAX_MESSAGES {
        return Err(format!("at most {MAX_MESSAGES} messages are allowed"));
    }
    Ok(())
}

/// The role a chat message is templated with: the roles chat templates
/// know, with `developer` (OpenAI's newer name) as `system`.
pub fn chat_role(role: &str) -> Result<&'static str, String> {
    Ok(match role {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        "tool" => "tool",
        other => return Err(format!("unknown message role {other:?}")),
    })
}

/// The one check of a chat history's tool fields: calls only from the
/// assistant, each with an id, a tool's name and a JSON object of
/// arguments, within bounds; a `tool_call_id` only on a tool message.
pub fn check_tool_fields(i: usize, m: &Message) -> Result<(), String> {
    if !m.tool_calls.is_empty() && m.role != "assistant" {
        return Err(format!(
            "messages[{i}]: only assistant messages carry tool_calls"
        ));
    }
    if m.tool_calls.len() > tools::MAX_CALLS * 4 {
        return Err(format!("messages[{i}]: too many tool_calls"));
    }
    for (j, c) in m.tool_calls.iter().enumerate() {
        let at = format!("messages[{i}].tool_calls[{j}]");
        if c.id.len() > tools::MAX_CALL_ID_BYTES || c.name.len() > tools::MAX_TOOL_NAME_BYTES {
            return Err(format!("{at}: id or name too long"));
        }
        if c.arguments.len() > tools::MAX_ARGUMENTS_BYTES {
            return Err(format!(
                "{at}: arguments over {} bytes",
                tools::MAX_ARGUMENTS_BYTES
            ));
        }
        match serde_json::from_str::<serde_json::Value>(&c.arguments) {
            Ok(v) if v.is_object() => {}
            _ => {
                return Err(format!(
                    "{at}.function.arguments must be a JSON object's text"
                ))
            }
        }
    }
    match &m.tool_call_id {
        Some(_) if m.role != "tool" => Err(format!(
            "messages[{i}]: only tool messages carry tool_call_id"
        )),
        Some(id) if id.len() > tools::MAX_CALL_ID_BYTES => {
            Err(format!("messages[{i}]: tool_call_id too long"))
        }
        _ => Ok(()),
    }
}

/// A chat message from the wire, checked.
fn message_from_wire(i: usize, m: &hypha_wire::ChatMessage) -> Result<Message, String> {
    let msg = Message {
        role: chat_role(&m.role)?.to_owned(),
        content: m.content.clone(),
        tool_calls: m
            .tool_calls
            .iter()
            .map(|c| ToolCall {
                id: c.id.clone(),
                name: c.name.clone(),
                arguments: c.arguments.clone(),
            })
            .collect(),
        tool_call_id: m.tool_call_id.clone(),
    };
    check_tool_fields(i, &msg)?;
    Ok(msg)
}

/// The wire form of a chat message.
pub fn message_to_wire(m: &Message) -> hypha_wire::ChatMessage {
    hypha_wire::ChatMessage {
        role: m.role.clone(),
        content: m.content.clone(),
        tool_calls: m
            .tool_calls
            .iter()
            .map(|c| hypha_wire::ToolCall {
                id: c.id.clone(),
                name: c.name.clone(),
                arguments: c.arguments.clone(),
            })
            .collect(),
        tool_call_id: m.tool_call_id.clone(),
    }
}

/// What a seeder makes of a peer's request: what is to be tokenized, the
/// request to submit once its prompt is filled in, and how its model
/// writes tool calls when the request offers tools.
pub struct Prepared {
    pub input: Input,
    pub request: GenerateRequest,
    pub tool_format: Option<ToolFormat>,
}

/// Checks a peer's request for a seeder serving `models`, whose model
/// writes tool calls in `format`.
pub fn prepare(
    req: &InferenceRequest,
    models: &[String],
    format: ToolFormat,
) -> Result<Prepared, ErrorReply> {
    let id = req.request_id;
    let bad = |refusal: Refusal, message: String| ErrorReply {
        request_id: id,
        refusal,
        message,
    };
    if !models.contains(&req.model) {
        return Err(bad(
            Refusal::NotFound,
            format!(
                "the model {:?} is not served here; this seeder serves {models:?}",
                req.model
            ),
        ));
    }
    check_stops(&req.stop).map_err(|m| bad(Refusal::BadRequest, m))?;
    let sampling = sampling_from_wire(&req.sampling);
    sampling
        .validate()
        .map_err(|e| bad(Refusal::BadRequest, e.to_string()))?;
    if req.max_tokens == Some(0) {
        return Err(bad(
            Refusal::BadRequest,
            "max_tokens must be at least 1".into(),
        ));
    }
    let tools = match &req.tools {
        None => None,
        Some(t) => Some(ToolSet::from_wire(t).map_err(|m| bad(Refusal::BadRequest, m))?),
    };
    if tools.is_some() && (req.json_schema.is_some() || req.logprobs.is_some()) {
        return Err(bad(
            Refusal::BadRequest,
            "tools cannot be combined with a JSON schema or logprobs".into(),
        ));
    }
    let mut grammar = match &req.json_schema {
        None => None,
        Some(s) => Some(hypha_engine::Grammar::whole(
            grammar_for(s).map_err(|m| bad(Refusal::BadRequest, m))?,
        )),
    };
    let input = match &req.prompt {
        hypha_wire::Prompt::Chat(messages) => {
            check_message_count(messages.len()).map_err(|m| bad(Refusal::BadRequest, m))?;
            let messages = messages
                .iter()
                .enumerate()
                .map(|(i, m)| message_from_wire(i, m))
                .collect::<Result<Vec<Message>, String>>()
                .map_err(|m| bad(Refusal::BadRequest, m))?;
            let history = messages
                .iter()
                .any(|m| !m.tool_calls.is_empty() || m.tool_call_id.is_some());
            if let Some(set) = &tools {
                grammar =
                    Some(tools::grammar(set, format).map_err(|m| bad(Refusal::BadRequest, m))?);
            }
            if tools.is_some() || history {
                Input::Tools(
                    ToolChat {
                        messages,
                        tools: tools.clone(),
                    },
                    format,
                )
            } else {
                Input::Chat(
                    messages
                        .into_iter()
                        .map(|m| ChatMessage {
                            role: m.role,
                            content: m.content,
                        })
                        .collect(),
                )
            }
        }
        hypha_wire::Prompt::Text(t) => {
            if tools.is_some() {
                return Err(bad(Refusal::BadRequest, "tools need a chat prompt".into()));
            }
            Input::Text(t.clone())
        }
    };
    Ok(Prepared {
        input,
        request: GenerateRequest {
            prompt: Vec::new(),
            sampling,
            max_tokens: req.max_tokens,
            stop: req.stop.clone(),
            grammar,
            logprobs: req.logprobs,
            priority: 0,
            preemptible: false,
        },
        tool_format: tools.is_some().then_some(format),
    })
}

/// The error a consumer gets for an engine error.
pub(crate) fn reply_for(request_id: RequestId, e: &hypha_engine::Error) -> ErrorReply {
    use hypha_engine::Error as E;
    let refusal = match e {
        E::ContextExceeded { .. }
        | E::PromptBytes { .. }
        | E::InvalidRequest(_)
        | E::PromptTooLarge
        | E::Template(_) => Refusal::BadRequest,
        E::QueueFull { .. } | E::Preempted => Refusal::Busy,
        _ => Refusal::Internal,
    };
    ErrorReply {
        request_id: request_id.0,
        refusal,
        message: e.to_string(),
    }
}

/// The HTTP status a refusal stands for: the one map from peers' answers
/// to HTTP, used by the API's errors and the peer request metrics.
pub const fn http_status(r: Refusal) -> u16 {
    match r {
        Refusal::BadRequest => 400,
        Refusal::Unpaid | Refusal::OverBudget => 402,
        Refusal::Forbidden => 403,
        Refusal::NotFound => 404,
        Refusal::Duplicate => 409,
        Refusal::TooMany => 429,
        Refusal::Unreachable => 502,
        Refusal::Busy => 503,
        _ => 500,
    }
}

/// Engine sampling settings from their wire form.
pub fn sampling_from_wire(s: &hypha_wire::Sampling) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        seed: s.seed,
    }
}

/// The wire form of engine sampling settings.
pub fn sampling_to_wire(s: &SamplingParams) -> hypha_wire::Sampling {
    hypha_wire::Sampling {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        seed: s.seed,
    }
}

/// A token's logprobs as a seeder sends them.
pub fn logprob_to_wire(lp: hypha_engine::TokenLogprob) -> hypha_wire::TokenLogprob {
    hypha_wire::TokenLogprob {
        bytes: lp.bytes,
        logprob: lp.logprob,
        top: lp
            .top
            .into_iter()
            .map(|(bytes, logprob)| hypha_wire::TopLogprob { bytes, logprob })
            .collect(),
    }
}
