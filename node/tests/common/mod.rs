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
