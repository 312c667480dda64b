//! SIGHUP: read the configuration again (the same command line and environment, the file anew)
//! and apply each changed setting the schema marks live ([`crate::config::settings::LIVE`]),
//! logging each change; every
//! other changed setting is refused with a log line naming it and its section, since it needs a
//! restart. A configuration that no longer validates is refused as a whole.
//!
//! The applied configuration is published into a `watch` channel ([`crate::config::Live`]); the
//! parts that use a live setting read it there each time.

use std::ffi::OsString;

use tokio::sync::watch;

use crate::config::settings::{schema, Setting};
use crate::config::{Config, Environment, Given};
use crate::ops::telemetry::LogControl;

/// Catches SIGHUP from the call on (its default action would end the process) and returns the
/// task that handles each until the process ends, reading `args` (the process's command line)
/// again each time and publishing each applied configuration into `live`. Called inside the
/// runtime.
pub fn on_sighup(
    args: Vec<OsString>,
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
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP received: reading the configuration again");
            // Cloned first: a borrow held across send_replace would deadlock it.
            let current = live.borrow().clone();
            reload(&args, &current, &log, &live);
        }
    }
}

/// Reads the configuration again and publishes into `live` what can be applied, if anything.
fn reload(args: &[OsString], current: &Config, log: &LogControl, live: &watch::Sender<Config>) {
    let next = match Config::from_args(args.iter().cloned(), Environment::Read) {
        Ok(next) => next,
        Err(e) => {
            tracing::warn!(error = %e, "configuration not reloaded; still serving the previous one");
            return;
        }
    };
    let mut plan = Plan::new(&current.given, &next.given);
    for setting in &plan.refused {
        tracing::warn!(
            setting = setting.name,
            section = setting.section,
            "configuration changed but needs a restart to take effect; not applied"
        );
    }
    if plan.changed.iter().any(|s| s.name == "log_level") {
        if let Err(e) = log.set_level(&next.log_level) {
            tracing::warn!(error = %e, "log level not changed");
            plan.keep("log_level", &current.given);
        }
    }
    let applied = match Config::from_given(&plan.applied) {
        Ok(applied) => applied,
        Err(e) => {
            tracing::warn!(error = %e, "configuration not reloaded; still serving the previous one");
            return;
        }
    };
    // Published before it is logged: whoever reads the log line (an operator, a test) may rely
    // on the change being in effect.
    live.send_replace(applied);
    for setting in &plan.changed {
        let (from, to) = plan.describe(setting, &current.given);
        tracing::info!(setting = setting.name, from = %from, to = %to, "configuration changed");
    }
}

/// What a reload does: which changed settings it applies and which it refuses.
struct Plan {
    /// The settings to run with: the current ones, with the live changes taken.
    applied: Given,
    /// Live settings that changed, now in `applied`.
    changed: Vec<Setting>,
    /// Settings that changed but need a restart.
    refused: Vec<Setting>,
}

impl Plan {
    fn new(current: &Given, next: &Given) -> Plan {
        let schema = schema();
        let mut plan = Plan {
            applied: current.clone(),
            changed: Vec::new(),
            refused: Vec::new(),
        };
        for name in current.differences(next) {
            let Some(setting) = schema.iter().find(|s| s.name == name) else {
                continue;
            };
            if setting.live {
                plan.applied.take(&name, next);
                plan.changed.push(setting.clone());
            } else {
                plan.refused.push(setting.clone());
            }
        }
        plan
    }

    /// Leaves setting `name` as it is in `current` after all.
    fn keep(&mut self, name: &str, current: &Given) {
        self.applied.take(name, current);
        self.changed.retain(|s| s.name != name);
    }

    /// A change of `setting` as (from, to) for the log; a sensitive value (a webhook URL may
    /// carry a token) is told only as set, none or a new value.
    fn describe(&self, setting: &Setting, current: &Given) -> (String, String) {
        let text = |given: &Given| given.get(&setting.name).map(|v| v.join(","));
        let (from, to) = (text(current), text(&self.applied));
        if !setting.sensitive {
            let or_none = |t: Option<String>| t.unwrap_or_else(|| "none".into());
            return (or_none(from), or_none(to));
        }
        let said = |t: &Option<String>| if t.is_some() { "set" } else { "none" }.to_string();
        let to_said = match (&from, &to) {
            (Some(_), Some(_)) => "a new value".to_string(),
            (_, t) => said(t),
        };
        (said(&from), to_said)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(settings: &[Setting]) -> Vec<&str> {
        let mut names: Vec<&str> = settings.iter().map(|s| s.name.as_str()).collect();
        names.sort();
        names
    }

    #[test]
    fn live_settings_are_applied_and_the_rest_refused_by_section() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t").unwrap();
        let base = ["config-sidecar", "--endpoints=http://127.0.0.1:2379"];
        let config = |more: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(more);
            Config::from_args(args, Environment::Ignored).unwrap()
        };
        let current = config(&["--prefix=/a/"]);
        let next = config(&[
            "--prefix=/a/",
            "--log-level=debug",
            "--idle-timeout=120s",
            "--webhook=http://127.0.0.1:9/hook?token=s3cret",
            "--request-timeout=9s",
        ]);
        let plan = Plan::new(&current.given, &next.given);
        assert!(
            plan.refused.is_empty(),
            "timeouts, the webhook and the log level are live"
        );
        assert_eq!(
            names(&plan.changed),
            ["idle_timeout", "log_level", "request_timeout", "webhook"]
        );
        assert_eq!(Config::from_given(&plan.applied).unwrap(), next);
        let logged: Vec<(String, String)> = plan
            .changed
            .iter()
            .map(|s| plan.describe(s, &current.given))
            .collect();
        assert!(
            logged.contains(&("60s".into(), "120s".into())),
            "{logged:?}"
        );
        assert!(
            !format!("{logged:?} {:?}", plan.applied).contains("s3cret"),
            "the webhook URL is not logged"
        );

        let next = config(&[
            "--prefix=/b/",
            "--cache-bytes=128MiB",
            &format!("--write-token-file={}", token.display()),
            "--degrade-after=4",
            "--log-level=debug",
        ]);
        let plan = Plan::new(&current.given, &next.given);
        let mut sections: Vec<&str> = plan.refused.iter().map(|s| s.section.as_str()).collect();
        sections.sort();
        assert_eq!(sections, ["http", "mode", "sync", "writes"]);
        assert_eq!(names(&plan.changed), ["log_level"]);
        let applied = Config::from_given(&plan.applied).unwrap();
        assert_eq!(applied.sync, current.sync, "the prefixes stay");
        assert_eq!(applied.log_level, "debug");
    }
}
