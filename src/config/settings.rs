//! The one settings schema: [`Settings`] declares every setting once, as a clap argument with
//! its doc (the help text), flag, `CONFIG_SIDECAR_*` environment variable, default, section (the
//! help heading) and, in its help, whether SIGHUP applies it ([`LIVE`]). The TOML file's keys are
//! the settings' names (the field names), so it needs no declaration of its own.
//!
//! Precedence: flag, then environment variable, then file, then default. [`parse`] reads flags
//! and environment first; a setting neither gave is then filled from the file by handing its
//! value to the same parser as if it were a flag, so a file value is parsed and checked exactly
//! as a flag's would be.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser};

use crate::config::file;
use crate::config::secret::Secret;
use crate::config::ConfigError;

/// The mark in a setting's help that SIGHUP applies it while running; every other setting
/// needs a restart. `--help` shows it, and the reload reads it from there.
pub const LIVE: &str = "[SIGHUP applies it]";

/// Default etcd endpoint: a local member on etcd's client port.
pub const DEFAULT_ENDPOINTS: &str = "http://127.0.0.1:2379";
/// Default listen address: loopback only, on the sidecar's documented port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7379";

pub use crate::config::choices::{LogFormat, PinSetting, Selection, WebhookFormat};

/// Every setting. Each field is one flag, one environment variable and one file key; the
/// comments are the help text.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct Settings {
    /// etcd endpoints (comma-separated URLs, all http:// or all https://).
    #[arg(long, env = "CONFIG_SIDECAR_ENDPOINTS", value_delimiter = ',', default_value = DEFAULT_ENDPOINTS, help_heading = "etcd")]
    pub endpoints: Vec<String>,
    /// Time to open a connection to one etcd member.
    #[arg(long, env = "CONFIG_SIDECAR_DIAL_TIMEOUT", default_value = "2s", value_parser = duration, help_heading = "etcd")]
    pub dial_timeout: Duration,
    /// Deadline of one etcd call (a load page, a write, a quorum read) [SIGHUP applies it].
    #[arg(long, env = "CONFIG_SIDECAR_REQUEST_TIMEOUT", default_value = "5s", value_parser = duration, help_heading = "etcd")]
    pub request_timeout: Duration,
    /// HTTP/2 keep-alive ping interval towards etcd: with the timeout, a frozen member is noticed
    /// in about two seconds instead of never.
    #[arg(long, env = "CONFIG_SIDECAR_KEEPALIVE_INTERVAL", default_value = "1s", value_parser = duration, help_heading = "etcd")]
    pub keepalive_interval: Duration,
    /// Time to wait for a keep-alive ping's answer.
    #[arg(long, env = "CONFIG_SIDECAR_KEEPALIVE_TIMEOUT", default_value = "1s", value_parser = duration, help_heading = "etcd")]
    pub keepalive_timeout: Duration,
    /// Which healthy member each request goes to: ordered (the list order, e.g. the local zone's
    /// member first), random (the list shuffled once per sidecar, so a fleet spreads over the
    /// members), round-robin (one sidecar's requests in turn), latency (the lowest recent
    /// latency). The watch stays on its member until that member fails.
    #[arg(
        long,
        env = "CONFIG_SIDECAR_ENDPOINT_SELECTION",
        value_enum,
        default_value = "random",
        help_heading = "etcd"
    )]
    pub endpoint_selection: Selection,
    /// The endpoints are etcd gRPC proxies (`etcd grpc-proxy start`), which merge the watches of
    /// many sidecars into one per member. The 3.4 proxy answers no progress request, ignores
    /// require-leader and closes a connection pinged more often than every 5 minutes, so: no
    /// progress requests and no silence deadline on the watch, no keep-alive pings, and health
    /// from the light probe rounds and failed requests.
    #[arg(long, env = "CONFIG_SIDECAR_ETCD_GRPC_PROXY", num_args = 0..=1, default_value = "false", default_missing_value = "true", action = clap::ArgAction::Set, help_heading = "etcd")]
    pub etcd_grpc_proxy: bool,
    /// First rest of a member after it failed (a refused connection or no leader at once, two
    /// deadlines in a row); each rest in a row doubles, and a success ends them.
    #[arg(long, env = "CONFIG_SIDECAR_ENDPOINT_COOLDOWN", default_value = "5s", value_parser = duration, help_heading = "etcd")]
    pub endpoint_cooldown: Duration,
    /// Longest rest of a member that keeps failing.
    #[arg(long, env = "CONFIG_SIDECAR_ENDPOINT_COOLDOWN_MAX", default_value = "60s", value_parser = duration, help_heading = "etcd")]
    pub endpoint_cooldown_max: Duration,
    /// PEM file of the CA that signed the members' certificates (https:// endpoints; without it
    /// the system's roots are trusted).
    #[arg(long, env = "CONFIG_SIDECAR_ETCD_CA_FILE", help_heading = "etcd")]
    pub etcd_ca_file: Option<PathBuf>,
    /// PEM client certificate, for members started with --client-cert-auth.
    #[arg(long, env = "CONFIG_SIDECAR_ETCD_CERT_FILE", help_heading = "etcd")]
    pub etcd_cert_file: Option<PathBuf>,
    /// PEM private key of --etcd-cert-file.
    #[arg(long, env = "CONFIG_SIDECAR_ETCD_KEY_FILE", help_heading = "etcd")]
    pub etcd_key_file: Option<PathBuf>,
    /// etcd user, for clusters with authentication on.
    #[arg(long, env = "CONFIG_SIDECAR_ETCD_USERNAME", help_heading = "etcd")]
    pub etcd_username: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, env = "CONFIG_SIDECAR_ETCD_PASSWORD_FILE", help_heading = "etcd")]
    pub etcd_password_file: Option<PathBuf>,
    /// The etcd user's password; prefer the environment variable or --etcd-password-file, since
    /// a flag shows in the process list. Never printed.
    #[arg(
        long,
        env = "CONFIG_SIDECAR_ETCD_PASSWORD",
        hide_env_values = true,
        help_heading = "etcd"
    )]
    pub etcd_password: Option<Secret>,

    /// Key prefix to mirror; repeat the flag or separate with commas (each starts with '/').
    #[arg(
        long = "prefix",
        env = "CONFIG_SIDECAR_PREFIXES",
        value_delimiter = ',',
        help_heading = "sync"
    )]
    pub prefixes: Vec<String>,
    /// Silence after which a watch stream is reopened (progress is asked for at a third of it).
    #[arg(long, env = "CONFIG_SIDECAR_WATCH_DEADLINE", default_value = "6s", value_parser = duration, help_heading = "sync")]
    pub watch_deadline: Duration,
    /// Smallest reconnect backoff.
    #[arg(long, env = "CONFIG_SIDECAR_BACKOFF_MIN", default_value = "100ms", value_parser = duration, help_heading = "sync")]
    pub backoff_min: Duration,
    /// Largest reconnect backoff.
    #[arg(long, env = "CONFIG_SIDECAR_BACKOFF_MAX", default_value = "5s", value_parser = duration, help_heading = "sync")]
    pub backoff_max: Duration,
    /// Longest random wait before the first load when there is no disk snapshot to bring up to
    /// date, so that pods started together do not all load at once (0s: none).
    #[arg(long, env = "CONFIG_SIDECAR_FIRST_LOAD_JITTER", default_value = "500ms", value_parser = duration_or_zero, help_heading = "sync")]
    pub first_load_jitter: Duration,
    /// Longest random wait before catching up after an outage (the watch's resume point was
    /// compacted, or `cache-only` was unpinned), so that a fleet coming back together spreads its
    /// catch-ups; the data held keeps serving meanwhile (0s: none).
    #[arg(long, env = "CONFIG_SIDECAR_CATCH_UP_JITTER", default_value = "2s", value_parser = duration_or_zero, help_heading = "sync")]
    pub catch_up_jitter: Duration,
    /// Keys per page of a full load.
    #[arg(long, env = "CONFIG_SIDECAR_PAGE_SIZE", default_value = "1000", value_parser = clap::value_parser!(i64).range(1..), help_heading = "sync")]
    pub page_size: i64,
    /// Bytes of recent changes kept (at most 4096 revisions) for streams, blocking queries and
    /// watches that resume or fall behind; past it the oldest go, and a subscriber that needed
    /// them starts over.
    #[arg(long, env = "CONFIG_SIDECAR_HISTORY_BYTES", default_value = "16MiB", value_parser = size, help_heading = "sync")]
    pub history_bytes: u64,

    /// Address to serve HTTP on; one other hosts can reach needs --allow-remote.
    #[arg(long, env = "CONFIG_SIDECAR_LISTEN", default_value = DEFAULT_LISTEN, help_heading = "http")]
    pub listen: SocketAddr,
    /// Also serve Consul's KV API (/v1/kv/, key a/b is etcd's /a/b) on this address, for
    /// Consul clients; off unless given. One other hosts can reach needs --allow-remote.
    #[arg(long, env = "CONFIG_SIDECAR_CONSUL_LISTEN", help_heading = "http")]
    pub consul_listen: Option<SocketAddr>,
    /// Also serve etcd's v3 gRPC API (KV) on this address, for etcd's own clients (etcdctl,
    /// clientv3, jetcd, etcd-client); off unless given. One other hosts can reach needs
    /// --allow-remote.
    #[arg(long, env = "CONFIG_SIDECAR_GRPC_LISTEN", help_heading = "http")]
    pub grpc_listen: Option<SocketAddr>,
    /// Allow --listen on an address other hosts can reach (a warning is logged).
    #[arg(long, env = "CONFIG_SIDECAR_ALLOW_REMOTE", num_args = 0..=1, default_value = "false", default_missing_value = "true", action = clap::ArgAction::Set, help_heading = "http")]
    pub allow_remote: bool,
    /// More names the app may use for the sidecar in its Host header (comma-separated), beside
    /// localhost, 127.0.0.1 and [::1].
    #[arg(
        long,
        env = "CONFIG_SIDECAR_ALLOWED_HOSTS",
        value_delimiter = ',',
        help_heading = "http"
    )]
    pub allowed_hosts: Vec<String>,
    /// Time in-flight requests get to finish at shutdown [SIGHUP applies it].
    #[arg(long, env = "CONFIG_SIDECAR_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration, help_heading = "http")]
    pub shutdown_grace: Duration,
    /// Bytes of rendered listings and trees kept, one body (the latest) per view and prefix
    /// (e.g. 64MiB).
    #[arg(long, env = "CONFIG_SIDECAR_CACHE_BYTES", default_value = "64MiB", value_parser = size, help_heading = "http")]
    pub cache_bytes: u64,
    /// Time a client gets to send a request head, from its first byte (the slowloris guard)
    /// [SIGHUP applies it].
    #[arg(long, env = "CONFIG_SIDECAR_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration, help_heading = "http")]
    pub header_read_timeout: Duration,
    /// Time a connection may sit with nothing in flight and no bytes moving [SIGHUP applies it].
    #[arg(long, env = "CONFIG_SIDECAR_IDLE_TIMEOUT", default_value = "60s", value_parser = duration, help_heading = "http")]
    pub idle_timeout: Duration,
    /// Time a response may wait for the client to take more of it (nginx's send_timeout): a
    /// client that stops reading a stream or a large body is closed after it, so it holds no
    /// stream, snapshot or buffer for ever [SIGHUP applies it].
    #[arg(long, env = "CONFIG_SIDECAR_SEND_TIMEOUT", default_value = "60s", value_parser = duration, help_heading = "http")]
    pub send_timeout: Duration,
    /// Time a write's body gets to arrive once its head has [SIGHUP applies it].
    #[arg(long, env = "CONFIG_SIDECAR_BODY_READ_TIMEOUT", default_value = "10s", value_parser = duration, help_heading = "http")]
    pub body_read_timeout: Duration,
    /// Most connections open at once; one more is answered 503 and closed.
    #[arg(long, env = "CONFIG_SIDECAR_MAX_CONNECTIONS", default_value = "4096", value_parser = clap::value_parser!(u32).range(1..), help_heading = "http")]
    pub max_connections: u32,
    /// Most change streams open at once.
    #[arg(long, env = "CONFIG_SIDECAR_MAX_STREAMS", default_value = "2048", value_parser = clap::value_parser!(u32).range(1..), help_heading = "http")]
    pub max_streams: u32,
    /// Most blocking queries waiting at once.
    #[arg(long, env = "CONFIG_SIDECAR_MAX_BLOCKING_QUERIES", default_value = "2048", value_parser = clap::value_parser!(u32).range(1..), help_heading = "http")]
    pub max_blocking_queries: u32,

    /// Time between health probe rounds while the watch is not healthy (lost, reconnecting or
    /// silent): they tell read-only from cache-only and notice recovery [SIGHUP applies it].
    #[arg(long, env = "CONFIG_SIDECAR_PROBE_INTERVAL", default_value = "1s", value_parser = duration, help_heading = "mode")]
    pub probe_interval: Duration,
    /// Longest time between probe rounds while the watch stays down: once the mode machine has
    /// acted on a verdict (one more round than --recover-after for a healthy one, than
    /// --degrade-after for any other, all alike), the interval doubles each round, jittered, up
    /// to this, so a fleet does not ask a struggling cluster every second; back to
    /// --probe-interval as soon as the verdict changes or the watch runs again (--probe-interval
    /// or less: never slower) [SIGHUP applies it].
    #[arg(long, env = "CONFIG_SIDECAR_PROBE_INTERVAL_MAX", default_value = "5s", value_parser = duration, help_heading = "mode")]
    pub probe_interval_max: Duration,
    /// Time between member probe rounds while the watch is healthy: its stream requires a leader
    /// and answers progress requests, which already shows quorum, so at rest only this slow
    /// round (status and a serializable read, no quorum read), jittered by ±20% so a fleet does
    /// not probe in step, keeps /v1/status's member view fresh [SIGHUP applies it].
    #[arg(long, env = "CONFIG_SIDECAR_PROBE_IDLE_INTERVAL", default_value = "60s", value_parser = duration, help_heading = "mode")]
    pub probe_idle_interval: Duration,
    /// Timeout of each probe check [SIGHUP applies it].
    #[arg(long, env = "CONFIG_SIDECAR_PROBE_TIMEOUT", default_value = "800ms", value_parser = duration, help_heading = "mode")]
    pub probe_timeout: Duration,
    /// Consecutive worse probe rounds before the mode degrades.
    #[arg(long, env = "CONFIG_SIDECAR_DEGRADE_AFTER", default_value = "3", value_parser = clap::value_parser!(u32).range(1..), help_heading = "mode")]
    pub degrade_after: u32,
    /// Consecutive better probe rounds before the mode recovers.
    #[arg(long, env = "CONFIG_SIDECAR_RECOVER_AFTER", default_value = "2", value_parser = clap::value_parser!(u32).range(1..), help_heading = "mode")]
    pub recover_after: u32,
    /// http:// URL that mode transitions are POSTed to as JSON; never logged, as it may carry a
    /// token [SIGHUP applies it].
    #[arg(
        long,
        env = "CONFIG_SIDECAR_WEBHOOK",
        hide_env_values = true,
        help_heading = "mode"
    )]
    pub webhook: Option<String>,
    /// The webhook's body: json (the alert's fields) or slack ({"text": ...}) [SIGHUP applies it].
    #[arg(
        long,
        env = "CONFIG_SIDECAR_WEBHOOK_FORMAT",
        value_enum,
        default_value = "json",
        help_heading = "mode"
    )]
    pub webhook_format: WebhookFormat,
    /// At most one alert per check (and per mode) in this time; changes within it are held
    /// back and the latest is posted when it ends, with how many were held (0s: every change)
    /// [SIGHUP applies it].
    #[arg(long, env = "CONFIG_SIDECAR_ALERT_MIN_INTERVAL", default_value = "60s", value_parser = duration_or_zero, help_heading = "mode")]
    pub alert_min_interval: Duration,
    /// Pin the mode: read-only (writes refused) or cache-only (nothing sent to etcd: no watch, no
    /// probe), or auto (follow the facts); a pin never serves more than the facts allow. The
    /// admin API can change it until the next change here [SIGHUP applies it].
    #[arg(
        long,
        env = "CONFIG_SIDECAR_PIN",
        value_enum,
        default_value = "auto",
        help_heading = "mode"
    )]
    pub pin: PinSetting,
    /// File holding the bearer token of the admin API (/v1/admin/*); without it those routes
    /// answer 403.
    #[arg(long, env = "CONFIG_SIDECAR_ADMIN_TOKEN_FILE", help_heading = "mode")]
    pub admin_token_file: Option<PathBuf>,

    /// Accept writes (PUT / DELETE) inside the mirrored prefixes and forward them to etcd.
    #[arg(long, env = "CONFIG_SIDECAR_ALLOW_WRITES", num_args = 0..=1, default_value = "false", default_missing_value = "true", action = clap::ArgAction::Set, help_heading = "writes")]
    pub allow_writes: bool,
    /// File holding the bearer token that writes must present.
    #[arg(long, env = "CONFIG_SIDECAR_WRITE_TOKEN_FILE", help_heading = "writes")]
    pub write_token_file: Option<PathBuf>,

    /// JSON object of full keys (inside the mirrored prefixes) to string values, served in
    /// cache-only when a start finds no usable snapshot and etcd gives no data in time.
    #[arg(long, env = "CONFIG_SIDECAR_DEFAULTS", help_heading = "snapshot")]
    pub defaults: Option<PathBuf>,
    /// Render a mirrored directory into a file for apps that read files: PREFIX=PATH, the format
    /// from the extension (.json: the /v1/tree JSON; .yaml/.yml; .env: KEY='value' lines;
    /// .properties), or a JSON object with the keys of a file's [[render]] table (prefix, path,
    /// format, template, mode, on_change); repeat the flag or separate with semicolons.
    #[arg(
        long = "render",
        env = "CONFIG_SIDECAR_RENDER",
        value_delimiter = ';',
        help_heading = "render"
    )]
    pub render: Vec<String>,
    /// File the mirror is saved to and served from after a restart while etcd is unreachable.
    #[arg(long, env = "CONFIG_SIDECAR_SNAPSHOT", help_heading = "snapshot")]
    pub snapshot: Option<PathBuf>,
    /// With a snapshot, report ready only once etcd has been reached (else ready on the snapshot).
    #[arg(long, env = "CONFIG_SIDECAR_READY_REQUIRES_ETCD", num_args = 0..=1, default_value = "false", default_missing_value = "true", action = clap::ArgAction::Set, help_heading = "snapshot")]
    pub ready_requires_etcd: bool,
    /// Longest one snapshot write may take before the writer counts as stalled (liveness fails).
    #[arg(long, env = "CONFIG_SIDECAR_SNAPSHOT_WRITE_TIMEOUT", default_value = "30s", value_parser = duration, help_heading = "snapshot")]
    pub snapshot_write_timeout: Duration,

    /// Log format: plain lines, or one JSON object per line for log shippers.
    #[arg(
        long,
        env = "CONFIG_SIDECAR_LOG_FORMAT",
        value_enum,
        default_value = "plain",
        help_heading = "process"
    )]
    pub log_format: LogFormat,
    /// Log level, or target=level directives (e.g. info, debug, info,config_sidecar=trace)
    /// [SIGHUP applies it].
    #[arg(
        long,
        env = "CONFIG_SIDECAR_LOG_LEVEL",
        default_value = "info",
        help_heading = "process"
    )]
    pub log_level: String,
    /// Resident memory to stay under (e.g. 200MiB): the memory check is degraded above 80% of it,
    /// or when a burst of writes could take memory over it (docs/benchmarks.md: Memory under churn), and
    /// unhealthy above it [SIGHUP applies it].
    #[arg(long, env = "CONFIG_SIDECAR_MEMORY_BUDGET", value_parser = size, help_heading = "process")]
    pub memory_budget: Option<u64>,
    /// Threads serving requests and the mirror. Not the node's core count: a sidecar in every pod
    /// of a 64-core node would each start 64, every one holding its stack and allocator arena.
    #[arg(long, env = "CONFIG_SIDECAR_WORKER_THREADS", default_value = "2", value_parser = clap::value_parser!(u32).range(1..=64), help_heading = "process")]
    pub worker_threads: u32,
}

