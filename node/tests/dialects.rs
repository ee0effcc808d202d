//! Anthropic's Messages API (`/v1/messages`) and OpenAI's Responses API
//! (`/v1/responses`) on real nodes (real model, real sockets), from the
//! seeder's own engine and through a consumer to the seeder: the same text
//! as chat completions, their stream event sequences, the stop string that
//! ended a generation named across the network, and fields they do not
//! serve refused by name.

use hypha_node::api::PEER_HEADER;
use serde_json::{json, Value};

mod common;
use common::Net;

/// One SSE event: its name and JSON data.
#[derive(Debug)]
struct SseEvent {
    name: Option<String>,
    data: Value,
}

/// Posts `body` to `path`; the status, the peer that served it and the
/// body: JSON, or the SSE events of a stream.
async fn post(
    c: &reqwest::Client,
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, Option<String>, Result<Value, Vec<SseEvent>>) {
    let mut req = c.post(format!("{base}{path}")).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let peer = resp
        .headers()
        .get(PEER_HEADER)
        .map(|v| v.to_str().unwrap().to_owned());
    let sse = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    if !sse {
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        return (status, peer, Ok(v));
    }
    let mut events = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut name = None;
        let mut data = String::new();
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event:") {
                name = Some(n.trim().to_owned());
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.trim_start());
            }
        }
        let data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"));
        events.push(SseEvent { name, data });
    }
    (status, peer, Err(events))
}

fn whole(r: Result<Value, Vec<SseEvent>>) -> Value {
    r.expect("a JSON body")
}

fn events(r: Result<Value, Vec<SseEvent>>) -> Vec<SseEvent> {
    r.expect_err("an SSE stream")
}

