//! The routing table's rules, provider record checks, and the record
//! store's policy against many proof-of-work identities: none of them
//! evicts or crowds out an honest record, under a model key, the relay key
//! or the catalog, in the store or in a lookup's result.

use std::net::SocketAddr;

use ed25519_dalek::SigningKey;
use hypha_dht::record::{
    RecordStore, HONEST_CATALOG_MODELS, HONEST_PROVIDERS_PER_KEY, MAX_CATALOG_MODELS,
    MAX_CATALOG_NAMES_PER_PUBLISHER, MAX_PROVIDERS_PER_KEY, MAX_RECORDS_PER_PUBLISHER,
    MAX_RECORD_CLOCK_SKEW_MS, MAX_RECORD_TTL_MS, MAX_SYBIL_IDENTITIES,
};
use hypha_dht::table::bucket_index;
use hypha_dht::{
    catalog_key, model_key, relay_key, Config, Contact, Dht, DhtError, Distance, Event,
    ProviderRecord, QueryResult, Request, Response, Rng, RoutingTable, Update, K, RELAY_SERVICE,
};
use hypha_ledger::{node_id_of, pow_bits};
use hypha_wire::NodeId;

/// Proof of work the tests' stores require: low, so that an identity grinds
/// in a few milliseconds, yet most random ids (255 in 256) lack it.
const TEST_POW_BITS: u32 = 8;

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

fn id_of(key: &SigningKey) -> NodeId {
    node_id_of(&key.verifying_key().to_bytes())
}

/// The first key from `tag`'s sequence whose id has (or, for `with_pow`
/// false, lacks) `TEST_POW_BITS` of proof of work.
fn key_for(tag: u64, with_pow: bool) -> SigningKey {
    (0u64..)
        .map(|n| {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&tag.to_le_bytes());
            seed[8..16].copy_from_slice(&n.to_le_bytes());
            SigningKey::from_bytes(&seed)
        })
        .find(|k| (pow_bits(&id_of(k)) >= TEST_POW_BITS) == with_pow)
        .expect("a key turns up")
}

fn pow_key(tag: u64) -> SigningKey {
    key_for(tag, true)
}

/// `n` attacker identities, each carrying the proof of work.
fn sybils(n: usize) -> Vec<SigningKey> {
    (0..n as u64).map(|i| pow_key(1_000_000 + i)).collect()
}

fn store() -> RecordStore {
    RecordStore::new(TEST_POW_BITS)
}

fn publishers(records: &[ProviderRecord]) -> Vec<NodeId> {
    records.iter().map(|r| r.publisher).collect()
}

#[test]
fn forged_expired_or_misfiled_records_are_refused() {
    let key = pow_key(3);
    let now = 1_000_000;
    let good = record(&key, "m", now + 60_000);
    assert!(good.verify(now).is_ok());
    let mut store = store();
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
    assert!(
        store.put(model_key("other"), good.clone(), now).is_err(),
        "wrong key"
    );
    assert!(store.put(model_key("m"), forged, now).is_err());
    // Expired records leave the store.
    assert!(store.get(&model_key("m"), now + 60_000).is_empty());
    store.expire(now + 60_000);
    assert!(store.is_empty());
}

#[test]
fn publishers_without_proof_of_work_are_refused() {
    let now = 1_000_000;
    let cheap = key_for(4, false);
    let bits = pow_bits(&id_of(&cheap));
    let mut store = store();
    assert_eq!(
        store.put(model_key("m"), record(&cheap, "m", now + 60_000), now),
        Err(DhtError::NoProofOfWork {
            bits,
            required: TEST_POW_BITS
        })
    );
    assert!(store.is_empty());
    // By default a store asks what nodes ask at hello, and so does the
    // machine's configuration.
    assert_eq!(
        Config::default().min_publisher_pow_bits,
        hypha_ledger::DEFAULT_POW_BITS
    );
    let tested = pow_key(5);
    if pow_bits(&id_of(&tested)) < hypha_ledger::DEFAULT_POW_BITS {
        assert!(RecordStore::default()
            .put(model_key("m"), record(&tested, "m", now + 60_000), now)
            .is_err());
    }
}

