//! Change notifications for apps, so they do not poll: blocking queries (Consul's semantics) and
//! server-sent event streams. Both are fed by the store's change sets, so thousands of
//! subscribers cost etcd nothing more than the one watch, and every event is exactly what readers
//! see (resync deletions included).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::Event;
use bytes::Bytes;
use futures_util::Stream;
use rand::Rng;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;
use tokio::sync::watch;

use crate::mirror::mode::{ModeHandle, Transition};
use crate::mirror::render::{entry_json, put_bytes};
use crate::mirror::store::{Change, ChangeSet, LiveChanges, Snapshot, Store};

/// Longest `wait` a blocking query may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// `wait` when none is given.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// Interval of keep-alive comments on idle streams.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// What a blocking query or stream is about.
#[derive(Debug, Clone)]
pub enum Scope {
    /// One key, exactly.
    Key(Bytes),
    /// Every key starting with this.
    Prefix(Bytes),
}

impl Scope {
    fn matches(&self, key: &[u8]) -> bool {
        match self {
            Scope::Key(k) => key == &k[..],
            Scope::Prefix(p) => key.starts_with(p),
        }
    }

    fn touched_by(&self, set: &ChangeSet) -> bool {
        // A replaced mirror (another cluster's data) may have changed anything.
        set.reset || set.changes.iter().any(|c| self.matches(c.key()))
    }
}

/// `wait` plus up to 1/16 of it at random, so many apps blocked on the same key do not all come
/// back at the same instant.
pub fn jittered(wait: Duration) -> Duration {
    let spread = wait / 16;
    wait + rand::rng().random_range(Duration::ZERO..=spread)
}

/// Waits until something in `scope` changes after revision `index`, or until `wait` (jittered)
/// ends; returns the snapshot to answer from. Answers at once when the scope already changed
/// after `index`, or when the history no longer reaches back to `index` (an early answer is
/// allowed: the client compares the index it gets back).
pub async fn wait_for_change(
    store: &Store,
    scope: &Scope,
    index: i64,
    wait: Duration,
    mut closing: watch::Receiver<bool>,
) -> Arc<Snapshot> {
    let follow = store.follow(index);
    if follow.snapshot.revision > index {
        match &follow.backlog {
            None => return follow.snapshot,
            Some(sets) if sets.iter().any(|s| scope.touched_by(s)) => return follow.snapshot,
            Some(_) => {}
        }
    }
    let mut live = follow.live;
    let deadline = tokio::time::sleep(jittered(wait));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            received = live.recv() => match received {
                Ok(set) if scope.touched_by(&set) => return store.snapshot(),
                Ok(_) => {}
                // Fell behind or the store is gone: answer with what there is now.
                Err(_) => return store.snapshot(),
            },
            () = &mut deadline => return store.snapshot(),
            // Shutting down: answer now rather than hold the drain up.
            _ = closing.wait_for(|c| *c) => return store.snapshot(),
        }
    }
}

/// An event with the bytes it queues (its data, name and framing, roughly).
type Sized = (Event, u64);

fn sized(name: &str, data: String) -> Sized {
    let bytes = (data.len() + name.len() + 24) as u64;
    (Event::default().event(name).data(data), bytes)
}

fn change_event(change: &Change) -> Sized {
    match change {
        Change::Put(entry) => sized("put", entry_json(entry).to_string()),
        Change::Delete { key, revision } => {
            let mut obj = serde_json::Map::new();
            put_bytes(&mut obj, "key", key);
            obj.insert("mod_revision".into(), (*revision).into());
            sized("delete", serde_json::Value::Object(obj).to_string())
        }
    }
}

/// One stream's events ready to send, counted in the bytes all streams queue
/// (`stream_queue_bytes`), which it gives back as they are sent or when the stream goes.
struct Queue {
    /// The events, oldest first.
    events: VecDeque<Sized>,
    /// Their bytes.
    bytes: u64,
    /// The total over all streams.
    total: Arc<AtomicU64>,
}

impl Queue {
    fn push(&mut self, (event, bytes): Sized) {
        self.bytes += bytes;
        self.total.fetch_add(bytes, Ordering::Relaxed);
        self.events.push_back((event, bytes));
    }

    fn extend(&mut self, events: impl IntoIterator<Item = Sized>) {
        for event in events {
            self.push(event);
        }
    }

