//! The settings whose values are one of a few names: the enums the schema ([`super::settings`])
//! parses with clap's `ValueEnum`.

use clap::ValueEnum;
use tracing_subscriber::filter::Targets;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The body the webhook is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WebhookFormat {
    /// The alert as a JSON object (kind, check, from, to, reason, at_unix_ms, held_back, sidecar).
    Json,
    /// `{"text": "..."}`, what Slack and Mattermost incoming webhooks take.
    Slack,
}

/// The mode an operator pins in the file or on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PinSetting {
    /// No pin: the mode follows the facts.
    Auto,
    /// Reads served, writes refused.
    ReadOnly,
    /// Reads from memory; nothing at all is sent to etcd.
    CacheOnly,
}

/// Which healthy etcd member each request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Selection {
    /// The list order (e.g. the local zone's member first).
    Ordered,
    /// The list shuffled once at start: a fleet of sidecars spreads its watches and requests
    /// over the members.
    Random,
    /// One sidecar's requests spread over the members in turn.
    RoundRobin,
    /// The lowest recent latency (a peak-EWMA of request and probe latencies).
    Latency,
}

impl Selection {
    /// The name as given in settings.
    pub fn as_str(self) -> &'static str {
        match self {
            Selection::Ordered => "ordered",
            Selection::Random => "random",
            Selection::RoundRobin => "round-robin",
            Selection::Latency => "latency",
        }
    }
}

/// Parses a level (`info`) or comma-separated `target=level` directives (`info,h2=warn`).
///
/// Target directives, not `EnvFilter`'s span and field matching: that needs a regex engine, and
/// its code is resident in every sidecar of the fleet for a feature nobody filters logs with here.
pub fn log_filter(level: &str) -> Result<Targets, String> {
    level
        .parse::<Targets>()
        .map_err(|e| format!("{level:?} is not a level or a list of target=level directives: {e}"))
}
