//! The edge under load, against a real `hypha up` process: while 1,000
//! slow HTTP clients trickle request heads (reconnecting whenever they are
//! cut off) and 1,000 QUIC handshakes are opened and left idle, a normal
//! client streams completions. It reports that client's time to first
//! token and tokens/s against an idle baseline measured in the same run,
//! the node's peak RSS, and checks that every completion arrived whole.
//! `HYPHA_EDGE_LOAD` sets the number of each kind of attacker (1,000 by
//! default; fewer when the process may not open that many descriptors).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::AsyncWriteExt as _;

mod common;
use common::test_model;

/// Tokens each measured completion asks for (greedy: the same each time).
const MAX_TOKENS: u32 = 48;
/// Measured completions per phase.
const ROUNDS: usize = 4;

/// How many descriptors this process may open.
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(1024)
}

/// The peak resident set of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next().map(str::to_owned))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One streamed completion: time to first token, decode tokens/s, and the
/// tokens counted.
async fn streamed(c: &reqwest::Client, api: &str, model: &str) -> (Duration, f64, u32) {
    use futures_util::StreamExt as _;
    let t = Instant::now();
    let resp = c
        .post(format!("{api}/v1/chat/completions"))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let (mut first, mut last) = (None, t);
    let mut text = String::new();
    while let Some(chunk) = body.next().await {
        let chunk = String::from_utf8_lossy(&chunk.unwrap()).into_owned();
        if chunk.contains("\"content\"") {
            first.get_or_insert_with(Instant::now);
            last = Instant::now();
        }
        text.push_str(&chunk);
    }
    assert!(text.contains("[DONE]"), "the stream ended whole: {text}");
    let usage: serde_json::Value = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["usage"].is_object())
        .expect("a usage event")["usage"]
        .clone();
    let tokens = usage["completion_tokens"].as_u64().unwrap() as u32;
    let first = first.expect("some content");
    let decode = last.duration_since(first).as_secs_f64().max(1e-6);
    (
        first.duration_since(t),
        f64::from(tokens.saturating_sub(1)) / decode,
        tokens,
    )
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Client hellos of `n` QUIC handshakes, captured on a socket that never
/// answers: each a fresh connection's first datagram.
async fn quic_initials(n: usize) -> Vec<Vec<u8>> {
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = sink.local_addr().unwrap();
    let ident = common::peer_identity(120);
    let ep =
        hypha_node::net::endpoint::Endpoint::bind(&ident, "127.0.0.1:0".parse().unwrap()).unwrap();
    let ep = std::sync::Arc::new(ep);
    let dials: Vec<_> = (0..n)
        .map(|_| {
            let ep = ep.clone();
            tokio::spawn(async move {
                let _ = ep.dial(to, hypha_wire::NodeId([0; 32])).await;
            })
        })
        .collect();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut seen = std::collections::HashSet::new();
    while out.len() < n {
        let (len, _) = tokio::time::timeout(Duration::from_secs(10), sink.recv_from(&mut buf))
            .await
            .expect("client hellos arrive")
            .unwrap();
        // A retransmission repeats a connection's id: keep one of each.
        let dcid = buf[6..6 + usize::from(buf[5]).min(20)].to_vec();
        if seen.insert(dcid) {
            out.push(buf[..len].to_vec());
        }
    }
    for d in dials {
        d.abort();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_clients_and_idle_handshakes_leave_a_stream_untouched() {
    let wanted: usize = std::env::var("HYPHA_EDGE_LOAD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    // Each attacker takes a descriptor here and one in the node.
    let n = wanted.min(open_files_limit().saturating_sub(256) / 2);
    let dir = tempfile::tempdir().unwrap();
    // Room for every slow client: the cap is not what is measured.
    let connections = (n + 64).to_string();
    let node = common::seeder_proc(dir.path(), 2, &["--max-http-connections", &connections]);
    let api = format!(
        "http://{}",
        node.wait_for("at http://").trim_end_matches("/v1")
    );
    let http: SocketAddr = api.trim_start_matches("http://").parse().unwrap();
    let peer = node.wait_for("peers reach this node as");
    let quic: SocketAddr = peer.split('@').nth(1).unwrap().trim().parse().unwrap();
    let model_name = test_model()
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let c = hypha_node::models::http_client().unwrap();
    let _ = streamed(&c, &api, &model_name).await; // warm-up

    let mut idle = Vec::new();
    for _ in 0..ROUNDS {
        idle.push(streamed(&c, &api, &model_name).await);
    }

    let initials = quic_initials(n).await;
    let stop = tokio_util::sync::CancellationToken::new();
    // Slow HTTP clients: a byte of a request head each second, and a new
    // connection whenever the node cuts one off.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );
    let cut = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let slow = {
        let (stop, cut) = (stop.clone(), cut.clone());
        tokio::spawn(async move {
            let mut conns: Vec<(tokio::net::TcpStream, usize)> = Vec::new();
            for _ in 0..n {
                if let Ok(s) = tokio::net::TcpStream::connect(http).await {
                    conns.push((s, 0));
                }
            }
            while !stop.is_cancelled() {
                for (s, at) in conns.iter_mut() {
                    let byte = head.as_bytes()[*at % head.len()];
                    if s.write_all(&[byte]).await.is_err() {
                        cut.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Ok(fresh) = tokio::net::TcpStream::connect(http).await {
                            *s = fresh;
                            *at = 0;
                        }
                    } else {
                        *at += 1;
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            conns.len()
        })
    };
    // Idle QUIC handshakes: each client hello from a socket of its own,
    // repeated each second as a client retransmits, never answered.
    let quiet = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut socks = Vec::new();
            for _ in 0..initials.len() {
                socks.push(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
            }
            while !stop.is_cancelled() {
                for (s, hello) in socks.iter().zip(&initials) {
                    let _ = s.send_to(hello, quic).await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            socks.len()
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut loaded = Vec::new();
    for _ in 0..ROUNDS {
        loaded.push(streamed(&c, &api, &model_name).await);
    }
    // Long enough for the header deadline (15 s from each connection) to
    // cut the slow clients once, and for them to notice: a client learns
    // of the cut only when a later byte fails, up to two of its one-second
    // rounds after it, and a round over 1,000 sockets is slower on a
    // loaded machine.
    tokio::time::sleep(Duration::from_secs(20)).await;
    loaded.push(streamed(&c, &api, &model_name).await);
    stop.cancel();
    let (slow_n, quic_n) = (slow.await.unwrap(), quiet.await.unwrap());
    let rss = peak_rss_kib(node.child.id());
    let metrics = common::metrics(&c, &api).await;

    let ttft = |v: &[(Duration, f64, u32)]| median(v.iter().map(|r| r.0).collect());
    let tps = |v: &[(Duration, f64, u32)]| median(v.iter().map(|r| r.1).collect());
    eprintln!(
        "edge load: {slow_n} slow HTTP clients ({} cut off by the header deadline), {quic_n} idle QUIC handshakes; \
         stream TTFT p50 idle {:?} / loaded {:?}, decode tok/s p50 idle {:.1} / loaded {:.1}; node peak RSS {} MiB; \
         QUIC handshakes refused {}, sent a Retry {}",
        cut.load(std::sync::atomic::Ordering::Relaxed),
        ttft(&idle),
        ttft(&loaded),
        tps(&idle),
        tps(&loaded),
        rss / 1024,
        common::metric_value(&metrics, "hypha_peers_refused_total"),
        common::metric_value(&metrics, "hypha_quic_retries_total"),
    );
    assert!(
        common::metric_value(&metrics, "hypha_quic_retries_total") > 0,
        "a flood of handshakes from unproven addresses is sent Retries"
    );
    // Nothing lost: greedy decoding of one prompt, so every completion,
    // idle or loaded, brings the same tokens.
    for r in idle.iter().chain(&loaded) {
        assert_eq!(r.2, idle[0].2, "a completion came back short");
    }
    assert!(
        cut.load(std::sync::atomic::Ordering::Relaxed) as usize >= slow_n / 2,
        "slow clients were not cut off"
    );
    // The stream keeps its pace: within a factor of the idle baseline
    // (two cores run the node, the attackers and this client).
    assert!(
        ttft(&loaded) < ttft(&idle) * 4 + Duration::from_millis(250),
        "TTFT {:?} loaded against {:?} idle",
        ttft(&loaded),
        ttft(&idle)
    );
    assert!(tps(&loaded) > tps(&idle) / 3.0, "tokens/s fell to a third");
    assert!(rss < 1024 * 1024, "peak RSS {} MiB", rss / 1024);
}
