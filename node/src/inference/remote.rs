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
//!
//! Bounds: whatever a seeder sends, a request costs the consumer a bounded
//! amount. Every wait has a deadline (a stream to open and the first
//! answer: [`START_TIMEOUT`] and more for a long prompt; each later frame:
//! [`RECV_STALL_TIMEOUT`]; the last receipt: [`LAST_RECEIPT_TIMEOUT`]; each
//! write: the stream's stall timeout). The tokens that arrive may not pass
//! the request's `max_tokens` (or [`MAX_REMOTE_TOKENS`]), each chunk
//! carries at least one, their text may not pass
//! [`MAX_TOKEN_TEXT_BYTES`] per token, and `Done` must count the tokens
//! that came: a seeder breaking any of these is a protocol violation.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hypha_engine::{Finish, FinishReason};
use hypha_ledger::Ledger;
use hypha_wire::{ArchivedMessage, Countersign, InferenceRequest, Message, NodeId, Refusal};

use crate::identity::Identity;
use crate::inference::receipts::{ConsumerReceipts, Party as ReceiptParty, Terms};
use crate::inference::RequestId;
use crate::metrics::Metrics;
use crate::net::hello::VerifiedHello;
use crate::net::proto::{
    close_for_violation, kind_of, FramedRecv, FramedSend, PeerError, Violation, RECV_STALL_TIMEOUT,
    STREAM_CANCELLED,
};
use crate::services::dialer::RunningGuard;
use crate::util::Tasks;

/// How long a consumer waits for the last receipt after `Done`.
pub const LAST_RECEIPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a seeder may take to answer a request with its first frame.
/// Admission is a table lookup and a queue push: a live seeder answers in
/// a round trip, while a dead one's connection would look open until QUIC's
/// idle timeout.
pub const START_TIMEOUT: Duration = Duration::from_secs(3);
// A seeder that answered but then went quiet is waited for longer than
// one that never answered.
const _: () = assert!(START_TIMEOUT.as_millis() < RECV_STALL_TIMEOUT.as_millis());
/// Tokens a request without `max_tokens` may bring: the longest context
/// of the models in use.
pub const MAX_REMOTE_TOKENS: u32 = 128 * 1024;
/// Text one generated token may stand for: longer than any token of the
/// vocabularies in use (their longest run a few dozen bytes), so a
/// non-streaming answer collects at most this much per token.
pub const MAX_TOKEN_TEXT_BYTES: usize = 256;

/// Why a remote request could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The seeder refused the request.
    #[error("seeder {peer} refused: {message}")]
    Refused {
        peer: NodeId,
        refusal: Refusal,
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
    /// Owns the ledger appends of requests cut short.
    pub tasks: Tasks,
}

