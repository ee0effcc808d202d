//! The ledger's log file as recovery finds it after a crash or damage:
//! arbitrary bytes, a valid log cut anywhere in its last batch, and a valid
//! log damaged anywhere else, opened with `Ledger::open` in a scratch
//! directory.
//!
//! - Any file either opens or is refused with `Corrupt`; a refused file is
//!   left exactly as it was.
//! - A log that opens is clean: the file left on
//!   disk is clean (no torn tail) and holds exactly those receipts; the
//!   totals, the replay index and the recent list are rebuilt from them.
//!   Appending a fresh receipt writes exactly one batch in the documented
//!   layout, the receipt held of a request sent again writes nothing, and
//!   reopening finds everything held
//!   before plus the new receipt.
//! - A valid log cut at any offset of its last batch (or followed by
//!   zeros, as blocks allocated but never written read after a crash)
//!   opens as a torn tail, never an error, holding every receipt of the
//!   earlier batches and reporting the bytes cut off.
//! - A valid log with any bytes changed before its last batch, or with a
//!   record that is well framed but wrong (an unknown kind, a receipt that
//!   does not read, a commit miscounting its batch, a batch left out so the
//!   chain breaks), is refused as `Corrupt`, at the damaged record. Damage
//!   inside the last batch (its commit record whole or not) is a torn tail:
//!   one sync writes a batch and its commit, and the commit may reach the
//!   disk before the rest of the batch does.
//!
//! The valid logs are built here from the layout `ledger/src/log.rs`
//! documents; the append check compares the writer's bytes with that
//! layout, so the two cannot drift apart unnoticed.
//!
//! Recovery checks checksums and the chain, not signatures (`log::read`
//! says so): the log is the node's own file, guarded against torn writes
//! and damage, not against someone who can write the node's data folder.
//! So in raw mode (arbitrary bytes, where a file with recomputed
//! checksums around a receipt nobody signed is possible) only integrity is
//! checked; in the modes that build a log from signed receipts, every
//! receipt held must also verify.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hypha_fuzz::{flip_bytes, seeded_receipt, stretch};
use hypha_ledger::{Ledger, LedgerError, ReceiptKey, Recovery, SignedReceipt, LOG_FILE};
use hypha_wire::NodeId;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// Batches in a built log: enough for damage before, in and after them.
const MAX_BATCHES: usize = 4;
/// Receipts per built batch (the writer's limit, `MAX_BATCH`, is far
/// larger; a few are enough to cut between and inside receipt records).
const MAX_BATCH_RECEIPTS: usize = 4;
/// Zero bytes a torn tail may end in: a few file system blocks.
const MAX_ZERO_TAIL: usize = 3 * 4096;
/// The time receipts are drawn around.
const AROUND_MS: u64 = 1_795_000_000_000;
/// Bytes before each record's payload: length, checksum, previous digest.
const HEADER_BYTES: usize = 4 + 8 + 32;
/// Payload kinds (`log.rs`): a signed receipt, a commit record.
const KIND_RECEIPT: u8 = 1;
const KIND_COMMIT: u8 = 2;
/// The longest payload of a record of unknown kind: any length up to the
/// record limit is well framed; a few hundred bytes cover the reader.
const MAX_ODD_PAYLOAD_BYTES: usize = 512;
const _: () = assert!(MAX_ODD_PAYLOAD_BYTES < hypha_ledger::log::MAX_RECORD_BYTES);
/// A raw file starting with this byte is taken without the magic before it.
const NO_MAGIC: u8 = 0xff;
/// Where scratch logs live: memory, when there is such a file system,
/// since every append syncs.
const SCRATCH_ROOT: &str = "/dev/shm";

fuzz_target!(|data: &[u8]| {
    let dir = scratch_dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let _ = run(data, &dir);
    let _ = std::fs::remove_dir_all(&dir);
});

/// The first byte picks the mode. Raw files are the rest of the input as
/// it is; built logs read their choices from the input, stretched.
fn run(data: &[u8], dir: &Path) -> Result<()> {
    let Some((mode, rest)) = data.split_first() else {
        return Ok(());
    };
    let stretched = stretch(rest);
    match mode % 4 {
        0 => raw(rest, dir),
        1 | 2 => torn(&mut Unstructured::new(&stretched), dir),
        _ => damaged(&mut Unstructured::new(&stretched), dir),
    }
}

