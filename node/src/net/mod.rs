//! L1, the network: the QUIC endpoint and its socket, frames and the
//! hello, addresses and relayed paths, and the pool of connections. Imports
//! no service.

pub mod addr;
pub mod endpoint;
pub mod hello;
pub mod paths;
pub mod pool;
pub mod proto;
pub mod slots;
pub mod socket;
