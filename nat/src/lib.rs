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

/// Where an address may be reached from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Nothing may be sent there: unspecified, multicast, broadcast,
    /// link-local, documentation ranges.
    Never,
    Loopback,
    /// A private network (RFC 1918, shared address space, unique local
    /// IPv6): reachable only from inside it.
    Private,
    Global,
}

fn scope(ip: std::net::IpAddr) -> Scope {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local()
                || v4.is_documentation()
                || o[0] == 0
                || o[0] >= 240
            {
                Scope::Never
            } else if v4.is_loopback() {
                Scope::Loopback
            } else if v4.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
                Scope::Private
            } else {
                Scope::Global
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return scope(IpAddr::V4(v4));
            }
            let s = v6.segments();
            if v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xffc0) == 0xfe80
                || s[0] == 0x2001 && s[1] == 0x0db8
            {
                Scope::Never
            } else if v6.is_loopback() {
                Scope::Loopback
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Scope::Private
            } else {
                Scope::Global
            }
        }
    }
}

/// True when a node whose socket is bound to `local` may send a punch's
/// packets to `candidate`, an address a stranger named: a global address;
/// a loopback one only from a loopback socket; a private one only from a
/// socket bound inside the same private block (so a punch cannot make a
/// node probe the networks behind it); never port 0, multicast, broadcast,
/// link-local or documentation addresses.
pub fn punchable(candidate: SocketAddr, local: std::net::IpAddr) -> bool {
    if candidate.port() == 0 {
        return false;
    }
    let ip = candidate.ip();
    match scope(ip) {
        Scope::Never => false,
        Scope::Global => true,
        Scope::Loopback => scope(local) == Scope::Loopback,
        Scope::Private => scope(local) == Scope::Private && same_block(ip, local),
    }
}

/// Both in the same private block: 10/8, 172.16/12, 192.168/16,
/// 100.64/10, or one unique local /48.
fn same_block(a: std::net::IpAddr, b: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(v) => v.to_ipv4_mapped(),
    };
    match (v4(a), v4(b)) {
        (Some(a), Some(b)) => {
            let (a, b) = (u32::from(a), u32::from(b));
            [
                (0x0a00_0000, 8),
                (0xac10_0000, 12),
                (0xc0a8_0000, 16),
                (0x6440_0000, 10),
            ]
            .iter()
            .any(|&(net, bits)| {
                let mask = u32::MAX << (32 - bits);
                a & mask == net && b & mask == net
            })
        }
        (None, None) => match (a, b) {
            (IpAddr::V6(a), IpAddr::V6(b)) => a.segments()[..3] == b.segments()[..3],
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ok(c: &str, local: &str) -> bool {
        punchable(c.parse().unwrap(), local.parse().unwrap())
    }

    #[test]
    fn punches_go_only_where_a_stranger_may_send_this_node() {
        // Global addresses from anywhere.
        assert!(ok("198.18.0.10:4000", "0.0.0.0"));
        assert!(ok("8.8.8.8:443", "192.168.1.5"));
        assert!(ok("[2a00::1]:443", "::"));
        // Loopback from loopback only.
        assert!(ok("127.0.0.1:9", "127.0.0.1"));
        assert!(!ok("127.0.0.1:9", "0.0.0.0"));
        assert!(!ok("[::1]:9", "198.18.0.10"));
        // Private within one's own block only.
        assert!(ok("192.168.1.9:7", "192.168.1.5"));
        assert!(!ok("10.0.0.1:22", "192.168.1.5"));
        assert!(!ok("192.168.1.9:7", "0.0.0.0"));
        assert!(!ok("172.16.0.1:7", "8.8.8.8"));
        assert!(ok("[fd00:1:2::9]:7", "fd00:1:2::5"));
        assert!(!ok("[fd00:9::9]:7", "fd00:1:2::5"));
        // Never.
        for c in [
            "0.0.0.0:9",
            "8.8.8.8:0",
            "224.0.0.1:9",
            "255.255.255.255:9",
            "169.254.1.1:9",
            "192.0.2.1:9",
            "[fe80::1]:9",
            "[ff02::1]:9",
        ] {
            assert!(!ok(c, "127.0.0.1") && !ok(c, "0.0.0.0"), "{c}");
        }
        // An IPv4-mapped address is judged as the IPv4 address it holds.
        assert!(!ok("[::ffff:10.0.0.1]:22", "0.0.0.0"));
    }
}
