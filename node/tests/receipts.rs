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

/// A consumer that countersigns the prompt's receipt, then no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_countersigning_is_cut_off() {
    let net = Net::start_with(2, 64, 8).await;
    let (ident, _ep, conn) = raw_consumer(&net, 51).await;
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut send = FramedSend::new(send);
    send.send(&common::request(1, 200)).await.unwrap();
    let mut recv = FramedRecv::new(recv);
    let mut seen = Seen::default();
    let read = async {
        while let Some(offer) = recv
            .next(|m| {
                Ok(match m {
                    ArchivedMessage::Accepted(_) => {
                        seen.accepted = true;
                        None
                    }
                    ArchivedMessage::Chunk(_) => {
                        seen.chunks += 1;
                        None
                    }
                    ArchivedMessage::Receipt(r) => {
                        let receipt = Receipt::from_bytes(r.receipt.as_slice()).unwrap();
                        seen.receipts.push((receipt.completion_tokens, r.last));
                        Some(receipt)
                    }
                    ArchivedMessage::Error(e) => {
                        seen.error = Some(Refusal::from(&e.refusal));
                        None
                    }
                    ArchivedMessage::Done(_) => {
                        seen.done = true;
                        None
                    }
                    other => panic!("{other:?}"),
                })
            })
            .await
            .unwrap()
        {
            // Only the prompt's receipt is countersigned.
            if let (Some(r), 1) = (offer, seen.receipts.len()) {
                send.send(&common::countersign(&ident, &r)).await.unwrap();
            }
        }
    };
    // The seeder waits COUNTERSIGN_TIMEOUT for the next receipt's
    // signature, then gives up.
    tokio::time::timeout(Duration::from_secs(15), read)
        .await
        .expect("the seeder ends the stream");
    assert_eq!(seen.error, Some(Refusal::Unpaid), "{seen:?}");
    assert!(seen.accepted, "the seeder accepted the request first");
    assert!(!seen.done);
    // The prompt's receipt came before any token; then receipts every half
    // interval: the first (4 tokens) went unsigned, so the stream stopped
    // at the next offer, one interval (8 tokens) in.
    assert_eq!(seen.receipts, vec![(0, false), (4, false)], "{seen:?}");
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
    // The prompt was paid for, and no token.
    let ledger = net.seeder.ledger().unwrap();
    common::wait_receipts(ledger, 1).await;
    let held = ledger.recent(1);
    assert_eq!(held[0].receipt.completion_tokens, 0);
    assert!(held[0].receipt.prompt_tokens > 0);
    assert_eq!(
        held[0].receipt.credits,
        u64::from(held[0].receipt.prompt_tokens)
    );
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

/// A raw consumer of `net`'s seeder, with the identity of `seed`.
async fn raw_consumer(
    net: &Net,
    seed: u8,
) -> (hypha_node::identity::Identity, Endpoint, quinn::Connection) {
    let (ep, conn) = common::dial_with_hello(net, seed).await;
    (common::peer_identity(seed), ep, conn)
}

/// The first frame of the seeder's answer to request `id`: its refusal, if
/// it is one.
async fn first_refusal(conn: &quinn::Connection, id: u64) -> Option<(Refusal, String)> {
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut send = FramedSend::new(send);
    send.send(&common::request(id, 8)).await.unwrap();
    let mut recv = FramedRecv::new(recv);
    recv.next(|m| {
        Ok(match m {
            ArchivedMessage::Error(e) => {
                Some((Refusal::from(&e.refusal), e.message.as_str().to_owned()))
            }
            _ => None,
        })
    })
    .await
    .unwrap()
    .flatten()
}

