//! The HTTP API of a real node (real model, real sockets): bad input gets
//! OpenAI-style errors and the node keeps serving; a client that leaves
//! mid-stream frees its slot; metrics and health report what happened.

use std::time::Duration;

use futures_util::StreamExt;
use hypha_engine::EngineConfig;
use hypha_node::{Node, NodeConfig};

mod common;
use common::{metrics, test_model, wait_health};
use serde_json::{json, Value};

async fn node(parallel: u32, queue: usize, api_key: Option<&str>) -> Node {
    let mut engine = EngineConfig::new(test_model());
    engine.parallel = parallel;
    engine.ctx_per_slot = 512;
    engine.threads = 1;
    engine.queue_max = queue;
    let mut cfg = NodeConfig::new(Some(engine));
    cfg.api_key = api_key.map(str::to_owned);
    cfg.model_aliases = vec!["default".into()];
    Node::start(cfg).await.expect("node starts")
}

fn client() -> reqwest::Client {
    hypha_node::models::http_client().unwrap()
}

fn chat_body(content: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "default",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
}

async fn post(c: &reqwest::Client, n: &Node, path: &str, body: reqwest::Body) -> (u16, Value) {
    let resp = c
        .post(format!("http://{}{path}", n.http_addr()))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.expect("a JSON body");
    (status, v)
}

