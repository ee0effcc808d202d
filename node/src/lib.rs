//! The hypha node: everything around the engine that a user runs.
//!
//! [`Node::start`] optionally loads a model into an [`hypha_engine::Engine`],
//! optionally serves it to peers over QUIC (`seeder`), optionally sends
//! requests for other models to configured peers (`peers`), and serves the
//! OpenAI-compatible API on a TCP address. The `hypha` binary is a thin
//! command line over this library, so another Rust program can embed a node
//! in-process.

pub mod api;
pub mod chat;
pub mod identity;
pub mod inbound;
pub mod inference;
pub mod metrics;
pub mod models;
pub mod net;
pub mod services;
pub mod util;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use hypha_engine::{Engine, EngineConfig};
use hypha_wire::{NodeId, CAP_SEEDER};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::identity::Identity;
use crate::inference::route::Peers;
use crate::net::addr::PeerAddr;
use crate::net::endpoint::Endpoint;

/// The address `hypha up` listens on when not told otherwise.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8420";
/// Where a node that only dials peers binds its QUIC socket.
const DIAL_ONLY_ADDR: &str = "0.0.0.0:0";
/// How long a stopping node waits for its peer connections to close.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Everything [`Node::start`] needs.
pub struct NodeConfig {
    /// The model to run here; `None` for a node that only consumes.
    pub engine: Option<EngineConfig>,
    pub http_addr: SocketAddr,
    pub api_key: Option<String>,
    /// Other names the model answers to in requests (e.g. `default`).
    pub model_aliases: Vec<String>,
    /// Serve the local model to peers on this UDP address.
    pub quic_addr: Option<SocketAddr>,
    /// Peers to send requests for models this node does not run.
    pub peers: Vec<PeerAddr>,
    /// Nodes to join the DHT through.
    pub bootstrap: Vec<PeerAddr>,
    /// Addresses a seeder's provider records give; by default its QUIC
    /// address when that names a concrete IP.
    pub advertise: Vec<SocketAddr>,
    /// Lifetime of the provider records a seeder publishes.
    pub record_ttl: Duration,
    /// STUN servers to ask for this node's public address, besides peers.
    pub stun_servers: Vec<SocketAddr>,
    /// Where the node keeps its key (`None`: `$HYPHA_HOME` or XDG).
    pub data_dir: Option<PathBuf>,
    /// How long a dial may take before the peer counts as down.
    pub dial_timeout: Duration,
    /// Peers a seeder accepts at once.
    pub max_peers: usize,
    /// A seeder's published prices, micro-credits per token.
    pub price_prompt_micro: u64,
    pub price_completion_micro: u64,
    /// Most tokens a consumer may receive beyond its last countersigned
    /// receipt (receipts are offered every half of it).
    pub receipt_interval: u32,
    /// Proof of work (bits) a new identity is created with, and required of
    /// every peer at hello; identities with it get the ledger's grant.
    pub pow_bits: u32,
    /// Requests per minute a consumer with no credits left may make.
    pub free_tier_per_minute: u32,
    /// Relay for other nodes (`--relay`), with these limits.
    pub relay: Option<services::relay_server::RelayConfig>,
    /// Relays to hold reservations at whatever the NAT looks like.
    pub relay_via: Vec<PeerAddr>,
    /// Hold reservations at relays from the DHT once peers see this node
    /// behind a NAT.
    pub relay_auto: bool,
}

/// Micro-credits per prompt token a seeder charges by default.
pub const DEFAULT_PRICE_PROMPT_MICRO: u64 = 1;
/// Micro-credits per generated token by default: generating costs a full
/// decode step per token, a prompt token a fraction of one.
pub const DEFAULT_PRICE_COMPLETION_MICRO: u64 = 4;

impl NodeConfig {
    /// A node on `127.0.0.1:0` with no peers, running `engine` if given.
    pub fn new(engine: Option<EngineConfig>) -> Self {
        Self {
            engine,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key: None,
            model_aliases: Vec::new(),
            quic_addr: None,
            peers: Vec::new(),
            bootstrap: Vec::new(),
            advertise: Vec::new(),
            record_ttl: services::announce::DEFAULT_RECORD_TTL,
            stun_servers: Vec::new(),
            data_dir: None,
            dial_timeout: net::pool::DIAL_TIMEOUT,
            max_peers: inbound::MAX_PEERS,
            price_prompt_micro: DEFAULT_PRICE_PROMPT_MICRO,
            price_completion_micro: DEFAULT_PRICE_COMPLETION_MICRO,
            receipt_interval: inference::serve::DEFAULT_RECEIPT_INTERVAL,
            pow_bits: hypha_ledger::DEFAULT_POW_BITS,
            free_tier_per_minute: inference::admission::DEFAULT_FREE_TIER_PER_MINUTE,
            relay: None,
            relay_via: Vec::new(),
            relay_auto: true,
        }
    }
}

