//! STUN on the QUIC port, over real sockets: a node answers binding
//! requests on the UDP port its QUIC endpoint uses and keeps serving QUIC
//! there; nodes learn how peers see them and classify their NAT's mapping
//! (on loopback: no NAT, "public"), shown in `/v1/network`, `/metrics` and
//! `hypha status`.

use std::time::{Duration, Instant};

use hypha_nat::stun::{binding_request, binding_response, decode, Message};

mod common;
use common::{plain_node, TEST_POW_BITS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quic_port_answers_stun_and_still_speaks_quic() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = plain_node(dirs.0.path(), Vec::new()).await;
    let quic = a.quic_addr().unwrap();

    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    let txid = [5; 12];
    sock.send_to(&binding_request(txid).unwrap(), quic)
        .await
        .unwrap();
    let mut buf = [0u8; 600];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("a STUN answer")
        .unwrap();
    assert_eq!(from, quic, "answered from the QUIC port itself");
    assert_eq!(
        decode(&buf[..n]).unwrap(),
        Message::Response { txid, mapped: me }
    );
    // A stray response and garbage that looks like STUN are dropped
    // without an answer or harm.
    sock.send_to(&binding_response([1; 12], me).unwrap(), quic)
        .await
        .unwrap();
    let mut junk = binding_request([2; 12]).unwrap();
    junk[2] = 0xff;
    sock.send_to(&junk, quic).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf))
            .await
            .is_err(),
        "only requests are answered"
    );

    // QUIC on the same port still works: a second node joins through it.
    let b = plain_node(dirs.1.path(), vec![a.peer_addr().unwrap()]).await;
    let found = b
        .peers()
        .unwrap()
        .discovery()
        .unwrap()
        .find_node(a.id().unwrap())
        .await
        .expect("a lookup over QUIC finishes");
    assert!(found.closest.iter().any(|c| Some(c.id) == a.id()));
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_learn_how_peers_see_them() {
    // A mapping needs answers from three networks (here: three peers).
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = plain_node(dirs[0].path(), Vec::new()).await;
    let boot = vec![a.peer_addr().unwrap()];
    let b = plain_node(dirs[1].path(), boot.clone()).await;
    let d = plain_node(dirs[3].path(), boot.clone()).await;
    let c = plain_node(dirs[2].path(), boot).await;
    let client = common::client();
    let base = format!("http://{}", c.http_addr());
    // The first round may run before the routing table holds two peers;
    // later rounds come every 15 s.
    let deadline = Instant::now() + Duration::from_secs(40);
    let net = loop {
        let net = common::get_json(&client, &format!("{base}/v1/network")).await;
        if net["nat"]["mapping"] == "public" {
            break net;
        }
        assert!(Instant::now() < deadline, "mapping never known: {net}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let quic = c.quic_addr().unwrap().to_string();
    assert_eq!(net["nat"]["public_addr"], quic.as_str(), "{net}");
    let obs = net["nat"]["observations"].as_array().unwrap();
    assert!(obs.len() >= hypha_nat::probe::MIN_GROUPS, "{net}");
    assert!(obs.iter().all(|o| o["saw"] == quic.as_str()), "{net}");
    assert_eq!(net["nat"]["candidates"][0]["kind"], "host", "{net}");
    // The peers counted the requests they answered.
    let m = common::metrics(&client, &format!("http://{}", a.http_addr())).await;
    let answered = common::metric_value(&m, "hypha_stun_requests_answered_total");
    assert!(answered >= 1, "{m}");
    // And the command line shows it.
    let text = common::hypha_cli(&["status", "--url", &base]).await;
    assert!(
        text.contains(&format!("NAT mapping: public  public address: {quic}")),
        "{text}"
    );
    for n in [c, d, b, a] {
        n.stop().await.unwrap();
    }
}

/// Sends a punch request on a new stream of `conn`; the answer (`None`:
/// the target is dialing).
async fn punch_via(
    conn: &quinn::Connection,
    req: &hypha_wire::PunchRequest,
) -> Option<hypha_wire::Refusal> {
    use hypha_node::net::proto::{FramedRecv, FramedSend};
    let (s, r) = conn.open_bi().await.unwrap();
    let mut s = FramedSend::new(s);
    s.send(&hypha_wire::Message::Punch(req.clone()))
        .await
        .unwrap();
    s.finish();
    let mut r = FramedRecv::new(r);
    r.next(|m| match m {
        hypha_wire::ArchivedMessage::PunchReply(p) => {
            Ok(p.refusal.as_ref().map(hypha_wire::Refusal::from))
        }
        other => panic!("{other:?}"),
    })
    .await
    .unwrap()
    .expect("a reply")
}

/// The punch mechanics over real sockets: a rendezvous forwards a signed
/// request to the target over the target's own connection to it, and the
/// target dials the initiator's candidate; forged, stale and misdirected
/// requests are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendezvous_forwards_signed_punch_requests_and_the_target_dials() {
    use hypha_wire::Refusal;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The target joined through the rendezvous: it holds a connection.
    let (r, t) = rendezvous_and_target(&dirs).await;
    let (r_addr, t_id) = (r.peer_addr().unwrap(), t.id().unwrap());

    // The initiator: a bare endpoint that accepts whoever dials it.
    let (me, ep, conn) = initiator(60, &r_addr).await;
    let my_addr = ep.local_addr().unwrap();
    let hello = hypha_node::net::proto::hello_message(&me, Default::default());

    // Refused: a candidate changed after signing, an old request, a target
    // the rendezvous is not connected to.
    let mut forged = hypha_node::services::punch::request(&me, t_id, &[my_addr]);
    forged.candidates = vec!["198.18.0.99:9".into()];
    assert_eq!(punch_via(&conn, &forged).await, Some(Refusal::BadRequest));
    let mut stale = hypha_node::services::punch::request(&me, t_id, &[my_addr]);
    stale.issued_ms -= hypha_node::services::punch::PUNCH_MAX_AGE_MS + 1_000;
    assert_eq!(punch_via(&conn, &stale).await, Some(Refusal::BadRequest));
    let nowhere =
        hypha_node::services::punch::request(&me, hypha_wire::NodeId([7; 32]), &[my_addr]);
    assert_eq!(punch_via(&conn, &nowhere).await, Some(Refusal::NotFound));

    // Forwarded: the target dials our candidate and completes a hello.
    let good = hypha_node::services::punch::request(&me, t_id, &[my_addr]);
    assert_eq!(punch_via(&conn, &good).await, None, "the target is dialing");
    let (dialed, who) = tokio::time::timeout(Duration::from_secs(10), ep.accept())
        .await
        .expect("the target dials back")
        .unwrap()
        .unwrap();
    assert_eq!(who, t_id);
    hypha_node::net::proto::hello_as_acceptor(&dialed, who, &hello, TEST_POW_BITS)
        .await
        .unwrap();
    t.stop().await.unwrap();
    r.stop().await.unwrap();
}

/// A rendezvous and a target that joined through it; waits until the
/// rendezvous knows the target.
async fn rendezvous_and_target(
    dirs: &(tempfile::TempDir, tempfile::TempDir),
) -> (hypha_node::Node, hypha_node::Node) {
    let r = plain_node(dirs.0.path(), Vec::new()).await;
    let t = plain_node(dirs.1.path(), vec![r.peer_addr().unwrap()]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while r
        .peers()
        .unwrap()
        .discovery()
        .unwrap()
        .view()
        .await
        .unwrap()
        .contacts
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the target never joined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (r, t)
}

/// A peer of `to` with a fresh endpoint: its identity, endpoint and
/// connection after a hello.
async fn initiator(
    seed: u8,
    to: &hypha_node::net::addr::PeerAddr,
) -> (
    hypha_node::identity::Identity,
    hypha_node::net::endpoint::Endpoint,
    quinn::Connection,
) {
    let me = common::peer_identity(seed);
    let ep =
        hypha_node::net::endpoint::Endpoint::bind(&me, "127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep.dial(to.addr, to.id).await.unwrap();
    let hello = hypha_node::net::proto::hello_message(&me, Default::default());
    hypha_node::net::proto::hello_as_dialer(&conn, to.id, &hello, TEST_POW_BITS)
        .await
        .unwrap();
    (me, ep, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_use_up_the_punches_and_no_punch_goes_into_a_private_network() {
    use hypha_node::services::punch::{request, PUNCHES_PER_SENDER_PER_SECOND};
    use hypha_wire::Refusal;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (r, t) = rendezvous_and_target(&dirs).await;
    let (r_addr, t_id) = (r.peer_addr().unwrap(), t.id().unwrap());

    // A flood of requests that do not verify: refused, then cut off per
    // sender, without touching the node's own budget.
    let (bad, bad_ep, bad_conn) = initiator(80, &r_addr).await;
    let mut answers = Vec::new();
    for _ in 0..40 {
        let mut forged = request(&bad, t_id, &[bad_ep.local_addr().unwrap()]);
        forged.signature[0] ^= 1;
        answers.push(punch_via(&bad_conn, &forged).await);
    }
    let refused = answers
        .iter()
        .filter(|a| **a == Some(Refusal::BadRequest))
        .count();
    let limited = answers
        .iter()
        .filter(|a| **a == Some(Refusal::TooMany))
        .count();
    assert!(
        refused <= PUNCHES_PER_SENDER_PER_SECOND as usize * 2 && limited >= 20,
        "{answers:?}"
    );
    // Another peer's good request in the same second is forwarded and dialed.
    let (me, ep, conn) = initiator(81, &r_addr).await;
    let good = request(&me, t_id, &[ep.local_addr().unwrap()]);
    assert_eq!(punch_via(&conn, &good).await, None, "the target is dialing");
    let (_dialed, who) = tokio::time::timeout(Duration::from_secs(10), ep.accept())
        .await
        .expect("the target dials back")
        .unwrap()
        .unwrap();
    assert_eq!(who, t_id);

    // Candidates a punch cannot use: a private network the target is not
    // in, multicast, port 0. The target refuses rather than send there.
    let (me, _ep, conn) = initiator(82, &r_addr).await;
    let inside = ["10.0.0.1:22", "224.0.0.251:5353", "198.18.0.1:0"].map(|a| a.parse().unwrap());
    let probe = request(&me, t_id, &inside);
    assert_eq!(punch_via(&conn, &probe).await, Some(Refusal::BadRequest));
    t.stop().await.unwrap();
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_answers_amplify_nothing_and_are_limited_per_source() {
    use hypha_node::net::socket::STUN_ANSWERS_PER_SOURCE_PER_SECOND;
    let dir = tempfile::tempdir().unwrap();
    let a = plain_node(dir.path(), Vec::new()).await;
    let quic = a.quic_addr().unwrap();
    let mut buf = [0u8; 600];

    // A bare 20-byte request would get a longer answer: none comes.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut bare = binding_request([3; 12]).unwrap();
    bare.truncate(20);
    bare[2] = 0;
    bare[3] = 0; // the message length: no attributes
    assert!(matches!(decode(&bare), Ok(Message::Request { .. })));
    sock.send_to(&bare, quic).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf))
            .await
            .is_err(),
        "a request shorter than its answer is not answered"
    );

    // One source flooding gets its share of answers, each no longer than
    // its request; another source is still answered.
    let req = binding_request([4; 12]).unwrap();
    for _ in 0..50 {
        sock.send_to(&req, quic).await.unwrap();
    }
    let mut answers = 0;
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await
    {
        assert!(n <= req.len(), "{n} bytes for a {}-byte request", req.len());
        answers += 1;
    }
    assert!(
        answers >= 1 && answers <= STUN_ANSWERS_PER_SOURCE_PER_SECOND as usize * 2,
        "{answers} answers to 50 requests"
    );
    let other = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
    other.send_to(&req, quic).await.unwrap();
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), other.recv_from(&mut buf))
        .await
        .expect("another source is answered")
        .unwrap();
    assert!(matches!(decode(&buf[..n]), Ok(Message::Response { .. })));
    a.stop().await.unwrap();
}