/// One directory per fuzzing process, so parallel jobs never share a log.
fn scratch_dir() -> PathBuf {
    let root = if Path::new(SCRATCH_ROOT).is_dir() {
        PathBuf::from(SCRATCH_ROOT)
    } else {
        std::env::temp_dir()
    };
    root.join(format!("hypha-fuzz-ledger-{}", std::process::id()))
}

/// The 8-byte magic a new log starts with, taken from a log the ledger
/// created (it is private to `log.rs`).
fn magic() -> &'static [u8] {
    static MAGIC: OnceLock<Vec<u8>> = OnceLock::new();
    MAGIC.get_or_init(|| {
        let dir = scratch_dir().with_extension("magic");
        let _ = std::fs::remove_dir_all(&dir);
        drop(Ledger::open(&dir).expect("a new ledger opens"));
        let bytes = std::fs::read(dir.join(LOG_FILE)).expect("a new ledger has a file");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(bytes.len(), 8, "a new log holds only its magic");
        bytes
    })
}

/// Arbitrary bytes as the log file, mostly behind the magic so that the
/// record reader sees them (a first byte of [`NO_MAGIC`] leaves it out).
fn raw(data: &[u8], dir: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    if data.first() != Some(&NO_MAGIC) {
        bytes.extend_from_slice(magic());
    }
    bytes.extend_from_slice(data);
    // The fresh receipt appended later reads its choices from a stretch.
    let stretched = stretch(data);
    open_and_check(&mut Unstructured::new(&stretched), dir, &bytes, None)
}

/// A valid log cut somewhere in its last batch, perhaps followed by zeros.
fn torn(u: &mut Unstructured, dir: &Path) -> Result<()> {
    let log = Log::build(u)?;
    let last = log.batches.len() - 1;
    let (from, to) = (log.batch_start(last), log.batch_end[last]);
    let cut = u.int_in_range(from..=to)?;
    let mut bytes = log.bytes[..cut].to_vec();
    let zeros = if u.ratio(1, 4)? {
        u.int_in_range(0..=MAX_ZERO_TAIL)?
    } else {
        0
    };
    bytes.resize(cut + zeros, 0);
    // Zeros written after the cut may restore the batch's own last bytes
    // (a record ending in zero bytes): then nothing of it is lost.
    let intact = bytes.len() >= to && bytes[..to] == log.bytes[..to];
    let (kept, end) = if intact {
        (log.batches.len(), to)
    } else {
        (last, from)
    };
    let want: Vec<SignedReceipt> = log.batches[..kept].concat();
    let truncated = (bytes.len() - end) as u64;
    open_and_check(u, dir, &bytes, Some(Expect::Opens { want, truncated }))
}

/// A valid log damaged by changed bytes or a well-framed wrong record.
fn damaged(u: &mut Unstructured, dir: &Path) -> Result<()> {
    let log = Log::build(u)?;
    if u.arbitrary()? {
        return misframed(u, dir, &log);
    }
    let last = log.batches.len() - 1;
    let commit = *log.records.last().expect("a log has records");
    let mut bytes = log.bytes.clone();
    if u.ratio(1, 4)? {
        // Inside the last commit record only: never acknowledged as far as
        // recovery can tell, so a torn tail.
        if !flip_bytes(u, &mut bytes[commit.start..commit.end])? || bytes == log.bytes {
            return Ok(());
        }
        let want = log.batches[..last].concat();
        let truncated = (log.bytes.len() - log.batch_start(last)) as u64;
        return open_and_check(u, dir, &bytes, Some(Expect::Opens { want, truncated }));
    }
    // Anywhere before it.
    let upto = commit.start;
    if !flip_bytes(u, &mut bytes[..upto])? || bytes == log.bytes {
        return Ok(());
    }
    let first = bytes
        .iter()
        .zip(&log.bytes)
        .position(|(a, b)| a != b)
        .expect("some byte changed");
    // Inside the last batch, with its commit record whole: that commit may
    // have reached the disk in the same sync before the rest of the batch
    // did, so recovery reads it as a torn write of that batch.
    let from = log.batch_start(last);
    if first >= from {
        let want = log.batches[..last].concat();
        let truncated = (log.bytes.len() - from) as u64;
        return open_and_check(u, dir, &bytes, Some(Expect::Opens { want, truncated }));
    }
    let at = log
        .records
        .iter()
        .find(|r| r.start <= first && first < r.end)
        .map_or(0, |r| r.start);
    open_and_check(u, dir, &bytes, Some(Expect::Corrupt { at: at..=at }))
}

