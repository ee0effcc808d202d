//! Provider records: a seeder's signed claim that it serves a model, and
//! the bounded store of other nodes' records.
//!
//! A record is checked before it is stored or used: the publisher's key
//! must hash to the publisher id, the signature must cover every field, it
//! must not have expired, and it may not claim to live longer than
//! [`MAX_RECORD_TTL_MS`]. Records are stored under the model's key
//! ([`model_key`]), at most [`MAX_PROVIDERS_PER_KEY`] per key and
//! [`MAX_RECORDS`] in all; a publisher's newer record replaces its older one.

use std::collections::HashMap;
use std::net::SocketAddr;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use hypha_wire::NodeId;

use crate::DhtError;

/// A record may claim at most this lifetime; publishers republish at half.
pub const MAX_RECORD_TTL_MS: u64 = 60 * 60 * 1000;
/// Records a node stores for others, in all.
pub const MAX_RECORDS: usize = 20_000;
/// Providers kept per model key: more than a consumer needs to choose from.
pub const MAX_PROVIDERS_PER_KEY: usize = 32;
/// Addresses one record may list.
pub const MAX_RECORD_ADDRS: usize = 4;
/// Longest model name or backend name in a record.
pub const MAX_RECORD_NAME_BYTES: usize = 256;
/// Relays one record may list (a node behind a NAT reserves at two).
pub const MAX_RECORD_RELAYS: usize = 4;
/// The service name relays publish their records under (never a model:
/// it starts with a NUL byte, and is never put in the catalog).
pub const RELAY_SERVICE: &str = "\0hypha-relay";

/// A seeder's signed offer of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderRecord {
    pub publisher: NodeId,
    pub public_key: [u8; 32],
    pub addrs: Vec<SocketAddr>,
    /// Relays the publisher holds a reservation at: how to reach it when
    /// none of `addrs` can be dialed or punched.
    pub relays: Vec<crate::Contact>,
    pub model: String,
    pub model_sha256: [u8; 32],
    pub context_length: u32,
    pub backend: String,
    /// Measured single-stream decode speed.
    pub decode_tokens_per_s: u32,
    pub free_slots: u32,
    pub price_prompt_micro: u64,
    pub price_completion_micro: u64,
    /// Unix milliseconds after which the record is void.
    pub expires_ms: u64,
    pub signature: [u8; 64],
}

/// Model names the catalog keeps (one record per name).
pub const MAX_CATALOG_MODELS: usize = 256;

/// The key every seeder also stores its records under, one per model name
/// kept: how a node learns which models the network offers without
/// knowing their names.
pub fn catalog_key() -> NodeId {
    model_key("\0hypha-catalog")
}

/// True when `record` may be stored under `key`: its model's key or the
/// catalog.
pub fn key_fits(key: &NodeId, record: &ProviderRecord) -> bool {
    *key == model_key(&record.model) || *key == catalog_key()
}

/// The key relays publish their records under.
pub fn relay_key() -> NodeId {
    model_key(RELAY_SERVICE)
}

/// The DHT key a model's providers are stored under.
pub fn model_key(model: &str) -> NodeId {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"hypha-model\0");
    ctx.update(model.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    NodeId(out)
}

fn node_id_of(key: &[u8; 32]) -> NodeId {
    let d = ring::digest::digest(&ring::digest::SHA256, key);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    NodeId(out)
}

impl ProviderRecord {
    /// The bytes the signature covers: every field but the signature, in a
    /// fixed layout.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(192 + self.model.len() + self.backend.len());
        out.extend_from_slice(b"hypha-provider-2\0");
        out.extend_from_slice(&self.publisher.0);
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(&(self.addrs.len() as u32).to_le_bytes());
        for a in &self.addrs {
            let s = a.to_string();
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&(self.relays.len() as u32).to_le_bytes());
        for r in &self.relays {
            out.extend_from_slice(&r.id.0);
            let s = r.addr.to_string();
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        for s in [&self.model, &self.backend] {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&self.model_sha256);
        out.extend_from_slice(&self.context_length.to_le_bytes());
        out.extend_from_slice(&self.decode_tokens_per_s.to_le_bytes());
        out.extend_from_slice(&self.free_slots.to_le_bytes());
        out.extend_from_slice(&self.price_prompt_micro.to_le_bytes());
        out.extend_from_slice(&self.price_completion_micro.to_le_bytes());
        out.extend_from_slice(&self.expires_ms.to_le_bytes());
        out
    }

    /// Signs the record with the publisher's key (which also sets the
    /// publisher id and public key).
    pub fn sign(mut self, key: &SigningKey) -> Self {
        self.public_key = key.verifying_key().to_bytes();
        self.publisher = node_id_of(&self.public_key);
        self.signature = key.sign(&self.signed_bytes()).to_bytes();
        self
    }

