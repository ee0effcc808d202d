//! The seeder's half of remote inference: admit a peer's request, stream
//! the generation out as chunks, and exchange receipts along the way.
//!
//! A request stream carries exactly one `Request`; the seeder answers
//! `Accepted` once the request is admitted, then `Chunk`s numbered from 0,
//! and ends with `Done` or `Error`. A `Cancel`, a reset of the stream or a
//! stop of the reply drops the engine's `Generation`, which frees the slot
//! at the next decode step.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hypha_engine::{Engine, Event};
use hypha_ledger::{Ledger, ReceiptKey};
use hypha_wire::{
    Accepted, ArchivedMessage, Done, ErrorReply, FinishReason, InferenceRequest, Message, NodeId,
    Refusal, TokenChunk,
};

use crate::identity::Identity;
use crate::inference::admission::{
    FreeTier, LedgerJudge, NetworkBalances, Unpaid, FIRST_VIEW_WAIT, UNPAID_SEEDERS_TO_REFUSE,
};
use crate::inference::convert::{http_status, logprob_to_wire, prepare, reply_for, Prepared};
use crate::inference::prep::Preparer;
use crate::inference::receipts::{within_budget, Due, Party, SeederReceipts, Terms};
use crate::inference::tools;
use crate::inference::RequestId;
use crate::metrics::Metrics;
use crate::net::hello::{Offer, VerifiedHello};
use crate::net::proto::{kind_of, FramedRecv, FramedSend, PeerError, Violation};
use crate::services::announce::Capacity;
use crate::services::dht::Discovery;
use crate::util::{lock, unix_ms};

/// How long the seeder waits for a consumer's countersignature when one is
/// due (before more tokens, or after the last receipt).
pub const COUNTERSIGN_TIMEOUT: Duration = Duration::from_secs(5);
/// Tokens between two cumulative receipts by default.
pub const DEFAULT_RECEIPT_INTERVAL: u32 = 64;
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
    /// Limits consumers without standing here (the free tier).
    pub free_tier: FreeTier,
    /// Consumers that left receipts unsigned.
    pub unpaid: Unpaid,
    /// Requests running now, by (consumer, request id).
    pub running: std::sync::Mutex<HashSet<ReceiptKey>>,
    /// Decode speed of served streams, tokens/s (0 until one is measured).
    pub decode_tps: std::sync::atomic::AtomicU32,
    /// Where settled receipts are published.
    pub discovery: Option<Discovery>,
    /// What the DHT's receipts show of consumers (`Published`).
    pub balances: Arc<NetworkBalances>,
    /// Templating and tokenizing, off the async workers.
    pub prep: Arc<Preparer>,
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

