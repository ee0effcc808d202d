//! The node's side of the DHT: one task owns the sans-IO
//! [`hypha_dht::Dht`] and drives it over the node's QUIC connections.
//!
//! The task takes commands from a bounded channel: peers' requests (which
//! it answers at once), replies to its own requests, and the node's
//! lookups and publications. Each request the machine wants sent becomes a
//! short task that opens a stream on a cached connection (dialing if
//! needed), sends one `Dht` frame and reads one `DhtReply`, within
//! [`RPC_TIMEOUT`]. Time is the Unix clock in milliseconds, the same clock
//! provider records expire by.
//!
//! A seeder publishes a signed provider record for each name of its model
//! under the name's key, and republishes it at half its lifetime (sooner
//! while no node has stored it yet). It also publishes every receipt it
//! settles under both parties' receipt keys (batched, from a bounded
//! queue), so any node can compute any peer's balance from signed receipts,
//! and an unpaid notice under a consumer's key when the consumer left a
//! receipt unsigned (`hypha_dht::notices`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hypha_dht::codec::{reply_from_wire, request_to_wire};
use hypha_dht::{Contact, Dht, Event, ProviderRecord, QueryId, QueryResult, Request, Response};
use hypha_ledger::{VerifiedNotice, VerifiedReceipt};
use hypha_wire::{ArchivedMessage, Message, NodeId};
use tokio::sync::{mpsc, oneshot};

use crate::net::addr::{is_virtual, PeerAddr};
use crate::net::pool::Connections;
use crate::net::proto::{kind_of, FramedRecv, FramedSend, PeerError, Violation};
use crate::util::{lock, unix_ms, BoundedMap, Overflow, Tasks, TokenBucket};

/// Commands waiting for the DHT task: peers' requests and replies arrive
/// here, so the bound caps the work a burst of peers can queue.
pub const COMMAND_QUEUE: usize = 1024;
/// One DHT request, dial included; the machine's own request timeout is
/// the same, so a reply later than this is ignored there too.
pub const RPC_TIMEOUT: Duration = Duration::from_millis(hypha_dht::REQUEST_TIMEOUT_MS);
/// How long a peer's request may wait for the DHT task's answer.
/// Shorter than [`RPC_TIMEOUT`], so a busy node refuses before its
/// requester gives up.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(1500);
const _: () = assert!(ANSWER_TIMEOUT.as_millis() < RPC_TIMEOUT.as_millis());
/// A lookup that has not finished by then is given up (its caller gets
/// nothing).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
const _: () = assert!(RPC_TIMEOUT.as_millis() < LOOKUP_TIMEOUT.as_millis());
/// How often a node whose routing table is empty asks its bootstrap nodes
/// again (they may have started after it).
pub const BOOTSTRAP_RETRY: Duration = Duration::from_secs(3);
/// How often a node whose table holds fewer than k contacts looks itself up
/// again through its bootstrap nodes.
pub const REJOIN_EVERY: Duration = Duration::from_secs(30);
/// Settled receipts waiting to be published; beyond it the oldest
/// waiting are dropped from publication (they stay in both ledgers).
pub const RECEIPT_QUEUE: usize = 4096;
// One batch never needs more than the queue holds.
const _: () = assert!(hypha_dht::receipts::MAX_RECEIPTS_PER_PUT <= RECEIPT_QUEUE);
/// How long receipts gather before a batch is published.
const RECEIPT_BATCH_WAIT: Duration = Duration::from_millis(200);
/// A snapshot of the DHT for `/v1/network`.
#[derive(Debug, Clone)]
pub struct NetworkView {
    pub local: Contact,
    /// (bucket, contact, last seen in Unix ms).
    pub contacts: Vec<(usize, Contact, u64)>,
    /// Records this node stores for others (and its own).
    pub records: Vec<ProviderRecord>,
}

/// The outcome of a node lookup.
#[derive(Debug, Clone)]
pub struct NodeLookup {
    pub closest: Vec<Contact>,
    pub hops: u32,
    pub requests: u32,
}

