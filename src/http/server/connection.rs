//! One connection's watch: its IO and service bump counters as they work, and a watchdog task
//! looks at them every half header-read timeout to close a connection whose request head
//! trickles or that sits idle (see [`crate::http::server`] for why it is done lazily).

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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http::fast_path::ServiceBody;
use crate::http::server::screen::RefusalSlot;
use crate::http::SidecarService;

/// How long connections may take and idle.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Time a client gets to send a request head, from its first byte.
    pub header_read_timeout: Duration,
    /// Time a connection may sit with nothing in flight and no bytes moving.
    pub idle_timeout: Duration,
    /// Time a response may wait, its writes blocked, for the client to take more of it.
    pub send_timeout: Duration,
    /// Time in-flight requests get to finish at shutdown.
    pub shutdown_grace: Duration,
    /// Most connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
}

/// What a connection's watchdog looks at. Written by the connection as it works (relaxed
/// atomics, no clock reads), read by the watchdog once per tick.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    /// Bytes arrived since the last request head was complete: a head is being read.
    reading: AtomicBool,
    /// Request heads completed (requests handed to the service).
    heads: AtomicU64,
    /// Requests whose response has not finished yet (its body not yet dropped).
    in_flight: AtomicUsize,
    /// Reads and writes that moved bytes.
    moved: AtomicU64,
    /// Whether the last write found the socket full: the client is not taking the response.
    write_blocked: AtomicBool,
}

/// Why a watchdog closed its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// A request head took longer than the header-read timeout.
    HeaderRead,
    /// Nothing in flight and no bytes moving for the idle timeout.
    Idle,
    /// A response's writes blocked, with no bytes moving, for the send timeout.
    Send,
}

impl Expired {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Expired::HeaderRead => "request head not received in time",
            Expired::Idle => "idle",
            Expired::Send => "the client took none of the response in time",
        }
    }
}

/// Completes when the connection should be closed.
pub(crate) async fn watchdog(activity: &Activity, limits: ConnectionLimits) -> Expired {
    let tick = limits.header_read_timeout / 2;
    let ticks =
        |timeout: std::time::Duration| timeout.as_nanos().div_ceil(tick.as_nanos().max(1)) as u32;
    let (idle_ticks, send_ticks) = (ticks(limits.idle_timeout), ticks(limits.send_timeout));
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut heads, mut moved) = (0, 0);
    let (mut pending, mut idle, mut stuck) = (0u32, 0u32, 0u32);
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
        if busy && now_moved == moved && activity.write_blocked.load(Ordering::Relaxed) {
            stuck += 1;
        } else {
            stuck = 0;
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
        // The same for a response the client does not take (its writes find the socket full).
        if stuck > send_ticks {
            return Expired::Send;
        }
        (heads, moved) = (now_heads, now_moved);
    }
}

/// The socket, counting what moves through it for the watchdog.
pub(crate) struct CountingIo<T> {
    /// The socket.
    pub(crate) inner: T,
    /// Where reads and writes are counted.
    pub(crate) activity: Arc<Activity>,
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
        match result {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.activity.moved.fetch_add(1, Ordering::Relaxed);
                self.activity.write_blocked.store(false, Ordering::Relaxed);
            }
            Poll::Pending => self.activity.write_blocked.store(true, Ordering::Relaxed),
            _ => {}
        }
    }
}

/// The service, telling the watchdog when a head is complete and while a response is in flight,
/// and answering the stand-in for a head the screen refused.
#[derive(Clone)]
pub(crate) struct GuardedService {
    /// What answers requests.
    pub(crate) inner: SidecarService,
    /// What the watchdog looks at.
    pub(crate) activity: Arc<Activity>,
    /// The connection's refused head, if any, by its position on the connection.
    pub(crate) refusals: RefusalSlot,
}

/// One request in flight, until dropped with its response body (or its unfinished future).
pub(crate) struct InFlight(Arc<Activity>);

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
pub(crate) struct GuardedFuture<F> {
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
    use std::time::Duration;

    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
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

    /// The watchdog over `activity` as a task of its own, while the test drives the activity.
    fn watch(activity: &Arc<Activity>) -> tokio::task::JoinHandle<(Expired, Duration)> {
        let activity = activity.clone();
        tokio::spawn(async move { fires(&activity).await })
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
        let watched = watch(&activity);
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

    /// A stream whose client stopped reading: its writes find the socket full and nothing moves.
    /// Cut after the send timeout; a slow client that takes a little at a time is not.
    #[tokio::test(start_paused = true)]
    async fn a_response_the_client_does_not_take_is_cut_after_the_send_timeout() {
        let activity = Arc::new(Activity::default());
        activity.heads.store(1, Ordering::Relaxed);
        let _in_flight = InFlight::new(&activity);
        let watched = watch(&activity);
        // Slow but moving: a write goes through every 20 s between blocked ones, for 10 minutes.
        for _ in 0..30 {
            activity.write_blocked.store(true, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(20)).await;
            activity.moved.fetch_add(1, Ordering::Relaxed);
            activity.write_blocked.store(false, Ordering::Relaxed);
            assert!(
                !watched.is_finished(),
                "cut while the client was taking bytes"
            );
        }
        // Then it takes nothing more.
        let stopped = tokio::time::Instant::now();
        activity.write_blocked.store(true, Ordering::Relaxed);
        let (expired, _) = watched.await.unwrap();
        assert_eq!(expired, Expired::Send);
        let after = stopped.elapsed();
        assert!(
            after >= Duration::from_secs(30) && after <= Duration::from_secs(41),
            "{after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn heads_completing_keep_a_busy_connection_open() {
        let activity = Arc::new(Activity::default());
        let watched = watch(&activity);
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
