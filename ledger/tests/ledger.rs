//! Receipts and the log on real files: signatures, replays, balances,
//! recovery from torn writes, and detection of every other kind of damage.

use hypha_ledger::{
    balance, node_id_of, pow_bits, standing, verify_batch, Ledger, LedgerError, Published,
    ReceiptKey, SignedReceipt, LOG_FILE,
};
use proptest::prelude::*;

mod common;
use common::{key, sign_both, signed, verified};

#[test]
fn signatures_bind_both_parties_to_every_field() {
    let (s, c) = (key(1), key(2));
    let good = signed(&s, &c, 1, 500);
    assert!(good.clone().verify().is_ok());
    let bytes = good.to_bytes();
    assert_eq!(SignedReceipt::from_bytes(&bytes).unwrap(), good);

    // Inflated token counts after signing.
    let mut inflated = good.clone();
    inflated.receipt.completion_tokens += 1;
    assert_eq!(
        inflated.verify(),
        Err(LedgerError::BadSignature { request_id: 1 })
    );
    // More credits than agreed.
    let mut richer = good.clone();
    richer.receipt.credits *= 2;
    assert!(matches!(
        richer.verify(),
        Err(LedgerError::BadSignature { .. })
    ));
    // A forged countersignature: the seeder signs in the consumer's place.
    let mut forged = good.clone();
    forged.consumer_sig = good.receipt.sign(&s);
    assert!(matches!(
        forged.verify(),
        Err(LedgerError::BadSignature { .. })
    ));
    // Someone else's key under the consumer's id.
    let mut swapped = good.clone();
    swapped.consumer_key = key(3).verifying_key().to_bytes();
    swapped.consumer_sig = good.receipt.sign(&key(3));
    assert_eq!(
        swapped.verify(),
        Err(LedgerError::WrongKey { role: "consumer" })
    );
    // A receipt that finishes before it starts is malformed.
    let mut backwards = good.receipt.clone();
    backwards.started_ms = backwards.finished_ms + 1;
    let backwards = backwards.to_bytes();
    assert!(matches!(
        hypha_ledger::Receipt::from_bytes(&backwards),
        Err(LedgerError::Malformed(_))
    ));
}

#[test]
fn batch_verification_accepts_good_batches_and_names_a_bad_receipt() {
    let (s, c) = (key(1), key(2));
    let batch: Vec<_> = (0..64).map(|i| signed(&s, &c, i, 10)).collect();
    assert_eq!(verify_batch(batch.clone()).unwrap().len(), 64);
    let mut bad = batch;
    bad[40].receipt.prompt_tokens += 1;
    assert_eq!(
        verify_batch(bad),
        Err(LedgerError::BadSignature { request_id: 40 })
    );
}

#[test]
fn appends_survive_a_restart_and_replays_are_refused_before_and_after() {
    let dir = tempfile::tempdir().unwrap();
    let (s, c, other) = (key(1), key(2), key(3));
    let (sid, cid) = (
        node_id_of(&s.verifying_key().to_bytes()),
        node_id_of(&c.verifying_key().to_bytes()),
    );
    {
        let (ledger, rec) = Ledger::open(dir.path()).unwrap();
        assert_eq!(rec.receipts, 0);
        for i in 0..100 {
            ledger.append(verified(&s, &c, i, 1000)).unwrap();
        }
        // `other` consumed from `c`: c earns back some.
        ledger.append(verified(&c, &other, 1, 250)).unwrap();
        assert!(matches!(
            ledger.append(verified(&s, &c, 5, 1)),
            Err(LedgerError::Replay { request_id: 5, .. })
        ));
        assert_eq!(ledger.totals(&sid).earned, 100_000);
    }
    let (ledger, rec) = Ledger::open(dir.path()).unwrap();
    assert_eq!(rec.receipts, 101);
    assert_eq!(rec.truncated_bytes, 0);
    assert!(ledger.contains(&ReceiptKey {
        consumer: cid,
        request_id: 99
    }));
    assert!(matches!(
        ledger.append(verified(&s, &c, 99, 2000)),
        Err(LedgerError::Replay { request_id: 99, .. })
    ));
    // The receipt held, once more: taken as written, counted once.
    ledger.append(verified(&s, &c, 99, 1000)).unwrap();
    assert_eq!(ledger.totals(&sid).earned, 100_000);
    assert_eq!(ledger.receipts(), 101);
    // The same request id from another consumer is another request.
    ledger.append(verified(&s, &other, 99, 1000)).unwrap();

    let t_s = ledger.totals(&sid);
    let t_c = ledger.totals(&cid);
    assert_eq!((t_s.earned, t_s.spent), (101_000, 0));
    assert_eq!((t_c.earned, t_c.spent), (250, 100_000));
    assert_eq!(balance(&t_c), 250 - 100_000);
    let oid = node_id_of(&other.verifying_key().to_bytes());
    assert_eq!(ledger.moved(&cid, &sid), 100_000);
    assert_eq!(ledger.moved(&oid, &cid), 250);
    assert_eq!(ledger.moved(&oid, &sid), 1000);
    assert_eq!(ledger.moved(&sid, &cid), 0);
    // Credits are conserved: everything earned was spent by someone.
    let all = ledger.all_totals();
    let earned: u64 = all.iter().map(|(_, t)| t.earned).sum();
    let spent: u64 = all.iter().map(|(_, t)| t.spent).sum();
    assert_eq!(earned, spent);
}

