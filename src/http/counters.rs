//! What the HTTP side counts as it serves: requests by route and status with their latency, and
//! the open change streams and blocking queries (with their caps).
//!
//! Request counts are recorded on every request, so they are kept per thread
//! ([`RequestMetrics`]): each thread adds to counters only it writes, and a scrape sums them. One
//! shared counter would be one cache line every core fights over on the read path the benchmark
//! measures.

use std::cell::RefCell;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::http::error::ApiError;

/// The statuses counted under their own label; anything else is `other`.
pub(crate) const STATUSES: [u16; 22] = [
    200, 201, 204, 304, 400, 401, 403, 404, 405, 408, 409, 412, 413, 414, 415, 422, 429, 431, 500,
    502, 503, 504,
];
/// Upper bounds of the latency buckets, in seconds: from a plain read (microseconds) to a
/// blocking query (up to minutes, in the last bucket).
pub(crate) const BUCKETS: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Cells per route in a shard: a count per status (and `other`), a count per bucket (and +Inf),
/// and the latency sum in nanoseconds.
pub(crate) const STRIDE: usize = STATUSES.len() + 1 + BUCKETS.len() + 1 + 1;

/// Gives each [`RequestMetrics`] its own shards in the thread-local table.
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard of each `RequestMetrics` it has recorded into (one, outside tests).
    static SHARDS: RefCell<Vec<(usize, Arc<Shard>)>> = const { RefCell::new(Vec::new()) };
}

/// One thread's counters: `STRIDE` cells per route. Only the owning thread writes them, so an
/// increment is a plain load and store; a scrape reads them with relaxed loads.
struct Shard {
    cells: Box<[AtomicU64]>,
}

impl Shard {
    fn bump(&self, cell: usize, by: u64) {
        let c = &self.cells[cell];
        c.store(c.load(Relaxed).wrapping_add(by), Relaxed);
    }
}

/// Requests by route and status, and latency by route, kept per thread.
pub struct RequestMetrics {
    /// Which thread-local shards are ours.
    id: usize,
    /// Route labels: the router's paths, then `unmatched`.
    pub(crate) routes: Vec<&'static str>,
    /// Every thread's shard, for the scrape; a thread that ends leaves its counts here.
    shards: Mutex<Vec<Arc<Shard>>>,
}

/// Index of a route in [`RequestMetrics`] (a position in [`crate::http::route_paths`], or unmatched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteIndex(pub usize);

impl RequestMetrics {
    /// Counters for `routes` (the router's paths, in order) plus one for unmatched requests.
    pub fn new(routes: Vec<&'static str>) -> Self {
        let mut routes = routes;
        routes.push("unmatched");
        RequestMetrics {
            id: NEXT_ID.fetch_add(1, Relaxed),
            routes,
            shards: Mutex::new(Vec::new()),
        }
    }

    /// The index of requests no route matched.
    pub fn unmatched(&self) -> RouteIndex {
        RouteIndex(self.routes.len() - 1)
    }

    /// The index of route `path`, if it is one.
    pub fn route(&self, path: &str) -> Option<RouteIndex> {
        self.routes.iter().position(|r| *r == path).map(RouteIndex)
    }

    /// The route that serves `path` (as sent, still percent-encoded), matched the way the router
    /// matches: an exact path first, else the longest `{*rest}` route whose prefix `path` extends.
    /// Matching here rather than tagging responses inside the router keeps a layer (and a boxed
    /// future) off every routed request; a test holds the two to the same answers.
    pub fn route_of(&self, path: &str) -> RouteIndex {
        if let Some(i) = self.routes.iter().position(|r| *r == path) {
            return RouteIndex(i);
        }
        self.routes
            .iter()
            .enumerate()
            .filter_map(|(i, route)| {
                let prefix = route.split_once("{*")?.0;
                (path.len() > prefix.len() && path.starts_with(prefix)).then_some((prefix.len(), i))
            })
            .max()
            .map_or(self.unmatched(), |(_, i)| RouteIndex(i))
    }

