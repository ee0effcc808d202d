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
//! POST to any address without a preflight); and a request with a body (a
//! completion) must find a free stream permit (`--max-http-streams`),
//! which its response holds until it is sent or dropped. Each refusal is
//! an OpenAI-style JSON error, and none of them reads the body. Only then
//! is the body read, whole, within its deadline and size cap (408 or 413
//! otherwise; before a 413 the rest of the body is read on and dropped, up
//! to `MAX_DRAIN_BYTES` or `DRAIN_TIMEOUT`, so that the client is reading
//! when the answer comes), so the handler never waits on the client.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use http_body_util::BodyExt as _;
use hyper::body::{Frame, SizeHint};
use tokio::sync::OwnedSemaphorePermit;

use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::errors::{ApiError, MAX_BODY_BYTES};
use crate::api::state::AppState;

/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE_S: u32 = 600;
/// Request headers a cross-origin page may send (what OpenAI and Anthropic
/// clients use).
const ALLOWED_HEADERS: &str =
    "authorization, content-type, x-api-key, anthropic-version, anthropic-beta";
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
    let permit = if has_body {
        match st.streams.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                st.metrics
                    .http_streams_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_busy",
                    "this node is serving as many completions as it allows at once; try again shortly",
                )
                .code("too_many_streams");
                return with_cors(e.into_response(), cors.as_deref());
            }
        }
    } else {
        None
    };
    let req = if has_body {
        match read_body(req, st.body_timeout).await {
            Ok(r) => r,
            Err(e) => return with_cors(e.into_response(), cors.as_deref()),
        }
    } else {
        req
    };
    let resp = next.run(req).await;
    let resp = match permit {
        // The permit goes with the body: a stream holds it until its last
        // event is written or the client leaves.
        Some(permit) => resp.map(|body| {
            Body::new(Held {
                body,
                _permit: permit,
            })
        }),
        None => resp,
    };
    with_cors(resp, cors.as_deref())
}

/// `req` with its body read whole, within `deadline` and
/// [`MAX_BODY_BYTES`].
async fn read_body(req: Request, deadline: Duration) -> Result<Request, ApiError> {
    let (parts, mut body) = req.into_parts();
    match tokio::time::timeout(deadline, read_capped(&mut body)).await {
        Ok(Err(ReadError::TooLarge)) => {
            // Read on (and drop) what the client is still sending, within
            // bounds, so that it is reading when the 413 comes: closing on
            // unread bytes resets the connection, and the client may lose
            // the answer.
            let drain = async {
                let mut left = MAX_DRAIN_BYTES;
                while let Some(Ok(frame)) = body.frame().await {
                    let n = frame.data_ref().map_or(0, Bytes::len);
                    left = left.saturating_sub(n);
                    if left == 0 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
            Err(ApiError::too_large())
        }
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {} s",
                deadline.as_secs_f32()
            ),
        )
        .code("body_timeout")),
        Ok(Err(ReadError::Body(e))) => Err(ApiError::invalid(format!(
            "cannot read the request body: {e}"
        ))),
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, Body::from(bytes))),
    }
}

/// Bytes of an oversized body read on (and dropped) before its 413.
const MAX_DRAIN_BYTES: usize = 4 * MAX_BODY_BYTES;
/// How long an oversized body is read on before its 413.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

enum ReadError {
    TooLarge,
    Body(axum::Error),
}

/// The body whole, if it is within [`MAX_BODY_BYTES`].
async fn read_capped(body: &mut Body) -> Result<Bytes, ReadError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ReadError::Body)?;
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > MAX_BODY_BYTES {
                return Err(ReadError::TooLarge);
            }
            buf.extend_from_slice(data);
        }
    }
    Ok(buf.freeze())
}

/// A response body and the stream permit it holds; every call passes
/// through, so length and end are those of the body.
struct Held {
    body: Body,
    _permit: OwnedSemaphorePermit,
}

impl HttpBody for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
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
