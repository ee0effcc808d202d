//! Who a seeder serves, and how soon: the consumer's balance from signed
//! receipts (this node's log and the DHT's), the free tier for those with
//! nothing left, and consumers that left receipts unsigned.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use hypha_ledger::GRANT_MICRO;
use hypha_wire::NodeId;

use crate::services::dht::Discovery;
use crate::util::lock;

/// The grant an id gets: [`GRANT_MICRO`] with enough proof of work, else 0.
pub fn grant_for(id: &NodeId, pow_required: u32) -> u64 {
    if hypha_ledger::pow_bits(id) >= pow_required {
        GRANT_MICRO
    } else {
        0
    }
}

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
    until: std::sync::Mutex<std::collections::HashMap<NodeId, std::time::Instant>>,
    silent: std::sync::Mutex<std::collections::HashMap<NodeId, std::time::Instant>>,
}

/// How long a consumer that did not pay is refused.
pub const UNPAID_BAN: Duration = Duration::from_secs(10 * 60);

impl Default for Unpaid {
    fn default() -> Self {
        Self {
            until: std::sync::Mutex::new(std::collections::HashMap::new()),
            silent: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl Unpaid {
    pub(crate) fn note(&self, id: NodeId) {
        let now = std::time::Instant::now();
        let mut m = self.until.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_FREE_TIER_IDS {
            m.retain(|_, t| *t > now);
        }
        if m.len() < MAX_FREE_TIER_IDS {
            m.insert(id, now + UNPAID_BAN);
        }
    }

    /// `id`'s connection went silent while a signature was due.
    pub(crate) fn note_silent(&self, id: NodeId) {
        let now = std::time::Instant::now();
        let again = {
            let mut m = self.silent.lock().unwrap_or_else(|e| e.into_inner());
            m.retain(|_, t| now.duration_since(*t) < UNPAID_BAN);
            // A full table counts as a second time: too many strangers
            // losing their links at once must not switch the rule off.
            let again = m.contains_key(&id) || m.len() >= MAX_FREE_TIER_IDS;
            if !again {
                m.insert(id, now);
            }
            again
        };
        if again {
            self.note(id);
        }
    }

    pub(crate) fn owes(&self, id: &NodeId) -> bool {
        let m = self.until.lock().unwrap_or_else(|e| e.into_inner());
        m.get(id).is_some_and(|t| *t > std::time::Instant::now())
    }
}

/// Counts free-tier requests per identity in one-minute windows.
pub struct FreeTier {
    pub(crate) per_minute: u32,
    windows: std::sync::Mutex<std::collections::HashMap<NodeId, (std::time::Instant, u32)>>,
}

impl FreeTier {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            windows: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Counts one request by `id`; false when it is over the limit.
    pub(crate) fn allow(&self, id: NodeId, now: std::time::Instant) -> bool {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() >= MAX_FREE_TIER_IDS && !w.contains_key(&id) {
            w.retain(|_, (start, _)| now.duration_since(*start) < FREE_TIER_WINDOW);
            if w.len() >= MAX_FREE_TIER_IDS {
                return false;
            }
        }
        let entry = w.entry(id).or_insert((now, 0));
        if now.duration_since(entry.0) >= FREE_TIER_WINDOW {
            *entry = (now, 0);
        }
        if entry.1 >= self.per_minute {
            return false;
        }
        entry.1 += 1;
        true
    }
}

/// How long a consumer's balance from the DHT is used before it is looked
/// up again.
pub const BALANCE_FRESH: Duration = Duration::from_secs(30);
/// Consumers whose network balance is remembered.
const MAX_BALANCES: usize = 4096;

/// Consumers' balances computed from the receipts the DHT holds for them
/// (each checked), looked up in the background so admission never waits
/// on the network.
#[derive(Default)]
pub struct NetworkBalances {
    known: std::sync::Mutex<std::collections::HashMap<NodeId, (i128, std::time::Instant)>>,
    looking: std::sync::Mutex<HashSet<NodeId>>,
}

impl NetworkBalances {
    /// The last balance seen for `id`; starts a lookup when there is none
    /// or it is older than [`BALANCE_FRESH`].
    pub fn get(
        self: &Arc<Self>,
        id: &NodeId,
        grant: u64,
        discovery: Option<&Discovery>,
    ) -> Option<i128> {
        let now = std::time::Instant::now();
        let seen = lock(&self.known).get(id).copied();
        let stale = seen.is_none_or(|(_, at)| now.duration_since(at) >= BALANCE_FRESH);
        if let (true, Some(d)) = (stale, discovery) {
            if lock(&self.looking).insert(*id) {
                let (me, d, id) = (self.clone(), d.clone(), *id);
                tokio::spawn(async move {
                    let Some(receipts) = d.receipts_of(&id).await else {
                        // Not known, not remembered: the next request asks
                        // again.
                        lock(&me.looking).remove(&id);
                        return;
                    };
                    let b = hypha_ledger::balance(grant, &hypha_ledger::totals_of(&id, &receipts));
                    let mut known = lock(&me.known);
                    if known.len() >= MAX_BALANCES && !known.contains_key(&id) {
                        let now = std::time::Instant::now();
                        known.retain(|_, (_, at)| now.duration_since(*at) < BALANCE_FRESH);
                        if known.len() >= MAX_BALANCES {
                            known.clear();
                        }
                    }
                    known.insert(id, (b, std::time::Instant::now()));
                    drop(known);
                    lock(&me.looking).remove(&id);
                });
            }
        }
        seen.map(|(b, _)| b)
    }
}