/// Serves one inference request.
pub(crate) async fn serve_request(
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
    // Admission order follows the consumer's standing here
    // (`hypha_ledger::standing`): what this node paid it, what it earned
    // from nodes this node paid (as the DHT's receipts show), less all it
    // is known to have spent. With none it is on the free tier: idle
    // capacity only (preemptible), at the free tier's rate.
    let judge = LedgerJudge {
        me: state.identity.id(),
        ledger: &state.ledger,
        spent_elsewhere: |x: &NodeId| {
            state
                .balances
                .get(x, state.discovery.as_ref())
                .map(|p| p.published.spent_elsewhere)
        },
    };
    // A consumer's first request here waits (briefly) for what the DHT
    // shows of it: its spending elsewhere, and unpaid notices against it.
    let seen = state
        .balances
        .get_or_wait(&consumer.node_id, state.discovery.as_ref(), FIRST_VIEW_WAIT)
        .await;
    let published = seen.as_ref().map(|s| &s.published);
    let standing = hypha_ledger::standing(&judge, &consumer.node_id, published);
    let unpaid_elsewhere = seen
        .as_ref()
        .map(|s| s.unpaid_at(unix_ms()))
        .unwrap_or_default();
    // How the model writes tool calls, told in `Accepted` when the
    // request offers tools.
    let mut accepted_format = None;
    let prepared = if state.ledger.contains(&key) || claim.is_none() {
        Err(ErrorReply {
            request_id,
            refusal: Refusal::Duplicate,
            message: format!("request id {request_id} was already used"),
        })
    } else if state.unpaid.owes(&consumer.node_id) {
        Err(ErrorReply {
            request_id,
            refusal: Refusal::Unpaid,
            message: "an earlier request's receipt was never countersigned".into(),
        })
    } else if unpaid_elsewhere.len() >= UNPAID_SEEDERS_TO_REFUSE {
        Err(ErrorReply {
            request_id,
            refusal: Refusal::Unpaid,
            message: format!(
                "{} seeders published unpaid notices against this consumer: receipts it left unsigned there in the last {} minutes",
                unpaid_elsewhere.len(),
                hypha_dht::notices::NOTICE_LIFETIME_MS / 60_000
            ),
        })
    } else if standing <= 0
        && !state
            .free_tier
            .allow(consumer.node_id, std::time::Instant::now())
    {
        Err(ErrorReply {
            request_id,
            refusal: Refusal::TooMany,
            message: format!(
                "no credits left here (standing {standing} micro-credits; credits count where they trace back to this seeder's payments) and the free tier's {} requests per minute are used",
                state.free_tier.per_minute
            ),
        })
    } else {
        let format = tools::format_of_template(state.engine.info().chat_template.as_deref());
        match prepare(&req, &state.models, format) {
            Err(reply) => Err(reply),
            Ok(Prepared {
                input,
                request: mut r,
                tool_format,
            }) => {
                accepted_format = tool_format;
                let tokens = state
                    .prep
                    .tokens(&state.engine, Some(consumer.node_id), input)
                    .await;
                // The free tier waits in arrival order behind every
                // paying request and gives its slot up to one.
                r.preemptible = standing <= 0;
                r.priority = if standing <= 0 {
                    0
                } else {
                    i64::try_from(standing).unwrap_or(i64::MAX - 1)
                };
                match tokens {
                    Err(e) => Err(reply_for(RequestId(request_id), &e)),
                    Ok(t) => {
                        // The consumer's cap: the prompt must fit it, and
                        // generation stops before the tokens would pass it.
                        let prompt_tokens = u32::try_from(t.len()).unwrap_or(u32::MAX);
                        match within_budget(&terms_of(state), prompt_tokens, r.max_tokens, req.max_credits) {
                            Err(cost) => Err(ErrorReply {
                                request_id,
                                refusal: Refusal::OverBudget,
                                message: format!(
                                    "the prompt's {prompt_tokens} tokens cost {cost} micro-credits here; with one token more that passes the request's cap of {} micro-credits",
                                    req.max_credits.unwrap_or(0)
                                ),
                            }),
                            Ok(max_tokens) => {
                                r.prompt = t;
                                r.max_tokens = max_tokens;
                                state
                                    .engine
                                    .submit(r)
                                    .map_err(|e| reply_for(RequestId(request_id), &e))
                            }
                        }
                    }
                }
            }
        }
    };
    let generation = match prepared {
        Ok(g) => g,
        Err(reply) => {
            state
                .metrics
                .count_request("peer", http_status(reply.refusal));
            send.send(&Message::Error(reply)).await?;
            send.finish();
            return Ok(());
        }
    };
    send.send(&Message::Accepted(Accepted {
        request_id,
        tool_format: accepted_format,
    }))
    .await?;
    let mut billing = Billing::new(
        state,
        consumer,
        RequestId(request_id),
        generation.prompt_tokens,
    );
    // The prompt is billed before the first token: a receipt for it alone
    // goes out now, while the engine takes the prompt in, and no token
    // follows until the consumer countersigned it.
    let prompt_receipt = billing.offer(false);
    send.send(&prompt_receipt).await?;
    let outcome = stream_generation(generation, &mut send, &mut recv, &mut billing, conn).await;
    let owing = billing.owing(&outcome);
    match owing {
        Owing::Nothing => {}
        Owing::Strike => state.unpaid.note_silent(consumer.node_id),
        Owing::Refuse => {
            state.unpaid.note(consumer.node_id);
            billing.publish_notice();
        }
    }
    // The receipt is durable before the consumer sees the stream end.
    billing.settle().await;
    send.finish();
    drop(claim);
    let status = match &outcome {
        _ if owing == Owing::Refuse => 402,
        Ok(Outcome::Done) => 200,
        Ok(Outcome::Failed(status)) => *status,
        Ok(Outcome::Unpaid) => 402,
        Ok(Outcome::Cancelled | Outcome::Lost) => 499,
        Err(e) if e.is_violation() => 400,
        Err(_) => 499,
    };
    state.metrics.count_request("peer", status);
    if owing != Owing::Refuse
        && matches!(outcome, Ok(Outcome::Cancelled) | Err(PeerError::Reset(_)))
    {
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
        // The lock is let go before a claim exists, and a claim is made
        // only for a free key: one made and dropped here would take the
        // lock this holds (a deadlock on the second request of a running
        // id) and free the key of the request that holds it.
        let fresh = lock(running).insert(key);
        fresh.then(|| Self { running, key })
    }
}

