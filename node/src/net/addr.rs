//! Addresses: a peer to dial (`NodeId@host:port`) and the virtual
//! addresses (240.0.0.0/4) that stand for relayed paths on the QUIC socket.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;

use hypha_wire::NodeId;

/// A peer to dial: `NodeId@host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    pub id: NodeId,
    pub addr: SocketAddr,
}

impl FromStr for PeerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (id, addr) = s
            .split_once('@')
            .ok_or_else(|| format!("{s:?} is not NODE_ID@HOST:PORT"))?;
        let id: NodeId = id
            .parse()
            .map_err(|e| format!("bad node id in {s:?}: {e}"))?;
        let addr = addr
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {addr:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr:?} resolves to no address"))?;
        Ok(Self { id, addr })
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.id, self.addr)
    }
}

/// True for addresses of relayed paths (240.0.0.0/4, plain or written as
/// IPv4-mapped IPv6): never a real peer's address.
pub fn is_virtual(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(v4) => is_virtual_v4(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(is_virtual_v4),
    }
}

fn is_virtual_v4(ip: Ipv4Addr) -> bool {
    let [first, ..] = ip.octets();
    first >= 240 && !ip.is_broadcast()
}

/// The IPv4 form of an address that may be written as IPv4-mapped IPv6.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_addresses_are_class_e_only() {
        for a in ["240.0.0.1:1", "255.255.255.254:9", "[::ffff:240.0.0.7]:1"] {
            assert!(is_virtual(&a.parse().unwrap()), "{a}");
        }
        for a in [
            "239.255.255.255:1",
            "255.255.255.255:1",
            "198.18.0.1:7000",
            "[::1]:1",
            "[fd00::1]:1",
        ] {
            assert!(!is_virtual(&a.parse().unwrap()), "{a}");
        }
        assert_eq!(
            canonical("[::ffff:240.0.0.7]:1".parse().unwrap()),
            "240.0.0.7:1".parse::<SocketAddr>().unwrap()
        );
    }
}
