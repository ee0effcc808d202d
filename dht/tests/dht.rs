//! The routing table's rules and provider record checks.

use std::net::SocketAddr;

use ed25519_dalek::SigningKey;
use hypha_dht::record::{RecordStore, MAX_PROVIDERS_PER_KEY, MAX_RECORD_TTL_MS};
use hypha_dht::table::bucket_index;
use hypha_dht::{model_key, Contact, Distance, ProviderRecord, Rng, RoutingTable, Update, K};
use hypha_wire::NodeId;

fn addr(n: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], n))
}

/// An id at distance with its top bit at `bit` from `local`.
fn id_in_bucket(local: &NodeId, bit: usize, rng: &mut Rng) -> NodeId {
    loop {
        let id = rng.id();
        let mut d = Distance::between(local, &id).0;
        // Force the highest set bit to `bit`.
        let byte = 31 - bit / 8;
        for (j, b) in d.iter_mut().enumerate() {
            if j < byte {
                *b = 0;
            } else if j == byte {
                let mask = ((1u16 << (bit % 8 + 1)) - 1) as u8;
                *b = (*b & mask) | (1 << (bit % 8));
            }
        }
        let mut out = [0u8; 32];
        for ((o, x), y) in out.iter_mut().zip(d).zip(local.0) {
            *o = x ^ y;
        }
        let out = NodeId(out);
        if bucket_index(&Distance::between(local, &out)) == Some(bit) {
            return out;
        }
    }
}

#[test]
fn a_full_bucket_evicts_its_oldest_only_after_a_failed_ping() {
    let mut rng = Rng::new(7);
    let local = rng.id();
    let mut t = RoutingTable::new(local);
    let ids: Vec<NodeId> = (0..K + 2)
        .map(|_| id_in_bucket(&local, 200, &mut rng))
        .collect();
    for (n, id) in ids.iter().take(K).enumerate() {
        assert_eq!(
            t.update(
                Contact {
                    id: *id,
                    addr: addr(n as u16)
                },
                n as u64
            ),
            Update::Inserted
        );
    }
    let newcomer = Contact {
        id: ids[K],
        addr: addr(1000),
    };
    // Full: the oldest is to be pinged, nobody replaced yet.
    assert_eq!(
        t.update(newcomer, 100),
        Update::Full {
            oldest: Contact {
                id: ids[0],
                addr: addr(0)
            }
        }
    );
    assert!(t.contains(&ids[0]) && !t.contains(&ids[K]));
    // A second newcomer while the ping is out is ignored.
    assert_eq!(
        t.update(
            Contact {
                id: ids[K + 1],
                addr: addr(1001)
            },
            101
        ),
        Update::Ignored
    );
    // The oldest answers: it stays and becomes the most recent.
    t.ping_answered(&ids[0], 102);
    assert!(t.contains(&ids[0]) && !t.contains(&ids[K]));
    assert_eq!(
        t.update(newcomer, 103),
        Update::Full {
            oldest: Contact {
                id: ids[1],
                addr: addr(1)
            }
        }
    );
    // Now the oldest fails: the newcomer takes its place.
    t.ping_failed(&ids[1], 104);
    assert!(!t.contains(&ids[1]) && t.contains(&ids[K]));
    assert_eq!(t.len(), K);
    // Seeing a known contact refreshes it.
    assert_eq!(t.update(newcomer, 105), Update::Refreshed);
    // Our own id never enters.
    assert_eq!(
        t.update(
            Contact {
                id: local,
                addr: addr(9)
            },
            106
        ),
        Update::Ignored
    );
}

#[test]
fn closest_returns_the_nearest_in_order() {
    let mut rng = Rng::new(9);
    let local = rng.id();
    let mut t = RoutingTable::new(local);
    let mut all = Vec::new();
    for n in 0..2000u16 {
        let c = Contact {
            id: rng.id(),
            addr: addr(n),
        };
        if t.update(c, 0) == Update::Inserted {
            all.push(c);
        }
    }
    let target = rng.id();
    let got = t.closest(&target, K);
    all.sort_by_key(|c| Distance::between(&c.id, &target));
    assert_eq!(got, all[..K].to_vec());
}

fn record(key: &SigningKey, model: &str, expires_ms: u64) -> ProviderRecord {
    ProviderRecord {
        publisher: NodeId([0; 32]),
        public_key: [0; 32],
        addrs: vec![addr(4000)],
        relays: Vec::new(),
        model: model.into(),
        model_sha256: [1; 32],
        context_length: 2048,
        backend: "cpu".into(),
        decode_tokens_per_s: 100,
        free_slots: 8,
        price_prompt_micro: 1,
        price_completion_micro: 4,
        expires_ms,
        signature: [0; 64],
    }
    .sign(key)
}

