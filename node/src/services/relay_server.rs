//! The relay this node runs for others (`hypha up --relay`): reservations
//! for nodes behind NATs, and paths to them that copy bytes between two
//! streams without reading them.
//!
//! A node behind a NAT keeps a connection to one or two relays and holds a
//! *reservation* there ([`Message::RelayReserve`]); its provider records
//! then name those relays. A consumer that cannot dial or punch through to
//! it asks a relay for a path ([`Message::RelayConnect`]); the relay asks
//! the reserved node on its connection ([`Message::RelayIncoming`]), and
//! once both said yes it copies bytes between the two streams. Relays
//! publish a record under [`hypha_dht::relay_key`], serve only the nodes
//! their allow list names (everyone when it is empty), and bound
//! reservations, paths per peer, paths in all and bytes per second per peer.
//!
//! A target's paths are shared fairly among those asking for it: when all
//! its paths are taken, an asker that holds none there takes one from the
//! asker holding the most, if that one holds more than one (its oldest
//! path there ends). A few identities cannot take every path to a node,
//! however early they came.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hypha_wire::{ArchivedMessage, Message, NodeId, Refusal, RelayIncoming, RelayReply};

use crate::net::paths::{PATH_IDLE, READ_CHUNK_BYTES};
use crate::net::proto::{kind_of, FramedRecv, FramedSend, PeerError, Violation};
use crate::util::{lock, BoundedMap, Overflow, TokenBucket};
use tokio_util::sync::CancellationToken;

/// How long a relay, and the node it asks, may take to set a path up.
pub const RELAY_SETUP_TIMEOUT: Duration = Duration::from_secs(3);
/// Reservations a relay holds at most, by default.
pub const MAX_RESERVATIONS: usize = 128;
/// Paths one peer may ask a relay for at once.
pub const MAX_SESSIONS_PER_PEER: usize = 16;
/// Paths one reserved node may be reached over through a relay at once
/// (it may ask for fewer).
pub const MAX_SESSIONS_PER_TARGET: usize = 64;
/// Paths between one asker and one target at once: a consumer needs one
/// connection per seeder.
pub const MAX_SESSIONS_PER_PAIR: usize = 2;
/// Paths a relay carries at once.
pub const MAX_RELAY_SESSIONS: usize = 512;
// Each limit fits inside the next wider one.
const _: () = assert!(MAX_SESSIONS_PER_PAIR <= MAX_SESSIONS_PER_PEER);
const _: () = assert!(MAX_SESSIONS_PER_PEER <= MAX_SESSIONS_PER_TARGET);
const _: () = assert!(MAX_SESSIONS_PER_TARGET <= MAX_RELAY_SESSIONS);
/// Bytes per second a relay forwards for one peer by default: hundreds of
/// token streams, or a long prompt in well under a second.
pub const DEFAULT_RELAY_RATE: u64 = 4 * 1024 * 1024;

/// Reads the one [`RelayReply`] a relay message is answered with: `None`
/// when granted.
pub(crate) async fn read_reply(recv: &mut FramedRecv) -> Result<Option<Refusal>, PeerError> {
    recv.next(relay_reply)
        .await?
        .ok_or(PeerError::Protocol(Violation::NoReply("relay")))
}

/// Checks the frame a relay message is answered with: `None` when granted.
pub fn relay_reply(msg: &ArchivedMessage) -> Result<Option<Refusal>, PeerError> {
    match msg {
        ArchivedMessage::RelayReply(r) => Ok(r.refusal.as_ref().map(Refusal::from)),
        other => Err(Violation::Answer {
            what: "a relay message",
            got: kind_of(other),
        }
        .into()),
    }
}

