//! The consumer's checks of a seeder's answer, frame by frame, without
//! I/O: [`ReplyCheck`] takes each frame of a request stream and says what
//! it means for the client ([`Step`]) or why it breaks the protocol.
//! [`crate::inference::remote`] drives it over a QUIC stream, with the
//! deadlines; the `reply_stream` fuzz target drives it with arbitrary and
//! genuinely signed frames.
//!
//! An answer is `Accepted` (first, at most once), then `Chunk`s numbered
//! from 0, each with at least one token, then `Done` counting the tokens
//! that came, with `Receipt` offers anywhere after `Accepted` and the last
//! one after `Done`. Bounds ([`Bounds`]): the tokens may not pass the
//! request's `max_tokens` (and `Done` may name only one of its stop
//! strings), their text may not pass [`MAX_TOKEN_TEXT_BYTES`]
//! per token, and every token billed must have brought at least one byte
//! of text, but for [`textless_allowance`] tokens (the end token, bytes of
//! a character or a stop string held back): a seeder cannot bill for token
//! ids it sends with nothing to show for them. Each offer is checked
//! against what arrived ([`ConsumerReceipts::check_offer`], which also
//! holds it to the consumer's cap in credits) before it is countersigned.
//! A seeder's refusal (`Error`) ends the answer.

use hypha_engine::{Finish, FinishReason, TokenLogprob};
use hypha_wire::{ArchivedMessage, ArchivedTokenChunk, Countersign, Refusal};

use crate::identity::Identity;
use crate::inference::receipts::ConsumerReceipts;
use crate::inference::RequestId;
use crate::net::proto::{kind_of, PeerError, Violation};

/// Text one generated token may stand for: longer than any token of the
/// vocabularies in use (their longest run a few dozen bytes), so a
/// non-streaming answer collects at most this much per token.
pub const MAX_TOKEN_TEXT_BYTES: usize = 256;

/// How far above 0 a logprob may round.
pub const LOGPROB_SLACK: f32 = 1e-3;

/// Tokens an honest answer may carry with no text, beyond those in
/// stop strings: the end-of-generation token, the three bytes of a
/// character split over tokens, and a few control tokens.
pub const TEXTLESS_TOKENS: u32 = 12;

/// Tokens an answer to a request with `stops` may carry without text of
/// their own: [`TEXTLESS_TOKENS`], plus a stop string's bytes but one (a
/// prefix of it is held back until the text after it shows it is not the
/// stop string).
pub fn textless_allowance<S: AsRef<str>>(stops: &[S]) -> u32 {
    let held = stops.iter().map(|s| s.as_ref().len()).max().unwrap_or(0);
    TEXTLESS_TOKENS.saturating_add(u32::try_from(held).unwrap_or(u32::MAX))
}

/// What the consumer takes from one answer at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Tokens the request may bring.
    pub max_tokens: u32,
    /// Tokens that may arrive without text ([`textless_allowance`]).
    pub textless: u32,
    /// Stop strings of the request: `Done` may name one of them.
    pub stops: u32,
    /// The top logprobs the request asked for per token: then each chunk
    /// carries one entry per token with at most this many alternatives;
    /// `None`, no entries.
    pub logprobs: Option<u8>,
    /// The request offered tools: `Accepted` must say how the model writes
    /// calls (and must not otherwise), before any chunk.
    pub tools: bool,
}

/// What one frame of the answer means.
#[derive(Debug, Clone)]
pub enum Step {
    /// Nothing for the client: the request was accepted, or `Done`
    /// arrived and its last receipt is due.
    Nothing,
    /// Text of the tokens of one chunk, and their logprobs when asked for.
    Token(String, Vec<TokenLogprob>),
    /// A receipt checked and countersigned: send this back. `finished`
    /// when it was the last receipt: the answer is complete.
    Countersign {
        countersign: Countersign,
        finished: Option<(String, Finish)>,
    },
    /// The seeder refused the request; the answer is over.
    Refused(Refusal, String),
}

/// The state of one answer as the consumer checks it.
pub struct ReplyCheck {
    request_id: RequestId,
    next_seq: u32,
    /// Some frame of the answer arrived.
    answered: bool,
    bounds: Bounds,
    /// Tokens and bytes of text that arrived.
    tokens: u32,
    text_bytes: usize,
    /// The tokens that arrived and the receipts both signed.
    receipts: ConsumerReceipts,
    /// `Done` arrived (its text and details, until the last receipt).
    done: Option<(String, Finish)>,
    done_seen: bool,
    /// The last receipt or a refusal arrived.
    over: bool,
    /// How the seeder's model writes tool calls, from `Accepted`.
    tool_format: Option<hypha_wire::ToolFormat>,
}

