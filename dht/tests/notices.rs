//! Unpaid notices in the DHT: only checked, live notices of a key's own
//! consumer are stored; one per seeder, first come first kept, so the
//! consumer's own Sybil seeders cannot push an honest notice out; a
//! receipt that pays the offer voids the notice; a lookup brings the
//! notices of every storer, less the voided; messages stay bounded.

use std::net::SocketAddr;

use ed25519_dalek::SigningKey;
use hypha_dht::codec::{
    check_archived_request, reply_from_wire, reply_to_wire, request_from_wire, request_to_wire,
};
use hypha_dht::notices::{check, MAX_NOTICES_PER_KEY, NOTICE_LIFETIME_MS};
use hypha_dht::receipts::MAX_CLOCK_SKEW_MS;
use hypha_dht::{
    receipts_key, Config, Contact, Dht, Event, NoticeStore, QueryResult, Request, Response,
};
use hypha_ledger::{node_id_of, pow_bits, Notice, Receipt, SignedReceipt, NOTICE_BYTES};
use hypha_wire::NodeId;

/// The tests' clock: after every notice they sign.
const NOW: u64 = 100_000;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn id(k: &SigningKey) -> NodeId {
    node_id_of(&k.verifying_key().to_bytes())
}

fn both_signed(r: Receipt, seeder: &SigningKey, consumer: &SigningKey) -> SignedReceipt {
    SignedReceipt {
        seeder_sig: r.sign(seeder),
        consumer_sig: r.sign(consumer),
        seeder_key: seeder.verifying_key().to_bytes(),
        consumer_key: consumer.verifying_key().to_bytes(),
        receipt: r,
    }
}

/// Request `request_id` by `consumer` at `seeder`: paid to 32 tokens,
/// then an offer of 64 made at `at_ms` that went unsigned.
fn notice(seeder: &SigningKey, consumer: &SigningKey, request_id: u64, at_ms: u64) -> Notice {
    let paid = Receipt {
        request_id,
        consumer: id(consumer),
        seeder: id(seeder),
        model_sha256: [7; 32],
        prompt_tokens: 10,
        completion_tokens: 32,
        credits: 10 + 4 * 32,
        started_ms: at_ms - 500,
        finished_ms: at_ms - 100,
        tokens_digest: [1; 32],
    };
    let mut offered = paid.clone();
    offered.completion_tokens = 64;
    offered.credits = 10 + 4 * 64;
    offered.finished_ms = at_ms;
    offered.tokens_digest = [2; 32];
    Notice {
        seeder_sig: offered.sign(seeder),
        paid: both_signed(paid, seeder, consumer),
        offered,
    }
}

/// The receipt that pays what `n` says went unpaid.
fn paying(n: &Notice, seeder: &SigningKey, consumer: &SigningKey) -> SignedReceipt {
    both_signed(n.offered.clone(), seeder, consumer)
}

#[test]
fn only_checked_live_notices_under_their_consumers_key_are_taken() {
    let (s, c) = (key(1), key(2));
    let k = receipts_key(&id(&c));
    let good = notice(&s, &c, 1, NOW - 1_000);
    assert!(check(&k, good.clone(), NOW, 0).is_ok());
    // Under the seeder's key: a notice speaks of its consumer only.
    assert!(check(&receipts_key(&id(&s)), good.clone(), NOW, 0).is_err());
    // Future-dated beyond the skew, or older than its lifetime.
    let ahead = notice(&s, &c, 2, NOW + MAX_CLOCK_SKEW_MS + 1);
    assert!(check(&k, ahead, NOW, 0).is_err());
    let near = notice(&s, &c, 2, NOW + MAX_CLOCK_SKEW_MS);
    assert!(check(&k, near, NOW, 0).is_ok());
    let old = notice(&s, &c, 3, NOW);
    assert!(check(&k, old, NOW + NOTICE_LIFETIME_MS, 0).is_err());
    // A forged offer.
    let mut forged = good.clone();
    forged.offered.completion_tokens += 100;
    assert!(check(&k, forged, NOW, 0).is_err());
    // Parties without the proof of work the store asks.
    let bits = pow_bits(&id(&s)).min(pow_bits(&id(&c)));
    assert!(check(&k, good, NOW, bits + 1).is_err());
}

