//! DHT lookup latency in a real loopback network: twenty nodes with real
//! QUIC sockets join through one bootstrap node; each measured lookup is a
//! FIND_NODE for a random id from a random node, over connections the
//! nodes keep (the first lookups dial, later ones reuse). Prints the median
//! and p99 of 400 lookups and their hop counts, then lets criterion time
//! lookups too.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use hypha_node::{Node, NodeConfig};
use hypha_wire::NodeId;

const NODES: usize = 20;
const SAMPLES: usize = 400;

async fn network(dirs: &[tempfile::TempDir]) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for d in dirs {
        let mut cfg = NodeConfig::new(None);
        cfg.quic_addr = Some("127.0.0.1:0".parse().unwrap());
        cfg.data_dir = Some(d.path().to_owned());
        cfg.pow_bits = 8;
        if let Some(first) = nodes.first() {
            cfg.bootstrap = vec![first.peer_addr().unwrap()];
        }
        nodes.push(Node::start(cfg).await.expect("node starts"));
    }
    // Let the joins' own lookups settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    nodes
}

struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn id(&mut self) -> NodeId {
        let mut b = [0u8; 32];
        for c in b.chunks_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        NodeId(b)
    }
}

async fn lookup(nodes: &[Node], rng: &mut Xorshift) -> (Duration, u32) {
    let from = &nodes[(rng.next() % nodes.len() as u64) as usize];
    let d = from.peers().unwrap().discovery().unwrap().clone();
    let target = rng.id();
    let t = Instant::now();
    let found = d.find_node(target).await.expect("lookup finishes");
    assert!(!found.closest.is_empty());
    (t.elapsed(), found.hops)
}

fn bench(c: &mut Criterion) {
    hypha_node::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dirs: Vec<tempfile::TempDir> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = rt.block_on(network(&dirs));
    let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15);
    let (mut times, hops): (Vec<Duration>, Vec<u32>) = rt.block_on(async {
        let mut out = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            out.push(lookup(&nodes, &mut rng).await);
        }
        out.into_iter().unzip()
    });
    times.sort();
    let mut hist = [0usize; 8];
    for h in hops {
        hist[(h as usize).min(7)] += 1;
    }
    println!(
        "lookup latency over {SAMPLES} lookups in a {NODES}-node loopback network: median {:?}, p99 {:?}, max {:?}; hops {:?}",
        times[SAMPLES / 2],
        times[SAMPLES * 99 / 100],
        times[SAMPLES - 1],
        hist
    );
    c.bench_function("dht_lookup_20_nodes", |b| {
        b.to_async(&rt).iter(|| {
            let mut r = Xorshift(rng.next());
            let nodes = &nodes;
            async move { lookup(nodes, &mut r).await }
        })
    });
    rt.block_on(async {
        for n in nodes {
            n.stop().await.unwrap();
        }
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
