//! The in-memory mirror: one immutable [`Snapshot`] per applied etcd revision, swapped atomically.
//!
//! Readers load the current snapshot with one atomic pointer read and keep it for the whole request,
//! so a request never sees half of a transaction and a prefix read is exactly one revision. Each
//! publication's changes go to the [`History`], which subscribers follow.
//!
//! Only the sync task writes; it is the single writer, which the `writer` mutex makes explicit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use imbl::OrdSet;
use tokio::sync::broadcast;
use tokio::sync::watch;

use crate::mirror::history::{
    Announcement, ChangeSet, Follow, History, LiveChanges, DEFAULT_HISTORY_BYTES,
    HISTORY_REVISIONS, SUBSCRIBER_BUFFER,
};
use crate::mirror::snapshot::{Change, Entry, Event, Keyed, Snapshot, Source};

/// Errors the store refuses with; each means the sync task fed it something out of order.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// A full load at a revision older than the one already served: serving it would move time
    /// backwards.
    #[error("refusing to load revision {offered}: the mirror already serves revision {current}")]
    RevisionWentBack {
        /// Revision offered.
        offered: i64,
        /// Revision served.
        current: i64,
    },
}

/// Where a published snapshot came from, which decides what its followers are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The watch: its changes follow the previous revision.
    Watch,
    /// A full reload of the same cluster's data (a compaction resync): its difference follows too.
    Resync,
    /// A first load (from etcd or the disk) or another cluster's data: nothing before it replays.
    Restart,
}

/// The shared store: the current snapshot plus notifications of each new revision.
pub struct Store {
    /// The snapshot readers see.
    current: ArcSwap<Snapshot>,
    /// Serialises writers; there is one (the sync task), and this keeps it that way. Also held
    /// by subscribers while they join, so a subscription has no gap.
    writer: Arc<Mutex<History>>,
    /// The revision of each published snapshot, for waiters (readiness, read-your-writes).
    revision_tx: watch::Sender<i64>,
    /// Each published revision, for streams and blocking queries, which read the sets from the
    /// history ([`LiveChanges`]): nothing but the history holds published values.
    changes_tx: broadcast::Sender<Announcement>,
    /// Watch events applied (puts and deletes that changed the mirror), for metrics.
    events_applied: AtomicU64,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty, not-yet-loaded store.
    pub fn new() -> Self {
        Store::with_history_bytes(DEFAULT_HISTORY_BYTES)
    }

