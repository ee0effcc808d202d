//! Arbitrary bytes on a relayed stream never panic the packet decoder,
//! wherever the stream is cut; every packet it yields re-encodes to the
//! bytes it came from.
#![no_main]

use hypha_wire::{encode_packet, PacketDecoder, MAX_RELAYED_PACKET};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut dec = PacketDecoder::default();
    let mut reencoded = Vec::new();
    for part in [&data[..cut], &data[cut..]] {
        dec.push(part);
        while let Ok(Some(p)) = dec.next_packet() {
            assert!(!p.is_empty() && p.len() <= MAX_RELAYED_PACKET);
            encode_packet(&mut reencoded, p).unwrap();
        }
    }
    assert!(data.starts_with(&reencoded));
});
