//! The consumer side of remote inference: a bounded cache of connections
//! to peers, providers found through configured peers and the DHT, and one
//! request stream per remote generation.
//!
//! [`Connections`] holds one slot per peer. The first user of a slot (a
//! request, a DHT query, the start-up probe) dials it under a lock, so
//! concurrent users share one handshake; later ones reuse the connection
//! while it is open, and a closed one is redialed. Configured peers stay in
//! the cache; others are evicted, least recently used first, when it is
//! full.
//!
//! A request goes to a provider of its model: configured or connected peers
//! whose hello lists it, and the providers the DHT names (cached for
//! [`PROVIDER_CACHE`] or until their records expire). Providers are tried
//! best first by [`score`]: recent failures, then measured round-trip time,
//! advertised free slots and decode speed. A seeder that refuses (busy, out
//! of free tier, unknown model) or fails before answering is skipped for
//! the next one, so a client only sees an error when no provider could
//! start its request. A seeder must answer a request (`Accepted`, or any
//! frame) within [`START_TIMEOUT`]: a connection to a node that died
//! without closing it looks open until QUIC's idle timeout.
//!
//! Receipts: every `Chunk`'s token ids feed a running digest. Each receipt
//! the seeder offers is checked against what actually arrived (request,
//! both ids, model hash, token count and digest, price from the seeder's
//! hello, its signature) and only then countersigned; a receipt that
//! claims anything else is a protocol violation. The last receipt (after
//! `Done`) is appended to this node's ledger before the client hears that
//! the request finished; a request cut short records the last receipt
//! both signed.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypha_dht::ProviderRecord;
use hypha_engine::{Finish, FinishReason};
use hypha_ledger::{Ledger, Receipt, SignedReceipt, TokenDigest, VerifiedReceipt};
use hypha_wire::{ArchivedMessage, Countersign, InferenceRequest, Message, NodeId};

use crate::discovery::{unix_ms, Discovery};
use crate::hello::VerifiedHello;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::proto::{
    close_for_violation, hello_as_dialer, kind_of, FramedRecv, FramedSend, PeerError,
    STREAM_CANCELLED,
};
use crate::transport::Endpoint;

/// How long a consumer waits for the last receipt after `Done`.
pub const LAST_RECEIPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a dial may take before the peer counts as down. A QUIC
/// handshake is one or two round trips; a silent address would otherwise
/// hold a request until the idle timeout.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a seeder may take to answer a request with its first frame.
/// Admission is a table lookup and a queue push: a live seeder answers in
/// a round trip, while a dead one's connection would look open until QUIC's
/// idle timeout.
pub const START_TIMEOUT: Duration = Duration::from_secs(3);
/// Peers one node may be configured with.
pub const MAX_CONFIGURED_PEERS: usize = crate::seeder::MAX_PEERS;
/// Connections cached at once (configured peers, providers, DHT contacts):
/// a few buckets' worth of contacts plus the providers in use.
pub const MAX_CONNECTIONS: usize = 256;
/// How long providers found through the DHT are reused before asking
/// again (sooner when their records expire): long enough to spare a lookup
/// per request, short enough to notice new seeders.
pub const PROVIDER_CACHE: Duration = Duration::from_secs(30);
/// The most time spent asking for a punch before dialing a provider.
pub const PUNCH_BUDGET: Duration = Duration::from_secs(3);
/// How long a direct path (a punch and a dial) may take to a provider that
/// also names relays, before a relay is used instead.
pub const DIRECT_BUDGET: Duration = Duration::from_secs(4);
/// The first retry of a direct path to a peer reached through a relay;
/// retries back off to [`UPGRADE_MAX_WAIT`].
pub const UPGRADE_FIRST_WAIT: Duration = Duration::from_secs(5);
pub const UPGRADE_MAX_WAIT: Duration = Duration::from_secs(5 * 60);
/// Once a direct path replaced a relayed one, the relayed connection closes
/// when no request of this node runs on it any more (checked this often)
/// ...
const DRAIN_CHECK: Duration = Duration::from_secs(2);
/// ... and at the latest after this long.
const DRAIN_MAX: Duration = Duration::from_secs(10 * 60);
/// Providers tried for one request before giving up.
pub const MAX_PROVIDER_ATTEMPTS: usize = 4;
/// How long a failure counts against a provider in [`score`].
pub const FAILURE_MEMORY: Duration = Duration::from_secs(120);
/// Models whose providers one `GET /v1/models` looks up.
const MAX_LISTED_MODELS: usize = 64;
/// Of those, lookups running at once.
const LISTING_LOOKUPS: usize = 8;
/// Models remembered with cached providers.
const MAX_CACHED_MODELS: usize = 256;
/// Health entries kept (one per provider tried).
const MAX_HEALTH: usize = 4096;

/// A peer to dial: `NodeId@host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    pub id: NodeId,
    pub addr: SocketAddr,
}

impl FromStr for PeerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (id, addr) = s
            .split_once('@')
            .ok_or_else(|| format!("{s:?} is not NODE_ID@HOST:PORT"))?;
        let id: NodeId = id
            .parse()
            .map_err(|e| format!("bad node id in {s:?}: {e}"))?;
        let addr = addr
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {addr:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr:?} resolves to no address"))?;
        Ok(Self { id, addr })
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.id, self.addr)
    }
}

/// Why a remote request could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The seeder answered with an error (HTTP-like code).
    #[error("seeder {peer} refused: {message}")]
    Refused {
        peer: NodeId,
        code: u16,
        message: String,
    },
    /// No known peer serves the model.
    #[error("no peer serves the model {model:?}; the network offers {available:?}")]
    NoProvider {
        model: String,
        available: Vec<String>,
    },
    /// No reachable peer serves the model, and some peers could not be
    /// reached to ask.
    #[error("no reachable peer serves the model {model:?}; unreachable: {failures}")]
    Unreachable { model: String, failures: String },
    /// Every provider failed (down, unreachable, broken).
    #[error("seeder {peer} failed: {source}")]
    Failed { peer: NodeId, source: PeerError },
}

/// One event of a remote generation, as the HTTP layer consumes it.
#[derive(Debug)]
pub enum RemoteEvent {
    Token(String),
    Done {
        text: String,
        finish: Finish,
        /// Micro-credits of the receipt recorded for the request.
        credits: Option<u64>,
    },
    Failed(String),
}

/// This node as a party to receipts.
pub struct Party {
    pub identity: Arc<Identity>,
    pub ledger: Ledger,
    /// Proof of work required of a peer's identity.
    pub pow_bits: u32,
}

struct Entry {
    /// Where the peer was last dialed (set under the `conn` lock).
    addr: std::sync::Mutex<SocketAddr>,
    /// The open connection and the peer's hello; the lock is held while
    /// dialing.
    conn: tokio::sync::Mutex<Option<(quinn::Connection, Arc<VerifiedHello>)>>,
    /// Models from the peer's last hello; kept across reconnects.
    models: std::sync::Mutex<Vec<String>>,
    last_used_ms: AtomicU64,
}

impl Entry {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr: std::sync::Mutex::new(addr),
            conn: tokio::sync::Mutex::new(None),
            models: std::sync::Mutex::new(Vec::new()),
            last_used_ms: AtomicU64::new(unix_ms()),
        }
    }

    /// The open connection, if there is one and nobody is dialing.
    fn live(&self) -> Option<quinn::Connection> {
        self.conn.try_lock().ok().and_then(|c| {
            c.as_ref()
                .filter(|(c, _)| c.close_reason().is_none())
                .map(|(c, _)| c.clone())
        })
    }
}

