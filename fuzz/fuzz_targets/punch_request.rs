//! Punch requests as a rendezvous and a target check them
//! (`hypha_node::services::punch::check`), and the candidates a target
//! then dials (`hypha_nat::punchable`).
//!
//! - Arbitrary bytes as a stream's first frame: a `Punch` that checks
//!   names at most `MAX_PUNCH_CANDIDATES` addresses, all parsed, from an
//!   initiator whose id is its key's.
//! - A request genuinely signed by an identity the input picks, with
//!   candidates and an age drawn from the input (addresses of every scope,
//!   some that do not parse, too many of them), then perhaps damaged in a
//!   field or in its frame: it checks exactly when it is unchanged, recent
//!   and its candidates are few and parse; then the initiator and its
//!   candidates are the ones signed.
//! - The addresses a target dials are among those named, and none is port
//!   0, unspecified, multicast or broadcast, or in a private block the
//!   target's socket is not in.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ed25519_dalek::Signer as _;
use hypha_fuzz::{flip_bytes, identity, stretch};
use hypha_node::inbound::{opening, Opening};
use hypha_node::services::punch::{check, MAX_PUNCH_CANDIDATES, PUNCH_MAX_AGE_MS};
use hypha_wire::{decode_frame, ArchivedMessage, FrameEncoder, Message, PunchRequest};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// The time requests are checked at (any Unix time in milliseconds).
const NOW_MS: u64 = 1_795_000_000_000;

fuzz_target!(|data: &[u8]| {
    raw(data);
    let _ = signed(&mut Unstructured::new(&stretch(data)));
});

fn raw(data: &[u8]) {
    let Ok((msg @ ArchivedMessage::Punch(_), _)) = decode_frame(data) else {
        return;
    };
    let Ok(Opening::Punch(req)) = opening(msg) else {
        panic!("a decoded punch request opens a stream");
    };
    if let Ok((initiator, candidates)) = check(&req, NOW_MS) {
        assert_eq!(initiator.0, req.initiator);
        assert_eq!(hypha_ledger::node_id_of(&req.initiator_key), initiator);
        assert!(candidates.len() <= MAX_PUNCH_CANDIDATES);
        assert_eq!(candidates.len(), req.candidates.len());
        dialed(&candidates, local(0));
    }
}

/// One address of a scope the input picks.
fn address(u: &mut Unstructured) -> Result<IpAddr> {
    let v4 = |a: [u8; 4]| IpAddr::V4(Ipv4Addr::from(a));
    Ok(match u.int_in_range(0..=9)? {
        0 => v4([10, u.arbitrary()?, u.arbitrary()?, u.arbitrary()?]),
        1 => v4([192, 168, u.arbitrary()?, u.arbitrary()?]),
        2 => v4([172, u.int_in_range(16..=31)?, u.arbitrary()?, 1]),
        3 => v4([127, 0, 0, u.arbitrary()?]),
        4 => v4([100, u.int_in_range(64..=127)?, 0, 1]),
        5 => IpAddr::V6(Ipv6Addr::from(u.arbitrary::<[u8; 16]>()?)),
        6 => IpAddr::V6(Ipv4Addr::from(u.arbitrary::<[u8; 4]>()?).to_ipv6_mapped()),
        7 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        _ => v4(u.arbitrary()?),
    })
}

/// The address a target's socket is bound to, picked by the input.
fn local(pick: u8) -> IpAddr {
    match pick % 4 {
        0 => Ipv4Addr::UNSPECIFIED.into(),
        1 => Ipv4Addr::new(10, 0, 0, 2).into(),
        2 => Ipv4Addr::LOCALHOST.into(),
        _ => Ipv4Addr::new(198, 18, 0, 1).into(),
    }
}

