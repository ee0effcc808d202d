//! Hostile peers over real QUIC sockets. A raw client that speaks the
//! transport but breaks the protocol (garbage, an oversized or truncated
//! frame, a wrong protocol version, a frame out of order) is disconnected
//! with the reason, and the seeder keeps serving a well-behaved consumer.
//! A fake seeder that breaks the protocol gets the consumer's request an
//! error, never a hang or a panic; one that bills token ids that bring no
//! text is refused, and one whose hello asks more than its signed provider
//! record, or more than the consumer's ceilings, is not asked at all.

use std::time::Duration;

use hypha_node::identity::Identity;
use hypha_node::net::endpoint::Endpoint;
use hypha_node::net::proto::{self, FramedRecv, FramedSend, CLOSE_PROTOCOL};
use hypha_wire::{
    Hello, Message, Refusal, TokenChunk, CAP_SEEDER, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use serde_json::{json, Value};

mod common;
use common::{assert_still_serves, dial_with_hello, metrics, Net};

fn endpoint(seed: u8) -> (Identity, Endpoint) {
    let ident = Identity::from_seed([seed; 32]);
    let ep = Endpoint::bind(&ident, "127.0.0.1:0".parse().unwrap()).unwrap();
    (ident, ep)
}

async fn dial(net: &Net, seed: u8) -> (Identity, Endpoint, quinn::Connection) {
    let (ident, ep) = endpoint(seed);
    let to = net.seeder.peer_addr().unwrap();
    let conn = ep.dial(to.addr, to.id).await.expect("transport connects");
    (ident, ep, conn)
}

/// The reason the node gave when it closed the connection.
async fn closed_reason(conn: &quinn::Connection) -> String {
    let err = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("the node closes the connection");
    match err {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code, CLOSE_PROTOCOL,
                "closed as a protocol violation"
            );
            String::from_utf8_lossy(&c.reason).into_owned()
        }
        other => panic!("expected a close with a reason, got {other}"),
    }
}

