//! Mycelium's hand-written Kademlia: routing table, iterative lookups and
//! signed provider records, as a sans-IO state machine driven by `node`.
//!
//! Sans-IO: [`Dht`] never touches a socket or a clock. Time comes in as
//! milliseconds (`now_ms`) on every call and randomness from a seed. The
//! driver feeds it requests ([`Dht::handle_request`], which answers at
//! once), responses and failures ([`Dht::handle_response`],
//! [`Dht::handle_failure`]) and timer ticks ([`Dht::handle_timeout`]); it
//! takes out requests to send ([`Dht::poll_transmit`]), finished queries
//! ([`Dht::poll_event`]) and the next deadline ([`Dht::poll_timeout`]).
//! The same machine runs in a deterministic simulator and in the node.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

pub mod codec;
mod machine;
pub mod notices;
pub mod receipts;
pub mod record;
pub mod table;

pub use machine::{
    Config, Dht, Event, QueryId, QueryResult, Request, RequestId, Response, Transmit,
    REQUEST_TIMEOUT_MS,
};
pub use notices::NoticeStore;
pub use receipts::{receipts_key, ReceiptStore};
pub use record::{catalog_key, model_key, relay_key, ProviderRecord, RecordStore, RELAY_SERVICE};
pub use table::{Contact, RoutingTable, Update};

use hypha_wire::NodeId;

/// Contacts per bucket, and how many closest nodes a lookup converges on
/// and a record is stored at.
pub const K: usize = 20;
/// Requests a lookup keeps in flight at once.
pub const ALPHA: usize = 3;

/// Why the DHT refused something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DhtError {
    #[error("provider record refused: {0}")]
    BadRecord(&'static str),
    #[error("the record store is full")]
    StoreFull,
    #[error("publisher id carries {bits} bits of proof of work, {required} required")]
    NoProofOfWork { bits: u32, required: u32 },
    #[error("the key already holds its {max} records")]
    KeyFull { max: usize },
    #[error("the publisher already holds its {max} records here")]
    PublisherQuota { max: usize },
    #[error("too many queries running")]
    TooManyQueries,
    #[error("malformed DHT message: {0}")]
    BadMessage(&'static str),
}

/// XOR distance between two ids, ordered as a 256-bit big-endian number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Distance(pub [u8; 32]);

impl Distance {
    pub fn between(a: &NodeId, b: &NodeId) -> Self {
        let mut d = [0u8; 32];
        for ((o, x), y) in d.iter_mut().zip(a.0.iter()).zip(b.0.iter()) {
            *o = x ^ y;
        }
        Self(d)
    }

    /// Leading zero bits (256 for the zero distance).
    pub fn leading_zeros(&self) -> u32 {
        let mut n = 0;
        for b in self.0 {
            if b == 0 {
                n += 8;
            } else {
                return n + b.leading_zeros();
            }
        }
        n
    }
}

/// A small deterministic generator (xorshift64*): the DHT's randomness comes
/// from a seed, so a simulation replays exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A uniform value below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn id(&mut self) -> NodeId {
        let mut b = [0u8; 32];
        for chunk in b.chunks_mut(8) {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        NodeId(b)
    }
}
