//! Routing-table hot paths with 10,000 contacts offered: inserting (most
//! land in full buckets) and the closest-k query every lookup and every
//! answered FIND_NODE runs.

use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use hypha_dht::{Contact, Rng, RoutingTable, K};

fn contacts(n: usize, rng: &mut Rng) -> Vec<Contact> {
    (0..n)
        .map(|i| Contact {
            id: rng.id(),
            addr: SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 4000)),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut rng = Rng::new(42);
    let local = rng.id();
    let offered = contacts(10_000, &mut rng);
    c.bench_function("table_insert_10k", |b| {
        b.iter(|| {
            let mut t = RoutingTable::new(local);
            for (n, c) in offered.iter().enumerate() {
                let _ = t.update(*c, n as u64);
            }
            t.len()
        })
    });
    let mut t = RoutingTable::new(local);
    for (n, c) in offered.iter().enumerate() {
        let _ = t.update(*c, n as u64);
    }
    let targets: Vec<_> = (0..1024).map(|_| rng.id()).collect();
    let mut i = 0;
    c.bench_function("table_closest_k", |b| {
        b.iter(|| {
            i = (i + 1) % targets.len();
            t.closest(&targets[i], K)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
