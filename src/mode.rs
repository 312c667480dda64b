//! The sidecar's serving mode, as every response reports it in `X-Config-Mode`.
//!
//! The degradation ladder (`full` → `read-only` → `cache-only`, driven by health probes with
//! hysteresis) builds on this type; until probes exist the mode follows the mirror alone:
//! `starting` before the first complete load, `full` after it.

use http::HeaderValue;
use serde::Serialize;

/// What the sidecar can currently promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Nothing loaded yet: reads of keys answer 503 `not_ready`.
    Starting,
    /// etcd has quorum: reads current, writes possible.
    Full,
    /// Members answer but there is no quorum: reads served, writes refused.
    ReadOnly,
    /// No member answers: reads from memory or the disk snapshot.
    CacheOnly,
}

impl Mode {
    /// The mode's name as used in headers and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Starting => "starting",
            Mode::Full => "full",
            Mode::ReadOnly => "read-only",
            Mode::CacheOnly => "cache-only",
        }
    }

    /// The `X-Config-Mode` header value.
    pub fn header(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}
