//! The hypha node: everything around the engine that a user runs.
//!
//! [`Node::start`] loads a model into an [`hypha_engine::Engine`] and serves
//! the OpenAI-compatible API on a TCP address; the `hypha` binary is a thin
//! command line over this library, so another Rust program can embed a node
//! in-process.

pub mod chat;
pub mod hello;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use hypha_engine::{Engine, EngineConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The address `hypha up` listens on when not told otherwise.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8420";

/// Everything [`Node::start`] needs.
pub struct NodeConfig {
    pub engine: EngineConfig,
    pub http_addr: SocketAddr,
    pub api_key: Option<String>,
    /// Other names the model answers to in requests (e.g. `default`).
    pub model_aliases: Vec<String>,
}

/// A running node.
pub struct Node {
    http_addr: SocketAddr,
    engine: Engine,
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Node {
    /// Loads the model (on a blocking thread) and starts serving HTTP.
    pub async fn start(cfg: NodeConfig) -> anyhow::Result<Self> {
        let engine_cfg = cfg.engine.clone();
        let engine = tokio::task::spawn_blocking(move || Engine::start(engine_cfg))
            .await
            .context("engine start-up panicked")??;
        let listener = TcpListener::bind(cfg.http_addr)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.http_addr))?;
        let http_addr = listener.local_addr()?;
        let state = Arc::new(http::AppState {
            engine: engine.clone(),
            model_id: engine.info().name.clone(),
            aliases: cfg.model_aliases,
            api_key: cfg.api_key,
            metrics: metrics::Metrics::default(),
            started: SystemTime::now(),
        });
        let (shutdown, mut rx) = watch::channel(false);
        let app = http::router(state);
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await
        });
        tracing::info!("OpenAI API on http://{http_addr}/v1");
        Ok(Self {
            http_addr,
            engine,
            shutdown,
            server,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Stops accepting requests and waits for open ones to finish.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.server.await.context("server task panicked")??;
        Ok(())
    }

    /// Serves until `stop` resolves (then shuts down gracefully) or the
    /// server fails.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let mut server = self.server;
        tokio::select! {
            r = &mut server => { r.context("server task panicked")??; }
            () = stop => {
                let _ = self.shutdown.send(true);
                server.await.context("server task panicked")??;
            }
        }
        Ok(())
    }
}

/// Installs ring as rustls's crypto provider, once per process.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Resolves a model argument (`default`, a cached name, or a path).
pub async fn resolve_model(spec: &str) -> anyhow::Result<PathBuf> {
    Ok(models::resolve(spec).await?)
}