/// The command line: every setting, the file, and the health check client.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "config-sidecar",
    version,
    about = "Serves etcd-backed configuration to the application beside it over localhost HTTP."
)]
pub struct Cli {
    /// Every setting.
    #[command(flatten)]
    pub settings: Settings,
    /// TOML file of settings (keys: the settings' names, e.g. dial_timeout = "2s"); flags and
    /// environment variables override it.
    #[arg(long, env = "CONFIG_SIDECAR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Do not serve: validate the configuration, print every setting with its value and where
    /// it came from (flag, environment, file or default) in the file's syntax, and exit 0, or 2
    /// naming what is wrong.
    #[arg(long)]
    pub check_config: bool,
    /// Do not serve: ask the sidecar listening on --listen for this path (/healthz, or /readyz)
    /// and exit 0 on a 200, 1 otherwise: a container health check without curl in the image.
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "/healthz")]
    pub healthcheck: Option<String>,
}

/// One setting as the schema declares it.
#[derive(Debug, Clone)]
pub struct Setting {
    /// Its name: the file key.
    pub name: String,
    /// Its flag, without the dashes.
    pub flag: String,
    /// Its environment variable.
    pub env: String,
    /// Its default, as text (`None`: unset unless given).
    pub default: Option<String>,
    /// Its section: the part of the configuration it belongs to.
    pub section: String,
    /// Whether SIGHUP applies it while running.
    pub live: bool,
    /// Whether its value must never be printed.
    pub sensitive: bool,
    /// The character between the values of a list setting (`None`: one value).
    pub delimiter: Option<char>,
    /// Its help text.
    pub doc: String,
}

