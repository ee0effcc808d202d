//! Mycelium's NAT traversal: STUN on the QUIC port, candidate exchange, hole
//! punching and relay selection, as sans-IO state machines.
//!
//! Empty until the NAT traversal work lands (see ARCHITECTURE.md).
#![forbid(unsafe_code)]
