//! Receipts published into the DHT: every settled receipt is stored under
//! both parties' receipt keys, so any node can collect a peer's receipts
//! and compute its balance from signed receipts alone.
//!
//! A receipt is stored only after both of its signatures and keys check
//! out, only under the key of a party it names, only when both parties'
//! ids carry the network's proof of work (so the identities a flood needs
//! cost what connections cost), and not when it claims to finish more
//! than [`MAX_CLOCK_SKEW_MS`] in the future. One receipt per (consumer,
//! seeder, request id): a cumulative receipt replaces an earlier one of
//! the same request when it covers more tokens.
//!
//! What a key keeps is what balances need under flooding. Only the key's
//! own node can sign receipts that name it, so a flood of its key comes
//! from that node and identities it controls, and it can only want its
//! spending to look smaller or its earnings larger. So a key keeps two
//! shares of its [`MAX_RECEIPTS_PER_KEY`]: receipts it spent on (three
//! quarters), kept by credits, largest first, so receipts of small sums
//! cannot push out a large one and receipts of large sums only add to what
//! it is seen to spend; and receipts it earned on (a quarter), newest
//! first, at most [`MAX_PER_COUNTERPARTY`] from any one consumer. A
//! balance computed from the DHT therefore counts a party's largest
//! spending and its newest earnings, up to those bounds.
//!
//! A node stores the keys it is close to (Kademlia sends it those). A full
//! store makes room by dropping the key farthest from this node, and
//! refuses a key farther than every key it holds: a flood of receipts
//! under fresh keys evicts an honest key only with keys ground to lie
//! closer to this node than that key does.

use std::collections::BTreeMap;

use hypha_ledger::{SignedReceipt, VerifiedReceipt};
use hypha_wire::NodeId;

use crate::{DhtError, Distance};

/// Receipts kept per party.
pub const MAX_RECEIPTS_PER_KEY: usize = 256;
/// Receipts a node stores for others, in all.
pub const MAX_STORED_RECEIPTS: usize = 50_000;
/// Receipts one store request may carry (64 x 376 bytes).
pub const MAX_RECEIPTS_PER_PUT: usize = 64;
/// Receipts a key keeps of its earnings from any one consumer: a seeder's
/// visible earnings come from at least four consumers.
pub const MAX_PER_COUNTERPARTY: usize = 16;
/// How far in the future a receipt's finish time may lie: clock skew
/// between two nodes' clocks, which NTP keeps well under this.
pub const MAX_CLOCK_SKEW_MS: u64 = 60 * 1000;

/// One request: a consumer's request id at one seeder.
fn same_request(a: &VerifiedReceipt, b: &VerifiedReceipt) -> bool {
    let (a, b) = (a.receipt(), b.receipt());
    a.consumer == b.consumer && a.seeder == b.seeder && a.request_id == b.request_id
}

/// True when the receipt records `key`'s node spending (it is the
/// consumer); otherwise it records its earning.
fn spent_by(key: &NodeId, r: &VerifiedReceipt) -> bool {
    receipts_key(&r.receipt().consumer) == *key
}

