//! Arbitrary datagrams offered to the STUN side of the QUIC port never
//! panic the decoder or the prober; whatever decodes as a request is
//! answered with a response that decodes back to the same transaction.
#![no_main]

use hypha_nat::stun::{binding_response, decode, is_stun, Message};
use hypha_nat::Prober;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let stun = is_stun(data);
    match decode(data) {
        Ok(Message::Request { txid }) => {
            assert!(stun);
            let from = "198.18.0.2:4000".parse().unwrap();
            let resp = binding_response(txid, from).unwrap();
            assert_eq!(
                decode(&resp).unwrap(),
                Message::Response { txid, mapped: from }
            );
        }
        Ok(Message::Response { .. }) => assert!(stun),
        Err(_) => {}
    }
    let mut p = Prober::new("10.0.0.1:1".parse().unwrap(), 7);
    let _ = p.handle_response("198.18.0.1:2".parse().unwrap(), data, 0);
});
