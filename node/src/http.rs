//! Canopy's HTTP front: the OpenAI-compatible API, `/health` and `/metrics`.
//!
//! Request flow: the body is read under a size cap and decoded to an OpenAI
//! request (a 400 or 413 JSON error otherwise) and routed: a model this node
//! loaded is turned into tokens and submitted to the local engine; any other
//! goes to a peer that serves it (see `peers`), which tokenizes on its side.
//! Either way the events become one JSON response or an SSE stream. The
//! HTTP body owns the running job: when a client disconnects, hyper drops
//! the body and the job with it; a local generation frees its slot at the
//! engine's next step, a remote one resets its stream and the seeder does
//! the same.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use serde_json::json;

use hypha_engine::{Engine, Event, Finish, FinishReason, GenerateRequest, Generation};
use hypha_wire::{InferenceRequest, NodeId, Prompt};

use crate::metrics::{Gauges, Metrics};
use crate::openai::{
    ChatRequest, CompletionRequest, ModelCard, ModelList, ModelMeta, PromptField, SamplingFields,
    Usage,
};
use crate::peers::{Peers, RemoteError, RemoteEvent, RemoteGeneration};

/// Largest request body accepted: long prompts fit, runaway uploads do not.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Seconds a client is told to wait when every slot and the queue are full.
const RETRY_AFTER_S: u64 = 1;

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
    pub reach: Option<Arc<crate::reach::Reachability>>,
    /// The node's identity and receipts, when it talks to peers.
    pub account: Option<crate::account::Account>,
    /// Relaying: the service this node runs, its own reservations, and
    /// its relayed paths.
    pub relay: Option<Arc<crate::relay::RelayService>>,
    pub relay_client: Option<Arc<crate::relay::RelayClient>>,
    pub paths: Option<Arc<crate::relay::Paths>>,
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
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/ledger", get(ledger))
        .route("/v1/ledger/{node_id}", get(peer_ledger))
        .route("/v1/network", get(network))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE
            || self.status == StatusCode::TOO_MANY_REQUESTS
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        }
        resp
    }
}

