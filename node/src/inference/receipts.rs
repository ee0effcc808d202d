//! The receipt protocol, both halves, as plain state machines: no sockets,
//! no clock, no ledger. The QUIC code drives them ([`crate::inference::serve`]
//! for the seeder, [`crate::inference::remote`] for the consumer) and does
//! the waiting and the writing.
//!
//! Message flow on one request stream, after `Accepted`:
//!
//! ```text
//! seeder                                   consumer
//!   Chunk 0 .. Chunk k-1  ------------->   each token id folds into a digest
//!   Receipt (k tokens, signed) -------->   checked against what arrived
//!                          <------------   Countersign
//!   Chunk k ..                              (may cross the next chunks)
//!   Done, Receipt (last, all tokens) --->  checked, also against Done
//!                          <------------   Countersign
//! ```
//!
//! The seeder offers a cumulative receipt every `step` tokens, `step` being
//! half the receipt interval, and a last one after `Done`. Before each
//! interval offer every earlier one must be countersigned ([`Due`]), so the
//! consumer's signature may lag half an interval without stalling the
//! stream and at most one interval of tokens is ever sent beyond the last
//! receipt both signed. A countersignature may settle any offer still
//! outstanding (the interval's and the last one can cross); it settles that
//! one and every older one. The consumer countersigns only what it
//! received: the request and both parties, the model hash and prices of
//! the seeder's hello, a prompt within what its text can cost, the count
//! and digest of the token ids that arrived, and for the last receipt the
//! prompt tokens `Done` reported; anything else is a [`ReceiptError`].

use hypha_ledger::{price, Notice, Receipt, SignedReceipt, TokenDigest, VerifiedReceipt};
use hypha_wire::{NodeId, ReceiptOffer};

use crate::identity::Identity;
use crate::inference::RequestId;
pub use crate::net::proto::ReceiptError;

/// What a request costs and for which model: the seeder's signed hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    pub model_sha256: [u8; 32],
    pub price_prompt_micro: u64,
    pub price_completion_micro: u64,
}

/// The completion tokens a request may bring within the consumer's cap of
/// `max_credits`, given its prompt: at most `max_tokens` (no limit when
/// `None`); `Err` with the prompt's cost when the prompt alone, or the
/// prompt and one token, cost more than the cap.
pub fn within_budget(
    terms: &Terms,
    prompt_tokens: u32,
    max_tokens: Option<u32>,
    max_credits: Option<u64>,
) -> Result<Option<u32>, u64> {
    let Some(cap) = max_credits else {
        return Ok(max_tokens);
    };
    let prompt = price(prompt_tokens, 0, terms.price_prompt_micro, 0);
    let left = cap.checked_sub(prompt).ok_or(prompt)?;
    let affordable = match left.checked_div(terms.price_completion_micro) {
        Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
        // Free tokens: only max_tokens bounds them.
        None => return Ok(max_tokens),
    };
    if affordable == 0 {
        return Err(prompt);
    }
    Ok(Some(max_tokens.map_or(affordable, |m| m.min(affordable))))
}

/// A party to a receipt: its id and public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Party {
    pub id: NodeId,
    pub key: [u8; 32],
}

impl Party {
    pub fn of(identity: &Identity) -> Self {
        Self {
            id: identity.id(),
            key: identity.public_key(),
        }
    }
}

/// What the seeder must do after sending a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Go on streaming.
    Nothing,
    /// Offer a receipt for every token so far ([`SeederReceipts::offer`]).
    Offer,
    /// Wait for the earlier receipt's countersignature, then offer: more
    /// tokens would put more than an interval beyond the last one signed.
    Countersign,
}

/// Micro-credits per prompt token a seeder charges by default.
pub const DEFAULT_PRICE_PROMPT_MICRO: u64 = 1;
/// Micro-credits per generated token by default: generating costs a full
/// decode step per token, a prompt token a fraction of one.
pub const DEFAULT_PRICE_COMPLETION_MICRO: u64 = 4;

/// Offers at most outstanding at once: an interval's receipt still
/// travelling when the last one is offered.
const MAX_PENDING: usize = 2;

