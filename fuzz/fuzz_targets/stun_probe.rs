//! STUN datagrams fed to the NAT prober after it sent its probes, the way
//! the node hands it every STUN packet arriving on its QUIC port: genuine
//! binding responses, arbitrary bytes, arbitrary bytes dressed with a
//! STUN header and an outstanding transaction id, and damaged responses,
//! from the probed peer or from anyone else, interleaved with timer ticks.
//!
//! A shadow model of the documented behaviour checks the prober after
//! every step:
//!
//! - A datagram becomes an observation exactly when it decodes as a
//!   binding success response for a probe still outstanding and comes from
//!   the address that probe was sent to; the observation carries the
//!   decoded address, and the probe is done (a transaction is taken once).
//!   Anything else changes nothing.
//! - Retransmissions follow RFC 8489's schedule as `probe.rs` documents it:
//!   the timeout doubles from `INITIAL_RTO_MS`, each probe is sent
//!   `MAX_TRIES` times and then given up; `poll_timeout` names the earliest
//!   deadline; at most `MAX_PROBES` are in flight.
//! - `classify` agrees with the observations (the newest per network
//!   group, `network_group`): `Unknown` exactly when fewer than
//!   `MIN_GROUPS` groups answered, `Public` when all
//!   saw the socket's own address, `EndpointIndependent` when all saw one
//!   other address, `EndpointDependent` with every distinct address
//!   otherwise; reordering the peers changes nothing. `candidates` lists
//!   each address once, a server-reflexive one only for an
//!   endpoint-independent mapping.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hypha_nat::probe::{
    classify, network_group, Mapping, Observation, INITIAL_RTO_MS, MAX_OBSERVATIONS, MAX_PROBES,
    MAX_TRIES, MIN_GROUPS,
};
use hypha_nat::stun::{binding_response, decode, Message, HEADER_BYTES, MAGIC_COOKIE};
use hypha_nat::{candidates, CandidateKind, Prober};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// Steps per input.
const MAX_STEPS: usize = 64;
/// The longest a tick moves the clock: past a whole probe's retransmission
/// schedule (500 + 1000 + 2000 + 4000 ms) in one step.
const MAX_TICK_MS: u64 = 10_000;
/// The most observations one direct `classify` call is given: more than the
/// prober keeps, to cover lists it never builds.
const MAX_CLASSIFY_INPUT: usize = 2 * MAX_OBSERVATIONS;
/// Relay addresses one `candidates` call is given.
const MAX_RELAYS: usize = 3;
/// A Unix time in milliseconds to start the clock at.
const START_MS: u64 = 1_795_000_000_000;
/// STUN message type of a binding success response (RFC 8489 section 5).
const BINDING_SUCCESS: [u8; 2] = [0x01, 0x01];

/// Addresses peers are asked at, datagrams come from, and the NAT maps to:
/// a few that differ only in port or in IPv4-mapped form, so that "the
/// same peer" and "the same address" are tested at their edges.
const ADDRS: [&str; 8] = [
    "198.18.0.1:3478",
    "198.18.0.1:3479",
    "[::ffff:198.18.0.1]:3478",
    "198.18.0.2:4000",
    "[2a00:1450::1]:4000",
    "10.0.0.7:5000",
    "203.0.113.9:61000",
    "0.0.0.0:4000",
];

/// What the prober should hold for one probe.
#[derive(Debug, Clone, Copy)]
struct Shadow {
    server: SocketAddr,
    tries: u32,
    next_ms: u64,
    rto_ms: u64,
}

