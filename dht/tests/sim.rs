//! A deterministic simulator: 10,000 sans-IO DHT nodes in one process, a
//! virtual clock, seeded randomness, per-message latency and loss, and
//! churn. It prints what it measured and asserts floors. A failure prints
//! its seed; `HYPHA_SIM_SEED` replays one.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use ed25519_dalek::SigningKey;
use hypha_dht::{
    model_key, Config, Contact, Dht, Event, ProviderRecord, QueryId, QueryResult, Request,
    RequestId, Response, Rng,
};
use hypha_wire::NodeId;

const NODES: usize = 10_000;
const LOSS_PER_MESSAGE: u64 = 10; // per thousand
const LATENCY_MS: (u64, u64) = (5, 80);

enum Msg {
    Request {
        from: usize,
        to: usize,
        id: RequestId,
        request: Request,
    },
    Response {
        to: usize,
        id: RequestId,
        response: Response,
    },
    Timeout {
        node: usize,
        id: RequestId,
    },
}

struct Sim {
    seed: u64,
    rng: Rng,
    now_ms: u64,
    nodes: Vec<Option<Dht>>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    pending: HashMap<u64, Msg>,
    seq: u64,
    done: HashMap<(usize, QueryId), QueryResult>,
    timeout_ms: u64,
}

fn addr_of(i: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8),
        4000,
    ))
}

fn index_of(addr: &SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(a) => {
            let [_, b, c, d] = a.ip().octets();
            (usize::from(b) << 16) | (usize::from(c) << 8) | usize::from(d)
        }
        SocketAddr::V6(_) => usize::MAX,
    }
}

impl Sim {
    fn new(seed: u64) -> Self {
        Self {
            seed,
            rng: Rng::new(seed),
            now_ms: 0,
            nodes: Vec::new(),
            queue: BinaryHeap::new(),
            pending: HashMap::new(),
            seq: 0,
            done: HashMap::new(),
            timeout_ms: Config::default().request_timeout_ms,
        }
    }

    fn contact(&self, i: usize) -> Option<Contact> {
        self.nodes.get(i)?.as_ref().map(|d| d.local())
    }

    fn schedule(&mut self, at: u64, msg: Msg) {
        self.seq += 1;
        self.pending.insert(self.seq, msg);
        self.queue.push(Reverse((at, self.seq)));
    }

    fn latency(&mut self) -> u64 {
        LATENCY_MS.0 + self.rng.below(LATENCY_MS.1 - LATENCY_MS.0)
    }

    fn lost(&mut self) -> bool {
        self.rng.below(1000) < LOSS_PER_MESSAGE
    }

    /// Moves a node's outgoing requests onto the network and collects its
    /// finished queries.
    fn drain(&mut self, i: usize) {
        let mut out = Vec::new();
        let mut events = Vec::new();
        if let Some(Some(d)) = self.nodes.get_mut(i) {
            while let Some(t) = d.poll_transmit() {
                out.push(t);
            }
            while let Some(e) = d.poll_event() {
                events.push(e);
            }
        }
        for Event::QueryDone { id, result } in events {
            self.done.insert((i, id), result);
        }
        for t in out {
            let to = index_of(&t.to.addr);
            self.schedule(
                self.now_ms + self.timeout_ms,
                Msg::Timeout { node: i, id: t.id },
            );
            if !self.lost() {
                let at = self.now_ms + self.latency();
                self.schedule(
                    at,
                    Msg::Request {
                        from: i,
                        to,
                        id: t.id,
                        request: t.request,
                    },
                );
            }
        }
    }

    /// Runs until nothing is left to deliver.
    fn run(&mut self) {
        while let Some(Reverse((at, seq))) = self.queue.pop() {
            self.now_ms = self.now_ms.max(at);
            let Some(msg) = self.pending.remove(&seq) else {
                continue;
            };
            match msg {
                Msg::Request {
                    from,
                    to,
                    id,
                    request,
                } => {
                    let Some(from_c) = self.contact(from) else {
                        continue;
                    };
                    let now = self.now_ms;
                    let Some(Some(d)) = self.nodes.get_mut(to) else {
                        continue;
                    };
                    let response = d.handle_request(now, from_c, request);
                    self.drain(to);
                    if !self.lost() {
                        let at = self.now_ms + self.latency();
                        self.schedule(
                            at,
                            Msg::Response {
                                to: from,
                                id,
                                response,
                            },
                        );
                    }
                }
                Msg::Response { to, id, response } => {
                    let now = self.now_ms;
                    if let Some(Some(d)) = self.nodes.get_mut(to) {
                        d.handle_response(now, id, response);
                        self.drain(to);
                    }
                }
                Msg::Timeout { node, id } => {
                    let now = self.now_ms;
                    if let Some(Some(d)) = self.nodes.get_mut(node) {
                        d.handle_failure(now, id);
                        self.drain(node);
                    }
                }
            }
        }
    }

