//! This node's reachability: how peers see it, what its NAT does, and the
//! candidates it can be reached at.
//!
//! A task drives the sans-IO `hypha_nat::Prober` from the QUIC socket: it
//! sends binding requests to a few known peers' QUIC ports (every node
//! answers STUN there) and to any configured STUN servers, and reads the
//! answers the socket sets aside. Peers in `hypha_nat::probe::MIN_GROUPS`
//! networks that saw the same public address mean an endpoint-independent
//! mapping (a hole can be punched); different ones mean a per-destination
//! mapping (only a relay helps). Peers to ask are picked from as many
//! networks as the routing table holds. Rounds repeat every
//! [`PROBE_EVERY_UNKNOWN`] until the mapping is known, then every
//! [`PROBE_EVERY`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypha_nat::{Candidate, Mapping, Observation, Prober};

use crate::net::endpoint::Endpoint;
use crate::net::socket::StunStats;
use crate::services::dht::Discovery;
use crate::util::{lock, Tasks};

/// Between rounds while the mapping is unknown.
pub const PROBE_EVERY_UNKNOWN: Duration = Duration::from_secs(15);
/// Between rounds once it is known (mappings change when routers reboot
/// or leases end).
pub const PROBE_EVERY: Duration = Duration::from_secs(10 * 60);
/// Peers asked per round: enough networks to tell the mapping, and some
/// to spare for peers that do not answer.
pub const PEERS_PER_ROUND: usize = 2 * hypha_nat::probe::MIN_GROUPS;
/// Between rounds while too few peers are known to ask.
const FEW_PEERS_RETRY: Duration = Duration::from_secs(1);
/// Wait before the first round, so the DHT has contacts to ask.
const FIRST_ROUND_AFTER: Duration = Duration::from_millis(500);

/// What `/v1/network` and `hypha status` show.
#[derive(Debug, Clone)]
pub struct ReachView {
    pub local: SocketAddr,
    pub mapping: Mapping,
    pub observations: Vec<Observation>,
    pub candidates: Vec<Candidate>,
}

/// Shared between the probing task and the HTTP API.
#[derive(Debug)]
pub struct Reachability {
    view: Mutex<ReachView>,
    /// The QUIC socket's STUN counters.
    pub stun: Arc<StunStats>,
}

impl Reachability {
    pub fn new(local: SocketAddr, stun: Arc<StunStats>) -> Self {
        Self {
            view: Mutex::new(ReachView {
                local,
                mapping: Mapping::Unknown,
                observations: Vec::new(),
                candidates: hypha_nat::candidates(local, &Mapping::Unknown, &[]),
            }),
            stun,
        }
    }

    pub fn view(&self) -> ReachView {
        lock(&self.view).clone()
    }

    fn update(&self, prober: &Prober) {
        let mut v = lock(&self.view);
        v.mapping = prober.mapping();
        v.observations = prober.observations().to_vec();
        v.candidates = hypha_nat::candidates(v.local, &v.mapping, &[]);
    }
}

/// Probes until the node stops.
pub async fn run(
    endpoint: Arc<Endpoint>,
    discovery: Discovery,
    stun_servers: Vec<SocketAddr>,
    reach: Arc<Reachability>,
    tasks: Tasks,
) {
    let Some(mut responses) = endpoint.take_stun_responses() else {
        return;
    };
    let Ok(local) = endpoint.local_addr() else {
        return;
    };
    let mut seed = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
    let mut prober = Prober::new(local, u64::from_le_bytes(seed));
    let start = Instant::now();
    let ms = |t: Instant| t.duration_since(start).as_millis() as u64;
    let mut next_round = ms(Instant::now() + FIRST_ROUND_AFTER);
    loop {
        let now = ms(Instant::now());
        let wake = prober.poll_timeout().unwrap_or(u64::MAX).min(next_round);
        let sleep = Duration::from_millis(wake.saturating_sub(now));
        tokio::select! {
            biased;
            () = tasks.stopping() => return,
            r = responses.recv() => {
                let Some((from, bytes)) = r else { return };
                match prober.handle_response(from, &bytes, ms(Instant::now())) {
                    Ok(Some(o)) => {
                        tracing::debug!(server = %o.server, mapped = %o.mapped, "a peer saw us");
                        reach.update(&prober);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::debug!(%from, "bad STUN response: {e}"),
                }
            }
            () = tokio::time::sleep(sleep) => {}
        }
        // Timer work runs outside the select: its output holds the
        // stop future's guard type, which must not live across an await.
        let now = ms(Instant::now());
        if prober.poll_timeout().is_some_and(|t| t <= now) {
            prober.handle_timeout(now);
        }
        if now >= next_round {
            let targets = targets(&discovery, &stun_servers, local).await;
            for t in &targets {
                if let Err(e) = prober.probe(*t, now) {
                    tracing::debug!("probe not sent: {e}");
                }
            }
            let known = !matches!(prober.mapping(), Mapping::Unknown);
            let every = if known {
                PROBE_EVERY
            } else if targets.len() < hypha_nat::probe::MIN_GROUPS {
                // Too few peers known to tell anything yet: look again soon.
                FEW_PEERS_RETRY
            } else {
                PROBE_EVERY_UNKNOWN
            };
            next_round = now.saturating_add(every.as_millis() as u64);
        }
        while let Some(t) = prober.poll_transmit() {
            if let Err(e) = endpoint.stun().send_stun(t.to, &t.bytes) {
                tracing::debug!(to = %t.to, "STUN probe not sent: {e}");
            }
        }
    }
}

/// Configured STUN servers first, then peers from the routing table, each
/// address once, not ourselves.
async fn targets(
    discovery: &Discovery,
    servers: &[SocketAddr],
    local: SocketAddr,
) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    let contacts = discovery
        .view()
        .await
        .map(|v| v.contacts)
        .unwrap_or_default();
    let peers: Vec<SocketAddr> = contacts.into_iter().map(|(_, c, _)| c.addr).collect();
    out.extend(servers.iter().copied().filter(|a| *a != local));
    out.dedup();
    // One peer per network first, then the rest.
    let mut groups: Vec<(u8, u128)> = out
        .iter()
        .map(|a| hypha_nat::probe::network_group(*a))
        .collect();
    let want = PEERS_PER_ROUND + out.len();
    for pass in 0..2 {
        for a in &peers {
            if out.len() >= want {
                return out;
            }
            let g = hypha_nat::probe::network_group(*a);
            if *a == local || out.contains(a) || (pass == 0 && groups.contains(&g)) {
                continue;
            }
            groups.push(g);
            out.push(*a);
        }
    }
    out
}
