//! `hypha bench`: an end-to-end load generator for any OpenAI-compatible
//! server (hypha, llama-server, mycellm, ...).
//!
//! For each concurrency level it keeps that many streaming chat requests in
//! flight until the level's request count is done, and reports time to first
//! token, inter-token latency, single-stream decode speed and aggregate
//! tokens per second. Figures are medians and percentiles of one run: on a
//! noisy machine, compare servers only within one interleaved run.

pub mod sse;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

/// Errors from a benchmark run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    #[error("http: {0}")]
    Http(String),
    #[error("server answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("bad response: {0}")]
    Protocol(String),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Base URL, with or without `/v1`.
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub prompt: String,
    pub max_tokens: u32,
    /// Requests per concurrency level.
    pub requests: u32,
    /// Levels run in order, each to completion before the next.
    pub concurrency: Vec<u32>,
    /// Sent as the requests' `response_format` (structured output).
    pub response_format: Option<Value>,
    /// Sent as the requests' `tools`, with `tool_choice: required` and one
    /// call per answer (tool calling); a call's arrival counts as text.
    pub tools: Option<Value>,
    /// Names the variant in reports (`plain`, `json_schema`).
    pub label: String,
}

/// One request's measurements.
#[derive(Debug, Clone)]
pub struct Sample {
    pub ttft: Duration,
    pub gaps: Vec<Duration>,
    pub completion_tokens: u32,
    /// From first to last content chunk.
    pub decode: Duration,
}

/// Results for one concurrency level.
#[derive(Debug, Clone)]
pub struct LevelReport {
    /// The configuration's label.
    pub variant: String,
    pub concurrency: u32,
    pub ok: u32,
    pub failed: u32,
    pub first_error: Option<String>,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p90_ms: f64,
    /// Median over requests of (tokens - 1) / decode time.
    pub stream_tokens_per_s: f64,
    /// All completion tokens over the level's wall time.
    pub aggregate_tokens_per_s: f64,
    pub wall_s: f64,
}

/// The `n`th percentile (0..=100) of sorted values; 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn base(url: &str) -> String {
    url.trim_end_matches('/').trim_end_matches("/v1").to_owned()
}

/// Sends one streaming chat request and times it.
pub async fn one_request(
    client: &reqwest::Client,
    cfg: &BenchConfig,
) -> Result<Sample, BenchError> {
    let mut body = json!({
        "model": cfg.model,
        "messages": [{"role": "user", "content": cfg.prompt}],
        "max_tokens": cfg.max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(f) = &cfg.response_format {
        body["response_format"] = f.clone();
    }
    if let Some(t) = &cfg.tools {
        body["tools"] = t.clone();
        body["tool_choice"] = json!("required");
        body["parallel_tool_calls"] = json!(false);
    }
    let mut req = client
        .post(format!("{}/v1/chat/completions", base(&cfg.url)))
        .json(&body);
    if let Some(k) = &cfg.api_key {
        req = req.bearer_auth(k);
    }
    let start = Instant::now();
    let resp = req
        .send()
        .await
        .map_err(|e| BenchError::Http(e.to_string()))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return Err(BenchError::Status {
            status: status.as_u16(),
            body,
        });
    }
    let mut reader = sse::SseReader::default();
    let mut stream = resp.bytes_stream();
    let mut first: Option<Instant> = None;
    let mut last = start;
    let mut gaps = Vec::with_capacity(cfg.max_tokens as usize);
    let mut chunks = 0u32;
    let mut usage_tokens = None;
    'read: while let Some(bytes) = stream.next().await {
        let bytes = bytes.map_err(|e| BenchError::Http(e.to_string()))?;
        for data in reader.push(&bytes).map_err(BenchError::Protocol)? {
            if data == "[DONE]" {
                break 'read;
            }
            let v: Value =
                serde_json::from_str(&data).map_err(|e| BenchError::Protocol(e.to_string()))?;
            if let Some(err) = v.get("error") {
                return Err(BenchError::Protocol(err.to_string()));
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage_tokens = Some(n as u32);
            }
            let delta = &v["choices"][0]["delta"];
            let has_text = delta["content"].as_str().is_some_and(|t| !t.is_empty())
                || delta["tool_calls"]
                    .as_array()
                    .is_some_and(|c| !c.is_empty());
            if has_text {
                let now = Instant::now();
                if first.is_none() {
                    first = Some(now);
                } else {
                    gaps.push(now - last);
                }
                last = now;
                chunks += 1;
            }
        }
    }
    let first = first.ok_or_else(|| BenchError::Protocol("no content was streamed".into()))?;
    Ok(Sample {
        ttft: first - start,
        gaps,
        completion_tokens: usage_tokens.unwrap_or(chunks),
        decode: last - first,
    })
}

