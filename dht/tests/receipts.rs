//! Receipts in the DHT: only doubly signed receipts of the key's own node
//! are stored, cumulative receipts replace earlier ones of their request,
//! and each key keeps its newest receipts up to the bound, also when they
//! travel through the wire codec.

use ed25519_dalek::SigningKey;
use hypha_dht::codec::{reply_from_wire, reply_to_wire, request_from_wire, request_to_wire};
use hypha_dht::receipts::{merge, MAX_RECEIPTS_PER_KEY, MAX_RECEIPTS_PER_PUT};
use hypha_dht::{receipts_key, ReceiptStore, Request, Response};
use hypha_ledger::{node_id_of, Receipt, SignedReceipt, VerifiedReceipt};

/// The tests' clock: after every receipt they sign.
const NOW: u64 = 10_000;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn signed(
    seeder: &SigningKey,
    consumer: &SigningKey,
    request_id: u64,
    tokens: u32,
    finished_ms: u64,
) -> SignedReceipt {
    let r = Receipt {
        request_id,
        consumer: node_id_of(&consumer.verifying_key().to_bytes()),
        seeder: node_id_of(&seeder.verifying_key().to_bytes()),
        model_sha256: [7; 32],
        prompt_tokens: 10,
        completion_tokens: tokens,
        credits: 10 + 4 * u64::from(tokens),
        started_ms: 1_000,
        finished_ms,
        tokens_digest: [tokens as u8; 32],
    };
    SignedReceipt {
        seeder_sig: r.sign(seeder),
        consumer_sig: r.sign(consumer),
        seeder_key: seeder.verifying_key().to_bytes(),
        consumer_key: consumer.verifying_key().to_bytes(),
        receipt: r,
    }
}

fn id(k: &SigningKey) -> hypha_wire::NodeId {
    node_id_of(&k.verifying_key().to_bytes())
}

#[test]
fn only_checked_receipts_of_a_party_are_stored() {
    let (s, c, other) = (key(1), key(2), key(3));
    let good = signed(&s, &c, 1, 8, 2_000);
    let mut store = ReceiptStore::default();
    // Under either party's key: stored.
    for party in [id(&s), id(&c)] {
        let k = receipts_key(&party);
        let v = hypha_dht::receipts::check(&k, good.clone(), NOW).unwrap();
        store.put(k, v).unwrap();
        assert_eq!(store.get(&k), vec![good.clone()]);
    }
    // Under the key of a node it does not name: refused.
    assert!(hypha_dht::receipts::check(&receipts_key(&id(&other)), good.clone(), NOW).is_err());
    // Inflated after signing, or countersigned by someone else: refused.
    let mut inflated = good.clone();
    inflated.receipt.credits += 1;
    assert!(hypha_dht::receipts::check(&receipts_key(&id(&s)), inflated, NOW).is_err());
    let mut swapped = good.clone();
    swapped.consumer_sig = good.receipt.sign(&other);
    assert!(hypha_dht::receipts::check(&receipts_key(&id(&s)), swapped, NOW).is_err());
}

#[test]
fn a_key_keeps_the_newest_receipts_one_per_request() {
    let (s, c) = (key(4), key(5));
    let check = |r: SignedReceipt| -> VerifiedReceipt { r.verify().unwrap() };
    let k = receipts_key(&id(&c));
    let mut list = Vec::new();
    assert!(merge(&k, &mut list, check(signed(&s, &c, 1, 4, 2_000)), 3));
    // The cumulative receipt of the same request replaces the earlier one;
    // an older one does not come back.
    assert!(merge(&k, &mut list, check(signed(&s, &c, 1, 8, 2_100)), 3));
    assert!(!merge(&k, &mut list, check(signed(&s, &c, 1, 4, 2_000)), 3));
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].receipt().completion_tokens, 8);
    for (i, t) in [(2, 3_000), (3, 1_500), (4, 4_000)] {
        merge(&k, &mut list, check(signed(&s, &c, i, 1, t)), 3);
    }
    // Newest first, bounded: the receipt finished at 1,500 fell out.
    let order: Vec<u64> = list.iter().map(|r| r.receipt().request_id).collect();
    assert_eq!(order, vec![4, 2, 1]);
    // One older than everything kept is not taken.
    assert!(!merge(&k, &mut list, check(signed(&s, &c, 9, 1, 1_200)), 3));
}

