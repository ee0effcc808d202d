//! Frames on QUIC streams, and the rules both ends of a peer connection
//! follow: the hello exchange that opens a connection, close codes, and the
//! errors that end a stream or a whole connection.
//!
//! A connection starts with one bidirectional stream on which the dialer
//! sends its `Hello` and the acceptor answers with its own; only then are
//! request streams opened, one per request. Anything else (garbage, a frame
//! over the size cap, a frame cut short, a wrong protocol version, a message
//! where another was due) is a protocol violation: the connection is closed
//! with [`CLOSE_PROTOCOL`] and the reason, and logged.

use std::time::Duration;

use hypha_wire::{ArchivedMessage, FrameDecoder, FrameEncoder, Message, NodeId, WireError};
use quinn::VarInt;

use crate::identity::Identity;
use crate::net::hello::{check_pow, sign_hello, verify_hello, HelloError, Offer, VerifiedHello};

/// Connection closed normally (a node shutting down).
pub const CLOSE_NORMAL: VarInt = VarInt::from_u32(0);
/// Connection closed because the peer broke the protocol.
pub const CLOSE_PROTOCOL: VarInt = VarInt::from_u32(1);
/// A request stream reset or stopped because its consumer cancelled it.
pub const STREAM_CANCELLED: VarInt = VarInt::from_u32(1);

/// A peer has this long after the handshake to send its hello (and the
/// acceptor to answer it); a silent peer is dropped.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// A stream's opening frame has begun to arrive within [`HELLO_TIMEOUT`]
/// must be whole within this long: a frame of `MAX_FRAME_BYTES` at 256
/// KiB/s, so a long prompt on a slow uplink (or among many peers' uploads)
/// is not taken for a silent peer.
pub const OPENING_FRAME_TIMEOUT: Duration = Duration::from_secs(30);
const _: () =
    assert!(hypha_wire::MAX_FRAME_BYTES as u64 / (256 * 1024) < OPENING_FRAME_TIMEOUT.as_secs());
/// A write that makes no progress for this long fails: a peer that stops
/// reading must not hold a generation (and its engine slot) forever.
pub const SEND_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A stream that brings no frame for this long fails: a peer that goes
/// silent while keeping its connection alive must not hang a request.
pub const RECV_STALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes asked of QUIC per read: big enough for a whole token chunk frame,
/// small enough to bound each read.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Why a peer stream or connection failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    #[error("protocol violation: {0}")]
    Protocol(#[from] Violation),
    #[error("hello refused: {0}")]
    Hello(#[from] HelloError),
    #[error("protocol violation: {0}")]
    Receipt(#[from] ReceiptError),
    #[error("connection lost: {0}")]
    Connection(String),
    /// The peer closed the connection itself (a `CONNECTION_CLOSE` it
    /// sent): its choice, not a lost link.
    #[error("connection closed by the peer: {0}")]
    Closed(String),
    #[error("stream reset by the peer (code {0})")]
    Reset(u64),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("peer unreachable: {0}")]
    Unreachable(String),
}

/// Why a receipt or a countersignature was refused (see
/// `crate::inference::receipts`): the peer broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiptError {
    #[error("receipt refused: {0}")]
    Malformed(String),
    #[error("receipt refused: it names another request or other parties")]
    WrongParties,
    #[error("receipt refused: it names another model than the seeder's hello")]
    WrongModel,
    #[error("receipt refused: it bills {billed} prompt tokens for a prompt of at most {bound}")]
    PromptOverBound { billed: u32, bound: u32 },
    #[error("receipt refused: it claims {claimed} tokens, {arrived} arrived")]
    WrongCount { claimed: u32, arrived: u32 },
    #[error("receipt refused: its token digest differs from the tokens that arrived")]
    WrongDigest,
    #[error(
        "receipt refused: it charges {charged} micro-credits, the published price gives {want}"
    )]
    WrongPrice { charged: u64, want: u64 },
    #[error(
        "receipt refused: it charges {charged} micro-credits, over the request's cap of {cap}"
    )]
    OverCap { charged: u64, cap: u64 },
    #[error("receipt refused: it changes the prompt or start of an earlier receipt")]
    ChangedTerms,
    #[error("receipt refused: its prompt tokens differ from done")]
    PromptDiffersFromDone,
    #[error("receipt refused: a last receipt before done")]
    LastBeforeDone,
    #[error("receipt refused: {0}")]
    BadSignature(String),
    #[error("countersignature with no receipt offered")]
    NoneOffered,
    #[error("countersignature matches no offered receipt")]
    MatchesNoOffer,
}

impl PeerError {
    /// True when the peer broke the protocol and its connection must close.
    pub fn is_violation(&self) -> bool {
        matches!(self, Self::Protocol(_) | Self::Hello(_) | Self::Receipt(_))
    }

    fn wire(e: WireError) -> Self {
        Self::Protocol(Violation::Wire(e))
    }
}

