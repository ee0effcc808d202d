//! Structured output on real nodes (real model, real sockets): random JSON
//! schemas, each answered with JSON that validates against it, from the
//! seeder's own engine and through a consumer to the seeder, streamed and
//! not, on chat completions and the Responses API; schemas with what the
//! grammar would not enforce are refused by name.
//!
//! `HYPHA_SCHEMA_CASES` sets how many random schemas the seeder answers
//! (200 by default); a fifth of as many go through the consumer.

use futures_util::StreamExt;
use serde_json::{json, Map, Value};

mod common;
use common::Net;

/// splitmix64: a seeded generator, so a failing schema can be reproduced.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

const NAMES: [&str; 8] = ["name", "age", "city", "tags", "score", "ok", "id", "items"];
const WORDS: [&str; 6] = ["red", "green", "blue", "yes", "no", "maybe"];

/// A small random schema: every string and array bounded, so that an
/// answer within the grammar always ends.
fn schema(r: &mut Rng, depth: u32) -> Value {
    let leaf = depth >= 2;
    match r.below(if leaf { 7 } else { 9 }) {
        0 => json!({"type": "string", "maxLength": 1 + r.below(10)}),
        1 => {
            let mut s = json!({"type": "integer"});
            if r.below(2) == 0 {
                let lo = r.below(50) as i64 - 10;
                s["minimum"] = json!(lo);
                s["maximum"] = json!(lo + r.below(1000) as i64);
            }
            s
        }
        2 => json!({"type": "number"}),
        3 => json!({"type": "boolean"}),
        4 => {
            let n = 2 + r.below(3) as usize;
            let mut vals: Vec<&str> = WORDS.to_vec();
            vals.truncate(n);
            json!({"enum": vals})
        }
        5 => json!({"anyOf": [{"type": "null"}, {"type": "integer"}]}),
        6 => {
            json!({"type": ["string", "null"], "maxLength": 1 + r.below(6), "description": "text or null"})
        }
        7 => {
            let min = r.below(2);
            json!({
                "type": "array",
                "items": schema(r, depth + 1),
                "minItems": min,
                "maxItems": min + r.below(3),
            })
        }
        _ => {
            let n = 1 + r.below(3) as usize;
            let mut props = Map::new();
            let mut required = Vec::new();
            for _ in 0..n {
                let name = *r.pick(&NAMES);
                if props.contains_key(name) {
                    continue;
                }
                props.insert(name.to_owned(), schema(r, depth + 1));
                if r.below(3) != 0 {
                    required.push(name);
                }
            }
            json!({
                "type": "object",
                "properties": props,
                "required": required,
                "additionalProperties": false,
            })
        }
    }
}

