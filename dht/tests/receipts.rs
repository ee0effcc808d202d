//! Receipts in the DHT: only doubly signed receipts of the key's own node,
//! between parties with proof of work and not from the future, are stored;
//! cumulative receipts replace earlier ones of their request; a key keeps
//! its largest spending and newest earnings, so floods of its own receipts
//! cannot hide what it spent; a full store keeps the keys near its node;
//! messages stay bounded through the wire codec.

use ed25519_dalek::SigningKey;
use hypha_dht::codec::{reply_from_wire, reply_to_wire, request_from_wire, request_to_wire};
use hypha_dht::receipts::{
    check, merge, spent_share, MAX_CLOCK_SKEW_MS, MAX_PER_COUNTERPARTY, MAX_RECEIPTS_PER_KEY,
    MAX_RECEIPTS_PER_PUT,
};
use hypha_dht::{receipts_key, DhtError, ReceiptStore, Request, Response};
use hypha_ledger::{node_id_of, pow_bits, totals_of, Receipt, SignedReceipt, VerifiedReceipt};

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
    let mut store = ReceiptStore::new(id(&other));
    // Under either party's key: stored.
    for party in [id(&s), id(&c)] {
        let k = receipts_key(&party);
        let v = check(&k, good.clone(), NOW, 0).unwrap();
        store.put(k, v).unwrap();
        assert_eq!(store.get(&k), vec![good.clone()]);
    }
    // Under the key of a node it does not name: refused.
    assert!(check(&receipts_key(&id(&other)), good.clone(), NOW, 0).is_err());
    // Inflated after signing, or countersigned by someone else: refused.
    let mut inflated = good.clone();
    inflated.receipt.credits += 1;
    assert!(check(&receipts_key(&id(&s)), inflated, NOW, 0).is_err());
    let mut swapped = good.clone();
    swapped.consumer_sig = good.receipt.sign(&other);
    assert!(check(&receipts_key(&id(&s)), swapped, NOW, 0).is_err());
}

#[test]
fn a_receipt_party_without_the_networks_proof_of_work_is_refused() {
    const BITS: u32 = 6;
    let (ground_s, ground_c) = (with_pow(BITS, 0), with_pow(BITS, 1));
    let k = receipts_key(&id(&ground_c));
    let both = signed(&ground_s, &ground_c, 1, 8, 2_000);
    assert!(check(&k, both, NOW, BITS).is_ok());
    // Either party short of it: refused, whichever key it comes under.
    let cheap = (0..=255u8)
        .map(key)
        .find(|k| pow_bits(&id(k)) < BITS)
        .unwrap();
    for (s, c) in [(&cheap, &ground_c), (&ground_s, &cheap)] {
        let r = signed(s, c, 2, 8, 2_000);
        for party in [id(s), id(c)] {
            let refused = check(&receipts_key(&party), r.clone(), NOW, BITS);
            assert!(
                matches!(refused, Err(DhtError::NoProofOfWork { required: BITS, .. })),
                "{refused:?}"
            );
        }
    }
}