/// A log with one record that is well framed (honest checksum, unbroken
/// chain) but wrong, or with a batch cut out of the file.
fn misframed(u: &mut Unstructured, dir: &Path, log: &Log) -> Result<()> {
    let n = log.batches.len();
    let fault = u.choose_index(4)?;
    if fault == 3 {
        // A batch other than the last cut out: the next record names the
        // digest of a record that is gone, where the batch began.
        if n < 2 {
            return Ok(());
        }
        let victim = u.choose_index(n - 1)?;
        let (start, end) = (log.batch_start(victim), log.batch_end[victim]);
        let mut bytes = log.bytes[..start].to_vec();
        bytes.extend_from_slice(&log.bytes[end..]);
        return open_and_check(u, dir, &bytes, Some(Expect::Corrupt { at: start..=start }));
    }
    let victim = u.choose_index(n)?;
    let mut w = Writer::new();
    let mut at = 0..=0;
    for (i, batch) in log.batches.iter().enumerate() {
        if i != victim {
            w.batch(batch);
            continue;
        }
        match fault {
            0 => {
                // A record of a kind recovery does not know, among the
                // batch's receipts.
                let pos = u.int_in_range(0..=batch.len())?;
                for r in &batch[..pos] {
                    w.receipt(r);
                }
                let mut kind = u.arbitrary::<u8>()?;
                if kind == KIND_RECEIPT || kind == KIND_COMMIT {
                    kind += 2;
                }
                let mut payload = vec![kind];
                let len = u.int_in_range(0..=MAX_ODD_PAYLOAD_BYTES)?.min(u.len());
                payload.extend_from_slice(u.bytes(len)?);
                at = w.bytes.len()..=w.bytes.len();
                w.record(&payload);
                for r in &batch[pos..] {
                    w.receipt(r);
                }
                w.commit(batch.len());
            }
            1 => {
                // A receipt record whose receipt does not read: a changed
                // tag, or a wrong length.
                let r = u.choose(batch)?;
                let mut body = r.to_bytes().to_vec();
                if u.arbitrary()? {
                    body.truncate(u.choose_index(body.len())?);
                } else {
                    body[0] ^= u.int_in_range(1..=u8::MAX)?;
                }
                let mut payload = vec![KIND_RECEIPT];
                payload.extend_from_slice(&body);
                for r in batch {
                    w.receipt(r);
                }
                at = w.bytes.len()..=w.bytes.len();
                w.record(&payload);
                w.commit(batch.len() + 1);
            }
            _ => {
                // A commit record that miscounts its batch. Recovery names
                // the byte after it; any offset inside the record will do.
                for r in batch {
                    w.receipt(r);
                }
                let mut count = u.arbitrary::<u32>()?;
                if count as usize == batch.len() {
                    count = count.wrapping_add(1);
                }
                let commit_start = w.bytes.len();
                let mut payload = vec![KIND_COMMIT];
                payload.extend_from_slice(&count.to_le_bytes());
                w.record(&payload);
                at = commit_start..=w.bytes.len();
            }
        }
    }
    open_and_check(u, dir, &w.bytes, Some(Expect::Corrupt { at }))
}

/// What opening a file must do, when the target knows.
enum Expect {
    Opens {
        want: Vec<SignedReceipt>,
        truncated: u64,
    },
    Corrupt {
        at: std::ops::RangeInclusive<usize>,
    },
}