struct World {
    prober: Prober,
    now_ms: u64,
    /// Outstanding probes by transaction id (ordered, so a run replays).
    outstanding: BTreeMap<[u8; 12], Shadow>,
    /// Transactions answered or given up.
    done: BTreeSet<[u8; 12]>,
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

fn run(u: &mut Unstructured) -> Result<()> {
    let local = addr(u)?;
    let mut w = World {
        prober: Prober::new(local, u.arbitrary()?),
        now_ms: START_MS,
        outstanding: BTreeMap::new(),
        done: BTreeSet::new(),
    };
    for _ in 0..MAX_STEPS {
        if u.is_empty() {
            break;
        }
        match u.choose_index(4)? {
            0 => probe(u, &mut w)?,
            1 => respond(u, &mut w)?,
            2 => tick(u, &mut w)?,
            _ => classify_any(u, local)?,
        }
        check_state(&w);
        check_mapping(local, w.prober.observations(), &w.prober.mapping());
        check_candidates(u, &w.prober.mapping())?;
    }
    Ok(())
}

fn addr(u: &mut Unstructured) -> Result<SocketAddr> {
    if u.ratio(1, 4)? {
        let ip = if u.arbitrary()? {
            IpAddr::V4(Ipv4Addr::from(u.arbitrary::<[u8; 4]>()?))
        } else {
            IpAddr::V6(Ipv6Addr::from(u.arbitrary::<[u8; 16]>()?))
        };
        return Ok(SocketAddr::new(ip, u.arbitrary()?));
    }
    Ok(u.choose(&ADDRS)?.parse().expect("the pool parses"))
}

fn probe(u: &mut Unstructured, w: &mut World) -> Result<()> {
    let server = addr(u)?;
    let full = w.outstanding.len() >= MAX_PROBES;
    match w.prober.probe(server, w.now_ms) {
        Ok(()) => assert!(!full, "a probe past MAX_PROBES was sent"),
        Err(e) => {
            assert!(full, "a probe was refused with room left: {e}");
            assert!(w.prober.poll_transmit().is_none());
            return Ok(());
        }
    }
    let t = w.prober.poll_transmit().expect("a probe sends a request");
    assert_eq!(t.to, server);
    assert!(w.prober.poll_transmit().is_none(), "one request per probe");
    let Ok(Message::Request { txid }) = decode(&t.bytes) else {
        panic!("a probe sends a binding request: {:02x?}", t.bytes);
    };
    assert!(
        !w.outstanding.contains_key(&txid) && !w.done.contains(&txid),
        "transaction ids repeat"
    );
    w.outstanding.insert(
        txid,
        Shadow {
            server,
            tries: 1,
            next_ms: w.now_ms + INITIAL_RTO_MS,
            rto_ms: INITIAL_RTO_MS,
        },
    );
    Ok(())
}

/// A transaction id: mostly one the prober used, sometimes any.
fn txid(u: &mut Unstructured, w: &World) -> Result<[u8; 12]> {
    let used: Vec<[u8; 12]> = w.outstanding.keys().chain(w.done.iter()).copied().collect();
    if used.is_empty() || u.ratio(1, 8)? {
        return u.arbitrary();
    }
    Ok(*u.choose(&used)?)
}

fn respond(u: &mut Unstructured, w: &mut World) -> Result<()> {
    let txid = txid(u, w)?;
    let from = match w.outstanding.get(&txid) {
        Some(s) if u.ratio(3, 4)? => s.server,
        _ => addr(u)?,
    };
    let packet = match u.choose_index(4)? {
        0 => binding_response(txid, addr(u)?).expect("a response encodes"),
        1 => u.arbitrary::<Vec<u8>>()?,
        2 => dressed(u, txid)?,
        _ => {
            let mut p = binding_response(txid, addr(u)?).expect("a response encodes");
            hypha_fuzz::flip_bytes(u, &mut p)?;
            p
        }
    };
    let decoded = decode(&packet);
    let obs_before = w.prober.observations().to_vec();
    let pending_before = w.prober.pending();
    let takes = match &decoded {
        Ok(Message::Response { txid: t, .. }) => {
            w.outstanding.get(t).is_some_and(|s| s.server == from)
        }
        _ => false,
    };
    match w.prober.handle_response(from, &packet, w.now_ms) {
        Ok(Some(o)) => {
            assert!(takes, "an observation from a datagram no probe awaits");
            let Ok(Message::Response { txid: t, mapped }) = decoded else {
                unreachable!("takes implies a response");
            };
            assert_eq!(
                o,
                Observation {
                    server: from,
                    mapped,
                    at_ms: w.now_ms
                }
            );
            w.outstanding.remove(&t);
            w.done.insert(t);
            assert_eq!(w.prober.pending(), pending_before - 1);
            let obs = w.prober.observations();
            let kept = obs_before.len().min(MAX_OBSERVATIONS - 1);
            assert_eq!(obs.len(), kept + 1);
            assert_eq!(obs[..kept], obs_before[obs_before.len() - kept..]);
            assert_eq!(obs.last(), Some(&o));
        }
        Ok(None) => {
            assert!(!takes, "a response to an outstanding probe was ignored");
            assert!(matches!(decoded, Ok(Message::Response { .. })));
            assert_eq!(w.prober.observations(), obs_before.as_slice());
        }
        Err(_) => {
            assert!(!matches!(decoded, Ok(Message::Response { .. })));
            assert_eq!(w.prober.observations(), obs_before.as_slice());
        }
    }
    Ok(())
}

/// Arbitrary bytes behind a STUN header: the first byte's top bits clear,
/// the cookie and `txid` in place, and mostly the binding success type and
/// the right length, so the attribute decoder sees arbitrary attributes.
fn dressed(u: &mut Unstructured, txid: [u8; 12]) -> Result<Vec<u8>> {
    let mut p = vec![0u8; HEADER_BYTES];
    u.fill_buffer(&mut p[..4])?;
    let body = u.arbitrary::<Vec<u8>>()?;
    if u.ratio(3, 4)? {
        p[..2].copy_from_slice(&BINDING_SUCCESS);
        let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
        p[2..4].copy_from_slice(&len.to_be_bytes());
    }
    p[0] &= 0x3f;
    p[4..8].copy_from_slice(&MAGIC_COOKIE);
    p[8..20].copy_from_slice(&txid);
    p.extend_from_slice(&body);
    Ok(p)
}

fn tick(u: &mut Unstructured, w: &mut World) -> Result<()> {
    w.now_ms += u.int_in_range(0..=MAX_TICK_MS)?;
    let now = w.now_ms;
    let mut expected = Vec::new();
    let mut given_up = Vec::new();
    for (txid, s) in w.outstanding.iter_mut() {
        if s.next_ms > now {
            continue;
        }
        if s.tries >= MAX_TRIES {
            given_up.push(*txid);
            continue;
        }
        s.tries += 1;
        s.rto_ms *= 2;
        s.next_ms = now + s.rto_ms;
        expected.push((*txid, s.server));
    }
    for t in given_up {
        w.outstanding.remove(&t);
        w.done.insert(t);
    }
    w.prober.handle_timeout(now);
    let mut sent = Vec::new();
    while let Some(t) = w.prober.poll_transmit() {
        let Ok(Message::Request { txid }) = decode(&t.bytes) else {
            panic!("a retransmission is a binding request: {:02x?}", t.bytes);
        };
        sent.push((txid, t.to));
    }
    expected.sort();
    sent.sort();
    assert_eq!(sent, expected, "retransmissions at {now}");
    Ok(())
}

fn check_state(w: &World) {
    assert_eq!(w.prober.pending(), w.outstanding.len());
    assert_eq!(
        w.prober.poll_timeout(),
        w.outstanding.values().map(|s| s.next_ms).min()
    );
    assert!(w.prober.observations().len() <= MAX_OBSERVATIONS);
}

fn classify_any(u: &mut Unstructured, local: SocketAddr) -> Result<()> {
    let n = u.int_in_range(0..=MAX_CLASSIFY_INPUT)?;
    let mut obs = Vec::with_capacity(n);
    for i in 0..n {
        obs.push(Observation {
            server: addr(u)?,
            mapped: addr(u)?,
            at_ms: START_MS + i as u64,
        });
    }
    check_mapping(local, &obs, &classify(local, &obs));
    Ok(())
}

/// Checks `m` against the newest observation of each network group in
/// `obs`.
fn check_mapping(local: SocketAddr, obs: &[Observation], m: &Mapping) {
    let mut newest: Vec<Observation> = Vec::new();
    for o in obs.iter().rev() {
        let g = network_group(o.server);
        if !newest.iter().any(|n| network_group(n.server) == g) {
            newest.push(*o);
        }
    }
    let mut seen: Vec<SocketAddr> = newest.iter().map(|o| o.mapped).collect();
    seen.sort();
    seen.dedup();
    match m {
        Mapping::Unknown => assert!(newest.len() < MIN_GROUPS, "{m:?} from {newest:?}"),
        Mapping::Public { addr } => {
            assert!(newest.len() >= MIN_GROUPS);
            assert_eq!((*addr, seen.as_slice()), (local, &[local][..]));
        }
        Mapping::EndpointIndependent { public } => {
            assert!(newest.len() >= MIN_GROUPS);
            assert_ne!(*public, local);
            assert_eq!(seen, [*public]);
        }
        Mapping::EndpointDependent { seen: s } => {
            assert!(newest.len() >= MIN_GROUPS && s.len() >= 2);
            assert_eq!(*s, seen);
        }
    }
    // Only the newest answer of each group counts, in any order.
    newest.reverse();
    assert_eq!(classify(local, &newest), *m);
    if !newest.is_empty() {
        newest.rotate_left(1);
        assert_eq!(classify(local, &newest), *m);
    }
}

fn check_candidates(u: &mut Unstructured, m: &Mapping) -> Result<()> {
    let host = addr(u)?;
    let n = u.int_in_range(0..=MAX_RELAYS)?;
    let relays = (0..n).map(|_| addr(u)).collect::<Result<Vec<_>>>()?;
    let c = candidates(host, m, &relays);
    let mut addrs: Vec<SocketAddr> = c.iter().map(|c| c.addr).collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), c.len(), "a candidate address twice: {c:?}");
    assert_eq!(
        c.iter().any(|c| c.kind == CandidateKind::Host),
        !host.ip().is_unspecified()
    );
    for cand in &c {
        if cand.kind == CandidateKind::ServerReflexive {
            assert_eq!(
                *m,
                Mapping::EndpointIndependent { public: cand.addr },
                "a server-reflexive candidate needs an endpoint-independent mapping"
            );
        }
    }
    for r in &relays {
        assert!(c.iter().any(|c| c.addr == *r), "relay {r} missing");
    }
    Ok(())
}
