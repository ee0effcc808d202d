//! Relayed paths: how two nodes that cannot reach each other directly (one
//! behind a NAT that gives every destination its own port) still talk,
//! through a third node both can reach, which sees only ciphertext.
//!
//! A node behind a NAT keeps a connection to one or two relays and holds a
//! *reservation* there ([`Message::RelayReserve`]); its provider records
//! then name those relays. A consumer that cannot dial or punch through to
//! it asks a relay for a path ([`Message::RelayConnect`]); the relay asks
//! the reserved node on its connection ([`Message::RelayIncoming`]), and
//! once both said yes it copies bytes between the two streams without
//! reading them. Each end turns its stream into a *virtual address* in
//! 240.0.0.0/4 (reserved, never routed): the QUIC endpoint's socket
//! ([`crate::stun::StunSocket`]) hands datagrams for such an address to its
//! path ([`Paths`]) and delivers the path's packets as if they came from it.
//! The two ends then run an ordinary QUIC handshake over that address: the
//! connection is end-to-end encrypted and authenticated between their own
//! identities, and the relay forwards packets it has no key to.
//!
//! Relays publish a record under [`hypha_dht::relay_key`], serve only the
//! nodes their allow list names (everyone when it is empty), and bound
//! reservations, paths per peer, paths in all and bytes per second per
//! peer. A path ends when either stream ends; the QUIC connection over it
//! is closed at once on both ends, so a killed relay fails a request
//! within the relayed connections' short idle timeout, never hangs it.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV6};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hypha_dht::Contact;
use hypha_wire::{
    encode_packet, ArchivedMessage, Message, NodeId, PacketDecoder, RelayConnect, RelayIncoming,
    RelayReply, RelayReserve,
};
use quinn::udp::{RecvMeta, Transmit};
use tokio::sync::{mpsc, watch};

use crate::peers::{Connections, PeerAddr};
use crate::proto::{FramedRecv, FramedSend, PeerError, CLOSE_NORMAL};

/// Packets waiting to enter one path's stream; more are dropped (QUIC
/// retransmits, and slows down on loss).
pub const PATH_PACKET_QUEUE: usize = 512;
/// Packets from all paths waiting for the QUIC endpoint.
pub const INBOUND_PACKET_QUEUE: usize = 1024;
/// Relayed paths one node holds open at once (as either end).
pub const MAX_PATHS: usize = 256;
/// How long a relay, and the node it asks, may take to set a path up.
pub const RELAY_SETUP_TIMEOUT: Duration = Duration::from_secs(3);
/// Relays a node behind a NAT holds reservations at: one to use, one in
/// case it goes away.
pub const RELAYS_PER_NODE: usize = 2;
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
/// A path (at a relay, or at either end) that carries nothing for this
/// long is closed: a live QUIC connection over it sends keep-alives every
/// [`crate::transport::RELAYED_KEEP_ALIVE`].
pub const PATH_IDLE: Duration = Duration::from_secs(10);
/// A path offered to this node must carry a connection that completed its
/// handshake and hello within this long, or it is closed.
pub const PATH_SETUP_DEADLINE: Duration = Duration::from_secs(15);
/// Paths a relay carries at once.
pub const MAX_RELAY_SESSIONS: usize = 512;
/// Bytes per second a relay forwards for one peer by default: hundreds of
/// token streams, or a long prompt in well under a second.
pub const DEFAULT_RELAY_RATE: u64 = 4 * 1024 * 1024;
/// Between checks of a node's reservations (and, while it has fewer than
/// it wants, attempts to make more) ...
const RESERVE_CHECK: Duration = Duration::from_secs(2);
/// ... backing off to this while no relay can be found or will reserve.
const RESERVE_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Bytes asked of a stream per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Bytes of packets gathered into one stream write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// True for addresses of relayed paths (240.0.0.0/4, plain or written as
/// IPv4-mapped IPv6): never a real peer's address.
pub fn is_virtual(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(v4) => is_virtual_v4(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(is_virtual_v4),
    }
}

fn is_virtual_v4(ip: Ipv4Addr) -> bool {
    let [first, ..] = ip.octets();
    first >= 240 && !ip.is_broadcast()
}

/// The IPv4 form of an address that may be written as IPv4-mapped IPv6.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Route {
    out: mpsc::Sender<Bytes>,
    ended: watch::Receiver<bool>,
    /// A connection runs over it ([`tie`]).
    tied: bool,
    peer: NodeId,
    via: NodeId,
    opened: Instant,
}