impl ReplyCheck {
    pub fn new(request_id: RequestId, bounds: Bounds, receipts: ConsumerReceipts) -> Self {
        Self {
            request_id,
            next_seq: 0,
            answered: false,
            bounds,
            tokens: 0,
            text_bytes: 0,
            receipts,
            done: None,
            done_seen: false,
            over: false,
            tool_format: None,
        }
    }

    /// How the seeder's model writes tool calls (when the request offered
    /// tools and `Accepted` arrived).
    pub fn tool_format(&self) -> Option<hypha_wire::ToolFormat> {
        self.tool_format
    }

    /// Some frame of the answer arrived.
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// `Done` arrived and the last receipt has not.
    pub fn awaiting_last_receipt(&self) -> bool {
        self.done.is_some()
    }

    /// `Done`'s text and details, when it arrived but no last receipt did:
    /// the request is over all the same.
    pub fn take_done(&mut self) -> Option<(String, Finish)> {
        self.done.take()
    }

    /// Tokens that arrived.
    pub fn tokens(&self) -> u32 {
        self.tokens
    }

    /// Bytes of text that arrived.
    pub fn text_bytes(&self) -> usize {
        self.text_bytes
    }

    /// The receipts of the request.
    pub fn receipts(&self) -> &ConsumerReceipts {
        &self.receipts
    }

    /// Checks one frame from the seeder; `consumer` countersigns offers.
    pub fn frame(&mut self, msg: &ArchivedMessage, consumer: &Identity) -> Result<Step, PeerError> {
        if self.over {
            return Err(Violation::OutOfOrder("a frame after the answer ended").into());
        }
        let first = !self.answered;
        self.answered = true;
        let want = self.request_id.0;
        let check_id = |got: u64| {
            if got == want {
                Ok(())
            } else {
                Err(PeerError::Protocol(Violation::WrongRequest { got, want }))
            }
        };
        match msg {
            ArchivedMessage::Accepted(a) => {
                check_id(a.request_id.to_native())?;
                if !first {
                    return Err(Violation::OutOfOrder("accepted in the middle of an answer").into());
                }
                let format = a.tool_format.as_ref().map(|f| match f {
                    hypha_wire::ArchivedToolFormat::Generic => hypha_wire::ToolFormat::Generic,
                    hypha_wire::ArchivedToolFormat::Hermes => hypha_wire::ToolFormat::Hermes,
                    hypha_wire::ArchivedToolFormat::Llama3 => hypha_wire::ToolFormat::Llama3,
                    hypha_wire::ArchivedToolFormat::Mistral => hypha_wire::ToolFormat::Mistral,
                });
                if format.is_some() != self.bounds.tools {
                    return Err(Violation::ToolFormat.into());
                }
                self.tool_format = format;
                Ok(Step::Nothing)
            }
            ArchivedMessage::Chunk(c) => {
                check_id(c.request_id.to_native())?;
                if self.done_seen {
                    return Err(Violation::OutOfOrder("a chunk after done").into());
                }
                let got = c.seq.to_native();
                if got != self.next_seq {
                    return Err(Violation::OutOfSequence {
                        got,
                        want: self.next_seq,
                    }
                    .into());
                }
                if c.token_ids.is_empty() {
                    return Err(Violation::EmptyChunk.into());
                }
                if self.bounds.tools && self.tool_format.is_none() {
                    return Err(Violation::OutOfOrder("a chunk before accepted").into());
                }
                let n = u32::try_from(c.token_ids.len()).unwrap_or(u32::MAX);
                let tokens = self.tokens.saturating_add(n);
                if tokens > self.bounds.max_tokens {
                    return Err(Violation::TooManyTokens {
                        got: tokens,
                        max: self.bounds.max_tokens,
                    }
                    .into());
                }
                self.tokens = tokens;
                self.count_text(c.text.len())?;
                if u64::from(tokens) > self.text_bytes as u64 + u64::from(self.bounds.textless) {
                    return Err(Violation::TextlessTokens {
                        tokens,
                        bytes: self.text_bytes,
                    }
                    .into());
                }
                let logprobs = self.check_logprobs(c)?;
                for t in c.token_ids.iter() {
                    self.receipts.received(t.to_native());
                }
                self.next_seq = self.next_seq.wrapping_add(1);
                Ok(Step::Token(c.text.as_str().to_owned(), logprobs))
            }
            ArchivedMessage::Done(d) => {
                check_id(d.request_id.to_native())?;
                if self.done_seen {
                    return Err(Violation::OutOfOrder("a second done").into());
                }
                let claimed = d.completion_tokens.to_native();
                if claimed != self.tokens {
                    return Err(Violation::WrongCount {
                        claimed,
                        got: self.tokens,
                    }
                    .into());
                }
                self.count_text(d.text.len())?;
                let reason = match d.finish_reason {
                    hypha_wire::ArchivedFinishReason::Stop => FinishReason::Stop,
                    hypha_wire::ArchivedFinishReason::Length => FinishReason::Length,
                };
                let stop_sequence = d.stop_sequence.as_ref().map(|i| i.to_native());
                if let Some(index) = stop_sequence {
                    if index >= self.bounds.stops || reason != FinishReason::Stop {
                        return Err(Violation::WrongStop {
                            index,
                            stops: self.bounds.stops,
                        }
                        .into());
                    }
                }
                self.done_seen = true;
                self.done = Some((
                    d.text.as_str().to_owned(),
                    Finish {
                        reason,
                        prompt_tokens: d.prompt_tokens.to_native(),
                        completion_tokens: claimed,
                        stop_sequence: stop_sequence.map(|i| i as usize),
                    },
                ));
                Ok(Step::Nothing)
            }
            ArchivedMessage::Receipt(r) => {
                check_id(r.request_id.to_native())?;
                if r.last && !self.done_seen {
                    return Err(Violation::OutOfOrder("a last receipt before done").into());
                }
                let done = self.done.as_ref().map(|(_, f)| f.prompt_tokens);
                let consumer_sig = self.receipts.check_offer(
                    consumer,
                    r.receipt.as_slice(),
                    r.seeder_sig,
                    r.last,
                    done,
                )?;
                let finished = if r.last {
                    self.over = true;
                    self.done.take()
                } else {
                    None
                };
                Ok(Step::Countersign {
                    countersign: Countersign {
                        request_id: want,
                        consumer_sig,
                    },
                    finished,
                })
            }
            ArchivedMessage::Error(e) => {
                check_id(e.request_id.to_native())?;
                self.over = true;
                Ok(Step::Refused(
                    Refusal::from(&e.refusal),
                    e.message.as_str().to_owned(),
                ))
            }
            other => Err(Violation::OnRequestStream(kind_of(other)).into()),
        }
    }

