//! config-sidecar: mirrors etcd v3 key prefixes into memory and serves them to the application
//! beside it over localhost HTTP.
//!
//! Data flows one way: etcd → [`sync`] → [`store`] → [`http`]. Modules, one job each:
//!
//! - [`config`]: flags, environment variables and the TOML file, validated before anything binds.
//! - [`keys`]: URL path → etcd key (decode once, validate), prefix ranges.
//! - [`etcd`]: one client per etcd member, member health, and the choice of member.
//! - [`sync`]: the [`sync::WatchTask`]: paged load at one revision, then a watch, reconnects,
//!   compaction resyncs.
//! - [`store`]: immutable [`store::Snapshot`] per revision, swapped atomically.
//! - [`render`]: prefix listings and tree views, cached by revision in a weight-bounded moka cache.
//! - [`mode`]: the serving mode reported with every response.
//! - [`error`]: the one mapping from errors to JSON HTTP responses.
//! - [`http`]: routes, handlers and the middleware chain ([`http::app`]).
//! - [`server`]: accept loop and graceful drain ([`server::run`]).
//! - [`telemetry`]: logging setup.

pub mod config;
pub mod error;
pub mod etcd;
pub mod http;
pub mod keys;
pub mod mode;
pub mod render;
pub mod server;
pub mod store;
pub mod sync;
pub mod telemetry;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::etcd::EndpointPool;
use crate::store::Store;
use crate::sync::WatchTask;

/// Runs the sidecar on `listener` until `shutdown` completes: starts the sync task, serves HTTP,
/// drains, then stops the sync task.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let store = Arc::new(Store::new());
    let pool = Arc::new(EndpointPool::new(
        config.etcd.clone(),
        config.sync.endpoint_cooldown,
    ));
    let task = WatchTask::new(
        pool.clone(),
        store.clone(),
        config.sync.clone(),
        config.etcd.request_timeout,
    );
    let state = http::AppState::new(&config, store, pool, task.status());
    let sync = tokio::spawn(task.run());
    let app = http::app(state, config.http.request_timeout);
    let result = server::run(listener, app, shutdown, config.http.shutdown_grace).await;
    sync.abort();
    result
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