impl From<RemoteError> for ApiError {
    fn from(e: RemoteError) -> Self {
        let message = e.to_string();
        match e {
            RemoteError::Refused { code: 400, .. } => Self::invalid(message),
            RemoteError::Refused { code: 404, .. } | RemoteError::NoProvider { .. } => {
                Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
                    .code("model_not_found")
                    .param("model")
            }
            RemoteError::Refused { code: 429, .. } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                message,
            )
            .code("free_tier_exhausted"),
            RemoteError::Refused { code: 503, .. } => {
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
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    format!("request body is larger than {MAX_BODY_BYTES} bytes"),
                )
                .code("request_too_large")
            } else {
                ApiError::invalid(format!("cannot read the request body: {rej}"))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(OpenAiJson)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")).code("invalid_json"))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    // A failing system RNG leaves zeros: ids are labels, not secrets.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{prefix}-{hex}")
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

impl AppState {
    fn gauges(&self) -> Gauges {
        match &self.local {
            Some(l) => {
                let stats = l.engine.stats();
                Gauges {
                    queue_depth: stats.queued.load(Ordering::Relaxed),
                    slots_busy: stats.slots_busy.load(Ordering::Relaxed),
                    slots_total: l.engine.info().parallel,
                    prompt_tokens_reused: stats.prompt_tokens_reused.load(Ordering::Relaxed),
                }
            }
            None => Gauges {
                queue_depth: 0,
                slots_busy: 0,
                slots_total: 0,
                prompt_tokens_reused: 0,
            },
        }
    }
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let g = st.gauges();
    let peers: Vec<serde_json::Value> = st
        .peers
        .as_ref()
        .map(|p| {
            p.status()
                .into_iter()
                .map(|(addr, connected)| {
                    json!({"id": addr.id.to_string(), "addr": addr.addr.to_string(), "connected": connected})
                })
                .collect()
        })
        .unwrap_or_default();
    Json(json!({
        "status": "ok",
        "model": st.local.as_ref().map(|l| l.model_id.clone()),
        "slots_busy": g.slots_busy,
        "slots_total": g.slots_total,
        "queue_depth": g.queue_depth,
        "peers": peers,
    }))
    .into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let mut text = st.metrics.render(&st.gauges());
    use crate::metrics::{counter, gauge};
    use std::fmt::Write as _;
    if let Some(r) = &st.reach {
        let s = &r.stun;
        for (name, help, v) in [
            (
                "hypha_stun_requests_answered_total",
                "STUN binding requests answered on the QUIC port.",
                &s.requests_answered,
            ),
            (
                "hypha_stun_requests_dropped_total",
                "STUN binding requests not answered (rate limit or full socket).",
                &s.requests_dropped,
            ),
            (
                "hypha_stun_responses_total",
                "STUN binding responses received for this node's probes.",
                &s.responses_received,
            ),
        ] {
            counter(&mut text, name, help, v.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            text,
            "# HELP hypha_nat_mapping NAT mapping behaviour (1 for the current one)\n# TYPE hypha_nat_mapping gauge\nhypha_nat_mapping{{mapping=\"{}\"}} 1",
            r.view().mapping.as_str()
        );
    }
    if let Some(p) = &st.paths {
        let s = &p.stats;
        for (name, help, v) in [
            (
                "hypha_relayed_sent_bytes_total",
                "Bytes of this node's own QUIC packets sent over relayed paths.",
                &s.sent_bytes,
            ),
            (
                "hypha_relayed_received_bytes_total",
                "Bytes of QUIC packets this node received over relayed paths.",
                &s.received_bytes,
            ),
            (
                "hypha_relayed_paths_total",
                "Relayed paths opened (as either end).",
                &s.opened,
            ),
            (
                "hypha_relayed_dropped_packets_total",
                "QUIC packets for a relayed path dropped (its queue full, or the path gone).",
                &s.dropped_packets,
            ),
        ] {
            counter(&mut text, name, help, v.load(Ordering::Relaxed));
        }
    }
    if let Some(r) = &st.relay {
        let s = &r.stats;
        for (name, help, v) in [
            (
                "hypha_relay_forwarded_bytes_total",
                "Bytes this node forwarded as a relay (ciphertext of other nodes' connections).",
                &s.forwarded_bytes,
            ),
            (
                "hypha_relay_sessions_total",
                "Relayed paths this node carried.",
                &s.sessions_opened,
            ),
            (
                "hypha_relay_refused_total",
                "Relay reservations and paths refused (allow list, limits, unknown target).",
                &s.refused,
            ),
        ] {
            counter(&mut text, name, help, v.load(Ordering::Relaxed));
        }
        gauge(
            &mut text,
            "hypha_relay_reservations",
            "Nodes holding a reservation at this relay.",
            r.reservations() as u64,
        );
        gauge(
            &mut text,
            "hypha_relay_sessions",
            "Relayed paths open through this node.",
            s.sessions.load(Ordering::Relaxed) as u64,
        );
    }
    if let Some(peers) = &st.peers {
        let _ = writeln!(
            text,
            "# HELP hypha_peer_path The path of each open connection this node dialed (1 for its kind).\n# TYPE hypha_peer_path gauge"
        );
        for k in peers.connections().known().iter().filter(|k| k.connected) {
            let path = if k.via.is_some() { "relayed" } else { "direct" };
            let _ = writeln!(
                text,
                "hypha_peer_path{{peer=\"{}\",path=\"{path}\"}} 1",
                k.addr.id
            );
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The routing table, known peers and providers: `GET /v1/network`.
async fn network(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = st.authorize(&headers) {
        return e.into_response();
    }
    let Some(peers) = &st.peers else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "this node is not on a network: start it with --quic, --peer or --bootstrap",
        )
        .code("no_network")
        .into_response();
    };
    let now = crate::discovery::unix_ms();
    let view = match peers.discovery() {
        Some(d) => d.view().await,
        None => None,
    };
    let (local, table, held) = match view {
        Some(v) => (
            Some(v.local),
            v.contacts
                .into_iter()
                .map(|(bucket, c, seen)| {
                    json!({
                        "id": c.id.to_string(),
                        "addr": c.addr.to_string(),
                        "bucket": bucket,
                        "last_seen_s_ago": now.saturating_sub(seen) / 1000,
                    })
                })
                .collect::<Vec<_>>(),
            v.records,
        ),
        None => (None, Vec::new(), Vec::new()),
    };
    let connections: Vec<serde_json::Value> = peers
        .connections()
        .known()
        .into_iter()
        .map(|k| {
            let h = peers.health(&k.addr.id);
            json!({
                "id": k.addr.id.to_string(),
                "addr": k.addr.addr.to_string(),
                "connected": k.connected,
                "configured": k.configured,
                "rtt_ms": k.rtt.map(|d| d.as_secs_f64() * 1000.0),
                "path": if !k.connected { None } else if k.via.is_some() { Some("relayed") } else { Some("direct") },
                "via": k.via.map(|v| v.to_string()),
                "models": k.models,
                "recent_failures": h.failures,
            })
        })
        .collect();
    let records: Vec<serde_json::Value> = held
        .iter()
        .map(|r| {
            json!({
                "model": r.model,
                "publisher": r.publisher.to_string(),
                "addrs": r.addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "relays": r.relays.iter().map(|c| format!("{}@{}", c.id, c.addr)).collect::<Vec<_>>(),
                "backend": r.backend,
                "context_length": r.context_length,
                "decode_tokens_per_s": r.decode_tokens_per_s,
                "free_slots": r.free_slots,
                "price_prompt_micro": r.price_prompt_micro,
                "price_completion_micro": r.price_completion_micro,
                "expires_in_s": r.expires_ms.saturating_sub(now) / 1000,
            })
        })
        .collect();
    let models: Vec<serde_json::Value> = peers
        .models()
        .await
        .into_iter()
        .map(|(m, ids)| {
            json!({
                "model": m,
                "provider_count": ids.len(),
                "providers": ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        })
        .collect();
    let reserved = st
        .relay_client
        .as_ref()
        .map(|c| c.relays())
        .unwrap_or_default();
    let nat = st.reach.as_ref().map(|r| {
        let v = r.view();
        let mut candidates = v.candidates.clone();
        candidates.extend(reserved.iter().map(|c| hypha_nat::Candidate {
            kind: hypha_nat::CandidateKind::Relayed,
            addr: c.addr,
        }));
        let public = match &v.mapping {
            hypha_nat::Mapping::Public { addr } => Some(addr.to_string()),
            hypha_nat::Mapping::EndpointIndependent { public } => Some(public.to_string()),
            _ => None,
        };
        json!({
            "mapping": v.mapping.as_str(),
            "public_addr": public,
            "observations": v.observations.iter().map(|o| json!({
                "peer": o.server.to_string(),
                "saw": o.mapped.to_string(),
            })).collect::<Vec<_>>(),
            "candidates": candidates.iter().map(|c| json!({
                "kind": c.kind.as_str(),
                "addr": c.addr.to_string(),
            })).collect::<Vec<_>>(),
        })
    });
    let relay = json!({
        "serving": st.relay.as_ref().map(|r| json!({
            "reservations": r.reservations(),
            "sessions": r.stats.sessions.load(Ordering::Relaxed),
            "forwarded_bytes": r.stats.forwarded_bytes.load(Ordering::Relaxed),
        })),
        "reserved_at": reserved.iter().map(|c| format!("{}@{}", c.id, c.addr)).collect::<Vec<_>>(),
        "paths": st.paths.as_ref().map(|p| p.list()).unwrap_or_default().iter().map(|p| json!({
            "peer": p.peer.to_string(),
            "via": p.via.to_string(),
            "addr": p.addr.to_string(),
            "age_s": p.age.as_secs(),
        })).collect::<Vec<_>>(),
    });
    Json(json!({
        "id": local.map(|c| c.id.to_string()),
        "quic_addr": local.map(|c| c.addr.to_string()),
        "nat": nat,
        "relay": relay,
        "routing_table": table,
        "connections": connections,
        "provider_records": records,
        "models": models,
    }))
    .into_response()
}

/// Another node's balance, computed from the receipts the DHT holds for
/// it, each checked here: `GET /v1/ledger/{node_id}`.
async fn peer_ledger(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Path(node_id): axum::extract::Path<String>,
) -> Response {
    if let Err(e) = st.authorize(&headers) {
        return e.into_response();
    }
    let id: NodeId = match node_id.parse() {
        Ok(id) => id,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("{node_id:?} is not a node id: {e}"),
            )
            .code("invalid_node_id")
            .into_response()
        }
    };
    let (Some(d), Some(account)) = (st.peers.as_ref().and_then(|p| p.discovery()), &st.account)
    else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "this node is not on a network: start it with --quic, --peer or --bootstrap",
        )
        .code("no_network")
        .into_response();
    };
    let Some(receipts) = d.receipts_of(&id).await else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the DHT lookup of this node's receipts did not finish; try again",
        )
        .code("lookup_failed")
        .into_response();
    };
    let totals = hypha_ledger::totals_of(&id, &receipts);
    let mut v = crate::account::balance_json(
        id,
        crate::account::grant_for(&id, account.pow_bits),
        &totals,
    );
    v["source"] = json!("dht");
    v["receipts"] = json!(receipts.len());
    v["recent"] = receipts
        .iter()
        .take(LEDGER_RECENT)
        .map(|r| crate::account::receipt_json(r.signed(), Some(id)))
        .collect();
    Json(v).into_response()
}