    /// A chunk's logprobs, held to what the request asked: one entry per
    /// token, each a log-probability (finite, at most 0) of a token of at
    /// most [`MAX_TOKEN_TEXT_BYTES`], with as many alternatives at most.
    fn check_logprobs(&self, c: &ArchivedTokenChunk) -> Result<Vec<TokenLogprob>, PeerError> {
        let bad = |why: &'static str| PeerError::from(Violation::BadLogprobs(why));
        let Some(top) = self.bounds.logprobs else {
            return if c.logprobs.is_empty() {
                Ok(Vec::new())
            } else {
                Err(bad("logprobs the request did not ask for"))
            };
        };
        if c.logprobs.len() != c.token_ids.len() {
            return Err(bad("not one logprob entry per token"));
        }
        // Rounding may put a certain token a hair above 0.
        let ok = |lp: f32| lp.is_finite() && lp <= LOGPROB_SLACK;
        let piece = |b: &[u8]| b.len() <= MAX_TOKEN_TEXT_BYTES;
        let mut out = Vec::with_capacity(c.logprobs.len());
        for e in c.logprobs.iter() {
            let lp = e.logprob.to_native();
            if !ok(lp) || !piece(&e.bytes) {
                return Err(bad("a token's logprob or bytes out of range"));
            }
            if e.top.len() > usize::from(top) {
                return Err(bad("more alternatives than asked for"));
            }
            let mut alts = Vec::with_capacity(e.top.len());
            for t in e.top.iter() {
                let l = t.logprob.to_native();
                if !ok(l) || !piece(&t.bytes) {
                    return Err(bad("an alternative's logprob or bytes out of range"));
                }
                alts.push((t.bytes.to_vec(), l));
            }
            out.push(TokenLogprob {
                bytes: e.bytes.to_vec(),
                logprob: lp,
                top: alts,
            });
        }
        Ok(out)
    }

    /// Counts `bytes` more of text: no more than the tokens so far carry.
    fn count_text(&mut self, bytes: usize) -> Result<(), PeerError> {
        let text_bytes = self.text_bytes.saturating_add(bytes);
        let most = (self.tokens as usize).saturating_mul(MAX_TOKEN_TEXT_BYTES);
        if text_bytes > most {
            return Err(Violation::TooMuchText {
                bytes: text_bytes,
                tokens: self.tokens,
            }
            .into());
        }
        self.text_bytes = text_bytes;
        Ok(())
    }
}
