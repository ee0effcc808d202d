//! The HTTP listener and server loop: connections capped, every wait on a
//! client timed.
//!
//! Each accepted connection holds a permit for as long as it is open. A
//! connection beyond the cap gets one `503` with `Retry-After`, written
//! without waiting, and is closed: a flood of idle or slow clients cannot
//! pin the node's memory without bound, and the clients already connected
//! keep being served. Each connection is served by hyper with a header
//! timer ([`HEADER_TIMEOUT`]) that also closes kept-alive connections left
//! idle; the guard reads a body under [`BODY_TIMEOUT`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

/// Client connections served at once by default: far more than the
/// streams a node's slots can serve, far fewer than the descriptors a
/// process may hold.
pub const DEFAULT_MAX_HTTP_CONNECTIONS: usize = 1024;

/// Completions in flight at once by default: every slot and queue place a
/// node offers locally, with room for a front that forwards many streams
/// to the network, yet each one a bounded task and buffer.
pub const DEFAULT_MAX_HTTP_STREAMS: usize = 512;

/// A request's head must arrive whole within this long of the connection
/// being ready for it: just accepted, or its previous response sent. A
/// client trickling header bytes is cut off; and as hyper's clock also runs
/// while a kept-alive connection waits for its next request, this is the
/// idle timeout of a connection with nothing in flight. (A request in
/// flight is never cut by it: a long non-streaming generation writes
/// nothing until it ends.) Longer than the keep-alive pools of common
/// clients (httpx: 5 s), so a reused connection is rarely closed under
/// them.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(15);

/// A request's whole body must arrive within this long of its head: 4 MiB
/// at 140 KB/s, far slower than any real client, while a client trickling
/// bytes holds its connection and buffer no longer.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the server waits on a client (see [`HEADER_TIMEOUT`] and
/// [`BODY_TIMEOUT`]); tests shorten them.
#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    pub header: Duration,
    pub body: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        Self {
            header: HEADER_TIMEOUT,
            body: BODY_TIMEOUT,
        }
    }
}

/// What a connection beyond the cap is told before it is closed.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 140\r\n\r\n{\"error\":{\"message\":\"too many connections to this node; try again shortly\",\"type\":\"server_busy\",\"param\":null,\"code\":\"too_many_connections\"}}";

const _: () = assert!(OVER_CAPACITY.len() < 1024);

/// A TCP listener that serves at most `max` connections at once.
pub struct CappedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl CappedListener {
    pub fn new(inner: TcpListener, max: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max.max(1))),
            metrics,
        }
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = Capped;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Capped, SocketAddr) {
        loop {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    // Token events are small writes a few milliseconds
                    // apart: without TCP_NODELAY, Nagle holds each one
                    // until the client's delayed ACK (up to 40 ms) arrives.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!("cannot set TCP_NODELAY: {e}");
                    }
                    return (
                        Capped {
                            stream,
                            _permit: permit,
                        },
                        addr,
                    );
                }
                Err(_) => {
                    // A fresh socket's send buffer takes this at once; if
                    // it does not, the client just sees the close.
                    let _ = stream.try_write(OVER_CAPACITY);
                    self.metrics
                        .http_connections_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%addr, "HTTP connection refused: at the connection cap");
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Serves `app` on `listener` until `stop` is cancelled; then stops
/// accepting, lets each connection finish the request it is serving (an
/// idle one closes at once) and returns when all are closed.
pub fn serve(
    mut listener: CappedListener,
    app: axum::Router,
    header_timeout: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<io::Result<()>> {
    tokio::spawn(async move {
        let conns = TaskTracker::new();
        loop {
            let (io, addr) = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                c = axum::serve::Listener::accept(&mut listener) => c,
            };
            let service = TowerToHyperService::new(app.clone());
            let stop = stop.clone();
            conns.spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(io), service);
                tokio::pin!(conn);
                let ended = tokio::select! {
                    r = conn.as_mut() => r,
                    () = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(%addr, "HTTP connection ended: {e}");
                }
            });
        }
        conns.close();
        conns.wait().await;
        Ok(())
    })
}

/// An accepted connection and its permit.
pub struct Capped {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_one_whole_response() {
        let text = std::str::from_utf8(OVER_CAPACITY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_connections");
    }
}