/// Receipts shown by `GET /v1/ledger`.
const LEDGER_RECENT: usize = 20;

async fn ledger(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = st.authorize(&headers) {
        return e.into_response();
    }
    match &st.account {
        Some(a) => Json(crate::account::ledger_json(
            a.id,
            a.grant,
            &a.ledger,
            LEDGER_RECENT,
        ))
        .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "this node has no ledger: it neither serves peers (--quic) nor uses them (--peer)",
        )
        .code("no_ledger")
        .into_response(),
    }
}

async fn list_models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = st.authorize(&headers) {
        return e.into_response();
    }
    let created = st
        .started
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let network = match &st.peers {
        Some(p) => p.models().await,
        None => Vec::new(),
    };
    let mut data = Vec::new();
    if let Some(local) = &st.local {
        let info = local.engine.info();
        let mut providers: Vec<String> = st.account.iter().map(|a| a.id.to_string()).collect();
        for (model, ids) in &network {
            if *model == local.model_id {
                providers.extend(ids.iter().map(ToString::to_string));
            }
        }
        providers.sort();
        providers.dedup();
        data.push(ModelCard {
            id: local.model_id.clone(),
            object: "model",
            created,
            owned_by: "hypha",
            meta: Some(ModelMeta {
                architecture: info.architecture.clone(),
                context_length: info.ctx_per_slot,
                context_length_train: info.n_ctx_train,
                n_params: info.n_params,
                size_bytes: info.size_bytes,
                device: info.device.clone(),
                slots: info.parallel,
            }),
            provider_count: providers.len().max(1),
            providers,
        });
    }
    for (model, ids) in network {
        if st.local.as_ref().is_some_and(|l| l.answers_to(&model)) {
            continue;
        }
        data.push(ModelCard {
            id: model,
            object: "model",
            created,
            owned_by: "hypha",
            meta: None,
            provider_count: ids.len(),
            providers: ids.iter().map(ToString::to_string).collect(),
        });
    }
    Json(ModelList {
        object: "list",
        data,
    })
    .into_response()
}

