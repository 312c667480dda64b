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

use crate::mirror::history::{ChangeSet, Follow, LiveChanges};
use crate::mirror::render::{DeletionJson, EntryJson};
use crate::mirror::snapshot::{Change, Entry, Snapshot};
use crate::mirror::store::Store;
use crate::mode::handle::ModeHandle;
use crate::mode::machine::Transition;

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
    let Follow {
        snapshot,
        backlog,
        mut live,
    } = store.follow(index);
    if snapshot.revision > index {
        match &backlog {
            None => return snapshot,
            Some(sets) if sets.iter().any(|s| scope.touched_by(s)) => return snapshot,
            Some(_) => {}
        }
    }
    // A wait may last minutes: it holds neither the sets nor the snapshot (which would keep
    // the values replaced meanwhile alive); it answers from the snapshot current then.
    drop((snapshot, backlog));
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
        Change::Put(entry) => sized(
            "put",
            serde_json::to_string(&EntryJson(entry)).expect("entries serialise"),
        ),
        Change::Delete { key, revision } => sized(
            "delete",
            serde_json::to_string(&DeletionJson {
                key,
                revision: *revision,
            })
            .expect("deletions serialise"),
        ),
    }
}

/// One stream's events made and not yet sent, counted in the bytes all streams queue
/// (`stream_queue_bytes`), which it gives back as they are sent or when the stream goes. Events
/// are made one at a time as the connection takes them ([`Sending`]), so this holds one or two.
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

/// What a stream is in the middle of sending, turned into events one at a time as the
/// connection takes them: a stream holds a reference to a change set or snapshot the store
/// holds anyway, not a copy of its events, however large the set or the state.
enum Sending {
    /// A change set's changes in scope, from index `next` (the next one in scope) on.
    Set {
        /// The set.
        set: Arc<ChangeSet>,
        /// Where in `set.changes` the next event in scope is.
        next: usize,
    },
    /// The whole state in scope as of `snapshot`, after the `reset` event.
    State {
        /// The state sent.
        snapshot: Arc<Snapshot>,
        /// The next entry to send.
        next: Arc<Entry>,
    },
}

/// The state of one subscriber's stream.
struct Subscriber {
    /// Where change sets come from.
    store: Arc<Store>,
    /// What the subscriber follows.
    scope: Scope,
    /// Change sets after `last`, read from the history as the stream takes them.
    live: LiveChanges,
    /// Mode transitions.
    modes: Receiver<Transition>,
    /// What is being sent.
    sending: Option<Sending>,
    /// Events made, not yet sent.
    pending: Queue,
    /// The revision the subscriber will have everything up to once `sending` is sent.
    last: i64,
    /// Becomes true when the server shuts down: the stream ends so the drain can finish.
    closing: watch::Receiver<bool>,
}

impl Subscriber {
    /// Starts sending one revision's events in scope; only the last carries the `id:`, so a
    /// client that resumes with `Last-Event-ID` never skips the rest of a half-received revision.
    fn send_set(&mut self, set: Arc<ChangeSet>) {
        if set.revision <= self.last {
            return;
        }
        let next = self.next_change(&set, 0);
        if set.resync && next.is_some() {
            // A reload after a compaction: the revisions in between are gone from etcd, and
            // what follows sums them up. Say so, so a client never takes it for every change.
            self.pending.push(sized(
                "resync",
                json!({ "from": self.last, "revision": set.revision, "reason": "etcd compacted the revisions in between; the changes that follow sum them up" })
                    .to_string(),
            ));
        }
        self.last = set.revision;
        self.sending = next.map(|next| Sending::Set { set, next });
    }

    /// The index of the first change in scope at `from` or after.
    fn next_change(&self, set: &ChangeSet, from: usize) -> Option<usize> {
        (from..set.changes.len()).find(|&i| self.scope.matches(set.changes[i].key()))
    }