fn has_type(v: &Value, ty: &str) -> bool {
    match ty {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        "string" => v.is_string(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        other => panic!("type {other}"),
    }
}

/// Why `v` does not validate against `s` (the generator's subset of JSON
/// schema), if it does not.
fn invalid(v: &Value, s: &Value) -> Option<String> {
    if let Some(alts) = s.get("anyOf").and_then(Value::as_array) {
        return if alts.iter().any(|a| invalid(v, a).is_none()) {
            None
        } else {
            Some(format!("{v} matches no alternative of {s}"))
        };
    }
    if let Some(vals) = s.get("enum").and_then(Value::as_array) {
        return (!vals.contains(v)).then(|| format!("{v} not in {s}"));
    }
    let types: Vec<&str> = match &s["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().map(|t| t.as_str().unwrap()).collect(),
        _ => panic!("schema without a type: {s}"),
    };
    if !types.iter().any(|t| has_type(v, t)) {
        return Some(format!("{v} is not of type {types:?}"));
    }
    if let (Some(t), Some(max)) = (v.as_str(), s.get("maxLength").and_then(Value::as_u64)) {
        if t.chars().count() as u64 > max {
            return Some(format!("{v} is longer than {max}"));
        }
    }
    if let Some(n) = v.as_i64() {
        if s.get("minimum")
            .and_then(Value::as_i64)
            .is_some_and(|m| n < m)
            || s.get("maximum")
                .and_then(Value::as_i64)
                .is_some_and(|m| n > m)
        {
            return Some(format!("{v} is out of the bounds of {s}"));
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if s["minItems"].as_u64().is_some_and(|m| n < m)
            || s["maxItems"].as_u64().is_some_and(|m| n > m)
        {
            return Some(format!("{v}: {n} items against {s}"));
        }
        return items.iter().find_map(|i| invalid(i, &s["items"]));
    }
    if let Some(obj) = v.as_object() {
        let props = s["properties"].as_object().unwrap();
        for name in s["required"].as_array().unwrap() {
            if !obj.contains_key(name.as_str().unwrap()) {
                return Some(format!("{v} lacks the required {name}"));
            }
        }
        for (k, x) in obj {
            match props.get(k) {
                None => return Some(format!("{v} has the extra property {k}")),
                Some(ps) => {
                    if let Some(why) = invalid(x, ps) {
                        return Some(why);
                    }
                }
            }
        }
    }
    None
}

fn chat_body(schema: &Value, stream: bool) -> Value {
    json!({
        "model": "default",
        "messages": [
            {"role": "system", "content": "You answer in JSON."},
            {"role": "user", "content": format!("Give me an example of JSON for this schema: {schema}")},
        ],
        "temperature": 0.7,
        "seed": 7,
        "max_tokens": 400,
        "stream": stream,
        "response_format": {"type": "json_schema", "json_schema": {"name": "case", "strict": true, "schema": schema}},
    })
}

/// The text and finish reason of a chat completion, whole or streamed.
async fn complete(c: &reqwest::Client, base: &str, body: &Value) -> (String, String) {
    if body["stream"] == true {
        let s = common::stream_chat(c, base, body).await;
        return (s.text, s.finish.unwrap_or_default());
    }
    let resp = c
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    (
        choice["message"]["content"].as_str().unwrap().to_owned(),
        choice["finish_reason"].as_str().unwrap().to_owned(),
    )
}

/// Answers `n` random schemas (seeded by `seed`) at `base`, eight at a
/// time, every fourth streamed; each answer must end and validate.
async fn random_schemas(c: &reqwest::Client, base: &str, seed: u64, n: usize) {
    let mut r = Rng(seed);
    let cases: Vec<(usize, Value)> = (0..n).map(|i| (i, schema(&mut r, 0))).collect();
    let failures: Vec<String> = futures_util::stream::iter(cases)
        .map(|(i, s)| async move {
            let body = chat_body(&s, i % 4 == 3);
            let (text, finish) = complete(c, base, &body).await;
            if finish != "stop" {
                return Some(format!("case {i}: finish {finish}: {s} -> {text}"));
            }
            match serde_json::from_str::<Value>(&text) {
                Err(e) => Some(format!("case {i}: {e}: {s} -> {text}")),
                Ok(v) => invalid(&v, &s).map(|why| format!("case {i}: {why}: {s} -> {text}")),
            }
        })
        .buffer_unordered(8)
        .filter_map(|f| async move { f })
        .collect()
        .await;
    assert!(
        failures.is_empty(),
        "{} of {n} answers at {base} do not validate:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_schemas_get_valid_json_here_and_through_the_network() {
    let n: usize = std::env::var("HYPHA_SCHEMA_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let net = Net::start_config(8, 64, |cfg| {
        if let Some(e) = cfg.engine.as_mut() {
            e.ctx_per_slot = 1024;
        }
        // The consumer has no credits here: its share of the free tier
        // must cover its cases.
        cfg.free_tier_per_minute = 1000;
    })
    .await;
    let c = common::client();
    random_schemas(&c, &net.seeder_base(), 1, n).await;
    random_schemas(&c, &net.consumer_base(), 2, n.div_ceil(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_object_and_the_responses_api_format() {
    let net = Net::start(4, 16).await;
    let c = common::client();
    for base in [net.seeder_base(), net.consumer_base()] {
        // Any object.
        let body = json!({
            "model": "default",
            "messages": [{"role": "user", "content": "Give a cat's name and age as JSON."}],
            "temperature": 0, "max_tokens": 300,
            "response_format": {"type": "json_object"},
        });
        let (text, finish) = complete(&c, &base, &body).await;
        assert_eq!(finish, "stop", "{text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v.is_object(), "{v}");

        // The Responses API's `text.format`, streamed.
        let s = json!({"type": "object", "properties": {"colour": {"enum": ["red", "blue"]},
            "count": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["colour", "count"], "additionalProperties": false});
        let body = json!({
            "model": "default", "input": "Pick a colour and a count.", "temperature": 0,
            "max_output_tokens": 200, "stream": true,
            "text": {"format": {"type": "json_schema", "name": "pick", "schema": s, "strict": true}},
        });
        let resp = c
            .post(format!("{base}/v1/responses"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let sse = resp.text().await.unwrap();
        let last = sse
            .split("\n\n")
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .last()
            .unwrap()
            .to_owned();
        let last: Value = serde_json::from_str(&last).unwrap();
        assert_eq!(last["type"], "response.completed", "{last}");
        let r = &last["response"];
        assert_eq!(r["text"]["format"]["type"], "json_schema", "{r}");
        let text = r["output"][0]["content"][0]["text"].as_str().unwrap();
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(invalid(&v, &s), None, "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_the_grammar_would_not_enforce_are_refused_by_name() {
    let net = Net::start(2, 8).await;
    let c = common::client();
    let cases = [
        (
            json!({"type": "string", "pattern": "^[a-z]+$"}),
            "`pattern`",
        ),
        (json!({"type": "string", "format": "email"}), "format"),
        (
            json!({"type": "object", "properties": {"n": {"type": "number", "maximum": 3}}}),
            "`maximum` at #/properties/n",
        ),
        (json!({"not": {"type": "null"}}), "`not`"),
        (json!({"$ref": "https://example.com/schema.json"}), "`$ref`"),
    ];
    for base in [net.seeder_base(), net.consumer_base()] {
        for (s, naming) in &cases {
            let body = chat_body(s, false);
            let resp = c
                .post(format!("{base}/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap();
            assert_eq!(status, 400, "{s}: {v}");
            assert_eq!(v["error"]["param"], "response_format", "{v}");
            assert_eq!(v["error"]["code"], "unsupported_schema", "{v}");
            let m = v["error"]["message"].as_str().unwrap();
            assert!(m.contains(naming), "{s}: {m}");
        }
        // Formats hypha does not know, and fields beside them.
        for (format, naming) in [
            (
                json!({"type": "grammar", "grammar": "root ::= \"x\""}),
                "grammar",
            ),
            (json!({"type": "json_object", "schema": {}}), "`schema`"),
            (
                json!({"type": "json_schema", "json_schema": {"name": "x"}}),
                "schema",
            ),
        ] {
            let body = json!({
                "model": "default",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
                "response_format": format,
            });
            let resp = c
                .post(format!("{base}/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap();
            assert_eq!(status, 400, "{v}");
            assert_eq!(v["error"]["param"], "response_format", "{v}");
            assert!(
                v["error"]["message"].as_str().unwrap().contains(naming),
                "{v}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_checks_a_peers_schema_itself() {
    use hypha_node::net::proto::{FramedRecv, FramedSend};
    use hypha_wire::{ArchivedMessage, Message, Refusal};
    let net = Net::start(2, 8).await;
    let (_ep, conn) = common::dial_with_hello(&net, 41).await;
    // Each its own request id: a seeder may still hold the last one (it
    // lets it go once its stream is done), and an id it holds is refused
    // as a duplicate.
    for (id, (schema, naming)) in [
        (r#"{"type":"string","pattern":"a+"}"#, "`pattern`"),
        ("not json", "does not parse"),
        (r#"{"type":"integer","maxLength":3000}"#, "`maxLength`"),
    ]
    .into_iter()
    .enumerate()
    {
        let Message::Request(mut req) = common::request(id as u64 + 1, 8) else {
            unreachable!()
        };
        req.json_schema = Some(schema.to_owned());
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut send = FramedSend::new(send);
        send.send(&Message::Request(req)).await.unwrap();
        let mut recv = FramedRecv::new(recv);
        let (refusal, message) = recv
            .next(|m| {
                Ok(match m {
                    ArchivedMessage::Error(e) => {
                        (Refusal::from(&e.refusal), e.message.as_str().to_owned())
                    }
                    other => panic!("{other:?}"),
                })
            })
            .await
            .unwrap()
            .expect("an answer");
        assert_eq!(refusal, Refusal::BadRequest, "{schema}: {message}");
        assert!(message.contains(naming), "{schema}: {message}");
    }
    common::assert_still_serves(&net).await;
}
