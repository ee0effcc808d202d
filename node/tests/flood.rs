//! Floods that must not slow a node down for anyone else, each in this
//! binary of its own so that no other test shares the machine while it
//! measures: 32 peers sending 6 MiB prompts while `/health` is timed, and
//! one identity flooding the DHT with the costliest requests while another
//! peer's `FindNode` round trips are timed.

use std::time::Duration;

use hypha_node::net::proto::{FramedRecv, FramedSend};
use hypha_wire::Message;

mod common;
use common::{assert_still_serves, dial_with_hello, Net};

/// The tests here run one at a time: each measures while it floods.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_prompts_from_32_peers_leave_health_fast() {
    let _alone = ALONE.lock().await;
    const PEERS: u8 = 32;
    let net = Net::start(1, 64).await;
    let health = format!("{}/health", net.seeder_base());
    // A prompt that fills a frame: 6 MiB less room for the rest.
    let huge = "fox ".repeat((hypha_wire::MAX_FRAME_BYTES - 4096) / 4);
    let mut peers = Vec::new();
    for seed in 0..PEERS {
        peers.push(dial_with_hello(&net, 100 + seed).await);
    }
    let c = common::client();
    let sending = peers.iter().enumerate().map(|(i, (_ep, conn))| {
        let huge = huge.clone();
        async move {
            let (send, recv) = conn.open_bi().await.unwrap();
            let mut send = FramedSend::new(send);
            let mut req = common::request(1000 + i as u64, 4);
            if let Message::Request(r) = &mut req {
                r.prompt = hypha_wire::Prompt::Text(huge);
            }
            send.send(&req).await.unwrap();
            let mut recv = FramedRecv::new(recv);
            recv.next(|m| match m {
                hypha_wire::ArchivedMessage::Error(e) => Ok(e.message.to_string()),
                other => panic!("expected a refusal, got {other:?}"),
            })
            .await
            .unwrap()
            .unwrap()
        }
    });
    let all = futures_util::future::join_all(sending);
    tokio::pin!(all);
    let mut waits = Vec::new();
    let refusals = loop {
        let t = std::time::Instant::now();
        tokio::select! {
            r = &mut all => break r,
            resp = c.get(&health).send() => {
                assert_eq!(resp.unwrap().status(), 200);
                waits.push(t.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // And a few more once the flood is in, so every sample counts.
    for _ in 0..20 {
        let t = std::time::Instant::now();
        assert_eq!(c.get(&health).send().await.unwrap().status(), 200);
        waits.push(t.elapsed());
    }
    for r in &refusals {
        assert!(r.contains("bytes cannot fit the context"), "{r}");
    }
    waits.sort();
    let p99 = waits[(waits.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "/health during {PEERS} peers' 6 MiB prompts: {} samples, p50 {:?}, p99 {p99:?}",
        waits.len(),
        waits[waits.len() / 2]
    );
    assert!(p99 < Duration::from_millis(50), "p99 {p99:?}");
    // Prompts that fit are prepared and served as ever.
    assert_still_serves(&net).await;
}

/// One DHT request on a new stream of `conn`; its reply.
async fn dht_call(conn: &quinn::Connection, req: hypha_wire::DhtRequest) -> hypha_wire::DhtReply {
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut send = FramedSend::new(send);
    send.send(&Message::Dht(req)).await.unwrap();
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

/// `FindNode` round trips on `conn`, one after another, for `n` rounds.
async fn find_node_times(conn: &quinn::Connection, n: usize) -> Vec<Duration> {
    let mut out = Vec::new();
    for i in 0..n {
        let t = std::time::Instant::now();
        let target = [i as u8; 32];
        let r = dht_call(conn, hypha_wire::DhtRequest::FindNode { target }).await;
        assert!(matches!(r, hypha_wire::DhtReply::Nodes { .. }), "{r:?}");
        out.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    out.sort();
    out
}

fn p(v: &[Duration], pct: usize) -> Duration {
    v[(v.len() * pct).div_ceil(100).max(1) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dht_flood_from_one_identity_does_not_delay_another_peers_lookups() {
    let _alone = ALONE.lock().await;
    const FLOODERS: usize = 32;
    let dir = tempfile::tempdir().unwrap();
    let node = common::plain_node(dir.path(), Vec::new()).await;
    let to = node.peer_addr().unwrap();
    let join = |seed: u8| {
        let to = to.clone();
        async move {
            let ident = common::peer_identity(seed);
            let ep =
                hypha_node::net::endpoint::Endpoint::bind(&ident, "127.0.0.1:0".parse().unwrap())
                    .unwrap();
            let conn = ep.dial(to.addr, to.id).await.unwrap();
            let hello = hypha_node::net::proto::hello_message(&ident, Default::default());
            hypha_node::net::proto::hello_as_dialer(&conn, to.id, &hello, common::TEST_POW_BITS)
                .await
                .unwrap();
            (ident, ep, conn)
        }
    };
    let (_h, _hep, honest) = join(90).await;
    let (flooder, _fep, fconn) = join(91).await;

    // The costliest requests there are: 64 receipts, each signed by two
    // keys (both the flooder's own), so each costs two signature checks;
    // every request's receipts are new, so none is skipped as known.
    const PUTS: u64 = 160;
    let other = common::peer_identity(92);
    let now = hypha_node::util::unix_ms();
    let per_put = hypha_dht::receipts::MAX_RECEIPTS_PER_PUT as u64;
    let puts: Vec<hypha_wire::DhtRequest> = (0..PUTS)
        .map(|n| hypha_wire::DhtRequest::PutReceipts {
            key: hypha_dht::receipts_key(&other.id()).0,
            receipts: (0..per_put)
                .map(|i| {
                    let receipt = hypha_ledger::Receipt {
                        request_id: n * per_put + i,
                        consumer: other.id(),
                        seeder: flooder.id(),
                        model_sha256: [1; 32],
                        prompt_tokens: 1,
                        completion_tokens: 1,
                        credits: 5,
                        started_ms: now,
                        finished_ms: now,
                        tokens_digest: [0; 32],
                    };
                    hypha_ledger::SignedReceipt {
                        seeder_key: flooder.public_key(),
                        seeder_sig: receipt.sign(flooder.signing_key()),
                        consumer_key: other.public_key(),
                        consumer_sig: receipt.sign(other.signing_key()),
                        receipt,
                    }
                    .to_bytes()
                    .to_vec()
                })
                .collect(),
        })
        .collect();
    let puts = std::sync::Arc::new(puts);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let idle = find_node_times(&honest, 40).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let floods: Vec<_> = (0..FLOODERS)
        .map(|_| {
            let (conn, puts, next, stop, refused) = (
                fconn.clone(),
                puts.clone(),
                next.clone(),
                stop.clone(),
                refused.clone(),
            );
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let put = puts[i % puts.len()].clone();
                    if dht_call(&conn, put).await == hypha_wire::DhtReply::Refused {
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let flooded = find_node_times(&honest, 40).await;
    stop.cancel();
    for f in floods {
        f.await.unwrap();
    }
    eprintln!(
        "FindNode round trip, idle: p50 {:?} p99 {:?}; during a {FLOODERS}-stream PutReceipts flood from one identity: p50 {:?} p99 {:?}; flood requests refused: {}",
        p(&idle, 50),
        p(&idle, 99),
        p(&flooded, 50),
        p(&flooded, 99),
        refused.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(
        refused.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the flood was never refused"
    );
    assert!(
        // At most one burst of the flooder's work (about 13 ms of
        // signature checks) queues ahead; the rest is the flood's decoding
        // on the node's two workers. Without the per-peer budget, p99 is
        // about a second.
        p(&flooded, 99) < Duration::from_millis(150),
        "a flood from one identity delayed another's FindNode to {:?}",
        p(&flooded, 99)
    );
    node.stop().await.unwrap();
}