/// A peer in the connection cache, as `/v1/network` shows it.
#[derive(Debug, Clone)]
pub struct KnownPeer {
    pub addr: PeerAddr,
    pub connected: bool,
    /// The relay the open connection goes through; `None` for a direct
    /// one.
    pub via: Option<NodeId>,
    pub models: Vec<String>,
    pub rtt: Option<Duration>,
    pub configured: bool,
}

/// This node's outgoing connections, one slot per peer, bounded.
pub struct Connections {
    endpoint: Arc<Endpoint>,
    hello: Message,
    metrics: Arc<Metrics>,
    pow_bits: u32,
    dial_timeout: Duration,
    entries: std::sync::Mutex<HashMap<NodeId, Arc<Entry>>>,
    /// Configured peers: never evicted.
    pinned: Vec<PeerAddr>,
    /// Serves the streams peers open on connections this node dialed (a
    /// rendezvous forwards punch requests that way).
    listener: std::sync::OnceLock<std::sync::Weak<crate::seeder::Listener>>,
}

impl Connections {
    pub fn new(
        endpoint: Arc<Endpoint>,
        hello: Message,
        metrics: Arc<Metrics>,
        pow_bits: u32,
        dial_timeout: Duration,
        pinned: &[PeerAddr],
    ) -> Self {
        let entries = pinned
            .iter()
            .map(|p| (p.id, Arc::new(Entry::new(p.addr))))
            .collect();
        Self {
            endpoint,
            hello,
            metrics,
            pow_bits,
            dial_timeout,
            entries: std::sync::Mutex::new(entries),
            pinned: pinned.to_vec(),
            listener: std::sync::OnceLock::new(),
        }
    }

    /// Where streams peers open on dialed connections are served.
    pub fn set_listener(&self, listener: &Arc<crate::seeder::Listener>) {
        let _ = self.listener.set(Arc::downgrade(listener));
    }

    /// The open connection to `id`, if any.
    pub fn live(&self, id: &NodeId) -> Option<quinn::Connection> {
        let e = lock(&self.entries).get(id).cloned()?;
        e.live()
    }

    /// The slot for `peer`, made if needed: one per peer, whatever address
    /// it is reached at, so concurrent users (a request, a DHT query) share
    /// one dial and its connection.
    fn entry(&self, peer: &PeerAddr) -> Arc<Entry> {
        let mut entries = lock(&self.entries);
        if let Some(e) = entries.get(&peer.id) {
            e.last_used_ms.store(unix_ms(), Ordering::Relaxed);
            return e.clone();
        }
        if entries.len() >= MAX_CONNECTIONS && !entries.contains_key(&peer.id) {
            // Evict the least recently used slot that is not configured,
            // one without an open connection first: closing a live one
            // would cut whatever runs on it.
            let victim = entries
                .iter()
                .filter(|(id, _)| !self.is_pinned(id))
                .min_by_key(|(_, e)| (e.live().is_some(), e.last_used_ms.load(Ordering::Relaxed)))
                .map(|(id, _)| *id);
            if let Some(id) = victim {
                if let Some(old) = entries.remove(&id) {
                    if let Some(c) = old.live() {
                        c.close(crate::proto::CLOSE_NORMAL, b"connection cache full");
                    }
                }
            }
        }
        let e = Arc::new(Entry::new(peer.addr));
        entries.insert(peer.id, e.clone());
        e
    }

    /// Where the connection to `id` stood: its identity and datagrams
    /// received so far, to tell later whether it went silent.
    pub fn mark(&self, id: &NodeId) -> Option<(usize, u64)> {
        self.live(id)
            .map(|c| (c.stable_id(), c.stats().udp_rx.datagrams))
    }

    /// Closes the connection to `id` when nothing at all arrived on it since
    /// `mark` (a live peer acknowledges a request within a round trip even
    /// when it is slow to answer), so the next use dials afresh. A peer
    /// that is merely slow keeps its connection and the streams on it.
    pub fn discard_if_silent(&self, id: &NodeId, mark: Option<(usize, u64)>) {
        let Some((stable, rx)) = mark else {
            return;
        };
        if let Some(c) = self.live(id) {
            if c.stable_id() == stable && c.stats().udp_rx.datagrams == rx {
                c.close(crate::proto::CLOSE_NORMAL, b"not answering");
            }
        }
    }

    fn is_pinned(&self, id: &NodeId) -> bool {
        self.pinned.iter().any(|p| p.id == *id)
    }

    /// The open connection to `peer` and its hello, dialing when there is
    /// none (or when `fresh` asks to replace the current one). An open
    /// connection serves whatever address it was made to (a relayed path,
    /// or a NAT mapping the peer opened itself); a relayed path's virtual
    /// address is never dialed here: [`Connections::get_relayed`] makes
    /// those.
    pub async fn get(
        &self,
        peer: &PeerAddr,
        fresh: bool,
    ) -> Result<(quinn::Connection, Arc<VerifiedHello>), PeerError> {
        self.get_at(peer, fresh, false).await
    }

    /// A connection to `target` through `relay`; an open connection to it
    /// (made meanwhile, by another request or the DHT) is used instead,
    /// unless `fresh` asks to replace it.
    pub async fn get_relayed(
        &self,
        target: NodeId,
        relay: &PeerAddr,
        fresh: bool,
    ) -> Result<(quinn::Connection, Arc<VerifiedHello>), PeerError> {
        let paths = self.endpoint.paths();
        let addr = crate::relay::connect_via(self, paths, relay, target).await?;
        // Closes the path unless a connection over it came of it, also when
        // this future is dropped half way.
        let path = crate::relay::PathGuard::new(paths, addr);
        let (conn, hello) = self
            .get_at(&PeerAddr { id: target, addr }, fresh, true)
            .await?;
        if path.keep(&conn) {
            self.metrics.relayed_dials.fetch_add(1, Ordering::Relaxed);
        }
        Ok((conn, hello))
    }

    async fn get_at(
        &self,
        peer: &PeerAddr,
        fresh: bool,
        relayed: bool,
    ) -> Result<(quinn::Connection, Arc<VerifiedHello>), PeerError> {
        let e = self.entry(peer);
        let mut slot = e.conn.lock().await;
        if let Some((c, h)) = slot.as_ref() {
            if !fresh && c.close_reason().is_none() {
                return Ok((c.clone(), h.clone()));
            }
        }
        let virtual_addr = crate::relay::is_virtual(&peer.addr);
        if virtual_addr && !relayed {
            return Err(PeerError::Unreachable(format!(
                "{} is a relayed path's address: no longer open",
                peer.addr
            )));
        }
        if let Some((old, _)) = slot.take() {
            old.close(crate::proto::CLOSE_NORMAL, b"replaced");
        }
        // A configured peer is dialed where it was configured, unless
        // through a relay.
        let addr = match self.pinned.iter().find(|p| p.id == peer.id) {
            Some(p) if !virtual_addr => p.addr,
            _ => peer.addr,
        };
        *lock(&e.addr) = addr;
        let (conn, hello) = self.dial_and_greet(addr, peer.id).await?;
        *lock(&e.models) = hello.offer.models.clone();
        self.adopt(&conn, peer.id, &hello);
        *slot = Some((conn.clone(), hello.clone()));
        Ok((conn, hello))
    }

