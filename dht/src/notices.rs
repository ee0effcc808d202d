//! Unpaid notices published into the DHT: a seeder whose consumer left a
//! receipt offer unsigned stores a [`Notice`] under the consumer's receipt
//! key, where every other seeder's admission looks (`hypha_node`).
//!
//! A notice is stored only when it verifies ([`Notice::verify`]: the
//! consumer's own signature on an earlier receipt of the request, the
//! seeder's on the offer), only under its consumer's receipt key, only
//! when both parties' ids carry the network's proof of work, not when it
//! claims a time more than [`MAX_CLOCK_SKEW_MS`] ahead, and only while it
//! is younger than [`NOTICE_LIFETIME_MS`]. A receipt of the request that
//! both parties signed and that covers the offer voids the notice: the
//! store drops it when such a receipt is stored under the key, and does
//! not take it when one is already held.
//!
//! What a key keeps under flooding. Only seeders the consumer really made
//! a request at can sign a notice against it (the notice carries the
//! consumer's signature), and one seeder's notices count once (the newest
//! replaces older ones), so a key keeps one notice per seeder and at most
//! [`MAX_NOTICES_PER_KEY`], first come first kept: a consumer cannot push
//! honest notices out with notices of its own Sybil seeders, since while
//! those hold the room they count against it, and voiding them frees the
//! room. A full store drops the key farthest from this node, as the
//! receipt store does.

use std::collections::BTreeMap;

use hypha_ledger::{Notice, Receipt, VerifiedNotice};
use hypha_wire::NodeId;

use crate::receipts::{parties_carry_pow, receipts_key, MAX_CLOCK_SKEW_MS};
use crate::{DhtError, Distance};

/// Notices kept per consumer key, one per seeder: two distinct seeders
/// are what refuses a consumer, so room for eight leaves six to spare.
pub const MAX_NOTICES_PER_KEY: usize = 8;
/// Notices a node stores for others, in all (about 600 bytes each).
pub const MAX_STORED_NOTICES: usize = 4096;
/// How long a notice counts: a consumer that left a receipt unsigned at
/// two seeders is refused for this long after the later of them.
pub const NOTICE_LIFETIME_MS: u64 = 10 * 60 * 1000;
/// Notices one lookup collects from all its answers (answers may repeat
/// or be stale; the caller sorts out which are voided).
pub const MAX_NOTICES_FOUND: usize = 64;

/// True while a notice made at `at_ms` still counts at `now_ms`.
pub fn live(at_ms: u64, now_ms: u64) -> bool {
    at_ms.saturating_add(NOTICE_LIFETIME_MS) > now_ms
}

/// Checks a notice and the key it is offered under, at `now_ms`; both
/// parties' ids must carry `min_pow_bits` of proof of work.
pub fn check(
    key: &NodeId,
    notice: Notice,
    now_ms: u64,
    min_pow_bits: u32,
) -> Result<VerifiedNotice, DhtError> {
    let o = &notice.offered;
    if *key != receipts_key(&o.consumer) {
        return Err(DhtError::BadRecord(
            "notice stored under a key other than its consumer's",
        ));
    }
    if o.finished_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(DhtError::BadRecord("notice dated in the future"));
    }
    if !live(o.finished_ms, now_ms) {
        return Err(DhtError::BadRecord("notice too old to count"));
    }
    parties_carry_pow(o, min_pow_bits)?;
    notice
        .verify()
        .map_err(|_| DhtError::BadRecord("notice does not verify"))
}

/// Adds `new` to a key's notices: it replaces a notice of the same seeder
/// when newer, takes a free place otherwise, and is refused when the list
/// holds `max`. True when it was kept.
pub fn merge(list: &mut Vec<VerifiedNotice>, new: VerifiedNotice, max: usize) -> bool {
    if let Some(old) = list.iter_mut().find(|n| n.seeder() == new.seeder()) {
        if new.at_ms() > old.at_ms() {
            *old = new;
            return true;
        }
        return false;
    }
    if list.len() >= max {
        return false;
    }
    list.push(new);
    true
}

/// Notices this node holds for others.
#[derive(Debug)]
pub struct NoticeStore {
    local: NodeId,
    /// Each key's notices, by the key's distance from `local`.
    by_key: BTreeMap<Distance, Vec<VerifiedNotice>>,
    count: usize,
    limit: usize,
}

impl NoticeStore {
    /// An empty store of the node `local`, holding at most
    /// [`MAX_STORED_NOTICES`].
    pub fn new(local: NodeId) -> Self {
        Self::with_limit(local, MAX_STORED_NOTICES)
    }

    /// An empty store holding at most `limit` notices.
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

    /// Drops every notice that no longer counts at `now_ms`.
    pub fn expire(&mut self, now_ms: u64) {
        let mut count = 0;
        self.by_key.retain(|_, l| {
            l.retain(|n| live(n.at_ms(), now_ms));
            count += l.len();
            !l.is_empty()
        });
        self.count = count;
    }

    /// Stores a checked notice under `key` (its consumer's receipt key).
    /// A full store first drops expired notices, then the key farthest
    /// from this node when that is farther than `key`.
    pub fn put(
        &mut self,
        key: NodeId,
        notice: VerifiedNotice,
        now_ms: u64,
    ) -> Result<(), DhtError> {
        let here = self.distance(&key);
        if self.count >= self.limit {
            self.expire(now_ms);
        }
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
        list.retain(|n| live(n.at_ms(), now_ms));
        let kept = merge(list, notice, MAX_NOTICES_PER_KEY);
        let after = list.len();
        if after == 0 {
            self.by_key.remove(&here);
        }
        self.count = self.count + after - before;
        if kept {
            Ok(())
        } else {
            Err(DhtError::KeyFull {
                max: MAX_NOTICES_PER_KEY,
            })
        }
    }

    /// Drops the notices under `key` that `paid`, a both-signed receipt,
    /// voids.
    pub fn void(&mut self, key: &NodeId, paid: &Receipt) {
        let d = self.distance(key);
        let Some(list) = self.by_key.get_mut(&d) else {
            return;
        };
        let before = list.len();
        list.retain(|n| !n.voided_by(paid));
        self.count -= before - list.len();
        if list.is_empty() {
            self.by_key.remove(&d);
        }
    }

    /// True when exactly this notice is held under `key` and still counts
    /// at `now_ms`.
    pub fn holds(&self, key: &NodeId, notice: &Notice, now_ms: u64) -> bool {
        live(notice.offered.finished_ms, now_ms)
            && self
                .by_key
                .get(&self.distance(key))
                .is_some_and(|l| l.iter().any(|n| n.notice() == *notice))
    }

    /// The checked notices under `key` that still count at `now_ms`.
    pub fn get_verified(&self, key: &NodeId, now_ms: u64) -> Vec<VerifiedNotice> {
        self.by_key
            .get(&self.distance(key))
            .map(|l| {
                l.iter()
                    .filter(|n| live(n.at_ms(), now_ms))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The notices under `key` that still count at `now_ms`, as they
    /// travel.
    pub fn get(&self, key: &NodeId, now_ms: u64) -> Vec<Notice> {
        self.get_verified(key, now_ms)
            .iter()
            .map(VerifiedNotice::notice)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}
