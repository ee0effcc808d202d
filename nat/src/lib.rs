//! Mycelium's NAT traversal, as sans-IO pieces the node drives: the STUN
//! codec every node answers on its own QUIC port ([`stun`]), the prober that
//! asks peers how they see this node and classifies the NAT's mapping
//! behaviour ([`probe`]), and the candidates a node can be reached at
//! ([`Candidate`]).
//!
//! Sans-IO: nothing here touches a socket, reads a clock or draws global
//! randomness. Time comes in as milliseconds and transaction ids from a
//! seed.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

pub mod probe;
pub mod stun;

use std::net::SocketAddr;

pub use probe::{Mapping, Observation, Prober};

/// Why bytes or a probe were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NatError {
    #[error("not a STUN message")]
    NotStun,
    #[error("malformed STUN message: {0}")]
    Malformed(String),
    #[error("unexpected STUN message: {0}")]
    Unexpected(&'static str),
    #[error("cannot encode STUN message: {0}")]
    Encode(String),
    #[error("too many probes in flight")]
    TooManyProbes,
}

/// How a candidate address was learned (RFC 8445's candidate types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CandidateKind {
    /// An address of this host's own interfaces.
    Host,
    /// The NAT's public address for our socket, as a peer saw it.
    ServerReflexive,
    /// An address on a relay that forwards to us.
    Relayed,
}

impl CandidateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::ServerReflexive => "srflx",
            Self::Relayed => "relay",
        }
    }
}

/// An address a peer may try to reach this node at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Candidate {
    pub kind: CandidateKind,
    pub addr: SocketAddr,
}

/// This node's candidates: its host address, the public address the NAT
/// maps it to when that is the same toward every peer (a mapping that
/// changes per destination is useless to anyone else), and its relays'
/// addresses; duplicates removed, in that order of preference.
pub fn candidates(host: SocketAddr, mapping: &Mapping, relays: &[SocketAddr]) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut push = |kind, addr| {
        let c = Candidate { kind, addr };
        if !out.iter().any(|o: &Candidate| o.addr == addr) {
            out.push(c);
        }
    };
    if !host.ip().is_unspecified() {
        push(CandidateKind::Host, host);
    }
    if let Mapping::EndpointIndependent { public } = mapping {
        push(CandidateKind::ServerReflexive, *public);
    }
    for r in relays {
        push(CandidateKind::Relayed, *r);
    }
    out
}
