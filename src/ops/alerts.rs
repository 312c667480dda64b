//! Alerts: every mode transition and every change of a health check's status (each member, the
//! watch, the snapshot, memory, the tasks) is an [`Alert`]: logged, counted, and handed to the
//! webhook. Flapping is bounded per check: at most one alert per `alert_min_interval`; changes
//! within it are held back, and when the interval ends the latest one is posted, saying how many
//! were held back (so the last word on a check is never lost). Nothing here waits on the webhook:
//! its queue is bounded and a full queue drops the alert with a log line.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::Live;
use crate::mode::machine::Transition;
use crate::mode::unix_ms;
use crate::ops::checks::{Check, Status};

/// How often the checks are evaluated for changes, besides at every mode transition (when
/// checks usually change too). Each evaluation wakes an idle sidecar and reads `/proc` and the
/// snapshot directory's file system: at every second it was a fifth of an idle sidecar's CPU
/// (benches/fleet/); a check's alert may come this much later than its change.
pub const EVALUATE_EVERY: Duration = Duration::from_secs(5);

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The serving mode.
    Mode,
    /// A health check's status.
    Check,
}

/// One alert, as posted (JSON) or summed up in words (Slack).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    /// A mode transition or a check's change.
    pub kind: AlertKind,
    /// The check's name (`etcd:<url>`, `watch`, `snapshot`, `memory`, `tasks`), or `mode`.
    pub check: String,
    /// The status (or mode) last posted for it.
    pub from: String,
    /// The status (or mode) now.
    pub to: String,
    /// Why, in words.
    pub reason: String,
    /// When it changed, in Unix milliseconds.
    pub at_unix_ms: u64,
    /// Changes of this check since the last post that were not posted on their own.
    pub held_back: u64,
    /// Which sidecar: the host name (the pod's name in Kubernetes).
    pub sidecar: String,
}

impl Alert {
    /// A mode transition as an alert.
    pub fn mode(transition: &Transition, sidecar: &str) -> Alert {
        Alert {
            kind: AlertKind::Mode,
            check: "mode".into(),
            from: transition.from.as_str().into(),
            to: transition.to.as_str().into(),
            reason: transition.reason.clone(),
            at_unix_ms: transition.at_unix_ms,
            held_back: 0,
            sidecar: sidecar.into(),
        }
    }

    /// The alert in one line, for Slack-style webhooks and logs.
    pub fn text(&self) -> String {
        let what = match self.kind {
            AlertKind::Mode => "mode".to_string(),
            AlertKind::Check => format!("check {}", self.check),
        };
        let held = match self.held_back {
            0 => String::new(),
            n => format!(" ({n} more changes held back)"),
        };
        format!(
            "config-sidecar {}: {what} {} → {}: {}{held}",
            self.sidecar, self.from, self.to, self.reason
        )
    }
}

/// One check's flapping bound.
#[derive(Debug, Default)]
pub struct Limiter {
    /// When the last alert for the check was posted.
    last_posted: Option<Instant>,
    /// The latest change held back, if any.
    pending: Option<Alert>,
    /// Changes held back since the last post.
    held: u64,
}

impl Limiter {
    /// Whether the check's last post is at least `min` ago (or there was none).
    fn due(&self, now: Instant, min: Duration) -> bool {
        self.last_posted
            .is_none_or(|at| now.duration_since(at) >= min)
    }

    /// A change: posted at once when the check's last post is at least `min` ago, else held.
    pub fn offer(&mut self, mut alert: Alert, now: Instant, min: Duration) -> Option<Alert> {
        if self.due(now, min) && self.pending.is_none() {
            self.last_posted = Some(now);
            return Some(alert);
        }
        if let Some(held) = &self.pending {
            // Posted later, it says what changed since the last post.
            alert.from = held.from.clone();
        }
        self.held += 1;
        self.pending = Some(alert);
        None
    }

    /// The held change, once the interval since the last post has passed.
    pub fn flush(&mut self, now: Instant, min: Duration) -> Option<Alert> {
        if !self.due(now, min) {
            return None;
        }
        let mut alert = self.pending.take()?;
        alert.held_back = self.held - 1;
        self.held = 0;
        self.last_posted = Some(now);
        Some(alert)
    }
}

