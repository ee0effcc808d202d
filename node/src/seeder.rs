//! The listening side of a node's QUIC endpoint: accept peers, exchange
//! hellos, answer DHT requests, and (on a seeder) serve each request stream
//! from the local engine.
//!
//! Every node with an identity listens: the DHT needs every node to answer.
//! A stream opening with `Dht` gets one `DhtReply`; one opening with
//! `Request` is served when the node runs a model and refused (404) when it
//! does not. One task accepts connections (at most [`MAX_PEERS`] at once; more are
//! refused before their handshake). Each connection gets a task that performs
//! the handshake and hello exchange, then spawns one task per request
//! stream (QUIC bounds them per peer). A request stream carries exactly one
//! `Request`; the seeder answers `Accepted` once the request is admitted,
//! then `Chunk`s numbered from 0, and ends with `Done` or `Error`. A `Cancel`, a reset of the stream or a stop of the
//! reply drops the engine's `Generation`, which frees the slot at the next
//! decode step. A protocol violation on any stream closes the whole
//! connection with the reason; other peers are unaffected.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hypha_engine::{ChatMessage, Engine, Event, GenerateRequest, SamplingParams};
use hypha_ledger::{Ledger, Receipt, ReceiptKey, SignedReceipt, TokenDigest, VerifiedReceipt};
use hypha_wire::{
    Accepted, ArchivedMessage, DhtReply, DhtRequest, Done, ErrorReply, FinishReason,
    InferenceRequest, Message, NodeId, ReceiptOffer, TokenChunk,
};
use tokio::sync::{watch, Semaphore};
use tracing::Instrument as _;

use crate::discovery::{Capacity, Discovery};
use crate::hello::{Offer, VerifiedHello};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::openai::{MAX_MESSAGES, MAX_STOP_BYTES, MAX_STOP_STRINGS};
use crate::proto::{
    close_for_violation, hello_as_acceptor, kind_of, FramedRecv, FramedSend, PeerError,
    CLOSE_NORMAL, HELLO_TIMEOUT,
};
use crate::transport::Endpoint;

/// Peers connected at once; each holds a connection's buffers and up to
/// `MAX_STREAMS_PER_PEER` streams, so this bounds a seeder's peer memory.
pub const MAX_PEERS: usize = 256;

/// How long the seeder waits for a consumer's countersignature when one is
/// due (before more tokens, or after the last receipt).
pub const COUNTERSIGN_TIMEOUT: Duration = Duration::from_secs(5);
/// Tokens between two cumulative receipts by default.
pub const DEFAULT_RECEIPT_INTERVAL: u32 = 64;
/// Requests per minute a consumer with no credits left may make.
pub const DEFAULT_FREE_TIER_PER_MINUTE: u32 = 30;
/// Identities the free-tier limiter remembers; beyond this, new free-tier
/// requests are refused until old windows expire.
pub const MAX_FREE_TIER_IDS: usize = 4096;
const FREE_TIER_WINDOW: Duration = Duration::from_secs(60);

/// Consumers that finished a request without countersigning its receipt;
/// they are refused until the entry ages out. A consumer whose connection
/// went silent or was lost instead while a signature was due (a relay or
/// a link lost) is refused only when that happens twice within
/// [`UNPAID_BAN`]: a network failure costs an honest consumer nothing.
/// (Any request can leave at most one receipt interval unpaid; a request
/// the consumer cancels is not held against it.)
pub struct Unpaid {
    until: std::sync::Mutex<std::collections::HashMap<NodeId, std::time::Instant>>,
    silent: std::sync::Mutex<std::collections::HashMap<NodeId, std::time::Instant>>,
}

/// How long a consumer that did not pay is refused.
pub const UNPAID_BAN: Duration = Duration::from_secs(10 * 60);

