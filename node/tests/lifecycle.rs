//! A node owns every task it starts: a full seeder (model, QUIC, DHT,
//! relay) and a consumer that reaches it, started, used and stopped 20
//! times in one process, leave no task, socket or thread behind.
//!
//! Counts are read from the process itself: tokio's live tasks on the
//! test's runtime, the sockets among `/proc/self/fd`, and the threads in
//! `/proc/self/task`. A first round warms up what a process keeps once
//! (ggml's backends, the blocking pool's first threads); the counts after
//! it are the baseline every later round must return to.

mod common;

use std::time::{Duration, Instant};

use common::{client, seeder_config, TEST_POW_BITS};
use serde_json::json;

const ROUNDS: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    tasks: usize,
    sockets: usize,
    threads: usize,
}

fn counts() -> Counts {
    let sockets = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count();
    let threads = std::fs::read_dir("/proc/self/task").unwrap().count();
    Counts {
        tasks: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        sockets,
        threads,
    }
}

/// The counts once they hold still for a moment (closing connections and
/// idle blocking threads take a little while to go), or the last seen.
async fn settled(want: Option<Counts>) -> Counts {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = counts();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = counts();
        let done = match want {
            Some(w) => now == w,
            None => now == last,
        };
        if done || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// One round: a seeder with the model, a relay service and a DHT on QUIC,
/// a consumer that knows it; one completion through the consumer (a QUIC
/// connection, receipts, both ledgers); both stopped.
async fn round(i: usize) {
    let seeder_dir = tempfile::tempdir().unwrap();
    let consumer_dir = tempfile::tempdir().unwrap();
    let mut cfg = seeder_config(1, 4, seeder_dir.path(), "127.0.0.1:0".parse().unwrap());
    cfg.relay = Some(hypha_node::services::relay_server::RelayConfig::default());
    let seeder = hypha_node::Node::start(cfg).await.expect("seeder starts");
    let at = seeder.peer_addr().unwrap();
    let mut cfg = hypha_node::NodeConfig::new(None);
    cfg.peers = vec![at.clone()];
    cfg.bootstrap = vec![at];
    cfg.data_dir = Some(consumer_dir.path().to_owned());
    cfg.pow_bits = TEST_POW_BITS;
    let consumer = hypha_node::Node::start(cfg).await.expect("consumer starts");
    {
        let c = client();
        let resp = c
            .post(format!(
                "http://{}/v1/chat/completions",
                consumer.http_addr()
            ))
            .json(&json!({
                "model": "default",
                "messages": [{"role": "user", "content": format!("Count to {i}.")}],
                "max_tokens": 4,
                "temperature": 0,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "round {i}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert!(
            v["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
            "{v}"
        );
    }
    consumer.stop().await.unwrap();
    seeder.stop().await.unwrap();
}

#[test]
fn a_node_started_and_stopped_twenty_times_leaves_nothing_behind() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Idle blocking threads (model loads, ledger appends) go soon, so
        // a leak is told apart from a pool that has not shrunk yet.
        .thread_keep_alive(Duration::from_millis(100))
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        round(0).await;
        let baseline = settled(None).await;
        let started = Instant::now();
        for i in 1..=ROUNDS {
            round(i).await;
        }
        let took = started.elapsed();
        let after = settled(Some(baseline)).await;
        eprintln!("{ROUNDS} rounds in {took:?}; before {baseline:?}, after {after:?}");
        assert_eq!(
            after, baseline,
            "tasks, sockets or threads left behind by {ROUNDS} starts and stops"
        );
    });
}