/// How a peer broke the protocol: each closes its connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// Bytes that are no valid frame or message.
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("stream ended inside a frame ({left} bytes left over)")]
    CutFrame { left: usize },
    #[error("expected {expected}, got {got}")]
    Expected {
        expected: &'static str,
        got: &'static str,
    },
    /// A reply of the wrong kind to one of this node's requests.
    #[error("{got} in answer to {what}")]
    Answer {
        what: &'static str,
        got: &'static str,
    },
    #[error("a stream must start with a request, not a {0}")]
    Opening(&'static str),
    #[error("{0} sent while a request was running")]
    WhileRunning(&'static str),
    #[error("a seeder sent a {0} on a request stream")]
    OnRequestStream(&'static str),
    #[error("stream ended before {0}")]
    EndedBefore(&'static str),
    #[error("{0} stream ended without a reply")]
    NoReply(&'static str),
    #[error("stream carried no request")]
    NoRequest,
    #[error("reply for request {got} on the stream of request {want}")]
    WrongRequest { got: u64, want: u64 },
    #[error("chunk {got} arrived where chunk {want} was due")]
    OutOfSequence { got: u32, want: u32 },
    /// A frame of the right kind at the wrong point of an answer.
    #[error("{0}")]
    OutOfOrder(&'static str),
    /// A request whose fields do not check.
    #[error("bad request: {0}")]
    BadRequest(WireError),
    #[error("{0}")]
    Dht(#[from] hypha_dht::DhtError),
    #[error("punch request refused: {0}")]
    Punch(&'static str),
    #[error("a chunk carried no token")]
    EmptyChunk,
    #[error("{got} tokens for a request of at most {max}")]
    TooManyTokens { got: u32, max: u32 },
    #[error("{bytes} bytes of text for {tokens} tokens")]
    TooMuchText { bytes: usize, tokens: u32 },
    #[error("{tokens} tokens arrived with {bytes} bytes of text: tokens billed without text")]
    TextlessTokens { tokens: u32, bytes: usize },
    #[error("done counts {claimed} tokens where {got} arrived")]
    WrongCount { claimed: u32, got: u32 },
    #[error("done names stop string {index} of a request with {stops}, or with a length finish")]
    WrongStop { index: u32, stops: u32 },
    #[error("a chunk's logprobs break the request's bounds: {0}")]
    BadLogprobs(&'static str),
    #[error(
        "accepted names a tool format for a request without tools, or none for one with tools"
    )]
    ToolFormat,
}

impl From<quinn::ConnectionError> for PeerError {
    fn from(e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        match e {
            E::ApplicationClosed(_) | E::ConnectionClosed(_) => Self::Closed(e.to_string()),
            _ => Self::Connection(e.to_string()),
        }
    }
}

impl From<quinn::ReadError> for PeerError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::Reset(code) => Self::Reset(code.into_inner()),
            quinn::ReadError::ConnectionLost(c) => c.into(),
            other => Self::Connection(other.to_string()),
        }
    }
}

impl From<quinn::WriteError> for PeerError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(code) => Self::Reset(code.into_inner()),
            quinn::WriteError::ConnectionLost(c) => c.into(),
            other => Self::Connection(other.to_string()),
        }
    }
}