    fn pop(&mut self) -> Option<Event> {
        let (event, bytes) = self.events.pop_front()?;
        self.bytes -= bytes;
        self.total.fetch_sub(bytes, Ordering::Relaxed);
        Some(event)
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The state of one subscriber's stream.
struct Subscriber {
    /// Where change sets come from.
    store: Arc<Store>,
    /// What the subscriber follows.
    scope: Scope,
    /// Change sets after `last`.
    live: LiveChanges,
    /// Mode transitions.
    modes: Receiver<Transition>,
    /// Events ready to send.
    pending: Queue,
    /// The revision the subscriber has everything up to.
    last: i64,
    /// Becomes true when the server shuts down: the stream ends so the drain can finish.
    closing: watch::Receiver<bool>,
}

impl Subscriber {
    /// Queues one revision's events in scope; only the last carries the `id:`, so a client that
    /// resumes with `Last-Event-ID` never skips the rest of a half-received revision.
    fn queue_set(&mut self, set: &ChangeSet) {
        if set.revision <= self.last {
            return;
        }
        if set.resync && set.changes.iter().any(|c| self.scope.matches(c.key())) {
            // A reload after a compaction: the revisions in between are gone from etcd, and
            // what follows sums them up. Say so, so a client never takes it for every change.
            self.pending.push(sized(
                "resync",
                json!({ "from": self.last, "revision": set.revision, "reason": "etcd compacted the revisions in between; the changes that follow sum them up" })
                    .to_string(),
            ));
        }
        let mut events: Vec<Sized> = set
            .changes
            .iter()
            .filter(|c| self.scope.matches(c.key()))
            .map(change_event)
            .collect();
        self.last = set.revision;
        if let Some((last, bytes)) = events.pop() {
            self.pending.extend(events);
            self.pending
                .push((last.id(set.revision.to_string()), bytes));
        }
    }

    /// Queues `reset` and the whole current state in scope, as of `snapshot`.
    fn queue_reset(&mut self, snapshot: &Snapshot, reason: &str) {
        let (Scope::Prefix(prefix) | Scope::Key(prefix)) = &self.scope;
        let mut events = vec![sized(
            "reset",
            json!({ "revision": snapshot.revision, "reason": reason }).to_string(),
        )];
        events.extend(
            snapshot
                .scan_prefix(prefix)
                .filter(|e| self.scope.matches(&e.key))
                .map(|e| change_event(&Change::Put(e.clone()))),
        );
        let (last, bytes) = events.pop().expect("the reset event is there");
        self.pending.extend(events);
        self.pending
            .push((last.id(snapshot.revision.to_string()), bytes));
        self.last = snapshot.revision;
    }

    /// After falling behind the live changes: the missed ones from the history, with a fresh
    /// subscription taken atomically with them; a reset when the history no longer reaches
    /// back to what this subscriber has.
    fn catch_up(&mut self) {
        let follow = self.store.follow(self.last);
        self.live = follow.live;
        match follow.backlog {
            Some(backlog) if !backlog.iter().any(|s| s.reset) => {
                for set in &backlog {
                    self.queue_set(set);
                }
            }
            _ => self.queue_reset(
                &follow.snapshot,
                "the subscriber fell behind further than the history reaches",
            ),
        }
    }

    /// Starts over from the current state, with a fresh subscription taken atomically with it,
    /// so nothing is missed after.
    fn start_over(&mut self, reason: &str) {
        let follow = self.store.follow(i64::MAX);
        self.live = follow.live;
        self.queue_reset(&follow.snapshot, reason);
    }

    /// The next event, or `None` when the server is shutting down.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop() {
                return Some(event);
            }
            if *self.closing.borrow() {
                return None;
            }
            tokio::select! {
                changed = self.closing.changed() => {
                    if changed.is_err() {
                        // The server that owned the signal is gone: so is the stream.
                        return None;
                    }
                }
                received = self.live.recv() => match received {
                    Ok(set) if set.reset => {
                        self.start_over("the mirror was replaced (another etcd cluster)");
                    }
                    Ok(set) => self.queue_set(&set),
                    Err(RecvError::Lagged(_)) => self.catch_up(),
                    Err(RecvError::Closed) => {
                        self.start_over("the mirror stopped");
                    }
                },
                received = self.modes.recv() => {
                    if let Ok(t) = received {
                        self.pending.push(sized(
                            "mode",
                            json!({ "mode": t.to, "from": t.from, "reason": t.reason }).to_string(),
                        ));
                    }
                }
            }
        }
    }
}

