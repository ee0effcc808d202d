//! Conversion between the DHT's messages and their wire form, checked on
//! the way in: a peer's message that names too many contacts or records,
//! or an address that does not parse, is refused whole. Receipts and
//! unpaid notices are only decoded here; their signatures are checked
//! before they are stored or used.

use std::net::SocketAddr;

use hypha_wire::{DhtReply, DhtRequest, NodeId, WireContact, WireRecord};

use hypha_ledger::{Notice, SignedReceipt, NOTICE_BYTES, SIGNED_RECEIPT_BYTES};

use crate::notices::MAX_NOTICES_PER_KEY;
use crate::receipts::{MAX_RECEIPTS_PER_KEY, MAX_RECEIPTS_PER_PUT};
use crate::record::{
    ProviderRecord, MAX_CATALOG_MODELS, MAX_PROVIDERS_PER_KEY, MAX_RECORD_ADDRS, MAX_RECORD_RELAYS,
};
use crate::{Contact, DhtError, Request, Response, K};

/// Longest address text accepted (`[v6%scope]:port` fits well within).
const MAX_ADDR_BYTES: usize = 64;

/// Most records one `Providers` reply may carry: what the fullest key (the
/// catalog) holds.
pub const MAX_RECORDS_PER_REPLY: usize = if MAX_CATALOG_MODELS > MAX_PROVIDERS_PER_KEY {
    MAX_CATALOG_MODELS
} else {
    MAX_PROVIDERS_PER_KEY
};
/// An upper bound on one record's archived size: its strings at their
/// limits, each with a length header, and 512 bytes for the fixed fields
/// (ids, key, hash, signature, integers and alignment).
const MAX_RECORD_WIRE_BYTES: usize = 2048;
const _: () = assert!(
    MAX_RECORD_ADDRS * (MAX_ADDR_BYTES + 8)
        + MAX_RECORD_RELAYS * (MAX_RELAY_BYTES + 8)
        + 2 * (crate::record::MAX_RECORD_NAME_BYTES + 8)
        + 512
        <= MAX_RECORD_WIRE_BYTES
);
// The fullest reply, with its contacts, fits in one frame.
const _: () = assert!(
    MAX_RECORDS_PER_REPLY * MAX_RECORD_WIRE_BYTES + K * (32 + MAX_ADDR_BYTES + 16)
        <= hypha_wire::MAX_FRAME_BYTES
);

// The fullest receipts reply (a key's receipts and notices, each with an
// 8-byte length header, and its contacts) fits in one frame.
const _: () = assert!(
    MAX_RECEIPTS_PER_KEY * (SIGNED_RECEIPT_BYTES + 8)
        + MAX_NOTICES_PER_KEY * (NOTICE_BYTES + 8)
        + K * (32 + MAX_ADDR_BYTES + 16)
        + 64
        <= hypha_wire::MAX_FRAME_BYTES
);

fn addr_from_wire(s: &str) -> Result<SocketAddr, DhtError> {
    if s.len() > MAX_ADDR_BYTES {
        return Err(DhtError::BadMessage("address too long"));
    }
    s.parse()
        .map_err(|_| DhtError::BadMessage("address does not parse"))
}

pub fn contact_to_wire(c: &Contact) -> WireContact {
    WireContact {
        id: c.id.0,
        addr: c.addr.to_string(),
    }
}

/// Longest relay entry: a hex node id, `@`, an address.
const MAX_RELAY_BYTES: usize = 64 + 1 + MAX_ADDR_BYTES;

/// A record's relay entry, `NODE_ID@ip:port`.
fn relay_from_wire(s: &str) -> Result<Contact, DhtError> {
    if s.len() > MAX_RELAY_BYTES {
        return Err(DhtError::BadMessage("relay entry too long"));
    }
    let (id, addr) = s
        .split_once('@')
        .ok_or(DhtError::BadMessage("relay entry is not NODE_ID@ADDRESS"))?;
    Ok(Contact {
        id: id
            .parse()
            .map_err(|_| DhtError::BadMessage("relay entry has a bad node id"))?,
        addr: addr_from_wire(addr)?,
    })
}

pub fn contact_from_wire(c: &WireContact) -> Result<Contact, DhtError> {
    Ok(Contact {
        id: NodeId(c.id),
        addr: addr_from_wire(&c.addr)?,
    })
}

pub fn record_to_wire(r: &ProviderRecord) -> WireRecord {
    WireRecord {
        publisher: r.publisher.0,
        public_key: r.public_key,
        addrs: r.addrs.iter().map(ToString::to_string).collect(),
        relays: r
            .relays
            .iter()
            .map(|c| format!("{}@{}", c.id, c.addr))
            .collect(),
        model: r.model.clone(),
        model_sha256: r.model_sha256,
        context_length: r.context_length,
        backend: r.backend.clone(),
        decode_tokens_per_s: r.decode_tokens_per_s,
        free_slots: r.free_slots,
        price_prompt_micro: r.price_prompt_micro,
        price_completion_micro: r.price_completion_micro,
        expires_ms: r.expires_ms,
        signature: r.signature,
    }
}

