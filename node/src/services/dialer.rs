//! How this node reaches a provider: the open connection; else a direct
//! dial (a hole punched first when its record says it sits behind a NAT);
//! else, when no direct path opened within [`DIRECT_BUDGET`], one of the
//! relays its record names, with a direct path tried again in the
//! background ([`UPGRADE_FIRST_WAIT`], doubling) and swapped in once it
//! opens; the relayed connection closes when this node's requests on it are
//! done.
//!
//! The dialer also keeps what the node saw of each peer lately (failures in
//! a row, peers no direct path opened to) and counts this node's requests
//! running on each seeder and connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypha_wire::NodeId;

use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::net::addr::{is_virtual, PeerAddr};
use crate::net::hello::VerifiedHello;
use crate::net::paths::PathGuard;
use crate::net::pool::Connections;
use crate::net::proto::{PeerError, CLOSE_NORMAL};
use crate::services::dht::Discovery;
use crate::services::punch;
use crate::services::reach::Reachability;
use crate::services::relay_client::connect_via;
use crate::util::{lock, BoundedMap, Overflow, Tasks};

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

// A punch request leaves time for the dial inside the direct budget, and
// the waits grow toward their caps.
const _: () = assert!(PUNCH_BUDGET.as_millis() < DIRECT_BUDGET.as_millis());
const _: () = assert!(UPGRADE_FIRST_WAIT.as_millis() <= UPGRADE_MAX_WAIT.as_millis());
const _: () = assert!(DRAIN_CHECK.as_millis() < DRAIN_MAX.as_millis());
/// How long a failure counts against a provider (in routing's score, and
/// for its relays).
pub const FAILURE_MEMORY: Duration = Duration::from_secs(120);
/// Health entries kept (one per provider tried).
const MAX_HEALTH: usize = 4096;

/// What this node saw of a provider lately.
#[derive(Debug, Clone, Copy, Default)]
pub struct Health {
    /// Failures in a row.
    pub failures: u32,
    pub last_failure: Option<Instant>,
}

/// This node's requests running per seeder.
#[derive(Default)]
pub(crate) struct Running(
    std::sync::Mutex<HashMap<NodeId, u32>>,
    /// By connection (`stable_id`): a relayed connection replaced by a
    /// direct one closes when its last request ends.
    std::sync::Mutex<HashMap<usize, u32>>,
);

impl Running {
    /// This node's requests running on `peer`.
    fn on_peer(&self, peer: &NodeId) -> u32 {
        lock(&self.0).get(peer).copied().unwrap_or(0)
    }

    fn on(&self, conn: &quinn::Connection) -> u32 {
        lock(&self.1).get(&conn.stable_id()).copied().unwrap_or(0)
    }
}

/// Counts one request on a seeder (and its connection) until dropped.
pub struct RunningGuard {
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

/// A provider to reach: where, whether to punch first, its relays.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub addr: &'a PeerAddr,
    /// Its record named several addresses (its own and its NAT's): it sits
    /// behind a NAT, so a hole is punched before dialing it.
    pub punch: bool,
    /// Relays its record names: used when no direct path opens within
    /// [`DIRECT_BUDGET`].
    pub relays: &'a [PeerAddr],
}

/// This node's way to its peers, shared by every request and the
/// background upgrades it starts.
pub struct Dialer {
    conns: Arc<Connections>,
    discovery: Option<Discovery>,
    /// This node's own candidates, for punch requests.
    reach: Option<Arc<Reachability>>,
    identity: Arc<Identity>,
    metrics: Arc<Metrics>,
    health: Mutex<BoundedMap<NodeId, Health>>,
    /// Peers no direct path opened to lately (reached through a relay):
    /// the next connection goes to their relays first.
    no_direct: Mutex<BoundedMap<NodeId, Instant>>,
    running: Arc<Running>,
    tasks: Tasks,
}

/// A failure older than [`FAILURE_MEMORY`] counts for nothing.
fn forgotten(h: &Health) -> bool {
    h.last_failure.is_none_or(|t| t.elapsed() >= FAILURE_MEMORY)
}

impl Dialer {
    pub fn new(
        conns: Arc<Connections>,
        discovery: Option<Discovery>,
        reach: Option<Arc<Reachability>>,
        identity: Arc<Identity>,
        metrics: Arc<Metrics>,
        tasks: Tasks,
    ) -> Self {
        Self {
            conns,
            discovery,
            reach,
            identity,
            metrics,
            health: Mutex::new(BoundedMap::new(MAX_HEALTH, Overflow::Refuse)),
            no_direct: Mutex::new(BoundedMap::new(MAX_HEALTH, Overflow::Refuse)),
            running: Arc::default(),
            tasks,
        }
    }

    pub fn connections(&self) -> &Arc<Connections> {
        &self.conns
    }

    /// Health as this node saw it.
    pub fn health(&self, id: &NodeId) -> Health {
        lock(&self.health).get(id).copied().unwrap_or_default()
    }

    /// Counts a failure of `id`.
    pub fn failed(&self, id: NodeId) {
        let mut h = lock(&self.health);
        if let Some(e) = h.get_or_insert_with(id, forgotten, Health::default) {
            e.failures = e.failures.saturating_add(1);
            e.last_failure = Some(Instant::now());
        }
    }

