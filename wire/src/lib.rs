//! Mycelium's wire protocol: the messages peers exchange, framed for QUIC
//! streams.
//!
//! Sans-IO: this crate turns messages into bytes and bytes into checked
//! messages; it never touches a socket, a clock or a random source.
//!
//! A frame is a little-endian `u32` payload length followed by the payload,
//! an rkyv archive of one [`Message`]. A reader checks the length against
//! [`MAX_FRAME_BYTES`] before anything else, then validates the archive
//! (bytecheck) and reads it in place. Not enough bytes yet is
//! [`WireError::Incomplete`], which means "read more"; every other error
//! means the peer sent garbage and the stream must be closed.
//!
//! Message flow on one bidirectional stream per request: the consumer sends
//! `Request`; the seeder answers with `Chunk`s (sequence numbers from 0) and
//! ends with `Done` or `Error`; the consumer may send `Cancel` at any time.
//! The seeder's first answer frame is `Accepted` (or `Error`).
//! `Hello` opens every connection, once in each direction. A DHT request
//! takes a stream of its own: one `Dht` frame out, one `DhtReply` back.
//! A relayed path opens with `RelayConnect` / `RelayIncoming` and their
//! `RelayReply`, then carries the two ends' QUIC packets, each behind a
//! `u16` length ([`packet`]).
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

mod frame;
mod id;
mod msg;
pub mod packet;

pub use frame::{decode_frame, FrameDecoder, FrameEncoder, FRAME_HEADER_BYTES};
pub use id::{BadNodeId, NodeId};
pub use msg::*;
pub use packet::{encode_packet, PacketDecoder, MAX_RELAYED_PACKET, PACKET_HEADER_BYTES};

/// QUIC ALPN of this protocol version.
pub const ALPN: &[u8] = b"hypha/1";
/// Protocol version carried in `Hello`; a peer with another one is refused.
pub const PROTOCOL_VERSION: u32 = 5;
/// Largest frame payload accepted: the HTTP front accepts request bodies up
/// to 4 MiB, and a request carrying such a prompt must fit with room for its
/// archive's overhead.
pub const MAX_FRAME_BYTES: usize = 6 * 1024 * 1024;
const _: () = assert!(MAX_FRAME_BYTES <= u32::MAX as usize);

/// Why bytes could not be read as a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("incomplete frame: {needed} more bytes needed")]
    Incomplete { needed: usize },
    #[error("frame of {len} bytes is over the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    #[error("empty frame")]
    EmptyFrame,
    #[error("invalid message: {0}")]
    Invalid(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
}

impl WireError {
    /// True when more bytes may complete the frame; false when the stream
    /// must be closed.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, Self::Incomplete { .. })
    }
}

/// An owned copy of a checked archived request (a request is read once per
/// stream, so copying it is off the per-token path).
pub fn owned_request(r: &ArchivedInferenceRequest) -> Result<InferenceRequest, WireError> {
    rkyv::deserialize::<InferenceRequest, rkyv::rancor::Error>(r)
        .map_err(|e| WireError::Invalid(e.to_string()))
}

/// Owned copies of checked archived DHT messages (small, read once each).
pub fn owned_dht_request(r: &ArchivedDhtRequest) -> Result<DhtRequest, WireError> {
    rkyv::deserialize::<DhtRequest, rkyv::rancor::Error>(r)
        .map_err(|e| WireError::Invalid(e.to_string()))
}

pub fn owned_dht_reply(r: &ArchivedDhtReply) -> Result<DhtReply, WireError> {
    rkyv::deserialize::<DhtReply, rkyv::rancor::Error>(r)
        .map_err(|e| WireError::Invalid(e.to_string()))
}

pub fn owned_punch(r: &ArchivedPunchRequest) -> Result<PunchRequest, WireError> {
    rkyv::deserialize::<PunchRequest, rkyv::rancor::Error>(r)
        .map_err(|e| WireError::Invalid(e.to_string()))
}