fn open_and_check(
    u: &mut Unstructured,
    dir: &Path,
    bytes: &[u8],
    expect: Option<Expect>,
) -> Result<()> {
    let path = dir.join(LOG_FILE);
    std::fs::write(&path, bytes).expect("the scratch log is written");
    let (ledger, recovery) = match Ledger::open(dir) {
        Ok(opened) => opened,
        Err(e) => {
            let LedgerError::Corrupt { offset, .. } = &e else {
                panic!("a file is refused only as corrupt: {e}");
            };
            match expect {
                Some(Expect::Opens { .. }) => panic!(
                    "a torn tail was refused: {e} ({} bytes: {})",
                    bytes.len(),
                    hex(bytes)
                ),
                Some(Expect::Corrupt { at }) => assert!(
                    at.contains(&(*offset as usize)),
                    "damage at {at:?} reported at {offset}: {e}"
                ),
                None => {}
            }
            let after = std::fs::read(&path).expect("the log is still there");
            assert!(after == bytes, "a refused log was changed");
            return Ok(());
        }
    };
    if let Some(Expect::Corrupt { at }) = &expect {
        panic!("damage at {at:?} was not refused: {recovery:?}");
    }
    let held = read_log(&path);
    assert_eq!(recovery.receipts, held.len() as u64);
    assert_eq!(ledger.receipts(), recovery.receipts);
    if let Some(Expect::Opens { want, truncated }) = &expect {
        assert_eq!(held, *want, "a torn tail lost or invented receipts");
        assert_eq!(recovery.truncated_bytes, *truncated);
    }
    for r in &held {
        assert!(
            expect.is_none() || r.clone().verify().is_ok(),
            "the ledger holds a receipt that does not verify: {}",
            hex(&r.to_bytes())
        );
        assert!(ledger.contains(&r.receipt.key()));
    }
    check_totals(&ledger, &held);
    let recent = ledger.recent(usize::MAX);
    let n_recent = recent.len();
    assert!(held.iter().rev().take(n_recent).eq(recent.iter()));
    assert_eq!(n_recent, held.len().min(hypha_ledger::log::RECENT_RECEIPTS));

    // The log goes on: a fresh receipt is one more batch; the receipt held
    // of a request, sent again, is taken as written and writes nothing.
    let before = std::fs::read(&path).expect("the log reads");
    let prev = last_digest(&before);
    let fresh = fresh_receipt(u, &held)?;
    ledger
        .append(fresh.clone().verify().expect("a fresh receipt verifies"))
        .expect("an opened log takes a receipt");
    if let Some(old) = held.last() {
        let replay = old.clone().verify().expect("held receipts verify");
        ledger
            .append(replay)
            .expect("the receipt held is taken as written");
    }
    drop(ledger);
    let mut w = Writer {
        bytes: before,
        prev,
        records: Vec::new(),
    };
    w.batch(std::slice::from_ref(&fresh));
    let after = std::fs::read(&path).expect("the log reads");
    assert!(
        after == w.bytes,
        "the writer's batch differs from the documented layout"
    );
    let (again, recovery) = Ledger::open(dir).expect("a log the ledger wrote opens");
    assert_eq!(
        recovery,
        Recovery {
            receipts: held.len() as u64 + 1,
            truncated_bytes: 0
        }
    );
    assert_eq!(again.receipts(), recovery.receipts);
    let mut want = held;
    want.push(fresh);
    assert_eq!(read_log(&path), want, "reopening lost or changed receipts");
    Ok(())
}

/// Every receipt of the log at `path`, which must be clean.
fn read_log(path: &Path) -> Vec<SignedReceipt> {
    let mut held = Vec::new();
    let again = hypha_ledger::log::read(path, &mut |r| {
        held.push(r);
        Ok(())
    })
    .expect("an opened log reads back");
    assert_eq!(again.truncated_bytes, 0, "open left a torn tail on disk");
    held
}

/// A receipt whose (consumer, request id) the log does not hold.
fn fresh_receipt(u: &mut Unstructured, held: &[SignedReceipt]) -> Result<SignedReceipt> {
    let taken: BTreeSet<ReceiptKey> = held.iter().map(|r| r.receipt.key()).collect();
    let mut request_id = u64::MAX;
    loop {
        let r = seeded_receipt(u, request_id, AROUND_MS)?;
        if !taken.contains(&r.receipt.key()) {
            return Ok(r);
        }
        request_id -= 1;
    }
}

/// The ledger's totals are those of its receipts, added with saturation.
fn check_totals(ledger: &Ledger, held: &[SignedReceipt]) {
    #[derive(Default)]
    struct Sums {
        earned: u128,
        spent: u128,
        as_seeder: u64,
        as_consumer: u64,
    }
    let mut want: BTreeMap<NodeId, Sums> = BTreeMap::new();
    for r in held {
        let r = &r.receipt;
        let s = want.entry(r.seeder).or_default();
        s.earned += u128::from(r.credits);
        s.as_seeder += 1;
        let c = want.entry(r.consumer).or_default();
        c.spent += u128::from(r.credits);
        c.as_consumer += 1;
    }
    let all = ledger.all_totals();
    assert_eq!(all.len(), want.len());
    let cap = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
    for (id, t) in all {
        let w = &want[&id];
        assert_eq!(
            (
                t.earned,
                t.spent,
                t.receipts_as_seeder,
                t.receipts_as_consumer
            ),
            (cap(w.earned), cap(w.spent), w.as_seeder, w.as_consumer),
            "totals of {id}"
        );
    }
}

