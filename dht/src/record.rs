//! Provider records: a seeder's signed claim that it serves a model, and
//! the bounded store of other nodes' records.
//!
//! A record is checked before it is stored or used: the publisher's key
//! must hash to the publisher id, the id must carry the network's proof of
//! work ([`hypha_ledger::pow_bits`]), the signature must cover every field,
//! it must not have expired, and it may not claim to live longer than
//! honest nodes' records do ([`MAX_RECORD_TTL_MS`], plus
//! [`MAX_RECORD_CLOCK_SKEW_MS`] for a publisher whose clock runs ahead).
//!
//! # Eviction policy: nobody evicts a live record
//!
//! The store is sized against an attacker holding up to
//! [`MAX_SYBIL_IDENTITIES`] proof-of-work identities, all of them placed
//! near one key. An honest record, once stored, stays until it lapses:
//!
//! - Under a model key (and the relay key, [`relay_key`], which is one),
//!   each publisher holds at most one record; its newer record replaces its
//!   older one in place, keeping its first-seen position. A key holds at
//!   most [`MAX_PROVIDERS_PER_KEY`] publishers, more than
//!   `MAX_SYBIL_IDENTITIES` by [`HONEST_PROVIDERS_PER_KEY`]; a newcomer to
//!   a full key is refused. No live record is ever evicted for another, so
//!   a lifetime claim buys nothing, and 64 identities fill at most half a
//!   key, whether they come before the honest providers or after.
//! - Under the catalog key ([`catalog_key`]) each model name is listed once,
//!   by the first publisher seen listing it, for as long as that publisher
//!   keeps its record fresh; another publisher's record for a listed name
//!   is acknowledged (the name is listed) but not stored. A publisher may
//!   list at most [`MAX_CATALOG_NAMES_PER_PUBLISHER`] names, and the catalog
//!   holds [`MAX_CATALOG_MODELS`] names: room for
//!   [`HONEST_CATALOG_MODELS`] honest names after `MAX_SYBIL_IDENTITIES`
//!   identities have listed all the names they may.
//! - A publisher holds at most [`MAX_RECORDS_PER_PUBLISHER`] records across
//!   all keys, and the store at most [`MAX_RECORDS`]; the attacker's
//!   identities together hold at most an eighth of it.
//! - A record is held until its expiry, but never longer than
//!   `MAX_RECORD_TTL_MS` after it arrived: one claiming a little more (clock
//!   skew) is clamped, one claiming more than the skew allows is refused.
//!   Clamping within the allowance keeps an honest publisher whose clock
//!   runs a little ahead in the network; refusing beyond it fails closed
//!   for claims no honest node makes.
//!
//! A lookup applies the same bounds to what storers' answers carry (one
//! record per publisher, `MAX_CATALOG_NAMES_PER_PUBLISHER` names per
//! publisher, proof of work, at most what one key holds), so the
//! identities cannot crowd honest records out of a result either.
//!
//! Not covered here: ids ground to take *all* of a key's `K` closest
//! places, so that a record reaches no honest storer. The simulator places
//! the 64 identities among a key's closest nodes (about two thirds of its
//! 20 closest places) and honest providers are still found.
//!
//! # Cost
//!
//! Storing a record costs its checks (a signature), a scan of the records
//! under its key (at most `MAX_CATALOG_MODELS`) and `O(log n)` in the
//! store's expiry index; per-publisher counts are kept as records come and
//! go, and lapsed records leave through the index, never by a scan of the
//! whole store.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use hypha_wire::NodeId;

use crate::DhtError;

/// The lifetime of the records honest nodes publish (node's
/// `DEFAULT_RECORD_TTL`, to which it also clamps a longer configured one),
/// and the most a record may claim: a record claiming more would outlive
/// honest ones for no honest reason.
pub const MAX_RECORD_TTL_MS: u64 = 10 * 60 * 1000;
/// How often publishers republish: at half a record's lifetime, so a
/// storer that lost a record has it back long before the others' copies
/// lapse.
pub const RECORD_REPUBLISH_MS: u64 = MAX_RECORD_TTL_MS / 2;
/// How far beyond `MAX_RECORD_TTL_MS` from now a record's expiry may lie
/// when it arrives: a publisher whose clock runs this much ahead still gets
/// its records stored (held `MAX_RECORD_TTL_MS` from arrival). Synchronised
/// clocks differ by well under a second; a claim beyond this is no clock
/// error and is refused.
pub const MAX_RECORD_CLOCK_SKEW_MS: u64 = 30 * 1000;
/// Proof-of-work identities one attacker is assumed to hold, all placed
/// near one key: every per-key and per-catalog bound below is sized so that
/// this many identities cannot push out, or crowd out, honest records.
pub const MAX_SYBIL_IDENTITIES: usize = 64;
/// Honest providers a model key keeps room for once `MAX_SYBIL_IDENTITIES`
/// have taken their places: more than a consumer needs to choose from.
pub const HONEST_PROVIDERS_PER_KEY: usize = 64;
/// Providers (one record each) kept per model key.
pub const MAX_PROVIDERS_PER_KEY: usize = MAX_SYBIL_IDENTITIES + HONEST_PROVIDERS_PER_KEY;
/// Names one publisher may list in the catalog: a model's id and a few
/// aliases; with this cap `MAX_SYBIL_IDENTITIES` identities can list at
/// most a known number of names.
pub const MAX_CATALOG_NAMES_PER_PUBLISHER: usize = 4;
/// Honest model names the catalog keeps room for once
/// `MAX_SYBIL_IDENTITIES` identities have each listed their
/// `MAX_CATALOG_NAMES_PER_PUBLISHER`.
pub const HONEST_CATALOG_MODELS: usize = 256;
/// Model names the catalog keeps (one record per name).
pub const MAX_CATALOG_MODELS: usize =
    MAX_SYBIL_IDENTITIES * MAX_CATALOG_NAMES_PER_PUBLISHER + HONEST_CATALOG_MODELS;
