//! What the handlers share: [`AppState`], and the [`Report`] through which the operator's layer
//! above, which sees every part, says what `/v1/status` and `/metrics` show.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Config, Live, Prefixes, Secret, WriteConfig};
use crate::http::counters::{RequestMetrics, Subscribers};
use crate::liveness::Liveness;
use crate::mirror::render::RenderCache;
use crate::mirror::snapshot::Snapshot;
use crate::mirror::store::Store;
use crate::mirror::sync::{SyncState, SyncStatus};
use crate::mode::handle::ModeHandle;
use crate::upstream::EndpointPool;

/// The bodies of the operator's endpoints, from the layer above that can see every part.
pub trait Report: Send + Sync {
    /// The JSON of `/v1/status`, as of `snapshot` (the one its headers name).
    fn status(&self, state: &Arc<AppState>, snapshot: &Snapshot) -> serde_json::Value;
    /// The OpenMetrics text of `/metrics`.
    fn metrics(&self, state: &Arc<AppState>) -> Result<String, std::fmt::Error>;
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The mirror.
    pub store: Arc<Store>,
    /// What is mirrored, to tell "outside" from "missing".
    pub prefixes: Prefixes,
    /// Rendered listings and trees.
    pub cache: Arc<RenderCache>,
    /// The serving mode and staleness.
    pub mode: Arc<ModeHandle>,
    /// Clients for consistent reads and writes.
    pub pool: Arc<EndpointPool>,
    /// Whether and how writes are accepted.
    pub writes: WriteConfig,
    /// The admin API's bearer token; without one the admin routes answer 403.
    pub admin_token: Option<Secret>,
    /// The settings SIGHUP may change (etcd call deadline, retry hint, memory budget), read per use.
    pub live: Live,
    /// Becomes true at shutdown, so that streams and blocking queries end and the drain finishes.
    pub closing: watch::Receiver<bool>,
    /// Sets `closing`.
    close: Arc<watch::Sender<bool>>,
    /// Requests by route and status, and their latency, counted per thread.
    pub requests: Arc<RequestMetrics>,
    /// Open streams and blocking queries.
    pub subscribers: Arc<Subscribers>,
    /// The sync task's own report: readiness may wait for it to reach etcd.
    pub sync: watch::Receiver<SyncStatus>,
    /// Whether readiness waits for etcd when the mirror came from the disk snapshot.
    pub ready_requires_etcd: bool,
    /// The background tasks, for `/healthz`.
    pub liveness: Arc<Liveness>,
    /// What `/v1/status` and `/metrics` say.
    pub report: Arc<dyn Report>,
}

impl AppState {
    /// The state for `config`, reading `store` and reporting through `report`.
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        pool: Arc<EndpointPool>,
        sync: watch::Receiver<SyncStatus>,
        mode: Arc<ModeHandle>,
        report: Arc<dyn Report>,
    ) -> Self {
        let (close, closing) = watch::channel(false);
        AppState {
            store,
            prefixes: config.sync.prefixes.clone(),
            cache: Arc::new(RenderCache::new(config.http.cache_bytes)),
            mode,
            pool,
            writes: config.writes.clone(),
            admin_token: config.mode.admin_token.clone(),
            live: Live::fixed(config.clone()),
            closing,
            close: Arc::new(close),
            requests: Arc::new(RequestMetrics::new(crate::http::route_paths())),
            subscribers: Arc::new(Subscribers::new(
                config.http.max_streams,
                config.http.max_blocking_queries,
            )),
            sync,
            ready_requires_etcd: config
                .snapshot
                .as_ref()
                .is_some_and(|s| s.ready_requires_etcd),
            liveness: Arc::default(),
            report,
        }
    }

    /// The same state, following `live` for the settings SIGHUP may change.
    pub fn with_live(mut self, live: Live) -> Self {
        self.live = live;
        self
    }

    /// The same state, watching these tasks for `/healthz`.
    pub fn with_liveness(mut self, liveness: Arc<Liveness>) -> Self {
        self.liveness = liveness;
        self
    }

    /// Seconds a refused write should wait before retrying: about one recovery (the probe rounds
    /// the mode needs to come back), from the settings as they are now.
    pub fn retry_after(&self) -> u64 {
        self.live
            .get(|c| c.mode.probe_interval * c.mode.recover_after)
            .as_secs()
            .max(1)
    }

    /// The deadline of one etcd call made for a request, now.
    pub fn etcd_timeout(&self) -> Duration {
        self.live.get(|c| c.etcd.request_timeout)
    }

    /// Ends every stream and blocking query: called when shutdown begins.
    pub fn close(&self) {
        self.close.send_replace(true);
    }

    /// Whether `/readyz` answers 200: something is loaded and the mode machine has taken it in
    /// (the data is published a moment before the machine leaves `starting`, and a ready sidecar
    /// must say which mode serves it), and, when readiness requires etcd, etcd has been reached.
    pub fn ready(&self, snapshot: &Snapshot) -> bool {
        if !snapshot.loaded || self.mode.mode() == crate::mode::Mode::Starting {
            return false;
        }
        if !self.ready_requires_etcd {
            return true;
        }
        let sync = self.sync.borrow();
        sync.full_loads + sync.resumes > 0 || sync.state == SyncState::Watching
    }
}
