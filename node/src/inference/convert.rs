//! Between the wire and the engine: a peer's request checked and turned
//! into tokens, engine errors as replies, sampling settings both ways.

use hypha_engine::{ChatMessage, GenerateRequest, SamplingParams};
use hypha_wire::{ErrorReply, InferenceRequest};

use crate::api::openai::{MAX_MESSAGES, MAX_STOP_BYTES, MAX_STOP_STRINGS};
use crate::inference::serve::SeederState;

/// Checks a peer's request and turns it into tokens for the engine.
pub(crate) fn prepare(
    req: &InferenceRequest,
    state: &SeederState,
) -> Result<GenerateRequest, ErrorReply> {
    let id = req.request_id;
    let bad = |code: u16, message: String| ErrorReply {
        request_id: id,
        code,
        message,
    };
    if !state.models.contains(&req.model) {
        return Err(bad(
            404,
            format!(
                "the model {:?} is not served here; this seeder serves {:?}",
                req.model, state.models
            ),
        ));
    }
    if req.stop.len() > MAX_STOP_STRINGS || req.stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(bad(
            400,
            format!("at most {MAX_STOP_STRINGS} stop strings of {MAX_STOP_BYTES} bytes"),
        ));
    }
    let engine = &state.engine;
    let tokens = match &req.prompt {
        hypha_wire::Prompt::Chat(messages) => {
            if messages.is_empty() || messages.len() > MAX_MESSAGES {
                return Err(bad(400, format!("between 1 and {MAX_MESSAGES} messages")));
            }
            if let Some(m) = messages
                .iter()
                .find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool"))
            {
                return Err(bad(400, format!("unknown message role {:?}", m.role)));
            }
            let messages: Vec<ChatMessage> = messages
                .iter()
                .map(|m| ChatMessage {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect();
            engine
                .apply_chat_template(&messages)
                .and_then(|p| engine.tokenize(&p))
        }
        hypha_wire::Prompt::Text(t) => engine.tokenize(t),
    }
    .map_err(|e| reply_for(id, &e))?;
    Ok(GenerateRequest {
        prompt: tokens,
        sampling: sampling_from_wire(&req.sampling),
        max_tokens: req.max_tokens,
        stop: req.stop.clone(),
        priority: 0,
    })
}

/// The error a consumer gets for an engine error, with an HTTP-like code.
pub(crate) fn reply_for(request_id: u64, e: &hypha_engine::Error) -> ErrorReply {
    use hypha_engine::Error as E;
    let code = match e {
        E::ContextExceeded { .. } | E::InvalidRequest(_) | E::PromptTooLarge | E::Template(_) => {
            400
        }
        E::QueueFull { .. } => 503,
        _ => 500,
    };
    ErrorReply {
        request_id,
        code,
        message: e.to_string(),
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
