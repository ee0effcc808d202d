//! The STUN codec against RFC 5769's test vectors, round trips, QUIC
//! packets told apart from STUN, hostile bytes, and the prober's
//! retransmissions and mapping classification.

use std::net::SocketAddr;

use hypha_nat::probe::{classify, INITIAL_RTO_MS, MAX_TRIES};
use hypha_nat::stun::{binding_request, binding_response, decode, is_stun, Message};
use hypha_nat::{candidates, CandidateKind, Mapping, Observation, Prober};
use proptest::prelude::*;

/// RFC 5769 section 2.2: sample IPv4 response (password
/// `VOkJxbRl1RmTxUk/WvJxBt`, mapped address 192.0.2.1 port 32853).
const RFC5769_IPV4_RESPONSE: [u8; 80] = [
    0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
    0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63,
    0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43,
    0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3, 0x8c, 0x74, 0x89, 0xf9,
    0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, 0x80, 0x28, 0x00, 0x04, 0xc0, 0x7d, 0x4c, 0x96,
];

/// RFC 5769 section 2.3: sample IPv6 response (same password, mapped
/// address 2001:db8:1234:5678:11:2233:4455:6677 port 32853).
const RFC5769_IPV6_RESPONSE: [u8; 92] = [
    0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
    0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63,
    0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01, 0x13, 0xa9, 0xfa,
    0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9, 0x00, 0x08, 0x00, 0x14,
    0xa3, 0x82, 0x95, 0x4e, 0x4b, 0xe6, 0x7b, 0xf1, 0x17, 0x84, 0xc9, 0x7c, 0x82, 0x92, 0xc2, 0x75,
    0xbf, 0xe3, 0xed, 0x41, 0x80, 0x28, 0x00, 0x04, 0xc8, 0xfb, 0x0b, 0x4c,
];

const RFC5769_TXID: [u8; 12] = [
    0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
];

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn rfc5769_responses_decode_to_their_mapped_addresses() {
    for (bytes, want) in [
        (&RFC5769_IPV4_RESPONSE[..], a("192.0.2.1:32853")),
        (
            &RFC5769_IPV6_RESPONSE[..],
            a("[2001:db8:1234:5678:11:2233:4455:6677]:32853"),
        ),
    ] {
        // The vectors are intact: their MESSAGE-INTEGRITY and FINGERPRINT
        // check out under the RFC's password.
        let ctx = stun_rs::DecoderContextBuilder::default()
            .with_key(stun_rs::HMACKey::new_short_term("VOkJxbRl1RmTxUk/WvJxBt").unwrap())
            .with_validation()
            .build();
        stun_rs::MessageDecoderBuilder::default()
            .with_context(ctx)
            .build()
            .decode(bytes)
            .expect("the RFC's vector validates");
        assert!(is_stun(bytes));
        assert_eq!(
            decode(bytes).unwrap(),
            Message::Response {
                txid: RFC5769_TXID,
                mapped: want
            }
        );
    }
}

#[test]
fn requests_and_responses_round_trip() {
    let txid = [7; 12];
    let req = binding_request(txid).unwrap();
    assert_eq!(
        req.len(),
        hypha_nat::stun::MAX_RESPONSE_BYTES,
        "a request is padded to the longest answer"
    );
    assert_eq!(decode(&req).unwrap(), Message::Request { txid });
    for mapped in [a("198.18.0.7:4433"), a("[2001:db8::5]:9")] {
        let resp = binding_response(txid, mapped).unwrap();
        assert_eq!(decode(&resp).unwrap(), Message::Response { txid, mapped });
    }
}

#[test]
fn quic_packets_are_not_stun() {
    // QUIC long headers start 0b11, short headers 0b01: the fixed bit.
    let mut initial = vec![0xc3, 0, 0, 0, 1];
    initial.resize(1200, 0);
    let mut short = vec![0x41];
    short.resize(64, 0);
    assert!(!is_stun(&initial));
    assert!(!is_stun(&short));
    // STUN-looking bytes without the magic cookie are not STUN either.
    let mut fake = binding_request([1; 12]).unwrap();
    fake[4] ^= 1;
    assert!(!is_stun(&fake));
    assert!(decode(&fake).is_err());
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn damaged_responses_never_panic(i in 0usize..80, v in any::<u8>(), cut in 0usize..80) {
        let mut b = RFC5769_IPV4_RESPONSE.to_vec();
        b[i] = v;
        let _ = decode(&b);
        let _ = decode(&RFC5769_IPV4_RESPONSE[..cut]);
    }
}

