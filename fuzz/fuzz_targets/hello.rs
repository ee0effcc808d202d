//! The hello that opens every peer connection, as the node checks it
//! (`hypha_node::net::hello::verify_hello`).
//!
//! - Arbitrary bytes as the first frame: whatever is accepted is bound to
//!   the connection's peer (the id of the key it names) and within the
//!   hello's limits (model names, their lengths).
//! - A hello genuinely signed by an identity the input picks, with an
//!   offer drawn from the input (models, prices, capabilities), framed and
//!   perhaps damaged: it is accepted exactly when it is unchanged and
//!   within the limits, checked against its signer; what is accepted says
//!   exactly what was signed; against any other peer it is refused.
//! - The proof-of-work check agrees with the identity's known work.
#![no_main]

use hypha_fuzz::{flip_bytes, identities, identity, stretch};
use hypha_ledger::DEFAULT_POW_BITS;
use hypha_node::net::hello::{
    check_pow, sign_hello, verify_hello, HelloError, Offer, MAX_HELLO_MODELS, MAX_MODEL_NAME_BYTES,
};
use hypha_wire::{decode_frame, ArchivedMessage, FrameEncoder, Message, NodeId};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// Model names drawn: a few past the limit.
const MOST_MODELS: usize = MAX_HELLO_MODELS + 2;
/// Longest model name drawn: a few bytes past the limit.
const LONGEST_NAME: usize = MAX_MODEL_NAME_BYTES + 4;

fuzz_target!(|data: &[u8]| {
    raw(data);
    let _ = signed(&mut Unstructured::new(&stretch(data)));
});

/// A peer's first frame, straight from the input.
fn raw(data: &[u8]) {
    let Ok((ArchivedMessage::Hello(h), _)) = decode_frame(data) else {
        return;
    };
    let claimed = hypha_node::identity::node_id_of(&h.public_key);
    for peer in [claimed, NodeId([0x5a; 32])] {
        if let Ok(v) = verify_hello(h, peer) {
            assert_eq!(v.node_id, peer, "a hello is bound to its connection's peer");
            assert_eq!(v.public_key, h.public_key);
            assert!(v.offer.models.len() <= MAX_HELLO_MODELS);
            assert!(v
                .offer
                .models
                .iter()
                .all(|m| m.len() <= MAX_MODEL_NAME_BYTES));
        }
    }
}

fn offer(u: &mut Unstructured) -> Result<Offer> {
    let n = if u.ratio(1, 16)? {
        u.int_in_range(0..=MOST_MODELS)?
    } else {
        u.int_in_range(0..=3)?
    };
    let mut models = Vec::with_capacity(n);
    for _ in 0..n {
        let len = if u.ratio(1, 16)? {
            u.int_in_range(0..=LONGEST_NAME)?
        } else {
            u.int_in_range(0..=12)?
        };
        models.push(
            (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect(),
        );
    }
    if let Some(first) = models.first_mut() {
        *first = u.arbitrary::<String>()?;
    }
    Ok(Offer {
        capabilities: u.arbitrary()?,
        models,
        model_sha256: [u.arbitrary::<u8>()?; 32],
        context_length: u.arbitrary()?,
        price_prompt_micro: u.arbitrary()?,
        price_completion_micro: u.arbitrary()?,
    })
}

fn signed(u: &mut Unstructured) -> Result<()> {
    let who = identity(u)?;
    let node = who.node();
    let required = if u.arbitrary()? { DEFAULT_POW_BITS } else { 0 };
    assert_eq!(
        check_pow(&who.id, required).is_ok(),
        who.pow || required == 0,
        "proof of work is judged by the identity's id"
    );
    let offer = offer(u)?;
    let within = offer.models.len() <= MAX_HELLO_MODELS
        && offer.models.iter().all(|m| m.len() <= MAX_MODEL_NAME_BYTES);
    let hello = sign_hello(&node, offer.clone());
    let mut encoder = FrameEncoder::new();
    let Ok(frame) = encoder.encode(&Message::Hello(hello)) else {
        // Too large for a frame: a node could not send it.
        return Ok(());
    };
    let genuine = frame.to_vec();
    let mut bytes = genuine.clone();
    let damaged = u.arbitrary::<bool>()? && flip_bytes(u, &mut bytes)? && bytes != genuine;
    let decoded = decode_frame(&bytes);
    let h = match decoded {
        Ok((ArchivedMessage::Hello(h), _)) => h,
        Ok(_) | Err(_) => {
            assert!(damaged, "a genuine hello decodes");
            return Ok(());
        }
    };
    match verify_hello(h, who.id) {
        Ok(v) => {
            assert!(within, "a hello past the limits was accepted");
            assert_eq!(v.offer, offer, "an accepted hello says what was signed");
            assert_eq!(v.public_key, who.public);
        }
        Err(e) => {
            assert!(
                damaged || (!within && e == HelloError::TooLarge),
                "a genuine hello was refused: {e}"
            );
        }
    }
    // The same hello on another peer's connection.
    let other = u.choose(identities())?;
    if other.id != who.id {
        assert!(
            verify_hello(h, other.id).is_err(),
            "a hello was accepted on another peer's connection"
        );
    }
    Ok(())
}