/// Every setting, in declaration order, read from the schema.
pub fn schema() -> Vec<Setting> {
    Cli::command()
        .get_arguments()
        .filter(|a| a.get_help_heading().is_some())
        .map(|a| {
            let doc = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            let defaults: Vec<String> = a
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            Setting {
                name: a.get_id().to_string(),
                flag: a.get_long().unwrap_or_default().to_string(),
                env: a
                    .get_env()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                default: (!defaults.is_empty()).then(|| defaults.join(",")),
                section: a.get_help_heading().unwrap_or_default().to_string(),
                live: doc.contains(LIVE),
                sensitive: a.is_hide_env_values_set(),
                delimiter: a.get_value_delimiter(),
                doc,
            }
        })
        .collect()
}

/// The text each setting was finally given (by flag, environment, file or default), by name:
/// what a reload compares and rebuilds from. Its `Debug` hides sensitive values.
#[derive(Clone, PartialEq, Default)]
pub struct Given(BTreeMap<String, Vec<String>>);

impl Given {
    /// The settings whose text differs between `self` and `other`.
    pub fn differences(&self, other: &Given) -> Vec<String> {
        let names: std::collections::BTreeSet<&String> =
            self.0.keys().chain(other.0.keys()).collect();
        names
            .into_iter()
            .filter(|n| self.0.get(*n) != other.0.get(*n))
            .cloned()
            .collect()
    }