/// The events of a stream over `scope`: from `since` when given (replayed from the history, or
/// `reset` plus the full state when the history does not reach back that far), else `reset` plus
/// the full state; then live events and mode changes.
pub fn event_stream(
    store: Arc<Store>,
    mode: &ModeHandle,
    scope: Scope,
    since: Option<i64>,
    closing: watch::Receiver<bool>,
    queued: Arc<AtomicU64>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let follow = store.follow(since.unwrap_or(i64::MAX));
    let mut subscriber = Subscriber {
        store,
        scope,
        live: follow.live,
        modes: mode.follow(),
        pending: Queue {
            events: VecDeque::new(),
            bytes: 0,
            total: queued,
        },
        last: since.unwrap_or(0),
        closing,
    };
    match (since, follow.backlog) {
        (Some(_), Some(backlog)) => {
            for set in &backlog {
                subscriber.queue_set(set);
            }
            subscriber.last = subscriber.last.max(follow.snapshot.revision);
        }
        (Some(_), None) => subscriber.queue_reset(
            &follow.snapshot,
            "the asked revision is older than the history",
        ),
        (None, _) => subscriber.queue_reset(&follow.snapshot, "initial state"),
    }
    futures_util::stream::unfold(subscriber, |mut s| async move {
        let event = s.next().await?;
        Some((Ok(event), s))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::mode::Mode;
    use crate::mirror::store::Entry;
    use futures_util::StreamExt;

    /// What a stream has queued is counted in the shared total until it is sent or the stream
    /// goes.
    #[tokio::test]
    async fn queued_events_are_counted_until_sent_or_dropped() {
        let store = Arc::new(Store::new());
        let put = |k: &str, r| {
            Entry::new(
                Bytes::from(k.to_string()),
                Bytes::from("x".repeat(1000)),
                r,
                r,
                1,
            )
        };
        store
            .replace(3, vec![put("/p/a", 2), put("/p/b", 3)])
            .unwrap();
        let mode = ModeHandle::default();
        let (_close, closing) = watch::channel(false);
        let total = Arc::new(AtomicU64::new(0));
        let scope = Scope::Prefix(Bytes::from_static(b"/p/"));
        let mut stream = Box::pin(event_stream(
            store.clone(),
            &mode,
            scope,
            None,
            closing,
            total.clone(),
        ));
        // The reset and two values of 1000 bytes wait to be sent.
        let queued = total.load(Ordering::Relaxed);
        assert!((2000..2400).contains(&queued), "{queued}");
        for _ in 0..3 {
            let _sent = stream.next().await.unwrap().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 0, "all sent");
        // Two changes arrive; one is sent, the other still counts until the stream goes.
        store.apply(
            4,
            vec![
                crate::mirror::store::Event::Put(put("/p/a", 4)),
                crate::mirror::store::Event::Put(put("/p/b", 4)),
            ],
        );
        let _sent = stream.next().await.unwrap().unwrap();
        let queued = total.load(Ordering::Relaxed);
        assert!((1000..1200).contains(&queued), "{queued}");
        drop(stream);
        assert_eq!(
            total.load(Ordering::Relaxed),
            0,
            "given back when the stream went"
        );
    }

    /// A stream that falls further behind than the live buffer catches up from the history,
    /// every change in order and no reset; past the history, it is reset.
    #[tokio::test]
    async fn a_lagging_stream_catches_up_from_the_history() {
        let store = Arc::new(Store::with_history_bytes(64 * 1024));
        store.replace(1, vec![]).unwrap();
        let mode = ModeHandle::default();
        let (_close, closing) = watch::channel(false);
        let scope = Scope::Prefix(Bytes::from_static(b"/p/"));
        let stream = event_stream(
            store.clone(),
            &mode,
            scope,
            None,
            closing,
            Default::default(),
        );
        tokio::pin!(stream);
        let first = format!("{:?}", stream.next().await.unwrap().unwrap());
        assert!(first.contains("reset"), "{first}");
        let put = |r: i64| {
            store.apply(
                r,
                vec![crate::mirror::store::Event::Put(Entry::new(
                    Bytes::from(format!("/p/k{r}")),
                    Bytes::from_static(b"v"),
                    r,
                    r,
                    1,
                ))],
            );
        };
        let behind = crate::mirror::store::SUBSCRIBER_BUFFER as i64 * 3;
        for r in 2..2 + behind {
            put(r);
        }
        for r in 2..2 + behind {
            let event = format!("{:?}", stream.next().await.unwrap().unwrap());
            assert!(!event.contains("reset"), "caught up, not reset: {event}");
            assert!(
                event.contains(&format!("/p/k{r}\\\"")),
                "in order: {r} {event}"
            );
        }
        // Behind by more than the history holds: reset, then the whole state.
        for r in 2 + behind..2 + behind + 2000 {
            put(r);
        }
        let event = format!("{:?}", stream.next().await.unwrap().unwrap());
        assert!(
            event.contains("reset") && event.contains("further than the history"),
            "{event}"
        );
    }

    #[tokio::test]
    async fn a_stream_carries_mode_changes() {
        let store = Arc::new(Store::new());
        store
            .replace(
                3,
                vec![Entry::new(
                    Bytes::from_static(b"/p/a"),
                    Bytes::from_static(b"1"),
                    3,
                    3,
                    1,
                )],
            )
            .unwrap();
        let mode = ModeHandle::default();
        let (close, closing) = watch::channel(false);
        let scope = Scope::Prefix(Bytes::from_static(b"/p/"));
        let stream = event_stream(store, &mode, scope, None, closing, Default::default());
        tokio::pin!(stream);
        let _reset = stream.next().await.unwrap();
        let _put = stream.next().await.unwrap();
        mode.publish(&Transition {
            from: Mode::Full,
            to: Mode::CacheOnly,
            reason: "test".into(),
            at_unix_ms: 1,
        });
        let event = tokio::time::timeout(Duration::from_secs(1), stream.next())
            .await
            .expect("the mode event arrives")
            .unwrap()
            .unwrap();
        assert!(format!("{event:?}").contains("cache-only"), "{event:?}");
        close.send_replace(true);
        assert!(stream.next().await.is_none(), "the stream ends at shutdown");
    }
}