/// A relay's limits and who it serves.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Nodes that may reserve here (be reached through this relay);
    /// empty: any node. Any peer may ask for a path to a reserved node.
    pub allow: Vec<NodeId>,
    pub max_reservations: usize,
    pub max_sessions_per_peer: usize,
    /// Bytes per second forwarded from one peer (what it sends, over all
    /// its paths through this relay).
    pub bytes_per_second_per_peer: u64,
    /// Appends every byte forwarded to this file (an audit: it holds only
    /// the two ends' QUIC ciphertext).
    pub capture: Option<PathBuf>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            max_reservations: MAX_RESERVATIONS,
            max_sessions_per_peer: MAX_SESSIONS_PER_PEER,
            bytes_per_second_per_peer: DEFAULT_RELAY_RATE,
            capture: None,
        }
    }
}

/// Counters of the relay service, for `/metrics`.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub forwarded_bytes: AtomicU64,
    pub sessions_opened: AtomicU64,
    pub refused: AtomicU64,
    pub sessions: AtomicUsize,
}

/// Open paths per (asker, target), oldest first: each path's id and the
/// token that ends it.
type PairPaths = HashMap<(NodeId, NodeId), Vec<(u64, CancellationToken)>>;

/// The relay this node runs for others (`hypha up --relay`).
pub struct RelayService {
    config: RelayConfig,
    /// Reserved nodes: their connection and how many paths they take.
    reservations: Mutex<BoundedMap<NodeId, (quinn::Connection, usize)>>,
    /// Open paths per peer (either end), and their byte buckets.
    sessions: Mutex<HashMap<NodeId, (usize, TokenBucket)>>,
    /// Open paths per (asker, target), oldest first: each one's id and
    /// what ends it when another asker takes its place.
    pairs: Mutex<PairPaths>,
    next_path: AtomicU64,
    capture: Option<Mutex<std::fs::File>>,
    pub stats: RelayStats,
}