#[test]
fn a_record_may_claim_no_longer_a_life_than_honest_records_have() {
    let key = pow_key(6);
    let now = 1_000_000;
    // An hour, what a record could claim before: refused.
    let hour = record(&key, "m", now + 60 * 60 * 1000);
    assert!(hour.verify(now).is_err(), "an hour-long claim");
    let mut store = store();
    assert!(store.put(model_key("m"), hour, now).is_err());
    let beyond = record(
        &key,
        "m",
        now + MAX_RECORD_TTL_MS + MAX_RECORD_CLOCK_SKEW_MS + 1,
    );
    assert!(beyond.verify(now).is_err(), "beyond the skew allowance");
    // Within the skew allowance (a publisher's clock ahead of ours): taken,
    // but held no longer than an honest record from its arrival.
    let skewed = record(
        &key,
        "m",
        now + MAX_RECORD_TTL_MS + MAX_RECORD_CLOCK_SKEW_MS,
    );
    store.put(model_key("m"), skewed.clone(), now).unwrap();
    assert_eq!(
        store.get(&model_key("m"), now + MAX_RECORD_TTL_MS - 1),
        vec![skewed]
    );
    assert!(store
        .get(&model_key("m"), now + MAX_RECORD_TTL_MS)
        .is_empty());
    store.expire(now + MAX_RECORD_TTL_MS);
    assert!(store.is_empty());
    assert_eq!(store.held_by(&id_of(&key)), 0);
}

/// The honest record first; then `MAX_SYBIL_IDENTITIES` identities flood
/// the key, each claiming as long a life as anything is allowed to (and an
/// hour, refused), over and over; then a second honest provider comes.
fn flood_a_key(key: NodeId, model: &str) {
    let now = 1_000_000;
    let mut store = store();
    let honest = pow_key(7);
    store
        .put(key, record(&honest, model, now + MAX_RECORD_TTL_MS), now)
        .unwrap();
    let attackers = sybils(MAX_SYBIL_IDENTITIES);
    for round in 0..4u64 {
        let t = now + round * 1000;
        for a in &attackers {
            // What the store says does not matter to an attacker.
            let _ = store.put(key, record(a, model, t + 60 * 60 * 1000), t);
            let longest = t + MAX_RECORD_TTL_MS + MAX_RECORD_CLOCK_SKEW_MS;
            let _ = store.put(key, record(a, model, longest), t);
        }
        let held = publishers(&store.get(&key, t));
        assert!(
            held.contains(&id_of(&honest)),
            "the honest record was evicted in round {round}"
        );
    }
    // Cheap identities do not even get in.
    for i in 0..200 {
        let cheap = key_for(2_000_000 + i, false);
        assert!(store
            .put(key, record(&cheap, model, now + MAX_RECORD_TTL_MS), now)
            .is_err());
    }
    let later = now + 10_000;
    let second = pow_key(8);
    store
        .put(
            key,
            record(&second, model, later + MAX_RECORD_TTL_MS),
            later,
        )
        .unwrap();
    let held = publishers(&store.get(&key, later));
    assert_eq!(held.len(), MAX_SYBIL_IDENTITIES + 2);
    assert_eq!(
        held.first(),
        Some(&id_of(&honest)),
        "first seen stays first"
    );
    assert!(held.contains(&id_of(&second)));
    // The honest record refreshes in place, and lives on after the
    // attackers' last claims lapse.
    let refreshed = record(&honest, model, later + MAX_RECORD_TTL_MS + 5_000);
    store.put(key, refreshed.clone(), later + 5_000).unwrap();
    let at = now + 3000 + MAX_RECORD_TTL_MS;
    let left = store.get(&key, at);
    assert_eq!(left.first(), Some(&refreshed));
    assert_eq!(publishers(&left).len(), 2, "the attackers' records lapsed");
}

#[test]
fn sixty_four_identities_cannot_evict_a_model_provider() {
    flood_a_key(model_key("m"), "m");
}

#[test]
fn sixty_four_identities_cannot_evict_a_relay() {
    flood_a_key(relay_key(), RELAY_SERVICE);
}

