//! The QUIC endpoint's UDP socket, answering STUN on the same port.
//!
//! Every datagram the endpoint receives passes through [`StunSocket`]
//! first: a STUN binding request (told apart by `hypha_nat::stun::is_stun`)
//! is answered at once with the address it came from and never reaches
//! QUIC; a binding response is handed to the node's prober. So peers learn
//! their public address from nodes they already know, on the very port
//! their QUIC traffic uses, with no STUN server of their own.
//!
//! The socket also carries the node's relayed paths: datagrams QUIC sends
//! to a path's virtual address go into that path's stream, and packets
//! arriving over a path are received as if from that address
//! ([`crate::net::paths::Paths`]).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

use crate::net::addr::is_virtual;
use crate::net::paths::Paths;
use crate::util::{lock, BoundedMap, Overflow, RateWindow, Tasks};

/// STUN requests answered per second at most, from everyone together.
pub const MAX_STUN_ANSWERS_PER_SECOND: u32 = 2000;
/// STUN requests answered per second to one source address: a prober's
/// retransmissions with room to spare. With answers never longer than the
/// request ([`hypha_nat::stun::MAX_RESPONSE_BYTES`]; shorter requests go
/// unanswered), a forged source gets no more bytes than were sent in its
/// name, and few of them.
pub const STUN_ANSWERS_PER_SOURCE_PER_SECOND: u32 = 8;
/// Sources whose windows are kept; beyond, new sources wait for stale
/// windows to go.
const MAX_STUN_SOURCES: usize = 4096;
/// Binding responses waiting for the prober; more are dropped (the prober
/// retransmits).
pub const STUN_RESPONSE_QUEUE: usize = 256;

/// A binding response that arrived: who sent it and its bytes.
pub type StunResponse = (SocketAddr, Vec<u8>);

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct StunStats {
    pub requests_answered: AtomicU64,
    pub requests_dropped: AtomicU64,
    pub responses_received: AtomicU64,
}

/// See the module docs.
pub struct StunSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    responses: mpsc::Sender<StunResponse>,
    window: Mutex<RateWindow>,
    sources: Mutex<BoundedMap<std::net::IpAddr, RateWindow>>,
    pub stats: Arc<StunStats>,
    /// Relayed paths, reached through virtual addresses.
    pub paths: Arc<Paths>,
    /// Which source `poll_recv` reads first, alternating, so neither the
    /// socket nor the relayed paths can starve the other.
    relayed_first: AtomicBool,
}

impl fmt::Debug for StunSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StunSocket")
            .field("inner", &self.inner)
            .finish()
    }
}

impl StunSocket {
    /// Wraps `inner`; binding responses go to the returned receiver.
    pub fn new(
        inner: Arc<dyn AsyncUdpSocket>,
        tasks: Tasks,
    ) -> (Arc<Self>, mpsc::Receiver<StunResponse>) {
        let (responses, rx) = mpsc::channel(STUN_RESPONSE_QUEUE);
        let v6 = inner.local_addr().is_ok_and(|a| a.is_ipv6());
        (
            Arc::new(Self {
                inner,
                responses,
                window: Mutex::new(RateWindow::new(
                    Duration::from_secs(1),
                    MAX_STUN_ANSWERS_PER_SECOND,
                    Instant::now(),
                )),
                sources: Mutex::new(BoundedMap::new(MAX_STUN_SOURCES, Overflow::Refuse)),
                stats: Arc::default(),
                paths: Paths::new(v6, tasks),
                relayed_first: AtomicBool::new(false),
            }),
            rx,
        )
    }

    /// Sends a STUN message (a probe) from the endpoint's own port. A full
    /// socket buffer drops it: probes are retransmitted.
    pub fn send_stun(&self, to: SocketAddr, bytes: &[u8]) -> io::Result<()> {
        self.inner.try_send(&Transmit {
            destination: to,
            ecn: None,
            contents: bytes,
            segment_size: None,
            src_ip: None,
        })
    }

