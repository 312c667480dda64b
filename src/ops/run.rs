//! Wiring: [`serve`] builds every part from the configuration, starts the background tasks,
//! serves until its shutdown future completes, then drains and stops them. `main` and the tests
//! share it (through [`Running`] in the tests).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::{Config, Defaults, Live};
use crate::files::FileRenderer;
use crate::http::{self, server, AppState, Gate};
use crate::liveness::{Heartbeat, Liveness};
use crate::mirror::persist::{self, SnapshotWriter};
use crate::mirror::snapshot::{Entry, Source};
use crate::mirror::store::Store;
use crate::mirror::sync::WatchTask;
use crate::mode::handle::ModeHandle;
use crate::mode::machine::{Hysteresis, Signal};
use crate::mode::task::ModeTask;
use crate::ops::alerts::{AlertTask, Evaluate};
use crate::ops::allocator;
use crate::ops::report::Reporter;
use crate::ops::webhook::WebhookTask;
use crate::upstream::{EndpointPool, ProbeResults, ProbeTask};

/// Runs the sidecar on `listener` until `shutdown` completes: loads the disk snapshot if there is
/// one, starts the sync, probe and mode tasks, serves HTTP, drains, then stops the tasks and
/// writes the snapshot a last time.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_live(Live::fixed(config), listener, shutdown).await
}

