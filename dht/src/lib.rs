//! Mycelium's hand-written Kademlia: routing table, iterative lookups and
//! signed provider records, as a sans-IO state machine driven by `node`.
//!
//! Empty until the discovery work lands (see ARCHITECTURE.md).
#![forbid(unsafe_code)]
