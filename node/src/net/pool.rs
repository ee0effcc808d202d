//! The node-wide pool of connections: one slot per peer this node dialed,
//! bounded, and the connections peers opened to it.
//!
//! [`Connections`] holds one slot per peer. The first user of a slot (a
//! request, a DHT query, the start-up probe) dials it under a lock, so
//! concurrent users share one handshake; later ones reuse the connection
//! while it is open, and a closed one is redialed. Configured peers stay in
//! the cache; others are evicted, least recently used first, when it is
//! full.
//!
//! The pool serves nothing itself: a peer may open streams on a connection
//! this node dialed (a rendezvous forwards punch requests that way), so
//! every new dialed connection is handed to the inbound dispatcher as an
//! [`Adopted`] event on a bounded channel, and the dispatcher serves it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hypha_wire::{Message, NodeId};

use crate::metrics::Metrics;
use crate::net::addr::{is_virtual, PeerAddr};
use crate::net::endpoint::Endpoint;
use crate::net::hello::VerifiedHello;
use crate::net::paths::tie;
use crate::net::proto::{close_for_violation, hello_as_dialer, PeerError, CLOSE_NORMAL};
use crate::util::{lock, unix_ms, Tasks};

/// How long a dial may take before the peer counts as down. A QUIC
/// handshake is one or two round trips; a silent address would otherwise
/// hold a request until the idle timeout.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections cached at once (configured peers, providers, DHT contacts):
/// a few buckets' worth of contacts plus the providers in use.
pub const MAX_CONNECTIONS: usize = 256;
/// Peers connected to this node at once; each holds a connection's buffers
/// and up to `MAX_STREAMS_PER_PEER` streams, so this bounds a node's peer
/// memory.
pub const MAX_PEERS: usize = 256;
/// Dialed connections waiting for the inbound dispatcher. Each slot holds
/// one connection, so the queue never holds more than the pool: it cannot
/// fill while the dispatcher runs.
pub const ADOPTED_QUEUE: usize = MAX_CONNECTIONS;

const _: () = assert!(ADOPTED_QUEUE >= MAX_CONNECTIONS);

/// A connection this node dialed, for the inbound dispatcher to serve the
/// streams the peer opens on it.
pub struct Adopted {
    pub conn: quinn::Connection,
    pub peer: NodeId,
    pub hello: Arc<VerifiedHello>,
}

struct Entry {
    /// Where the peer was last dialed (set under the `conn` lock).
    addr: std::sync::Mutex<SocketAddr>,
    /// The open connection and the peer's hello; the lock is held while
    /// dialing.
    conn: tokio::sync::Mutex<Option<(quinn::Connection, Arc<VerifiedHello>)>>,
    /// Models from the peer's last hello; kept across reconnects.
    models: std::sync::Mutex<Vec<String>>,
    /// The context length from the peer's last hello (0: none).
    context_length: AtomicU32,
    /// Prices (prompt, completion) from the peer's last hello.
    prices: std::sync::Mutex<Option<(u64, u64)>>,
    last_used_ms: AtomicU64,
}

impl Entry {
    /// Keeps what the peer's hello offers.
    fn greeted(&self, hello: &VerifiedHello) {
        *lock(&self.models) = hello.offer.models.clone();
        self.context_length
            .store(hello.offer.context_length, Ordering::Relaxed);
        *lock(&self.prices) = Some((
            hello.offer.price_prompt_micro,
            hello.offer.price_completion_micro,
        ));
    }

