//! Configuration: command-line flags, each with a `CONFIG_SIDECAR_*` environment variable, over an
//! optional TOML file, over the `DEFAULT_*` constants below. Everything is parsed and validated
//! before anything binds or connects; a bad setting is one message naming it and exit code 2.
//!
//! Precedence: flag, then environment variable, then file, then default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

pub mod prefixes;

pub use prefixes::{prefix_range_end, Prefixes};

/// Default etcd endpoint: a local member on etcd's client port.
pub const DEFAULT_ENDPOINTS: &str = "http://127.0.0.1:2379";
/// Default listen address: loopback only, on the sidecar's documented port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7379";
/// Default time allowed to open a TCP connection to one etcd member.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Default deadline for one unary etcd call (a range page).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default HTTP/2 keep-alive ping interval towards etcd; with the timeout below a frozen member is
/// noticed in about two seconds instead of never.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// Default time to wait for a keep-alive ping's answer.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default silence after which a watch stream is treated as stuck and reopened. The sync task asks
/// for a progress notification at a third of it, so a healthy stream is never silent this long.
pub const DEFAULT_WATCH_DEADLINE: Duration = Duration::from_secs(6);
/// Default smallest reconnect backoff.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Default largest reconnect backoff.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Default time a failed endpoint rests before it is tried again (unless every endpoint failed).
pub const DEFAULT_ENDPOINT_COOLDOWN: Duration = Duration::from_secs(5);
/// Default number of keys per page of the initial load (one page stays well under etcd-client's
/// decode limit for 1 KiB values; the limit itself is raised for larger values).
pub const DEFAULT_PAGE_SIZE: i64 = 1000;
/// Default time in-flight HTTP requests get to finish at shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default time a client gets to send a whole request head, counted from its first byte: the guard
/// against clients that trickle headers to hold connections open (slowloris).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time an HTTP connection may sit with no request in flight and no bytes moving before it
/// is closed. Long, because closing a pooled connection races with the client reusing it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a request body (a write's value) must arrive in, once its head has.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default most connections open at once; more are answered 503 and closed. Room for an app
/// with a thousand change streams open, and a bound on what a runaway client can hold.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default most change streams open at once (each holds a connection and a buffer).
pub const DEFAULT_MAX_STREAMS: usize = 2048;
/// Default most blocking queries waiting at once.
pub const DEFAULT_MAX_BLOCKING_QUERIES: usize = 2048;
/// Default time between health probe rounds.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Default timeout of each probe check.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// Default consecutive bad probe rounds before the mode degrades.
pub const DEFAULT_DEGRADE_AFTER: u32 = 3;
/// Default consecutive good probe rounds before the mode recovers.
pub const DEFAULT_RECOVER_AFTER: u32 = 2;
/// Default time one disk snapshot write may take before the writer counts as stalled (liveness
/// fails): far beyond a healthy disk, well within a wedged one.
pub const DEFAULT_SNAPSHOT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default weight bound of the rendered-body cache, in bytes.
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// The command line. Every flag has an environment variable; all are optional here so that the
/// TOML file and the defaults can fill what is not given.
#[derive(Debug, Clone, Parser, Default)]
#[command(
    name = "config-sidecar",
    version,
    about = "Serves etcd-backed configuration to the application beside it over localhost HTTP."
)]
pub struct Cli {
    /// etcd endpoints (comma-separated URLs, e.g. http://127.0.0.1:2379).
    #[arg(long, env = "CONFIG_SIDECAR_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Key prefix to mirror; repeat the flag for more (must start with '/').
    #[arg(
        long = "prefix",
        env = "CONFIG_SIDECAR_PREFIXES",
        value_delimiter = ','
    )]
    pub prefixes: Vec<String>,
    /// Address to serve HTTP on [default: 127.0.0.1:7379]; a non-loopback address needs
    /// --allow-remote.
    #[arg(long, env = "CONFIG_SIDECAR_LISTEN")]
    pub listen: Option<String>,
    /// Allow --listen on an address other hosts can reach (the sidecar is meant for the app
    /// beside it; a warning is logged).
    #[arg(long, env = "CONFIG_SIDECAR_ALLOW_REMOTE", num_args = 0..=1, default_missing_value = "true")]
    pub allow_remote: Option<bool>,
    /// More names the app may use for the sidecar in its Host header (comma-separated), beside
    /// `localhost`, `127.0.0.1` and `[::1]`.
    #[arg(long, env = "CONFIG_SIDECAR_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// TOML configuration file.
    #[arg(long, env = "CONFIG_SIDECAR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: plain or json [default: plain].
    #[arg(long, env = "CONFIG_SIDECAR_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Log level or tracing filter (e.g. info, debug, config_sidecar=trace) [default: info].
    #[arg(long, env = "CONFIG_SIDECAR_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Time to open a connection to one etcd member [default: 2s].
    #[arg(long, env = "CONFIG_SIDECAR_DIAL_TIMEOUT")]
    pub dial_timeout: Option<String>,
    /// Deadline of one etcd request [default: 5s].
    #[arg(long, env = "CONFIG_SIDECAR_REQUEST_TIMEOUT")]
    pub request_timeout: Option<String>,
    /// Silence after which a watch stream is reopened [default: 6s].
    #[arg(long, env = "CONFIG_SIDECAR_WATCH_DEADLINE")]
    pub watch_deadline: Option<String>,
    /// Time in-flight requests get to finish at shutdown [default: 10s].
    #[arg(long, env = "CONFIG_SIDECAR_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// File the mirror is saved to and served from after a restart while etcd is unreachable.
    #[arg(long, env = "CONFIG_SIDECAR_SNAPSHOT")]
    pub snapshot: Option<PathBuf>,
    /// Accept writes (PUT / DELETE) inside the mirrored prefixes and forward them to etcd.
    #[arg(long, env = "CONFIG_SIDECAR_ALLOW_WRITES", num_args = 0..=1, default_missing_value = "true")]
    pub allow_writes: Option<bool>,
    /// File holding the bearer token that writes must present.
    #[arg(long, env = "CONFIG_SIDECAR_WRITE_TOKEN_FILE")]
    pub write_token_file: Option<PathBuf>,
    /// URL that mode transitions are POSTed to as JSON (http only).
    #[arg(long, env = "CONFIG_SIDECAR_WEBHOOK")]
    pub webhook: Option<String>,
    /// Time between health probe rounds [default: 1s].
    #[arg(long, env = "CONFIG_SIDECAR_PROBE_INTERVAL")]
    pub probe_interval: Option<String>,
    /// With a snapshot, report ready only once etcd has been reached (default: ready on the snapshot).
    #[arg(long, env = "CONFIG_SIDECAR_READY_REQUIRES_ETCD", num_args = 0..=1, default_missing_value = "true")]
    pub ready_requires_etcd: Option<bool>,
    /// PEM file of the CA that signed the etcd members' certificates (https:// endpoints;
    /// without it the system's roots are trusted).
    #[arg(long, env = "CONFIG_SIDECAR_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// PEM client certificate for etcd members started with --client-cert-auth.
    #[arg(long, env = "CONFIG_SIDECAR_ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<PathBuf>,
    /// PEM private key of --etcd-cert-file.
    #[arg(long, env = "CONFIG_SIDECAR_ETCD_KEY_FILE")]
    pub etcd_key_file: Option<PathBuf>,
    /// etcd user, for clusters with authentication enabled.
    #[arg(long, env = "CONFIG_SIDECAR_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, env = "CONFIG_SIDECAR_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
    /// The etcd user's password; prefer the environment variable or --etcd-password-file, since
    /// a flag shows in the process list.
    #[arg(long, env = "CONFIG_SIDECAR_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<Secret>,
    /// Resident memory the sidecar should stay under (e.g. 200MiB); the memory health check is
    /// degraded above 80% of it and unhealthy above it [default: none].
    #[arg(long, env = "CONFIG_SIDECAR_MEMORY_BUDGET")]
    pub memory_budget: Option<String>,
    /// Do not serve: ask the sidecar listening on --listen for this path (/healthz, or /readyz)
    /// and exit 0 on a 200, 1 otherwise: a container health check without curl in the image.
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "/healthz")]
    pub healthcheck: Option<String>,
}