    /// Counts one request on `route` answered with `status` after `latency`.
    pub fn record(&self, route: RouteIndex, status: u16, latency: Duration) {
        let route = route.0.min(self.routes.len() - 1);
        let base = route * STRIDE;
        let status_cell = STATUSES
            .iter()
            .position(|&s| s == status)
            .unwrap_or(STATUSES.len());
        let seconds = latency.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(BUCKETS.len());
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.with_shard(|shard| {
            shard.bump(base + status_cell, 1);
            shard.bump(base + STATUSES.len() + 1 + bucket, 1);
            shard.bump(base + STRIDE - 1, nanos);
        });
    }

    fn with_shard(&self, f: impl FnOnce(&Shard)) {
        SHARDS.with(|shards| {
            let mut shards = shards.borrow_mut();
            if let Some((_, shard)) = shards.iter().find(|(id, _)| *id == self.id) {
                f(shard);
                return;
            }
            let cells = (0..self.routes.len() * STRIDE)
                .map(|_| AtomicU64::new(0))
                .collect();
            let shard = Arc::new(Shard { cells });
            self.shards
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(shard.clone());
            f(&shard);
            shards.push((self.id, shard));
        });
    }

    /// Every cell summed over the threads.
    pub(crate) fn totals(&self) -> Vec<u64> {
        let mut totals = vec![0u64; self.routes.len() * STRIDE];
        for shard in self.shards.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            for (t, c) in totals.iter_mut().zip(shard.cells.iter()) {
                *t = t.wrapping_add(c.load(Relaxed));
            }
        }
        totals
    }

    /// Requests counted on `route` with `status`, summed over threads.
    pub fn count(&self, route: RouteIndex, status: u16) -> u64 {
        count_in(&self.totals(), route, status)
    }
}

/// The count of `route` with `status` in `totals` (from [`RequestMetrics::totals`]).
pub(crate) fn count_in(totals: &[u64], route: RouteIndex, status: u16) -> u64 {
    let cell = STATUSES
        .iter()
        .position(|&s| s == status)
        .unwrap_or(STATUSES.len());
    totals[route.0 * STRIDE + cell]
}

/// Open change streams and blocking queries, and how many of each may be open.
pub struct Subscribers {
    /// `GET /v1/watch` streams open now.
    streams: AtomicI64,
    /// Blocking queries (`?index=`) waiting now.
    blocking: AtomicI64,
    /// Most streams at once.
    max_streams: i64,
    /// Most blocking queries at once.
    max_blocking: i64,
    /// Bytes of events queued in change streams, not yet handed to their connections: shared
    /// with each stream's queue ([`crate::http::notify`]), which adds and takes its own.
    stream_queue: Arc<AtomicU64>,
}

/// Which kind of subscriber.
#[derive(Debug, Clone, Copy)]
pub enum SubscriberKind {
    /// A server-sent event stream.
    Stream,
    /// A blocking query.
    Blocking,
}

/// Counts one subscriber while it lives.
pub struct SubscriberGuard {
    /// The counter to give back to.
    subscribers: Arc<Subscribers>,
    /// Which of its two counts.
    kind: SubscriberKind,
}