impl Drop for RunningClaim<'_> {
    fn drop(&mut self) {
        let mut set = lock(self.running);
        set.remove(&self.key);
    }
}

/// How a served request ended.
enum Outcome {
    Done,
    /// The generation failed here (an HTTP status for the metrics): the
    /// consumer owes only what it signed.
    Failed(u16),
    Cancelled,
    /// The consumer stopped countersigning receipts.
    Unpaid,
    /// Nothing at all arrived from the consumer while its signature was
    /// due: the connection is gone.
    Lost,
}

/// What a consumer that left a receipt unsigned owes for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owing {
    /// Every receipt offered was countersigned, or the request was
    /// cancelled while it ran (at most one interval goes unpaid, and an
    /// honest client may leave at any time).
    Nothing,
    /// The connection was lost or went silent while a signature was due
    /// after `Done`, or the request ended before its prompt's receipt was
    /// signed (the prompt was taken in for nothing): twice within
    /// [`crate::inference::admission::UNPAID_BAN`] is refused.
    Strike,
    /// Refused from now on: the consumer had everything (`Done`) and
    /// reset, stopped, cancelled or let the last receipt time out, or it
    /// left a receipt unsigned past [`COUNTERSIGN_TIMEOUT`].
    Refuse,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromConsumer {
    Cancel,
    Countersign([u8; 64]),
}

/// While a request runs, the consumer may only cancel it or countersign.
pub fn consumer_frame(
    msg: &ArchivedMessage,
    request_id: RequestId,
) -> Result<FromConsumer, PeerError> {
    match msg {
        ArchivedMessage::Cancel(_) => Ok(FromConsumer::Cancel),
        ArchivedMessage::Countersign(c) if c.request_id.to_native() == request_id.0 => {
            Ok(FromConsumer::Countersign(c.consumer_sig))
        }
        other => Err(Violation::WhileRunning(kind_of(other)).into()),
    }
}

/// What this seeder's requests cost: its hello's prices and model.
fn terms_of(state: &SeederState) -> Terms {
    Terms {
        model_sha256: state.offer.model_sha256,
        price_prompt_micro: state.offer.price_prompt_micro,
        price_completion_micro: state.offer.price_completion_micro,
    }
}

/// The receipts of one request ([`SeederReceipts`]) and where they go once
/// settled.
struct Billing<'a> {
    state: &'a SeederState,
    receipts: SeederReceipts,
    /// Completion tokens of the latest receipt written to the ledger.
    durable: Option<u32>,
    /// `Done` went out: the consumer has every token.
    done: bool,
}

impl<'a> Billing<'a> {
    fn new(
        state: &'a SeederState,
        consumer: &VerifiedHello,
        request_id: RequestId,
        prompt_tokens: u32,
    ) -> Self {
        let terms = terms_of(state);
        let receipts = SeederReceipts::new(
            request_id,
            Party {
                id: consumer.node_id,
                key: consumer.public_key,
            },
            Party::of(&state.identity),
            terms,
            prompt_tokens,
            state.receipt_interval,
            unix_ms(),
        );
        Self {
            state,
            receipts,
            durable: None,
            done: false,
        }
    }

    fn request_id(&self) -> RequestId {
        self.receipts.request_id()
    }

    /// A cumulative receipt for every token sent so far, signed now.
    fn offer(&mut self, last: bool) -> Message {
        Message::Receipt(self.receipts.offer(&self.state.identity, unix_ms(), last))
    }

    /// Takes a countersignature and writes the receipt it settles to the
    /// ledger before the caller sends another token: a crash loses at
    /// most the tokens since (one receipt interval).
    async fn countersigned(&mut self, consumer_sig: [u8; 64]) -> Result<(), PeerError> {
        self.receipts.countersigned(consumer_sig)?;
        self.write().await;
        Ok(())
    }

