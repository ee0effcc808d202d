//! Keys and receipts for the ledger's tests and benchmarks.
#![allow(dead_code)]

use ed25519_dalek::SigningKey;
use hypha_ledger::{node_id_of, Receipt, SignedReceipt, VerifiedReceipt};

pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A receipt from `consumer` to `seeder`, signed by both.
pub fn signed(
    seeder: &SigningKey,
    consumer: &SigningKey,
    request_id: u64,
    credits: u64,
) -> SignedReceipt {
    let receipt = Receipt {
        request_id,
        consumer: node_id_of(&consumer.verifying_key().to_bytes()),
        seeder: node_id_of(&seeder.verifying_key().to_bytes()),
        model_sha256: [7; 32],
        prompt_tokens: 30,
        completion_tokens: 100,
        credits,
        started_ms: 1_795_000_000_000,
        finished_ms: 1_795_000_001_000,
        tokens_digest: [9; 32],
    };
    signed_by(seeder, consumer, receipt)
}

/// `receipt` signed by both parties, unchecked.
pub fn signed_by(seeder: &SigningKey, consumer: &SigningKey, receipt: Receipt) -> SignedReceipt {
    SignedReceipt {
        seeder_sig: receipt.sign(seeder),
        consumer_sig: receipt.sign(consumer),
        seeder_key: seeder.verifying_key().to_bytes(),
        consumer_key: consumer.verifying_key().to_bytes(),
        receipt,
    }
}

pub fn verified(
    seeder: &SigningKey,
    consumer: &SigningKey,
    request_id: u64,
    credits: u64,
) -> VerifiedReceipt {
    signed(seeder, consumer, request_id, credits)
        .verify()
        .unwrap()
}

/// `receipt`, signed by both parties.
pub fn sign_both(seeder: &SigningKey, consumer: &SigningKey, receipt: Receipt) -> VerifiedReceipt {
    signed_by(seeder, consumer, receipt).verify().unwrap()
}
