//! A seeder's answer as the consumer checks it
//! (`hypha_node::inference::reply::ReplyCheck`, with the receipts of
//! `ConsumerReceipts`), against a real seeder half (`SeederReceipts`)
//! signing genuine receipts.
//!
//! The seeder answers in lockstep with the consumer: each step the input
//! picks the honest next frame (`Accepted`, the prompt's receipt, a chunk
//! of one to a few tokens with at least a byte of text each, an interval
//! receipt when due, `Done`, the last receipt), or a
//! lie: a frame built from the input with any field wrong (request id,
//! sequence number, no tokens, more tokens than asked for, too much text,
//! a wrong count in `Done`, a refusal), a receipt that claims other
//! tokens, parties, prices or prompt, signed by the seeder or someone
//! else, an honest frame dropped or sent twice, or raw bytes.
//!
//! - An honest answer is taken whole: the client gets every chunk's text in
//!   order and `Done` once, and both sides end with the same receipt for
//!   every token.
//! - Whatever the seeder sends: the tokens taken never pass `max_tokens`,
//!   their text never passes `MAX_TOKEN_TEXT_BYTES` per token, the tokens
//!   without text never pass the allowance, nothing is
//!   taken after the answer ended or after a violation, and every receipt
//!   the consumer countersigns is for exactly the tokens that arrived (count
//!   and digest), between the two parties, for the seeder's model, at its
//!   prices, with a prompt within the bound and credits within the
//!   request's cap; a finished answer counts the tokens that arrived.
#![no_main]

use hypha_engine::FinishReason as EngineFinish;
use hypha_fuzz::{flip_bytes, identities, stretch};
use hypha_ledger::{price, Receipt, TokenDigest};
use hypha_node::inference::receipts::{ConsumerReceipts, Party, SeederReceipts, Terms};
use hypha_node::inference::reply::{Bounds, ReplyCheck, Step, MAX_TOKEN_TEXT_BYTES};
use hypha_node::inference::RequestId;
use hypha_wire::{
    decode_frame, Accepted, Done, ErrorReply, FinishReason, FrameEncoder, Message, ReceiptOffer,
    Refusal, TokenChunk, ToolFormat,
};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const REQUEST: u64 = 7;
/// The time receipts are signed at (any Unix time in milliseconds).
const NOW_MS: u64 = 1_795_000_000_000;
/// Most frames in one answer.
const MAX_STEPS: usize = 160;
/// Most tokens in one honest chunk.
const MAX_CHUNK_TOKENS: usize = 4;

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(&stretch(data)));
});

/// The honest seeder's state.
struct Seeder {
    receipts: SeederReceipts,
    identity: hypha_node::identity::Identity,
    /// Tokens the honest answer has.
    total: u32,
    sent: u32,
    seq: u32,
    accepted: bool,
    prompt_offered: bool,
    done: bool,
    last_offered: bool,
    /// An interval offer is due.
    offer_due: bool,
    prompt_tokens: u32,
    text: String,
    /// The top logprobs the request asked for, which an honest seeder
    /// sends with every token.
    logprobs: Option<u8>,
    /// The request offered tools: `Accepted` names a tool format.
    tools: bool,
}

