//! The messages of the protocol ([`crate::PROTOCOL_VERSION`]). Archived
//! forms are flat: strings, vectors, plain integers, options of them and
//! field-less enums, no shared pointers.

use rkyv::{Archive, Deserialize, Serialize};

/// Every message a peer may send.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub enum Message {
    Hello(Hello),
    Request(InferenceRequest),
    Chunk(TokenChunk),
    Done(Done),
    Error(ErrorReply),
    Cancel(Cancel),
    Receipt(ReceiptOffer),
    Countersign(Countersign),
    /// The seeder admitted a request: the first frame of its answer, sent
    /// before any token, so a consumer can tell a live seeder from a dead
    /// connection without waiting for the first token.
    Accepted(Accepted),
    /// A DHT request: the first and only frame a requester sends on its
    /// stream.
    Dht(DhtRequest),
    /// The answer to a [`DhtRequest`], the only frame sent back.
    DhtReply(DhtReply),
    /// A node asks to be dialed by `target` (hole punching): sent to a
    /// rendezvous node, which forwards it unchanged to the target.
    Punch(PunchRequest),
    /// The answer to a [`PunchRequest`].
    PunchReply(PunchReply),
    /// A node behind a NAT asks a relay to keep it reachable: the relay
    /// holds the connection this arrives on and forwards
    /// [`Message::RelayConnect`]s for it.
    RelayReserve(RelayReserve),
    /// A node asks a relay for a path to `target`, which holds a
    /// reservation there. After a granting [`RelayReply`] the stream carries
    /// the two ends' own QUIC packets (see [`crate::packet`]).
    RelayConnect(RelayConnect),
    /// The relay tells a reserved node that `from` asked for a path; after
    /// the node grants it the stream carries packets.
    RelayIncoming(RelayIncoming),
    /// The answer to the three relay messages above.
    RelayReply(RelayReply),
}

/// Opens a connection: who the sender is and what it can do. The signature
/// covers [`Hello::signed_bytes`] and is checked by the node, which holds the
/// keys.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct Hello {
    pub protocol_version: u32,
    pub public_key: [u8; 32],
    /// Bit set of `CAP_*` flags.
    pub capabilities: u64,
    /// Models this node serves, by name (one model and its aliases).
    pub models: Vec<String>,
    /// SHA-256 of the served GGUF file; zeros when the node serves none.
    pub model_sha256: [u8; 32],
    /// Tokens one request to the served model may hold (prompt and
    /// completion); 0 when the node serves none.
    pub context_length: u32,
    /// Micro-credits per prompt token and per generated token.
    pub price_prompt_micro: u64,
    pub price_completion_micro: u64,
    pub signature: [u8; 64],
}

/// The sender serves inference requests.
pub const CAP_SEEDER: u64 = 1;

impl Hello {
    /// The bytes the signature covers: everything but the signature, in a
    /// fixed layout independent of rkyv.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(64 + self.models.iter().map(|m| m.len() + 4).sum::<usize>());
        out.extend_from_slice(b"hypha-hello-v2\0");
        out.extend_from_slice(&self.protocol_version.to_le_bytes());
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(&self.capabilities.to_le_bytes());
        out.extend_from_slice(&(self.models.len() as u32).to_le_bytes());
        for m in &self.models {
            out.extend_from_slice(&(m.len() as u32).to_le_bytes());
            out.extend_from_slice(m.as_bytes());
        }
        out.extend_from_slice(&self.model_sha256);
        out.extend_from_slice(&self.context_length.to_le_bytes());
        out.extend_from_slice(&self.price_prompt_micro.to_le_bytes());
        out.extend_from_slice(&self.price_completion_micro.to_le_bytes());
        out
    }
}

/// One chat message.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The tools an assistant message called (its answer in history).
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

/// A call of a tool (a function) by the model.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments: a JSON object's text.
    pub arguments: String,
}

/// Which tool calls a request allows or demands.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ToolChoice {
    /// The model calls tools or answers, as it sees fit.
    Auto,
    /// The model must call at least one tool.
    Required,
    /// The model must call the function [`Tools::named`].
    Named,
}

/// The tools a chat request offers the model.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct Tools {
    /// The tools as a JSON array in OpenAI's shape
    /// (`[{"type":"function","function":{"name":..,"parameters":..}}]`);
    /// the seeder checks it as the consumer's edge did.
    pub tools_json: String,
    pub choice: ToolChoice,
    /// The function [`ToolChoice::Named`] demands; empty otherwise.
    pub named: String,
    /// More than one call in one answer is allowed.
    pub parallel: bool,
}

