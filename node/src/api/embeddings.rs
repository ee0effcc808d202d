//! `/v1/embeddings`: OpenAI's embeddings from the model this node runs
//! (started with `--embeddings`).
//!
//! `input` is a string, a list of strings, a list of token ids, or a list
//! of such lists (LangChain sends token ids by default); at most
//! [`MAX_INPUTS`], none empty. Each input becomes one vector, pooled by
//! llama.cpp (the model's own pooling, or the mean of its tokens' states
//! for a chat model) and scaled to unit length, as OpenAI's are.
//! `encoding_format` `float` or `base64` (little-endian `f32`s);
//! `dimensions` only at the model's own width (vectors are not cut);
//! `user` is taken. Anything else is refused by name. Usage counts the
//! inputs' tokens. A model served by a peer is refused with a clear
//! error: embeddings do not cross the network yet.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::errors::{ApiError, OpenAiJson};
use crate::api::state::{AppState, Route};

/// Inputs one request may hold (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: Value,
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub dimensions: Option<u64>,
    /// Every other field: `user` is taken, the rest refused.
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// One input: text to tokenize, or token ids of this node's model.
#[derive(Debug, Clone, PartialEq)]
enum Input {
    Text(String),
    Tokens(Vec<i32>),
}

fn bad_input(message: impl Into<String>) -> ApiError {
    ApiError::invalid(message).param("input")
}

/// Token ids from a JSON array of integers.
fn token_ids(a: &[Value]) -> Option<Vec<i32>> {
    a.iter()
        .map(|v| v.as_i64().and_then(|n| i32::try_from(n).ok()))
        .collect()
}

/// The inputs `input` holds, checked for shape and count.
fn inputs(input: &Value) -> Result<Vec<Input>, ApiError> {
    let list = match input {
        Value::String(s) => vec![Input::Text(s.clone())],
        Value::Array(a) if a.is_empty() => return Err(bad_input("`input` must not be empty")),
        Value::Array(a) if a.iter().all(Value::is_number) => vec![Input::Tokens(
            token_ids(a).ok_or_else(|| bad_input("token ids must be 32-bit integers"))?,
        )],
        Value::Array(a) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(Input::Text(s.clone())),
                Value::Array(ids) => token_ids(ids)
                    .map(Input::Tokens)
                    .ok_or_else(|| bad_input("token ids must be 32-bit integers")),
                _ => Err(bad_input(
                    "`input` is a string, a list of strings, or token ids (a list of integers, or lists of them)",
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(bad_input(
                "`input` is a string, a list of strings, or token ids (a list of integers, or lists of them)",
            ))
        }
    };
    if list.len() > MAX_INPUTS {
        return Err(bad_input(format!(
            "at most {MAX_INPUTS} inputs per request"
        )));
    }
    let empty = |i: &Input| match i {
        Input::Text(t) => t.is_empty(),
        Input::Tokens(t) => t.is_empty(),
    };
    if list.iter().any(empty) {
        return Err(bad_input("an input must not be empty"));
    }
    Ok(list)
}

/// Standard base64 (with padding) of `bytes`.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub(crate) async fn embeddings(
    State(st): State<Arc<AppState>>,
    body: Result<OpenAiJson<EmbeddingsRequest>, ApiError>,
) -> Response {
    let resp = answer(&st, body)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    st.metrics
        .count_request("embeddings", resp.status().as_u16());
    resp
}

async fn answer(
    st: &Arc<AppState>,
    body: Result<OpenAiJson<EmbeddingsRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let OpenAiJson(req) = body?;
    if let Some((field, _)) = req.other.iter().find(|(f, _)| *f != "user") {
        return Err(ApiError::unsupported(
            field,
            "this field is not known to this node",
        ));
    }
    let base64_out = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "unknown encoding_format {other:?}: float or base64"
            ))
            .param("encoding_format"))
        }
    };
    let inputs = inputs(&req.input)?;
    let engine = match st.route(&req.model)? {
        Route::Local(engine) => engine.clone(),
        Route::Remote(_) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "the model {:?} is not run by this node, and embeddings are not served through peers yet: ask a node that runs it with --embeddings",
                    req.model
                ),
            )
            .code("model_not_found")
            .param("model"))
        }
    };
    if !engine.embeds() {
        return Err(ApiError::unsupported(
            "model",
            "this node serves no embeddings: start it with --embeddings",
        ));
    }
    let width = engine.info().n_embd;
    if req.dimensions.is_some_and(|d| d != u64::from(width)) {
        return Err(ApiError::unsupported(
            "dimensions",
            &format!("this model's embeddings have {width} dimensions and are not cut shorter"),
        ));
    }
    for i in &inputs {
        if let Input::Text(t) = i {
            engine.check_prompt_bytes(t.len())?;
        }
    }
    // Tokenizing and the model's forward pass take a core: off the async
    // workers, one input at a time (the engine's embedding context).
    let computed = tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(inputs.len());
        let mut tokens = 0u64;
        for i in inputs {
            let ids = match i {
                Input::Text(t) => engine.tokenize(&t)?,
                Input::Tokens(t) => t,
            };
            tokens += ids.len() as u64;
            out.push(engine.embed(&ids)?);
        }
        Ok::<_, hypha_engine::Error>((out, tokens))
    })
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the embedding task failed",
        )
    })?;
    let (vectors, tokens) = computed?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64_out {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe, 0x00, 0x01]), "//4AAQ==");
    }

    #[test]
    fn inputs_of_every_shape() {
        assert_eq!(inputs(&json!("a")).unwrap(), vec![Input::Text("a".into())]);
        assert_eq!(
            inputs(&json!(["a", "b"])).unwrap(),
            vec![Input::Text("a".into()), Input::Text("b".into())]
        );
        assert_eq!(
            inputs(&json!([1, 2])).unwrap(),
            vec![Input::Tokens(vec![1, 2])]
        );
        assert_eq!(
            inputs(&json!([[1], [2, 3]])).unwrap(),
            vec![Input::Tokens(vec![1]), Input::Tokens(vec![2, 3])]
        );
        for bad in [
            json!([]),
            json!(""),
            json!([""]),
            json!([[]]),
            json!(3),
            json!([1.5]),
            json!([{"a": 1}]),
        ] {
            assert!(inputs(&bad).is_err(), "{bad}");
        }
        let many: Vec<Value> = (0..=MAX_INPUTS).map(|_| json!("x")).collect();
        assert!(inputs(&Value::Array(many)).is_err());
    }
}