    /// Writes the latest receipt both signed, unless it is written; true
    /// when it is in the ledger.
    async fn write(&mut self) -> bool {
        let request_id = self.request_id();
        let Some(verified) = self.receipts.signed().cloned() else {
            return false;
        };
        let tokens = verified.receipt().completion_tokens;
        if self.durable == Some(tokens) {
            return true;
        }
        let ledger = self.state.ledger.clone();
        match tokio::task::spawn_blocking(move || ledger.append(verified)).await {
            Ok(Ok(())) => {
                self.durable = Some(tokens);
                true
            }
            Ok(Err(e)) => {
                tracing::warn!("cannot record receipt {request_id}: {e}");
                false
            }
            Err(e) => {
                tracing::warn!("ledger task failed: {e}");
                false
            }
        }
    }

    fn settled(&self) -> bool {
        self.receipts.settled()
    }

    /// What the consumer owes for receipts left unsigned when the stream
    /// ended with `outcome`.
    fn owing(&self, outcome: &Result<Outcome, PeerError>) -> Owing {
        if self.settled() || matches!(outcome, Ok(Outcome::Failed(_))) {
            return Owing::Nothing;
        }
        // A close the consumer sent itself (`PeerError::Closed`) is its
        // choice, like a reset, not a lost link.
        let lost = matches!(
            outcome,
            Ok(Outcome::Lost) | Err(PeerError::Connection(_) | PeerError::Timeout(_))
        );
        if matches!(outcome, Ok(Outcome::Unpaid)) {
            Owing::Refuse
        } else if self.done {
            if lost {
                Owing::Strike
            } else {
                Owing::Refuse
            }
        } else if lost || self.receipts.signed().is_none() {
            // Lost mid-stream with a signature due, or gone before the
            // prompt was paid for.
            Owing::Strike
        } else {
            Owing::Nothing
        }
    }

    /// Publishes an unpaid notice against the consumer: its last receipt
    /// both signed and the newest offer it left unsigned. Nothing when it
    /// never signed one (then no token went out).
    fn publish_notice(&self) {
        let (Some(d), Some(notice)) = (&self.state.discovery, self.receipts.unpaid_notice()) else {
            return;
        };
        match notice.verify() {
            Ok(v) => {
                let unpaid = v.unpaid_tokens();
                if d.publish_notice(v) {
                    tracing::info!(
                        request_id = self.receipts.request_id().0,
                        unpaid,
                        "publishing an unpaid notice"
                    );
                } else {
                    tracing::warn!("DHT queue full: unpaid notice not published");
                }
            }
            Err(e) => tracing::warn!("unpaid notice does not verify: {e}"),
        }
    }

    /// Writes the latest receipt both parties signed to the ledger (if a
    /// countersignature did not already) and publishes it.
    async fn settle(mut self) {
        if !self.write().await {
            return;
        }
        let Some(verified) = self.receipts.into_signed() else {
            return;
        };
        tracing::debug!(request_id = %verified.receipt().request_id, credits = verified.receipt().credits, "receipt recorded");
        if let Some(d) = &self.state.discovery {
            if !d.publish_receipt(verified) {
                tracing::warn!("receipt publication queue full: receipt not published");
            }
        }
    }
}

/// Reads the consumer until its countersignature for the pending receipt
/// arrives, or [`COUNTERSIGN_TIMEOUT`] passes. A `Cancel` does not end the
/// wait: countersignatures of what was offered may follow it (and after
/// `Done` the last receipt is owed all the same), but mid-stream the
/// outcome is then `Cancelled` whatever else comes.
async fn await_countersign(
    recv: &mut FramedRecv,
    billing: &mut Billing<'_>,
    conn: &quinn::Connection,
) -> Result<Countersigned, PeerError> {
    let request_id = billing.request_id();
    let heard = conn.stats().udp_rx.datagrams;
    let mut cancelled = false;
    let wait = async {
        while !billing.settled() {
            if recv.is_finished() {
                return Ok(Countersigned::No);
            }
            match recv.next(|m| consumer_frame(m, request_id)).await? {
                None => return Ok(Countersigned::No),
                Some(FromConsumer::Cancel) => cancelled = true,
                Some(FromConsumer::Countersign(sig)) => billing.countersigned(sig).await?,
            }
        }
        Ok(Countersigned::Yes)
    };
    let waited = tokio::time::timeout(COUNTERSIGN_TIMEOUT, wait).await;
    if cancelled && !billing.done {
        return Ok(Countersigned::Cancelled);
    }
    match waited {
        Ok(r) => r,
        Err(_) if conn.stats().udp_rx.datagrams == heard => Ok(Countersigned::Silent),
        Err(_) => Ok(Countersigned::No),
    }
}