#[test]
fn a_key_filled_by_sixty_four_identities_still_takes_honest_providers() {
    let now = 1_000_000;
    let key = model_key("m");
    let mut store = store();
    for a in sybils(MAX_SYBIL_IDENTITIES) {
        store
            .put(key, record(&a, "m", now + MAX_RECORD_TTL_MS), now)
            .unwrap();
    }
    let honest: Vec<SigningKey> = (0..HONEST_PROVIDERS_PER_KEY as u64)
        .map(|i| pow_key(3_000_000 + i))
        .collect();
    for h in &honest {
        store
            .put(key, record(h, "m", now + MAX_RECORD_TTL_MS), now)
            .unwrap();
    }
    assert_eq!(store.get(&key, now).len(), MAX_PROVIDERS_PER_KEY);
    // Full: a newcomer is refused, nobody is evicted for it.
    let late = pow_key(9);
    assert_eq!(
        store.put(key, record(&late, "m", now + MAX_RECORD_TTL_MS), now),
        Err(DhtError::KeyFull {
            max: MAX_PROVIDERS_PER_KEY
        })
    );
    let held = publishers(&store.get(&key, now));
    assert!(honest.iter().all(|h| held.contains(&id_of(h))));
    // A held publisher's refresh still goes in.
    store
        .put(
            key,
            record(&honest[0], "m", now + MAX_RECORD_TTL_MS + 1),
            now + 1,
        )
        .unwrap();
    // An older copy offered again changes nothing.
    store
        .put(
            key,
            record(&honest[0], "m", now + MAX_RECORD_TTL_MS),
            now + 2,
        )
        .unwrap();
    let mine: Vec<u64> = store
        .get(&key, now + 2)
        .iter()
        .filter(|r| r.publisher == id_of(&honest[0]))
        .map(|r| r.expires_ms)
        .collect();
    assert_eq!(mine, vec![now + MAX_RECORD_TTL_MS + 1]);
}

#[test]
fn sixty_four_identities_cannot_fill_or_take_over_the_catalog() {
    let now = 1_000_000;
    // Room for longer claims.
    let ttl = now + MAX_RECORD_TTL_MS - 10_000;
    let mut store = store();
    let (a, b) = (pow_key(10), pow_key(11));
    // Two publishers of one model: the name stays with the first seen,
    // even against a longer claim; the second is told it is listed.
    store.put(catalog_key(), record(&a, "m", ttl), now).unwrap();
    store
        .put(catalog_key(), record(&b, "m", ttl + 2_000), now)
        .unwrap();
    let m: Vec<NodeId> = publishers(&store.get(&catalog_key(), now));
    assert_eq!(m, vec![id_of(&a)]);
    // The attackers list all the names they may, then many more, and also
    // the honest name.
    let attackers = sybils(MAX_SYBIL_IDENTITIES);
    for (n, s) in attackers.iter().enumerate() {
        for i in 0..MAX_RECORDS_PER_PUBLISHER {
            let _ = store.put(catalog_key(), record(s, &format!("junk-{n}-{i}"), ttl), now);
        }
        store
            .put(catalog_key(), record(s, "m", ttl + 3_000), now)
            .unwrap();
    }
    let listed = store.get(&catalog_key(), now);
    assert_eq!(
        listed.len(),
        1 + MAX_SYBIL_IDENTITIES * MAX_CATALOG_NAMES_PER_PUBLISHER
    );
    let m_holder: Vec<NodeId> = listed
        .iter()
        .filter(|r| r.model == "m")
        .map(|r| r.publisher)
        .collect();
    assert_eq!(m_holder, vec![id_of(&a)], "an honest name stays honest");
    // Honest names after the flood: room for all of them.
    let names = HONEST_CATALOG_MODELS - 1;
    let honest: Vec<SigningKey> = (0..names.div_ceil(MAX_CATALOG_NAMES_PER_PUBLISHER) as u64)
        .map(|i| pow_key(4_000_000 + i))
        .collect();
    for i in 0..names {
        let h = &honest[i / MAX_CATALOG_NAMES_PER_PUBLISHER];
        store
            .put(catalog_key(), record(h, &format!("honest-{i}"), ttl), now)
            .unwrap();
    }
    let listed = store.get(&catalog_key(), now);
    assert_eq!(listed.len(), MAX_CATALOG_MODELS);
    for i in 0..names {
        let name = format!("honest-{i}");
        assert!(listed.iter().any(|r| r.model == name), "{name} is listed");
    }
    // A record still may not go under another model's own key.
    assert!(store
        .put(model_key("n"), record(&a, "m", ttl), now)
        .is_err());
}

