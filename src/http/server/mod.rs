//! The HTTP server: accepts connections, serves [`SidecarService`] on each, closes connections
//! that trickle their headers or sit idle, and drains on shutdown.
//!
//! [`run`] takes its shutdown signal as a future, so `main` (signals) and tests (a oneshot) share
//! it.
//!
//! Connection deadlines are kept lazily. hyper's own header-read timeout arms a timer for every
//! request (allocate, register in the timer wheel, deregister), which cost about 5% of the
//! throughput of a plain read. Here the connection's IO and service only bump counters, and one
//! watchdog per connection wakes every half header-read timeout to look at them: a request head
//! still incomplete on three looks in a row (between one and one and a half timeouts after its
//! first byte) or a connection idle for the idle timeout is closed. An HTTP/2 connection with no
//! stream open whose peer keeps sending frames (pings) counts as reading a head, so it is closed
//! like a trickled head; the client opens a new one when it next has a request.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::http::{ApiError, SidecarService, MAX_HEADERS};
use connection::{watchdog, Activity, ConnectionLimits, CountingIo, GuardedService};
use screen::{HeadScreen, RefusalSlot};

pub mod connection;
pub mod screen;

/// Serves `service` on `listener` until `shutdown` completes, then stops accepting and gives
/// in-flight requests up to the shutdown grace to finish. `limits` is asked at each accepted
/// connection and at shutdown, so a reload can change them for the connections that follow.
pub async fn run(
    listener: TcpListener,
    service: SidecarService,
    shutdown: impl Future<Output = ()>,
    limits: impl Fn() -> ConnectionLimits,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No timer for HTTP/1: the watchdog below keeps the header-read deadline.
    builder
        .http1()
        .header_read_timeout(None)
        .max_headers(MAX_HEADERS);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let open = Arc::new(AtomicUsize::new(0));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Typically EMFILE: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let limits = limits();
                if open.load(Ordering::Relaxed) >= limits.max_connections {
                    tracing::warn!(%peer, max = limits.max_connections, "too many connections; refusing one");
                    tokio::spawn(refuse(stream));
                    continue;
                }
                let counted = OpenConnection::new(open.clone());
                let activity = Arc::new(Activity::default());
                let refusals = RefusalSlot::default();
                let io = CountingIo { inner: stream, activity: activity.clone() };
                let io = HeadScreen::new(io, refusals.clone());
                let service = GuardedService {
                    inner: service.clone(),
                    activity: activity.clone(),
                    refusals,
                };
                let connection = builder
                    .serve_connection(TokioIo::new(io), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                let mut served = tokio::spawn(async move {
                    let _counted = counted;
                    if let Err(e) = connection.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
                // The watchdog runs as a task of its own: in the connection's task it would be
                // polled (and its timer re-registered) on every request.
                let stop = served.abort_handle();
                tokio::spawn(async move {
                    tokio::select! {
                        expired = watchdog(&activity, limits) => {
                            tracing::debug!(%peer, reason = expired.as_str(), "closing connection");
                            stop.abort();
                        }
                        _ = &mut served => {}
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    let grace = limits().shutdown_grace;
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!(?grace, "grace period over; closing remaining connections"),
    }
    Ok(())
}

/// Counts one open connection until it is dropped (when the connection's task ends, however).
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(open)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The answer to a connection over the cap: a 503 in the sidecar's JSON error form, then close.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let response = ApiError::TooManyConnections.http1_bytes();
    // Answer, then read what the client sent until it closes: closing with its request unread
    // would reset the connection and could lose the answer on the way.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream.write_all(&response).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    })
    .await;
}
