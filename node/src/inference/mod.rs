//! L3, remote inference: both halves of it, the consumer's routing and
//! requests and the seeder's admission and serving.

pub mod admission;
pub mod convert;
pub mod prep;
pub mod receipts;
pub mod remote;
pub mod reply;
pub mod route;
pub mod schema;
pub mod serve;
pub mod template;
pub mod tools;

/// A request's id as its consumer numbered it: unique among that
/// consumer's requests, so a seeder keys a request by (consumer, id). It
/// crosses the wire and the ledger as its `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
