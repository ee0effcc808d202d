//! The per-token path allocates nothing once warm: a token chunk is encoded
//! into the encoder's reused buffer and arena, pushed into a stream decoder
//! and read back in place. Counted with dhat's heap profiler in testing mode
//! (one test per binary: the profiler is process-wide).

use hypha_wire::{decode_frame, ArchivedMessage, FrameDecoder, FrameEncoder, Message, TokenChunk};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

#[test]
fn token_chunks_encode_and_decode_without_allocating() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let mut enc = FrameEncoder::new();
    let mut dec = FrameDecoder::default();
    let mut msg = Message::Chunk(TokenChunk {
        request_id: 42,
        seq: 0,
        token_ids: Vec::with_capacity(4),
        text: String::with_capacity(64),
        logprobs: Vec::new(),
    });
    let words = [
        " the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog.",
    ];
    let mut step = |i: usize, enc: &mut FrameEncoder, dec: &mut FrameDecoder| -> usize {
        if let Message::Chunk(c) = &mut msg {
            c.seq = i as u32;
            c.token_ids.clear();
            c.token_ids.push(i as i32);
            c.text.clear();
            c.text.push_str(words[i % words.len()]);
        }
        let bytes = enc.encode(&msg).unwrap();
        let (direct, used) = decode_frame(bytes).unwrap();
        assert_eq!(used, bytes.len());
        let direct_seq = match direct {
            ArchivedMessage::Chunk(c) => c.seq.to_native(),
            other => panic!("{other:?}"),
        };
        dec.push(bytes);
        match dec.next_frame().unwrap() {
            Some(ArchivedMessage::Chunk(c)) => {
                assert_eq!(c.seq.to_native(), direct_seq);
                c.text.len()
            }
            other => panic!("{other:?}"),
        }
    };
    // Warm up: buffers and arena reach their working size.
    for i in 0..64 {
        step(i, &mut enc, &mut dec);
    }
    let before = dhat::HeapStats::get();
    let mut text_bytes = 0;
    for i in 0..10_000 {
        text_bytes += step(i, &mut enc, &mut dec);
    }
    let after = dhat::HeapStats::get();
    assert!(text_bytes > 10_000);
    assert_eq!(
        after.total_blocks - before.total_blocks,
        0,
        "allocations on the token path: {} blocks, {} bytes over 10,000 tokens",
        after.total_blocks - before.total_blocks,
        after.total_bytes - before.total_bytes
    );
}
