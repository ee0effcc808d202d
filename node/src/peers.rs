//! The consumer side of remote inference: connections to known seeders,
//! reused across requests, and one request stream per remote generation.
//!
//! Each configured peer has one connection slot. The first request (or the
//! start-up probe) dials it under a lock, so concurrent requests share one
//! handshake; later requests reuse the connection while it is open, and a
//! closed one is redialed. A request goes to a peer whose hello lists the
//! model; if opening the stream or getting the first frame fails on a
//! connection that may have gone stale, it is redialed once, then the next
//! provider is tried, so a client only sees an error when no provider could
//! start its request.
//!
//! Receipts: every `Chunk`'s token ids feed a running digest. Each receipt
//! the seeder offers is checked against what actually arrived (request,
//! both ids, model hash, token count and digest, price from the seeder's
//! hello, its signature) and only then countersigned; a receipt that
//! claims anything else is a protocol violation. The last receipt (after
//! `Done`) is appended to this node's ledger before the client hears that
//! the request finished; a request cut short records the last receipt
//! both signed.

use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hypha_engine::{Finish, FinishReason};
use hypha_ledger::{Ledger, Receipt, SignedReceipt, TokenDigest, VerifiedReceipt};
use hypha_wire::{ArchivedMessage, Countersign, InferenceRequest, Message, NodeId};

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
/// Peers one node may be configured with.
pub const MAX_CONFIGURED_PEERS: usize = crate::seeder::MAX_PEERS;

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
    addr: PeerAddr,
    /// The open connection and the peer's hello; the lock is held while
    /// dialing.
    conn: tokio::sync::Mutex<Option<(quinn::Connection, Arc<VerifiedHello>)>>,
    /// Models from the peer's last hello; kept across reconnects.
    models: std::sync::Mutex<Vec<String>>,
}

/// The peers this node sends requests to.
pub struct Peers {
    endpoint: Arc<Endpoint>,
    hello: Message,
    entries: Vec<Entry>,
    metrics: Arc<Metrics>,
    party: Arc<Party>,
    next_request_id: AtomicU64,
    dial_timeout: Duration,
}

impl Peers {
    pub fn new(
        endpoint: Arc<Endpoint>,
        hello: Message,
        addrs: Vec<PeerAddr>,
        metrics: Arc<Metrics>,
        party: Arc<Party>,
        dial_timeout: Duration,
    ) -> Result<Self, String> {
        if addrs.len() > MAX_CONFIGURED_PEERS {
            return Err(format!("at most {MAX_CONFIGURED_PEERS} peers"));
        }
        let mut seed = [0u8; 8];
        // Request ids only need to differ between this node's requests; a
        // random start keeps them apart across restarts.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
        Ok(Self {
            endpoint,
            hello,
            entries: addrs
                .into_iter()
                .map(|addr| Entry {
                    addr,
                    conn: tokio::sync::Mutex::new(None),
                    models: std::sync::Mutex::new(Vec::new()),
                })
                .collect(),
            metrics,
            party,
            next_request_id: AtomicU64::new(u64::from_le_bytes(seed) >> 1),
            dial_timeout,
        })
    }

