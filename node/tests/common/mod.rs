//! Helpers shared by the node's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The test model: `$HYPHA_TEST_MODEL`, else the default model in the cache.
pub fn test_model() -> PathBuf {
    if let Some(p) = std::env::var_os("HYPHA_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let p = hypha_node::models::cache_dir()
        .expect("a model cache")
        .join(hypha_node::models::DEFAULT_MODEL.file);
    assert!(
        p.is_file(),
        "test model missing at {}: run .ci/run",
        p.display()
    );
    p
}

/// The test model with Qwen 2.5's chat template, whose tool section has
/// the model write Hermes `<tool_call>` blocks: `$HYPHA_TEST_HERMES_MODEL`,
/// else the one `.ci/test-models` made in the model cache.
pub fn hermes_model() -> PathBuf {
    if let Some(p) = std::env::var_os("HYPHA_TEST_HERMES_MODEL") {
        return PathBuf::from(p);
    }
    let p = hypha_node::models::cache_dir()
        .expect("a model cache")
        .join("SmolLM2-135M-Instruct.Q4_1.hermes.gguf");
    assert!(
        p.is_file(),
        "test model missing at {}: run .ci/test-models (or .ci/run)",
        p.display()
    );
    p
}

/// Polls `GET /health` until `field` equals `want` (10 s at most).
pub async fn wait_health(c: &reqwest::Client, base: &str, field: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h: Value = c
            .get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if h[field] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{field} never reached {want}: {h}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The node's Prometheus text from `GET /metrics`.
pub async fn metrics(c: &reqwest::Client, base: &str) -> String {
    c.get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// An HTTP client for tests.
pub fn client() -> reqwest::Client {
    hypha_node::models::http_client().unwrap()
}

/// A seeder running the test model (one decode thread, 512 tokens per
/// slot) with its identity in `dir`, serving peers on `quic`.
pub async fn seeder(
    parallel: u32,
    queue: usize,
    dir: &std::path::Path,
    quic: std::net::SocketAddr,
) -> hypha_node::Node {
    let cfg = seeder_config(parallel, queue, dir, quic);
    hypha_node::Node::start(cfg).await.expect("seeder starts")
}

/// The configuration [`seeder`] starts.
pub fn seeder_config(
    parallel: u32,
    queue: usize,
    dir: &std::path::Path,
    quic: std::net::SocketAddr,
) -> hypha_node::NodeConfig {
    let mut engine = hypha_engine::EngineConfig::new(test_model());
    engine.parallel = parallel;
    engine.ctx_per_slot = 512;
    engine.threads = 1;
    engine.queue_max = queue;
    let mut cfg = hypha_node::NodeConfig::new(Some(engine));
    cfg.model_aliases = vec!["default".into()];
    cfg.quic_addr = Some(quic);
    cfg.data_dir = Some(dir.to_owned());
    cfg.pow_bits = TEST_POW_BITS;
    cfg
}

/// Proof of work the tests' nodes create and require: enough to exercise
/// the check, cheap enough to grind dozens of identities.
pub const TEST_POW_BITS: u32 = 8;

/// A deterministic identity that passes the tests' proof-of-work check.
pub fn peer_identity(seed: u8) -> hypha_node::identity::Identity {
    hypha_node::identity::Identity::from_seed_with_pow([seed; 32], TEST_POW_BITS)
}

/// A node without a model that sends requests to `peers`; its identity
/// lives in the returned folder.
pub async fn consumer(
    peers: Vec<hypha_node::net::addr::PeerAddr>,
    dial_timeout: Duration,
) -> (hypha_node::Node, tempfile::TempDir) {
    consumer_with(peers, dial_timeout, |_| {}).await
}

/// [`consumer`] with its configuration adjusted by `tweak`.
pub async fn consumer_with(
    peers: Vec<hypha_node::net::addr::PeerAddr>,
    dial_timeout: Duration,
    tweak: impl FnOnce(&mut hypha_node::NodeConfig),
) -> (hypha_node::Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = hypha_node::NodeConfig::new(None);
    cfg.peers = peers;
    cfg.data_dir = Some(dir.path().to_owned());
    cfg.dial_timeout = dial_timeout;
    cfg.pow_bits = TEST_POW_BITS;
    tweak(&mut cfg);
    let node = hypha_node::Node::start(cfg).await.expect("consumer starts");
    (node, dir)
}

/// A seeder and a consumer that knows it.
pub struct Net {
    pub seeder: hypha_node::Node,
    pub consumer: hypha_node::Node,
    pub _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Net {
    pub async fn start(parallel: u32, queue: usize) -> Self {
        Self::start_with(
            parallel,
            queue,
            hypha_node::inference::serve::DEFAULT_RECEIPT_INTERVAL,
        )
        .await
    }

    /// A network whose seeder offers a receipt every `receipt_interval`
    /// tokens.
    pub async fn start_with(parallel: u32, queue: usize, receipt_interval: u32) -> Self {
        Self::start_config(parallel, queue, |cfg| {
            cfg.receipt_interval = receipt_interval
        })
        .await
    }

    /// A network whose seeder's configuration `tweak` adjusts.
    pub async fn start_config(
        parallel: u32,
        queue: usize,
        tweak: impl FnOnce(&mut hypha_node::NodeConfig),
    ) -> Self {
        Self::start_both(parallel, queue, tweak, |_| {}).await
    }

    /// A network whose seeder's and consumer's configurations are
    /// adjusted.
    pub async fn start_both(
        parallel: u32,
        queue: usize,
        seeder_tweak: impl FnOnce(&mut hypha_node::NodeConfig),
        consumer_tweak: impl FnOnce(&mut hypha_node::NodeConfig),
    ) -> Self {
        let sdir = tempfile::tempdir().unwrap();
        let mut cfg = seeder_config(parallel, queue, sdir.path(), "127.0.0.1:0".parse().unwrap());
        seeder_tweak(&mut cfg);
        let seeder = hypha_node::Node::start(cfg).await.expect("seeder starts");
        let (consumer, cdir) = consumer_with(
            vec![seeder.peer_addr().unwrap()],
            Duration::from_secs(2),
            consumer_tweak,
        )
        .await;
        Self {
            seeder,
            consumer,
            _dirs: (sdir, cdir),
        }
    }

    pub fn seeder_base(&self) -> String {
        format!("http://{}", self.seeder.http_addr())
    }

    pub fn consumer_base(&self) -> String {
        format!("http://{}", self.consumer.http_addr())
    }
}

/// What a streamed chat completion delivered.
#[derive(Debug)]
pub struct StreamedChat {
    pub text: String,
    /// Chunks that carried text.
    pub pieces: usize,
    pub finish: Option<String>,
    pub usage: Value,
}

/// Sends a streaming chat completion and reads it to `[DONE]`.
pub async fn stream_chat(c: &reqwest::Client, base: &str, body: &Value) -> StreamedChat {
    use futures_util::StreamExt;
    let resp = c
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut reader = hypha_bench::sse::SseReader::default();
    let mut out = StreamedChat {
        text: String::new(),
        pieces: 0,
        finish: None,
        usage: Value::Null,
    };
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        for data in reader.push(&chunk.unwrap()).unwrap() {
            if data == "[DONE]" {
                return out;
            }
            let v: Value = serde_json::from_str(&data).unwrap();
            assert!(v.get("error").is_none(), "stream failed: {v}");
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                if !t.is_empty() {
                    out.pieces += 1;
                    out.text.push_str(t);
                }
            }
            if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
                out.finish = Some(f.to_owned());
            }
            if !v["usage"].is_null() {
                out.usage = v["usage"].clone();
            }
        }
    }
    panic!("stream ended without [DONE]");
}

/// Waits (5 s at most) until `ledger` holds `n` receipts: the seeder
/// records a receipt when the countersignature reaches it, which may be
/// just after the consumer's client got its response.
pub async fn wait_receipts(ledger: &hypha_ledger::Ledger, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while ledger.receipts() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} receipts recorded",
            ledger.receipts()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (5 s at most) until the seeder's ledger shows `consumer` spending
/// what the consumer's own ledger does. A consumer writes a request's last
/// receipt before it answers its client; the seeder writes it when the
/// countersignature arrives, and holds the request's earlier receipts (the
/// prompt's first) until then.
pub async fn wait_same_spending(
    seeder: &hypha_ledger::Ledger,
    consumer_ledger: &hypha_ledger::Ledger,
    consumer: &hypha_wire::NodeId,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (s, c) = (
            seeder.totals(consumer).spent,
            consumer_ledger.totals(consumer).spent,
        );
        if s == c {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the seeder holds {s} spent, the consumer {c}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (5 s at most) until the node's metrics hold `line`: a seeder
/// counts a request once its receipt is settled, just after the consumer's
/// client got its response.
pub async fn wait_metric(c: &reqwest::Client, base: &str, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics(c, base).await;
        if m.lines().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "no {line:?} in\n{m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A greedy chat request frame for `default`, as a consumer sends it.
pub fn request(id: u64, max_tokens: u32) -> hypha_wire::Message {
    hypha_wire::Message::Request(hypha_wire::InferenceRequest {
        request_id: id,
        model: "default".into(),
        prompt: hypha_wire::Prompt::Chat(vec![hypha_wire::ChatMessage {
            role: "user".into(),
            content: "Tell me a long story about a fox.".into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }]),
        sampling: hypha_wire::Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
        },
        stop: Vec::new(),
        max_tokens: Some(max_tokens),
        json_schema: None,
        logprobs: None,
        max_credits: None,
        tools: None,
    })
}

/// The lines of a child's output as they come, read on a thread; each
/// also printed after `echo` when given.
pub fn lines_of(
    out: impl std::io::Read + Send + 'static,
    echo: Option<String>,
) -> std::sync::mpsc::Receiver<String> {
    // Unbounded on purpose: the reader must never block, or the child
    // would stall writing its log. A test's child writes a bounded log.
    #[allow(clippy::disallowed_methods)]
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(tag) = &echo {
                eprintln!("[{tag}] {line}");
            }
            let _ = tx.send(line);
        }
    });
    lines
}

