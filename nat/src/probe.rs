//! Asking peers how they see this node, and what that says about its NAT.
//!
//! The [`Prober`] sends binding requests to peers' QUIC ports (they answer
//! STUN there), retransmits a lost one (RFC 8489's doubling timeout, fewer
//! tries), and records each answer as an [`Observation`]: which peer, and
//! the address it saw us at. Observations from peers in different networks
//! tell the NAT's mapping behaviour (RFC 4787): the same public address
//! toward all means endpoint-independent mapping, which hole punching can
//! use; different ones mean the NAT maps per destination ("symmetric"),
//! and only a relay reaches such a node. Peers count by network group
//! ([`network_group`]), and a classification needs [`MIN_GROUPS`] of them:
//! two peers lying together, or many in one operator's block, cannot make
//! up a mapping or the public address this node publishes; at worst they
//! make it look per-destination, which costs a relay, not a hijack.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::stun::{binding_request, decode, Message};
use crate::NatError;

/// First retransmission timeout.
pub const INITIAL_RTO_MS: u64 = 500;
/// Requests sent per probe before it counts as unanswered.
pub const MAX_TRIES: u32 = 4;
/// Probes in flight at once.
pub const MAX_PROBES: usize = 64;
/// Observations kept (the newest).
pub const MAX_OBSERVATIONS: usize = 16;

/// What one peer saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// The peer's address we asked.
    pub server: SocketAddr,
    /// Our address as the peer saw it.
    pub mapped: SocketAddr,
    pub at_ms: u64,
}

/// The NAT's mapping behaviour, as far as the observations tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapping {
    /// Fewer than [`MIN_GROUPS`] networks' peers answered.
    Unknown,
    /// Every peer saw our own address: no NAT in the way.
    Public { addr: SocketAddr },
    /// Every peer saw the same public address (RFC 4787
    /// endpoint-independent mapping): it can be handed to others.
    EndpointIndependent { public: SocketAddr },
    /// Peers saw different addresses: the NAT maps per destination.
    EndpointDependent { seen: Vec<SocketAddr> },
}

impl Mapping {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Public { .. } => "public",
            Self::EndpointIndependent { .. } => "endpoint-independent",
            Self::EndpointDependent { .. } => "endpoint-dependent",
        }
    }
}

/// Network groups a classification needs: more than two, so that two
/// peers cannot decide it together.
pub const MIN_GROUPS: usize = 3;

/// The group a peer's address counts in: a public IPv4 address by its /16
/// and a public IPv6 one by its /32 (one operator's block counts once);
/// an address outside the public internet's allocation (private,
/// loopback, shared, benchmarking ranges: a LAN or a lab, where strangers
/// cannot send from) by itself and its port.
pub fn network_group(addr: SocketAddr) -> (u8, u128) {
    let port = u128::from(addr.port());
    use std::net::IpAddr;
    let ip = match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let special = v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 198 && (o[1] & 0xfe) == 18);
            let bits = u128::from(u32::from(v4));
            if special {
                (4, bits << 16 | port)
            } else {
                (5, bits >> 16)
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let special =
                v6.is_loopback() || (s[0] & 0xfe00) == 0xfc00 || (s[0] & 0xffc0) == 0xfe80;
            let bits = u128::from(v6);
            if special {
                // The port takes the interface identifier's low bits: a lab's
                // addresses differ above them.
                (6, bits ^ port)
            } else {
                (7, bits >> 96)
            }
        }
    }
}

/// Classifies the mapping from observations by distinct peers (the newest
/// per peer, then the newest per network group), given the local address
/// of the socket.
pub fn classify(local: SocketAddr, observations: &[Observation]) -> Mapping {
    let mut per_group: Vec<((u8, u128), Observation)> = Vec::new();
    for o in observations.iter().rev() {
        let g = network_group(o.server);
        if !per_group.iter().any(|(p, _)| *p == g) {
            per_group.push((g, *o));
        }
    }
    if per_group.len() < MIN_GROUPS {
        return Mapping::Unknown;
    }
    let mut seen: Vec<SocketAddr> = per_group.iter().map(|(_, o)| o.mapped).collect();
    seen.sort();
    seen.dedup();
    match seen.as_slice() {
        [one] if *one == local => Mapping::Public { addr: *one },
        [one] => Mapping::EndpointIndependent { public: *one },
        _ => Mapping::EndpointDependent { seen },
    }
}

