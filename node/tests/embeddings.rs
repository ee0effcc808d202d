//! `/v1/embeddings` on a real node (the real model, real sockets): every
//! input shape, unit vectors of the model's width, the same input giving
//! the same vector, base64 as the same floats, token-id inputs; what is
//! not served refused by name, and a node without `--embeddings` or a
//! model served by a peer answered with a clear error.

use serde_json::{json, Value};

mod common;
use common::Net;

async fn post(c: &reqwest::Client, base: &str, body: &Value) -> (u16, Value) {
    let r = c
        .post(format!("{base}/v1/embeddings"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn vector(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("a float array")
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let n = chunk
            .iter()
            .take_while(|&&c| c != b'=')
            .enumerate()
            .fold(0u32, |n, (i, &c)| n | (u32::from(val(c)) << (18 - 6 * i)));
        let bytes = chunk.iter().filter(|&&c| c != b'=').count() - 1;
        out.extend_from_slice(&n.to_be_bytes()[1..=bytes]);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_of_every_input_shape() {
    let net = Net::start_config(2, 8, |cfg| {
        cfg.engine.as_mut().unwrap().embeddings = true;
    })
    .await;
    let c = common::client();
    let base = net.seeder_base();
    let (status, one) = post(
        &c,
        &base,
        &json!({"model": "default", "input": "The cat sat on the mat."}),
    )
    .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["object"], "list");
    let v = vector(&one["data"][0]["embedding"]);
    assert_eq!(v.len(), 576, "SmolLM2-135M's width");
    let norm: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "unit length: {norm}");
    assert!(one["usage"]["prompt_tokens"].as_u64().unwrap() > 3, "{one}");

    // Several inputs, in order; the same text gives the same vector.
    let (status, many) = post(
        &c,
        &base,
        &json!({"model": "default", "input": ["A dog barks.", "The cat sat on the mat."]}),
    )
    .await;
    assert_eq!(status, 200, "{many}");
    let data = many["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["index"], 0);
    assert_eq!(data[1]["index"], 1);
    let again = vector(&data[1]["embedding"]);
    let same = v.iter().zip(&again).all(|(a, b)| (a - b).abs() < 1e-5);
    assert!(same, "the same text, the same vector");
    let other = vector(&data[0]["embedding"]);
    let cos: f64 = v.iter().zip(&other).map(|(a, b)| a * b).sum();
    assert!(cos < 0.9999, "another text, another vector: cosine {cos}");

    // base64: the same floats, little-endian.
    let (status, b64) = post(
        &c,
        &base,
        &json!({"model": "default", "input": "The cat sat on the mat.", "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(status, 200, "{b64}");
    let bytes = base64_decode(b64["data"][0]["embedding"].as_str().unwrap());
    let floats: Vec<f64> = bytes
        .chunks(4)
        .map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap())))
        .collect();
    assert_eq!(floats.len(), 576);
    assert!(floats.iter().zip(&v).all(|(a, b)| (a - b).abs() < 1e-6));

    // Token ids, one list or several; `dimensions` at the model's width.
    for input in [json!([1, 2, 3, 4]), json!([[1, 2, 3, 4], [5, 6]])] {
        let (status, t) = post(
            &c,
            &base,
            &json!({"model": "default", "input": input, "dimensions": 576, "user": "u"}),
        )
        .await;
        assert_eq!(status, 200, "{t}");
        assert_eq!(vector(&t["data"][0]["embedding"]).len(), 576);
    }

    // What is not served, refused by name.
    let cases = [
        (json!({"input": "x", "dimensions": 64}), "dimensions"),
        (json!({"input": ""}), "input"),
        (json!({"input": []}), "input"),
        (json!({"input": [{"text": "x"}]}), "input"),
        (json!({"input": [-1]}), "input"),
        (
            json!({"input": "x", "encoding_format": "int8"}),
            "encoding_format",
        ),
        (json!({"input": "x", "truncate": true}), "truncate"),
    ];
    for (body, param) in cases {
        let mut b = body.clone();
        b["model"] = json!("default");
        let (status, e) = post(&c, &base, &b).await;
        assert_eq!(status, 400, "{body}: {e}");
        if param != "input" || body["input"] != json!([-1]) {
            assert_eq!(e["error"]["param"], param, "{body}: {e}");
        }
    }
    let models = common::get_json(&c, &format!("{base}/v1/models")).await;
    assert!(models["data"][0]["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("embeddings")));

    // Through a consumer: not served yet, said plainly.
    let (status, e) = post(
        &c,
        &net.consumer_base(),
        &json!({"model": "default", "input": "x"}),
    )
    .await;
    assert_eq!(status, 404, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("peers"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_embeddings_says_how_to_get_them() {
    let net = Net::start(1, 4).await;
    let c = common::client();
    let (status, e) = post(
        &c,
        &net.seeder_base(),
        &json!({"model": "default", "input": "x"}),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "model");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--embeddings"));
    let models = common::get_json(&c, &format!("{}/v1/models", net.seeder_base())).await;
    assert!(!models["data"][0]["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("embeddings")));
}
