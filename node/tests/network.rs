//! A real network on loopback: twenty nodes with real QUIC sockets join
//! one DHT through a bootstrap node; three of them run the test model (one
//! in a separate `hypha` process). Every consumer finds every seeder
//! through the DHT and gets completions; after the separate seeder is
//! SIGKILLed, requests go to the other two (a consumer whose best choice
//! was the dead one fails over before the first token) and no consumer
//! tries the dead one twice. Provider records a peer sends over the wire are checked: forged
//! and expired ones are refused.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use hypha_node::net::addr::PeerAddr;
use hypha_node::Node;
use hypha_wire::NodeId;
use serde_json::{json, Value};

mod common;
use common::{plain_node, seeder_config, test_model, TEST_POW_BITS};

const CONSUMERS: usize = 16;

/// One short greedy completion through `node`'s API: the seeder that
/// served it.
async fn complete(c: &reqwest::Client, node: &Node, model: &str) -> NodeId {
    let resp = c
        .post(format!("http://{}/v1/chat/completions", node.http_addr()))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 4, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let peer = resp
        .headers()
        .get(hypha_node::api::PEER_HEADER)
        .map(|h| h.to_str().unwrap().to_owned());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "completion failed: {body}");
    assert!(!body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
    peer.expect("a remote completion names its seeder")
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_nodes_find_three_seeders_and_route_around_a_dead_one() {
    let started = Instant::now();
    let dirs: Vec<tempfile::TempDir> = (0..20).map(|_| tempfile::tempdir().unwrap()).collect();
    let boot = plain_node(dirs[0].path(), Vec::new()).await;
    let boot_addr = boot.peer_addr().unwrap();

    // Two seeders in this process, one in its own.
    let mut seeders = Vec::new();
    for d in &dirs[1..3] {
        let mut cfg = seeder_config(2, 64, d.path(), "127.0.0.1:0".parse().unwrap());
        cfg.bootstrap = vec![boot_addr.clone()];
        seeders.push(Node::start(cfg).await.expect("seeder starts"));
    }
    let model = test_model();
    let boot_arg = boot_addr.to_string();
    let pow = TEST_POW_BITS.to_string();
    let mut separate = Some(common::seeder_proc(
        dirs[3].path(),
        2,
        &["--pow-bits", &pow, "--bootstrap", &boot_arg],
    ));
    let name = model.file_stem().unwrap().to_str().unwrap().to_owned();
    let doomed: PeerAddr = separate
        .as_ref()
        .unwrap()
        .wait_for("peers reach this node as")
        .parse()
        .unwrap();
    let mut seeder_ids: HashSet<NodeId> = seeders.iter().map(|s| s.id().unwrap()).collect();
    seeder_ids.insert(doomed.id);

    let mut consumers = Vec::new();
    for d in &dirs[4..4 + CONSUMERS] {
        consumers.push(plain_node(d.path(), vec![boot_addr.clone()]).await);
    }
    assert_eq!(1 + seeders.len() + 1 + consumers.len(), 20);

    // The last consumer to join, which has looked nothing up, lists the
    // model with its three providers (through the DHT's catalog).
    let c = common::client();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let models = common::get_json(
            &c,
            &format!("http://{}/v1/models", consumers.last().unwrap().http_addr()),
        )
        .await;
        let count = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == name.as_str())
            .map(|m| m["provider_count"].clone());
        if count == Some(json!(3)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/v1/models never listed 3 providers: {models}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let catalog = consumers[0]
        .peers()
        .unwrap()
        .discovery()
        .unwrap()
        .catalog()
        .await;
    assert!(catalog.contains(&name), "{catalog:?}");

    // Every consumer finds all three seeders through the DHT.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, c) in consumers.iter().enumerate() {
        loop {
            let found: HashSet<NodeId> = c
                .peers()
                .unwrap()
                .candidates(&name, true, 0)
                .await
                .into_iter()
                .map(|c| c.addr.id)
                .collect();
            if found == seeder_ids {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "consumer {i} found {} of the 3 seeders",
                found.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!(
        "all {CONSUMERS} consumers found the 3 seeders {:.1} s after the first node started",
        started.elapsed().as_secs_f64()
    );

    // The API lists the model with its provider count.
    let models = common::get_json(
        &c,
        &format!("http://{}/v1/models", consumers[0].http_addr()),
    )
    .await;
    let card = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == name.as_str())
        .unwrap_or_else(|| panic!("no {name} in {models}"));
    assert_eq!(card["provider_count"], 3, "{card}");
    let network = common::get_json(
        &c,
        &format!("http://{}/v1/network", consumers[0].http_addr()),
    )
    .await;
    assert!(
        network["routing_table"].as_array().unwrap().len() >= 3,
        "{network}"
    );

    // Every consumer gets completions, spread over the seeders.
    let mut by_seeder: HashMap<NodeId, usize> = HashMap::new();
    for _ in 0..2 {
        let served =
            futures_util::future::join_all(consumers.iter().map(|n| complete(&c, n, &name))).await;
        for s in &served {
            assert!(seeder_ids.contains(s), "served by a node that is no seeder");
            *by_seeder.entry(*s).or_default() += 1;
        }
    }
    println!(
        "before the kill: {} requests by the separate seeder, {:?} by the others",
        by_seeder.get(&doomed.id).copied().unwrap_or(0),
        seeders
            .iter()
            .map(|s| by_seeder.get(&s.id().unwrap()).copied().unwrap_or(0))
            .collect::<Vec<_>>()
    );
    assert!(
        by_seeder.contains_key(&doomed.id),
        "the separate seeder was never chosen"
    );

    // Kill the separate seeder without letting it close anything.
    drop(separate.take());
    let after_kill = Instant::now();
    // Every request succeeds (complete() checks each answer).
    futures_util::future::join_all(consumers.iter().map(|n| complete(&c, n, &name))).await;
    let tried_dead: Vec<u32> = consumers
        .iter()
        .map(|n| n.peers().unwrap().health(&doomed.id).failures)
        .collect();
    println!(
        "after the kill: {CONSUMERS} completions in {:.1} s, {} consumers tried the dead seeder first",
        after_kill.elapsed().as_secs_f64(),
        tried_dead.iter().filter(|f| **f > 0).count()
    );

    // A consumer that failed over from the dead seeder does not try it
    // again; one that had not met it yet tries it at most once.
    let again = Instant::now();
    futures_util::future::join_all(consumers.iter().map(|n| complete(&c, n, &name))).await;
    let tried_again: Vec<u32> = consumers
        .iter()
        .map(|n| n.peers().unwrap().health(&doomed.id).failures)
        .collect();
    for (before, after) in tried_dead.iter().zip(&tried_again) {
        assert!(*after <= 1, "the dead seeder was tried {after} times");
        if *before > 0 {
            assert_eq!(before, after, "the dead seeder was tried again");
        }
    }
    println!(
        "next round: {CONSUMERS} completions in {:.1} s, {} consumers met the dead seeder for the first time",
        again.elapsed().as_secs_f64(),
        tried_again.iter().zip(&tried_dead).filter(|(a, b)| a > b).count()
    );

    for n in consumers.into_iter().chain(seeders).chain([boot]) {
        n.stop().await.unwrap();
    }
}

/// Sends one DHT request over `conn` and reads the reply.
async fn dht_call(conn: &quinn::Connection, req: hypha_wire::DhtRequest) -> hypha_wire::DhtReply {
    use hypha_node::net::proto::{FramedRecv, FramedSend};
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut send = FramedSend::new(send);
    send.send(&hypha_wire::Message::Dht(req)).await.unwrap();
    send.finish();
    let mut recv = FramedRecv::new(recv);
    recv.next(|m| match m {
        hypha_wire::ArchivedMessage::DhtReply(r) => Ok(hypha_wire::owned_dht_reply(r).unwrap()),
        other => panic!("not a DHT reply: {other:?}"),
    })
    .await
    .unwrap()
    .expect("a reply")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_expired_provider_records_are_refused_over_the_wire() {
    use hypha_dht::codec::{record_to_wire, reply_from_wire};
    use hypha_dht::{model_key, ProviderRecord, Response};
    use hypha_wire::{DhtReply, DhtRequest};

    let dir = tempfile::tempdir().unwrap();
    let node = plain_node(dir.path(), Vec::new()).await;
    let to = node.peer_addr().unwrap();
    let ident = common::peer_identity(40);
    let ep =
        hypha_node::net::endpoint::Endpoint::bind(&ident, "127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep.dial(to.addr, to.id).await.unwrap();
    let hello = hypha_node::net::proto::hello_message(&ident, Default::default());
    hypha_node::net::proto::hello_as_dialer(&conn, to.id, &hello, TEST_POW_BITS)
        .await
        .unwrap();

    let now = hypha_node::util::unix_ms();
    let record = |expires_ms: u64| {
        ProviderRecord {
            publisher: ident.id(),
            public_key: ident.public_key(),
            addrs: vec!["127.0.0.1:9".parse().unwrap()],
            relays: Vec::new(),
            model: "m".into(),
            model_sha256: [1; 32],
            context_length: 512,
            backend: "CPU".into(),
            decode_tokens_per_s: 60,
            free_slots: 2,
            price_prompt_micro: 1,
            price_completion_micro: 4,
            expires_ms,
            signature: [0; 64],
        }
        .sign(ident.signing_key())
    };
    let add = |r: &ProviderRecord| DhtRequest::AddProvider {
        key: model_key("m").0,
        record: Box::new(record_to_wire(r)),
    };

    // Forged: a field changed after signing.
    let mut forged = record(now + 60_000);
    forged.free_slots = 99;
    assert_eq!(dht_call(&conn, add(&forged)).await, DhtReply::Refused);
    // Someone else's record, correctly signed by its publisher, offered by
    // this peer: only publishers store their own records.
    let other = common::peer_identity(41);
    let theirs = record(now + 60_000).sign(other.signing_key());
    assert_eq!(dht_call(&conn, add(&theirs)).await, DhtReply::Refused);
    // Expired, and one claiming to live too long.
    assert_eq!(
        dht_call(&conn, add(&record(now - 1))).await,
        DhtReply::Refused
    );
    let too_long = now + hypha_dht::record::MAX_RECORD_TTL_MS + 60_000;
    assert_eq!(
        dht_call(&conn, add(&record(too_long))).await,
        DhtReply::Refused
    );

    // A good record is stored and handed out to whoever asks.
    let good = record(now + 60_000);
    assert_eq!(dht_call(&conn, add(&good)).await, DhtReply::Stored);
    let got = dht_call(
        &conn,
        DhtRequest::GetProviders {
            key: model_key("m").0,
        },
    )
    .await;
    match reply_from_wire(got).unwrap() {
        Response::Providers { records, .. } => assert_eq!(records, vec![good]),
        other => panic!("{other:?}"),
    }
    // A reply naming an unparsable address is refused whole.
    let bad_addr = DhtReply::Nodes {
        closer: vec![hypha_wire::WireContact {
            id: [1; 32],
            addr: "not an address".into(),
        }],
    };
    assert!(reply_from_wire(bad_addr).is_err());
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_records_are_republished_and_expire_with_their_seeder() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let boot = plain_node(dirs[0].path(), Vec::new()).await;
    let boot_addr = boot.peer_addr().unwrap();
    let ttl = Duration::from_secs(2);
    let mut cfg = seeder_config(1, 4, dirs[1].path(), "127.0.0.1:0".parse().unwrap());
    cfg.bootstrap = vec![boot_addr.clone()];
    cfg.record_ttl = ttl;
    let seeder = Node::start(cfg).await.unwrap();
    let seeder_id = seeder.id().unwrap();
    let consumer = plain_node(dirs[2].path(), vec![boot_addr]).await;
    let d = consumer.peers().unwrap().discovery().unwrap().clone();
    let expiry = |records: &[hypha_dht::ProviderRecord]| {
        records
            .iter()
            .find(|r| r.publisher == seeder_id)
            .map(|r| r.expires_ms)
    };

    // Found, then found again with a later expiry: republished.
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        if let Some(e) = expiry(&d.providers("default").await) {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "the seeder's record never appeared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        let e =
            expiry(&d.providers("default").await).expect("the record lapsed while its seeder ran");
        if e > first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the record was never republished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Its seeder gone, the record lapses: no node hands it out once it
    // expired. (Each lookup meanwhile waits out requests to the stopped
    // seeder, still in the tables, so the check runs every few seconds.)
    seeder.stop().await.unwrap();
    let stopped = Instant::now();
    while expiry(&d.providers("default").await).is_some() {
        assert!(
            stopped.elapsed() < ttl + Duration::from_secs(20),
            "an expired record is still handed out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "record republished within its {ttl:?} lifetime; gone {:.1} s after its seeder stopped",
        stopped.elapsed().as_secs_f64()
    );
    consumer.stop().await.unwrap();
    boot.stop().await.unwrap();
}

/// Two seeders of one model, one with a context too short for the prompt:
/// a request refused there as too long goes on to the other, invisibly to
/// the client. (The short one is made the first choice by loading the other
/// with one of the consumer's own requests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prompt_too_long_for_one_seeder_goes_to_one_with_a_longer_context() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let boot = plain_node(dirs[0].path(), Vec::new()).await;
    let boot_addr = boot.peer_addr().unwrap();
    let mut seeders = Vec::new();
    for (d, ctx, parallel) in [(&dirs[1], 256, 1), (&dirs[2], 1024, 2)] {
        let mut cfg = seeder_config(parallel, 16, d.path(), "127.0.0.1:0".parse().unwrap());
        cfg.bootstrap = vec![boot_addr.clone()];
        if let Some(e) = cfg.engine.as_mut() {
            e.ctx_per_slot = ctx;
        }
        if ctx > 256 {
            // A name only the long-context seeder answers to, to load it.
            cfg.model_aliases.push("long-only".into());
        }
        seeders.push(Node::start(cfg).await.unwrap());
    }
    let long = seeders[1].id().unwrap();
    assert!(seeders[0].engine().unwrap().info().ctx_per_slot < 400);
    let consumer = plain_node(dirs[3].path(), vec![boot_addr]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while consumer
        .peers()
        .unwrap()
        .candidates("default", true, 0)
        .await
        .iter()
        .filter(|c| c.context_length.is_some())
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the consumer never saw both records"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = common::client();
    // While one of the consumer's requests runs on the long-context seeder,
    // the short one scores better (RUNNING_COST_MS) and is tried first.
    let busy = {
        let c = c.clone();
        let url = format!("http://{}/v1/chat/completions", consumer.http_addr());
        tokio::spawn(async move {
            use futures_util::StreamExt as _;
            let resp = c
                .post(url)
                .json(&json!({"model": "long-only", "stream": true, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 300, "temperature": 0}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                chunk.unwrap();
            }
        })
    };
    let long_seeder = format!("http://{}", seeders[1].http_addr());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !common::metrics(&c, &long_seeder)
        .await
        .lines()
        .any(|l| l == "hypha_slots_busy 1")
    {
        assert!(
            Instant::now() < deadline,
            "the loading request never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let prompt = "Please repeat these words back to me: ".to_owned() + &"river stone ".repeat(200);
    for _ in 0..3 {
        let resp = c
            .post(format!("http://{}/v1/chat/completions", consumer.http_addr()))
            .json(&json!({"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "temperature": 0}))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let peer: NodeId = resp.headers()[hypha_node::api::PEER_HEADER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(peer, long, "only the longer context fits the prompt");
    }
    busy.await.unwrap();
    // The short seeder was tried first, and refused.
    let m = common::metrics(&c, &format!("http://{}", seeders[0].http_addr())).await;
    let refused =
        common::metric_value(&m, "hypha_requests_total{endpoint=\"peer\",status=\"400\"}");
    assert!(refused >= 1, "the short seeder was never tried: {m}");
    println!("3 of 3 long prompts served by the long-context seeder; {refused} refused first by the short one");
    for n in [consumer].into_iter().chain(seeders).chain([boot]) {
        n.stop().await.unwrap();
    }
}
