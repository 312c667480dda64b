//! SIGHUP: read the configuration again and apply what can change while running — the log level,
//! the webhook, the probe interval and timeout, the etcd request timeout, the connection
//! timeouts, the shutdown grace and the memory budget — logging each change; every other changed section is refused
//! with a log line naming it, since it needs a restart. Flags and environment variables keep their
//! values from the start (they override the file); only the file is read again.
//!
//! The applied configuration is published into a `watch` channel ([`crate::config::Live`]); the
//! parts that use a live setting read it there each time.

use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Cli, Config};
use crate::ops::telemetry::LogControl;

/// Catches SIGHUP from the call on (its default action would end the process) and returns the
/// task that handles each until the process ends, publishing each applied configuration into
/// `live`. Called inside the runtime.
pub fn on_sighup(
    cli: Cli,
    live: watch::Sender<Config>,
    log: LogControl,
) -> impl std::future::Future<Output = ()> {
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        let mut hangups = match hangups {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; configuration reload is off");
                return;
            }
        };
        handle_hangups(&mut hangups, cli, live, log).await;
    }
}

async fn handle_hangups(
    hangups: &mut tokio::signal::unix::Signal,
    cli: Cli,
    live: watch::Sender<Config>,
    log: LogControl,
) {
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP received: reading the configuration again");
        let next = match Config::from_cli(cli.clone()) {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(error = %e, "configuration not reloaded; still serving the previous one");
                continue;
            }
        };
        let current = live.borrow().clone();
        let mut applied = current.clone();
        take_live_settings(&mut applied, &next);
        if applied.log_level != current.log_level {
            if let Err(e) = log.set_level(&applied.log_level) {
                tracing::warn!(error = %e, "log level not changed");
                applied.log_level = current.log_level.clone();
            }
        }
        for (setting, from, to) in live_changes(&current, &applied) {
            tracing::info!(setting, from = %from, to = %to, "configuration changed");
        }
        for section in needs_restart(&current, &next) {
            tracing::warn!(
                section,
                "configuration changed but needs a restart to take effect; not applied"
            );
        }
        live.send_replace(applied);
    }
}

/// Copies the settings that can change while running from `from` into `into`.
fn take_live_settings(into: &mut Config, from: &Config) {
    into.log_level = from.log_level.clone();
    into.mode.webhook = from.mode.webhook.clone();
    into.mode.probe_interval = from.mode.probe_interval;
    into.mode.probe_timeout = from.mode.probe_timeout;
    into.etcd.request_timeout = from.etcd.request_timeout;
    into.http.header_read_timeout = from.http.header_read_timeout;
    into.http.idle_timeout = from.http.idle_timeout;
    into.http.shutdown_grace = from.http.shutdown_grace;
    into.http.body_read_timeout = from.http.body_read_timeout;
    into.memory_budget = from.memory_budget;
}

/// The live settings that differ, as (setting, from, to) for the log. The webhook's URL is not
/// printed (it may carry a token); only whether it was set, changed or removed.
fn live_changes(current: &Config, next: &Config) -> Vec<(&'static str, String, String)> {
    let mut changes = Vec::new();
    let mut duration = |name: &'static str, a: Duration, b: Duration| {
        if a != b {
            changes.push((
                name,
                humantime::format_duration(a).to_string(),
                humantime::format_duration(b).to_string(),
            ));
        }
    };
    duration(
        "probe_interval",
        current.mode.probe_interval,
        next.mode.probe_interval,
    );
    duration(
        "probe_timeout",
        current.mode.probe_timeout,
        next.mode.probe_timeout,
    );
    duration(
        "request_timeout",
        current.etcd.request_timeout,
        next.etcd.request_timeout,
    );
    duration(
        "header_read_timeout",
        current.http.header_read_timeout,
        next.http.header_read_timeout,
    );
    duration(
        "idle_timeout",
        current.http.idle_timeout,
        next.http.idle_timeout,
    );
    duration(
        "shutdown_grace",
        current.http.shutdown_grace,
        next.http.shutdown_grace,
    );
    duration(
        "body_read_timeout",
        current.http.body_read_timeout,
        next.http.body_read_timeout,
    );
    if current.memory_budget != next.memory_budget {
        let text = |b: Option<u64>| b.map_or("none".into(), |b| format!("{b} bytes"));
        changes.push((
            "memory_budget",
            text(current.memory_budget),
            text(next.memory_budget),
        ));
    }
    if current.log_level != next.log_level {
        changes.push((
            "log_level",
            current.log_level.clone(),
            next.log_level.clone(),
        ));
    }
    let said = |w: &Option<String>| if w.is_some() { "set" } else { "none" }.to_string();
    if current.mode.webhook != next.mode.webhook {
        let to = match (&current.mode.webhook, &next.mode.webhook) {
            (Some(_), Some(_)) => "a new URL".to_string(),
            (_, w) => said(w),
        };
        changes.push(("webhook", said(&current.mode.webhook), to));
    }
    changes
}

/// The sections of `next` that differ from `current` in settings that cannot change while
/// running.
fn needs_restart(current: &Config, next: &Config) -> Vec<&'static str> {
    let mut next = next.clone();
    // Live settings never need a restart: compare the rest only.
    take_live_settings(&mut next, current);
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
        next.http.idle_timeout *= 2;
        next.mode.webhook = Some("http://127.0.0.1:9/hook?token=s3cret".into());
        next.etcd.request_timeout = Duration::from_secs(9);
        assert!(
            needs_restart(&current, &next).is_empty(),
            "timeouts and the webhook are live"
        );
        let changes = live_changes(&current, &next);
        let names: Vec<_> = changes.iter().map(|c| c.0).collect();
        assert_eq!(
            names,
            ["request_timeout", "idle_timeout", "log_level", "webhook"]
        );
        assert!(
            !format!("{changes:?}").contains("s3cret"),
            "the webhook URL is not logged"
        );

        next.sync = Config::for_endpoints(&endpoints, &["/b/"]).unwrap().sync;
        next.http.cache_bytes *= 2;
        next.writes.token = Some("new".into());
        next.mode.degrade_after += 1;
        assert_eq!(
            needs_restart(&current, &next),
            ["sync", "http", "mode", "writes"]
        );
    }
}