#[test]
fn counts_follow_records_in_and_out_without_a_rebuild() {
    let now = 1_000_000;
    let mut store = store();
    let p = pow_key(12);
    // One publisher up to its quota, across keys and lifetimes.
    for i in 0..MAX_RECORDS_PER_PUBLISHER {
        let name = format!("m{i}");
        let expires = now + 1_000 * (i as u64 + 1);
        store
            .put(model_key(&name), record(&p, &name, expires), now)
            .unwrap();
    }
    assert_eq!(store.held_by(&id_of(&p)), MAX_RECORDS_PER_PUBLISHER);
    assert_eq!(
        store.put(model_key("x"), record(&p, "x", now + 60_000), now),
        Err(DhtError::PublisherQuota {
            max: MAX_RECORDS_PER_PUBLISHER
        })
    );
    // Refreshes do not count twice.
    store
        .put(model_key("m0"), record(&p, "m0", now + 500_000), now)
        .unwrap();
    assert_eq!(store.held_by(&id_of(&p)), MAX_RECORDS_PER_PUBLISHER);
    // As records lapse, the quota frees up without any full expiry pass:
    // the next store call drops what lapsed.
    let later = now + 10_500;
    store
        .put(model_key("x"), record(&p, "x", later + 60_000), later)
        .unwrap();
    // m1..m9 lapsed (m0 was refreshed), x came in.
    assert_eq!(store.held_by(&id_of(&p)), MAX_RECORDS_PER_PUBLISHER - 9 + 1);
    assert_eq!(store.len(), store.all(later).len());
    store.expire(now + 600_000);
    assert!(store.is_empty());
    assert_eq!(store.held_by(&id_of(&p)), 0);
}