impl RelayService {
    pub fn new(config: RelayConfig) -> std::io::Result<Self> {
        let capture = match &config.capture {
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            )),
            None => None,
        };
        let reservations = BoundedMap::new(config.max_reservations, Overflow::Refuse);
        Ok(Self {
            config,
            reservations: Mutex::new(reservations),
            sessions: Mutex::new(HashMap::new()),
            pairs: Mutex::new(HashMap::new()),
            next_path: AtomicU64::new(0),
            capture,
            stats: RelayStats::default(),
        })
    }

    /// Reservations held now.
    pub fn reservations(&self) -> usize {
        lock(&self.reservations)
            .values()
            .filter(|(c, _)| c.close_reason().is_none())
            .count()
    }

    /// Free reservations, as the relay's record tells.
    pub fn free(&self) -> u32 {
        self.config
            .max_reservations
            .saturating_sub(self.reservations()) as u32
    }

    fn refuse(&self, refusal: Refusal) -> Option<Refusal> {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        Some(refusal)
    }

    /// A reservation request from `peer` on `conn`, to be reached over at
    /// most `max_sessions` paths at once; the answer: `None` when granted.
    pub fn reserve(
        &self,
        peer: NodeId,
        conn: &quinn::Connection,
        max_sessions: u32,
    ) -> Option<Refusal> {
        if !self.config.allow.is_empty() && !self.config.allow.contains(&peer) {
            tracing::info!(%peer, "relay reservation refused: not on the allow list");
            return self.refuse(Refusal::Forbidden);
        }
        {
            let sessions = (max_sessions as usize).clamp(1, MAX_SESSIONS_PER_TARGET);
            // A full table first forgets reservations whose connection closed.
            let held = lock(&self.reservations).insert(peer, (conn.clone(), sessions), |(c, _)| {
                c.close_reason().is_some()
            });
            if !held {
                return self.refuse(Refusal::TooMany);
            }
        }
        tracing::info!(%peer, "relay reservation granted");
        None
    }

    /// Counts a path from asker `a` to target `b` (which takes at most
    /// `b_max`), within the limits; `None` when over.
    fn admit(self: &Arc<Self>, a: NodeId, b: NodeId, b_max: usize) -> Option<SessionGuard> {
        if a == b {
            return None;
        }
        let mut s = lock(&self.sessions);
        let mut pairs = lock(&self.pairs);
        if self.stats.sessions.load(Ordering::Relaxed) >= MAX_RELAY_SESSIONS {
            return None;
        }
        let busy = |id: &NodeId| s.get(id).map_or(0, |(n, _)| *n);
        let held = |pairs: &HashMap<(NodeId, NodeId), Vec<(u64, CancellationToken)>>, a: NodeId| {
            pairs.get(&(a, b)).map_or(0, Vec::len)
        };
        if busy(&a) >= self.config.max_sessions_per_peer || held(&pairs, a) >= MAX_SESSIONS_PER_PAIR
        {
            return None;
        }
        if busy(&b) >= b_max {
            // Full: a newcomer to this target takes a path from whoever
            // holds the most there, if that is more than one.
            if held(&pairs, a) > 0 {
                return None;
            }
            let most = pairs
                .iter()
                .filter(|((x, y), v)| *y == b && *x != a && v.len() > 1)
                .max_by_key(|(_, v)| v.len())
                .map(|(k, _)| *k);
            let k = most?;
            // Its path ends at once; its count goes when its task does.
            if let Some((_, oldest)) = pairs.get(&k).and_then(|v| v.first()) {
                tracing::info!(asker = %k.0, target = %b, "relayed path ended to share the target fairly");
                oldest.cancel();
            }
            if let Some(v) = pairs.get_mut(&k) {
                if !v.is_empty() {
                    v.remove(0);
                }
            }
        }
        let id = self.next_path.fetch_add(1, Ordering::Relaxed);
        let ended = CancellationToken::new();
        pairs.entry((a, b)).or_default().push((id, ended.clone()));
        for id in [a, b] {
            // A second's worth may pass at once.
            let rate = self.config.bytes_per_second_per_peer;
            s.entry(id)
                .or_insert_with(|| (0, TokenBucket::new(rate, rate, Instant::now())))
                .0 += 1;
        }
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        Some(SessionGuard {
            svc: self.clone(),
            ends: [a, b],
            id,
            ended,
        })
    }

    /// Takes `n` bytes from `peer`'s bucket: how long to wait before
    /// forwarding them.
    fn charge(&self, peer: &NodeId, n: usize) -> Duration {
        let mut s = lock(&self.sessions);
        let Some((_, b)) = s.get_mut(peer) else {
            return Duration::ZERO;
        };
        b.take(n as u64, Instant::now())
    }

    fn captured(&self, bytes: &[u8]) {
        if let Some(f) = &self.capture {
            if let Err(e) = lock(f).write_all(bytes) {
                tracing::warn!("relay capture: {e}");
            }
        }
    }

    /// Serves a [`RelayConnect`] from `from` on its stream: asks the target,
    /// answers, then forwards until either end stops.
    pub async fn connect(
        self: &Arc<Self>,
        from: NodeId,
        target: NodeId,
        mut send: FramedSend,
        recv: FramedRecv,
    ) -> Result<(), PeerError> {
        let answer = |refusal| Message::RelayReply(RelayReply { refusal });
        let reserved = lock(&self.reservations)
            .get(&target)
            .filter(|(c, _)| c.close_reason().is_none())
            .cloned();
        let Some((conn, target_max)) = reserved else {
            send.send(&answer(self.refuse(Refusal::NotFound))).await?;
            send.finish();
            return Ok(());
        };
        let Some(guard) = self.admit(from, target, target_max) else {
            send.send(&answer(self.refuse(Refusal::TooMany))).await?;
            send.finish();
            return Ok(());
        };
        let asked = tokio::time::timeout(RELAY_SETUP_TIMEOUT, async {
            let (s, r) = conn.open_bi().await?;
            let mut to_target = FramedSend::new(s);
            to_target
                .send(&Message::RelayIncoming(RelayIncoming { from: from.0 }))
                .await?;
            let mut from_target = FramedRecv::new(r);
            let answer = read_reply(&mut from_target).await?;
            Ok::<_, PeerError>((answer, to_target, from_target))
        })
        .await;
        let (to_target, from_target) = match asked {
            Ok(Ok((None, s, r))) => (s, r),
            Ok(Ok((Some(refusal), _, _))) => {
                send.send(&answer(self.refuse(refusal))).await?;
                send.finish();
                return Ok(());
            }
            Ok(Err(e)) => {
                tracing::debug!(%target, "relay target failed: {e}");
                send.send(&answer(self.refuse(Refusal::Unreachable)))
                    .await?;
                send.finish();
                return Ok(());
            }
            Err(_) => {
                send.send(&answer(self.refuse(Refusal::Unreachable)))
                    .await?;
                send.finish();
                return Ok(());
            }
        };
        send.send(&answer(None)).await?;
        self.stats.sessions_opened.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%from, %target, "relaying");
        let (a_recv, a_left) = recv.into_parts();
        let (b_recv, b_left) = from_target.into_parts();
        let there = self.forward(from, a_recv, a_left, to_target.stream);
        let back = self.forward(target, b_recv, b_left, send.stream);
        let why = tokio::select! {
            r = there => r,
            r = back => r,
            () = guard.ended.cancelled() => Err(PeerError::Timeout("taken by another asker for a fair share")),
        };
        tracing::info!(%from, %target, "relayed path ended: {why:?}");
        Ok(())
    }

    /// Copies one direction of a path, charging `peer` for what it sends.
    async fn forward(
        &self,
        peer: NodeId,
        mut recv: quinn::RecvStream,
        leftover: Vec<u8>,
        mut send: quinn::SendStream,
    ) -> Result<(), PeerError> {
        let mut pending = Some(Bytes::from(leftover)).filter(|b| !b.is_empty());
        loop {
            let bytes = match pending.take() {
                Some(b) => b,
                None => {
                    let read =
                        tokio::time::timeout(PATH_IDLE, recv.read_chunk(READ_CHUNK_BYTES, true));
                    match read
                        .await
                        .map_err(|_| PeerError::Timeout("relayed path idle"))??
                    {
                        Some(c) => c.bytes,
                        None => {
                            let _ = send.finish();
                            return Ok(());
                        }
                    }
                }
            };
            let wait = self.charge(&peer, bytes.len());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            self.captured(&bytes);
            self.stats
                .forwarded_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            send.write_chunk(bytes).await?;
        }
    }
}

