//! The ledger: receipts signed by both parties in an append-only,
//! hash-chained, crash-safe log, and the balances derived from it.
//!
//! Empty until the ledger work lands (see ARCHITECTURE.md).
#![forbid(unsafe_code)]