/// Which OpenAI endpoint a generation answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn metric(self) -> &'static str {
        match self {
            Kind::Chat => "chat_completions",
            Kind::Text => "completions",
        }
    }
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<OpenAiJson<ChatRequest>, ApiError>,
) -> Response {
    let received = Instant::now();
    let prepared = async {
        st.authorize(&headers)?;
        let OpenAiJson(req) = body?;
        let route = st.route(&req.model)?;
        let stops = req.fields.check().map_err(ApiError::invalid)?;
        let messages = req
            .messages()
            .map_err(|m| ApiError::invalid(m).param("messages"))?;
        let job = match route {
            Route::Local(engine) => {
                let prompt = engine.apply_chat_template(&messages)?;
                let tokens = engine.tokenize(&prompt)?;
                submit_local(engine, tokens, stops, &req.fields)?
            }
            Route::Remote(peers) => {
                let messages = messages
                    .into_iter()
                    .map(|m| hypha_wire::ChatMessage {
                        role: m.role,
                        content: m.content,
                    })
                    .collect();
                submit_remote(
                    peers,
                    &req.model,
                    Prompt::Chat(messages),
                    stops,
                    &req.fields,
                )
                .await?
            }
        };
        start(&st, Kind::Chat, req.model, job, &req.fields, received)
    }
    .await;
    reply(&st, Kind::Chat, prepared).await
}