/// One relayed path counted against both ends' limits.
struct SessionGuard {
    svc: Arc<RelayService>,
    ends: [NodeId; 2],
    id: u64,
    /// Cancelled when another asker takes this path's place.
    ended: CancellationToken,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        {
            let mut pairs = lock(&self.svc.pairs);
            let pair = (self.ends[0], self.ends[1]);
            if let Some(v) = pairs.get_mut(&pair) {
                v.retain(|(id, _)| *id != self.id);
                if v.is_empty() {
                    pairs.remove(&pair);
                }
            }
        }
        let mut s = lock(&self.svc.sessions);
        for id in &self.ends {
            if let Some(e) = s.get_mut(id) {
                e.0 = e.0.saturating_sub(1);
                if e.0 == 0 {
                    s.remove(id);
                }
            }
        }
        self.svc.stats.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(max_sessions_per_peer: usize, rate: u64) -> Arc<RelayService> {
        Arc::new(
            RelayService::new(RelayConfig {
                max_sessions_per_peer,
                bytes_per_second_per_peer: rate,
                ..Default::default()
            })
            .unwrap(),
        )
    }

    #[test]
    fn paths_per_peer_are_bounded_and_freed() {
        let svc = service(2, DEFAULT_RELAY_RATE);
        let ids: Vec<NodeId> = (1..=5).map(|i| NodeId([i; 32])).collect();
        let (a, b, c, d, e) = (ids[0], ids[1], ids[2], ids[3], ids[4]);
        assert!(svc.admit(a, a, 8).is_none(), "no path to oneself");
        let first = svc.admit(a, b, 8).expect("first path");
        let second = svc.admit(a, c, 8).expect("second path");
        assert!(
            svc.admit(a, d, 8).is_none(),
            "a third path for the same asker"
        );
        assert!(
            svc.admit(d, a, 2).is_none(),
            "its paths count against its own limit as a target too"
        );
        assert_eq!(svc.stats.sessions.load(Ordering::Relaxed), 2);
        drop(first);
        let third = svc.admit(d, a, 8).expect("room again");
        // The target's own limit, and the limit per pair.
        let to_e = svc.admit(b, e, 1).expect("a path to e");
        assert!(svc.admit(c, e, 1).is_none(), "e takes one path only");
        drop(to_e);
        let pair1 = svc.admit(b, e, 8).unwrap();
        let pair2 = svc.admit(b, e, 8).unwrap();
        assert!(svc.admit(b, e, 8).is_none(), "two paths per pair");
        drop((second, third, pair1, pair2));
        assert_eq!(svc.stats.sessions.load(Ordering::Relaxed), 0);
        assert!(lock(&svc.sessions).is_empty(), "buckets of idle peers go");
        assert!(lock(&svc.pairs).is_empty());
    }