impl Seeder {
    /// The honest next frame, or `None` once the answer is complete.
    fn next(&mut self, u: &mut Unstructured) -> Result<Option<Message>> {
        if !self.accepted {
            self.accepted = true;
            return Ok(Some(Message::Accepted(Accepted {
                request_id: REQUEST,
                tool_format: self.tools.then_some(ToolFormat::Hermes),
            })));
        }
        if !self.prompt_offered {
            self.prompt_offered = true;
            return Ok(Some(Message::Receipt(self.receipts.offer(
                &self.identity,
                NOW_MS,
                false,
            ))));
        }
        if self.offer_due {
            self.offer_due = false;
            return Ok(Some(Message::Receipt(self.receipts.offer(
                &self.identity,
                NOW_MS,
                false,
            ))));
        }
        if self.sent < self.total {
            let n = u
                .int_in_range(1..=MAX_CHUNK_TOKENS)?
                .min((self.total - self.sent) as usize);
            let mut token_ids = Vec::with_capacity(n);
            for _ in 0..n {
                let t = u.arbitrary::<i32>()?;
                token_ids.push(t);
                if self.receipts.sent(t) != hypha_node::inference::receipts::Due::Nothing {
                    self.offer_due = true;
                }
            }
            self.sent += n as u32;
            let mut text: String = u.arbitrary()?;
            truncate(&mut text, n * MAX_TOKEN_TEXT_BYTES);
            // Each token brings some text.
            while text.len() < n {
                text.push('.');
            }
            self.text.push_str(&text);
            let seq = self.seq;
            self.seq += 1;
            let logprobs = match self.logprobs {
                None => Vec::new(),
                Some(top) => {
                    let entry = hypha_wire::TokenLogprob {
                        bytes: b"x".to_vec(),
                        logprob: -0.5,
                        top: vec![
                            hypha_wire::TopLogprob {
                                bytes: b"x".to_vec(),
                                logprob: -0.5,
                            };
                            usize::from(top)
                        ],
                    };
                    vec![entry; n]
                }
            };
            return Ok(Some(Message::Chunk(TokenChunk {
                request_id: REQUEST,
                seq,
                token_ids,
                text,
                logprobs,
            })));
        }
        if !self.done {
            self.done = true;
            return Ok(Some(Message::Done(Done {
                request_id: REQUEST,
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.total,
                finish_reason: FinishReason::Stop,
                text: String::new(),
                stop_sequence: None,
            })));
        }
        if !self.last_offered {
            self.last_offered = true;
            return Ok(Some(Message::Receipt(self.receipts.offer(
                &self.identity,
                NOW_MS,
                true,
            ))));
        }
        Ok(None)
    }
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
}