async fn completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<OpenAiJson<CompletionRequest>, ApiError>,
) -> Response {
    let received = Instant::now();
    let prepared = async {
        st.authorize(&headers)?;
        let OpenAiJson(req) = body?;
        let route = st.route(&req.model)?;
        let stops = req.fields.check().map_err(ApiError::invalid)?;
        if req.echo {
            return Err(ApiError::invalid("echo is not supported").param("echo"));
        }
        let text = match &req.prompt {
            PromptField::Text(t) => Some(t),
            PromptField::Texts(v) if v.len() == 1 => v.first(),
            PromptField::Texts(_) => {
                return Err(
                    ApiError::invalid("exactly one prompt per request is supported")
                        .param("prompt"),
                )
            }
            PromptField::Tokens(_) => None,
        };
        let job = match (route, text) {
            (Route::Local(engine), Some(t)) => {
                submit_local(engine, engine.tokenize(t)?, stops, &req.fields)?
            }
            (Route::Local(engine), None) => {
                let PromptField::Tokens(tokens) = &req.prompt else {
                    unreachable!("only token prompts have no text")
                };
                submit_local(engine, tokens.clone(), stops, &req.fields)?
            }
            (Route::Remote(peers), Some(t)) => {
                submit_remote(peers, &req.model, Prompt::Text(t.clone()), stops, &req.fields)
                    .await?
            }
            (Route::Remote(_), None) => {
                return Err(ApiError::invalid(
                    "token-id prompts depend on the model's vocabulary; send text to a model served by a peer",
                )
                .param("prompt"))
            }
        };
        start(&st, Kind::Text, req.model, job, &req.fields, received)
    }
    .await;
    reply(&st, Kind::Text, prepared).await
}

/// Produces the response for a prepared request (or its error) and counts it.
async fn reply(st: &AppState, kind: Kind, prepared: Result<Started, ApiError>) -> Response {
    let result = match prepared {
        Ok(started) => respond(started).await,
        Err(e) => Err(e),
    };
    let resp = result.unwrap_or_else(IntoResponse::into_response);
    st.metrics
        .count_request(kind.metric(), resp.status().as_u16());
    resp
}

/// Everything a response needs besides the generation itself.
struct Reply {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    received: Instant,
    state: Arc<AppState>,
}

/// A running generation, here or on a peer.
enum Job {
    Local(Generation),
    Remote(Box<RemoteGeneration>),
}

/// One event of a job.
enum Out {
    Token(String),
    /// Text held to the end, the summary, and the micro-credits charged
    /// (remote requests with a recorded receipt).
    Done(String, Finish, Option<u64>),
    Failed(String),
}

impl Job {
    async fn next(&mut self) -> Option<Out> {
        match self {
            Job::Local(g) => g.next().await.map(|e| match e {
                Event::Token { text, .. } => Out::Token(text),
                Event::Done { text, finish } => Out::Done(text, finish, None),
                Event::Failed(e) => Out::Failed(e.to_string()),
            }),
            Job::Remote(g) => g.next().await.map(|e| match e {
                RemoteEvent::Token(text) => Out::Token(text),
                RemoteEvent::Done {
                    text,
                    finish,
                    credits,
                } => Out::Done(text, finish, credits),
                RemoteEvent::Failed(m) => Out::Failed(m),
            }),
        }
    }

    fn peer(&self) -> Option<NodeId> {
        match self {
            Job::Local(_) => None,
            Job::Remote(g) => Some(g.peer()),
        }
    }
}