/// A binding request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Probe {
    server: SocketAddr,
    tries: u32,
    next_ms: u64,
    rto_ms: u64,
}

/// Sends binding requests and collects what peers saw.
#[derive(Debug)]
pub struct Prober {
    local: SocketAddr,
    inflight: HashMap<[u8; 12], Probe>,
    observations: Vec<Observation>,
    outbox: Vec<Transmit>,
    rng: u64,
}

impl Prober {
    /// A prober for the socket bound at `local`; `seed` draws transaction
    /// ids.
    pub fn new(local: SocketAddr, seed: u64) -> Self {
        Self {
            local,
            inflight: HashMap::new(),
            observations: Vec::new(),
            outbox: Vec::new(),
            rng: seed | 1,
        }
    }

    fn txid(&mut self) -> [u8; 12] {
        let mut out = [0u8; 12];
        for chunk in out.chunks_mut(4) {
            // xorshift64*
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            let v = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
            chunk.copy_from_slice(&v.to_le_bytes()[..4]);
        }
        out
    }

    /// Asks `server` how it sees us.
    pub fn probe(&mut self, server: SocketAddr, now_ms: u64) -> Result<(), NatError> {
        if self.inflight.len() >= MAX_PROBES {
            return Err(NatError::TooManyProbes);
        }
        let txid = self.txid();
        self.outbox.push(Transmit {
            to: server,
            bytes: binding_request(txid)?,
        });
        self.inflight.insert(
            txid,
            Probe {
                server,
                tries: 1,
                next_ms: now_ms.saturating_add(INITIAL_RTO_MS),
                rto_ms: INITIAL_RTO_MS,
            },
        );
        Ok(())
    }

    /// A STUN response that arrived from `from`. Responses to requests we
    /// did not send, or from another address than we asked, are ignored.
    pub fn handle_response(
        &mut self,
        from: SocketAddr,
        packet: &[u8],
        now_ms: u64,
    ) -> Result<Option<Observation>, NatError> {
        let Message::Response { txid, mapped } = decode(packet)? else {
            return Err(NatError::Unexpected("a request where a response was due"));
        };
        match self.inflight.get(&txid) {
            Some(p) if p.server == from => {}
            _ => return Ok(None),
        }
        self.inflight.remove(&txid);
        let o = Observation {
            server: from,
            mapped,
            at_ms: now_ms,
        };
        if self.observations.len() >= MAX_OBSERVATIONS {
            self.observations.remove(0);
        }
        self.observations.push(o);
        Ok(Some(o))
    }

    /// Retransmits overdue requests and gives up on those out of tries.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let mut resend = Vec::new();
        self.inflight.retain(|txid, p| {
            if p.next_ms > now_ms {
                return true;
            }
            if p.tries >= MAX_TRIES {
                return false;
            }
            p.tries += 1;
            p.rto_ms = p.rto_ms.saturating_mul(2);
            p.next_ms = now_ms.saturating_add(p.rto_ms);
            resend.push((*txid, p.server));
            true
        });
        for (txid, to) in resend {
            if let Ok(bytes) = binding_request(txid) {
                self.outbox.push(Transmit { to, bytes });
            }
        }
    }

    /// The next request to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.outbox.is_empty() {
            None
        } else {
            Some(self.outbox.remove(0))
        }
    }

    /// When [`Prober::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.inflight.values().map(|p| p.next_ms).min()
    }

    pub fn observations(&self) -> &[Observation] {
        &self.observations
    }

    /// The mapping behaviour the observations show.
    pub fn mapping(&self) -> Mapping {
        classify(self.local, &self.observations)
    }

    /// Probes waiting for an answer.
    pub fn pending(&self) -> usize {
        self.inflight.len()
    }
}