fn run(u: &mut Unstructured) -> Result<()> {
    let all = identities();
    let seeder_id = &all[0];
    let consumer_id = &all[1];
    let (seeder_node, consumer_node) = (seeder_id.node(), consumer_id.node());
    let (s_party, c_party) = (Party::of(&seeder_node), Party::of(&consumer_node));
    let terms = Terms {
        model_sha256: [u.arbitrary::<u8>()?; 32],
        price_prompt_micro: u.int_in_range(0..=10)?,
        price_completion_micro: u.int_in_range(0..=10)?,
    };
    let prompt_bound: u32 = u.int_in_range(1..=4096)?;
    let prompt_tokens = u.int_in_range(1..=prompt_bound)?;
    let max_tokens: u32 = u.int_in_range(1..=64)?;
    let total = u.int_in_range(0..=max_tokens)?;
    let interval = u.int_in_range(2..=16)?;
    let mut seeder = Seeder {
        receipts: SeederReceipts::new(
            RequestId(REQUEST),
            c_party,
            s_party,
            terms,
            prompt_tokens,
            interval,
            NOW_MS - 1_000,
        ),
        identity: seeder_node,
        total,
        sent: 0,
        seq: 0,
        accepted: false,
        prompt_offered: false,
        done: false,
        last_offered: false,
        offer_due: false,
        prompt_tokens,
        text: String::new(),
        logprobs: if u.arbitrary()? {
            Some(u.int_in_range(0..=3)?)
        } else {
            None
        },
        tools: u.arbitrary()?,
    };
    // A cap, when there is one, that the honest answer fits.
    let cap = if u.ratio(1, 4)? {
        let honest = price(
            prompt_tokens,
            total,
            terms.price_prompt_micro,
            terms.price_completion_micro,
        );
        Some(honest + u.int_in_range(0..=3)?)
    } else {
        None
    };
    let textless = u.int_in_range(0..=16)?;
    let consumer_receipts = ConsumerReceipts::new(
        RequestId(REQUEST),
        c_party,
        s_party,
        terms,
        prompt_bound,
        cap,
    );
    let bounds = Bounds {
        max_tokens,
        textless,
        stops: u.int_in_range(0..=4)?,
        logprobs: seeder.logprobs,
        tools: seeder.tools,
    };
    let mut check = ReplyCheck::new(RequestId(REQUEST), bounds, consumer_receipts);
    // The consumer's own record of what it took.
    let mut digest = TokenDigest::default();
    let mut client_text = String::new();
    let mut finished = None;
    let mut honest = true;
    let mut previous: Option<Vec<u8>> = None;
    for _ in 0..MAX_STEPS {
        let lie = u.ratio(1, 12)?;
        let frame = if lie {
            honest = false;
            match lie_frame(u, &mut seeder, previous.as_deref())? {
                Some(f) => f,
                None => continue,
            }
        } else {
            match seeder.next(u)? {
                Some(m) => encode(&m),
                None => break,
            }
        };
        let Ok((msg, _)) = decode_frame(&frame) else {
            assert!(!honest, "an honest frame decodes");
            break;
        };
        previous = Some(frame.clone());
        let was_over = finished.is_some();
        let before = check.tokens();
        let step = match check.frame(msg, &consumer_node) {
            Ok(s) => s,
            Err(e) => {
                assert!(!honest, "an honest answer broke off: {e}");
                assert!(e.is_violation(), "{e}");
                break;
            }
        };
        assert!(!was_over, "a frame was taken after the answer ended");
        assert!(check.tokens() <= max_tokens, "more tokens than asked for");
        assert!(
            check.text_bytes() <= check.tokens() as usize * MAX_TOKEN_TEXT_BYTES,
            "more text than the tokens carry"
        );
        assert!(
            check.tokens() as usize <= check.text_bytes() + textless as usize,
            "more tokens without text than allowed"
        );
        if let hypha_wire::ArchivedMessage::Chunk(c) = msg {
            for t in c.token_ids.iter() {
                digest.push(t.to_native());
            }
        }
        assert_eq!(check.tokens(), digest.count());
        if check.tokens() != before {
            assert!(matches!(step, Step::Token(..)));
        }
        match step {
            Step::Nothing => {}
            Step::Token(t, logprobs) => {
                // What reaches the client keeps to the request's bounds.
                match bounds.logprobs {
                    None => assert!(logprobs.is_empty()),
                    Some(top) => {
                        assert_eq!(logprobs.len() as u32, check.tokens() - before);
                        for lp in &logprobs {
                            assert!(lp.logprob.is_finite() && lp.top.len() <= usize::from(top));
                            assert!(lp.bytes.len() <= MAX_TOKEN_TEXT_BYTES);
                        }
                    }
                }
                client_text.push_str(&t);
            }
            Step::Countersign {
                countersign,
                finished: f,
            } => {
                let signed = check
                    .receipts()
                    .signed()
                    .expect("a countersigned receipt is kept")
                    .receipt()
                    .clone();
                assert!(
                    cap.is_none_or(|c| signed.credits <= c),
                    "a receipt over the cap was signed"
                );
                owed(
                    &signed,
                    &terms,
                    prompt_bound,
                    &digest,
                    seeder_id,
                    consumer_id,
                );
                assert_eq!(countersign.request_id, REQUEST);
                if honest {
                    seeder
                        .receipts
                        .countersigned(countersign.consumer_sig)
                        .expect("the seeder takes an honest consumer's countersignature");
                }
                if let Some((text, finish)) = f {
                    assert_eq!(finish.completion_tokens, check.tokens());
                    if let Some(i) = finish.stop_sequence {
                        assert!(i < bounds.stops as usize, "a stop string the request had");
                        assert_eq!(finish.reason, EngineFinish::Stop);
                    }
                    assert_eq!(signed.completion_tokens, check.tokens());
                    client_text.push_str(&text);
                    finished = Some(finish);
                }
            }
            Step::Refused(_, _) => {
                assert!(!honest, "an honest seeder refused");
                break;
            }
        }
    }
    if honest && seeder.last_offered {
        let finish = finished.expect("an honest answer finishes");
        assert_eq!(finish.completion_tokens, total);
        assert_eq!(finish.prompt_tokens, prompt_tokens);
        assert_eq!(finish.reason, EngineFinish::Stop);
        assert_eq!(
            client_text, seeder.text,
            "the client got every chunk's text"
        );
        let theirs = seeder
            .receipts
            .signed()
            .expect("the seeder holds the receipt");
        let ours = check
            .receipts()
            .signed()
            .expect("the consumer holds the receipt");
        assert_eq!(theirs.signed().to_bytes(), ours.signed().to_bytes());
        assert_eq!(ours.receipt().completion_tokens, total);
    }
    Ok(())
}

/// A countersigned receipt claims no more than was owed.
fn owed(
    r: &Receipt,
    terms: &Terms,
    prompt_bound: u32,
    digest: &TokenDigest,
    seeder: &hypha_fuzz::Identity,
    consumer: &hypha_fuzz::Identity,
) {
    assert_eq!(r.request_id, REQUEST);
    assert_eq!((r.seeder, r.consumer), (seeder.id, consumer.id));
    assert_eq!(r.model_sha256, terms.model_sha256);
    assert!(r.prompt_tokens <= prompt_bound);
    assert_eq!(r.completion_tokens, digest.count());
    assert_eq!(r.tokens_digest, digest.digest());
    assert_eq!(
        r.credits,
        price(
            r.prompt_tokens,
            r.completion_tokens,
            terms.price_prompt_micro,
            terms.price_completion_micro
        )
    );
}

