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
//! - [`notice`]: a seeder's signed evidence that a consumer left a receipt
//!   unsigned (its last paid receipt and the offer after it), for other
//!   seeders to refuse that consumer on.
//! - Balances: `earned - spent`. No credit is created: each receipt moves
//!   its credits from its consumer to its seeder, and a new identity starts
//!   at zero (it lives on the free tier until it has served).
//! - [`standing`]: what a seeder honours of a consumer's balance when it
//!   ranks its requests. Earnings count only as far as they trace back to
//!   the judging seeder's own payments: what it paid the consumer, and what
//!   the consumer earned from a node the judge paid, up to what that node
//!   still holds of those payments. Receipts a node signs with identities
//!   of its own move nothing the judge paid, so they buy nothing anywhere.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

pub mod log;
pub mod notice;
pub mod receipt;

pub use log::{Ledger, Recovery, Totals, LOG_FILE};
pub use notice::{unpaid_seeders, Notice, VerifiedNotice, NOTICE_BYTES};
pub use receipt::{
    price, verify_batch, Receipt, ReceiptKey, SignedReceipt, TokenDigest, VerifiedReceipt,
    RECEIPT_BYTES, SIGNED_RECEIPT_BYTES,
};

use hypha_wire::NodeId;

/// Proof-of-work difficulty by default: leading zero bits of
/// SHA-256("hypha-pow" || NodeId). About 2^16 key generations, a second or
/// so of one core. It buys no credits: it makes identities cost something
/// where the network keeps per-identity state (DHT records and receipts,
/// relay slots, the free tier's windows).
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

/// A balance from totals: earned minus spent; negative means the node
/// took more than it gave.
pub fn balance(totals: &Totals) -> i128 {
    i128::from(totals.earned) - i128::from(totals.spent)
}

/// Each (consumer, seeder, request id) of `receipts` once, by its receipt
/// with the most tokens.
fn latest_per_request<'a>(
    receipts: impl IntoIterator<Item = &'a Receipt>,
) -> std::collections::HashMap<(NodeId, NodeId, u64), &'a Receipt> {
    let mut latest: std::collections::HashMap<(NodeId, NodeId, u64), &Receipt> =
        std::collections::HashMap::new();
    for r in receipts {
        latest
            .entry((r.consumer, r.seeder, r.request_id))
            .and_modify(|held| {
                if r.completion_tokens > held.completion_tokens {
                    *held = r;
                }
            })
            .or_insert(r);
    }
    latest
}

/// What receipts published for a node (the DHT's) show a judge beyond its
/// own log: the node's earnings by consumer and its spending at others.
/// Receipts the judge is party to are left out: its own log holds them all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// Micro-credits the node earned from each consumer but the judge.
    pub earned_from: Vec<(NodeId, u64)>,
    /// Micro-credits the node spent at seeders other than the judge.
    pub spent_elsewhere: u64,
}

impl Published {
    /// Sums the checked `receipts` naming `id`, as `judge` sees them.
    pub fn of(judge: &NodeId, id: &NodeId, receipts: &[VerifiedReceipt]) -> Self {
        let latest = latest_per_request(receipts.iter().map(VerifiedReceipt::receipt));
        let mut earned: std::collections::BTreeMap<NodeId, u64> = Default::default();
        let mut spent_elsewhere = 0u64;
        for r in latest.values() {
            if r.seeder == *judge || r.consumer == *judge || r.seeder == r.consumer {
                continue;
            }
            if r.seeder == *id {
                let e = earned.entry(r.consumer).or_default();
                *e = e.saturating_add(r.credits);
            } else if r.consumer == *id {
                spent_elsewhere = spent_elsewhere.saturating_add(r.credits);
            }
        }
        Self {
            earned_from: earned.into_iter().collect(),
            spent_elsewhere,
        }
    }
}

/// What a judging seeder knows for [`standing`]: its own log, and what the
/// DHT showed it of other nodes.
pub trait Judge {
    /// Micro-credits the judge's log shows it paid `to`.
    fn paid(&self, to: &NodeId) -> u64;
    /// Micro-credits the judge's log shows `by` spent at the judge.
    fn spent_here(&self, by: &NodeId) -> u64;
    /// Micro-credits `of` is published to have spent at seeders other than
    /// the judge ([`Published::spent_elsewhere`]); `None` while unknown.
    fn spent_elsewhere(&self, of: &NodeId) -> Option<u64>;
}

/// A consumer's standing at a judging seeder, in micro-credits: the
/// earnings the judge honours minus everything the consumer is known to
/// have spent. Positive buys priority there; otherwise the consumer is on
/// the free tier.
///
/// The rule: credits are honoured only as far as they trace back, within
/// one hop, to the judge's own payments, since those are the only trade
/// the judge knows to be real (it received the tokens):
/// - what the judge paid the consumer counts whole;
/// - what the consumer earned from another node `x` counts up to what `x`
///   still holds of the judge's payments: what the judge paid `x`, less
///   what `x` spent at the judge and what it spent anywhere else but with
///   this consumer (nothing counts through an `x` whose spending is not
///   known yet). So `x` passes on the judge's credits once: paid out to
///   many nodes, they add up to no more than the judge paid it;
/// - any other earnings count nothing.
///
/// Receipts between a node and identities of its own move no credit the
/// judge paid, so fabricated trade is worth nothing at any seeder that did
/// not pay those identities, and a seeder pays only for tokens it received.
/// `published`: what the DHT shows of the consumer, when known.
pub fn standing(judge: &impl Judge, consumer: &NodeId, published: Option<&Published>) -> i128 {
    let direct = i128::from(judge.paid(consumer));
    let (via_others, spent_elsewhere) = published.map_or((0, 0), |p| {
        let via: i128 = p
            .earned_from
            .iter()
            .filter(|(x, _)| x != consumer)
            .map(|(x, earned)| {
                let paid = judge.paid(x);
                if paid == 0 {
                    return 0;
                }
                let Some(out) = judge.spent_elsewhere(x) else {
                    return 0;
                };
                let held = paid
                    .saturating_sub(judge.spent_here(x))
                    .saturating_sub(out.saturating_sub(*earned));
                i128::from((*earned).min(held))
            })
            .sum();
        (via, i128::from(p.spent_elsewhere))
    });
    direct + via_others - i128::from(judge.spent_here(consumer)) - spent_elsewhere
}

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

/// `id`'s totals over a set of checked receipts (for example those
/// published into the DHT), counting each (consumer, seeder, request id)
/// once, by its receipt with the most tokens.
pub fn totals_of(id: &NodeId, receipts: &[VerifiedReceipt]) -> Totals {
    let latest = latest_per_request(receipts.iter().map(VerifiedReceipt::receipt));
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