/// The TOML file: the same settings, snake_case, durations as strings ("2s", "500ms").
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    endpoints: Option<Vec<String>>,
    prefixes: Option<Vec<String>>,
    listen: Option<String>,
    log_format: Option<String>,
    log_level: Option<String>,
    dial_timeout: Option<String>,
    request_timeout: Option<String>,
    watch_deadline: Option<String>,
    shutdown_grace: Option<String>,
    keepalive_interval: Option<String>,
    keepalive_timeout: Option<String>,
    backoff_min: Option<String>,
    backoff_max: Option<String>,
    endpoint_cooldown: Option<String>,
    page_size: Option<i64>,
    cache_bytes: Option<u64>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    body_read_timeout: Option<String>,
    allow_remote: Option<bool>,
    allowed_hosts: Option<Vec<String>>,
    max_connections: Option<usize>,
    max_streams: Option<usize>,
    max_blocking_queries: Option<usize>,
    snapshot: Option<PathBuf>,
    allow_writes: Option<bool>,
    write_token_file: Option<PathBuf>,
    webhook: Option<String>,
    probe_interval: Option<String>,
    probe_timeout: Option<String>,
    degrade_after: Option<u32>,
    recover_after: Option<u32>,
    ready_requires_etcd: Option<bool>,
    etcd_ca_file: Option<PathBuf>,
    etcd_cert_file: Option<PathBuf>,
    etcd_key_file: Option<PathBuf>,
    etcd_username: Option<String>,
    etcd_password_file: Option<PathBuf>,
    memory_budget: Option<String>,
    snapshot_write_timeout: Option<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line, for log shippers.
    Json,
}

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