/// How a seeder's model writes tool calls in its text: the consumer parses
/// the answer's text with it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug, PartialEq, Eq))]
pub enum ToolFormat {
    /// A JSON object, `{"tool_calls": [...]}` or `{"response": "..."}`,
    /// for models whose template knows no tools.
    Generic,
    /// `<tool_call>{"name": .., "arguments": ..}</tool_call>` (Hermes,
    /// Qwen).
    Hermes,
    /// `{"name": .., "parameters": ..}` as the whole answer (Llama 3.x).
    Llama3,
    /// `[TOOL_CALLS][{"name": .., "arguments": ..}]` (Mistral).
    Mistral,
}

/// What to complete.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub enum Prompt {
    Chat(Vec<ChatMessage>),
    Text(String),
}

/// Sampling settings; `temperature` 0 is greedy.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: i32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub seed: Option<u64>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct InferenceRequest {
    pub request_id: u64,
    pub model: String,
    pub prompt: Prompt,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub max_tokens: Option<u32>,
    /// Structured output: the text of a JSON schema the answer must be a
    /// JSON value valid against (`{"type":"object"}` for any object);
    /// `None` for free text.
    pub json_schema: Option<String>,
    /// Report each token's log-probability and those of this many of the
    /// likeliest tokens; `None`: none.
    pub logprobs: Option<u8>,
    /// Micro-credits the consumer pays for this request at most: the
    /// seeder refuses a prompt that costs more and stops generating
    /// before the tokens would.
    pub max_credits: Option<u64>,
    /// Tools the model may call (chat prompts only); `None`: none.
    pub tools: Option<Tools>,
}

/// Tokens generated since the last chunk, and their text.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct TokenChunk {
    pub request_id: u64,
    /// 0 for the first chunk of a request, then +1 each.
    pub seq: u32,
    pub token_ids: Vec<i32>,
    pub text: String,
    /// One per token when the request asked for logprobs, else none.
    pub logprobs: Vec<TokenLogprob>,
}

/// A generated token's log-probability under the model, and the likeliest
/// tokens at its place, most likely first.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct TokenLogprob {
    /// The token's bytes (a piece may be part of a character).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct TopLogprob {
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct Done {
    pub request_id: u64,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub finish_reason: FinishReason,
    /// Text held back until the end (a split character, a partial stop string).
    pub text: String,
    /// The index in the request's `stop` of the stop string that ended the
    /// answer, if one did (the finish reason is then `Stop`).
    pub stop_sequence: Option<u32>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ErrorReply {
    pub request_id: u64,
    pub refusal: Refusal,
    pub message: String,
}

/// Why a peer refused, or could not carry out, what it was asked: the
/// answer of every reply that is not a success. Each edge maps it to its
/// own terms (the node's HTTP API to statuses).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug, PartialEq, Eq))]
#[non_exhaustive]
pub enum Refusal {
    /// The request itself is wrong (too long for the context, a bad role
    /// or stop string, a bad signature): it stays wrong elsewhere.
    BadRequest,
    /// No such model, service or reservation here.
    NotFound,
    /// The asker may not ask this here (not on an allow list, no
    /// reservation held with it).
    Forbidden,
    /// Credits are owed: a receipt was never countersigned.
    Unpaid,
    /// The request id was used before.
    Duplicate,
    /// Over a rate or count limit (the free tier, punches, relayed paths).
    TooMany,
    /// Every slot and the queue are full: try again soon.
    Busy,
    /// A node further on did not answer (a relay's target).
    Unreachable,
    /// The serving side failed.
    Internal,
    /// The request cannot be served within the consumer's cap in credits.
    OverBudget,
}

impl From<&ArchivedRefusal> for Refusal {
    fn from(a: &ArchivedRefusal) -> Self {
        match a {
            ArchivedRefusal::BadRequest => Self::BadRequest,
            ArchivedRefusal::NotFound => Self::NotFound,
            ArchivedRefusal::Forbidden => Self::Forbidden,
            ArchivedRefusal::Unpaid => Self::Unpaid,
            ArchivedRefusal::OverBudget => Self::OverBudget,
            ArchivedRefusal::Duplicate => Self::Duplicate,
            ArchivedRefusal::TooMany => Self::TooMany,
            ArchivedRefusal::Busy => Self::Busy,
            ArchivedRefusal::Unreachable => Self::Unreachable,
            ArchivedRefusal::Internal => Self::Internal,
        }
    }
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct Cancel {
    pub request_id: u64,
}

/// A cumulative receipt the seeder signed: sent every few tokens while a
/// request runs and once more (`last`) after `Done`. `receipt` holds the
/// ledger's canonical receipt bytes.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ReceiptOffer {
    pub request_id: u64,
    pub receipt: Vec<u8>,
    pub seeder_sig: [u8; 64],
    pub last: bool,
}

/// The consumer's signature over the receipt it was last offered.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct Countersign {
    pub request_id: u64,
    pub consumer_sig: [u8; 64],
}