/// A relayed path as `/v1/network` shows it.
#[derive(Debug, Clone)]
pub struct PathView {
    pub addr: SocketAddr,
    pub peer: NodeId,
    pub via: NodeId,
    pub age: Duration,
}

/// Byte counters of this node's own relayed paths, for `/metrics`.
#[derive(Debug, Default)]
pub struct PathStats {
    pub sent_bytes: AtomicU64,
    pub received_bytes: AtomicU64,
    pub dropped_packets: AtomicU64,
    pub opened: AtomicU64,
}

/// This node's relayed paths, shared by the QUIC socket and the node.
pub struct Paths {
    routes: Mutex<HashMap<SocketAddr, Route>>,
    inbound_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    inbound_rx: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    next: AtomicU32,
    /// The endpoint's socket is IPv6: it sees every address in that form.
    v6: bool,
    pub stats: PathStats,
}

impl std::fmt::Debug for Paths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paths")
            .field("open", &lock(&self.routes).len())
            .finish()
    }
}

impl Paths {
    /// Paths for an endpoint whose socket is IPv6 (`v6`) or IPv4.
    pub fn new(v6: bool) -> Arc<Self> {
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_PACKET_QUEUE);
        Arc::new(Self {
            routes: Mutex::new(HashMap::new()),
            inbound_tx,
            inbound_rx: Mutex::new(inbound_rx),
            next: AtomicU32::new(1),
            v6,
            stats: PathStats::default(),
        })
    }

    /// Takes a datagram the endpoint sends to a virtual address (false for
    /// any other address: the socket sends it). Datagrams batched for
    /// segmentation offload are split; a full or closed path drops them.
    pub fn send(&self, t: &Transmit) -> bool {
        if !is_virtual(&t.destination) {
            return false;
        }
        let out = lock(&self.routes)
            .get(&canonical(t.destination))
            .map(|r| r.out.clone());
        let segment = t.segment_size.unwrap_or(t.contents.len()).max(1);
        for packet in t.contents.chunks(segment) {
            let sent = out
                .as_ref()
                .is_some_and(|o| o.try_send(Bytes::copy_from_slice(packet)).is_ok());
            if sent {
                self.stats
                    .sent_bytes
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
            } else {
                self.stats.dropped_packets.fetch_add(1, Ordering::Relaxed);
            }
        }
        true
    }

    /// A packet that arrived over a path, for the endpoint: written into
    /// the first buffer, with the path's address as its source.
    pub fn poll_inbound(
        &self,
        cx: &mut Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<usize> {
        let (Some(buf), Some(m)) = (bufs.first_mut(), meta.first_mut()) else {
            return Poll::Pending;
        };
        let mut rx = lock(&self.inbound_rx);
        match rx.poll_recv(cx) {
            Poll::Ready(Some((from, packet))) => {
                let len = packet.len().min(buf.len());
                buf[..len].copy_from_slice(&packet[..len]);
                let addr = if self.v6 {
                    match from {
                        SocketAddr::V4(v4) => SocketAddr::V6(SocketAddrV6::new(
                            v4.ip().to_ipv6_mapped(),
                            v4.port(),
                            0,
                            0,
                        )),
                        v6 => v6,
                    }
                } else {
                    from
                };
                *m = RecvMeta {
                    addr,
                    len,
                    stride: len,
                    ecn: None,
                    dst_ip: None,
                };
                Poll::Ready(1)
            }
            _ => Poll::Pending,
        }
    }

    /// True while another path may open.
    pub fn has_room(&self) -> bool {
        lock(&self.routes).len() < MAX_PATHS
    }

    /// Turns a stream set up with a relay into a path to `peer` (through
    /// `via`): its virtual address. `leftover` holds bytes already read
    /// past the set-up frames.
    pub fn open(
        self: &Arc<Self>,
        peer: NodeId,
        via: NodeId,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        leftover: Vec<u8>,
    ) -> Result<SocketAddr, PeerError> {
        let (out, out_rx) = mpsc::channel(PATH_PACKET_QUEUE);
        let (ended_tx, ended) = watch::channel(false);
        let addr = {
            let mut routes = lock(&self.routes);
            if routes.len() >= MAX_PATHS {
                return Err(PeerError::Unreachable(format!(
                    "{MAX_PATHS} relayed paths open already"
                )));
            }
            let addr = loop {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let ip = Ipv4Addr::from(0xF000_0000 | (n & 0x0FFF_FFFF));
                let a = SocketAddr::new(ip.into(), 1);
                if is_virtual(&a) && !routes.contains_key(&a) {
                    break a;
                }
            };
            routes.insert(
                addr,
                Route {
                    out,
                    ended,
                    tied: false,
                    peer,
                    via,
                    opened: Instant::now(),
                },
            );
            addr
        };
        self.stats.opened.fetch_add(1, Ordering::Relaxed);
        let paths = self.clone();
        tokio::spawn(async move {
            let why = tokio::select! {
                why = paths.pump(addr, send, recv, out_rx, leftover) => why,
                () = async {
                    tokio::time::sleep(PATH_SETUP_DEADLINE).await;
                    if lock(&paths.routes).get(&addr).is_some_and(|r| r.tied) {
                        std::future::pending::<()>().await;
                    }
                } => "no connection came over it".to_owned(),
            };
            lock(&paths.routes).remove(&addr);
            let _ = ended_tx.send(true);
            tracing::debug!(%addr, %peer, %via, "relayed path closed: {why}");
        });
        Ok(addr)
    }

    /// Moves packets between the endpoint and the stream until either side
    /// ends; says why it ended.
    async fn pump(
        &self,
        addr: SocketAddr,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        mut out_rx: mpsc::Receiver<Bytes>,
        leftover: Vec<u8>,
    ) -> String {
        let writer = async {
            let mut buf = Vec::with_capacity(WRITE_BATCH_BYTES);
            while let Some(p) = out_rx.recv().await {
                buf.clear();
                encode_packet(&mut buf, &p).map_err(|e| PeerError::Protocol(e.to_string()))?;
                while buf.len() < WRITE_BATCH_BYTES {
                    let Ok(p) = out_rx.try_recv() else { break };
                    encode_packet(&mut buf, &p).map_err(|e| PeerError::Protocol(e.to_string()))?;
                }
                send.write_all(&buf).await?;
            }
            let _ = send.finish();
            Ok::<&str, PeerError>("closed here")
        };
        let reader = async {
            let mut dec = PacketDecoder::default();
            dec.push(&leftover);
            loop {
                while let Some(p) = dec
                    .next_packet()
                    .map_err(|e| PeerError::Protocol(e.to_string()))?
                {
                    self.stats
                        .received_bytes
                        .fetch_add(p.len() as u64, Ordering::Relaxed);
                    let packet = Bytes::copy_from_slice(p);
                    if self.inbound_tx.send((addr, packet)).await.is_err() {
                        return Ok("the endpoint closed");
                    }
                }
                let read = tokio::time::timeout(PATH_IDLE, recv.read_chunk(READ_CHUNK_BYTES, true));
                match read
                    .await
                    .map_err(|_| PeerError::Timeout("relayed path idle"))??
                {
                    Some(c) => dec.push(&c.bytes),
                    None => return Ok::<&str, PeerError>("the relay ended it"),
                }
            }
        };
        let ended = tokio::select! {
            r = writer => r,
            r = reader => r,
        };
        match ended {
            Ok(why) => why.to_owned(),
            Err(e) => e.to_string(),
        }
    }

    /// Ends the path at `addr` (its QUIC connection closed).
    pub fn close(&self, addr: &SocketAddr) {
        lock(&self.routes).remove(&canonical(*addr));
    }

    /// Turns true when the path at `addr` ends; `None` when there is none.
    /// Marks the path as carrying a connection.
    fn tie_to(&self, addr: &SocketAddr) -> Option<watch::Receiver<bool>> {
        lock(&self.routes).get_mut(&canonical(*addr)).map(|r| {
            r.tied = true;
            r.ended.clone()
        })
    }

    /// The relay a path goes through.
    pub fn via(&self, addr: &SocketAddr) -> Option<NodeId> {
        lock(&self.routes).get(&canonical(*addr)).map(|r| r.via)
    }

    /// Every open path.
    pub fn list(&self) -> Vec<PathView> {
        lock(&self.routes)
            .iter()
            .map(|(addr, r)| PathView {
                addr: *addr,
                peer: r.peer,
                via: r.via,
                age: r.opened.elapsed(),
            })
            .collect()
    }
}

