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
//! that came, and tokens billed must bring text (see [`ReplyCheck`]): a
//! seeder breaking any of these is a protocol violation. What this node
//! pays is bounded by its own [`SpendLimits`]: providers pricing above its
//! ceilings are not asked (see `route`); its cap per request goes with the
//! request (the seeder refuses a prompt that costs more and stops
//! generating before the tokens would), and a receipt above it is a
//! violation, never signed.
//! The checks of each frame are [`ReplyCheck`]'s, without I/O; this
//! module adds the stream and its deadlines.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hypha_engine::{Finish, FinishReason};
use hypha_ledger::Ledger;
use hypha_wire::{InferenceRequest, Message, NodeId, Refusal};

use crate::identity::Identity;
use crate::inference::receipts::{ConsumerReceipts, Party as ReceiptParty, Terms};
pub use crate::inference::reply::MAX_TOKEN_TEXT_BYTES;
use crate::inference::reply::{textless_allowance, Bounds, ReplyCheck, Step};
use crate::inference::RequestId;
use crate::metrics::Metrics;
use crate::net::hello::VerifiedHello;
use crate::net::proto::{
    close_for_violation, FramedRecv, FramedSend, PeerError, Violation, RECV_STALL_TIMEOUT,
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
    /// The seeder's hello asks more than its signed provider record: it
    /// was not asked.
    #[error("seeder {peer} asks {asks:?} micro-credits per prompt/completion token, above the {record:?} of its signed provider record")]
    Gouging {
        peer: NodeId,
        asks: (u64, u64),
        record: (u64, u64),
    },
    /// Every provider of the model prices above this node's ceilings.
    #[error("no provider of {model:?} within this node's price ceilings ({ceilings}); on offer: {offers}")]
    OverPrice {
        model: String,
        ceilings: String,
        offers: String,
    },
}

/// What this node pays as a consumer at most; `None` is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendLimits {
    /// Micro-credits per prompt token (`--max-price-prompt`).
    pub max_price_prompt_micro: Option<u64>,
    /// Micro-credits per generated token (`--max-price-completion`).
    pub max_price_completion_micro: Option<u64>,
    /// Micro-credits one request may cost (`--max-request-credits`).
    pub max_request_credits: Option<u64>,
}

/// Price ceilings by default: a hundred times the default prices, so a
/// node never pays a price far beyond the network's norm unless told to.
pub const DEFAULT_MAX_PRICE_PROMPT_MICRO: u64 =
    100 * crate::inference::receipts::DEFAULT_PRICE_PROMPT_MICRO;
pub const DEFAULT_MAX_PRICE_COMPLETION_MICRO: u64 =
    100 * crate::inference::receipts::DEFAULT_PRICE_COMPLETION_MICRO;

impl Default for SpendLimits {
    fn default() -> Self {
        Self {
            max_price_prompt_micro: Some(DEFAULT_MAX_PRICE_PROMPT_MICRO),
            max_price_completion_micro: Some(DEFAULT_MAX_PRICE_COMPLETION_MICRO),
            max_request_credits: None,
        }
    }
}

impl SpendLimits {
    /// True when prices of `prompt` and `completion` micro-credits per
    /// token are within the ceilings.
    pub fn admits(&self, prompt: u64, completion: u64) -> bool {
        self.max_price_prompt_micro.is_none_or(|m| prompt <= m)
            && self
                .max_price_completion_micro
                .is_none_or(|m| completion <= m)
    }

    /// The ceilings, as the flags name them.
    pub fn describe(&self) -> String {
        let f = |v: Option<u64>| v.map_or("none".to_owned(), |v| v.to_string());
        format!(
            "--max-price-prompt {}, --max-price-completion {}",
            f(self.max_price_prompt_micro),
            f(self.max_price_completion_micro)
        )
    }
}