/// The digest the next record must name: that of the last record of a
/// clean log (zeros for one without records). Checks the layout on the way.
fn last_digest(bytes: &[u8]) -> [u8; 32] {
    assert_eq!(&bytes[..magic().len()], magic());
    let mut at = magic().len();
    let mut prev = [0u8; 32];
    while at < bytes.len() {
        let header = &bytes[at..at + HEADER_BYTES];
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let checksum = u64::from_le_bytes(header[4..12].try_into().expect("8 bytes"));
        assert_eq!(header[12..], prev, "the chain holds at {at}");
        let payload = &bytes[at + HEADER_BYTES..at + HEADER_BYTES + len as usize];
        let d = digest(len, &prev, payload);
        assert_eq!(checksum, checksum_of(&d), "the checksum holds at {at}");
        prev = d;
        at += HEADER_BYTES + len as usize;
    }
    assert_eq!(at, bytes.len());
    prev
}

/// A valid log and where its pieces lie.
struct Log {
    bytes: Vec<u8>,
    batches: Vec<Vec<SignedReceipt>>,
    /// The offset after each batch's commit record.
    batch_end: Vec<usize>,
    records: Vec<Span>,
}

impl Log {
    fn build(u: &mut Unstructured) -> Result<Self> {
        let n = u.int_in_range(1..=MAX_BATCHES)?;
        let mut batches = Vec::with_capacity(n);
        let mut w = Writer::new();
        let mut batch_end = Vec::with_capacity(n);
        let mut request_id = 0;
        for _ in 0..n {
            let size = u.int_in_range(1..=MAX_BATCH_RECEIPTS)?;
            let mut batch = Vec::with_capacity(size);
            for _ in 0..size {
                // Unique request ids: the writer never logs a replay.
                batch.push(seeded_receipt(u, request_id, AROUND_MS)?);
                request_id += 1;
            }
            w.batch(&batch);
            batch_end.push(w.bytes.len());
            batches.push(batch);
        }
        Ok(Self {
            bytes: w.bytes,
            batches,
            batch_end,
            records: w.records,
        })
    }

    fn batch_start(&self, i: usize) -> usize {
        match i.checked_sub(1) {
            Some(j) => self.batch_end[j],
            None => magic().len(),
        }
    }
}

/// Where one record lies in a log.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
}

/// Lays out records as `log.rs` documents them.
struct Writer {
    bytes: Vec<u8>,
    prev: [u8; 32],
    records: Vec<Span>,
}

impl Writer {
    fn new() -> Self {
        Self {
            bytes: magic().to_vec(),
            prev: [0; 32],
            records: Vec::new(),
        }
    }

    fn record(&mut self, payload: &[u8]) {
        let start = self.bytes.len();
        let len = u32::try_from(payload.len()).expect("a payload's length fits a u32");
        let d = digest(len, &self.prev, payload);
        self.bytes.extend_from_slice(&len.to_le_bytes());
        self.bytes.extend_from_slice(&checksum_of(&d).to_le_bytes());
        self.bytes.extend_from_slice(&self.prev);
        self.bytes.extend_from_slice(payload);
        self.prev = d;
        self.records.push(Span {
            start,
            end: self.bytes.len(),
        });
    }

    fn receipt(&mut self, r: &SignedReceipt) {
        let mut payload = vec![KIND_RECEIPT];
        payload.extend_from_slice(&r.to_bytes());
        self.record(&payload);
    }

    fn commit(&mut self, n: usize) {
        let mut payload = vec![KIND_COMMIT];
        payload.extend_from_slice(&u32::try_from(n).expect("a batch count").to_le_bytes());
        self.record(&payload);
    }

    fn batch(&mut self, receipts: &[SignedReceipt]) {
        for r in receipts {
            self.receipt(r);
        }
        self.commit(receipts.len());
    }
}

/// `SHA-256(len || prev || payload)`.
fn digest(len: u32, prev: &[u8; 32], payload: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&len.to_le_bytes());
    ctx.update(prev);
    ctx.update(payload);
    ctx.finish().as_ref().try_into().expect("32 bytes")
}

/// A record's checksum: its digest's first 8 bytes, little-endian.
fn checksum_of(d: &[u8; 32]) -> u64 {
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
