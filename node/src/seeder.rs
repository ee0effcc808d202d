//! The seeder side of remote inference: accept peers on the QUIC endpoint,
//! exchange hellos, and serve each request stream from the local engine.
//!
//! One task accepts connections (at most [`MAX_PEERS`] at once; more are
//! refused before their handshake). Each connection gets a task that performs
//! the handshake and hello exchange, then spawns one task per request
//! stream (QUIC bounds them per peer). A request stream carries exactly one
//! `Request`; the seeder answers with `Chunk`s numbered from 0 and ends with
//! `Done` or `Error`. A `Cancel`, a reset of the stream or a stop of the
//! reply drops the engine's `Generation`, which frees the slot at the next
//! decode step. A protocol violation on any stream closes the whole
//! connection with the reason; other peers are unaffected.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hypha_engine::{ChatMessage, Engine, Event, GenerateRequest, SamplingParams};
use hypha_wire::{
    ArchivedMessage, Done, ErrorReply, FinishReason, InferenceRequest, Message, NodeId, TokenChunk,
};
use tokio::sync::{watch, Semaphore};
use tracing::Instrument as _;

use crate::metrics::Metrics;
use crate::openai::{MAX_MESSAGES, MAX_STOP_BYTES, MAX_STOP_STRINGS};
use crate::proto::{
    close_for_violation, hello_as_acceptor, kind_of, FramedRecv, FramedSend, PeerError,
    CLOSE_NORMAL, HELLO_TIMEOUT,
};
use crate::transport::Endpoint;

/// Peers connected at once; each holds a connection's buffers and up to
/// `MAX_STREAMS_PER_PEER` streams, so this bounds a seeder's peer memory.
pub const MAX_PEERS: usize = 256;

/// What a seeder serves and how it counts.
pub struct SeederState {
    pub engine: Engine,
    /// Names a request may use for the model (its id and aliases).
    pub models: Vec<String>,
    pub hello: Message,
    pub metrics: Arc<Metrics>,
    pub max_peers: usize,
}

/// Accepts peers until `shutdown` turns true, then closes every connection.
pub async fn run(
    endpoint: Arc<Endpoint>,
    state: Arc<SeederState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(state.max_peers));
    loop {
        let incoming = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break,
            i = endpoint.accept_incoming() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "refusing peer: {} peers connected", state.max_peers);
            incoming.refuse();
            continue;
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let remote = incoming.remote_address();
            let accepted = tokio::time::timeout(HELLO_TIMEOUT, Endpoint::handshake(incoming)).await;
            let (conn, peer) = match accepted {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::info!(%remote, "handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "handshake timed out");
                    return;
                }
            };
            let span = tracing::info_span!("peer", %peer);
            serve_connection(conn, peer, state, shutdown)
                .instrument(span)
                .await;
        });
    }
    endpoint.close();
    // Let the close frames leave before the endpoint is dropped.
    endpoint.wait_idle().await;
}

async fn serve_connection(
    conn: quinn::Connection,
    peer: NodeId,
    state: Arc<SeederState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let hello = match hello_as_acceptor(&conn, peer, &state.hello).await {
        Ok(h) => h,
        Err(e) => {
            if e.is_violation() || matches!(e, PeerError::Timeout(_)) {
                state
                    .metrics
                    .peer_violations
                    .fetch_add(1, Ordering::Relaxed);
                close_for_violation(&conn, peer, &e);
            } else {
                tracing::info!("peer left during hello: {e}");
            }
            return;
        }
    };
    tracing::info!(remote = %conn.remote_address(), capabilities = hello.capabilities, "peer connected");
    state
        .metrics
        .peers_connected
        .fetch_add(1, Ordering::Relaxed);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => {
                conn.close(CLOSE_NORMAL, b"node shutting down");
                break;
            }
            a = conn.accept_bi() => a,
        };
        let (send, recv) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::info!("peer disconnected: {e}");
                break;
            }
        };
        let state = state.clone();
        let conn = conn.clone();
        tokio::spawn(
            async move {
                if let Err(e) = serve_stream(send, recv, &state).await {
                    if e.is_violation() {
                        state
                            .metrics
                            .peer_violations
                            .fetch_add(1, Ordering::Relaxed);
                        close_for_violation(&conn, peer, &e);
                    } else {
                        tracing::debug!("request stream ended: {e}");
                    }
                }
            }
            .in_current_span(),
        );
    }
    state
        .metrics
        .peers_connected
        .fetch_sub(1, Ordering::Relaxed);
}

