//! The hypha node: everything around the engine that a user runs.
//!
//! [`Node::start`] optionally loads a model into an [`hypha_engine::Engine`],
//! optionally serves it to peers over QUIC, optionally sends requests for
//! other models to peers it is configured with or finds in the DHT, and
//! serves the OpenAI-compatible API on a TCP address. The `hypha` binary is
//! a thin command line over this library, so another Rust program can embed
//! a node in-process.
//!
//! The modules are layers, and imports point down only (a tidy test keeps
//! it so): `node` (L5, the wiring) -> `api` and `inbound` (L4, the edges)
//! -> `inference` (L3) -> `services` (L2) -> `net` (L1) -> `util` (L0);
//! `metrics`, `identity` and `models` are leaves anyone may use.
// Peer and client bytes reach this crate: nothing here may panic on them.
#![deny(clippy::unwrap_used)]

pub mod api;
pub mod chat;
pub mod identity;
pub mod inbound;
pub mod inference;
pub mod metrics;
pub mod models;
pub mod net;
pub mod node;
pub mod services;
pub mod util;

use std::path::PathBuf;

pub use inference::receipts::{DEFAULT_PRICE_COMPLETION_MICRO, DEFAULT_PRICE_PROMPT_MICRO};
pub use node::{file_sha256, Node, NodeConfig, DEFAULT_HTTP_ADDR};
pub use util::install_crypto_provider;

/// Resolves a model argument (`default`, a cached name, or a path).
pub async fn resolve_model(spec: &str) -> anyhow::Result<PathBuf> {
    Ok(models::resolve(spec).await?)
}
