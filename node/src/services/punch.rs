//! Hole punching: two nodes that cannot dial each other (one or both
//! behind NATs that drop unsolicited packets) dial each other at the same
//! time, so each NAT sees the other's packets as replies.
//!
//! The initiator signs a [`PunchRequest`] naming the target and its own
//! candidate addresses and sends it to rendezvous nodes: nodes close to
//! the target in the DHT, which the target keeps connections to. A
//! rendezvous with a live connection to the target forwards the request
//! unchanged; the target checks the signature and age and dials the
//! initiator's candidates, while the initiator dials the target's. The
//! signature means no rendezvous can make a node dial addresses the
//! initiator did not name. Limits, in order: each sender of requests
//! ([`PUNCHES_PER_SENDER_PER_SECOND`], before any signature is checked);
//! then, once the request checks, each initiator
//! ([`PUNCHES_PER_INITIATOR_PER_SECOND`]) and the node in all
//! ([`MAX_PUNCHES_PER_SECOND`]), so one peer cannot use up everyone's
//! punches with requests that do not even verify. A target dials only the
//! candidates a punch can use ([`hypha_nat::punchable`]): never into a
//! private network it is not itself in.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::{Signature, Signer as _, Verifier as _, VerifyingKey};
use hypha_wire::{ArchivedMessage, Message, NodeId, PunchRequest, Refusal};
use tokio::sync::mpsc;

use crate::identity::Identity;
use crate::net::addr::PeerAddr;
use crate::net::hello::check_pow;
use crate::net::pool::Connections;
use crate::net::proto::{kind_of, FramedRecv, FramedSend, PeerError, Violation};
use crate::util::{lock, unix_ms, BoundedMap, Overflow, RateWindow, Tasks};

/// How old (or how far in the future) a request may be: it is acted on
/// within a round trip; this allows for clock skew.
pub const PUNCH_MAX_AGE_MS: u64 = 30_000;
/// Candidate addresses one request may name.
pub const MAX_PUNCH_CANDIDATES: usize = 8;
/// Punch requests a node handles per second (as rendezvous and target).
pub const MAX_PUNCHES_PER_SECOND: u32 = 32;
/// Requests one peer may send per second, counted before they are
/// checked: a few punches in flight, as a rendezvous forwards them.
pub const PUNCHES_PER_SENDER_PER_SECOND: u32 = 8;
/// Checked requests of one initiator per second: one punch tries every
/// rendezvous in turn.
pub const PUNCHES_PER_INITIATOR_PER_SECOND: u32 = 4;
/// Senders and initiators whose windows are kept; beyond, a stale window
/// makes room, or the request waits for the next second.
const MAX_PUNCH_WINDOWS: usize = 1024;
const _: () = assert!(PUNCHES_PER_INITIATOR_PER_SECOND <= PUNCHES_PER_SENDER_PER_SECOND);
const _: () = assert!(PUNCHES_PER_SENDER_PER_SECOND <= MAX_PUNCHES_PER_SECOND);
/// Rendezvous nodes asked, one after another, until one forwards.
pub const RENDEZVOUS_TRIES: usize = 3;
/// How long a rendezvous may take to answer (it forwards and waits for the
/// target's answer).
pub const PUNCH_REPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the target spends dialing each of the initiator's candidates.
pub const PUNCH_DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// A signed request for `target` to dial `candidates`.
pub fn request(identity: &Identity, target: NodeId, candidates: &[SocketAddr]) -> PunchRequest {
    let mut req = PunchRequest {
        initiator: identity.id().0,
        initiator_key: identity.public_key(),
        target: target.0,
        candidates: candidates
            .iter()
            .take(MAX_PUNCH_CANDIDATES)
            .map(ToString::to_string)
            .collect(),
        issued_ms: unix_ms(),
        signature: [0; 64],
    };
    req.signature = identity.signing_key().sign(&req.signed_bytes()).to_bytes();
    req
}

