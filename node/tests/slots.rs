//! Inbound connection slots over real QUIC sockets: one identity cannot
//! take more than its share, so another identity is still served; and a
//! node whose slots are all taken sheds a peer that sits idle rather than
//! refusing a newcomer.

use std::time::Duration;

use hypha_node::net::endpoint::Endpoint;
use hypha_node::net::proto;
use hypha_node::net::slots::{MAX_PER_IDENTITY, SHED_AFTER_IDLE};

mod common;
use common::{plain_node, TEST_POW_BITS};

/// Dials `to` from `ep` and exchanges hellos; the connection, or why it
/// was closed.
async fn join(
    ep: &Endpoint,
    ident: &hypha_node::identity::Identity,
    to: &hypha_node::net::addr::PeerAddr,
) -> Result<quinn::Connection, String> {
    let conn = ep.dial(to.addr, to.id).await.map_err(|e| e.to_string())?;
    let hello = proto::hello_message(ident, Default::default());
    match proto::hello_as_dialer(&conn, to.id, &hello, TEST_POW_BITS).await {
        Ok(_) => Ok(conn),
        Err(e) => Err(match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                String::from_utf8_lossy(&c.reason).into_owned()
            }
            _ => e.to_string(),
        }),
    }
}

/// A DHT ping answered on `conn`.
async fn pinged(conn: &quinn::Connection) -> bool {
    use hypha_node::net::proto::{FramedRecv, FramedSend};
    let Ok((send, recv)) = conn.open_bi().await else {
        return false;
    };
    let mut send = FramedSend::new(send);
    if send
        .send(&hypha_wire::Message::Dht(hypha_wire::DhtRequest::Ping))
        .await
        .is_err()
    {
        return false;
    }
    send.finish();
    let mut recv = FramedRecv::new(recv);
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        recv.next(|m| Ok(matches!(m, hypha_wire::ArchivedMessage::DhtReply(_)))),
    )
    .await;
    matches!(reply, Ok(Ok(Some(true))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_cannot_take_every_slot() {
    let dir = tempfile::tempdir().unwrap();
    let node = plain_node(dir.path(), Vec::new()).await;
    let to = node.peer_addr().unwrap();

    let a = common::peer_identity(60);
    let ep_a = Endpoint::bind(&a, "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut held = Vec::new();
    for _ in 0..MAX_PER_IDENTITY {
        held.push(join(&ep_a, &a, &to).await.expect("within its share"));
    }
    for _ in 0..3 {
        let why = join(&ep_a, &a, &to)
            .await
            .expect_err("beyond its share, a connection is closed");
        assert!(
            why.contains("too many connections from this identity"),
            "{why}"
        );
    }
    for c in &held {
        assert!(
            pinged(c).await,
            "the connections within the share are served"
        );
    }
    // Another identity from the same address is served.
    let b = common::peer_identity(61);
    let ep_b = Endpoint::bind(&b, "127.0.0.1:0".parse().unwrap()).unwrap();
    let conn_b = join(&ep_b, &b, &to).await.expect("another identity joins");
    assert!(pinged(&conn_b).await);
    let m = common::metrics(&common::client(), &format!("http://{}", node.http_addr())).await;
    assert_eq!(
        common::metric_value(&m, "hypha_peers_refused_total"),
        3,
        "{m}"
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_sheds_an_idle_peer_for_a_newcomer() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = hypha_node::NodeConfig::new(None);
    cfg.quic_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.data_dir = Some(dir.path().to_owned());
    cfg.pow_bits = TEST_POW_BITS;
    cfg.max_peers = 2;
    let node = hypha_node::Node::start(cfg).await.unwrap();
    let to = node.peer_addr().unwrap();
    let idents: Vec<_> = (70..74).map(common::peer_identity).collect();
    let eps: Vec<_> = idents
        .iter()
        .map(|i| Endpoint::bind(i, "127.0.0.1:0".parse().unwrap()).unwrap())
        .collect();
    let first = join(&eps[0], &idents[0], &to).await.unwrap();
    let second = join(&eps[1], &idents[1], &to).await.unwrap();
    // Both busy a moment ago: a newcomer is refused.
    assert!(pinged(&first).await && pinged(&second).await);
    let refused = join(&eps[2], &idents[2], &to).await;
    assert!(refused.is_err(), "no slot while both peers are active");
    // The second keeps talking; the first falls idle and is shed.
    let talk = async {
        let until = std::time::Instant::now() + SHED_AFTER_IDLE + Duration::from_millis(500);
        while std::time::Instant::now() < until {
            assert!(pinged(&second).await);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    talk.await;
    let newcomer = join(&eps[3], &idents[3], &to)
        .await
        .expect("the idle peer's slot goes to the newcomer");
    assert!(pinged(&newcomer).await);
    let closed = tokio::time::timeout(Duration::from_secs(5), first.closed())
        .await
        .expect("the idle peer is closed");
    assert!(
        closed.to_string().contains("shed"),
        "the idle peer is told why: {closed}"
    );
    assert!(pinged(&second).await, "the active peer keeps its slot");
    node.stop().await.unwrap();
}
