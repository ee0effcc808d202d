//! The HTTP edge against a hostile web page, DNS rebinding and a flood of
//! connections, over real sockets: a text/plain "simple" POST, a foreign
//! `Origin`, a `Host` that is not the node's, CORS for an allowed origin,
//! an API key checked before the body is read, the connection cap, clients
//! that trickle a head or a body or idle on a kept-alive connection, and
//! the cap on completions in flight.

use std::time::{Duration, Instant};

use hypha_node::api::conns::HttpTimeouts;
use hypha_node::{Node, NodeConfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A node without a model or peers: every request that passes the edge
/// ends in `model_not_found`, so a 404 proves it passed.
async fn node(api_key: Option<&str>, cors: &[&str]) -> Node {
    node_with(
        api_key,
        cors,
        hypha_node::api::conns::DEFAULT_MAX_HTTP_CONNECTIONS,
    )
    .await
}

async fn node_with(api_key: Option<&str>, cors: &[&str], max_connections: usize) -> Node {
    let mut cfg = NodeConfig::new(None);
    cfg.max_http_connections = max_connections;
    cfg.api_key = api_key.map(str::to_owned);
    cfg.cors_origins = cors.iter().map(|s| s.to_string()).collect();
    Node::start(cfg).await.expect("node starts")
}

/// Sends `head` (request line and headers, without the blank line) and
/// `body` on a fresh connection; the status, the headers and the body.
async fn raw(n: &Node, head: &str, body: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(n.http_addr()).await.unwrap();
    let req = format!("{head}\r\nConnection: close\r\n\r\n{body}");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the node answers")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, headers.to_ascii_lowercase(), body.to_owned())
}

fn code(body: &str) -> String {
    // A chunked body: the JSON sits between the chunk sizes.
    let start = body.find('{').unwrap_or(0);
    let end = body.rfind('}').map_or(body.len(), |e| e + 1);
    let v: Value = serde_json::from_str(&body[start..end]).unwrap_or(Value::Null);
    v["error"]["code"].as_str().unwrap_or_default().to_owned()
}

fn post(n: &Node, extra: &str, content_type: &str, body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}{extra}",
        n.http_addr(),
        body.len()
    )
}

