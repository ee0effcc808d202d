//! Receipts as a consumer checks them, built from the input and genuinely
//! signed, then perhaps damaged: the paths behind signature checks that
//! `receipt_decoder`'s arbitrary bytes never reach.
//!
//! - A seeder's offer (`Message::Receipt`) survives the wire: its body
//!   reads back to the receipt signed, and with the consumer's
//!   countersignature it verifies.
//! - The offer's frame damaged anywhere: what still decodes verifies
//!   exactly when its body and the seeder's signature are unchanged.
//! - A doubly signed receipt (the 376 bytes the ledger and the DHT keep)
//!   with any of its bytes changed, body, keys or signatures, is unreadable
//!   or fails verification: none of it can be altered and still verify.
//! - `verify_batch` over genuine and damaged receipts succeeds exactly when
//!   each verifies alone, and then returns them in order.
#![no_main]

use hypha_fuzz::{flip_bytes, identities, seeded_receipt, stretch, Identity};
use hypha_ledger::{verify_batch, Receipt, SignedReceipt};
use hypha_wire::{decode_frame, ArchivedMessage, FrameEncoder, Message, ReceiptOffer};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// Receipts per input: enough for a batch to mix genuine and damaged ones.
const MAX_RECEIPTS: usize = 8;
/// The time receipts are drawn around (any Unix time in milliseconds).
const AROUND_MS: u64 = 1_795_000_000_000;

fuzz_target!(|data: &[u8]| {
    // Every run signs and verifies several receipts, so runs are slow and
    // inputs short for long: stretch them.
    let _ = run(&mut Unstructured::new(&stretch(data)));
});

fn run(u: &mut Unstructured) -> Result<()> {
    let n = u.int_in_range(1..=MAX_RECEIPTS)?;
    let mut batch = Vec::with_capacity(n);
    let mut verifies_alone = Vec::with_capacity(n);
    for _ in 0..n {
        let request_id = u64::from(u.arbitrary::<u8>()?);
        let genuine = seeded_receipt(u, request_id, AROUND_MS)?;
        check_offer(u, &genuine)?;
        let mut bytes = genuine.to_bytes();
        let changed =
            u.arbitrary::<bool>()? && flip_bytes(u, &mut bytes)? && bytes != genuine.to_bytes();
        let Ok(r) = SignedReceipt::from_bytes(&bytes) else {
            assert!(changed, "a genuine receipt reads back");
            continue;
        };
        assert_eq!(r.to_bytes(), bytes, "a receipt re-encodes to its bytes");
        let verifies = r.clone().verify().is_ok();
        assert_eq!(
            verifies, !changed,
            "a receipt verifies exactly when none of its bytes changed: {bytes:02x?}"
        );
        verifies_alone.push(verifies);
        batch.push(r);
    }
    match verify_batch(batch.clone()) {
        Ok(verified) => {
            assert!(verifies_alone.iter().all(|v| *v), "a batch hid a bad one");
            let back: Vec<SignedReceipt> = verified.iter().map(|v| v.signed().clone()).collect();
            assert_eq!(back, batch, "a batch keeps its receipts and their order");
        }
        Err(_) => assert!(
            verifies_alone.iter().any(|v| !*v),
            "a batch of good receipts was refused"
        ),
    }
    Ok(())
}

/// The consumer's side of an offer: the seeder sent `genuine`'s body and
/// signature in a frame, perhaps damaged on the way; the consumer knows
/// both keys from the hellos and countersigns the body it read. (The
/// node's other checks, against the tokens that arrived and the prices,
/// live in `node` and are not fuzzed here.)
fn check_offer(u: &mut Unstructured, genuine: &SignedReceipt) -> Result<()> {
    let offer = Message::Receipt(ReceiptOffer {
        request_id: genuine.receipt.request_id,
        receipt: genuine.receipt.to_bytes().to_vec(),
        seeder_sig: genuine.seeder_sig,
        last: u.arbitrary()?,
    });
    let mut frame = FrameEncoder::new()
        .encode(&offer)
        .expect("an offer encodes")
        .to_vec();
    let damaged = u.arbitrary::<bool>()? && flip_bytes(u, &mut frame)?;
    let Ok((ArchivedMessage::Receipt(o), _)) = decode_frame(&frame) else {
        assert!(damaged, "an offer's own frame decodes as an offer");
        return Ok(());
    };
    let Ok(body) = Receipt::from_bytes(o.receipt.as_slice()) else {
        assert!(damaged, "an offered body reads back");
        return Ok(());
    };
    let unchanged = body == genuine.receipt && o.seeder_sig == genuine.seeder_sig;
    assert!(
        damaged || unchanged,
        "an undamaged offer carries what was signed"
    );
    // The consumer is the one the receipt names: another key would fail
    // verification for a reason not under test.
    let consumer = identity_of(&genuine.consumer_key);
    let countersigned = SignedReceipt {
        consumer_sig: body.sign(&consumer.key),
        receipt: body,
        seeder_key: genuine.seeder_key,
        seeder_sig: o.seeder_sig,
        consumer_key: genuine.consumer_key,
    };
    assert_eq!(
        countersigned.verify().is_ok(),
        unchanged,
        "an offer verifies exactly when its body and signature are what the seeder signed"
    );
    Ok(())
}

/// The fixed identity whose public key is `public`: every receipt's
/// parties are drawn from them.
fn identity_of(public: &[u8; 32]) -> &'static Identity {
    identities()
        .iter()
        .find(|i| i.public == *public)
        .expect("receipts name only the fixed identities")
}