    /// Dials `addr` expecting `id`, and exchanges hellos.
    async fn dial_and_greet(
        &self,
        addr: SocketAddr,
        id: NodeId,
    ) -> Result<(quinn::Connection, Arc<VerifiedHello>), PeerError> {
        let conn = tokio::time::timeout(self.dial_timeout, self.endpoint.dial(addr, id))
            .await
            .map_err(|_| {
                PeerError::Unreachable(format!(
                    "no answer from {addr} within {:?}",
                    self.dial_timeout
                ))
            })?
            .map_err(|err| PeerError::Unreachable(err.to_string()))?;
        let hello: VerifiedHello =
            match hello_as_dialer(&conn, id, &self.hello, self.pow_bits).await {
                Ok(h) => h,
                Err(err) => {
                    if err.is_violation() {
                        self.metrics.peer_violations.fetch_add(1, Ordering::Relaxed);
                        close_for_violation(&conn, id, &err);
                    }
                    return Err(err);
                }
            };
        tracing::debug!(peer = %id, %addr, models = ?hello.offer.models, "connected to peer");
        Ok((conn, Arc::new(hello)))
    }

    /// Dials `direct` and, when the peer's slot still holds the relayed
    /// connection `relayed`, puts the direct one in its place (the caller
    /// closes the relayed one once its requests are done). False when the
    /// slot moved on meanwhile (the new connection is closed).
    pub async fn upgrade(
        &self,
        direct: &PeerAddr,
        relayed: &quinn::Connection,
    ) -> Result<bool, PeerError> {
        let (conn, hello) = self.dial_and_greet(direct.addr, direct.id).await?;
        let e = self.entry(direct);
        let mut slot = e.conn.lock().await;
        let current = slot.as_ref().map(|(c, _)| c.stable_id());
        if current != Some(relayed.stable_id()) {
            conn.close(crate::proto::CLOSE_NORMAL, b"not needed");
            return Ok(false);
        }
        self.adopt(&conn, direct.id, &hello);
        *lock(&e.addr) = direct.addr;
        *lock(&e.models) = hello.offer.models.clone();
        *slot = Some((conn, hello));
        Ok(true)
    }

    /// Starts watching and serving a new connection.
    fn adopt(&self, conn: &quinn::Connection, id: NodeId, hello: &Arc<VerifiedHello>) {
        if crate::relay::is_virtual(&conn.remote_address()) {
            crate::relay::tie(self.endpoint.paths(), conn);
        }
        self.metrics.peers_connected.fetch_add(1, Ordering::Relaxed);
        let watched = conn.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let why = watched.closed().await;
            metrics.peers_connected.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(peer = %id, "peer connection closed: {why}");
        });
        if let Some(l) = self.listener.get().and_then(std::sync::Weak::upgrade) {
            let shutdown = l.shutdown.clone();
            // Boxed as `dyn Send`: serving a stream can dial (punching),
            // which leads back here, and a recursive future needs a
            // named type.
            let serve: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = Box::pin(
                crate::seeder::serve_streams(conn.clone(), id, hello.clone(), l, shutdown),
            );
            tokio::spawn(serve);
        }
    }

    /// Every peer in the cache.
    pub fn known(&self) -> Vec<KnownPeer> {
        let entries: Vec<(NodeId, Arc<Entry>)> = lock(&self.entries)
            .iter()
            .map(|(id, e)| (*id, e.clone()))
            .collect();
        entries
            .into_iter()
            .map(|(id, e)| {
                let live = e.live();
                KnownPeer {
                    addr: PeerAddr {
                        id,
                        addr: *lock(&e.addr),
                    },
                    connected: live.is_some(),
                    via: live
                        .as_ref()
                        .and_then(|c| self.endpoint.paths().via(&c.remote_address())),
                    rtt: live.map(|c| c.rtt()),
                    models: lock(&e.models).clone(),
                    configured: self.is_pinned(&id),
                }
            })
            .collect()
    }

    /// The round-trip time of an open connection to `id`.
    fn rtt(&self, id: &NodeId) -> Option<Duration> {
        let e = lock(&self.entries).get(id).cloned()?;
        e.live().map(|c| c.rtt())
    }
}

/// A provider a request may go to.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub addr: PeerAddr,
    /// Its record named several addresses (its own and its NAT's): it sits
    /// behind a NAT, so a hole is punched before dialing it.
    pub punch: bool,
    /// From its provider record, when the DHT named it.
    pub free_slots: Option<u32>,
    pub decode_tokens_per_s: Option<u32>,
    /// Context tokens per request its record offers.
    pub context_length: Option<u32>,
    /// Relays its record names: used when no direct path opens within
    /// [`DIRECT_BUDGET`].
    pub relays: Vec<PeerAddr>,
}

/// What this node saw of a provider lately.
#[derive(Debug, Clone, Copy, Default)]
pub struct Health {
    /// Failures in a row.
    pub failures: u32,
    pub last_failure: Option<Instant>,
}

/// A provider's cost, lower is better, in rough milliseconds: recent
/// failures dominate (a seeder that just failed is tried last), then the
/// round trip, then this node's requests already running there (each
/// costs [`RUNNING_COST_MS`], so concurrent requests spread over seeders
/// instead of queueing on the nearest), whether it advertised a free slot,
/// and how fast it decodes (a 100 tokens/s seeder adds 100).
pub fn score(
    c: &Candidate,
    health: &Health,
    rtt: Option<Duration>,
    running: u32,
    now: Instant,
) -> u64 {
    let recent = health
        .last_failure
        .is_some_and(|t| now.saturating_duration_since(t) < FAILURE_MEMORY);
    let failures = if recent {
        u64::from(health.failures) * 100_000
    } else {
        0
    };
    // An unknown round trip costs about a dial on a distant link.
    // Round trips within RTT_GRAIN_MS of each other count as equal (the
    // estimate jitters by that much), so equal providers share the load.
    let rtt_ms = rtt.map_or(200, |d| d.as_millis() as u64 / RTT_GRAIN_MS * RTT_GRAIN_MS);
    let busy = if c.free_slots == Some(0) { 2_000 } else { 0 };
    let speed = c
        .decode_tokens_per_s
        .filter(|&t| t > 0)
        .map_or(200, |t| 10_000 / u64::from(t));
    failures + rtt_ms + u64::from(running) * RUNNING_COST_MS + busy + speed
}

/// Resolution of the round trip in [`score`].
pub const RTT_GRAIN_MS: u64 = 5;

/// What one of this node's requests running on a seeder adds to its score:
/// about a short request's share of a busy seeder's time.
pub const RUNNING_COST_MS: u64 = 150;

/// This node's requests running per seeder.
#[derive(Default)]
struct Running(
    std::sync::Mutex<HashMap<NodeId, u32>>,
    /// By connection (`stable_id`): a relayed connection replaced by a
    /// direct one closes when its last request ends.
    std::sync::Mutex<HashMap<usize, u32>>,
);

impl Running {
    fn on(&self, conn: &quinn::Connection) -> u32 {
        lock(&self.1).get(&conn.stable_id()).copied().unwrap_or(0)
    }
}

/// Counts one request on a seeder (and its connection) until dropped.
struct RunningGuard {
    running: Arc<Running>,
    peer: NodeId,
    conn: usize,
}

impl RunningGuard {
    fn new(running: &Arc<Running>, peer: NodeId, conn: &quinn::Connection) -> Self {
        *lock(&running.0).entry(peer).or_default() += 1;
        *lock(&running.1).entry(conn.stable_id()).or_default() += 1;
        Self {
            running: running.clone(),
            peer,
            conn: conn.stable_id(),
        }
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        {
            let mut m = lock(&self.running.1);
            if let Some(n) = m.get_mut(&self.conn) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.conn);
                }
            }
        }
        let mut m = lock(&self.running.0);
        if let Some(n) = m.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.peer);
            }
        }
    }
}