/// See [`Message::Accepted`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct Accepted {
    pub request_id: u64,
    /// How the model writes tool calls, when the request offered tools
    /// (and only then).
    pub tool_format: Option<ToolFormat>,
}

/// A node and the UDP address it is reached at (`ip:port` text).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct WireContact {
    pub id: [u8; 32],
    pub addr: String,
}

/// A provider record as the DHT carries it; the DHT crate checks its
/// signature and bounds before it is stored or used.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct WireRecord {
    pub publisher: [u8; 32],
    pub public_key: [u8; 32],
    pub addrs: Vec<String>,
    /// Relays the publisher holds a reservation at (`NODE_ID@ip:port`).
    pub relays: Vec<String>,
    pub model: String,
    pub model_sha256: [u8; 32],
    pub context_length: u32,
    pub backend: String,
    pub decode_tokens_per_s: u32,
    pub free_slots: u32,
    pub price_prompt_micro: u64,
    pub price_completion_micro: u64,
    pub expires_ms: u64,
    pub signature: [u8; 64],
}

/// Kademlia requests.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub enum DhtRequest {
    Ping,
    FindNode {
        target: [u8; 32],
    },
    GetProviders {
        key: [u8; 32],
    },
    AddProvider {
        key: [u8; 32],
        record: Box<WireRecord>,
    },
    /// Receipts under a node's receipt key.
    GetReceipts {
        key: [u8; 32],
    },
    /// Signed receipts (the ledger's 376-byte form each) to store under a
    /// party's receipt key.
    PutReceipts {
        key: [u8; 32],
        receipts: Vec<Vec<u8>>,
    },
    /// An unpaid notice (the ledger's `Notice` form) to store under its
    /// consumer's receipt key.
    PutNotice {
        key: [u8; 32],
        notice: Vec<u8>,
    },
}

/// Kademlia answers.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub enum DhtReply {
    Pong,
    Nodes {
        closer: Vec<WireContact>,
    },
    Providers {
        records: Vec<WireRecord>,
        closer: Vec<WireContact>,
    },
    /// Receipts under a key and the unpaid notices against its node.
    Receipts {
        receipts: Vec<Vec<u8>>,
        notices: Vec<Vec<u8>>,
        closer: Vec<WireContact>,
    },
    Stored,
    Refused,
}

/// See [`Message::Punch`]. Signed by the initiator, so neither the
/// rendezvous nor anyone else can make the target dial addresses the
/// initiator did not name.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct PunchRequest {
    pub initiator: [u8; 32],
    pub initiator_key: [u8; 32],
    pub target: [u8; 32],
    /// The initiator's candidate addresses (`ip:port`).
    pub candidates: Vec<String>,
    /// Unix milliseconds, by the initiator's clock.
    pub issued_ms: u64,
    pub signature: [u8; 64],
}

impl PunchRequest {
    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(b"hypha-punch-1\0");
        out.extend_from_slice(&self.initiator);
        out.extend_from_slice(&self.initiator_key);
        out.extend_from_slice(&self.target);
        out.extend_from_slice(&(self.candidates.len() as u32).to_le_bytes());
        for c in &self.candidates {
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(c.as_bytes());
        }
        out.extend_from_slice(&self.issued_ms.to_le_bytes());
        out
    }
}

/// See [`Message::PunchReply`]: no refusal when the target is dialing;
/// `NotFound` when the rendezvous has no connection to the target,
/// `BadRequest` for a request that does not check, `TooMany` over the rate,
/// `Unreachable` when the target did not answer the rendezvous.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct PunchReply {
    pub refusal: Option<Refusal>,
}

/// See [`Message::RelayReserve`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct RelayReserve {
    /// Relayed paths the node asks to be reachable over at once (the relay
    /// may grant fewer).
    pub max_sessions: u32,
}

/// See [`Message::RelayConnect`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct RelayConnect {
    pub target: [u8; 32],
}

/// See [`Message::RelayIncoming`]. `from` is the id the relay
/// authenticated on its own connection to the asker; the end-to-end QUIC
/// handshake that follows proves it again to the target.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct RelayIncoming {
    pub from: [u8; 32],
}

/// See [`Message::RelayReply`]: no refusal when granted; `Forbidden` not
/// served here, `NotFound` no such reservation, `TooMany` over a limit,
/// `Unreachable` the target did not answer.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct RelayReply {
    pub refusal: Option<Refusal>,
}