/// Ties a QUIC connection over a relayed path to the path: when either
/// ends, the other is ended too, so a lost relay fails the connection's
/// requests at once and a closed connection frees the relay.
pub fn tie(paths: &Arc<Paths>, conn: &quinn::Connection) {
    let addr = conn.remote_address();
    let Some(mut ended) = paths.tie_to(&addr) else {
        conn.close(CLOSE_NORMAL, b"relayed path gone");
        return;
    };
    let paths = paths.clone();
    let conn = conn.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = conn.closed() => paths.close(&addr),
            _ = ended.wait_for(|e| *e) => {
                tracing::info!(%addr, "relayed path ended; closing its connection");
                conn.close(CLOSE_NORMAL, b"relayed path ended");
            }
        }
    });
}

/// Closes a path when dropped, unless a connection over it was kept.
pub struct PathGuard {
    paths: Arc<Paths>,
    addr: Option<SocketAddr>,
}

impl PathGuard {
    pub fn new(paths: &Arc<Paths>, addr: SocketAddr) -> Self {
        Self {
            paths: paths.clone(),
            addr: Some(addr),
        }
    }

    /// Keeps the path when `conn` runs over it; true then.
    pub fn keep(mut self, conn: &quinn::Connection) -> bool {
        let ours = self
            .addr
            .is_some_and(|a| canonical(conn.remote_address()) == canonical(a));
        if ours {
            self.addr = None;
        }
        ours
    }
}

