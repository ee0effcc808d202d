//! Who may hold one of the node's inbound connection slots.
//!
//! Every connection a stranger opens costs buffers and a task, so the
//! listener counts them: at most `max` in all, [`MAX_PER_IP`] from one IP
//! address (taken before the handshake, when only the address is known)
//! and [`MAX_PER_IDENTITY`] per identity (checked once the handshake names
//! the peer). A connection attempt that finds every slot taken sheds the
//! connected peer that has been idle longest, if one has carried no stream
//! for [`SHED_AFTER_IDLE`]; otherwise it is refused. While more than
//! [`RETRY_ABOVE_HANDSHAKES`] handshakes are in flight, an attempt from an
//! address not yet validated is sent a Retry first, so a flood from forged
//! source addresses costs one stateless packet each.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypha_wire::NodeId;

use crate::util::lock;

/// Connections from one IP address at once: room for the nodes of a
/// household or a carrier-grade NAT behind one address, a fraction of the
/// node's slots.
pub const MAX_PER_IP: usize = 64;
/// Connections one identity holds at once: one each way and a relayed one
/// being upgraded, with one to spare.
pub const MAX_PER_IDENTITY: usize = 4;
/// A peer carrying no stream for this long may lose its slot to a newcomer
/// when the node is full.
pub const SHED_AFTER_IDLE: Duration = Duration::from_secs(2);
/// Handshakes in flight beyond which unvalidated addresses get a Retry.
pub const RETRY_ABOVE_HANDSHAKES: usize = 16;

/// Why an attempt gets no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is taken and no peer is idle enough to shed.
    Full,
    /// The address holds [`MAX_PER_IP`] connections.
    PerIp,
    /// The identity holds [`MAX_PER_IDENTITY`] connections.
    PerIdentity,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Full => "every connection slot is taken",
            Self::PerIp => "too many connections from this address",
            Self::PerIdentity => "too many connections from this identity",
        })
    }
}

struct Slot {
    ip: IpAddr,
    peer: Option<NodeId>,
    conn: Option<quinn::Connection>,
    streams: usize,
    last_active: Instant,
}

#[derive(Default)]
struct Inner {
    next: u64,
    slots: HashMap<u64, Slot>,
    per_ip: HashMap<IpAddr, usize>,
    per_id: HashMap<NodeId, usize>,
}

impl Inner {
    fn remove(&mut self, id: u64) -> Option<Slot> {
        let slot = self.slots.remove(&id)?;
        dec(&mut self.per_ip, &slot.ip);
        if let Some(p) = &slot.peer {
            dec(&mut self.per_id, p);
        }
        Some(slot)
    }

    fn handshaking(&self) -> usize {
        self.slots.values().filter(|s| s.conn.is_none()).count()
    }
}