/// A value that must never be printed: a password, a token, a private key. Its `Debug` and
/// `Display` say `<redacted>`; [`Secret::expose`] is the one way to the text.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// The secret text, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Self {
        Secret(text)
    }
}

impl From<&str> for Secret {
    fn from(text: &str) -> Self {
        Secret(text.to_string())
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Secret(text.to_string()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
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
    /// Rest period of a failed endpoint.
    pub endpoint_cooldown: Duration,
    /// Keys per page of a full load.
    pub page_size: i64,
}

/// How the HTTP side behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    /// Where to listen.
    pub listen: SocketAddr,
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
    /// Timeout of each probe check.
    pub probe_timeout: Duration,
    /// Consecutive bad rounds before degrading.
    pub degrade_after: u32,
    /// Consecutive good rounds before recovering.
    pub recover_after: u32,
    /// Where transitions are posted.
    pub webhook: Option<String>,
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
            write_timeout: DEFAULT_SNAPSHOT_WRITE_TIMEOUT,
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
}

/// The configuration as it stands now. SIGHUP may change its live settings while running (the
/// log level, the webhook, the probe interval and timeout, the etcd request timeout, the
/// connection timeouts and the shutdown grace); the parts that read those settings read them
/// here each time, the rest was fixed at start.
#[derive(Clone)]
pub struct Live(tokio::sync::watch::Receiver<Config>);

impl Live {
    /// Follows `receiver`, which the reload publishes into.
    pub fn new(receiver: tokio::sync::watch::Receiver<Config>) -> Live {
        Live(receiver)
    }

    /// A configuration that never changes (tests, embedders without reload).
    pub fn fixed(config: Config) -> Live {
        Live(tokio::sync::watch::channel(config).1)
    }

