//! L4, the QUIC edge: accept peers, exchange hellos, and dispatch every
//! stream a peer opens by its first frame to the service that answers it.
//!
//! Every node with an identity listens: the DHT needs every node to answer.
//! One task accepts connections (at most `max_peers`, bounded by
//! [`crate::net::pool::MAX_PEERS`], and shares per address and identity:
//! see [`Slots`]; an attempt beyond them is refused before its handshake,
//! or sheds an idle peer) and takes the connections this node dialed from
//! the pool ([`Adopted`]): a peer may open streams on those too. Each connection gets
//! a task for the handshake and hello, then one task per stream (QUIC
//! bounds them per peer). A stream opening with `Request` goes to the
//! seeder ([`crate::inference::serve`]) or is refused `NotFound` on a node
//! without a model; `Dht` gets one `DhtReply`; `Punch` goes to
//! [`Punches`]; the relay messages to the relay service or this node's
//! relayed paths. A protocol violation on any stream closes the whole
//! connection with the reason; other peers are unaffected.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hypha_wire::{
    ArchivedMessage, DhtReply, DhtRequest, ErrorReply, InferenceRequest, Message, NodeId, Refusal,
};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::inference::convert::http_status;
use crate::inference::serve::{serve_request, SeederState};
use crate::metrics::Metrics;
use crate::net::addr::is_virtual;
use crate::net::endpoint::Endpoint;
use crate::net::hello::VerifiedHello;
use crate::net::paths::tie;
use crate::net::pool::{Adopted, Connections};
use crate::net::proto::{
    close_for_violation, hello_as_acceptor, kind_of, FramedRecv, FramedSend, PeerError, Violation,
    CLOSE_NORMAL, HELLO_TIMEOUT, OPENING_FRAME_TIMEOUT,
};
use crate::net::slots::{Admit, SlotGuard, Slots};
use crate::services::dht::Discovery;
use crate::services::punch::Punches;
use crate::services::relay_client::RelayClient;
use crate::services::relay_server::RelayService;
use crate::util::Tasks;

/// What a node's QUIC listener serves.
pub struct Inbound {
    pub hello: Message,
    pub metrics: Arc<Metrics>,
    /// Peers connected at once.
    pub max_peers: usize,
    /// Proof of work required of a peer's identity.
    pub pow_bits: u32,
    /// Inference, when this node runs a model for peers.
    pub seeder: Option<Arc<SeederState>>,
    /// The DHT this node answers for.
    pub discovery: Option<Discovery>,
    /// This node's connections: accepted ones are registered there (a
    /// rendezvous forwards punch requests over them).
    pub conns: Arc<Connections>,
    /// Punch requests, as a rendezvous and as a target.
    pub punches: Punches,
    /// The relay this node runs for others (`--relay`).
    pub relay: Option<Arc<RelayService>>,
    /// The relays this node holds reservations at: only they may offer it
    /// relayed paths.
    pub relay_client: Arc<RelayClient>,
    pub tasks: Tasks,
}

/// Accepts peers, and serves the connections the pool hands over
/// ([`Adopted`]), until the node stops; then closes every connection.
pub async fn run(
    endpoint: Arc<Endpoint>,
    state: Arc<Inbound>,
    mut adopted: mpsc::Receiver<Adopted>,
) {
    let slots = Slots::new(state.max_peers);
    let tasks = state.tasks.clone();
    loop {
        let incoming = tokio::select! {
            biased;
            () = tasks.stopping() => break,
            Some(a) = adopted.recv() => {
                let span = tracing::info_span!("peer", peer = %a.peer);
                tasks.spawn(serve_streams(a.conn, a.peer, a.hello, state.clone(), None).instrument(span));
                continue;
            }
            i = endpoint.accept_incoming() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let remote = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        let slot = match slots.admit(remote.ip(), validated, std::time::Instant::now()) {
            Admit::Slot(s) => s,
            Admit::Retry => {
                state.metrics.quic_retries.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            Admit::Refuse(why) => {
                state.metrics.peers_refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%remote, "refusing peer: {why}");
                incoming.refuse();
                continue;
            }
        };
        let state = state.clone();
        tasks.spawn(async move {
            let accepted = tokio::time::timeout(HELLO_TIMEOUT, Endpoint::handshake(incoming)).await;
            let (conn, peer) = match accepted {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::info!(%remote, "handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "handshake timed out");
                    return;
                }
            };
            if let Err(why) = slot.identified(peer, &conn, std::time::Instant::now()) {
                state.metrics.peers_refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%remote, %peer, "closing connection: {why}");
                conn.close(CLOSE_NORMAL, why.to_string().as_bytes());
                return;
            }
            let span = tracing::info_span!("peer", %peer);
            serve_connection(conn, peer, state, slot)
                .instrument(span)
                .await;
        });
    }
    endpoint.close();
    // Let the close frames leave before the endpoint is dropped.
    endpoint.wait_idle().await;
}

