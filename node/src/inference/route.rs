//! The consumer's routing: which providers serve a model (configured or
//! connected peers whose hello lists it, and the providers the DHT names),
//! in which order, and the start of a request on the best that answers.
//!
//! Providers (cached for [`PROVIDER_CACHE`] or until their records expire)
//! are tried best first by [`score`]: recent failures, then measured
//! round-trip time, advertised free slots and decode speed; at equal
//! score the cheaper first ([`typical_cost`]). Prices: a provider whose
//! price is above this node's ceilings ([`SpendLimits`]) is not asked; one
//! whose hello names a price above its own signed provider record is
//! gouging: it is not asked, and counted as a failure in its score. The
//! request carries this node's cap per request. A seeder that
//! refuses (busy, out of free tier, unknown model) or fails before
//! answering is skipped for the next one, so a client only sees an error
//! when no provider could start its request. A seeder must answer a
//! request (`Accepted`, or any frame) within
//! [`crate::inference::remote::START_TIMEOUT`]: a connection to a node that
//! died without closing it looks open until QUIC's idle timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypha_dht::ProviderRecord;
use hypha_wire::{InferenceRequest, NodeId, Refusal};

use crate::inference::remote::{Party, RemoteError, RemoteGeneration, SpendLimits};
use crate::inference::RequestId;
use crate::metrics::Metrics;
use crate::net::addr::PeerAddr;
use crate::net::pool::{Connections, MAX_CONNECTIONS, MAX_PEERS};
use crate::net::proto::PeerError;
use crate::services::dht::Discovery;
use crate::services::dialer::{Dialer, Health, Target, FAILURE_MEMORY};
use crate::util::{lock, unix_ms, BoundedMap, Overflow};

/// Peers one node may be configured with.
pub const MAX_CONFIGURED_PEERS: usize = MAX_PEERS;
// Configured peers are pinned in the pool: all of them must fit.
const _: () = assert!(MAX_CONFIGURED_PEERS <= MAX_CONNECTIONS);
/// How long providers found through the DHT are reused before asking
/// again (sooner when their records expire): long enough to spare a lookup
/// per request, short enough to notice new seeders.
pub const PROVIDER_CACHE: Duration = Duration::from_secs(30);
/// Providers tried for one request before giving up.
pub const MAX_PROVIDER_ATTEMPTS: usize = 4;
/// Models whose providers one `GET /v1/models` looks up.
const MAX_LISTED_MODELS: usize = 64;
/// Providers over this node's price ceilings an error names; the rest are
/// counted (the DHT may hold many).
const MAX_LISTED_OFFERS: usize = 4;
/// Of those, lookups running at once.
const LISTING_LOOKUPS: usize = 8;
/// Models remembered with cached providers.
const MAX_CACHED_MODELS: usize = 256;
/// A provider a request may go to.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub addr: PeerAddr,
    /// Its record named several addresses (its own and its NAT's): it sits
    /// behind a NAT, so a hole is punched before dialing it.
    pub punch: bool,
    /// From its provider record, when the DHT named it.
    pub free_slots: Option<u32>,
    pub decode_tokens_per_s: Option<u32>,
    /// Context tokens per request its record offers.
    pub context_length: Option<u32>,
    /// Relays its record names: used when no direct path opens within
    /// [`crate::services::dialer::DIRECT_BUDGET`].
    pub relays: Vec<PeerAddr>,
    /// Prices (prompt, completion) its signed provider record names.
    pub record_price: Option<(u64, u64)>,
    /// Prices its last hello named, when connected before.
    pub hello_price: Option<(u64, u64)>,
}

impl Candidate {
    /// The prices it is known to ask: its signed record's, else its
    /// hello's.
    pub fn price(&self) -> Option<(u64, u64)> {
        self.record_price.or(self.hello_price)
    }
}

/// Prompt and completion tokens of the request that orders providers of
/// equal score by price.
const TYPICAL_TOKENS: (u64, u64) = (512, 256);

/// What a typical request costs at `price` (an unknown price counts as
/// the default one).
pub fn typical_cost(price: Option<(u64, u64)>) -> u64 {
    let (p, c) = price.unwrap_or((
        crate::inference::receipts::DEFAULT_PRICE_PROMPT_MICRO,
        crate::inference::receipts::DEFAULT_PRICE_COMPLETION_MICRO,
    ));
    p.saturating_mul(TYPICAL_TOKENS.0)
        .saturating_add(c.saturating_mul(TYPICAL_TOKENS.1))
}

/// True when `hello` asks more than `record` in either price.
pub fn gouges(hello: (u64, u64), record: (u64, u64)) -> bool {
    hello.0 > record.0 || hello.1 > record.1
}