    /// Reads the current configuration through `f`.
    pub fn get<T>(&self, f: impl FnOnce(&Config) -> T) -> T {
        f(&self.0.borrow())
    }
}

/// A setting that is wrong, named so the operator knows what to fix.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {setting}: {reason}")]
pub struct ConfigError {
    /// The flag / env var / file key at fault.
    pub setting: String,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(setting: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        setting: setting.to_string(),
        reason: reason.into(),
    }
}

impl Config {
    /// Resolves the command line (with its environment variables) and the optional file into a
    /// validated configuration.
    pub fn from_cli(cli: Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let pick = |a: Option<String>, b: Option<String>| a.or(b);
        let duration = |name: &str, a: Option<String>, b: Option<String>, default: Duration| {
            match pick(a, b) {
                None => Ok(default),
                Some(text) => parse_duration(name, &text),
            }
        };

        let default_endpoints = || vec![DEFAULT_ENDPOINTS.to_string()];
        let endpoints = list_setting(
            cli.endpoints,
            Some(file.endpoints.unwrap_or_else(default_endpoints)),
        );
        if endpoints.is_empty() {
            return Err(invalid("--endpoints", "no etcd endpoint given"));
        }
        for e in &endpoints {
            validate_endpoint(e)?;
        }

        let prefixes = list_setting(cli.prefixes, file.prefixes);
        if prefixes.is_empty() {
            return Err(invalid(
                "--prefix",
                "no prefix to mirror: give --prefix /your/app/ (or CONFIG_SIDECAR_PREFIXES)",
            ));
        }
        for p in &prefixes {
            if !p.starts_with('/') {
                return Err(invalid("--prefix", format!("{p:?} must start with '/'")));
            }
            if p.contains('\0') {
                return Err(invalid("--prefix", format!("{p:?} contains a NUL byte")));
            }
        }

        let listen_text = pick(cli.listen, file.listen).unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            invalid(
                "--listen",
                format!("{listen_text:?} is not an address such as 127.0.0.1:7379"),
            )
        })?;