async fn serve_connection(
    conn: quinn::Connection,
    peer: NodeId,
    state: Arc<Inbound>,
    slot: SlotGuard,
) {
    let hello = match hello_as_acceptor(&conn, peer, &state.hello, state.pow_bits).await {
        Ok(h) => h,
        Err(e) => {
            if e.is_violation() || matches!(e, PeerError::Timeout(_)) {
                state
                    .metrics
                    .peer_violations
                    .fetch_add(1, Ordering::Relaxed);
                close_for_violation(&conn, peer, &e);
            } else {
                tracing::info!("peer left during hello: {e}");
            }
            return;
        }
    };
    tracing::info!(remote = %conn.remote_address(), capabilities = hello.offer.capabilities, "peer connected");
    let hello = Arc::new(hello);
    if is_virtual(&conn.remote_address()) {
        tie(state.conns.endpoint().paths(), &conn, &state.tasks);
    }
    state
        .metrics
        .peers_connected
        .fetch_add(1, Ordering::Relaxed);
    state.conns.accepted_opened(peer, &conn);
    serve_streams(
        conn.clone(),
        peer,
        hello,
        state.clone(),
        Some(Arc::new(slot)),
    )
    .await;
    state.conns.accepted_closed(peer, &conn);
    state
        .metrics
        .peers_connected
        .fetch_sub(1, Ordering::Relaxed);
}

/// Serves the streams a peer opens on `conn` (accepted here, or dialed by
/// this node: a peer may send requests either way) until it closes or the
/// node stops. `slot`, for an accepted connection, learns when streams
/// open and end: a peer without any may be shed.
async fn serve_streams(
    conn: quinn::Connection,
    peer: NodeId,
    hello: Arc<VerifiedHello>,
    state: Arc<Inbound>,
    slot: Option<Arc<SlotGuard>>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = state.tasks.stopping() => {
                conn.close(CLOSE_NORMAL, b"node shutting down");
                break;
            }
            a = conn.accept_bi() => a,
        };
        let (send, recv) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, "peer disconnected: {e}");
                break;
            }
        };
        let st = state.clone();
        let conn = conn.clone();
        let hello = hello.clone();
        let slot = slot.clone();
        if let Some(s) = &slot {
            s.stream(true, std::time::Instant::now());
        }
        state.tasks.spawn(
            async move {
                let served = serve_any(send, recv, &st, &hello, &conn).await;
                if let Some(s) = &slot {
                    s.stream(false, std::time::Instant::now());
                }
                if let Err(e) = served {
                    if e.is_violation() {
                        st.metrics.peer_violations.fetch_add(1, Ordering::Relaxed);
                        close_for_violation(&conn, peer, &e);
                    } else {
                        tracing::debug!("request stream ended: {e}");
                    }
                }
            }
            .in_current_span(),
        );
    }
}

/// What may open a stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Opening {
    Request(InferenceRequest),
    Dht(DhtRequest),
    Punch(hypha_wire::PunchRequest),
    RelayReserve(u32),
    RelayConnect(NodeId),
    RelayIncoming(NodeId),
}

/// Checks a stream's first frame: what it asks of this node.
pub fn opening(msg: &ArchivedMessage) -> Result<Opening, PeerError> {
    let bad = |e: hypha_wire::WireError| PeerError::Protocol(Violation::BadRequest(e));
    match msg {
        ArchivedMessage::Request(r) => hypha_wire::owned_request(r)
            .map(Opening::Request)
            .map_err(bad),
        ArchivedMessage::Dht(d) => {
            hypha_dht::codec::check_archived_request(d).map_err(Violation::Dht)?;
            hypha_wire::owned_dht_request(d)
                .map(Opening::Dht)
                .map_err(bad)
        }
        ArchivedMessage::Punch(p) => hypha_wire::owned_punch(p).map(Opening::Punch).map_err(bad),
        ArchivedMessage::RelayReserve(r) => Ok(Opening::RelayReserve(r.max_sessions.to_native())),
        ArchivedMessage::RelayConnect(c) => Ok(Opening::RelayConnect(NodeId(c.target))),
        ArchivedMessage::RelayIncoming(i) => Ok(Opening::RelayIncoming(NodeId(i.from))),
        other => Err(Violation::Opening(kind_of(other)).into()),
    }
}

