//! L5, the wiring: [`NodeConfig`], and [`Node::start`] in small steps (the
//! engine, the network services, the HTTP edge), each task owned by the
//! node's [`Tasks`], which [`Node::stop`] cancels and awaits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use hypha_engine::{Engine, EngineConfig};
use hypha_wire::{NodeId, CAP_SEEDER};
use tokio::net::TcpListener;

use crate::api::conns::{
    CappedListener, HttpTimeouts, DEFAULT_MAX_HTTP_CONNECTIONS, DEFAULT_MAX_HTTP_STREAMS,
};
use crate::api::state::EdgePolicy;
use crate::api::{self, account::Account, AppState, LocalModel};
use crate::identity::{self, Identity};
use crate::inbound::{self, Inbound};
use crate::inference::admission::{self, FreeTier, NetworkBalances, Unpaid};
use crate::inference::prep::Preparer;
use crate::inference::remote::Party;
use crate::inference::route::Peers;
use crate::inference::serve::{self, SeederState};
use crate::metrics::Metrics;
use crate::net::addr::PeerAddr;
use crate::net::endpoint::{Endpoint, TransportLimits};
use crate::net::hello::Offer;
use crate::net::paths::Paths;
use crate::net::pool::{self, Connections, PoolConfig};
use crate::net::proto::hello_message;
use crate::services::announce::{self, Announcement, Capacity};
use crate::services::dht::Discovery;
use crate::services::dialer::Dialer;
use crate::services::punch::{self, Punches};
use crate::services::reach::{self, Reachability};
use crate::services::relay_client::{self, RelayClient};
use crate::services::relay_server::{RelayConfig, RelayService};
use crate::util::Tasks;

/// The address `hypha up` listens on when not told otherwise.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8420";
/// Where a node that only dials peers binds its QUIC socket.
const DIAL_ONLY_ADDR: &str = "0.0.0.0:0";
/// How long a stopping node waits for its peer connections to close.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long a stopping node waits for its tasks once they are cancelled:
/// a cancelled task ends at its next await, so only blocking work (a
/// ledger append) can take longer than a moment.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Everything [`Node::start`] needs.
pub struct NodeConfig {
    /// The model to run here; `None` for a node that only consumes.
    pub engine: Option<EngineConfig>,
    pub http_addr: SocketAddr,
    pub api_key: Option<String>,
    /// Web origins whose pages may call the API (`*` for any).
    pub cors_origins: Vec<String>,
    /// DNS names the API answers to besides `localhost` and addresses.
    pub allowed_hosts: Vec<String>,
    /// HTTP client connections served at once; more are refused (503).
    pub max_http_connections: usize,
    /// Completions in flight at once; more are refused (503).
    pub max_http_streams: usize,
    /// How long the HTTP server waits on a client's head and body.
    pub http_timeouts: HttpTimeouts,
    /// `/health` answers without the API key (probes); every other route
    /// needs it when one is set.
    pub public_health: bool,
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
    /// every peer at hello (it buys no credits).
    pub pow_bits: u32,
    /// Requests per minute a consumer with no standing here may make.
    pub free_tier_per_minute: u32,
    /// What this node pays as a consumer at most.
    pub spend: crate::inference::remote::SpendLimits,
    /// Relay for other nodes (`--relay`), with these limits.
    pub relay: Option<RelayConfig>,
    /// Relays to hold reservations at whatever the NAT looks like.
    pub relay_via: Vec<PeerAddr>,
    /// Hold reservations at relays from the DHT once peers see this node
    /// behind a NAT.
    pub relay_auto: bool,
}

