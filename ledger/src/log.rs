//! The append-only receipt log.
//!
//! File layout: an 8-byte magic, then records:
//!
//! ```text
//! len: u32 LE | checksum: u64 LE | prev: [u8; 32] | payload: [u8; len]
//! ```
//!
//! `digest = SHA-256(len || prev || payload)`; `checksum` is its first 8
//! bytes and `prev` of the next record is the whole digest (zeros for the
//! first). A payload is a kind byte and its bytes: 1, a signed receipt; 2,
//! a commit record closing a batch (its receipt count).
//!
//! One writer thread owns the file. Appenders queue receipts (bounded) and
//! wait; the writer takes every queued receipt up to [`MAX_BATCH`], checks
//! each against the replay index (a later receipt of a request held
//! replaces it), writes the batch and its commit record in one write,
//! calls `fdatasync`, and only then acknowledges. A failed write or sync
//! poisons the ledger: every later append fails, since what reached the
//! disk is unknown until the next recovery.
//!
//! Recovery reads every record, checking checksums and the chain, and
//! counts a batch's receipts only when its commit record is read. What
//! follows the last commit record was never acknowledged: a torn write,
//! truncated and reported. One sync covers a batch and its commit record,
//! and a power cut during it may leave the commit record on disk but not
//! all of the batch before it: damage inside the last batch, whose commit
//! record ends the file and counts exactly the receipt records between it
//! and the commit before, is that torn write too. Other damage with a
//! valid commit record after it hit acknowledged receipts: the log is
//! refused with the byte offset, never skipped. The file is locked while a
//! node has it open.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};

use hypha_wire::NodeId;

use crate::receipt::{Receipt, ReceiptKey, SignedReceipt, VerifiedReceipt, SIGNED_RECEIPT_BYTES};
use crate::LedgerError;

/// The log's file name in a node's data directory.
pub const LOG_FILE: &str = "ledger.log";
const MAGIC: &[u8; 8] = b"HYLEDG01";
const HEADER_BYTES: usize = 4 + 8 + 32;
const KIND_RECEIPT: u8 = 1;
const KIND_COMMIT: u8 = 2;
/// The largest payload a record may hold; receipts are far smaller, so a
/// length above this is damage, not data.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Receipts written and synced together at most.
pub const MAX_BATCH: usize = 1024;
/// Receipts waiting for the writer before appenders block.
pub const MAX_QUEUED: usize = 8 * MAX_BATCH;
/// Bytes of one receipt record and of one commit record.
const RECEIPT_RECORD_BYTES: usize = HEADER_BYTES + 1 + SIGNED_RECEIPT_BYTES;
const COMMIT_RECORD_BYTES: usize = HEADER_BYTES + 1 + 4;
/// A torn write can only affect the last batch, one batch of receipt
/// records and its commit record; damage further from the end is
/// corruption.
const MAX_TORN_BYTES: u64 = (MAX_BATCH * RECEIPT_RECORD_BYTES + COMMIT_RECORD_BYTES) as u64;
const _: () = assert!(SIGNED_RECEIPT_BYTES < MAX_RECORD_BYTES);

/// What a node's receipts add up to for one id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Micro-credits earned as a seeder.
    pub earned: u64,
    /// Micro-credits spent as a consumer.
    pub spent: u64,
    pub receipts_as_seeder: u64,
    pub receipts_as_consumer: u64,
}

/// What opening the log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub receipts: u64,
    /// Bytes of a torn final write that were cut off.
    pub truncated_bytes: u64,
}

/// Receipts kept in memory for a quick look at recent activity.
pub const RECENT_RECEIPTS: usize = 100;

struct State {
    /// The latest receipt held of each request.
    index: HashMap<ReceiptKey, Held>,
    totals: HashMap<NodeId, Totals>,
    /// Micro-credits moved from each consumer to each seeder.
    moved: HashMap<(NodeId, NodeId), u64>,
    /// Requests the log holds receipts of.
    receipts: u64,
    /// The newest receipts, oldest first, at most [`RECENT_RECEIPTS`].
    recent: std::collections::VecDeque<SignedReceipt>,
    poisoned: Option<String>,
}