    /// Adds a node that bootstraps from one random live node.
    fn join(&mut self) -> usize {
        let i = self.nodes.len();
        let id = self.rng.id();
        let cfg = Config {
            seed: self.rng.next_u64(),
            ..Config::default()
        };
        let dht = Dht::new(
            Contact {
                id,
                addr: addr_of(i),
            },
            cfg,
            self.now_ms,
        );
        self.nodes.push(Some(dht));
        let live: Vec<usize> = (0..i).filter(|&j| self.nodes[j].is_some()).collect();
        if !live.is_empty() {
            let via = live[self.rng.below(live.len() as u64) as usize];
            let c = self.contact(via).unwrap();
            let now = self.now_ms;
            self.nodes[i]
                .as_mut()
                .unwrap()
                .bootstrap(&[c], now)
                .expect("bootstrap starts");
            self.drain(i);
        }
        i
    }

    fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_some())
            .collect()
    }

    fn pick_live(&mut self) -> usize {
        let live = self.live();
        live[self.rng.below(live.len() as u64) as usize]
    }

    /// `n` lookups of live nodes' ids from random live nodes: the share that
    /// found their target, and the hop counts.
    fn lookups(&mut self, n: usize) -> (f64, Vec<u32>) {
        let mut asked = Vec::new();
        for _ in 0..n {
            let from = self.pick_live();
            let t = self.pick_live();
            let target = self.contact(t).unwrap().id;
            let now = self.now_ms;
            let q = self.nodes[from]
                .as_mut()
                .unwrap()
                .find_node(target, now)
                .unwrap();
            self.drain(from);
            asked.push((from, q, target));
        }
        self.run();
        let mut found = 0;
        let mut hops = Vec::new();
        for (from, q, target) in asked {
            let from_id = self.contact(from).unwrap().id;
            match self.done.remove(&(from, q)) {
                Some(QueryResult::FindNode {
                    closest, hops: h, ..
                }) => {
                    if target == from_id || closest.iter().any(|c| c.id == target) {
                        found += 1;
                        hops.push(h);
                    }
                }
                other => panic!("seed {}: lookup ended with {other:?}", self.seed),
            }
        }
        (found as f64 / n as f64, hops)
    }
}

fn distribution(hops: &[u32]) -> (u32, String) {
    let mut sorted = hops.to_vec();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for h in hops {
        *counts.entry(*h).or_default() += 1;
    }
    let mut keys: Vec<_> = counts.keys().copied().collect();
    keys.sort_unstable();
    let text = keys
        .iter()
        .map(|k| format!("{k}:{}", counts[k]))
        .collect::<Vec<_>>()
        .join(" ");
    (median, text)
}