impl Drop for PathGuard {
    fn drop(&mut self) {
        if let Some(a) = self.addr {
            self.paths.close(&a);
        }
    }
}

/// Reads the one [`RelayReply`] a relay message is answered with.
async fn read_reply(recv: &mut FramedRecv) -> Result<u16, PeerError> {
    recv.next(|m| match m {
        ArchivedMessage::RelayReply(r) => Ok(r.code.to_native()),
        other => Err(PeerError::Protocol(format!(
            "{} in answer to a relay message",
            crate::proto::kind_of(other)
        ))),
    })
    .await?
    .ok_or_else(|| PeerError::Protocol("relay stream ended without a reply".into()))
}

/// Asks `relay` for a path to `target`: the path's virtual address.
pub async fn connect_via(
    conns: &Connections,
    paths: &Arc<Paths>,
    relay: &PeerAddr,
    target: NodeId,
) -> Result<SocketAddr, PeerError> {
    let setup = async {
        let (conn, _) = conns.get(relay, false).await?;
        let (s, r) = conn.open_bi().await?;
        let mut send = FramedSend::new(s);
        send.send(&Message::RelayConnect(RelayConnect { target: target.0 }))
            .await?;
        let mut recv = FramedRecv::new(r);
        let code = read_reply(&mut recv).await?;
        Ok::<_, PeerError>((code, send, recv))
    };
    let (code, send, recv) = tokio::time::timeout(RELAY_SETUP_TIMEOUT, setup)
        .await
        .map_err(|_| PeerError::Timeout("setting up a relayed path"))??;
    if code != 200 {
        return Err(PeerError::Unreachable(format!(
            "relay {} gave no path to {target} (code {code})",
            relay.id
        )));
    }
    let (recv, leftover) = recv.into_parts();
    paths.open(target, relay.id, send.stream, recv, leftover)
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

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The relay this node runs for others (`hypha up --relay`).
pub struct RelayService {
    config: RelayConfig,
    /// Reserved nodes: their connection and how many paths they take.
    reservations: Mutex<HashMap<NodeId, (quinn::Connection, usize)>>,
    /// Open paths per peer (either end), and their byte buckets.
    sessions: Mutex<HashMap<NodeId, (usize, Bucket)>>,
    /// Open paths per (asker, target).
    pairs: Mutex<HashMap<(NodeId, NodeId), usize>>,
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
        Ok(Self {
            config,
            reservations: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            pairs: Mutex::new(HashMap::new()),
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

    fn refuse(&self, code: u16) -> u16 {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        code
    }

    /// A reservation request from `peer` on `conn`, to be reached over at
    /// most `max_sessions` paths at once; the answer's code.
    pub fn reserve(&self, peer: NodeId, conn: &quinn::Connection, max_sessions: u32) -> u16 {
        if !self.config.allow.is_empty() && !self.config.allow.contains(&peer) {
            tracing::info!(%peer, "relay reservation refused: not on the allow list");
            return self.refuse(403);
        }
        {
            let mut r = lock(&self.reservations);
            r.retain(|_, (c, _)| c.close_reason().is_none());
            if r.len() >= self.config.max_reservations && !r.contains_key(&peer) {
                drop(r);
                return self.refuse(429);
            }
            let sessions = (max_sessions as usize).clamp(1, MAX_SESSIONS_PER_TARGET);
            r.insert(peer, (conn.clone(), sessions));
        }
        tracing::info!(%peer, "relay reservation granted");
        200
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
        if busy(&a) >= self.config.max_sessions_per_peer
            || busy(&b) >= b_max
            || pairs.get(&(a, b)).copied().unwrap_or(0) >= MAX_SESSIONS_PER_PAIR
        {
            return None;
        }
        *pairs.entry((a, b)).or_default() += 1;
        for id in [a, b] {
            let rate = self.config.bytes_per_second_per_peer as f64;
            s.entry(id)
                .or_insert_with(|| {
                    (
                        0,
                        Bucket {
                            tokens: rate,
                            at: Instant::now(),
                        },
                    )
                })
                .0 += 1;
        }
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        Some(SessionGuard {
            svc: self.clone(),
            ends: [a, b],
        })
    }

    /// Takes `n` bytes from `peer`'s bucket: how long to wait before
    /// forwarding them.
    fn charge(&self, peer: &NodeId, n: usize) -> Duration {
        let rate = self.config.bytes_per_second_per_peer.max(1) as f64;
        let mut s = lock(&self.sessions);
        let Some((_, b)) = s.get_mut(peer) else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(rate);
        b.at = now;
        b.tokens -= n as f64;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / rate)
        }
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
        let answer = |code| Message::RelayReply(RelayReply { code });
        let reserved = lock(&self.reservations)
            .get(&target)
            .filter(|(c, _)| c.close_reason().is_none())
            .cloned();
        let Some((conn, target_max)) = reserved else {
            send.send(&answer(self.refuse(404))).await?;
            send.finish();
            return Ok(());
        };
        let Some(_guard) = self.admit(from, target, target_max) else {
            send.send(&answer(self.refuse(429))).await?;
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
            let code = read_reply(&mut from_target).await?;
            Ok::<_, PeerError>((code, to_target, from_target))
        })
        .await;
        let (to_target, from_target) = match asked {
            Ok(Ok((200, s, r))) => (s, r),
            Ok(Ok((code, _, _))) => {
                send.send(&answer(self.refuse(code))).await?;
                send.finish();
                return Ok(());
            }
            Ok(Err(e)) => {
                tracing::debug!(%target, "relay target failed: {e}");
                send.send(&answer(self.refuse(502))).await?;
                send.finish();
                return Ok(());
            }
            Err(_) => {
                send.send(&answer(self.refuse(502))).await?;
                send.finish();
                return Ok(());
            }
        };
        send.send(&answer(200)).await?;
        self.stats.sessions_opened.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%from, %target, "relaying");
        let (a_recv, a_left) = recv.into_parts();
        let (b_recv, b_left) = from_target.into_parts();
        let there = self.forward(from, a_recv, a_left, to_target.stream);
        let back = self.forward(target, b_recv, b_left, send.stream);
        let why = tokio::select! {
            r = there => r,
            r = back => r,
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

impl crate::discovery::Capacity for RelayService {
    /// A relay's record tells how many more reservations it takes.
    fn free_slots(&self) -> u32 {
        self.free()
    }

    fn decode_tokens_per_s(&self) -> u32 {
        0
    }
}

/// One relayed path counted against both ends' limits.
struct SessionGuard {
    svc: Arc<RelayService>,
    ends: [NodeId; 2],
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        {
            let mut pairs = lock(&self.svc.pairs);
            let pair = (self.ends[0], self.ends[1]);
            if let Some(n) = pairs.get_mut(&pair) {
                *n = n.saturating_sub(1);
                if *n == 0 {
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

/// The reservations a node behind a NAT holds at relays, kept by
/// [`keep_reservations`].
#[derive(Default)]
pub struct RelayClient {
    /// Relays to reserve at whatever the NAT looks like (`--relay-via`).
    pub via: Vec<PeerAddr>,
    /// Reserve at relays found in the DHT once the node is seen behind a
    /// NAT.
    pub auto: bool,
    held: Mutex<Vec<(Contact, quinn::Connection)>>,
}

impl RelayClient {
    pub fn new(via: Vec<PeerAddr>, auto: bool) -> Self {
        Self {
            via,
            auto,
            held: Mutex::new(Vec::new()),
        }
    }

    /// Relays this node holds a live reservation at.
    pub fn relays(&self) -> Vec<Contact> {
        lock(&self.held)
            .iter()
            .filter(|(_, c)| c.close_reason().is_none())
            .map(|(r, _)| *r)
            .collect()
    }

    /// True when `relay` holds a live reservation for this node.
    pub fn reserved_at(&self, relay: &NodeId) -> bool {
        self.relays().iter().any(|r| r.id == *relay)
    }
}

/// Asks `relay` for a reservation.
async fn reserve_at(conns: &Connections, relay: &PeerAddr) -> Result<quinn::Connection, PeerError> {
    let (conn, _) = conns.get(relay, false).await?;
    let (s, r) = conn.open_bi().await?;
    let mut send = FramedSend::new(s);
    send.send(&Message::RelayReserve(RelayReserve {
        max_sessions: MAX_SESSIONS_PER_PEER as u32,
    }))
    .await?;
    send.finish();
    let mut recv = FramedRecv::new(r);
    match read_reply(&mut recv).await? {
        200 => Ok(conn),
        code => Err(PeerError::Unreachable(format!(
            "relay {} refused a reservation (code {code})",
            relay.id
        ))),
    }
}

/// Keeps [`RELAYS_PER_NODE`] reservations while the node needs them
/// (configured relays, or relays from the DHT once peers see it behind a
/// NAT), until `shutdown`.
pub async fn keep_reservations(
    client: Arc<RelayClient>,
    conns: Arc<Connections>,
    discovery: crate::discovery::Discovery,
    reach: Arc<crate::reach::Reachability>,
    me: NodeId,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut wait = RESERVE_CHECK;
    loop {
        lock(&client.held).retain(|(_, c)| c.close_reason().is_none());
        let behind_nat = matches!(
            reach.view().mapping,
            hypha_nat::Mapping::EndpointIndependent { .. }
                | hypha_nat::Mapping::EndpointDependent { .. }
        );
        let wanted = !client.via.is_empty() || (client.auto && behind_nat);
        let held = client.relays().len();
        if wanted && held < RELAYS_PER_NODE {
            let mut options: Vec<PeerAddr> = client.via.clone();
            if client.auto {
                for r in discovery.providers(hypha_dht::RELAY_SERVICE).await {
                    if let Some(addr) = r.addrs.first() {
                        options.push(PeerAddr {
                            id: r.publisher,
                            addr: *addr,
                        });
                    }
                }
            }
            for relay in options {
                if client.relays().len() >= RELAYS_PER_NODE {
                    break;
                }
                if relay.id == me || client.reserved_at(&relay.id) {
                    continue;
                }
                match tokio::time::timeout(RELAY_SETUP_TIMEOUT, reserve_at(&conns, &relay)).await {
                    Ok(Ok(conn)) => {
                        tracing::info!(relay = %relay, "relay reservation held");
                        lock(&client.held).push((
                            Contact {
                                id: relay.id,
                                addr: relay.addr,
                            },
                            conn,
                        ));
                    }
                    Ok(Err(e)) => tracing::info!(relay = %relay, "no reservation: {e}"),
                    Err(_) => tracing::info!(relay = %relay, "no reservation: timed out"),
                }
            }
        }
        let short = wanted && client.relays().len() < RELAYS_PER_NODE;
        wait = if short && client.relays().len() <= held {
            (wait * 2).min(RESERVE_BACKOFF_MAX)
        } else {
            RESERVE_CHECK
        };
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_addresses_are_class_e_only() {
        for a in ["240.0.0.1:1", "255.255.255.254:9", "[::ffff:240.0.0.7]:1"] {
            assert!(is_virtual(&a.parse().unwrap()), "{a}");
        }
        for a in [
            "239.255.255.255:1",
            "255.255.255.255:1",
            "198.18.0.1:7000",
            "[::1]:1",
            "[fd00::1]:1",
        ] {
            assert!(!is_virtual(&a.parse().unwrap()), "{a}");
        }
        assert_eq!(
            canonical("[::ffff:240.0.0.7]:1".parse().unwrap()),
            "240.0.0.7:1".parse::<SocketAddr>().unwrap()
        );
    }

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