/// The seeder's half: tokens sent, offers made, countersignatures taken.
pub struct SeederReceipts {
    request_id: RequestId,
    consumer: Party,
    seeder: Party,
    terms: Terms,
    prompt_tokens: u32,
    started_ms: u64,
    /// Tokens between two offers: half the receipt interval.
    step: u32,
    digest: TokenDigest,
    /// Offered and not yet countersigned, oldest first.
    pending: Vec<(Receipt, [u8; 64])>,
    /// The latest receipt both signed.
    signed: Option<VerifiedReceipt>,
}

impl SeederReceipts {
    /// The receipts of request `request_id` from `consumer`, whose prompt
    /// took `prompt_tokens`, started at `started_ms`; an offer every half
    /// `interval` tokens.
    pub fn new(
        request_id: RequestId,
        consumer: Party,
        seeder: Party,
        terms: Terms,
        prompt_tokens: u32,
        interval: u32,
        started_ms: u64,
    ) -> Self {
        Self {
            request_id,
            consumer,
            seeder,
            terms,
            prompt_tokens,
            started_ms,
            step: (interval / 2).max(1),
            digest: TokenDigest::default(),
            pending: Vec::with_capacity(MAX_PENDING),
            signed: None,
        }
    }

    pub fn request_id(&self) -> RequestId {
        self.request_id
    }

    /// Tokens sent so far.
    pub fn tokens(&self) -> u32 {
        self.digest.count()
    }

    /// One token went out: what is due before the next.
    pub fn sent(&mut self, token: i32) -> Due {
        self.digest.push(token);
        if !self.digest.count().is_multiple_of(self.step) {
            Due::Nothing
        } else if self.settled() {
            Due::Offer
        } else {
            Due::Countersign
        }
    }

    /// A cumulative receipt for every token sent so far, signed by
    /// `seeder` at `now_ms`; `last` after `Done`.
    pub fn offer(&mut self, seeder: &Identity, now_ms: u64, last: bool) -> ReceiptOffer {
        debug_assert_eq!(seeder.id(), self.seeder.id);
        let completion = self.digest.count();
        let receipt = Receipt {
            request_id: self.request_id.0,
            consumer: self.consumer.id,
            seeder: self.seeder.id,
            model_sha256: self.terms.model_sha256,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: completion,
            credits: price(
                self.prompt_tokens,
                completion,
                self.terms.price_prompt_micro,
                self.terms.price_completion_micro,
            ),
            started_ms: self.started_ms,
            finished_ms: now_ms.max(self.started_ms),
            tokens_digest: self.digest.digest(),
        };
        let sig = receipt.sign(seeder.signing_key());
        let offer = ReceiptOffer {
            request_id: self.request_id.0,
            receipt: receipt.to_bytes().to_vec(),
            seeder_sig: sig,
            last,
        };
        if self.pending.len() >= MAX_PENDING {
            // The oldest can only be settled together with a newer one now.
            self.pending.remove(0);
        }
        self.pending.push((receipt, sig));
        offer
    }

    /// Takes the consumer's signature over one of the outstanding offers
    /// (countersignatures arrive in offer order; one for an older receipt
    /// may cross the offer of a newer one).
    pub fn countersigned(&mut self, consumer_sig: [u8; 64]) -> Result<(), ReceiptError> {
        if self.pending.is_empty() {
            return Err(ReceiptError::NoneOffered);
        }
        for (i, (receipt, seeder_sig)) in self.pending.iter().enumerate() {
            let signed = SignedReceipt {
                receipt: receipt.clone(),
                seeder_key: self.seeder.key,
                seeder_sig: *seeder_sig,
                consumer_key: self.consumer.key,
                consumer_sig,
            };
            if let Ok(checked) = signed.verify() {
                self.signed = Some(checked);
                // It and every older offer are settled.
                self.pending.drain(..=i);
                return Ok(());
            }
        }
        Err(ReceiptError::MatchesNoOffer)
    }

    /// True when every offered receipt came back signed.
    pub fn settled(&self) -> bool {
        self.pending.is_empty()
    }

    /// The latest receipt both signed.
    pub fn signed(&self) -> Option<&VerifiedReceipt> {
        self.signed.as_ref()
    }

    /// Evidence that the consumer left the newest offer unsigned: the
    /// latest receipt both signed and that offer (`hypha_ledger::Notice`).
    /// `None` when every offer was settled or none ever was.
    pub fn unpaid_notice(&self) -> Option<Notice> {
        let paid = self.signed.as_ref()?;
        let (offered, seeder_sig) = self.pending.last()?;
        Some(Notice {
            paid: paid.signed().clone(),
            offered: offered.clone(),
            seeder_sig: *seeder_sig,
        })
    }