fn encode(m: &Message) -> Vec<u8> {
    FrameEncoder::new()
        .encode(m)
        .map(<[u8]>::to_vec)
        .unwrap_or_default()
}

/// A frame an honest seeder would not send.
fn lie_frame(
    u: &mut Unstructured,
    seeder: &mut Seeder,
    previous: Option<&[u8]>,
) -> Result<Option<Vec<u8>>> {
    let id = if u.ratio(1, 8)? {
        u.arbitrary()?
    } else {
        REQUEST
    };
    let tokens = |u: &mut Unstructured, most: usize| -> Result<Vec<i32>> {
        let n = u.int_in_range(0..=most)?;
        (0..n).map(|_| u.arbitrary()).collect()
    };
    let msg = match u.int_in_range(0..=9)? {
        // The honest frame, swallowed.
        0 => {
            seeder.next(u)?;
            return Ok(None);
        }
        // The last frame again.
        1 => return Ok(previous.map(<[u8]>::to_vec)),
        2 => Message::Accepted(Accepted {
            request_id: id,
            tool_format: if u.arbitrary()? {
                Some(ToolFormat::Generic)
            } else {
                None
            },
        }),
        3 => Message::Chunk(TokenChunk {
            request_id: id,
            seq: if u.arbitrary()? {
                seeder.seq
            } else {
                u.arbitrary()?
            },
            token_ids: tokens(u, 80)?,
            text: {
                let mut t: String = u.arbitrary()?;
                if u.ratio(1, 4)? {
                    t = "x".repeat(u.int_in_range(0..=2 * MAX_TOKEN_TEXT_BYTES)?);
                }
                t
            },
            // Logprobs of any count, size and value, asked for or not.
            logprobs: if u.ratio(1, 4)? {
                let mut v = Vec::new();
                for _ in 0..u.int_in_range(0..=4)? {
                    let mut top = Vec::new();
                    for _ in 0..u.int_in_range(0..=4)? {
                        top.push(hypha_wire::TopLogprob {
                            bytes: u.arbitrary()?,
                            logprob: u.arbitrary()?,
                        });
                    }
                    v.push(hypha_wire::TokenLogprob {
                        bytes: u.arbitrary()?,
                        logprob: u.arbitrary()?,
                        top,
                    });
                }
                v
            } else {
                Vec::new()
            },
        }),
        4 => Message::Done(Done {
            request_id: id,
            prompt_tokens: u.arbitrary()?,
            completion_tokens: if u.arbitrary()? {
                seeder.sent
            } else {
                u.arbitrary()?
            },
            finish_reason: if u.arbitrary()? {
                FinishReason::Stop
            } else {
                FinishReason::Length
            },
            text: u.arbitrary()?,
            stop_sequence: u.arbitrary()?,
        }),
        5 => Message::Error(ErrorReply {
            request_id: id,
            refusal: Refusal::Busy,
            message: u.arbitrary()?,
        }),
        // A receipt of the seeder's, signed, for other terms.
        6 | 7 => {
            let mut r = Receipt {
                request_id: id,
                consumer: identities()[1].id,
                seeder: identities()[0].id,
                model_sha256: [u.arbitrary::<u8>()?; 32],
                prompt_tokens: u.arbitrary()?,
                completion_tokens: if u.arbitrary()? {
                    seeder.sent
                } else {
                    u.arbitrary()?
                },
                credits: u.arbitrary()?,
                started_ms: NOW_MS - 1_000,
                finished_ms: NOW_MS,
                tokens_digest: [u.arbitrary::<u8>()?; 32],
            };
            if u.arbitrary()? {
                r.consumer = u.choose(identities())?.id;
            }
            let signer = if u.ratio(3, 4)? {
                &identities()[0]
            } else {
                u.choose(identities())?
            };
            Message::Receipt(ReceiptOffer {
                request_id: id,
                receipt: r.to_bytes().to_vec(),
                seeder_sig: r.sign(&signer.key),
                last: u.arbitrary()?,
            })
        }
        // An honest frame, damaged.
        8 => {
            let Some(m) = seeder.next(u)? else {
                return Ok(None);
            };
            let mut bytes = encode(&m);
            flip_bytes(u, &mut bytes)?;
            return Ok(Some(bytes));
        }
        // Raw bytes.
        _ => {
            let n = u.int_in_range(0..=64)?;
            return Ok(Some(u.bytes(n)?.to_vec()));
        }
    };
    Ok(Some(encode(&msg)))
}