    /// A fresh request id.
    pub fn next_request_id(&self) -> u64 {
        self.next_request_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Every model a known peer serves, with the peers that serve it.
    pub fn models(&self) -> Vec<(String, Vec<NodeId>)> {
        let mut out: Vec<(String, Vec<NodeId>)> = Vec::new();
        for e in &self.entries {
            for m in lock(&e.models).iter() {
                match out.iter_mut().find(|(name, _)| name == m) {
                    Some((_, ids)) => ids.push(e.addr.id),
                    None => out.push((m.clone(), vec![e.addr.id])),
                }
            }
        }
        out
    }

    /// The configured peers and whether each is connected now.
    pub fn status(&self) -> Vec<(PeerAddr, bool)> {
        self.entries
            .iter()
            .map(|e| {
                let up = e
                    .conn
                    .try_lock()
                    .map(|c| c.as_ref().is_some_and(|(c, _)| c.close_reason().is_none()))
                    .unwrap_or(false);
                (e.addr.clone(), up)
            })
            .collect()
    }

    /// Dials every peer not yet connected, to learn what they serve; the
    /// peers that could not be reached, and why.
    pub async fn connect_all(&self) -> Vec<(PeerAddr, PeerError)> {
        let dials = self.entries.iter().map(|e| async move {
            match self.connection(e, false).await {
                Ok(_) => None,
                Err(err) => {
                    tracing::warn!(peer = %e.addr, "cannot connect: {err}");
                    Some((e.addr.clone(), err))
                }
            }
        });
        futures_util::future::join_all(dials)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The open connection to `e`, dialing when there is none (or when
    /// `fresh` asks to replace the current one).
    async fn connection(
        &self,
        e: &Entry,
        fresh: bool,
    ) -> Result<(quinn::Connection, Arc<VerifiedHello>), PeerError> {
        let mut slot = e.conn.lock().await;
        if let Some((c, h)) = slot.as_ref() {
            if !fresh && c.close_reason().is_none() {
                return Ok((c.clone(), h.clone()));
            }
        }
        if let Some((old, _)) = slot.take() {
            old.close(crate::proto::CLOSE_NORMAL, b"replaced");
        }
        let peer = e.addr.id;
        let conn = tokio::time::timeout(self.dial_timeout, self.endpoint.dial(e.addr.addr, peer))
            .await
            .map_err(|_| {
                PeerError::Unreachable(format!(
                    "no answer from {} within {:?}",
                    e.addr.addr, self.dial_timeout
                ))
            })?
            .map_err(|err| PeerError::Unreachable(err.to_string()))?;
        let hello: VerifiedHello =
            match hello_as_dialer(&conn, peer, &self.hello, self.party.pow_bits).await {
                Ok(h) => h,
                Err(err) => {
                    if err.is_violation() {
                        self.metrics.peer_violations.fetch_add(1, Ordering::Relaxed);
                        close_for_violation(&conn, peer, &err);
                    }
                    return Err(err);
                }
            };
        tracing::info!(%peer, addr = %e.addr.addr, models = ?hello.offer.models, "connected to peer");
        *lock(&e.models) = hello.offer.models.clone();
        let hello = Arc::new(hello);
        self.metrics.peers_connected.fetch_add(1, Ordering::Relaxed);
        let watched = conn.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let why = watched.closed().await;
            metrics.peers_connected.fetch_sub(1, Ordering::Relaxed);
            tracing::info!(%peer, "peer connection closed: {why}");
        });
        *slot = Some((conn.clone(), hello.clone()));
        Ok((conn, hello))
    }

    fn providers(&self, model: &str) -> Vec<&Entry> {
        self.entries
            .iter()
            .filter(|e| lock(&e.models).iter().any(|m| m == model))
            .collect()
    }

    /// Starts `req` on a peer serving its model and waits for the first
    /// event, so that a refusal or an unreachable seeder is an error here,
    /// before any response is committed.
    pub async fn start(&self, req: InferenceRequest) -> Result<RemoteGeneration, RemoteError> {
        let mut providers = self.providers(&req.model);
        if providers.is_empty() {
            // Peers not reached yet may serve it: ask them first.
            let failures = self.connect_all().await;
            providers = self.providers(&req.model);
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
                available: self.models().into_iter().map(|(m, _)| m).collect(),
            });
        }
        let mut last = None;
        for e in providers {
            let peer = e.addr.id;
            for fresh in [false, true] {
                let (conn, terms) = match self.connection(e, fresh).await {
                    Ok(c) => c,
                    Err(source) => {
                        last = Some(RemoteError::Failed { peer, source });
                        break;
                    }
                };
                match RemoteGeneration::open(conn, terms, &req, &self.metrics, &self.party).await {
                    Ok(g) => return Ok(g),
                    Err(err @ RemoteError::Refused { .. }) => return Err(err),
                    Err(err) => {
                        tracing::info!(%peer, fresh, "request could not start: {err}");
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
    ended: bool,
    metrics: Arc<Metrics>,
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
            match tokio::time::timeout(crate::proto::RECV_STALL_TIMEOUT, next).await {
                Ok(f) => f,
                Err(_) => Err(PeerError::Timeout("the seeder went silent")),
            }
        };
        let frame = frame
            .and_then(|r| r.ok_or_else(|| PeerError::Protocol("stream ended before done".into())))
            .map_err(failed)?;
        match frame {
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