    /// Checks the record at `now_ms`: key, signature, bounds, expiry.
    pub fn verify(&self, now_ms: u64) -> Result<(), DhtError> {
        if self.addrs.len() > MAX_RECORD_ADDRS
            || self.relays.len() > MAX_RECORD_RELAYS
            || self.model.len() > MAX_RECORD_NAME_BYTES
            || self.backend.len() > MAX_RECORD_NAME_BYTES
        {
            return Err(DhtError::BadRecord("record fields over their limits"));
        }
        if node_id_of(&self.public_key) != self.publisher {
            return Err(DhtError::BadRecord("key does not match the publisher id"));
        }
        if self.expires_ms <= now_ms {
            return Err(DhtError::BadRecord("record expired"));
        }
        if self.expires_ms > now_ms.saturating_add(MAX_RECORD_TTL_MS) {
            return Err(DhtError::BadRecord("record claims too long a life"));
        }
        let key = VerifyingKey::from_bytes(&self.public_key)
            .map_err(|_| DhtError::BadRecord("invalid public key"))?;
        key.verify(
            &self.signed_bytes(),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| DhtError::BadRecord("signature does not verify"))
    }
}

/// Records this node holds for others.
#[derive(Debug, Default)]
pub struct RecordStore {
    by_key: HashMap<NodeId, Vec<ProviderRecord>>,
    count: usize,
    /// Records held per publisher (a node serves one model and its names).
    per_publisher: HashMap<NodeId, usize>,
}

/// Records one publisher may have stored here, across all keys: enough
/// for a model's names under their keys and the catalog, so one identity
/// cannot fill the store or the catalog.
pub const MAX_RECORDS_PER_PUBLISHER: usize = 32;

impl RecordStore {
    /// Stores a record after checking it; a publisher's record replaces its
    /// older one for the same key.
    pub fn put(
        &mut self,
        key: NodeId,
        record: ProviderRecord,
        now_ms: u64,
    ) -> Result<(), DhtError> {
        record.verify(now_ms)?;
        if !key_fits(&key, &record) {
            return Err(DhtError::BadRecord(
                "record stored under another model's key",
            ));
        }
        self.expire(now_ms);
        let catalog = key == catalog_key();
        // The record this one replaces: the same publisher's under a model
        // key; the same model name's (anyone's) in the catalog.
        let list = self.by_key.entry(key).or_default();
        let same = list.iter().position(|r| {
            if catalog {
                r.model == record.model
            } else {
                r.publisher == record.publisher
            }
        });
        if let Some(i) = same {
            let Some(old) = list.get(i) else {
                return Err(DhtError::StoreFull);
            };
            if old.expires_ms > record.expires_ms {
                return Ok(());
            }
            let old_publisher = old.publisher;
            if old_publisher != record.publisher {
                self.admit(record.publisher)?;
                self.release(&old_publisher);
            }
            if let Some(slot) = self.by_key.get_mut(&key).and_then(|l| l.get_mut(i)) {
                *slot = record;
            }
            return Ok(());
        }
        let full = if catalog {
            MAX_CATALOG_MODELS
        } else {
            MAX_PROVIDERS_PER_KEY
        };
        if list.len() >= full {
            if catalog {
                return Err(DhtError::StoreFull);
            }
            // Keep the longest-lived records.
            let Some((i, soonest)) = list
                .iter()
                .enumerate()
                .min_by_key(|(_, r)| r.expires_ms)
                .map(|(i, r)| (i, r.expires_ms))
            else {
                return Err(DhtError::StoreFull);
            };
            if soonest >= record.expires_ms {
                return Err(DhtError::StoreFull);
            }
            let gone = list.swap_remove(i);
            self.count -= 1;
            self.release(&gone.publisher);
        }
        if self.count >= MAX_RECORDS {
            return Err(DhtError::StoreFull);
        }
        self.admit(record.publisher)?;
        self.by_key.entry(key).or_default().push(record);
        self.count += 1;
        Ok(())
    }

    /// The live records under `key`.
    pub fn get(&self, key: &NodeId, now_ms: u64) -> Vec<ProviderRecord> {
        self.by_key
            .get(key)
            .map(|l| {
                l.iter()
                    .filter(|r| r.expires_ms > now_ms)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops expired records.
    pub fn expire(&mut self, now_ms: u64) {
        let mut count = 0;
        let mut per_publisher: HashMap<NodeId, usize> = HashMap::new();
        self.by_key.retain(|_, l| {
            l.retain(|r| r.expires_ms > now_ms);
            count += l.len();
            for r in l.iter() {
                *per_publisher.entry(r.publisher).or_default() += 1;
            }
            !l.is_empty()
        });
        self.count = count;
        self.per_publisher = per_publisher;
    }

    /// One more record of `publisher`, within its quota.
    fn admit(&mut self, publisher: NodeId) -> Result<(), DhtError> {
        let n = self.per_publisher.entry(publisher).or_default();
        if *n >= MAX_RECORDS_PER_PUBLISHER {
            return Err(DhtError::StoreFull);
        }
        *n += 1;
        Ok(())
    }

    fn release(&mut self, publisher: &NodeId) {
        if let Some(n) = self.per_publisher.get_mut(publisher) {
            *n = n.saturating_sub(1);
        }
    }

    /// Every live record held, by key.
    pub fn all(&self, now_ms: u64) -> Vec<ProviderRecord> {
        self.by_key
            .values()
            .flatten()
            .filter(|r| r.expires_ms > now_ms)
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}
