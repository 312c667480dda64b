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
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;

use crate::screen::{HeadScreen, RefusalSlot};
use crate::service::{ServiceBody, SidecarService};

/// Most request headers accepted on one request.
pub const MAX_HEADERS: usize = 100;

/// How long connections may take and idle.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Time a client gets to send a request head, from its first byte.
    pub header_read_timeout: Duration,
    /// Time a connection may sit with nothing in flight and no bytes moving.
    pub idle_timeout: Duration,
    /// Time in-flight requests get to finish at shutdown.
    pub shutdown_grace: Duration,
    /// Most connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
}

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
    const BODY: &str = r#"{"error":"too_many_connections","message":"the sidecar has as many connections open as it allows; retry later"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    // Answer, then read what the client sent until it closes: closing with its request unread
    // would reset the connection and could lose the answer on the way.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    })
    .await;
}

/// What a connection's watchdog looks at. Written by the connection as it works (relaxed
/// atomics, no clock reads), read by the watchdog once per tick.
#[derive(Debug, Default)]
struct Activity {
    /// Bytes arrived since the last request head was complete: a head is being read.
    reading: AtomicBool,
    /// Request heads completed (requests handed to the service).
    heads: AtomicU64,
    /// Requests whose response has not finished yet (its body not yet dropped).
    in_flight: AtomicUsize,
    /// Reads and writes that moved bytes.
    moved: AtomicU64,
}

/// Why a watchdog closed its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// A request head took longer than the header-read timeout.
    HeaderRead,
    /// Nothing in flight and no bytes moving for the idle timeout.
    Idle,
}

impl Expired {
    fn as_str(self) -> &'static str {
        match self {
            Expired::HeaderRead => "request head not received in time",
            Expired::Idle => "idle",
        }
    }
}

/// Completes when the connection should be closed.
async fn watchdog(activity: &Activity, limits: ConnectionLimits) -> Expired {
    let tick = limits.header_read_timeout / 2;
    let idle_ticks = limits
        .idle_timeout
        .as_nanos()
        .div_ceil(tick.as_nanos().max(1)) as u32;
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut heads, mut moved) = (0, 0);
    let (mut pending, mut idle) = (0u32, 0u32);
    loop {
        interval.tick().await;
        let busy = activity.in_flight.load(Ordering::Relaxed) > 0;
        let now_heads = activity.heads.load(Ordering::Relaxed);
        let now_moved = activity.moved.load(Ordering::Relaxed);
        // The same head has been arriving since before the previous look.
        if !busy && activity.reading.load(Ordering::Relaxed) && now_heads == heads {
            pending += 1;
        } else {
            pending = 0;
        }
        if !busy && now_moved == moved {
            idle += 1;
        } else {
            idle = 0;
        }
        // Three looks half a timeout apart: the head's first byte is at least a timeout old.
        if pending >= 3 {
            return Expired::HeaderRead;
        }
        // One look more than the timeout holds: the first idle look may come right after the
        // last activity.
        if idle > idle_ticks {
            return Expired::Idle;
        }
        (heads, moved) = (now_heads, now_moved);
    }
}

/// The socket, counting what moves through it for the watchdog.
struct CountingIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.moved.fetch_add(1, Ordering::Relaxed);
            self.activity.reading.store(true, Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.count_write(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.count_write(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T> CountingIo<T> {
    fn count_write(&self, result: &Poll<io::Result<usize>>) {
        if matches!(result, Poll::Ready(Ok(n)) if *n > 0) {
            self.activity.moved.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The service, telling the watchdog when a head is complete and while a response is in flight,
/// and answering the stand-in for a head the screen refused.
#[derive(Clone)]
struct GuardedService {
    /// What answers requests.
    inner: SidecarService,
    /// What the watchdog looks at.
    activity: Arc<Activity>,
    /// The connection's refused head, if any, by its position on the connection.
    refusals: RefusalSlot,
}

/// One request in flight, until dropped with its response body (or its unfinished future).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl hyper::service::Service<Request<Incoming>> for GuardedService {
    type Response = Response<GuardedBody>;
    type Error = std::convert::Infallible;
    type Future =
        GuardedFuture<<SidecarService as hyper::service::Service<Request<Incoming>>>::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let position = self.activity.heads.fetch_add(1, Ordering::Relaxed) + 1;
        self.activity.reading.store(false, Ordering::Relaxed);
        let inner = match self.refusals.get() {
            // HTTP/1 hands requests over in order, so the stand-in is the request at the
            // position the screen counted.
            Some(&(refused, refusal)) if refused == position => self.inner.refused(refusal),
            _ => self.inner.call(request),
        };
        GuardedFuture {
            inner,
            in_flight: Some(InFlight::new(&self.activity)),
        }
    }
}

/// The service's future, holding the in-flight mark until the body takes it over.
struct GuardedFuture<F> {
    inner: F,
    in_flight: Option<InFlight>,
}

impl<F> Future for GuardedFuture<F>
where
    F: Future<Output = Result<Response<ServiceBody>, std::convert::Infallible>> + Unpin,
{
    type Output = Result<Response<GuardedBody>, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match Pin::new(&mut self.inner).poll(cx) {
            Poll::Ready(Ok(response)) => response,
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => return Poll::Pending,
        };
        let in_flight = self.in_flight.take();
        Poll::Ready(Ok(response.map(|inner| GuardedBody {
            inner,
            _in_flight: in_flight,
        })))
    }
}

/// A response body that keeps its request in flight until hyper drops it.
pub struct GuardedBody {
    inner: ServiceBody,
    _in_flight: Option<InFlight>,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = <ServiceBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(1),
            max_connections: 16,
        }
    }

    /// Runs the watchdog on paused time until it fires, returning why and when.
    async fn fires(activity: &Activity) -> (Expired, Duration) {
        let start = tokio::time::Instant::now();
        let expired = watchdog(activity, limits()).await;
        (expired, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_head_is_cut_between_one_and_one_and_a_half_timeouts() {
        let activity = Activity::default();
        // Bytes keep arriving, the head never completes.
        activity.reading.store(true, Ordering::Relaxed);
        let (expired, after) = fires(&activity).await;
        assert_eq!(expired, Expired::HeaderRead);
        assert!(
            after >= Duration::from_secs(10) && after <= Duration::from_secs(15),
            "{after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_cut_and_idle_counts_from_its_end() {
        let activity = Arc::new(Activity::default());
        // A blocking query: head complete, response pending for five minutes.
        activity.heads.store(1, Ordering::Relaxed);
        let in_flight = InFlight::new(&activity);
        let watched = {
            let activity = activity.clone();
            tokio::spawn(async move { fires(&activity).await })
        };
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert!(!watched.is_finished(), "cut while a request was in flight");
        drop(in_flight);
        let (expired, after) = watched.await.unwrap();
        assert_eq!(expired, Expired::Idle);
        assert!(
            after >= Duration::from_secs(360) && after <= Duration::from_secs(366),
            "{after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn heads_completing_keep_a_busy_connection_open() {
        let activity = Arc::new(Activity::default());
        let watched = {
            let activity = activity.clone();
            tokio::spawn(async move { fires(&activity).await })
        };
        // A request every second for two minutes: each starts reading, completes, moves bytes.
        for _ in 0..120 {
            activity.reading.store(true, Ordering::Relaxed);
            activity.moved.fetch_add(1, Ordering::Relaxed);
            activity.heads.fetch_add(1, Ordering::Relaxed);
            activity.reading.store(false, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(!watched.is_finished());
        }
        let (expired, _) = watched.await.unwrap();
        assert_eq!(expired, Expired::Idle);
    }
}