/// A provider's cost, lower is better, in rough milliseconds: recent
/// failures dominate (a seeder that just failed is tried last), then the
/// round trip, then this node's requests already running there (each
/// costs [`RUNNING_COST_MS`], so concurrent requests spread over seeders
/// instead of queueing on the nearest), whether it advertised a free slot,
/// and how fast it decodes (a 100 tokens/s seeder adds 100).
pub fn score(
    c: &Candidate,
    health: &Health,
    rtt: Option<Duration>,
    running: u32,
    now: Instant,
) -> u64 {
    let recent = health
        .last_failure
        .is_some_and(|t| now.saturating_duration_since(t) < FAILURE_MEMORY);
    let failures = if recent {
        u64::from(health.failures) * 100_000
    } else {
        0
    };
    // An unknown round trip costs about a dial on a distant link.
    // Round trips within RTT_GRAIN_MS of each other count as equal (the
    // estimate jitters by that much), so equal providers share the load.
    let rtt_ms = rtt.map_or(200, |d| d.as_millis() as u64 / RTT_GRAIN_MS * RTT_GRAIN_MS);
    let busy = if c.free_slots == Some(0) { 2_000 } else { 0 };
    let speed = c
        .decode_tokens_per_s
        .filter(|&t| t > 0)
        .map_or(200, |t| 10_000 / u64::from(t));
    failures + rtt_ms + u64::from(running) * RUNNING_COST_MS + busy + speed
}

/// Resolution of the round trip in [`score`].
pub const RTT_GRAIN_MS: u64 = 5;

/// What one of this node's requests running on a seeder adds to its score:
/// about a short request's share of a busy seeder's time.
pub const RUNNING_COST_MS: u64 = 150;

pub(crate) struct CachedProviders {
    records: Vec<ProviderRecord>,
    until: Instant,
}

/// The peers this node sends requests to.
/// A model on the network, as a node can see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkModel {
    pub name: String,
    /// The ids of the peers known to serve it.
    pub providers: Vec<NodeId>,
    /// The smallest context (tokens per request) its providers published,
    /// when records of them are known: what a client may count on from
    /// whichever serves it.
    pub context_length: Option<u32>,
}

pub struct Peers {
    dialer: Arc<Dialer>,
    configured: Vec<PeerAddr>,
    discovery: Option<Discovery>,
    metrics: Arc<Metrics>,
    party: Arc<Party>,
    next_request_id: AtomicU64,
    /// Providers per model the DHT named lately.
    cache: std::sync::Mutex<BoundedMap<String, CachedProviders>>,
}

impl Peers {
    pub fn new(
        dialer: Arc<Dialer>,
        configured: Vec<PeerAddr>,
        discovery: Option<Discovery>,
        metrics: Arc<Metrics>,
        party: Arc<Party>,
    ) -> Result<Self, String> {
        if configured.len() > MAX_CONFIGURED_PEERS {
            return Err(format!("at most {MAX_CONFIGURED_PEERS} peers"));
        }
        let mut seed = [0u8; 8];
        // Request ids only need to differ between this node's requests; a
        // random start keeps them apart across restarts.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
        Ok(Self {
            dialer,
            configured,
            discovery,
            metrics,
            party,
            next_request_id: AtomicU64::new(u64::from_le_bytes(seed) >> 1),
            cache: std::sync::Mutex::new(BoundedMap::new(MAX_CACHED_MODELS, Overflow::Clear)),
        })
    }

    /// A fresh request id.
    pub fn next_request_id(&self) -> RequestId {
        RequestId(self.next_request_id.fetch_add(1, Ordering::Relaxed))
    }

    pub fn connections(&self) -> &Arc<Connections> {
        self.dialer.connections()
    }

    /// How this node reaches its peers.
    pub fn dialer(&self) -> &Arc<Dialer> {
        &self.dialer
    }

    /// What this node saw of a provider lately.
    pub fn health(&self, id: &NodeId) -> Health {
        self.dialer.health(id)
    }

    pub fn discovery(&self) -> Option<&Discovery> {
        self.discovery.as_ref()
    }