/// One event of a remote generation, as the HTTP layer consumes it.
#[derive(Debug)]
pub enum RemoteEvent {
    /// Text, and its tokens' logprobs when the request asked for them.
    Token(String, Vec<hypha_engine::TokenLogprob>),
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
    /// What this node pays at most.
    pub limits: SpendLimits,
}

/// One generation running on a seeder. Dropping it before it ended
/// cancels the generation on the seeder and pays for what still arrives
/// ([`drain`]).
pub struct RemoteGeneration {
    conn: quinn::Connection,
    peer: NodeId,
    party: Arc<Party>,
    /// The stream and its checks; `None` only once dropped unfinished
    /// (then [`drain`] holds them).
    live: Option<Live>,
    request_id: RequestId,
    first: Option<RemoteEvent>,
    /// How long the seeder may take to answer: [`START_TIMEOUT`], plus
    /// time to take in a long prompt.
    start_limit: Duration,
    ended: bool,
    metrics: Arc<Metrics>,
    /// Counts this request against its seeder while it runs.
    pub(crate) running: Option<RunningGuard>,
    /// The ledger has the latest receipt both signed.
    recorded: bool,
}

/// A request stream and the checks of what came on it.
struct Live {
    send: FramedSend,
    recv: FramedRecv,
    /// The answer's frames checked so far, and its receipts.
    check: ReplyCheck,
}

/// Prompt bytes a seeder is given an extra second for before it must
/// answer (upload and tokenization of a long prompt).
const START_BYTES_PER_EXTRA_SECOND: usize = 256 * 1024;

/// Bytes of a request's prompt before templating: its messages (their
/// calls included) and the tools it offers.
fn prompt_bytes(req: &InferenceRequest) -> usize {
    let messages = match &req.prompt {
        hypha_wire::Prompt::Chat(ms) => ms
            .iter()
            .map(|m| {
                m.content.len()
                    + m.role.len()
                    + m.tool_call_id.as_ref().map_or(0, String::len)
                    + m.tool_calls
                        .iter()
                        .map(|c| c.id.len() + c.name.len() + c.arguments.len())
                        .sum::<usize>()
            })
            .sum(),
        hypha_wire::Prompt::Text(t) => t.len(),
    };
    messages + req.tools.as_ref().map_or(0, |t| t.tools_json.len())
}

fn start_limit(req: &InferenceRequest) -> Duration {
    START_TIMEOUT + Duration::from_secs((prompt_bytes(req) / START_BYTES_PER_EXTRA_SECOND) as u64)
}

/// Template tokens a chat template may add around a conversation (a
/// default system prompt, role markers) beyond the messages' own text.
const TEMPLATE_TOKENS_MAX: usize = 256;
/// Template tokens per message (its role and markers) beyond its text.
const TEMPLATE_TOKENS_PER_MESSAGE: usize = 16;

/// Template tokens tools may add: a template writes their JSON (indented
/// by some, every space a token at worst) and instructions of its own.
const TOOLS_TEMPLATE_BYTES_FACTOR: usize = 4;
const TOOLS_TEMPLATE_TOKENS_MAX: usize = 1024;

