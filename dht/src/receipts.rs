//! Receipts published into the DHT: every settled receipt is stored under
//! both parties' receipt keys, so any node can collect a peer's receipts
//! and compute its balance from signed receipts alone.
//!
//! A receipt is stored only after both of its signatures and keys check
//! out, only under the key of a party it names, and not when it claims to
//! finish in the future (beyond [`MAX_CLOCK_SKEW_MS`]). Each key holds the
//! newest [`MAX_RECEIPTS_PER_KEY`] receipts (by finish time), one per
//! (consumer, seeder, request id): a cumulative receipt replaces an earlier
//! one of the same request when it covers more tokens; at most
//! [`MAX_PER_COUNTERPARTY`] of them with any one other party, so receipts a
//! node makes with identities of its own cannot push out the rest. A
//! balance computed from the DHT covers a party's newest receipts, up to
//! those bounds. A full store makes room by dropping the key whose newest
//! receipt is oldest.

use std::collections::HashMap;

use hypha_ledger::{SignedReceipt, VerifiedReceipt};
use hypha_wire::NodeId;

use crate::DhtError;

/// Receipts kept per party: the newest ones.
pub const MAX_RECEIPTS_PER_KEY: usize = 256;
/// Receipts a node stores for others, in all.
pub const MAX_STORED_RECEIPTS: usize = 50_000;
/// Receipts one store request may carry (64 x 376 bytes).
pub const MAX_RECEIPTS_PER_PUT: usize = 64;
/// Receipts kept per key with any one counterparty.
pub const MAX_PER_COUNTERPARTY: usize = 64;
/// How far in the future a receipt's finish time may lie (clock skew).
pub const MAX_CLOCK_SKEW_MS: u64 = 10 * 60 * 1000;

/// One request: a consumer's request id at one seeder.
fn same_request(a: &VerifiedReceipt, b: &VerifiedReceipt) -> bool {
    let (a, b) = (a.receipt(), b.receipt());
    a.consumer == b.consumer && a.seeder == b.seeder && a.request_id == b.request_id
}

/// The other party of a receipt under `key`.
fn counterparty(key: &NodeId, r: &VerifiedReceipt) -> NodeId {
    let rc = r.receipt();
    if receipts_key(&rc.consumer) == *key {
        rc.seeder
    } else {
        rc.consumer
    }
}

/// The DHT key a node's receipts are stored under.
pub fn receipts_key(id: &NodeId) -> NodeId {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"hypha-receipts\0");
    ctx.update(&id.0);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    NodeId(out)
}

/// True when `new` should replace `old` for the same request: it covers
/// more (receipts of one request are cumulative).
fn supersedes(new: &VerifiedReceipt, old: &VerifiedReceipt) -> bool {
    let (n, o) = (new.receipt(), old.receipt());
    (n.completion_tokens, n.finished_ms, n.credits)
        > (o.completion_tokens, o.finished_ms, o.credits)
}

/// Checks a receipt and the key it is offered under, at `now_ms`.
pub fn check(
    key: &NodeId,
    receipt: SignedReceipt,
    now_ms: u64,
) -> Result<VerifiedReceipt, DhtError> {
    let r = &receipt.receipt;
    if *key != receipts_key(&r.consumer) && *key != receipts_key(&r.seeder) {
        return Err(DhtError::BadRecord(
            "receipt stored under the key of a node it does not name",
        ));
    }
    if r.finished_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(DhtError::BadRecord("receipt finishes in the future"));
    }
    receipt
        .verify()
        .map_err(|_| DhtError::BadRecord("receipt signatures do not verify"))
}

/// Adds `new` to a list of `key`'s receipts (newest first, one per
/// request, at most [`MAX_PER_COUNTERPARTY`] per other party), keeping at
/// most `max`; true when the list changed.
pub fn merge(
    key: &NodeId,
    list: &mut Vec<VerifiedReceipt>,
    new: VerifiedReceipt,
    max: usize,
) -> bool {
    if let Some(i) = list.iter().position(|r| same_request(r, &new)) {
        let Some(old) = list.get(i) else {
            return false;
        };
        if !supersedes(&new, old) {
            return false;
        }
        list.remove(i);
    }
    let other = counterparty(key, &new);
    let with_other: Vec<usize> = list
        .iter()
        .enumerate()
        .filter(|(_, r)| counterparty(key, r) == other)
        .map(|(i, _)| i)
        .collect();
    if with_other.len() >= MAX_PER_COUNTERPARTY {
        // Newest first: the last one with this party is its oldest.
        let Some(&oldest) = with_other.last() else {
            return false;
        };
        let newer = list
            .get(oldest)
            .is_some_and(|o| o.receipt().finished_ms < new.receipt().finished_ms);
        if !newer {
            return false;
        }
        list.remove(oldest);
    }
    let at = list
        .iter()
        .position(|r| r.receipt().finished_ms < new.receipt().finished_ms)
        .unwrap_or(list.len());
    if at >= max {
        return false;
    }
    list.insert(at, new);
    list.truncate(max);
    true
}

/// Receipts this node holds for others.
#[derive(Debug, Default)]
pub struct ReceiptStore {
    by_key: HashMap<NodeId, Vec<VerifiedReceipt>>,
    count: usize,
}

impl ReceiptStore {
    /// Stores a checked receipt under `key`. A full store first drops the
    /// key whose newest receipt is oldest (another than `key`).
    pub fn put(&mut self, key: NodeId, receipt: VerifiedReceipt) -> Result<(), DhtError> {
        if self.count >= MAX_STORED_RECEIPTS {
            let stalest = self
                .by_key
                .iter()
                .filter(|(k, _)| **k != key)
                .min_by_key(|(_, l)| l.first().map_or(0, |r| r.receipt().finished_ms))
                .map(|(k, _)| *k);
            match stalest.and_then(|k| self.by_key.remove(&k)) {
                Some(l) => self.count -= l.len(),
                None => return Err(DhtError::StoreFull),
            }
        }
        let list = self.by_key.entry(key).or_default();
        let before = list.len();
        merge(&key, list, receipt, MAX_RECEIPTS_PER_KEY);
        self.count = self.count + list.len() - before;
        Ok(())
    }

    /// True when exactly this receipt is already held under `key` (so it
    /// needs no second signature check).
    pub fn holds(&self, key: &NodeId, receipt: &SignedReceipt) -> bool {
        self.by_key
            .get(key)
            .is_some_and(|l| l.iter().any(|r| r.signed() == receipt))
    }

    /// The checked receipts under `key`, newest first.
    pub fn get_verified(&self, key: &NodeId) -> Vec<VerifiedReceipt> {
        self.by_key.get(key).cloned().unwrap_or_default()
    }

    /// The receipts under `key`, newest first.
    pub fn get(&self, key: &NodeId) -> Vec<SignedReceipt> {
        self.by_key
            .get(key)
            .map(|l| l.iter().map(|r| r.signed().clone()).collect())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}
