//! Receipts: what a seeder served a consumer, in a fixed byte layout that
//! both sign. Sans-IO: signing and verification take keys and bytes only.
//!
//! A [`Receipt`] is encoded to [`RECEIPT_BYTES`] bytes with a domain tag;
//! the seeder signs those bytes, the consumer checks them against what it
//! received and countersigns the same bytes. A [`SignedReceipt`] carries both
//! public keys and signatures; [`VerifiedReceipt`] can only be built by
//! checking that each key hashes to the id the receipt names and that both
//! signatures hold.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hypha_wire::NodeId;

use crate::LedgerError;

/// Domain tag at the start of every receipt's bytes.
const TAG: &[u8; 16] = b"hypha-receipt-1\0";
/// Bytes of an encoded receipt body.
pub const RECEIPT_BYTES: usize = 16 + 8 + 32 + 32 + 32 + 4 + 4 + 8 + 8 + 8 + 32;
/// Bytes of a receipt with both keys and signatures.
pub const SIGNED_RECEIPT_BYTES: usize = RECEIPT_BYTES + 2 * (32 + 64);

/// What one request cost: the terms both parties sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Chosen by the consumer; unique per consumer.
    pub request_id: u64,
    pub consumer: NodeId,
    pub seeder: NodeId,
    /// SHA-256 of the GGUF file that served the request.
    pub model_sha256: [u8; 32],
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Micro-credits moved from the consumer to the seeder.
    pub credits: u64,
    /// Unix milliseconds, by the seeder's clock.
    pub started_ms: u64,
    pub finished_ms: u64,
    /// SHA-256 over the emitted token ids (little-endian `i32` each).
    pub tokens_digest: [u8; 32],
}

/// Identifies a receipt for replay checks: one per (consumer, request id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReceiptKey {
    pub consumer: NodeId,
    pub request_id: u64,
}

impl Receipt {
    /// The canonical bytes both parties sign.
    pub fn to_bytes(&self) -> [u8; RECEIPT_BYTES] {
        let mut out = [0u8; RECEIPT_BYTES];
        let mut w = Writer {
            buf: &mut out,
            at: 0,
        };
        w.put(TAG);
        w.put(&self.request_id.to_le_bytes());
        w.put(&self.consumer.0);
        w.put(&self.seeder.0);
        w.put(&self.model_sha256);
        w.put(&self.prompt_tokens.to_le_bytes());
        w.put(&self.completion_tokens.to_le_bytes());
        w.put(&self.credits.to_le_bytes());
        w.put(&self.started_ms.to_le_bytes());
        w.put(&self.finished_ms.to_le_bytes());
        w.put(&self.tokens_digest);
        debug_assert_eq!(w.at, RECEIPT_BYTES);
        out
    }

    /// Reads receipt bytes; anything but a well-formed body is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, LedgerError> {
        if bytes.len() != RECEIPT_BYTES {
            return Err(LedgerError::Malformed(format!(
                "a receipt is {RECEIPT_BYTES} bytes, not {}",
                bytes.len()
            )));
        }
        let mut r = Reader { buf: bytes, at: 0 };
        if r.take::<16>()? != *TAG {
            return Err(LedgerError::Malformed("not a hypha receipt".into()));
        }
        let receipt = Self {
            request_id: u64::from_le_bytes(r.take()?),
            consumer: NodeId(r.take()?),
            seeder: NodeId(r.take()?),
            model_sha256: r.take()?,
            prompt_tokens: u32::from_le_bytes(r.take()?),
            completion_tokens: u32::from_le_bytes(r.take()?),
            credits: u64::from_le_bytes(r.take()?),
            started_ms: u64::from_le_bytes(r.take()?),
            finished_ms: u64::from_le_bytes(r.take()?),
            tokens_digest: r.take()?,
        };
        if receipt.finished_ms < receipt.started_ms {
            return Err(LedgerError::Malformed(
                "a receipt cannot finish before it starts".into(),
            ));
        }
        Ok(receipt)
    }

    pub fn key(&self) -> ReceiptKey {
        ReceiptKey {
            consumer: self.consumer,
            request_id: self.request_id,
        }
    }

    /// The seeder's signature over this receipt.
    pub fn sign(&self, key: &SigningKey) -> [u8; 64] {
        key.sign(&self.to_bytes()).to_bytes()
    }
}

/// Micro-credits for a request at the seeder's published prices.
pub fn price(
    prompt_tokens: u32,
    completion_tokens: u32,
    micro_per_prompt_token: u64,
    micro_per_completion_token: u64,
) -> u64 {
    u64::from(prompt_tokens)
        .saturating_mul(micro_per_prompt_token)
        .saturating_add(u64::from(completion_tokens).saturating_mul(micro_per_completion_token))
}

/// A receipt with both parties' keys and signatures, checked or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedReceipt {
    pub receipt: Receipt,
    pub seeder_key: [u8; 32],
    pub seeder_sig: [u8; 64],
    pub consumer_key: [u8; 32],
    pub consumer_sig: [u8; 64],
}