/// Serves one request stream.
async fn serve_stream(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    state: &SeederState,
) -> Result<(), PeerError> {
    let mut recv = FramedRecv::new(recv);
    let mut send = FramedSend::new(send);
    let req = tokio::time::timeout(HELLO_TIMEOUT, recv.next(owned_request))
        .await
        .map_err(|_| PeerError::Protocol("request stream carried no request".into()))??
        .ok_or_else(|| PeerError::Protocol("request stream ended before its request".into()))?;
    let request_id = req.request_id;
    let generation = match prepare(&req, state).and_then(|r| {
        state
            .engine
            .submit(r)
            .map_err(|e| reply_for(request_id, &e))
    }) {
        Ok(g) => g,
        Err(reply) => {
            state.metrics.count_request("peer", reply.code);
            send.send(&Message::Error(reply)).await?;
            send.finish();
            return Ok(());
        }
    };
    let outcome = stream_generation(generation, &mut send, &mut recv, request_id).await;
    let status = match &outcome {
        Ok(true) => 200,
        Ok(false) => 499,
        Err(e) if e.is_violation() => 400,
        Err(_) => 499,
    };
    state.metrics.count_request("peer", status);
    if matches!(outcome, Ok(false) | Err(PeerError::Reset(_))) {
        state.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    outcome.map(|_| ())
}

/// Streams the generation out; `Ok(false)` when the consumer cancelled.
async fn stream_generation(
    mut generation: hypha_engine::Generation,
    send: &mut FramedSend,
    recv: &mut FramedRecv,
    request_id: u64,
) -> Result<bool, PeerError> {
    // One chunk message reused for every token: no allocation per token on
    // the wire path.
    let mut chunk = Message::Chunk(TokenChunk {
        request_id,
        seq: 0,
        token_ids: Vec::with_capacity(1),
        text: String::with_capacity(32),
    });
    let mut seq = 0u32;
    loop {
        let event = tokio::select! {
            biased;
            m = recv.next(cancel_or_violation), if !recv.is_finished() => {
                match m? {
                    // The consumer finished its side: nothing more to read.
                    None => continue,
                    Some(()) => return Ok(false),
                }
            }
            e = generation.next() => e,
        };
        match event {
            Some(Event::Token { id, text }) => {
                if let Message::Chunk(c) = &mut chunk {
                    c.seq = seq;
                    c.token_ids.clear();
                    c.token_ids.push(id);
                    c.text.clear();
                    c.text.push_str(&text);
                }
                seq = seq.wrapping_add(1);
                send.send(&chunk).await?;
            }
            Some(Event::Done { text, finish }) => {
                let done = Message::Done(Done {
                    request_id,
                    prompt_tokens: finish.prompt_tokens,
                    completion_tokens: finish.completion_tokens,
                    finish_reason: match finish.reason {
                        hypha_engine::FinishReason::Stop => FinishReason::Stop,
                        hypha_engine::FinishReason::Length => FinishReason::Length,
                    },
                    text,
                });
                send.send(&done).await?;
                send.finish();
                return Ok(true);
            }
            Some(Event::Failed(e)) => {
                send.send(&Message::Error(reply_for(request_id, &e)))
                    .await?;
                send.finish();
                return Ok(true);
            }
            None => {
                send.send(&Message::Error(ErrorReply {
                    request_id,
                    code: 500,
                    message: "the engine stopped".into(),
                }))
                .await?;
                send.finish();
                return Ok(true);
            }
        }
    }
}

/// While a request runs, the consumer may only cancel it.
fn cancel_or_violation(msg: &ArchivedMessage) -> Result<(), PeerError> {
    match msg {
        ArchivedMessage::Cancel(_) => Ok(()),
        other => Err(PeerError::Protocol(format!(
            "{} sent while a request was running",
            kind_of(other)
        ))),
    }
}

fn owned_request(msg: &ArchivedMessage) -> Result<InferenceRequest, PeerError> {
    match msg {
        ArchivedMessage::Request(r) => hypha_wire::owned_request(r)
            .map_err(|e| PeerError::Protocol(format!("bad request: {e}"))),
        other => Err(PeerError::Protocol(format!(
            "a request stream must start with a request, not a {}",
            kind_of(other)
        ))),
    }
}

/// Checks a peer's request and turns it into tokens for the engine.
fn prepare(req: &InferenceRequest, state: &SeederState) -> Result<GenerateRequest, ErrorReply> {
    let id = req.request_id;
    let bad = |code: u16, message: String| ErrorReply {
        request_id: id,
        code,
        message,
    };
    if !state.models.contains(&req.model) {
        return Err(bad(
            404,
            format!(
                "the model {:?} is not served here; this seeder serves {:?}",
                req.model, state.models
            ),
        ));
    }
    if req.stop.len() > MAX_STOP_STRINGS || req.stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(bad(
            400,
            format!("at most {MAX_STOP_STRINGS} stop strings of {MAX_STOP_BYTES} bytes"),
        ));
    }
    let engine = &state.engine;
    let tokens = match &req.prompt {
        hypha_wire::Prompt::Chat(messages) => {
            if messages.is_empty() || messages.len() > MAX_MESSAGES {
                return Err(bad(400, format!("between 1 and {MAX_MESSAGES} messages")));
            }
            if let Some(m) = messages
                .iter()
                .find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool"))
            {
                return Err(bad(400, format!("unknown message role {:?}", m.role)));
            }
            let messages: Vec<ChatMessage> = messages
                .iter()
                .map(|m| ChatMessage {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect();
            engine
                .apply_chat_template(&messages)
                .and_then(|p| engine.tokenize(&p))
        }
        hypha_wire::Prompt::Text(t) => engine.tokenize(t),
    }
    .map_err(|e| reply_for(id, &e))?;
    Ok(GenerateRequest {
        prompt: tokens,
        sampling: sampling_from_wire(&req.sampling),
        max_tokens: req.max_tokens,
        stop: req.stop.clone(),
    })
}

/// The error a consumer gets for an engine error, with an HTTP-like code.
fn reply_for(request_id: u64, e: &hypha_engine::Error) -> ErrorReply {
    use hypha_engine::Error as E;
    let code = match e {
        E::ContextExceeded { .. } | E::InvalidRequest(_) | E::PromptTooLarge | E::Template(_) => {
            400
        }
        E::QueueFull { .. } => 503,
        _ => 500,
    };
    ErrorReply {
        request_id,
        code,
        message: e.to_string(),
    }
}

/// Engine sampling settings from their wire form.
pub fn sampling_from_wire(s: &hypha_wire::Sampling) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        seed: s.seed,
    }
}

/// The wire form of engine sampling settings.
pub fn sampling_to_wire(s: &SamplingParams) -> hypha_wire::Sampling {
    hypha_wire::Sampling {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        seed: s.seed,
    }
}