impl Default for Unpaid {
    fn default() -> Self {
        Self {
            until: std::sync::Mutex::new(std::collections::HashMap::new()),
            silent: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl Unpaid {
    fn note(&self, id: NodeId) {
        let now = std::time::Instant::now();
        let mut m = self.until.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_FREE_TIER_IDS {
            m.retain(|_, t| *t > now);
        }
        if m.len() < MAX_FREE_TIER_IDS {
            m.insert(id, now + UNPAID_BAN);
        }
    }

    /// `id`'s connection went silent while a signature was due.
    fn note_silent(&self, id: NodeId) {
        let now = std::time::Instant::now();
        let again = {
            let mut m = self.silent.lock().unwrap_or_else(|e| e.into_inner());
            m.retain(|_, t| now.duration_since(*t) < UNPAID_BAN);
            // A full table counts as a second time: too many strangers
            // losing their links at once must not switch the rule off.
            let again = m.contains_key(&id) || m.len() >= MAX_FREE_TIER_IDS;
            if !again {
                m.insert(id, now);
            }
            again
        };
        if again {
            self.note(id);
        }
    }

    fn owes(&self, id: &NodeId) -> bool {
        let m = self.until.lock().unwrap_or_else(|e| e.into_inner());
        m.get(id).is_some_and(|t| *t > std::time::Instant::now())
    }
}

/// Counts free-tier requests per identity in one-minute windows.
pub struct FreeTier {
    per_minute: u32,
    windows: std::sync::Mutex<std::collections::HashMap<NodeId, (std::time::Instant, u32)>>,
}

impl FreeTier {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            windows: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Counts one request by `id`; false when it is over the limit.
    fn allow(&self, id: NodeId, now: std::time::Instant) -> bool {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() >= MAX_FREE_TIER_IDS && !w.contains_key(&id) {
            w.retain(|_, (start, _)| now.duration_since(*start) < FREE_TIER_WINDOW);
            if w.len() >= MAX_FREE_TIER_IDS {
                return false;
            }
        }
        let entry = w.entry(id).or_insert((now, 0));
        if now.duration_since(entry.0) >= FREE_TIER_WINDOW {
            *entry = (now, 0);
        }
        if entry.1 >= self.per_minute {
            return false;
        }
        entry.1 += 1;
        true
    }
}

/// What a seeder serves and how it counts.
pub struct SeederState {
    pub engine: Engine,
    /// Names a request may use for the model (its id and aliases).
    pub models: Vec<String>,
    pub identity: Arc<Identity>,
    /// What the hello offers: prices and the model's hash.
    pub offer: Offer,
    pub metrics: Arc<Metrics>,
    pub ledger: Ledger,
    /// Tokens between two cumulative receipts.
    pub receipt_interval: u32,
    /// Proof of work required of a peer's identity.
    pub pow_bits: u32,
    /// Limits consumers whose balance is used up.
    pub free_tier: FreeTier,
    /// Consumers that left receipts unsigned.
    pub unpaid: Unpaid,
    /// Requests running now, by (consumer, request id).
    pub running: std::sync::Mutex<HashSet<ReceiptKey>>,
    /// Decode speed of served streams, tokens/s (0 until one is measured).
    pub decode_tps: std::sync::atomic::AtomicU32,
    /// Where settled receipts are published.
    pub discovery: Option<Discovery>,
    /// Consumers' balances as the DHT's receipts show them.
    pub balances: Arc<NetworkBalances>,
}

/// How long a consumer's balance from the DHT is used before it is looked
/// up again.
pub const BALANCE_FRESH: Duration = Duration::from_secs(30);
/// Consumers whose network balance is remembered.
const MAX_BALANCES: usize = 4096;

/// Consumers' balances computed from the receipts the DHT holds for them
/// (each checked), looked up in the background so admission never waits
/// on the network.
#[derive(Default)]
pub struct NetworkBalances {
    known: std::sync::Mutex<std::collections::HashMap<NodeId, (i128, std::time::Instant)>>,
    looking: std::sync::Mutex<HashSet<NodeId>>,
}

impl NetworkBalances {
    /// The last balance seen for `id`; starts a lookup when there is none
    /// or it is older than [`BALANCE_FRESH`].
    pub fn get(
        self: &Arc<Self>,
        id: &NodeId,
        grant: u64,
        discovery: Option<&Discovery>,
    ) -> Option<i128> {
        let now = std::time::Instant::now();
        let seen = lock(&self.known).get(id).copied();
        let stale = seen.is_none_or(|(_, at)| now.duration_since(at) >= BALANCE_FRESH);
        if let (true, Some(d)) = (stale, discovery) {
            if lock(&self.looking).insert(*id) {
                let (me, d, id) = (self.clone(), d.clone(), *id);
                tokio::spawn(async move {
                    let Some(receipts) = d.receipts_of(&id).await else {
                        // Not known, not remembered: the next request asks
                        // again.
                        lock(&me.looking).remove(&id);
                        return;
                    };
                    let b = hypha_ledger::balance(grant, &hypha_ledger::totals_of(&id, &receipts));
                    let mut known = lock(&me.known);
                    if known.len() >= MAX_BALANCES && !known.contains_key(&id) {
                        let now = std::time::Instant::now();
                        known.retain(|_, (_, at)| now.duration_since(*at) < BALANCE_FRESH);
                        if known.len() >= MAX_BALANCES {
                            known.clear();
                        }
                    }
                    known.insert(id, (b, std::time::Instant::now()));
                    drop(known);
                    lock(&me.looking).remove(&id);
                });
            }
        }
        seen.map(|(b, _)| b)
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Streams shorter than this say more about prefill than decoding.
const MIN_MEASURED_TOKENS: u32 = 8;

impl SeederState {
    /// Folds one stream's decode speed into the running figure (an
    /// exponential average weighting the newest stream by a quarter).
    fn measured(&self, tokens: u32, decoding: Duration) {
        if tokens < MIN_MEASURED_TOKENS || decoding.is_zero() {
            return;
        }
        let tps = (f64::from(tokens - 1) / decoding.as_secs_f64()).min(f64::from(u32::MAX)) as u32;
        let old = self.decode_tps.load(Ordering::Relaxed);
        let new = if old == 0 { tps } else { (old * 3 + tps) / 4 };
        self.decode_tps.store(new, Ordering::Relaxed);
    }
}

impl Capacity for SeederState {
    fn free_slots(&self) -> u32 {
        let stats = self.engine.stats();
        let busy = stats.slots_busy.load(Ordering::Relaxed) + stats.queued.load(Ordering::Relaxed);
        (self.engine.info().parallel as usize).saturating_sub(busy) as u32
    }

    fn decode_tokens_per_s(&self) -> u32 {
        self.decode_tps.load(Ordering::Relaxed)
    }
}

/// What a node's QUIC listener serves.
pub struct Listener {
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
    /// This node's id and its outgoing connections (punching dials out).
    pub me: NodeId,
    pub conns: Arc<crate::peers::Connections>,
    /// Peers connected to this node, by id: a rendezvous forwards punch
    /// requests over them. Bounded by `max_peers` (one per connection).
    pub inbound: std::sync::Mutex<std::collections::HashMap<NodeId, quinn::Connection>>,
    /// Punch requests handled in the current second.
    pub punches: std::sync::Mutex<(std::time::Instant, u32)>,
    /// Accepted punch requests, for the dialer task: the initiator and its
    /// candidates.
    pub punch_dials: tokio::sync::mpsc::Sender<(NodeId, Vec<std::net::SocketAddr>)>,
    /// The relay this node runs for others (`--relay`).
    pub relay: Option<Arc<crate::relay::RelayService>>,
    /// The relays this node holds reservations at: only they may offer it
    /// relayed paths.
    pub relay_client: Arc<crate::relay::RelayClient>,
    /// This node's relayed paths.
    pub paths: Arc<crate::relay::Paths>,
    pub shutdown: watch::Receiver<bool>,
}

impl Listener {
    fn inbound_opened(&self, peer: NodeId, conn: &quinn::Connection) {
        lock(&self.inbound).insert(peer, conn.clone());
    }

    fn inbound_closed(&self, peer: NodeId, conn: &quinn::Connection) {
        let mut m = lock(&self.inbound);
        if m.get(&peer)
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            m.remove(&peer);
        }
    }

    /// A live connection to `peer`, accepted or dialed.
    pub fn connection_to(&self, peer: &NodeId) -> Option<quinn::Connection> {
        let accepted = lock(&self.inbound)
            .get(peer)
            .filter(|c| c.close_reason().is_none())
            .cloned();
        accepted.or_else(|| self.conns.live(peer))
    }
}

/// Accepts peers until `shutdown` turns true, then closes every connection.
pub async fn run(
    endpoint: Arc<Endpoint>,
    state: Arc<Listener>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(state.max_peers));
    loop {
        let incoming = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break,
            i = endpoint.accept_incoming() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "refusing peer: {} peers connected", state.max_peers);
            incoming.refuse();
            continue;
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let remote = incoming.remote_address();
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
            let span = tracing::info_span!("peer", %peer);
            serve_connection(conn, peer, state, shutdown)
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
    state: Arc<Listener>,
    shutdown: watch::Receiver<bool>,
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
    if crate::relay::is_virtual(&conn.remote_address()) {
        crate::relay::tie(&state.paths, &conn);
    }
    state
        .metrics
        .peers_connected
        .fetch_add(1, Ordering::Relaxed);
    state.inbound_opened(peer, &conn);
    serve_streams(conn.clone(), peer, hello, state.clone(), shutdown).await;
    state.inbound_closed(peer, &conn);
    state
        .metrics
        .peers_connected
        .fetch_sub(1, Ordering::Relaxed);
}

/// Serves the streams a peer opens on `conn` (accepted here, or dialed by
/// this node: a peer may send requests either way) until it closes or the
/// node stops.
pub async fn serve_streams(
    conn: quinn::Connection,
    peer: NodeId,
    hello: Arc<VerifiedHello>,
    state: Arc<Listener>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => {
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
        let state = state.clone();
        let conn = conn.clone();
        let hello = hello.clone();
        tokio::spawn(
            async move {
                if let Err(e) = serve_any(send, recv, &state, &hello, &conn).await {
                    if e.is_violation() {
                        state
                            .metrics
                            .peer_violations
                            .fetch_add(1, Ordering::Relaxed);
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
enum Opening {
    Request(InferenceRequest),
    Dht(DhtRequest),
    Punch(hypha_wire::PunchRequest),
    RelayReserve(u32),
    RelayConnect(NodeId),
    RelayIncoming(NodeId),
}

fn opening(msg: &ArchivedMessage) -> Result<Opening, PeerError> {
    let bad = |e: hypha_wire::WireError| PeerError::Protocol(format!("bad request: {e}"));
    match msg {
        ArchivedMessage::Request(r) => hypha_wire::owned_request(r)
            .map(Opening::Request)
            .map_err(bad),
        ArchivedMessage::Dht(d) => {
            hypha_dht::codec::check_archived_request(d)
                .map_err(|e| PeerError::Protocol(e.to_string()))?;
            hypha_wire::owned_dht_request(d)
                .map(Opening::Dht)
                .map_err(bad)
        }
        ArchivedMessage::Punch(p) => hypha_wire::owned_punch(p).map(Opening::Punch).map_err(bad),
        ArchivedMessage::RelayReserve(r) => Ok(Opening::RelayReserve(r.max_sessions.to_native())),
        ArchivedMessage::RelayConnect(c) => Ok(Opening::RelayConnect(NodeId(c.target))),
        ArchivedMessage::RelayIncoming(i) => Ok(Opening::RelayIncoming(NodeId(i.from))),
        other => Err(PeerError::Protocol(format!(
            "a stream must start with a request, not a {}",
            kind_of(other)
        ))),
    }
}

/// Reads a stream's first frame and serves it.
async fn serve_any(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    state: &Listener,
    peer: &VerifiedHello,
    conn: &quinn::Connection,
) -> Result<(), PeerError> {
    let mut recv = FramedRecv::new(recv);
    let mut send = FramedSend::new(send);
    let first = tokio::time::timeout(HELLO_TIMEOUT, recv.next(opening))
        .await
        .map_err(|_| PeerError::Protocol("stream carried no request".into()))??
        .ok_or_else(|| PeerError::Protocol("stream ended before its request".into()))?;
    let relay_reply = |code| Message::RelayReply(hypha_wire::RelayReply { code });
    match first {
        Opening::RelayReserve(max_sessions) => {
            let code = match &state.relay {
                Some(r) => r.reserve(peer.node_id, conn, max_sessions),
                None => 403,
            };
            send.send(&relay_reply(code)).await?;
            send.finish();
            Ok(())
        }
        Opening::RelayConnect(target) => match &state.relay {
            Some(r) => r.connect(peer.node_id, target, send, recv).await,
            None => {
                send.send(&relay_reply(403)).await?;
                send.finish();
                Ok(())
            }
        },
        Opening::RelayIncoming(from) => {
            // Only a relay this node reserved at may offer it paths.
            if !state.relay_client.reserved_at(&peer.node_id) {
                send.send(&relay_reply(403)).await?;
                send.finish();
                return Ok(());
            }
            if !state.paths.has_room() {
                send.send(&relay_reply(429)).await?;
                send.finish();
                return Ok(());
            }
            send.send(&relay_reply(200)).await?;
            let (recv, leftover) = recv.into_parts();
            match state
                .paths
                .open(from, peer.node_id, send.stream, recv, leftover)
            {
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
            let code = crate::punch::handle(state, req, peer.node_id).await;
            send.send(&Message::PunchReply(hypha_wire::PunchReply { code }))
                .await?;
            send.finish();
            Ok(())
        }
        Opening::Dht(req) => {
            let reply = match &state.discovery {
                Some(d) => {
                    let req = hypha_dht::codec::request_from_wire(req)
                        .map_err(|e| PeerError::Protocol(e.to_string()))?;
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
                state.metrics.count_request("peer", 404);
                send.send(&Message::Error(ErrorReply {
                    request_id: req.request_id,
                    code: 404,
                    message: "this node serves no model".into(),
                }))
                .await?;
                send.finish();
                Ok(())
            }
        },
    }
}

/// Serves one inference request.
async fn serve_request(
    mut send: FramedSend,
    mut recv: FramedRecv,
    req: InferenceRequest,
    state: &SeederState,
    consumer: &VerifiedHello,
    conn: &quinn::Connection,
) -> Result<(), PeerError> {
    let request_id = req.request_id;
    let key = ReceiptKey {
        consumer: consumer.node_id,
        request_id,
    };
    // One request per (consumer, request id), ever: the ledger holds the
    // finished ones, `running` the ones in flight.
    let claim = RunningClaim::take(&state.running, key);
    // Admission order follows the consumer's balance: the lower of what
    // this node's own log and the receipts published in the DHT show (both
    // are signed receipts; each may miss some); with nothing left it is
    // served only behind everyone else and at the free tier's rate.
    let totals = state.ledger.totals(&consumer.node_id);
    let grant = crate::account::grant_for(&consumer.node_id, state.pow_bits);
    let own = hypha_ledger::balance(grant, &totals);
    let balance = match state
        .balances
        .get(&consumer.node_id, grant, state.discovery.as_ref())
    {
        Some(seen) => seen.min(own),
        None => own,
    };
    let prepared = if state.ledger.contains(&key) || claim.is_none() {
        Err(ErrorReply {
            request_id,
            code: 409,
            message: format!("request id {request_id} was already used"),
        })
    } else if state.unpaid.owes(&consumer.node_id) {
        Err(ErrorReply {
            request_id,
            code: 402,
            message: "an earlier request's receipt was never countersigned".into(),
        })
    } else if balance <= 0
        && !state
            .free_tier
            .allow(consumer.node_id, std::time::Instant::now())
    {
        Err(ErrorReply {
            request_id,
            code: 429,
            message: format!(
                "no credits left (balance {balance} micro-credits) and the free tier's {} requests per minute are used",
                state.free_tier.per_minute
            ),
        })
    } else {
        prepare(&req, state).and_then(|mut r| {
            r.priority =
                i64::try_from(balance).unwrap_or(if balance < 0 { i64::MIN } else { i64::MAX - 1 });
            state
                .engine
                .submit(r)
                .map_err(|e| reply_for(request_id, &e))
        })
    };
    let generation = match prepared {
        Ok(g) => g,
        Err(reply) => {
            state.metrics.count_request("peer", reply.code);
            send.send(&Message::Error(reply)).await?;
            send.finish();
            return Ok(());
        }
    };
    send.send(&Message::Accepted(Accepted { request_id }))
        .await?;
    let mut billing = Billing::new(state, consumer, request_id, generation.prompt_tokens);
    let outcome = stream_generation(generation, &mut send, &mut recv, &mut billing, conn).await;
    let lost_owing = match &outcome {
        Ok(Outcome::Lost) => true,
        // The connection failed while a receipt was out unsigned.
        Err(PeerError::Connection(_) | PeerError::Timeout(_)) => !billing.settled(),
        _ => false,
    };
    if lost_owing {
        state.unpaid.note_silent(consumer.node_id);
    }
    // The receipt is durable before the consumer sees the stream end.
    billing
        .settle(matches!(outcome, Ok(Outcome::Done | Outcome::Unpaid)))
        .await;
    send.finish();
    drop(claim);
    let status = match &outcome {
        Ok(Outcome::Done) => 200,
        Ok(Outcome::Unpaid) => 402,
        Ok(Outcome::Cancelled | Outcome::Lost) => 499,
        Err(e) if e.is_violation() => 400,
        Err(_) => 499,
    };
    state.metrics.count_request("peer", status);
    if matches!(outcome, Ok(Outcome::Cancelled) | Err(PeerError::Reset(_))) {
        state.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    outcome.map(|_| ())
}

/// A (consumer, request id) marked as running until dropped.
struct RunningClaim<'a> {
    running: &'a std::sync::Mutex<HashSet<ReceiptKey>>,
    key: ReceiptKey,
}

impl<'a> RunningClaim<'a> {
    /// `None` when the key is already running.
    fn take(running: &'a std::sync::Mutex<HashSet<ReceiptKey>>, key: ReceiptKey) -> Option<Self> {
        let mut set = running.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(key).then_some(Self { running, key })
    }
}

impl Drop for RunningClaim<'_> {
    fn drop(&mut self) {
        let mut set = self.running.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.key);
    }
}

/// How a served request ended.
enum Outcome {
    Done,
    Cancelled,
    /// The consumer stopped countersigning receipts.
    Unpaid,
    /// Nothing at all arrived from the consumer while its signature was
    /// due: the connection is gone.
    Lost,
}

/// How waiting for a countersignature ended.
enum Countersigned {
    Yes,
    /// Not within [`COUNTERSIGN_TIMEOUT`] though the consumer's connection
    /// was alive, or the consumer finished its side.
    No,
    /// Nothing arrived on the connection while it was due.
    Silent,
    Cancelled,
}

/// What the consumer may send while its request runs.
enum FromConsumer {
    Cancel,
    Countersign([u8; 64]),
}

/// While a request runs, the consumer may only cancel it or countersign.
fn consumer_frame(msg: &ArchivedMessage, request_id: u64) -> Result<FromConsumer, PeerError> {
    match msg {
        ArchivedMessage::Cancel(_) => Ok(FromConsumer::Cancel),
        ArchivedMessage::Countersign(c) if c.request_id.to_native() == request_id => {
            Ok(FromConsumer::Countersign(c.consumer_sig))
        }
        other => Err(PeerError::Protocol(format!(
            "{} sent while a request was running",
            kind_of(other)
        ))),
    }
}

/// The receipts of one request: what was offered, what came back signed.
struct Billing<'a> {
    state: &'a SeederState,
    consumer: &'a VerifiedHello,
    request_id: u64,
    prompt_tokens: u32,
    started_ms: u64,
    digest: TokenDigest,
    /// Offered and not yet countersigned, oldest first (at most two: an
    /// interval's receipt still travelling when the last one is offered).
    pending: Vec<(Receipt, [u8; 64])>,
    /// The latest receipt both signed.
    signed: Option<VerifiedReceipt>,
}

impl<'a> Billing<'a> {
    fn new(
        state: &'a SeederState,
        consumer: &'a VerifiedHello,
        request_id: u64,
        prompt_tokens: u32,
    ) -> Self {
        Self {
            state,
            consumer,
            request_id,
            prompt_tokens,
            started_ms: unix_ms(),
            digest: TokenDigest::default(),
            pending: Vec::with_capacity(2),
            signed: None,
        }
    }

    /// A cumulative receipt for every token sent so far, signed.
    fn offer(&mut self, last: bool) -> Message {
        let offer = &self.state.offer;
        let completion = self.digest.count();
        let receipt = Receipt {
            request_id: self.request_id,
            consumer: self.consumer.node_id,
            seeder: self.state.identity.id(),
            model_sha256: offer.model_sha256,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: completion,
            credits: hypha_ledger::price(
                self.prompt_tokens,
                completion,
                offer.price_prompt_micro,
                offer.price_completion_micro,
            ),
            started_ms: self.started_ms,
            finished_ms: unix_ms().max(self.started_ms),
            tokens_digest: self.digest.digest(),
        };
        let sig = receipt.sign(self.state.identity.signing_key());
        let msg = Message::Receipt(ReceiptOffer {
            request_id: self.request_id,
            receipt: receipt.to_bytes().to_vec(),
            seeder_sig: sig,
            last,
        });
        self.pending.push((receipt, sig));
        msg
    }

    /// Takes the consumer's signature over one of the pending receipts
    /// (countersignatures arrive in offer order; one for an older receipt
    /// may cross the offer of a newer one).
    fn countersigned(&mut self, consumer_sig: [u8; 64]) -> Result<(), PeerError> {
        for (i, (receipt, seeder_sig)) in self.pending.iter().enumerate() {
            let signed = SignedReceipt {
                receipt: receipt.clone(),
                seeder_key: self.state.identity.public_key(),
                seeder_sig: *seeder_sig,
                consumer_key: self.consumer.public_key,
                consumer_sig,
            };
            if let Ok(checked) = signed.verify() {
                self.signed = Some(checked);
                // It and every older offer are settled.
                self.pending.drain(..=i);
                return Ok(());
            }
        }
        Err(PeerError::Protocol(if self.pending.is_empty() {
            "countersignature with no receipt offered".into()
        } else {
            "countersignature matches no offered receipt".into()
        }))
    }

    /// True when every offered receipt came back signed.
    fn settled(&self) -> bool {
        self.pending.is_empty()
    }

    /// Appends the latest receipt both parties signed to the ledger, and
    /// remembers a consumer that left a finished request's receipts
    /// unsigned.
    async fn settle(self, finished: bool) {
        if finished && !self.settled() {
            self.state.unpaid.note(self.consumer.node_id);
        }
        let Some(verified) = self.signed else {
            return;
        };
        let credits = verified.receipt().credits;
        let ledger = self.state.ledger.clone();
        let published = verified.clone();
        match tokio::task::spawn_blocking(move || ledger.append(verified)).await {
            Ok(Ok(())) => {
                tracing::debug!(request_id = self.request_id, credits, "receipt recorded");
                if let Some(d) = &self.state.discovery {
                    if !d.publish_receipt(published) {
                        tracing::warn!("receipt publication queue full: receipt not published");
                    }
                }
            }
            Ok(Err(e)) => tracing::warn!("cannot record receipt {}: {e}", self.request_id),
            Err(e) => tracing::warn!("ledger task failed: {e}"),
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads the consumer until its countersignature for the pending receipt
/// arrives, or [`COUNTERSIGN_TIMEOUT`] passes.
async fn await_countersign(
    recv: &mut FramedRecv,
    billing: &mut Billing<'_>,
    conn: &quinn::Connection,
) -> Result<Countersigned, PeerError> {
    let request_id = billing.request_id;
    let heard = conn.stats().udp_rx.datagrams;
    let wait = async {
        while !billing.settled() {
            if recv.is_finished() {
                return Ok(Countersigned::No);
            }
            match recv.next(|m| consumer_frame(m, request_id)).await? {
                None => return Ok(Countersigned::No),
                Some(FromConsumer::Cancel) => return Ok(Countersigned::Cancelled),
                Some(FromConsumer::Countersign(sig)) => billing.countersigned(sig)?,
            }
        }
        Ok(Countersigned::Yes)
    };
    match tokio::time::timeout(COUNTERSIGN_TIMEOUT, wait).await {
        Ok(r) => r,
        Err(_) if conn.stats().udp_rx.datagrams == heard => Ok(Countersigned::Silent),
        Err(_) => Ok(Countersigned::No),
    }
}

/// Streams the generation out with a receipt every `receipt_interval`
/// tokens and a last one after `Done`.
async fn stream_generation(
    mut generation: hypha_engine::Generation,
    send: &mut FramedSend,
    recv: &mut FramedRecv,
    billing: &mut Billing<'_>,
    conn: &quinn::Connection,
) -> Result<Outcome, PeerError> {
    let request_id = billing.request_id;
    // Receipts go out twice per interval, and each needs the one before it
    // signed before more tokens follow: the consumer's signature can lag
    // half an interval without a stall, and tokens sent beyond the last
    // signed receipt never exceed one interval.
    let step = (billing.state.receipt_interval / 2).max(1);
    // One chunk message reused for every token: no allocation per token on
    // the wire path.
    let mut chunk = Message::Chunk(TokenChunk {
        request_id,
        seq: 0,
        token_ids: Vec::with_capacity(1),
        text: String::with_capacity(32),
    });
    let mut seq = 0u32;
    let mut first_token: Option<std::time::Instant> = None;
    loop {
        let event = tokio::select! {
            biased;
            m = recv.next(|m| consumer_frame(m, request_id)), if !recv.is_finished() => {
                match m? {
                    // The consumer finished its side: nothing more to read.
                    None => continue,
                    Some(FromConsumer::Cancel) => return Ok(Outcome::Cancelled),
                    Some(FromConsumer::Countersign(sig)) => {
                        billing.countersigned(sig)?;
                        continue;
                    }
                }
            }
            e = generation.next() => e,
        };
        match event {
            Some(Event::Token { id, text }) => {
                if let Message::Chunk(c) = &mut chunk {
                    c.seq = seq;
                    c.token_ids.clear();
                    c.token_ids.push(id);
                    c.text.clear();
                    c.text.push_str(&text);
                }
                seq = seq.wrapping_add(1);
                first_token.get_or_insert_with(std::time::Instant::now);
                billing.digest.push(id);
                send.send(&chunk).await?;
                if billing.digest.count().is_multiple_of(step) {
                    // The previous receipt must be signed before more
                    // tokens go out: a consumer that stops paying gets at
                    // most one interval for free.
                    if !billing.settled() {
                        match await_countersign(recv, billing, conn).await? {
                            Countersigned::Cancelled => return Ok(Outcome::Cancelled),
                            Countersigned::Silent => return Ok(Outcome::Lost),
                            Countersigned::No => {
                                send.send(&Message::Error(ErrorReply {
                                    request_id,
                                    code: 402,
                                    message: "the last receipt was not countersigned".into(),
                                }))
                                .await?;
                                return Ok(Outcome::Unpaid);
                            }
                            Countersigned::Yes => {}
                        }
                    }
                    let offer = billing.offer(false);
                    send.send(&offer).await?;
                }
            }
            Some(Event::Done { text, finish }) => {
                if let Some(t) = first_token {
                    billing.state.measured(billing.digest.count(), t.elapsed());
                }
                let done = Message::Done(Done {
                    request_id,
                    prompt_tokens: finish.prompt_tokens,
                    completion_tokens: finish.completion_tokens,
                    finish_reason: match finish.reason {
                        hypha_engine::FinishReason::Stop => FinishReason::Stop,
                        hypha_engine::FinishReason::Length => FinishReason::Length,
                    },
                    text,
                });
                send.send(&done).await?;
                // The last receipt covers everything; it replaces one still
                // waiting for its countersignature.
                let last = billing.offer(true);
                send.send(&last).await?;
                return Ok(match await_countersign(recv, billing, conn).await? {
                    Countersigned::Silent => Outcome::Lost,
                    _ => Outcome::Done,
                });
            }
            Some(Event::Failed(e)) => {
                send.send(&Message::Error(reply_for(request_id, &e)))
                    .await?;
                return Ok(Outcome::Done);
            }
            None => {
                send.send(&Message::Error(ErrorReply {
                    request_id,
                    code: 500,
                    message: "the engine stopped".into(),
                }))
                .await?;
                return Ok(Outcome::Done);
            }
        }
    }
}

/// Checks a peer's request and turns it into tokens for the engine.
fn prepare(req: &InferenceRequest, state: &SeederState) -> Result<GenerateRequest, ErrorReply> {
    let id = req.request_id;
    let bad = |code: u16, message: String| ErrorReply {
        request_id: id,
        code,
        message,
    };
    if !state.models.contains(&req.model) {
        return Err(bad(
            404,
            format!(
                "the model {:?} is not served here; this seeder serves {:?}",
                req.model, state.models
            ),
        ));
    }
    if req.stop.len() > MAX_STOP_STRINGS || req.stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(bad(
            400,
            format!("at most {MAX_STOP_STRINGS} stop strings of {MAX_STOP_BYTES} bytes"),
        ));
    }
    let engine = &state.engine;
    let tokens = match &req.prompt {
        hypha_wire::Prompt::Chat(messages) => {
            if messages.is_empty() || messages.len() > MAX_MESSAGES {
                return Err(bad(400, format!("between 1 and {MAX_MESSAGES} messages")));
            }
            if let Some(m) = messages
                .iter()
                .find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool"))
            {
                return Err(bad(400, format!("unknown message role {:?}", m.role)));
            }
            let messages: Vec<ChatMessage> = messages
                .iter()
                .map(|m| ChatMessage {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect();
            engine
                .apply_chat_template(&messages)
                .and_then(|p| engine.tokenize(&p))
        }
        hypha_wire::Prompt::Text(t) => engine.tokenize(t),
    }
    .map_err(|e| reply_for(id, &e))?;
    Ok(GenerateRequest {
        prompt: tokens,
        sampling: sampling_from_wire(&req.sampling),
        max_tokens: req.max_tokens,
        stop: req.stop.clone(),
        priority: 0,
    })
}

/// The error a consumer gets for an engine error, with an HTTP-like code.
fn reply_for(request_id: u64, e: &hypha_engine::Error) -> ErrorReply {
    use hypha_engine::Error as E;
    let code = match e {
        E::ContextExceeded { .. } | E::InvalidRequest(_) | E::PromptTooLarge | E::Template(_) => {
            400
        }
        E::QueueFull { .. } => 503,
        _ => 500,
    };
    ErrorReply {
        request_id,
        code,
        message: e.to_string(),
    }
}

/// Engine sampling settings from their wire form.
pub fn sampling_from_wire(s: &hypha_wire::Sampling) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        seed: s.seed,
    }
}

/// The wire form of engine sampling settings.
pub fn sampling_to_wire(s: &SamplingParams) -> hypha_wire::Sampling {
    hypha_wire::Sampling {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        seed: s.seed,
    }
}