/// The share of a key's `max` receipts kept for its spending; the rest is
/// for its earnings.
pub const fn spent_share(max: usize) -> usize {
    max - max / 4
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

/// The order a key's spending is kept in: largest credits first, then
/// newest, then by request (so the order is total).
fn spend_rank(r: &VerifiedReceipt) -> impl Ord {
    let r = r.receipt();
    (
        std::cmp::Reverse(r.credits),
        std::cmp::Reverse(r.finished_ms),
        r.seeder,
        r.request_id,
    )
}

/// The order a key's earnings are kept in: newest first.
fn earn_rank(r: &VerifiedReceipt) -> impl Ord {
    let r = r.receipt();
    (std::cmp::Reverse(r.finished_ms), r.consumer, r.request_id)
}

/// Both parties of `r` carry `min_pow_bits` of proof of work: a receipt
/// or a notice of free identities would flood keys and stores.
pub(crate) fn parties_carry_pow(
    r: &hypha_ledger::Receipt,
    min_pow_bits: u32,
) -> Result<(), DhtError> {
    for party in [&r.consumer, &r.seeder] {
        let bits = hypha_ledger::pow_bits(party);
        if bits < min_pow_bits {
            return Err(DhtError::NoProofOfWork {
                bits,
                required: min_pow_bits,
            });
        }
    }
    Ok(())
}

/// Checks a receipt and the key it is offered under, at `now_ms`; both
/// parties' ids must carry `min_pow_bits` of proof of work.
pub fn check(
    key: &NodeId,
    receipt: SignedReceipt,
    now_ms: u64,
    min_pow_bits: u32,
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
    parties_carry_pow(r, min_pow_bits)?;
    receipt
        .verify()
        .map_err(|_| DhtError::BadRecord("receipt signatures do not verify"))
}

/// Adds `new` to a list of `key`'s receipts (one per request), keeping at
/// most `max`: [`spent_share`] of them for its spending, largest first,
/// and the rest for its earnings, newest first and at most
/// [`MAX_PER_COUNTERPARTY`] per consumer (see the module doc). The list
/// holds the spending first, then the earnings. True when `new` was kept.
pub fn merge(
    key: &NodeId,
    list: &mut Vec<VerifiedReceipt>,
    new: VerifiedReceipt,
    max: usize,
) -> bool {
    let mut replaced = None;
    if let Some(i) = list.iter().position(|r| same_request(r, &new)) {
        let Some(old) = list.get(i) else {
            return false;
        };
        if !supersedes(&new, old) {
            return false;
        }
        replaced = Some(list.remove(i));
    }
    let spent = spent_by(key, &new);
    let (mut spends, mut earns): (Vec<_>, Vec<_>) = list.drain(..).partition(|r| spent_by(key, r));
    let kept = if spent {
        let at = spends
            .binary_search_by(|r| spend_rank(r).cmp(&spend_rank(&new)))
            .unwrap_or_else(|i| i);
        let fits = at < spent_share(max);
        if fits {
            spends.insert(at, new);
            spends.truncate(spent_share(max));
        }
        fits
    } else {
        let consumer = new.receipt().consumer;
        let rank = earn_rank(&new);
        let room = max - spent_share(max);
        let of_same: Vec<usize> = earns
            .iter()
            .enumerate()
            .filter(|(_, r)| r.receipt().consumer == consumer)
            .map(|(i, _)| i)
            .collect();
        // At its bound, a consumer's newer earning replaces its oldest
        // (newest first: the last of them).
        let mut fits = true;
        if of_same.len() >= MAX_PER_COUNTERPARTY {
            match of_same.last() {
                Some(&i) if earns.get(i).is_some_and(|o| earn_rank(o) > rank) => {
                    earns.remove(i);
                }
                _ => fits = false,
            }
        }
        let at = earns
            .binary_search_by(|r| earn_rank(r).cmp(&rank))
            .unwrap_or_else(|i| i);
        fits &= at < room;
        if fits {
            earns.insert(at, new);
            earns.truncate(room);
        }
        fits
    };
    list.extend(spends);
    list.extend(earns);
    if let (false, Some(old)) = (kept, replaced) {
        // The later receipt did not fit where the earlier one did: keep
        // the earlier.
        merge(key, list, old, max);
    }
    kept
}

/// Receipts this node holds for others.
#[derive(Debug)]
pub struct ReceiptStore {
    /// This node's id: a full store keeps the keys closest to it.
    local: NodeId,
    /// Each key's receipts, by the key's distance from `local` (one
    /// distance per key), so the farthest is at hand.
    by_key: BTreeMap<Distance, Vec<VerifiedReceipt>>,
    count: usize,
    limit: usize,
}

impl ReceiptStore {
    /// An empty store of the node `local`, holding at most
    /// [`MAX_STORED_RECEIPTS`].
    pub fn new(local: NodeId) -> Self {
        Self::with_limit(local, MAX_STORED_RECEIPTS)
    }

    /// An empty store holding at most `limit` receipts.
    pub fn with_limit(local: NodeId, limit: usize) -> Self {
        Self {
            local,
            by_key: BTreeMap::new(),
            count: 0,
            limit,
        }
    }

    fn distance(&self, key: &NodeId) -> Distance {
        Distance::between(&self.local, key)
    }

    /// Stores a checked receipt under `key`. A full store first drops the
    /// key farthest from this node, when that is farther than `key`; when
    /// `key` is the farthest, the receipt is refused.
    pub fn put(&mut self, key: NodeId, receipt: VerifiedReceipt) -> Result<(), DhtError> {
        let here = self.distance(&key);
        if self.count >= self.limit {
            let farthest = self.by_key.keys().next_back().copied();
            match farthest.filter(|d| *d > here) {
                Some(d) => {
                    let dropped = self.by_key.remove(&d).map_or(0, |l| l.len());
                    self.count -= dropped;
                }
                None => return Err(DhtError::StoreFull),
            }
        }
        let list = self.by_key.entry(here).or_default();
        let before = list.len();
        merge(&key, list, receipt, MAX_RECEIPTS_PER_KEY);
        let after = list.len();
        if after == 0 {
            self.by_key.remove(&here);
        }
        self.count = self.count + after - before;
        Ok(())
    }

    /// True when exactly this receipt is already held under `key` (so it
    /// needs no second signature check).
    pub fn holds(&self, key: &NodeId, receipt: &SignedReceipt) -> bool {
        self.by_key
            .get(&self.distance(key))
            .is_some_and(|l| l.iter().any(|r| r.signed() == receipt))
    }

    /// The checked receipts under `key`: its spending, largest first, then
    /// its earnings, newest first.
    pub fn get_verified(&self, key: &NodeId) -> Vec<VerifiedReceipt> {
        self.by_key
            .get(&self.distance(key))
            .cloned()
            .unwrap_or_default()
    }

    /// The receipts under `key`, in [`Self::get_verified`]'s order.
    pub fn get(&self, key: &NodeId) -> Vec<SignedReceipt> {
        self.by_key
            .get(&self.distance(key))
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
