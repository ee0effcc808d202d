//! Relayed paths at either end: how a stream set up through a relay becomes
//! a virtual address the QUIC socket sends to and receives from.
//!
//! Each end turns its stream into a *virtual address* in 240.0.0.0/4
//! (reserved, never routed): the QUIC endpoint's socket
//! ([`crate::net::socket::StunSocket`]) hands datagrams for such an address
//! to its path ([`Paths`]) and delivers the path's packets as if they came
//! from it. The two ends then run an ordinary QUIC handshake over that
//! address: the connection is end-to-end encrypted and authenticated between
//! their own identities, and the relay forwards packets it has no key to. A
//! path ends when either stream ends; the QUIC connection over it is closed
//! at once on both ends ([`tie`]).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hypha_wire::{encode_packet, NodeId, PacketDecoder};
use quinn::udp::{RecvMeta, Transmit};
use tokio::sync::{mpsc, watch};

use crate::net::addr::{canonical, is_virtual};
use crate::net::proto::{PeerError, Violation, CLOSE_NORMAL};
use crate::util::{lock, Tasks};

/// Packets waiting to enter one path's stream; more are dropped (QUIC
/// retransmits, and slows down on loss).
pub const PATH_PACKET_QUEUE: usize = 512;
/// Packets from all paths waiting for the QUIC endpoint.
pub const INBOUND_PACKET_QUEUE: usize = 1024;
/// Relayed paths one node holds open at once (as either end).
pub const MAX_PATHS: usize = 256;
/// A path (at a relay, or at either end) that carries nothing for this
/// long is closed: a live QUIC connection over it sends keep-alives every
/// [`crate::net::endpoint::RELAYED_KEEP_ALIVE`].
pub const PATH_IDLE: Duration = Duration::from_secs(10);
/// A path offered to this node must carry a connection that completed its
/// handshake and hello within this long, or it is closed.
pub const PATH_SETUP_DEADLINE: Duration = Duration::from_secs(15);
/// Bytes asked of a stream per read.
pub(crate) const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Bytes of packets gathered into one stream write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

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
    /// Owns each path's pump task.
    tasks: Tasks,
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
    pub fn new(v6: bool, tasks: Tasks) -> Arc<Self> {
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_PACKET_QUEUE);
        Arc::new(Self {
            routes: Mutex::new(HashMap::new()),
            inbound_tx,
            inbound_rx: Mutex::new(inbound_rx),
            tasks,
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
        self.tasks.spawn(async move {
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
                encode_packet(&mut buf, &p).map_err(|e| PeerError::Protocol(Violation::Wire(e)))?;
                while buf.len() < WRITE_BATCH_BYTES {
                    let Ok(p) = out_rx.try_recv() else { break };
                    encode_packet(&mut buf, &p)
                        .map_err(|e| PeerError::Protocol(Violation::Wire(e)))?;
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
                    .map_err(|e| PeerError::Protocol(Violation::Wire(e)))?
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
pub fn tie(paths: &Arc<Paths>, conn: &quinn::Connection, tasks: &Tasks) {
    let addr = conn.remote_address();
    let Some(mut ended) = paths.tie_to(&addr) else {
        conn.close(CLOSE_NORMAL, b"relayed path gone");
        return;
    };
    let paths = paths.clone();
    let conn = conn.clone();
    tasks.spawn(async move {
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
