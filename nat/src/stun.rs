//! STUN (RFC 8489) binding requests and responses, and telling STUN from
//! QUIC on one UDP port.
//!
//! A STUN message starts with two zero bits and carries the magic cookie at
//! bytes 4..8; every QUIC packet has its second bit (the fixed bit, RFC 9000
//! 17.2/17.3) set. So a datagram whose first byte is below 0x40 and that
//! carries the cookie is STUN, anything else goes to QUIC.

use std::net::SocketAddr;

use stun_rs::attributes::stun::{Software, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::{
    MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessageBuilder, TransactionId,
};

use crate::NatError;

/// The STUN magic cookie (RFC 8489 section 5).
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
/// The fixed header of every STUN message.
pub const HEADER_BYTES: usize = 20;
/// Largest STUN message hypha sends or reads: a binding message with an
/// address and a short software name is far smaller.
pub const MAX_STUN_BYTES: usize = 548;
/// What a node names itself in its requests: 20 bytes, so a request is
/// as long as the longest answer (an IPv6 address), and a node that
/// answers only requests at least as long as its answer amplifies nothing.
const SOFTWARE: &str = "hypha stun probe 1.0";
const _: () = assert!(SOFTWARE.len() == 20);
/// The longest binding response this module writes: the header and an
/// IPv6 XOR-MAPPED-ADDRESS.
pub const MAX_RESPONSE_BYTES: usize = HEADER_BYTES + 4 + 20;

/// True when `packet` is a STUN message rather than QUIC.
pub fn is_stun(packet: &[u8]) -> bool {
    packet.len() >= HEADER_BYTES
        && packet.first().is_some_and(|b| b & 0xc0 == 0)
        && packet.get(4..8) == Some(&MAGIC_COOKIE[..])
}

/// A STUN message hypha understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Someone asks how we see their address.
    Request { txid: [u8; 12] },
    /// The answer to one of our requests: how the peer sees us.
    Response { txid: [u8; 12], mapped: SocketAddr },
}

/// A binding request with `txid`.
pub fn binding_request(txid: [u8; 12]) -> Result<Vec<u8>, NatError> {
    let software = Software::new(SOFTWARE).map_err(|e| NatError::Encode(e.to_string()))?;
    let msg = StunMessageBuilder::new(BINDING, MessageClass::Request)
        .with_transaction_id(TransactionId::from(txid))
        .with_attribute(software)
        .build();
    encode(&msg)
}

/// The success response to request `txid`: the requester's address as we
/// saw it, and nothing else (at most [`MAX_RESPONSE_BYTES`]).
pub fn binding_response(txid: [u8; 12], mapped: SocketAddr) -> Result<Vec<u8>, NatError> {
    let msg = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
        .with_transaction_id(TransactionId::from(txid))
        .with_attribute(XorMappedAddress::from(mapped))
        .build();
    encode(&msg)
}

fn encode(msg: &stun_rs::StunMessage) -> Result<Vec<u8>, NatError> {
    let mut buf = vec![0u8; MAX_STUN_BYTES];
    let n = MessageEncoderBuilder::default()
        .build()
        .encode(&mut buf, msg)
        .map_err(|e| NatError::Encode(e.to_string()))?;
    buf.truncate(n);
    Ok(buf)
}

/// Reads a binding request or success response; anything else, or bytes
/// that are not STUN at all, is an error (never a panic).
pub fn decode(packet: &[u8]) -> Result<Message, NatError> {
    if !is_stun(packet) {
        return Err(NatError::NotStun);
    }
    if packet.len() > MAX_STUN_BYTES {
        return Err(NatError::Malformed(format!(
            "{} bytes, over the {MAX_STUN_BYTES}-byte limit",
            packet.len()
        )));
    }
    let (msg, _) = MessageDecoderBuilder::default()
        .build()
        .decode(packet)
        .map_err(|e| NatError::Malformed(e.to_string()))?;
    if msg.method() != BINDING {
        return Err(NatError::Unexpected("a method other than binding"));
    }
    let txid = *msg.transaction_id().as_bytes();
    match msg.class() {
        MessageClass::Request => Ok(Message::Request { txid }),
        MessageClass::SuccessResponse => {
            let mapped = msg
                .get::<XorMappedAddress>()
                .and_then(|a| a.as_xor_mapped_address().ok())
                .map(|a| *a.socket_address())
                .ok_or(NatError::Unexpected(
                    "a response without XOR-MAPPED-ADDRESS",
                ))?;
            Ok(Message::Response { txid, mapped })
        }
        _ => Err(NatError::Unexpected("an indication or error response")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_as_long_as_any_answer_to_it() {
        let req = binding_request([7; 12]).unwrap();
        for mapped in ["198.18.0.1:9", "[2a00:1:2:3:4:5:6:7]:65535"] {
            let resp = binding_response([7; 12], mapped.parse().unwrap()).unwrap();
            assert!(resp.len() <= MAX_RESPONSE_BYTES, "{}", resp.len());
            assert!(resp.len() <= req.len(), "{} > {}", resp.len(), req.len());
        }
        assert_eq!(decode(&req).unwrap(), Message::Request { txid: [7; 12] });
    }
}
