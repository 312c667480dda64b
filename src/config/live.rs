//! The configuration as it stands now, for the parts that read a setting SIGHUP may change.

use crate::config::Config;

/// The configuration as it stands now. SIGHUP may change its live settings while running (those
/// whose help says [`crate::config::settings::LIVE`]); the parts that read those settings read
/// them here each time, the rest was fixed at start.
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

    /// Waits for the next applied configuration; `false` once no reload will come.
    pub async fn changed(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }

    /// Reads the current configuration through `f`.
    pub fn get<T>(&self, f: impl FnOnce(&Config) -> T) -> T {
        f(&self.0.borrow())
    }
}