impl NodeConfig {
    /// A node on `127.0.0.1:0` with no peers, running `engine` if given.
    pub fn new(engine: Option<EngineConfig>) -> Self {
        Self {
            engine,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key: None,
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            max_http_connections: DEFAULT_MAX_HTTP_CONNECTIONS,
            max_http_streams: DEFAULT_MAX_HTTP_STREAMS,
            http_timeouts: HttpTimeouts::default(),
            public_health: false,
            model_aliases: Vec::new(),
            quic_addr: None,
            peers: Vec::new(),
            bootstrap: Vec::new(),
            advertise: Vec::new(),
            record_ttl: announce::DEFAULT_RECORD_TTL,
            stun_servers: Vec::new(),
            data_dir: None,
            dial_timeout: pool::DIAL_TIMEOUT,
            max_peers: pool::MAX_PEERS,
            price_prompt_micro: crate::inference::receipts::DEFAULT_PRICE_PROMPT_MICRO,
            price_completion_micro: crate::inference::receipts::DEFAULT_PRICE_COMPLETION_MICRO,
            receipt_interval: serve::DEFAULT_RECEIPT_INTERVAL,
            pow_bits: hypha_ledger::DEFAULT_POW_BITS,
            free_tier_per_minute: admission::DEFAULT_FREE_TIER_PER_MINUTE,
            spend: Default::default(),
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
    net: Option<Network>,
    /// Every task of the node but the HTTP server's.
    tasks: Tasks,
    /// Stops the HTTP server gracefully: open requests run to their end.
    http_stop: tokio_util::sync::CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// What a node that talks to peers holds.
struct Network {
    identity: Arc<Identity>,
    endpoint: Arc<Endpoint>,
    ledger: hypha_ledger::Ledger,
    peers: Arc<Peers>,
    reach: Arc<Reachability>,
    relay: Option<Arc<RelayService>>,
    relay_client: Arc<RelayClient>,
    paths: Arc<Paths>,
}

impl Node {
    /// Loads the model (on a blocking thread), opens the QUIC endpoint when
    /// peers are involved, and starts serving HTTP.
    pub async fn start(cfg: NodeConfig) -> anyhow::Result<Self> {
        let tasks = Tasks::new();
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
        let metrics = Arc::new(Metrics::default());
        // One gate for all prompt work: the API's and peers' requests share
        // its permits.
        let prep = Arc::new(Preparer::default());
        let local = engine.as_ref().map(|e| LocalModel {
            engine: e.clone(),
            model_id: e.info().name.clone(),
            aliases: cfg.model_aliases.clone(),
        });
        let on_network =
            cfg.quic_addr.is_some() || !cfg.peers.is_empty() || !cfg.bootstrap.is_empty();
        let net = if on_network {
            let started = Network::start(&cfg, engine.as_ref(), &metrics, &prep, &tasks).await;
            match started {
                Ok(n) => Some(n),
                Err(e) => {
                    tasks.stop().await;
                    return Err(e);
                }
            }
        } else {
            None
        };
        let state = Arc::new(AppState {
            local,
            peers: net.as_ref().map(|n| n.peers.clone()),
            reach: net.as_ref().map(|n| n.reach.clone()),
            account: net.as_ref().map(|n| Account {
                id: n.identity.id(),
                ledger: n.ledger.clone(),
            }),
            relay: net.as_ref().and_then(|n| n.relay.clone()),
            relay_client: net.as_ref().map(|n| n.relay_client.clone()),
            paths: net.as_ref().map(|n| n.paths.clone()),
            api_key: cfg.api_key,
            edge: EdgePolicy {
                loopback_only: http_addr.ip().is_loopback(),
                allowed_hosts: cfg.allowed_hosts,
                cors_origins: cfg.cors_origins,
                public_health: cfg.public_health,
            },
            streams: Arc::new(tokio::sync::Semaphore::new(cfg.max_http_streams.max(1))),
            body_timeout: cfg.http_timeouts.body,
            prep,
            metrics: metrics.clone(),
            started: SystemTime::now(),
        });
        let http_stop = tokio_util::sync::CancellationToken::new();
        let listener = CappedListener::new(listener, cfg.max_http_connections, metrics.clone());
        let server = api::conns::serve(
            listener,
            api::router(state),
            cfg.http_timeouts.header,
            http_stop.clone(),
        );
        tracing::info!("OpenAI API on http://{http_addr}/v1");
        Ok(Self {
            http_addr,
            engine,
            net,
            tasks,
            http_stop,
            server,
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
        self.net.as_ref().map(|n| n.identity.id())
    }

    /// The node's receipt log, when it talks to peers.
    pub fn ledger(&self) -> Option<&hypha_ledger::Ledger> {
        self.net.as_ref().map(|n| &n.ledger)
    }

    /// Routing to peers and the DHT, when the node talks to peers.
    pub fn peers(&self) -> Option<&Arc<Peers>> {
        self.net.as_ref().map(|n| &n.peers)
    }

    /// The UDP address of the QUIC endpoint, when there is one.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.net.as_ref().and_then(|n| n.endpoint.local_addr().ok())
    }

    /// How peers reach this node: `NodeId@addr`.
    pub fn peer_addr(&self) -> Option<PeerAddr> {
        Some(PeerAddr {
            id: self.id()?,
            addr: self.quic_addr()?,
        })
    }

    /// Stops accepting requests and cancels every task of the node (a local
    /// generation in progress still finishes; a remote one ends with the
    /// node's connections), then waits for the HTTP server, the close of
    /// the QUIC endpoint and every task.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.http_stop.cancel();
        self.tasks.cancel();
        let served = (&mut self.server).await.context("server task panicked");
        self.close().await;
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
                self.http_stop.cancel();
                self.tasks.cancel();
                (&mut self.server).await
            }
        };
        self.close().await;
        served.context("server task panicked")??;
        Ok(())
    }

    /// Closes the peer connections and waits for every task.
    async fn close(&mut self) {
        self.http_stop.cancel();
        self.tasks.cancel();
        if let Some(n) = &self.net {
            n.endpoint.close();
            let _ = tokio::time::timeout(CLOSE_GRACE, n.endpoint.wait_idle()).await;
        }
        if tokio::time::timeout(STOP_GRACE, self.tasks.stop())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tasks.len(),
                "tasks still running after the node stopped"
            );
        }
    }
}