/// Waits for every outstanding countersignature before more tokens go
/// out; the way the stream ends when they do not come.
async fn require_countersign(
    send: &mut FramedSend,
    recv: &mut FramedRecv,
    billing: &mut Billing<'_>,
    conn: &quinn::Connection,
) -> Result<Option<Outcome>, PeerError> {
    if billing.settled() {
        return Ok(None);
    }
    Ok(match await_countersign(recv, billing, conn).await? {
        Countersigned::Yes => None,
        Countersigned::Cancelled => Some(Outcome::Cancelled),
        Countersigned::Silent => Some(Outcome::Lost),
        Countersigned::No => {
            send.send(&Message::Error(ErrorReply {
                request_id: billing.request_id().0,
                refusal: Refusal::Unpaid,
                message: "the last receipt was not countersigned".into(),
            }))
            .await?;
            Some(Outcome::Unpaid)
        }
    })
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
    let request_id = billing.request_id();
    // One chunk message reused for every token: no allocation per token on
    // the wire path.
    let mut chunk = Message::Chunk(TokenChunk {
        request_id: request_id.0,
        seq: 0,
        token_ids: Vec::with_capacity(1),
        text: String::with_capacity(32),
        logprobs: Vec::new(),
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
                    Some(FromConsumer::Cancel) => {
                        // Stop generating, and take the countersignatures
                        // of what was offered (they may be on their way).
                        drop(generation);
                        if !billing.settled() {
                            await_countersign(recv, billing, conn).await?;
                        }
                        return Ok(Outcome::Cancelled);
                    }
                    Some(FromConsumer::Countersign(sig)) => {
                        billing.countersigned(sig).await?;
                        continue;
                    }
                }
            }
            e = generation.next() => e,
        };
        match event {
            Some(Event::Token { id, text, logprob }) => {
                if let Message::Chunk(c) = &mut chunk {
                    c.seq = seq;
                    c.token_ids.clear();
                    c.token_ids.push(id);
                    c.text.clear();
                    c.text.push_str(&text);
                    c.logprobs.clear();
                    if let Some(lp) = logprob {
                        c.logprobs.push(logprob_to_wire(*lp));
                    }
                }
                seq = seq.wrapping_add(1);
                if first_token.is_none() {
                    // No token before the prompt is paid for.
                    if let Some(end) = require_countersign(send, recv, billing, conn).await? {
                        return Ok(end);
                    }
                    first_token = Some(std::time::Instant::now());
                }
                // Receipts go out twice per interval, and each needs the
                // one before it signed before more tokens follow (see
                // `receipts`): a consumer that stops paying gets at most
                // one interval for free.
                let due = billing.receipts.sent(id);
                send.send(&chunk).await?;
                if due != Due::Nothing {
                    if due == Due::Countersign {
                        if let Some(end) = require_countersign(send, recv, billing, conn).await? {
                            return Ok(end);
                        }
                    }
                    let offer = billing.offer(false);
                    send.send(&offer).await?;
                }
            }
            Some(Event::Done { text, finish }) => {
                if let Some(t) = first_token {
                    billing
                        .state
                        .measured(billing.receipts.tokens(), t.elapsed());
                }
                let done = Message::Done(Done {
                    request_id: request_id.0,
                    prompt_tokens: finish.prompt_tokens,
                    completion_tokens: finish.completion_tokens,
                    finish_reason: match finish.reason {
                        hypha_engine::FinishReason::Stop => FinishReason::Stop,
                        hypha_engine::FinishReason::Length => FinishReason::Length,
                    },
                    text,
                    // The engine's index is one of the request's stop
                    // strings, which the wire bounds.
                    stop_sequence: finish.stop_sequence.and_then(|i| u32::try_from(i).ok()),
                });
                send.send(&done).await?;
                billing.done = true;
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
                let reply = reply_for(request_id, &e);
                let status = http_status(reply.refusal);
                send.send(&Message::Error(reply)).await?;
                return Ok(Outcome::Failed(status));
            }
            None => {
                send.send(&Message::Error(ErrorReply {
                    request_id: request_id.0,
                    refusal: Refusal::Internal,
                    message: "the engine stopped".into(),
                }))
                .await?;
                return Ok(Outcome::Failed(http_status(Refusal::Internal)));
            }
        }
    }
}