/// [`serve`], following `live` for the settings a reload may change (see [`Live`]); everything
/// else is taken from it once, at start.
pub async fn serve_live(
    live: Live,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let config = live.get(Config::clone);
    let store = Arc::new(Store::with_history_bytes(config.sync.history_bytes));
    let mode = Arc::new(ModeHandle::default());
    let (signals, signals_rx) = mpsc::channel(256);
    let (verdicts, verdicts_rx) = mpsc::channel(16);
    let liveness = Arc::new(Liveness::default());
    let mut tasks = Vec::new();
    let mut spawn = |name, task: JoinHandle<()>, heartbeat: Option<Arc<Heartbeat>>| {
        liveness.watch(name, task.abort_handle(), heartbeat);
        tasks.push(task);
    };

    // Always running, so that a webhook configured by a reload gets the alerts after it.
    let (webhook, alerts) = WebhookTask::new(live.clone(), config.sync.backoff_min);
    spawn("webhook", tokio::spawn(webhook.run()), None);
    // Mode transitions go to the alerts task (started once the state it checks exists).
    let (transitions, transitions_rx) = mpsc::channel(64);
    let hysteresis = Hysteresis {
        degrade_after: config.mode.degrade_after,
        recover_after: config.mode.recover_after,
    };
    let pool = Arc::new(EndpointPool::new(
        config.etcd.clone(),
        config.sync.prefixes.as_slice()[0].clone(),
    ));
    let mode_task = ModeTask::new(
        hysteresis,
        mode.clone(),
        signals_rx,
        verdicts_rx,
        transitions,
    )
    .with_pin_control(live.clone(), pool.clone());
    spawn("mode", tokio::spawn(mode_task.run()), None);

    let prefixes = config.sync.prefixes.as_slice().to_vec();
    let mut fallback = None;
    let writer = config.snapshot.as_ref().map(|snap| {
        let mut on_disk = 0;
        match persist::load(&snap.path, &prefixes) {
            Ok(Some(file)) => {
                on_disk = file.revision;
                tracing::info!(path = %snap.path.display(), revision = file.revision, keys = file.entries.len(), "snapshot found; brought up to date from etcd, or served if etcd does not answer first");
                fallback = Some(Arc::new(file));
            }
            Ok(None) => tracing::info!(path = %snap.path.display(), "no snapshot yet"),
            Err(e) => tracing::warn!(path = %snap.path.display(), error = %e, "snapshot ignored"),
        }
        SnapshotWriter::new(
            store.clone(),
            snap.path.clone(),
            prefixes.clone(),
            mode.clone(),
            on_disk,
            snap.write_timeout,
        )
    });

    let mut sync = WatchTask::new(
        pool.clone(),
        store.clone(),
        config.sync.clone(),
        live.clone(),
        mode.clone(),
        signals.clone(),
    );
    if let Some(file) = &fallback {
        // With etcd up, the first load reads only what changed since the snapshot.
        sync = sync.with_resume(file.clone());
    }
    let probes = ProbeTask::new(pool.clone(), live.clone(), verdicts, prefixes[0].clone());
    // A short-lived task, so not watched by liveness; aborted at shutdown with the rest.
    let fallback = match (fallback, &config.defaults) {
        (Some(file), _) => Some(Fallback::Snapshot(file)),
        (None, Some(defaults)) => Some(Fallback::Defaults(Arc::new(defaults.clone()))),
        (None, None) => None,
    };
    let fallback = fallback.map(|fallback| {
        tokio::spawn(serve_fallback_unless_etcd_answers(
            store.clone(),
            mode.clone(),
            signals,
            probes.results(),
            fallback,
        ))
    });
    let files = (!config.render.is_empty())
        .then(|| FileRenderer::new(store.clone(), config.render.clone()));
    let mut reporter = Reporter::new(
        &config,
        probes.results(),
        writer.as_ref().map(|w| w.stats()),
    );
    reporter.parts.files = files.as_ref().map(FileRenderer::statuses);
    if let Some(files) = files {
        spawn("render", tokio::spawn(files.run()), None);
    }
    if let Some(trim) = allocator::installed_trim() {
        let trimmer = allocator::Trimmer::new(store.subscribe_changes(), trim);
        spawn("allocator-trim", tokio::spawn(trimmer.run()), None);
    }
    let state = AppState::new(
        &config,
        store,
        pool,
        sync.status(),
        mode,
        Arc::new(reporter.clone()),
    )
    .with_liveness(liveness.clone())
    .with_live(live.clone());
    let evaluate: Evaluate = {
        let (state, reporter) = (state.clone(), reporter.clone());
        Box::new(move || {
            let snapshot = state.store.snapshot();
            if !snapshot.loaded {
                return None;
            }
            let probes = reporter
                .parts
                .probes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            Some(reporter.checks(&state, &snapshot, &probes))
        })
    };
    let alerting = AlertTask::new(
        live.clone(),
        evaluate,
        transitions_rx,
        alerts,
        reporter.parts.alerts.clone(),
    );
    spawn("alerts", tokio::spawn(alerting.run()), None);
    let closer = state.clone();
    let beat = sync.heartbeat();
    spawn("sync", tokio::spawn(sync.run()), Some(beat));
    let beat = probes.heartbeat();
    spawn("probes", tokio::spawn(probes.run()), Some(beat));
    let (stop_writer, writer_stopped) = oneshot::channel::<()>();
    let writer = writer.map(|w| {
        let beat = w.heartbeat();
        let task = tokio::spawn(w.run(async {
            let _ = writer_stopped.await;
        }));
        liveness.watch("snapshot-writer", task.abort_handle(), Some(beat));
        task
    });

    let gate = Gate::new(listener.local_addr()?, &config.http.allowed_hosts);
    if !config.http.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.http.listen, "listening on an address other hosts can reach (--allow-remote)");
    }
    let state = Arc::new(state);
    // Consul's KV API on a listener of its own, over the same state; it stops with the main one.
    let consul = match config.http.consul_listen {
        None => None,
        Some(addr) => {
            let consul_listener = TcpListener::bind(addr).await?;
            let gate = Gate::new(consul_listener.local_addr()?, &config.http.allowed_hosts);
            tracing::info!(listen = %consul_listener.local_addr()?, "serving Consul's KV API");
            let service = http::consul_service(state.clone(), gate);
            let stopped = closed(&state);
            let live = live.clone();
            Some(tokio::spawn(async move {
                server::run(consul_listener, service, stopped, || limits(&live)).await
            }))
        }
    };
    // etcd's gRPC API on a listener of its own too; it stops with the main one.
    let grpc = match config.http.grpc_listen {
        None => None,
        Some(addr) => {
            let grpc_listener = TcpListener::bind(addr).await?;
            tracing::info!(listen = %grpc_listener.local_addr()?, "serving etcd's gRPC API");
            Some(tokio::spawn(crate::http::grpc::run(
                grpc_listener,
                state.clone(),
                closed(&state),
            )))
        }
    };
    let service = http::service(state, gate);
    let shutdown = async move {
        shutdown.await;
        // Streams and blocking queries end now; ordinary requests finish within the grace.
        closer.close();
    };
    let result = server::run(listener, service, shutdown, || limits(&live)).await;
    if let Some(consul) = consul {
        if let Ok(Err(e)) = consul.await {
            tracing::error!(error = %e, "the Consul listener failed");
        }
    }
    if let Some(grpc) = grpc {
        if let Ok(Err(e)) = grpc.await {
            tracing::error!(error = %e, "the gRPC listener failed");
        }
    }
    for task in tasks.iter().chain(&fallback) {
        task.abort();
    }
    // The last write at shutdown: the mirror as it was when serving stopped. A write that hangs
    // (a wedged disk) must not hang the exit too.
    let _ = stop_writer.send(());
    if let Some(writer) = writer {
        let grace = live.get(|c| c.http.shutdown_grace);
        if tokio::time::timeout(grace, writer).await.is_err() {
            tracing::error!("the last snapshot write did not finish within the shutdown grace");
        }
    }
    result
}

/// Completes when shutdown begins: the second listeners stop with the main one.
fn closed(state: &AppState) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut closing = state.closing.clone();
    async move {
        let _ = closing.wait_for(|c| *c).await;
    }
}