    pub fn into_signed(self) -> Option<VerifiedReceipt> {
        self.signed
    }
}

/// The consumer's half: chunks received, offers checked and countersigned.
pub struct ConsumerReceipts {
    request_id: RequestId,
    consumer: Party,
    seeder: Party,
    terms: Terms,
    /// The most prompt tokens the request's prompt can honestly take.
    prompt_bound: u32,
    /// The request's cap in micro-credits, when it has one.
    max_credits: Option<u64>,
    /// Every token id received, in order.
    digest: TokenDigest,
    /// The latest receipt both signed.
    signed: Option<VerifiedReceipt>,
}

impl ConsumerReceipts {
    pub fn new(
        request_id: RequestId,
        consumer: Party,
        seeder: Party,
        terms: Terms,
        prompt_bound: u32,
        max_credits: Option<u64>,
    ) -> Self {
        Self {
            request_id,
            consumer,
            seeder,
            terms,
            prompt_bound,
            max_credits,
            digest: TokenDigest::default(),
            signed: None,
        }
    }

    /// A token id that arrived in a chunk.
    pub fn received(&mut self, token: i32) {
        self.digest.push(token);
    }

    /// Tokens received so far.
    pub fn tokens(&self) -> u32 {
        self.digest.count()
    }

    /// Checks an offered receipt against what arrived and, when it holds,
    /// countersigns it as `consumer`: the signature to send back. `done`
    /// is the prompt tokens `Done` reported, once it arrived.
    pub fn check_offer(
        &mut self,
        consumer: &Identity,
        receipt: &[u8],
        seeder_sig: [u8; 64],
        last: bool,
        done: Option<u32>,
    ) -> Result<[u8; 64], ReceiptError> {
        debug_assert_eq!(consumer.id(), self.consumer.id);
        let r = Receipt::from_bytes(receipt).map_err(|e| ReceiptError::Malformed(e.to_string()))?;
        if r.request_id != self.request_id.0
            || r.consumer != self.consumer.id
            || r.seeder != self.seeder.id
        {
            return Err(ReceiptError::WrongParties);
        }
        if r.model_sha256 != self.terms.model_sha256 {
            return Err(ReceiptError::WrongModel);
        }
        if r.prompt_tokens > self.prompt_bound {
            return Err(ReceiptError::PromptOverBound {
                billed: r.prompt_tokens,
                bound: self.prompt_bound,
            });
        }
        if r.completion_tokens != self.digest.count() {
            return Err(ReceiptError::WrongCount {
                claimed: r.completion_tokens,
                arrived: self.digest.count(),
            });
        }
        if r.tokens_digest != self.digest.digest() {
            return Err(ReceiptError::WrongDigest);
        }
        let want = price(
            r.prompt_tokens,
            r.completion_tokens,
            self.terms.price_prompt_micro,
            self.terms.price_completion_micro,
        );
        if r.credits != want {
            return Err(ReceiptError::WrongPrice {
                charged: r.credits,
                want,
            });
        }
        if let Some(cap) = self.max_credits.filter(|&cap| r.credits > cap) {
            return Err(ReceiptError::OverCap {
                charged: r.credits,
                cap,
            });
        }
        if let Some(prev) = &self.signed {
            let prev = prev.receipt();
            if prev.prompt_tokens != r.prompt_tokens || prev.started_ms != r.started_ms {
                return Err(ReceiptError::ChangedTerms);
            }
        }
        if last {
            match done {
                Some(p) if p == r.prompt_tokens => {}
                Some(_) => return Err(ReceiptError::PromptDiffersFromDone),
                None => return Err(ReceiptError::LastBeforeDone),
            }
        }
        let consumer_sig = r.sign(consumer.signing_key());
        // Checks the seeder's key against its id and its signature (ours
        // holds by construction).
        let verified = SignedReceipt {
            receipt: r,
            seeder_key: self.seeder.key,
            seeder_sig,
            consumer_key: self.consumer.key,
            consumer_sig,
        }
        .verify()
        .map_err(|e| ReceiptError::BadSignature(e.to_string()))?;
        self.signed = Some(verified);
        Ok(consumer_sig)
    }

