//! The liveness watchdog over the background tasks: what `/healthz` asks.
//!
//! Every background task is watched for having ended, and the sync, probe and snapshot-writer
//! tasks also for having stopped making progress: each beats a [`Heartbeat`] at points it passes
//! at least every few seconds while it works. A wedged task is what a restart cures; an
//! unreachable etcd is not, so it never fails liveness. This module imports nothing of the
//! crate's: every layer's tasks beat their heartbeats here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;

/// A task's sign of life: the last time it passed a point it must keep passing.
#[derive(Debug)]
pub struct Heartbeat {
    /// What the beats are measured from.
    origin: Instant,
    /// Milliseconds after `origin` of the last beat.
    last_ms: AtomicU64,
    /// Longest silence that is still progress, in milliseconds: a few times the longest wait the
    /// task can be in (which a reload may change).
    allowance_ms: AtomicU64,
    /// Whether the task is parked waiting for work (a change to write, say): a task that only
    /// awaits a channel cannot be wedged, and beating through such a wait would wake an idle
    /// sidecar for nothing.
    waiting: AtomicBool,
}

impl Heartbeat {
    /// A heartbeat that has just beaten, allowed `allowance` of silence.
    pub fn new(allowance: Duration) -> Arc<Heartbeat> {
        Arc::new(Heartbeat {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            allowance_ms: AtomicU64::new(allowance.as_millis() as u64),
            waiting: AtomicBool::new(false),
        })
    }

    /// Records progress now (and the end of a wait for work).
    pub fn beat(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
        self.waiting.store(false, Ordering::Relaxed);
    }

    /// The task is about to wait for work, for as long as it takes; its next [`beat`] ends the
    /// wait. Silence while waiting is not a stall.
    ///
    /// [`beat`]: Heartbeat::beat
    pub fn wait_for_work(&self) {
        self.waiting.store(true, Ordering::Relaxed);
    }

    /// Time since the last beat (zero while the task waits for work).
    pub fn silence(&self) -> Duration {
        if self.waiting.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    /// The silence allowed.
    pub fn allowance(&self) -> Duration {
        Duration::from_millis(self.allowance_ms.load(Ordering::Relaxed))
    }

    /// Allows `allowance` of silence from now on (the task's own waits changed).
    pub fn set_allowance(&self, allowance: Duration) {
        self.allowance_ms
            .store(allowance.as_millis() as u64, Ordering::Relaxed);
    }
}

/// One watched task.
struct Watched {
    /// Its name in checks and logs.
    name: &'static str,
    /// Tells whether it has ended (returned, panicked or was aborted).
    handle: AbortHandle,
    /// Its progress, for the tasks that must keep moving.
    heartbeat: Option<Arc<Heartbeat>>,
}

/// The background tasks the liveness check watches.
#[derive(Default)]
pub struct Liveness {
    /// Every watched task.
    tasks: Mutex<Vec<Watched>>,
}

impl Liveness {
    /// Watches task `name`: dead when `handle` says it finished; stalled when `heartbeat` (if
    /// given) is silent longer than its allowance.
    pub fn watch(
        &self,
        name: &'static str,
        handle: AbortHandle,
        heartbeat: Option<Arc<Heartbeat>>,
    ) {
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Watched {
                name,
                handle,
                heartbeat,
            });
    }

    /// What is wrong with the tasks, one line each; empty when all are alive and moving.
    pub fn problems(&self) -> Vec<String> {
        let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let mut problems = Vec::new();
        for task in tasks.iter() {
            if task.handle.is_finished() {
                problems.push(format!("task {} has stopped", task.name));
            } else if let Some(hb) = &task.heartbeat {
                let silence = hb.silence();
                if silence > hb.allowance() {
                    problems.push(format!(
                        "task {} made no progress for {} ms (allowed {} ms)",
                        task.name,
                        silence.as_millis(),
                        hb.allowance().as_millis()
                    ));
                }
            }
        }
        problems
    }

    /// The names of the watched tasks.
    pub fn names(&self) -> Vec<&'static str> {
        let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.iter().map(|t| t.name).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_or_finished_task_fails_liveness() {
        let liveness = Liveness::default();
        let beat = Heartbeat::new(Duration::from_secs(10));
        let busy = tokio::spawn(std::future::pending::<()>());
        liveness.watch("sync", busy.abort_handle(), Some(beat.clone()));
        assert!(liveness.problems().is_empty());
        tokio::time::advance(Duration::from_secs(9)).await;
        beat.beat();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(liveness.problems().is_empty(), "beats keep it alive");
        tokio::time::advance(Duration::from_secs(2)).await;
        let problems = liveness.problems();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("sync made no progress"),
            "{problems:?}"
        );
        beat.beat();
        assert!(liveness.problems().is_empty(), "progress again");

        let done = tokio::spawn(async {});
        liveness.watch("mode", done.abort_handle(), None);
        while !done.is_finished() {
            tokio::task::yield_now().await;
        }
        assert_eq!(liveness.problems(), ["task mode has stopped"]);
        busy.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_waiting_for_work_is_not_stalled_until_it_works_again() {
        let liveness = Liveness::default();
        let beat = Heartbeat::new(Duration::from_secs(3));
        let writer = tokio::spawn(std::future::pending::<()>());
        liveness.watch("snapshot-writer", writer.abort_handle(), Some(beat.clone()));
        beat.wait_for_work();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(liveness.problems().is_empty(), "an hour without work");
        // Work came: from now on its silence counts again.
        beat.beat();
        tokio::time::advance(Duration::from_secs(4)).await;
        let problems = liveness.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("snapshot-writer made no progress for 4000 ms"));
        writer.abort();
    }
}