enum Cmd {
    Incoming {
        from: Contact,
        request: Request,
        reply: oneshot::Sender<Response>,
    },
    Reply {
        id: hypha_dht::RequestId,
        response: Option<Response>,
    },
    Providers {
        key: NodeId,
        reply: oneshot::Sender<Vec<ProviderRecord>>,
    },
    FindNode {
        target: NodeId,
        reply: oneshot::Sender<NodeLookup>,
    },
    Publish {
        key: NodeId,
        record: Box<ProviderRecord>,
        reply: oneshot::Sender<u32>,
    },
    View {
        reply: oneshot::Sender<NetworkView>,
    },
    GetReceipts {
        key: NodeId,
        reply: oneshot::Sender<ReceiptsOf>,
    },
    PutNotice {
        notice: Box<VerifiedNotice>,
    },
    PutReceipts {
        key: NodeId,
        receipts: Vec<VerifiedReceipt>,
        reply: oneshot::Sender<u32>,
    },
}

enum Waiter {
    Providers(oneshot::Sender<Vec<ProviderRecord>>),
    Nodes(oneshot::Sender<NodeLookup>),
    Stored(oneshot::Sender<u32>),
    Receipts(oneshot::Sender<ReceiptsOf>),
}

/// What the DHT holds under a node's receipt key.
#[derive(Debug, Clone, Default)]
pub struct ReceiptsOf {
    /// Its checked receipts: its largest spending, then its newest
    /// earnings (see `hypha_dht::receipts`).
    pub receipts: Vec<VerifiedReceipt>,
    /// Checked, live unpaid notices against it, one per seeder, none
    /// voided by a receipt found (see `hypha_dht::notices`).
    pub notices: Vec<VerifiedNotice>,
}

/// Work units one peer's requests may cost the DHT task per second, and in
/// a burst: a request costs one, plus two per signature it makes the task
/// check (a record one, a receipt two). A full `PutReceipts` (129 units)
/// fits the burst; a flood from one peer takes at most this share of the
/// task (128 signature checks a second, a few milliseconds), and what it
/// can have queued ahead of another peer's request is one burst.
pub const DHT_UNITS_PER_PEER_PER_SECOND: u64 = 256;
pub const DHT_BURST_PER_PEER: u64 = 512;
const _: () = assert!((2 * hypha_dht::receipts::MAX_RECEIPTS_PER_PUT as u64) < DHT_BURST_PER_PEER);
/// Peers whose buckets are kept; a full bucket is forgotten first.
const MAX_DHT_PEERS: usize = 4096;

/// What `request` costs the DHT task, in the units above.
fn cost(request: &Request) -> u64 {
    match request {
        Request::AddProvider { .. } => 1 + 2,
        Request::PutReceipts { receipts, .. } => 1 + 2 * receipts.len() as u64,
        // Three signatures: the paid receipt's two and the offer's.
        Request::PutNotice { .. } => 1 + 2 * 3,
        _ => 1,
    }
}

/// A handle on the node's DHT task; cheap to clone.
#[derive(Clone)]
pub struct Discovery {
    tx: mpsc::Sender<Cmd>,
    receipts: mpsc::Sender<VerifiedReceipt>,
    local: Contact,
    /// Each peer's budget for requests to the DHT task.
    budgets: Arc<std::sync::Mutex<BoundedMap<NodeId, TokenBucket>>>,
}

impl Discovery {
    /// Starts the DHT task for `local`, bootstrapping from `bootstrap`.
    pub fn start(
        local: Contact,
        conns: Arc<Connections>,
        bootstrap: Vec<PeerAddr>,
        pow_bits: u32,
        tasks: Tasks,
    ) -> Self {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let mut seed = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
        let cfg = hypha_dht::Config {
            seed: u64::from_le_bytes(seed),
            // Records need what connections need: free identities would
            // otherwise publish without end.
            min_publisher_pow_bits: pow_bits,
            // ... and so do the parties of receipts: a flood of a key or a
            // store needs identities, each paid for.
            min_receipt_party_pow_bits: pow_bits,
            ..hypha_dht::Config::default()
        };
        let dht = Dht::new(local, cfg, unix_ms());
        let bootstrap = bootstrap
            .into_iter()
            .map(|p| Contact {
                id: p.id,
                addr: p.addr,
            })
            .collect();
        tasks.spawn(run(dht, rx, tx.clone(), conns, bootstrap, tasks.clone()));
        let (receipts, queue) = mpsc::channel(RECEIPT_QUEUE);
        let me = Self {
            tx,
            receipts,
            local,
            budgets: Arc::new(std::sync::Mutex::new(BoundedMap::new(
                MAX_DHT_PEERS,
                Overflow::Refuse,
            ))),
        };
        tasks.spawn(publish_receipts(me.clone(), queue, tasks.clone()));
        me
    }

