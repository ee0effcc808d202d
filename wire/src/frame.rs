//! Framing: a `u32` little-endian length, then an rkyv archive.
//!
//! Encoding reuses one buffer and one arena per stream, so after the first
//! few frames encoding allocates nothing. Decoding validates the archive and
//! hands out a reference into the received bytes: nothing is copied.

use rkyv::rancor::Error as RkyvError;
use rkyv::ser::allocator::Arena;

use crate::{ArchivedMessage, Message, WireError, MAX_FRAME_BYTES};

/// Bytes before each payload.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Reads one frame from the start of `bytes`: the checked message and the
/// number of bytes the frame took.
pub fn decode_frame(bytes: &[u8]) -> Result<(&ArchivedMessage, usize), WireError> {
    let Some(header) = bytes.get(..FRAME_HEADER_BYTES) else {
        return Err(WireError::Incomplete {
            needed: FRAME_HEADER_BYTES - bytes.len(),
        });
    };
    let mut len_bytes = [0u8; FRAME_HEADER_BYTES];
    len_bytes.copy_from_slice(header);
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(WireError::FrameTooLarge {
            len,
            max: MAX_FRAME_BYTES,
        });
    }
    if len == 0 {
        return Err(WireError::EmptyFrame);
    }
    let end = FRAME_HEADER_BYTES + len;
    let Some(payload) = bytes.get(FRAME_HEADER_BYTES..end) else {
        return Err(WireError::Incomplete {
            needed: end - bytes.len(),
        });
    };
    let msg = rkyv::access::<ArchivedMessage, RkyvError>(payload)
        .map_err(|e| WireError::Invalid(e.to_string()))?;
    Ok((msg, end))
}

/// Encodes messages into one reused buffer.
pub struct FrameEncoder {
    buf: Vec<u8>,
    arena: Arena,
}

impl Default for FrameEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameEncoder {
    pub fn new() -> Self {
        Self {
            buf: Vec::with_capacity(256),
            arena: Arena::new(),
        }
    }

    /// Encodes `msg` as one frame; the bytes stay valid until the next call.
    pub fn encode(&mut self, msg: &Message) -> Result<&[u8], WireError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
        let buf = rkyv::api::high::to_bytes_in_with_alloc::<_, _, RkyvError>(
            msg,
            buf,
            self.arena.acquire(),
        )
        .map_err(|e| WireError::Encode(e.to_string()))?;
        self.buf = buf;
        let len = self.buf.len() - FRAME_HEADER_BYTES;
        if len > MAX_FRAME_BYTES {
            return Err(WireError::FrameTooLarge {
                len,
                max: MAX_FRAME_BYTES,
            });
        }
        let header = (len as u32).to_le_bytes();
        if let Some(h) = self.buf.get_mut(..FRAME_HEADER_BYTES) {
            h.copy_from_slice(&header);
        }
        Ok(&self.buf)
    }
}

/// Collects bytes from a stream and yields whole frames.
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes at the front of `buf` that belong to frames already returned.
    consumed: usize,
}

impl FrameDecoder {
    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed, or an
    /// error after which the stream must be closed. A frame announcing more
    /// than `MAX_FRAME_BYTES` is refused before its payload is buffered.
    pub fn next_frame(&mut self) -> Result<Option<&ArchivedMessage>, WireError> {
        let rest = self.buf.get(self.consumed..).unwrap_or_default();
        match decode_frame(rest) {
            Ok((msg, used)) => {
                self.consumed += used;
                Ok(Some(msg))
            }
            Err(WireError::Incomplete { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.consumed
    }

    /// Takes the bytes buffered past the frames returned: a stream that
    /// goes on in another format (a relayed path) starts with them.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        let rest = self.buf.split_off(self.consumed.min(self.buf.len()));
        self.buf.clear();
        self.consumed = 0;
        rest
    }
}
