//! glibc's allocator, set for a process whose large buffers come in bursts.
//!
//! Under churn a sidecar allocates and frees rendered bodies, change sets and watch responses of
//! megabytes many times a second. By default glibc raises its mmap threshold to the largest block
//! freed (up to 32 MiB); from then on such blocks come from the heap arenas, which keep freed space,
//! fragmented across threads, instead of giving it back. Fixing the threshold makes every block of
//! [`MMAP_THRESHOLD`] or more a mapping of its own, returned to the system when freed (measured
//! in benches/churn.rs: the 10 KiB-value peak went from 75 to 65 MiB). What small blocks leave
//! free in the arenas after a burst is handed back by `malloc_trim` once the mirror has been quiet
//! for [`TRIM_AFTER_QUIET`]: see [`Trimmer`]. The calls into glibc themselves are in `main.rs`.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::broadcast::{self, error::RecvError};

/// Blocks from this size up are mapped and unmapped on their own. Requests on the read path
/// allocate far less; a rendered listing of a large prefix or a bulk change set is above it.
pub const MMAP_THRESHOLD: usize = 256 * 1024;

/// How long the mirror must go without a change before freed memory is handed back.
pub const TRIM_AFTER_QUIET: Duration = Duration::from_secs(2);

/// How the binary trims its allocator, once it says (see `main.rs`, which holds the calls into
/// glibc: this library has no unsafe code). Without it no [`Trimmer`] runs.
static TRIM: OnceLock<fn()> = OnceLock::new();

/// Gives the library the function that hands free memory back to the system.
pub fn install_trim(trim: fn()) {
    let _ = TRIM.set(trim);
}

/// The installed trim function, if any.
pub fn installed_trim() -> Option<fn()> {
    TRIM.get().copied()
}

/// Trims the allocator once after each burst of changes to the mirror, when none has come for
/// [`TRIM_AFTER_QUIET`]. Nothing runs while the mirror does not change (a watch's progress
/// notices are not changes), and nothing per change but a wake-up.
pub struct Trimmer<T, F> {
    /// The mirror's change sets, as the store announces them (only their arrival matters).
    changes: broadcast::Receiver<T>,
    /// What trimming is: glibc's `malloc_trim` in the binary, a counter in tests.
    trim: F,
}

impl<T: Clone, F: Fn() + Send + Sync + Clone + 'static> Trimmer<T, F> {
    pub fn new(changes: broadcast::Receiver<T>, trim: F) -> Self {
        Trimmer { changes, trim }
    }

    /// Runs until the store is dropped.
    pub async fn run(mut self) {
        loop {
            match self.changes.recv().await {
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
            // The burst goes on while changes keep coming within the quiet time.
            loop {
                match tokio::time::timeout(TRIM_AFTER_QUIET, self.changes.recv()).await {
                    Ok(Ok(_) | Err(RecvError::Lagged(_))) => continue,
                    Ok(Err(RecvError::Closed)) => return,
                    Err(_) => break,
                }
            }
            // It walks every arena: a few milliseconds, kept off the async workers.
            let _ = tokio::task::spawn_blocking(self.trim.clone()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn trims_once_per_burst_after_the_quiet_time() {
        let (publish, changes) = broadcast::channel(4);
        let trims = Arc::new(AtomicU32::new(0));
        let counter = trims.clone();
        let task = tokio::spawn(
            Trimmer::new(changes, move || {
                counter.fetch_add(1, Ordering::SeqCst);
            })
            .run(),
        );
        let count = || trims.load(Ordering::SeqCst);
        // Quiet from the start: nothing to give back.
        tokio::time::sleep(TRIM_AFTER_QUIET * 5).await;
        assert_eq!(count(), 0);
        // A burst of 20 changes, 500 ms apart: no trim while it lasts.
        for revision in 2..22 {
            publish.send(revision).unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(count(), 0, "trimmed in the middle of a burst");
        // Then quiet: one trim.
        tokio::time::sleep(TRIM_AFTER_QUIET * 2).await;
        assert_eq!(count(), 1);
        tokio::time::sleep(TRIM_AFTER_QUIET * 10).await;
        assert_eq!(count(), 1, "one trim per burst");
        // The next burst, one change: one more.
        publish.send(30).unwrap();
        tokio::time::sleep(TRIM_AFTER_QUIET * 2).await;
        assert_eq!(count(), 2);
        drop(publish);
        task.await.unwrap();
    }
}