#[test]
fn the_prober_retransmits_then_gives_up_and_ignores_strangers() {
    let local = a("10.0.0.2:5000");
    let server = a("198.18.0.1:7000");
    let mut p = Prober::new(local, 42);
    p.probe(server, 0).unwrap();
    let first = p.poll_transmit().unwrap();
    assert_eq!(first.to, server);
    let Message::Request { txid } = decode(&first.bytes).unwrap() else {
        panic!("a request")
    };
    // Resent at 500, 1500, 3500 ms (doubling), then dropped.
    let mut sends = 1;
    let mut now = 0;
    while let Some(t) = p.poll_timeout() {
        now = t;
        p.handle_timeout(now);
        while let Some(t) = p.poll_transmit() {
            assert_eq!(decode(&t.bytes).unwrap(), Message::Request { txid });
            sends += 1;
        }
    }
    assert_eq!(sends, MAX_TRIES);
    assert_eq!(now, INITIAL_RTO_MS * (1 + 2 + 4 + 8));
    assert_eq!(p.pending(), 0);

    // An answer from another address, or to another request, is ignored.
    p.probe(server, now).unwrap();
    let t = p.poll_transmit().unwrap();
    let Message::Request { txid } = decode(&t.bytes).unwrap() else {
        panic!()
    };
    let resp = binding_response(txid, a("203.0.113.9:61000")).unwrap();
    assert_eq!(
        p.handle_response(a("198.18.0.99:7000"), &resp, now)
            .unwrap(),
        None
    );
    let other = binding_response([9; 12], a("203.0.113.9:61000")).unwrap();
    assert_eq!(p.handle_response(server, &other, now).unwrap(), None);
    let o = p.handle_response(server, &resp, now).unwrap().unwrap();
    assert_eq!(o.mapped, a("203.0.113.9:61000"));
    assert_eq!(p.pending(), 0);
}

#[test]
fn mapping_behaviour_is_told_from_peers_in_three_networks() {
    let local = a("10.0.0.2:5000");
    let obs = |server: &str, mapped: &str| Observation {
        server: a(server),
        mapped: a(mapped),
        at_ms: 0,
    };
    assert_eq!(classify(local, &[]), Mapping::Unknown);
    assert_eq!(
        classify(
            local,
            &[
                obs("1.1.1.1:1", "203.0.113.9:1"),
                obs("1.1.1.1:1", "203.0.113.9:1")
            ]
        ),
        Mapping::Unknown,
        "one peer twice is still one peer"
    );
    // Two peers, or many in one /16, cannot decide it.
    let two = [
        obs("1.1.1.1:1", "203.0.113.9:6000"),
        obs("2.2.2.2:2", "203.0.113.9:6000"),
    ];
    assert_eq!(
        classify(local, &two),
        Mapping::Unknown,
        "two peers agreeing"
    );
    let one_block = [
        obs("5.5.1.1:1", "203.0.113.66:6000"),
        obs("5.5.2.2:2", "203.0.113.66:6000"),
        obs("5.5.3.3:3", "203.0.113.66:6000"),
        obs("1.1.1.1:1", "203.0.113.66:6000"),
    ];
    assert_eq!(
        classify(local, &one_block),
        Mapping::Unknown,
        "one /16 counts once"
    );
    // Two liars in two networks and one honest peer: no public address is
    // made up, at worst the mapping looks per-destination.
    let liars = [
        obs("5.5.1.1:1", "203.0.113.66:6000"),
        obs("6.6.1.1:1", "203.0.113.66:6000"),
        obs("1.1.1.1:1", "203.0.113.9:6000"),
    ];
    assert!(matches!(
        classify(local, &liars),
        Mapping::EndpointDependent { .. }
    ));
    // In a LAN or a lab, each address is its own group.
    let lab = [
        obs("198.18.0.10:1", "198.18.0.254:6000"),
        obs("198.18.0.11:1", "198.18.0.254:6000"),
        obs("198.18.0.12:1", "198.18.0.254:6000"),
    ];
    assert_eq!(
        classify(local, &lab),
        Mapping::EndpointIndependent {
            public: a("198.18.0.254:6000")
        }
    );
    let same = [
        obs("1.1.1.1:1", "203.0.113.9:6000"),
        obs("2.2.2.2:2", "203.0.113.9:6000"),
        obs("3.3.3.3:3", "203.0.113.9:6000"),
    ];
    assert_eq!(
        classify(local, &same),
        Mapping::EndpointIndependent {
            public: a("203.0.113.9:6000")
        }
    );
    let public = [
        obs("1.1.1.1:1", "10.0.0.2:5000"),
        obs("2.2.2.2:2", "10.0.0.2:5000"),
        obs("3.3.3.3:3", "10.0.0.2:5000"),
    ];
    assert_eq!(classify(local, &public), Mapping::Public { addr: local });
    let symmetric = [
        obs("1.1.1.1:1", "203.0.113.9:6000"),
        obs("2.2.2.2:2", "203.0.113.9:6001"),
        obs("3.3.3.3:3", "203.0.113.9:6001"),
    ];
    assert!(matches!(
        classify(local, &symmetric),
        Mapping::EndpointDependent { .. }
    ));

    // Candidates: host, then the public mapping when it is shareable, then
    // relays; a per-destination mapping is not offered.
    let c = candidates(local, &classify(local, &same), &[a("198.18.0.1:7000")]);
    let kinds: Vec<CandidateKind> = c.iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        vec![
            CandidateKind::Host,
            CandidateKind::ServerReflexive,
            CandidateKind::Relayed
        ]
    );
    let c = candidates(local, &classify(local, &symmetric), &[]);
    assert_eq!(c.len(), 1);
}