/// One generation running on a seeder. Dropping it before it ended resets
/// the stream, which cancels the generation on the seeder.
pub struct RemoteGeneration {
    conn: quinn::Connection,
    peer: NodeId,
    party: Arc<Party>,
    send: FramedSend,
    recv: FramedRecv,
    request_id: RequestId,
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
    /// The tokens that arrived and the receipts both signed.
    receipts: ConsumerReceipts,
    /// `Done` arrived; the last receipt is due.
    done: Option<(String, Finish)>,
    /// The ledger has the latest receipt both signed.
    recorded: bool,
    /// Tokens the request may bring at most.
    max_tokens: u32,
    /// Tokens and bytes of text that arrived.
    tokens: u32,
    text_bytes: usize,
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
        // A seeder at its stream limit would keep this waiting.
        let (send, recv) = tokio::time::timeout(START_TIMEOUT, conn.open_bi())
            .await
            .map_err(|_| failed(PeerError::Timeout("no request stream could be opened")))?
            .map_err(|e| failed(e.into()))?;
        let receipts = ConsumerReceipts::new(
            RequestId(req.request_id),
            ReceiptParty::of(&party.identity),
            ReceiptParty {
                id: peer,
                key: terms.public_key,
            },
            Terms {
                model_sha256: terms.offer.model_sha256,
                price_prompt_micro: terms.offer.price_prompt_micro,
                price_completion_micro: terms.offer.price_completion_micro,
            },
            prompt_token_bound(&req.prompt),
        );
        let mut g = Self {
            conn,
            peer,
            party: party.clone(),
            send: FramedSend::new(send),
            recv: FramedRecv::new(recv),
            request_id: RequestId(req.request_id),
            next_seq: 0,
            first: None,
            running: None,
            answered: false,
            start_limit: start_limit(&req.prompt),
            ended: false,
            metrics: metrics.clone(),
            receipts,
            done: None,
            recorded: false,
            max_tokens: req.max_tokens.unwrap_or(MAX_REMOTE_TOKENS),
            tokens: 0,
            text_bytes: 0,
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
        let receipts = &mut self.receipts;
        let next = self
            .recv
            .next(|m| reply_event(m, request_id, seq, receipts));
        let frame = if self.done.is_some() {
            match tokio::time::timeout(LAST_RECEIPT_TIMEOUT, next).await {
                Ok(f) => f,
                Err(_) => {
                    // No last receipt: the request is over all the same.
                    tracing::warn!(%peer, %request_id, "no last receipt after done");
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
                (RECV_STALL_TIMEOUT, "the seeder went silent")
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
            .and_then(|r| r.ok_or(PeerError::Protocol(Violation::EndedBefore("done"))))
            .map_err(failed)?;
        match frame {
            Reply::Accepted if first_frame => Ok(None),
            Reply::Accepted => Err(failed(
                Violation::OutOfOrder("accepted in the middle of an answer").into(),
            )),
            Reply::Token(text, tokens) => {
                if self.done.is_some() {
                    return Err(failed(Violation::OutOfOrder("a chunk after done").into()));
                }
                if tokens == 0 {
                    return Err(failed(Violation::EmptyChunk.into()));
                }
                self.tokens = self.tokens.saturating_add(tokens);
                if self.tokens > self.max_tokens {
                    return Err(failed(
                        Violation::TooManyTokens {
                            got: self.tokens,
                            max: self.max_tokens,
                        }
                        .into(),
                    ));
                }
                self.count_text(text.len()).map_err(failed)?;
                self.next_seq = self.next_seq.wrapping_add(1);
                Ok(Some(RemoteEvent::Token(text)))
            }
            Reply::Done(text, finish) => {
                if self.done.is_some() {
                    return Err(failed(Violation::OutOfOrder("a second done").into()));
                }
                if finish.completion_tokens != self.tokens {
                    return Err(failed(
                        Violation::WrongCount {
                            claimed: finish.completion_tokens,
                            got: self.tokens,
                        }
                        .into(),
                    ));
                }
                self.count_text(text.len()).map_err(failed)?;
                self.done = Some((text, finish));
                Ok(None)
            }
            Reply::Offer {
                receipt,
                seeder_sig,
                last,
            } => {
                let done = self.done.as_ref().map(|(_, f)| f.prompt_tokens);
                let consumer_sig = self
                    .receipts
                    .check_offer(&self.party.identity, &receipt, seeder_sig, last, done)
                    .map_err(|e| failed(e.into()))?;
                let countersign = Message::Countersign(Countersign {
                    request_id: self.request_id.0,
                    consumer_sig,
                });
                self.send.send(&countersign).await.map_err(failed)?;
                if !last {
                    return Ok(None);
                }
                let Some((text, finish)) = self.done.take() else {
                    return Err(failed(
                        Violation::OutOfOrder("a last receipt before done").into(),
                    ));
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
            Reply::Error(refusal, message) => {
                self.ended = true;
                self.send.finish();
                Err(RemoteError::Refused {
                    peer,
                    refusal,
                    message,
                })
            }
        }
    }

    /// Counts `bytes` more of text: no more than the tokens so far carry.
    fn count_text(&mut self, bytes: usize) -> Result<(), PeerError> {
        self.text_bytes = self.text_bytes.saturating_add(bytes);
        let most = (self.tokens as usize).saturating_mul(MAX_TOKEN_TEXT_BYTES);
        if self.text_bytes > most {
            return Err(Violation::TooMuchText {
                bytes: self.text_bytes,
                tokens: self.tokens,
            }
            .into());
        }
        Ok(())
    }

    /// Appends the latest receipt both signed to the ledger (once); its
    /// credits.
    async fn record(&mut self) -> Option<u64> {
        if self.recorded {
            return None;
        }
        let verified = self.receipts.signed()?.clone();
        self.recorded = true;
        let credits = verified.receipt().credits;
        let ledger = self.party.ledger.clone();
        let appended = tokio::task::spawn_blocking(move || ledger.append(verified)).await;
        match appended {
            Ok(Ok(())) => Some(credits),
            Ok(Err(e)) => {
                tracing::warn!(request_id = %self.request_id, "cannot record receipt: {e}");
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
        if let (false, Some(signed)) = (self.recorded, self.receipts.signed().cloned()) {
            // Cut short: keep the last receipt both signed.
            let ledger = self.party.ledger.clone();
            if tokio::runtime::Handle::try_current().is_ok() {
                self.party.tasks.spawn_blocking(move || {
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
    /// A chunk's text and how many tokens it carried.
    Token(String, u32),
    Done(String, Finish),
    Offer {
        receipt: Vec<u8>,
        seeder_sig: [u8; 64],
        last: bool,
    },
    Error(Refusal, String),
}

/// Checks one frame from a seeder against the request it answers.
fn reply_event(
    msg: &ArchivedMessage,
    request_id: RequestId,
    seq: u32,
    receipts: &mut ConsumerReceipts,
) -> Result<Reply, PeerError> {
    let check_id = |got: u64| {
        if got == request_id.0 {
            Ok(())
        } else {
            Err(PeerError::Protocol(Violation::WrongRequest {
                got,
                want: request_id.0,
            }))
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
                return Err(Violation::OutOfSequence { got, want: seq }.into());
            }
            for t in c.token_ids.iter() {
                receipts.received(t.to_native());
            }
            let tokens = u32::try_from(c.token_ids.len()).unwrap_or(u32::MAX);
            Ok(Reply::Token(c.text.as_str().to_owned(), tokens))
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
                Refusal::from(&e.refusal),
                e.message.as_str().to_owned(),
            ))
        }
        other => Err(Violation::OnRequestStream(kind_of(other)).into()),
    }
}
