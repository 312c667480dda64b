//! Health as layered checks, and the liveness watchdog.
//!
//! `/v1/status` lists one [`Check`] per component — each etcd member, the watch, the snapshot
//! directory, memory, the background tasks — as healthy / degraded / unhealthy with a reason.
//! Critical checks (the watch and the tasks) decide whether the whole is unhealthy; the others can
//! only make it degraded, because the sidecar still serves correctly without them.
//!
//! Liveness (`/healthz`) asks only [`Liveness`]: whether every background task is still running
//! and, for the sync, probe and snapshot-writer tasks, still making progress (each beats a
//! [`Heartbeat`] at points it passes at least every few seconds while it works). A wedged task is
//! what a restart cures; an unreachable etcd is not, so it never fails liveness.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::probe::MemberProbe;

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
}

impl Heartbeat {
    /// A heartbeat that has just beaten, allowed `allowance` of silence.
    pub fn new(allowance: Duration) -> Arc<Heartbeat> {
        Arc::new(Heartbeat {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            allowance_ms: AtomicU64::new(allowance.as_millis() as u64),
        })
    }

    /// Records progress now.
    pub fn beat(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn silence(&self) -> Duration {
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

/// A check's verdict, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Working as intended.
    Healthy,
    /// Working, with less margin or less freshness than intended.
    Degraded,
    /// Not working.
    Unhealthy,
}

/// One component's check, as listed in `/v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Which component (`etcd:<url>`, `watch`, `snapshot`, `memory`, `tasks`).
    pub name: String,
    /// Its verdict.
    pub status: Status,
    /// Whether an unhealthy verdict makes the whole sidecar unhealthy.
    pub critical: bool,
    /// Why, in words.
    pub reason: String,
}

impl Check {
    fn new(name: impl Into<String>, status: Status, critical: bool, reason: String) -> Check {
        Check {
            name: name.into(),
            status,
            critical,
            reason,
        }
    }
}

/// The whole verdict: unhealthy when a critical check is; degraded when any check is not healthy.
pub fn overall(checks: &[Check]) -> Status {
    if checks
        .iter()
        .any(|c| c.critical && c.status == Status::Unhealthy)
    {
        Status::Unhealthy
    } else if checks.iter().any(|c| c.status != Status::Healthy) {
        Status::Degraded
    } else {
        Status::Healthy
    }
}

/// One check per etcd member, from the last probe round. Never critical: the sidecar serves
/// without any member.
pub fn member_checks(probes: &[MemberProbe]) -> Vec<Check> {
    probes
        .iter()
        .map(|p| {
            let error = p.error.clone().unwrap_or_default();
            let (status, reason) = if p.at_unix_ms == 0 {
                (Status::Degraded, "not probed yet".to_string())
            } else if p.quorum {
                (
                    Status::Healthy,
                    format!("in quorum, answered in {:.1} ms", p.latency_ms),
                )
            } else if p.reachable {
                (
                    Status::Degraded,
                    format!("reachable without quorum: {error}"),
                )
            } else {
                (Status::Unhealthy, format!("unreachable: {error}"))
            };
            Check::new(format!("etcd:{}", p.url), status, false, reason)
        })
        .collect()
}

/// What the watch check looks at.
pub struct WatchFacts {
    /// Whether anything has been loaded.
    pub loaded: bool,
    /// Time since the mirror was last confirmed current (`None`: never).
    pub staleness: Option<Duration>,
    /// The silence after which the watch is reopened: confirmations come well within it.
    pub watch_deadline: Duration,
    /// The mirror's revision.
    pub revision: i64,
}

/// The watch: critical, because a mirror that stopped following a healthy etcd serves ever-older
/// data. Stale while no member has quorum is expected (the mode says so) and only degraded.
pub fn watch_check(facts: &WatchFacts, probes: &[MemberProbe]) -> Check {
    let quorum = probes.iter().any(|p| p.quorum);
    let etcd_revision = probes.iter().map(|p| p.revision).max().unwrap_or_default();
    let lag = (etcd_revision - facts.revision).max(0);
    let stale = facts.staleness.unwrap_or(Duration::MAX);
    let (status, reason) = if !facts.loaded {
        (Status::Degraded, "nothing loaded yet".to_string())
    } else if stale <= facts.watch_deadline {
        (
            Status::Healthy,
            format!(
                "current as of {} ms ago, at revision {}",
                stale.as_millis(),
                facts.revision
            ),
        )
    } else if quorum && stale > facts.watch_deadline * 2 {
        (
            Status::Unhealthy,
            format!(
                "etcd has quorum but the mirror was last confirmed current {}; {lag} revisions behind",
                ago(facts.staleness)
            ),
        )
    } else {
        (
            Status::Degraded,
            format!(
                "last confirmed current {}; etcd {}",
                ago(facts.staleness),
                if quorum {
                    "has quorum again"
                } else {
                    "has no quorum"
                }
            ),
        )
    };
    Check::new("watch", status, true, reason)
}

fn ago(staleness: Option<Duration>) -> String {
    match staleness {
        Some(s) => format!("{} ms ago", s.as_millis()),
        None => "never".into(),
    }
}

/// The snapshot directory: writable, with room for at least two more copies of the mirror (the
/// new file is written beside the old one before it replaces it), and the last write succeeded.
pub fn snapshot_check(path: &Path, mirror_bytes: u64, last_write_failed: bool) -> Check {
    let dir = crate::persist::directory_of(path);
    let need = mirror_bytes.saturating_mul(2).max(1 << 20);
    let writable = rustix::fs::access(&dir, rustix::fs::Access::WRITE_OK).is_ok();
    let free = rustix::fs::statvfs(&dir)
        .ok()
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize));
    let (status, reason) = match free {
        _ if !writable => (
            Status::Unhealthy,
            format!("{} is not writable", dir.display()),
        ),
        None => (
            Status::Unhealthy,
            format!("cannot read the free space of {}", dir.display()),
        ),
        Some(_) if last_write_failed => (
            Status::Unhealthy,
            "the last snapshot write failed (see the log)".to_string(),
        ),
        Some(free) if free < need => (
            Status::Degraded,
            format!("{free} bytes free in {}, want {need}", dir.display()),
        ),
        Some(free) => (
            Status::Healthy,
            format!("{free} bytes free in {}", dir.display()),
        ),
    };
    Check::new("snapshot", status, false, reason)
}