/// Greedy chat completion text of `prompt`, at most `max_tokens`.
async fn chat_text(c: &reqwest::Client, base: &str, prompt: &str, max_tokens: u32) -> String {
    let body = json!({
        "model": "default",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    });
    let (status, _, v) = post(c, base, "/v1/chat/completions", &[], &body).await;
    let v = whole(v);
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

const PROMPT: &str = "Name three colours of the rainbow.";

/// A word of `text` past its start, to stop at.
fn a_stop_in(text: &str) -> String {
    text.split_whitespace()
        .skip(2)
        .find(|w| w.len() >= 3 && text.find(*w).is_some_and(|at| at > 0))
        .unwrap_or_else(|| panic!("no word to stop at in {text:?}"))
        .to_owned()
}

fn messages_body(max_tokens: u32, stop: Option<&str>, stream: bool) -> Value {
    let mut b = json!({
        "model": "default",
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "metadata": {"user_id": "u-1"},
    });
    if let Some(s) = stop {
        b["stop_sequences"] = json!([s]);
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_here_and_through_the_network() {
    let net = Net::start(4, 16).await;
    let c = common::client();
    let seeder_id = net.seeder.id().unwrap().to_string();
    for (base, remote) in [(net.seeder_base(), false), (net.consumer_base(), true)] {
        let want = chat_text(&c, &base, PROMPT, 24).await;
        let key = [("x-api-key", "unused"), ("anthropic-version", "2023-06-01")];

        // Whole: the chat completion's text, cut by max_tokens.
        let (status, peer, v) = post(
            &c,
            &base,
            "/v1/messages",
            &key,
            &messages_body(24, None, false),
        )
        .await;
        let v = whole(v);
        assert_eq!(status, 200, "{v}");
        assert_eq!(peer.is_some(), remote, "{base}");
        if remote {
            assert_eq!(peer.as_deref(), Some(seeder_id.as_str()));
        }
        assert_eq!(v["type"], "message");
        assert_eq!(v["role"], "assistant");
        assert!(v["id"].as_str().unwrap().starts_with("msg_"), "{v}");
        assert_eq!(v["content"][0]["type"], "text");
        assert_eq!(v["content"][0]["text"], want.as_str(), "{base}");
        assert_eq!(v["stop_reason"], "max_tokens");
        assert_eq!(v["stop_sequence"], Value::Null);
        assert_eq!(v["usage"]["output_tokens"], 24);
        assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 5, "{v}");
        assert_eq!(v["usage"]["credits"].is_u64(), remote, "{v}");

        // A stop sequence ends it and is named, across the network too.
        let stop = a_stop_in(&want);
        let before = &want[..want.find(&stop).unwrap()];
        let (status, _, v) = post(
            &c,
            &base,
            "/v1/messages",
            &key,
            &messages_body(24, Some(&stop), false),
        )
        .await;
        let v = whole(v);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["content"][0]["text"], before, "{base} stop {stop:?}");
        assert_eq!(v["stop_reason"], "stop_sequence", "{v}");
        assert_eq!(v["stop_sequence"], stop.as_str(), "{v}");

        // Streamed: Anthropic's event sequence, the same text.
        let (status, _, ev) = post(
            &c,
            &base,
            "/v1/messages",
            &key,
            &messages_body(24, Some(&stop), true),
        )
        .await;
        assert_eq!(status, 200);
        let ev = events(ev);
        for e in &ev {
            assert_eq!(e.name.as_deref(), e.data["type"].as_str(), "{e:?}");
        }
        let names: Vec<&str> = ev.iter().filter_map(|e| e.name.as_deref()).collect();
        let n = names.len();
        assert!(n >= 6, "{names:?}");
        assert_eq!(names[..2], ["message_start", "content_block_start"]);
        assert_eq!(
            names[n - 3..],
            ["content_block_stop", "message_delta", "message_stop"]
        );
        assert!(names[2..n - 3].iter().all(|n| *n == "content_block_delta"));
        let text: String = ev
            .iter()
            .filter(|e| e.data["type"] == "content_block_delta")
            .map(|e| e.data["delta"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, before);
        let delta = &ev[n - 2].data;
        assert_eq!(delta["delta"]["stop_reason"], "stop_sequence");
        assert_eq!(delta["delta"]["stop_sequence"], stop.as_str());
        assert!(delta["usage"]["input_tokens"].as_u64().unwrap() > 5);
        assert!(delta["usage"]["output_tokens"].as_u64().unwrap() >= 1);

        // OpenAI's chat completions still says `stop` for a stop string.
        let body = json!({
            "model": "default",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
            "max_tokens": 24, "temperature": 0, "stop": [stop],
        });
        let (_, _, v) = post(&c, &base, "/v1/chat/completions", &[], &body).await;
        let v = whole(v);
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_refuse_what_they_do_not_serve() {
    let net = Net::start(2, 8).await;
    let c = common::client();
    let base = net.seeder_base();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            "tools",
        ),
        (
            json!({"tools": [{"name": "f", "input_schema": {"type": "object"}, "defer_loading": true}]}),
            "tools",
        ),
        (
            json!({"thinking": {"type": "enabled", "budget_tokens": 1024}}),
            "thinking",
        ),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]}]},
            ]}),
            "messages[2].content",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The"}]}),
            "messages",
        ),
    ];
    for (extra, field) in cases {
        let mut body = messages_body(4, None, false);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, _, v) = post(&c, &base, "/v1/messages", &[], &body).await;
        let v = whole(v);
        assert_eq!(status, 400, "{field}: {v}");
        assert_eq!(v["type"], "error", "Anthropic's error shape: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("`{field}`")),
            "{field}: {message}"
        );
    }
    // A missing max_tokens, an unknown model: errors in the same shape.
    let mut body = messages_body(4, None, false);
    body.as_object_mut().unwrap().remove("max_tokens");
    let (status, _, v) = post(&c, &base, "/v1/messages", &[], &body).await;
    let v = whole(v);
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    let mut body = messages_body(4, None, false);
    body["model"] = json!("no-such-model");
    let (status, _, v) = post(&c, &base, "/v1/messages", &[], &body).await;
    let v = whole(v);
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["type"], "not_found_error");
    // The neutral values are served.
    let mut body = messages_body(4, None, false);
    body["tools"] = json!([]);
    body["tool_choice"] = json!({"type": "auto"});
    body["thinking"] = json!({"type": "disabled"});
    body["service_tier"] = json!("auto");
    let (status, _, v) = post(&c, &base, "/v1/messages", &[], &body).await;
    assert_eq!(status, 200, "{:?}", v);
}