fn dec<K: std::hash::Hash + Eq>(m: &mut HashMap<K, usize>, k: &K) {
    if let Some(n) = m.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            m.remove(k);
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Slots {
    max: usize,
    inner: Arc<Mutex<Inner>>,
}

/// One slot, held for as long as its connection is served.
pub struct SlotGuard {
    id: u64,
    inner: Arc<Mutex<Inner>>,
}

/// What the listener does with a new attempt.
pub enum Admit {
    /// Go on with the handshake, holding this slot.
    Slot(SlotGuard),
    /// Send a Retry and hold nothing.
    Retry,
    Refuse(Refused),
}

impl Slots {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            inner: Arc::new(Mutex::new(Inner::default())),
        }
    }

    /// Decides on an attempt from `ip`, `validated` when its address was
    /// proven by a Retry token.
    pub fn admit(&self, ip: IpAddr, validated: bool, now: Instant) -> Admit {
        let mut g = lock(&self.inner);
        if !validated && g.handshaking() >= RETRY_ABOVE_HANDSHAKES {
            return Admit::Retry;
        }
        if g.per_ip.get(&ip).copied().unwrap_or(0) >= MAX_PER_IP {
            return Admit::Refuse(Refused::PerIp);
        }
        if g.slots.len() >= self.max {
            let idlest = g
                .slots
                .iter()
                .filter(|(_, s)| {
                    s.conn.is_some()
                        && s.streams == 0
                        && now.saturating_duration_since(s.last_active) >= SHED_AFTER_IDLE
                })
                .min_by_key(|(_, s)| s.last_active)
                .map(|(id, _)| *id);
            let Some(id) = idlest else {
                return Admit::Refuse(Refused::Full);
            };
            if let Some(slot) = g.remove(id) {
                if let Some(conn) = slot.conn {
                    tracing::info!(peer = ?slot.peer, "shedding an idle peer: every slot is taken");
                    conn.close(SHED_CODE, b"shed: idle while the node is full");
                }
            }
        }
        let id = g.next;
        g.next += 1;
        g.slots.insert(
            id,
            Slot {
                ip,
                peer: None,
                conn: None,
                streams: 0,
                last_active: now,
            },
        );
        *g.per_ip.entry(ip).or_default() += 1;
        Admit::Slot(SlotGuard {
            id,
            inner: self.inner.clone(),
        })
    }

    /// Slots taken now.
    pub fn len(&self) -> usize {
        lock(&self.inner).slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The application close code of a shed connection (the same as a normal
/// close: the peer did nothing wrong).
const SHED_CODE: quinn::VarInt = quinn::VarInt::from_u32(0);

impl SlotGuard {
    /// The handshake named `peer` on `conn`: fails when that identity
    /// already holds its share (the slot is given back).
    pub fn identified(
        &self,
        peer: NodeId,
        conn: &quinn::Connection,
        now: Instant,
    ) -> Result<(), Refused> {
        let mut g = lock(&self.inner);
        if g.per_id.get(&peer).copied().unwrap_or(0) >= MAX_PER_IDENTITY {
            g.remove(self.id);
            return Err(Refused::PerIdentity);
        }
        // Shed while handshaking: the connection is closed already.
        if !g.slots.contains_key(&self.id) {
            return Err(Refused::Full);
        }
        *g.per_id.entry(peer).or_default() += 1;
        if let Some(s) = g.slots.get_mut(&self.id) {
            s.peer = Some(peer);
            s.conn = Some(conn.clone());
            s.last_active = now;
        }
        Ok(())
    }

    /// A stream opened (`true`) or ended (`false`) on this connection.
    pub fn stream(&self, opened: bool, now: Instant) {
        let mut g = lock(&self.inner);
        if let Some(s) = g.slots.get_mut(&self.id) {
            if opened {
                s.streams += 1;
            } else {
                s.streams = s.streams.saturating_sub(1);
            }
            s.last_active = now;
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        lock(&self.inner).remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn slot(a: Admit) -> SlotGuard {
        match a {
            Admit::Slot(s) => s,
            Admit::Retry => panic!("retry"),
            Admit::Refuse(r) => panic!("refused: {r}"),
        }
    }

    #[test]
    fn one_address_takes_at_most_its_share() {
        let s = Slots::new(MAX_PER_IP + 8);
        let now = Instant::now();
        let mut held: Vec<SlotGuard> = Vec::new();
        // Handshakes run one at a time here, so no Retry comes up.
        for _ in 0..MAX_PER_IP {
            let g = slot(s.admit(A, true, now));
            held.push(g);
        }
        assert!(matches!(
            s.admit(A, true, now),
            Admit::Refuse(Refused::PerIp)
        ));
        let _b = slot(s.admit(B, true, now));
        held.pop();
        let _a = slot(s.admit(A, true, now));
    }

    #[test]
    fn unvalidated_addresses_are_retried_under_load() {
        let s = Slots::new(1024);
        let now = Instant::now();
        let held: Vec<SlotGuard> = (0..RETRY_ABOVE_HANDSHAKES)
            .map(|i| slot(s.admit(IpAddr::from([10, 1, 0, i as u8]), false, now)))
            .collect();
        assert!(matches!(s.admit(B, false, now), Admit::Retry));
        // A validated address goes on; so does anyone once load drops.
        let _v = slot(s.admit(B, true, now));
        drop(held);
        let _u = slot(s.admit(B, false, now));
    }
}
