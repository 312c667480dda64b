//! What the store keeps of its recent changes and how subscribers follow them: the change sets,
//! the history bounded in bytes, and live subscriptions that are told only revisions and read the
//! sets from the history, so no subscriber holds values of its own.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast::{
    self,
    error::{RecvError, TryRecvError},
};

use crate::mirror::snapshot::{Change, Snapshot};

/// The changes one published snapshot made, as subscribers see them.
#[derive(Debug)]
pub struct ChangeSet {
    /// The snapshot revision they lead to.
    pub revision: i64,
    /// What changed, deletions included.
    pub changes: Vec<Change>,
    /// Whether this came from a full reload (compaction resync) rather than the watch.
    pub resync: bool,
    /// Whether the mirror was replaced by data that does not follow from the old (another
    /// cluster, whose revisions are unrelated): followers must start over from the current state.
    pub reset: bool,
}

impl ChangeSet {
    /// Bytes it holds, as the history counts them.
    pub fn size(&self) -> u64 {
        self.changes
            .iter()
            .map(|c| match c {
                Change::Put(e) => e.size(),
                Change::Delete { key, .. } => key.len() as u64,
            } + CHANGE_OVERHEAD)
            .sum()
    }

    /// Whether any change touches a key starting with `prefix`.
    pub fn touches(&self, prefix: &[u8]) -> bool {
        self.changes.iter().any(|c| c.key().starts_with(prefix))
    }
}

/// Most change sets the history keeps for resuming streams and blocking queries.
pub const HISTORY_REVISIONS: usize = 4096;
/// Most bytes of keys and values the history keeps unless configured (`--history-bytes`).
pub const DEFAULT_HISTORY_BYTES: u64 = 16 * 1024 * 1024;
/// Announcements a live subscriber may fall behind before it is told it lagged. It loses
/// nothing by it: the sets themselves are read from the history, which bounds their bytes; an
/// announcement is a revision number.
pub const SUBSCRIBER_BUFFER: usize = 64;
/// Bytes a change is counted for beyond its key and value: the `Change`, its `Arc`, the slot.
const CHANGE_OVERHEAD: u64 = 64;

/// A subscription to the store's changes, with no gap between what it missed and what comes.
pub struct Follow {
    /// The snapshot current when the subscription began.
    pub snapshot: Arc<Snapshot>,
    /// Change sets after the asked revision up to `snapshot`, or `None` when the history no
    /// longer reaches back that far (the subscriber must reset).
    pub backlog: Option<Vec<Arc<ChangeSet>>>,
    /// Change sets after `snapshot`.
    pub live: LiveChanges,
}

/// That a revision was published: all a live subscriber is sent. It then reads the sets from
/// the history, so a subscriber that falls behind holds back no values of its own.
#[derive(Debug, Clone, Copy)]
pub struct Announcement {
    /// The revision published.
    pub revision: i64,
    /// The mirror was replaced (another cluster's data): followers start over.
    pub reset: bool,
}

/// The change sets published after a revision, in order, as they come: announced on a
/// broadcast channel, read from the history one at a time as the subscriber asks, so a
/// subscriber holds at most the set it is handling, never a queue of its own. Its `recv`
/// answers like a broadcast receiver's: `Lagged` only when the history no longer reaches back to
/// the last set received (the subscriber must start over), `Closed` when the store is gone.
pub struct LiveChanges {
    /// Announcements of new revisions: what wakes a subscriber, and how a reset is told.
    announcements: broadcast::Receiver<Announcement>,
    /// Where the sets are.
    history: Arc<Mutex<History>>,
    /// The revision received up to.
    last: i64,
}

impl LiveChanges {
    /// Follows the sets published after revision `last`, announced on `announcements`.
    pub(super) fn new(
        announcements: broadcast::Receiver<Announcement>,
        history: Arc<Mutex<History>>,
        last: i64,
    ) -> Self {
        LiveChanges {
            announcements,
            history,
            last,
        }
    }

    /// The same subscription, starting further back: the sets after `revision` (an older one)
    /// come first, read from the history as they are received.
    pub fn replaying_from(mut self, revision: i64) -> Self {
        self.last = self.last.min(revision);
        self
    }

    /// The revision of the last set received (or the one the subscription started after).
    pub fn received_up_to(&self) -> i64 {
        self.last
    }

    /// The next change set after the last one received.
    pub async fn recv(&mut self) -> Result<Arc<ChangeSet>, RecvError> {
        let mut closed = false;
        loop {
            // A reset already announced goes first: what the history had before it is gone.
            loop {
                match self.announcements.try_recv() {
                    Ok(a) => {
                        if let Some(reset) = self.reset(a) {
                            return Ok(reset);
                        }
                    }
                    // Missed announcements lose nothing: the history has the sets.
                    Err(TryRecvError::Lagged(_)) => {}
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Closed) => {
                        closed = true;
                        break;
                    }
                }
            }
            let next = {
                let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
                history.next_after(self.last)
            };
            match next {
                Some(Some(set)) => {
                    self.last = set.revision;
                    return Ok(set);
                }
                Some(None) if closed => return Err(RecvError::Closed),
                Some(None) => {}
                None => return Err(RecvError::Lagged(0)),
            }
            match self.announcements.recv().await {
                Ok(a) => {
                    if let Some(reset) = self.reset(a) {
                        return Ok(reset);
                    }
                }
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => closed = true,
            }
        }
    }

    /// The set that tells a reset, when `announcement` is one (its revision may be lower: the
    /// data is another cluster's).
    fn reset(&mut self, announcement: Announcement) -> Option<Arc<ChangeSet>> {
        if !announcement.reset {
            return None;
        }
        self.last = announcement.revision;
        Some(Arc::new(ChangeSet {
            revision: announcement.revision,
            changes: Vec::new(),
            resync: true,
            reset: true,
        }))
    }
}

/// Recent change sets and the revision below which they are gone.
pub(super) struct History {
    /// Oldest first.
    pub(super) sets: VecDeque<Arc<ChangeSet>>,
    /// Every change after this revision is in `sets`.
    pub(super) floor: i64,
    /// Bytes of `sets` ([`ChangeSet::size`]).
    pub(super) bytes: u64,
    /// Most bytes kept: the oldest sets go first past it.
    pub(super) max_bytes: u64,
}

impl History {
    /// The first set after revision `last`: `Some(None)` when there is none yet, `None` when the
    /// history no longer reaches back to `last`.
    pub(super) fn next_after(&self, last: i64) -> Option<Option<Arc<ChangeSet>>> {
        (last >= self.floor).then(|| {
            let at = self.sets.partition_point(|s| s.revision <= last);
            self.sets.get(at).cloned()
        })
    }

    /// The sets after revision `since`, or `None` when the history no longer reaches back.
    pub(super) fn since(&self, since: i64) -> Option<Vec<Arc<ChangeSet>>> {
        (since >= self.floor).then(|| {
            self.sets
                .iter()
                .filter(|s| s.revision > since)
                .cloned()
                .collect()
        })
    }
}