#[test]
fn later_receipts_of_a_request_replace_the_earlier_before_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (s, c, other) = (key(1), key(2), key(3));
    let (sid, cid) = (
        node_id_of(&s.verifying_key().to_bytes()),
        node_id_of(&c.verifying_key().to_bytes()),
    );
    let base = signed(&s, &c, 4, 0).receipt;
    let at = |tokens: u32, credits: u64| {
        let mut r = base.clone();
        r.completion_tokens = tokens;
        r.credits = credits;
        sign_both(&s, &c, r)
    };
    {
        let (ledger, _) = Ledger::open(dir.path()).unwrap();
        // A seeder writes each interval's receipt as it is countersigned.
        ledger.append(at(16, 100)).unwrap();
        ledger.append(at(32, 164)).unwrap();
        assert_eq!(ledger.totals(&sid).earned, 164);
        assert_eq!(ledger.totals(&cid).spent, 164);
        assert_eq!(ledger.totals(&sid).receipts_as_seeder, 1);
        assert_eq!(ledger.receipts(), 1);
        assert_eq!(ledger.recent(10).len(), 1);
        assert_eq!(ledger.recent(10)[0].receipt.completion_tokens, 32);
        // The receipt held, again: taken as written, nothing changes.
        ledger.append(at(32, 164)).unwrap();
        assert_eq!(ledger.totals(&cid).spent, 164);
        // Not later: an earlier one, the same tokens for other credits,
        // fewer credits for more tokens, other terms.
        for stale in [at(16, 100), at(32, 200), at(40, 150)] {
            assert!(matches!(
                ledger.append(stale),
                Err(LedgerError::Replay { request_id: 4, .. })
            ));
        }
        let mut moved = base.clone();
        moved.completion_tokens = 48;
        moved.credits = 300;
        moved.started_ms += 1;
        let mut reprompted = moved.clone();
        reprompted.started_ms = base.started_ms;
        reprompted.prompt_tokens += 1;
        let mut other_seeder = base.clone();
        other_seeder.completion_tokens = 48;
        other_seeder.credits = 300;
        other_seeder.seeder = node_id_of(&other.verifying_key().to_bytes());
        assert!(ledger.append(sign_both(&s, &c, moved)).is_err());
        assert!(ledger.append(sign_both(&s, &c, reprompted)).is_err());
        assert!(ledger.append(sign_both(&other, &c, other_seeder)).is_err());
        assert_eq!(ledger.totals(&cid).spent, 164);
    }
    let (ledger, rec) = Ledger::open(dir.path()).unwrap();
    assert_eq!(rec.receipts, 1, "one request");
    assert_eq!(ledger.totals(&sid).earned, 164);
    assert_eq!(ledger.totals(&cid).spent, 164);
    assert!(matches!(
        ledger.append(at(20, 120)),
        Err(LedgerError::Replay { .. })
    ));
    ledger.append(at(64, 292)).unwrap();
    assert_eq!(ledger.totals(&cid).spent, 292);
    assert_eq!(ledger.totals(&cid).receipts_as_consumer, 1);
    drop(ledger);
    // The log's records, read whole, stand for that one request at its
    // latest receipt (what `hypha ledger` shows).
    let mut records = Vec::new();
    hypha_ledger::log::read(&dir.path().join(hypha_ledger::LOG_FILE), &mut |r| {
        records.push(r);
        Ok(())
    })
    .unwrap();
    assert_eq!(records.len(), 3, "16, 32 and 64 tokens");
    let latest = hypha_ledger::latest_of_each(records);
    assert_eq!(latest.len(), 1);
    assert_eq!(
        (
            latest[0].receipt.completion_tokens,
            latest[0].receipt.credits
        ),
        (64, 292)
    );
}