        let allow_remote = cli.allow_remote.or(file.allow_remote).unwrap_or(false);
        if !listen.ip().is_loopback() && !allow_remote {
            return Err(invalid(
                "--listen",
                format!(
                    "{listen} is reachable from other hosts; the sidecar serves the app beside it \
                     on loopback. Give --allow-remote to listen there anyway"
                ),
            ));
        }
        let allowed_hosts: Vec<String> = list_setting(cli.allowed_hosts, file.allowed_hosts)
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        for host in &allowed_hosts {
            let plain_name = host.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':')
            });
            if !plain_name || host.contains("://") {
                return Err(invalid(
                    "--allowed-hosts",
                    format!("{host:?} is not a host name or address (no scheme, no path)"),
                ));
            }
        }
        let limit = |name: &str, value: Option<usize>, default: usize| match value {
            Some(0) => Err(invalid(name, "must be at least 1")),
            v => Ok(v.unwrap_or(default)),
        };
        let max_connections = limit(
            "max_connections",
            file.max_connections,
            DEFAULT_MAX_CONNECTIONS,
        )?;
        let max_streams = limit("max_streams", file.max_streams, DEFAULT_MAX_STREAMS)?;
        let max_blocking_queries = limit(
            "max_blocking_queries",
            file.max_blocking_queries,
            DEFAULT_MAX_BLOCKING_QUERIES,
        )?;

        let log_format = match pick(cli.log_format, file.log_format).as_deref() {
            None | Some("plain") => LogFormat::Plain,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "--log-format",
                    format!("{other:?} is not one of: plain, json"),
                ))
            }
        };
        let log_level = pick(cli.log_level, file.log_level).unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(invalid(
                "--log-level",
                format!("{log_level:?} is not a level or tracing filter"),
            ));
        }

        let page_size = file.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
        if page_size < 1 {
            return Err(invalid("page_size", "must be at least 1"));
        }
        let backoff_min = duration("backoff_min", None, file.backoff_min, DEFAULT_BACKOFF_MIN)?;
        let backoff_max = duration("backoff_max", None, file.backoff_max, DEFAULT_BACKOFF_MAX)?;
        if backoff_max < backoff_min {
            return Err(invalid("backoff_max", "must not be below backoff_min"));
        }

        let webhook = pick(cli.webhook, file.webhook);
        if let Some(url) = &webhook {
            let ok = url
                .parse::<http::Uri>()
                .is_ok_and(|u| u.scheme_str() == Some("http") && u.host().is_some());
            if !ok {
                return Err(invalid(
                    "--webhook",
                    format!("{url:?} is not an http:// URL"),
                ));
            }
        }
        let degrade_after = file.degrade_after.unwrap_or(DEFAULT_DEGRADE_AFTER);
        let recover_after = file.recover_after.unwrap_or(DEFAULT_RECOVER_AFTER);
        if degrade_after == 0 || recover_after == 0 {
            return Err(invalid(
                "degrade_after / recover_after",
                "must be at least 1",
            ));
        }
        let allowed = cli.allow_writes.or(file.allow_writes).unwrap_or(false);
        let token = cli
            .write_token_file
            .or(file.write_token_file)
            .map(|path| read_secret("--write-token-file", &path))
            .transpose()?;
        let etcd_tls = etcd_tls(
            &endpoints,
            cli.etcd_ca_file.or(file.etcd_ca_file),
            cli.etcd_cert_file.or(file.etcd_cert_file),
            cli.etcd_key_file.or(file.etcd_key_file),
        )?;
        let password = match (
            cli.etcd_password,
            cli.etcd_password_file.or(file.etcd_password_file),
        ) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "--etcd-password",
                    "give the password or a password file, not both",
                ))
            }
            (Some(p), None) if p.expose().is_empty() => {
                return Err(invalid("--etcd-password", "is empty"))
            }
            (Some(p), None) => Some(p),
            (None, Some(path)) => Some(read_secret("--etcd-password-file", &path)?),
            (None, None) => None,
        };
        let etcd_auth = match (cli.etcd_username.or(file.etcd_username), password) {
            (Some(username), Some(password)) if !username.is_empty() => {
                Some(EtcdAuth { username, password })
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "--etcd-username",
                    "needs a password: CONFIG_SIDECAR_ETCD_PASSWORD or --etcd-password-file",
                ))
            }
            (_, Some(_)) => {
                return Err(invalid(
                    "--etcd-username",
                    "a password was given but no username",
                ))
            }
        };
        let ready_requires_etcd = cli
            .ready_requires_etcd
            .or(file.ready_requires_etcd)
            .unwrap_or(false);
        let memory_budget = match pick(cli.memory_budget, file.memory_budget) {
            None => None,
            Some(text) => Some(
                text.trim()
                    .parse::<bytesize::ByteSize>()
                    .map_err(|e| {
                        invalid(
                            "--memory-budget",
                            format!("{text:?} is not a size such as 200MiB: {e}"),
                        )
                    })?
                    .as_u64(),
            ),
        };
        if memory_budget == Some(0) {
            return Err(invalid("--memory-budget", "must be greater than zero"));
        }
        let write_timeout = duration(
            "snapshot_write_timeout",
            None,
            file.snapshot_write_timeout,
            DEFAULT_SNAPSHOT_WRITE_TIMEOUT,
        )?;
        let snapshot = match cli.snapshot.or(file.snapshot) {
            None => None,
            Some(path) => {
                let dir = directory_of(&path);
                if !dir.is_dir() {
                    return Err(invalid(
                        "--snapshot",
                        format!("directory {} does not exist", dir.display()),
                    ));
                }
                if path.is_dir() {
                    return Err(invalid(
                        "--snapshot",
                        format!("{} is a directory", path.display()),
                    ));
                }
                Some(SnapshotConfig {
                    path,
                    ready_requires_etcd,
                    write_timeout,
                })
            }
        };

        Ok(Config {
            mode: ModeConfig {
                probe_interval: duration(
                    "--probe-interval",
                    cli.probe_interval,
                    file.probe_interval,
                    DEFAULT_PROBE_INTERVAL,
                )?,
                probe_timeout: duration(
                    "probe_timeout",
                    None,
                    file.probe_timeout,
                    DEFAULT_PROBE_TIMEOUT,
                )?,
                degrade_after,
                recover_after,
                webhook,
            },
            writes: WriteConfig { allowed, token },
            snapshot,
            etcd: EtcdConfig {
                endpoints,
                dial_timeout: duration(
                    "--dial-timeout",
                    cli.dial_timeout,
                    file.dial_timeout,
                    DEFAULT_DIAL_TIMEOUT,
                )?,
                request_timeout: duration(
                    "--request-timeout",
                    cli.request_timeout,
                    file.request_timeout,
                    DEFAULT_REQUEST_TIMEOUT,
                )?,
                keepalive_interval: duration(
                    "keepalive_interval",
                    None,
                    file.keepalive_interval,
                    DEFAULT_KEEPALIVE_INTERVAL,
                )?,
                keepalive_timeout: duration(
                    "keepalive_timeout",
                    None,
                    file.keepalive_timeout,
                    DEFAULT_KEEPALIVE_TIMEOUT,
                )?,
                tls: etcd_tls,
                auth: etcd_auth,
            },
            sync: SyncConfig {
                prefixes: Prefixes::new(prefixes),
                watch_deadline: duration(
                    "--watch-deadline",
                    cli.watch_deadline,
                    file.watch_deadline,
                    DEFAULT_WATCH_DEADLINE,
                )?,
                backoff_min,
                backoff_max,
                endpoint_cooldown: duration(
                    "endpoint_cooldown",
                    None,
                    file.endpoint_cooldown,
                    DEFAULT_ENDPOINT_COOLDOWN,
                )?,
                page_size,
            },
            http: HttpConfig {
                listen,
                shutdown_grace: duration(
                    "--shutdown-grace",
                    cli.shutdown_grace,
                    file.shutdown_grace,
                    DEFAULT_SHUTDOWN_GRACE,
                )?,
                cache_bytes: file.cache_bytes.unwrap_or(DEFAULT_CACHE_BYTES),
                header_read_timeout: duration(
                    "header_read_timeout",
                    None,
                    file.header_read_timeout,
                    DEFAULT_HEADER_READ_TIMEOUT,
                )?,
                idle_timeout: duration(
                    "idle_timeout",
                    None,
                    file.idle_timeout,
                    DEFAULT_IDLE_TIMEOUT,
                )?,
                body_read_timeout: duration(
                    "body_read_timeout",
                    None,
                    file.body_read_timeout,
                    DEFAULT_BODY_READ_TIMEOUT,
                )?,
                allow_remote,
                allowed_hosts,
                max_connections,
                max_streams,
                max_blocking_queries,
            },
            log_format,
            log_level,
            memory_budget,
        })
    }

    /// A configuration for `endpoints` and `prefixes` with every other setting at its default;
    /// what tests and embedders start from.
    pub fn for_endpoints(endpoints: &[String], prefixes: &[&str]) -> Result<Config, ConfigError> {
        Config::from_cli(Cli {
            endpoints: endpoints.to_vec(),
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            ..Cli::default()
        })
    }
}

