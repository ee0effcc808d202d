//! The DHT state machine: answers peers' requests, runs iterative lookups,
//! keeps the routing table fresh.
//!
//! A lookup keeps candidates ordered by distance to its target. It asks the
//! closest ones it has not asked yet, at most `alpha` at a time, adds the
//! closer contacts each answer names, and ends when the `k` closest live
//! candidates have all answered (or nobody is left to ask). A request that
//! times out counts as a failure: the contact is marked failed in the
//! lookup, and after `MAX_FAILURES` in a row it leaves the routing table.

use std::collections::{BTreeMap, HashMap, VecDeque};

use hypha_wire::NodeId;

use crate::notices::{self, NoticeStore, MAX_NOTICES_FOUND};
use crate::receipts::{self, ReceiptStore, MAX_RECEIPTS_PER_KEY, MAX_RECEIPTS_PER_PUT};
use crate::record::{self, ProviderRecord, RecordStore};
use crate::table::{bucket_index, Contact, RoutingTable, Update};
use crate::{DhtError, Distance, Rng, ALPHA, K};
use hypha_ledger::{Notice, SignedReceipt, VerifiedNotice, VerifiedReceipt};

/// How long a request may go unanswered before it counts as failed.
pub const REQUEST_TIMEOUT_MS: u64 = 2_000;
/// Buckets nobody touched for this long are refreshed with a lookup.
pub const REFRESH_INTERVAL_MS: u64 = 15 * 60 * 1000;
/// Lookups running at once.
pub const MAX_QUERIES: usize = 256;
/// Requests in flight at once (lookups and eviction pings).
pub const MAX_INFLIGHT: usize = MAX_QUERIES * ALPHA + 256;
/// Refresh lookups started per timer tick.
const REFRESHES_PER_TICK: usize = 4;