fn submit_local(
    engine: &Engine,
    prompt: Vec<hypha_engine::Token>,
    stop: Vec<String>,
    fields: &SamplingFields,
) -> Result<Job, ApiError> {
    Ok(Job::Local(engine.submit(GenerateRequest {
        prompt,
        sampling: fields.sampling(),
        max_tokens: fields.max_tokens(),
        stop,
        // The node's own users come before the peers it serves.
        priority: i64::MAX,
    })?))
}

async fn submit_remote(
    peers: &Peers,
    model: &str,
    prompt: Prompt,
    stop: Vec<String>,
    fields: &SamplingFields,
) -> Result<Job, ApiError> {
    let req = InferenceRequest {
        request_id: peers.next_request_id(),
        model: model.to_owned(),
        prompt,
        sampling: crate::seeder::sampling_to_wire(&fields.sampling()),
        stop,
        max_tokens: fields.max_tokens(),
    };
    Ok(Job::Remote(Box::new(peers.start(req).await?)))
}

fn start(
    st: &Arc<AppState>,
    kind: Kind,
    model: String,
    job: Job,
    fields: &SamplingFields,
    received: Instant,
) -> Result<Started, ApiError> {
    let reply = Reply {
        kind,
        id: new_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        model,
        created: unix_now(),
        include_usage: fields.include_usage(),
        received,
        state: st.clone(),
    };
    if fields.stream {
        Ok(Started::Stream(stream_response(reply, job)))
    } else {
        Ok(Started::Whole(reply, job))
    }
}

enum Started {
    Stream(Response),
    Whole(Reply, Job),
}

/// Produces the response. A non-streaming reply is awaited here: when the
/// client leaves, hyper drops this future and the generation with it.
async fn respond(started: Started) -> Result<Response, ApiError> {
    match started {
        Started::Stream(resp) => Ok(resp),
        Started::Whole(reply, job) => collect(reply, job).await,
    }
}

/// Records one generation in the metrics: time to first token and between
/// tokens, token counts when it ends, and a cancellation when it is dropped
/// before it ended (the client went away).
struct Tracker {
    state: Arc<AppState>,
    first: bool,
    last: Instant,
    ended: bool,
}

impl Tracker {
    fn new(state: Arc<AppState>, received: Instant) -> Self {
        Self {
            state,
            first: true,
            last: received,
            ended: false,
        }
    }

    fn token(&mut self) {
        let now = Instant::now();
        let m = &self.state.metrics;
        if self.first {
            m.ttft.observe(now - self.last);
            self.first = false;
        } else {
            m.inter_token.observe(now - self.last);
        }
        self.last = now;
    }

    fn finished(&mut self, finish: &hypha_engine::Finish) {
        let m = &self.state.metrics;
        m.prompt_tokens
            .fetch_add(u64::from(finish.prompt_tokens), Ordering::Relaxed);
        m.completion_tokens
            .fetch_add(u64::from(finish.completion_tokens), Ordering::Relaxed);
        self.ended = true;
    }

    fn failed(&mut self) {
        self.ended = true;
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.ended {
            self.state.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The JSON of a server-side failure, as a response body or an SSE event.
fn server_error_json(message: &str) -> serde_json::Value {
    json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}})
}

async fn collect(reply: Reply, mut job: Job) -> Result<Response, ApiError> {
    let mut tracker = Tracker::new(reply.state.clone(), reply.received);
    let mut text = String::new();
    let outcome = loop {
        match job.next().await {
            Some(Out::Token(t)) => {
                tracker.token();
                text.push_str(&t);
            }
            Some(Out::Done(t, finish, credits)) => {
                text.push_str(&t);
                tracker.finished(&finish);
                break Ok((finish, credits));
            }
            Some(Out::Failed(e)) => break Err(e),
            None => break Err("the engine stopped".to_owned()),
        }
    };
    let (finish, credits) = outcome.map_err(|m| {
        tracker.failed();
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m)
    })?;
    let usage = Usage::new(finish.prompt_tokens, finish.completion_tokens, credits);
    let reason = finish.reason.as_str();
    let body = match reply.kind {
        Kind::Chat => json!({
            "id": reply.id,
            "object": "chat.completion",
            "created": reply.created,
            "model": reply.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": reason,
            }],
            "usage": usage,
        }),
        Kind::Text => json!({
            "id": reply.id,
            "object": "text_completion",
            "created": reply.created,
            "model": reply.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": reason,
            }],
            "usage": usage,
        }),
    };
    let mut resp = Json(body).into_response();
    add_peer_header(&mut resp, job.peer());
    if let Some(c) = credits {
        resp.headers_mut()
            .insert(CREDITS_HEADER, HeaderValue::from(c));
    }
    Ok(resp)
}

