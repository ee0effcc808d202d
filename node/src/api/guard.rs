//! The edge's first look at every request, before any body is read.
//!
//! In order: a browser's CORS preflight is answered (or refused); the
//! `Host` must name this node (a page that rebinds a DNS name to 127.0.0.1
//! cannot reach the API); a browser's `Origin` must be the node's own (a
//! page served by the node itself) or one the operator allowed with
//! `--cors-origin`; the API key, when one is set, must be present (on every
//! route, `/metrics` and `/health` included, unless `--public-health` opens
//! `/health` to probes); a body
//! must be `application/json` (a page may send a "simple" `text/plain`
//! POST to any address without a preflight). Each refusal is an
//! OpenAI-style JSON error, and none of them reads the body.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::errors::ApiError;
use crate::api::state::AppState;

/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE_S: u32 = 600;
/// Request headers a cross-origin page may send (what OpenAI clients use).
const ALLOWED_HEADERS: &str = "authorization, content-type";
const ALLOWED_METHODS: &str = "GET, POST, OPTIONS";

fn forbidden(code: &'static str, message: String) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, "invalid_request_error", message)
        .code(code)
        .into_response()
}

/// See the module docs.
pub async fn guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let policy = &st.edge;
    if !policy.host_allowed(&host) {
        return forbidden(
            "host_not_allowed",
            format!("this node does not answer to the host {host:?}; start it with --allow-host to add a name"),
        );
    }
    // A page the node serves itself is same-origin; any other origin must
    // be allowed.
    let same_origin = |o: &str| o.strip_prefix("http://") == Some(host.as_str());
    let cors = match &origin {
        None => None,
        Some(o) if same_origin(o) => None,
        Some(o) if policy.cors_allowed(o) => Some(o.clone()),
        Some(o) => {
            return forbidden(
                "origin_not_allowed",
                format!("requests from the web origin {o:?} are not allowed; start the node with --cors-origin to allow it"),
            )
        }
    };
    if req.method() == Method::OPTIONS {
        let mut resp = StatusCode::NO_CONTENT.into_response();
        if let Some(o) = &cors {
            add_cors(resp.headers_mut(), o, true);
        }
        return resp;
    }
    let open = policy.public_health && req.uri().path() == "/health";
    if !open {
        if let Err(e) = st.authorize(headers) {
            return with_cors(e.into_response(), cors.as_deref());
        }
    }
    let has_body = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
    if has_body && !is_json(headers) {
        let e = ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "the request body must be JSON (Content-Type: application/json)",
        )
        .code("unsupported_content_type");
        return with_cors(e.into_response(), cors.as_deref());
    }
    with_cors(next.run(req).await, cors.as_deref())
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

fn with_cors(mut resp: Response, origin: Option<&str>) -> Response {
    if let Some(o) = origin {
        add_cors(resp.headers_mut(), o, false);
    }
    resp
}

fn add_cors(h: &mut HeaderMap, origin: &str, preflight: bool) {
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    if preflight {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOWED_METHODS),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOWED_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(PREFLIGHT_MAX_AGE_S),
        );
    }
}