#[test]
fn receipt_messages_are_bounded_and_round_trip() {
    let (s, c) = (key(6), key(7));
    let k = receipts_key(&id(&c));
    let receipts: Vec<SignedReceipt> = (0..3).map(|i| signed(&s, &c, i, 2, 2_000 + i)).collect();
    let put = Request::PutReceipts {
        key: k,
        receipts: receipts.clone(),
    };
    assert_eq!(request_from_wire(request_to_wire(&put)).unwrap(), put);
    let reply = Response::Receipts {
        receipts: receipts.clone(),
        closer: Vec::new(),
    };
    assert_eq!(reply_from_wire(reply_to_wire(&reply)).unwrap(), reply);
    // Too many in one store, or in one reply: the message is refused whole.
    let many = Request::PutReceipts {
        key: k,
        receipts: vec![receipts[0].clone(); MAX_RECEIPTS_PER_PUT + 1],
    };
    assert!(request_from_wire(request_to_wire(&many)).is_err());
    let many = Response::Receipts {
        receipts: vec![receipts[0].clone(); MAX_RECEIPTS_PER_KEY + 1],
        closer: Vec::new(),
    };
    assert!(reply_from_wire(reply_to_wire(&many)).is_err());
    // A receipt cut short does not decode.
    let mut wire = request_to_wire(&put);
    if let hypha_wire::DhtRequest::PutReceipts { receipts, .. } = &mut wire {
        receipts[0].pop();
    }
    assert!(request_from_wire(wire).is_err());
}

#[test]
fn receipts_from_the_future_or_one_counterparty_cannot_crowd_out_the_rest() {
    use hypha_dht::receipts::{check, MAX_CLOCK_SKEW_MS, MAX_PER_COUNTERPARTY};
    let (c, honest, sybil) = (key(8), key(9), key(10));
    let k = receipts_key(&id(&c));
    let future = signed(&sybil, &c, 1, 1, NOW + MAX_CLOCK_SKEW_MS + 1);
    assert!(check(&k, future, NOW).is_err(), "finishes in the future");
    // The same request id at two seeders is two requests.
    let a = signed(&honest, &c, 7, 3, 2_000).verify().unwrap();
    let b = signed(&sybil, &c, 7, 9, 2_000).verify().unwrap();
    let mut list = Vec::new();
    assert!(merge(&k, &mut list, a, 1000));
    assert!(merge(&k, &mut list, b, 1000));
    assert_eq!(list.len(), 2);
    // A flood of newer receipts with one counterparty keeps at most its
    // share; the honest seeder's receipt stays.
    for i in 0..(MAX_PER_COUNTERPARTY as u64 + 20) {
        let r = signed(&sybil, &c, 100 + i, 1, 3_000 + i).verify().unwrap();
        merge(&k, &mut list, r, 1000);
    }
    let with_sybil = list
        .iter()
        .filter(|r| r.receipt().seeder == id(&sybil))
        .count();
    assert_eq!(with_sybil, MAX_PER_COUNTERPARTY);
    assert!(list.iter().any(|r| r.receipt().seeder == id(&honest)));
}

#[test]
fn oversized_dht_frames_are_refused_before_they_are_copied() {
    use hypha_dht::codec::{check_archived_reply, check_archived_request};
    use hypha_wire::{decode_frame, DhtReply, DhtRequest, FrameEncoder, Message};
    let mut enc = FrameEncoder::new();
    let mut archived_ok = |m: Message| {
        let frame = enc.encode(&m).unwrap().to_vec();
        let (a, _) = decode_frame(&frame).unwrap();
        match a {
            hypha_wire::ArchivedMessage::Dht(d) => check_archived_request(d).is_ok(),
            hypha_wire::ArchivedMessage::DhtReply(r) => check_archived_reply(r).is_ok(),
            _ => unreachable!(),
        }
    };
    let receipt = vec![0u8; hypha_ledger::SIGNED_RECEIPT_BYTES];
    let put = |n: usize, bytes: Vec<u8>| {
        Message::Dht(DhtRequest::PutReceipts {
            key: [0; 32],
            receipts: vec![bytes; n],
        })
    };
    assert!(archived_ok(put(MAX_RECEIPTS_PER_PUT, receipt.clone())));
    assert!(!archived_ok(put(MAX_RECEIPTS_PER_PUT + 1, receipt.clone())));
    // Many empty items: refused by count and size alike.
    assert!(!archived_ok(put(100_000, Vec::new())));
    assert!(!archived_ok(put(1, Vec::new())));
    let many_contacts = Message::DhtReply(DhtReply::Nodes {
        closer: vec![
            hypha_wire::WireContact {
                id: [1; 32],
                addr: "127.0.0.1:1".into()
            };
            hypha_dht::K + 1
        ],
    });
    assert!(!archived_ok(many_contacts));
}
