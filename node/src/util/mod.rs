//! L0: small mechanisms every layer uses, each written once: the clock,
//! the lock helper, the crypto provider, task ownership ([`Tasks`]) and
//! bounded state ([`BoundedMap`], [`RateWindow`], [`TokenBucket`]).

mod bounded;
mod tasks;

pub use bounded::{BoundedMap, Overflow, RateWindow, TokenBucket};
pub use tasks::Tasks;

/// Milliseconds since the Unix epoch: the clock provider records and
/// receipts are dated by.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Locks `m`; a panic elsewhere while it was held does not make its data
/// unusable here (every critical section leaves the data consistent).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Installs ring as rustls's crypto provider, once per process.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