    pub fn succeeded(&self, id: &NodeId) {
        lock(&self.health).remove(id);
    }

    /// This node's requests running on `peer` now.
    pub fn running_on(&self, peer: &NodeId) -> u32 {
        self.running.on_peer(peer)
    }

    /// Counts a request on `peer` over `conn` until the guard is dropped.
    pub fn count_request(&self, peer: NodeId, conn: &quinn::Connection) -> RunningGuard {
        RunningGuard::new(&self.running, peer, conn)
    }

    /// The connection to `t`: the open one; else a direct dial (a hole
    /// punched first when `t.punch`); else, when no direct path opened
    /// within [`DIRECT_BUDGET`], through one of `t.relays`, with a direct
    /// path tried again in the background.
    pub async fn connect(
        self: &Arc<Self>,
        t: Target<'_>,
        fresh: bool,
    ) -> Result<(quinn::Connection, Arc<VerifiedHello>), PeerError> {
        let peer = t.addr.id;
        let live = self.conns.live(&peer).is_some();
        if live && !fresh {
            // The open connection, whatever path it takes.
            return self.conns.get_at(t.addr, false, false).await;
        }
        let started = Instant::now();
        let direct = || async {
            let punched = t.punch
                && tokio::time::timeout(PUNCH_BUDGET, self.punch(peer))
                    .await
                    .unwrap_or(false);
            let got = self.conns.get(t.addr, fresh).await;
            if got.is_ok() && punched {
                self.punched(started);
            }
            got
        };
        let skip_direct = !t.relays.is_empty()
            && lock(&self.no_direct)
                .get(&peer)
                .is_some_and(|at| at.elapsed() < FAILURE_MEMORY);
        let direct_failed = if skip_direct {
            // A background task keeps trying the direct path.
            PeerError::Unreachable(format!("no direct path to {} lately", t.addr))
        } else if t.relays.is_empty() {
            return direct().await;
        } else {
            match tokio::time::timeout(DIRECT_BUDGET, direct()).await {
                Ok(Ok(got)) => return Ok(got),
                Ok(Err(e)) => e,
                Err(_) => PeerError::Unreachable(format!(
                    "no direct path to {} within {DIRECT_BUDGET:?}",
                    t.addr
                )),
            }
        };
        if self.conns.live(&peer).is_some() {
            // A connection opened meanwhile (the DHT dialed the peer at an
            // address its NAT opened toward this node).
            return self.conns.get_at(t.addr, false, false).await;
        }
        tracing::info!(%peer, "no direct path ({direct_failed}); trying its relays");
        lock(&self.no_direct).insert(peer, Instant::now(), |at| at.elapsed() >= FAILURE_MEMORY);
        let mut last = direct_failed;
        // Relays that failed lately go last.
        let mut relays = t.relays.to_vec();
        relays.sort_by_key(|r| self.health(&r.id).failures);
        for relay in &relays {
            match self.relayed(peer, relay, false).await {
                Ok((conn, hello)) => {
                    tracing::info!(%peer, via = %relay.id, "connected through a relay");
                    let me = self.clone();
                    let direct = t.addr.clone();
                    let relayed = conn.clone();
                    let punch = t.punch;
                    self.tasks.spawn(async move {
                        me.upgrade(direct, relayed, punch).await;
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

    /// A connection to `target` through `relay`; an open connection to it
    /// (made meanwhile, by another request or the DHT) is used instead,
    /// unless `fresh` asks to replace it.
    pub async fn relayed(
        &self,
        target: NodeId,
        relay: &PeerAddr,
        fresh: bool,
    ) -> Result<(quinn::Connection, Arc<VerifiedHello>), PeerError> {
        let paths = self.conns.endpoint().paths();
        let addr = connect_via(&self.conns, paths, relay, target).await?;
        debug_assert!(is_virtual(&addr));
        // Closes the path unless a connection over it came of it, also when
        // this future is dropped half way.
        let path = PathGuard::new(paths, addr);
        let (conn, hello) = self
            .conns
            .get_at(&PeerAddr { id: target, addr }, fresh, true)
            .await?;
        if path.keep(&conn) {
            self.metrics.relayed_dials.fetch_add(1, Ordering::Relaxed);
        }
        Ok((conn, hello))
    }

    /// A punched direct path opened, `started` ago.
    fn punched(&self, started: Instant) {
        self.metrics.punch_successes.fetch_add(1, Ordering::Relaxed);
        self.metrics.direct_path.observe(started.elapsed());
    }

    /// Asks `target` (through rendezvous nodes near it in the DHT) to dial
    /// this node's candidates, so the dial that follows meets an open hole;
    /// true when a rendezvous forwarded the request and the target took it.
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
        let req = punch::request(&self.identity, target, &mine);
        let ok = punch::ask(&self.conns, &rendezvous, &req).await;
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
                    relayed.close(CLOSE_NORMAL, b"moved to a direct path");
                    return;
                }
                Ok((_, Err(e))) => tracing::debug!(peer = %direct.id, "still no direct path: {e}"),
                Err(_) => tracing::debug!(peer = %direct.id, "still no direct path: timed out"),
            }
            wait = (wait * 2).min(UPGRADE_MAX_WAIT);
        }
    }
}
