//! Arbitrary bytes offered as a receipt or an unpaid notice never panic
//! the decoder; whatever decodes encodes back to the same bytes, and
//! verification of it fails cleanly (nobody holds the keys it names).
#![no_main]

use hypha_ledger::{Notice, Receipt, SignedReceipt, RECEIPT_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Receipt::from_bytes(data) {
        assert_eq!(r.to_bytes().as_slice(), data);
    }
    if let Ok(s) = SignedReceipt::from_bytes(data) {
        assert_eq!(s.to_bytes().as_slice(), data);
        let _ = s.verify();
    }
    if let Ok(n) = Notice::from_bytes(data) {
        assert_eq!(n.to_bytes().as_slice(), data);
        let _ = n.verify();
    }
    // A valid body with arbitrary tail bytes as keys and signatures.
    if data.len() >= RECEIPT_BYTES {
        let _ = Receipt::from_bytes(&data[..RECEIPT_BYTES]);
    }
});