    /// The text of setting `name`, if it has one.
    pub fn get(&self, name: &str) -> Option<&[String]> {
        self.0.get(name).map(Vec::as_slice)
    }

    /// `self` with setting `name` as `other` has it.
    pub fn take(&mut self, name: &str, other: &Given) {
        match other.0.get(name) {
            Some(values) => self.0.insert(name.to_string(), values.clone()),
            None => self.0.remove(name),
        };
    }
}

impl fmt::Debug for Given {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sensitive: Vec<String> = schema()
            .into_iter()
            .filter(|s| s.sensitive)
            .map(|s| s.name)
            .collect();
        let mut map = f.debug_map();
        for (name, values) in &self.0 {
            if sensitive.contains(name) {
                map.entry(name, &"<redacted>");
            } else {
                map.entry(name, values);
            }
        }
        map.finish()
    }
}

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A flag on the command line.
    Flag,
    /// A `CONFIG_SIDECAR_*` environment variable.
    Environment,
    /// The TOML file.
    File,
    /// The schema's default.
    Default,
}

impl Source {
    /// The source in words.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::Environment => "environment",
            Source::File => "file",
            Source::Default => "default",
        }
    }
}

/// What [`parse`] read.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The settings.
    pub settings: Settings,
    /// The text each setting was given.
    pub given: Given,
    /// Where each setting that has a value got it.
    pub sources: BTreeMap<String, Source>,
}

