//! Canopy's HTTP front: the OpenAI-compatible API (chat and text
//! completions, the Responses API, embeddings), Anthropic's Messages API,
//! `/health` and `/metrics`.
//!
//! Request flow: the body is read under a size cap and decoded to the
//! endpoint's request (a 400 or 413 JSON error otherwise), checked and
//! routed: a model this node loaded is turned into tokens and submitted to
//! the local engine; any other goes to a peer that serves it (see
//! `inference::route`), which tokenizes on its side. Either way the events
//! become one JSON response or an SSE stream in the endpoint's dialect
//! (`generate`). The HTTP body owns the running job: when a client
//! disconnects, hyper drops the body and the job with it; a local
//! generation frees its slot at the engine's next step, a remote one resets
//! its stream and the seeder does the same.

pub mod account;
pub mod admin;
pub mod completions;
pub mod conns;
pub mod embeddings;
pub mod errors;
pub(crate) mod generate;
pub mod guard;
pub mod messages;
pub mod openai;
pub mod responses;
pub mod state;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;

use crate::api::errors::{ApiError, MAX_BODY_BYTES};
pub use crate::api::generate::{CREDITS_HEADER, PEER_HEADER};
pub use crate::api::state::{AppState, LocalModel};

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/models", get(admin::list_models))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/messages", post(messages::messages))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/ledger", get(admin::ledger))
        .route("/v1/ledger/{node_id}", get(admin::peer_ledger))
        .route("/v1/network", get(admin::network))
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::guard,
        ))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown endpoint",
    )
    .code("unknown_url")
}