/// The directory a snapshot file at `path` lives in (`.` for a bare file name): where its temp
/// file is written and what must be writable.
pub fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid("--config", format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text)
        .map_err(|e| invalid("--config", format!("{}: {}", path.display(), e.message())))
}

/// A list setting: the flag's (or environment variable's) values when given, else the file's;
/// each trimmed, empty ones dropped.
fn list_setting(flag: Vec<String>, file: Option<Vec<String>>) -> Vec<String> {
    let values = if flag.is_empty() {
        file.unwrap_or_default()
    } else {
        flag
    };
    values
        .iter()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// Reads a token, password or key from `path`; surrounding whitespace (a trailing newline) is
/// not part of it.
fn read_secret(setting: &str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(setting, format!("cannot read {}: {e}", path.display())))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(invalid(setting, format!("{} is empty", path.display())));
    }
    Ok(Secret(text.to_string()))
}

/// Reads a PEM file and checks it holds what `what` names (`CERTIFICATE`, `PRIVATE KEY`), so a
/// swapped or empty file is named at start-up rather than failing every connection later.
fn read_pem(setting: &str, path: &Path, what: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(setting, format!("cannot read {}: {e}", path.display())))?;
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.ends_with(&format!("{what}-----")));
    if !found {
        return Err(invalid(
            setting,
            format!("{} holds no PEM {what}", path.display()),
        ));
    }
    Ok(text)
}

/// TLS settings: all endpoints `https://` or none; a client key goes with a client certificate.
fn etcd_tls(
    endpoints: &[String],
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<EtcdTls>, ConfigError> {
    let https = endpoints
        .iter()
        .filter(|e| e.starts_with("https://"))
        .count();
    if https != 0 && https != endpoints.len() {
        return Err(invalid(
            "--endpoints",
            "mixes http:// and https:// endpoints",
        ));
    }
    if https == 0 {
        if ca.is_some() || cert.is_some() || key.is_some() {
            return Err(invalid(
                "--etcd-ca-file",
                "TLS files given but the endpoints are http://; use https:// endpoints",
            ));
        }
        return Ok(None);
    }
    let (cert_pem, key_pem) = match (cert, key) {
        (Some(cert), Some(key)) => (
            Some(read_pem("--etcd-cert-file", &cert, "CERTIFICATE")?),
            Some(Secret(read_pem("--etcd-key-file", &key, "PRIVATE KEY")?)),
        ),
        (None, None) => (None, None),
        (Some(_), None) => return Err(invalid("--etcd-key-file", "needed with --etcd-cert-file")),
        (None, Some(_)) => return Err(invalid("--etcd-cert-file", "needed with --etcd-key-file")),
    };
    Ok(Some(EtcdTls {
        ca_pem: ca
            .map(|ca| read_pem("--etcd-ca-file", &ca, "CERTIFICATE"))
            .transpose()?,
        cert_pem,
        key_pem,
    }))
}

fn parse_duration(setting: &str, text: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        invalid(
            setting,
            format!("{text:?} is not a duration such as 2s: {e}"),
        )
    })?;
    if d.is_zero() {
        return Err(invalid(setting, "must be greater than zero"));
    }
    Ok(d)
}

