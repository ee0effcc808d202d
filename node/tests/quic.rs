//! QUIC between identities on real loopback sockets: a dial that expects
//! the right NodeId connects and both ends learn each other's id; a dial that
//! expects anyone else is refused during the handshake.

use hypha_node::identity::Identity;
use std::time::Duration;

use hypha_node::net::endpoint::{Endpoint, TransportLimits};
use hypha_wire::{decode_frame, ArchivedMessage, FrameEncoder, Hello, Message, PROTOCOL_VERSION};

fn endpoint(seed: u8) -> (Identity, Endpoint) {
    let ident = Identity::from_seed([seed; 32]);
    let ep = Endpoint::bind(&ident, "127.0.0.1:0".parse().unwrap()).unwrap();
    (ident, ep)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_peers_connect_and_exchange_frames() {
    let (a_id, a) = endpoint(1);
    let (b_id, b) = endpoint(2);
    let b_addr = b.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (conn, peer) = b.accept().await.unwrap().unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let bytes = recv.read_to_end(1 << 20).await.unwrap();
        let (msg, _) = decode_frame(&bytes).unwrap();
        let models = match msg {
            ArchivedMessage::Hello(h) => h
                .models
                .iter()
                .map(|m| m.as_str().to_owned())
                .collect::<Vec<_>>(),
            other => panic!("expected hello, got {other:?}"),
        };
        send.write_all(b"ok").await.unwrap();
        send.finish().unwrap();
        let _ = send.stopped().await;
        (peer, models)
    });
    let conn = a
        .dial(b_addr, b_id.id())
        .await
        .expect("dial with the right id");
    assert_eq!(hypha_node::net::endpoint::peer_id(&conn), Some(b_id.id()));
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        public_key: a_id.public_key(),
        capabilities: 0,
        models: vec!["m".into()],
        model_sha256: [0; 32],
        context_length: 512,
        price_prompt_micro: 0,
        price_completion_micro: 0,
        signature: [0; 64],
    });
    send.write_all(FrameEncoder::new().encode(&hello).unwrap())
        .await
        .unwrap();
    send.finish().unwrap();
    assert_eq!(recv.read_to_end(16).await.unwrap(), b"ok");
    let (seen, models) = server.await.unwrap();
    assert_eq!(seen, a_id.id(), "the server learns the dialer's id");
    assert_eq!(models, vec!["m".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_the_wrong_identity_fails() {
    let (_, a) = endpoint(3);
    let (_, b) = endpoint(4);
    let (c_id, _c) = endpoint(5);
    let b_addr = b.local_addr().unwrap();
    let server = tokio::spawn(async move { b.accept().await.map(|r| r.is_ok()) });
    let err = a
        .dial(b_addr, c_id.id())
        .await
        .expect_err("a dial expecting C must not accept B");
    assert!(err.to_string().contains("cannot reach"), "{err}");
    assert_eq!(
        server.await.unwrap(),
        Some(false),
        "the server sees the handshake fail"
    );
}

fn limited(seed: u8, limits: &TransportLimits) -> (Identity, Endpoint) {
    let ident = Identity::from_seed([seed; 32]);
    let ep = Endpoint::bind_with(&ident, "127.0.0.1:0".parse().unwrap(), limits).unwrap();
    (ident, ep)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_and_keep_alive_keeps_them() {
    let quiet = TransportLimits {
        idle_timeout: Duration::from_millis(300),
        keep_alive: None,
        ..TransportLimits::default()
    };
    let alive = TransportLimits {
        idle_timeout: Duration::from_millis(300),
        keep_alive: Some(Duration::from_millis(50)),
        ..TransportLimits::default()
    };
    for (limits, should_close) in [(quiet, true), (alive, false)] {
        let (_, a) = limited(10, &limits);
        let (b_id, b) = limited(11, &limits);
        let b_addr = b.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (conn, _) = b.accept().await.unwrap().unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
            drop(b);
        });
        let conn = a.dial(b_addr, b_id.id()).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_millis(1500), conn.closed()).await;
        assert_eq!(closed.is_ok(), should_close, "limits {limits:?}");
        if should_close {
            assert!(matches!(closed.unwrap(), quinn::ConnectionError::TimedOut));
        }
        conn.close(0u32.into(), b"done");
        server.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_peer_are_bounded() {
    let limits = TransportLimits {
        max_streams_per_peer: 2,
        ..TransportLimits::default()
    };
    let (_, a) = limited(12, &limits);
    let (b_id, b) = limited(13, &limits);
    let b_addr = b.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (conn, _) = b.accept().await.unwrap().unwrap();
        // Accept streams but never finish them, so none frees its credit.
        let mut held = Vec::new();
        while let Ok(s) = conn.accept_bi().await {
            held.push(s);
        }
        held.len()
    });
    let conn = a.dial(b_addr, b_id.id()).await.unwrap();
    let mut open = Vec::new();
    for _ in 0..2 {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(b"x").await.unwrap();
        open.push((send, recv));
    }
    let third = tokio::time::timeout(Duration::from_millis(300), conn.open_bi()).await;
    assert!(third.is_err(), "a third stream must wait for credit");
    conn.close(0u32.into(), b"done");
    assert_eq!(server.await.unwrap(), 2);
}
