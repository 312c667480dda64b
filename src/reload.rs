//! SIGHUP: read the configuration again and apply what can change while running — the log level
//! — logging the change; every other changed section is refused with a log line naming it, since
//! it needs a restart. Flags and environment variables keep their values from the start (they
//! override the file); only the file is read again.

use crate::config::{Cli, Config};
use crate::telemetry::LogControl;

/// Handles SIGHUP until the process ends. `current` is the configuration being served.
pub async fn on_sighup(cli: Cli, mut current: Config, log: LogControl) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; configuration reload is off");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP received: reading the configuration again");
        let next = match Config::from_cli(cli.clone()) {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(error = %e, "configuration not reloaded; still serving the previous one");
                continue;
            }
        };
        if next.log_level != current.log_level {
            match log.set_level(&next.log_level) {
                Ok(()) => {
                    tracing::info!(from = %current.log_level, to = %next.log_level, "log level changed");
                    current.log_level = next.log_level.clone();
                }
                Err(e) => tracing::warn!(error = %e, "log level not changed"),
            }
        }
        for section in needs_restart(&current, &next) {
            tracing::warn!(
                section,
                "configuration changed but needs a restart to take effect; not applied"
            );
        }
    }
}

/// The sections of `next` that differ from `current` and cannot change while running.
fn needs_restart(current: &Config, next: &Config) -> Vec<&'static str> {
    let mut sections = Vec::new();
    for (name, changed) in [
        ("etcd", current.etcd != next.etcd),
        ("sync", current.sync != next.sync),
        ("http", current.http != next.http),
        ("mode", current.mode != next.mode),
        ("writes", current.writes != next.writes),
        ("snapshot", current.snapshot != next.snapshot),
        ("log_format", current.log_format != next.log_format),
    ] {
        if changed {
            sections.push(name);
        }
    }
    sections
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changed_sections_need_a_restart() {
        let endpoints = ["http://127.0.0.1:2379".to_string()];
        let current = Config::for_endpoints(&endpoints, &["/a/"]).unwrap();
        let mut next = current.clone();
        next.log_level = "debug".into();
        assert!(
            needs_restart(&current, &next).is_empty(),
            "the log level is live"
        );
        next.sync = Config::for_endpoints(&endpoints, &["/b/"]).unwrap().sync;
        next.http.idle_timeout *= 2;
        next.writes.token = Some("new".into());
        assert_eq!(needs_restart(&current, &next), ["sync", "http", "writes"]);
    }
}