impl Drop for Node {
    /// A node dropped without [`Node::stop`] still stops its tasks (they
    /// end at their next await) and its HTTP server.
    fn drop(&mut self) {
        self.http_stop.cancel();
        self.tasks.cancel();
    }
}

/// Serves the API on `listener` until `stop`, then finishes open requests.
impl Network {
    /// The identity and ledger, the QUIC endpoint and every network
    /// service, started in order: the pool and the DHT, reachability and
    /// relays, what the node announces, the inbound dispatcher, routing.
    async fn start(
        cfg: &NodeConfig,
        engine: Option<&Engine>,
        metrics: &Arc<Metrics>,
        prep: &Arc<Preparer>,
        tasks: &Tasks,
    ) -> anyhow::Result<Self> {
        let (identity, ledger) = open_identity(cfg).await?;
        let bind = match cfg.quic_addr {
            Some(a) => a,
            None => DIAL_ONLY_ADDR.parse()?,
        };
        let endpoint = Arc::new(Endpoint::bind_in(
            &identity,
            bind,
            &TransportLimits::default(),
            tasks.clone(),
        )?);
        let served = engine.filter(|_| cfg.quic_addr.is_some());
        let offer = match served {
            Some(e) => Offer {
                capabilities: CAP_SEEDER,
                models: std::iter::once(e.info().name.clone())
                    .chain(cfg.model_aliases.iter().cloned())
                    .collect(),
                model_sha256: file_sha256(e.info().path.clone()).await?,
                context_length: e.info().ctx_per_slot,
                price_prompt_micro: cfg.price_prompt_micro,
                price_completion_micro: cfg.price_completion_micro,
            },
            None => Offer::default(),
        };
        let hello = hello_message(&identity, offer.clone());
        let (conns, adopted) = Connections::new(
            endpoint.clone(),
            PoolConfig {
                hello: hello.clone(),
                pow_bits: cfg.pow_bits,
                dial_timeout: cfg.dial_timeout,
                pinned: cfg.peers.clone(),
            },
            metrics.clone(),
            tasks.clone(),
        );
        let conns = Arc::new(conns);
        let local = hypha_dht::Contact {
            id: identity.id(),
            addr: endpoint.local_addr()?,
        };
        let discovery = Discovery::start(
            local,
            conns.clone(),
            cfg.bootstrap.clone(),
            cfg.pow_bits,
            tasks.clone(),
        );
        let reach = Arc::new(Reachability::new(
            endpoint.local_addr()?,
            endpoint.stun().stats.clone(),
        ));
        tasks.spawn(reach::run(
            endpoint.clone(),
            discovery.clone(),
            cfg.stun_servers.clone(),
            reach.clone(),
            tasks.clone(),
        ));
        let relay_client = Arc::new(RelayClient::new(cfg.relay_via.clone(), cfg.relay_auto));
        tasks.spawn(relay_client::keep_reservations(
            relay_client.clone(),
            conns.clone(),
            discovery.clone(),
            reach.clone(),
            identity.id(),
            tasks.clone(),
        ));
        let announce = AnnounceBase {
            identity: &identity,
            discovery: &discovery,
            reach: &reach,
            addrs: advertised(cfg, &endpoint)?,
            explicit: !cfg.advertise.is_empty(),
            ttl: cfg
                .record_ttl
                .min(Duration::from_millis(hypha_dht::record::MAX_RECORD_TTL_MS)),
            tasks,
        };
        let relay = match cfg.relay.clone() {
            Some(relay_cfg) => {
                let service = Arc::new(
                    RelayService::new(relay_cfg).context("cannot open the relay capture file")?,
                );
                announce.relay(service.clone());
                tracing::info!(id = %identity.id(), "relaying for peers on QUIC {}", endpoint.local_addr()?);
                Some(service)
            }
            None => None,
        };
        let seeder = match served {
            Some(engine) => {
                let state = Arc::new(SeederState {
                    engine: engine.clone(),
                    models: offer.models.clone(),
                    identity: identity.clone(),
                    offer: offer.clone(),
                    metrics: metrics.clone(),
                    ledger: ledger.clone(),
                    receipt_interval: cfg.receipt_interval.max(1),
                    free_tier: FreeTier::new(cfg.free_tier_per_minute),
                    unpaid: Unpaid::default(),
                    running: std::sync::Mutex::new(std::collections::HashSet::new()),
                    decode_tps: std::sync::atomic::AtomicU32::new(0),
                    discovery: Some(discovery.clone()),
                    balances: Arc::new(NetworkBalances::new(identity.id(), tasks.clone())),
                    prep: prep.clone(),
                });
                if announce.addrs.is_empty() {
                    tracing::warn!(
                        "QUIC bound to {}: provider records carry no address; pass --advertise",
                        endpoint.local_addr()?
                    );
                }
                announce.model(engine, &offer, &relay_client, state.clone());
                tracing::info!(id = %identity.id(), "serving peers on QUIC {}", endpoint.local_addr()?);
                Some(state)
            }
            None => None,
        };
        let (punches, punch_dials) = Punches::new(identity.id(), cfg.pow_bits, conns.clone());
        tasks.spawn(punch::dialer(conns.clone(), punch_dials, tasks.clone()));
        let inbound = Arc::new(Inbound {
            hello,
            metrics: metrics.clone(),
            max_peers: cfg.max_peers.clamp(1, pool::MAX_PEERS),
            pow_bits: cfg.pow_bits,
            seeder,
            discovery: Some(discovery.clone()),
            conns: conns.clone(),
            punches,
            relay: relay.clone(),
            relay_client: relay_client.clone(),
            tasks: tasks.clone(),
        });
        tasks.spawn(inbound::run(endpoint.clone(), inbound, adopted));
        let dialer = Arc::new(Dialer::new(
            conns,
            Some(discovery.clone()),
            Some(reach.clone()),
            identity.clone(),
            metrics.clone(),
            tasks.clone(),
        ));
        let party = Arc::new(Party {
            identity: identity.clone(),
            ledger: ledger.clone(),
            pow_bits: cfg.pow_bits,
            tasks: tasks.clone(),
            limits: cfg.spend,
        });
        let peers = Arc::new(
            Peers::new(
                dialer,
                cfg.peers.clone(),
                Some(discovery),
                metrics.clone(),
                party,
            )
            .map_err(anyhow::Error::msg)?,
        );
        if !cfg.peers.is_empty() {
            let probe = peers.clone();
            tasks.spawn(async move {
                probe.connect_all().await;
            });
        }
        Ok(Self {
            identity,
            paths: endpoint.paths().clone(),
            endpoint,
            ledger,
            peers,
            reach,
            relay,
            relay_client,
        })
    }
}

