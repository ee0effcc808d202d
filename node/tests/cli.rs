//! The `hypha` binary as a user runs it: `model pull` against a local HTTP
//! server (interrupted download resumed, bad hash refused), `model list`,
//! `hypha chat` against a running node, a seeder and a consumer as two
//! `hypha up` processes, and `hypha demo`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hypha_engine::EngineConfig;
use hypha_node::{Node, NodeConfig};

mod common;
use common::test_model;
use serde_json::{json, Value};

const HYPHA: &str = env!("CARGO_BIN_EXE_hypha");

struct FileServer {
    data: Vec<u8>,
    /// Cut the next full (non-range) response halfway.
    cut_next: AtomicBool,
    ranges: Mutex<Vec<Option<String>>>,
}

async fn serve_file(State(s): State<Arc<FileServer>>, headers: HeaderMap) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    s.ranges.lock().unwrap().push(range.clone());
    let total = s.data.len();
    if let Some(r) = range {
        let start: usize = r
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse().ok())
            .expect("open-ended range");
        if start >= total {
            return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
        }
        let body = s.data[start..].to_vec();
        return Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{total}", total - 1),
            )
            .header(header::CONTENT_LENGTH, body.len())
            .body(Body::from(body))
            .unwrap();
    }
    if s.cut_next.swap(false, Ordering::SeqCst) {
        // Promise the whole file, send half, then break the connection.
        let half = bytes::Bytes::copy_from_slice(&s.data[..total / 2]);
        let stream = futures_util::stream::iter(vec![
            Ok(half),
            Err(std::io::Error::other("connection cut by the test")),
        ]);
        return Response::builder()
            .header(header::CONTENT_LENGTH, total)
            .body(Body::from_stream(stream))
            .unwrap();
    }
    Response::builder()
        .header(header::CONTENT_LENGTH, total)
        .body(Body::from(s.data.clone()))
        .unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_resumes_after_interruption_and_checks_the_hash() {
    // A 3 MiB "model": pseudo-random bytes, so a misplaced chunk changes the hash.
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let data: Vec<u8> = (0..3 * 1024 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let hash = sha256_hex(&data);
    let server = Arc::new(FileServer {
        data: data.clone(),
        cut_next: AtomicBool::new(true),
        ranges: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/files/tiny.gguf", get(serve_file))
        .route("/files/other.gguf", get(serve_file))
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let cache = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/files/tiny.gguf");
    let pull = |url: String, sha: String| {
        let cache = cache.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            Command::new(HYPHA)
                .args(["model", "pull", &url, "--sha256", &sha])
                .env("HYPHA_MODELS_DIR", &cache)
                .output()
                .unwrap()
        })
    };

    let first = pull(url.clone(), hash.clone()).await.unwrap();
    assert!(!first.status.success(), "the cut download must fail");
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(
        err.contains("interrupted") && err.contains("resume"),
        "{err}"
    );
    let part = cache.path().join("tiny.gguf.part");
    let have = std::fs::metadata(&part).unwrap().len();
    assert_eq!(have as usize, data.len() / 2);
    assert!(!cache.path().join("tiny.gguf").exists());

    let second = pull(url.clone(), hash.clone()).await.unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(
        server.ranges.lock().unwrap().last().unwrap().as_deref(),
        Some(format!("bytes={have}-").as_str()),
        "the second pull must resume with a range request"
    );
    let got = std::fs::read(cache.path().join("tiny.gguf")).unwrap();
    assert!(got == data, "resumed file differs from the original");
    assert!(!part.exists());

    // A wrong hash is refused and leaves nothing in the cache.
    let wrong = "0".repeat(64);
    let bad = pull(format!("http://{addr}/files/other.gguf"), wrong)
        .await
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("sha256 mismatch"), "{err}");
    assert!(!cache.path().join("other.gguf").exists());
    assert!(!cache.path().join("other.gguf.part").exists());

    let list = Command::new(HYPHA)
        .args(["model", "list"])
        .env("HYPHA_MODELS_DIR", cache.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&list.stdout);
    assert!(out.contains("tiny") && !out.contains("other"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_replies_and_keeps_the_conversation() {
    let mut engine = EngineConfig::new(test_model());
    engine.parallel = 2;
    engine.ctx_per_slot = 1024;
    engine.threads = 1;
    let node = Node::start(NodeConfig::new(Some(engine))).await.unwrap();
    let base = format!("http://{}", node.http_addr());
    let model = node.engine().unwrap().info().name.clone();
    let c = hypha_node::models::http_client().unwrap();
    // Prompt tokens of one message sent as a fresh conversation.
    let cost = |content: &'static str| {
        let (c, base, model) = (c.clone(), base.clone(), model.clone());
        async move {
            let v: Value = c
                .post(format!("{base}/v1/chat/completions"))
                .json(&json!({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["usage"]["prompt_tokens"].as_u64().unwrap()
        }
    };
    let prompt_tokens_total = || {
        let (c, base) = (c.clone(), base.clone());
        async move {
            let m = common::metrics(&c, &base).await;
            m.lines()
                .find_map(|l| l.strip_prefix("hypha_prompt_tokens_total "))
                .unwrap()
                .parse::<u64>()
                .unwrap()
        }
    };
    let first = cost("What is the capital of France?").await;
    let probe = cost("(conversation test)").await;
    let hi = cost("Hi").await;
    let before = prompt_tokens_total().await;

    let input =
        "What is the capital of France?\n/model\n/clear\n(conversation test)\nHi\nHi\n/quit\n";
    let b = base.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(HYPHA)
            .args([
                "chat",
                "--url",
                &b,
                "--temperature",
                "0",
                "--max-tokens",
                "16",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Paris"), "{text}");
    assert!(
        text.contains("current model: SmolLM2-135M-Instruct.Q4_1"),
        "{text}"
    );
    assert!(text.contains("(conversation cleared)"), "{text}");

    // Four turns were sent: the first alone, then /clear, then three turns
    // of one conversation. Had the history been dropped, the two "Hi" turns
    // would cost 2 * hi; kept, each carries the earlier turns and replies.
    let chat_total = prompt_tokens_total().await - before;
    assert!(chat_total >= first + probe, "{chat_total}");
    let his = chat_total - first - probe;
    assert!(
        his > 2 * hi + probe,
        "history was not kept: the two \"Hi\" turns cost {his} prompt tokens (fresh: {hi} each)"
    );
    node.stop().await.unwrap();
}

#[test]
fn id_is_created_once_private_and_reused() {
    let home = tempfile::tempdir().unwrap();
    let id = |args: &[&str], env_home: Option<&std::path::Path>| {
        let mut cmd = Command::new(HYPHA);
        cmd.arg("id").args(args).env_remove("HYPHA_HOME");
        if let Some(h) = env_home {
            cmd.env("HYPHA_HOME", h);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let a_dir = home.path().join("a");
    let a = a_dir.to_str().unwrap();
    let first = id(&["--data-dir", a], None);
    assert_eq!(first.len(), 64);
    assert!(first.parse::<hypha_wire::NodeId>().is_ok());
    assert_eq!(
        id(&["--data-dir", a], None),
        first,
        "the key must be reused"
    );
    assert_eq!(
        id(&[], Some(&a_dir)),
        first,
        "HYPHA_HOME names the same directory"
    );
    let key = a_dir.join(hypha_node::identity::KEY_FILE);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let other = id(
        &["--data-dir", home.path().join("b").to_str().unwrap()],
        None,
    );
    assert_ne!(other, first, "two data directories are two nodes");
    std::fs::write(&key, "not a key").unwrap();
    let out = Command::new(HYPHA)
        .args(["id", "--data-dir", a])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a hypha key"));
}

/// `--free-tier-per-minute 0`: a seeder serves only consumers with
/// standing, so a new identity's request is refused with 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_without_a_free_tier_refuses_a_new_identity() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let seeder = common::seeder_proc(dirs.0.path(), 1, &["--free-tier-per-minute", "0"]);
    let peer = seeder.wait_for("peers reach this node as");
    let consumer = common::consumer_proc(dirs.1.path(), &peer);
    let api = consumer.wait_for("API at");
    let model = test_model();
    let model_name = model.file_stem().unwrap().to_str().unwrap();
    let resp = hypha_node::models::http_client()
        .unwrap()
        .post(format!("{api}/chat/completions"))
        .json(&json!({"model": model_name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "free_tier_exhausted", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_serve_a_completion_over_quic() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let model = test_model();
    let seeder = common::seeder_proc(dirs.0.path(), 2, &[]);
    let seeder_api = format!("http://{}", seeder.wait_for("at http://"));
    let peer = seeder.wait_for("peers reach this node as");
    let consumer = common::consumer_proc(dirs.1.path(), &peer);
    let api = consumer.wait_for("API at");
    let model_name = model.file_stem().unwrap().to_str().unwrap();
    let c = hypha_node::models::http_client().unwrap();
    let resp = c
        .post(format!("{api}/chat/completions"))
        .json(&json!({"model": model_name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let served_by = resp.headers()[hypha_node::api::PEER_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(Some(served_by.as_str()), peer.split('@').next());
    let v: Value = resp.json().await.unwrap();
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty(),
        "{v}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 8);
    let credits = v["usage"]["credits"].as_u64().expect("a paid request");

    // Both ledgers hold the receipt: over HTTP ...
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let seeder_view = loop {
        let l: Value = c
            .get(format!("{seeder_api}/ledger"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        // The prompt's receipt is written first; the last one replaces it.
        if l["earned"] == credits || std::time::Instant::now() > deadline {
            break l;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(seeder_view["earned"], credits, "{seeder_view}");
    assert_eq!(seeder_view["receipts"], 1, "{seeder_view}");
    assert_eq!(seeder_view["recent"][0]["role"], "served");
    let consumer_view: Value = c
        .get(format!("{api}/ledger"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(consumer_view["spent"], credits, "{consumer_view}");
    // No identity starts with credits: the consumer owes what it spent.
    assert!(consumer_view.get("grant").is_none(), "{consumer_view}");
    assert_eq!(
        consumer_view["balance"].as_i64().unwrap(),
        -(credits as i64)
    );

    // ... and through `hypha ledger`.
    let ledger = |dir: &std::path::Path, args: &[&str]| {
        let out = Command::new(HYPHA)
            .arg("ledger")
            .args(args)
            .arg("--data-dir")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let balance = ledger(dirs.1.path(), &["balance"]);
    assert!(
        balance.contains(&format!("spent    {credits:>14} (1 requests consumed)")),
        "{balance}"
    );
    let verify = ledger(dirs.0.path(), &["verify"]);
    // The prompt's receipt, then the last one of the request.
    assert!(verify.starts_with("1 requests in 2 receipts"), "{verify}");
    let export = ledger(dirs.0.path(), &["export"]);
    let line: Value = serde_json::from_str(export.trim()).unwrap();
    assert_eq!(line["role"], "served");
    assert_eq!(line["credits"], credits);
    assert_eq!(line["completion_tokens"], 8);
    let receipts = ledger(dirs.1.path(), &["receipts"]);
    assert!(receipts.contains("consumed"), "{receipts}");
}

#[test]
fn demo_streams_a_completion_across_a_local_network() {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(HYPHA);
    cmd.args([
        "demo",
        "--exit",
        "--http",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--parallel",
        "2",
    ])
    .env("HYPHA_HOME", home.path())
    .env("HYPHA_LOG", "warn");
    if let Some(m) = std::env::var_os("HYPHA_TEST_MODEL") {
        cmd.arg("--model").arg(m);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("served by seeder"), "{stdout}");
    assert!(
        stdout.contains("signed by both, in both ledgers"),
        "{stdout}"
    );
    // The receipt bills exactly the tokens usage reports, the end token
    // included (the answer ends with it).
    let usage = stdout
        .lines()
        .find_map(|l| l.strip_prefix("usage: "))
        .and_then(|l| l.split(" completion tokens").next())
        .expect("a usage line");
    let receipt = stdout
        .lines()
        .find(|l| l.starts_with("receipt: "))
        .expect("a receipt line");
    assert!(receipt.contains(usage), "{usage:?} vs {receipt:?}");
    assert!(stdout.contains("completion tokens"), "{stdout}");
    assert!(
        stderr.contains("consumer") && stderr.contains("has no model"),
        "{stderr}"
    );
}