impl Parsed {
    /// Every setting that has a value, one line each in the file's syntax with where it came
    /// from: what `--check-config` prints, itself a valid file. Sensitive values are redacted.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        for setting in schema() {
            let Some(values) = self.given.get(&setting.name) else {
                continue;
            };
            let quoted: Vec<String> = values
                .iter()
                .map(|v| {
                    if setting.sensitive {
                        "\"<redacted>\"".to_string()
                    } else if let Some(table) = file::table_value(v) {
                        table.to_string()
                    } else {
                        toml::Value::String(v.clone()).to_string()
                    }
                })
                .collect();
            let value = if setting.delimiter.is_some() {
                format!("[{}]", quoted.join(", "))
            } else {
                quoted.join(",")
            };
            let from = self.sources.get(&setting.name).map_or("", |s| s.as_str());
            text.push_str(&format!("{} = {value}  # {from}\n", setting.name));
        }
        text
    }
}

/// Where settings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    /// Flags, `CONFIG_SIDECAR_*` variables and the file: the process.
    Read,
    /// Flags and the file only: tests and embedders that must not pick up the process's
    /// environment.
    Ignored,
}

/// The settings from `args` (the first is the program name), the environment if `env` says so,
/// and the file `--config` names; with the text each was given.
pub fn parse<I, T>(args: I, env: Environment) -> Result<Parsed, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let command = || {
        let command = Cli::command();
        match env {
            Environment::Read => command,
            Environment::Ignored => command.mut_args(|a| a.env(None)),
        }
    };
    let first = command()
        .try_get_matches_from(&args)
        .map_err(|e| clap_error(&e))?;
    let schema = schema();
    let file = first.get_one::<PathBuf>("config").cloned();
    // The flags of the settings the file gave, to name the file's key if one is refused.
    let mut from_file = Vec::new();
    if let Some(path) = &file {
        for (name, value) in file::read_file(path)? {
            let setting = schema.iter().find(|s| s.name == name).ok_or_else(|| {
                ConfigError::new(
                    "--config",
                    format!("{}: {name:?} is not a setting", path.display()),
                )
            })?;
            if matches!(
                first.value_source(&name),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            ) {
                continue;
            }
            for text in file::file_values(path, &setting.name, setting.delimiter, value)? {
                args.push(format!("--{}={text}", setting.flag).into());
            }
            from_file.push(setting);
        }
    }
    let matches = command().try_get_matches_from(&args).map_err(|e| {
        let refused = clap_error(&e);
        match (
            &file,
            from_file
                .iter()
                .find(|s| refused.setting == format!("--{}", s.flag)),
        ) {
            (Some(path), Some(setting)) => ConfigError::new(
                "--config",
                format!("{}: {}: {}", path.display(), setting.name, refused.reason),
            ),
            _ => refused,
        }
    })?;
    let settings = Settings::from_arg_matches(&matches).map_err(|e| clap_error(&e))?;
    let mut sources = BTreeMap::new();
    for setting in &schema {
        let source = match first.value_source(&setting.name) {
            _ if from_file.iter().any(|s| s.name == setting.name) => Source::File,
            Some(ValueSource::CommandLine) => Source::Flag,
            Some(ValueSource::EnvVariable) => Source::Environment,
            Some(_) => Source::Default,
            None => continue,
        };
        sources.insert(setting.name.clone(), source);
    }
    Ok(Parsed {
        settings,
        given: given(&schema, &matches),
        sources,
    })
}