fn seed() -> u64 {
    std::env::var("HYPHA_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0005_eed0_f4e7)
}

#[test]
fn ten_thousand_nodes_find_each_other_before_and_after_churn() {
    let seed = seed();
    eprintln!("simulation seed {seed} (HYPHA_SIM_SEED replays it)");
    let mut sim = Sim::new(seed);
    // Join in waves so each wave bootstraps into a settled network.
    while sim.nodes.len() < NODES {
        for _ in 0..250.min(NODES - sim.nodes.len()) {
            sim.join();
        }
        sim.run();
    }
    let sizes: Vec<usize> = sim
        .nodes
        .iter()
        .flatten()
        .map(|d| d.table().len())
        .collect();
    let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
    eprintln!(
        "{NODES} nodes joined; mean routing table {mean:.0} contacts; virtual time {} s",
        sim.now_ms / 1000
    );

    let (ok, hops) = sim.lookups(2000);
    let (median, dist) = distribution(&hops);
    eprintln!("no churn: {:.2}% of 2000 lookups found their target; hops median {median}, distribution {dist}", ok * 100.0);
    assert!(ok >= 0.999, "seed {seed}: lookup success {ok} below 99.9%");
    assert!(median <= 4, "seed {seed}: median hops {median}");

    // Providers: 20 publishers store records; their neighbours then churn.
    let mut published = Vec::new();
    for p in 0..20u8 {
        let publisher = sim.pick_live();
        let key = SigningKey::from_bytes(&[p.wrapping_add(100); 32]);
        let model = format!("model-{p}");
        let record = ProviderRecord {
            publisher: NodeId([0; 32]),
            public_key: [0; 32],
            addrs: vec![addr_of(publisher)],
            relays: Vec::new(),
            model: model.clone(),
            model_sha256: [p; 32],
            context_length: 2048,
            backend: "cpu".into(),
            decode_tokens_per_s: 100,
            free_slots: 8,
            price_prompt_micro: 1,
            price_completion_micro: 4,
            expires_ms: sim.now_ms + 30 * 60 * 1000,
            signature: [0; 64],
        }
        .sign(&key);
        // The record's publisher id is its signing key's; the node that
        // stores it must be that publisher.
        let id = record.publisher;
        let i = sim.nodes.len();
        let dht = Dht::new(
            Contact {
                id,
                addr: addr_of(i),
            },
            Config::default(),
            sim.now_ms,
        );
        sim.nodes.push(Some(dht));
        let via = sim.contact(publisher).unwrap();
        let now = sim.now_ms;
        let node = sim.nodes[i].as_mut().unwrap();
        node.bootstrap(&[via], now).unwrap();
        sim.drain(i);
        sim.run();
        let now = sim.now_ms;
        let q = sim.nodes[i]
            .as_mut()
            .unwrap()
            .add_provider(model_key(&model), record, now)
            .unwrap();
        sim.drain(i);
        sim.run();
        match sim.done.remove(&(i, q)) {
            Some(QueryResult::AddProvider { stored, .. }) => {
                assert!(
                    stored >= 15,
                    "seed {seed}: record stored at only {stored} nodes"
                )
            }
            other => panic!("seed {seed}: {other:?}"),
        }
        published.push((model, id));
    }

    // Churn: 30% of nodes leave at once, then as many new ones join.
    let live = sim.live();
    let leaving = live.len() * 3 / 10;
    let mut gone = 0;
    while gone < leaving {
        let i = sim.pick_live();
        // Publishers stay; everyone else may go, their neighbours included.
        if published
            .iter()
            .any(|(_, id)| Some(*id) == sim.contact(i).map(|c| c.id))
        {
            continue;
        }
        sim.nodes[i] = None;
        gone += 1;
    }
    for _ in 0..leaving {
        sim.join();
        if sim.nodes.len().is_multiple_of(250) {
            sim.run();
        }
    }
    sim.run();
    let (ok, hops) = sim.lookups(2000);
    let (median, dist) = distribution(&hops);
    eprintln!(
        "after {leaving} left and {leaving} joined: {:.2}% of 2000 lookups found their target; hops median {median}, distribution {dist}",
        ok * 100.0
    );
    assert!(
        ok >= 0.99,
        "seed {seed}: lookup success after churn {ok} below 99%"
    );

    // Every record is still found from random nodes.
    let mut found = 0;
    let mut asked = Vec::new();
    for (model, publisher) in &published {
        for _ in 0..5 {
            let from = sim.pick_live();
            let now = sim.now_ms;
            let q = sim.nodes[from]
                .as_mut()
                .unwrap()
                .get_providers(model_key(model), now)
                .unwrap();
            sim.drain(from);
            asked.push((from, q, *publisher));
        }
    }
    sim.run();
    for (from, q, publisher) in &asked {
        match sim.done.remove(&(*from, *q)) {
            Some(QueryResult::GetProviders { records, .. }) => {
                if records.iter().any(|r| r.publisher == *publisher) {
                    found += 1;
                }
            }
            other => panic!("seed {seed}: {other:?}"),
        }
    }
    eprintln!(
        "provider records found after churn: {found} of {} lookups",
        asked.len()
    );
    assert!(
        found as f64 >= asked.len() as f64 * 0.99,
        "seed {seed}: only {found} of {} provider lookups found their record",
        asked.len()
    );

    // Past their expiry, records are gone.
    sim.now_ms += 31 * 60 * 1000;
    let from = sim.pick_live();
    let now = sim.now_ms;
    let q = sim.nodes[from]
        .as_mut()
        .unwrap()
        .get_providers(model_key(&published[0].0), now)
        .unwrap();
    sim.drain(from);
    sim.run();
    match sim.done.remove(&(from, q)) {
        Some(QueryResult::GetProviders { records, .. }) => {
            assert!(records.is_empty(), "seed {seed}: expired records returned")
        }
        other => panic!("seed {seed}: {other:?}"),
    }
}