#[test]
fn a_key_keeps_one_notice_per_seeder_first_come_first_kept() {
    let c = key(2);
    let k = receipts_key(&id(&c));
    let mut store = NoticeStore::new(id(&key(99)));
    let honest = key(10);
    let first = check(&k, notice(&honest, &c, 1, NOW - 5_000), NOW, 0).unwrap();
    store.put(k, first, NOW).unwrap();
    // The same seeder's newer notice replaces its older one; an older
    // one does not.
    let newer = check(&k, notice(&honest, &c, 2, NOW - 4_000), NOW, 0).unwrap();
    store.put(k, newer, NOW).unwrap();
    let stale = check(&k, notice(&honest, &c, 3, NOW - 6_000), NOW, 0).unwrap();
    assert!(store.put(k, stale, NOW).is_err());
    assert_eq!(store.get(&k, NOW).len(), 1);
    assert_eq!(store.get_verified(&k, NOW)[0].request_id(), 2);
    // The consumer's own Sybil seeders fill the rest of the key and then
    // flood it with newer notices: the honest one stays.
    for i in 0..64u8 {
        let sybil = key(100 + i);
        let n = check(&k, notice(&sybil, &c, 10, NOW - 100 + u64::from(i)), NOW, 0).unwrap();
        let _ = store.put(k, n, NOW);
    }
    let held = store.get_verified(&k, NOW);
    assert_eq!(held.len(), MAX_NOTICES_PER_KEY);
    assert!(held.iter().any(|n| n.seeder() == id(&honest)));
    // Voiding the Sybils' notices (the consumer pays them) frees their
    // room; the honest notice, unpaid, stays.
    for n in &held {
        if n.seeder() != id(&honest) {
            store.void(&k, n.offered());
        }
    }
    assert_eq!(store.len(), 1);
    // A receipt that pays less than the offer voids nothing.
    let mut less = held
        .iter()
        .find(|n| n.seeder() == id(&honest))
        .unwrap()
        .offered()
        .clone();
    less.completion_tokens -= 1;
    store.void(&k, &less);
    assert_eq!(store.len(), 1);
    // Notices lapse after their lifetime.
    assert!(store.get(&k, NOW - 4_000 + NOTICE_LIFETIME_MS).is_empty());
    store.expire(NOW - 4_000 + NOTICE_LIFETIME_MS);
    assert!(store.is_empty());
}

#[test]
fn a_full_store_keeps_the_keys_nearest_this_node() {
    let local = id(&key(99));
    let mut store = NoticeStore::with_limit(local, 16);
    let s = key(1);
    let mut refused = 0;
    for c in 0..64u8 {
        let consumer = key(128 + c);
        let k = receipts_key(&id(&consumer));
        let n = check(&k, notice(&s, &consumer, 1, NOW), NOW, 0).unwrap();
        if store.put(k, n, NOW).is_err() {
            refused += 1;
        }
        assert!(store.len() <= 16);
    }
    assert!(
        refused > 0,
        "a full store refuses keys farther than it holds"
    );
    // What it keeps are the 16 nearest keys of all 64.
    let mut keys: Vec<NodeId> = (0..64u8)
        .map(|c| receipts_key(&id(&key(128 + c))))
        .collect();
    keys.sort_by_key(|k| hypha_dht::Distance::between(&local, k));
    for k in &keys[..16] {
        assert_eq!(store.get(k, NOW).len(), 1, "a near key was evicted");
    }
}

#[test]
fn notice_messages_are_bounded_and_round_trip() {
    let (s, c) = (key(1), key(2));
    let k = receipts_key(&id(&c));
    let n = notice(&s, &c, 1, NOW);
    let put = Request::PutNotice {
        key: k,
        notice: Box::new(n.clone()),
    };
    assert_eq!(request_from_wire(request_to_wire(&put)).unwrap(), put);
    let reply = Response::Receipts {
        receipts: vec![n.paid.clone()],
        notices: vec![n.clone(); MAX_NOTICES_PER_KEY],
        closer: Vec::new(),
    };
    assert_eq!(reply_from_wire(reply_to_wire(&reply)).unwrap(), reply);
    let many = Response::Receipts {
        receipts: Vec::new(),
        notices: vec![n.clone(); MAX_NOTICES_PER_KEY + 1],
        closer: Vec::new(),
    };
    assert!(reply_from_wire(reply_to_wire(&many)).is_err());
    // A notice cut short: refused in the frame and by the codec.
    let mut wire = request_to_wire(&put);
    if let hypha_wire::DhtRequest::PutNotice { notice, .. } = &mut wire {
        notice.pop();
    }
    let frame = hypha_wire::FrameEncoder::new()
        .encode(&hypha_wire::Message::Dht(wire.clone()))
        .unwrap()
        .to_vec();
    let (archived, _) = hypha_wire::decode_frame(&frame).unwrap();
    let hypha_wire::ArchivedMessage::Dht(d) = archived else {
        unreachable!()
    };
    assert!(check_archived_request(d).is_err());
    assert!(request_from_wire(wire).is_err());
    assert_eq!(n.to_bytes().len(), NOTICE_BYTES);
}