/// The settings `given` describes, parsed again (no environment, no file).
pub fn from_given(given: &Given) -> Result<Settings, ConfigError> {
    let mut args: Vec<OsString> = vec!["config-sidecar".into()];
    for setting in schema() {
        for value in given.get(&setting.name).unwrap_or_default() {
            args.push(format!("--{}={value}", setting.flag).into());
        }
    }
    parse(args, Environment::Ignored).map(|parsed| parsed.settings)
}

/// Every setting's final text in `matches`.
fn given(schema: &[Setting], matches: &ArgMatches) -> Given {
    let mut given = BTreeMap::new();
    for setting in schema {
        if let Some(raw) = matches.get_raw(&setting.name) {
            let values = raw.map(|v| v.to_string_lossy().into_owned()).collect();
            given.insert(setting.name.clone(), values);
        }
    }
    Given(given)
}

/// A clap error as a configuration error naming the flag at fault.
fn clap_error(error: &clap::Error) -> ConfigError {
    let flag = error
        .get(clap::error::ContextKind::InvalidArg)
        .map(|a| a.to_string())
        .unwrap_or_default();
    let text = error.render().to_string();
    let reason = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string();
    // "--listen <LISTEN>" names the flag; a bare "--bogus" is the flag itself.
    let flag = flag.split_whitespace().next().unwrap_or("arguments");
    ConfigError::new(flag, reason)
}

