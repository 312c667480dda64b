//! The operator's pin: a mode set by hand (the admin API or the `pin` setting) that what is
//! served may not exceed. The mode task owns it, like every other input of the mode machine;
//! requests reach it on a channel and are answered once applied.

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::PinSetting;
use crate::mode::Mode;

/// Who set a pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PinSource {
    /// `POST /v1/admin/mode`.
    Api,
    /// The `pin` setting (flag, environment or file; SIGHUP applies a change).
    Config,
}

/// A pin in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pin {
    /// The most that is served: `read-only` or `cache-only`.
    pub mode: Mode,
    /// The operator's words, repeated in refusals, status, logs and the webhook.
    pub reason: String,
    /// Who set it.
    pub source: PinSource,
    /// When, in Unix milliseconds.
    pub since_unix_ms: u64,
}

/// A request to pin (`mode: Some`) or unpin, for the mode task.
#[derive(Debug)]
pub struct PinRequest {
    /// `read-only` or `cache-only`; `None` unpins.
    pub mode: Option<Mode>,
    /// Why.
    pub reason: String,
    /// Who asks.
    pub source: PinSource,
    /// Told once the pin is in force (and published).
    pub done: Option<oneshot::Sender<()>>,
}

/// The mode task is not running (the sidecar is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the mode task is not running")]
pub struct PinUnavailable;

/// Where pin requests go.
pub type PinRequests = mpsc::Sender<PinRequest>;

/// The mode a `pin` setting asks for (`None`: auto).
pub fn from_setting(setting: PinSetting) -> Option<Mode> {
    match setting {
        PinSetting::Auto => None,
        PinSetting::ReadOnly => Some(Mode::ReadOnly),
        PinSetting::CacheOnly => Some(Mode::CacheOnly),
    }
}

/// The mode a pin request names: `read-only`, `cache-only` or `auto` (`Ok(None)`); `full` cannot
/// be pinned, as it would claim a quorum the facts may not have.
pub fn parse(name: &str) -> Result<Option<Mode>, String> {
    match name {
        "read-only" => Ok(Some(Mode::ReadOnly)),
        "cache-only" => Ok(Some(Mode::CacheOnly)),
        "auto" => Ok(None),
        "full" => Err("full cannot be pinned: it would claim a quorum; use auto".into()),
        other => Err(format!(
            "unknown mode {other:?}: read-only, cache-only or auto"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lower_modes_or_auto_can_be_pinned() {
        assert_eq!(parse("read-only"), Ok(Some(Mode::ReadOnly)));
        assert_eq!(parse("cache-only"), Ok(Some(Mode::CacheOnly)));
        assert_eq!(parse("auto"), Ok(None));
        assert!(parse("full").unwrap_err().contains("cannot be pinned"));
        assert!(parse("starting").is_err());
    }
}
