//! What `/v1/status` and `/metrics` say: the [`Reporter`] reads every part of the sidecar, which
//! only this layer sees, and answers the HTTP side's [`Report`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::config::Config;
use crate::http::{AppState, Report};
use crate::mirror::persist::WriterStats;
use crate::mirror::snapshot::Snapshot;
use crate::ops::checks::{self, Check, Quiet, WatchFacts};
use crate::ops::metrics::{self, OperatorParts};
use crate::upstream::{MemberProbe, ProbeResults};

/// What `/v1/status` and `/metrics` read beyond the HTTP side's state.
#[derive(Clone)]
pub struct Reporter {
    /// The parts only the operator's side holds, which `/metrics` reads too.
    pub parts: OperatorParts,
    /// Where the disk snapshot goes, for its check.
    pub snapshot_path: Option<PathBuf>,
    /// The watch's silence deadline: confirmations of freshness come well within it.
    pub watch_deadline: Duration,
}

impl Reporter {
    /// A reporter for `config`, reading `probes` and (with a snapshot) the writer's `stats`.
    pub fn new(config: &Config, probes: ProbeResults, stats: Option<Arc<WriterStats>>) -> Self {
        Reporter {
            parts: OperatorParts {
                probes,
                snapshot_stats: stats,
                started: Instant::now(),
                alerts: Arc::default(),
                files: None,
            },
            snapshot_path: config.snapshot.as_ref().map(|s| s.path.clone()),
            watch_deadline: config.sync.watch_deadline,
        }
    }

    /// Every component check, as `/v1/status` lists them.
    pub fn checks(
        &self,
        state: &AppState,
        snapshot: &Snapshot,
        probes: &[MemberProbe],
    ) -> Vec<Check> {
        self.checks_at(state, snapshot, probes, checks::resident_bytes())
    }

    /// The checks, with resident memory already read (`/v1/status` reports the same figure).
    fn checks_at(
        &self,
        state: &AppState,
        snapshot: &Snapshot,
        probes: &[MemberProbe],
        resident: Option<u64>,
    ) -> Vec<Check> {
        let mut checks = checks::member_checks(probes);
        let facts = WatchFacts {
            loaded: snapshot.loaded,
            staleness: state.mode.staleness(SystemTime::now()),
            watch_deadline: self.watch_deadline,
            revision: snapshot.revision,
            quiet: if state.pool.held() {
                Quiet::Pinned
            } else if state.pool.grpc_proxy()
                && state.sync.borrow().state == crate::mirror::sync::SyncState::Watching
            {
                Quiet::ThroughProxy
            } else {
                Quiet::No
            },
        };
        checks.push(checks::watch_check(&facts, probes));
        if let Some(path) = &self.snapshot_path {
            let failing = self
                .parts
                .snapshot_stats
                .as_ref()
                .is_some_and(|s| s.failing());
            checks.push(checks::snapshot_check(path, snapshot.bytes, failing));
        }
        if let Some(files) = &self.parts.files {
            let files = files.lock().unwrap_or_else(|e| e.into_inner()).clone();
            checks.push(checks::render_check(&files));
        }
        checks.push(checks::memory_check(
            resident,
            state.live.get(|c| c.memory_budget),
            churn_peak(state, snapshot),
        ));
        checks.push(checks::tasks_check(&state.liveness));
        checks
    }
}

impl Report for Reporter {
    fn status(&self, state: &Arc<AppState>, snapshot: &Snapshot) -> serde_json::Value {
        let sync = state.sync.borrow().clone();
        let (transitions, transitions_total) = state.mode.history();
        let probes = self
            .parts
            .probes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let resident = checks::resident_bytes();
        let checks = self.checks_at(state, snapshot, &probes, resident);
        let (cache_bodies, cache_bytes) = state.cache.held();
        let (history_sets, history_bytes) = state.store.history_use();
        json!({
            "status": checks::overall(&checks),
            "checks": checks,
            "mode": state.mode.mode(),
            "pin": state.mode.pin(),
            "health": state.mode.health(),
            "ready": state.ready(snapshot),
            "revision": snapshot.revision,
            "source": snapshot.source,
            "cluster_id": snapshot.cluster_id,
            "stale_ms": state.mode.staleness(SystemTime::now()).map(|s| s.as_millis() as u64),
            "keys": snapshot.len(),
            "bytes": snapshot.bytes,
            "memory": {
                "resident_bytes": resident,
                "budget_bytes": state.live.get(|c| c.memory_budget),
                "churn_peak_estimate_bytes": churn_peak(state, snapshot),
            },
            "streams": {
                "open": state.subscribers.open(crate::http::counters::SubscriberKind::Stream),
                "queued_bytes": state.subscribers.stream_queue_bytes(),
            },
            "render_cache": {
                "bodies": cache_bodies,
                "bytes": cache_bytes,
                "alive_bytes": state.cache.alive_bytes(),
            },
            "history": {
                "revisions": history_sets,
                "bytes": history_bytes,
                "floor": state.store.history_floor(),
            },
            "prefixes": state.prefixes.as_slice(),
            "endpoints": state.pool.status(),
            "endpoint_selection": state.pool.selection().as_str(),
            "probes": probes,
            "render": self.parts.files.as_ref().map(|f| f.lock().unwrap_or_else(|e| e.into_inner()).clone()),
            "sync": sync,
            "snapshot_file": self.parts.snapshot_stats.as_ref().map(|s| json!({
                "revision": s.revision(),
                "writes": s.writes(),
                "failures": s.failures(),
            })),
            "transitions": transitions,
            "transitions_total": transitions_total,
            "writes_allowed": state.writes.allowed,
            "last_applied_unix_ms": snapshot
                .published_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
            "uptime_seconds": self.parts.started.elapsed().as_secs(),
            "version": env!("CARGO_PKG_VERSION"),
        })
    }

    fn metrics(&self, state: &Arc<AppState>) -> Result<String, std::fmt::Error> {
        metrics::render(state, &self.parts)
    }
}

/// The peak a burst of writes may take this sidecar to, from its settings and its mirror.
fn churn_peak(state: &AppState, snapshot: &Snapshot) -> u64 {
    checks::churn_peak_estimate(state.live.get(|c| c.sync.history_bytes), snapshot.bytes)
}