impl SignedReceipt {
    pub fn to_bytes(&self) -> [u8; SIGNED_RECEIPT_BYTES] {
        let mut out = [0u8; SIGNED_RECEIPT_BYTES];
        let mut w = Writer {
            buf: &mut out,
            at: 0,
        };
        w.put(&self.receipt.to_bytes());
        w.put(&self.seeder_key);
        w.put(&self.seeder_sig);
        w.put(&self.consumer_key);
        w.put(&self.consumer_sig);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, LedgerError> {
        if bytes.len() != SIGNED_RECEIPT_BYTES {
            return Err(LedgerError::Malformed(format!(
                "a signed receipt is {SIGNED_RECEIPT_BYTES} bytes, not {}",
                bytes.len()
            )));
        }
        let (body, rest) = bytes.split_at(RECEIPT_BYTES);
        let mut r = Reader { buf: rest, at: 0 };
        Ok(Self {
            receipt: Receipt::from_bytes(body)?,
            seeder_key: r.take()?,
            seeder_sig: r.take()?,
            consumer_key: r.take()?,
            consumer_sig: r.take()?,
        })
    }

    /// Checks both keys against the ids the receipt names and both
    /// signatures.
    pub fn verify(self) -> Result<VerifiedReceipt, LedgerError> {
        let (msgs, sigs, keys) = self.parts()?;
        for ((m, s), k) in msgs.iter().zip(&sigs).zip(&keys) {
            // Strict: no small-order keys or malleable signatures.
            k.verify_strict(m, s)
                .map_err(|_| LedgerError::BadSignature {
                    request_id: self.receipt.request_id,
                })?;
        }
        Ok(VerifiedReceipt(self))
    }

    fn parts(&self) -> Result<Parts, LedgerError> {
        let r = &self.receipt;
        // The same rules as decoding, so whatever verifies can be read back.
        if r.finished_ms < r.started_ms {
            return Err(LedgerError::Malformed(
                "a receipt cannot finish before it starts".into(),
            ));
        }
        check_id(&self.seeder_key, r.seeder, "seeder")?;
        check_id(&self.consumer_key, r.consumer, "consumer")?;
        let bad = || LedgerError::BadSignature {
            request_id: r.request_id,
        };
        let body = r.to_bytes();
        let keys = [
            VerifyingKey::from_bytes(&self.seeder_key).map_err(|_| bad())?,
            VerifyingKey::from_bytes(&self.consumer_key).map_err(|_| bad())?,
        ];
        let sigs = [
            Signature::from_bytes(&self.seeder_sig),
            Signature::from_bytes(&self.consumer_sig),
        ];
        Ok(([body, body], sigs, keys))
    }
}

/// What the two signatures of one receipt check: messages, signatures, keys.
type Parts = ([[u8; RECEIPT_BYTES]; 2], [Signature; 2], [VerifyingKey; 2]);

fn check_id(key: &[u8; 32], id: NodeId, role: &'static str) -> Result<(), LedgerError> {
    if crate::node_id_of(key) == id {
        Ok(())
    } else {
        Err(LedgerError::WrongKey { role })
    }
}

/// Verifies many receipts at once (ed25519 batch verification: about twice
/// as fast per signature as one by one). On failure, falls back to one by
/// one to name the bad receipt.
pub fn verify_batch(receipts: Vec<SignedReceipt>) -> Result<Vec<VerifiedReceipt>, LedgerError> {
    let mut bodies = Vec::with_capacity(receipts.len() * 2);
    let mut sigs = Vec::with_capacity(receipts.len() * 2);
    let mut keys = Vec::with_capacity(receipts.len() * 2);
    for r in &receipts {
        let (m, s, k) = r.parts()?;
        bodies.extend(m);
        sigs.extend(s);
        keys.extend(k);
    }
    let msgs: Vec<&[u8]> = bodies.iter().map(|b| b.as_slice()).collect();
    if ed25519_dalek::verify_batch(&msgs, &sigs, &keys).is_ok() {
        return Ok(receipts.into_iter().map(VerifiedReceipt).collect());
    }
    receipts.into_iter().map(SignedReceipt::verify).collect()
}

/// A receipt whose keys and both signatures were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedReceipt(SignedReceipt);

impl VerifiedReceipt {
    pub fn signed(&self) -> &SignedReceipt {
        &self.0
    }

    pub fn receipt(&self) -> &Receipt {
        &self.0.receipt
    }
}

/// SHA-256 over emitted token ids, fed as they stream; cheap to read at any
/// point for a cumulative receipt.
#[derive(Clone)]
pub struct TokenDigest {
    ctx: ring::digest::Context,
    count: u32,
}

impl Default for TokenDigest {
    fn default() -> Self {
        Self {
            ctx: ring::digest::Context::new(&ring::digest::SHA256),
            count: 0,
        }
    }
}

impl TokenDigest {
    pub fn push(&mut self, token: i32) {
        self.ctx.update(&token.to_le_bytes());
        self.count = self.count.saturating_add(1);
    }

    /// Tokens pushed so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The digest of the tokens so far.
    pub fn digest(&self) -> [u8; 32] {
        let d = self.ctx.clone().finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.at + bytes.len();
        self.buf
            .get_mut(self.at..end)
            .expect("receipt layouts are fixed at compile time")
            .copy_from_slice(bytes);
        self.at = end;
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], LedgerError> {
        let bytes = self
            .buf
            .get(self.at..self.at + N)
            .ok_or_else(|| LedgerError::Malformed("receipt cut short".into()))?;
        self.at += N;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }
}