    /// Every model on the network this node can find, with its providers'
    /// ids: peers' hellos, the DHT's catalog (each listed model's providers
    /// looked up, or taken from the cache), records held here.
    pub async fn models(&self) -> Vec<NetworkModel> {
        if let Some(d) = &self.discovery {
            use futures_util::StreamExt as _;
            let names = d.catalog().await;
            futures_util::stream::iter(names.into_iter().take(MAX_LISTED_MODELS))
                .map(|n: String| async move {
                    self.discovered(&n, false).await;
                })
                .buffer_unordered(LISTING_LOOKUPS)
                .collect::<Vec<()>>()
                .await;
        }
        let mut out: Vec<NetworkModel> = Vec::new();
        let mut add = |model: &str, id: NodeId, ctx: Option<u32>| {
            let i = match out.iter().position(|m| m.name == model) {
                Some(i) => i,
                None => {
                    out.push(NetworkModel {
                        name: model.to_owned(),
                        providers: Vec::new(),
                        context_length: None,
                    });
                    out.len() - 1
                }
            };
            let m = &mut out[i];
            if !m.providers.contains(&id) {
                m.providers.push(id);
            }
            if let Some(c) = ctx.filter(|c| *c > 0) {
                m.context_length = Some(m.context_length.map_or(c, |k| k.min(c)));
            }
        };
        for p in self.connections().known() {
            for m in &p.models {
                add(m, p.addr.id, Some(p.context_length));
            }
        }
        let now = unix_ms();
        let cached: Vec<ProviderRecord> = lock(&self.cache)
            .values()
            .flat_map(|c| c.records.iter().cloned())
            .collect();
        for r in &cached {
            if r.expires_ms > now {
                add(&r.model, r.publisher, Some(r.context_length));
            }
        }
        out
    }

    /// The configured peers and whether each is connected now.
    pub fn status(&self) -> Vec<(PeerAddr, bool)> {
        let known = self.connections().known();
        self.configured
            .iter()
            .map(|p| {
                let up = known.iter().any(|k| k.addr.id == p.id && k.connected);
                (p.clone(), up)
            })
            .collect()
    }