/// Sends raw bytes on a new request stream.
async fn raw_stream(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> quinn::RecvStream {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    // Keep the send side alive until the node reacts.
    std::mem::forget(send);
    recv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_disconnect_the_peer_and_nothing_else() {
    let net = Net::start(2, 64).await;
    assert_still_serves(&net).await;
    let mut cases = 0;

    // Garbage where the hello belongs: a plausible length, junk payload.
    let (_i, _ep, conn) = dial(&net, 11).await;
    let mut junk = 24u32.to_le_bytes().to_vec();
    junk.extend_from_slice(&[0xA5; 24]);
    let _r = raw_stream(&conn, &junk, true).await;
    let why = closed_reason(&conn).await;
    assert!(why.contains("invalid message"), "{why}");
    cases += 1;

    // A request before any hello.
    let (_i, _ep, conn) = dial(&net, 12).await;
    let mut enc = hypha_wire::FrameEncoder::new();
    let _r = raw_stream(&conn, enc.encode(&common::request(1, 4)).unwrap(), false).await;
    let why = closed_reason(&conn).await;
    assert!(why.contains("expected hello, got request"), "{why}");
    cases += 1;

    // A hello for another protocol version, correctly signed.
    let (ident, _ep, conn) = dial(&net, 13).await;
    let mut hello = Hello {
        protocol_version: PROTOCOL_VERSION + 1,
        public_key: ident.public_key(),
        capabilities: 0,
        models: Vec::new(),
        model_sha256: [0; 32],
        context_length: 0,
        price_prompt_micro: 0,
        price_completion_micro: 0,
        signature: [0; 64],
    };
    use ed25519_dalek::Signer as _;
    hello.signature = ident.signing_key().sign(&hello.signed_bytes()).to_bytes();
    let _r = raw_stream(&conn, enc.encode(&Message::Hello(hello)).unwrap(), true).await;
    let why = closed_reason(&conn).await;
    let version = format!("protocol version {}", PROTOCOL_VERSION + 1);
    assert!(why.contains(&version), "{why}");
    cases += 1;

    // A hello carrying somebody else's key.
    let (_ident, _ep, conn) = dial(&net, 14).await;
    let other = proto::hello_message(&Identity::from_seed([15; 32]), Default::default());
    let _r = raw_stream(&conn, enc.encode(&other).unwrap(), true).await;
    let why = closed_reason(&conn).await;
    assert!(why.contains("hello key belongs to"), "{why}");
    cases += 1;

    // A correct hello from an identity that skipped its proof of work.
    let lazy = (60..=255u8)
        .map(|s| Identity::from_seed([s; 32]))
        .find(|i| i.pow_bits() < common::TEST_POW_BITS)
        .unwrap();
    let ep = Endpoint::bind(&lazy, "127.0.0.1:0".parse().unwrap()).unwrap();
    let to = net.seeder.peer_addr().unwrap();
    let conn = ep.dial(to.addr, to.id).await.unwrap();
    let _r = raw_stream(
        &conn,
        enc.encode(&proto::hello_message(&lazy, Default::default()))
            .unwrap(),
        true,
    )
    .await;
    let why = closed_reason(&conn).await;
    assert!(why.contains("bits of proof of work"), "{why}");
    cases += 1;

    // After a good hello: a frame announcing more than the cap.
    let (_ep, conn) = dial_with_hello(&net, 16).await;
    let header = (MAX_FRAME_BYTES as u32 + 1).to_le_bytes();
    let _r = raw_stream(&conn, &header, false).await;
    let why = closed_reason(&conn).await;
    assert!(why.contains("over the"), "{why}");
    cases += 1;

    // A frame cut short by the end of its stream.
    let (_ep, conn) = dial_with_hello(&net, 17).await;
    let mut cut = 100u32.to_le_bytes().to_vec();
    cut.extend_from_slice(&[0; 10]);
    let _r = raw_stream(&conn, &cut, true).await;
    let why = closed_reason(&conn).await;
    assert!(why.contains("ended inside a frame"), "{why}");
    cases += 1;

    // A request stream that opens with a chunk.
    let (_ep, conn) = dial_with_hello(&net, 18).await;
    let chunk = Message::Chunk(TokenChunk {
        request_id: 1,
        seq: 0,
        token_ids: vec![1],
        text: "x".into(),
        logprobs: Vec::new(),
    });
    let _r = raw_stream(&conn, enc.encode(&chunk).unwrap(), false).await;
    let why = closed_reason(&conn).await;
    assert!(why.contains("must start with a request"), "{why}");
    cases += 1;

    // A second request on a stream whose request is running.
    let (_ep, conn) = dial_with_hello(&net, 19).await;
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut send = FramedSend::new(send);
    send.send(&common::request(7, 200)).await.unwrap();
    let mut recv = FramedRecv::new(recv);
    recv.next(|_| Ok(())).await.unwrap().expect("a first chunk");
    send.send(&common::request(8, 4)).await.unwrap();
    let why = closed_reason(&conn).await;
    assert!(
        why.contains("request sent while a request was running"),
        "{why}"
    );
    cases += 1;

    assert_still_serves(&net).await;
    let c = common::client();
    let m = metrics(&c, &net.seeder_base()).await;
    assert!(
        m.contains(&format!("hypha_peer_violations_total {cases}\n")),
        "{m}"
    );
    // Only the consumer's connection is left.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics(&c, &net.seeder_base()).await;
        if m.contains("hypha_peers_connected 1\n") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_frame_stops_the_generation() {
    let net = Net::start(2, 64).await;
    let (_ep, conn) = dial_with_hello(&net, 21).await;
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut send = FramedSend::new(send);
    send.send(&common::request(5, 400)).await.unwrap();
    let mut recv = FramedRecv::new(recv);
    let accepted = recv
        .next(|m| Ok(matches!(m, hypha_wire::ArchivedMessage::Accepted(_))))
        .await
        .unwrap();
    assert_eq!(accepted, Some(true), "the seeder first accepts the request");
    // The prompt's receipt comes next, and must be countersigned first.
    let prompt = recv
        .next(|m| match m {
            hypha_wire::ArchivedMessage::Receipt(r) => {
                Ok(hypha_ledger::Receipt::from_bytes(r.receipt.as_slice()).unwrap())
            }
            other => panic!("{other:?}"),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(prompt.completion_tokens, 0);
    send.send(&Message::Countersign(hypha_wire::Countersign {
        request_id: 5,
        consumer_sig: prompt.sign(common::peer_identity(21).signing_key()),
    }))
    .await
    .unwrap();
    for want in 0..3u32 {
        let seq = recv
            .next(|m| match m {
                hypha_wire::ArchivedMessage::Chunk(c) => Ok(c.seq.to_native()),
                other => panic!("{other:?}"),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seq, want);
    }
    send.send(&Message::Cancel(hypha_wire::Cancel { request_id: 5 }))
        .await
        .unwrap();
    // The seeder stops: its side of the stream ends without a done, well
    // before 400 tokens.
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        let mut chunks = 0;
        while let Some(done) = recv
            .next(|m| Ok(matches!(m, hypha_wire::ArchivedMessage::Done(_))))
            .await
            .unwrap()
        {
            assert!(!done, "a cancelled request does not finish");
            chunks += 1;
        }
        chunks
    })
    .await
    .expect("the stream ends");
    assert!(ended < 50, "{ended} chunks after the cancel");
    // The engine frees the slot at its next step.
    let engine = net.seeder.engine().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while engine
        .stats()
        .slots_busy
        .load(std::sync::atomic::Ordering::Relaxed)
        != 0
    {
        assert!(std::time::Instant::now() < deadline, "the slot stays busy");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        conn.close_reason().is_none(),
        "cancelling is not a violation"
    );
}

/// How the fake seeder misbehaves.
#[derive(Clone, Copy)]
enum Fake {
    /// The first chunk carries sequence number 3.
    SkipsAhead,
    /// Two good chunks, then bytes that are no frame.
    GarbageMidStream,
    /// One token, done, and a receipt that bills two.
    Overcharges,
    /// One token, done, and a receipt billing a million prompt tokens.
    BillsPrompt,
    /// Chunks of one token each, without end.
    FloodsTokens,
    /// One token that carries 100 KB of text.
    HugeText,
    /// Reads each request, answers nothing, and holds the stream (and so
    /// the stream's credit) for ten seconds.
    Silent,
    /// Chunks of one token each with no text, without end.
    Textless,
    /// Its hello asks ten times the completion price of its signed
    /// provider record; any request stream it gets is counted.
    Gouges,
}

/// The fake seeder's identity.
const FAKE_SEED: u8 = 31;
/// Prices in the fake's hello: (prompt, completion) micro-credits.
fn fake_prices(mode: Fake) -> (u64, u64) {
    match mode {
        Fake::Gouges => (1, 40),
        _ => (1, 4),
    }
}
/// Request streams a `Gouges` fake was sent.
static GOUGER_STREAMS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A seeder that completes the handshake and hello correctly, then answers
/// every request wrongly.
async fn fake_seeder(mode: Fake) -> (hypha_node::net::addr::PeerAddr, tokio::task::JoinHandle<()>) {
    let ident = common::peer_identity(FAKE_SEED);
    let ep = Endpoint::bind(&ident, "127.0.0.1:0".parse().unwrap()).unwrap();
    let (price_prompt_micro, price_completion_micro) = fake_prices(mode);
    let addr = hypha_node::net::addr::PeerAddr {
        id: ident.id(),
        addr: ep.local_addr().unwrap(),
    };
    let task = tokio::spawn(async move {
        let hello = proto::hello_message(
            &ident,
            hypha_node::net::hello::Offer {
                capabilities: CAP_SEEDER,
                models: vec!["default".into()],
                model_sha256: [1; 32],
                context_length: 512,
                price_prompt_micro,
                price_completion_micro,
            },
        );
        let seeder_key = ident.signing_key().clone();
        while let Some(Ok((conn, peer))) = ep.accept().await {
            let hello = hello.clone();
            let seeder_key = seeder_key.clone();
            tokio::spawn(async move {
                proto::hello_as_acceptor(&conn, peer, &hello, 0)
                    .await
                    .unwrap();
                if let Fake::Silent = mode {
                    // Streams are accepted and held, never answered.
                    let mut held = Vec::new();
                    while let Ok(s) = conn.accept_bi().await {
                        held.push(s);
                    }
                    return;
                }
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let mut recv = FramedRecv::new(recv);
                    let Ok(Some(id)) = recv
                        .next(|m| match m {
                            hypha_wire::ArchivedMessage::Request(r) => Ok(r.request_id.to_native()),
                            _ => Ok(0),
                        })
                        .await
                    else {
                        return;
                    };
                    let mut send = FramedSend::new(send);
                    let chunk = |seq| {
                        Message::Chunk(TokenChunk {
                            request_id: id,
                            seq,
                            token_ids: vec![1],
                            text: "ok".into(),
                            logprobs: Vec::new(),
                        })
                    };
                    match mode {
                        Fake::Silent => unreachable!("answered above"),
                        Fake::Gouges => {
                            // Another first frame than a request reads as 0.
                            if id != 0 {
                                GOUGER_STREAMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        Fake::Textless => {
                            for seq in 0.. {
                                let empty = Message::Chunk(TokenChunk {
                                    request_id: id,
                                    seq,
                                    token_ids: vec![1],
                                    text: String::new(),
                                    logprobs: Vec::new(),
                                });
                                if send.send(&empty).await.is_err() {
                                    break;
                                }
                            }
                        }
                        Fake::FloodsTokens => {
                            for seq in 0.. {
                                if send.send(&chunk(seq)).await.is_err() {
                                    break;
                                }
                            }
                        }
                        Fake::HugeText => {
                            let _ = send
                                .send(&Message::Chunk(TokenChunk {
                                    request_id: id,
                                    seq: 0,
                                    token_ids: vec![1],
                                    text: "x".repeat(100_000),
                                    logprobs: Vec::new(),
                                }))
                                .await;
                        }
                        Fake::SkipsAhead => {
                            let _ = send.send(&chunk(3)).await;
                        }
                        Fake::GarbageMidStream => {
                            let _ = send.send(&chunk(0)).await;
                            let _ = send.send(&chunk(1)).await;
                            let _ = send
                                .stream
                                .write_all(&[8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
                                .await;
                        }
                        Fake::Overcharges | Fake::BillsPrompt => {
                            let (prompt, completion) = match mode {
                                Fake::BillsPrompt => (1_000_000u32, 1u32),
                                _ => (5, 2),
                            };
                            let _ = send.send(&chunk(0)).await;
                            let _ = send
                                .send(&Message::Done(hypha_wire::Done {
                                    request_id: id,
                                    prompt_tokens: prompt,
                                    completion_tokens: 1,
                                    finish_reason: hypha_wire::FinishReason::Length,
                                    text: String::new(),
                                    stop_sequence: None,
                                }))
                                .await;
                            let mut digest = hypha_ledger::TokenDigest::default();
                            for _ in 0..completion {
                                digest.push(1);
                            }
                            let receipt = hypha_ledger::Receipt {
                                request_id: id,
                                consumer: peer,
                                seeder: hypha_ledger::node_id_of(
                                    &seeder_key.verifying_key().to_bytes(),
                                ),
                                model_sha256: [1; 32],
                                prompt_tokens: prompt,
                                completion_tokens: completion,
                                credits: u64::from(prompt) + u64::from(completion) * 4,
                                started_ms: 1,
                                finished_ms: 2,
                                tokens_digest: digest.digest(),
                            };
                            let _ = send
                                .send(&Message::Receipt(hypha_wire::ReceiptOffer {
                                    request_id: id,
                                    receipt: receipt.to_bytes().to_vec(),
                                    seeder_sig: receipt.sign(&seeder_key),
                                    last: true,
                                }))
                                .await;
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
            });
        }
    });
    (addr, task)
}

/// A fake seeder in `mode` and a consumer that knows only it: the
/// consumer, its data folder, the fake's task and the consumer's base URL.
async fn consumer_of_fake(
    mode: Fake,
) -> (
    hypha_node::Node,
    tempfile::TempDir,
    tokio::task::JoinHandle<()>,
    String,
) {
    let (addr, fake) = fake_seeder(mode).await;
    let (consumer, dir) = common::consumer(vec![addr], Duration::from_secs(2)).await;
    let base = format!("http://{}", consumer.http_addr());
    (consumer, dir, fake, base)
}

/// Posts a chat completion; a reply (or its headers) later than 10 s fails
/// the test: a broken seeder must not hang a client.
async fn post_in_time(c: &reqwest::Client, base: &str, body: &Value) -> reqwest::Response {
    tokio::time::timeout(
        Duration::from_secs(10),
        c.post(format!("{base}/v1/chat/completions"))
            .json(body)
            .send(),
    )
    .await
    .expect("no hang")
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_refuses_a_seeder_that_breaks_the_protocol() {
    let c = common::client();
    let body = json!({"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8});

    // Before the first token: a 502 naming the violation.
    let (consumer, _dir, fake, base) = consumer_of_fake(Fake::SkipsAhead).await;
    let resp = post_in_time(&c, &base, &body).await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("chunk 3 arrived where chunk 0 was due"),
        "{msg}"
    );
    let m = metrics(&c, &base).await;
    assert!(!m.contains("hypha_peer_violations_total 0\n"), "{m}");
    fake.abort();
    consumer.stop().await.unwrap();

    // Mid-stream: the SSE stream ends with an error event.
    let (consumer, _dir, fake, base) = consumer_of_fake(Fake::GarbageMidStream).await;
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let resp = post_in_time(&c, &base, &sbody).await;
    let text = tokio::time::timeout(Duration::from_secs(10), resp.text())
        .await
        .expect("the broken stream ends")
        .unwrap();
    assert!(text.contains("\"content\":\"ok\""), "{text}");
    assert!(
        text.contains("server_error") && text.contains("invalid message"),
        "{text}"
    );
    assert!(
        !text.contains("[DONE]"),
        "a broken stream is not reported as complete"
    );
    fake.abort();
    consumer.stop().await.unwrap();

    // A receipt for more tokens than arrived is refused, never signed.
    let (consumer, _dir, fake, base) = consumer_of_fake(Fake::Overcharges).await;
    let resp = post_in_time(&c, &base, &body).await;
    assert_eq!(resp.status(), 500);
    let v: Value = resp.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("it claims 2 tokens, 1 arrived"), "{msg}");
    assert_eq!(consumer.ledger().unwrap().receipts(), 0);
    fake.abort();
    consumer.stop().await.unwrap();

    // A receipt billing far more prompt tokens than the prompt could take.
    let (consumer, _dir, fake, base) = consumer_of_fake(Fake::BillsPrompt).await;
    let resp = post_in_time(&c, &base, &body).await;
    assert_eq!(resp.status(), 500);
    let v: Value = resp.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("bills 1000000 prompt tokens"), "{msg}");
    assert_eq!(consumer.ledger().unwrap().receipts(), 0);
    fake.abort();
    consumer.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_cannot_send_more_than_the_request_asked_for() {
    let c = common::client();
    let body = json!({"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8});

    // Tokens without end: cut off at max_tokens, whether streamed or not.
    let (consumer, _dir, fake, base) = consumer_of_fake(Fake::FloodsTokens).await;
    let resp = post_in_time(&c, &base, &body).await;
    assert_eq!(resp.status(), 500, "failed after the first token");
    let v: Value = resp.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("9 tokens for a request of at most 8"), "{msg}");
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let resp = post_in_time(&c, &base, &sbody).await;
    let text = tokio::time::timeout(Duration::from_secs(10), resp.text())
        .await
        .expect("the stream ends")
        .unwrap();
    assert_eq!(text.matches("\"content\":\"ok\"").count(), 8, "{text}");
    assert!(
        text.contains("9 tokens for a request of at most 8"),
        "{text}"
    );
    fake.abort();
    consumer.stop().await.unwrap();

    // One token carrying 100 KB.
    let (consumer, _dir, fake, base) = consumer_of_fake(Fake::HugeText).await;
    let resp = post_in_time(&c, &base, &body).await;
    assert_eq!(resp.status(), 502, "failed at the first token");
    let v: Value = resp.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("100000 bytes of text for 1 tokens"), "{msg}");
    fake.abort();
    consumer.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_billing_tokens_without_text_is_refused() {
    let c = common::client();
    let body = json!({"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64});
    let (consumer, _dir, fake, base) = consumer_of_fake(Fake::Textless).await;
    let resp = post_in_time(&c, &base, &body).await;
    assert_eq!(resp.status(), 500, "failed after the first token");
    let v: Value = resp.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    // The allowance is 12 tokens without text (no stop strings).
    assert!(
        msg.contains("13 tokens arrived with 0 bytes of text"),
        "{msg}"
    );
    let m = metrics(&c, &base).await;
    assert!(m.contains("hypha_peer_violations_total 1\n"), "{m}");
    assert_eq!(consumer.ledger().unwrap().receipts(), 0);
    fake.abort();
    consumer.stop().await.unwrap();
}

/// Signs `mode`'s fake's provider record at prices (1, 4) and stores it
/// in `node`'s DHT, over a connection of the fake's identity.
async fn store_fake_record(node: &hypha_node::Node, fake: &hypha_node::net::addr::PeerAddr) {
    use hypha_dht::codec::record_to_wire;
    use hypha_dht::{model_key, ProviderRecord};
    use hypha_wire::{DhtReply, DhtRequest};
    let ident = common::peer_identity(FAKE_SEED);
    let to = node.peer_addr().unwrap();
    let ep = Endpoint::bind(&ident, "127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep.dial(to.addr, to.id).await.unwrap();
    proto::hello_as_dialer(
        &conn,
        to.id,
        &proto::hello_message(&ident, Default::default()),
        common::TEST_POW_BITS,
    )
    .await
    .unwrap();
    let record = ProviderRecord {
        publisher: ident.id(),
        public_key: ident.public_key(),
        addrs: vec![fake.addr],
        relays: Vec::new(),
        model: "default".into(),
        model_sha256: [1; 32],
        context_length: 512,
        backend: "CPU".into(),
        decode_tokens_per_s: 60,
        free_slots: 2,
        price_prompt_micro: 1,
        price_completion_micro: 4,
        expires_ms: hypha_node::util::unix_ms() + 60_000,
        signature: [0; 64],
    }
    .sign(ident.signing_key());
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut send = FramedSend::new(send);
    send.send(&Message::Dht(DhtRequest::AddProvider {
        key: model_key("default").0,
        record: Box::new(record_to_wire(&record)),
    }))
    .await
    .unwrap();
    send.finish();
    let mut recv = FramedRecv::new(recv);
    let reply = recv
        .next(|m| match m {
            hypha_wire::ArchivedMessage::DhtReply(r) => Ok(hypha_wire::owned_dht_reply(r).unwrap()),
            other => panic!("not a DHT reply: {other:?}"),
        })
        .await
        .unwrap();
    assert_eq!(reply, Some(DhtReply::Stored));
    conn.close(0u32.into(), b"done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_asking_more_than_its_record_or_the_ceilings_is_not_asked() {
    let c = common::client();
    let body = json!({"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8});

    // Its hello asks 40 per token, its signed record 4.
    let (addr, fake) = fake_seeder(Fake::Gouges).await;
    // A consumer listening on QUIC, so the fake can store its record there.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = hypha_node::NodeConfig::new(None);
    cfg.peers = vec![addr.clone()];
    cfg.quic_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.data_dir = Some(dir.path().to_owned());
    cfg.pow_bits = common::TEST_POW_BITS;
    let consumer = hypha_node::Node::start(cfg).await.unwrap();
    store_fake_record(&consumer, &addr).await;
    let base = format!("http://{}", consumer.http_addr());
    let resp = post_in_time(&c, &base, &body).await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("asks (1, 40) micro-credits per prompt/completion token, above the (1, 4) of its signed provider record"),
        "{msg}"
    );
    let m = metrics(&c, &base).await;
    assert!(m.contains("hypha_peer_gouging_total 1\n"), "{m}");
    assert_eq!(
        GOUGER_STREAMS.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "it was never sent the request"
    );
    // Counted against it: the next request does not reach it either.
    let health = consumer.peers().unwrap().health(&addr.id);
    assert!(health.failures >= 1, "{health:?}");
    fake.abort();
    consumer.stop().await.unwrap();

    // A seeder within its record but above this consumer's ceiling.
    let (addr, fake) = fake_seeder(Fake::Silent).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = hypha_node::NodeConfig::new(None);
    cfg.peers = vec![addr];
    cfg.data_dir = Some(dir.path().to_owned());
    cfg.pow_bits = common::TEST_POW_BITS;
    cfg.spend.max_price_completion_micro = Some(3);
    let consumer = hypha_node::Node::start(cfg).await.unwrap();
    let base = format!("http://{}", consumer.http_addr());
    // The first request learns its price from its hello (a silent
    // seeder would hang it for the start timeout otherwise); asked or
    // not, the answer is a 402 naming the ceiling.
    let resp = post_in_time(&c, &base, &body).await;
    assert_eq!(resp.status(), 402);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "over_price_ceiling", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("--max-price-completion 3") && msg.contains("at 1/4 micro-credits"),
        "{msg}"
    );
    fake.abort();
    consumer.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_that_holds_every_stream_cannot_hang_requests() {
    // More requests than the seeder grants streams: each one still ends,
    // refused, within the start deadline.
    let requests = hypha_node::net::endpoint::MAX_STREAMS_PER_PEER as usize + 6;
    let c = common::client();
    let body = json!({"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8});
    let (consumer, _dir, fake, base) = consumer_of_fake(Fake::Silent).await;
    let started = std::time::Instant::now();
    let all =
        futures_util::future::join_all((0..requests).map(|_| post_in_time(&c, &base, &body))).await;
    for resp in all {
        assert_eq!(resp.status(), 502);
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "{took:?}");
    fake.abort();
    consumer.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_beyond_the_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = hypha_engine::EngineConfig::new(common::test_model());
    engine.parallel = 1;
    engine.ctx_per_slot = 256;
    engine.threads = 1;
    let mut cfg = hypha_node::NodeConfig::new(Some(engine));
    cfg.quic_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.data_dir = Some(dir.path().to_owned());
    cfg.max_peers = 1;
    cfg.pow_bits = common::TEST_POW_BITS;
    let seeder = hypha_node::Node::start(cfg).await.unwrap();
    let to = seeder.peer_addr().unwrap();
    let hello_to = |ident: &Identity| proto::hello_message(ident, Default::default());

    let a = common::peer_identity(41);
    let ep_a = Endpoint::bind(&a, "127.0.0.1:0".parse().unwrap()).unwrap();
    let first = ep_a.dial(to.addr, to.id).await.unwrap();
    proto::hello_as_dialer(&first, to.id, &hello_to(&a), 0)
        .await
        .unwrap();

    let (_b, ep_b) = endpoint(42);
    let refused = ep_b.dial(to.addr, to.id).await;
    let err = refused.expect_err("a second peer is refused");
    assert!(err.to_string().contains("refused"), "{err}");

    // The first peer leaves; its place is free again.
    first.close(0u32.into(), b"bye");
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match ep_b.dial(to.addr, to.id).await {
            Ok(_) => break,
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seeder.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_that_is_running_is_refused_and_the_seeder_serves_on() {
    let net = Net::start(2, 64).await;
    let (_ep, conn) = dial_with_hello(&net, 23).await;
    // A long request, accepted and running ...
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut first = FramedSend::new(send);
    first.send(&common::request(9, 400)).await.unwrap();
    let mut first_recv = FramedRecv::new(recv);
    let accepted = first_recv
        .next(|m| Ok(matches!(m, hypha_wire::ArchivedMessage::Accepted(_))))
        .await
        .unwrap();
    assert_eq!(accepted, Some(true));
    // ... then the same id again, while it runs: refused as a duplicate,
    // at once, several times over.
    for _ in 0..3 {
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut send = FramedSend::new(send);
        send.send(&common::request(9, 4)).await.unwrap();
        let mut recv = FramedRecv::new(recv);
        let refusal = tokio::time::timeout(
            Duration::from_secs(5),
            recv.next(|m| match m {
                hypha_wire::ArchivedMessage::Error(e) => Ok(Refusal::from(&e.refusal)),
                other => panic!("{other:?}"),
            }),
        )
        .await
        .expect("an answer, not a stalled seeder")
        .unwrap();
        assert_eq!(refusal, Some(Refusal::Duplicate));
    }
    drop((first, first_recv));
    assert_still_serves(&net).await;
}