/// A consumer that takes everything, `Done` included, then resets the
/// stream instead of countersigning the last receipt: it pays for what it
/// signed (all but the tokens since the last interval receipt) and is
/// refused from then on. One that takes the first token of a long prompt
/// and resets has paid for the prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resetting_after_done_or_the_first_token_costs_what_was_delivered() {
    let net = Net::start_with(2, 64, 8).await;
    let (ident, _ep, conn) = raw_consumer(&net, 53).await;
    let ledger = net.seeder.ledger().unwrap();

    // Reset after Done and the last offer.
    let chunks = common::take_all(&ident, &conn, 1, 10, common::Last::Reset).await;
    assert_eq!(chunks, 10);
    // Paid: the prompt and the 8 tokens of the last interval receipt.
    common::wait_receipts(ledger, 1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut next_id = 2;
    let (refusal, message) = loop {
        next_id += 1;
        if let Some(r) = first_refusal(&conn, next_id).await {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "never refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refusal, Refusal::Unpaid, "{message}");
    let held = ledger.recent(1);
    let r = &held[0].receipt;
    assert_eq!(r.completion_tokens, 8, "{r:?}");
    assert_eq!(r.credits, u64::from(r.prompt_tokens) + 4 * 8);
    // Counted as unpaid (402, like the refusal after it), not as served.
    let m = common::metrics(&common::client(), &net.seeder_base()).await;
    assert!(
        m.contains("hypha_requests_total{endpoint=\"peer\",status=\"402\"}")
            && !m.contains("status=\"200\"")
            && !m.contains("status=\"499\""),
        "{m}"
    );

    // A long prompt, one token, and a reset before anything else: the
    // prompt was billed before that token went out.
    let (ident, _ep2, conn) = raw_consumer(&net, 54).await;
    let long = "Tell me about foxes and rivers. ".repeat(30);
    let Message::Request(mut req) = common::request(100, 200) else {
        unreachable!()
    };
    req.prompt = hypha_wire::Prompt::Text(long);
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut send = FramedSend::new(send);
    send.send(&Message::Request(req)).await.unwrap();
    let mut recv = FramedRecv::new(recv);
    loop {
        // Some(receipt) to sign, None for the first token.
        let frame = recv
            .next(|m| {
                Ok(match m {
                    ArchivedMessage::Accepted(_) => Ok(None),
                    ArchivedMessage::Receipt(r) => {
                        Ok(Some(Receipt::from_bytes(r.receipt.as_slice()).unwrap()))
                    }
                    ArchivedMessage::Chunk(_) => Err(()),
                    other => panic!("{other:?}"),
                })
            })
            .await
            .unwrap()
            .expect("frames come");
        match frame {
            Ok(Some(r)) => send.send(&common::countersign(&ident, &r)).await.unwrap(),
            Ok(None) => {}
            // The first token: reset.
            Err(()) => break,
        }
    }
    let _ = send.stream.reset(7u32.into());
    let _ = recv.stream.stop(7u32.into());
    let consumer = ident.id();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ledger.totals(&consumer).receipts_as_consumer == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the prompt is not billed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spent = ledger.totals(&consumer).spent;
    assert!(spent >= 100, "a prompt of 960 bytes billed {spent}");
    assert_eq!(ledger.recent(1)[0].receipt.completion_tokens, 0);
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
    common::wait_same_spending(sl, cl, &cid).await;
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

/// A new identity has no credits: it is on the free tier from its first
/// request, and stays there after spending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_with_no_credits_gets_the_rate_limited_free_tier() {
    let net = Net::start_both(2, 64, |cfg| cfg.free_tier_per_minute = 2, |_| {}).await;
    let c = common::client();
    let ask = || {
        c.post(format!("{}/v1/chat/completions", net.consumer_base()))
            .json(&json!({"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}))
            .send()
    };
    // Two free requests a minute, each paid for, then 429.
    for _ in 0..2 {
        let r = ask().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert!(v["usage"]["credits"].as_u64().unwrap() > 0, "{v}");
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
            .contains("no credits left here (standing -"),
        "{v}"
    );
    common::wait_receipts(net.seeder.ledger().unwrap(), 2).await;
    let cid = net.consumer.id().unwrap();
    assert!(hypha_ledger::balance(&net.seeder.ledger().unwrap().totals(&cid)) < 0);
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
    let mut seeder = Some(common::seeder_proc(
        dirs.0.path(),
        1,
        &["--receipt-interval", &interval],
    ));
    let peer = seeder
        .as_ref()
        .unwrap()
        .wait_for("peers reach this node as");
    let consumer = common::consumer_proc(dirs.1.path(), &peer);
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

/// A consumer's cap per request goes with the request: the seeder stops
/// generating before the tokens would pass it (a `length` finish), and
/// refuses a prompt that costs more, with a 402 naming the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_per_request_stops_generation_within_it() {
    let net = Net::start(2, 64).await;
    let c = common::client();
    let body = json!({"model": "default", "messages": [{"role": "user", "content": "Count to twenty."}], "max_tokens": 40, "temperature": 0});
    // The prompt's tokens, asked of the seeder directly.
    let probe: Value = c
        .post(format!("{}/v1/chat/completions", net.seeder_base()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let prompt = probe["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(probe["usage"]["completion_tokens"].as_u64().unwrap() > 5);
    let capped = |cap: u64| {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = hypha_node::NodeConfig::new(None);
        cfg.peers = vec![net.seeder.peer_addr().unwrap()];
        cfg.data_dir = Some(dir.path().to_owned());
        cfg.pow_bits = common::TEST_POW_BITS;
        cfg.spend.max_request_credits = Some(cap);
        async move { (hypha_node::Node::start(cfg).await.unwrap(), dir) }
    };
    // Room for the prompt (1 per token) and 5 tokens (4 each), not 6.
    let cap = prompt + 4 * 5 + 3;
    let (consumer, _dir) = capped(cap).await;
    let base = format!("http://{}", consumer.http_addr());
    let resp = c
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(v["usage"]["credits"].as_u64(), Some(prompt + 20), "{v}");
    consumer.stop().await.unwrap();

    // A cap below the prompt's cost (and one token): refused by the
    // seeder, nothing billed.
    let (consumer, _dir) = capped(prompt + 3).await;
    let base = format!("http://{}", consumer.http_addr());
    let resp = c
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 402);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "over_request_cap", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!(
            "the request's cap of {} micro-credits",
            prompt + 3
        )),
        "{msg}"
    );
    assert_eq!(consumer.ledger().unwrap().receipts(), 0);
    consumer.stop().await.unwrap();
}

/// `GET /v1/ledger/{id}` at `at`, once `done` holds of it.
async fn ledger_view(
    at: &hypha_node::Node,
    id: hypha_wire::NodeId,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let c = common::client();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = common::get_json(&c, &format!("http://{}/v1/ledger/{id}", at.http_addr())).await;
        if done(&v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never came to pass: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A consumer that resets after `Done` at two seeders is refused by a third
/// at its first request there: each of the two published an unpaid notice
/// (its last receipt both signed and the offer left unsigned) under the
/// consumer's receipt key, and the third looked the consumer up before it
/// admitted it. One seeder's notice alone refuses nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn receipts_left_unsigned_at_two_seeders_close_the_rest_of_the_network() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let config = |i: usize, boot: &[hypha_node::net::addr::PeerAddr]| {
        let mut cfg = common::seeder_config(1, 64, dirs[i].path(), "127.0.0.1:0".parse().unwrap());
        cfg.receipt_interval = 8;
        cfg.bootstrap = boot.to_vec();
        cfg
    };
    let a = hypha_node::Node::start(config(0, &[])).await.unwrap();
    let boot = vec![a.peer_addr().unwrap()];
    let b = hypha_node::Node::start(config(1, &boot)).await.unwrap();
    let c = hypha_node::Node::start(config(2, &boot)).await.unwrap();
    let ident = common::peer_identity(71);
    let me = ident.id();

    // At a: everything taken, the last receipt left unsigned.
    let (_ea, at_a) = common::dial_node_with_hello(&a, 71).await;
    assert_eq!(
        common::take_all(&ident, &at_a, 1, 10, common::Last::Reset).await,
        10
    );
    let a_id = a.id().unwrap().to_string();
    let v = ledger_view(&c, me, |v| {
        v["unpaid_notices"]
            .as_array()
            .is_some_and(|n| !n.is_empty())
    })
    .await;
    let notices = v["unpaid_notices"].as_array().unwrap();
    assert_eq!(notices.len(), 1, "{v}");
    assert_eq!(notices[0]["seeder"], a_id.as_str(), "{v}");
    assert_eq!(notices[0]["unpaid_tokens"], 2, "{v}");

    // One seeder's word refuses nobody: b serves the consumer, which then
    // leaves b's last receipt unsigned too.
    let (_eb, at_b) = common::dial_node_with_hello(&b, 71).await;
    assert_eq!(
        common::take_all(&ident, &at_b, 2, 10, common::Last::Pay).await,
        10
    );
    assert_eq!(
        common::take_all(&ident, &at_b, 3, 10, common::Last::Reset).await,
        10
    );
    ledger_view(&c, me, |v| {
        v["unpaid_notices"].as_array().is_some_and(|n| n.len() == 2)
    })
    .await;

    // c never served the consumer: its first request is refused.
    let (_ec, at_c) = common::dial_node_with_hello(&c, 71).await;
    let (refusal, message) = first_refusal(&at_c, 4).await.expect("refused");
    assert_eq!(refusal, Refusal::Unpaid, "{message}");
    assert!(
        message.contains("2 seeders published unpaid notices"),
        "{message}"
    );
    // And another consumer is served by c as ever.
    let other = common::peer_identity(72);
    let (_eo, other_c) = common::dial_node_with_hello(&c, 72).await;
    assert_eq!(
        common::take_all(&other, &other_c, 1, 10, common::Last::Pay).await,
        10
    );
    for n in [a, b, c] {
        n.stop().await.unwrap();
    }
}

/// A consumer's `Cancel` that crosses the seeder's `Done` does not excuse
/// the last receipt: the seeder still waits for it, and once it is signed
/// the request is paid in full and the consumer served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_that_crosses_done_still_pays_the_last_receipt() {
    let net = Net::start_with(2, 64, 8).await;
    let (ident, _ep, conn) = raw_consumer(&net, 73).await;
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut send = FramedSend::new(send);
    send.send(&common::request(1, 10)).await.unwrap();
    let mut recv = FramedRecv::new(recv);
    while let Some(frame) = recv
        .next(|m| {
            Ok(match m {
                ArchivedMessage::Receipt(r) => {
                    Some((Receipt::from_bytes(r.receipt.as_slice()).unwrap(), r.last))
                }
                ArchivedMessage::Error(e) => panic!("{:?}", e.message),
                _ => None,
            })
        })
        .await
        .unwrap()
    {
        match frame {
            Some((r, false)) => send.send(&common::countersign(&ident, &r)).await.unwrap(),
            Some((r, true)) => {
                // The client left just as the answer ended.
                send.send(&Message::Cancel(hypha_wire::Cancel { request_id: 1 }))
                    .await
                    .unwrap();
                send.send(&common::countersign(&ident, &r)).await.unwrap();
            }
            None => {}
        }
    }
    let ledger = net.seeder.ledger().unwrap();
    common::wait_receipts(ledger, 1).await;
    assert_eq!(ledger.recent(1)[0].receipt.completion_tokens, 10);
    assert_eq!(
        common::take_all(&ident, &conn, 2, 10, common::Last::Pay).await,
        10,
        "served again"
    );
}

/// A client that drops its stream as the last tokens arrive, while the
/// seeder's `Done` and last receipt may be on their way: its node cancels
/// and still countersigns what arrives, so both ledgers agree and the
/// seeder goes on serving it (it would refuse a consumer that reset after
/// `Done`, and publish a notice against it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_at_the_end_of_its_answer_is_not_held_unpaid() {
    let net = Net::start_with(2, 64, 8).await;
    let c = common::client();
    let cid = net.consumer.id().unwrap();
    let (sl, cl) = (net.seeder.ledger().unwrap(), net.consumer.ledger().unwrap());
    for round in 0..8u64 {
        let resp = c
            .post(format!("{}/v1/chat/completions", net.consumer_base()))
            .json(&json!({"model": "default", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 9, "temperature": 0, "stream": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "round {round}");
        let mut stream = futures_util::StreamExt::boxed(resp.bytes_stream());
        let mut pieces = 0;
        while pieces < 9 {
            let Some(chunk) = futures_util::StreamExt::next(&mut stream).await else {
                break;
            };
            pieces += String::from_utf8_lossy(&chunk.unwrap())
                .matches("\"content\"")
                .count();
        }
        drop(stream);
        common::wait_receipts(sl, round + 1).await;
        common::wait_same_spending(sl, cl, &cid).await;
    }
    let m = common::metrics(&c, &net.seeder_base()).await;
    assert!(
        !m.contains("status=\"402\""),
        "a request was held unpaid: {m}"
    );
    common::assert_still_serves(&net).await;
}

/// Closing the whole connection after `Done` instead of signing the last
/// receipt is not a lost link: the consumer closed it itself, and is
/// refused like one that reset the stream (and a notice published).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_connection_after_done_is_not_paying() {
    let net = Net::start_with(2, 64, 8).await;
    let (ident, _ep, conn) = raw_consumer(&net, 74).await;
    assert_eq!(
        common::take_all(&ident, &conn, 1, 10, common::Last::Close).await,
        10
    );
    // Counted as unpaid (402), not as a lost link (499).
    common::wait_metric(
        &common::client(),
        &net.seeder_base(),
        "hypha_requests_total{endpoint=\"peer\",status=\"402\"} 1",
    )
    .await;
    let ledger = net.seeder.ledger().unwrap();
    assert_eq!(ledger.recent(1)[0].receipt.completion_tokens, 8);
    // A new connection: refused at once, not on a second strike.
    let (_, _ep2, conn) = raw_consumer(&net, 74).await;
    let (refusal, message) = first_refusal(&conn, 2).await.expect("refused");
    assert_eq!(refusal, Refusal::Unpaid, "{message}");
    assert!(message.contains("never countersigned"), "{message}");
}