/// Memory against the budget: degraded above 80%, unhealthy above it. Not critical: the budget
/// is the operator's early warning, the platform's limit is the hard one.
pub fn memory_check(rss: Option<u64>, budget: Option<u64>) -> Check {
    let (status, reason) = match (rss, budget) {
        (None, _) => (
            Status::Healthy,
            "resident memory unknown on this platform".to_string(),
        ),
        (Some(rss), None) => (
            Status::Healthy,
            format!("{rss} bytes resident; no budget set"),
        ),
        (Some(rss), Some(budget)) => {
            let status = if rss > budget {
                Status::Unhealthy
            } else if rss.saturating_mul(10) > budget.saturating_mul(8) {
                Status::Degraded
            } else {
                Status::Healthy
            };
            (status, format!("{rss} of {budget} bytes resident"))
        }
    };
    Check::new("memory", status, false, reason)
}

/// The background tasks: critical, since a dead or wedged task is what liveness restarts for.
pub fn tasks_check(liveness: &Liveness) -> Check {
    let problems = liveness.problems();
    if problems.is_empty() {
        let names = liveness.names().join(", ");
        Check::new("tasks", Status::Healthy, true, format!("running: {names}"))
    } else {
        Check::new("tasks", Status::Unhealthy, true, problems.join("; "))
    }
}

/// This process's resident memory, from `/proc/self/statm` (Linux).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(reachable: bool, quorum: bool, revision: i64) -> MemberProbe {
        MemberProbe {
            url: "http://m".into(),
            reachable,
            quorum,
            revision,
            at_unix_ms: 1,
            error: (!quorum).then(|| "boom".into()),
            ..MemberProbe::default()
        }
    }

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
        assert_eq!(tasks_check(&liveness).status, Status::Unhealthy);
        busy.abort();
    }

    #[test]
    fn critical_checks_decide_the_whole() {
        let facts = |stale_s: u64| WatchFacts {
            loaded: true,
            staleness: Some(Duration::from_secs(stale_s)),
            watch_deadline: Duration::from_secs(6),
            revision: 10,
        };
        let healthy = [probe(true, true, 12)];
        let no_quorum = [probe(true, false, 12)];
        assert_eq!(watch_check(&facts(1), &healthy).status, Status::Healthy);
        // Stale because etcd lost quorum: expected, not a fault of the sidecar.
        assert_eq!(watch_check(&facts(60), &no_quorum).status, Status::Degraded);
        // Stale while etcd is fine: the mirror stopped following.
        let stuck = watch_check(&facts(60), &healthy);
        assert_eq!(stuck.status, Status::Unhealthy);
        assert!(
            stuck.reason.contains("2 revisions behind"),
            "{}",
            stuck.reason
        );

        let member_down = member_checks(&[probe(false, false, 0)]);
        assert_eq!(member_down[0].status, Status::Unhealthy);
        assert_eq!(overall(&member_down), Status::Degraded, "not critical");
        let mut checks = member_down;
        checks.push(stuck);
        assert_eq!(overall(&checks), Status::Unhealthy);

        assert_eq!(memory_check(Some(50), Some(100)).status, Status::Healthy);
        assert_eq!(memory_check(Some(90), Some(100)).status, Status::Degraded);
        assert_eq!(memory_check(Some(101), Some(100)).status, Status::Unhealthy);
        assert_eq!(memory_check(Some(101), None).status, Status::Healthy);
    }

    #[test]
    fn the_snapshot_directory_must_be_writable_with_room() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mirror.snap");
        assert_eq!(snapshot_check(&path, 1000, false).status, Status::Healthy);
        assert_eq!(snapshot_check(&path, 1000, true).status, Status::Unhealthy);
        // More than the file system holds: no room for the next write.
        let huge = snapshot_check(&path, u64::MAX / 2, false);
        assert_eq!(huge.status, Status::Degraded, "{}", huge.reason);
        let missing = snapshot_check(Path::new("/nonexistent-dir/x.snap"), 1, false);
        assert_eq!(missing.status, Status::Unhealthy);
        assert!(resident_bytes().is_some_and(|b| b > 0));
    }
}