fn validate_endpoint(endpoint: &str) -> Result<(), ConfigError> {
    let bad = |why: &str| invalid("--endpoints", format!("{endpoint:?} {why}"));
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|_| bad("is not a URL such as http://127.0.0.1:2379"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("must start with http:// or https://"));
    }
    let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
    if authority.host().is_empty() {
        return Err(bad("has no host"));
    }
    if authority.port_u16().is_none() {
        return Err(bad("has no port"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("must not have a path or query"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["config-sidecar"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        Config::from_cli(cli).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_fill_what_is_not_given() {
        let c = cli(&["--prefix", "/config/app/"]).unwrap();
        assert_eq!(c.etcd.endpoints, vec![DEFAULT_ENDPOINTS.to_string()]);
        assert_eq!(c.http.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.sync.watch_deadline, DEFAULT_WATCH_DEADLINE);
        assert_eq!(c.log_format, LogFormat::Plain);
    }

    #[test]
    fn each_bad_setting_is_named() {
        let err = |args: &[&str]| cli(args).unwrap_err();
        assert!(err(&[]).contains("--prefix"));
        assert!(err(&["--prefix", "config/"]).contains("must start with '/'"));
        assert!(err(&["--prefix", "/c/", "--endpoints", "127.0.0.1:2379"]).contains("--endpoints"));
        assert!(err(&["--prefix", "/c/", "--endpoints", "http://h"]).contains("no port"));
        assert!(err(&["--prefix", "/c/", "--listen", "nowhere"]).contains("--listen"));
        assert!(err(&["--prefix", "/c/", "--log-format", "xml"]).contains("--log-format"));
        assert!(err(&["--prefix", "/c/", "--watch-deadline", "soon"]).contains("--watch-deadline"));
        assert!(err(&["--prefix", "/c/", "--config", "/nonexistent/x.toml"]).contains("--config"));
        assert!(err(&["--bogus"]).contains("--bogus"));
    }

    #[test]
    fn the_write_token_is_read_from_its_file_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret-token\n").unwrap();
        let t = token.to_str().unwrap();
        let c = cli(&["--prefix", "/c/", "--allow-writes", "--write-token-file", t]).unwrap();
        assert!(c.writes.allowed);
        assert_eq!(
            c.writes.token.as_ref().map(Secret::expose),
            Some("s3cret-token")
        );
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug output shows the token"
        );
        std::fs::write(&token, "  \n").unwrap();
        assert!(cli(&["--prefix", "/c/", "--write-token-file", t])
            .unwrap_err()
            .contains("empty"));
        let missing = dir.path().join("nope");
        let e = cli(&[
            "--prefix",
            "/c/",
            "--write-token-file",
            missing.to_str().unwrap(),
        ])
        .unwrap_err();
        assert!(e.contains("--write-token-file"), "{e}");
        let e = cli(&["--prefix", "/c/", "--webhook", "ftp://x"]).unwrap_err();
        assert!(e.contains("--webhook"), "{e}");
    }

    #[test]
    fn file_fills_in_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "endpoints = [\"http://127.0.0.1:1\"]\nprefixes = [\"/f/\"]\nlisten = \"127.0.0.1:9\"\nwatch_deadline = \"3s\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = cli(&["--config", p, "--listen", "127.0.0.1:10"]).unwrap();
        assert_eq!(c.etcd.endpoints, vec!["http://127.0.0.1:1".to_string()]);
        assert_eq!(c.sync.prefixes.as_slice(), &["/f/".to_string()]);
        assert_eq!(c.http.listen.port(), 10);
        assert_eq!(c.sync.watch_deadline, Duration::from_secs(3));

        std::fs::write(&path, "prefixes = [\"/f/\"]\nunknown_key = 1\n").unwrap();
        let e = cli(&["--config", p]).unwrap_err();
        assert!(e.contains("--config") && e.contains("unknown_key"), "{e}");
    }

    #[test]
    fn etcd_tls_and_auth_settings_are_checked_and_secrets_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_string()
        };
        let cert = file(
            "c.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let key = file(
            "k.pem",
            "-----BEGIN PRIVATE KEY-----\nKEYBYTES\n-----END PRIVATE KEY-----\n",
        );
        let password = file("pw", "hunter2-secret\n");
        let https = ["--prefix", "/c/", "--endpoints", "https://127.0.0.1:2379"];
        let with = |more: &[&str]| {
            let mut args = https.to_vec();
            args.extend_from_slice(more);
            cli(&args)
        };
        let c = with(&[
            "--etcd-ca-file",
            &cert,
            "--etcd-cert-file",
            &cert,
            "--etcd-key-file",
            &key,
            "--etcd-username",
            "app",
            "--etcd-password-file",
            &password,
        ])
        .unwrap();
        let tls = c.etcd.tls.as_ref().unwrap();
        assert!(tls.ca_pem.is_some() && tls.cert_pem.is_some());
        let auth = c.etcd.auth.as_ref().unwrap();
        assert_eq!(
            (auth.username.as_str(), auth.password.expose()),
            ("app", "hunter2-secret")
        );
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("KEYBYTES"),
            "{debug}"
        );
        // https without a CA file trusts the system's roots.
        assert!(with(&[]).unwrap().etcd.tls.unwrap().ca_pem.is_none());

        let err = |more: &[&str]| with(more).unwrap_err();
        assert!(err(&["--etcd-cert-file", &cert]).contains("--etcd-key-file"));
        assert!(err(&["--etcd-key-file", &key]).contains("--etcd-cert-file"));
        assert!(err(&["--etcd-ca-file", &key]).contains("no PEM CERTIFICATE"));
        assert!(err(&["--etcd-cert-file", &cert, "--etcd-key-file", &cert]).contains("PRIVATE KEY"));
        assert!(err(&["--etcd-username", "app"]).contains("needs a password"));
        assert!(err(&["--etcd-password-file", &password]).contains("no username"));
        let both = err(&[
            "--etcd-username",
            "a",
            "--etcd-password",
            "x",
            "--etcd-password-file",
            &password,
        ]);
        assert!(both.contains("not both"), "{both}");
        let plain = cli(&["--prefix", "/c/", "--etcd-ca-file", &cert]).unwrap_err();
        assert!(plain.contains("https://"), "{plain}");
        let mixed = cli(&[
            "--prefix",
            "/c/",
            "--endpoints",
            "https://127.0.0.1:1,http://127.0.0.1:2",
        ])
        .unwrap_err();
        assert!(mixed.contains("mixes"), "{mixed}");
    }

    #[test]
    fn listening_beyond_loopback_must_be_asked_for() {
        let e = cli(&["--prefix", "/c/", "--listen", "0.0.0.0:7379"]).unwrap_err();
        assert!(e.contains("--allow-remote"), "{e}");
        let c = cli(&[
            "--prefix",
            "/c/",
            "--listen",
            "0.0.0.0:7379",
            "--allow-remote",
        ])
        .unwrap();
        assert!(c.http.allow_remote);
        assert!(cli(&["--prefix", "/c/", "--listen", "[::1]:7379"]).is_ok());
        let c = cli(&[
            "--prefix",
            "/c/",
            "--allowed-hosts",
            "Config.Local, sidecar",
        ])
        .unwrap();
        assert_eq!(c.http.allowed_hosts, ["config.local", "sidecar"]);
        let e = cli(&["--prefix", "/c/", "--allowed-hosts", "http://x/"]).unwrap_err();
        assert!(e.contains("--allowed-hosts"), "{e}");
    }
}
