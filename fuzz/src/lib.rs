//! Input builders the fuzz targets share: a fixed set of identities, some
//! carrying the network's proof of work and some not, and doubly signed
//! receipts drawn from fuzz input through `arbitrary::Unstructured`.
//!
//! Arbitrary bytes never pass a signature or a SHA-256 check, so a target
//! fed only raw bytes stops at the first such check. Targets build part of
//! their input from these helpers (genuinely signed, then perhaps damaged)
//! to reach the code behind those checks.

use std::sync::OnceLock;

use ed25519_dalek::SigningKey;
use hypha_ledger::{node_id_of, pow_bits, Receipt, SignedReceipt, DEFAULT_POW_BITS};
use hypha_wire::NodeId;
use libfuzzer_sys::arbitrary::{Result, Unstructured};

/// Seeds whose keys' ids carry at least [`DEFAULT_POW_BITS`] of proof of
/// work, ground once offline (about 2^16 keys each, too slow to grind per
/// fuzz process). `(tag, n)` stands for the 32-byte Ed25519 seed
/// `[tag, n as u64 little-endian, 0...]`.
const POW_SEEDS: [(u8, u64); 5] = [(1, 16725), (2, 95094), (3, 7715), (4, 48396), (5, 5748)];
/// Identities without proof of work: their records are refused by nodes
/// running the default configuration.
const N_CHEAP_IDENTITIES: u8 = 3;
/// The first seed byte of the cheap identities (`[tag; 32]`).
const CHEAP_SEED_TAG: u8 = 0xc0;
/// Most bytes one [`flip_bytes`] call changes.
pub const MAX_FLIPS: usize = 4;

/// A node's identity: its signing key, public key and id.
pub struct Identity {
    pub key: SigningKey,
    pub public: [u8; 32],
    pub id: NodeId,
    /// True when the id carries [`DEFAULT_POW_BITS`] of proof of work.
    pub pow: bool,
}

impl Identity {
    /// The same identity as the node holds it.
    pub fn node(&self) -> hypha_node::identity::Identity {
        hypha_node::identity::Identity::from_seed(self.key.to_bytes())
    }

    fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let public = key.verifying_key().to_bytes();
        let id = node_id_of(&public);
        let pow = pow_bits(&id) >= DEFAULT_POW_BITS;
        Self {
            key,
            public,
            id,
            pow,
        }
    }
}

/// Every identity the targets sign with: those with proof of work first.
pub fn identities() -> &'static [Identity] {
    static ALL: OnceLock<Vec<Identity>> = OnceLock::new();
    ALL.get_or_init(|| {
        let mut all = Vec::new();
        for (tag, n) in POW_SEEDS {
            let mut seed = [0u8; 32];
            seed[0] = tag;
            seed[1..9].copy_from_slice(&n.to_le_bytes());
            let who = Identity::from_seed(seed);
            assert!(
                who.pow,
                "seed ({tag}, {n}) lacks {DEFAULT_POW_BITS} bits of proof of work: \
                 grind POW_SEEDS again for the new difficulty"
            );
            all.push(who);
        }
        for i in 0..N_CHEAP_IDENTITIES {
            let who = Identity::from_seed([CHEAP_SEED_TAG + i; 32]);
            assert!(!who.pow, "a cheap identity happens to carry proof of work");
            all.push(who);
        }
        all
    })
}

/// One identity, chosen by the input.
pub fn identity(u: &mut Unstructured) -> Result<&'static Identity> {
    u.choose(identities())
}

/// The time span a receipt's start and finish are drawn from, around the
/// time the caller names: wide enough for receipts that finish further in
/// the future than the DHT's clock skew allows.
pub const RECEIPT_SPAN_MS: u64 = 30 * 60 * 1000;

/// A receipt between two identities chosen by the input: see
/// [`receipt_between`].
pub fn signed_receipt(
    u: &mut Unstructured,
    request_id: u64,
    around_ms: u64,
) -> Result<SignedReceipt> {
    let seeder = identity(u)?;
    let consumer = identity(u)?;
    receipt_between(u, seeder, consumer, request_id, around_ms)
}