/// What the log holds of one request: the terms and counts of its latest
/// receipt, so that a later receipt of the same request can replace it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    seeder: NodeId,
    model_sha256: [u8; 32],
    prompt_tokens: u32,
    started_ms: u64,
    completion_tokens: u32,
    credits: u64,
}

impl Held {
    fn of(r: &Receipt) -> Self {
        Self {
            seeder: r.seeder,
            model_sha256: r.model_sha256,
            prompt_tokens: r.prompt_tokens,
            started_ms: r.started_ms,
            completion_tokens: r.completion_tokens,
            credits: r.credits,
        }
    }

    /// True when `next` is a later receipt of the same request: same
    /// seeder, model, prompt and start, more tokens, no fewer credits.
    fn extended_by(&self, next: &Held) -> bool {
        self.seeder == next.seeder
            && self.model_sha256 == next.model_sha256
            && self.prompt_tokens == next.prompt_tokens
            && self.started_ms == next.started_ms
            && next.completion_tokens > self.completion_tokens
            && next.credits >= self.credits
    }
}

/// How a receipt relates to what the log holds of its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// A new request, or a later receipt of one held: write it.
    Write,
    /// The receipt held already (same terms and counts): nothing to write.
    Held,
}

fn admit(held: Option<&Held>, r: &Receipt) -> Result<Admit, LedgerError> {
    let next = Held::of(r);
    match held {
        None => Ok(Admit::Write),
        Some(h) if h.extended_by(&next) => Ok(Admit::Write),
        Some(h) if *h == next => Ok(Admit::Held),
        Some(_) => Err(LedgerError::Replay {
            consumer: r.consumer,
            request_id: r.request_id,
        }),
    }
}

impl State {
    /// Counts a receipt admitted by [`admit`]: a new request, or a later
    /// receipt of one held, which replaces the earlier one in the totals.
    fn add(&mut self, signed: &SignedReceipt) {
        let r = &signed.receipt;
        let key = r.key();
        let (before, new) = match self.index.insert(key, Held::of(r)) {
            Some(old) => {
                // The earlier receipt of the request leaves the recent list.
                if let Some(pos) = self.recent.iter().position(|e| e.receipt.key() == key) {
                    self.recent.remove(pos);
                }
                (old.credits, false)
            }
            None => (0, true),
        };
        if self.recent.len() == RECENT_RECEIPTS {
            self.recent.pop_front();
        }
        self.recent.push_back(signed.clone());
        let s = self.totals.entry(r.seeder).or_default();
        s.earned = s.earned.saturating_sub(before).saturating_add(r.credits);
        if new {
            s.receipts_as_seeder += 1;
        }
        let c = self.totals.entry(r.consumer).or_default();
        c.spent = c.spent.saturating_sub(before).saturating_add(r.credits);
        let m = self.moved.entry((r.consumer, r.seeder)).or_default();
        *m = m.saturating_sub(before).saturating_add(r.credits);
        if new {
            c.receipts_as_consumer += 1;
            self.receipts += 1;
        }
    }
}

struct Job {
    receipt: VerifiedReceipt,
    done: SyncSender<Result<(), LedgerError>>,
}