async fn assert_serves(c: &reqwest::Client, n: &Node) {
    let (status, v) = post(
        c,
        n,
        "/v1/chat/completions",
        chat_body("Hi", 4, false).to_string().into(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
}

fn assert_error(status: u16, v: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v["error"]["type"].is_string(), "{v}");
    assert_eq!(v["error"]["code"], want_code, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_json_errors_and_the_node_keeps_serving() {
    let n = node(2, 4, None).await;
    let c = client();
    let (s, v) = post(&c, &n, "/v1/chat/completions", "{not json".into()).await;
    assert_error(s, &v, 400, "invalid_json");
    let (s, v) = post(
        &c,
        &n,
        "/v1/chat/completions",
        r#"{"model":"default","messages":"hello"}"#.into(),
    )
    .await;
    assert_error(s, &v, 400, "invalid_json");
    let (s, v) = post(
        &c,
        &n,
        "/v1/chat/completions",
        r#"{"model":"default","messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#
            .into(),
    )
    .await;
    assert_error(s, &v, 400, "invalid_json");
    let (s, v) = post(
        &c,
        &n,
        "/v1/chat/completions",
        r#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#.into(),
    )
    .await;
    assert_error(s, &v, 404, "model_not_found");
    let (s, v) = post(
        &c,
        &n,
        "/v1/chat/completions",
        r#"{"model":"default","messages":[]}"#.into(),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(
        &c,
        &n,
        "/v1/chat/completions",
        r#"{"model":"default","messages":[{"role":"wizard","content":"x"}]}"#.into(),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(
        &c,
        &n,
        "/v1/chat/completions",
        r#"{"model":"default","messages":[{"role":"user","content":"x"}],"temperature":7}"#.into(),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(
        &c,
        &n,
        "/v1/completions",
        r#"{"model":"default","prompt":"x","n":3}"#.into(),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let long = "word ".repeat(1000);
    let (s, v) = post(
        &c,
        &n,
        "/v1/chat/completions",
        chat_body(&long, 4, false).to_string().into(),
    )
    .await;
    assert_error(s, &v, 400, "context_length_exceeded");
    let huge = json!({"model": "default", "prompt": "a".repeat(5 * 1024 * 1024)}).to_string();
    // The server answers 413 without reading the rest of the body and then
    // closes that connection; a separate client keeps it out of `c`'s pool.
    let once = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let (s, v) = post(&once, &n, "/v1/completions", huge.into()).await;
    assert_error(s, &v, 413, "request_too_large");
    let resp = c
        .get(format!("http://{}/v1/nothing", n.http_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert_serves(&c, &n).await;
    n.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_gets_503_with_retry_after() {
    let n = node(1, 1, None).await;
    let c = client();
    let url = format!("http://{}/v1/chat/completions", n.http_addr());
    // One stream holds the only slot, a second waits in the queue.
    let base = format!("http://{}", n.http_addr());
    let running = c
        .post(&url)
        .json(&chat_body("Count to a thousand.", 200, true))
        .send()
        .await
        .unwrap()
        .bytes_stream();
    wait_health(&c, &base, "slots_busy", 1).await;
    let waiting = tokio::spawn({
        let c = c.clone();
        let url = url.clone();
        async move {
            c.post(&url)
                .json(&chat_body("Hi", 2, false))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    wait_health(&c, &base, "queue_depth", 1).await;
    let resp = c
        .post(&url)
        .json(&chat_body("Hi", 2, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "queue_full");
    drop(running);
    assert_eq!(waiting.await.unwrap(), 200);
    assert_serves(&c, &n).await;
    n.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_when_set() {
    let n = node(1, 4, Some("s3cret")).await;
    let c = client();
    let url = format!("http://{}/v1/chat/completions", n.http_addr());
    let r = c
        .post(&url)
        .json(&chat_body("Hi", 2, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = c
        .post(&url)
        .bearer_auth("wrong")
        .json(&chat_body("Hi", 2, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let r = c
        .post(&url)
        .bearer_auth("s3cret")
        .json(&chat_body("Hi", 2, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Anthropic's clients send the key as x-api-key.
    let messages = format!("http://{}/v1/messages", n.http_addr());
    let body = json!({"model": "default", "max_tokens": 2,
        "messages": [{"role": "user", "content": "Hi"}]});
    for (key, want) in [("wrong", 401), ("s3cret", 200)] {
        let r = c
            .post(&messages)
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "x-api-key {key}");
    }
    let r = c
        .get(format!("http://{}/v1/models", n.http_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    n.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_stream_frees_the_slot() {
    let n = node(1, 4, None).await;
    let c = client();
    let url = format!("http://{}/v1/chat/completions", n.http_addr());
    let base = format!("http://{}", n.http_addr());
    let resp = c
        .post(&url)
        .json(&chat_body(
            "Write a very long essay about the sea.",
            500,
            true,
        ))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut seen = 0;
    while seen < 5 {
        let chunk = body.next().await.unwrap().unwrap();
        seen += String::from_utf8_lossy(&chunk).matches("data:").count();
    }
    wait_health(&c, &base, "slots_busy", 1).await;
    drop(body);
    wait_health(&c, &base, "slots_busy", 0).await;
    let m = metrics(&c, &format!("http://{}", n.http_addr())).await;
    assert!(m.contains("hypha_requests_cancelled_total 1"), "{m}");
    // The same for a non-streaming request whose client gives up.
    let slow = c
        .post(&url)
        .timeout(Duration::from_millis(300))
        .json(&chat_body(
            "Write a very long essay about the sea.",
            500,
            false,
        ))
        .send()
        .await;
    assert!(slow.is_err(), "request should have timed out");
    wait_health(&c, &base, "slots_busy", 0).await;
    assert_serves(&c, &n).await;
    n.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_holds_its_permit_until_the_client_leaves() {
    let mut engine = EngineConfig::new(test_model());
    engine.parallel = 2;
    engine.ctx_per_slot = 512;
    engine.threads = 1;
    let mut cfg = NodeConfig::new(Some(engine));
    cfg.model_aliases = vec!["default".into()];
    cfg.max_http_streams = 1;
    let n = Node::start(cfg).await.expect("node starts");
    let c = client();
    let url = format!("http://{}/v1/chat/completions", n.http_addr());
    let resp = c
        .post(&url)
        .json(&chat_body(
            "Write a very long essay about the sea.",
            500,
            true,
        ))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut seen = 0;
    while seen < 3 {
        let chunk = body.next().await.unwrap().unwrap();
        seen += String::from_utf8_lossy(&chunk).matches("data:").count();
    }
    // A free slot, but no free stream permit: refused at once.
    let (status, v) = post(
        &c,
        &n,
        "/v1/chat/completions",
        chat_body("Hi", 4, false).to_string().into(),
    )
    .await;
    assert_error(status, &v, 503, "too_many_streams");
    drop(body);
    // The stream's end gives its permit back.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, v) = post(
            &c,
            &n,
            "/v1/chat/completions",
            chat_body("Hi", 4, false).to_string().into(),
        )
        .await;
        if status == 200 {
            break;
        }
        assert_error(status, &v, 503, "too_many_streams");
        assert!(
            std::time::Instant::now() < deadline,
            "the permit never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    n.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_tokens_and_latency() {
    let n = node(2, 4, None).await;
    let c = client();
    assert_serves(&c, &n).await;
    let (s, _) = post(&c, &n, "/v1/chat/completions", "{".into()).await;
    assert_eq!(s, 400);
    let m = metrics(&c, &format!("http://{}", n.http_addr())).await;
    for needle in [
        "hypha_requests_total{endpoint=\"chat_completions\",status=\"200\"} 1",
        "hypha_requests_total{endpoint=\"chat_completions\",status=\"400\"} 1",
        "hypha_completion_tokens_total 4",
        "hypha_time_to_first_token_seconds_count 1",
        "hypha_inter_token_seconds_count 3",
        "hypha_slots_total 2",
        "hypha_queue_depth 0",
    ] {
        assert!(m.contains(needle), "missing {needle:?} in\n{m}");
    }
    n.stop().await.unwrap();
}

/// A field the node does not honour is refused with a 400 that names it,
/// never served as if it were not there; fields that change nothing, and
/// the neutral values of unsupported ones, are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_the_node_does_not_honour_are_refused_by_name() {
    let n = node(1, 4, None).await;
    let c = client();
    let with = |extra: Value| {
        let mut body = chat_body("Say hi.", 2, false);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body.to_string()
    };
    let refused = [
        ("functions", json!({"functions": [{"name": "get_weather"}]})),
        ("function_call", json!({"function_call": "auto"})),
        ("logit_bias", json!({"logit_bias": {"50256": -100}})),
        ("store", json!({"store": true})),
        ("frobnicate", json!({"frobnicate": 1})),
        ("n", json!({"n": 2})),
    ];
    for (field, extra) in refused {
        let (s, v) = post(&c, &n, "/v1/chat/completions", with(extra).into()).await;
        assert_error(s, &v, 400, "unsupported_parameter");
        assert_eq!(v["error"]["param"], field, "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("`{field}`")), "{message}");
    }
    // A call demanded with no tools to call: refused, naming it.
    let (s, v) = post(
        &c,
        &n,
        "/v1/chat/completions",
        with(json!({"tool_choice": "required"})).into(),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], "tool_choice", "{v}");
    // A message field it would drop: refused too.
    let body = json!({"model": "default", "max_tokens": 2, "messages": [
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": "", "audio": {"id": "a1"}},
    ]});
    let (s, v) = post(&c, &n, "/v1/chat/completions", body.to_string().into()).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("`audio`"),
        "{v}"
    );
    // And on text completions.
    let body = json!({"model": "default", "prompt": "Once", "max_tokens": 2, "suffix": " end"});
    let (s, v) = post(&c, &n, "/v1/completions", body.to_string().into()).await;
    assert_error(s, &v, 400, "unsupported_parameter");
    assert_eq!(v["error"]["param"], "suffix", "{v}");

    // Served: informational fields, neutral values, an assistant message
    // as the SDKs send it back.
    let neutral = json!({
        "user": "u-1", "metadata": {"run": "7"}, "tools": [], "tool_choice": "none",
        "parallel_tool_calls": false, "response_format": {"type": "text"},
        "logit_bias": {}, "store": false, "top_logprobs": 0,
    });
    let (s, v) = post(&c, &n, "/v1/chat/completions", with(neutral).into()).await;
    assert_eq!(s, 200, "{v}");
    let body = json!({"model": "default", "max_tokens": 2, "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "refusal": null, "tool_calls": []},
        {"role": "user", "content": "Again"},
    ]});
    let (s, v) = post(&c, &n, "/v1/chat/completions", body.to_string().into()).await;
    assert_eq!(s, 200, "{v}");
    n.stop().await.unwrap();
}