    fn allow_answer(&self, from: SocketAddr) -> bool {
        let now = Instant::now();
        let own = lock(&self.sources)
            .get_or_insert_with(
                from.ip(),
                |w| w.expired(now),
                || {
                    RateWindow::new(
                        Duration::from_secs(1),
                        STUN_ANSWERS_PER_SOURCE_PER_SECOND,
                        now,
                    )
                },
            )
            .is_some_and(|w| w.allow(now));
        own && lock(&self.window).allow(now)
    }

    /// Handles one STUN datagram.
    fn on_stun(&self, meta: &RecvMeta, packet: &[u8]) {
        match hypha_nat::stun::decode(packet) {
            Ok(hypha_nat::stun::Message::Request { txid }) => {
                let resp = hypha_nat::stun::binding_response(txid, meta.addr);
                let Ok(resp) = resp.map_err(|e| tracing::debug!("cannot answer STUN: {e}")) else {
                    return;
                };
                // No amplification: the answer is never longer than what
                // was sent in the source's name.
                if resp.len() > packet.len() || !self.allow_answer(meta.addr) {
                    self.stats.requests_dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let sent = self.inner.try_send(&Transmit {
                    destination: meta.addr,
                    ecn: None,
                    contents: &resp,
                    segment_size: None,
                    src_ip: meta.dst_ip,
                });
                let counter = if sent.is_ok() {
                    &self.stats.requests_answered
                } else {
                    &self.stats.requests_dropped
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Ok(hypha_nat::stun::Message::Response { .. }) => {
                self.stats
                    .responses_received
                    .fetch_add(1, Ordering::Relaxed);
                let _ = self.responses.try_send((meta.addr, packet.to_vec()));
            }
            Err(e) => tracing::trace!(from = %meta.addr, "bad STUN datagram: {e}"),
        }
    }

    /// Takes STUN datagrams out of a received batch; the QUIC ones that
    /// remain are moved to the front. Returns how many remain.
    fn filter(&self, bufs: &mut [io::IoSliceMut<'_>], meta: &mut [RecvMeta], n: usize) -> usize {
        let mut kept = 0;
        for i in 0..n.min(bufs.len()).min(meta.len()) {
            let m = meta[i];
            // A coalesced batch (GRO) holds several datagrams of one flow,
            // always QUIC.
            if is_virtual(&m.addr) {
                // Only relayed paths speak from these addresses; a real
                // datagram claiming one is forged.
                continue;
            }
            let single = m.stride >= m.len;
            if single && hypha_nat::stun::is_stun(bufs[i].get(..m.len).unwrap_or_default()) {
                let packet = bufs[i].get(..m.len).unwrap_or_default().to_vec();
                self.on_stun(&m, &packet);
                continue;
            }
            if kept != i {
                let (front, back) = bufs.split_at_mut(i);
                let len = m.len.min(front[kept].len());
                front[kept][..len].copy_from_slice(&back[0][..len]);
                meta[kept] = m;
            }
            kept += 1;
        }
        kept
    }
}

impl AsyncUdpSocket for StunSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if self.paths.send(transmit) {
            return Ok(());
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let relayed_first = self.relayed_first.fetch_xor(true, Ordering::Relaxed);
        if relayed_first {
            if let Poll::Ready(n) = self.paths.poll_inbound(cx, bufs, meta) {
                return Poll::Ready(Ok(n));
            }
        }
        loop {
            let n = match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                Poll::Pending => break,
                err => return err,
            };
            let kept = self.filter(bufs, meta, n);
            // A batch of STUN alone: read on, so the caller is either given
            // QUIC datagrams or registered for the next wake-up.
            if kept > 0 || n == 0 {
                return Poll::Ready(Ok(kept));
            }
        }
        // Both sources are registered for a wake-up when both are empty.
        if !relayed_first {
            if let Poll::Ready(n) = self.paths.poll_inbound(cx, bufs, meta) {
                return Poll::Ready(Ok(n));
            }
        }
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
