//! `hypha chat`: a terminal chat against any OpenAI-compatible URL.
//!
//! Reads lines from standard input, streams each reply as it is generated,
//! and keeps the conversation. Commands: `/model [NAME]` shows or switches
//! the model, `/clear` forgets the conversation, `/quit` leaves.

use std::io::Write;

use anyhow::{bail, Context as _};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

use hypha_bench::sse::SseReader;

pub struct ChatOptions {
    pub url: String,
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub system: Option<String>,
}

/// Runs the chat loop until `/quit` or the end of input.
pub async fn run(opts: ChatOptions) -> anyhow::Result<()> {
    let client = crate::models::http_client()?;
    let base = opts
        .url
        .trim_end_matches('/')
        .trim_end_matches("/v1")
        .to_owned();
    let models = list_models(&client, &base, opts.api_key.as_deref()).await?;
    let mut model = match opts.model.clone() {
        Some(m) => m,
        None => models
            .first()
            .cloned()
            .context("the server lists no models")?,
    };
    let mut history: Vec<Value> = Vec::new();
    let system = opts.system.clone();
    let reset = |history: &mut Vec<Value>| {
        history.clear();
        if let Some(s) = &system {
            history.push(json!({"role": "system", "content": s}));
        }
    };
    reset(&mut history);
    let mut out = std::io::stdout();
    writeln!(out, "hypha chat: {model} at {base} (/model, /clear, /quit)")?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let Some(line) = lines.next_line().await? else {
            writeln!(out)?;
            return Ok(());
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let mut parts = cmd.splitn(2, ' ');
            match (parts.next().unwrap_or(""), parts.next().map(str::trim)) {
                ("quit" | "exit" | "q", _) => return Ok(()),
                ("clear", _) => {
                    reset(&mut history);
                    writeln!(out, "(conversation cleared)")?;
                }
                ("model", None | Some("")) => {
                    let models = list_models(&client, &base, opts.api_key.as_deref()).await?;
                    writeln!(out, "current model: {model}")?;
                    for m in models {
                        writeln!(out, "  {m}")?;
                    }
                }
                ("model", Some(name)) => {
                    model = name.to_owned();
                    writeln!(out, "(model set to {model})")?;
                }
                (other, _) => writeln!(out, "unknown command /{other} (/model, /clear, /quit)")?,
            }
            continue;
        }
        history.push(json!({"role": "user", "content": line}));
        match stream_reply(&client, &base, &opts, &model, &history).await {
            Ok(reply) => {
                writeln!(out)?;
                history.push(json!({"role": "assistant", "content": reply}));
            }
            Err(e) => {
                history.pop();
                writeln!(out, "\nerror: {e:#}")?;
            }
        }
    }
}

async fn list_models(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let mut req = client.get(format!("{base}/v1/models"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    let status = resp.status();
    let body: Value = resp.json().await.context("bad /v1/models response")?;
    if !status.is_success() {
        bail!("{}", error_message(&body, status));
    }
    Ok(body["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

fn error_message(body: &Value, status: reqwest::StatusCode) -> String {
    body["error"]["message"]
        .as_str()
        .map_or_else(|| format!("server answered {status}"), str::to_owned)
}

async fn stream_reply(
    client: &reqwest::Client,
    base: &str,
    opts: &ChatOptions,
    model: &str,
    history: &[Value],
) -> anyhow::Result<String> {
    let mut body = json!({"model": model, "messages": history, "stream": true});
    if let Some(m) = opts.max_tokens {
        body["max_tokens"] = json!(m);
    }
    if let Some(t) = opts.temperature {
        body["temperature"] = json!(t);
    }
    let reply = stream_to_stdout(client, base, opts.api_key.as_deref(), &body).await?;
    Ok(reply.text)
}

/// What a streamed chat completion returned.
pub struct StreamedReply {
    pub text: String,
    /// The `usage` object, when the server sent one.
    pub usage: Option<Value>,
    /// When the first and the last piece of text arrived.
    pub first_text_at: Option<std::time::Instant>,
    pub last_text_at: Option<std::time::Instant>,
    /// The peer that ran the request, when a node forwarded it.
    pub served_by: Option<String>,
}

/// Sends a streaming chat request and prints the reply as it arrives.
pub async fn stream_to_stdout(
    client: &reqwest::Client,
    base: &str,
    api_key: Option<&str>,
    body: &Value,
) -> anyhow::Result<StreamedReply> {
    let mut req = client
        .post(format!("{base}/v1/chat/completions"))
        .json(body);
    if let Some(k) = api_key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.context("request failed")?;
    let status = resp.status();
    if !status.is_success() {
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        bail!("{}", error_message(&body, status));
    }
    let mut reader = SseReader::default();
    let mut reply = StreamedReply {
        text: String::new(),
        usage: None,
        first_text_at: None,
        last_text_at: None,
        served_by: resp
            .headers()
            .get(crate::api::PEER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    let mut stream = resp.bytes_stream();
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("stream broken")?;
        for data in reader.push(&chunk).map_err(anyhow::Error::msg)? {
            if data == "[DONE]" {
                return Ok(reply);
            }
            let v: Value = serde_json::from_str(&data).context("bad chunk")?;
            if v.get("error").is_some() {
                bail!("{}", error_message(&v, status));
            }
            if let Some(t) = v["choices"][0]["delta"]["content"]
                .as_str()
                .filter(|t| !t.is_empty())
            {
                write!(out, "{t}")?;
                out.flush()?;
                reply.text.push_str(t);
                let now = std::time::Instant::now();
                reply.first_text_at.get_or_insert(now);
                reply.last_text_at = Some(now);
            }
            if v.get("usage").is_some_and(|u| !u.is_null()) {
                reply.usage = Some(v["usage"].clone());
            }
        }
    }
    Ok(reply)
}
