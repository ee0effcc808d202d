//! L3, remote inference: both halves of it, the consumer's routing and
//! requests and the seeder's admission and serving.

pub mod admission;
pub mod convert;
pub mod receipts;
pub mod remote;
pub mod route;
pub mod serve;