    /// Queues a settled receipt for publication under both parties' keys;
    /// false when the queue is full (the receipt is then not published).
    pub fn publish_receipt(&self, receipt: VerifiedReceipt) -> bool {
        self.receipts.try_send(receipt).is_ok()
    }

    /// The checked receipts and unpaid notices the DHT holds for `id`;
    /// `None` when the lookup could not run or finish.
    pub async fn receipts_of(&self, id: &NodeId) -> Option<ReceiptsOf> {
        let key = hypha_dht::receipts_key(id);
        self.ask(|reply| Cmd::GetReceipts { key, reply }).await
    }

    /// Publishes an unpaid notice under its consumer's receipt key; false
    /// when the DHT task's queue is full (it is then not published).
    pub fn publish_notice(&self, notice: VerifiedNotice) -> bool {
        self.tx
            .try_send(Cmd::PutNotice {
                notice: Box::new(notice),
            })
            .is_ok()
    }

    /// Stores receipts under `key` at the closest nodes; how many took them.
    async fn put_receipts(&self, key: NodeId, receipts: Vec<VerifiedReceipt>) -> u32 {
        self.ask(|reply| Cmd::PutReceipts {
            key,
            receipts,
            reply,
        })
        .await
        .unwrap_or(0)
    }

    pub fn local(&self) -> Contact {
        self.local
    }

    /// Answers a peer's request; `None` when the peer used up its budget
    /// ([`DHT_UNITS_PER_PEER_PER_SECOND`]), or the DHT task is overloaded
    /// or gone.
    pub async fn answer(&self, from: Contact, request: Request) -> Option<Response> {
        let now = std::time::Instant::now();
        let within = lock(&self.budgets)
            .get_or_insert_with(
                from.id,
                |b| b.full(now),
                || TokenBucket::new(DHT_UNITS_PER_PEER_PER_SECOND, DHT_BURST_PER_PEER, now),
            )
            .is_some_and(|b| b.try_take(cost(&request), now));
        if !within {
            return None;
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Cmd::Incoming {
                from,
                request,
                reply,
            })
            .ok()?;
        tokio::time::timeout(ANSWER_TIMEOUT, rx).await.ok()?.ok()
    }

    async fn ask<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Option<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(cmd(reply)).await.ok()?;
        tokio::time::timeout(LOOKUP_TIMEOUT, rx).await.ok()?.ok()
    }

    /// Looks up the verified, unexpired providers of `model`.
    pub async fn providers(&self, model: &str) -> Vec<ProviderRecord> {
        self.lookup_providers(model).await.unwrap_or_default()
    }

    /// [`Discovery::providers`], or `None` when the lookup could not run
    /// or finish (overloaded, timed out).
    pub async fn lookup_providers(&self, model: &str) -> Option<Vec<ProviderRecord>> {
        let key = hypha_dht::model_key(model);
        self.ask(|reply| Cmd::Providers { key, reply }).await
    }

    /// Finds the nodes closest to `target`.
    pub async fn find_node(&self, target: NodeId) -> Option<NodeLookup> {
        self.ask(|reply| Cmd::FindNode { target, reply }).await
    }

    /// Stores `record` at the nodes closest to `key` (its model's key or
    /// the catalog's); how many took it.
    pub async fn publish(&self, key: NodeId, record: ProviderRecord) -> u32 {
        self.ask(|reply| Cmd::Publish {
            key,
            record: Box::new(record),
            reply,
        })
        .await
        .unwrap_or(0)
    }

    /// The names of the models the network's catalog lists.
    pub async fn catalog(&self) -> Vec<String> {
        let key = hypha_dht::catalog_key();
        let mut names: Vec<String> = self
            .ask(|reply| Cmd::Providers { key, reply })
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.model)
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The routing table and the records held here.
    pub async fn view(&self) -> Option<NetworkView> {
        self.ask(|reply| Cmd::View { reply }).await
    }
}