    /// An empty store whose history keeps at most `max_bytes` of changes.
    pub fn with_history_bytes(max_bytes: u64) -> Self {
        let (revision_tx, _) = watch::channel(0);
        let (changes_tx, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        Store {
            current: ArcSwap::from_pointee(Snapshot::empty()),
            writer: Arc::new(Mutex::new(History {
                sets: VecDeque::new(),
                floor: 0,
                bytes: 0,
                max_bytes,
            })),
            revision_tx,
            changes_tx,
            events_applied: AtomicU64::new(0),
        }
    }

    /// Watch events applied since start.
    pub fn events_applied(&self) -> u64 {
        self.events_applied.load(Relaxed)
    }

    /// The current snapshot. Hold it for the whole of one request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The current snapshot for a short synchronous read, without touching its reference count:
    /// every request would otherwise increment and decrement the one count all cores share.
    /// Do not hold the guard across an await or for long (arc-swap has few guard slots per
    /// thread; beyond them it falls back to counting).
    pub fn peek(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The revision currently served.
    pub fn revision(&self) -> i64 {
        self.current.load().revision
    }

    /// Whether a complete load has been published.
    pub fn is_loaded(&self) -> bool {
        self.current.load().loaded
    }

    /// Subscribes to announcements of the change sets published from now on (see
    /// [`Store::follow`] for the sets themselves).
    pub fn subscribe_changes(&self) -> broadcast::Receiver<Announcement> {
        self.changes_tx.subscribe()
    }

    /// Subscribes to published revisions.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.revision_tx.subscribe()
    }

    /// Replaces the whole mirror with a complete load taken at `revision` and returns the
    /// difference from what was served before (keys gone become deletions). The old snapshot keeps
    /// serving until the new one is swapped in, so readers never see an empty or partial mirror.
    pub fn replace(&self, revision: i64, entries: Vec<Entry>) -> Result<Vec<Change>, StoreError> {
        self.replace_from(self.cluster_id(), revision, entries)
    }

    /// The cluster the mirror's data came from (0: unknown).
    pub fn cluster_id(&self) -> u64 {
        self.current.load().cluster_id
    }

    /// [`Store::replace`] with data from cluster `cluster_id`. Data from another cluster than the
    /// one served replaces it wholesale even at a lower revision: revisions of two clusters are
    /// unrelated.
    pub fn replace_from(
        &self,
        cluster_id: u64,
        revision: i64,
        entries: Vec<Entry>,
    ) -> Result<Vec<Change>, StoreError> {
        let mut history = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.replace_locked(&mut history, cluster_id, revision, entries, Source::Etcd)
    }

    /// Publishes fallback data (the disk snapshot's, or the bundled defaults at revision 0),
    /// unless etcd's already is (then `Ok(false)`): the check and the swap happen under the
    /// writer lock, so a load from etcd is never replaced.
    pub fn load_fallback(
        &self,
        cluster_id: u64,
        revision: i64,
        entries: Vec<Entry>,
        source: Source,
    ) -> Result<bool, StoreError> {
        let mut history = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if self.current.load().loaded {
            return Ok(false);
        }
        self.replace_locked(&mut history, cluster_id, revision, entries, source)?;
        Ok(true)
    }

    fn replace_locked(
        &self,
        history: &mut History,
        cluster_id: u64,
        revision: i64,
        entries: Vec<Entry>,
        source: Source,
    ) -> Result<Vec<Change>, StoreError> {
        let old = self.current.load_full();
        let same_cluster = old.cluster_id == 0 || cluster_id == 0 || old.cluster_id == cluster_id;
        if old.loaded && same_cluster && revision < old.revision {
            return Err(StoreError::RevisionWentBack {
                offered: revision,
                current: old.revision,
            });
        }
        let mut map = OrdSet::new();
        let mut bytes = 0;
        let mut changes = Vec::new();
        for entry in entries {
            bytes += entry.size();
            let entry = Arc::new(entry);
            let unchanged = old
                .get(&entry.key)
                .is_some_and(|prev| prev.mod_revision == entry.mod_revision);
            if !unchanged {
                changes.push(Change::Put(entry.clone()));
            }
            map.insert(Keyed(entry));
        }
        for gone in old.iter() {
            if !map.contains(&gone.key[..]) {
                changes.push(Change::Delete {
                    key: gone.key.clone(),
                    revision,
                });
            }
        }
        let revision = if same_cluster {
            revision.max(old.revision)
        } else {
            revision
        };
        let next = Snapshot {
            loaded: true,
            cluster_id: if cluster_id != 0 {
                cluster_id
            } else {
                old.cluster_id
            },
            entries: map,
            bytes,
            ..Snapshot::empty()
        }
        .publishable(revision);
        let next = Snapshot { source, ..next };
        // Defaults do not lead anywhere etcd's data follows from: whoever follows starts over.
        let origin = if old.loaded && same_cluster && old.source != Source::Defaults {
            Origin::Resync
        } else {
            Origin::Restart
        };
        self.publish(history, next, changes.clone(), origin);
        Ok(changes)
    }

    /// Applies the events of one watch response, all of whose revisions are at most `revision`,
    /// as one new snapshot. Events at or below the revision already served are duplicates from a
    /// resumed watch and are skipped.
    pub fn apply(&self, revision: i64, events: Vec<Event>) -> Vec<Change> {
        let mut history = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load_full();
        if revision <= old.revision {
            return Vec::new();
        }
        let mut next = (*old).clone();
        let mut changes = Vec::with_capacity(events.len());
        for event in events {
            match event {
                Event::Put(entry) => {
                    if entry.mod_revision <= old.revision {
                        continue;
                    }
                    let entry = Arc::new(entry);
                    next.bytes += entry.size();
                    if let Some(prev) = next.entries.insert(Keyed(entry.clone())) {
                        next.bytes -= prev.0.size();
                    }
                    changes.push(Change::Put(entry));
                }
                Event::Delete { key, revision } => {
                    if revision <= old.revision {
                        continue;
                    }
                    if let Some(prev) = next.entries.remove(&key[..]) {
                        next.bytes -= prev.0.size();
                        changes.push(Change::Delete { key, revision });
                    }
                }
            }
        }
        self.events_applied.fetch_add(changes.len() as u64, Relaxed);
        self.publish(
            &mut history,
            next.publishable(revision),
            changes.clone(),
            Origin::Watch,
        );
        changes
    }

    /// Swaps in `snapshot` and announces its changes, under the writer lock.
    fn publish(
        &self,
        history: &mut History,
        snapshot: Snapshot,
        changes: Vec<Change>,
        origin: Origin,
    ) {
        let revision = snapshot.revision;
        self.current.store(Arc::new(snapshot));
        if origin == Origin::Restart {
            // Nothing before this can be replayed: asking for older revisions gets a reset, and
            // whoever follows (another cluster's data, at unrelated revisions) starts over.
            history.sets.clear();
            history.bytes = 0;
            history.floor = revision;
            drop(changes);
            let _ = self.changes_tx.send(Announcement {
                revision,
                reset: true,
            });
        } else if !changes.is_empty() {
            let set = Arc::new(ChangeSet {
                revision,
                changes,
                resync: origin == Origin::Resync,
                reset: false,
            });
            history.bytes += set.size();
            history.sets.push_back(set.clone());
            // The oldest go first; a set larger than the whole bound goes too (a follower that
            // needed it starts over: nothing is served wrong, nothing waits).
            while history.sets.len() > HISTORY_REVISIONS || history.bytes > history.max_bytes {
                let Some(gone) = history.sets.pop_front() else {
                    break;
                };
                history.bytes -= gone.size();
                history.floor = gone.revision;
            }
            // No receivers is fine: nobody is following.
            let _ = self.changes_tx.send(Announcement {
                revision,
                reset: false,
            });
        }
        self.revision_tx.send_replace(revision);
    }

    /// Change sets and bytes the history holds now, for status and metrics.
    pub fn history_use(&self) -> (usize, u64) {
        let history = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        (history.sets.len(), history.bytes)
    }

    /// The revision the history starts after: a follower can resume from it or later.
    pub fn history_floor(&self) -> i64 {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).floor
    }