    #[test]
    fn a_full_target_is_shared_fairly_among_askers() {
        let svc = service(MAX_SESSIONS_PER_PEER, DEFAULT_RELAY_RATE);
        let target = NodeId([9; 32]);
        let sybils: Vec<NodeId> = (1..=2).map(|i| NodeId([i; 32])).collect();
        // Two identities take all four paths to the target, two each.
        let mut held: Vec<SessionGuard> = Vec::new();
        for s in &sybils {
            for _ in 0..MAX_SESSIONS_PER_PAIR {
                held.push(svc.admit(*s, target, 4).expect("room"));
            }
        }
        // A newcomer gets in: one of theirs ends.
        let honest = NodeId([20; 32]);
        let h = svc.admit(honest, target, 4).expect("a fair share");
        assert_eq!(held.iter().filter(|g| g.ended.is_cancelled()).count(), 1);
        // The one that lost a path may not take it back; nor may the
        // newcomer take a second while others hold one each ... at most.
        let loser = held.iter().find(|g| g.ended.is_cancelled()).unwrap().ends[0];
        held.retain(|g| !g.ended.is_cancelled());
        assert!(svc.admit(loser, target, 4).is_none());
        assert!(svc.admit(honest, target, 4).is_none());
        // A second newcomer takes from the one still holding two.
        let other = NodeId([21; 32]);
        let o = svc.admit(other, target, 4).expect("a fair share");
        assert_eq!(held.iter().filter(|g| g.ended.is_cancelled()).count(), 1);
        held.retain(|g| !g.ended.is_cancelled());
        // Now every asker holds one: a fifth is refused, nobody is cut.
        assert!(svc.admit(NodeId([22; 32]), target, 4).is_none());
        assert!(held.iter().all(|g| !g.ended.is_cancelled()));
        drop((h, o, held));
        assert!(lock(&svc.pairs).is_empty());
    }

    #[test]
    fn bytes_beyond_a_peers_rate_wait() {
        let svc = service(4, 10_000);
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let _path = svc.admit(a, b, 8).unwrap();
        // A second's worth passes at once (the burst) ...
        assert_eq!(svc.charge(&a, 10_000), Duration::ZERO);
        // ... then sending 5,000 more bytes waits about half a second.
        let wait = svc.charge(&a, 5_000);
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // The other end has its own bucket.
        assert_eq!(svc.charge(&b, 10_000), Duration::ZERO);
    }
}