#[test]
fn a_lookup_result_keeps_honest_records_among_many_identities_records() {
    let now = 1_000_000;
    let key = model_key("m");
    let local = Contact {
        id: NodeId([1; 32]),
        addr: addr(1),
    };
    let cfg = Config {
        min_publisher_pow_bits: TEST_POW_BITS,
        ..Config::default()
    };
    let mut dht = Dht::new(local, cfg, now);
    let storer = Contact {
        id: NodeId([2; 32]),
        addr: addr(2),
    };
    assert_eq!(
        dht.handle_request(now, storer, Request::Ping),
        Response::Pong
    );
    let q = dht.get_providers(key, now).unwrap();
    let t = dht.poll_transmit().expect("the lookup asks the storer");
    assert_eq!(t.to, storer);
    // The storer answers with the attackers' records, then as many again
    // from cheap identities, then the honest one, last.
    let ttl = now + MAX_RECORD_TTL_MS;
    let mut records: Vec<ProviderRecord> = sybils(MAX_SYBIL_IDENTITIES)
        .iter()
        .map(|a| record(a, "m", ttl))
        .collect();
    records.extend(
        (0..MAX_PROVIDERS_PER_KEY as u64).map(|i| record(&key_for(5_000_000 + i, false), "m", ttl)),
    );
    let honest = pow_key(13);
    records.push(record(&honest, "m", ttl));
    dht.handle_response(
        now + 10,
        t.id,
        Response::Providers {
            records,
            closer: Vec::new(),
        },
    );
    let mut result = None;
    while let Some(Event::QueryDone { id, result: r }) = dht.poll_event() {
        if id == q {
            result = Some(r);
        }
    }
    match result {
        Some(QueryResult::GetProviders { records, .. }) => {
            let got = publishers(&records);
            assert!(
                got.contains(&id_of(&honest)),
                "the honest provider is found"
            );
            assert_eq!(got.len(), MAX_SYBIL_IDENTITIES + 1, "cheap ids are dropped");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_catalog_lookup_keeps_honest_names_among_many_identities_names() {
    let now = 1_000_000;
    let cfg = Config {
        min_publisher_pow_bits: TEST_POW_BITS,
        ..Config::default()
    };
    let local = Contact {
        id: NodeId([1; 32]),
        addr: addr(1),
    };
    let mut dht = Dht::new(local, cfg, now);
    const STORERS: u8 = 4;
    for j in 0..STORERS {
        let storer = Contact {
            id: NodeId([10 + j; 32]),
            addr: addr(10 + u16::from(j)),
        };
        assert_eq!(
            dht.handle_request(now, storer, Request::Ping),
            Response::Pong
        );
    }
    let q = dht.get_providers(catalog_key(), now).unwrap();
    // Each storer holds other names of every attacker (each listed its
    // quota, but different names at each storer); the last storer also
    // lists the honest names.
    let ttl = now + MAX_RECORD_TTL_MS;
    let attackers = sybils(MAX_SYBIL_IDENTITIES);
    let honest_names = HONEST_CATALOG_MODELS - 1;
    let honest: Vec<SigningKey> = (0..honest_names.div_ceil(MAX_CATALOG_NAMES_PER_PUBLISHER)
        as u64)
        .map(|i| pow_key(6_000_000 + i))
        .collect();
    let mut answered = 0;
    while let Some(t) = dht.poll_transmit() {
        let j = answered;
        answered += 1;
        let mut records = Vec::new();
        for (n, a) in attackers.iter().enumerate() {
            for m in 0..MAX_CATALOG_NAMES_PER_PUBLISHER {
                let name = format!("junk-{n}-{}", j * MAX_CATALOG_NAMES_PER_PUBLISHER + m);
                records.push(record(a, &name, ttl));
            }
        }
        if answered == usize::from(STORERS) {
            for i in 0..honest_names {
                let h = &honest[i / MAX_CATALOG_NAMES_PER_PUBLISHER];
                records.push(record(h, &format!("honest-{i}"), ttl));
            }
        }
        assert!(records.len() <= hypha_dht::codec::MAX_RECORDS_PER_REPLY);
        dht.handle_response(
            now + 10,
            t.id,
            Response::Providers {
                records,
                closer: Vec::new(),
            },
        );
    }
    assert_eq!(answered, usize::from(STORERS));
    let mut result = None;
    while let Some(Event::QueryDone { id, result: r }) = dht.poll_event() {
        if id == q {
            result = Some(r);
        }
    }
    match result {
        Some(QueryResult::GetProviders { records, .. }) => {
            let junk = records
                .iter()
                .filter(|r| r.model.starts_with("junk-"))
                .count();
            assert_eq!(
                junk,
                MAX_SYBIL_IDENTITIES * MAX_CATALOG_NAMES_PER_PUBLISHER,
                "each identity keeps its quota of names in the result, no more"
            );
            for i in 0..honest_names {
                let name = format!("honest-{i}");
                assert!(records.iter().any(|r| r.model == name), "{name} is listed");
            }
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_records_relays_are_signed_and_survive_the_wire() {
    let key = SigningKey::from_bytes(&[3; 32]);
    let mut r = record(&key, "m", 1_000_000 + MAX_RECORD_TTL_MS);
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

#[test]
fn a_lookup_hands_out_no_record_that_lapsed_while_it_ran() {
    let now = 1_000_000;
    let key = model_key("m");
    let local = Contact {
        id: NodeId([1; 32]),
        addr: addr(1),
    };
    let cfg = Config {
        min_publisher_pow_bits: TEST_POW_BITS,
        ..Config::default()
    };
    let mut dht = Dht::new(local, cfg, now);
    let storer = Contact {
        id: NodeId([2; 32]),
        addr: addr(2),
    };
    dht.handle_request(now, storer, Request::Ping);
    let q = dht.get_providers(key, now).unwrap();
    let t = dht.poll_transmit().expect("the lookup asks the storer");
    // A record good for one more second, and a closer peer to ask.
    let closer = Contact {
        id: NodeId([3; 32]),
        addr: addr(3),
    };
    let short = record(&pow_key(14), "m", now + 1_000);
    let long = record(&pow_key(15), "m", now + MAX_RECORD_TTL_MS);
    dht.handle_response(
        now + 10,
        t.id,
        Response::Providers {
            records: vec![short, long.clone()],
            closer: vec![closer],
        },
    );
    // The closer peer never answers; the lookup ends after the first
    // record lapsed.
    let mut at = now + 10;
    let mut result = None;
    while result.is_none() && at < now + 60_000 {
        at += 500;
        dht.handle_timeout(at);
        while dht.poll_transmit().is_some() {}
        while let Some(Event::QueryDone { id, result: r }) = dht.poll_event() {
            if id == q {
                result = Some(r);
            }
        }
    }
    assert!(
        at > now + 1_000,
        "the lookup ended before the record lapsed"
    );
    match result {
        Some(QueryResult::GetProviders { records, .. }) => {
            assert_eq!(records, vec![long], "only the live record is handed out");
        }
        other => panic!("{other:?}"),
    }
}
