//! Receipts between a real seeder and consumer: cumulative receipts while a
//! stream runs, a consumer that stops countersigning is cut off after one
//! interval, a cancelled request keeps its last signed receipt on both
//! sides, a seeder killed mid-stream has every countersigned receipt on
//! disk, and a seeder that overcharges is refused.

use std::time::Duration;

use hypha_ledger::{node_id_of, Receipt};
use hypha_node::net::endpoint::Endpoint;
use hypha_node::net::proto::{self, FramedRecv, FramedSend};
use hypha_wire::{ArchivedMessage, Message, Refusal};
use serde_json::{json, Value};

mod common;
use common::Net;

/// What a raw client saw on one request stream.
#[derive(Default, Debug)]
struct Seen {
    accepted: bool,
    chunks: u32,
    receipts: Vec<(u32, bool)>,
    error: Option<Refusal>,
    done: bool,
}

/// A consumer that reads a request's frames and never countersigns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_countersigning_is_cut_off() {
    let net = Net::start_with(2, 64, 8).await;
    let ident = common::peer_identity(51);
    let ep = Endpoint::bind(&ident, "127.0.0.1:0".parse().unwrap()).unwrap();
    let to = net.seeder.peer_addr().unwrap();
    let conn = ep.dial(to.addr, to.id).await.unwrap();
    proto::hello_as_dialer(
        &conn,
        to.id,
        &proto::hello_message(&ident, Default::default()),
        0,
    )
    .await
    .unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut send = FramedSend::new(send);
    send.send(&common::request(1, 200)).await.unwrap();
    let mut recv = FramedRecv::new(recv);
    let mut seen = Seen::default();
    let read = async {
        while let Some(()) = recv
            .next(|m| {
                match m {
                    ArchivedMessage::Accepted(_) => seen.accepted = true,
                    ArchivedMessage::Chunk(_) => seen.chunks += 1,
                    ArchivedMessage::Receipt(r) => {
                        let receipt = Receipt::from_bytes(r.receipt.as_slice()).unwrap();
                        seen.receipts.push((receipt.completion_tokens, r.last));
                    }
                    ArchivedMessage::Error(e) => seen.error = Some(Refusal::from(&e.refusal)),
                    ArchivedMessage::Done(_) => seen.done = true,
                    other => panic!("{other:?}"),
                }
                Ok(())
            })
            .await
            .unwrap()
        {}
    };
    // The seeder waits COUNTERSIGN_TIMEOUT for the first receipt's
    // signature, then gives up.
    tokio::time::timeout(Duration::from_secs(15), read)
        .await
        .expect("the seeder ends the stream");
    assert_eq!(seen.error, Some(Refusal::Unpaid), "{seen:?}");
    assert!(seen.accepted, "the seeder accepted the request first");
    assert!(!seen.done);
    // Receipts every half interval: the first (4 tokens) went unsigned, so
    // the stream stopped at the next offer, one interval (8 tokens) in.
    assert_eq!(seen.receipts, vec![(4, false)], "{seen:?}");
    assert_eq!(
        seen.chunks, 8,
        "at most one interval beyond the last signed receipt: {seen:?}"
    );
    let c = common::client();
    common::wait_metric(
        &c,
        &net.seeder_base(),
        "hypha_requests_total{endpoint=\"peer\",status=\"402\"} 1",
    )
    .await;
    // Nothing signed, nothing recorded.
    assert_eq!(net.seeder.ledger().unwrap().receipts(), 0);
    // And the next request of the consumer that did not pay is refused.
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut send = FramedSend::new(send);
    send.send(&common::request(2, 8)).await.unwrap();
    let mut recv = FramedRecv::new(recv);
    let refused = recv
        .next(|m| match m {
            ArchivedMessage::Error(e) => Ok(Some((
                Refusal::from(&e.refusal),
                e.message.as_str().to_owned(),
            ))),
            _ => Ok(None),
        })
        .await
        .unwrap()
        .flatten();
    let (refusal, message) = refused.expect("an error first");
    assert_eq!(refusal, Refusal::Unpaid);
    assert!(message.contains("never countersigned"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_streams_exchange_receipts_and_a_cancelled_one_keeps_the_last() {
    let net = Net::start_with(2, 64, 8).await;
    let c = common::client();
    let sid = net.seeder.id().unwrap();
    let cid = net.consumer.id().unwrap();

    // A whole request: credits in the header, the same receipt on both sides.
    let resp = c
        .post(format!("{}/v1/chat/completions", net.consumer_base()))
        .json(&json!({"model": "default", "messages": [{"role": "user", "content": "Count to twenty."}], "max_tokens": 30, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let header: u64 = resp.headers()[hypha_node::api::CREDITS_HEADER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["usage"]["credits"].as_u64(), Some(header));
    let (sl, cl) = (net.seeder.ledger().unwrap(), net.consumer.ledger().unwrap());
    assert_eq!(cl.receipts(), 1, "the consumer records before it answers");
    common::wait_receipts(sl, 1).await;
    assert_eq!(sl.totals(&sid).earned, header);
    assert_eq!(cl.totals(&cid).spent, header);

    // A stream cut after about 20 tokens: both keep the last receipt both
    // signed, which covers 8 or 16 tokens.
    let resp = c
        .post(format!("{}/v1/chat/completions", net.consumer_base()))
        .json(&json!({"model": "default", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 300, "temperature": 0, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut stream = futures_util::StreamExt::boxed(resp.bytes_stream());
    let mut pieces = 0;
    while pieces < 22 {
        let chunk = futures_util::StreamExt::next(&mut stream)
            .await
            .unwrap()
            .unwrap();
        pieces += String::from_utf8_lossy(&chunk)
            .matches("\"content\"")
            .count();
    }
    drop(stream);
    // Both write each receipt as it is countersigned; the cut stream ends
    // with the same latest one on both sides.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sl.receipts() < 2 || cl.receipts() < 2 || sl.totals(&sid).earned != cl.totals(&cid).spent
    {
        assert!(
            std::time::Instant::now() < deadline,
            "receipts {} {}, earned {} spent {}",
            sl.receipts(),
            cl.receipts(),
            sl.totals(&sid).earned,
            cl.totals(&cid).spent
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let paid = sl.totals(&sid).earned - header;
    assert_eq!(
        cl.totals(&cid).spent - header,
        paid,
        "both record the same receipt"
    );
    // The prompt is billed at 1 per token, each delivered token at 4; the
    // cut receipt covers whole half intervals (4 tokens), at least 16: the
    // seeder offered the 20-token receipt, before token 21, only once the
    // 16-token one was signed.
    let probe: Value = c
        .post(format!("{}/v1/chat/completions", net.seeder_base()))
        .json(&json!({"model": "default", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let prompt = probe["usage"]["prompt_tokens"].as_u64().unwrap();
    let tokens_paid = (paid - prompt) / 4;
    assert_eq!(paid, prompt + 4 * tokens_paid, "{paid}");
    assert!(
        tokens_paid.is_multiple_of(4) && tokens_paid >= 16,
        "{tokens_paid} tokens paid"
    );
    assert_eq!(
        sl.totals(&node_id_of(&[0; 32])).spent,
        0,
        "strangers are charged nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_cannot_be_paid_for_twice() {
    let net = Net::start_with(2, 64, 8).await;
    let ident = common::peer_identity(52);
    let ep = Endpoint::bind(&ident, "127.0.0.1:0".parse().unwrap()).unwrap();
    let to = net.seeder.peer_addr().unwrap();
    let conn = ep.dial(to.addr, to.id).await.unwrap();
    let terms = proto::hello_as_dialer(
        &conn,
        to.id,
        &proto::hello_message(&ident, Default::default()),
        0,
    )
    .await
    .unwrap();
    // Run request 7 to the end, countersigning like a consumer does.
    for round in 0..2 {
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut send = FramedSend::new(send);
        send.send(&common::request(7, 4)).await.unwrap();
        let mut recv = FramedRecv::new(recv);
        let mut error = None;
        while let Some(offer) = recv
            .next(|m| {
                Ok(match m {
                    ArchivedMessage::Receipt(r) => Some(r.receipt.as_slice().to_vec()),
                    ArchivedMessage::Error(e) => {
                        error = Some(Refusal::from(&e.refusal));
                        None
                    }
                    _ => None,
                })
            })
            .await
            .unwrap()
        {
            if let Some(bytes) = offer {
                let r = Receipt::from_bytes(&bytes).unwrap();
                let sig = r.sign(ident.signing_key());
                send.send(&Message::Countersign(hypha_wire::Countersign {
                    request_id: 7,
                    consumer_sig: sig,
                }))
                .await
                .unwrap();
            }
        }
        if round == 0 {
            assert_eq!(error, None);
        } else {
            assert_eq!(
                error,
                Some(Refusal::Duplicate),
                "the same request id again is refused"
            );
        }
    }
    let ledger = net.seeder.ledger().unwrap();
    assert_eq!(ledger.receipts(), 1);
    assert!(ledger.totals(&terms.node_id).earned > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_with_no_credits_left_gets_the_rate_limited_free_tier() {
    // A seeder so expensive that one request spends the whole grant.
    let net = Net::start_config(2, 64, |cfg| {
        cfg.price_completion_micro = hypha_ledger::GRANT_MICRO;
        cfg.free_tier_per_minute = 2;
    })
    .await;
    let c = common::client();
    let ask = || {
        c.post(format!("{}/v1/chat/completions", net.consumer_base()))
            .json(&json!({"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}))
            .send()
    };
    let first = ask().await.unwrap();
    assert_eq!(first.status(), 200);
    common::wait_receipts(net.seeder.ledger().unwrap(), 1).await;
    let cid = net.consumer.id().unwrap();
    let spent = net.seeder.ledger().unwrap().totals(&cid).spent;
    assert!(spent > hypha_ledger::GRANT_MICRO, "{spent}");
    // Balance below zero: two free requests a minute, then 429.
    for _ in 0..2 {
        assert_eq!(ask().await.unwrap().status(), 200);
    }
    let refused = ask().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["code"], "free_tier_exhausted", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no credits left"),
        "{v}"
    );
}

/// Completions ending exactly on a receipt boundary, where the interval's
/// receipt and the last one are offered back to back, settle on both sides
/// without a violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_ending_on_a_receipt_boundary_settles_cleanly() {
    let net = Net::start_with(2, 64, 8).await;
    let c = common::client();
    for max_tokens in [8, 16, 24] {
        let resp = c
            .post(format!("{}/v1/chat/completions", net.consumer_base()))
            .json(&json!({"model": "default", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": max_tokens, "temperature": 0}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["usage"]["completion_tokens"], max_tokens);
    }
    common::wait_receipts(net.seeder.ledger().unwrap(), 3).await;
    common::wait_metric(
        &c,
        &net.seeder_base(),
        "hypha_requests_total{endpoint=\"peer\",status=\"200\"} 3",
    )
    .await;
    let m = common::metrics(&c, &net.seeder_base()).await;
    assert!(m.contains("hypha_peer_violations_total 0\n"), "{m}");
    assert_eq!(net.consumer.ledger().unwrap().receipts(), 3);
}

/// A seeder process killed (SIGKILL) in the middle of a stream: every
/// receipt the consumer countersigned was written before more tokens
/// went out, so its log holds pay for all but at most one receipt
/// interval of the tokens the client received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_killed_mid_stream_keeps_every_countersigned_receipt() {
    const INTERVAL: u64 = 8;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let model = common::test_model();
    let interval = INTERVAL.to_string();
    let mut seeder = Some(common::Proc::spawn(&[
        "up",
        "--model",
        model.to_str().unwrap(),
        "--quic",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--parallel",
        "1",
        "--ctx-size",
        "512",
        "--receipt-interval",
        &interval,
        "--data-dir",
        dirs.0.path().to_str().unwrap(),
    ]));
    let peer = seeder
        .as_ref()
        .unwrap()
        .wait_for("peers reach this node as");
    let consumer = common::Proc::spawn(&[
        "up",
        "--peer",
        &peer,
        "--http",
        "127.0.0.1:0",
        "--data-dir",
        dirs.1.path().to_str().unwrap(),
    ]);
    let api = consumer.wait_for("API at");
    let model_name = model.file_stem().unwrap().to_str().unwrap();
    let c = common::client();
    let resp = c
        .post(format!("{api}/chat/completions"))
        .json(&json!({"model": model_name, "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}], "max_tokens": 400, "temperature": 0, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = futures_util::StreamExt::boxed(resp.bytes_stream());
    let mut received = 0u64;
    while received < 5 * INTERVAL + 3 {
        let chunk = futures_util::StreamExt::next(&mut stream)
            .await
            .unwrap()
            .unwrap();
        received += String::from_utf8_lossy(&chunk)
            .matches("\"content\"")
            .count() as u64;
    }
    // SIGKILL: no chance to settle anything.
    drop(seeder.take());
    drop(stream);
    drop(consumer);
    let (ledger, _) = hypha_ledger::Ledger::open(dirs.0.path()).unwrap();
    let held = ledger.recent(1);
    let receipt = &held
        .first()
        .expect("the seeder's log holds the request")
        .receipt;
    let paid = u64::from(receipt.completion_tokens);
    assert!(
        paid + INTERVAL >= received,
        "{paid} tokens paid of {received} received"
    );
    assert_eq!(ledger.receipts(), 1);
    assert_eq!(ledger.totals(&receipt.seeder).earned, receipt.credits);
    // The consumer wrote its countersigned receipts too (it was killed as
    // well, so perhaps not the very latest).
    let (cl, _) = hypha_ledger::Ledger::open(dirs.1.path()).unwrap();
    assert!(cl.totals(&receipt.consumer).spent > 0);
}
