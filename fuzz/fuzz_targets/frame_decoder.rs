//! Arbitrary peer bytes never panic the frame decoder; whatever validates
//! deserializes and encodes back to a frame that decodes to the same message.
#![no_main]

use hypha_wire::{decode_frame, FrameDecoder, FrameEncoder, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut dec = FrameDecoder::default();
    dec.push(data);
    while let Ok(Some(_)) = dec.next_frame() {}
    if let Ok((archived, _)) = decode_frame(data) {
        let msg: Message = rkyv::deserialize::<Message, rkyv::rancor::Error>(archived)
            .expect("a checked archive deserializes");
        let frame = FrameEncoder::new().encode(&msg).expect("encodes").to_vec();
        let (again, _) = decode_frame(&frame).expect("own frames decode");
        let again: Message = rkyv::deserialize::<Message, rkyv::rancor::Error>(again)
            .expect("a checked archive deserializes");
        // NaN floats compare unequal to themselves; compare the encodings.
        let frame2 = FrameEncoder::new().encode(&again).expect("encodes").to_vec();
        assert_eq!(frame, frame2);
    }
});
