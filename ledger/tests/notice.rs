//! Unpaid notices: what verifies, what does not, what voids one, and how
//! distinct seeders are counted.

use hypha_ledger::{unpaid_seeders, Notice, Receipt, NOTICE_BYTES};

mod common;
use common::{key, sign_both, signed};

/// A notice by seeder `s` against consumer `c` of request `id`: paid to 100
/// tokens, offered to 108.
fn notice(s: u8, c: u8, id: u64) -> Notice {
    let (seeder, consumer) = (key(s), key(c));
    let paid = signed(&seeder, &consumer, id, 500);
    let mut offered = paid.receipt.clone();
    offered.completion_tokens += 8;
    offered.credits += 32;
    offered.finished_ms += 400;
    Notice {
        seeder_sig: offered.sign(&seeder),
        paid,
        offered,
    }
}

#[test]
fn a_notice_round_trips_and_verifies() {
    let n = notice(1, 2, 7);
    let bytes = n.to_bytes();
    assert_eq!(bytes.len(), NOTICE_BYTES);
    let back = Notice::from_bytes(&bytes).unwrap();
    assert_eq!(back, n);
    let v = back.verify().unwrap();
    assert_eq!(v.unpaid_tokens(), 8);
    assert_eq!(v.request_id(), 7);
    assert_eq!(v.notice(), n);
    assert!(Notice::from_bytes(&bytes[1..]).is_err());
}

#[test]
fn a_notice_is_refused_unless_its_offer_is_a_later_receipt_of_the_paid_request() {
    let seeder = key(1);
    let resign = |mut n: Notice, f: &dyn Fn(&mut Receipt)| {
        f(&mut n.offered);
        n.seeder_sig = n.offered.sign(&seeder);
        n
    };
    type Edit<'a> = &'a dyn Fn(&mut Receipt);
    let cases: [(&str, Edit); 7] = [
        ("another request", &|o| o.request_id += 1),
        ("another model", &|o| o.model_sha256 = [1; 32]),
        ("another prompt", &|o| o.prompt_tokens += 1),
        ("another start", &|o| o.started_ms -= 1),
        ("no more tokens", &|o| o.completion_tokens = 100),
        ("fewer credits", &|o| o.credits = 499),
        ("earlier", &|o| o.finished_ms = 1_795_000_000_999),
    ];
    for (what, f) in cases {
        assert!(resign(notice(1, 2, 7), f).verify().is_err(), "{what}");
    }
    // Signed by someone else than the receipt's seeder.
    let mut n = notice(1, 2, 7);
    n.seeder_sig = n.offered.sign(&key(3));
    assert!(n.verify().is_err());
    // The paid receipt's consumer signature is checked too.
    let mut n = notice(1, 2, 7);
    n.paid.consumer_sig[0] ^= 1;
    assert!(n.verify().is_err());
}

#[test]
fn distinct_live_seeders_count_and_a_receipt_covering_the_offer_voids_a_notice() {
    let notices: Vec<_> = [notice(1, 9, 1), notice(1, 9, 2), notice(3, 9, 5)]
        .into_iter()
        .map(|n| n.verify().unwrap())
        .collect();
    let at = notices[0].at_ms();
    assert_eq!(unpaid_seeders(&notices, &[], at).len(), 2, "two seeders");
    assert!(unpaid_seeders(&notices, &[], at + 1).is_empty(), "too old");
    // The consumer countersigns seeder 3's offer: that notice is void.
    let paid = sign_both(&key(3), &key(9), notices[2].offered().clone());
    let left = unpaid_seeders(&notices, &[paid], at);
    assert_eq!(left.len(), 1);
    assert!(left.contains(&notices[0].seeder()));
    // A receipt of another request does not.
    let other = common::verified(&key(3), &key(9), 6, 10);
    assert_eq!(unpaid_seeders(&notices, &[other], at).len(), 2);
}