/// Tunables; `Config::default()` is what nodes run.
#[derive(Debug, Clone)]
pub struct Config {
    pub k: usize,
    pub alpha: usize,
    pub request_timeout_ms: u64,
    pub refresh_interval_ms: u64,
    /// Seeds the random ids of refresh lookups.
    pub seed: u64,
    /// Proof of work (bits, [`hypha_ledger::pow_bits`]) a record's
    /// publisher id must carry to be stored here or taken from a lookup's
    /// answers: the same value nodes require at hello, so that records cost
    /// what connections cost.
    pub min_publisher_pow_bits: u32,
    /// Proof of work (bits) both parties of a receipt must carry for it to
    /// be stored here or taken from a lookup's answers: receipts of free
    /// identities would otherwise flood keys and stores.
    pub min_receipt_party_pow_bits: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            k: K,
            alpha: ALPHA,
            request_timeout_ms: REQUEST_TIMEOUT_MS,
            refresh_interval_ms: REFRESH_INTERVAL_MS,
            seed: 1,
            min_publisher_pow_bits: hypha_ledger::DEFAULT_POW_BITS,
            min_receipt_party_pow_bits: hypha_ledger::DEFAULT_POW_BITS,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueryId(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// What one node asks another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Ping,
    FindNode {
        target: NodeId,
    },
    GetProviders {
        key: NodeId,
    },
    AddProvider {
        key: NodeId,
        record: Box<ProviderRecord>,
    },
    /// The receipts held under a node's receipt key.
    GetReceipts {
        key: NodeId,
    },
    /// Stores settled receipts under a party's receipt key.
    PutReceipts {
        key: NodeId,
        receipts: Vec<SignedReceipt>,
    },
    /// Stores an unpaid notice under its consumer's receipt key.
    PutNotice {
        key: NodeId,
        notice: Box<Notice>,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Pong,
    Nodes {
        closer: Vec<Contact>,
    },
    Providers {
        records: Vec<ProviderRecord>,
        closer: Vec<Contact>,
    },
    /// Receipts held under a key, and the unpaid notices against its
    /// node.
    Receipts {
        receipts: Vec<SignedReceipt>,
        notices: Vec<Notice>,
        closer: Vec<Contact>,
    },
    Stored,
    Refused,
}

/// A request for the driver to send; its response (or failure) comes back
/// with the same id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub to: Contact,
    pub id: RequestId,
    pub request: Request,
}

/// A finished query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    QueryDone { id: QueryId, result: QueryResult },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryResult {
    /// The `k` closest live nodes to `target`, closest first.
    FindNode {
        target: NodeId,
        closest: Vec<Contact>,
        hops: u32,
        requests: u32,
    },
    /// Verified, unexpired provider records found for `key`.
    GetProviders {
        key: NodeId,
        records: Vec<ProviderRecord>,
        hops: u32,
        requests: u32,
    },
    /// The record was offered to the closest nodes; `stored` accepted it.
    AddProvider { key: NodeId, stored: u32 },
    /// Checked receipts found under `key`, one per request (its
    /// spending, largest first, then its earnings, newest first), and the
    /// checked, live unpaid notices against its node, one per seeder and
    /// not voided by a receipt found.
    GetReceipts {
        key: NodeId,
        receipts: Vec<VerifiedReceipt>,
        notices: Vec<VerifiedNotice>,
        hops: u32,
        requests: u32,
    },
    /// The receipts were offered to the closest nodes; `stored` took them.
    PutReceipts { key: NodeId, stored: u32 },
    /// The notice was offered to the closest nodes; `stored` took it.
    PutNotice { key: NodeId, stored: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CandState {
    New,
    Waiting,
    Answered,
    Failed,
}

/// Times a lookup asks one contact before counting it as failed: a lost
/// datagram or a brief stall should not drop a live node from a result.
const ATTEMPTS_PER_CONTACT: u8 = 2;

#[derive(Debug, Clone)]
struct Cand {
    contact: Contact,
    state: CandState,
    /// Requests it took to learn of this contact (0: known locally).
    depth: u32,
    attempts: u8,
}

#[derive(Debug)]
enum Purpose {
    FindNode,
    GetProviders {
        records: Vec<ProviderRecord>,
    },
    AddProvider {
        record: Box<ProviderRecord>,
    },
    GetReceipts {
        found: Vec<VerifiedReceipt>,
        notices: Vec<VerifiedNotice>,
    },
    PutReceipts {
        receipts: Vec<SignedReceipt>,
    },
    PutNotice {
        notice: Box<Notice>,
    },
    Refresh,
    /// The self-lookup of a joining node; when it ends, every bucket
    /// farther than the nearest neighbour is refreshed.
    Bootstrap,
}

#[derive(Debug)]
struct Query {
    target: NodeId,
    purpose: Purpose,
    cands: BTreeMap<Distance, Cand>,
    inflight: usize,
    requests: u32,
    /// While storing: acknowledgements still awaited, and how many stored.
    storing: Option<(usize, u32)>,
}

#[derive(Debug, Clone)]
enum Pending {
    Lookup(QueryId),
    Store(QueryId),
    Eviction { oldest: NodeId },
}

#[derive(Debug, Clone)]
struct InFlight {
    to: Contact,
    deadline_ms: u64,
    pending: Pending,
}

/// One node's Kademlia.
#[derive(Debug)]
pub struct Dht {
    local: Contact,
    cfg: Config,
    table: RoutingTable,
    store: RecordStore,
    receipts: ReceiptStore,
    notices: NoticeStore,
    queries: HashMap<QueryId, Query>,
    inflight: HashMap<RequestId, InFlight>,
    outbox: VecDeque<Transmit>,
    events: VecDeque<Event>,
    rng: Rng,
    next_id: u64,
    next_refresh_ms: u64,
}

impl Dht {
    pub fn new(local: Contact, cfg: Config, now_ms: u64) -> Self {
        Self {
            table: RoutingTable::new(local.id),
            rng: Rng::new(cfg.seed),
            next_refresh_ms: now_ms.saturating_add(cfg.refresh_interval_ms),
            store: RecordStore::new(cfg.min_publisher_pow_bits),
            local,
            cfg,
            receipts: ReceiptStore::new(local.id),
            notices: NoticeStore::new(local.id),
            queries: HashMap::new(),
            inflight: HashMap::new(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            next_id: 1,
        }
    }

    pub fn local(&self) -> Contact {
        self.local
    }

    pub fn table(&self) -> &RoutingTable {
        &self.table
    }

    pub fn store(&self) -> &RecordStore {
        &self.store
    }

    pub fn receipts(&self) -> &ReceiptStore {
        &self.receipts
    }

    pub fn notices(&self) -> &NoticeStore {
        &self.notices
    }

    fn fresh_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Records a contact that proved itself alive; a full bucket pings its
    /// oldest entry before anything changes.
    fn saw(&mut self, contact: Contact, now_ms: u64) {
        if contact.id == self.local.id {
            return;
        }
        if let Update::Full { oldest } = self.table.update(contact, now_ms) {
            if self.inflight.len() < MAX_INFLIGHT {
                self.send(
                    oldest,
                    Request::Ping,
                    Pending::Eviction { oldest: oldest.id },
                    now_ms,
                );
            }
        }
    }

    fn send(&mut self, to: Contact, request: Request, pending: Pending, now_ms: u64) {
        let id = RequestId(self.fresh_id());
        self.inflight.insert(
            id,
            InFlight {
                to,
                deadline_ms: now_ms.saturating_add(self.cfg.request_timeout_ms),
                pending,
            },
        );
        self.outbox.push_back(Transmit { to, id, request });
    }

    /// Seeds the table with known nodes and looks up our own id, which
    /// fills the buckets near us and announces us to our neighbours.
    pub fn bootstrap(&mut self, contacts: &[Contact], now_ms: u64) -> Result<QueryId, DhtError> {
        for c in contacts {
            self.saw(*c, now_ms);
        }
        self.start(self.local.id, Purpose::Bootstrap, now_ms)
    }

    /// Finds the `k` closest nodes to `target`.
    pub fn find_node(&mut self, target: NodeId, now_ms: u64) -> Result<QueryId, DhtError> {
        self.start(target, Purpose::FindNode, now_ms)
    }

    /// Finds provider records stored under `key`.
    pub fn get_providers(&mut self, key: NodeId, now_ms: u64) -> Result<QueryId, DhtError> {
        self.start(
            key,
            Purpose::GetProviders {
                records: Vec::new(),
            },
            now_ms,
        )
    }

    /// Stores our own record at the `k` nodes closest to its key (and here).
    pub fn add_provider(
        &mut self,
        key: NodeId,
        record: ProviderRecord,
        now_ms: u64,
    ) -> Result<QueryId, DhtError> {
        record.verify(now_ms)?;
        // Keep it locally too: we are one of the providers' holders.
        let _ = self.store.put(key, record.clone(), now_ms);
        self.start(
            key,
            Purpose::AddProvider {
                record: Box::new(record),
            },
            now_ms,
        )
    }

    /// Collects the receipts stored under `key` (a node's receipt key).
    pub fn get_receipts(&mut self, key: NodeId, now_ms: u64) -> Result<QueryId, DhtError> {
        self.start(
            key,
            Purpose::GetReceipts {
                found: Vec::new(),
                notices: Vec::new(),
            },
            now_ms,
        )
    }

    /// Stores checked receipts under `key` at the `k` closest nodes (and
    /// here); at most [`MAX_RECEIPTS_PER_PUT`] at once.
    pub fn put_receipts(
        &mut self,
        key: NodeId,
        receipts: Vec<VerifiedReceipt>,
        now_ms: u64,
    ) -> Result<QueryId, DhtError> {
        if receipts.len() > MAX_RECEIPTS_PER_PUT {
            return Err(DhtError::BadMessage("too many receipts in one store"));
        }
        let mut signed = Vec::with_capacity(receipts.len());
        for r in receipts {
            let r = receipts::check(
                &key,
                r.signed().clone(),
                now_ms,
                self.cfg.min_receipt_party_pow_bits,
            )?;
            signed.push(r.signed().clone());
            let _ = self.receipts.put(key, r);
        }
        self.start(key, Purpose::PutReceipts { receipts: signed }, now_ms)
    }

    /// Stores a checked unpaid notice under its consumer's receipt key at
    /// the `k` closest nodes (and here).
    pub fn put_notice(&mut self, notice: VerifiedNotice, now_ms: u64) -> Result<QueryId, DhtError> {
        let key = receipts::receipts_key(&notice.consumer());
        let notice = notices::check(
            &key,
            notice.notice(),
            now_ms,
            self.cfg.min_receipt_party_pow_bits,
        )?;
        let signed = notice.notice();
        let _ = self.notices.put(key, notice, now_ms);
        self.start(
            key,
            Purpose::PutNotice {
                notice: Box::new(signed),
            },
            now_ms,
        )
    }

    fn start(
        &mut self,
        target: NodeId,
        purpose: Purpose,
        now_ms: u64,
    ) -> Result<QueryId, DhtError> {
        if self.queries.len() >= MAX_QUERIES {
            return Err(DhtError::TooManyQueries);
        }
        if let Some(i) = bucket_index(&Distance::between(&self.local.id, &target)) {
            self.table.touch_bucket(i, now_ms);
        }
        let id = QueryId(self.fresh_id());
        let mut cands = BTreeMap::new();
        for c in self.table.closest(&target, self.cfg.k) {
            cands.insert(
                Distance::between(&c.id, &target),
                Cand {
                    contact: c,
                    state: CandState::New,
                    depth: 0,
                    attempts: 0,
                },
            );
        }
        self.queries.insert(
            id,
            Query {
                target,
                purpose,
                cands,
                inflight: 0,
                requests: 0,
                storing: None,
            },
        );
        self.advance(id, now_ms);
        Ok(id)
    }

    /// Sends the next requests of a lookup, or finishes it.
    fn advance(&mut self, qid: QueryId, now_ms: u64) {
        let (k, alpha) = (self.cfg.k, self.cfg.alpha);
        let Some(q) = self.queries.get_mut(&qid) else {
            return;
        };
        if q.storing.is_some() {
            return;
        }
        let mut to_ask = Vec::new();
        let mut live = 0;
        for cand in q.cands.values_mut() {
            if cand.state == CandState::Failed {
                continue;
            }
            live += 1;
            if live > k {
                break;
            }
            if cand.state == CandState::New && q.inflight + to_ask.len() < alpha {
                cand.state = CandState::Waiting;
                cand.attempts += 1;
                to_ask.push(cand.contact);
            }
        }
        q.inflight += to_ask.len();
        q.requests += to_ask.len() as u32;
        let target = q.target;
        let done = to_ask.is_empty() && q.inflight == 0;
        let request = match &q.purpose {
            Purpose::GetProviders { .. } => Request::GetProviders { key: target },
            Purpose::GetReceipts { .. } => Request::GetReceipts { key: target },
            _ => Request::FindNode { target },
        };
        for c in to_ask {
            self.send(c, request.clone(), Pending::Lookup(qid), now_ms);
        }
        if done {
            self.finish_lookup(qid, now_ms);
        }
    }

    fn finish_lookup(&mut self, qid: QueryId, now_ms: u64) {
        let (k, pow) = (self.cfg.k, self.cfg.min_publisher_pow_bits);
        let Some(q) = self.queries.get_mut(&qid) else {
            return;
        };
        let answered: Vec<&Cand> = q
            .cands
            .values()
            .filter(|c| c.state == CandState::Answered)
            .take(k)
            .collect();
        let hops = answered.first().map_or(0, |c| c.depth);
        let closest: Vec<Contact> = answered.iter().map(|c| c.contact).collect();
        let (target, requests) = (q.target, q.requests);
        match std::mem::replace(&mut q.purpose, Purpose::Refresh) {
            Purpose::FindNode => {
                self.queries.remove(&qid);
                self.events.push_back(Event::QueryDone {
                    id: qid,
                    result: QueryResult::FindNode {
                        target,
                        closest,
                        hops,
                        requests,
                    },
                });
            }
            Purpose::Refresh => {
                self.queries.remove(&qid);
            }
            Purpose::Bootstrap if closest.is_empty() => {
                // Nobody answered: refreshing 255 far buckets through the
                // same silent contacts would only repeat the failure.
                self.queries.remove(&qid);
            }
            Purpose::Bootstrap => {
                self.queries.remove(&qid);
                // Fill the far buckets, as a joining node learns only its
                // neighbourhood from the self-lookup.
                let nearest = closest
                    .first()
                    .and_then(|c| bucket_index(&Distance::between(&self.local.id, &c.id)))
                    .unwrap_or(0);
                for i in (nearest + 1..256).rev() {
                    let target = self.random_id_in_bucket(i);
                    if self.start(target, Purpose::Refresh, now_ms).is_err() {
                        break;
                    }
                }
            }
            Purpose::GetProviders { mut records } => {
                self.queries.remove(&qid);
                // Records were checked as they came; one may have lapsed
                // while the lookup went on.
                records.retain(|r| r.expires_ms > now_ms);
                // Ours too: this node may hold the key itself.
                for r in self.store.get(&target, now_ms) {
                    add_record(&mut records, &target, r, now_ms, pow);
                }
                self.events.push_back(Event::QueryDone {
                    id: qid,
                    result: QueryResult::GetProviders {
                        key: target,
                        records,
                        hops,
                        requests,
                    },
                });
            }
            Purpose::GetReceipts {
                mut found,
                notices: mut found_notices,
            } => {
                self.queries.remove(&qid);
                for v in self.receipts.get_verified(&target) {
                    receipts::merge(&target, &mut found, v, MAX_RECEIPTS_PER_KEY);
                }
                for n in self.notices.get_verified(&target, now_ms) {
                    notices::merge(&mut found_notices, n, MAX_NOTICES_FOUND);
                }
                // Notices lapse while a lookup runs, and one answer's
                // receipt may void another's notice.
                found_notices.retain(|n| {
                    notices::live(n.at_ms(), now_ms)
                        && !found.iter().any(|r| n.voided_by(r.receipt()))
                });
                self.events.push_back(Event::QueryDone {
                    id: qid,
                    result: QueryResult::GetReceipts {
                        key: target,
                        receipts: found,
                        notices: found_notices,
                        hops,
                        requests,
                    },
                });
            }
            Purpose::PutNotice { notice } => {
                q.storing = Some((closest.len(), 0));
                if closest.is_empty() {
                    self.queries.remove(&qid);
                    self.events.push_back(Event::QueryDone {
                        id: qid,
                        result: QueryResult::PutNotice {
                            key: target,
                            stored: 0,
                        },
                    });
                    return;
                }
                for c in closest {
                    self.send(
                        c,
                        Request::PutNotice {
                            key: target,
                            notice: notice.clone(),
                        },
                        Pending::Store(qid),
                        now_ms,
                    );
                }
                if let Some(q) = self.queries.get_mut(&qid) {
                    q.purpose = Purpose::PutNotice { notice };
                }
            }
            Purpose::PutReceipts { receipts } => {
                q.storing = Some((closest.len(), 0));
                if closest.is_empty() {
                    self.queries.remove(&qid);
                    self.events.push_back(Event::QueryDone {
                        id: qid,
                        result: QueryResult::PutReceipts {
                            key: target,
                            stored: 0,
                        },
                    });
                    return;
                }
                for c in closest {
                    self.send(
                        c,
                        Request::PutReceipts {
                            key: target,
                            receipts: receipts.clone(),
                        },
                        Pending::Store(qid),
                        now_ms,
                    );
                }
                if let Some(q) = self.queries.get_mut(&qid) {
                    q.purpose = Purpose::PutReceipts { receipts };
                }
            }
            Purpose::AddProvider { record } => {
                q.purpose = Purpose::AddProvider {
                    record: record.clone(),
                };
                q.storing = Some((closest.len(), 0));
                if closest.is_empty() {
                    self.queries.remove(&qid);
                    self.events.push_back(Event::QueryDone {
                        id: qid,
                        result: QueryResult::AddProvider {
                            key: target,
                            stored: 0,
                        },
                    });
                    return;
                }
                for c in closest {
                    self.send(
                        c,
                        Request::AddProvider {
                            key: target,
                            record: record.clone(),
                        },
                        Pending::Store(qid),
                        now_ms,
                    );
                }
            }
        }
    }

    fn store_settled(&mut self, qid: QueryId, stored: bool) {
        let Some(q) = self.queries.get_mut(&qid) else {
            return;
        };
        let Some((waiting, count)) = q.storing.as_mut() else {
            return;
        };
        *waiting = waiting.saturating_sub(1);
        if stored {
            *count += 1;
        }
        if *waiting == 0 {
            let (key, stored) = (q.target, *count);
            let result = match q.purpose {
                Purpose::PutReceipts { .. } => QueryResult::PutReceipts { key, stored },
                Purpose::PutNotice { .. } => QueryResult::PutNotice { key, stored },
                _ => QueryResult::AddProvider { key, stored },
            };
            self.queries.remove(&qid);
            self.events.push_back(Event::QueryDone { id: qid, result });
        }
    }

    /// Answers a peer's request at once. `from` is who the transport
    /// authenticated; it goes into the routing table.
    pub fn handle_request(&mut self, now_ms: u64, from: Contact, request: Request) -> Response {
        self.saw(from, now_ms);
        self.answer(now_ms, from, request)
    }

    /// Answers a peer's request without adding it to the routing table:
    /// for a peer whose address cannot be dialed by others (it reached
    /// this node through a relay).
    pub fn handle_request_unlisted(
        &mut self,
        now_ms: u64,
        from: Contact,
        request: Request,
    ) -> Response {
        self.answer(now_ms, from, request)
    }

    fn answer(&mut self, now_ms: u64, from: Contact, request: Request) -> Response {
        match request {
            Request::Ping => Response::Pong,
            Request::FindNode { target } => Response::Nodes {
                closer: self.closer_than_asker(&target, &from),
            },
            Request::GetProviders { key } => Response::Providers {
                records: self.store.get(&key, now_ms),
                closer: self.closer_than_asker(&key, &from),
            },
            Request::AddProvider { key, record } => {
                // Only a publisher stores its own record.
                if record.publisher != from.id {
                    return Response::Refused;
                }
                match self.store.put(key, *record, now_ms) {
                    Ok(()) => Response::Stored,
                    Err(_) => Response::Refused,
                }
            }
            Request::GetReceipts { key } => Response::Receipts {
                receipts: self.receipts.get(&key),
                notices: self.notices.get(&key, now_ms),
                closer: self.closer_than_asker(&key, &from),
            },
            Request::PutNotice { key, notice } => {
                if self.notices.holds(&key, &notice, now_ms) {
                    return Response::Stored;
                }
                let checked =
                    notices::check(&key, *notice, now_ms, self.cfg.min_receipt_party_pow_bits);
                let Ok(n) = checked else {
                    return Response::Refused;
                };
                // A receipt held here already pays what it says went
                // unpaid.
                let held = self.receipts.get_verified(&key);
                if held.iter().any(|r| n.voided_by(r.receipt())) {
                    return Response::Refused;
                }
                match self.notices.put(key, n, now_ms) {
                    Ok(()) => Response::Stored,
                    Err(_) => Response::Refused,
                }
            }
            Request::PutReceipts { key, receipts } => {
                if receipts.len() > MAX_RECEIPTS_PER_PUT {
                    return Response::Refused;
                }
                // Signatures make a receipt its own proof: anyone may
                // pass one on, but each must check out.
                let mut all = true;
                for r in receipts {
                    if self.receipts.holds(&key, &r) {
                        continue;
                    }
                    let stored =
                        receipts::check(&key, r, now_ms, self.cfg.min_receipt_party_pow_bits)
                            .and_then(|v| {
                                self.notices.void(&key, v.receipt());
                                self.receipts.put(key, v)
                            });
                    all &= stored.is_ok();
                }
                if all {
                    Response::Stored
                } else {
                    Response::Refused
                }
            }
        }
    }

    fn closer_than_asker(&self, target: &NodeId, from: &Contact) -> Vec<Contact> {
        let mut v = self.table.closest(target, self.cfg.k + 1);
        v.retain(|c| c.id != from.id);
        v.truncate(self.cfg.k);
        v
    }

    /// A response to one of our requests. Late or unknown ones are ignored.
    pub fn handle_response(&mut self, now_ms: u64, id: RequestId, response: Response) {
        let Some(f) = self.inflight.remove(&id) else {
            return;
        };
        self.saw(f.to, now_ms);
        match f.pending {
            Pending::Eviction { oldest } => self.table.ping_answered(&oldest, now_ms),
            Pending::Store(qid) => self.store_settled(qid, response == Response::Stored),
            Pending::Lookup(qid) => {
                let (closer, records, receipts, notices) = match response {
                    Response::Nodes { closer } => (closer, Vec::new(), Vec::new(), Vec::new()),
                    Response::Providers { records, closer } => {
                        (closer, records, Vec::new(), Vec::new())
                    }
                    Response::Receipts {
                        receipts,
                        notices,
                        closer,
                    } => (closer, Vec::new(), receipts, notices),
                    _ => (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
                };
                let found = Found {
                    closer,
                    records,
                    receipts,
                    notices,
                };
                self.lookup_answered(qid, f.to, found, now_ms);
            }
        }
    }

    fn lookup_answered(&mut self, qid: QueryId, from: Contact, found: Found, now_ms: u64) {
        let Found {
            closer,
            records,
            receipts,
            notices: answered_notices,
        } = found;
        let local = self.local.id;
        let (k, pow) = (self.cfg.k, self.cfg.min_publisher_pow_bits);
        let party_pow = self.cfg.min_receipt_party_pow_bits;
        let Some(q) = self.queries.get_mut(&qid) else {
            return;
        };
        q.inflight = q.inflight.saturating_sub(1);
        let target = q.target;
        let depth = match q.cands.get_mut(&Distance::between(&from.id, &target)) {
            Some(c) => {
                c.state = CandState::Answered;
                c.depth
            }
            None => 0,
        };
        for c in closer.into_iter().take(k) {
            if c.id == local {
                continue;
            }
            q.cands
                .entry(Distance::between(&c.id, &target))
                .and_modify(|e| e.depth = e.depth.min(depth + 1))
                .or_insert(Cand {
                    contact: c,
                    state: CandState::New,
                    depth: depth + 1,
                    attempts: 0,
                });
        }
        if let Purpose::GetReceipts { found, notices } = &mut q.purpose {
            for n in answered_notices
                .into_iter()
                .take(notices::MAX_NOTICES_PER_KEY)
            {
                if notices.len() >= MAX_NOTICES_FOUND {
                    break;
                }
                if notices.iter().any(|f| f.notice() == n) {
                    continue;
                }
                if let Ok(v) = notices::check(&target, n, now_ms, party_pow) {
                    notices::merge(notices, v, MAX_NOTICES_FOUND);
                }
            }
            for r in receipts.into_iter().take(MAX_RECEIPTS_PER_KEY) {
                // Most answers repeat what others sent: check each receipt
                // once.
                if found.iter().any(|f| *f.signed() == r) {
                    continue;
                }
                if let Ok(v) = receipts::check(&target, r, now_ms, party_pow) {
                    receipts::merge(&target, found, v, MAX_RECEIPTS_PER_KEY);
                }
            }
        }
        if let Purpose::GetProviders { records: found } = &mut q.purpose {
            for r in records {
                add_record(found, &target, r, now_ms, pow);
            }
        }
        self.advance(qid, now_ms);
    }

    /// A request of ours failed (unreachable, refused, broken).
    pub fn handle_failure(&mut self, now_ms: u64, id: RequestId) {
        let Some(f) = self.inflight.remove(&id) else {
            return;
        };
        match f.pending {
            Pending::Eviction { oldest } => self.table.ping_failed(&oldest, now_ms),
            Pending::Store(qid) => self.store_settled(qid, false),
            Pending::Lookup(qid) => {
                self.table.failed(&f.to.id);
                if let Some(q) = self.queries.get_mut(&qid) {
                    q.inflight = q.inflight.saturating_sub(1);
                    if let Some(c) = q.cands.get_mut(&Distance::between(&f.to.id, &q.target)) {
                        c.state = if c.attempts < ATTEMPTS_PER_CONTACT {
                            CandState::New
                        } else {
                            CandState::Failed
                        };
                    }
                }
                self.advance(qid, now_ms);
            }
        }
    }

    /// Expires overdue requests and runs periodic work; call when
    /// [`Dht::poll_timeout`] says.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let overdue: Vec<RequestId> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.deadline_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            self.handle_failure(now_ms, id);
        }
        if now_ms >= self.next_refresh_ms {
            self.next_refresh_ms = now_ms.saturating_add(self.cfg.refresh_interval_ms);
            self.store.expire(now_ms);
            self.notices.expire(now_ms);
            let before = now_ms.saturating_sub(self.cfg.refresh_interval_ms);
            let stale = self.table.stale_buckets(before);
            for i in stale.into_iter().take(REFRESHES_PER_TICK) {
                let target = self.random_id_in_bucket(i);
                let _ = self.start(target, Purpose::Refresh, now_ms);
            }
        }
    }

    /// A random id whose distance from us falls in bucket `i`.
    fn random_id_in_bucket(&mut self, i: usize) -> NodeId {
        let mut d = self.rng.id().0;
        // Bit i (from the least significant) is the highest set bit.
        let byte = 31 - i / 8;
        let bit = (i % 8) as u32;
        for (j, b) in d.iter_mut().enumerate() {
            if j < byte {
                *b = 0;
            } else if j == byte {
                let mask = ((1u16 << (bit + 1)) - 1) as u8;
                *b = (*b & mask) | (1u8 << bit);
            }
        }
        let mut id = [0u8; 32];
        for ((o, x), y) in id.iter_mut().zip(d.iter()).zip(self.local.id.0.iter()) {
            *o = x ^ y;
        }
        NodeId(id)
    }

    /// The next request to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    /// The next finished query.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Dht::handle_timeout`] is next due.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<u64> {
        self.inflight
            .values()
            .map(|f| f.deadline_ms)
            .min()
            .map_or(Some(self.next_refresh_ms), |d| {
                Some(d.min(self.next_refresh_ms))
            })
    }

    /// Queries running now.
    pub fn queries(&self) -> usize {
        self.queries.len()
    }
}

/// What one lookup answer brought.
struct Found {
    closer: Vec<Contact>,
    records: Vec<ProviderRecord>,
    receipts: Vec<SignedReceipt>,
    notices: Vec<Notice>,
}

/// Adds a record a lookup found, once: per publisher under a model's key
/// (its latest record), per model name under the catalog key, and at most
/// `MAX_CATALOG_NAMES_PER_PUBLISHER` names per publisher there (an
/// identity may list different names at different storers); checked
/// (proof of work, then signature) and bounded by what one key holds. So
/// the `MAX_SYBIL_IDENTITIES` that answers may name fill at most what they
/// could fill at one storer, and honest records keep their room in the
/// result.
fn add_record(
    found: &mut Vec<ProviderRecord>,
    key: &NodeId,
    r: ProviderRecord,
    now_ms: u64,
    min_pow_bits: u32,
) {
    let catalog = *key == record::catalog_key();
    let limit = if catalog {
        record::MAX_CATALOG_MODELS
    } else {
        record::MAX_PROVIDERS_PER_KEY
    };
    let checked = |r: &ProviderRecord| {
        record::key_fits(key, r)
            && record::check_publisher_pow(&r.publisher, min_pow_bits).is_ok()
            && r.verify(now_ms).is_ok()
    };
    if !catalog {
        match found.iter_mut().find(|x| x.publisher == r.publisher) {
            // The same publisher's newer record: its current addresses.
            Some(x) => {
                if r.expires_ms > x.expires_ms && checked(&r) {
                    *x = r;
                }
            }
            None => {
                if found.len() < limit && checked(&r) {
                    found.push(r);
                }
            }
        }
        return;
    }
    let mut names_of_publisher = 0;
    for x in found.iter() {
        if x.model == r.model {
            return;
        }
        if x.publisher == r.publisher {
            names_of_publisher += 1;
        }
    }
    if names_of_publisher < record::MAX_CATALOG_NAMES_PER_PUBLISHER
        && found.len() < limit
        && checked(&r)
    {
        found.push(r);
    }
}
