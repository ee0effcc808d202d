//! The consumer's half of remote inference: one request stream per remote
//! generation, its frames checked and turned into events for the HTTP
//! layer.
//!
//! Receipts: every `Chunk`'s token ids feed a running digest. Each receipt
//! the seeder offers is checked against what actually arrived (request,
//! both ids, model hash, token count and digest, price from the seeder's
//! hello, its signature) and only then countersigned; a receipt that
//! claims anything else is a protocol violation. The last receipt (after
//! `Done`) is appended to this node's ledger before the client hears that
//! the request finished; a request cut short records the last receipt
//! both signed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hypha_engine::{Finish, FinishReason};
use hypha_ledger::{Ledger, Receipt, SignedReceipt, TokenDigest, VerifiedReceipt};
use hypha_wire::{ArchivedMessage, Countersign, InferenceRequest, Message, NodeId};

use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::net::hello::VerifiedHello;
use crate::net::proto::{
    close_for_violation, kind_of, FramedRecv, FramedSend, PeerError, STREAM_CANCELLED,
};
use crate::services::dialer::RunningGuard;

/// How long a consumer waits for the last receipt after `Done`.
pub const LAST_RECEIPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a seeder may take to answer a request with its first frame.
/// Admission is a table lookup and a queue push: a live seeder answers in
/// a round trip, while a dead one's connection would look open until QUIC's
/// idle timeout.
pub const START_TIMEOUT: Duration = Duration::from_secs(3);
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
    pub(crate) running: Option<RunningGuard>,
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
    pub(crate) async fn open(
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
                (
                    crate::net::proto::RECV_STALL_TIMEOUT,
                    "the seeder went silent",
                )
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