/// A duration such as `2s` or `500ms`, not zero.
fn duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration such as 2s: {e}"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// A duration that may be zero, for settings where zero means "none" or "no bound".
fn duration_or_zero(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration such as 2s or 0s: {e}"))
}

/// A size such as `200MiB` or a number of bytes, not zero.
fn size(text: &str) -> Result<u64, String> {
    let bytes = text
        .trim()
        .parse::<bytesize::ByteSize>()
        .map_err(|e| format!("{text:?} is not a size such as 200MiB: {e}"))?
        .as_u64();
    if bytes == 0 {
        return Err("must be greater than zero".into());
    }
    Ok(bytes)
}

/// The default of the duration setting `name`, as the schema declares it.
pub fn default_duration(name: &str) -> Duration {
    let text = schema()
        .into_iter()
        .find(|s| s.name == name)
        .and_then(|s| s.default)
        .unwrap_or_else(|| panic!("{name} is a setting with a default"));
    duration(&text).expect("the schema's defaults parse")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One rule names every setting's flag, environment variable and file key, so none needs
    /// remembering; every setting has a section and a help text.
    #[test]
    fn every_setting_is_named_by_one_rule() {
        let schema = schema();
        assert!(schema.len() > 40, "{}", schema.len());
        for s in &schema {
            assert_eq!(
                s.env,
                format!("CONFIG_SIDECAR_{}", s.name.to_uppercase()),
                "{s:?}"
            );
            let flag = if s.name == "prefixes" {
                "prefix".to_string()
            } else {
                s.name.replace('_', "-")
            };
            assert_eq!(s.flag, flag, "{s:?}");
            assert!(!s.section.is_empty() && !s.doc.is_empty(), "{s:?}");
        }
        let live: Vec<&str> = schema
            .iter()
            .filter(|s| s.live)
            .map(|s| s.name.as_str())
            .collect();
        assert!(
            live.contains(&"log_level") && !live.contains(&"prefixes"),
            "{live:?}"
        );
    }

    /// A configuration rebuilt from the text it was given is the same configuration: what a
    /// reload relies on.
    #[test]
    fn the_given_text_rebuilds_the_same_settings() {
        let parsed = parse(
            [
                "config-sidecar",
                "--prefix=/a/,/b/",
                "--allow-writes",
                "--memory-budget=200MiB",
                "--webhook=http://127.0.0.1:9/h",
            ],
            Environment::Ignored,
        )
        .unwrap();
        assert_eq!(from_given(&parsed.given).unwrap(), parsed.settings);
        assert_eq!(parsed.sources["prefixes"], Source::Flag);
        assert_eq!(parsed.sources["dial_timeout"], Source::Default);
        assert!(
            !parsed.sources.contains_key("snapshot"),
            "not given, no default"
        );
        assert_eq!(parsed.settings.memory_budget, Some(200 * 1024 * 1024));
        assert_eq!(
            default_duration("probe_timeout"),
            Duration::from_millis(800)
        );
        assert!(
            !format!("{:?}", parsed.given).contains("127.0.0.1:9"),
            "sensitive values are redacted"
        );
    }
}
