//! The node's account as users see it: its balance and receipts, for
//! `hypha ledger` and `GET /v1/ledger`.
//!
//! balance = earned - spent, from the receipts in this node's own log
//! (every receipt it is party to). No identity starts with credits: a new
//! one is at zero and lives on the free tier until it has served.

use hypha_ledger::{Ledger, SignedReceipt, Totals};
use hypha_wire::NodeId;
use serde_json::{json, Value};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A receipt as JSON; `role` says what `me` was in it, when given.
pub fn receipt_json(r: &SignedReceipt, me: Option<NodeId>) -> Value {
    let rc = &r.receipt;
    let role = match me {
        Some(id) if id == rc.seeder => Some("served"),
        Some(id) if id == rc.consumer => Some("consumed"),
        _ => None,
    };
    json!({
        "request_id": rc.request_id,
        "role": role,
        "consumer": rc.consumer.to_string(),
        "seeder": rc.seeder.to_string(),
        "model_sha256": hex(&rc.model_sha256),
        "prompt_tokens": rc.prompt_tokens,
        "completion_tokens": rc.completion_tokens,
        "credits": rc.credits,
        "started_ms": rc.started_ms,
        "finished_ms": rc.finished_ms,
        "tokens_digest": hex(&rc.tokens_digest),
        "seeder_sig": hex(&r.seeder_sig),
        "consumer_sig": hex(&r.consumer_sig),
    })
}

/// Balance fields for `id`.
pub fn balance_json(id: NodeId, totals: &Totals) -> Value {
    let balance = clamp(hypha_ledger::balance(totals));
    json!({
        "node_id": id.to_string(),
        "earned": totals.earned,
        "spent": totals.spent,
        "balance": balance,
        "receipts_as_seeder": totals.receipts_as_seeder,
        "receipts_as_consumer": totals.receipts_as_consumer,
        "unit": "micro-credits",
    })
}

/// Micro-credits as a JSON number.
pub fn clamp(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// A node's own account, for its HTTP API.
pub struct Account {
    pub id: NodeId,
    pub ledger: Ledger,
}

/// What `GET /v1/ledger` shows: this node's balance and newest receipts.
pub fn ledger_json(id: NodeId, ledger: &Ledger, recent: usize) -> Value {
    let mut v = balance_json(id, &ledger.totals(&id));
    v["receipts"] = json!(ledger.receipts());
    v["recent"] = ledger
        .recent(recent)
        .iter()
        .map(|r| receipt_json(r, Some(id)))
        .collect();
    v
}
