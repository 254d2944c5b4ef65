//! The HTTP server loop: axum's router on hyper, with the timeouts a public front door
//! needs and `axum::serve` does not set.
//!
//! A client must send its request headers within `GATEWAY_HEADER_TIMEOUT_MS` (a slow-loris
//! client holding connections open byte by byte is cut off); the router's own layers
//! then bound the body (10 s) and the whole request (60 s). Shutdown stops accepting and
//! lets in-flight requests finish.
//! (Written by hand because `axum::serve` exposes no header timeout; the loop is the one
//! hyper-util documents, plus the client address for `ConnectInfo`.)

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long shutdown waits for in-flight requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// How a server is bounded.
#[derive(Clone)]
pub struct Limits {
    /// How long a client may take to send its headers.
    pub header_timeout: Duration,
    /// Open connections; beyond, a new one is answered `503 overloaded` and closed.
    pub max_connections: usize,
    /// Counts refused connections.
    pub metrics: crate::metrics::Metrics,
}

/// The answer to a connection beyond the limit: written straight to the socket, before
/// reading anything, and the connection is closed.
const OVERLOADED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 82\r\n\r\n\
{\"code\":\"overloaded\",\"message\":\"too many open connections; retry\",\"request_id\":\"\"}";

/// Serves `app` on `listener` until `shutdown`, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let header_timeout = limits.header_timeout;
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            limits.metrics.overloaded("connection");
            tokio::spawn(refuse(stream));
            continue;
        };
        // The peer's address goes on each request by a wrapper around the router, not by
        // `Router::layer`: that rebuilds every route, and cost about 250 KB and the
        // matching CPU for every connection accepted.
        let service = TowerToHyperService::new(tower::Layer::layer(
            &axum::Extension(ConnectInfo::<SocketAddr>(peer)),
            app.clone(),
        ));
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within {DRAIN_TIMEOUT:?}");
    }
}

/// Answers a connection beyond the limit and closes it (bounded: a client that does
/// not read its answer is dropped after a second).
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let write = async {
        stream.write_all(OVERLOADED).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}
