//! L2, one service per concern, each driven by its own task: the DHT,
//! reachability, hole punching and relaying.

pub mod announce;
pub mod dht;
pub mod dialer;
pub mod punch;
pub mod reach;
pub mod relay_client;
pub mod relay_server;
