//! Health as layered checks: `/v1/status` lists one [`Check`] per component — each etcd member,
//! the watch, the snapshot directory, memory, the background tasks — as healthy / degraded /
//! unhealthy with a reason. Critical checks (the watch and the tasks) decide whether the whole is
//! unhealthy; the others can only make it degraded, because the sidecar still serves correctly
//! without them. Liveness (`/healthz`) is [`crate::liveness`]'s alone.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::files::FileStatus;
use crate::liveness::Liveness;
use crate::upstream::MemberProbe;

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
    /// How the watch stands when its silence says nothing against it.
    pub quiet: Quiet,
}

/// Why a quiet watch may be fine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiet {
    /// Nothing special: a watch confirms freshness within its deadline.
    No,
    /// A watch open through an etcd gRPC proxy, which answers no progress request: silence
    /// between events is normal.
    ThroughProxy,
    /// The operator pinned `cache-only`: there is no watch, by design.
    Pinned,
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
    } else if facts.quiet == Quiet::Pinned {
        (
            Status::Degraded,
            format!(
                "cache-only pinned by the operator: no watch; last confirmed current {}",
                ago(facts.staleness)
            ),
        )
    } else if facts.quiet == Quiet::ThroughProxy && stale > facts.watch_deadline {
        (
            Status::Healthy,
            format!(
                "watching through a gRPC proxy, which answers no progress request: last confirmed current {}, at revision {}",
                ago(facts.staleness),
                facts.revision
            ),
        )
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
    let dir = crate::config::directory_of(path);
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

/// The rendered files: unhealthy while a file's last render failed (it keeps its last good
/// content), degraded until each has been rendered once. Not critical: the HTTP API serves on.
pub fn render_check(files: &[FileStatus]) -> Check {
    let failing: Vec<String> = files
        .iter()
        .filter_map(|f| Some(format!("{}: {}", f.path, f.error.as_ref()?)))
        .collect();
    let pending = files.iter().filter(|f| f.revision == 0).count();
    let (status, reason) = if !failing.is_empty() {
        (Status::Unhealthy, failing.join("; "))
    } else if pending > 0 {
        (
            Status::Degraded,
            format!("{pending} of {} files not rendered yet", files.len()),
        )
    } else {
        let oldest = files.iter().map(|f| f.revision).min().unwrap_or_default();
        (
            Status::Healthy,
            format!(
                "{} files rendered, at revision {oldest} or later",
                files.len()
            ),
        )
    };
    Check::new("render", status, false, reason)
}

/// Resident memory at rest, before anything is mirrored: the binary, the runtime, the threads
/// (benches/fleet/ measures about 8.5 MiB).
pub const REST_BYTES: u64 = 10 << 20;
/// What the allocator may keep of the memory a burst of writes churns through, before it is
/// handed back when the burst ends (`ops::allocator`), and the streams' formatting in flight.
pub const CHURN_SLACK_BYTES: u64 = 16 << 20;
/// Copies of the mirrored bytes a burst may hold at once: the mirror itself, a snapshot held by
/// the render cache or a request, the cached rendered body, one render in progress (its JSON
/// value and its output: 3), and change sets decoded or queued beyond the history (2).
pub const CHURN_MIRROR_COPIES: u64 = 8;

/// The resident memory a sidecar may reach under a sustained burst of writes, predicted from its
/// settings and what it mirrors: the formula of docs/benchmarks.md, Memory under churn (benches/churn.rs measures it).
pub fn churn_peak_estimate(history_bytes: u64, mirrored: u64) -> u64 {
    REST_BYTES
        .saturating_add(history_bytes)
        .saturating_add(mirrored.saturating_mul(CHURN_MIRROR_COPIES))
        .saturating_add(CHURN_SLACK_BYTES)
}

/// Memory against the budget: degraded above 80% of it, or when a burst of writes could take it
/// over (`peak`, from [`churn_peak_estimate`]), which warns before the limit rather than at it;
/// unhealthy above the budget. Not critical: the budget is the operator's early warning, the
/// platform's limit is the hard one.
pub fn memory_check(rss: Option<u64>, budget: Option<u64>, peak: u64) -> Check {
    let (status, reason) = match (rss, budget) {
        (None, _) => (
            Status::Healthy,
            "resident memory unknown on this platform".to_string(),
        ),
        (Some(rss), None) => (
            Status::Healthy,
            format!(
                "{rss} bytes resident, up to about {peak} under a burst of writes; no budget set"
            ),
        ),
        (Some(rss), Some(budget)) => {
            let status = if rss > budget {
                Status::Unhealthy
            } else if rss.saturating_mul(10) > budget.saturating_mul(8) || peak > budget {
                Status::Degraded
            } else {
                Status::Healthy
            };
            (
                status,
                format!(
                    "{rss} of {budget} bytes resident, up to about {peak} under a burst of writes"
                ),
            )
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

    #[tokio::test]
    async fn a_stopped_task_makes_the_tasks_check_unhealthy() {
        let liveness = Liveness::default();
        let done = tokio::spawn(async {});
        liveness.watch("mode", done.abort_handle(), None);
        while !done.is_finished() {
            tokio::task::yield_now().await;
        }
        let check = tasks_check(&liveness);
        assert_eq!(check.status, Status::Unhealthy);
        assert_eq!(check.reason, "task mode has stopped");
    }

    #[test]
    fn critical_checks_decide_the_whole() {
        let facts = |stale_s: u64| WatchFacts {
            loaded: true,
            staleness: Some(Duration::from_secs(stale_s)),
            watch_deadline: Duration::from_secs(6),
            revision: 10,
            quiet: Quiet::No,
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

        // Silence that says nothing: through a proxy, or with no watch by the operator's pin.
        let proxied = WatchFacts {
            quiet: Quiet::ThroughProxy,
            ..facts(60)
        };
        assert_eq!(watch_check(&proxied, &healthy).status, Status::Healthy);
        let pinned = WatchFacts {
            quiet: Quiet::Pinned,
            ..facts(60)
        };
        assert_eq!(watch_check(&pinned, &healthy).status, Status::Degraded);

        let member_down = member_checks(&[probe(false, false, 0)]);
        assert_eq!(member_down[0].status, Status::Unhealthy);
        assert_eq!(overall(&member_down), Status::Degraded, "not critical");
        let mut checks = member_down;
        checks.push(stuck);
        assert_eq!(overall(&checks), Status::Unhealthy);

        assert_eq!(
            memory_check(Some(50), Some(100), 60).status,
            Status::Healthy
        );
        assert_eq!(
            memory_check(Some(90), Some(100), 95).status,
            Status::Degraded
        );
        assert_eq!(
            memory_check(Some(101), Some(100), 120).status,
            Status::Unhealthy
        );
        assert_eq!(memory_check(Some(101), None, 120).status, Status::Healthy);
        // Well under the budget at rest, but a burst of writes could pass it: warned now.
        let check = memory_check(Some(30), Some(100), 140);
        assert_eq!(check.status, Status::Degraded);
        assert!(check.reason.contains("up to about 140"), "{}", check.reason);
        // The formula: rest, the history, eight copies of the mirror, the allocator's slack.
        assert_eq!(
            churn_peak_estimate(16 << 20, 5 << 20),
            (10 + 16 + 40 + 16) << 20
        );
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
