//! OpenAI-style errors: the JSON shape, the map from engine errors and
//! peers' refusals to HTTP, and a JSON body extractor that fails with them.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use hypha_wire::Refusal;

use crate::inference::remote::RemoteError;

/// Largest request body accepted: long prompts fit, runaway uploads do not.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Seconds a client is told to wait when every slot and the queue are full.
const RETRY_AFTER_S: u64 = 1;

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<String>,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub(crate) fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub(crate) fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body is larger than {MAX_BODY_BYTES} bytes"),
        )
        .code("request_too_large")
    }

    /// The refusal of a request field this node does not honour, named:
    /// a 400 `unsupported_parameter` saying `what`.
    pub(crate) fn unsupported(field: &str, what: &str) -> Self {
        Self::invalid(format!("unsupported parameter `{field}`: {what}"))
            .param(field.to_owned())
            .code("unsupported_parameter")
    }

    pub(crate) fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// The HTTP status the error is answered with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// What went wrong, in words.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The error as Anthropic's Messages API shapes it:
    /// `{"type": "error", "error": {"type", "message"}}`, its type named
    /// after the status.
    pub fn anthropic_response(self) -> Response {
        let kind = match self.status.as_u16() {
            400 | 408 | 415 => "invalid_request_error",
            401 => "authentication_error",
            402 => "billing_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            _ => "api_error",
        };
        let body = json!({"type": "error", "error": {"type": kind, "message": self.message}});
        self.respond(body)
    }

    /// `body` with the error's status, and the `Retry-After` of a full node.
    fn respond(&self, body: serde_json::Value) -> Response {
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE
            || self.status == StatusCode::TOO_MANY_REQUESTS
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        }
        resp
    }

    /// The JSON body the error is answered with.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// Decodes a JSON request body, or says why not as a 400.
pub fn decode_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")).code("invalid_json"))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        self.respond(body)
    }
}

/// A peer's refusal as the client sees it: the client's own mistakes and
/// limits pass through (400, 402, 404, 429, 503); anything else is the peer's
/// failure, a 502.
impl From<RemoteError> for ApiError {
    fn from(e: RemoteError) -> Self {
        let message = e.to_string();
        match e {
            RemoteError::Refused {
                refusal: Refusal::BadRequest,
                ..
            } => Self::invalid(message),
            RemoteError::Refused {
                refusal: Refusal::NotFound,
                ..
            }
            | RemoteError::NoProvider { .. } => {
                Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
                    .code("model_not_found")
                    .param("model")
            }
            RemoteError::Refused {
                refusal: Refusal::TooMany,
                ..
            } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                message,
            )
            .code("free_tier_exhausted"),
            RemoteError::Refused {
                refusal: Refusal::OverBudget,
                ..
            } => Self::new(StatusCode::PAYMENT_REQUIRED, "insufficient_quota", message)
                .code("over_request_cap"),
            RemoteError::OverPrice { .. } => {
                Self::new(StatusCode::PAYMENT_REQUIRED, "insufficient_quota", message)
                    .code("over_price_ceiling")
            }
            RemoteError::Refused {
                refusal: Refusal::Busy,
                ..
            } => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_busy", message).code("peer_busy")
            }
            _ => {
                Self::new(StatusCode::BAD_GATEWAY, "server_error", message).code("peer_unavailable")
            }
        }
    }
}

impl From<hypha_engine::Error> for ApiError {
    fn from(e: hypha_engine::Error) -> Self {
        use hypha_engine::Error as E;
        match e {
            E::ContextExceeded { .. } => Self::invalid(e.to_string())
                .code("context_length_exceeded")
                .param("messages"),
            E::PromptBytes { .. } => Self::invalid(e.to_string())
                .code("context_length_exceeded")
                .param("messages"),
            E::InvalidRequest(_) | E::PromptTooLarge | E::Template(_) => {
                Self::invalid(e.to_string())
            }
            E::QueueFull { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_busy",
                e.to_string(),
            )
            .code("queue_full"),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
            ),
        }
    }
}

/// A JSON body decoded with OpenAI-style errors for every failure.
pub struct OpenAiJson<T>(pub T);

impl<T, S> FromRequest<S> for OpenAiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large()
            } else {
                ApiError::invalid(format!("cannot read the request body: {rej}"))
            }
        })?;
        decode_body(&bytes).map(OpenAiJson)
    }
}