    /// Dials every configured peer not yet connected, to learn what they
    /// serve; the peers that could not be reached, and why.
    pub async fn connect_all(&self) -> Vec<(PeerAddr, PeerError)> {
        let dials = self.configured.iter().map(|p| async move {
            match self.connections().get(p, false).await {
                Ok(_) => None,
                Err(err) => {
                    tracing::warn!(peer = %p, "cannot connect: {err}");
                    Some((p.clone(), err))
                }
            }
        });
        futures_util::future::join_all(dials)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

impl Peers {
    /// Providers of `model` the DHT names, from the cache while fresh.
    async fn discovered(&self, model: &str, refresh: bool) -> Vec<ProviderRecord> {
        let Some(d) = &self.discovery else {
            return Vec::new();
        };
        let now = Instant::now();
        if !refresh {
            if let Some(c) = lock(&self.cache).get(model) {
                if c.until > now {
                    return c.records.clone();
                }
            }
        }
        let Some(records) = d.lookup_providers(model).await else {
            // A lookup that could not finish is not remembered.
            return Vec::new();
        };
        let soonest = records.iter().map(|r| r.expires_ms).min();
        let life = soonest.map_or(PROVIDER_CACHE, |ms| {
            Duration::from_millis(ms.saturating_sub(unix_ms())).min(PROVIDER_CACHE)
        });
        lock(&self.cache).insert(
            model.to_owned(),
            CachedProviders {
                records: records.clone(),
                until: now + life,
            },
            |c| c.until <= now,
        );
        records
    }

    /// Every known provider of `model`, best first; `salt` orders
    /// providers of equal score (a request's id spreads requests over
    /// equally good seeders).
    pub async fn candidates(&self, model: &str, refresh: bool, salt: u64) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = self
            .connections()
            .known()
            .into_iter()
            .filter(|k| k.models.iter().any(|m| m == model))
            // A relayed slot is only reached again through a relay its
            // record names.
            .filter(|k| k.connected || !crate::net::addr::is_virtual(&k.addr.addr))
            .map(|k| Candidate {
                addr: k.addr,
                punch: false,
                free_slots: None,
                decode_tokens_per_s: None,
                context_length: None,
                relays: Vec::new(),
                record_price: None,
                hello_price: k.prices,
            })
            .collect();
        let me = self.party.identity.id();
        for r in self.discovered(model, refresh).await {
            if r.publisher == me {
                continue;
            }
            let Some(addr) = r.addrs.first() else {
                continue;
            };
            let c = Candidate {
                addr: PeerAddr {
                    id: r.publisher,
                    addr: *addr,
                },
                punch: r.addrs.len() > 1,
                free_slots: Some(r.free_slots),
                decode_tokens_per_s: Some(r.decode_tokens_per_s),
                context_length: Some(r.context_length),
                relays: r
                    .relays
                    .iter()
                    .filter(|c| c.id != me && c.id != r.publisher)
                    .map(|c| PeerAddr {
                        id: c.id,
                        addr: c.addr,
                    })
                    .collect(),
                record_price: Some((r.price_prompt_micro, r.price_completion_micro)),
                hello_price: None,
            };
            match out.iter_mut().find(|o| o.addr.id == r.publisher) {
                Some(o) => {
                    o.free_slots = c.free_slots;
                    o.decode_tokens_per_s = c.decode_tokens_per_s;
                    o.context_length = c.context_length;
                    o.relays = c.relays;
                    o.record_price = c.record_price;
                    if crate::net::addr::is_virtual(&o.addr.addr) {
                        o.addr = c.addr;
                        o.punch = c.punch;
                    }
                }
                None => out.push(c),
            }
        }
        let now = Instant::now();
        let mut scored: Vec<((u64, u64, u64), Candidate)> = out
            .into_iter()
            .map(|c| {
                let running = self.dialer.running_on(&c.addr.id);
                let s = score(
                    &c,
                    &self.health(&c.addr.id),
                    self.connections().rtt(&c.addr.id),
                    running,
                    now,
                );
                let mut id8 = [0u8; 8];
                id8.copy_from_slice(c.addr.id.0.get(..8).unwrap_or(&[0; 8]));
                let tie = mix(u64::from_le_bytes(id8) ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                ((s, typical_cost(c.price()), tie), c)
            })
            .collect();
        scored.sort_by_key(|(s, _)| *s);
        scored.into_iter().map(|(_, c)| c).collect()
    }

    /// Starts `req` on the best provider of its model and waits for the
    /// first event, so that a refusal or an unreachable seeder is an error
    /// here, before any response is committed; a provider that refuses or
    /// fails is skipped for the next.
    pub async fn start(&self, mut req: InferenceRequest) -> Result<RemoteGeneration, RemoteError> {
        let limits = self.party.limits;
        req.max_credits = limits.max_request_credits;
        let salt = req.request_id;
        let mut providers = self.candidates(&req.model, false, salt).await;
        if providers.is_empty() {
            // Configured peers not reached yet may serve it, and the DHT
            // may know of providers newer than the cache.
            let failures = self.connect_all().await;
            providers = self.candidates(&req.model, true, salt).await;
            if providers.is_empty() && !failures.is_empty() {
                let failures = failures
                    .iter()
                    .map(|(p, e)| format!("{p} ({e})"))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(RemoteError::Unreachable {
                    model: req.model.clone(),
                    failures,
                });
            }
        }
        if providers.is_empty() {
            return Err(RemoteError::NoProvider {
                model: req.model.clone(),
                available: self.models().await.into_iter().map(|m| m.name).collect(),
            });
        }
        let mut last = None;
        // Providers above the ceilings are not asked.
        let mut over_price: Vec<(NodeId, (u64, u64))> = Vec::new();
        providers.retain(|c| match c.price() {
            Some(p) if !limits.admits(p.0, p.1) => {
                over_price.push((c.addr.id, p));
                false
            }
            _ => true,
        });
        let providers: Vec<Candidate> = providers.into_iter().take(MAX_PROVIDER_ATTEMPTS).collect();
        for (i, c) in providers.iter().enumerate() {
            let peer = c.addr.id;
            for fresh in [false, true] {
                // Bounded: a provider that cannot be punched to is dialed
                // anyway, then reached through its relays, and the next
                // one tried if all that fails.
                let target = Target {
                    addr: &c.addr,
                    punch: c.punch,
                    relays: &c.relays,
                };
                let (conn, terms) = match self.dialer.connect(target, fresh).await {
                    Ok(c) => c,
                    Err(source) => {
                        self.dialer.failed(peer);
                        last = Some(RemoteError::Failed { peer, source });
                        break;
                    }
                };
                if !terms.offer.models.contains(&req.model) {
                    // Its record outlived its offer.
                    break;
                }
                let asks = (
                    terms.offer.price_prompt_micro,
                    terms.offer.price_completion_micro,
                );
                if let Some(record) = c.record_price.filter(|&r| gouges(asks, r)) {
                    tracing::warn!(%peer, ?asks, ?record, "seeder's hello asks more than its signed record: not asked");
                    self.metrics.peer_gouging.fetch_add(1, Ordering::Relaxed);
                    self.dialer.failed(peer);
                    last = Some(RemoteError::Gouging { peer, asks, record });
                    break;
                }
                if !limits.admits(asks.0, asks.1) {
                    over_price.push((peer, asks));
                    break;
                }
                let guard = self.dialer.count_request(peer, &conn);
                let mark = Some((conn.stable_id(), conn.stats().udp_rx.datagrams));
                match RemoteGeneration::open(conn, terms, &req, &self.metrics, &self.party).await {
                    Ok(mut g) => {
                        self.dialer.succeeded(&peer);
                        g.running = Some(guard);
                        return Ok(g);
                    }
                    Err(
                        err @ RemoteError::Refused {
                            refusal: Refusal::BadRequest,
                            ..
                        },
                    ) => {
                        // A bad request stays bad elsewhere, unless a
                        // provider further down offers a longer context
                        // (the prompt may only be too long for this one).
                        let longer = providers.iter().skip(i + 1).any(|o| {
                            o.context_length.unwrap_or(0) > c.context_length.unwrap_or(u32::MAX)
                        });
                        if !longer {
                            return Err(err);
                        }
                        tracing::info!(%peer, "refused as too long here; a longer context is on offer: {err}");
                        last = Some(err);
                        break;
                    }
                    Err(err @ RemoteError::Refused { .. }) => {
                        tracing::info!(%peer, "seeder refused, trying the next: {err}");
                        last = Some(err);
                        break;
                    }
                    Err(
                        err @ RemoteError::Failed {
                            source: PeerError::Timeout(_),
                            ..
                        },
                    ) => {
                        tracing::info!(%peer, "seeder did not answer, trying the next: {err}");
                        self.connections().discard_if_silent(&peer, mark);
                        self.dialer.failed(peer);
                        last = Some(err);
                        break;
                    }
                    Err(err) => {
                        tracing::info!(%peer, fresh, "request could not start: {err}");
                        if fresh {
                            self.dialer.failed(peer);
                        }
                        last = Some(err);
                    }
                }
            }
        }
        if last.is_none() && !over_price.is_empty() {
            return Err(over_price_error(&req.model, &limits, &over_price));
        }
        Err(last.unwrap_or(RemoteError::NoProvider {
            model: req.model.clone(),
            available: Vec::new(),
        }))
    }
}

/// Providers asked nothing because they price above the ceilings.
fn over_price_error(
    model: &str,
    limits: &SpendLimits,
    offers: &[(NodeId, (u64, u64))],
) -> RemoteError {
    let mut listed = offers
        .iter()
        .take(MAX_LISTED_OFFERS)
        .map(|(id, (p, c))| format!("{id} at {p}/{c} micro-credits per prompt/completion token"))
        .collect::<Vec<_>>()
        .join(", ");
    if offers.len() > MAX_LISTED_OFFERS {
        listed.push_str(&format!(" and {} more", offers.len() - MAX_LISTED_OFFERS));
    }
    let offers = listed;
    RemoteError::OverPrice {
        model: model.to_owned(),
        ceilings: limits.describe(),
        offers,
    }
}

/// SplitMix64's finalizer: every input bit moves every output bit, so
/// consecutive request ids order equal providers independently.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(free: Option<u32>, tps: Option<u32>) -> Candidate {
        Candidate {
            addr: PeerAddr {
                id: NodeId([1; 32]),
                addr: "127.0.0.1:1".parse().unwrap(),
            },
            punch: false,
            free_slots: free,
            decode_tokens_per_s: tps,
            context_length: None,
            relays: Vec::new(),
            record_price: None,
            hello_price: None,
        }
    }