#[test]
fn a_key_keeps_its_largest_spending_and_newest_earnings_one_per_request() {
    let (s, c, buyer) = (key(4), key(5), key(11));
    let verified = |r: SignedReceipt| -> VerifiedReceipt { r.verify().unwrap() };
    let k = receipts_key(&id(&c));
    // Room for 4: three for what `c` spends, one for what it earns.
    const MAX: usize = 4;
    assert_eq!(spent_share(MAX), 3);
    let mut list = Vec::new();
    assert!(merge(
        &k,
        &mut list,
        verified(signed(&s, &c, 1, 4, 2_000)),
        MAX
    ));
    // The cumulative receipt of the same request replaces the earlier one;
    // an older one does not come back.
    assert!(merge(
        &k,
        &mut list,
        verified(signed(&s, &c, 1, 8, 2_100)),
        MAX
    ));
    assert!(!merge(
        &k,
        &mut list,
        verified(signed(&s, &c, 1, 4, 2_000)),
        MAX
    ));
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].receipt().completion_tokens, 8);
    // Spending is kept by credits, largest first, whatever its age.
    for (i, tokens, t) in [(2, 30, 3_000), (3, 2, 9_000), (4, 20, 1_500)] {
        merge(&k, &mut list, verified(signed(&s, &c, i, tokens, t)), MAX);
    }
    let order: Vec<u64> = list.iter().map(|r| r.receipt().request_id).collect();
    assert_eq!(order, vec![2, 4, 1], "the 2-token receipt fell out");
    // A newer but smaller one is not taken; a larger one is.
    assert!(!merge(
        &k,
        &mut list,
        verified(signed(&s, &c, 9, 1, 9_500)),
        MAX
    ));
    assert!(merge(
        &k,
        &mut list,
        verified(signed(&s, &c, 10, 40, 1_100)),
        MAX
    ));
    assert_eq!(list[0].receipt().request_id, 10);
    // Earnings have their own share: they neither push out spending nor
    // are pushed out by it; the newest is kept.
    assert!(merge(
        &k,
        &mut list,
        verified(signed(&c, &buyer, 20, 1, 5_000)),
        MAX
    ));
    assert!(merge(
        &k,
        &mut list,
        verified(signed(&c, &buyer, 21, 1, 6_000)),
        MAX
    ));
    assert!(!merge(
        &k,
        &mut list,
        verified(signed(&c, &buyer, 22, 1, 5_500)),
        MAX
    ));
    let ids: Vec<u64> = list.iter().map(|r| r.receipt().request_id).collect();
    assert_eq!(ids, vec![10, 2, 4, 21]);
    assert!(!merge(
        &k,
        &mut list,
        verified(signed(&s, &c, 30, 1, 9_900)),
        MAX
    ));
    assert_eq!(list.len(), MAX);
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
        notices: Vec::new(),
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
        notices: Vec::new(),
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

/// A key, after `seed`, whose id carries `bits` of proof of work.
fn with_pow(bits: u32, skip: usize) -> SigningKey {
    (0..u32::MAX)
        .map(|n| {
            let mut seed = [0xA5; 32];
            seed[..4].copy_from_slice(&n.to_le_bytes());
            SigningKey::from_bytes(&seed)
        })
        .filter(|k| pow_bits(&id(k)) >= bits)
        .nth(skip)
        .unwrap()
}

#[test]
fn receipts_from_the_future_are_refused_beyond_a_small_skew() {
    let (c, s) = (key(8), key(9));
    let k = receipts_key(&id(&c));
    let at_skew = signed(&s, &c, 1, 1, NOW + MAX_CLOCK_SKEW_MS);
    assert!(check(&k, at_skew, NOW, 0).is_ok());
    let beyond = signed(&s, &c, 2, 1, NOW + MAX_CLOCK_SKEW_MS + 1);
    assert!(check(&k, beyond, NOW, 0).is_err(), "finishes in the future");
    // A minute and a second ahead is too far (it was ten minutes).
    let ahead = signed(&s, &c, 3, 1, NOW + 61_000);
    assert!(check(&k, ahead, NOW, 0).is_err());
}