async fn run(
    mut dht: Dht,
    mut rx: mpsc::Receiver<Cmd>,
    tx: mpsc::Sender<Cmd>,
    conns: Arc<Connections>,
    bootstrap: Vec<Contact>,
    tasks: Tasks,
) {
    let mut waiters: HashMap<QueryId, Waiter> = HashMap::new();
    let mut next_bootstrap = unix_ms();
    loop {
        let now = unix_ms();
        // Join again while the table is empty (the bootstrap nodes may start
        // later) or small (nodes that joined after us are found by a new
        // self-lookup; a node behind a NAT is never told of them).
        let rejoin = match dht.table().len() {
            0 => Some(BOOTSTRAP_RETRY),
            n if n < hypha_dht::K => Some(REJOIN_EVERY),
            _ => None,
        };
        if let (Some(every), false) = (rejoin, bootstrap.is_empty()) {
            if now >= next_bootstrap {
                next_bootstrap = now.saturating_add(every.as_millis() as u64);
                // An empty table bootstraps in full (far buckets too); a
                // small one only looks itself up.
                let started = if dht.table().is_empty() {
                    dht.bootstrap(&bootstrap, now)
                } else {
                    let me = dht.local().id;
                    dht.find_node(me, now)
                };
                if let Err(e) = started {
                    tracing::debug!("bootstrap not started: {e}");
                }
            }
        }
        let mut wake = dht.poll_timeout().unwrap_or(u64::MAX);
        if rejoin.is_some() && !bootstrap.is_empty() {
            wake = wake.min(next_bootstrap);
        }
        let sleep = Duration::from_millis(wake.saturating_sub(now).min(60_000));
        tokio::select! {
            biased;
            () = tasks.stopping() => break,
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                handle(&mut dht, cmd, &mut waiters);
            }
            () = tokio::time::sleep(sleep) => dht.handle_timeout(unix_ms()),
        }
        // A steady stream of commands must not starve timeouts and refresh.
        if dht.poll_timeout().is_some_and(|t| t <= unix_ms()) {
            dht.handle_timeout(unix_ms());
        }
        while let Some(t) = dht.poll_transmit() {
            let conns = conns.clone();
            let tx = tx.clone();
            tasks.spawn(async move {
                let peer = PeerAddr {
                    id: t.to.id,
                    addr: t.to.addr,
                };
                let mark = conns.mark(&peer.id);
                let response =
                    match tokio::time::timeout(RPC_TIMEOUT, rpc(&conns, &peer, &t.request)).await {
                        Ok(Ok(r)) => Some(r),
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, "DHT request failed: {e}");
                            None
                        }
                        Err(_) => {
                            // A connection on which nothing arrived for
                            // this long is dead: the next request dials
                            // afresh (a slow peer keeps its connection).
                            conns.discard_if_silent(&peer.id, mark);
                            None
                        }
                    };
                let _ = tx.send(Cmd::Reply { id: t.id, response }).await;
            });
        }
        while let Some(Event::QueryDone { id, result }) = dht.poll_event() {
            if let QueryResult::PutNotice { key, stored } = &result {
                tracing::info!(%key, stored, "unpaid notice published");
            }
            let Some(w) = waiters.remove(&id) else {
                continue;
            };
            match (w, result) {
                (Waiter::Providers(tx), QueryResult::GetProviders { records, .. }) => {
                    let _ = tx.send(records);
                }
                (
                    Waiter::Nodes(tx),
                    QueryResult::FindNode {
                        closest,
                        hops,
                        requests,
                        ..
                    },
                ) => {
                    let _ = tx.send(NodeLookup {
                        closest,
                        hops,
                        requests,
                    });
                }
                (Waiter::Stored(tx), QueryResult::AddProvider { stored, .. })
                | (Waiter::Stored(tx), QueryResult::PutReceipts { stored, .. }) => {
                    let _ = tx.send(stored);
                }
                (
                    Waiter::Receipts(tx),
                    QueryResult::GetReceipts {
                        receipts, notices, ..
                    },
                ) => {
                    let _ = tx.send(ReceiptsOf { receipts, notices });
                }
                _ => {}
            }
        }
    }
}