/// The record in the DHT's form; its signature is checked later, by
/// [`ProviderRecord::verify`], before it is stored or used.
pub fn record_from_wire(r: WireRecord) -> Result<ProviderRecord, DhtError> {
    if r.addrs.len() > MAX_RECORD_ADDRS || r.relays.len() > MAX_RECORD_RELAYS {
        return Err(DhtError::BadRecord("record fields over their limits"));
    }
    let addrs = r
        .addrs
        .iter()
        .map(|a| addr_from_wire(a))
        .collect::<Result<Vec<_>, _>>()?;
    let relays = r
        .relays
        .iter()
        .map(|s| relay_from_wire(s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ProviderRecord {
        publisher: NodeId(r.publisher),
        public_key: r.public_key,
        addrs,
        relays,
        model: r.model,
        model_sha256: r.model_sha256,
        context_length: r.context_length,
        backend: r.backend,
        decode_tokens_per_s: r.decode_tokens_per_s,
        free_slots: r.free_slots,
        price_prompt_micro: r.price_prompt_micro,
        price_completion_micro: r.price_completion_micro,
        expires_ms: r.expires_ms,
        signature: r.signature,
    })
}

pub fn request_to_wire(r: &Request) -> DhtRequest {
    match r {
        Request::Ping => DhtRequest::Ping,
        Request::FindNode { target } => DhtRequest::FindNode { target: target.0 },
        Request::GetProviders { key } => DhtRequest::GetProviders { key: key.0 },
        Request::AddProvider { key, record } => DhtRequest::AddProvider {
            key: key.0,
            record: Box::new(record_to_wire(record)),
        },
        Request::GetReceipts { key } => DhtRequest::GetReceipts { key: key.0 },
        Request::PutReceipts { key, receipts } => DhtRequest::PutReceipts {
            key: key.0,
            receipts: receipts_to_wire(receipts),
        },
        Request::PutNotice { key, notice } => DhtRequest::PutNotice {
            key: key.0,
            notice: notice.to_bytes().to_vec(),
        },
    }
}

fn receipts_to_wire(v: &[SignedReceipt]) -> Vec<Vec<u8>> {
    v.iter().map(|r| r.to_bytes().to_vec()).collect()
}

fn notices_from_wire(v: &[Vec<u8>]) -> Result<Vec<Notice>, DhtError> {
    if v.len() > MAX_NOTICES_PER_KEY {
        return Err(DhtError::BadMessage("too many notices"));
    }
    v.iter()
        .map(|b| Notice::from_bytes(b).map_err(|_| DhtError::BadMessage("malformed notice")))
        .collect()
}

fn receipts_from_wire(v: &[Vec<u8>], max: usize) -> Result<Vec<SignedReceipt>, DhtError> {
    if v.len() > max {
        return Err(DhtError::BadMessage("too many receipts"));
    }
    v.iter()
        .map(|b| {
            SignedReceipt::from_bytes(b).map_err(|_| DhtError::BadMessage("malformed receipt"))
        })
        .collect()
}

pub fn request_from_wire(r: DhtRequest) -> Result<Request, DhtError> {
    Ok(match r {
        DhtRequest::Ping => Request::Ping,
        DhtRequest::FindNode { target } => Request::FindNode {
            target: NodeId(target),
        },
        DhtRequest::GetProviders { key } => Request::GetProviders { key: NodeId(key) },
        DhtRequest::AddProvider { key, record } => Request::AddProvider {
            key: NodeId(key),
            record: Box::new(record_from_wire(*record)?),
        },
        DhtRequest::GetReceipts { key } => Request::GetReceipts { key: NodeId(key) },
        DhtRequest::PutReceipts { key, receipts } => Request::PutReceipts {
            key: NodeId(key),
            receipts: receipts_from_wire(&receipts, MAX_RECEIPTS_PER_PUT)?,
        },
        DhtRequest::PutNotice { key, notice } => Request::PutNotice {
            key: NodeId(key),
            notice: Box::new(
                Notice::from_bytes(&notice)
                    .map_err(|_| DhtError::BadMessage("malformed notice"))?,
            ),
        },
    })
}

pub fn reply_to_wire(r: &Response) -> DhtReply {
    let contacts = |v: &[Contact]| v.iter().map(contact_to_wire).collect();
    match r {
        Response::Pong => DhtReply::Pong,
        Response::Nodes { closer } => DhtReply::Nodes {
            closer: contacts(closer),
        },
        Response::Providers { records, closer } => DhtReply::Providers {
            records: records.iter().map(record_to_wire).collect(),
            closer: contacts(closer),
        },
        Response::Receipts {
            receipts,
            notices,
            closer,
        } => DhtReply::Receipts {
            receipts: receipts_to_wire(receipts),
            notices: notices.iter().map(|n| n.to_bytes().to_vec()).collect(),
            closer: contacts(closer),
        },
        Response::Stored => DhtReply::Stored,
        Response::Refused => DhtReply::Refused,
    }
}

fn contacts_from_wire(v: &[WireContact]) -> Result<Vec<Contact>, DhtError> {
    if v.len() > K {
        return Err(DhtError::BadMessage("more contacts than a bucket holds"));
    }
    v.iter().map(contact_from_wire).collect()
}

pub fn reply_from_wire(r: DhtReply) -> Result<Response, DhtError> {
    Ok(match r {
        DhtReply::Pong => Response::Pong,
        DhtReply::Nodes { closer } => Response::Nodes {
            closer: contacts_from_wire(&closer)?,
        },
        DhtReply::Providers { records, closer } => {
            if records.len() > MAX_RECORDS_PER_REPLY {
                return Err(DhtError::BadMessage("more records than a key holds"));
            }
            Response::Providers {
                records: records
                    .into_iter()
                    .map(record_from_wire)
                    .collect::<Result<_, _>>()?,
                closer: contacts_from_wire(&closer)?,
            }
        }
        DhtReply::Receipts {
            receipts,
            notices,
            closer,
        } => Response::Receipts {
            receipts: receipts_from_wire(&receipts, MAX_RECEIPTS_PER_KEY)?,
            notices: notices_from_wire(&notices)?,
            closer: contacts_from_wire(&closer)?,
        },
        DhtReply::Stored => Response::Stored,
        DhtReply::Refused => Response::Refused,
    })
}

/// Checks an archived request's sizes before it is copied out of the frame,
/// so a frame full of tiny items cannot make the node allocate for each.
pub fn check_archived_request(r: &hypha_wire::ArchivedDhtRequest) -> Result<(), DhtError> {
    use hypha_wire::ArchivedDhtRequest as A;
    match r {
        A::AddProvider { record, .. } => check_archived_record(record),
        A::PutReceipts { receipts, .. } => {
            if receipts.len() > MAX_RECEIPTS_PER_PUT
                || receipts
                    .iter()
                    .any(|r| r.len() != hypha_ledger::SIGNED_RECEIPT_BYTES)
            {
                return Err(DhtError::BadMessage("receipts over their limits"));
            }
            Ok(())
        }
        A::PutNotice { notice, .. } => {
            if notice.len() != NOTICE_BYTES {
                return Err(DhtError::BadMessage("notice of the wrong size"));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// [`check_archived_request`] for replies.
pub fn check_archived_reply(r: &hypha_wire::ArchivedDhtReply) -> Result<(), DhtError> {
    use hypha_wire::ArchivedDhtReply as A;
    let (n, long_addr) = match r {
        A::Nodes { closer } | A::Providers { closer, .. } | A::Receipts { closer, .. } => (
            closer.len(),
            closer.iter().any(|c| c.addr.len() > MAX_ADDR_BYTES),
        ),
        _ => (0, false),
    };
    if n > K || long_addr {
        return Err(DhtError::BadMessage("contacts over their limits"));
    }
    match r {
        A::Providers { records, .. } => {
            if records.len() > MAX_RECORDS_PER_REPLY {
                return Err(DhtError::BadMessage("more records than a key holds"));
            }
            for rec in records.iter() {
                check_archived_record(rec)?;
            }
            Ok(())
        }
        A::Receipts {
            receipts, notices, ..
        } => {
            if receipts.len() > MAX_RECEIPTS_PER_KEY
                || receipts
                    .iter()
                    .any(|r| r.len() != hypha_ledger::SIGNED_RECEIPT_BYTES)
                || notices.len() > MAX_NOTICES_PER_KEY
                || notices.iter().any(|n| n.len() != NOTICE_BYTES)
            {
                return Err(DhtError::BadMessage("receipts over their limits"));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn check_archived_record(r: &hypha_wire::ArchivedWireRecord) -> Result<(), DhtError> {
    use crate::record::MAX_RECORD_NAME_BYTES;
    if r.addrs.len() > MAX_RECORD_ADDRS
        || r.addrs.iter().any(|a| a.len() > MAX_ADDR_BYTES)
        || r.relays.len() > MAX_RECORD_RELAYS
        || r.relays.iter().any(|a| a.len() > MAX_RELAY_BYTES)
        || r.model.len() > MAX_RECORD_NAME_BYTES
        || r.backend.len() > MAX_RECORD_NAME_BYTES
    {
        return Err(DhtError::BadRecord("record fields over their limits"));
    }
    Ok(())
}
