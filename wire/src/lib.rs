//! Mycelium's wire protocol: length-prefixed rkyv frames between peers.
//!
//! Sans-IO: this crate turns messages into bytes and bytes into checked
//! messages; it never touches a socket or a clock. Its messages, framing and
//! fuzz target arrive with the remote-inference work (see ARCHITECTURE.md);
//! until then the crate holds its place in the workspace and nothing else.
#![forbid(unsafe_code)]