/// Checks a request at `now_ms`: the key is the initiator's, the signature
/// covers it, it is recent, its candidates parse. The initiator and its
/// candidates.
pub fn check(req: &PunchRequest, now_ms: u64) -> Result<(NodeId, Vec<SocketAddr>), PeerError> {
    let bad = |why: &'static str| PeerError::Protocol(Violation::Punch(why));
    if req.candidates.len() > MAX_PUNCH_CANDIDATES {
        return Err(bad("too many candidates"));
    }
    if hypha_ledger::node_id_of(&req.initiator_key).0 != req.initiator {
        return Err(bad("the key is not the initiator's"));
    }
    if req.issued_ms.abs_diff(now_ms) > PUNCH_MAX_AGE_MS {
        return Err(bad("too old or from the future"));
    }
    let key = VerifyingKey::from_bytes(&req.initiator_key).map_err(|_| bad("invalid key"))?;
    key.verify(&req.signed_bytes(), &Signature::from_bytes(&req.signature))
        .map_err(|_| bad("the signature does not verify"))?;
    let candidates = req
        .candidates
        .iter()
        .map(|c| {
            c.parse::<SocketAddr>()
                .map_err(|_| bad("a candidate does not parse"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((NodeId(req.initiator), candidates))
}

/// Sends `req` on a new stream of `conn` and reads the answer: `None`
/// when the target took it.
async fn send(conn: &quinn::Connection, req: &PunchRequest) -> Result<Option<Refusal>, PeerError> {
    let (s, r) = conn.open_bi().await?;
    let mut s = FramedSend::new(s);
    s.send(&Message::Punch(req.clone())).await?;
    s.finish();
    let mut r = FramedRecv::new(r);
    r.next(punch_reply)
        .await?
        .ok_or(PeerError::Protocol(Violation::NoReply("punch")))
}

/// Checks the frame a punch request is answered with: `None` when the
/// target took it.
pub fn punch_reply(msg: &ArchivedMessage) -> Result<Option<Refusal>, PeerError> {
    match msg {
        ArchivedMessage::PunchReply(p) => Ok(p.refusal.as_ref().map(Refusal::from)),
        other => Err(Violation::Answer {
            what: "a punch request",
            got: kind_of(other),
        }
        .into()),
    }
}

/// Asks rendezvous nodes in turn to forward `req`; true when one did and
/// the target accepted it.
pub async fn ask(conns: &Connections, rendezvous: &[PeerAddr], req: &PunchRequest) -> bool {
    for r in rendezvous.iter().take(RENDEZVOUS_TRIES) {
        let asked = tokio::time::timeout(PUNCH_REPLY_TIMEOUT, async {
            let (conn, _) = conns.get(r, false).await?;
            send(&conn, req).await
        })
        .await;
        match asked {
            Ok(Ok(None)) => return true,
            Ok(Ok(Some(refusal))) => {
                tracing::debug!(rendezvous = %r, ?refusal, "punch not forwarded");
            }
            Ok(Err(e)) => tracing::debug!(rendezvous = %r, "punch request failed: {e}"),
            Err(_) => tracing::debug!(rendezvous = %r, "punch request timed out"),
        }
    }
    false
}

/// Punch dials waiting for the dialer: more are refused (`TooMany`).
pub const PUNCH_QUEUE: usize = 64;

/// An accepted punch request, for the dialer task: the initiator and its
/// candidates.
pub type PunchDial = (NodeId, Vec<SocketAddr>);

/// The punch requests this node handles, as a rendezvous and as a target.
pub struct Punches {
    me: NodeId,
    /// Proof of work required of an initiator's identity.
    pow_bits: u32,
    conns: Arc<Connections>,
    /// Punch requests handled in the current second.
    window: Mutex<RateWindow>,
    /// Requests per sender, and checked ones per initiator, this second.
    senders: Mutex<BoundedMap<NodeId, RateWindow>>,
    initiators: Mutex<BoundedMap<NodeId, RateWindow>>,
    dials: mpsc::Sender<PunchDial>,
}

impl Punches {
    /// The service, and the queue of dials it accepts for [`dialer`].
    pub fn new(
        me: NodeId,
        pow_bits: u32,
        conns: Arc<Connections>,
    ) -> (Self, mpsc::Receiver<PunchDial>) {
        let (dials, queue) = mpsc::channel(PUNCH_QUEUE);
        let window = RateWindow::new(
            Duration::from_secs(1),
            MAX_PUNCHES_PER_SECOND,
            Instant::now(),
        );
        (
            Self {
                me,
                pow_bits,
                conns,
                window: Mutex::new(window),
                senders: Mutex::new(BoundedMap::new(MAX_PUNCH_WINDOWS, Overflow::Refuse)),
                initiators: Mutex::new(BoundedMap::new(MAX_PUNCH_WINDOWS, Overflow::Refuse)),
                dials,
            },
            queue,
        )
    }

    /// Handles a punch request that arrived from `from`: as its target,
    /// queues a dial to the initiator; as a rendezvous, forwards it. The
    /// answer: `None` when the target took it.
    pub async fn handle(&self, req: PunchRequest, from: NodeId) -> Option<Refusal> {
        let now = Instant::now();
        if !allow(&self.senders, from, PUNCHES_PER_SENDER_PER_SECOND, now) {
            return Some(Refusal::TooMany);
        }
        let (initiator, candidates) = match check(&req, unix_ms()) {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(%from, "{e}");
                return Some(Refusal::BadRequest);
            }
        };
        // Identities cost proof of work here as everywhere: a punch makes the
        // target dial, and free identities could make it dial without end.
        if check_pow(&initiator, self.pow_bits).is_err() {
            tracing::info!(%from, %initiator, "punch request from an identity without proof of work");
            return Some(Refusal::BadRequest);
        }
        if !allow(
            &self.initiators,
            initiator,
            PUNCHES_PER_INITIATOR_PER_SECOND,
            now,
        ) || !lock(&self.window).allow(now)
        {
            return Some(Refusal::TooMany);
        }
        if NodeId(req.target) == self.me {
            let local = self
                .conns
                .endpoint()
                .local_addr()
                .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| a.ip());
            let candidates: Vec<SocketAddr> = candidates
                .into_iter()
                .filter(|c| hypha_nat::punchable(*c, local))
                .collect();
            if candidates.is_empty() {
                tracing::info!(%initiator, "punch request names no address a punch can use");
                return Some(Refusal::BadRequest);
            }
            tracing::debug!(%initiator, ?candidates, "punching toward a peer");
            return match self.dials.try_send((initiator, candidates)) {
                Ok(()) => None,
                Err(_) => Some(Refusal::TooMany),
            };
        }
        let Some(conn) = self.conns.connection_to(&NodeId(req.target)) else {
            return Some(Refusal::NotFound);
        };
        match tokio::time::timeout(PUNCH_REPLY_TIMEOUT, send(&conn, &req)).await {
            Ok(Ok(answer)) => answer,
            _ => Some(Refusal::Unreachable),
        }
    }
}

/// Counts one event for `id` in its one-second window; false when its
/// limit is used up (or no window can be kept for it).
fn allow(
    windows: &Mutex<BoundedMap<NodeId, RateWindow>>,
    id: NodeId,
    limit: u32,
    now: Instant,
) -> bool {
    lock(windows)
        .get_or_insert_with(
            id,
            |w| w.expired(now),
            || RateWindow::new(Duration::from_secs(1), limit, now),
        )
        .is_some_and(|w| w.allow(now))
}

/// Dials the initiators of accepted punch requests, each candidate in turn
/// until one connects, until the queue closes.
pub async fn dialer(conns: Arc<Connections>, mut queue: mpsc::Receiver<PunchDial>, tasks: Tasks) {
    while let Some((initiator, candidates)) = queue.recv().await {
        let conns = conns.clone();
        tasks.spawn(async move {
            for addr in candidates {
                let peer = PeerAddr {
                    id: initiator,
                    addr,
                };
                match tokio::time::timeout(PUNCH_DIAL_TIMEOUT, conns.get(&peer, false)).await {
                    Ok(Ok(_)) => {
                        tracing::info!(%initiator, %addr, "hole punched");
                        return;
                    }
                    Ok(Err(e)) => tracing::debug!(%addr, "punch dial failed: {e}"),
                    Err(_) => tracing::debug!(%addr, "punch dial timed out"),
                }
            }
        });
    }
}
