//! This node's side of relaying: the reservations it holds at relays while
//! it sits behind a NAT, and the paths it asks relays for to reach such
//! nodes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hypha_dht::Contact;
use hypha_wire::{Message, NodeId, RelayConnect, RelayReserve};

use crate::net::addr::PeerAddr;
use crate::net::paths::Paths;
use crate::net::pool::Connections;
use crate::net::proto::{FramedRecv, FramedSend, PeerError};
use crate::services::dht::Discovery;
use crate::services::reach::Reachability;
use crate::services::relay_server::{read_reply, MAX_SESSIONS_PER_PEER, RELAY_SETUP_TIMEOUT};
use crate::util::{lock, Tasks};

/// Relays a node behind a NAT holds reservations at: one to use, one in
/// case it goes away.
pub const RELAYS_PER_NODE: usize = 2;
/// Between checks of a node's reservations (and, while it has fewer than
/// it wants, attempts to make more) ...
const RESERVE_CHECK: Duration = Duration::from_secs(2);
/// ... backing off to this while no relay can be found or will reserve.
const RESERVE_BACKOFF_MAX: Duration = Duration::from_secs(60);
const _: () = assert!(RESERVE_CHECK.as_millis() <= RESERVE_BACKOFF_MAX.as_millis());
/// Asks `relay` for a path to `target`: the path's virtual address.
pub async fn connect_via(
    conns: &Connections,
    paths: &Arc<Paths>,
    relay: &PeerAddr,
    target: NodeId,
) -> Result<SocketAddr, PeerError> {
    let setup = async {
        let (conn, _) = conns.get(relay, false).await?;
        let (s, r) = conn.open_bi().await?;
        let mut send = FramedSend::new(s);
        send.send(&Message::RelayConnect(RelayConnect { target: target.0 }))
            .await?;
        let mut recv = FramedRecv::new(r);
        let answer = read_reply(&mut recv).await?;
        Ok::<_, PeerError>((answer, send, recv))
    };
    let (answer, send, recv) = tokio::time::timeout(RELAY_SETUP_TIMEOUT, setup)
        .await
        .map_err(|_| PeerError::Timeout("setting up a relayed path"))??;
    if let Some(refusal) = answer {
        return Err(PeerError::Unreachable(format!(
            "relay {} gave no path to {target} ({refusal:?})",
            relay.id
        )));
    }
    let (recv, leftover) = recv.into_parts();
    paths.open(target, relay.id, send.stream, recv, leftover)
}

/// The reservations a node behind a NAT holds at relays, kept by
/// [`keep_reservations`].
#[derive(Default)]
pub struct RelayClient {
    /// Relays to reserve at whatever the NAT looks like (`--relay-via`).
    pub via: Vec<PeerAddr>,
    /// Reserve at relays found in the DHT once the node is seen behind a
    /// NAT.
    pub auto: bool,
    held: Mutex<Vec<(Contact, quinn::Connection)>>,
}

impl RelayClient {
    pub fn new(via: Vec<PeerAddr>, auto: bool) -> Self {
        Self {
            via,
            auto,
            held: Mutex::new(Vec::new()),
        }
    }

    /// Relays this node holds a live reservation at.
    pub fn relays(&self) -> Vec<Contact> {
        lock(&self.held)
            .iter()
            .filter(|(_, c)| c.close_reason().is_none())
            .map(|(r, _)| *r)
            .collect()
    }

    /// True when `relay` holds a live reservation for this node.
    pub fn reserved_at(&self, relay: &NodeId) -> bool {
        self.relays().iter().any(|r| r.id == *relay)
    }
}

/// Asks `relay` for a reservation.
async fn reserve_at(conns: &Connections, relay: &PeerAddr) -> Result<quinn::Connection, PeerError> {
    let (conn, _) = conns.get(relay, false).await?;
    let (s, r) = conn.open_bi().await?;
    let mut send = FramedSend::new(s);
    send.send(&Message::RelayReserve(RelayReserve {
        max_sessions: MAX_SESSIONS_PER_PEER as u32,
    }))
    .await?;
    send.finish();
    let mut recv = FramedRecv::new(r);
    match read_reply(&mut recv).await? {
        None => Ok(conn),
        Some(refusal) => Err(PeerError::Unreachable(format!(
            "relay {} refused a reservation ({refusal:?})",
            relay.id
        ))),
    }
}

/// Keeps [`RELAYS_PER_NODE`] reservations while the node needs them
/// (configured relays, or relays from the DHT once peers see it behind a
/// NAT), until the node stops.
pub async fn keep_reservations(
    client: Arc<RelayClient>,
    conns: Arc<Connections>,
    discovery: Discovery,
    reach: Arc<Reachability>,
    me: NodeId,
    tasks: Tasks,
) {
    let mut wait = RESERVE_CHECK;
    loop {
        lock(&client.held).retain(|(_, c)| c.close_reason().is_none());
        let behind_nat = matches!(
            reach.view().mapping,
            hypha_nat::Mapping::EndpointIndependent { .. }
                | hypha_nat::Mapping::EndpointDependent { .. }
        );
        let wanted = !client.via.is_empty() || (client.auto && behind_nat);
        let held = client.relays().len();
        if wanted && held < RELAYS_PER_NODE {
            let mut options: Vec<PeerAddr> = client.via.clone();
            if client.auto {
                for r in discovery.providers(hypha_dht::RELAY_SERVICE).await {
                    if let Some(addr) = r.addrs.first() {
                        options.push(PeerAddr {
                            id: r.publisher,
                            addr: *addr,
                        });
                    }
                }
            }
            for relay in options {
                if client.relays().len() >= RELAYS_PER_NODE {
                    break;
                }
                if relay.id == me || client.reserved_at(&relay.id) {
                    continue;
                }
                match tokio::time::timeout(RELAY_SETUP_TIMEOUT, reserve_at(&conns, &relay)).await {
                    Ok(Ok(conn)) => {
                        tracing::info!(relay = %relay, "relay reservation held");
                        lock(&client.held).push((
                            Contact {
                                id: relay.id,
                                addr: relay.addr,
                            },
                            conn,
                        ));
                    }
                    Ok(Err(e)) => tracing::info!(relay = %relay, "no reservation: {e}"),
                    Err(_) => tracing::info!(relay = %relay, "no reservation: timed out"),
                }
            }
        }
        let short = wanted && client.relays().len() < RELAYS_PER_NODE;
        wait = if short && client.relays().len() <= held {
            (wait * 2).min(RESERVE_BACKOFF_MAX)
        } else {
            RESERVE_CHECK
        };
        tokio::select! {
            () = tasks.stopping() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