/// The node's key (made with the required proof of work on first start)
/// and its receipt log.
async fn open_identity(cfg: &NodeConfig) -> anyhow::Result<(Arc<Identity>, hypha_ledger::Ledger)> {
    let dir = identity::data_dir(cfg.data_dir.as_deref())?;
    let ident = Arc::new(Identity::load_or_create_with_pow(&dir, cfg.pow_bits)?);
    if ident.pow_bits() < cfg.pow_bits {
        tracing::warn!(
            have = ident.pow_bits(),
            need = cfg.pow_bits,
            "this node's key has too little proof of work: peers will refuse it"
        );
    }
    let (log, recovery) = open_ledger(&dir).await?;
    if recovery.truncated_bytes > 0 {
        tracing::warn!(
            bytes = recovery.truncated_bytes,
            "ledger: cut a torn final write from the log"
        );
    }
    tracing::info!(receipts = recovery.receipts, "ledger opened");
    Ok((ident, log))
}

/// The addresses records name: `--advertise`, else the QUIC address when
/// it names a concrete IP.
fn advertised(cfg: &NodeConfig, endpoint: &Endpoint) -> anyhow::Result<Vec<SocketAddr>> {
    if !cfg.advertise.is_empty() {
        return Ok(cfg.advertise.clone());
    }
    let a = endpoint.local_addr()?;
    Ok(if a.ip().is_unspecified() {
        Vec::new()
    } else {
        vec![a]
    })
}

