//! Logging: plain or JSON lines on stderr, filtered by the configured level or directive, which
//! SIGHUP can change while running ([`LogControl`]).

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Registry};

use tracing::Level;

use crate::config::{log_filter, LogFormat};

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogControl(reload::Handle<Targets, Registry>);

impl LogControl {
    /// Replaces the filter with `level` (a level or a list of `target=level` directives).
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let filter = log_filter(level)?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

/// Installs the global subscriber. Called once by `main`; the filter was validated with the rest
/// of the configuration.
pub fn init(format: LogFormat, level: &str) -> LogControl {
    let filter = log_filter(level).unwrap_or_else(|_| Targets::new().with_default(Level::INFO));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    // Colour only for a person at a terminal: a log shipper or a file would keep the escapes.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let plain = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    match format {
        LogFormat::Plain => registry.with(plain).init(),
        LogFormat::Json => registry.with(plain.json().flatten_event(true)).init(),
    }
    LogControl(handle)
}