    fn new(addr: SocketAddr) -> Self {
        Self {
            addr: std::sync::Mutex::new(addr),
            conn: tokio::sync::Mutex::new(None),
            models: std::sync::Mutex::new(Vec::new()),
            context_length: AtomicU32::new(0),
            prices: std::sync::Mutex::new(None),
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
    /// Tokens one request to its model may hold, from its last hello (0:
    /// not known).
    pub context_length: u32,
    /// Prices (prompt, completion) from its last hello.
    pub prices: Option<(u64, u64)>,
    pub rtt: Option<Duration>,
    pub configured: bool,
}

/// How the pool dials: this node's hello, the proof of work it requires
/// of peers, the dial timeout and the peers it is configured with.
pub struct PoolConfig {
    pub hello: Message,
    pub pow_bits: u32,
    pub dial_timeout: Duration,
    /// Configured peers: never evicted.
    pub pinned: Vec<PeerAddr>,
}

/// This node's connections: one slot per peer it dialed (bounded), and the
/// connections peers opened to it.
pub struct Connections {
    endpoint: Arc<Endpoint>,
    hello: Message,
    metrics: Arc<Metrics>,
    pow_bits: u32,
    dial_timeout: Duration,
    entries: std::sync::Mutex<HashMap<NodeId, Arc<Entry>>>,
    pinned: Vec<PeerAddr>,
    /// Connections peers opened to this node, by id: a rendezvous forwards
    /// punch requests over them. Bounded by the accept limit (one per
    /// connection).
    accepted: std::sync::Mutex<HashMap<NodeId, quinn::Connection>>,
    /// Every new dialed connection, for the inbound dispatcher.
    adopted: tokio::sync::mpsc::Sender<Adopted>,
    tasks: Tasks,
}

impl Connections {
    /// The pool, and the receiving end of its [`Adopted`] events.
    pub fn new(
        endpoint: Arc<Endpoint>,
        cfg: PoolConfig,
        metrics: Arc<Metrics>,
        tasks: Tasks,
    ) -> (Self, tokio::sync::mpsc::Receiver<Adopted>) {
        let entries = cfg
            .pinned
            .iter()
            .map(|p| (p.id, Arc::new(Entry::new(p.addr))))
            .collect();
        let (adopted, events) = tokio::sync::mpsc::channel(ADOPTED_QUEUE);
        let pool = Self {
            endpoint,
            hello: cfg.hello,
            metrics,
            pow_bits: cfg.pow_bits,
            dial_timeout: cfg.dial_timeout,
            entries: std::sync::Mutex::new(entries),
            pinned: cfg.pinned,
            accepted: std::sync::Mutex::new(HashMap::new()),
            adopted,
            tasks,
        };
        (pool, events)
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The open connection to `id` this node dialed, if any.
    pub fn live(&self, id: &NodeId) -> Option<quinn::Connection> {
        let e = lock(&self.entries).get(id).cloned()?;
        e.live()
    }

    /// A connection `peer` opened to this node.
    pub fn accepted_opened(&self, peer: NodeId, conn: &quinn::Connection) {
        lock(&self.accepted).insert(peer, conn.clone());
    }

    /// `conn`, which `peer` opened, has closed.
    pub fn accepted_closed(&self, peer: NodeId, conn: &quinn::Connection) {
        let mut m = lock(&self.accepted);
        if m.get(&peer)
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            m.remove(&peer);
        }
    }

    /// A live connection to `peer`, accepted or dialed.
    pub fn connection_to(&self, peer: &NodeId) -> Option<quinn::Connection> {
        let accepted = lock(&self.accepted)
            .get(peer)
            .filter(|c| c.close_reason().is_none())
            .cloned();
        accepted.or_else(|| self.live(peer))
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
                        c.close(CLOSE_NORMAL, b"connection cache full");
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
                c.close(CLOSE_NORMAL, b"not answering");
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
    /// address is dialed only by [`Connections::get_at`] with `relayed`
    /// (the dialer's relay path).
    pub async fn get(
        &self,
        peer: &PeerAddr,
        fresh: bool,
    ) -> Result<(quinn::Connection, Arc<VerifiedHello>), PeerError> {
        self.get_at(peer, fresh, false).await
    }

    /// The open connection to `peer`, or a dial to its address: a
    /// relayed path's virtual address (made by the caller) only when
    /// `relayed`.
    pub async fn get_at(
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
        let virtual_addr = is_virtual(&peer.addr);
        if virtual_addr && !relayed {
            return Err(PeerError::Unreachable(format!(
                "{} is a relayed path's address: no longer open",
                peer.addr
            )));
        }
        if let Some((old, _)) = slot.take() {
            old.close(CLOSE_NORMAL, b"replaced");
        }
        // A configured peer is dialed where it was configured, unless
        // through a relay.
        let addr = match self.pinned.iter().find(|p| p.id == peer.id) {
            Some(p) if !virtual_addr => p.addr,
            _ => peer.addr,
        };
        *lock(&e.addr) = addr;
        let (conn, hello) = self.dial_and_greet(addr, peer.id).await?;
        e.greeted(&hello);
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
            conn.close(CLOSE_NORMAL, b"not needed");
            return Ok(false);
        }
        self.adopt(&conn, direct.id, &hello);
        *lock(&e.addr) = direct.addr;
        e.greeted(&hello);
        *slot = Some((conn, hello));
        Ok(true)
    }

    /// Starts watching a new connection and hands it to the inbound
    /// dispatcher.
    fn adopt(&self, conn: &quinn::Connection, id: NodeId, hello: &Arc<VerifiedHello>) {
        if is_virtual(&conn.remote_address()) {
            tie(self.endpoint.paths(), conn, &self.tasks);
        }
        self.metrics.peers_connected.fetch_add(1, Ordering::Relaxed);
        let watched = conn.clone();
        let metrics = self.metrics.clone();
        self.tasks.spawn(async move {
            let why = watched.closed().await;
            metrics.peers_connected.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(peer = %id, "peer connection closed: {why}");
        });
        let event = Adopted {
            conn: conn.clone(),
            peer: id,
            hello: hello.clone(),
        };
        if self.adopted.try_send(event).is_err() && !self.tasks.is_stopping() {
            // Only while the dispatcher is gone or ADOPTED_QUEUE (the
            // pool's own size) connections wait for it: the connection
            // still carries this node's requests.
            tracing::warn!(peer = %id, "streams the peer opens on this connection go unserved");
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
                    context_length: e.context_length.load(Ordering::Relaxed),
                    prices: *lock(&e.prices),
                    configured: self.is_pinned(&id),
                }
            })
            .collect()
    }

    /// The round-trip time of an open connection to `id`.
    pub(crate) fn rtt(&self, id: &NodeId) -> Option<Duration> {
        let e = lock(&self.entries).get(id).cloned()?;
        e.live().map(|c| c.rtt())
    }
}