/// Records one publisher may have stored here, across all keys: enough
/// for a model's names under their keys and the catalog, and a relay
/// record, so one identity cannot fill the store.
pub const MAX_RECORDS_PER_PUBLISHER: usize = 32;
/// Records a node stores for others, in all.
pub const MAX_RECORDS: usize = 20_000;
/// Addresses one record may list.
pub const MAX_RECORD_ADDRS: usize = 4;
/// Longest model name or backend name in a record.
pub const MAX_RECORD_NAME_BYTES: usize = 256;
/// Relays one record may list (a node behind a NAT reserves at two).
pub const MAX_RECORD_RELAYS: usize = 4;
/// The service name relays publish their records under (never a model:
/// it starts with a NUL byte, and is never put in the catalog).
pub const RELAY_SERVICE: &str = "\0hypha-relay";

// The attacker's identities hold at most an eighth of the store (2,048 of
// 20,000 records), whatever they publish.
const _: () = assert!(MAX_SYBIL_IDENTITIES * MAX_RECORDS_PER_PUBLISHER <= MAX_RECORDS / 8);
const _: () = assert!(MAX_PROVIDERS_PER_KEY > MAX_SYBIL_IDENTITIES);
const _: () = assert!(MAX_CATALOG_MODELS > MAX_SYBIL_IDENTITIES * MAX_CATALOG_NAMES_PER_PUBLISHER);
const _: () = assert!(MAX_CATALOG_NAMES_PER_PUBLISHER <= MAX_RECORDS_PER_PUBLISHER);
const _: () = assert!(MAX_RECORD_CLOCK_SKEW_MS < RECORD_REPUBLISH_MS);

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