/// Alerts counted by check and by what became of them, for `/metrics`.
#[derive(Debug, Default)]
pub struct AlertCounts(Mutex<BTreeMap<(String, &'static str), u64>>);

impl AlertCounts {
    fn count(&self, check: &str, result: &'static str) {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *counts.entry((check.to_string(), result)).or_default() += 1;
    }

    /// Every `(check, result)` count: result `posted`, `held_back` or `dropped`.
    pub fn snapshot(&self) -> Vec<((String, &'static str), u64)> {
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// The checks now, or `None` while nothing is loaded (before that, checks only say "starting").
pub type Evaluate = Box<dyn Fn() -> Option<Vec<Check>> + Send>;

/// The alerting task.
pub struct AlertTask {
    /// Mode transitions, from the mode task.
    transitions: mpsc::Receiver<Transition>,
    /// The checks, evaluated every [`EVALUATE_EVERY`].
    evaluate: Evaluate,
    /// Where alerts go: the webhook task's bounded queue.
    webhook: mpsc::Sender<Alert>,
    /// The flapping bound, read at each alert (SIGHUP may change it).
    live: Live,
    /// Counts for `/metrics`.
    counts: Arc<AlertCounts>,
    /// Which sidecar, in every alert.
    sidecar: String,
}

impl AlertTask {
    /// A task alerting on `evaluate`'s checks and on the transitions sent to the returned sender,
    /// posting through `webhook`.
    pub fn new(
        live: Live,
        evaluate: Evaluate,
        transitions: mpsc::Receiver<Transition>,
        webhook: mpsc::Sender<Alert>,
        counts: Arc<AlertCounts>,
    ) -> Self {
        AlertTask {
            transitions,
            evaluate,
            webhook,
            live,
            counts,
            sidecar: host_name(),
        }
    }

    /// Runs until the mode task is gone.
    pub async fn run(mut self) {
        let mut limiters: HashMap<String, Limiter> = HashMap::new();
        let mut statuses: HashMap<String, Status> = HashMap::new();
        let mut tick = tokio::time::interval(EVALUATE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                transition = self.transitions.recv() => {
                    let Some(transition) = transition else { return };
                    let alert = Alert::mode(&transition, &self.sidecar);
                    self.offer(&mut limiters, alert, transition.to < transition.from);
                    self.evaluate_checks(&mut limiters, &mut statuses);
                }
                _ = tick.tick() => {
                    self.evaluate_checks(&mut limiters, &mut statuses);
                    let min = self.min_interval();
                    let now = Instant::now();
                    for limiter in limiters.values_mut() {
                        if let Some(alert) = limiter.flush(now, min) {
                            self.post(alert);
                        }
                    }
                }
            }
        }
    }

    /// Evaluates the checks and offers each change of status as an alert.
    fn evaluate_checks(
        &self,
        limiters: &mut HashMap<String, Limiter>,
        statuses: &mut HashMap<String, Status>,
    ) {
        if let Some(checks) = (self.evaluate)() {
            for alert in changes(statuses, &checks, &self.sidecar) {
                let worse = rank(&alert.to) > rank(&alert.from);
                self.offer(limiters, alert, worse);
            }
        }
    }

    fn min_interval(&self) -> Duration {
        self.live.get(|c| c.mode.alert_min_interval)
    }

    /// Logs and counts one change, then posts it or holds it back.
    fn offer(&self, limiters: &mut HashMap<String, Limiter>, alert: Alert, worse: bool) {
        if worse {
            tracing::warn!(check = %alert.check, from = %alert.from, to = %alert.to, reason = %alert.reason, "alert");
        } else {
            tracing::info!(check = %alert.check, from = %alert.from, to = %alert.to, reason = %alert.reason, "alert");
        }
        let min = self.min_interval();
        let limiter = limiters.entry(alert.check.clone()).or_default();
        let check = alert.check.clone();
        match limiter.offer(alert, Instant::now(), min) {
            Some(alert) => self.post(alert),
            None => self.counts.count(&check, "held_back"),
        }
    }

    fn post(&self, alert: Alert) {
        let check = alert.check.clone();
        if self.webhook.try_send(alert).is_err() {
            tracing::warn!(%check, "alert queue full or closed; an alert was not posted");
            self.counts.count(&check, "dropped");
        } else {
            self.counts.count(&check, "posted");
        }
    }
}

/// How bad a status or mode is, to log a change as a warning or as news.
fn rank(status: &str) -> u8 {
    match status {
        "healthy" | "full" => 0,
        "degraded" | "read-only" => 1,
        "starting" => 2,
        _ => 3,
    }
}

/// The checks whose status differs from the last evaluation, as alerts; the first evaluation
/// of a check only records it.
fn changes(last: &mut HashMap<String, Status>, checks: &[Check], sidecar: &str) -> Vec<Alert> {
    let now = unix_ms(SystemTime::now());
    let mut alerts = Vec::new();
    for check in checks {
        let before = last.insert(check.name.clone(), check.status);
        match before {
            Some(before) if before != check.status => alerts.push(Alert {
                kind: AlertKind::Check,
                check: check.name.clone(),
                from: status_name(before).into(),
                to: status_name(check.status).into(),
                reason: check.reason.clone(),
                at_unix_ms: now,
                held_back: 0,
                sidecar: sidecar.into(),
            }),
            _ => {}
        }
    }
    alerts
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::Healthy => "healthy",
        Status::Degraded => "degraded",
        Status::Unhealthy => "unhealthy",
    }
}

/// The host name: in Kubernetes, the pod's name.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mode::Mode;

    fn transition(from: Mode, to: Mode, reason: &str) -> Transition {
        Transition {
            from,
            to,
            reason: reason.into(),
            at_unix_ms: 1,
        }
    }

    fn live(min: Duration) -> Live {
        let mut config =
            crate::config::Config::for_endpoints(&["http://127.0.0.1:1".into()], &["/a/"]).unwrap();
        config.mode.alert_min_interval = min;
        Live::fixed(config)
    }

    fn check(name: &str, status: Status) -> Check {
        Check {
            name: name.into(),
            status,
            critical: false,
            reason: format!("{name} is {status:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn flapping_is_bounded_per_check_and_the_last_word_is_posted() {
        let (webhook, mut posted) = mpsc::channel(64);
        let counts = Arc::new(AlertCounts::default());
        let member = Arc::new(Mutex::new(Status::Healthy));
        let evaluate: Evaluate = {
            let member = member.clone();
            Box::new(move || Some(vec![check("etcd:m0", *member.lock().unwrap())]))
        };
        let (transitions, received) = mpsc::channel(8);
        let task = AlertTask::new(
            live(Duration::from_secs(60)),
            evaluate,
            received,
            webhook,
            counts.clone(),
        );
        tokio::spawn(task.run());

        // The first transition is posted at once.
        transitions
            .send(transition(Mode::Full, Mode::ReadOnly, "lost quorum"))
            .await
            .unwrap();
        let first = posted.recv().await.unwrap();
        assert_eq!(
            (first.kind, first.from.as_str(), first.to.as_str()),
            (AlertKind::Mode, "full", "read-only")
        );
        assert_eq!(first.held_back, 0);
        // Three more within the minute: held back, the latest kept.
        for (from, to) in [
            (Mode::ReadOnly, Mode::Full),
            (Mode::Full, Mode::ReadOnly),
            (Mode::ReadOnly, Mode::CacheOnly),
        ] {
            transitions
                .send(transition(from, to, "flap"))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(
            posted.try_recv().is_err(),
            "nothing more within the interval"
        );

        // A member check flaps too: its own bound, its first change posted at once.
        *member.lock().unwrap() = Status::Unhealthy;
        tokio::time::sleep(EVALUATE_EVERY * 2).await;
        let alert = posted.try_recv().expect("the check's first change");
        assert_eq!(
            (
                alert.kind,
                alert.check.as_str(),
                alert.from.as_str(),
                alert.to.as_str()
            ),
            (AlertKind::Check, "etcd:m0", "healthy", "unhealthy")
        );
        *member.lock().unwrap() = Status::Healthy;
        tokio::time::sleep(EVALUATE_EVERY * 2).await;
        assert!(posted.try_recv().is_err(), "held back");

        // The mode's minute ends: the latest transition, from what was last posted, with the
        // count of the ones between.
        tokio::time::sleep(Duration::from_secs(31)).await;
        let last = posted.try_recv().expect("the held transition");
        assert_eq!(
            (last.from.as_str(), last.to.as_str()),
            ("read-only", "cache-only")
        );
        assert_eq!(last.held_back, 2);
        assert!(
            last.text().contains("2 more changes held back"),
            "{}",
            last.text()
        );
        // Then the check's minute: back to healthy, nothing else held.
        tokio::time::sleep(Duration::from_secs(30)).await;
        let back = posted.try_recv().expect("the check's last word");
        assert_eq!(
            (back.check.as_str(), back.from.as_str(), back.to.as_str()),
            ("etcd:m0", "unhealthy", "healthy")
        );
        assert_eq!(back.held_back, 0);
        let counted: BTreeMap<_, _> = counts.snapshot().into_iter().collect();
        assert_eq!(counted[&("mode".to_string(), "posted")], 2);
        assert_eq!(counted[&("mode".to_string(), "held_back")], 3);
        assert_eq!(counted[&("etcd:m0".to_string(), "posted")], 2);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (webhook, _posted) = mpsc::channel(1);
        let counts = Arc::new(AlertCounts::default());
        let (_tx, received) = mpsc::channel(1);
        let task = AlertTask::new(
            live(Duration::ZERO),
            Box::new(|| None),
            received,
            webhook,
            counts.clone(),
        );
        let mut limiters = HashMap::new();
        for i in 0..3 {
            let mut alert = Alert::mode(&transition(Mode::Full, Mode::ReadOnly, "x"), "s");
            alert.check = format!("c{i}");
            task.offer(&mut limiters, alert, true);
        }
        let counted = counts.snapshot();
        assert_eq!(counted.iter().filter(|(k, _)| k.1 == "posted").count(), 1);
        assert_eq!(counted.iter().filter(|(k, _)| k.1 == "dropped").count(), 2);
    }

    #[test]
    fn the_first_evaluation_only_records() {
        let mut last = HashMap::new();
        assert!(changes(&mut last, &[check("watch", Status::Degraded)], "s").is_empty());
        let alerts = changes(&mut last, &[check("watch", Status::Healthy)], "s");
        assert_eq!(alerts.len(), 1);
        assert_eq!(
            (alerts[0].from.as_str(), alerts[0].to.as_str()),
            ("degraded", "healthy")
        );
    }
}
