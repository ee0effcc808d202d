//! The endpoints besides generation: `/health`, `/metrics`, `/v1/models`,
//! `/v1/network` and `/v1/ledger`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hypha_wire::NodeId;
use serde_json::json;

use crate::api::account;
use crate::api::errors::ApiError;
use crate::api::openai::{ModelCard, ModelList, ModelMeta, CAPABILITIES, CAPABILITIES_EMBEDDING};
use crate::api::state::AppState;
use crate::metrics::Gauges;

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
                    preempted: stats.preempted.load(Ordering::Relaxed),
                }
            }
            None => Gauges {
                queue_depth: 0,
                slots_busy: 0,
                slots_total: 0,
                prompt_tokens_reused: 0,
                preempted: 0,
            },
        }
    }
}

pub(crate) async fn health(State(st): State<Arc<AppState>>) -> Response {
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

pub(crate) async fn metrics(State(st): State<Arc<AppState>>) -> Response {
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
pub(crate) async fn network(State(st): State<Arc<AppState>>) -> Response {
    let Some(peers) = &st.peers else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "this node is not on a network: start it with --quic, --peer or --bootstrap",
        )
        .code("no_network")
        .into_response();
    };
    let now = crate::util::unix_ms();
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
        .map(|m| {
            json!({
                "model": m.name,
                "provider_count": m.providers.len(),
                "providers": m.providers.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "context_length": m.context_length,
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
pub(crate) async fn peer_ledger(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(node_id): axum::extract::Path<String>,
) -> Response {
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
    let Some(found) = d.receipts_of(&id).await else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the DHT lookup of this node's receipts did not finish; try again",
        )
        .code("lookup_failed")
        .into_response();
    };
    let receipts = found.receipts;
    let totals = hypha_ledger::totals_of(&id, &receipts);
    let mut v = account::balance_json(id, &totals);
    // What this node would honour of it when ranking its requests: that
    // needs the spending of each node it earned from that this node paid.
    let published = hypha_ledger::Published::of(&account.id, &id, &receipts);
    let mut spent = std::collections::HashMap::new();
    for (x, _) in &published.earned_from {
        if account.ledger.moved(&account.id, x) > 0 {
            if let Some(r) = d.receipts_of(x).await {
                spent.insert(
                    *x,
                    hypha_ledger::Published::of(&account.id, x, &r.receipts).spent_elsewhere,
                );
            }
        }
    }
    let judge = crate::inference::admission::LedgerJudge {
        me: account.id,
        ledger: &account.ledger,
        spent_elsewhere: |x: &NodeId| spent.get(x).copied(),
    };
    v["standing_here"] = json!(account::clamp(hypha_ledger::standing(
        &judge,
        &id,
        Some(&published),
    )));
    v["source"] = json!("dht");
    v["receipts"] = json!(receipts.len());
    // The DHT keeps a node's largest spending first: list by time.
    let mut recent: Vec<_> = receipts.iter().collect();
    recent.sort_by_key(|r| std::cmp::Reverse(r.receipt().finished_ms));
    v["recent"] = recent
        .into_iter()
        .take(LEDGER_RECENT)
        .map(|r| account::receipt_json(r.signed(), Some(id)))
        .collect();
    // Seeders that say it left a receipt unsigned (each the seeder's word,
    // over a receipt it did sign); two or more and seeders refuse it.
    v["unpaid_notices"] = found
        .notices
        .iter()
        .map(|n| {
            json!({
                "seeder": n.seeder().to_string(),
                "request_id": n.request_id(),
                "unpaid_tokens": n.unpaid_tokens(),
                "at_ms": n.at_ms(),
            })
        })
        .collect();
    Json(v).into_response()
}

/// Receipts shown by `GET /v1/ledger`.
const LEDGER_RECENT: usize = 20;

pub(crate) async fn ledger(State(st): State<Arc<AppState>>) -> Response {
    match &st.account {
        Some(a) => Json(account::ledger_json(a.id, &a.ledger, LEDGER_RECENT)).into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "this node has no ledger: it neither serves peers (--quic) nor uses them (--peer)",
        )
        .code("no_ledger")
        .into_response(),
    }
}

pub(crate) async fn list_models(State(st): State<Arc<AppState>>) -> Response {
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
        for m in &network {
            if m.name == local.model_id {
                providers.extend(m.providers.iter().map(ToString::to_string));
            }
        }
        providers.sort();
        providers.dedup();
        data.push(ModelCard {
            id: local.model_id.clone(),
            object: "model",
            created,
            owned_by: "hypha",
            context_length: Some(info.ctx_per_slot),
            capabilities: if local.engine.embeds() {
                &CAPABILITIES_EMBEDDING
            } else {
                &CAPABILITIES
            },
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
    for m in network {
        if st.local.as_ref().is_some_and(|l| l.answers_to(&m.name)) {
            continue;
        }
        data.push(ModelCard {
            id: m.name,
            object: "model",
            created,
            owned_by: "hypha",
            context_length: m.context_length,
            capabilities: &CAPABILITIES,
            meta: None,
            provider_count: m.providers.len(),
            providers: m.providers.iter().map(ToString::to_string).collect(),
        });
    }
    Json(ModelList {
        object: "list",
        data,
    })
    .into_response()
}
