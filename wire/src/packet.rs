//! Packets on a relayed stream: each of the two ends' own QUIC datagrams
//! behind a big-endian `u16` length.
//!
//! A relay copies these bytes from one end's stream to the other's without
//! reading them; the ends turn them back into datagrams for their QUIC
//! endpoints. The datagrams are QUIC packets of the ends' own connection,
//! encrypted end to end: the relay never holds a key to them.

use crate::WireError;

/// Bytes before each packet.
pub const PACKET_HEADER_BYTES: usize = 2;
/// The largest packet carried: QUIC never sends datagrams over its path
/// MTU (1,200 bytes at first, at most 1,452 after discovery on Ethernet);
/// this leaves room for larger links and refuses anything absurd.
pub const MAX_RELAYED_PACKET: usize = 2048;

/// Appends `packet` with its length to `out`. Empty and oversized packets
/// are refused.
pub fn encode_packet(out: &mut Vec<u8>, packet: &[u8]) -> Result<(), WireError> {
    if packet.is_empty() {
        return Err(WireError::EmptyFrame);
    }
    if packet.len() > MAX_RELAYED_PACKET {
        return Err(WireError::FrameTooLarge {
            len: packet.len(),
            max: MAX_RELAYED_PACKET,
        });
    }
    out.extend_from_slice(&(packet.len() as u16).to_be_bytes());
    out.extend_from_slice(packet);
    Ok(())
}

/// Collects a relayed stream's bytes and yields whole packets.
#[derive(Default, Debug)]
pub struct PacketDecoder {
    buf: Vec<u8>,
    consumed: usize,
}

impl PacketDecoder {
    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole packet, `Ok(None)` when more bytes are needed, or an
    /// error after which the stream must be closed (a length of zero or
    /// over [`MAX_RELAYED_PACKET`], refused before its bytes are buffered).
    pub fn next_packet(&mut self) -> Result<Option<&[u8]>, WireError> {
        let rest = self.buf.get(self.consumed..).unwrap_or_default();
        let Some(header) = rest.get(..PACKET_HEADER_BYTES) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([
            header.first().copied().unwrap_or(0),
            header.get(1).copied().unwrap_or(0),
        ]));
        if len == 0 {
            return Err(WireError::EmptyFrame);
        }
        if len > MAX_RELAYED_PACKET {
            return Err(WireError::FrameTooLarge {
                len,
                max: MAX_RELAYED_PACKET,
            });
        }
        let end = PACKET_HEADER_BYTES + len;
        let start = self.consumed;
        match self.buf.get(start + PACKET_HEADER_BYTES..start + end) {
            Some(p) => {
                self.consumed += end;
                Ok(Some(p))
            }
            None => Ok(None),
        }
    }

    /// Bytes buffered but not yet returned as packets.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.consumed
    }
}