const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_and_rebound_names_cannot_use_the_api() {
    let n = node(None, &[]).await;
    let own = format!("http://{}", n.http_addr());

    // The node's own clients pass (and find no such model here).
    let (status, _, body) = raw(&n, &post(&n, "", "application/json", CHAT), CHAT).await;
    assert_eq!(
        (status, code(&body).as_str()),
        (404, "model_not_found"),
        "{body}"
    );
    let same = format!("\r\nOrigin: {own}");
    let (status, _, body) = raw(
        &n,
        &post(&n, &same, "application/json; charset=utf-8", CHAT),
        CHAT,
    )
    .await;
    assert_eq!(
        status, 404,
        "a page the node serves itself is same-origin: {body}"
    );

    // A simple cross-site POST: text/plain needs no preflight.
    let (status, _, body) = raw(&n, &post(&n, "", "text/plain", CHAT), CHAT).await;
    assert_eq!(
        (status, code(&body).as_str()),
        (415, "unsupported_content_type"),
        "{body}"
    );

    // A foreign page, even with a JSON body.
    let evil = "\r\nOrigin: http://evil.example";
    let (status, headers, body) = raw(&n, &post(&n, evil, "application/json", CHAT), CHAT).await;
    assert_eq!(
        (status, code(&body).as_str()),
        (403, "origin_not_allowed"),
        "{body}"
    );
    assert!(
        !headers.contains("access-control-allow-origin"),
        "{headers}"
    );
    let (status, _, _) = raw(
        &n,
        "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\nAccess-Control-Request-Method: POST",
        "",
    )
    .await;
    assert_eq!(status, 403, "no preflight for a foreign origin");

    // DNS rebinding: a page's own name resolved to 127.0.0.1.
    for path in ["/v1/ledger", "/v1/network", "/v1/models"] {
        let (status, _, body) = raw(
            &n,
            &format!("GET {path} HTTP/1.1\r\nHost: evil.example:8420"),
            "",
        )
        .await;
        assert_eq!(
            (status, code(&body).as_str()),
            (403, "host_not_allowed"),
            "{path}: {body}"
        );
    }
    let (status, _, _) = raw(&n, "GET /v1/models HTTP/1.1\r\nHost: localhost:8420", "").await;
    assert_eq!(status, 200);
    n.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_origin_gets_cors_answers() {
    let n = node(None, &["http://app.example"]).await;
    let (status, headers, _) = raw(
        &n,
        &format!(
            "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nOrigin: http://app.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type",
            n.http_addr()
        ),
        "",
    )
    .await;
    assert_eq!(status, 204, "{headers}");
    assert!(
        headers.contains("access-control-allow-origin: http://app.example"),
        "{headers}"
    );
    assert!(
        headers.contains("access-control-allow-headers: authorization, content-type"),
        "{headers}"
    );
    assert!(
        headers.contains("access-control-allow-methods:"),
        "{headers}"
    );
    let origin = "\r\nOrigin: http://app.example";
    let (status, headers, body) = raw(&n, &post(&n, origin, "application/json", CHAT), CHAT).await;
    assert_eq!(status, 404, "served (no such model here): {body}");
    assert!(
        headers.contains("access-control-allow-origin: http://app.example"),
        "{headers}"
    );
    let other = "\r\nOrigin: http://other.example";
    let (status, _, _) = raw(&n, &post(&n, other, "application/json", CHAT), CHAT).await;
    assert_eq!(status, 403);
    n.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_is_checked_before_the_body_is_read_and_guards_every_route() {
    let n = node(Some("s3cret"), &[]).await;
    // Headers announcing a 4 MiB body that never comes: the answer must
    // not wait for it.
    let mut s = tokio::net::TcpStream::connect(n.http_addr()).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        n.http_addr(),
        4 * 1024 * 1024
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let got = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("refused without waiting for the body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..got]).into_owned();
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.contains("invalid_api_key"), "{text}");
    eprintln!("refused in {:?} with the body unsent", started.elapsed());
    // With the key it passes the edge.
    let auth = "\r\nAuthorization: Bearer s3cret";
    let (status, _, body) = raw(&n, &post(&n, auth, "application/json", CHAT), CHAT).await;
    assert_eq!(status, 404, "{body}");
    // With a key set, health and metrics need it too ...
    for path in ["/health", "/metrics"] {
        let (status, _, _) = raw(&n, &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1"), "").await;
        assert_eq!(status, 401, "{path}");
        let with_key = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1{auth}");
        let (status, _, _) = raw(&n, &with_key, "").await;
        assert_eq!(status, 200, "{path}");
    }
    n.stop().await.unwrap();
    // ... unless health is opened for probes; metrics stay closed.
    let mut cfg = NodeConfig::new(None);
    cfg.api_key = Some("s3cret".into());
    cfg.public_health = true;
    let n = Node::start(cfg).await.unwrap();
    let (status, _, _) = raw(&n, "GET /health HTTP/1.1\r\nHost: 127.0.0.1", "").await;
    assert_eq!(status, 200);
    let (status, _, _) = raw(&n, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1", "").await;
    assert_eq!(status, 401);
    n.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused_and_the_rest_served() {
    const CAP: usize = 4;
    let n = node_with(None, &[], CAP).await;
    // Idle clients take every permit: connected, never sending a byte.
    let mut idle = Vec::new();
    for _ in 0..CAP {
        idle.push(tokio::net::TcpStream::connect(n.http_addr()).await.unwrap());
    }
    // Let the node accept them all before the next one knocks.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = tokio::net::TcpStream::connect(n.http_addr()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut out))
        .await
        .expect("refused at once")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("too_many_connections"), "{text}");
    // A connection within the cap is still served.
    let s = &mut idle[0];
    s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    // Once the idle ones leave, new clients get in again.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, body) = raw(&n, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1", "").await;
        if status == 200 {
            assert!(
                body.contains("hypha_http_connections_refused_total 1"),
                "{body}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never served again: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    n.stop().await.unwrap();
}

/// Reads until the node closes the connection (or `limit` passes: a
/// failure); what it sent and how long the close took.
async fn until_closed(s: &mut tokio::net::TcpStream, limit: Duration) -> (String, Duration) {
    let t = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut out))
        .await
        .expect("the node closes the connection")
        .ok();
    (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_slow_bodies_and_idle_connections_are_cut_off() {
    let mut cfg = NodeConfig::new(None);
    cfg.http_timeouts = HttpTimeouts {
        header: Duration::from_millis(800),
        body: Duration::from_millis(800),
    };
    let n = Node::start(cfg).await.expect("node starts");

    // A head trickled a byte at a time is cut off at the header deadline,
    // however steadily the bytes come.
    let mut s = tokio::net::TcpStream::connect(n.http_addr()).await.unwrap();
    let head = post(&n, "", "application/json", CHAT);
    let t = Instant::now();
    let mut cut = false;
    for b in head.bytes() {
        if s.write_all(&[b]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if t.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let (_, waited) = until_closed(&mut s, Duration::from_secs(5)).await;
    let total = t.elapsed();
    assert!(
        cut || total < Duration::from_secs(3),
        "a trickled head held its connection for {total:?} ({waited:?} after the last byte)"
    );

    // A body that stops half-way gets a 408 at the body deadline.
    let mut s = tokio::net::TcpStream::connect(n.http_addr()).await.unwrap();
    let req = format!(
        "{}\r\n\r\n{}",
        post(&n, "", "application/json", CHAT),
        &CHAT[..10]
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let (text, waited) = until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(code(text.split_once("\r\n\r\n").unwrap().1), "body_timeout");
    assert!(waited < Duration::from_secs(3), "{waited:?}");

    // A kept-alive connection is closed once idle for the header deadline.
    let mut s = tokio::net::TcpStream::connect(n.http_addr()).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let (text, waited) = until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(3),
        "an idle kept-alive connection closed after {waited:?}"
    );
    n.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_beyond_the_stream_cap_are_refused_and_the_rest_served() {
    let mut cfg = NodeConfig::new(None);
    cfg.max_http_streams = 1;
    let n = Node::start(cfg).await.expect("node starts");
    // A completion whose body is still arriving holds the one permit.
    let mut first = tokio::net::TcpStream::connect(n.http_addr()).await.unwrap();
    let head = format!(
        "{}\r\nConnection: close\r\n\r\n",
        post(&n, "", "application/json", CHAT)
    );
    first.write_all(head.as_bytes()).await.unwrap();
    first.write_all(&CHAT.as_bytes()[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, headers, body) = raw(&n, &post(&n, "", "application/json", CHAT), CHAT).await;
    assert_eq!(
        (status, code(&body).as_str()),
        (503, "too_many_streams"),
        "{body}"
    );
    assert!(headers.contains("retry-after: 1"), "{headers}");
    // Reads are not completions: they still pass.
    let (status, _, _) = raw(&n, "GET /health HTTP/1.1\r\nHost: 127.0.0.1", "").await;
    assert_eq!(status, 200);
    // The first one ends (no such model here) and frees its permit.
    first.write_all(&CHAT.as_bytes()[10..]).await.unwrap();
    let (text, _) = until_closed(&mut first, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    let (status, _, body) = raw(&n, &post(&n, "", "application/json", CHAT), CHAT).await;
    assert_eq!(
        (status, code(&body).as_str()),
        (404, "model_not_found"),
        "{body}"
    );
    let (_, _, m) = raw(&n, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1", "").await;
    assert!(m.contains("hypha_http_streams_refused_total 1"), "{m}");
    n.stop().await.unwrap();
}