struct CachedProviders {
    records: Vec<ProviderRecord>,
    until: Instant,
}

/// The peers this node sends requests to.
pub struct Peers {
    conns: Arc<Connections>,
    configured: Vec<PeerAddr>,
    discovery: Option<Discovery>,
    metrics: Arc<Metrics>,
    party: Arc<Party>,
    next_request_id: AtomicU64,
    health: std::sync::Mutex<HashMap<NodeId, Health>>,
    cache: std::sync::Mutex<HashMap<String, CachedProviders>>,
    running: Arc<Running>,
    /// This node's own candidates, for punch requests.
    reach: Option<Arc<crate::reach::Reachability>>,
    /// Peers no direct path opened to lately (reached through a relay):
    /// the next connection goes to their relays first.
    no_direct: Arc<std::sync::Mutex<HashMap<NodeId, Instant>>>,
}

impl Peers {
    pub fn new(
        conns: Arc<Connections>,
        configured: Vec<PeerAddr>,
        discovery: Option<Discovery>,
        metrics: Arc<Metrics>,
        party: Arc<Party>,
        reach: Option<Arc<crate::reach::Reachability>>,
    ) -> Result<Self, String> {
        if configured.len() > MAX_CONFIGURED_PEERS {
            return Err(format!("at most {MAX_CONFIGURED_PEERS} peers"));
        }
        let mut seed = [0u8; 8];
        // Request ids only need to differ between this node's requests; a
        // random start keeps them apart across restarts.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
        Ok(Self {
            conns,
            configured,
            discovery,
            metrics,
            party,
            next_request_id: AtomicU64::new(u64::from_le_bytes(seed) >> 1),
            health: std::sync::Mutex::new(HashMap::new()),
            cache: std::sync::Mutex::new(HashMap::new()),
            running: Arc::default(),
            reach,
            no_direct: Arc::default(),
        })
    }