/// What every announcement of this node shares.
struct AnnounceBase<'a> {
    identity: &'a Arc<Identity>,
    discovery: &'a Discovery,
    reach: &'a Arc<Reachability>,
    addrs: Vec<SocketAddr>,
    explicit: bool,
    ttl: Duration,
    tasks: &'a Tasks,
}

impl AnnounceBase<'_> {
    fn publish(&self, what: Announcement, capacity: Arc<dyn Capacity>) {
        self.tasks.spawn(announce::publish_loop(
            self.discovery.clone(),
            self.identity.clone(),
            what,
            capacity,
            self.tasks.clone(),
        ));
    }

    /// The relay service's record (never in the catalog).
    fn relay(&self, service: Arc<RelayService>) {
        let what = Announcement {
            names: vec![hypha_dht::RELAY_SERVICE.to_owned()],
            explicit: self.explicit,
            reach: Some(self.reach.clone()),
            relays: None,
            catalog: false,
            addrs: self.addrs.clone(),
            model_sha256: [0; 32],
            context_length: 0,
            backend: "relay".into(),
            price_prompt_micro: 0,
            price_completion_micro: 0,
            ttl: self.ttl,
        };
        self.publish(what, service);
    }

    /// A record per name of the served model, naming the relays this node
    /// holds reservations at.
    fn model(
        &self,
        engine: &Engine,
        offer: &Offer,
        relays: &Arc<RelayClient>,
        state: Arc<SeederState>,
    ) {
        let info = engine.info();
        let what = Announcement {
            names: offer.models.clone(),
            explicit: self.explicit,
            reach: Some(self.reach.clone()),
            relays: Some(relays.clone()),
            catalog: true,
            addrs: self.addrs.clone(),
            model_sha256: offer.model_sha256,
            context_length: info.ctx_per_slot,
            backend: info.device.clone(),
            price_prompt_micro: offer.price_prompt_micro,
            price_completion_micro: offer.price_completion_micro,
            ttl: self.ttl,
        };
        self.publish(what, state);
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
