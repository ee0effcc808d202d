//! The routing table: 256 k-buckets by XOR distance from the local id.
//!
//! Bucket `i` holds contacts whose distance has its highest set bit at
//! position `i` (so bucket 255 covers half the key space, bucket 0 one id).
//! Each bucket keeps at most [`K`] contacts, least recently seen first. A
//! new contact for a full bucket does not evict anyone at once: the least
//! recently seen contact is pinged, and only if that ping fails is it
//! replaced (live, long-lived contacts are the most valuable ones).

use std::net::SocketAddr;

use hypha_wire::NodeId;

use crate::{Distance, K};

/// A node and where to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Contact {
    pub id: NodeId,
    pub addr: SocketAddr,
}

/// Requests in a row a contact may fail before it leaves the table: one
/// lost packet must not evict a live node.
pub const MAX_FAILURES: u8 = 3;

#[derive(Debug, Clone)]
struct Entry {
    contact: Contact,
    last_seen_ms: u64,
    /// Requests failed in a row.
    failures: u8,
}

#[derive(Debug, Clone, Default)]
struct Bucket {
    /// Least recently seen first.
    entries: Vec<Entry>,
    /// A contact waiting for a full bucket's oldest entry to fail a ping.
    pending: Option<Contact>,
    /// Last time a lookup or contact touched this bucket.
    touched_ms: u64,
}

/// What [`RoutingTable::update`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// Added to a bucket with room.
    Inserted,
    /// Already known: moved to most recently seen (its address updated).
    Refreshed,
    /// The bucket is full: ping `oldest`; if it fails, the new contact
    /// takes its place ([`RoutingTable::ping_failed`]).
    Full { oldest: Contact },
    /// The local id, or a full bucket already waiting on a ping.
    Ignored,
}

/// Contacts by distance from `local`.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    local: NodeId,
    /// `buckets[j]` is bucket `255 - j`, grown on demand: with N nodes only
    /// the farthest log2(N) or so buckets hold anyone, so a table costs
    /// about that many buckets, not 256.
    buckets: Vec<Bucket>,
}

fn slot(i: usize) -> usize {
    255 - i.min(255)
}

/// The bucket for a distance: the position of its highest set bit.
pub fn bucket_index(d: &Distance) -> Option<usize> {
    let lz = d.leading_zeros();
    (lz < 256).then(|| 255 - lz as usize)
}

impl RoutingTable {
    pub fn new(local: NodeId) -> Self {
        Self {
            local,
            buckets: Vec::new(),
        }
    }

    pub fn local(&self) -> NodeId {
        self.local
    }

    fn bucket_mut(&mut self, id: &NodeId) -> Option<&mut Bucket> {
        let j = slot(bucket_index(&Distance::between(&self.local, id))?);
        if self.buckets.len() <= j {
            self.buckets.resize_with(j + 1, Bucket::default);
        }
        self.buckets.get_mut(j)
    }

    fn bucket(&self, i: usize) -> Option<&Bucket> {
        self.buckets.get(slot(i))
    }

    /// Records that `contact` was seen (it sent us something, or answered).
    pub fn update(&mut self, contact: Contact, now_ms: u64) -> Update {
        let Some(bucket) = self.bucket_mut(&contact.id) else {
            return Update::Ignored;
        };
        bucket.touched_ms = now_ms;
        if let Some(pos) = bucket
            .entries
            .iter()
            .position(|e| e.contact.id == contact.id)
        {
            let mut e = bucket.entries.remove(pos);
            e.contact.addr = contact.addr;
            e.last_seen_ms = now_ms;
            e.failures = 0;
            bucket.entries.push(e);
            return Update::Refreshed;
        }
        if bucket.entries.len() < K {
            bucket.entries.push(Entry {
                contact,
                last_seen_ms: now_ms,
                failures: 0,
            });
            return Update::Inserted;
        }
        if bucket.pending.is_some() {
            return Update::Ignored;
        }
        bucket.pending = Some(contact);
        match bucket.entries.first() {
            Some(oldest) => Update::Full {
                oldest: oldest.contact,
            },
            None => Update::Ignored,
        }
    }

    /// The oldest contact answered its ping: it stays, the waiting contact
    /// is dropped.
    pub fn ping_answered(&mut self, oldest: &NodeId, now_ms: u64) {
        if let Some(b) = self.bucket_mut(oldest) {
            b.pending = None;
            if let Some(pos) = b.entries.iter().position(|e| e.contact.id == *oldest) {
                let mut e = b.entries.remove(pos);
                e.last_seen_ms = now_ms;
                b.entries.push(e);
            }
        }
    }