fn signed(u: &mut Unstructured) -> Result<()> {
    let who = identity(u)?;
    let target = identity(u)?;
    let n = if u.ratio(1, 8)? {
        u.int_in_range(0..=MAX_PUNCH_CANDIDATES + 2)?
    } else {
        u.int_in_range(1..=3)?
    };
    let mut candidates = Vec::with_capacity(n);
    let mut parse = true;
    for _ in 0..n {
        if u.ratio(1, 16)? {
            let s: String = u.arbitrary()?;
            parse &= s.parse::<SocketAddr>().is_ok();
            candidates.push(s);
        } else {
            candidates.push(SocketAddr::new(address(u)?, u.arbitrary()?).to_string());
        }
    }
    let age: i64 = if u.ratio(1, 8)? {
        u.arbitrary::<i32>()?.into()
    } else {
        u.int_in_range(-5_000..=5_000)?
    };
    let issued_ms = NOW_MS.saturating_add_signed(age);
    let mut req = PunchRequest {
        initiator: who.id.0,
        initiator_key: who.public,
        target: target.id.0,
        candidates,
        issued_ms,
        signature: [0; 64],
    };
    req.signature = who.key.sign(&req.signed_bytes()).to_bytes();
    let genuine = req.clone();
    let mut changed = false;
    if u.ratio(1, 4)? {
        match u.int_in_range(0..=4)? {
            0 => req.issued_ms = req.issued_ms.wrapping_add(1),
            1 => req.target[0] ^= 1,
            2 => req.candidates.push("1.2.3.4:5".into()),
            3 => req.initiator_key = identity(u)?.public,
            _ => req.signature[u.choose_index(64)?] ^= 0x40,
        }
        changed = req != genuine;
    }
    let mut encoder = FrameEncoder::new();
    let Ok(frame) = encoder.encode(&Message::Punch(req)) else {
        return Ok(());
    };
    let frame = frame.to_vec();
    let mut bytes = frame.clone();
    let flipped = u.ratio(1, 8)? && flip_bytes(u, &mut bytes)? && bytes != frame;
    let Ok((msg, _)) = decode_frame(&bytes) else {
        assert!(flipped, "a genuine punch request decodes");
        return Ok(());
    };
    let Ok(Opening::Punch(got)) = opening(msg) else {
        assert!(flipped, "a punch request opens a stream");
        return Ok(());
    };
    let altered = changed || got != genuine;
    let fresh = age.unsigned_abs() <= PUNCH_MAX_AGE_MS;
    let few = genuine.candidates.len() <= MAX_PUNCH_CANDIDATES;
    match check(&got, NOW_MS) {
        Ok((initiator, addrs)) => {
            assert!(!altered, "an altered punch request checked: {got:?}");
            assert!(fresh && few && parse);
            assert_eq!(initiator, who.id);
            let named: Vec<SocketAddr> = genuine
                .candidates
                .iter()
                .map(|c| c.parse().expect("checked candidates parse"))
                .collect();
            assert_eq!(addrs, named, "the candidates are the ones signed");
            dialed(&addrs, local(u.arbitrary()?));
        }
        Err(e) => assert!(
            altered || !fresh || !few || !parse,
            "a genuine, fresh punch request was refused: {e}"
        ),
    }
    Ok(())
}

/// What a target bound at `local` dials of `candidates`.
fn dialed(candidates: &[SocketAddr], local: IpAddr) {
    for c in candidates {
        if !hypha_nat::punchable(*c, local) {
            continue;
        }
        let ip = match c.ip() {
            IpAddr::V6(v) => v.to_ipv4_mapped().map_or(IpAddr::V6(v), IpAddr::V4),
            v4 => v4,
        };
        assert_ne!(c.port(), 0, "a punch dials port 0: {c}");
        assert!(
            !ip.is_unspecified() && !ip.is_multicast(),
            "a punch dials {c}"
        );
        if let IpAddr::V4(v) = ip {
            assert!(!v.is_broadcast() && !v.is_link_local(), "a punch dials {c}");
            if v.is_private() {
                let IpAddr::V4(l) = local else {
                    panic!("a v6 socket dials a private v4 address {c}");
                };
                assert!(
                    l.is_private() && l.octets()[0] == v.octets()[0],
                    "a punch from {local} dials into another private network: {c}"
                );
            }
            if v.is_loopback() {
                assert!(
                    local.is_loopback(),
                    "a punch from {local} dials loopback {c}"
                );
            }
        }
    }
}
