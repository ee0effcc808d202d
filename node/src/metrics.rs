//! Prometheus metrics for the node, rendered in the text exposition format.
//!
//! Counters and histograms are plain atomics so the token path never takes a
//! lock; only the per-status request counter (touched once per request) does.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::util::lock;

/// Bucket upper bounds in seconds for time to first token.
const TTFT_BUCKETS_S: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];
/// Bucket upper bounds in seconds between two tokens of one stream.
const ITL_BUCKETS_S: [f64; 11] = [
    0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0,
];

/// Bucket upper bounds in seconds from a first attempt to a direct path
/// (punched at once, or a relayed connection upgraded later).
const DIRECT_PATH_BUCKETS_S: [f64; 11] =
    [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];

/// A fixed-bucket histogram; the sum is kept in microseconds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| s <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Writes one counter in the text exposition format.
pub fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

/// Writes one gauge in the text exposition format.
pub fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

/// Every metric the node exports.
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub cancelled: AtomicU64,
    /// Peer connections open now (both directions).
    pub peers_connected: AtomicU64,
    /// Connection attempts refused or closed for want of a slot (see
    /// `net::slots`).
    pub peers_refused: AtomicU64,
    /// Connection attempts sent a Retry to prove their address.
    pub quic_retries: AtomicU64,
    /// Hole punches this node asked for.
    pub punch_attempts: AtomicU64,
    /// Direct paths that opened after a punch (at once, or upgrading a
    /// relayed connection).
    pub punch_successes: AtomicU64,
    /// Connections this node made through a relay.
    pub relayed_dials: AtomicU64,
    /// Relayed connections replaced by direct ones.
    pub upgrades: AtomicU64,
    pub direct_path: Histogram,
    /// Peers disconnected for breaking the protocol.
    pub peer_violations: AtomicU64,
    /// Seeders not asked because their hello priced above their signed
    /// provider record.
    pub peer_gouging: AtomicU64,
    /// HTTP connections refused at the connection cap.
    pub http_connections_refused: AtomicU64,
    /// Completions refused at the stream cap.
    pub http_streams_refused: AtomicU64,
    pub ttft: Histogram,
    pub inter_token: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            peers_connected: AtomicU64::new(0),
            peers_refused: AtomicU64::new(0),
            quic_retries: AtomicU64::new(0),
            punch_attempts: AtomicU64::new(0),
            punch_successes: AtomicU64::new(0),
            relayed_dials: AtomicU64::new(0),
            upgrades: AtomicU64::new(0),
            direct_path: Histogram::new(&DIRECT_PATH_BUCKETS_S),
            peer_violations: AtomicU64::new(0),
            peer_gouging: AtomicU64::new(0),
            http_connections_refused: AtomicU64::new(0),
            http_streams_refused: AtomicU64::new(0),
            ttft: Histogram::new(&TTFT_BUCKETS_S),
            inter_token: Histogram::new(&ITL_BUCKETS_S),
        }
    }
}

/// Gauges read from the engine at render time.
pub struct Gauges {
    pub queue_depth: usize,
    pub slots_busy: usize,
    pub slots_total: u32,
    pub prompt_tokens_reused: u64,
    /// Free-tier generations stopped for paying work.
    pub preempted: u64,
}

impl Metrics {
    pub fn count_request(&self, endpoint: &'static str, status: u16) {
        let mut map = lock(&self.requests);
        *map.entry((endpoint, status)).or_default() += 1;
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str(
            "# HELP hypha_requests_total Requests by endpoint (HTTP, or peer for remote requests served) and status.\n",
        );
        out.push_str("# TYPE hypha_requests_total counter\n");
        {
            let map = lock(&self.requests);
            for ((endpoint, status), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "hypha_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
                );
            }
        }
        counter(
            &mut out,
            "hypha_prompt_tokens_total",
            "Prompt tokens processed.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "hypha_completion_tokens_total",
            "Tokens generated.",
            self.completion_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "hypha_prompt_tokens_reused_total",
            "Prompt tokens whose KV was copied from a shared prefix instead of computed.",
            g.prompt_tokens_reused,
        );
        counter(
            &mut out,
            "hypha_free_tier_preempted_total",
            "Free-tier generations stopped to give their slot to a paying request.",
            g.preempted,
        );
        counter(
            &mut out,
            "hypha_requests_cancelled_total",
            "Generations cancelled because the client went away.",
            self.cancelled.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "hypha_peer_violations_total",
            "Peers disconnected for breaking the protocol.",
            self.peer_violations.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "hypha_peer_gouging_total",
            "Seeders not asked because their hello priced above their signed provider record.",
            self.peer_gouging.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "hypha_http_connections_refused_total",
            "HTTP connections refused at the connection cap.",
            self.http_connections_refused.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "hypha_http_streams_refused_total",
            "Completions refused at the stream cap.",
            self.http_streams_refused.load(Ordering::Relaxed),
        );
        self.ttft.render(
            &mut out,
            "hypha_time_to_first_token_seconds",
            "Time from request to first generated token.",
        );
        self.inter_token.render(
            &mut out,
            "hypha_inter_token_seconds",
            "Time between consecutive tokens of one stream.",
        );
        gauge(
            &mut out,
            "hypha_queue_depth",
            "Requests waiting for a slot.",
            g.queue_depth as u64,
        );
        gauge(
            &mut out,
            "hypha_slots_busy",
            "Sequence slots generating or reading a prompt.",
            g.slots_busy as u64,
        );
        gauge(
            &mut out,
            "hypha_slots_total",
            "Sequence slots in the engine.",
            u64::from(g.slots_total),
        );
        gauge(
            &mut out,
            "hypha_peers_connected",
            "Peer connections open.",
            self.peers_connected.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "hypha_peers_refused_total",
            "Peer connections refused or closed: no slot, or over the share of their address or identity.",
            self.peers_refused.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "hypha_quic_retries_total",
            "Connection attempts answered with a Retry (address validation under load).",
            self.quic_retries.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "hypha_punch_attempts_total",
            "Hole punches this node asked a peer for.",
            self.punch_attempts.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "hypha_punch_successes_total",
            "Direct paths that opened after a hole punch (at once, or replacing a relayed connection).",
            self.punch_successes.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "hypha_relayed_connections_total",
            "Connections this node made through a relay.",
            self.relayed_dials.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "hypha_relay_upgrades_total",
            "Relayed connections replaced by a direct path.",
            self.upgrades.load(Ordering::Relaxed),
        );
        self.direct_path.render(
            &mut out,
            "hypha_time_to_direct_path_seconds",
            "Time from the first attempt to reach a peer behind a NAT to a direct path to it.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.ttft.observe(Duration::from_millis(20));
        m.ttft.observe(Duration::from_millis(400));
        m.count_request("chat", 200);
        let text = m.render(&Gauges {
            queue_depth: 3,
            slots_busy: 2,
            slots_total: 8,
            prompt_tokens_reused: 0,
            preempted: 0,
        });
        assert!(text.contains("hypha_time_to_first_token_seconds_bucket{le=\"0.025\"} 1"));
        assert!(text.contains("hypha_time_to_first_token_seconds_bucket{le=\"0.5\"} 2"));
        assert!(text.contains("hypha_time_to_first_token_seconds_count 2"));
        assert!(text.contains("hypha_requests_total{endpoint=\"chat\",status=\"200\"} 1"));
        assert!(text.contains("hypha_queue_depth 3"));
    }
}
