//! Logprobs on real nodes (real model, real sockets), from the seeder's own
//! engine and through a consumer to the seeder: chat's `logprobs` with
//! `top_logprobs` and text completions' `logprobs: N`, whole and streamed,
//! one entry per generated token, the same figures both ways.

use serde_json::{json, Value};

mod common;
use common::Net;

async fn post(c: &reqwest::Client, base: &str, path: &str, body: &Value) -> (u16, Value) {
    let resp = c
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// The data of every event of a stream, to `[DONE]`.
async fn stream(c: &reqwest::Client, base: &str, path: &str, body: &Value) -> Vec<Value> {
    let resp = c
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .take_while(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn bytes_of(entry: &Value) -> Vec<u8> {
    entry["bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap() as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_text_logprobs_here_and_through_the_network() {
    let net = Net::start(4, 16).await;
    let c = common::client();
    let chat = json!({
        "model": "default",
        "messages": [{"role": "user", "content": "Name three colours of the rainbow."}],
        "max_tokens": 12, "temperature": 0, "logprobs": true, "top_logprobs": 3,
    });
    let mut seen = Vec::new();
    for base in [net.seeder_base(), net.consumer_base()] {
        let (status, v) = post(&c, &base, "/v1/chat/completions", &chat).await;
        assert_eq!(status, 200, "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        let entries = v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(entries.len(), 12, "one entry per token: {v}");
        let joined: Vec<u8> = entries.iter().flat_map(bytes_of).collect();
        assert_eq!(joined, text.as_bytes(), "the tokens spell the text");
        for e in &entries {
            let lp = e["logprob"].as_f64().unwrap();
            assert!(lp <= 0.0, "{e}");
            let top = e["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 3, "{e}");
            // Greedy takes the likeliest token.
            assert_eq!(top[0]["logprob"], e["logprob"], "{e}");
            assert_eq!(top[0]["token"], e["token"], "{e}");
            assert!(top
                .windows(2)
                .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()));
        }
        // Streamed: the same entries, chunk by chunk.
        let mut body = chat.clone();
        body["stream"] = json!(true);
        let streamed: Vec<Value> = stream(&c, &base, "/v1/chat/completions", &body)
            .await
            .iter()
            .filter_map(|e| e["choices"][0]["logprobs"]["content"].as_array().cloned())
            .flatten()
            .collect();
        assert_eq!(streamed, entries, "{base}");
        seen.push(entries);

        // Not asked: none.
        let mut plain = chat.clone();
        plain.as_object_mut().unwrap().remove("logprobs");
        plain.as_object_mut().unwrap().remove("top_logprobs");
        let (_, v) = post(&c, &base, "/v1/chat/completions", &plain).await;
        assert_eq!(v["choices"][0]["logprobs"], Value::Null, "{v}");

        // Text completions: parallel lists, offsets into the text.
        let body = json!({"model": "default", "prompt": "The capital of France is",
            "max_tokens": 8, "temperature": 0, "logprobs": 2});
        let (status, v) = post(&c, &base, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        let lp = &v["choices"][0]["logprobs"];
        let tokens = lp["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), 8, "{v}");
        assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 8);
        let tops = lp["top_logprobs"].as_array().unwrap();
        assert!(tops
            .iter()
            .all(|t| (1..=2).contains(&t.as_object().unwrap().len())));
        let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(joined, v["choices"][0]["text"].as_str().unwrap());
        let offsets: Vec<u64> = lp["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_u64().unwrap())
            .collect();
        assert_eq!(offsets[0], 0);
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
        let mut body = body.clone();
        body["stream"] = json!(true);
        let streamed: Vec<Value> = stream(&c, &base, "/v1/completions", &body)
            .await
            .iter()
            .filter_map(|e| e["choices"][0]["logprobs"]["tokens"].as_array().cloned())
            .flatten()
            .collect();
        assert_eq!(&streamed, tokens, "{base}");
    }
    assert_eq!(
        seen[0], seen[1],
        "the seeder's figures reach the consumer's client"
    );

    // Out of range: refused.
    for (extra, naming) in [
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"top_logprobs": 2}), "logprobs: true"),
        (json!({"logprobs": "yes"}), "logprobs"),
    ] {
        let mut body = chat.clone();
        body.as_object_mut().unwrap().remove("logprobs");
        body.as_object_mut().unwrap().remove("top_logprobs");
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        for base in [net.seeder_base(), net.consumer_base()] {
            let (status, v) = post(&c, &base, "/v1/chat/completions", &body).await;
            assert_eq!(status, 400, "{extra}: {v}");
            assert!(
                v["error"]["message"].as_str().unwrap().contains(naming),
                "{v}"
            );
        }
    }
}
