//! The ledger: receipts signed by both parties, kept in an append-only,
//! hash-chained, crash-safe log, and the balances derived from them.
//!
//! - [`receipt`]: the receipt layout, signing, and verification (sans-IO:
//!   keys and bytes in, a [`VerifiedReceipt`] out; no clock, no files).
//! - [`log`]: the log file. Records carry their length, a checksum and the
//!   hash of the previous record; appends are group-committed with one
//!   fsync per batch and acknowledged only after it; recovery truncates a
//!   torn tail (a cut or damaged last batch, its commit record on disk or
//!   not) and reports it, and refuses a log corrupted anywhere else. An index of (consumer, request
//!   id) rebuilt from the log rejects replays across restarts; a later
//!   receipt of the same request replaces the one held.
//! - Balances: `grant + earned - spent`, where only the grant creates
//!   credits and each receipt moves them from its consumer to its seeder.
//!   The grant goes only to identities whose key carries a proof of work
//!   ([`pow_bits`]).
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

pub mod log;
pub mod receipt;

pub use log::{Ledger, Recovery, Totals, LOG_FILE};
pub use receipt::{
    price, verify_batch, Receipt, ReceiptKey, SignedReceipt, TokenDigest, VerifiedReceipt,
    RECEIPT_BYTES, SIGNED_RECEIPT_BYTES,
};

use hypha_wire::NodeId;

/// Micro-credits granted to a new identity with enough proof of work: a
/// few short requests' worth, so a newcomer can try the network, while
/// minting identities costs more than the grant is worth.
pub const GRANT_MICRO: u64 = 1_000_000;
/// Proof-of-work difficulty by default: leading zero bits of
/// SHA-256("hypha-pow" || NodeId). About 2^16 key generations, a second or
/// so of one core.
pub const DEFAULT_POW_BITS: u32 = 16;

/// Why a ledger operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    #[error("malformed receipt: {0}")]
    Malformed(String),
    #[error("the {role} key does not match the {role} id in the receipt")]
    WrongKey { role: &'static str },
    #[error("a signature on receipt {request_id} does not verify")]
    BadSignature { request_id: u64 },
    #[error("receipt {request_id} of consumer {consumer} is already in the ledger")]
    Replay { consumer: NodeId, request_id: u64 },
    #[error("ledger corrupt at byte {offset}: {reason}")]
    Corrupt { offset: u64, reason: String },
    #[error("ledger i/o: {0}")]
    Io(String),
    #[error("{0} is in use by another node (one data directory per node)")]
    InUse(String),
    #[error("the ledger stopped accepting writes after a failed write: {0}")]
    Poisoned(String),
    #[error("the ledger is closed")]
    Closed,
}

/// A node's id: SHA-256 of its Ed25519 public key.
pub fn node_id_of(public_key: &[u8; 32]) -> NodeId {
    let digest = ring::digest::digest(&ring::digest::SHA256, public_key);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    NodeId(out)
}

/// Proof of work an id carries: leading zero bits of
/// SHA-256("hypha-pow" || id). Hashing the id again (rather than using the
/// id's own zero bits) keeps ids uniform over the DHT's key space.
pub fn pow_bits(id: &NodeId) -> u32 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"hypha-pow");
    ctx.update(&id.0);
    let d = ctx.finish();
    let mut bits = 0;
    for b in d.as_ref() {
        if *b == 0 {
            bits += 8;
        } else {
            bits += b.leading_zeros();
            break;
        }
    }
    bits
}

/// A balance from a grant and totals; negative means the node owes.
pub fn balance(grant: u64, totals: &Totals) -> i128 {
    i128::from(grant) + i128::from(totals.earned) - i128::from(totals.spent)
}

/// `id`'s totals over a set of checked receipts (for example those
/// published into the DHT), counting each (consumer, seeder, request id)
/// once, by its receipt with the most tokens.
/// The receipts a log's records stand for, in log order: a later record
/// of a request replaces the earlier one (the log takes a later receipt of
/// a request only when it extends the one held), so each request appears
/// once, at its last record.
pub fn latest_of_each(records: Vec<SignedReceipt>) -> Vec<SignedReceipt> {
    let mut last: std::collections::HashMap<ReceiptKey, usize> = std::collections::HashMap::new();
    for (i, r) in records.iter().enumerate() {
        last.insert(r.receipt.key(), i);
    }
    records
        .into_iter()
        .enumerate()
        .filter(|(i, r)| last.get(&r.receipt.key()) == Some(i))
        .map(|(_, r)| r)
        .collect()
}

pub fn totals_of(id: &NodeId, receipts: &[VerifiedReceipt]) -> Totals {
    let mut latest: std::collections::HashMap<(NodeId, NodeId, u64), &Receipt> =
        std::collections::HashMap::new();
    for v in receipts {
        let r = v.receipt();
        if r.seeder != *id && r.consumer != *id {
            continue;
        }
        latest
            .entry((r.consumer, r.seeder, r.request_id))
            .and_modify(|held| {
                if r.completion_tokens > held.completion_tokens {
                    *held = r;
                }
            })
            .or_insert(r);
    }
    let mut t = Totals::default();
    for r in latest.values() {
        if r.seeder == *id {
            t.earned = t.earned.saturating_add(r.credits);
            t.receipts_as_seeder += 1;
        }
        if r.consumer == *id {
            t.spent = t.spent.saturating_add(r.credits);
            t.receipts_as_consumer += 1;
        }
    }
    t
}