/// Refuses a publisher whose id carries less than `required` bits of proof
/// of work (the same measure hello checks on every connection).
pub fn check_publisher_pow(publisher: &NodeId, required: u32) -> Result<(), DhtError> {
    let bits = hypha_ledger::pow_bits(publisher);
    if bits >= required {
        Ok(())
    } else {
        Err(DhtError::NoProofOfWork { bits, required })
    }
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

    /// Checks the record at `now_ms`: key, signature, bounds, expiry, and
    /// a lifetime of at most `MAX_RECORD_TTL_MS` (give or take
    /// `MAX_RECORD_CLOCK_SKEW_MS`). Proof of work is the caller's to check
    /// ([`check_publisher_pow`]), as the required bits are a setting.
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
        if self.expires_ms
            > now_ms
                .saturating_add(MAX_RECORD_TTL_MS)
                .saturating_add(MAX_RECORD_CLOCK_SKEW_MS)
        {
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

/// One stored record.
#[derive(Debug, Clone)]
struct Held {
    record: ProviderRecord,
    /// When this store drops it: its expiry, but at most
    /// `MAX_RECORD_TTL_MS` after it (or its latest refresh) arrived.
    held_until_ms: u64,
    /// First-seen order, unique in the store; a refresh keeps it.
    seq: u64,
}

impl Held {
    fn live(&self, now_ms: u64) -> bool {
        self.held_until_ms > now_ms
    }
}

/// What one publisher holds here.
#[derive(Debug, Clone, Copy, Default)]
struct Quota {
    records: usize,
    catalog_names: usize,
}

/// Records this node holds for others (see the module docs for the
/// policy).
#[derive(Debug)]
pub struct RecordStore {
    /// Proof of work a publisher's id must carry.
    min_publisher_pow_bits: u32,
    /// [`catalog_key`], hashed once.
    catalog: NodeId,
    /// Records by key, first seen first.
    by_key: HashMap<NodeId, Vec<Held>>,
    /// Every held record as `(held_until_ms, key, seq)`: lapsed records
    /// leave from the front, without a scan of the store.
    lapses: BTreeSet<(u64, NodeId, u64)>,
    /// Records held per publisher, kept as records come and go.
    per_publisher: HashMap<NodeId, Quota>,
    count: usize,
    next_seq: u64,
}

impl Default for RecordStore {
    /// A store requiring the network's default proof of work.
    fn default() -> Self {
        Self::new(hypha_ledger::DEFAULT_POW_BITS)
    }
}

impl RecordStore {
    /// An empty store refusing publishers whose id carries less than
    /// `min_publisher_pow_bits` of proof of work.
    pub fn new(min_publisher_pow_bits: u32) -> Self {
        Self {
            min_publisher_pow_bits,
            catalog: catalog_key(),
            by_key: HashMap::new(),
            lapses: BTreeSet::new(),
            per_publisher: HashMap::new(),
            count: 0,
            next_seq: 0,
        }
    }

    /// Stores a record after checking it. A publisher's newer record
    /// replaces its older one for the same key in place (an older one
    /// offered again is ignored); a newcomer to a full key is refused, and
    /// no live record is ever evicted for another.
    pub fn put(
        &mut self,
        key: NodeId,
        record: ProviderRecord,
        now_ms: u64,
    ) -> Result<(), DhtError> {
        // The cheap checks first: a hash each, before the signature.
        check_publisher_pow(&record.publisher, self.min_publisher_pow_bits)?;
        if !key_fits(&key, &record) {
            return Err(DhtError::BadRecord(
                "record stored under another model's key",
            ));
        }
        record.verify(now_ms)?;
        self.expire(now_ms);
        let catalog = key == self.catalog;
        let held_until_ms = record
            .expires_ms
            .min(now_ms.saturating_add(MAX_RECORD_TTL_MS));
        if let Some(list) = self.by_key.get_mut(&key) {
            // The record this one would replace: the same publisher's under
            // a model key; the same model name's (anyone's) in the catalog.
            let same = list.iter_mut().find(|h| {
                if catalog {
                    h.record.model == record.model
                } else {
                    h.record.publisher == record.publisher
                }
            });
            if let Some(old) = same {
                if old.record.publisher != record.publisher {
                    // The name is listed, by its first-seen publisher.
                    return Ok(());
                }
                if old.record.expires_ms > record.expires_ms {
                    // An older copy of what is held, offered again.
                    return Ok(());
                }
                self.lapses.remove(&(old.held_until_ms, key, old.seq));
                self.lapses.insert((held_until_ms, key, old.seq));
                old.held_until_ms = held_until_ms;
                old.record = record;
                return Ok(());
            }
            let max = if catalog {
                MAX_CATALOG_MODELS
            } else {
                MAX_PROVIDERS_PER_KEY
            };
            if list.len() >= max {
                return Err(DhtError::KeyFull { max });
            }
        }
        if self.count >= MAX_RECORDS {
            return Err(DhtError::StoreFull);
        }
        let quota = self.per_publisher.entry(record.publisher).or_default();
        if quota.records >= MAX_RECORDS_PER_PUBLISHER {
            return Err(DhtError::PublisherQuota {
                max: MAX_RECORDS_PER_PUBLISHER,
            });
        }
        if catalog && quota.catalog_names >= MAX_CATALOG_NAMES_PER_PUBLISHER {
            return Err(DhtError::PublisherQuota {
                max: MAX_CATALOG_NAMES_PER_PUBLISHER,
            });
        }
        quota.records += 1;
        if catalog {
            quota.catalog_names += 1;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.lapses.insert((held_until_ms, key, seq));
        self.by_key.entry(key).or_default().push(Held {
            record,
            held_until_ms,
            seq,
        });
        self.count += 1;
        Ok(())
    }

    /// The live records under `key`, first seen first.
    pub fn get(&self, key: &NodeId, now_ms: u64) -> Vec<ProviderRecord> {
        self.by_key
            .get(key)
            .map(|l| {
                l.iter()
                    .filter(|h| h.live(now_ms))
                    .map(|h| h.record.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops the records that lapsed by `now_ms`: `O(log n)` per record
    /// dropped, nothing for the rest.
    pub fn expire(&mut self, now_ms: u64) {
        while let Some(&(until, key, seq)) = self.lapses.first() {
            if until > now_ms {
                break;
            }
            self.lapses.pop_first();
            self.drop_held(key, seq);
        }
    }

    /// Removes one record (its index entry is already gone).
    fn drop_held(&mut self, key: NodeId, seq: u64) {
        let Some(list) = self.by_key.get_mut(&key) else {
            return;
        };
        let Some(i) = list.iter().position(|h| h.seq == seq) else {
            return;
        };
        let gone = list.remove(i);
        if list.is_empty() {
            self.by_key.remove(&key);
        }
        self.count -= 1;
        let publisher = gone.record.publisher;
        if let Some(q) = self.per_publisher.get_mut(&publisher) {
            q.records = q.records.saturating_sub(1);
            if key == self.catalog {
                q.catalog_names = q.catalog_names.saturating_sub(1);
            }
            if q.records == 0 {
                self.per_publisher.remove(&publisher);
            }
        }
    }

    /// Every live record held, by key.
    pub fn all(&self, now_ms: u64) -> Vec<ProviderRecord> {
        self.by_key
            .values()
            .flatten()
            .filter(|h| h.live(now_ms))
            .map(|h| h.record.clone())
            .collect()
    }

    /// Records held, lapsed ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Records `publisher` holds here, across all keys.
    pub fn held_by(&self, publisher: &NodeId) -> usize {
        self.per_publisher.get(publisher).map_or(0, |q| q.records)
    }
}