/// Closes `conn` for a protocol violation, saying why, and logs it.
pub fn close_for_violation(conn: &quinn::Connection, peer: NodeId, err: &PeerError) {
    let reason = err.to_string();
    tracing::warn!(%peer, remote = %conn.remote_address(), %reason, "disconnecting peer");
    // QUIC carries the reason in one packet; keep it well inside that.
    let cut = floor_char_boundary(&reason, 512);
    conn.close(CLOSE_PROTOCOL, &reason.as_bytes()[..cut]);
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    let mut i = s.len().min(max);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The sending half of a stream, encoding frames into one reused buffer.
pub struct FramedSend {
    pub stream: quinn::SendStream,
    enc: FrameEncoder,
}

impl FramedSend {
    pub fn new(stream: quinn::SendStream) -> Self {
        Self {
            stream,
            enc: FrameEncoder::new(),
        }
    }

    /// Encodes and writes one frame.
    pub async fn send(&mut self, msg: &Message) -> Result<(), PeerError> {
        let bytes = self.enc.encode(msg).map_err(PeerError::wire)?;
        tokio::time::timeout(SEND_STALL_TIMEOUT, self.stream.write_all(bytes))
            .await
            .map_err(|_| PeerError::Timeout("the peer stopped reading"))??;
        Ok(())
    }

    /// Ends the stream after what was written.
    pub fn finish(&mut self) {
        let _ = self.stream.finish();
    }
}

/// The receiving half of a stream, yielding checked frames read in place.
pub struct FramedRecv {
    pub stream: quinn::RecvStream,
    dec: FrameDecoder,
    ended: bool,
}

impl FramedRecv {
    pub fn new(stream: quinn::RecvStream) -> Self {
        Self {
            stream,
            dec: FrameDecoder::default(),
            ended: false,
        }
    }

    /// Reads the next frame and hands it to `f` while it still lies in the
    /// receive buffer. `Ok(None)`: the peer finished the stream cleanly.
    /// A stream that ends inside a frame is a protocol violation. Cancel-safe:
    /// bytes read so far stay buffered.
    pub async fn next<R>(
        &mut self,
        f: impl FnOnce(&ArchivedMessage) -> Result<R, PeerError>,
    ) -> Result<Option<R>, PeerError> {
        loop {
            match self.dec.next_frame() {
                Ok(Some(msg)) => return f(msg).map(Some),
                Ok(None) => {}
                Err(e) => return Err(PeerError::wire(e)),
            }
            if self.ended {
                return if self.dec.buffered() == 0 {
                    Ok(None)
                } else {
                    Err(Violation::CutFrame {
                        left: self.dec.buffered(),
                    }
                    .into())
                };
            }
            match self.stream.read_chunk(READ_CHUNK_BYTES, true).await? {
                Some(chunk) => self.dec.push(&chunk.bytes),
                None => self.ended = true,
            }
        }
    }

    /// The stream, and the bytes read past the last frame returned.
    pub fn into_parts(mut self) -> (quinn::RecvStream, Vec<u8>) {
        let rest = self.dec.take_buffered();
        (self.stream, rest)
    }

    /// Bytes read but not yet handed out as a frame.
    pub fn buffered(&self) -> usize {
        self.dec.buffered()
    }

    /// True once the peer finished its side and every frame was read.
    pub fn is_finished(&self) -> bool {
        self.ended && self.dec.buffered() == 0
    }
}

/// A short name of a message kind for errors.
pub fn kind_of(msg: &ArchivedMessage) -> &'static str {
    match msg {
        ArchivedMessage::Hello(_) => "hello",
        ArchivedMessage::Request(_) => "request",
        ArchivedMessage::Chunk(_) => "chunk",
        ArchivedMessage::Done(_) => "done",
        ArchivedMessage::Error(_) => "error",
        ArchivedMessage::Cancel(_) => "cancel",
        ArchivedMessage::Receipt(_) => "receipt",
        ArchivedMessage::Countersign(_) => "countersign",
        ArchivedMessage::Accepted(_) => "accepted",
        ArchivedMessage::Dht(_) => "dht request",
        ArchivedMessage::DhtReply(_) => "dht reply",
        ArchivedMessage::Punch(_) => "punch request",
        ArchivedMessage::PunchReply(_) => "punch reply",
        ArchivedMessage::RelayReserve(_) => "relay reservation",
        ArchivedMessage::RelayConnect(_) => "relay connect",
        ArchivedMessage::RelayIncoming(_) => "relayed path offer",
        ArchivedMessage::RelayReply(_) => "relay reply",
    }
}

fn expect_hello(
    msg: &ArchivedMessage,
    peer: NodeId,
    pow_required: u32,
) -> Result<VerifiedHello, PeerError> {
    match msg {
        ArchivedMessage::Hello(h) => {
            let hello = verify_hello(h, peer)?;
            check_pow(&peer, pow_required)?;
            Ok(hello)
        }
        other => Err(Violation::Expected {
            expected: "hello",
            got: kind_of(other),
        }
        .into()),
    }
}

/// Dialer side of the hello exchange: open the hello stream, send ours,
/// read and check theirs (including `pow_required` bits of proof of work
/// on the peer's id).
pub async fn hello_as_dialer(
    conn: &quinn::Connection,
    peer: NodeId,
    ours: &Message,
    pow_required: u32,
) -> Result<VerifiedHello, PeerError> {
    let exchange = async {
        let (send, recv) = conn.open_bi().await?;
        let mut send = FramedSend::new(send);
        send.send(ours).await?;
        send.finish();
        let mut recv = FramedRecv::new(recv);
        recv.next(|m| expect_hello(m, peer, pow_required))
            .await?
            .ok_or(PeerError::Protocol(Violation::EndedBefore("the hello")))
    };
    tokio::time::timeout(HELLO_TIMEOUT, exchange)
        .await
        .map_err(|_| PeerError::Timeout("waiting for the peer's hello"))?
}

/// Acceptor side: the first stream must carry the peer's hello; answer it
/// with ours.
pub async fn hello_as_acceptor(
    conn: &quinn::Connection,
    peer: NodeId,
    ours: &Message,
    pow_required: u32,
) -> Result<VerifiedHello, PeerError> {
    let exchange = async {
        let (send, recv) = conn.accept_bi().await?;
        let mut recv = FramedRecv::new(recv);
        let hello = recv
            .next(|m| expect_hello(m, peer, pow_required))
            .await?
            .ok_or(PeerError::Protocol(Violation::EndedBefore("the hello")))?;
        let mut send = FramedSend::new(send);
        send.send(ours).await?;
        send.finish();
        Ok(hello)
    };
    tokio::time::timeout(HELLO_TIMEOUT, exchange)
        .await
        .map_err(|_| PeerError::Timeout("waiting for the peer's hello"))?
}

/// This node's hello as a message, built once per node.
pub fn hello_message(identity: &Identity, offer: Offer) -> Message {
    Message::Hello(sign_hello(identity, offer))
}
