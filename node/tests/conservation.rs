//! Credits are conserved across a real network, and any node can check any
//! other's balance: five nodes on loopback (two seeders, three consumers,
//! joined through one DHT) run many requests; then the balances in the five
//! logs sum to zero (no credit is created), and every node's view of every other's
//! balance, computed from the signed receipts the DHT holds, equals that
//! node's own log. An attacker among them takes whole answers and resets
//! instead of signing the last receipt: it pays what it signed, and both
//! seeders' unpaid notices against it are in the DHT.

use std::time::{Duration, Instant};

use hypha_node::{Node, NodeConfig};
use serde_json::{json, Value};

mod common;
use common::{seeder_config, TEST_POW_BITS};

const REQUESTS_PER_CONSUMER: usize = 8;

fn balance(node: &Node) -> i128 {
    let id = node.id().unwrap();
    hypha_ledger::balance(&node.ledger().unwrap().totals(&id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_nodes_conserve_credits_and_agree_on_balances() {
    let dirs: Vec<tempfile::TempDir> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = Node::start(seeder_config(
        2,
        64,
        dirs[0].path(),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let boot = vec![first.peer_addr().unwrap()];
    let mut cfg = seeder_config(2, 64, dirs[1].path(), "127.0.0.1:0".parse().unwrap());
    cfg.bootstrap = boot.clone();
    // A smaller interval: long answers exchange several receipts.
    cfg.receipt_interval = 4;
    let second = Node::start(cfg).await.unwrap();
    let mut consumers = Vec::new();
    for d in &dirs[2..] {
        let mut cfg = NodeConfig::new(None);
        cfg.quic_addr = Some("127.0.0.1:0".parse().unwrap());
        cfg.bootstrap = boot.clone();
        cfg.data_dir = Some(d.path().to_owned());
        cfg.pow_bits = TEST_POW_BITS;
        consumers.push(Node::start(cfg).await.unwrap());
    }

    let c = common::client();
    let mut served = 0;
    // Every consumer sends all its requests at once: its requests running
    // on one seeder make the other the better choice.
    let runs = consumers.iter().flat_map(|n| {
        let base = format!("http://{}", n.http_addr());
        (0..REQUESTS_PER_CONSUMER).map(move |i| (base.clone(), i))
    });
    let runs = runs.map(|(base, i)| {
        let c = c.clone();
        async move {
            let resp = c
                .post(format!("{base}/v1/chat/completions"))
                .json(&json!({"model": "default", "messages": [{"role": "user", "content": format!("Count to {i}.")}], "max_tokens": 3 + i, "temperature": 0}))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let v: Value = resp.json().await.unwrap();
            assert_eq!(status, 200, "{v}");
            assert!(v["usage"]["credits"].as_u64().is_some_and(|c| c > 0), "{v}");
            1
        }
    });
    // Meanwhile an attacker (a raw consumer, no node of the five) takes
    // a whole answer at each seeder and resets rather than sign the last
    // receipt.
    let attacker = common::peer_identity(81);
    let attack = async {
        let mut chunks = 0;
        // Its connections stay up: the resets are what the seeders see.
        let mut links = Vec::new();
        for (seeder, id) in [(&first, 1), (&second, 2)] {
            let (ep, conn) = common::dial_node_with_hello(seeder, 81).await;
            // 9 tokens: at the second seeder (an offer every 2) the last
            // interval receipt, at 8, is signed a token before `Done`.
            chunks += common::take_all(&attacker, &conn, id, 9, common::Last::Reset).await;
            links.push((ep, conn));
        }
        (chunks, links)
    };
    let ((delivered, _links), oks) = tokio::join!(attack, futures_util::future::join_all(runs));
    assert_eq!(delivered, 18);
    for ok in oks {
        served += ok;
    }
    let total = consumers.len() * REQUESTS_PER_CONSUMER;
    assert_eq!(served, total);

    // Every request left one receipt in its seeder's log (the attacker's
    // two too: what it signed).
    let nodes: Vec<&Node> = [&first, &second].into_iter().chain(&consumers).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while first.ledger().unwrap().receipts() + second.ledger().unwrap().receipts()
        < total as u64 + 2
    {
        assert!(
            Instant::now() < deadline,
            "receipts missing from the seeders' logs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let by_seeder = (
        first.ledger().unwrap().receipts(),
        second.ledger().unwrap().receipts(),
    );

    // What the attacker paid: the prompt and the tokens of the last
    // receipt it signed (none of the 9 at the first seeder, whose interval
    // is 64; 8 at the second, whose interval is 4), never its last 1..9.
    let a = attacker.id();
    let mut attacker_spent = 0;
    for (seeder, paid_tokens) in [(&first, 0), (&second, 8)] {
        // All the seeder holds: at most the 26 requests of this run.
        let held = seeder.ledger().unwrap().recent(64);
        let r = held
            .iter()
            .map(|s| &s.receipt)
            .find(|r| r.consumer == a)
            .expect("the attacker's receipt");
        assert_eq!(r.completion_tokens, paid_tokens, "{r:?}");
        assert_eq!(
            r.credits,
            u64::from(r.prompt_tokens) + 4 * u64::from(paid_tokens)
        );
        attacker_spent += i128::from(r.credits);
    }

    // Conservation: credits only moved between the five and the attacker.
    // A seeder writes a request's last receipt when the countersignature
    // reaches it, just after the consumer recorded it and answered (its
    // first, the prompt's, was in the log before any token): the sums meet
    // once those land.
    let deadline = Instant::now() + Duration::from_secs(10);
    let balances = loop {
        let balances: Vec<i128> = nodes.iter().map(|n| balance(n)).collect();
        if balances.iter().sum::<i128>() == attacker_spent || Instant::now() >= deadline {
            break balances;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        balances.iter().sum::<i128>(),
        attacker_spent,
        "{balances:?}"
    );
    let moved: i128 = balances.iter().map(|b| b.abs()).sum::<i128>() / 2;
    assert!(moved > 0, "no credits moved");

    // Every node's view of every other, from the DHT's receipts alone,
    // matches that node's own log (publication runs just behind the
    // requests, so wait for it).
    let deadline = Instant::now() + Duration::from_secs(20);
    for viewer in &nodes {
        let d = viewer.peers().unwrap().discovery().unwrap().clone();
        for (subject, own) in nodes.iter().zip(&balances) {
            if subject.id() == viewer.id() {
                continue;
            }
            let id = subject.id().unwrap();
            loop {
                let receipts = d.receipts_of(&id).await.unwrap_or_default().receipts;
                let totals = hypha_ledger::totals_of(&id, &receipts);
                let seen = hypha_ledger::balance(&totals);
                if seen == *own {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} sees {id} at {seen}, its own log says {own}",
                    viewer.id().unwrap()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // The same over HTTP, from a consumer about the first seeder.
    let v: Value = c
        .get(format!(
            "http://{}/v1/ledger/{}",
            consumers[0].http_addr(),
            first.id().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["source"], "dht");
    assert_eq!(
        v["balance"].as_i64().map(i128::from),
        Some(balances[0]),
        "{v}"
    );
    // And about the attacker: what it paid, and both seeders' notices
    // (two: any other seeder refuses it).
    let v = peer_view(&consumers[0], a, |v| {
        v["unpaid_notices"].as_array().is_some_and(|n| n.len() == 2)
            && v["balance"].as_i64().map(i128::from) == Some(-attacker_spent)
    })
    .await;
    let mut named: Vec<&str> = v["unpaid_notices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["seeder"].as_str().unwrap())
        .collect();
    named.sort_unstable();
    let mut seeders = [
        first.id().unwrap().to_string(),
        second.id().unwrap().to_string(),
    ];
    seeders.sort_unstable();
    assert_eq!(named, seeders, "{v}");

    // And from the command line, against a running node.
    let url = format!("http://{}", consumers[0].http_addr());
    let first_id = first.id().unwrap().to_string();
    let text = common::hypha_cli(&["ledger", "peer", &first_id, "--url", &url]).await;
    assert!(
        text.contains(&format!("balance {} micro-credits", balances[0])),
        "{text}"
    );
    let text = common::hypha_cli(&["peers", "--url", &url]).await;
    assert!(text.contains("routing table: 4 contacts"), "{text}");
    assert!(text.contains(&first_id), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("default ") && l.ends_with("2 providers")),
        "{text}"
    );
    println!(
        "{total} requests and the attacker's 2 ({} and {} receipts per seeder), {moved} micro-credits moved; balances {balances:?} sum to the attacker's {attacker_spent}; 20 of 20 views from the DHT match the logs",
        by_seeder.0, by_seeder.1
    );
    for n in consumers.into_iter().chain([second, first]) {
        n.stop().await.unwrap();
    }
}

/// `GET /v1/ledger/{id}` at `at`, once `done` holds of it (the DHT's
/// receipts land just behind the requests).
async fn peer_view(at: &Node, id: hypha_wire::NodeId, done: impl Fn(&Value) -> bool) -> Value {
    let c = common::client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = common::get_json(&c, &format!("http://{}/v1/ledger/{id}", at.http_addr())).await;
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "never came to pass: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asks `model` through `node`'s API.
async fn ask(node: &Node, model: &str) -> (u16, Value) {
    let resp = common::client()
        .post(format!("http://{}/v1/chat/completions", node.http_addr()))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json::<Value>().await.unwrap())
}

/// Asks `model` through `node` until it is served (its provider's record
/// may take a moment to be found); what it cost.
async fn ask_until_served(node: &Node, model: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, v) = ask(node, model).await;
        if status == 200 {
            return v["usage"]["credits"].as_i64().unwrap();
        }
        assert!(Instant::now() < deadline, "{status} {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends `model` requests through `node` until one is refused with 429;
/// the statuses and the refusal.
async fn until_limited(node: &Node, model: &str) -> (Vec<u16>, Value) {
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let (status, v) = ask(node, model).await;
        statuses.push(status);
        if status == 429 {
            return (statuses, v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("never limited: {statuses:?}");
}

/// A seeder ranks a consumer by the receipts the whole network published,
/// not only its own: a node that earned standing at one seeder by serving
/// it, then spent more than that at another, is on the free tier there,
/// even after flooding its own receipt key with receipts signed by
/// identities it controls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_spent_elsewhere_count_at_every_seeder() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut cfg = seeder_config(2, 64, dirs[0].path(), "127.0.0.1:0".parse().unwrap());
    cfg.model_aliases = vec!["alpha".into()];
    // Dear enough that eight tokens cost far more than the consumer earns.
    cfg.price_completion_micro = 200_000;
    let alpha = Node::start(cfg).await.unwrap();
    let boot = vec![alpha.peer_addr().unwrap()];
    let mut cfg = seeder_config(2, 64, dirs[1].path(), "127.0.0.1:0".parse().unwrap());
    cfg.model_aliases = vec!["beta".into()];
    cfg.bootstrap = boot.clone();
    cfg.free_tier_per_minute = 1;
    let beta = Node::start(cfg).await.unwrap();
    // The consumer serves a model of its own, "gamma".
    let mut cfg = seeder_config(1, 64, dirs[2].path(), "127.0.0.1:0".parse().unwrap());
    cfg.model_aliases = vec!["gamma".into()];
    cfg.bootstrap = boot;
    // This consumer pays alpha's price, far above the default ceiling.
    cfg.spend.max_price_completion_micro = None;
    let consumer = Node::start(cfg).await.unwrap();
    let me = consumer.id().unwrap();

    // beta buys from the consumer (once its record is found): the consumer
    // now has standing at beta.
    let earned = ask_until_served(&beta, "gamma").await;
    // From beta's log at once, and through the DHT once published.
    peer_view(&beta, me, |v| {
        v["standing_here"] == earned && v["balance"] == earned
    })
    .await;

    let (status, v) = ask(&consumer, "alpha").await;
    assert_eq!(status, 200, "{v}");
    let spent = v["usage"]["credits"].as_i64().unwrap();
    assert!(spent > earned, "{spent} {earned}");
    // beta's own log knows nothing of this: the consumer still has its
    // standing there.
    let b = beta.ledger().unwrap();
    let id = beta.id().unwrap();
    // beta's log alone, knowing nothing of others' spending.
    let judge = hypha_node::inference::admission::LedgerJudge {
        me: id,
        ledger: b,
        spent_elsewhere: |_: &hypha_wire::NodeId| None,
    };
    assert_eq!(
        hypha_ledger::standing(&judge, &me, None),
        i128::from(earned)
    );
    // Once the receipt is published, beta sees the spending through the DHT.
    let v = peer_view(&beta, me, |v| v["standing_here"].as_i64().unwrap() < 0).await;
    assert_eq!(v["standing_here"], earned - spent, "{v}");

    // The consumer floods its own receipt key with receipts it signs with
    // four identities of its own: tiny, newer than its real one, more than
    // the key holds. The key fills, and beta still sees the spending.
    let d = beta.peers().unwrap().discovery().unwrap().clone();
    let mine =
        hypha_node::identity::Identity::load_or_create_with_pow(dirs[2].path(), TEST_POW_BITS)
            .unwrap();
    assert_eq!(mine.id(), me);
    let own = consumer.peers().unwrap().discovery().unwrap().clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    const SYBILS: u8 = 4;
    let per_sybil = hypha_dht::receipts::MAX_RECEIPTS_PER_KEY as u64 / u64::from(SYBILS) + 8;
    for n in 0..SYBILS {
        let sybil = common::peer_identity(200 + n);
        for i in 0..per_sybil {
            let r = hypha_ledger::Receipt {
                request_id: 1_000_000 + i,
                consumer: me,
                seeder: sybil.id(),
                model_sha256: [0; 32],
                prompt_tokens: 1,
                completion_tokens: 1,
                credits: 1,
                started_ms: now - 1_000,
                finished_ms: now + i,
                tokens_digest: [0; 32],
            };
            let signed = hypha_ledger::SignedReceipt {
                seeder_sig: r.sign(sybil.signing_key()),
                consumer_sig: r.sign(mine.signing_key()),
                seeder_key: sybil.public_key(),
                consumer_key: mine.public_key(),
                receipt: r,
            };
            assert!(own.publish_receipt(signed.verify().unwrap()));
        }
    }
    let full = hypha_dht::receipts::spent_share(hypha_dht::receipts::MAX_RECEIPTS_PER_KEY);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let receipts = d.receipts_of(&me).await.unwrap_or_default().receipts;
        let published = hypha_ledger::Published::of(&id, &me, &receipts);
        let seen = hypha_ledger::standing(&judge, &me, Some(&published));
        assert!(
            seen < 0,
            "the flood hid the spending: standing {seen} over {} receipts",
            receipts.len()
        );
        if receipts.len() >= full {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the flood never filled the key: {} receipts",
            receipts.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Over HTTP, beta lists the consumer's receipts newest first (the DHT
    // holds its largest spending first).
    let v = peer_view(&beta, me, |v| {
        v["receipts"].as_u64().unwrap() >= full as u64
    })
    .await;
    assert!(v["balance"].as_i64().unwrap() < 0, "{v}");
    assert!(v["standing_here"].as_i64().unwrap() < 0, "{v}");
    let finished: Vec<u64> = v["recent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["finished_ms"].as_u64().unwrap())
        .collect();
    assert!(finished.len() > 1, "{v}");
    assert!(finished.windows(2).all(|w| w[0] >= w[1]), "{finished:?}");
    // beta looks the consumer up in the background on the first request;
    // from then on the consumer gets one request a minute.
    let (statuses, v) = until_limited(&consumer, "beta").await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no credits left here"),
        "{v}"
    );
    println!(
        "earned {earned} at beta, spent {spent} at alpha; requests to beta after: {statuses:?}"
    );
    for n in [consumer, beta, alpha] {
        n.stop().await.unwrap();
    }
}

/// Fabricated trade buys nothing: a node signs 1,000 receipts as the seeder
/// of four identities of its own and publishes them. Its balance as the
/// DHT shows it is vast, yet another seeder, which never paid those
/// identities, gives it no standing: it stays on the free tier there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trade_with_its_own_identities_buys_a_node_no_priority() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut cfg = seeder_config(1, 64, dirs[0].path(), "127.0.0.1:0".parse().unwrap());
    cfg.free_tier_per_minute = 1;
    let seeder = Node::start(cfg).await.unwrap();
    let mut cfg = NodeConfig::new(None);
    cfg.quic_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.bootstrap = vec![seeder.peer_addr().unwrap()];
    cfg.data_dir = Some(dirs[1].path().to_owned());
    cfg.pow_bits = TEST_POW_BITS;
    let faker = Node::start(cfg).await.unwrap();
    let me = faker.id().unwrap();
    let mine =
        hypha_node::identity::Identity::load_or_create_with_pow(dirs[1].path(), TEST_POW_BITS)
            .unwrap();
    assert_eq!(mine.id(), me);
    let sybils: Vec<_> = (0..4).map(|n| common::peer_identity(210 + n)).collect();
    let own = faker.peers().unwrap().discovery().unwrap().clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    const FABRICATED: u64 = 1000;
    const CREDITS: u64 = 1_000_000;
    for i in 0..FABRICATED {
        let sybil = &sybils[(i % 4) as usize];
        let r = hypha_ledger::Receipt {
            request_id: i,
            consumer: sybil.id(),
            seeder: me,
            model_sha256: [0; 32],
            prompt_tokens: 10,
            completion_tokens: 100,
            credits: CREDITS,
            started_ms: now - 2_000,
            finished_ms: now - 1_000 + i,
            tokens_digest: [0; 32],
        };
        let signed = hypha_ledger::SignedReceipt {
            seeder_sig: r.sign(mine.signing_key()),
            consumer_sig: r.sign(sybil.signing_key()),
            seeder_key: mine.public_key(),
            consumer_key: sybil.public_key(),
            receipt: r,
        };
        assert!(own.publish_receipt(signed.verify().unwrap()));
    }
    // The seeder sees the fabricated earnings (as many as the key keeps)...
    let v = peer_view(&seeder, me, |v| {
        v["balance"].as_i64().unwrap() >= 16 * CREDITS as i64
    })
    .await;
    // ... and honours none of them.
    assert_eq!(v["standing_here"], 0, "{v}");
    let balance = v["balance"].clone();
    let (statuses, v) = until_limited(&faker, "default").await;
    assert_eq!(statuses, [200, 429], "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no credits left here"),
        "{v}"
    );
    println!(
        "{FABRICATED} fabricated receipts, balance {balance} seen through the DHT, standing 0: {statuses:?}"
    );
    for n in [faker, seeder] {
        n.stop().await.unwrap();
    }
}

/// The free tier runs on idle capacity only: a seeder with one slot
/// streams a long answer to a consumer without standing; a node the seeder
/// paid (it served the seeder) asks while that runs, takes the slot at
/// once, and the free stream ends with an error saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paying_request_takes_the_slot_of_a_free_one() {
    use futures_util::StreamExt;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let seeder = Node::start(seeder_config(
        1,
        64,
        dirs[0].path(),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let boot = vec![seeder.peer_addr().unwrap()];
    // The paying node serves a model of its own, which the seeder buys.
    let mut cfg = seeder_config(1, 64, dirs[1].path(), "127.0.0.1:0".parse().unwrap());
    cfg.model_aliases = vec!["other".into()];
    cfg.bootstrap = boot.clone();
    let paying = Node::start(cfg).await.unwrap();
    let mut cfg = NodeConfig::new(None);
    cfg.quic_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.bootstrap = boot;
    cfg.data_dir = Some(dirs[2].path().to_owned());
    cfg.pow_bits = TEST_POW_BITS;
    let free = Node::start(cfg).await.unwrap();
    ask_until_served(&seeder, "other").await;
    let pid = paying.id().unwrap();
    peer_view(&seeder, pid, |v| v["standing_here"].as_i64().unwrap() > 0).await;

    let c = common::client();
    let resp = c
        .post(format!("http://{}/v1/chat/completions", free.http_addr()))
        .json(&json!({"model": "default", "messages": [{"role": "user", "content": "Write a very long essay about the sea."}], "max_tokens": 400, "temperature": 0, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while text.matches("data:").count() < 3 {
        text.push_str(&String::from_utf8_lossy(
            &body.next().await.unwrap().unwrap(),
        ));
    }
    // The free stream holds the seeder's only slot; the paying request
    // does not wait for it.
    let asked = Instant::now();
    let (status, v) = ask(&paying, "default").await;
    assert_eq!(status, 200, "{v}");
    let took = asked.elapsed();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(
        text.contains("the free tier runs on idle capacity only"),
        "{text}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
    let m = common::metrics(&c, &format!("http://{}", seeder.http_addr())).await;
    assert!(m.contains("hypha_free_tier_preempted_total 1"), "{m}");
    println!("the paying request took {took:?} while a free stream held the slot");
    for n in [free, paying, seeder] {
        n.stop().await.unwrap();
    }
}

/// Credits pass on one hop: a seeder pays a node, that node pays a
/// third, and the third has standing at the first seeder, up to what the
/// middle node held of its payment; with it, its requests there are not
/// rate-limited as the free tier's are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_a_seeder_paid_count_one_hop_on() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut cfg = seeder_config(1, 64, dirs[0].path(), "127.0.0.1:0".parse().unwrap());
    cfg.model_aliases = vec!["judge".into()];
    cfg.free_tier_per_minute = 1;
    cfg.spend.max_price_completion_micro = None;
    let judge = Node::start(cfg).await.unwrap();
    let boot = vec![judge.peer_addr().unwrap()];
    let node = |dir: &std::path::Path, name: &str| {
        let mut cfg = seeder_config(1, 64, dir, "127.0.0.1:0".parse().unwrap());
        cfg.model_aliases = vec![name.to_owned()];
        cfg.bootstrap = boot.clone();
        cfg.price_completion_micro = 10_000;
        cfg.spend.max_price_completion_micro = None;
        cfg
    };
    let middle = Node::start(node(dirs[1].path(), "middle")).await.unwrap();
    let last = Node::start(node(dirs[2].path(), "last")).await.unwrap();
    let paid = ask_until_served(&judge, "middle").await;
    let passed_on = ask_until_served(&middle, "last").await;
    assert!(paid > 0 && passed_on > 0);
    let lid = last.id().unwrap();
    // The judge never paid `last`; it sees what `middle` passed on.
    let v = peer_view(&judge, lid, |v| v["standing_here"].as_i64().unwrap() > 0).await;
    assert_eq!(v["standing_here"], paid.min(passed_on), "{v}");
    // The judge's admission learns the same in the background: the first
    // requests start its lookups (of `last`, then of `middle`) and may
    // take the free tier's one request a minute or be refused.
    for _ in 0..2 {
        let _ = ask(&last, "judge").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(ask(&last, "judge").await.0);
    }
    assert_eq!(
        statuses,
        [200, 200, 200],
        "paying requests are not rate-limited"
    );
    println!(
        "paid {paid}, passed on {passed_on}; standing {}",
        v["standing_here"]
    );
    for n in [last, middle, judge] {
        n.stop().await.unwrap();
    }
}
