//! Ledger hot paths: signing a receipt, verifying receipts one by one and in
//! batches, durable group-committed appends from many threads, and recovery
//! of a large log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hypha_ledger::{verify_batch, Ledger};

#[path = "../tests/common/mod.rs"]
mod common;
use common::{key, signed, verified};

fn bench(c: &mut Criterion) {
    let (s, cons) = (key(1), key(2));
    let one = signed(&s, &cons, 1, 10);

    c.bench_function("receipt_sign", |b| b.iter(|| one.receipt.sign(&s)));

    let mut g = c.benchmark_group("receipt_verify");
    g.throughput(Throughput::Elements(1));
    g.bench_function("single", |b| {
        b.iter_batched(
            || one.clone(),
            |r| r.verify().unwrap(),
            BatchSize::SmallInput,
        )
    });
    let batch: Vec<_> = (0..256).map(|i| signed(&s, &cons, i, 10)).collect();
    g.throughput(Throughput::Elements(256));
    g.bench_function("batch_256", |b| {
        b.iter_batched(
            || batch.clone(),
            |v| verify_batch(v).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // Durable appends: 64 threads appending at once, so the writer commits
    // them in batches with one fsync each.
    let mut g = c.benchmark_group("ledger_append");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    const THREADS: u64 = 64;
    const PER_THREAD: u64 = 200;
    g.throughput(Throughput::Elements(THREADS * PER_THREAD));
    let pool: Vec<_> = (0..THREADS * PER_THREAD)
        .map(|i| verified(&s, &cons, i, 1))
        .collect();
    let pool = Arc::new(pool);
    let round = AtomicU64::new(0);
    g.bench_function("group_commit_64_threads", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().unwrap();
                let (ledger, _) = Ledger::open(dir.path()).unwrap();
                round.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let threads: Vec<_> = (0..THREADS)
                    .map(|t| {
                        let (ledger, pool) = (ledger.clone(), pool.clone());
                        std::thread::spawn(move || {
                            for i in 0..PER_THREAD {
                                let r = pool[(t * PER_THREAD + i) as usize].clone();
                                ledger.append(r).unwrap();
                            }
                        })
                    })
                    .collect();
                for t in threads {
                    t.join().unwrap();
                }
                total += started.elapsed();
            }
            total
        })
    });
    g.finish();

    // Recovery of a 1,000,000-receipt log: written once, reopened per sample.
    let dir = tempfile::tempdir().unwrap();
    {
        let (ledger, _) = Ledger::open(dir.path()).unwrap();
        let next = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..64)
            .map(|_| {
                let (ledger, next) = (ledger.clone(), next.clone());
                std::thread::spawn(move || loop {
                    let first = next.fetch_add(256, Ordering::Relaxed);
                    if first >= 1_000_000 {
                        break;
                    }
                    let chunk: Vec<_> = (first..(first + 256).min(1_000_000))
                        .map(|i| signed(&key(1), &key(2), i, 1))
                        .collect();
                    for r in verify_batch(chunk).unwrap() {
                        ledger.append(r).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
    let mut g = c.benchmark_group("ledger_recovery");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1_000_000));
    g.bench_function("open_1m_receipts", |b| {
        b.iter(|| {
            let (ledger, rec) = Ledger::open(dir.path()).unwrap();
            assert_eq!(rec.receipts, 1_000_000);
            ledger
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