/// A power cut while the last batch is written. One sync covers the batch
/// and its commit record, and a file system may put any of their blocks on
/// disk before the others: what is left is a prefix of the batch, or the
/// batch with any of its bytes lost (zeros, as a file system shows blocks
/// it allocated but never wrote) and its commit record whole. At every
/// offset, cut there, zero-filled from there, or zeroed there for up to 64
/// bytes of the batch while its commit record stays, the log opens as a
/// torn tail with every earlier receipt, and goes on.
#[test]
fn a_power_cut_at_any_offset_of_the_last_batch_is_a_torn_tail() {
    const LOST_BLOCK: usize = 64;
    const COMMIT_RECORD_BYTES: usize = 4 + 8 + 32 + 1 + 4;
    let (dir, before) = log_with(6);
    let (ledger, _) = Ledger::open(dir.path()).unwrap();
    ledger.append(verified(&key(1), &key(2), 6, 7)).unwrap();
    drop(ledger);
    let after = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
    assert!(after.starts_with(&before));
    let cases = |at: usize| {
        let cut = after[..at].to_vec();
        let mut zero_filled = cut.clone();
        zero_filled.resize(after.len(), 0);
        // Bytes of the batch lost, its commit record kept.
        let mut block_lost = after.clone();
        let records_end = after.len() - COMMIT_RECORD_BYTES;
        block_lost[at.min(records_end)..(at + LOST_BLOCK).min(records_end)].fill(0);
        [
            ("cut", cut),
            ("zero-filled", zero_filled),
            ("block lost", block_lost),
        ]
    };
    for at in before.len()..after.len() {
        for (how, bytes) in cases(at) {
            if bytes == after {
                // The zeros written are the bytes that were there.
                continue;
            }
            let rec = reopen(&dir, &bytes).unwrap_or_else(|e| panic!("{how} at {at}: {e}"));
            assert_eq!(rec.receipts, 6, "{how} at {at}");
            assert_eq!(
                rec.truncated_bytes,
                (bytes.len() - before.len()) as u64,
                "{how} at {at}"
            );
        }
    }
    // Damage in an earlier batch is still refused, whole batch after it
    // or not.
    let mut damaged = after.clone();
    damaged[before.len() - 100] ^= 1;
    assert!(matches!(
        reopen(&dir, &damaged),
        Err(LedgerError::Corrupt { .. })
    ));
    // The log goes on after the cut.
    reopen(&dir, &after[..before.len() + 10]).unwrap();
    let (ledger, _) = Ledger::open(dir.path()).unwrap();
    ledger.append(verified(&key(1), &key(2), 6, 7)).unwrap();
    drop(ledger);
    let (_, rec) = Ledger::open(dir.path()).unwrap();
    assert_eq!((rec.receipts, rec.truncated_bytes), (7, 0));
}

fn log_with(n: u64) -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (s, c) = (key(1), key(2));
    let (ledger, _) = Ledger::open(dir.path()).unwrap();
    for i in 0..n {
        ledger.append(verified(&s, &c, i, 7)).unwrap();
    }
    drop(ledger);
    let bytes = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
    (dir, bytes)
}

fn reopen(dir: &tempfile::TempDir, bytes: &[u8]) -> Result<hypha_ledger::Recovery, LedgerError> {
    std::fs::write(dir.path().join(LOG_FILE), bytes).unwrap();
    Ledger::open(dir.path()).map(|(_, r)| r)
}

#[test]
fn a_torn_tail_is_truncated_and_reported_and_the_log_goes_on() {
    let (dir, bytes) = log_with(20);
    let record = (bytes.len() - 8) / 20;
    // Cut inside the last record.
    let cut = &bytes[..bytes.len() - record / 2];
    let rec = reopen(&dir, cut).unwrap();
    assert_eq!(rec.receipts, 19);
    assert_eq!(rec.truncated_bytes, (record - record / 2) as u64);
    // The truncated log accepts appends and chains them correctly.
    let (ledger, _) = Ledger::open(dir.path()).unwrap();
    ledger.append(verified(&key(1), &key(2), 19, 7)).unwrap();
    drop(ledger);
    let (_, rec) = Ledger::open(dir.path()).unwrap();
    assert_eq!((rec.receipts, rec.truncated_bytes), (20, 0));
}

