//! Encode and decode of the per-token message, the hot path of remote
//! inference. Run: `cargo bench -p hypha-wire`.
use criterion::{criterion_group, criterion_main, Criterion};
use hypha_wire::{decode_frame, FrameEncoder, Message, TokenChunk};
use std::hint::black_box;

fn chunk() -> Message {
    Message::Chunk(TokenChunk {
        request_id: 0x1234_5678_9abc,
        seq: 42,
        token_ids: vec![1337],
        text: " lighthouse".to_owned(),
        logprobs: Vec::new(),
    })
}

fn codec(c: &mut Criterion) {
    let msg = chunk();
    let mut enc = FrameEncoder::new();
    c.bench_function("encode token chunk", |b| {
        b.iter(|| black_box(enc.encode(black_box(&msg)).map(<[u8]>::len)))
    });
    let frame = FrameEncoder::new()
        .encode(&msg)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    c.bench_function("decode token chunk", |b| {
        b.iter(|| black_box(decode_frame(black_box(&frame)).map(|(_, n)| n)))
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