/// The most tokens a prompt can honestly cost: a token covers at least one
/// byte of text, and the template adds a bounded number of its own.
fn prompt_token_bound(req: &InferenceRequest) -> u32 {
    let per_message = match &req.prompt {
        hypha_wire::Prompt::Chat(ms) => ms.len() * TEMPLATE_TOKENS_PER_MESSAGE,
        hypha_wire::Prompt::Text(_) => 0,
    };
    let tools = req.tools.as_ref().map_or(0, |t| {
        t.tools_json.len() * TOOLS_TEMPLATE_BYTES_FACTOR + TOOLS_TEMPLATE_TOKENS_MAX
    });
    let n = prompt_bytes(req) + per_message + tools;
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
            prompt_token_bound(req),
            req.max_credits,
        );
        let mut g = Self {
            conn,
            peer,
            party: party.clone(),
            live: Some(Live {
                send: FramedSend::new(send),
                recv: FramedRecv::new(recv),
                check: ReplyCheck::new(
                    RequestId(req.request_id),
                    Bounds {
                        max_tokens: req.max_tokens.unwrap_or(MAX_REMOTE_TOKENS),
                        textless: textless_allowance(&req.stop),
                        stops: u32::try_from(req.stop.len()).unwrap_or(u32::MAX),
                        logprobs: req.logprobs,
                        tools: req.tools.is_some(),
                    },
                    receipts,
                ),
            }),
            request_id: RequestId(req.request_id),
            first: None,
            running: None,
            start_limit: start_limit(req),
            ended: false,
            metrics: metrics.clone(),
            recorded: false,
        };
        if let Some(live) = g.live.as_mut() {
            live.send
                .send(&Message::Request(req.clone()))
                .await
                .map_err(failed)?;
        }
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

    /// How the seeder's model writes tool calls: told in its `Accepted`
    /// when the request offered tools, `None` otherwise.
    pub fn tool_format(&self) -> Option<hypha_wire::ToolFormat> {
        self.live.as_ref().and_then(|l| l.check.tool_format())
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
        let identity = &self.party.identity;
        let Some(live) = self.live.as_mut() else {
            return Err(failed(PeerError::Protocol(Violation::EndedBefore("done"))));
        };
        let check = &mut live.check;
        let awaiting_last = check.awaiting_last_receipt();
        let answered = check.answered();
        let next = live.recv.next(|m| check.frame(m, identity));
        let frame = if awaiting_last {
            match tokio::time::timeout(LAST_RECEIPT_TIMEOUT, next).await {
                Ok(f) => f,
                Err(_) => {
                    // No last receipt: the request is over all the same.
                    tracing::warn!(%peer, request_id = %self.request_id, "no last receipt after done");
                    self.ended = true;
                    live.send.finish();
                    let credits = self.record().await;
                    let (text, finish) = self
                        .live
                        .as_mut()
                        .and_then(|l| l.check.take_done())
                        .unwrap_or_else(empty_done);
                    return Ok(Some(RemoteEvent::Done {
                        text,
                        finish,
                        credits,
                    }));
                }
            }
        } else {
            let (limit, why) = if answered {
                (RECV_STALL_TIMEOUT, "the seeder went silent")
            } else {
                (self.start_limit, "the seeder did not answer the request")
            };
            match tokio::time::timeout(limit, next).await {
                Ok(f) => f,
                Err(_) => Err(PeerError::Timeout(why)),
            }
        };
        let step = frame
            .and_then(|r| r.ok_or(PeerError::Protocol(Violation::EndedBefore("done"))))
            .map_err(failed)?;
        match step {
            Step::Nothing => Ok(None),
            Step::Token(text, logprobs) => Ok(Some(RemoteEvent::Token(text, logprobs))),
            Step::Countersign {
                countersign,
                finished,
            } => {
                live.send
                    .send(&Message::Countersign(countersign))
                    .await
                    .map_err(failed)?;
                let Some((text, finish)) = finished else {
                    // An interval's receipt: this node's record of its
                    // spending so far (the seeder writes it before it
                    // sends more tokens).
                    if let Some(signed) = live.check.receipts().signed().cloned() {
                        let ledger = self.party.ledger.clone();
                        self.party.tasks.spawn_blocking(move || {
                            if let Err(e) = ledger.append(signed) {
                                tracing::debug!("interval receipt not recorded: {e}");
                            }
                        });
                    }
                    return Ok(None);
                };
                self.ended = true;
                live.send.finish();
                let credits = self.record().await;
                Ok(Some(RemoteEvent::Done {
                    text,
                    finish,
                    credits,
                }))
            }
            Step::Refused(refusal, message) => {
                self.ended = true;
                live.send.finish();
                Err(RemoteError::Refused {
                    peer,
                    refusal,
                    message,
                })
            }
        }
    }

    /// Appends the latest receipt both signed to the ledger (once); its
    /// credits.
    async fn record(&mut self) -> Option<u64> {
        if self.recorded {
            return None;
        }
        let verified = self.live.as_ref()?.check.receipts().signed()?.clone();
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
            stop_sequence: None,
        },
    )
}

