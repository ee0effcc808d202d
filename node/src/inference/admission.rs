//! Who a seeder serves, and how soon: the consumer's standing here from
//! signed receipts (this node's log and the DHT's, by
//! `hypha_ledger::standing`), the free tier for those with none, and
//! consumers that left receipts unsigned, here or (by the DHT's unpaid
//! notices) at two or more other seeders.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypha_ledger::{Judge, Ledger, Published, VerifiedNotice};
use hypha_wire::NodeId;
use tokio::sync::Notify;

use crate::services::dht::Discovery;
use crate::util::{lock, BoundedMap, Overflow, RateWindow, Tasks};

/// Requests per minute a consumer with no credits left may make.
pub const DEFAULT_FREE_TIER_PER_MINUTE: u32 = 30;
/// Identities the free-tier limiter remembers; beyond this, new free-tier
/// requests are refused until old windows expire.
pub const MAX_FREE_TIER_IDS: usize = 4096;
const FREE_TIER_WINDOW: Duration = Duration::from_secs(60);

/// Consumers that finished a request without countersigning its receipt;
/// they are refused until the entry ages out. A consumer whose connection
/// went silent or was lost instead while a signature was due (a relay or
/// a link lost) is refused only when that happens twice within
/// [`UNPAID_BAN`]: a network failure costs an honest consumer nothing.
/// (Any request can leave at most one receipt interval unpaid; a request
/// the consumer cancels is not held against it.)
pub struct Unpaid {
    /// Refused until then.
    until: Mutex<BoundedMap<NodeId, Instant>>,
    /// Went silent then, once.
    silent: Mutex<BoundedMap<NodeId, Instant>>,
}

/// How long a consumer that did not pay is refused.
pub const UNPAID_BAN: Duration = Duration::from_secs(10 * 60);

impl Default for Unpaid {
    fn default() -> Self {
        Self {
            until: Mutex::new(BoundedMap::new(MAX_FREE_TIER_IDS, Overflow::Refuse)),
            silent: Mutex::new(BoundedMap::new(MAX_FREE_TIER_IDS, Overflow::Refuse)),
        }
    }
}

impl Unpaid {
    pub(crate) fn note(&self, id: NodeId) {
        self.note_at(id, Instant::now());
    }

    fn note_at(&self, id: NodeId, now: Instant) {
        // A full table drops the ban that ends soonest: bans never stop.
        lock(&self.until).insert_evicting(
            id,
            now + UNPAID_BAN,
            |until| *until <= now,
            |until| *until,
        );
    }

    /// `id`'s connection went silent while a signature was due.
    pub(crate) fn note_silent(&self, id: NodeId) {
        let now = Instant::now();
        let again = {
            let mut m = lock(&self.silent);
            m.retain(|_, t| now.duration_since(*t) < UNPAID_BAN);
            // A full table counts as a second time: too many strangers
            // losing their links at once must not switch the rule off.
            m.contains_key(&id) || !m.insert(id, now, |_| false)
        };
        if again {
            self.note(id);
        }
    }

    pub(crate) fn owes(&self, id: &NodeId) -> bool {
        lock(&self.until)
            .get(id)
            .is_some_and(|t| *t > Instant::now())
    }
}

/// Counts free-tier requests per identity in one-minute windows.
pub struct FreeTier {
    pub(crate) per_minute: u32,
    windows: Mutex<BoundedMap<NodeId, RateWindow>>,
}

impl FreeTier {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            windows: Mutex::new(BoundedMap::new(MAX_FREE_TIER_IDS, Overflow::Refuse)),
        }
    }

    /// Counts one request by `id`; false when it is over the limit (or the
    /// limiter remembers [`MAX_FREE_TIER_IDS`] live windows already).
    pub(crate) fn allow(&self, id: NodeId, now: Instant) -> bool {
        let mut w = lock(&self.windows);
        let new = || RateWindow::new(FREE_TIER_WINDOW, self.per_minute, now);
        w.get_or_insert_with(id, |w| w.expired(now), new)
            .is_some_and(|w| w.allow(now))
    }
}

/// How long what the DHT shows of a consumer is used before it is looked
/// up again.
pub const BALANCE_FRESH: Duration = Duration::from_secs(30);
/// How long a consumer's first request waits for the DHT's view of it (a
/// lookup among a few nodes takes milliseconds); past it, admission goes
/// on with this node's own log and the view serves later requests.
pub const FIRST_VIEW_WAIT: Duration = Duration::from_secs(1);
/// Distinct seeders whose live unpaid notices refuse a consumer: one
/// seeder's word alone could be a lie (it could claim any request it
/// served went unpaid); two are two identities the consumer itself chose
/// to use.
pub const UNPAID_SEEDERS_TO_REFUSE: usize = 2;
/// Consumers whose published receipts are remembered (each summary holds
/// at most one entry per receipt a DHT key keeps).
const MAX_BALANCES: usize = 4096;
/// Lookups running at once; more consumers wait for a later request
/// (admission then uses this node's own log alone).
const MAX_BALANCE_LOOKUPS: usize = 64;

/// What the DHT shows this node of one consumer.
pub struct Seen {
    /// Its published receipts, checked and summed by [`Published::of`].
    pub published: Published,
    /// Live unpaid notices against it, one per seeder, none voided by a
    /// receipt the lookup found.
    pub notices: Vec<VerifiedNotice>,
}