/// Bytes of made-up input behind one [`seeded_receipt`]: more than
/// [`signed_receipt`] reads.
const SEEDED_RECEIPT_BYTES: usize = 64;

/// Like [`signed_receipt`], but its parties and terms come from a 2-byte
/// seed read from the input (and `request_id`): for targets where a
/// receipt's content matters little, so that short inputs still make many
/// different receipts.
pub fn seeded_receipt(
    u: &mut Unstructured,
    request_id: u64,
    around_ms: u64,
) -> Result<SignedReceipt> {
    let seed = u64::from(u.arbitrary::<u16>()?);
    // xorshift64*, seeded away from zero.
    let mut x = (seed << 32 | (request_id & 0xffff_ffff)) | 1;
    let mut bytes = [0u8; SEEDED_RECEIPT_BYTES];
    for chunk in bytes.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        chunk.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    signed_receipt(&mut Unstructured::new(&bytes), request_id, around_ms)
}

/// A receipt from `consumer` to `seeder` for `request_id`, its terms drawn
/// from the input, started up to [`RECEIPT_SPAN_MS`] before `around_ms`
/// and finished up to as long after its start; both parties sign it.
pub fn receipt_between(
    u: &mut Unstructured,
    seeder: &Identity,
    consumer: &Identity,
    request_id: u64,
    around_ms: u64,
) -> Result<SignedReceipt> {
    let started_ms = around_ms.saturating_sub(u.int_in_range(0..=RECEIPT_SPAN_MS)?);
    let receipt = Receipt {
        request_id,
        consumer: consumer.id,
        seeder: seeder.id,
        model_sha256: [u.arbitrary::<u8>()?; 32],
        prompt_tokens: u.arbitrary()?,
        completion_tokens: u.arbitrary()?,
        credits: u.arbitrary()?,
        started_ms,
        finished_ms: started_ms.saturating_add(u.int_in_range(0..=RECEIPT_SPAN_MS)?),
        tokens_digest: [u.arbitrary::<u8>()?; 32],
    };
    Ok(SignedReceipt {
        seeder_sig: receipt.sign(&seeder.key),
        consumer_sig: receipt.sign(&consumer.key),
        seeder_key: seeder.public,
        consumer_key: consumer.public,
        receipt,
    })
}

/// Bytes [`stretch`] appends.
pub const STRETCH_BYTES: usize = 256;

/// The input followed by [`STRETCH_BYTES`] derived from it (xorshift64*
/// seeded with its FNV-1a hash). libFuzzer lets inputs grow with the number
/// of runs, so a target whose runs are slow sees short inputs for a long
/// time, and a short input would stop every later choice at its lower
/// bound. The input still decides the first choices, where mutations stay
/// meaningful; the stretch makes the rest varied and repeatable.
pub fn stretch(data: &[u8]) -> Vec<u8> {
    let mut x = data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    }) | 1;
    let mut out = Vec::with_capacity(data.len() + STRETCH_BYTES);
    out.extend_from_slice(data);
    while out.len() < data.len() + STRETCH_BYTES {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out
}

/// Changes between one and [`MAX_FLIPS`] bytes of `bytes` (each XORed with
/// a non-zero mask) at positions the input picks; false when `bytes` is
/// empty and nothing changed. Two flips may hit one byte and cancel out,
/// so callers that need a change compare the bytes afterwards.
pub fn flip_bytes(u: &mut Unstructured, bytes: &mut [u8]) -> Result<bool> {
    if bytes.is_empty() {
        return Ok(false);
    }
    let n = u.int_in_range(1..=MAX_FLIPS)?;
    for _ in 0..n {
        let at = u.choose_index(bytes.len())?;
        let mask = u.int_in_range(1..=u8::MAX)?;
        bytes[at] ^= mask;
    }
    Ok(true)
}