impl Subscribers {
    /// Counters allowing at most `max_streams` streams and `max_blocking` blocking queries.
    pub fn new(max_streams: usize, max_blocking: usize) -> Self {
        Subscribers {
            streams: AtomicI64::new(0),
            blocking: AtomicI64::new(0),
            max_streams: i64::try_from(max_streams).unwrap_or(i64::MAX),
            max_blocking: i64::try_from(max_blocking).unwrap_or(i64::MAX),
            stream_queue: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The count of bytes queued in change streams, for a stream to keep current.
    pub fn stream_queue(&self) -> Arc<AtomicU64> {
        self.stream_queue.clone()
    }

    /// Bytes of events queued in change streams now.
    pub fn stream_queue_bytes(&self) -> u64 {
        self.stream_queue.load(Relaxed)
    }

    fn counter(&self, kind: SubscriberKind) -> &AtomicI64 {
        match kind {
            SubscriberKind::Stream => &self.streams,
            SubscriberKind::Blocking => &self.blocking,
        }
    }

    /// Counts a subscriber of `kind` until the guard drops, or refuses it when as many as
    /// allowed are open.
    pub fn enter(self: &Arc<Self>, kind: SubscriberKind) -> Result<SubscriberGuard, ApiError> {
        let (max, what) = match kind {
            SubscriberKind::Stream => (self.max_streams, "change streams"),
            SubscriberKind::Blocking => (self.max_blocking, "blocking queries"),
        };
        if self.counter(kind).fetch_add(1, Relaxed) >= max {
            self.counter(kind).fetch_sub(1, Relaxed);
            return Err(ApiError::TooManySubscribers(what));
        }
        Ok(SubscriberGuard {
            subscribers: self.clone(),
            kind,
        })
    }

    /// How many of `kind` are open now.
    pub fn open(&self, kind: SubscriberKind) -> i64 {
        self.counter(kind).load(Relaxed)
    }
}

/// A message queued for a stream's connection, counted in the streams' queued bytes until it is
/// handed to the connection or dropped with the queue.
pub struct QueuedMessage {
    /// The message (empty once taken).
    bytes: Bytes,
    /// How many bytes it counts for.
    counted: u64,
    /// The total it counts in.
    total: Arc<AtomicU64>,
}

impl QueuedMessage {
    pub fn new(bytes: Bytes, total: &Arc<AtomicU64>) -> Self {
        let counted = bytes.len() as u64;
        total.fetch_add(counted, Relaxed);
        QueuedMessage {
            bytes,
            counted,
            total: total.clone(),
        }
    }

    /// The message, for the connection: it no longer counts as queued.
    pub fn take(mut self) -> Bytes {
        std::mem::take(&mut self.bytes)
    }
}

impl Drop for QueuedMessage {
    fn drop(&mut self) {
        self.total.fetch_sub(self.counted, Relaxed);
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.subscribers.counter(self.kind).fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_messages_count_until_taken_or_dropped() {
        let total = Arc::new(AtomicU64::new(0));
        let a = QueuedMessage::new(Bytes::from_static(b"12345"), &total);
        let b = QueuedMessage::new(Bytes::from_static(b"123"), &total);
        assert_eq!(total.load(Relaxed), 8);
        assert_eq!(&a.take()[..], b"12345");
        assert_eq!(total.load(Relaxed), 3);
        drop(b);
        assert_eq!(total.load(Relaxed), 0);
    }

    #[test]
    fn counts_from_every_thread_are_summed() {
        let metrics = Arc::new(RequestMetrics::new(vec!["/a", "/b"]));
        let a = metrics.route("/a").unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = metrics.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        m.record(a, 200, Duration::from_micros(3));
                    }
                    m.record(a, 404, Duration::from_millis(2));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(metrics.count(a, 200), 4000);
        assert_eq!(metrics.count(a, 404), 4);
        assert_eq!(metrics.count(metrics.route("/b").unwrap(), 200), 0);
        // An unusual status is counted as `other`, not lost.
        metrics.record(metrics.unmatched(), 418, Duration::ZERO);
        assert_eq!(metrics.count(metrics.unmatched(), 418), 1);
        assert_eq!(metrics.count(metrics.unmatched(), 999), 1);
        // A second instance on the same threads keeps its own counts.
        let other = RequestMetrics::new(vec!["/a"]);
        other.record(RouteIndex(0), 200, Duration::ZERO);
        assert_eq!(other.count(RouteIndex(0), 200), 1);
        assert_eq!(metrics.count(a, 200), 4000);
    }
}
