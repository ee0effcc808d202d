//! Unpaid notices: a seeder's evidence that a consumer took tokens and left
//! their receipt unsigned, for other seeders to act on. Sans-IO: bytes and
//! keys in, a [`VerifiedNotice`] out; the caller supplies the time.
//!
//! A notice is the last receipt of a request that both parties signed and
//! the seeder's signed offer of a later receipt of the same request (the
//! very offer it sent, which the consumer never countersigned). The first
//! proves the consumer made the request at that seeder; the second is the
//! seeder's word for what went unpaid, on the request's own terms (same
//! model, prompt and start, no fewer credits). Its credits count nowhere
//! (no price is in a receipt to hold them to): a notice only names a
//! seeder that says it went unpaid. A later both-signed receipt of the
//! request that covers the offer voids the notice.
//!
//! One seeder's word alone must not shut a consumer out (a seeder could
//! claim any request it served went unpaid), so [`unpaid_seeders`] counts
//! the distinct seeders with live notices, and a node refuses a consumer
//! only when two or more do (`hypha_node`'s admission).

use std::collections::BTreeSet;

use ed25519_dalek::{Signature, VerifyingKey};
use hypha_wire::NodeId;

use crate::{
    LedgerError, Receipt, SignedReceipt, VerifiedReceipt, RECEIPT_BYTES, SIGNED_RECEIPT_BYTES,
};

/// Bytes of an encoded notice: the signed receipt, the offered receipt's
/// body and the seeder's signature over it.
pub const NOTICE_BYTES: usize = SIGNED_RECEIPT_BYTES + RECEIPT_BYTES + 64;

/// A notice as it travels; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The last receipt of the request both parties signed.
    pub paid: SignedReceipt,
    /// The seeder's later offer of the same request, never countersigned.
    pub offered: Receipt,
    pub seeder_sig: [u8; 64],
}

impl Notice {
    pub fn to_bytes(&self) -> [u8; NOTICE_BYTES] {
        let mut out = [0u8; NOTICE_BYTES];
        let (paid, rest) = out.split_at_mut(SIGNED_RECEIPT_BYTES);
        paid.copy_from_slice(&self.paid.to_bytes());
        let (offered, sig) = rest.split_at_mut(RECEIPT_BYTES);
        offered.copy_from_slice(&self.offered.to_bytes());
        sig.copy_from_slice(&self.seeder_sig);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, LedgerError> {
        if bytes.len() != NOTICE_BYTES {
            return Err(LedgerError::Malformed(format!(
                "a notice is {NOTICE_BYTES} bytes, not {}",
                bytes.len()
            )));
        }
        let (paid, rest) = bytes.split_at(SIGNED_RECEIPT_BYTES);
        let (offered, sig) = rest.split_at(RECEIPT_BYTES);
        let mut seeder_sig = [0u8; 64];
        seeder_sig.copy_from_slice(sig);
        Ok(Self {
            paid: SignedReceipt::from_bytes(paid)?,
            offered: Receipt::from_bytes(offered)?,
            seeder_sig,
        })
    }

    /// Checks the paid receipt's keys and signatures, that the offer is a
    /// later receipt of the same request on the same terms, and the
    /// seeder's signature over it.
    pub fn verify(self) -> Result<VerifiedNotice, LedgerError> {
        let (p, o) = (&self.paid.receipt, &self.offered);
        let same = p.request_id == o.request_id
            && p.consumer == o.consumer
            && p.seeder == o.seeder
            && p.model_sha256 == o.model_sha256
            && p.prompt_tokens == o.prompt_tokens
            && p.started_ms == o.started_ms;
        if !same {
            return Err(LedgerError::Malformed(
                "a notice's offer is not of the request its receipt paid".into(),
            ));
        }
        if o.completion_tokens <= p.completion_tokens
            || o.credits < p.credits
            || o.finished_ms < p.finished_ms
        {
            return Err(LedgerError::Malformed(
                "a notice's offer covers nothing beyond its paid receipt".into(),
            ));
        }
        let request_id = o.request_id;
        let key = VerifyingKey::from_bytes(&self.paid.seeder_key)
            .map_err(|_| LedgerError::BadSignature { request_id })?;
        key.verify_strict(&o.to_bytes(), &Signature::from_bytes(&self.seeder_sig))
            .map_err(|_| LedgerError::BadSignature { request_id })?;
        let paid = self.paid.verify()?;
        Ok(VerifiedNotice {
            paid,
            offered: self.offered,
            seeder_sig: self.seeder_sig,
        })
    }
}

/// A notice whose signatures and terms were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedNotice {
    paid: VerifiedReceipt,
    offered: Receipt,
    seeder_sig: [u8; 64],
}

impl VerifiedNotice {
    pub fn consumer(&self) -> NodeId {
        self.offered.consumer
    }

    pub fn seeder(&self) -> NodeId {
        self.offered.seeder
    }

    pub fn request_id(&self) -> u64 {
        self.offered.request_id
    }

    /// When the unpaid offer was made, by the seeder's clock.
    pub fn at_ms(&self) -> u64 {
        self.offered.finished_ms
    }

    /// Completion tokens sent beyond the paid receipt.
    pub fn unpaid_tokens(&self) -> u32 {
        self.offered
            .completion_tokens
            .saturating_sub(self.paid.receipt().completion_tokens)
    }

    pub fn paid(&self) -> &VerifiedReceipt {
        &self.paid
    }

    pub fn offered(&self) -> &Receipt {
        &self.offered
    }

    /// The notice as it travels.
    pub fn notice(&self) -> Notice {
        Notice {
            paid: self.paid.signed().clone(),
            offered: self.offered.clone(),
            seeder_sig: self.seeder_sig,
        }
    }

    /// True when `r`, signed by both, pays for the offer: the consumer
    /// settled what the notice says it left unpaid.
    pub fn voided_by(&self, r: &Receipt) -> bool {
        let o = &self.offered;
        r.consumer == o.consumer
            && r.seeder == o.seeder
            && r.request_id == o.request_id
            && r.completion_tokens >= o.completion_tokens
    }
}

/// The distinct seeders whose notices against a consumer were made at or
/// after `since_ms` and are not voided by any of its both-signed
/// `receipts`.
pub fn unpaid_seeders(
    notices: &[VerifiedNotice],
    receipts: &[VerifiedReceipt],
    since_ms: u64,
) -> BTreeSet<NodeId> {
    notices
        .iter()
        .filter(|n| n.at_ms() >= since_ms)
        .filter(|n| !receipts.iter().any(|r| n.voided_by(r.receipt())))
        .map(VerifiedNotice::seeder)
        .collect()
}