    /// The oldest contact failed its ping: the waiting contact replaces it.
    pub fn ping_failed(&mut self, oldest: &NodeId, now_ms: u64) {
        if let Some(b) = self.bucket_mut(oldest) {
            b.entries.retain(|e| e.contact.id != *oldest);
            if let Some(c) = b.pending.take() {
                if b.entries.len() < K {
                    b.entries.push(Entry {
                        contact: c,
                        last_seen_ms: now_ms,
                        failures: 0,
                    });
                }
            }
        }
    }

    /// Counts a failed request to `id`; after [`MAX_FAILURES`] in a row the
    /// contact is dropped.
    pub fn failed(&mut self, id: &NodeId) {
        let gone = self.bucket_mut(id).is_some_and(|b| {
            b.entries.iter_mut().any(|e| {
                if e.contact.id == *id {
                    e.failures = e.failures.saturating_add(1);
                    e.failures >= MAX_FAILURES
                } else {
                    false
                }
            })
        });
        if gone {
            self.remove(id);
        }
    }

    /// Forgets a contact that stopped answering.
    pub fn remove(&mut self, id: &NodeId) {
        if let Some(b) = self.bucket_mut(id) {
            b.entries.retain(|e| e.contact.id != *id);
            if b.entries.len() < K {
                if let Some(c) = b.pending.take() {
                    b.entries.push(Entry {
                        contact: c,
                        last_seen_ms: 0,
                        failures: 0,
                    });
                }
            }
        }
    }

    pub fn contains(&self, id: &NodeId) -> bool {
        let Some(i) = bucket_index(&Distance::between(&self.local, id)) else {
            return false;
        };
        self.bucket(i)
            .is_some_and(|b| b.entries.iter().any(|e| e.contact.id == *id))
    }

    /// The `n` known contacts closest to `target`, closest first.
    ///
    /// With `i` the bucket of `target` itself, contacts in bucket `i` are
    /// closer to the target than any in buckets below `i`, which are all
    /// closer than bucket `i + 1`, then `i + 2`, and so on; so whole tiers
    /// are taken in that order until `n` are found, and only those sorted.
    pub fn closest(&self, target: &NodeId, n: usize) -> Vec<Contact> {
        let start = bucket_index(&Distance::between(&self.local, target));
        let mut out: Vec<(Distance, Contact)> = Vec::with_capacity(n + K);
        let take = |out: &mut Vec<(Distance, Contact)>,
                    buckets: &mut dyn Iterator<Item = usize>| {
            let before = out.len();
            for i in buckets {
                if let Some(b) = self.bucket(i) {
                    out.extend(
                        b.entries
                            .iter()
                            .map(|e| (Distance::between(&e.contact.id, target), e.contact)),
                    );
                }
            }
            if let Some(tier) = out.get_mut(before..) {
                tier.sort_unstable_by_key(|a| a.0);
            }
        };
        match start {
            Some(i) => {
                take(&mut out, &mut std::iter::once(i));
                if out.len() < n {
                    take(&mut out, &mut (0..i).rev());
                }
                for j in i + 1..256 {
                    if out.len() >= n {
                        break;
                    }
                    take(&mut out, &mut std::iter::once(j));
                }
            }
            // The target is us: nearest buckets first.
            None => {
                for j in 0..256 {
                    if out.len() >= n {
                        break;
                    }
                    take(&mut out, &mut std::iter::once(j));
                }
            }
        }
        out.truncate(n);
        out.into_iter().map(|(_, c)| c).collect()
    }

    /// Contacts in the table.
    pub fn len(&self) -> usize {
        self.buckets.iter().map(|b| b.entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every contact with its bucket index and when it was last seen,
    /// farthest buckets first.
    pub fn contacts(&self) -> Vec<(usize, Contact, u64)> {
        self.buckets
            .iter()
            .enumerate()
            .flat_map(|(j, b)| {
                b.entries
                    .iter()
                    .map(move |e| (255 - j, e.contact, e.last_seen_ms))
            })
            .collect()
    }

    /// Bucket indices not touched since `before_ms`, from the farthest down
    /// to the nearest bucket holding anyone (nearer ones are covered by the
    /// self-lookup).
    pub fn stale_buckets(&self, before_ms: u64) -> Vec<usize> {
        let Some(last) = self.buckets.iter().rposition(|b| !b.entries.is_empty()) else {
            return Vec::new();
        };
        (0..=last)
            .filter(|&j| {
                self.buckets
                    .get(j)
                    .is_some_and(|b| b.touched_ms < before_ms)
            })
            .map(|j| 255 - j)
            .collect()
    }

    /// Marks a bucket as refreshed now.
    pub fn touch_bucket(&mut self, i: usize, now_ms: u64) {
        let j = slot(i);
        if let Some(b) = self.buckets.get_mut(j) {
            b.touched_ms = now_ms;
        }
    }
}
