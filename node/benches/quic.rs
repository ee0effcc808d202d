//! What the network adds to a remote request, without the model: two
//! endpoints on loopback with real QUIC and TLS, a warm connection.
//!
//! - `request_to_first_chunk`: open a stream, send an inference request
//!   frame, the peer answers with one token chunk: the time a remote request
//!   adds before its first token.
//! - `chunk_stream/256`: 256 token chunks on one stream, encoded and decoded
//!   as the seeder and consumer do: the per-token cost of the transport.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hypha_node::identity::Identity;
use hypha_node::net::endpoint::Endpoint;
use hypha_node::net::proto::{FramedRecv, FramedSend};
use hypha_wire::{Message, TokenChunk};

#[path = "../tests/common/mod.rs"]
mod common;

fn request(max_tokens: u32) -> Message {
    common::request(1, max_tokens)
}

const CHUNKS: u32 = 256;

/// A peer that answers each request stream with as many chunks as the
/// request's max_tokens.
async fn serve(ep: Endpoint) {
    while let Some(Ok((conn, _))) = ep.accept().await {
        tokio::spawn(async move {
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(answer(send, recv));
            }
        });
    }
}

async fn answer(send: quinn::SendStream, recv: quinn::RecvStream) {
    let mut recv = FramedRecv::new(recv);
    let n = recv
        .next(|m| match m {
            hypha_wire::ArchivedMessage::Request(r) => {
                Ok(r.max_tokens.as_ref().map_or(1, |v| v.to_native()))
            }
            _ => Ok(1),
        })
        .await
        .ok()
        .flatten()
        .unwrap_or(1);
    let mut send = FramedSend::new(send);
    let mut chunk = Message::Chunk(TokenChunk {
        request_id: 1,
        seq: 0,
        token_ids: vec![0],
        text: String::with_capacity(16),
        logprobs: Vec::new(),
    });
    for seq in 0..n {
        if let Message::Chunk(c) = &mut chunk {
            c.seq = seq;
            c.token_ids.clear();
            c.token_ids.push(seq as i32);
            c.text.clear();
            c.text.push_str(" token");
        }
        if send.send(&chunk).await.is_err() {
            return;
        }
    }
    send.finish();
}

/// Sends `req` on a new stream and reads every chunk back; the count.
async fn round_trip(conn: &quinn::Connection, req: &Message) -> u32 {
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut send = FramedSend::new(send);
    send.send(req).await.unwrap();
    send.finish();
    let mut recv = FramedRecv::new(recv);
    let mut n = 0;
    while recv.next(|_| Ok(())).await.unwrap().is_some() {
        n += 1;
    }
    n
}

fn bench(c: &mut Criterion) {
    hypha_node::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (conn, _client) = rt.block_on(async {
        let server_id = Identity::from_seed([1; 32]);
        let server = Endpoint::bind(&server_id, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(serve(server));
        let client = Endpoint::bind(
            &Identity::from_seed([2; 32]),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let conn = client.dial(addr, server_id.id()).await.unwrap();
        (conn, client)
    });

    let first = request(1);
    c.bench_function("request_to_first_chunk", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (conn, first) = (conn.clone(), first.clone());
            async move {
                let started = Instant::now();
                for _ in 0..iters {
                    assert_eq!(round_trip(&conn, &first).await, 1);
                }
                started.elapsed()
            }
        })
    });

    let many = request(CHUNKS);
    let mut g = c.benchmark_group("chunk_stream");
    g.throughput(Throughput::Elements(u64::from(CHUNKS)));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("256", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (conn, many) = (conn.clone(), many.clone());
            async move {
                let started = Instant::now();
                for _ in 0..iters {
                    assert_eq!(round_trip(&conn, &many).await, CHUNKS);
                }
                started.elapsed()
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
