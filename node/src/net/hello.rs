//! The signed `Hello` that opens every peer connection.
//!
//! The QUIC handshake already proves which key the peer holds; the hello
//! binds what the peer claims (protocol version, capabilities, models) to
//! that same key with a signature, so a claim can be shown to others and
//! checked later without trusting whoever relays it.

use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use hypha_wire::{ArchivedHello, Hello, NodeId, PROTOCOL_VERSION};

use crate::identity::{node_id_of, Identity};

/// At most this many model names in one hello.
pub const MAX_HELLO_MODELS: usize = 64;
/// A model name longer than this is refused.
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// Why a peer's hello was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HelloError {
    #[error("peer speaks protocol version {got}, this node {PROTOCOL_VERSION}")]
    Version { got: u32 },
    #[error("hello key belongs to {claimed}, but the connection is with {actual}")]
    WrongKey { claimed: NodeId, actual: NodeId },
    #[error("hello signature does not verify")]
    BadSignature,
    #[error("hello lists too many or too long model names")]
    TooLarge,
    #[error("the peer's identity carries {bits} bits of proof of work; {required} are required")]
    NoProofOfWork { bits: u32, required: u32 },
}

/// What a node offers in its hello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offer {
    pub capabilities: u64,
    /// The served model's names (its id and aliases).
    pub models: Vec<String>,
    pub model_sha256: [u8; 32],
    /// Tokens one request to the model may hold; 0 with no model.
    pub context_length: u32,
    pub price_prompt_micro: u64,
    pub price_completion_micro: u64,
}

/// A hello whose signature and key were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedHello {
    pub node_id: NodeId,
    pub public_key: [u8; 32],
    pub offer: Offer,
}

/// Builds this node's signed hello.
pub fn sign_hello(identity: &Identity, offer: Offer) -> Hello {
    let mut hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        public_key: identity.public_key(),
        capabilities: offer.capabilities,
        models: offer.models,
        model_sha256: offer.model_sha256,
        context_length: offer.context_length,
        price_prompt_micro: offer.price_prompt_micro,
        price_completion_micro: offer.price_completion_micro,
        signature: [0; 64],
    };
    hello.signature = identity
        .signing_key()
        .sign(&hello.signed_bytes())
        .to_bytes();
    hello
}

/// Checks that a peer's identity cost at least `required` bits of work.
pub fn check_pow(peer: &NodeId, required: u32) -> Result<(), HelloError> {
    let bits = hypha_ledger::pow_bits(peer);
    if bits >= required {
        Ok(())
    } else {
        Err(HelloError::NoProofOfWork { bits, required })
    }
}

/// Checks a received hello against the peer the connection authenticated.
pub fn verify_hello(hello: &ArchivedHello, peer: NodeId) -> Result<VerifiedHello, HelloError> {
    let version = hello.protocol_version.to_native();
    if version != PROTOCOL_VERSION {
        return Err(HelloError::Version { got: version });
    }
    if hello.models.len() > MAX_HELLO_MODELS
        || hello.models.iter().any(|m| m.len() > MAX_MODEL_NAME_BYTES)
    {
        return Err(HelloError::TooLarge);
    }
    let claimed = node_id_of(&hello.public_key);
    if claimed != peer {
        return Err(HelloError::WrongKey {
            claimed,
            actual: peer,
        });
    }
    let owned = Hello {
        protocol_version: version,
        public_key: hello.public_key,
        capabilities: hello.capabilities.to_native(),
        models: hello.models.iter().map(|m| m.as_str().to_owned()).collect(),
        model_sha256: hello.model_sha256,
        context_length: hello.context_length.to_native(),
        price_prompt_micro: hello.price_prompt_micro.to_native(),
        price_completion_micro: hello.price_completion_micro.to_native(),
        signature: hello.signature,
    };
    let key = VerifyingKey::from_bytes(&owned.public_key).map_err(|_| HelloError::BadSignature)?;
    key.verify(
        &owned.signed_bytes(),
        &Signature::from_bytes(&owned.signature),
    )
    .map_err(|_| HelloError::BadSignature)?;
    Ok(VerifiedHello {
        node_id: claimed,
        public_key: owned.public_key,
        offer: Offer {
            capabilities: owned.capabilities,
            models: owned.models,
            model_sha256: owned.model_sha256,
            context_length: owned.context_length,
            price_prompt_micro: owned.price_prompt_micro,
            price_completion_micro: owned.price_completion_micro,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypha_wire::{decode_frame, ArchivedMessage, FrameEncoder, Message, CAP_SEEDER};

    fn roundtrip(hello: &Hello, peer: NodeId) -> Result<VerifiedHello, HelloError> {
        let frame = FrameEncoder::new()
            .encode(&Message::Hello(hello.clone()))
            .unwrap()
            .to_vec();
        match decode_frame(&frame).unwrap().0 {
            ArchivedMessage::Hello(h) => verify_hello(h, peer),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn signed_hello_verifies_and_tampering_is_caught() {
        let me = Identity::from_seed([7; 32]);
        let offer = Offer {
            capabilities: CAP_SEEDER,
            models: vec!["m".into()],
            model_sha256: [3; 32],
            context_length: 2048,
            price_prompt_micro: 1,
            price_completion_micro: 4,
        };
        let hello = sign_hello(&me, offer.clone());
        let ok = roundtrip(&hello, me.id()).unwrap();
        assert_eq!(ok.offer, offer);
        assert_eq!(ok.public_key, me.public_key());

        let mut forged = hello.clone();
        forged.models.push("claimed-but-not-signed".into());
        assert_eq!(roundtrip(&forged, me.id()), Err(HelloError::BadSignature));
        let mut cheaper = hello.clone();
        cheaper.price_completion_micro = 0;
        assert_eq!(roundtrip(&cheaper, me.id()), Err(HelloError::BadSignature));
        let mut longer = hello.clone();
        longer.context_length = 1 << 20;
        assert_eq!(roundtrip(&longer, me.id()), Err(HelloError::BadSignature));

        let other = Identity::from_seed([8; 32]);
        assert!(matches!(
            roundtrip(&hello, other.id()),
            Err(HelloError::WrongKey { .. })
        ));

        let mut old = hello.clone();
        old.protocol_version = 0;
        assert_eq!(
            roundtrip(&old, me.id()),
            Err(HelloError::Version { got: 0 })
        );

        let many = sign_hello(
            &me,
            Offer {
                models: vec!["x".into(); MAX_HELLO_MODELS + 1],
                ..Offer::default()
            },
        );
        assert_eq!(roundtrip(&many, me.id()), Err(HelloError::TooLarge));
    }
}