/// The text after `marker` on the first of `lines` (within a minute)
/// that holds it.
pub fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, marker: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no line with {marker:?}"));
        if let Some((_, rest)) = line.split_once(marker) {
            return rest.trim().to_owned();
        }
    }
}

/// A `hypha` process whose stderr is scanned for start-up lines.
pub struct Proc {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Self {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hypha"))
            .args(args)
            .env("HYPHA_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = lines_of(child.stderr.take().unwrap(), None);
        Self { child, lines }
    }

    /// The text after `marker` on the first stderr line holding it.
    pub fn wait_for(&self, marker: &str) -> String {
        wait_for_line(&self.lines, marker)
    }
}

/// A `hypha up` seeder process: the test model on loopback QUIC and HTTP
/// ports, one decode thread, `parallel` slots of 512 context tokens, its
/// key in `dir`, and `extra` arguments.
pub fn seeder_proc(dir: &std::path::Path, parallel: u32, extra: &[&str]) -> Proc {
    let model = test_model();
    let parallel = parallel.to_string();
    let mut args = vec![
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
        &parallel,
        "--ctx-size",
        "512",
        "--data-dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Proc::spawn(&args)
}

/// A `hypha up` consumer process of `peer` (`ID@HOST:PORT`), its HTTP on a
/// loopback port and its key in `dir`.
pub fn consumer_proc(dir: &std::path::Path, peer: &str) -> Proc {
    Proc::spawn(&[
        "up",
        "--peer",
        peer,
        "--http",
        "127.0.0.1:0",
        "--data-dir",
        dir.to_str().unwrap(),
    ])
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node without a model on a loopback QUIC port, joining through
/// `bootstrap`, its key in `dir`.
pub async fn plain_node(
    dir: &std::path::Path,
    bootstrap: Vec<hypha_node::net::addr::PeerAddr>,
) -> hypha_node::Node {
    let mut cfg = hypha_node::NodeConfig::new(None);
    cfg.quic_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.bootstrap = bootstrap;
    cfg.data_dir = Some(dir.to_owned());
    cfg.pow_bits = TEST_POW_BITS;
    cfg.dial_timeout = Duration::from_secs(2);
    hypha_node::Node::start(cfg).await.expect("node starts")
}

/// `GET url` as JSON.
pub async fn get_json(c: &reqwest::Client, url: &str) -> Value {
    c.get(url).send().await.unwrap().json().await.unwrap()
}

/// Runs the `hypha` binary with `args` (off the async runtime); its
/// stdout, after checking it succeeded.
pub async fn hypha_cli(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_hypha"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the series `name` (with its labels) in Prometheus text; 0
/// when absent.
pub fn metric_value(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Dials `net`'s seeder as a peer and completes a correct hello exchange.
pub async fn dial_with_hello(
    net: &Net,
    seed: u8,
) -> (hypha_node::net::endpoint::Endpoint, quinn::Connection) {
    dial_node_with_hello(&net.seeder, seed).await
}

/// [`dial_with_hello`] to any seeder.
pub async fn dial_node_with_hello(
    seeder: &hypha_node::Node,
    seed: u8,
) -> (hypha_node::net::endpoint::Endpoint, quinn::Connection) {
    use hypha_node::net::proto;
    let ident = peer_identity(seed);
    let ep =
        hypha_node::net::endpoint::Endpoint::bind(&ident, "127.0.0.1:0".parse().unwrap()).unwrap();
    let to = seeder.peer_addr().unwrap();
    let conn = ep.dial(to.addr, to.id).await.expect("transport connects");
    let hello = proto::hello_message(&ident, Default::default());
    let theirs = proto::hello_as_dialer(&conn, to.id, &hello, TEST_POW_BITS)
        .await
        .unwrap();
    assert_eq!(theirs.offer.capabilities, hypha_wire::CAP_SEEDER);
    (ep, conn)
}

/// A chat completion through `net`'s consumer succeeds.
pub async fn assert_still_serves(net: &Net) {
    let resp = client()
        .post(format!("{}/v1/chat/completions", net.consumer_base()))
        .json(&serde_json::json!({"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the seeder keeps serving others");
}

/// The countersignature of `r` by `ident`, as a consumer sends it.
pub fn countersign(
    ident: &hypha_node::identity::Identity,
    r: &hypha_ledger::Receipt,
) -> hypha_wire::Message {
    hypha_wire::Message::Countersign(hypha_wire::Countersign {
        request_id: r.request_id,
        consumer_sig: r.sign(ident.signing_key()),
    })
}

/// What a raw consumer does with the last receipt (after `Done`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Last {
    /// Countersigns it.
    Pay,
    /// Resets the stream instead.
    Reset,
    /// Closes the whole connection instead.
    Close,
}

/// Runs request `id` for `max_tokens` on `conn`, countersigning every
/// receipt but the last, which it treats as `last` says. The chunks
/// received.
pub async fn take_all(
    ident: &hypha_node::identity::Identity,
    conn: &quinn::Connection,
    id: u64,
    max_tokens: u32,
    last: Last,
) -> u32 {
    use hypha_node::net::proto::{FramedRecv, FramedSend};
    use hypha_wire::ArchivedMessage;
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut send = FramedSend::new(send);
    send.send(&request(id, max_tokens)).await.unwrap();
    let mut recv = FramedRecv::new(recv);
    let mut chunks = 0u32;
    loop {
        let frame = recv
            .next(|m| {
                Ok(match m {
                    ArchivedMessage::Receipt(r) => {
                        let receipt = hypha_ledger::Receipt::from_bytes(r.receipt.as_slice());
                        Some((receipt.unwrap(), r.last))
                    }
                    ArchivedMessage::Chunk(_) => {
                        chunks += 1;
                        None
                    }
                    ArchivedMessage::Error(e) => panic!("{:?}", e.message),
                    _ => None,
                })
            })
            .await
            .unwrap();
        match frame {
            // The stream ended: the last receipt was paid.
            None => return chunks,
            Some(Some((r, is_last))) if !is_last || last == Last::Pay => {
                send.send(&countersign(ident, &r)).await.unwrap();
            }
            Some(Some((_, _))) => break,
            Some(None) => {}
        }
    }
    if last == Last::Close {
        conn.close(0u32.into(), b"leaving");
        return chunks;
    }
    let _ = send.stream.reset(7u32.into());
    let _ = recv.stream.stop(7u32.into());
    chunks
}
