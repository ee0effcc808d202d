//! Arbitrary peer bytes never panic the frame decoder; a stream cut in two
//! anywhere yields the same frames (and the same error) as the whole; and
//! whatever validates deserializes and encodes back to a frame that decodes
//! to the same message.
#![no_main]

use hypha_wire::{decode_frame, FrameDecoder, FrameEncoder, Message};
use libfuzzer_sys::fuzz_target;

/// Drains every whole frame; `Err` holds the error that stopped it.
fn drain(dec: &mut FrameDecoder, out: &mut Vec<String>) -> Result<(), String> {
    loop {
        match dec.next_frame() {
            Ok(Some(m)) => out.push(format!("{m:?}")),
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut whole = FrameDecoder::default();
    whole.push(data);
    let mut frames = Vec::new();
    let end = drain(&mut whole, &mut frames);

    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let (head, tail) = data.split_at(split);
    let mut parts = FrameDecoder::default();
    let mut frames2 = Vec::new();
    parts.push(head);
    let mut end2 = drain(&mut parts, &mut frames2);
    if end2.is_ok() {
        parts.push(tail);
        end2 = drain(&mut parts, &mut frames2);
    }
    assert_eq!(frames, frames2, "split at {split}");
    assert_eq!(end, end2, "split at {split}");

    if let Ok((archived, _)) = decode_frame(data) {
        let msg: Message = rkyv::deserialize::<Message, rkyv::rancor::Error>(archived)
            .expect("a checked archive deserializes");
        let frame = FrameEncoder::new().encode(&msg).expect("encodes").to_vec();
        let (again, _) = decode_frame(&frame).expect("own frames decode");
        let again: Message = rkyv::deserialize::<Message, rkyv::rancor::Error>(again)
            .expect("a checked archive deserializes");
        // NaN floats compare unequal to themselves; compare the encodings.
        let frame2 = FrameEncoder::new()
            .encode(&again)
            .expect("encodes")
            .to_vec();
        assert_eq!(frame, frame2);
    }
});