/// The connection limits in force now (a reload may change them for the connections after).
fn limits(live: &Live) -> server::connection::ConnectionLimits {
    live.get(|c| server::connection::ConnectionLimits {
        header_read_timeout: c.http.header_read_timeout,
        idle_timeout: c.http.idle_timeout,
        send_timeout: c.http.send_timeout,
        shutdown_grace: c.http.shutdown_grace,
        max_connections: c.http.max_connections,
    })
}

/// The HTTP side's state for `config` over `store` and `mode`, with no background task behind it
/// (no sync, probes or snapshot writer) and a pool that connects only when a request needs etcd:
/// what tests and benchmarks drive the handlers with, without a cluster.
pub fn standalone_state(config: &Config, store: Arc<Store>, mode: Arc<ModeHandle>) -> AppState {
    let pool = Arc::new(EndpointPool::new(
        config.etcd.clone(),
        config.sync.prefixes.as_slice()[0].clone(),
    ));
    let (_, sync) = tokio::sync::watch::channel(Default::default());
    let reporter = Reporter::new(config, ProbeResults::default(), None);
    AppState::new(config, store, pool, sync, mode, Arc::new(reporter))
}

/// How long a restarted sidecar waits for etcd before it serves its disk snapshot, when etcd's
/// members answer but have not given it data yet. The snapshot may be older than what was served
/// before the restart; etcd's data never is, so it is preferred whenever it comes quickly.
pub const SNAPSHOT_FALLBACK_AFTER: Duration = Duration::from_secs(2);

/// What a start serves when etcd gives it nothing in time.
enum Fallback {
    /// The disk snapshot.
    Snapshot(Arc<persist::SnapshotFile>),
    /// The bundled defaults, when no snapshot is usable.
    Defaults(Arc<Defaults>),
}

/// Serves the fallback unless etcd answers first: as soon as the first probe round finds no
/// member with quorum (etcd cannot give current data), or after [`SNAPSHOT_FALLBACK_AFTER`]. If
/// the sync loads from etcd before that, the fallback is dropped.
async fn serve_fallback_unless_etcd_answers(
    store: Arc<Store>,
    mode: Arc<ModeHandle>,
    signals: mpsc::Sender<Signal>,
    probes: ProbeResults,
    fallback: Fallback,
) {
    let started = tokio::time::Instant::now();
    while !store.is_loaded() && started.elapsed() < SNAPSHOT_FALLBACK_AFTER {
        let no_quorum = {
            let round = probes.lock().unwrap_or_else(|e| e.into_inner());
            round.iter().all(|p| p.at_unix_ms != 0) && !round.iter().any(|p| p.quorum)
        };
        if no_quorum {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let file = match fallback {
        Fallback::Snapshot(file) => file,
        Fallback::Defaults(defaults) => {
            let entries = defaults
                .entries
                .iter()
                .map(|(k, v)| Entry::new(bytes::Bytes::from(k.clone()), v.as_bytes(), 0, 0, 1))
                .collect();
            // Revision 0 and no cluster: etcd's first load replaces them wholesale.
            match store.load_fallback(0, 0, entries, Source::Defaults) {
                Ok(true) => {
                    let _ = signals.send(Signal::LoadedFromDefaults).await;
                    tracing::warn!(
                        path = %defaults.path.display(),
                        keys = defaults.entries.len(),
                        "etcd gave no data and no snapshot is usable: serving the bundled defaults until etcd answers"
                    );
                }
                Ok(false) => tracing::info!("etcd answered first; the defaults are not needed"),
                Err(e) => tracing::warn!(error = %e, "defaults not loaded"),
            }
            return;
        }
    };
    let (revision, keys) = (file.revision, file.entries.len());
    let confirmed = SystemTime::UNIX_EPOCH + Duration::from_millis(file.confirmed_at_unix_ms);
    match store.load_fallback(
        file.cluster_id,
        file.revision,
        file.entries.clone(),
        Source::Snapshot,
    ) {
        Ok(true) => {
            mode.confirm(confirmed);
            let _ = signals.send(Signal::LoadedFromSnapshot).await;
            tracing::info!(
                revision,
                keys,
                "serving the disk snapshot until etcd answers"
            );
        }
        Ok(false) => tracing::info!("etcd answered first; the disk snapshot is not needed"),
        Err(e) => tracing::warn!(error = %e, "snapshot not loaded"),
    }
}

/// A sidecar running in the background of this process: what tests and embedders use.
pub struct Running {
    /// The address it serves on.
    pub addr: SocketAddr,
    /// Fires the shutdown.
    stop: Option<oneshot::Sender<()>>,
    /// The server task.
    task: JoinHandle<io::Result<()>>,
}

impl Running {
    /// Binds `config.http.listen` (port 0 picks a free port) and starts serving.
    pub async fn start(config: Config) -> io::Result<Running> {
        let listener = TcpListener::bind(config.http.listen).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(config, listener, async {
            let _ = stopped.await;
        }));
        Ok(Running {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// Stops it and waits for the drain.
    pub async fn stop(mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.map_err(io::Error::other)?
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}