/// An open log. Cheap to clone; the writer stops when the last clone goes.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    jobs: Mutex<Option<SyncSender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what it holds and exit;
        // waiting for it releases the file (and its lock) before the last
        // handle is gone, so the log can be opened again at once.
        lock(&self.jobs).take();
        if let Some(w) = lock(&self.writer).take() {
            let _ = w.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io(e: std::io::Error) -> LedgerError {
    LedgerError::Io(e.to_string())
}

impl Ledger {
    /// Opens (or creates) the log in `dir`, recovering it first.
    pub fn open(dir: &Path) -> Result<(Self, Recovery), LedgerError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(LOG_FILE);
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => LedgerError::InUse(path.display().to_string()),
            std::fs::TryLockError::Error(e) => io(e),
        })?;
        if created || file.metadata().map_err(io)?.len() == 0 {
            file.write_all(MAGIC).map_err(io)?;
            file.sync_all().map_err(io)?;
            // Make the new file's name durable too.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        let mut state = State {
            index: HashMap::new(),
            totals: HashMap::new(),
            moved: HashMap::new(),
            receipts: 0,
            recent: std::collections::VecDeque::with_capacity(RECENT_RECEIPTS),
            poisoned: None,
        };
        let scan = scan_file(&mut file, &mut |r| {
            // The writer only writes what `admit` takes; anything else was
            // put there by someone else.
            match admit(state.index.get(&r.receipt.key()), &r.receipt) {
                Ok(Admit::Write) => {
                    state.add(&r);
                    Ok(())
                }
                Ok(Admit::Held) | Err(_) => Err(LedgerError::Corrupt {
                    offset: 0,
                    reason: "a receipt that does not replace the one held of its request".into(),
                }),
            }
        })?;
        let mut recovery = Recovery {
            receipts: state.receipts,
            truncated_bytes: 0,
        };
        if let Some(torn) = scan.torn {
            recovery.truncated_bytes = torn.dropped;
            file.set_len(scan.end).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        file.seek(SeekFrom::Start(scan.end)).map_err(io)?;
        let state = Arc::new(Mutex::new(state));
        let (tx, rx) = std::sync::mpsc::sync_channel(MAX_QUEUED);
        let writer = Writer {
            file,
            prev: scan.last_digest,
            state: state.clone(),
            buf: Vec::with_capacity(64 * 1024),
        };
        let writer = std::thread::Builder::new()
            .name("hypha-ledger".into())
            .spawn(move || writer.run(rx))
            .map_err(io)?;
        Ok((
            Self {
                inner: Arc::new(Inner {
                    path,
                    state,
                    jobs: Mutex::new(Some(tx)),
                    writer: Mutex::new(Some(writer)),
                }),
            },
            recovery,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Appends a receipt and returns once it is on disk. A receipt for a
    /// (consumer, request id) already in the log is refused unless it is a
    /// later receipt of the same request (same seeder, model, prompt and
    /// start, more tokens, no fewer credits), which then replaces the
    /// earlier one in every total: a seeder writes each receipt of a
    /// request as it is countersigned. The receipt held already (same
    /// terms and counts) is taken as written: the last receipt of a
    /// request may count what its last interval's did.
    pub fn append(&self, receipt: VerifiedReceipt) -> Result<(), LedgerError> {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        let jobs = lock(&self.inner.jobs).clone().ok_or(LedgerError::Closed)?;
        let job = Job { receipt, done };
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => jobs.send(job).map_err(|_| LedgerError::Closed)?,
            Err(TrySendError::Disconnected(_)) => return Err(LedgerError::Closed),
        }
        wait.recv().map_err(|_| LedgerError::Closed)?
    }

    /// True when a receipt for this key is in the log.
    pub fn contains(&self, key: &ReceiptKey) -> bool {
        lock(&self.inner.state).index.contains_key(key)
    }

    /// What the log's receipts add up to for `id`.
    pub fn totals(&self, id: &NodeId) -> Totals {
        lock(&self.inner.state)
            .totals
            .get(id)
            .copied()
            .unwrap_or_default()
    }

    /// Micro-credits the log's receipts moved from `consumer` to `seeder`.
    pub fn moved(&self, consumer: &NodeId, seeder: &NodeId) -> u64 {
        lock(&self.inner.state)
            .moved
            .get(&(*consumer, *seeder))
            .copied()
            .unwrap_or_default()
    }

    /// Every id the log names, with its totals.
    pub fn all_totals(&self) -> Vec<(NodeId, Totals)> {
        let mut v: Vec<_> = lock(&self.inner.state)
            .totals
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    pub fn receipts(&self) -> u64 {
        lock(&self.inner.state).receipts
    }

    /// The newest receipts, newest first, at most `n` (and at most
    /// [`RECENT_RECEIPTS`]).
    pub fn recent(&self, n: usize) -> Vec<SignedReceipt> {
        lock(&self.inner.state)
            .recent
            .iter()
            .rev()
            .take(n)
            .cloned()
            .collect()
    }
}

/// Reads every receipt of a log file in order, checking checksums and the
/// chain (not signatures: see [`crate::verify_batch`]). A torn tail is
/// reported, not an error.
pub fn read(
    path: &Path,
    each: &mut dyn FnMut(SignedReceipt) -> Result<(), LedgerError>,
) -> Result<Recovery, LedgerError> {
    let mut file = File::open(path).map_err(io)?;
    let mut n = 0;
    let scan = scan_file(&mut file, &mut |r| {
        n += 1;
        each(r)
    })?;
    Ok(Recovery {
        receipts: n,
        truncated_bytes: scan.torn.map_or(0, |t| t.dropped),
    })
}

struct Torn {
    dropped: u64,
}

struct Scan {
    /// Offset after the last good record.
    end: u64,
    last_digest: [u8; 32],
    torn: Option<Torn>,
}

/// Why a record could not be read at some offset.
enum Bad {
    /// The file ends inside the record.
    Short,
    /// Its bytes are there but wrong.
    Damaged(String),
}

fn digest_of(len: u32, prev: &[u8; 32], payload: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&len.to_le_bytes());
    ctx.update(prev);
    ctx.update(payload);
    let d = ctx.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn checksum_of(digest: &[u8; 32]) -> u64 {
    let mut c = [0u8; 8];
    c.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(c)
}

fn scan_file(
    file: &mut File,
    each: &mut dyn FnMut(SignedReceipt) -> Result<(), LedgerError>,
) -> Result<Scan, LedgerError> {
    let file_len = file.metadata().map_err(io)?.len();
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut r = BufReader::with_capacity(1 << 20, &mut *file);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|_| LedgerError::Corrupt {
        offset: 0,
        reason: "no ledger header".into(),
    })?;
    if &magic != MAGIC {
        return Err(LedgerError::Corrupt {
            offset: 0,
            reason: "not a hypha ledger".into(),
        });
    }
    let mut offset = MAGIC.len() as u64;
    let mut prev = [0u8; 32];
    // Receipts of the batch being read, counted at its commit record.
    let mut staged: Vec<SignedReceipt> = Vec::new();
    let mut committed_end = offset;
    let mut committed_digest = prev;
    let mut payload = Vec::with_capacity(1024);
    loop {
        if offset == file_len {
            let torn = (committed_end < offset).then_some(Torn {
                dropped: offset - committed_end,
            });
            return Ok(Scan {
                end: committed_end,
                last_digest: committed_digest,
                torn,
            });
        }
        let bad = match read_record(&mut r, file_len - offset, &mut payload) {
            Ok((len, stored_prev, checksum)) => {
                let digest = digest_of(len, &stored_prev, &payload);
                if checksum_of(&digest) != checksum {
                    Bad::Damaged("checksum mismatch".into())
                } else if stored_prev != prev {
                    return Err(LedgerError::Corrupt {
                        offset,
                        reason:
                            "the hash chain is broken (a record was removed, reordered or replaced)"
                                .into(),
                    });
                } else {
                    let record = decode_payload(&payload)
                        .map_err(|reason| LedgerError::Corrupt { offset, reason })?;
                    prev = digest;
                    offset += (HEADER_BYTES + payload.len()) as u64;
                    match record {
                        Record::Receipt(r) => staged.push(*r),
                        Record::Commit(n) => {
                            if n as usize != staged.len() {
                                return Err(LedgerError::Corrupt {
                                    offset,
                                    reason: format!(
                                        "a commit record counts {n} receipts, its batch has {}",
                                        staged.len()
                                    ),
                                });
                            }
                            for r in staged.drain(..) {
                                // A receipt the log refuses is placed at
                                // its batch.
                                each(r).map_err(|e| match e {
                                    LedgerError::Corrupt { reason, .. } => LedgerError::Corrupt {
                                        offset: committed_end,
                                        reason,
                                    },
                                    other => other,
                                })?;
                            }
                            committed_end = offset;
                            committed_digest = digest;
                        }
                    }
                    continue;
                }
            }
            Err(b) => b,
        };
        // A record at `offset` is unreadable. With a valid commit record
        // after it, acknowledged receipts are damaged; without, everything
        // after the last commit was never acknowledged: a torn write.
        let left = file_len - offset;
        drop(r);
        if left <= MAX_TORN_BYTES
            && (!valid_commit_after(file, offset, file_len)?
                || last_batch_torn(file, committed_end, file_len)?)
        {
            return Ok(Scan {
                end: committed_end,
                last_digest: committed_digest,
                torn: Some(Torn {
                    dropped: file_len - committed_end,
                }),
            });
        }
        let reason = match bad {
            Bad::Short => "record cut short with valid records after it".to_owned(),
            Bad::Damaged(why) => why,
        };
        return Err(LedgerError::Corrupt { offset, reason });
    }
}

/// Reads one record's header and payload; `Short` when the file ends first.
fn read_record(
    r: &mut impl Read,
    left: u64,
    payload: &mut Vec<u8>,
) -> Result<(u32, [u8; 32], u64), Bad> {
    if left < HEADER_BYTES as u64 {
        return Err(Bad::Short);
    }
    let mut h = [0u8; HEADER_BYTES];
    r.read_exact(&mut h).map_err(|_| Bad::Short)?;
    let (len_b, rest) = h.split_at(4);
    let (sum_b, prev_b) = rest.split_at(8);
    let len = u32::from_le_bytes(len_b.try_into().map_err(|_| Bad::Short)?);
    let checksum = u64::from_le_bytes(sum_b.try_into().map_err(|_| Bad::Short)?);
    let prev: [u8; 32] = prev_b.try_into().map_err(|_| Bad::Short)?;
    if len as usize > MAX_RECORD_BYTES || len == 0 {
        return Err(Bad::Damaged(format!("record length {len} is out of range")));
    }
    if left < (HEADER_BYTES + len as usize) as u64 {
        return Err(Bad::Short);
    }
    payload.resize(len as usize, 0);
    r.read_exact(payload).map_err(|_| Bad::Short)?;
    Ok((len, prev, checksum))
}

/// True when some offset after `from` starts a commit record whose checksum
/// holds: then the damage at `from` is in acknowledged receipts.
fn valid_commit_after(file: &mut File, from: u64, file_len: u64) -> Result<bool, LedgerError> {
    file.seek(SeekFrom::Start(from + 1)).map_err(io)?;
    let mut tail = Vec::new();
    file.take(file_len - from - 1)
        .read_to_end(&mut tail)
        .map_err(io)?;
    let mut payload = Vec::new();
    for start in 0..tail.len() {
        let Some(rest) = tail.get(start..) else {
            break;
        };
        let mut cur = std::io::Cursor::new(rest);
        if let Ok((len, prev, checksum)) = read_record(&mut cur, rest.len() as u64, &mut payload) {
            if payload.first() == Some(&KIND_COMMIT)
                && checksum_of(&digest_of(len, &prev, &payload)) == checksum
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// True when the file ends with one batch after `committed_end` (the end
/// of the last commit record read): a commit record whose checksum holds,
/// counting exactly the receipt records that fit between. Damage there is
/// a batch whose commit record reached the disk in the same sync as it,
/// before all of it did: a torn write, not acknowledged.
fn last_batch_torn(
    file: &mut File,
    committed_end: u64,
    file_len: u64,
) -> Result<bool, LedgerError> {
    let commit = COMMIT_RECORD_BYTES as u64;
    let Some(span) = file_len.checked_sub(committed_end + commit) else {
        return Ok(false);
    };
    file.seek(SeekFrom::Start(file_len - commit)).map_err(io)?;
    let mut tail = Vec::with_capacity(COMMIT_RECORD_BYTES);
    file.take(commit).read_to_end(&mut tail).map_err(io)?;
    let mut payload = Vec::new();
    let mut cur = std::io::Cursor::new(tail.as_slice());
    let Ok((len, prev, checksum)) = read_record(&mut cur, commit, &mut payload) else {
        return Ok(false);
    };
    if checksum_of(&digest_of(len, &prev, &payload)) != checksum {
        return Ok(false);
    }
    let Ok(Record::Commit(n)) = decode_payload(&payload) else {
        return Ok(false);
    };
    Ok(n >= 1 && n as usize <= MAX_BATCH && span == u64::from(n) * RECEIPT_RECORD_BYTES as u64)
}

/// Appends one framed record to `buf`; its digest (the next record's
/// `prev`).
fn push_record(buf: &mut Vec<u8>, prev: &[u8; 32], payload: &[u8]) -> [u8; 32] {
    let len = payload.len() as u32;
    let digest = digest_of(len, prev, payload);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&checksum_of(&digest).to_le_bytes());
    buf.extend_from_slice(prev);
    buf.extend_from_slice(payload);
    digest
}

fn encode_payload(r: &SignedReceipt, out: &mut Vec<u8>) {
    out.push(KIND_RECEIPT);
    out.extend_from_slice(&r.to_bytes());
}

enum Record {
    Receipt(Box<SignedReceipt>),
    Commit(u32),
}

fn decode_payload(payload: &[u8]) -> Result<Record, String> {
    match payload.split_first() {
        Some((&KIND_RECEIPT, body)) => SignedReceipt::from_bytes(body)
            .map(|r| Record::Receipt(Box::new(r)))
            .map_err(|e| e.to_string()),
        Some((&KIND_COMMIT, body)) => body
            .try_into()
            .map(|b| Record::Commit(u32::from_le_bytes(b)))
            .map_err(|_| "malformed commit record".to_owned()),
        Some((kind, _)) => Err(format!("unknown record kind {kind}")),
        None => Err("empty record".into()),
    }
}

struct Writer {
    file: File,
    prev: [u8; 32],
    state: Arc<Mutex<State>>,
    buf: Vec<u8>,
}

impl Writer {
    fn run(mut self, jobs: Receiver<Job>) {
        let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
        while let Ok(first) = jobs.recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            self.commit(&mut batch);
        }
    }

    /// Writes and syncs one batch, then answers every job in it.
    fn commit(&mut self, batch: &mut Vec<Job>) {
        let poisoned = lock(&self.state).poisoned.clone();
        if let Some(why) = poisoned {
            for j in batch.drain(..) {
                let _ = j.done.send(Err(LedgerError::Poisoned(why.clone())));
            }
            return;
        }
        // Refuse replays, against the log and within this batch: a receipt
        // of a request held must be a later one of it. A receipt held
        // already is acknowledged as written: at once when the log holds
        // it, after this batch when the batch does.
        let mut accepted = Vec::with_capacity(batch.len());
        let mut held_in_batch = Vec::new();
        {
            let state = lock(&self.state);
            let mut in_batch: HashMap<ReceiptKey, Held> = HashMap::new();
            for j in batch.drain(..) {
                let r = j.receipt.receipt();
                let key = r.key();
                let batched = in_batch.get(&key);
                match admit(batched.or_else(|| state.index.get(&key)), r) {
                    Ok(Admit::Write) => {
                        in_batch.insert(key, Held::of(r));
                        accepted.push(j);
                    }
                    Ok(Admit::Held) if batched.is_some() => held_in_batch.push(j),
                    Ok(Admit::Held) => {
                        let _ = j.done.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = j.done.send(Err(e));
                    }
                }
            }
        }
        if accepted.is_empty() {
            return;
        }
        self.buf.clear();
        let mut prev = self.prev;
        let mut payload = Vec::with_capacity(1 + SIGNED_RECEIPT_BYTES);
        for j in &accepted {
            payload.clear();
            encode_payload(j.receipt.signed(), &mut payload);
            prev = push_record(&mut self.buf, &prev, &payload);
        }
        // The commit record: the batch counts only if it reached the disk.
        payload.clear();
        payload.push(KIND_COMMIT);
        payload.extend_from_slice(&(accepted.len() as u32).to_le_bytes());
        prev = push_record(&mut self.buf, &prev, &payload);
        let written = self
            .file
            .write_all(&self.buf)
            .and_then(|()| self.file.sync_data());
        let mut state = lock(&self.state);
        match written {
            Ok(()) => {
                self.prev = prev;
                for j in &accepted {
                    state.add(j.receipt.signed());
                }
                drop(state);
                for j in accepted.into_iter().chain(held_in_batch) {
                    let _ = j.done.send(Ok(()));
                }
            }
            Err(e) => {
                let why = e.to_string();
                state.poisoned = Some(why.clone());
                drop(state);
                for j in accepted.into_iter().chain(held_in_batch) {
                    let _ = j.done.send(Err(LedgerError::Poisoned(why.clone())));
                }
            }
        }
    }
}