fn addr(n: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], n))
}

fn contact(k: &SigningKey, port: u16) -> Contact {
    Contact {
        id: id(k),
        addr: addr(port),
    }
}

/// Delivers every request `from` has queued to whichever of `nodes` it
/// names, and the answers back, until nothing is left in flight.
fn settle(nodes: &mut [Dht], now: u64) {
    loop {
        let mut moved = false;
        for i in 0..nodes.len() {
            while let Some(t) = nodes[i].poll_transmit() {
                moved = true;
                let from = nodes[i].local();
                let to = nodes.iter().position(|n| n.local().id == t.to.id);
                match to {
                    Some(j) => {
                        let answer = nodes[j].handle_request(now, from, t.request);
                        nodes[i].handle_response(now, t.id, answer);
                    }
                    None => nodes[i].handle_failure(now, t.id),
                }
            }
        }
        if !moved {
            return;
        }
    }
}

fn done(node: &mut Dht) -> Vec<QueryResult> {
    let mut out = Vec::new();
    while let Some(Event::QueryDone { result, .. }) = node.poll_event() {
        out.push(result);
    }
    out
}

#[test]
fn a_published_notice_reaches_another_seeders_lookup_until_it_is_paid() {
    let cfg = Config {
        min_publisher_pow_bits: 0,
        min_receipt_party_pow_bits: 0,
        ..Config::default()
    };
    let (seeder, consumer) = (key(1), key(2));
    let storers: Vec<SigningKey> = (20..26).map(key).collect();
    let mut nodes: Vec<Dht> = storers
        .iter()
        .enumerate()
        .map(|(i, k)| Dht::new(contact(k, 1000 + i as u16), cfg.clone(), 0))
        .collect();
    nodes.push(Dht::new(contact(&seeder, 2000), cfg.clone(), 0));
    nodes.push(Dht::new(contact(&key(3), 2001), cfg.clone(), 0));
    let all: Vec<Contact> = nodes.iter().map(Dht::local).collect();
    for n in nodes.iter_mut() {
        n.bootstrap(&all, NOW).unwrap();
    }
    settle(&mut nodes, NOW);
    for n in nodes.iter_mut() {
        done(n);
    }
    let n = notice(&seeder, &consumer, 7, NOW);
    let k = receipts_key(&id(&consumer));
    let verified = check(&k, n.clone(), NOW, 0).unwrap();
    let publisher = nodes.len() - 2;
    nodes[publisher].put_notice(verified, NOW).unwrap();
    settle(&mut nodes, NOW);
    match done(&mut nodes[publisher]).as_slice() {
        [QueryResult::PutNotice { stored, .. }] => assert!(*stored >= 6, "stored at {stored}"),
        other => panic!("{other:?}"),
    }
    // Another seeder (the last node, which holds nothing) looks the
    // consumer up and finds the notice.
    let asker = nodes.len() - 1;
    let lookup = |nodes: &mut Vec<Dht>| {
        nodes[asker].get_receipts(k, NOW + 1_000).unwrap();
        settle(nodes, NOW + 1_000);
        match done(&mut nodes[asker]).pop() {
            Some(QueryResult::GetReceipts { notices, .. }) => notices,
            other => panic!("{other:?}"),
        }
    };
    let found = lookup(&mut nodes);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].notice(), n);
    // The consumer pays the offer: the receipt, stored under its key,
    // voids the notice at every storer.
    let paid = paying(&n, &seeder, &consumer);
    let paid = hypha_dht::receipts::check(&k, paid, NOW, 0).unwrap();
    nodes[publisher].put_receipts(k, vec![paid], NOW).unwrap();
    settle(&mut nodes, NOW);
    done(&mut nodes[publisher]);
    assert!(lookup(&mut nodes).is_empty());
    for node in &nodes[..storers.len()] {
        assert!(node.notices().get(&k, NOW).is_empty());
    }
    // And a storer that holds the paying receipt refuses the notice again.
    let again = Request::PutNotice {
        key: k,
        notice: Box::new(n),
    };
    let from = nodes[publisher].local();
    assert_eq!(nodes[0].handle_request(NOW, from, again), Response::Refused);
}