    /// The change sets after revision `since`, or `None` when the history no longer reaches
    /// back that far.
    pub fn changes_since(&self, since: i64) -> Option<Vec<Arc<ChangeSet>>> {
        self.writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .since(since)
    }

    /// Follows the changes after revision `since`: what is still in the history, then live.
    pub fn follow(&self, since: i64) -> Follow {
        let history = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let snapshot = self.current.load_full();
        let live = LiveChanges::new(
            self.changes_tx.subscribe(),
            Arc::clone(&self.writer),
            snapshot.revision,
        );
        let backlog = history.since(since);
        Follow {
            snapshot,
            backlog,
            live,
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn entry(key: &str, value: &str, rev: i64) -> Entry {
        Entry::new(
            Bytes::copy_from_slice(key.as_bytes()),
            Bytes::copy_from_slice(value.as_bytes()),
            rev,
            rev,
            1,
        )
    }

    #[test]
    fn replace_reports_the_difference_and_keeps_revision_monotonic() {
        let store = Store::new();
        assert!(!store.is_loaded());
        store
            .replace(5, vec![entry("/a/1", "x", 2), entry("/a/2", "y", 3)])
            .unwrap();
        assert!(store.is_loaded());
        let changes = store
            .replace(9, vec![entry("/a/1", "x", 2), entry("/a/3", "z", 8)])
            .unwrap();
        let mut puts = vec![];
        let mut deletes = vec![];
        for c in changes {
            match c {
                Change::Put(e) => puts.push(e.key.clone()),
                Change::Delete { key, revision } => {
                    assert_eq!(revision, 9);
                    deletes.push(key)
                }
            }
        }
        assert_eq!(puts, vec![Bytes::from_static(b"/a/3")]);
        assert_eq!(deletes, vec![Bytes::from_static(b"/a/2")]);
        let snap = store.snapshot();
        assert_eq!(snap.revision, 9);
        assert_eq!(snap.bytes, 4 + 1 + 4 + 1);
        assert_eq!(
            store.replace(7, vec![]).unwrap_err(),
            StoreError::RevisionWentBack {
                offered: 7,
                current: 9
            }
        );
    }

    #[test]
    fn follow_replays_the_history_without_a_gap_and_says_when_it_cannot() {
        let store = Store::new();
        store.replace(3, vec![entry("/a/x", "1", 3)]).unwrap();
        let early = store.follow(0);
        assert!(
            early.backlog.is_none(),
            "before the first load there is nothing to replay"
        );
        store.apply(4, vec![Event::Put(entry("/a/y", "2", 4))]);
        store.apply(
            5,
            vec![Event::Delete {
                key: Bytes::from_static(b"/a/x"),
                revision: 5,
            }],
        );
        let f = store.follow(3);
        let backlog: Vec<i64> = f.backlog.unwrap().iter().map(|s| s.revision).collect();
        assert_eq!(backlog, vec![4, 5]);
        assert_eq!(f.snapshot.revision, 5);
        let mut live = f.live;
        store.apply(6, vec![Event::Put(entry("/b/z", "3", 6))]);
        let next = futures_util::FutureExt::now_or_never(live.recv())
            .expect("published")
            .unwrap();
        assert_eq!(next.revision, 6);
        assert!(next.touches(b"/b/") && !next.touches(b"/a/"));
        // A resync's difference is a change set too, deletions included.
        let mut live = store.follow(6).live;
        store.replace(9, vec![entry("/b/z", "3", 6)]).unwrap();
        let resync = futures_util::FutureExt::now_or_never(live.recv())
            .expect("published")
            .unwrap();
        assert!(resync.resync);
        assert_eq!(resync.changes.len(), 1);
        assert!(
            matches!(&resync.changes[0], Change::Delete { key, revision: 9 } if &key[..] == b"/a/y")
        );
        assert!(!resync.reset);
        // Data from another cluster, at a lower revision: followers are told to start over.
        store
            .replace_from(4, 9, vec![entry("/b/z", "3", 6)])
            .unwrap();
        let mut live = store.follow(9).live;
        store
            .replace_from(5, 2, vec![entry("/c/q", "1", 2)])
            .unwrap();
        let reset = futures_util::FutureExt::now_or_never(live.recv())
            .expect("published")
            .unwrap();
        assert!(reset.reset);
        assert_eq!(store.revision(), 2);
        assert!(store.follow(1).backlog.is_none());
    }

    #[tokio::test]
    async fn live_subscribers_read_from_the_history_and_hold_no_values() {
        let store = Store::with_history_bytes(64 * 1024);
        store.replace(1, vec![]).unwrap();
        let mut live = store.follow(1).live;
        // Three times more sets than announcements are buffered: none is lost.
        let published = SUBSCRIBER_BUFFER as i64 * 3;
        for r in 2..2 + published {
            store.apply(r, vec![Event::Put(entry("/a/k", "v", r))]);
        }
        for r in 2..2 + published {
            assert_eq!(live.recv().await.unwrap().revision, r);
        }
        // A set larger than the whole history bound is not kept: the subscriber that needed it
        // is told it lagged (and starts over), never handed a set that was dropped.
        let big = "v".repeat(100 * 1024);
        let r = 2 + published;
        store.apply(r, vec![Event::Put(entry("/a/k", &big, r))]);
        assert!(matches!(
            live.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
        assert_eq!(store.history_use(), (0, 0));
    }

    #[test]
    fn the_history_is_bounded_in_bytes_oldest_first() {
        let store = Store::with_history_bytes(10 * 1024);
        store.replace(1, vec![]).unwrap();
        let value = "v".repeat(1000);
        for r in 2..40 {
            store.apply(r, vec![Event::Put(entry("/a/k", &value, r))]);
        }
        let (sets, bytes) = store.history_use();
        assert!(bytes <= 10 * 1024, "{bytes} bytes");
        assert!((9..=10).contains(&sets), "{sets} sets of about 1 KiB");
        let floor = store.history_floor();
        assert_eq!(floor, 39 - sets as i64);
        // What is still held replays; what went asks for a reset.
        let replay = store.follow(floor).backlog.unwrap();
        assert_eq!(replay.len(), sets);
        assert!(store.follow(floor - 1).backlog.is_none());
        assert!(store.changes_since(floor - 1).is_none());
    }

    #[test]
    fn apply_is_one_snapshot_and_skips_replayed_events() {
        let store = Store::new();
        store.replace(1, vec![]).unwrap();
        let before = store.snapshot();
        store.apply(
            4,
            vec![
                Event::Put(entry("/p/a", "1", 4)),
                Event::Put(entry("/p/b", "1", 4)),
            ],
        );
        let after = store.snapshot();
        assert!(before.is_empty(), "an old snapshot is never mutated");
        assert_eq!(after.len(), 2);
        assert_eq!(after.revision, 4);
        // A resumed watch replays revision 4: nothing changes.
        assert!(store
            .apply(
                4,
                vec![Event::Delete {
                    key: Bytes::from_static(b"/p/a"),
                    revision: 4
                }]
            )
            .is_empty());
        let changes = store.apply(
            5,
            vec![Event::Delete {
                key: Bytes::from_static(b"/p/a"),
                revision: 5,
            }],
        );
        assert_eq!(changes.len(), 1);
        let snap = store.snapshot();
        assert_eq!(
            snap.scan_prefix(b"/p/")
                .map(|e| e.key.clone())
                .collect::<Vec<_>>(),
            vec![Bytes::from_static(b"/p/b")]
        );
        assert_eq!(snap.bytes, 5);
    }
}