fn responses_body(input: Value, max_output_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "default",
        "instructions": "Be brief.",
        "input": input,
        "max_output_tokens": max_output_tokens,
        "temperature": 0,
        "stream": stream,
        "store": false,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_api_here_and_through_the_network() {
    let net = Net::start(4, 16).await;
    let c = common::client();
    for (base, remote) in [(net.seeder_base(), false), (net.consumer_base(), true)] {
        let want = chat_text(&c, &base, PROMPT, 20).await;
        let input = json!([{"role": "user", "content": [{"type": "input_text", "text": PROMPT}]}]);

        // Whole, cut by the token limit: incomplete, with its reason.
        let (status, peer, v) = post(
            &c,
            &base,
            "/v1/responses",
            &[],
            &responses_body(input.clone(), 20, false),
        )
        .await;
        let v = whole(v);
        assert_eq!(status, 200, "{v}");
        assert_eq!(peer.is_some(), remote);
        assert_eq!(v["object"], "response");
        assert!(v["id"].as_str().unwrap().starts_with("resp_"), "{v}");
        assert_eq!(v["status"], "incomplete", "{v}");
        assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(v["instructions"], "Be brief.");
        assert_eq!(v["max_output_tokens"], 20);
        let item = &v["output"][0];
        assert_eq!(item["type"], "message");
        assert_eq!(item["role"], "assistant");
        assert_eq!(item["content"][0]["type"], "output_text");
        assert_eq!(item["content"][0]["text"], want.as_str(), "{base}");
        assert_eq!(v["usage"]["output_tokens"], 20);
        let u = &v["usage"];
        assert_eq!(
            u["total_tokens"].as_u64(),
            Some(u["input_tokens"].as_u64().unwrap() + 20)
        );

        // A string input is one user message: the same text.
        let (_, _, v) = post(
            &c,
            &base,
            "/v1/responses",
            &[],
            &responses_body(json!(PROMPT), 20, false),
        )
        .await;
        assert_eq!(whole(v)["output"][0]["content"][0]["text"], want.as_str());

        // Streamed: the event sequence, numbered, the same text.
        let (status, _, ev) = post(
            &c,
            &base,
            "/v1/responses",
            &[],
            &responses_body(input.clone(), 20, true),
        )
        .await;
        assert_eq!(status, 200);
        let ev = events(ev);
        for (i, e) in ev.iter().enumerate() {
            assert_eq!(e.name.as_deref(), e.data["type"].as_str(), "{e:?}");
            assert_eq!(e.data["sequence_number"], i, "{e:?}");
        }
        let names: Vec<&str> = ev.iter().filter_map(|e| e.name.as_deref()).collect();
        let n = names.len();
        assert_eq!(
            names[..4],
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added"
            ]
        );
        assert_eq!(
            names[n - 4..],
            [
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.incomplete"
            ]
        );
        assert!(names[4..n - 4]
            .iter()
            .all(|n| *n == "response.output_text.delta"));
        let text: String = ev[4..n - 4]
            .iter()
            .map(|e| e.data["delta"].as_str().unwrap())
            .collect();
        assert_eq!(text, want);
        assert_eq!(ev[n - 4].data["text"], want.as_str());
        let last = &ev[n - 1].data["response"];
        assert_eq!(last["output"][0]["content"][0]["text"], want.as_str());
        assert_eq!(last["usage"]["output_tokens"], 20);
        let created = &ev[0].data["response"];
        assert_eq!(created["id"], last["id"]);
        assert_eq!(created["status"], "in_progress");

        // Room to finish: completed, and an assistant turn handed back
        // (with its id and status, as clients do) is taken.
        let history = json!([
            {"role": "user", "content": "Hi"},
            {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]},
            {"role": "user", "content": "Say OK."},
        ]);
        let (status, _, ev) = post(
            &c,
            &base,
            "/v1/responses",
            &[],
            &responses_body(history, 200, true),
        )
        .await;
        assert_eq!(status, 200);
        let ev = events(ev);
        let last = ev.last().unwrap();
        assert_eq!(last.data["type"], "response.completed", "{last:?}");
        assert_eq!(last.data["response"]["status"], "completed");
        assert_eq!(last.data["response"]["incomplete_details"], Value::Null);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_api_refuses_what_it_does_not_serve() {
    let net = Net::start(2, 8).await;
    let c = common::client();
    let base = net.seeder_base();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (json!({"store": true}), "store"),
        (json!({"tools": [{"type": "web_search"}]}), "tools"),
        (json!({"max_tool_calls": 2}), "max_tool_calls"),
        (json!({"text": {"verbosity": "low"}}), "text"),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (json!({"reasoning": {"effort": "high"}}), "reasoning"),
        (json!({"frobnicate": 1}), "frobnicate"),
        (
            json!({"input": [{"type": "custom_tool_call_output", "call_id": "c", "output": "x"}]}),
            "input[0]",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
            "input[0].content",
        ),
    ];
    for (extra, field) in cases {
        let mut body = responses_body(json!("Hi"), 4, false);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, _, v) = post(&c, &base, "/v1/responses", &[], &body).await;
        let v = whole(v);
        assert_eq!(status, 400, "{field}: {v}");
        assert_eq!(v["error"]["param"], field, "{v}");
        assert_eq!(v["error"]["code"], "unsupported_parameter", "{v}");
    }
    // Neutral values are served.
    let mut body = responses_body(json!("Hi"), 4, false);
    body["tools"] = json!([]);
    body["tool_choice"] = json!("auto");
    body["text"] = json!({"format": {"type": "text"}});
    body["reasoning"] = json!({"effort": null});
    body["metadata"] = json!({"k": "v"});
    body["parallel_tool_calls"] = json!(true);
    let (status, _, v) = post(&c, &base, "/v1/responses", &[], &body).await;
    assert_eq!(status, 200, "{:?}", v);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_carry_context_length_and_capabilities() {
    let net = Net::start(2, 8).await;
    let c = common::client();
    // A request makes the consumer find the seeder.
    let _ = chat_text(&c, &net.consumer_base(), "Hi", 2).await;
    for base in [net.seeder_base(), net.consumer_base()] {
        let v = common::get_json(&c, &format!("{base}/v1/models")).await;
        let m = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["provider_count"].as_u64() > Some(0) && m["id"] != Value::Null)
            .unwrap_or_else(|| panic!("{v}"))
            .clone();
        assert_eq!(m["context_length"], 512, "{base}: {m}");
        assert_eq!(
            m["capabilities"],
            json!(["chat", "completion", "structured_output", "tools"]),
            "{m}"
        );
    }
}
