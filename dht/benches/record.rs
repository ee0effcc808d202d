//! The record store's hot path: storing a record (what every AddProvider
//! a peer sends costs) into a store already holding about 19,000 records,
//! the key itself full. The cost should not grow with the store.

use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use ed25519_dalek::SigningKey;
use hypha_dht::record::{MAX_PROVIDERS_PER_KEY, MAX_RECORDS_PER_PUBLISHER, MAX_RECORD_TTL_MS};
use hypha_dht::{model_key, ProviderRecord, RecordStore};
use hypha_wire::NodeId;

/// Records the store holds before the measured calls.
const FILL: usize = 19_000;

fn record(key: &SigningKey, model: &str, expires_ms: u64) -> ProviderRecord {
    ProviderRecord {
        publisher: NodeId([0; 32]),
        public_key: [0; 32],
        addrs: vec![SocketAddr::from(([10, 0, 0, 1], 4000))],
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

fn key(i: usize) -> SigningKey {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
    SigningKey::from_bytes(&seed)
}

fn bench(c: &mut Criterion) {
    let now = 1_000_000;
    let expires = now + MAX_RECORD_TTL_MS;
    // No proof of work asked: the bench measures the store, not grinding.
    let mut store = RecordStore::new(0);
    // One full key...
    let hot: Vec<ProviderRecord> = (0..MAX_PROVIDERS_PER_KEY)
        .map(|p| record(&key(p), "hot", expires))
        .collect();
    for r in &hot {
        store.put(model_key("hot"), r.clone(), now).unwrap();
    }
    // ...among many others, each publisher filling its quota.
    let mut n = hot.len();
    let mut p = MAX_PROVIDERS_PER_KEY;
    while n < FILL {
        let k = key(p);
        for m in 0..MAX_RECORDS_PER_PUBLISHER.min(FILL - n) {
            let model = format!("m{}", (p * 7 + m) % 1000);
            store
                .put(model_key(&model), record(&k, &model, expires), now)
                .unwrap();
            n += 1;
        }
        p += 1;
    }
    assert_eq!(store.len(), FILL);
    let refresh = hot[MAX_PROVIDERS_PER_KEY / 2].clone();
    c.bench_function("record_put_refresh_19k", |b| {
        b.iter(|| store.put(model_key("hot"), refresh.clone(), now + 1))
    });
    let newcomer = record(&key(p + 1), "hot", expires);
    c.bench_function("record_put_full_key_19k", |b| {
        b.iter(|| store.put(model_key("hot"), newcomer.clone(), now + 1))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
