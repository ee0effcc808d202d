//! Remote inference between two real nodes on loopback: a seeder running
//! the test model behind QUIC and a consumer with no model, each with its
//! own identity. Requests go to the consumer's HTTP API, the way an OpenAI
//! client sends them, and run on the seeder.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hypha_node::net::addr::PeerAddr;
use hypha_node::{Node, NodeConfig};

mod common;
use common::{metrics, seeder, stream_chat, Net};
use serde_json::{json, Value};

async fn post(
    c: &reqwest::Client,
    base: &str,
    path: &str,
    body: &Value,
) -> (u16, Value, Option<String>) {
    let resp = c
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let peer = resp
        .headers()
        .get(hypha_node::api::PEER_HEADER)
        .map(|v| v.to_str().unwrap().to_owned());
    (status, resp.json().await.expect("a JSON body"), peer)
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({
        "model": "default",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_output_through_the_network_equals_the_seeders_own() {
    let net = Net::start(8, 64).await;
    let c = common::client();
    let seeder_id = net.seeder.id().unwrap().to_string();

    // Chat, whole response: same text and usage from both fronts.
    let body = chat("Name three colours of the rainbow.", 40);
    let (s1, local, _) = post(&c, &net.seeder_base(), "/v1/chat/completions", &body).await;
    let (s2, remote, peer) = post(&c, &net.consumer_base(), "/v1/chat/completions", &body).await;
    assert_eq!((s1, s2), (200, 200), "{local} {remote}");
    assert_eq!(
        peer.as_deref(),
        Some(seeder_id.as_str()),
        "served by the seeder"
    );
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(!text(&local).is_empty());
    assert_eq!(text(&remote), text(&local));
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(remote["usage"][field], local["usage"][field], "{field}");
    }
    // The remote request was paid for at the seeder's published prices
    // (1 per prompt token, 4 per generated token), every token delivered.
    let billed = |u: &Value| {
        u["prompt_tokens"].as_u64().unwrap() + 4 * u["completion_tokens"].as_u64().unwrap()
    };
    assert_eq!(
        remote["usage"]["credits"].as_u64(),
        Some(billed(&remote["usage"]))
    );
    assert!(
        local["usage"].get("credits").is_none(),
        "local requests cost nothing"
    );
    assert_eq!(
        remote["choices"][0]["finish_reason"],
        local["choices"][0]["finish_reason"]
    );

    // Chat, streamed with usage: the pieces add up to the same text.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let streamed = stream_chat(&c, &net.consumer_base(), &sbody).await;
    assert!(
        streamed.pieces > 5,
        "token by token: {} pieces",
        streamed.pieces
    );
    assert_eq!(streamed.text, text(&local));
    assert_eq!(
        streamed.usage["completion_tokens"],
        local["usage"]["completion_tokens"]
    );
    assert_eq!(
        streamed.usage["credits"].as_u64(),
        Some(billed(&streamed.usage))
    );

    // Text completion with a stop string.
    let tbody = json!({"model": "default", "prompt": "The capital of France is", "max_tokens": 24, "temperature": 0, "stop": ["."]});
    let (_, l, _) = post(&c, &net.seeder_base(), "/v1/completions", &tbody).await;
    let (st, r, _) = post(&c, &net.consumer_base(), "/v1/completions", &tbody).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], l["choices"][0]["text"]);
    assert_eq!(
        r["usage"]["completion_tokens"],
        l["usage"]["completion_tokens"]
    );
    assert!(r["usage"]["credits"].as_u64().unwrap() > 0);

    // The consumer lists the seeder's model with its provider.
    let models: Value = c
        .get(format!("{}/v1/models", net.consumer_base()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let card = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "default")
        .expect("default listed");
    assert_eq!(card["providers"], json!([seeder_id]));

    // Both ledgers hold the same three receipts, signed by both sides; what
    // the seeder earned is what the consumer spent.
    let (sl, cl) = (net.seeder.ledger().unwrap(), net.consumer.ledger().unwrap());
    let (sid, cid) = (net.seeder.id().unwrap(), net.consumer.id().unwrap());
    assert_eq!(cl.receipts(), 3, "the consumer records before it answers");
    common::wait_receipts(sl, 3).await;
    common::wait_same_spending(sl, cl, &cid).await;
    let earned = sl.totals(&sid).earned;
    assert!(earned > 0);
    assert_eq!(sl.totals(&cid).spent, earned);
    assert_eq!(cl.totals(&cid).spent, earned);
    assert_eq!(cl.totals(&sid).earned, earned);

    // Every request above shared one connection.
    common::wait_metric(
        &c,
        &net.seeder_base(),
        "hypha_requests_total{endpoint=\"peer\",status=\"200\"} 3",
    )
    .await;
    let m = metrics(&c, &net.seeder_base()).await;
    assert!(m.contains("hypha_peers_connected 1\n"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_remote_streams_complete() {
    let net = Net::start(8, 64).await;
    let c = common::client();
    let runs = (0..8).map(|i| {
        let c = c.clone();
        let base = net.consumer_base();
        async move {
            let mut body = chat(&format!("Count from {i} to {}.", i + 5), 24);
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
            stream_chat(&c, &base, &body).await
        }
    });
    let replies = futures_util::future::join_all(runs).await;
    for r in &replies {
        assert!(!r.text.is_empty());
        assert_eq!(r.finish.as_deref(), Some("length"), "{:?}", r.finish);
        assert_eq!(r.usage["completion_tokens"], 24);
    }
    common::wait_metric(
        &c,
        &net.seeder_base(),
        "hypha_requests_total{endpoint=\"peer\",status=\"200\"} 8",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_cancels_the_generation_on_the_seeder() {
    let net = Net::start(2, 64).await;
    let c = common::client();
    let mut body = chat("Write a very long story about the sea.", 400);
    body["stream"] = json!(true);
    let resp = c
        .post(format!("{}/v1/chat/completions", net.consumer_base()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut seen = 0;
    while seen < 3 {
        stream.next().await.unwrap().unwrap();
        seen += 1;
    }
    let engine = net.seeder.engine().unwrap();
    let busy = || {
        engine
            .stats()
            .slots_busy
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(busy(), 1, "the seeder is generating");
    drop(stream);
    let left = Instant::now();
    while busy() != 0 {
        assert!(
            left.elapsed() < Duration::from_secs(2),
            "the seeder never freed the slot"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // 400 tokens take seconds at this speed; the slot was freed long before.
    let freed_after = left.elapsed();
    common::wait_metric(&c, &net.seeder_base(), "hypha_requests_cancelled_total 1").await;
    common::wait_metric(
        &c,
        &net.seeder_base(),
        "hypha_requests_total{endpoint=\"peer\",status=\"499\"} 1",
    )
    .await;
    eprintln!("seeder freed the slot {freed_after:?} after the client left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_wrong_or_busy_seeders_give_clear_errors() {
    let c = common::client();
    let body = chat("Hello", 4);

    // A busy seeder (no queue at all) refuses: 503 with Retry-After.
    let busy = Net::start(1, 0).await;
    let resp = c
        .post(format!("{}/v1/chat/completions", busy.consumer_base()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "peer_busy", "{v}");

    // A model nobody serves: 404 naming what the network offers.
    let mut other = body.clone();
    other["model"] = json!("no-such-model");
    let (st, v, _) = post(&c, &busy.consumer_base(), "/v1/chat/completions", &other).await;
    assert_eq!(st, 404, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("default"),
        "{v}"
    );

    // The right address but another identity: the dial is refused.
    let seeder_addr = busy.seeder.quic_addr().unwrap();
    let impostor = PeerAddr {
        id: hypha_node::identity::Identity::from_seed([9; 32]).id(),
        addr: seeder_addr,
    };
    let (consumer, _dir) = common::consumer(vec![impostor.clone()], Duration::from_secs(1)).await;
    let started = Instant::now();
    let (st, v, _) = post(
        &c,
        &format!("http://{}", consumer.http_addr()),
        "/v1/chat/completions",
        &body,
    )
    .await;
    assert_eq!(st, 502, "{v}");
    assert_eq!(v["error"]["code"], "peer_unavailable", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&impostor.id.to_string()) && msg.contains("certificate"),
        "{msg}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let health: Value = c
        .get(format!("http://{}/health", consumer.http_addr()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["peers"][0]["connected"], false, "{health}");

    // Nobody listening: 502 after the dial timeout, not a hang.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let down = PeerAddr {
        id: busy.seeder.id().unwrap(),
        addr: silent.local_addr().unwrap(),
    };
    let (consumer, _dir2) = common::consumer(vec![down.clone()], Duration::from_secs(1)).await;
    let started = Instant::now();
    // The start-up probe may still be dialing; a request waits for it.
    let (st, v, _) = post(
        &c,
        &format!("http://{}", consumer.http_addr()),
        "/v1/chat/completions",
        &body,
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(st, 502, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no answer"),
        "{v}"
    );

    // A seeder that was known and then went away: 502.
    let net = Net::start(2, 64).await;
    let (st, _, _) = post(&c, &net.consumer_base(), "/v1/chat/completions", &body).await;
    assert_eq!(st, 200);
    let consumer_base = net.consumer_base();
    let Net {
        seeder,
        consumer: live,
        _dirs,
    } = net;
    seeder.stop().await.unwrap();
    let started = Instant::now();
    let (st, v, _) = post(&c, &consumer_base, "/v1/chat/completions", &body).await;
    assert_eq!(st, 502, "{v}");
    assert_eq!(v["error"]["code"], "peer_unavailable", "{v}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    live.stop().await.unwrap();
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_seeder_is_redialed() {
    let c = common::client();
    let dir = tempfile::tempdir().unwrap();
    let first = seeder(2, 64, dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = first.peer_addr().unwrap();
    let (consumer, _cdir) = common::consumer(vec![addr.clone()], Duration::from_secs(1)).await;
    let base = format!("http://{}", consumer.http_addr());
    let body = chat("Hello", 4);
    assert_eq!(post(&c, &base, "/v1/chat/completions", &body).await.0, 200);
    first.stop().await.unwrap();
    // Same identity, same address.
    let second = seeder(2, 64, dir.path(), addr.addr).await;
    assert_eq!(second.peer_addr().unwrap(), addr);
    let (st, v, _) = post(&c, &base, "/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    consumer.stop().await.unwrap();
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_model_still_serves_it_locally_and_others_remotely() {
    // A node with its own model and a peer: its own model runs here.
    let net = Net::start(2, 64).await;
    let mut engine = hypha_engine::EngineConfig::new(common::test_model());
    engine.parallel = 1;
    engine.ctx_per_slot = 512;
    engine.threads = 1;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::new(Some(engine));
    cfg.peers = vec![net.seeder.peer_addr().unwrap()];
    cfg.data_dir = Some(dir.path().to_owned());
    cfg.pow_bits = common::TEST_POW_BITS;
    let both = Node::start(cfg).await.unwrap();
    let c = common::client();
    let base = format!("http://{}", both.http_addr());
    let name = both.engine().unwrap().info().name.clone();
    let mut body = chat("Hello", 4);
    body["model"] = json!(name);
    let (st, _, peer) = post(&c, &base, "/v1/chat/completions", &body).await;
    assert_eq!(st, 200);
    assert_eq!(peer, None, "its own model runs locally");
    // `default` is only an alias on the seeder, so it goes there.
    let (st, _, peer) = post(&c, &base, "/v1/chat/completions", &chat("Hello", 4)).await;
    assert_eq!(st, 200);
    assert_eq!(peer, Some(net.seeder.id().unwrap().to_string()));
    both.stop().await.unwrap();
}