#[test]
fn damage_before_the_tail_is_refused_with_its_offset() {
    let (dir, bytes) = log_with(20);
    let record = (bytes.len() - 8) / 20;
    // A byte flipped in the fifth record's payload.
    let mut flipped = bytes.clone();
    let at = 8 + 4 * record + 100;
    flipped[at] ^= 0x40;
    match reopen(&dir, &flipped) {
        Err(LedgerError::Corrupt { offset, .. }) => assert_eq!(offset, (8 + 4 * record) as u64),
        other => panic!("{other:?}"),
    }
    // A record taken out of the middle: the chain no longer holds.
    let mut removed = bytes[..8 + 3 * record].to_vec();
    removed.extend_from_slice(&bytes[8 + 4 * record..]);
    match reopen(&dir, &removed) {
        Err(LedgerError::Corrupt { reason, .. }) => assert!(reason.contains("chain"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Bytes cut out of the middle of a record.
    let mut cut = bytes[..8 + 2 * record + 50].to_vec();
    cut.extend_from_slice(&bytes[8 + 2 * record + 90..]);
    assert!(matches!(
        reopen(&dir, &cut),
        Err(LedgerError::Corrupt { .. })
    ));
    // Not a ledger at all.
    assert!(matches!(
        reopen(&dir, b"hello world"),
        Err(LedgerError::Corrupt { offset: 0, .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Every single flipped bit after the header is noticed: the log is
    /// refused, or its damaged tail is cut and reported. Never a log that
    /// opens clean with different contents.
    #[test]
    fn every_flipped_bit_is_detected(pos in 8usize..(8 + 12 * 450), bit in 0u8..8) {
        static LOG: std::sync::OnceLock<(tempfile::TempDir, Vec<u8>)> = std::sync::OnceLock::new();
        let (_, bytes) = LOG.get_or_init(|| log_with(12));
        let pos = pos % bytes.len().max(9);
        prop_assume!(pos >= 8);
        let mut damaged = bytes.clone();
        damaged[pos] ^= 1 << bit;
        let dir = tempfile::tempdir().unwrap();
        match reopen(&dir, &damaged) {
            Err(LedgerError::Corrupt { .. }) => {}
            Ok(rec) => prop_assert!(rec.truncated_bytes > 0, "flip at {pos} went unnoticed"),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}

#[test]
fn proof_of_work_counts_leading_zero_bits() {
    // Grind a few keys: the counts follow the hash, and about half of all
    // ids have at least one zero bit.
    let ids: Vec<_> = (0..=255u8)
        .map(|i| node_id_of(&key(i).verifying_key().to_bytes()))
        .collect();
    let with_one = ids.iter().filter(|id| pow_bits(id) >= 1).count();
    assert!((90..=166).contains(&with_one), "{with_one} of 256");
    let best = ids.iter().map(pow_bits).max().unwrap();
    assert!(best >= 4, "the best of 256 has {best} zero bits");
}

#[test]
fn one_node_at_a_time_holds_a_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = Ledger::open(dir.path()).unwrap();
    assert!(matches!(
        Ledger::open(dir.path()),
        Err(LedgerError::InUse(_))
    ));
    drop(first);
    Ledger::open(dir.path()).expect("released when the last handle goes");
}

/// A judge from a real log and what the DHT showed it of others.
struct LogJudge<'a> {
    me: hypha_wire::NodeId,
    log: &'a Ledger,
    spent_elsewhere: std::collections::HashMap<hypha_wire::NodeId, u64>,
}

impl hypha_ledger::Judge for LogJudge<'_> {
    fn paid(&self, to: &hypha_wire::NodeId) -> u64 {
        self.log.moved(&self.me, to)
    }
    fn spent_here(&self, by: &hypha_wire::NodeId) -> u64 {
        self.log.moved(by, &self.me)
    }
    fn spent_elsewhere(&self, of: &hypha_wire::NodeId) -> Option<u64> {
        self.spent_elsewhere.get(of).copied()
    }
}

/// The standing rule: a judge honours what it paid a node, and what that
/// node earned from others the judge paid, up to what they still hold of
/// it; trade with identities the judge never paid is worth nothing,
/// however much, and credits the judge paid count once however many ways
/// they are passed on.
#[test]
fn standing_honours_only_credits_that_trace_back_to_the_judge() {
    let id = |k: &ed25519_dalek::SigningKey| node_id_of(&k.verifying_key().to_bytes());
    let (judge, node, x, elsewhere) = (key(10), key(11), key(12), key(13));
    let sybils: Vec<_> = (100..104).map(key).collect();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Ledger::open(dir.path()).unwrap();
    // The judge's own log: it paid `node` 300 and `x` 500; `node` spent
    // 100 at the judge, `x` 50.
    log.append(verified(&node, &judge, 1, 300)).unwrap();
    log.append(verified(&x, &judge, 2, 500)).unwrap();
    log.append(verified(&judge, &node, 3, 100)).unwrap();
    log.append(verified(&judge, &x, 6, 50)).unwrap();
    // Published for `node`: 1,000 receipts with its own Sybils as
    // consumers, 400 earned from `x`, 50 spent at `elsewhere`, and a copy
    // of its trade with the judge (counted from the log, not twice).
    let mut published = Vec::new();
    for i in 0..1000u64 {
        let s = &sybils[(i % 4) as usize];
        published.push(verified(&node, s, 10_000 + i, 1_000_000));
    }
    published.push(verified(&node, &x, 4, 400));
    published.push(verified(&elsewhere, &node, 5, 50));
    published.push(verified(&node, &judge, 1, 300));
    let p = Published::of(&id(&judge), &id(&node), &published);
    assert_eq!(p.spent_elsewhere, 50);
    assert_eq!(p.earned_from.len(), 5, "{:?}", p.earned_from);
    let mut j = LogJudge {
        me: id(&judge),
        log: &log,
        spent_elsewhere: Default::default(),
    };
    // Its own log alone: what it paid minus what was spent with it.
    assert_eq!(standing(&j, &id(&node), None), 200);
    // Through `x` nothing counts while `x`'s spending is unknown.
    assert_eq!(standing(&j, &id(&node), Some(&p)), 300 - 100 - 50);
    // `x` spent only the 400 it paid `node` elsewhere: it holds 450 of
    // the judge's 500, so all 400 count.
    j.spent_elsewhere.insert(id(&x), 400);
    assert_eq!(standing(&j, &id(&node), Some(&p)), 300 + 400 - 100 - 50);
    // Had `x` also paid 300 to another node, it held only 150 for this one.
    j.spent_elsewhere.insert(id(&x), 700);
    assert_eq!(standing(&j, &id(&node), Some(&p)), 300 + 150 - 100 - 50);
    // The Sybils' billions are there to see, and the balance shows them,
    // but none of it traces back to the judge.
    let totals = hypha_ledger::totals_of(&id(&node), &published);
    assert!(balance(&totals) > 999_000_000);
    let q = Published::of(&id(&judge), &id(&node), &published[1000..]);
    assert_eq!(
        standing(&j, &id(&node), Some(&q)),
        standing(&j, &id(&node), Some(&p))
    );
    // A stranger the judge never paid has no standing, whatever it
    // earned from its own identities.
    let stranger = key(14);
    let fabricated: Vec<_> = (0..1000u64)
        .map(|i| verified(&stranger, &sybils[(i % 4) as usize], i, 1_000_000))
        .collect();
    let p = Published::of(&id(&judge), &id(&stranger), &fabricated);
    assert_eq!(standing(&j, &id(&stranger), Some(&p)), 0);
}

/// A node the judge paid cannot multiply those credits by paying them to
/// several identities of its own: together they are honoured no more than
/// it held.
#[test]
fn credits_passed_on_to_many_count_once() {
    let id = |k: &ed25519_dalek::SigningKey| node_id_of(&k.verifying_key().to_bytes());
    let (judge, x) = (key(20), key(21));
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Ledger::open(dir.path()).unwrap();
    log.append(verified(&x, &judge, 1, 1000)).unwrap();
    for n in [2usize, 4, 64] {
        let payees: Vec<_> = (0..n).map(|i| key(100 + i as u8)).collect();
        // `x` pays each of them all it earned, in receipts it publishes.
        let pays: Vec<_> = payees
            .iter()
            .enumerate()
            .map(|(i, p)| verified(p, &x, i as u64, 1000))
            .collect();
        let out = Published::of(&id(&judge), &id(&x), &pays).spent_elsewhere;
        assert_eq!(out, 1000 * n as u64);
        let j = LogJudge {
            me: id(&judge),
            log: &log,
            spent_elsewhere: [(id(&x), out)].into(),
        };
        let total: i128 = payees
            .iter()
            .map(|p| {
                let mine = Published::of(&id(&judge), &id(p), &pays);
                standing(&j, &id(p), Some(&mine))
            })
            .sum();
        assert!(total <= 1000, "{n} payees hold {total}");
        // Paid out in part, the rest counts: half to each of two.
        if n == 2 {
            let halves: Vec<_> = payees
                .iter()
                .enumerate()
                .map(|(i, p)| verified(p, &x, 100 + i as u64, 500))
                .collect();
            let j = LogJudge {
                me: id(&judge),
                log: &log,
                spent_elsewhere: [(id(&x), 1000)].into(),
            };
            for p in &payees {
                let mine = Published::of(&id(&judge), &id(p), &halves);
                assert_eq!(standing(&j, &id(p), Some(&mine)), 500);
            }
        }
    }
}