/// Reads a stream's first frame and serves it.
async fn serve_any(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    state: &Inbound,
    peer: &VerifiedHello,
    conn: &quinn::Connection,
) -> Result<(), PeerError> {
    let mut recv = FramedRecv::new(recv);
    let mut send = FramedSend::new(send);
    // The first bytes must come soon; a long frame then gets time to
    // arrive whole (`next` keeps what it read when its timer fires).
    let first = match tokio::time::timeout(HELLO_TIMEOUT, recv.next(opening)).await {
        Ok(r) => r,
        Err(_) if recv.buffered() > 0 => {
            tokio::time::timeout(OPENING_FRAME_TIMEOUT - HELLO_TIMEOUT, recv.next(opening))
                .await
                .map_err(|_| PeerError::Protocol(Violation::NoRequest))?
        }
        Err(_) => return Err(PeerError::Protocol(Violation::NoRequest)),
    }?
    .ok_or(PeerError::Protocol(Violation::EndedBefore("its request")))?;
    let relay_reply = |refusal| Message::RelayReply(hypha_wire::RelayReply { refusal });
    match first {
        Opening::RelayReserve(max_sessions) => {
            let answer = match &state.relay {
                Some(r) => r.reserve(peer.node_id, conn, max_sessions),
                None => Some(Refusal::Forbidden),
            };
            send.send(&relay_reply(answer)).await?;
            send.finish();
            Ok(())
        }
        Opening::RelayConnect(target) => match &state.relay {
            Some(r) => r.connect(peer.node_id, target, send, recv).await,
            None => {
                send.send(&relay_reply(Some(Refusal::Forbidden))).await?;
                send.finish();
                Ok(())
            }
        },
        Opening::RelayIncoming(from) => {
            // Only a relay this node reserved at may offer it paths.
            if !state.relay_client.reserved_at(&peer.node_id) {
                send.send(&relay_reply(Some(Refusal::Forbidden))).await?;
                send.finish();
                return Ok(());
            }
            let paths = state.conns.endpoint().paths();
            if !paths.has_room() {
                send.send(&relay_reply(Some(Refusal::TooMany))).await?;
                send.finish();
                return Ok(());
            }
            send.send(&relay_reply(None)).await?;
            let (recv, leftover) = recv.into_parts();
            match paths.open(from, peer.node_id, send.stream, recv, leftover) {
                Ok(addr) => {
                    tracing::info!(%from, via = %peer.node_id, %addr, "relayed path offered");
                    Ok(())
                }
                Err(e) => {
                    tracing::info!(%from, "relayed path refused: {e}");
                    Ok(())
                }
            }
        }
        Opening::Punch(req) => {
            let refusal = state.punches.handle(req, peer.node_id).await;
            send.send(&Message::PunchReply(hypha_wire::PunchReply { refusal }))
                .await?;
            send.finish();
            Ok(())
        }
        Opening::Dht(req) => {
            let reply = match &state.discovery {
                Some(d) => {
                    let req = hypha_dht::codec::request_from_wire(req).map_err(Violation::Dht)?;
                    let from = hypha_dht::Contact {
                        id: peer.node_id,
                        addr: conn.remote_address(),
                    };
                    match d.answer(from, req).await {
                        Some(r) => hypha_dht::codec::reply_to_wire(&r),
                        None => DhtReply::Refused,
                    }
                }
                None => DhtReply::Refused,
            };
            send.send(&Message::DhtReply(reply)).await?;
            send.finish();
            Ok(())
        }
        Opening::Request(req) => match &state.seeder {
            Some(seeder) => serve_request(send, recv, req, seeder, peer, conn).await,
            None => {
                state
                    .metrics
                    .count_request("peer", http_status(Refusal::NotFound));
                send.send(&Message::Error(ErrorReply {
                    request_id: req.request_id,
                    refusal: Refusal::NotFound,
                    message: "this node serves no model".into(),
                }))
                .await?;
                send.finish();
                Ok(())
            }
        },
    }
}