fn handle(dht: &mut Dht, cmd: Cmd, waiters: &mut HashMap<QueryId, Waiter>) {
    let now = unix_ms();
    match cmd {
        Cmd::Incoming {
            from,
            request,
            reply,
        } => {
            let answer = if is_virtual(&from.addr) {
                dht.handle_request_unlisted(now, from, request)
            } else {
                dht.handle_request(now, from, request)
            };
            let _ = reply.send(answer);
        }
        Cmd::Reply { id, response } => match response {
            Some(r) => dht.handle_response(now, id, r),
            None => dht.handle_failure(now, id),
        },
        Cmd::Providers { key, reply } => match dht.get_providers(key, now) {
            Ok(q) => {
                waiters.insert(q, Waiter::Providers(reply));
            }
            Err(e) => tracing::debug!("provider lookup not started: {e}"),
        },
        Cmd::FindNode { target, reply } => match dht.find_node(target, now) {
            Ok(q) => {
                waiters.insert(q, Waiter::Nodes(reply));
            }
            Err(e) => tracing::debug!("node lookup not started: {e}"),
        },
        Cmd::Publish { key, record, reply } => match dht.add_provider(key, *record, now) {
            Ok(q) => {
                waiters.insert(q, Waiter::Stored(reply));
            }
            Err(e) => tracing::warn!("cannot publish provider record: {e}"),
        },
        Cmd::GetReceipts { key, reply } => match dht.get_receipts(key, now) {
            Ok(q) => {
                waiters.insert(q, Waiter::Receipts(reply));
            }
            Err(e) => tracing::debug!("receipt lookup not started: {e}"),
        },
        Cmd::PutNotice { notice } => {
            if let Err(e) = dht.put_notice(*notice, now) {
                tracing::warn!("cannot publish an unpaid notice: {e}");
            }
        }
        Cmd::PutReceipts {
            key,
            receipts,
            reply,
        } => match dht.put_receipts(key, receipts, now) {
            Ok(q) => {
                waiters.insert(q, Waiter::Stored(reply));
            }
            Err(e) => tracing::warn!("cannot publish receipts: {e}"),
        },
        Cmd::View { reply } => {
            let _ = reply.send(NetworkView {
                local: dht.local(),
                contacts: dht.table().contacts(),
                records: dht.store().all(now),
            });
        }
    }
}

/// Sends one DHT request to `peer` and reads its reply.
async fn rpc(
    conns: &Connections,
    peer: &PeerAddr,
    request: &Request,
) -> Result<Response, PeerError> {
    let (conn, _) = conns.get(peer, false).await?;
    let (send, recv) = conn.open_bi().await?;
    let mut send = FramedSend::new(send);
    send.send(&Message::Dht(request_to_wire(request))).await?;
    send.finish();
    let mut recv = FramedRecv::new(recv);
    let reply = recv
        .next(|m| match m {
            ArchivedMessage::DhtReply(r) => {
                hypha_dht::codec::check_archived_reply(r).map_err(Violation::Dht)?;
                Ok(hypha_wire::owned_dht_reply(r).map_err(Violation::Wire)?)
            }
            other => Err(Violation::Answer {
                what: "a DHT request",
                got: kind_of(other),
            }
            .into()),
        })
        .await?
        .ok_or(PeerError::Protocol(Violation::NoReply("DHT")))?;
    Ok(reply_from_wire(reply).map_err(Violation::Dht)?)
}

/// Publishes queued receipts in batches: each under its consumer's and its
/// seeder's receipt key, at most `MAX_RECEIPTS_PER_PUT` per store.
async fn publish_receipts(
    discovery: Discovery,
    mut queue: mpsc::Receiver<VerifiedReceipt>,
    tasks: Tasks,
) {
    loop {
        let first = tokio::select! {
            () = tasks.stopping() => return,
            r = queue.recv() => match r {
                Some(r) => r,
                None => return,
            },
        };
        tokio::time::sleep(RECEIPT_BATCH_WAIT).await;
        let mut batch = vec![first];
        while batch.len() < hypha_dht::receipts::MAX_RECEIPTS_PER_PUT {
            match queue.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut by_key: HashMap<NodeId, Vec<VerifiedReceipt>> = HashMap::new();
        for r in batch {
            let rc = r.receipt();
            for party in [rc.consumer, rc.seeder] {
                by_key
                    .entry(hypha_dht::receipts_key(&party))
                    .or_default()
                    .push(r.clone());
            }
        }
        for (key, receipts) in by_key {
            let n = receipts.len();
            let stored = discovery.put_receipts(key, receipts).await;
            tracing::debug!(receipts = n, stored, "receipts published");
        }
    }
}
