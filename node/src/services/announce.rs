//! What a node publishes about itself in the DHT: a signed provider record
//! per model name (or the relay service), republished at half its lifetime
//! and at once when its addresses change.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hypha_dht::ProviderRecord;

use crate::identity::Identity;
use crate::services::dht::Discovery;
use crate::services::reach::Reachability;
use crate::services::relay_client::RelayClient;
use crate::services::relay_server::RelayService;
use crate::util::{unix_ms, Tasks};

/// Lifetime of the provider records a seeder publishes: the longest a DHT
/// node keeps one.
pub const DEFAULT_RECORD_TTL: Duration =
    Duration::from_millis(hypha_dht::record::MAX_RECORD_TTL_MS);
/// First retry of a publication no node stored; doubles up to half the
/// record's lifetime.
const PUBLISH_RETRY: Duration = Duration::from_secs(2);

/// What a seeder announces about itself.
#[derive(Clone)]
pub struct Announcement {
    pub names: Vec<String>,
    /// The node's own addresses (`--advertise`, or its QUIC address).
    pub addrs: Vec<SocketAddr>,
    /// `addrs` came from `--advertise`: publish them alone.
    pub explicit: bool,
    /// Otherwise the NAT's public address for us, once peers agree on it,
    /// goes first.
    pub reach: Option<Arc<Reachability>>,
    /// Relays the node holds reservations at, named in its records.
    pub relays: Option<Arc<RelayClient>>,
    /// Also list the names under the catalog key (models do; the relay
    /// service does not).
    pub catalog: bool,
    pub model_sha256: [u8; 32],
    pub context_length: u32,
    pub backend: String,
    pub price_prompt_micro: u64,
    pub price_completion_micro: u64,
    pub ttl: Duration,
}

/// Live figures a record carries: free slots and measured decode speed.
pub trait Capacity: Send + Sync {
    fn free_slots(&self) -> u32;
    fn decode_tokens_per_s(&self) -> u32;
}

impl Capacity for RelayService {
    /// A relay's record tells how many more reservations it takes.
    fn free_slots(&self) -> u32 {
        self.free()
    }

    fn decode_tokens_per_s(&self) -> u32 {
        0
    }
}

impl Announcement {
    /// The addresses to publish now.
    fn current_addrs(&self) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        if !self.explicit {
            if let Some(r) = &self.reach {
                out.extend(
                    r.view()
                        .candidates
                        .iter()
                        .filter(|c| c.kind == hypha_nat::CandidateKind::ServerReflexive)
                        .map(|c| c.addr),
                );
            }
        }
        for a in &self.addrs {
            if !out.contains(a) {
                out.push(*a);
            }
        }
        out.truncate(hypha_dht::record::MAX_RECORD_ADDRS);
        out
    }

    /// The relays to publish now.
    fn current_relays(&self) -> Vec<hypha_dht::Contact> {
        let mut out = self.relays.as_ref().map(|r| r.relays()).unwrap_or_default();
        out.truncate(hypha_dht::record::MAX_RECORD_RELAYS);
        out
    }
}

/// How often a publisher checks whether its addresses changed.
const ADDRS_CHECK: Duration = Duration::from_secs(1);

/// Publishes the seeder's records until the node stops, republishing at half
/// their lifetime, and at once when its addresses change (its NAT's public
/// address became known).
pub async fn publish_loop(
    discovery: Discovery,
    identity: Arc<Identity>,
    what: Announcement,
    capacity: Arc<dyn Capacity>,
    tasks: Tasks,
) {
    let half_life = what.ttl / 2;
    let mut retry = PUBLISH_RETRY;
    loop {
        let mut stored_everywhere = true;
        let addrs = what.current_addrs();
        let relays = what.current_relays();
        for name in &what.names {
            let record = ProviderRecord {
                publisher: identity.id(),
                public_key: identity.public_key(),
                addrs: addrs.clone(),
                relays: relays.clone(),
                model: name.clone(),
                model_sha256: what.model_sha256,
                context_length: what.context_length,
                backend: what.backend.clone(),
                decode_tokens_per_s: capacity.decode_tokens_per_s(),
                free_slots: capacity.free_slots(),
                price_prompt_micro: what.price_prompt_micro,
                price_completion_micro: what.price_completion_micro,
                expires_ms: unix_ms().saturating_add(what.ttl.as_millis() as u64),
                signature: [0; 64],
            }
            .sign(identity.signing_key());
            // Under the catalog too, so nodes that do not know the name
            // can list the model.
            let listed = if what.catalog {
                discovery
                    .publish(hypha_dht::catalog_key(), record.clone())
                    .await
            } else {
                0
            };
            let stored = discovery.publish(hypha_dht::model_key(name), record).await;
            tracing::debug!(model = %name, stored, listed, "provider record published");
            if stored == 0 {
                stored_everywhere = false;
            }
        }
        let wait = if stored_everywhere {
            retry = PUBLISH_RETRY;
            half_life
        } else {
            let w = retry.min(half_life);
            retry = (retry * 2).min(half_life);
            w
        };
        let until = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < until
            && what.current_addrs() == addrs
            && what.current_relays() == relays
        {
            let step = until
                .saturating_duration_since(tokio::time::Instant::now())
                .min(ADDRS_CHECK);
            tokio::select! {
                () = tasks.stopping() => return,
                () = tokio::time::sleep(step) => {}
            }
        }
    }
}
