//! Configuration: every setting declared once in [`settings`] (flag, `CONFIG_SIDECAR_*`
//! environment variable, TOML file key, default, whether SIGHUP applies it), then resolved and
//! validated into [`Config`] before anything binds or connects ([`resolve`]); a bad setting is
//! one message naming it and exit code 2; [`choices`] holds the settings named from a few words.
//! [`Live`] follows the settings a reload may change;
//! [`Prefixes`] are the mirrored key prefixes, normalised.

pub mod choices;
pub mod defaults;
mod file;
pub mod live;
pub mod prefixes;
pub mod render;
pub mod resolve;
pub mod secret;
pub mod settings;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use choices::log_filter;
pub use defaults::Defaults;
pub use live::Live;
pub use prefixes::{prefix_range_end, Prefixes};
pub use render::{Format, OnChange, RenderTarget, Template};
pub use secret::Secret;
pub use settings::{
    Cli, Environment, Given, LogFormat, PinSetting, Selection, Settings, WebhookFormat,
    DEFAULT_ENDPOINTS, DEFAULT_LISTEN,
};

/// How the sidecar talks to etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdConfig {
    /// Member URLs, in the order given.
    pub endpoints: Vec<String>,
    /// TCP connect deadline per member.
    pub dial_timeout: Duration,
    /// Deadline of one unary call.
    pub request_timeout: Duration,
    /// HTTP/2 keep-alive ping interval.
    pub keepalive_interval: Duration,
    /// HTTP/2 keep-alive ping timeout.
    pub keepalive_timeout: Duration,
    /// TLS towards the members (the endpoints are `https://`).
    pub tls: Option<EtcdTls>,
    /// Username and password, for clusters with authentication enabled.
    pub auth: Option<EtcdAuth>,
    /// Which healthy member each request goes to.
    pub selection: Selection,
    /// The first rest of a failing member.
    pub cooldown: Duration,
    /// The longest rest of a member that keeps failing.
    pub cooldown_max: Duration,
    /// The endpoints are etcd gRPC proxies: the watch and keep-alive behave as they accept.
    pub grpc_proxy: bool,
}

/// TLS towards etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdTls {
    /// PEM of the CA that signed the members' certificates; `None` trusts the system's roots.
    pub ca_pem: Option<String>,
    /// Client certificate PEM, for members started with `--client-cert-auth`.
    pub cert_pem: Option<String>,
    /// The client certificate's private key PEM.
    pub key_pem: Option<Secret>,
}

/// etcd username/password authentication.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdAuth {
    /// The etcd user.
    pub username: String,
    /// Its password, from a file or the environment.
    pub password: Secret,
}

/// How the sync task behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncConfig {
    /// What to mirror.
    pub prefixes: Prefixes,
    /// Silence after which a watch is reopened.
    pub watch_deadline: Duration,
    /// Reconnect backoff floor.
    pub backoff_min: Duration,
    /// Reconnect backoff ceiling.
    pub backoff_max: Duration,
    /// Longest random wait before a first load without a snapshot: a fleet's starts spread.
    pub first_load_jitter: Duration,
    /// Longest random wait before a catch-up after an outage: a fleet's catch-ups spread.
    pub catch_up_jitter: Duration,
    /// Keys per page of a full load.
    pub page_size: i64,
    /// Most bytes of change history kept.
    pub history_bytes: u64,
}

/// How the HTTP side behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where to serve Consul's KV API too, if anywhere.
    pub consul_listen: Option<SocketAddr>,
    /// Where to serve etcd's gRPC API too, if anywhere.
    pub grpc_listen: Option<SocketAddr>,
    /// Drain time at shutdown.
    pub shutdown_grace: Duration,
    /// Weight bound of the rendered-body cache.
    pub cache_bytes: u64,
    /// Time a client gets to send a request head, from its first byte.
    pub header_read_timeout: Duration,
    /// Time a connection may idle (nothing in flight, no bytes moving) before it is closed.
    pub idle_timeout: Duration,
    /// Time a request body gets to arrive, once its head has.
    pub body_read_timeout: Duration,
    /// Time a response may wait for the client to take more of it before the connection closes.
    pub send_timeout: Duration,
    /// Whether a non-loopback listen address was allowed explicitly.
    pub allow_remote: bool,
    /// Extra names accepted in the Host header.
    pub allowed_hosts: Vec<String>,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Most change streams open at once.
    pub max_streams: usize,
    /// Most blocking queries waiting at once.
    pub max_blocking_queries: usize,
}

/// The degradation ladder: probes, hysteresis, the webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct ModeConfig {
    /// Time between probe rounds.
    pub probe_interval: Duration,
    /// Longest time between probe rounds while an outage lasts: a fleet's probes back off.
    pub probe_interval_max: Duration,
    /// Timeout of each probe check.
    pub probe_timeout: Duration,
    /// Time between probe rounds while the watch is healthy.
    pub probe_idle_interval: Duration,
    /// Consecutive bad rounds before degrading.
    pub degrade_after: u32,
    /// Consecutive good rounds before recovering.
    pub recover_after: u32,
    /// Where transitions are posted.
    pub webhook: Option<String>,
    /// The webhook's body.
    pub webhook_format: WebhookFormat,
    /// The flapping bound of alerts, per check.
    pub alert_min_interval: Duration,
    /// The mode pinned by configuration.
    pub pin: PinSetting,
    /// The bearer token of the admin API, read from its file; never printed.
    pub admin_token: Option<Secret>,
}

/// Writes through the sidecar.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteConfig {
    /// Whether writes are accepted at all.
    pub allowed: bool,
    /// The bearer token writes must present, read from the token file; never printed.
    pub token: Option<Secret>,
}

/// The disk snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotConfig {
    /// Where it lives.
    pub path: PathBuf,
    /// Whether readiness waits for etcd even when the snapshot loaded.
    pub ready_requires_etcd: bool,
    /// Longest a write may take before the writer counts as stalled.
    pub write_timeout: Duration,
}

impl SnapshotConfig {
    /// A snapshot at `path` with the default settings.
    pub fn at(path: PathBuf) -> SnapshotConfig {
        SnapshotConfig {
            path,
            ready_requires_etcd: false,
            write_timeout: settings::default_duration("snapshot_write_timeout"),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Health probes and mode hysteresis.
    pub mode: ModeConfig,
    /// Writes.
    pub writes: WriteConfig,
    /// The disk snapshot, if any.
    pub snapshot: Option<SnapshotConfig>,
    /// The bundled defaults, if any: served when etcd gives nothing and no snapshot is usable.
    pub defaults: Option<Defaults>,
    /// The files rendered from the mirror.
    pub render: Vec<RenderTarget>,
    /// etcd connection settings.
    pub etcd: EtcdConfig,
    /// Mirror settings.
    pub sync: SyncConfig,
    /// HTTP settings.
    pub http: HttpConfig,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter directive.
    pub log_level: String,
    /// Resident memory budget in bytes, for the memory health check.
    pub memory_budget: Option<u64>,
    /// Runtime worker threads.
    pub worker_threads: usize,
    /// The text every setting was given: what a reload compares.
    pub given: Given,
}

/// A setting that is wrong, named so the operator knows what to fix.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {setting}: {reason}")]
pub struct ConfigError {
    /// The flag (or `--config`, for the file) at fault.
    pub setting: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    /// `setting` is wrong for `reason`.
    pub fn new(setting: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            setting: setting.to_string(),
            reason: reason.into(),
        }
    }
}

/// The directory a file at `path` lives in (`.` for a bare file name): for the disk snapshot,
/// where its temp file is written and what must be writable.
pub fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
