//! Crash safety against the real thing: a child process appends receipts
//! from several threads (so appends are group-committed) and prints each
//! request id once its append returned; the parent SIGKILLs it at random
//! moments, many times, then reopens the log. Every acknowledged receipt is
//! there, the log opens (at most a torn tail cut off), and its chain and
//! signatures verify.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hypha_ledger::{node_id_of, verify_batch, Ledger, ReceiptKey, LOG_FILE};

mod common;
use common::{key, verified};

const CHILD_ENV: &str = "HYPHA_LEDGER_CRASH_CHILD";
const KILLS: u64 = 25;
const THREADS: u64 = 8;

/// The child's work; a no-op unless the parent started this process.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let start: u64 = std::env::var("HYPHA_LEDGER_CRASH_START")
        .unwrap()
        .parse()
        .unwrap();
    let (ledger, _) = Ledger::open(std::path::Path::new(&dir)).unwrap();
    let next = Arc::new(AtomicU64::new(start));
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (ledger, next, out) = (ledger.clone(), next.clone(), out.clone());
            std::thread::spawn(move || loop {
                let id = next.fetch_add(1, Ordering::Relaxed);
                ledger.append(verified(&key(1), &key(2), id, 3)).unwrap();
                let mut o = out.lock().unwrap();
                writeln!(o, "acked {id}").unwrap();
                o.flush().unwrap();
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// A tiny deterministic generator for kill delays (no RNG crate needed).
fn delays(seed: u64) -> impl Iterator<Item = Duration> {
    let mut x = seed;
    std::iter::repeat_with(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Duration::from_millis(60 + x % 300)
    })
}

#[test]
fn acknowledged_receipts_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let me = std::env::current_exe().unwrap();
    let mut acked: Vec<u64> = Vec::new();
    let mut torn_seen = 0;
    let seed = std::process::id() as u64 | 1;
    eprintln!("kill schedule seed {seed}");
    for (round, delay) in delays(seed).take(KILLS as usize).enumerate() {
        // Each round starts its ids far from the last so none collide.
        let start = round as u64 * 1_000_000;
        let mut child = Command::new(&me)
            .args([
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, dir.path())
            .env("HYPHA_LEDGER_CRASH_START", start.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.strip_prefix("acked ").and_then(|n| n.parse::<u64>().ok()))
                .collect::<Vec<_>>()
        });
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let ids = reader.join().unwrap();
        acked.extend(ids);

        let (ledger, rec) = Ledger::open(dir.path()).unwrap();
        if rec.truncated_bytes > 0 {
            torn_seen += 1;
        }
        let consumer = node_id_of(&key(2).verifying_key().to_bytes());
        for id in &acked {
            assert!(
                ledger.contains(&ReceiptKey {
                    consumer,
                    request_id: *id
                }),
                "receipt {id}, acknowledged before kill {round}, is missing (seed {seed})"
            );
        }
    }
    assert!(
        acked.len() > 100,
        "only {} appends were acknowledged",
        acked.len()
    );
    // The whole log: chain and checksums on reading, then every signature.
    let mut all = Vec::new();
    let rec = hypha_ledger::log::read(&dir.path().join(LOG_FILE), &mut |r| {
        all.push(r);
        Ok(())
    })
    .unwrap();
    assert_eq!(rec.truncated_bytes, 0, "recovery left a clean log");
    assert!(all.len() >= acked.len());
    let n = all.len();
    verify_batch(all).unwrap();
    eprintln!(
        "{KILLS} kills: {} receipts acknowledged, {n} in the log, {torn_seen} torn tails cut",
        acked.len()
    );
}