/// Runs one concurrency level.
pub async fn run_level(
    client: &reqwest::Client,
    cfg: &BenchConfig,
    concurrency: u32,
) -> LevelReport {
    let started = Instant::now();
    let next = std::sync::atomic::AtomicU32::new(0);
    let workers = (0..concurrency.max(1)).map(|_| async {
        let mut out = Vec::new();
        while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < cfg.requests {
            out.push(one_request(client, cfg).await);
        }
        out
    });
    let results: Vec<_> = futures_util::future::join_all(workers)
        .await
        .into_iter()
        .flatten()
        .collect();
    let wall = started.elapsed();
    let mut ttft = Vec::new();
    let mut itl = Vec::new();
    let mut speeds = Vec::new();
    let mut tokens = 0u64;
    let (mut ok, mut failed, mut first_error) = (0, 0, None);
    for r in results {
        match r {
            Ok(s) => {
                ok += 1;
                tokens += u64::from(s.completion_tokens);
                ttft.push(s.ttft.as_secs_f64() * 1e3);
                itl.extend(s.gaps.iter().map(|g| g.as_secs_f64() * 1e3));
                if s.completion_tokens > 1 && !s.decode.is_zero() {
                    speeds.push(f64::from(s.completion_tokens - 1) / s.decode.as_secs_f64());
                }
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    for v in [&mut ttft, &mut itl, &mut speeds] {
        v.sort_by(f64::total_cmp);
    }
    LevelReport {
        variant: cfg.label.clone(),
        concurrency,
        ok,
        failed,
        first_error,
        ttft_p50_ms: percentile(&ttft, 50.0),
        ttft_p90_ms: percentile(&ttft, 90.0),
        itl_p50_ms: percentile(&itl, 50.0),
        itl_p90_ms: percentile(&itl, 90.0),
        stream_tokens_per_s: percentile(&speeds, 50.0),
        aggregate_tokens_per_s: tokens as f64 / wall.as_secs_f64(),
        wall_s: wall.as_secs_f64(),
    }
}

/// Runs every level of `cfg.concurrency` in order.
pub async fn run(client: &reqwest::Client, cfg: &BenchConfig) -> Vec<LevelReport> {
    let mut reports = Vec::with_capacity(cfg.concurrency.len());
    for &c in &cfg.concurrency {
        reports.push(run_level(client, cfg, c).await);
    }
    reports
}

/// The model a server lists first.
pub async fn first_model(client: &reqwest::Client, url: &str) -> Result<String, BenchError> {
    let resp = client
        .get(format!("{}/v1/models", base(url)))
        .send()
        .await
        .map_err(|e| BenchError::Http(e.to_string()))?;
    let v: Value = resp
        .json()
        .await
        .map_err(|e| BenchError::Protocol(e.to_string()))?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| BenchError::Protocol("the server lists no model".into()))
}

/// A table of reports, one line per level.
pub fn format_table(reports: &[LevelReport]) -> String {
    let mut s = String::from(
        "variant       conc   ok fail  ttft_p50_ms ttft_p90_ms  itl_p50_ms itl_p90_ms  stream_tok/s  agg_tok/s\n",
    );
    for r in reports {
        s.push_str(&format!(
            "{:<12} {:>5} {:>4} {:>4} {:>12.1} {:>11.1} {:>11.1} {:>10.1} {:>13.1} {:>10.1}\n",
            r.variant,
            r.concurrency,
            r.ok,
            r.failed,
            r.ttft_p50_ms,
            r.ttft_p90_ms,
            r.itl_p50_ms,
            r.itl_p90_ms,
            r.stream_tokens_per_s,
            r.aggregate_tokens_per_s
        ));
        if let Some(e) = &r.first_error {
            s.push_str(&format!("     first error: {e}\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_picks_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&v, 50.0), 3.0);
        assert_eq!(percentile(&v, 100.0), 5.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
