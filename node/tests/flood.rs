//! Floods that must not slow a node down for anyone else, each in this
//! binary of its own so that no other test shares the machine while it
//! measures: 32 peers sending 6 MiB prompts while `/health` is timed.

use std::time::Duration;

use hypha_node::net::proto::{FramedRecv, FramedSend};
use hypha_wire::Message;

mod common;
use common::{assert_still_serves, dial_with_hello, Net};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_prompts_from_32_peers_leave_health_fast() {
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