    /// Starts sending `reset` and the whole current state in scope, as of `snapshot`.
    fn send_reset(&mut self, snapshot: Arc<Snapshot>, reason: &str) {
        let (Scope::Prefix(prefix) | Scope::Key(prefix)) = &self.scope;
        let next = self.next_entry(&snapshot, prefix.clone(), false);
        let reset = sized(
            "reset",
            json!({ "revision": snapshot.revision, "reason": reason }).to_string(),
        );
        // Nothing in scope: the reset is the whole revision.
        self.push_of_revision(reset, snapshot.revision, next.is_none());
        self.last = snapshot.revision;
        self.sending = next.map(|next| Sending::State { snapshot, next });
    }

    /// Queues an event of `revision`; the last of it carries the `id:`.
    fn push_of_revision(&mut self, (event, bytes): Sized, revision: i64, last: bool) {
        let event = if last {
            event.id(revision.to_string())
        } else {
            event
        };
        self.pending.push((event, bytes));
    }

    /// The first entry in scope from `key` on (after it, when `after`).
    fn next_entry(&self, snapshot: &Snapshot, key: Bytes, after: bool) -> Option<Arc<Entry>> {
        let (Scope::Prefix(prefix) | Scope::Key(prefix)) = &self.scope;
        snapshot
            .from_key(&key)
            .skip_while(|e| after && e.key == key)
            .take_while(|e| e.key.starts_with(prefix))
            .find(|e| self.scope.matches(&e.key))
            .cloned()
    }

    /// Makes the next event of what is being sent; `false` when there is nothing being sent.
    fn make_next(&mut self) -> bool {
        let Some(sending) = self.sending.take() else {
            return false;
        };
        let (event, revision, rest) = match sending {
            Sending::Set { set, next } => {
                let revision = set.revision;
                let event = change_event(&set.changes[next]);
                let rest = self
                    .next_change(&set, next + 1)
                    .map(|next| Sending::Set { set, next });
                (event, revision, rest)
            }
            Sending::State { snapshot, next } => {
                let revision = snapshot.revision;
                let rest = self
                    .next_entry(&snapshot, next.key.clone(), true)
                    .map(|next| Sending::State { snapshot, next });
                (change_event(&Change::Put(next)), revision, rest)
            }
        };
        self.push_of_revision(event, revision, rest.is_none());
        self.sending = rest;
        true
    }

