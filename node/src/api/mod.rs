//! Canopy's HTTP front: the OpenAI-compatible API, `/health` and `/metrics`.
//!
//! Request flow: the body is read under a size cap and decoded to an OpenAI
//! request (a 400 or 413 JSON error otherwise) and routed: a model this node
//! loaded is turned into tokens and submitted to the local engine; any other
//! goes to a peer that serves it (see `inference::route`), which tokenizes on its side.
//! Either way the events become one JSON response or an SSE stream. The
//! HTTP body owns the running job: when a client disconnects, hyper drops
//! the body and the job with it; a local generation frees its slot at the
//! engine's next step, a remote one resets its stream and the seeder does
//! the same.

pub mod account;
pub mod admin;
pub mod completions;
pub mod errors;
pub mod openai;

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;

use hypha_engine::Engine;

use crate::api::errors::ApiError;
use crate::inference::route::Peers;
use crate::metrics::Metrics;

/// Largest request body accepted: long prompts fit, runaway uploads do not.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Header naming the peer that served a remote request.
pub const PEER_HEADER: &str = "x-hypha-peer";
/// Header with the micro-credits a remote request was charged (whole
/// responses; a stream carries them in its usage chunk).
pub const CREDITS_HEADER: &str = "x-hypha-credits";

/// A model this node runs itself.
pub struct LocalModel {
    pub engine: Engine,
    pub model_id: String,
    /// Other names requests may use for it (e.g. `default`).
    pub aliases: Vec<String>,
}

impl LocalModel {
    fn answers_to(&self, model: &str) -> bool {
        model == self.model_id || self.aliases.iter().any(|a| a == model)
    }
}

/// What every handler shares.
pub struct AppState {
    pub local: Option<LocalModel>,
    pub peers: Option<Arc<Peers>>,
    /// How peers see this node: NAT mapping and candidates.
    pub reach: Option<Arc<crate::services::reach::Reachability>>,
    /// The node's identity and receipts, when it talks to peers.
    pub account: Option<crate::api::account::Account>,
    /// Relaying: the service this node runs, its own reservations, and
    /// its relayed paths.
    pub relay: Option<Arc<crate::services::relay_server::RelayService>>,
    pub relay_client: Option<Arc<crate::services::relay_client::RelayClient>>,
    pub paths: Option<Arc<crate::net::paths::Paths>>,
    pub api_key: Option<String>,
    pub metrics: Arc<Metrics>,
    pub started: SystemTime,
}

/// Where a request runs.
enum Route<'a> {
    Local(&'a Engine),
    Remote(&'a Peers),
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/models", get(admin::list_models))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/ledger", get(admin::ledger))
        .route("/v1/ledger/{node_id}", get(admin::peer_ledger))
        .route("/v1/network", get(admin::network))
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

impl AppState {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Compare in constant time so the key cannot be guessed byte by byte.
        let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes()));
        if ok {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing or wrong API key (send Authorization: Bearer KEY)",
            )
            .code("invalid_api_key"))
        }
    }

    /// The local engine when this node runs `model`, else the peers.
    fn route(&self, model: &str) -> Result<Route<'_>, ApiError> {
        if let Some(local) = self.local.as_ref().filter(|l| l.answers_to(model)) {
            return Ok(Route::Local(&local.engine));
        }
        if let Some(peers) = &self.peers {
            return Ok(Route::Remote(peers));
        }
        let serves = self.local.as_ref().map(|l| l.model_id.as_str());
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model {model:?} does not exist on this node; it serves {serves:?}"),
        )
        .code("model_not_found")
        .param("model"))
    }
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown endpoint",
    )
    .code("unknown_url")
}