#[test]
fn forged_expired_or_misfiled_records_are_refused() {
    let key = SigningKey::from_bytes(&[3; 32]);
    let now = 1_000_000;
    let good = record(&key, "m", now + 60_000);
    assert!(good.verify(now).is_ok());
    let mut store = RecordStore::default();
    store.put(model_key("m"), good.clone(), now).unwrap();
    assert_eq!(store.get(&model_key("m"), now), vec![good.clone()]);

    let mut forged = good.clone();
    forged.free_slots = 64;
    assert!(
        forged.verify(now).is_err(),
        "a changed field breaks the signature"
    );
    let mut stolen = good.clone();
    stolen.publisher = NodeId([9; 32]);
    assert!(
        stolen.verify(now).is_err(),
        "the key must match the publisher"
    );
    assert!(good.verify(now + 60_000).is_err(), "expired");
    let immortal = record(&key, "m", now + MAX_RECORD_TTL_MS + 1);
    assert!(immortal.verify(now).is_err(), "too long a life");
    assert!(
        store.put(model_key("other"), good.clone(), now).is_err(),
        "wrong key"
    );
    assert!(store.put(model_key("m"), forged, now).is_err());
    // Expired records leave the store.
    assert!(store.get(&model_key("m"), now + 60_000).is_empty());
}

#[test]
fn the_store_is_bounded_per_key_and_keeps_the_longest_lived() {
    let now = 1_000_000;
    let mut store = RecordStore::default();
    for i in 0..(MAX_PROVIDERS_PER_KEY + 5) {
        let key = SigningKey::from_bytes(&[i as u8 + 1; 32]);
        let _ = store.put(
            model_key("m"),
            record(&key, "m", now + 1_000 + i as u64),
            now,
        );
    }
    let kept = store.get(&model_key("m"), now);
    assert_eq!(kept.len(), MAX_PROVIDERS_PER_KEY);
    assert!(kept.iter().all(|r| r.expires_ms >= now + 1_005));
    // A publisher's newer record replaces its older one.
    let key = SigningKey::from_bytes(&[200; 32]);
    store
        .put(model_key("x"), record(&key, "x", now + 10), now)
        .unwrap();
    store
        .put(model_key("x"), record(&key, "x", now + 20), now)
        .unwrap();
    let x = store.get(&model_key("x"), now);
    assert_eq!(x.len(), 1);
    assert_eq!(x[0].expires_ms, now + 20);
}

#[test]
fn the_catalog_keeps_one_record_per_model_name() {
    use hypha_dht::catalog_key;
    use hypha_dht::record::{MAX_CATALOG_MODELS, MAX_RECORDS_PER_PUBLISHER};
    let now = 1_000_000;
    let mut store = RecordStore::default();
    let (a, b) = (
        SigningKey::from_bytes(&[1; 32]),
        SigningKey::from_bytes(&[2; 32]),
    );
    // Two publishers of one model: the longer-lived record stays.
    store
        .put(catalog_key(), record(&a, "m", now + 1_000), now)
        .unwrap();
    store
        .put(catalog_key(), record(&b, "m", now + 2_000), now)
        .unwrap();
    store
        .put(catalog_key(), record(&a, "n", now + 1_000), now)
        .unwrap();
    let mut names: Vec<(String, u64)> = store
        .get(&catalog_key(), now)
        .into_iter()
        .map(|r| (r.model, r.expires_ms))
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![("m".into(), now + 2_000), ("n".into(), now + 1_000)]
    );
    // One publisher cannot take more than its quota of names.
    for i in 0..(MAX_RECORDS_PER_PUBLISHER + 10) {
        let _ = store.put(
            catalog_key(),
            record(&a, &format!("a{i}"), now + 1_000),
            now,
        );
    }
    let a_id = record(&a, "x", now + 1).publisher;
    let by_a = store
        .get(&catalog_key(), now)
        .iter()
        .filter(|r| r.publisher == a_id)
        .count();
    assert_eq!(by_a, MAX_RECORDS_PER_PUBLISHER);
    // Bounded by names, whoever publishes.
    for i in 0..MAX_CATALOG_MODELS {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(i as u64 + 1000).to_le_bytes());
        let k = SigningKey::from_bytes(&seed);
        let _ = store.put(
            catalog_key(),
            record(&k, &format!("x{i}"), now + 1_000),
            now,
        );
    }
    assert_eq!(store.get(&catalog_key(), now).len(), MAX_CATALOG_MODELS);
    // A record still may not go under another model's own key.
    assert!(store
        .put(model_key("n"), record(&a, "m", now + 1_000), now)
        .is_err());
}

#[test]
fn a_records_relays_are_signed_and_survive_the_wire() {
    let key = SigningKey::from_bytes(&[3; 32]);
    let mut r = record(&key, "m", 2_000_000);
    r.relays = vec![hypha_dht::Contact {
        id: NodeId([9; 32]),
        addr: "198.18.0.10:7001".parse().unwrap(),
    }];
    let r = r.sign(&key);
    r.verify(1_000_000).unwrap();
    let back = hypha_dht::codec::record_from_wire(hypha_dht::codec::record_to_wire(&r)).unwrap();
    assert_eq!(back, r);
    back.verify(1_000_000).unwrap();
    // A relay slipped in by a storing node breaks the signature.
    let mut forged = r.clone();
    forged.relays[0].addr = "203.0.113.9:7001".parse().unwrap();
    assert!(forged.verify(1_000_000).is_err());
    // Garbage relay entries are refused on decoding.
    let mut wire = hypha_dht::codec::record_to_wire(&r);
    wire.relays = vec!["not-a-relay".into()];
    assert!(hypha_dht::codec::record_from_wire(wire).is_err());
}
