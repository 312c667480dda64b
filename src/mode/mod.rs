//! The degradation ladder, the heart of the product: what the sidecar can promise right now
//! (`full` → `read-only` → `cache-only`), set by a state machine from the health signals the
//! sync and the probes send, and lowered on demand by an operator's pin.
//!
//! The [`Mode`] itself is here; [`machine`] turns signals into transitions, purely (state +
//! signal → state, the time passed in), so its hysteresis is tested without etcd or real time;
//! [`handle`] publishes the result to readers and keeps the transitions log; [`task`] drives the
//! machine from its channels; [`pin`] is the operator's pin. The ladder knows the settings and
//! the upstream's observations, never the mirror: the sync feeds it through a channel.

use std::time::SystemTime;

use http::HeaderValue;
use serde::Serialize;

pub mod handle;
pub mod machine;
pub mod pin;
pub mod task;

/// What the sidecar can currently promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Nothing loaded yet: reads of keys answer 503 `not_ready`.
    Starting = 0,
    /// No member answers: reads from memory or the disk snapshot.
    CacheOnly = 1,
    /// Members answer but there is no quorum: reads served, writes refused.
    ReadOnly = 2,
    /// etcd has quorum: reads current, writes possible.
    Full = 3,
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

    fn from_u8(v: u8) -> Mode {
        match v {
            1 => Mode::CacheOnly,
            2 => Mode::ReadOnly,
            3 => Mode::Full,
            _ => Mode::Starting,
        }
    }
}

/// Whether every member answers, when there is quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Every member answered the last probe round.
    Healthy,
    /// Quorum, but some member did not answer.
    Degraded,
    /// No quorum.
    Unhealthy,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