    /// A fresh request id.
    pub fn next_request_id(&self) -> u64 {
        self.next_request_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn connections(&self) -> &Arc<Connections> {
        &self.conns
    }

    pub fn discovery(&self) -> Option<&Discovery> {
        self.discovery.as_ref()
    }

    /// Every model on the network this node can find, with its providers'
    /// ids: peers' hellos, the DHT's catalog (each listed model's providers
    /// looked up, or taken from the cache), records held here.
    pub async fn models(&self) -> Vec<(String, Vec<NodeId>)> {
        if let Some(d) = &self.discovery {
            use futures_util::StreamExt as _;
            let names = d.catalog().await;
            futures_util::stream::iter(names.into_iter().take(MAX_LISTED_MODELS))
                .map(|n: String| async move {
                    self.discovered(&n, false).await;
                })
                .buffer_unordered(LISTING_LOOKUPS)
                .collect::<Vec<()>>()
                .await;
        }
        let mut out: Vec<(String, Vec<NodeId>)> = Vec::new();
        let mut add = |model: &str, id: NodeId| match out.iter_mut().find(|(m, _)| m == model) {
            Some((_, ids)) => {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            None => out.push((model.to_owned(), vec![id])),
        };
        for p in self.conns.known() {
            for m in &p.models {
                add(m, p.addr.id);
            }
        }
        let now = unix_ms();
        let cached: Vec<ProviderRecord> = lock(&self.cache)
            .values()
            .flat_map(|c| c.records.iter().cloned())
            .collect();
        for r in &cached {
            if r.expires_ms > now {
                add(&r.model, r.publisher);
            }
        }
        out
    }

    /// The configured peers and whether each is connected now.
    pub fn status(&self) -> Vec<(PeerAddr, bool)> {
        let known = self.conns.known();
        self.configured
            .iter()
            .map(|p| {
                let up = known.iter().any(|k| k.addr.id == p.id && k.connected);
                (p.clone(), up)
            })
            .collect()
    }

    /// Dials every configured peer not yet connected, to learn what they
    /// serve; the peers that could not be reached, and why.
    pub async fn connect_all(&self) -> Vec<(PeerAddr, PeerError)> {
        let dials = self.configured.iter().map(|p| async move {
            match self.conns.get(p, false).await {
                Ok(_) => None,
                Err(err) => {
                    tracing::warn!(peer = %p, "cannot connect: {err}");
                    Some((p.clone(), err))
                }
            }
        });
        futures_util::future::join_all(dials)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Health as this node saw it.
    pub fn health(&self, id: &NodeId) -> Health {
        lock(&self.health).get(id).copied().unwrap_or_default()
    }

    fn failed(&self, id: NodeId) {
        let mut h = lock(&self.health);
        if h.len() >= MAX_HEALTH && !h.contains_key(&id) {
            // Failures older than FAILURE_MEMORY no longer count.
            h.retain(|_, v| v.last_failure.is_some_and(|t| t.elapsed() < FAILURE_MEMORY));
            if h.len() >= MAX_HEALTH {
                return;
            }
        }
        let e = h.entry(id).or_default();
        e.failures = e.failures.saturating_add(1);
        e.last_failure = Some(Instant::now());
    }

    fn succeeded(&self, id: &NodeId) {
        lock(&self.health).remove(id);
    }

    /// Asks `target` (through rendezvous nodes near it in the DHT) to dial
    /// this node's candidates, so the dial that follows meets an open hole.
    async fn punch(&self, target: NodeId) -> bool {
        self.puncher().punch(target).await
    }

    fn puncher(&self) -> Puncher {
        Puncher {
            conns: self.conns.clone(),
            discovery: self.discovery.clone(),
            reach: self.reach.clone(),
            identity: self.party.identity.clone(),
            metrics: self.metrics.clone(),
            no_direct: self.no_direct.clone(),
            running: self.running.clone(),
        }
    }

    /// The connection to provider `c`: the open one; else a direct dial
    /// (a hole punched first when its record says it sits behind a NAT);
    /// else, when no direct path opened within [`DIRECT_BUDGET`], through
    /// one of the relays its record names, with a direct path tried again
    /// in the background.
    async fn connect(
        &self,
        c: &Candidate,
        fresh: bool,
    ) -> Result<(quinn::Connection, Arc<VerifiedHello>), PeerError> {
        let peer = c.addr.id;
        let live = self.conns.live(&peer).is_some();
        if live && !fresh {
            // The open connection, whatever path it takes.
            return self.conns.get_at(&c.addr, false, false).await;
        }
        let started = Instant::now();
        let direct = || async {
            let punched = c.punch
                && tokio::time::timeout(PUNCH_BUDGET, self.punch(peer))
                    .await
                    .unwrap_or(false);
            let got = self.conns.get(&c.addr, fresh).await;
            if got.is_ok() && punched {
                self.punched(started);
            }
            got
        };
        let skip_direct = !c.relays.is_empty()
            && lock(&self.no_direct)
                .get(&peer)
                .is_some_and(|t| t.elapsed() < FAILURE_MEMORY);
        let direct_failed = if skip_direct {
            // A background task keeps trying the direct path.
            PeerError::Unreachable(format!("no direct path to {} lately", c.addr))
        } else if c.relays.is_empty() {
            return direct().await;
        } else {
            match tokio::time::timeout(DIRECT_BUDGET, direct()).await {
                Ok(Ok(got)) => return Ok(got),
                Ok(Err(e)) => e,
                Err(_) => PeerError::Unreachable(format!(
                    "no direct path to {} within {DIRECT_BUDGET:?}",
                    c.addr
                )),
            }
        };
        if self.conns.live(&peer).is_some() {
            // A connection opened meanwhile (the DHT dialed the peer at an
            // address its NAT opened toward this node).
            return self.conns.get_at(&c.addr, false, false).await;
        }
        tracing::info!(%peer, "no direct path ({direct_failed}); trying its relays");
        {
            let mut m = lock(&self.no_direct);
            if m.len() >= MAX_HEALTH {
                m.retain(|_, t| t.elapsed() < FAILURE_MEMORY);
            }
            if m.len() < MAX_HEALTH {
                m.insert(peer, Instant::now());
            }
        }
        let mut last = direct_failed;
        // Relays that failed lately go last.
        let mut relays = c.relays.clone();
        relays.sort_by_key(|r| self.health(&r.id).failures);
        for relay in &relays {
            match self.conns.get_relayed(peer, relay, false).await {
                Ok((conn, hello)) => {
                    tracing::info!(%peer, via = %relay.id, "connected through a relay");
                    let puncher = self.puncher();
                    let direct = c.addr.clone();
                    let relayed = conn.clone();
                    let punch = c.punch;
                    tokio::spawn(async move {
                        puncher.upgrade(direct, relayed, punch).await;
                    });
                    return Ok((conn, hello));
                }
                Err(e) => {
                    tracing::info!(%peer, via = %relay.id, "relay gave no path: {e}");
                    self.failed(relay.id);
                    last = e;
                }
            }
        }
        if skip_direct {
            // Every relay failed: the direct path is the last chance.
            return direct().await;
        }
        Err(last)
    }

    /// A punched direct path opened, `started` ago.
    fn punched(&self, started: Instant) {
        self.metrics.punch_successes.fetch_add(1, Ordering::Relaxed);
        self.metrics.direct_path.observe(started.elapsed());
    }
}

/// What punching and upgrading need of a node, owned, for background
/// tasks.
struct Puncher {
    conns: Arc<Connections>,
    discovery: Option<Discovery>,
    reach: Option<Arc<crate::reach::Reachability>>,
    identity: Arc<Identity>,
    metrics: Arc<Metrics>,
    no_direct: Arc<std::sync::Mutex<HashMap<NodeId, Instant>>>,
    running: Arc<Running>,
}

impl Puncher {
    /// See [`Peers::punch`]; true when a rendezvous forwarded the request
    /// and the target took it.
    async fn punch(&self, target: NodeId) -> bool {
        let (Some(d), Some(reach)) = (&self.discovery, &self.reach) else {
            return false;
        };
        let mine: Vec<SocketAddr> = reach.view().candidates.iter().map(|c| c.addr).collect();
        let rendezvous: Vec<PeerAddr> = match d.find_node(target).await {
            Some(found) => found
                .closest
                .into_iter()
                .filter(|c| c.id != target)
                .map(|c| PeerAddr {
                    id: c.id,
                    addr: c.addr,
                })
                .collect(),
            None => Vec::new(),
        };
        let req = crate::punch::request(&self.identity, target, &mine);
        let ok = crate::punch::ask(&self.conns, &rendezvous, &req).await;
        self.metrics.punch_attempts.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%target, forwarded = ok, "punch requested");
        ok
    }

    /// Tries, with backoff, to replace the relayed connection `relayed`
    /// with a direct one to `direct` (punching first when `punch`), until
    /// it succeeds or the relayed connection closes.
    async fn upgrade(&self, direct: PeerAddr, relayed: quinn::Connection, punch: bool) {
        let since = Instant::now();
        let mut wait = UPGRADE_FIRST_WAIT;
        loop {
            tokio::select! {
                _ = relayed.closed() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let current = self.conns.live(&direct.id);
            if current.is_some_and(|c| c.stable_id() != relayed.stable_id()) {
                // Replaced meanwhile (redialed, or punched from the far end).
                return;
            }
            let attempt = async {
                let punched = punch
                    && tokio::time::timeout(PUNCH_BUDGET, self.punch(direct.id))
                        .await
                        .unwrap_or(false);
                let swapped = self.conns.upgrade(&direct, &relayed).await;
                (punched, swapped)
            };
            match tokio::time::timeout(DIRECT_BUDGET, attempt).await {
                Ok((_, Ok(false))) => return,
                Ok((punched, Ok(true))) => {
                    lock(&self.no_direct).remove(&direct.id);
                    let took = since.elapsed();
                    self.metrics.upgrades.fetch_add(1, Ordering::Relaxed);
                    if punched {
                        self.metrics.punch_successes.fetch_add(1, Ordering::Relaxed);
                    }
                    self.metrics.direct_path.observe(took);
                    tracing::info!(peer = %direct.id, after = ?took, "relayed connection upgraded to a direct path");
                    // The relayed connection closes once the requests on it
                    // are done.
                    let start = Instant::now();
                    while relayed.close_reason().is_none()
                        && self.running.on(&relayed) > 0
                        && start.elapsed() < DRAIN_MAX
                    {
                        tokio::time::sleep(DRAIN_CHECK).await;
                    }
                    relayed.close(crate::proto::CLOSE_NORMAL, b"moved to a direct path");
                    return;
                }
                Ok((_, Err(e))) => tracing::debug!(peer = %direct.id, "still no direct path: {e}"),
                Err(_) => tracing::debug!(peer = %direct.id, "still no direct path: timed out"),
            }
            wait = (wait * 2).min(UPGRADE_MAX_WAIT);
        }
    }
}

impl Peers {
    /// Providers of `model` the DHT names, from the cache while fresh.
    async fn discovered(&self, model: &str, refresh: bool) -> Vec<ProviderRecord> {
        let Some(d) = &self.discovery else {
            return Vec::new();
        };
        let now = Instant::now();
        if !refresh {
            if let Some(c) = lock(&self.cache).get(model) {
                if c.until > now {
                    return c.records.clone();
                }
            }
        }
        let Some(records) = d.lookup_providers(model).await else {
            // A lookup that could not finish is not remembered.
            return Vec::new();
        };
        let soonest = records.iter().map(|r| r.expires_ms).min();
        let life = soonest.map_or(PROVIDER_CACHE, |ms| {
            Duration::from_millis(ms.saturating_sub(unix_ms())).min(PROVIDER_CACHE)
        });
        let mut cache = lock(&self.cache);
        if cache.len() >= MAX_CACHED_MODELS {
            cache.retain(|_, c| c.until > now);
            if cache.len() >= MAX_CACHED_MODELS {
                cache.clear();
            }
        }
        cache.insert(
            model.to_owned(),
            CachedProviders {
                records: records.clone(),
                until: now + life,
            },
        );
        records
    }

    /// Every known provider of `model`, best first; `salt` orders
    /// providers of equal score (a request's id spreads requests over
    /// equally good seeders).
    pub async fn candidates(&self, model: &str, refresh: bool, salt: u64) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = self
            .conns
            .known()
            .into_iter()
            .filter(|k| k.models.iter().any(|m| m == model))
            // A relayed slot is only reached again through a relay its
            // record names.
            .filter(|k| k.connected || !crate::relay::is_virtual(&k.addr.addr))
            .map(|k| Candidate {
                addr: k.addr,
                punch: false,
                free_slots: None,
                decode_tokens_per_s: None,
                context_length: None,
                relays: Vec::new(),
            })
            .collect();
        let me = self.party.identity.id();
        for r in self.discovered(model, refresh).await {
            if r.publisher == me {
                continue;
            }
            let Some(addr) = r.addrs.first() else {
                continue;
            };
            let c = Candidate {
                addr: PeerAddr {
                    id: r.publisher,
                    addr: *addr,
                },
                punch: r.addrs.len() > 1,
                free_slots: Some(r.free_slots),
                decode_tokens_per_s: Some(r.decode_tokens_per_s),
                context_length: Some(r.context_length),
                relays: r
                    .relays
                    .iter()
                    .filter(|c| c.id != me && c.id != r.publisher)
                    .map(|c| PeerAddr {
                        id: c.id,
                        addr: c.addr,
                    })
                    .collect(),
            };
            match out.iter_mut().find(|o| o.addr.id == r.publisher) {
                Some(o) => {
                    o.free_slots = c.free_slots;
                    o.decode_tokens_per_s = c.decode_tokens_per_s;
                    o.context_length = c.context_length;
                    o.relays = c.relays;
                    if crate::relay::is_virtual(&o.addr.addr) {
                        o.addr = c.addr;
                        o.punch = c.punch;
                    }
                }
                None => out.push(c),
            }
        }
        let now = Instant::now();
        let mut scored: Vec<((u64, u64), Candidate)> = out
            .into_iter()
            .map(|c| {
                let running = lock(&self.running.0).get(&c.addr.id).copied().unwrap_or(0);
                let s = score(
                    &c,
                    &self.health(&c.addr.id),
                    self.conns.rtt(&c.addr.id),
                    running,
                    now,
                );
                let mut id8 = [0u8; 8];
                id8.copy_from_slice(c.addr.id.0.get(..8).unwrap_or(&[0; 8]));
                let tie = mix(u64::from_le_bytes(id8) ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                ((s, tie), c)
            })
            .collect();
        scored.sort_by_key(|(s, _)| *s);
        scored.into_iter().map(|(_, c)| c).collect()
    }

    /// Starts `req` on the best provider of its model and waits for the
    /// first event, so that a refusal or an unreachable seeder is an error
    /// here, before any response is committed; a provider that refuses or
    /// fails is skipped for the next.
    pub async fn start(&self, req: InferenceRequest) -> Result<RemoteGeneration, RemoteError> {
        let salt = req.request_id;
        let mut providers = self.candidates(&req.model, false, salt).await;
        if providers.is_empty() {
            // Configured peers not reached yet may serve it, and the DHT
            // may know of providers newer than the cache.
            let failures = self.connect_all().await;
            providers = self.candidates(&req.model, true, salt).await;
            if providers.is_empty() && !failures.is_empty() {
                let failures = failures
                    .iter()
                    .map(|(p, e)| format!("{p} ({e})"))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(RemoteError::Unreachable {
                    model: req.model.clone(),
                    failures,
                });
            }
        }
        if providers.is_empty() {
            return Err(RemoteError::NoProvider {
                model: req.model.clone(),
                available: self.models().await.into_iter().map(|(m, _)| m).collect(),
            });
        }
        let mut last = None;
        let providers: Vec<Candidate> = providers.into_iter().take(MAX_PROVIDER_ATTEMPTS).collect();
        for (i, c) in providers.iter().enumerate() {
            let peer = c.addr.id;
            for fresh in [false, true] {
                // Bounded: a provider that cannot be punched to is dialed
                // anyway, then reached through its relays, and the next
                // one tried if all that fails.
                let (conn, terms) = match self.connect(c, fresh).await {
                    Ok(c) => c,
                    Err(source) => {
                        self.failed(peer);
                        last = Some(RemoteError::Failed { peer, source });
                        break;
                    }
                };
                if !terms.offer.models.contains(&req.model) {
                    // Its record outlived its offer.
                    break;
                }
                let guard = RunningGuard::new(&self.running, peer, &conn);
                let mark = Some((conn.stable_id(), conn.stats().udp_rx.datagrams));
                match RemoteGeneration::open(conn, terms, &req, &self.metrics, &self.party).await {
                    Ok(mut g) => {
                        self.succeeded(&peer);
                        g.running = Some(guard);
                        return Ok(g);
                    }
                    Err(err @ RemoteError::Refused { code: 400, .. }) => {
                        // A bad request stays bad elsewhere, unless a
                        // provider further down offers a longer context
                        // (the prompt may only be too long for this one).
                        let longer = providers.iter().skip(i + 1).any(|o| {
                            o.context_length.unwrap_or(0) > c.context_length.unwrap_or(u32::MAX)
                        });
                        if !longer {
                            return Err(err);
                        }
                        tracing::info!(%peer, "refused as too long here; a longer context is on offer: {err}");
                        last = Some(err);
                        break;
                    }
                    Err(err @ RemoteError::Refused { .. }) => {
                        tracing::info!(%peer, "seeder refused, trying the next: {err}");
                        last = Some(err);
                        break;
                    }
                    Err(
                        err @ RemoteError::Failed {
                            source: PeerError::Timeout(_),
                            ..
                        },
                    ) => {
                        tracing::info!(%peer, "seeder did not answer, trying the next: {err}");
                        self.conns.discard_if_silent(&peer, mark);
                        self.failed(peer);
                        last = Some(err);
                        break;
                    }
                    Err(err) => {
                        tracing::info!(%peer, fresh, "request could not start: {err}");
                        if fresh {
                            self.failed(peer);
                        }
                        last = Some(err);
                    }
                }
            }
        }
        Err(last.unwrap_or(RemoteError::NoProvider {
            model: req.model.clone(),
            available: Vec::new(),
        }))
    }
}

/// SplitMix64's finalizer: every input bit moves every output bit, so
/// consecutive request ids order equal providers independently.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One generation running on a seeder. Dropping it before it ended resets
/// the stream, which cancels the generation on the seeder.
pub struct RemoteGeneration {
    conn: quinn::Connection,
    peer: NodeId,
    /// The seeder's hello: its key, model hash and prices.
    terms: Arc<VerifiedHello>,
    party: Arc<Party>,
    send: FramedSend,
    recv: FramedRecv,
    request_id: u64,
    next_seq: u32,
    first: Option<RemoteEvent>,
    /// Some frame of the seeder's answer arrived.
    answered: bool,
    /// How long the seeder may take to answer: [`START_TIMEOUT`], plus
    /// time to take in a long prompt.
    start_limit: Duration,
    ended: bool,
    metrics: Arc<Metrics>,
    /// Counts this request against its seeder while it runs.
    running: Option<RunningGuard>,
    /// Every token id received, in order.
    digest: TokenDigest,
    /// `Done` arrived; the last receipt is due.
    done: Option<(String, Finish)>,
    /// The latest receipt both signed, and whether the ledger has it.
    signed: Option<VerifiedReceipt>,
    recorded: bool,
    /// The most prompt tokens this request's prompt can honestly take.
    prompt_bound: u32,
}

/// Prompt bytes a seeder is given an extra second for before it must
/// answer (upload and tokenization of a long prompt).
const START_BYTES_PER_EXTRA_SECOND: usize = 256 * 1024;

fn start_limit(p: &hypha_wire::Prompt) -> Duration {
    let bytes = match p {
        hypha_wire::Prompt::Chat(ms) => ms.iter().map(|m| m.content.len()).sum(),
        hypha_wire::Prompt::Text(t) => t.len(),
    };
    START_TIMEOUT + Duration::from_secs((bytes / START_BYTES_PER_EXTRA_SECOND) as u64)
}

/// Template tokens a chat template may add around a conversation (a
/// default system prompt, role markers) beyond the messages' own text.
const TEMPLATE_TOKENS_MAX: usize = 256;
/// Template tokens per message (its role and markers) beyond its text.
const TEMPLATE_TOKENS_PER_MESSAGE: usize = 16;

/// The most tokens a prompt can honestly cost: a token covers at least one
/// byte of text, and the template adds a bounded number of its own.
fn prompt_token_bound(p: &hypha_wire::Prompt) -> u32 {
    let n = match p {
        hypha_wire::Prompt::Chat(ms) => ms
            .iter()
            .map(|m| m.content.len() + m.role.len() + TEMPLATE_TOKENS_PER_MESSAGE)
            .sum::<usize>(),
        hypha_wire::Prompt::Text(t) => t.len(),
    };
    u32::try_from(n.saturating_add(TEMPLATE_TOKENS_MAX)).unwrap_or(u32::MAX)
}

impl RemoteGeneration {
    async fn open(
        conn: quinn::Connection,
        terms: Arc<VerifiedHello>,
        req: &InferenceRequest,
        metrics: &Arc<Metrics>,
        party: &Arc<Party>,
    ) -> Result<Self, RemoteError> {
        let peer = terms.node_id;
        let failed = |source: PeerError| RemoteError::Failed { peer, source };
        let (send, recv) = conn.open_bi().await.map_err(|e| failed(e.into()))?;
        let mut g = Self {
            conn,
            peer,
            terms,
            party: party.clone(),
            send: FramedSend::new(send),
            recv: FramedRecv::new(recv),
            request_id: req.request_id,
            next_seq: 0,
            first: None,
            running: None,
            answered: false,
            start_limit: start_limit(&req.prompt),
            ended: false,
            metrics: metrics.clone(),
            digest: TokenDigest::default(),
            done: None,
            signed: None,
            recorded: false,
            prompt_bound: prompt_token_bound(&req.prompt),
        };
        g.send
            .send(&Message::Request(req.clone()))
            .await
            .map_err(failed)?;
        match g.read().await {
            Ok(ev) => {
                g.first = Some(ev);
                Ok(g)
            }
            Err(e) => Err(e),
        }
    }

    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// The next event; `None` after the generation ended.
    pub async fn next(&mut self) -> Option<RemoteEvent> {
        if let Some(ev) = self.first.take() {
            return Some(ev);
        }
        if self.ended {
            return None;
        }
        Some(match self.read().await {
            Ok(ev) => ev,
            Err(e) => RemoteEvent::Failed(e.to_string()),
        })
    }

    async fn read(&mut self) -> Result<RemoteEvent, RemoteError> {
        let peer = self.peer;
        loop {
            match self.read_frame().await {
                Ok(Some(ev)) => return Ok(ev),
                Ok(None) => {}
                Err(RemoteError::Failed { source, .. }) => {
                    self.ended = true;
                    if source.is_violation() {
                        self.metrics.peer_violations.fetch_add(1, Ordering::Relaxed);
                        close_for_violation(&self.conn, peer, &source);
                    }
                    self.record().await;
                    return Err(RemoteError::Failed { peer, source });
                }
                Err(e) => {
                    self.ended = true;
                    self.record().await;
                    return Err(e);
                }
            }
        }
    }

    /// Handles one frame: an event for the client, or `None` for a receipt
    /// exchanged along the way.
    async fn read_frame(&mut self) -> Result<Option<RemoteEvent>, RemoteError> {
        let peer = self.peer;
        let failed = |source: PeerError| RemoteError::Failed { peer, source };
        let (request_id, seq) = (self.request_id, self.next_seq);
        let digest = &mut self.digest;
        let next = self.recv.next(|m| reply_event(m, request_id, seq, digest));
        let frame = if self.done.is_some() {
            match tokio::time::timeout(LAST_RECEIPT_TIMEOUT, next).await {
                Ok(f) => f,
                Err(_) => {
                    // No last receipt: the request is over all the same.
                    tracing::warn!(%peer, request_id, "no last receipt after done");
                    self.ended = true;
                    self.send.finish();
                    let credits = self.record().await;
                    let (text, finish) = self.done.take().unwrap_or_else(empty_done);
                    return Ok(Some(RemoteEvent::Done {
                        text,
                        finish,
                        credits,
                    }));
                }
            }
        } else {
            let (limit, why) = if self.answered {
                (crate::proto::RECV_STALL_TIMEOUT, "the seeder went silent")
            } else {
                (self.start_limit, "the seeder did not answer the request")
            };
            match tokio::time::timeout(limit, next).await {
                Ok(f) => f,
                Err(_) => Err(PeerError::Timeout(why)),
            }
        };
        let first_frame = !self.answered;
        self.answered = true;
        let frame = frame
            .and_then(|r| r.ok_or_else(|| PeerError::Protocol("stream ended before done".into())))
            .map_err(failed)?;
        match frame {
            Reply::Accepted if first_frame => Ok(None),
            Reply::Accepted => Err(failed(PeerError::Protocol(
                "accepted in the middle of an answer".into(),
            ))),
            Reply::Token(text) => {
                if self.done.is_some() {
                    return Err(failed(PeerError::Protocol("a chunk after done".into())));
                }
                self.next_seq = self.next_seq.wrapping_add(1);
                Ok(Some(RemoteEvent::Token(text)))
            }
            Reply::Done(text, finish) => {
                if self.done.is_some() {
                    return Err(failed(PeerError::Protocol("a second done".into())));
                }
                self.done = Some((text, finish));
                Ok(None)
            }
            Reply::Offer {
                receipt,
                seeder_sig,
                last,
            } => {
                let signed = self
                    .check_offer(&receipt, seeder_sig, last)
                    .map_err(failed)?;
                let countersign = Message::Countersign(Countersign {
                    request_id: self.request_id,
                    consumer_sig: signed.signed().consumer_sig,
                });
                self.signed = Some(signed);
                self.send.send(&countersign).await.map_err(failed)?;
                if !last {
                    return Ok(None);
                }
                let Some((text, finish)) = self.done.take() else {
                    return Err(failed(PeerError::Protocol(
                        "a last receipt before done".into(),
                    )));
                };
                self.ended = true;
                self.send.finish();
                let credits = self.record().await;
                Ok(Some(RemoteEvent::Done {
                    text,
                    finish,
                    credits,
                }))
            }
            Reply::Error(code, message) => {
                self.ended = true;
                self.send.finish();
                Err(RemoteError::Refused {
                    peer,
                    code,
                    message,
                })
            }
        }
    }

    /// Checks an offered receipt against what arrived and countersigns it.
    fn check_offer(
        &self,
        bytes: &[u8],
        seeder_sig: [u8; 64],
        last: bool,
    ) -> Result<VerifiedReceipt, PeerError> {
        let bad = |what: String| PeerError::Protocol(format!("receipt refused: {what}"));
        let r = Receipt::from_bytes(bytes).map_err(|e| bad(e.to_string()))?;
        let me = self.party.identity.id();
        let offer = &self.terms.offer;
        if r.request_id != self.request_id || r.consumer != me || r.seeder != self.peer {
            return Err(bad("it names another request or other parties".into()));
        }
        if r.model_sha256 != offer.model_sha256 {
            return Err(bad("it names another model than the seeder's hello".into()));
        }
        if r.prompt_tokens > self.prompt_bound {
            return Err(bad(format!(
                "it bills {} prompt tokens for a prompt of at most {}",
                r.prompt_tokens, self.prompt_bound
            )));
        }
        if r.completion_tokens != self.digest.count() {
            return Err(bad(format!(
                "it claims {} tokens, {} arrived",
                r.completion_tokens,
                self.digest.count()
            )));
        }
        if r.tokens_digest != self.digest.digest() {
            return Err(bad(
                "its token digest differs from the tokens that arrived".into()
            ));
        }
        let want = hypha_ledger::price(
            r.prompt_tokens,
            r.completion_tokens,
            offer.price_prompt_micro,
            offer.price_completion_micro,
        );
        if r.credits != want {
            return Err(bad(format!(
                "it charges {} micro-credits, the published price gives {want}",
                r.credits
            )));
        }
        if let Some(prev) = &self.signed {
            let prev = prev.receipt();
            if prev.prompt_tokens != r.prompt_tokens || prev.started_ms != r.started_ms {
                return Err(bad(
                    "it changes the prompt or start of an earlier receipt".into()
                ));
            }
        }
        if last {
            match &self.done {
                Some((_, f)) if f.prompt_tokens == r.prompt_tokens => {}
                Some(_) => return Err(bad("its prompt tokens differ from done".into())),
                None => return Err(bad("a last receipt before done".into())),
            }
        }
        let consumer_sig = r.sign(self.party.identity.signing_key());
        // Checks the seeder's key against its id and its signature (ours
        // holds by construction).
        SignedReceipt {
            receipt: r,
            seeder_key: self.terms.public_key,
            seeder_sig,
            consumer_key: self.party.identity.public_key(),
            consumer_sig,
        }
        .verify()
        .map_err(|e| bad(e.to_string()))
    }

    /// Appends the latest receipt both signed to the ledger (once); its
    /// credits.
    async fn record(&mut self) -> Option<u64> {
        if self.recorded {
            return None;
        }
        let verified = self.signed.clone()?;
        self.recorded = true;
        let credits = verified.receipt().credits;
        let ledger = self.party.ledger.clone();
        let appended = tokio::task::spawn_blocking(move || ledger.append(verified)).await;
        match appended {
            Ok(Ok(())) => Some(credits),
            Ok(Err(e)) => {
                tracing::warn!(request_id = self.request_id, "cannot record receipt: {e}");
                None
            }
            Err(e) => {
                tracing::warn!("ledger task failed: {e}");
                None
            }
        }
    }
}

/// What a request that never got its `Done` details reports.
fn empty_done() -> (String, Finish) {
    (
        String::new(),
        Finish {
            reason: FinishReason::Stop,
            prompt_tokens: 0,
            completion_tokens: 0,
        },
    )
}

impl Drop for RemoteGeneration {
    fn drop(&mut self) {
        if let (false, Some(signed)) = (self.recorded, self.signed.take()) {
            // Cut short: keep the last receipt both signed.
            let ledger = self.party.ledger.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn_blocking(move || {
                    if let Err(e) = ledger.append(signed) {
                        tracing::warn!("cannot record receipt: {e}");
                    }
                });
            }
        }
        if !self.ended {
            // Reset our side and stop theirs: the seeder sees it on its next
            // read or write and drops the generation.
            let _ = self.send.stream.reset(STREAM_CANCELLED);
            let _ = self.recv.stream.stop(STREAM_CANCELLED);
        }
    }
}

enum Reply {
    Accepted,
    Token(String),
    Done(String, Finish),
    Offer {
        receipt: Vec<u8>,
        seeder_sig: [u8; 64],
        last: bool,
    },
    Error(u16, String),
}

/// Checks one frame from a seeder against the request it answers.
fn reply_event(
    msg: &ArchivedMessage,
    request_id: u64,
    seq: u32,
    digest: &mut TokenDigest,
) -> Result<Reply, PeerError> {
    let check_id = |got: u64| {
        if got == request_id {
            Ok(())
        } else {
            Err(PeerError::Protocol(format!(
                "reply for request {got} on the stream of request {request_id}"
            )))
        }
    };
    match msg {
        ArchivedMessage::Accepted(a) => {
            check_id(a.request_id.to_native())?;
            Ok(Reply::Accepted)
        }
        ArchivedMessage::Chunk(c) => {
            check_id(c.request_id.to_native())?;
            let got = c.seq.to_native();
            if got != seq {
                return Err(PeerError::Protocol(format!(
                    "chunk {got} arrived where chunk {seq} was due"
                )));
            }
            for t in c.token_ids.iter() {
                digest.push(t.to_native());
            }
            Ok(Reply::Token(c.text.as_str().to_owned()))
        }
        ArchivedMessage::Done(d) => {
            check_id(d.request_id.to_native())?;
            let reason = match d.finish_reason {
                hypha_wire::ArchivedFinishReason::Stop => FinishReason::Stop,
                hypha_wire::ArchivedFinishReason::Length => FinishReason::Length,
            };
            Ok(Reply::Done(
                d.text.as_str().to_owned(),
                Finish {
                    reason,
                    prompt_tokens: d.prompt_tokens.to_native(),
                    completion_tokens: d.completion_tokens.to_native(),
                },
            ))
        }
        ArchivedMessage::Receipt(r) => {
            check_id(r.request_id.to_native())?;
            Ok(Reply::Offer {
                receipt: r.receipt.as_slice().to_vec(),
                seeder_sig: r.seeder_sig,
                last: r.last,
            })
        }
        ArchivedMessage::Error(e) => {
            check_id(e.request_id.to_native())?;
            Ok(Reply::Error(
                e.code.to_native(),
                e.message.as_str().to_owned(),
            ))
        }
        other => Err(PeerError::Protocol(format!(
            "a seeder sent a {} on a request stream",
            kind_of(other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(free: Option<u32>, tps: Option<u32>) -> Candidate {
        Candidate {
            addr: PeerAddr {
                id: NodeId([1; 32]),
                addr: "127.0.0.1:1".parse().unwrap(),
            },
            punch: false,
            free_slots: free,
            decode_tokens_per_s: tps,
            context_length: None,
            relays: Vec::new(),
        }
    }

    #[test]
    fn score_orders_failures_load_round_trip_and_capacity() {
        let now = Instant::now();
        let fresh = Health::default();
        let failed = Health {
            failures: 1,
            last_failure: Some(now),
        };
        let ms = Duration::from_millis;
        let c = cand(Some(2), Some(100));
        // A recent failure outweighs everything; an old one counts for
        // nothing.
        assert!(score(&c, &failed, Some(ms(1)), 0, now) > score(&c, &fresh, None, 8, now));
        let old = now + FAILURE_MEMORY + ms(1);
        assert_eq!(
            score(&c, &failed, Some(ms(1)), 0, old),
            score(&c, &fresh, Some(ms(1)), 0, old)
        );
        // A near seeder wins over an unknown one until two of our requests
        // run on it.
        assert!(score(&c, &fresh, Some(ms(1)), 1, now) < score(&c, &fresh, None, 0, now));
        assert!(score(&c, &fresh, Some(ms(1)), 2, now) > score(&c, &fresh, None, 0, now));
        // No free slot, or slower decoding, costs more.
        assert!(
            score(&cand(Some(0), Some(100)), &fresh, None, 0, now)
                > score(&cand(Some(1), Some(100)), &fresh, None, 0, now)
        );
        assert!(
            score(&cand(None, Some(20)), &fresh, None, 0, now)
                > score(&cand(None, Some(200)), &fresh, None, 0, now)
        );
    }
}