/// A consumer's real spending at an honest seeder, then `sybils` seeders of
/// its own flooding its key with newer receipts, small ones (to push the
/// real ones out) and as its earnings (to fill the key): the key keeps the
/// real spending, and a balance computed from it counts all of it.
fn flood_of_own_key_keeps_the_spending(sybils: usize) {
    let (c, honest) = (key(12), key(13));
    let k = receipts_key(&id(&c));
    let mut list = Vec::new();
    let real: Vec<VerifiedReceipt> = (0..10)
        .map(|i| signed(&honest, &c, i, 100, 2_000 + i).verify().unwrap())
        .collect();
    for r in &real {
        assert!(merge(&k, &mut list, r.clone(), MAX_RECEIPTS_PER_KEY));
    }
    let spent: u64 = real.iter().map(|r| r.receipt().credits).sum();
    let per_sybil = 2 * MAX_RECEIPTS_PER_KEY / sybils + 1;
    for n in 0..sybils {
        let sybil = key(100 + n as u8);
        for i in 0..per_sybil as u64 {
            let at = 5_000 + i;
            let spend = signed(&sybil, &c, 1_000 + i, 1, at).verify().unwrap();
            merge(&k, &mut list, spend, MAX_RECEIPTS_PER_KEY);
            let earn = signed(&c, &sybil, 1_000 + i, 1, at).verify().unwrap();
            merge(&k, &mut list, earn, MAX_RECEIPTS_PER_KEY);
        }
    }
    assert_eq!(list.len(), MAX_RECEIPTS_PER_KEY, "the key is full");
    for r in &real {
        assert!(
            list.iter().any(|x| x.signed() == r.signed()),
            "{sybils} sybils pushed out spending"
        );
    }
    let seen = totals_of(&id(&c), &list).spent;
    assert!(
        seen >= spent,
        "{sybils} sybils: {seen} seen of {spent} spent"
    );
    // Its earnings come from many consumers, a bounded share from each.
    let earned_from_one = list
        .iter()
        .filter(|r| r.receipt().seeder == id(&c) && r.receipt().consumer == id(&key(100)))
        .count();
    assert!(earned_from_one <= MAX_PER_COUNTERPARTY);
}

#[test]
fn four_or_sixty_four_sybils_flooding_a_key_cannot_hide_its_spending() {
    flood_of_own_key_keeps_the_spending(4);
    flood_of_own_key_keeps_the_spending(64);
}

#[test]
fn a_store_full_of_future_dated_junk_keeps_the_keys_this_node_holds() {
    const LIMIT: usize = 600;
    let local = id(&key(40));
    let mut store = ReceiptStore::with_limit(local, LIMIT);
    // Honest keys are those this node is close to: Kademlia sends it keys
    // near its id. Here, consumers whose receipt keys share 4 bits with it.
    let near = |k: &SigningKey| {
        hypha_dht::Distance::between(&local, &receipts_key(&id(k))).leading_zeros() >= 4
    };
    let honest: Vec<SigningKey> = (0..=u16::MAX)
        .map(|n| {
            let mut seed = [0x3C; 32];
            seed[..2].copy_from_slice(&n.to_le_bytes());
            SigningKey::from_bytes(&seed)
        })
        .filter(near)
        .take(3)
        .collect();
    let seeder = key(41);
    for (i, c) in honest.iter().enumerate() {
        let r = signed(&seeder, c, i as u64, 50, 2_000);
        let k = receipts_key(&id(c));
        store.put(k, check(&k, r, NOW, 0).unwrap()).unwrap();
    }
    // Junk: receipts between throwaway identities, each as new as the clock
    // skew allows, under keys spread over the id space, several times what
    // the store holds.
    let mut refused = 0;
    for n in 0..(3 * LIMIT) as u32 {
        let mut seed = [0x77; 32];
        seed[..4].copy_from_slice(&n.to_le_bytes());
        let (a, b) = (SigningKey::from_bytes(&seed), key(42));
        let r = signed(&b, &a, u64::from(n), 1, NOW + MAX_CLOCK_SKEW_MS);
        let k = receipts_key(&id(&a));
        match store.put(k, check(&k, r, NOW, 0).unwrap()) {
            Ok(()) => {}
            Err(DhtError::StoreFull) => refused += 1,
            Err(e) => panic!("{e}"),
        }
        assert!(store.len() <= LIMIT);
    }
    assert!(
        refused > 0,
        "a full store refuses keys farther than all it holds"
    );
    for c in &honest {
        let k = receipts_key(&id(c));
        assert_eq!(store.get(&k).len(), 1, "an honest key was evicted");
    }
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
