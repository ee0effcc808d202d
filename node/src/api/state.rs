//! What every handler shares ([`AppState`]): the local model, the peers,
//! the node's services for the admin views, the API key check, and the
//! [`EdgePolicy`] of hosts and web origins the edge's guard applies.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::http::{header, HeaderMap, StatusCode};
use hypha_engine::Engine;

use crate::api::account::Account;
use crate::api::errors::ApiError;
use crate::inference::route::Peers;
use crate::metrics::Metrics;
use crate::net::paths::Paths;
use crate::services::reach::Reachability;
use crate::services::relay_client::RelayClient;
use crate::services::relay_server::RelayService;

/// A model this node runs itself.
pub struct LocalModel {
    pub engine: Engine,
    pub model_id: String,
    /// Other names requests may use for it (e.g. `default`).
    pub aliases: Vec<String>,
}

impl LocalModel {
    pub(crate) fn answers_to(&self, model: &str) -> bool {
        model == self.model_id || self.aliases.iter().any(|a| a == model)
    }
}

/// What every handler shares.
pub struct AppState {
    pub local: Option<LocalModel>,
    pub peers: Option<Arc<Peers>>,
    /// How peers see this node: NAT mapping and candidates.
    pub reach: Option<Arc<Reachability>>,
    /// The node's identity and receipts, when it talks to peers.
    pub account: Option<Account>,
    /// Relaying: the service this node runs, its own reservations, and
    /// its relayed paths.
    pub relay: Option<Arc<RelayService>>,
    pub relay_client: Option<Arc<RelayClient>>,
    pub paths: Option<Arc<Paths>>,
    pub api_key: Option<String>,
    /// Which hosts and web origins may reach the API.
    pub edge: EdgePolicy,
    /// One permit per request with a body (a completion) in flight: held
    /// from the guard until its response, stream or JSON, has been sent or
    /// dropped.
    pub streams: Arc<tokio::sync::Semaphore>,
    /// A request body must arrive whole within this long.
    pub body_timeout: std::time::Duration,
    /// Templating and tokenizing for the local model, off the async
    /// workers.
    pub prep: Arc<crate::inference::prep::Preparer>,
    pub metrics: Arc<Metrics>,
    pub started: SystemTime,
}

/// Where a request runs.
pub(crate) enum Route<'a> {
    Local(&'a Engine),
    Remote(&'a Peers),
}

impl AppState {
    pub(crate) fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        // OpenAI clients send `Authorization: Bearer KEY`, Anthropic's
        // `x-api-key: KEY`.
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
        // Compare in constant time so the key cannot be guessed byte by byte.
        let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes()));
        if ok {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing or wrong API key (send Authorization: Bearer KEY, or x-api-key: KEY)",
            )
            .code("invalid_api_key"))
        }
    }

    /// The local engine when this node runs `model`, else the peers.
    pub(crate) fn route(&self, model: &str) -> Result<Route<'_>, ApiError> {
        if let Some(local) = self.local.as_ref().filter(|l| l.answers_to(model)) {
            return Ok(Route::Local(&local.engine));
        }
        if let Some(peers) = &self.peers {
            return Ok(Route::Remote(peers));
        }
        let serves = match &self.local {
            Some(l) => format!("it serves {:?}", l.model_id),
            None => "it serves no model and has no peers".to_owned(),
        };
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model {model:?} does not exist on this node; {serves}"),
        )
        .code("model_not_found")
        .param("model"))
    }
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who may reach the API: the names it answers to and the origins allowed
/// to call it from a browser.
#[derive(Debug, Clone, Default)]
pub struct EdgePolicy {
    /// The HTTP listener is on a loopback address: only loopback names and
    /// addresses reach it. Otherwise any IP literal does (DNS rebinding
    /// needs a name).
    pub loopback_only: bool,
    /// DNS names besides `localhost` that `Host` may carry (`--allow-host`).
    pub allowed_hosts: Vec<String>,
    /// Origins that may call the API from a browser (`--cors-origin`; `*`
    /// for any).
    pub cors_origins: Vec<String>,
    /// `/health` answers without the API key (`--public-health`).
    pub public_health: bool,
}

impl EdgePolicy {
    /// True when `host` (a `Host` header: name or address, maybe a port)
    /// names this node.
    pub fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host);
        if let Ok(ip) = name.parse::<IpAddr>() {
            return ip.is_loopback() || !self.loopback_only;
        }
        name.eq_ignore_ascii_case("localhost")
            || self
                .allowed_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(name))
    }

    pub(crate) fn cors_allowed(&self, origin: &str) -> bool {
        self.cors_origins.iter().any(|o| o == "*" || o == origin)
    }
}

/// The name or address in a `Host` value, without its port or the
/// brackets of an IPv6 address.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_checked_by_name_and_address() {
        let local = EdgePolicy {
            loopback_only: true,
            allowed_hosts: vec!["hypha.lan".into()],
            cors_origins: Vec::new(),
            public_health: false,
        };
        for ok in [
            "127.0.0.1:8420",
            "localhost:8420",
            "LOCALHOST",
            "[::1]:8420",
            "127.9.9.9",
            "hypha.lan:8420",
        ] {
            assert!(local.host_allowed(ok), "{ok}");
        }
        for bad in ["evil.example:8420", "192.168.1.5:8420", "", "[fd00::1]:1"] {
            assert!(!local.host_allowed(bad), "{bad}");
        }
        let open = EdgePolicy {
            loopback_only: false,
            ..local
        };
        assert!(open.host_allowed("192.168.1.5:8420"));
        assert!(open.host_allowed("[fd00::1]:1"));
        assert!(!open.host_allowed("evil.example"));
    }
}