    #[test]
    fn score_orders_failures_load_round_trip_and_capacity() {
        let now = Instant::now();
        let fresh = Health::default();
        let failed = Health {
            failures: 1,
            last_failure: Some(now),
        };
        let ms = Duration::from_millis;
        let c = cand(Some(2), Some(100));
        // A recent failure outweighs everything; an old one counts for
        // nothing.
        assert!(score(&c, &failed, Some(ms(1)), 0, now) > score(&c, &fresh, None, 8, now));
        let old = now + FAILURE_MEMORY + ms(1);
        assert_eq!(
            score(&c, &failed, Some(ms(1)), 0, old),
            score(&c, &fresh, Some(ms(1)), 0, old)
        );
        // A near seeder wins over an unknown one until two of our requests
        // run on it.
        assert!(score(&c, &fresh, Some(ms(1)), 1, now) < score(&c, &fresh, None, 0, now));
        assert!(score(&c, &fresh, Some(ms(1)), 2, now) > score(&c, &fresh, None, 0, now));
        // No free slot, or slower decoding, costs more.
        assert!(
            score(&cand(Some(0), Some(100)), &fresh, None, 0, now)
                > score(&cand(Some(1), Some(100)), &fresh, None, 0, now)
        );
        assert!(
            score(&cand(None, Some(20)), &fresh, None, 0, now)
                > score(&cand(None, Some(200)), &fresh, None, 0, now)
        );
    }
}