/// A running node.
pub struct Node {
    http_addr: SocketAddr,
    engine: Option<Engine>,
    identity: Option<NodeId>,
    endpoint: Option<Arc<Endpoint>>,
    ledger: Option<hypha_ledger::Ledger>,
    peers: Option<Arc<Peers>>,
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    seeder: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Loads the model (on a blocking thread), opens the QUIC endpoint when
    /// peers are involved, and starts serving HTTP.
    pub async fn start(cfg: NodeConfig) -> anyhow::Result<Self> {
        let engine = match cfg.engine.clone() {
            Some(engine_cfg) => Some(
                tokio::task::spawn_blocking(move || Engine::start(engine_cfg))
                    .await
                    .context("engine start-up panicked")??,
            ),
            None => None,
        };
        let listener = TcpListener::bind(cfg.http_addr)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.http_addr))?;
        let http_addr = listener.local_addr()?;
        let metrics = Arc::new(metrics::Metrics::default());
        let (shutdown, rx) = watch::channel(false);

        let local = engine.as_ref().map(|e| api::LocalModel {
            engine: e.clone(),
            model_id: e.info().name.clone(),
            aliases: cfg.model_aliases.clone(),
        });
        let served: Vec<String> = local
            .as_ref()
            .map(|l| {
                std::iter::once(l.model_id.clone())
                    .chain(l.aliases.iter().cloned())
                    .collect()
            })
            .unwrap_or_default();

        let mut endpoint = None;
        let mut identity_id = None;
        let mut seeder_task = None;
        let mut peers = None;
        let mut ledger = None;
        let mut account = None;
        let mut reach_view = None;
        let mut relay_service = None;
        let mut relay_client = None;
        let mut paths = None;
        if cfg.quic_addr.is_some() || !cfg.peers.is_empty() || !cfg.bootstrap.is_empty() {
            let dir = identity::data_dir(cfg.data_dir.as_deref())?;
            let ident = Arc::new(Identity::load_or_create_with_pow(&dir, cfg.pow_bits)?);
            if ident.pow_bits() < cfg.pow_bits {
                tracing::warn!(
                    have = ident.pow_bits(),
                    need = cfg.pow_bits,
                    "this node's key has too little proof of work: peers will refuse it"
                );
            }
            identity_id = Some(ident.id());
            let (log, recovery) = open_ledger(&dir).await?;
            if recovery.truncated_bytes > 0 {
                tracing::warn!(
                    bytes = recovery.truncated_bytes,
                    "ledger: cut a torn final write from the log"
                );
            }
            tracing::info!(receipts = recovery.receipts, "ledger opened");
            let bind = match cfg.quic_addr {
                Some(a) => a,
                None => DIAL_ONLY_ADDR.parse()?,
            };
            let ep = Arc::new(Endpoint::bind(&ident, bind)?);
            let serving = engine.is_some() && cfg.quic_addr.is_some();
            let offer = match (&engine, serving) {
                (Some(e), true) => net::hello::Offer {
                    capabilities: CAP_SEEDER,
                    models: served.clone(),
                    model_sha256: file_sha256(e.info().path.clone()).await?,
                    price_prompt_micro: cfg.price_prompt_micro,
                    price_completion_micro: cfg.price_completion_micro,
                },
                _ => net::hello::Offer::default(),
            };
            let hello = net::proto::hello_message(&ident, offer.clone());
            let conns = Arc::new(net::pool::Connections::new(
                ep.clone(),
                hello.clone(),
                metrics.clone(),
                cfg.pow_bits,
                cfg.dial_timeout,
                &cfg.peers,
            ));
            let local = hypha_dht::Contact {
                id: ident.id(),
                addr: ep.local_addr()?,
            };
            let disc = services::dht::Discovery::start(
                local,
                conns.clone(),
                cfg.bootstrap.clone(),
                rx.clone(),
            );
            let reachability = Arc::new(services::reach::Reachability::new(
                ep.local_addr()?,
                ep.stun().stats.clone(),
            ));
            tokio::spawn(services::reach::run(
                ep.clone(),
                disc.clone(),
                cfg.stun_servers.clone(),
                reachability.clone(),
                rx.clone(),
            ));
            reach_view = Some(reachability.clone());
            let client = Arc::new(services::relay_client::RelayClient::new(
                cfg.relay_via.clone(),
                cfg.relay_auto,
            ));
            tokio::spawn(services::relay_client::keep_reservations(
                client.clone(),
                conns.clone(),
                disc.clone(),
                reachability.clone(),
                ident.id(),
                rx.clone(),
            ));
            relay_client = Some(client.clone());
            let record_ttl = cfg
                .record_ttl
                .min(Duration::from_millis(hypha_dht::record::MAX_RECORD_TTL_MS));
            paths = Some(ep.paths().clone());
            let advertised = if cfg.advertise.is_empty() {
                let a = ep.local_addr()?;
                if a.ip().is_unspecified() {
                    Vec::new()
                } else {
                    vec![a]
                }
            } else {
                cfg.advertise.clone()
            };
            if let Some(relay_cfg) = cfg.relay.clone() {
                let service = Arc::new(
                    services::relay_server::RelayService::new(relay_cfg)
                        .context("cannot open the relay capture file")?,
                );
                let announcement = services::announce::Announcement {
                    names: vec![hypha_dht::RELAY_SERVICE.to_owned()],
                    explicit: !cfg.advertise.is_empty(),
                    reach: Some(reachability.clone()),
                    relays: None,
                    catalog: false,
                    addrs: advertised.clone(),
                    model_sha256: [0; 32],
                    context_length: 0,
                    backend: "relay".into(),
                    price_prompt_micro: 0,
                    price_completion_micro: 0,
                    ttl: record_ttl,
                };
                tokio::spawn(services::announce::publish_loop(
                    disc.clone(),
                    ident.clone(),
                    announcement,
                    service.clone(),
                    rx.clone(),
                ));
                tracing::info!(id = %ident.id(), "relaying for peers on QUIC {}", ep.local_addr()?);
                relay_service = Some(service);
            }
            let seeder_state = match (&engine, serving) {
                (Some(engine), true) => Some(Arc::new(inference::serve::SeederState {
                    engine: engine.clone(),
                    models: offer.models.clone(),
                    identity: ident.clone(),
                    offer: offer.clone(),
                    metrics: metrics.clone(),
                    ledger: log.clone(),
                    receipt_interval: cfg.receipt_interval.max(1),
                    pow_bits: cfg.pow_bits,
                    free_tier: inference::admission::FreeTier::new(cfg.free_tier_per_minute),
                    unpaid: inference::admission::Unpaid::default(),
                    running: std::sync::Mutex::new(std::collections::HashSet::new()),
                    decode_tps: std::sync::atomic::AtomicU32::new(0),
                    discovery: Some(disc.clone()),
                    balances: Arc::new(inference::admission::NetworkBalances::default()),
                })),
                _ => None,
            };
            if let (Some(state), Some(engine)) = (&seeder_state, &engine) {
                if advertised.is_empty() {
                    tracing::warn!(
                        "QUIC bound to {}: provider records carry no address; pass --advertise",
                        ep.local_addr()?
                    );
                }
                let info = engine.info();
                let announcement = services::announce::Announcement {
                    names: offer.models.clone(),
                    explicit: !cfg.advertise.is_empty(),
                    reach: Some(reachability.clone()),
                    relays: Some(client.clone()),
                    catalog: true,
                    addrs: advertised.clone(),
                    model_sha256: offer.model_sha256,
                    context_length: info.ctx_per_slot,
                    backend: info.device.clone(),
                    price_prompt_micro: offer.price_prompt_micro,
                    price_completion_micro: offer.price_completion_micro,
                    ttl: record_ttl,
                };
                tokio::spawn(services::announce::publish_loop(
                    disc.clone(),
                    ident.clone(),
                    announcement,
                    state.clone(),
                    rx.clone(),
                ));
                tracing::info!(id = %ident.id(), "serving peers on QUIC {}", ep.local_addr()?);
            }
            let (punch_dials, dial_queue) =
                tokio::sync::mpsc::channel(services::punch::PUNCH_QUEUE);
            tokio::spawn(services::punch::dialer(conns.clone(), dial_queue));
            let listener = Arc::new(inbound::Listener {
                hello: hello.clone(),
                metrics: metrics.clone(),
                max_peers: cfg.max_peers.clamp(1, inbound::MAX_PEERS),
                pow_bits: cfg.pow_bits,
                seeder: seeder_state,
                discovery: Some(disc.clone()),
                me: ident.id(),
                conns: conns.clone(),
                inbound: std::sync::Mutex::new(std::collections::HashMap::new()),
                punches: std::sync::Mutex::new((std::time::Instant::now(), 0)),
                punch_dials,
                relay: relay_service.clone(),
                relay_client: client.clone(),
                paths: ep.paths().clone(),
                shutdown: rx.clone(),
            });
            conns.set_listener(&listener);
            seeder_task = Some(tokio::spawn(inbound::run(ep.clone(), listener, rx.clone())));
            let party = Arc::new(inference::remote::Party {
                identity: ident.clone(),
                ledger: log.clone(),
                pow_bits: cfg.pow_bits,
            });
            let p = Arc::new(
                Peers::new(
                    conns,
                    cfg.peers.clone(),
                    Some(disc),
                    metrics.clone(),
                    party,
                    Some(reachability.clone()),
                )
                .map_err(anyhow::Error::msg)?,
            );
            if !cfg.peers.is_empty() {
                let probe = p.clone();
                tokio::spawn(async move {
                    probe.connect_all().await;
                });
            }
            peers = Some(p);
            endpoint = Some(ep);
            account = Some(api::account::Account {
                id: ident.id(),
                ledger: log.clone(),
                grant: inference::admission::grant_for(&ident.id(), cfg.pow_bits),
                pow_bits: cfg.pow_bits,
            });
            ledger = Some(log);
        }

        let state = Arc::new(api::AppState {
            local,
            peers: peers.clone(),
            reach: reach_view,
            account,
            relay: relay_service,
            relay_client,
            paths,
            api_key: cfg.api_key,
            metrics,
            started: SystemTime::now(),
        });
        let app = api::router(state);
        let mut rx_http = rx;
        // Token events are small writes a few milliseconds apart: without
        // TCP_NODELAY, Nagle holds each one until the client's delayed ACK
        // (up to 40 ms) arrives.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("cannot set TCP_NODELAY: {e}");
            }
        });
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx_http.wait_for(|stop| *stop).await;
                })
                .await
        });
        tracing::info!("OpenAI API on http://{http_addr}/v1");
        Ok(Self {
            http_addr,
            engine,
            identity: identity_id,
            endpoint,
            ledger,
            peers,
            shutdown,
            server,
            seeder: seeder_task,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The local engine, when this node runs a model.
    pub fn engine(&self) -> Option<&Engine> {
        self.engine.as_ref()
    }

    /// This node's id, when it talks to peers.
    pub fn id(&self) -> Option<NodeId> {
        self.identity
    }

    /// The node's receipt log, when it talks to peers.
    pub fn ledger(&self) -> Option<&hypha_ledger::Ledger> {
        self.ledger.as_ref()
    }

    /// Routing to peers and the DHT, when the node talks to peers.
    pub fn peers(&self) -> Option<&Arc<Peers>> {
        self.peers.as_ref()
    }

    /// The UDP address of the QUIC endpoint, when there is one.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.endpoint.as_ref().and_then(|e| e.local_addr().ok())
    }

    /// How peers reach this node: `NodeId@addr`.
    pub fn peer_addr(&self) -> Option<PeerAddr> {
        Some(PeerAddr {
            id: self.identity?,
            addr: self.quic_addr()?,
        })
    }

    /// Stops accepting requests and waits for open ones to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        let served = (&mut self.server).await.context("server task panicked");
        self.close_peers().await;
        served??;
        Ok(())
    }

    /// Serves until `stop` resolves (then shuts down gracefully) or the
    /// server fails.
    pub async fn run_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let served = tokio::select! {
            r = &mut self.server => r,
            () = stop => {
                let _ = self.shutdown.send(true);
                (&mut self.server).await
            }
        };
        let _ = self.shutdown.send(true);
        self.close_peers().await;
        served.context("server task panicked")??;
        Ok(())
    }

    async fn close_peers(&mut self) {
        if let Some(task) = self.seeder.take() {
            let _ = tokio::time::timeout(CLOSE_GRACE, task).await;
        }
        if let Some(ep) = &self.endpoint {
            ep.close();
            let _ = tokio::time::timeout(CLOSE_GRACE, ep.wait_idle()).await;
        }
    }
}

/// How long a starting node waits for a previous node in the same process
/// to release the ledger it is closing.
const LEDGER_RELEASE_WAIT: Duration = Duration::from_secs(3);

async fn open_ledger(
    dir: &std::path::Path,
) -> anyhow::Result<(hypha_ledger::Ledger, hypha_ledger::Recovery)> {
    let started = std::time::Instant::now();
    loop {
        match hypha_ledger::Ledger::open(dir) {
            Err(hypha_ledger::LedgerError::InUse(_)) if started.elapsed() < LEDGER_RELEASE_WAIT => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => {
                return other
                    .with_context(|| format!("cannot open the ledger in {}", dir.display()))
            }
        }
    }
}

/// SHA-256 of a file, read on a blocking thread.
pub async fn file_sha256(path: PathBuf) -> anyhow::Result<[u8; 32]> {
    tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let mut f = std::fs::File::open(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            ctx.update(buf.get(..n).unwrap_or_default());
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        Ok(out)
    })
    .await
    .context("hashing task panicked")?
}

pub use util::install_crypto_provider;

/// Resolves a model argument (`default`, a cached name, or a path).
pub async fn resolve_model(spec: &str) -> anyhow::Result<PathBuf> {
    Ok(models::resolve(spec).await?)
}