    /// The latest receipt both signed.
    pub fn signed(&self) -> Option<&VerifiedReceipt> {
        self.signed.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERMS: Terms = Terms {
        model_sha256: [9; 32],
        price_prompt_micro: 1,
        price_completion_micro: 4,
    };
    const PROMPT: u32 = 12;

    struct Pair {
        seeder_id: Identity,
        consumer_id: Identity,
        seeder: SeederReceipts,
        consumer: ConsumerReceipts,
    }

    fn pair(interval: u32) -> Pair {
        let seeder_id = Identity::from_seed([1; 32]);
        let consumer_id = Identity::from_seed([2; 32]);
        let (s, c) = (Party::of(&seeder_id), Party::of(&consumer_id));
        Pair {
            seeder: SeederReceipts::new(RequestId(7), c, s, TERMS, PROMPT, interval, 1_000),
            consumer: ConsumerReceipts::new(RequestId(7), c, s, TERMS, 100, None),
            seeder_id,
            consumer_id,
        }
    }

    impl Pair {
        /// Sends one token over the (in-memory) stream.
        fn token(&mut self, t: i32) -> Due {
            self.consumer.received(t);
            self.seeder.sent(t)
        }

        fn offer(&mut self, last: bool) -> ReceiptOffer {
            self.seeder.offer(&self.seeder_id, 2_000, last)
        }

        fn sign(&mut self, o: &ReceiptOffer, done: Option<u32>) -> Result<[u8; 64], ReceiptError> {
            self.consumer
                .check_offer(&self.consumer_id, &o.receipt, o.seeder_sig, o.last, done)
        }
    }

    #[test]
    fn a_normal_stream_settles_every_offer_and_both_keep_the_same_receipt() {
        let mut p = pair(8);
        let mut offers = 0;
        for t in 0..10 {
            match p.token(t) {
                Due::Nothing => {}
                Due::Offer => {
                    let o = p.offer(false);
                    let sig = p.sign(&o, None).unwrap();
                    p.seeder.countersigned(sig).unwrap();
                    offers += 1;
                }
                Due::Countersign => panic!("every offer was signed at once"),
            }
        }
        assert_eq!(offers, 2, "an offer every half interval (4 tokens)");
        let last = p.offer(true);
        let sig = p.sign(&last, Some(PROMPT)).unwrap();
        p.seeder.countersigned(sig).unwrap();
        assert!(p.seeder.settled());
        let (s, c) = (p.seeder.signed().unwrap(), p.consumer.signed().unwrap());
        assert_eq!(s.signed(), c.signed());
        assert_eq!(s.receipt().completion_tokens, 10);
        assert_eq!(s.receipt().credits, u64::from(PROMPT) + 4 * 10);
    }

    #[test]
    fn crossing_countersignatures_settle_in_offer_order() {
        let mut p = pair(8);
        for t in 0..4 {
            assert_eq!(p.token(t), if t == 3 { Due::Offer } else { Due::Nothing });
        }
        let first = p.offer(false);
        let first_sig = p.sign(&first, None).unwrap();
        // The generation ends before the first countersignature arrives.
        p.token(4);
        p.token(5);
        let last = p.offer(true);
        assert!(!p.seeder.settled());
        p.seeder.countersigned(first_sig).unwrap();
        assert!(!p.seeder.settled(), "the last offer is still out");
        assert_eq!(p.seeder.signed().unwrap().receipt().completion_tokens, 4);
        let last_sig = p.sign(&last, Some(PROMPT)).unwrap();
        p.seeder.countersigned(last_sig).unwrap();
        assert!(p.seeder.settled());
        assert_eq!(p.seeder.signed().unwrap().receipt().completion_tokens, 6);

        // A signature over the newer offer settles the older one with it.
        let mut p = pair(8);
        for t in 0..4 {
            p.token(t);
        }
        let _unsigned = p.offer(false);
        p.token(4);
        let last = p.offer(true);
        let sig = p.sign(&last, Some(PROMPT)).unwrap();
        p.seeder.countersigned(sig).unwrap();
        assert!(p.seeder.settled());
    }

    #[test]
    fn a_dropped_stream_leaves_both_with_the_last_receipt_both_signed() {
        let mut p = pair(8);
        for t in 0..6 {
            if p.token(t) == Due::Offer {
                let o = p.offer(false);
                let sig = p.sign(&o, None).unwrap();
                p.seeder.countersigned(sig).unwrap();
            }
        }
        // The stream is cut after 6 tokens: 4 are paid for on both sides.
        let (s, c) = (
            p.seeder.into_signed().unwrap(),
            p.consumer.signed().unwrap(),
        );
        assert_eq!(&s, c);
        assert_eq!(s.receipt().completion_tokens, 4);
    }

    #[test]
    fn a_consumer_that_stops_signing_gets_at_most_one_interval() {
        let interval = 8;
        let mut p = pair(interval);
        let mut sent = 0;
        loop {
            sent += 1;
            match p.token(sent) {
                Due::Nothing => {}
                Due::Offer => {
                    // Offered, never countersigned.
                    p.offer(false);
                }
                Due::Countersign => break,
            }
        }
        assert!(p.seeder.signed().is_none());
        assert_eq!(sent as u32, interval, "the stream halts one interval in");
        assert_eq!(
            p.seeder.countersigned([0; 64]),
            Err(ReceiptError::MatchesNoOffer)
        );
        let mut fresh = pair(interval);
        assert_eq!(
            fresh.seeder.countersigned([0; 64]),
            Err(ReceiptError::NoneOffered)
        );
    }

    #[test]
    fn the_prompt_is_paid_for_before_the_first_token() {
        let mut p = pair(8);
        // The prompt's receipt: no tokens yet, the prompt's price.
        let prompt = p.offer(false);
        let sig = p.sign(&prompt, None).unwrap();
        p.seeder.countersigned(sig).unwrap();
        let r = p.seeder.signed().unwrap().receipt().clone();
        assert_eq!((r.completion_tokens, r.credits), (0, u64::from(PROMPT)));
        // Then the stream runs as ever, an offer every half interval.
        for t in 0..4 {
            assert_eq!(p.token(t), if t == 3 { Due::Offer } else { Due::Nothing });
        }
        let o = p.offer(false);
        let sig = p.sign(&o, None).unwrap();
        p.seeder.countersigned(sig).unwrap();
        assert_eq!(p.seeder.signed().unwrap().receipt().completion_tokens, 4);
        // Unsigned, the prompt's receipt holds the first token back
        // (serve waits for it), and settles with the next signature.
        let mut q = pair(8);
        let _unsigned = q.offer(false);
        assert!(!q.seeder.settled());
        for t in 0..4 {
            q.token(t);
        }
        let o = q.offer(false);
        let sig = q.sign(&o, None).unwrap();
        q.seeder.countersigned(sig).unwrap();
        assert!(q.seeder.settled(), "one signature settles both");
    }

    #[test]
    fn a_cap_in_credits_bounds_the_tokens_and_refuses_a_costly_prompt() {
        // 12 prompt tokens at 1, completions at 4.
        assert_eq!(
            within_budget(&TERMS, PROMPT, Some(100), None),
            Ok(Some(100))
        );
        assert_eq!(within_budget(&TERMS, PROMPT, None, None), Ok(None));
        // 12 + 4 * 7 = 40 fits a cap of 43; an eighth token would not.
        assert_eq!(
            within_budget(&TERMS, PROMPT, Some(100), Some(43)),
            Ok(Some(7))
        );
        assert_eq!(within_budget(&TERMS, PROMPT, None, Some(43)), Ok(Some(7)));
        assert_eq!(
            within_budget(&TERMS, PROMPT, Some(3), Some(43)),
            Ok(Some(3))
        );
        // The prompt alone, or with one token, over the cap.
        assert_eq!(within_budget(&TERMS, PROMPT, Some(100), Some(11)), Err(12));
        assert_eq!(within_budget(&TERMS, PROMPT, Some(100), Some(15)), Err(12));
        assert_eq!(
            within_budget(&TERMS, PROMPT, Some(100), Some(16)),
            Ok(Some(1))
        );
        let free = Terms {
            price_completion_micro: 0,
            ..TERMS
        };
        assert_eq!(within_budget(&free, PROMPT, Some(9), Some(12)), Ok(Some(9)));

        // The consumer never signs above its cap.
        let seeder_id = Identity::from_seed([1; 32]);
        let consumer_id = Identity::from_seed([2; 32]);
        let (s, c) = (Party::of(&seeder_id), Party::of(&consumer_id));
        let mut capped = Pair {
            seeder: SeederReceipts::new(RequestId(7), c, s, TERMS, PROMPT, 64, 1_000),
            consumer: ConsumerReceipts::new(RequestId(7), c, s, TERMS, 100, Some(23)),
            seeder_id,
            consumer_id,
        };
        for t in 0..3 {
            capped.token(t);
        }
        // 12 + 4 * 3 = 24 > 23.
        let o = capped.offer(false);
        assert_eq!(
            capped.sign(&o, None),
            Err(ReceiptError::OverCap {
                charged: 24,
                cap: 23
            })
        );
        assert!(capped.consumer.signed().is_none());
    }

    /// A receipt the seeder signs for whatever it likes.
    fn forged(p: &Pair, edit: impl FnOnce(&mut Receipt)) -> ReceiptOffer {
        let mut digest = TokenDigest::default();
        for t in 0..3 {
            digest.push(t);
        }
        let mut r = Receipt {
            request_id: 7,
            consumer: p.consumer_id.id(),
            seeder: p.seeder_id.id(),
            model_sha256: TERMS.model_sha256,
            prompt_tokens: PROMPT,
            completion_tokens: 3,
            credits: u64::from(PROMPT) + 12,
            started_ms: 1_000,
            finished_ms: 2_000,
            tokens_digest: digest.digest(),
        };
        edit(&mut r);
        ReceiptOffer {
            request_id: 7,
            receipt: r.to_bytes().to_vec(),
            seeder_sig: r.sign(p.seeder_id.signing_key()),
            last: false,
        }
    }

    #[test]
    fn a_lying_seeder_is_caught() {
        let mut p = pair(64);
        for t in 0..3 {
            p.consumer.received(t);
        }
        let honest = forged(&p, |_| {});
        let cases: Vec<(ReceiptOffer, ReceiptError)> = vec![
            (
                forged(&p, |r| {
                    r.completion_tokens = 4;
                    r.credits += 4;
                }),
                ReceiptError::WrongCount {
                    claimed: 4,
                    arrived: 3,
                },
            ),
            (
                forged(&p, |r| r.tokens_digest = [0; 32]),
                ReceiptError::WrongDigest,
            ),
            (
                forged(&p, |r| r.credits += 1),
                ReceiptError::WrongPrice {
                    charged: u64::from(PROMPT) + 13,
                    want: u64::from(PROMPT) + 12,
                },
            ),
            (
                forged(&p, |r| r.model_sha256 = [0; 32]),
                ReceiptError::WrongModel,
            ),
            (forged(&p, |r| r.request_id = 8), ReceiptError::WrongParties),
            (
                forged(&p, |r| {
                    r.prompt_tokens = 101;
                    r.credits = 101 + 12;
                }),
                ReceiptError::PromptOverBound {
                    billed: 101,
                    bound: 100,
                },
            ),
            (
                ReceiptOffer {
                    seeder_sig: [0; 64],
                    ..honest.clone()
                },
                ReceiptError::BadSignature("signature does not verify".into()),
            ),
            (
                ReceiptOffer {
                    last: true,
                    ..honest.clone()
                },
                ReceiptError::LastBeforeDone,
            ),
        ];
        for (offer, want) in cases {
            let got = p.sign(&offer, None);
            match (&got, &want) {
                (Err(ReceiptError::BadSignature(_)), ReceiptError::BadSignature(_)) => {}
                _ => assert_eq!(got, Err(want.clone())),
            }
            assert!(p.consumer.signed().is_none(), "nothing refused is kept");
        }
        assert_eq!(
            ReceiptError::WrongCount {
                claimed: 2,
                arrived: 1
            }
            .to_string(),
            "receipt refused: it claims 2 tokens, 1 arrived"
        );
        // The honest receipt is signed; a later one may not change its
        // prompt, and the last one must agree with Done.
        p.sign(&honest, None).unwrap();
        let changed = forged(&p, |r| {
            r.prompt_tokens = PROMPT - 1;
            r.credits -= 1;
        });
        assert_eq!(p.sign(&changed, None), Err(ReceiptError::ChangedTerms));
        let last = ReceiptOffer {
            last: true,
            ..honest
        };
        assert_eq!(
            p.sign(&last, Some(PROMPT + 1)),
            Err(ReceiptError::PromptDiffersFromDone)
        );
        assert!(p.sign(&last, Some(PROMPT)).is_ok());
    }
}