fn add_peer_header(resp: &mut Response, peer: Option<NodeId>) {
    if let Some(v) = peer.and_then(|p| HeaderValue::from_str(&p.to_string()).ok()) {
        resp.headers_mut().insert(PEER_HEADER, v);
    }
}

fn chunk(reply: &Reply, text: Option<&str>, role: bool, finish: Option<FinishReason>) -> String {
    let reason = finish.map(FinishReason::as_str);
    let v = match reply.kind {
        Kind::Chat => {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = text {
                delta.insert("content".into(), json!(t));
            }
            json!({
                "id": reply.id,
                "object": "chat.completion.chunk",
                "created": reply.created,
                "model": reply.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason}],
            })
        }
        Kind::Text => json!({
            "id": reply.id,
            "object": "text_completion",
            "created": reply.created,
            "model": reply.model,
            "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": reason}],
        }),
    };
    v.to_string()
}

fn usage_chunk(reply: &Reply, usage: Usage) -> String {
    let object = match reply.kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Text => "text_completion",
    };
    json!({
        "id": reply.id,
        "object": object,
        "created": reply.created,
        "model": reply.model,
        "choices": [],
        "usage": usage,
    })
    .to_string()
}

enum Phase {
    Start,
    Running,
    Ended,
}

struct StreamState {
    reply: Reply,
    job: Job,
    tracker: Tracker,
    phase: Phase,
    pending: std::collections::VecDeque<String>,
}

fn stream_response(reply: Reply, job: Job) -> Response {
    let peer = job.peer();
    let state = StreamState {
        tracker: Tracker::new(reply.state.clone(), reply.received),
        reply,
        job,
        phase: Phase::Start,
        pending: std::collections::VecDeque::with_capacity(4),
    };
    let mut resp = Sse::new(sse_events(state)).into_response();
    add_peer_header(&mut resp, peer);
    resp
}

fn sse_events(
    state: StreamState,
) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> + Send {
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.pending.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), s));
            }
            match s.phase {
                Phase::Ended => return None,
                Phase::Start => {
                    s.phase = Phase::Running;
                    if s.reply.kind == Kind::Chat {
                        let c = chunk(&s.reply, Some(""), true, None);
                        s.pending.push_back(c);
                    }
                }
                Phase::Running => match s.job.next().await {
                    Some(Out::Token(text)) => {
                        s.tracker.token();
                        if !text.is_empty() {
                            let c = chunk(&s.reply, Some(&text), false, None);
                            s.pending.push_back(c);
                        }
                    }
                    Some(Out::Done(text, finish, credits)) => {
                        s.tracker.finished(&finish);
                        if !text.is_empty() {
                            let c = chunk(&s.reply, Some(&text), false, None);
                            s.pending.push_back(c);
                        }
                        let c = chunk(&s.reply, None, false, Some(finish.reason));
                        s.pending.push_back(c);
                        if s.reply.include_usage {
                            let usage =
                                Usage::new(finish.prompt_tokens, finish.completion_tokens, credits);
                            let c = usage_chunk(&s.reply, usage);
                            s.pending.push_back(c);
                        }
                        s.pending.push_back("[DONE]".to_owned());
                        s.phase = Phase::Ended;
                    }
                    ended @ (Some(Out::Failed(_)) | None) => {
                        s.tracker.failed();
                        let message = match ended {
                            Some(Out::Failed(e)) => e,
                            _ => "the engine stopped".to_owned(),
                        };
                        s.pending.push_back(server_error_json(&message).to_string());
                        s.phase = Phase::Ended;
                    }
                },
            }
        }
    })
}