impl Drop for RemoteGeneration {
    fn drop(&mut self) {
        let Some(mut live) = self.live.take() else {
            return;
        };
        let runtime = tokio::runtime::Handle::try_current().is_ok();
        if !self.ended && runtime {
            self.party.tasks.spawn(drain(Drained {
                live,
                party: self.party.clone(),
                request_id: self.request_id,
                recorded: self.recorded,
                _running: self.running.take(),
            }));
            return;
        }
        if let (false, Some(signed), true) = (
            self.recorded,
            live.check.receipts().signed().cloned(),
            runtime,
        ) {
            // Cut short: keep the last receipt both signed.
            let ledger = self.party.ledger.clone();
            self.party.tasks.spawn_blocking(move || {
                if let Err(e) = ledger.append(signed) {
                    tracing::warn!("cannot record receipt: {e}");
                }
            });
        }
        if !self.ended {
            // Reset our side and stop theirs: the seeder sees it on its next
            // read or write and drops the generation.
            let _ = live.send.stream.reset(STREAM_CANCELLED);
            let _ = live.recv.stream.stop(STREAM_CANCELLED);
        }
    }
}

/// How long a generation dropped unfinished keeps its stream to pay for
/// what still arrives: the seeder's wait for the last countersignature.
pub const DRAIN_TIMEOUT: Duration = LAST_RECEIPT_TIMEOUT;

/// A generation whose client left before it ended, and what its drain
/// needs. Dropped (when the drain ends, or the node stops), it records the
/// last receipt both signed and stops the stream.
struct Drained {
    live: Live,
    party: Arc<Party>,
    request_id: RequestId,
    recorded: bool,
    /// Still counts against the seeder: its connection is not closed
    /// under the drain (a close after `Done` reads as not paying).
    _running: Option<RunningGuard>,
}

impl Drop for Drained {
    fn drop(&mut self) {
        self.live.send.finish();
        let _ = self.live.recv.stream.stop(STREAM_CANCELLED);
        if self.recorded || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        if let Some(signed) = self.live.check.receipts().signed().cloned() {
            let ledger = self.party.ledger.clone();
            let request_id = self.request_id;
            self.party.tasks.spawn_blocking(move || {
                if let Err(e) = ledger.append(signed) {
                    tracing::warn!(%request_id, "cannot record receipt: {e}");
                }
            });
        }
    }
}

/// Sends `Cancel`, then countersigns (checked, as ever) what still
/// arrives, for at most [`DRAIN_TIMEOUT`]. The cancel may cross the
/// seeder's `Done`; the seeder then still wants the last receipt signed
/// and holds a consumer that leaves it unsigned as unpaid (in the DHT
/// too), and the tokens did reach this node. Mid-stream the seeder stops
/// at the cancel and ends the stream.
async fn drain(mut d: Drained) {
    let cancel = Message::Cancel(hypha_wire::Cancel {
        request_id: d.request_id.0,
    });
    let live = &mut d.live;
    let identity = &d.party.identity;
    let pay = async {
        if live.send.send(&cancel).await.is_err() {
            return;
        }
        loop {
            let check = &mut live.check;
            match live.recv.next(|m| check.frame(m, identity)).await {
                Ok(Some(Step::Countersign {
                    countersign,
                    finished,
                })) => {
                    let sent = live.send.send(&Message::Countersign(countersign)).await;
                    if sent.is_err() || finished.is_some() {
                        return;
                    }
                }
                Ok(Some(Step::Nothing | Step::Token(..))) => {}
                Ok(Some(Step::Refused(..)) | None) | Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, pay).await;
}