    /// Starts over from the current state, with a fresh subscription taken atomically with it,
    /// so nothing is missed after.
    fn start_over(&mut self, reason: &str) {
        let follow = self.store.follow(i64::MAX);
        self.live = follow.live;
        self.send_reset(follow.snapshot, reason);
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
            if self.make_next() {
                continue;
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
                    Ok(set) => self.send_set(set),
                    Err(RecvError::Lagged(_)) => self.start_over(
                        "the subscriber fell behind further than the history reaches",
                    ),
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
/// the full state; then live events and mode changes. Each event is made when the connection
/// takes the one before, so what a stream holds does not grow with the state or a backlog.
pub fn event_stream(
    store: Arc<Store>,
    mode: &ModeHandle,
    scope: Scope,
    since: Option<i64>,
    closing: watch::Receiver<bool>,
    queued: Arc<AtomicU64>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let follow = store.follow(since.unwrap_or(i64::MAX));
    let replays = since.is_some() && follow.backlog.is_some();
    let mut subscriber = Subscriber {
        store,
        scope,
        live: follow.live,
        modes: mode.follow(),
        sending: None,
        pending: Queue {
            events: VecDeque::new(),
            bytes: 0,
            total: queued,
        },
        last: since.unwrap_or(0),
        closing,
    };
    match since {
        // The sets after `since` are read from the history as the stream takes them.
        Some(since) if replays => subscriber.live = subscriber.live.replaying_from(since),
        Some(_) => subscriber.send_reset(
            follow.snapshot,
            "the asked revision is older than the history",
        ),
        None => subscriber.send_reset(follow.snapshot, "initial state"),
    }
    futures_util::stream::unfold(subscriber, |mut s| async move {
        let event = s.next().await?;
        Some((Ok(event), s))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::snapshot::Entry;
    use crate::mode::Mode;
    use futures_util::StreamExt;

    fn kib_entry(key: &str, revision: i64) -> Entry {
        Entry::new(
            Bytes::from(key.to_string()),
            Bytes::from("x".repeat(1024)),
            revision,
            revision,
            1,
        )
    }

    /// A stream's reset over a large state, and a large change set, are made into events one at
    /// a time as the stream is read: what it queues never grows past one value, whatever the
    /// state's size; the events are all there, in key order, the revision's `id:` on the last.
    /// What it queued counts until sent or until the stream goes.
    #[tokio::test]
    async fn a_stream_makes_its_events_as_they_are_taken() {
        let store = Arc::new(Store::new());
        let keys = 2000;
        store
            .replace(
                7,
                (0..keys)
                    .map(|i| kib_entry(&format!("/p/{i:05}"), 5))
                    .collect(),
            )
            .unwrap();
        let mode = ModeHandle::default();
        let (_close, closing) = watch::channel(false);
        let total = Arc::new(AtomicU64::new(0));
        let stream = event_stream(
            store.clone(),
            &mode,
            Scope::Prefix(Bytes::from_static(b"/p/")),
            None,
            closing.clone(),
            total.clone(),
        );
        let queued = total.load(Ordering::Relaxed);
        assert!((1..200).contains(&queued), "only the reset waits: {queued}");
        drop(stream);
        assert_eq!(
            total.load(Ordering::Relaxed),
            0,
            "given back when the stream went"
        );

        let mut stream = Box::pin(event_stream(
            store.clone(),
            &mode,
            Scope::Prefix(Bytes::from_static(b"/p/")),
            None,
            closing,
            total.clone(),
        ));
        let mut most = 0;
        let mut events = Vec::new();
        for _ in 0..=keys {
            let event = format!("{:?}", stream.next().await.unwrap().unwrap());
            most = most.max(total.load(Ordering::Relaxed));
            events.push(event);
        }
        assert!(most < 1200, "at most one value queued: {most}");
        assert!(
            events[0].contains("reset") && !events[0].contains("id:"),
            "{}",
            events[0]
        );
        for (i, event) in events[1..].iter().enumerate() {
            assert!(
                event.contains(&format!("/p/{i:05}")),
                "in key order: {event}"
            );
            assert_eq!(
                event.contains("id: 7"),
                i + 1 == keys,
                "the id on the last: {event}"
            );
        }

        // One revision rewriting every key: the same, one event at a time.
        store.apply(
            8,
            (0..keys)
                .map(|i| crate::mirror::snapshot::Event::Put(kib_entry(&format!("/p/{i:05}"), 8)))
                .collect(),
        );
        for i in 0..keys {
            let event = format!("{:?}", stream.next().await.unwrap().unwrap());
            most = most.max(total.load(Ordering::Relaxed));
            assert!(event.contains(&format!("/p/{i:05}")), "{event}");
            assert_eq!(event.contains("id: 8"), i + 1 == keys, "{event}");
        }
        assert!(most < 1200, "at most one value queued: {most}");
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
                vec![crate::mirror::snapshot::Event::Put(Entry::new(
                    Bytes::from(format!("/p/k{r}")),
                    Bytes::from_static(b"v"),
                    r,
                    r,
                    1,
                ))],
            );
        };
        let behind = crate::mirror::history::SUBSCRIBER_BUFFER as i64 * 3;
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
        // A liveness bound: the event is due at the next poll, which a busy machine may delay.
        let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the mode event arrives")
            .unwrap()
            .unwrap();
        assert!(format!("{event:?}").contains("cache-only"), "{event:?}");
        close.send_replace(true);
        assert!(stream.next().await.is_none(), "the stream ends at shutdown");
    }
}