impl Seen {
    /// The seeders whose notices still count at `now_ms`.
    pub fn unpaid_at(&self, now_ms: u64) -> BTreeSet<NodeId> {
        let since = now_ms.saturating_sub(hypha_dht::notices::NOTICE_LIFETIME_MS);
        hypha_ledger::unpaid_seeders(&self.notices, &[], since)
    }
}

/// What the receipts and notices the DHT holds for each consumer show this
/// node, looked up in the background: admission waits only for a
/// consumer's first view, at most [`FIRST_VIEW_WAIT`].
pub struct NetworkBalances {
    /// This node: the judge of every summary.
    me: NodeId,
    known: Mutex<BoundedMap<NodeId, (Arc<Seen>, Instant)>>,
    looking: Mutex<HashSet<NodeId>>,
    /// Woken whenever a lookup ends.
    looked: Notify,
    tasks: Tasks,
}

impl NetworkBalances {
    /// Summaries for node `me`; lookups run as tasks of `tasks`.
    pub fn new(me: NodeId, tasks: Tasks) -> Self {
        Self {
            me,
            known: Mutex::new(BoundedMap::new(MAX_BALANCES, Overflow::Clear)),
            looking: Mutex::new(HashSet::new()),
            looked: Notify::new(),
            tasks,
        }
    }

    /// The last summary seen for `id`; starts a lookup when there is none
    /// or it is older than [`BALANCE_FRESH`].
    pub fn get(self: &Arc<Self>, id: &NodeId, discovery: Option<&Discovery>) -> Option<Arc<Seen>> {
        let now = Instant::now();
        let seen = lock(&self.known).get(id).cloned();
        let stale = seen
            .as_ref()
            .is_none_or(|(_, at)| now.duration_since(*at) >= BALANCE_FRESH);
        if let (true, Some(d)) = (stale, discovery) {
            let start = {
                let mut looking = lock(&self.looking);
                looking.len() < MAX_BALANCE_LOOKUPS && looking.insert(*id)
            };
            if start {
                let (me, d, id) = (self.clone(), d.clone(), *id);
                self.tasks.spawn(async move {
                    let Some(found) = d.receipts_of(&id).await else {
                        // Not known, not remembered: the next request asks
                        // again.
                        lock(&me.looking).remove(&id);
                        me.looked.notify_waiters();
                        return;
                    };
                    let seen = Arc::new(Seen {
                        published: Published::of(&me.me, &id, &found.receipts),
                        notices: found.notices,
                    });
                    let at = Instant::now();
                    lock(&me.known).insert(id, (seen, at), |(_, seen)| {
                        at.duration_since(*seen) >= BALANCE_FRESH
                    });
                    lock(&me.looking).remove(&id);
                    me.looked.notify_waiters();
                });
            }
        }
        seen.map(|(p, _)| p)
    }

    /// [`Self::get`], waiting up to `wait` for the lookup when nothing is
    /// known of `id` yet.
    pub async fn get_or_wait(
        self: &Arc<Self>,
        id: &NodeId,
        discovery: Option<&Discovery>,
        wait: Duration,
    ) -> Option<Arc<Seen>> {
        if let Some(seen) = self.get(id, discovery) {
            return Some(seen);
        }
        discovery?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let woken = self.looked.notified();
            tokio::pin!(woken);
            // Registered before the check, so a lookup that ends between
            // the two still wakes this one.
            woken.as_mut().enable();
            if let Some((seen, _)) = lock(&self.known).get(id).cloned() {
                return Some(seen);
            }
            if !lock(&self.looking).contains(id) {
                // The lookup ended with nothing, or never started (too
                // many running).
                return None;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return None;
            }
        }
    }
}

/// A node as the judge of another's standing (`hypha_ledger::standing`):
/// its own log, and the spending of others as far as it knows it. The
/// seeder asks its `NetworkBalances` (looked up in the background when
/// unknown or stale); `/v1/ledger/{id}` looks the nodes up first.
pub struct LedgerJudge<'a, F: Fn(&NodeId) -> Option<u64>> {
    pub me: NodeId,
    pub ledger: &'a Ledger,
    pub spent_elsewhere: F,
}

impl<F: Fn(&NodeId) -> Option<u64>> Judge for LedgerJudge<'_, F> {
    fn paid(&self, to: &NodeId) -> u64 {
        self.ledger.moved(&self.me, to)
    }

    fn spent_here(&self, by: &NodeId) -> u64 {
        self.ledger.moved(by, &self.me)
    }

    fn spent_elsewhere(&self, of: &NodeId) -> Option<u64> {
        (self.spent_elsewhere)(of)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_ban_table_still_bans_and_drops_the_oldest_ban() {
        let unpaid = Unpaid::default();
        let id = |i: usize| {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&(i as u64).to_le_bytes());
            NodeId(b)
        };
        let start = Instant::now();
        for i in 0..MAX_FREE_TIER_IDS {
            unpaid.note_at(id(i), start + Duration::from_millis(i as u64));
        }
        assert!(unpaid.owes(&id(0)) && unpaid.owes(&id(MAX_FREE_TIER_IDS - 1)));
        let newcomer = id(MAX_FREE_TIER_IDS);
        unpaid.note_at(newcomer, start + Duration::from_secs(10));
        assert!(unpaid.owes(&newcomer), "a full table still bans");
        assert!(!unpaid.owes(&id(0)), "the oldest ban made room");
        assert!(unpaid.owes(&id(1)));
    }
}
