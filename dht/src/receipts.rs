//! Receipts published into the DHT: every settled receipt is stored under
//! both parties' receipt keys, so any node can collect a peer's receipts
//! and compute its balance from signed receipts alone.
//!
//! A receipt is stored only after both of its signatures and keys check
//! out, and only under the key of a party it names. Each key holds the
//! newest [`MAX_RECEIPTS_PER_KEY`] receipts (by finish time), one per
//! (consumer, request id): a cumulative receipt replaces an earlier one of
//! the same request when it covers more tokens. A balance computed from the
//! DHT therefore covers a party's newest receipts, up to that bound.

use std::collections::HashMap;

use hypha_ledger::{ReceiptKey, SignedReceipt, VerifiedReceipt};
use hypha_wire::NodeId;

use crate::DhtError;

/// Receipts kept per party: the newest ones.
pub const MAX_RECEIPTS_PER_KEY: usize = 256;
/// Receipts a node stores for others, in all.
pub const MAX_STORED_RECEIPTS: usize = 50_000;
/// Receipts one store request may carry (64 x 376 bytes).
pub const MAX_RECEIPTS_PER_PUT: usize = 64;

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

/// Checks a receipt and the key it is offered under.
pub fn check(key: &NodeId, receipt: SignedReceipt) -> Result<VerifiedReceipt, DhtError> {
    let r = &receipt.receipt;
    if *key != receipts_key(&r.consumer) && *key != receipts_key(&r.seeder) {
        return Err(DhtError::BadRecord(
            "receipt stored under the key of a node it does not name",
        ));
    }
    receipt
        .verify()
        .map_err(|_| DhtError::BadRecord("receipt signatures do not verify"))
}

/// Adds `new` to a list of one key's receipts (newest first, one per
/// request), keeping at most `max`; true when the list changed.
pub fn merge(list: &mut Vec<VerifiedReceipt>, new: VerifiedReceipt, max: usize) -> bool {
    let k: ReceiptKey = new.receipt().key();
    if let Some(i) = list.iter().position(|r| r.receipt().key() == k) {
        let Some(old) = list.get(i) else {
            return false;
        };
        if !supersedes(&new, old) {
            return false;
        }
        list.remove(i);
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
    /// Stores a checked receipt under `key`.
    pub fn put(&mut self, key: NodeId, receipt: VerifiedReceipt) -> Result<(), DhtError> {
        if !self.by_key.contains_key(&key) && self.count >= MAX_STORED_RECEIPTS {
            return Err(DhtError::StoreFull);
        }
        let list = self.by_key.entry(key).or_default();
        let before = list.len();
        merge(list, receipt, MAX_RECEIPTS_PER_KEY);
        let after = list.len();
        self.count = self.count + after - before;
        if self.count > MAX_STORED_RECEIPTS {
            // Only a new key can grow past the bound, by one receipt.
            if let Some(l) = self.by_key.get_mut(&key) {
                l.pop();
                self.count -= 1;
            }
            return Err(DhtError::StoreFull);
        }
        Ok(())
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
