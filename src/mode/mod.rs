//! The serving mode and the state machine that moves between modes.
//!
//! Health probes and the sync task produce [`Signal`]s; [`ModeMachine`] is pure (state + signal →
//! state, with the time passed in), so its hysteresis is tested without etcd or real time.
//! [`ModeHandle`] publishes the result: atomics for the per-request hot path (mode, staleness) and
//! a mutex for the transition history shown in `/v1/status`.
//!
//! Rules:
//! - `starting` until the mirror is loaded: from etcd (→ `full`: the load began with a quorum
//!   read) or from the disk snapshot (→ `cache-only` until probes say more).
//! - Degrade after `degrade_after` consecutive probe rounds worse than the current mode, to the
//!   best level seen in that streak.
//! - Recover after `recover_after` consecutive rounds better than the current mode, to the worst
//!   level seen in that streak; recovering to `full` also needs the watch running again (a
//!   completed resync), so `full` never means "quorum is back but the mirror is behind".

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use serde::Serialize;

use crate::config::Live;
use crate::upstream::{EndpointPool, Observation};
use pin::{Pin, PinRequest, PinRequests, PinSource, PinUnavailable};

pub mod pin;

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

/// How good a mode an observation allows.
fn level(observation: Observation) -> Mode {
    match observation {
        Observation::Quorum { .. } => Mode::Full,
        Observation::NoQuorum => Mode::ReadOnly,
        Observation::Unreachable => Mode::CacheOnly,
    }
}

/// An input to the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The mirror was loaded from etcd (a complete, linearizable load).
    LoadedFromEtcd,
    /// The mirror was loaded from the disk snapshot.
    LoadedFromSnapshot,
    /// The mirror holds the bundled defaults (no snapshot was usable, etcd gave nothing).
    LoadedFromDefaults,
    /// The watch is running at the current revision (first time, or after an outage).
    WatchRunning,
    /// The watch stopped.
    WatchLost,
    /// etcd ended the watch, which requires a leader, saying its member has none: it does so
    /// after three election timeouts without, so the cluster has lost its quorum (or the member
    /// is cut off from it, which the probes that now run will show).
    LeaderLost,
    /// One probe round's verdict.
    Probe(Observation),
}

/// One mode change.
#[derive(Debug, Clone, Serialize)]
pub struct Transition {
    /// Mode before.
    pub from: Mode,
    /// Mode after.
    pub to: Mode,
    /// Why, in words.
    pub reason: String,
    /// When, in Unix milliseconds.
    pub at_unix_ms: u64,
}

/// Hysteresis settings.
#[derive(Debug, Clone, Copy)]
pub struct Hysteresis {
    /// Consecutive worse rounds before degrading.
    pub degrade_after: u32,
    /// Consecutive better rounds before recovering.
    pub recover_after: u32,
}

/// The pure state machine.
#[derive(Debug, Clone)]
pub struct ModeMachine {
    /// Current mode.
    mode: Mode,
    /// Current health.
    health: Health,
    /// Hysteresis.
    hysteresis: Hysteresis,
    /// Levels of the current streak of rounds worse than `mode`.
    worse: Vec<Mode>,
    /// Consecutive rounds with quorum.
    quorum_streak: u32,
    /// Consecutive rounds in which some member answered.
    reach_streak: u32,
    /// Whether the watch is running; `full` needs it.
    watching: bool,
    /// The mode an operator pinned: what is served is the lower of it and the facts' mode.
    pinned: Option<Mode>,
}

impl ModeMachine {
    /// A machine in `starting`.
    pub fn new(hysteresis: Hysteresis) -> Self {
        ModeMachine {
            mode: Mode::Starting,
            health: Health::Unhealthy,
            hysteresis,
            worse: Vec::new(),
            quorum_streak: 0,
            reach_streak: 0,
            watching: false,
            pinned: None,
        }
    }

    /// The mode served: the facts' mode, lowered to the pin if there is one. A pin never claims
    /// more than the facts, and nothing loaded stays `starting`.
    pub fn mode(&self) -> Mode {
        match self.pinned {
            Some(pin) if self.mode != Mode::Starting => self.mode.min(pin),
            _ => self.mode,
        }
    }

    /// The mode the facts alone allow.
    pub fn facts(&self) -> Mode {
        self.mode
    }

    /// Pins the served mode to `pin` (`None`: back to the facts). Pinned `cache-only`, the
    /// sidecar sends etcd nothing, so what it knew stops holding: the facts drop to `cache-only`
    /// too and, once unpinned, climb back by the usual path (probe rounds, then a resynced watch).
    pub fn pin(&mut self, pin: Option<Mode>, reason: &str, now: SystemTime) -> Option<Transition> {
        debug_assert!(pin.is_none_or(|m| m == Mode::ReadOnly || m == Mode::CacheOnly));
        let before = self.mode();
        self.pinned = pin;
        if pin == Some(Mode::CacheOnly) {
            if self.mode > Mode::CacheOnly {
                self.mode = Mode::CacheOnly;
            }
            self.watching = false;
            self.worse.clear();
            self.quorum_streak = 0;
            self.reach_streak = 0;
        }
        let after = self.mode();
        (before != after).then(|| Transition {
            from: before,
            to: after,
            reason: match pin {
                Some(m) => format!("pinned to {} by the operator: {reason}", m.as_str()),
                None => format!("unpinned by the operator: {reason}"),
            },
            at_unix_ms: unix_ms(now),
        })
    }

    /// The current health.
    pub fn health(&self) -> Health {
        self.health
    }

    /// Feeds one signal; returns the transition it caused, if any.
    pub fn on(&mut self, signal: Signal, now: SystemTime) -> Option<Transition> {
        let (target, reason) = match signal {
            Signal::LoadedFromEtcd => {
                if self.mode != Mode::Starting {
                    return None;
                }
                // A complete load starts with a linearizable read: proof of quorum, and the
                // mirror is current as of it.
                (Mode::Full, "first complete load from etcd".to_string())
            }
            Signal::LoadedFromSnapshot => {
                if self.mode != Mode::Starting {
                    return None;
                }
                (
                    Mode::CacheOnly,
                    "serving the disk snapshot until etcd answers".to_string(),
                )
            }
            Signal::LoadedFromDefaults => {
                if self.mode != Mode::Starting {
                    return None;
                }
                (
                    Mode::CacheOnly,
                    "serving the bundled defaults until etcd answers".to_string(),
                )
            }
            Signal::WatchRunning => {
                self.watching = true;
                if self.mode == Mode::Starting {
                    return None;
                }
                self.recovery()?
            }
            Signal::WatchLost => {
                self.watching = false;
                return None;
            }
            Signal::LeaderLost => {
                self.watching = false;
                self.health = Health::Unhealthy;
                self.quorum_streak = 0;
                self.worse.clear();
                if self.mode != Mode::Full {
                    return None;
                }
                (
                    Mode::ReadOnly,
                    "etcd ended the watch: its member has had no leader for three election timeouts"
                        .to_string(),
                )
            }
            Signal::Probe(observation) => {
                self.health = match observation {
                    Observation::Quorum { all_members: true } => Health::Healthy,
                    Observation::Quorum { all_members: false } => Health::Degraded,
                    _ => Health::Unhealthy,
                };
                let level = level(observation);
                self.quorum_streak = if level == Mode::Full {
                    self.quorum_streak + 1
                } else {
                    0
                };
                self.reach_streak = if level >= Mode::ReadOnly {
                    self.reach_streak + 1
                } else {
                    0
                };
                if self.mode == Mode::Starting {
                    return None;
                }
                if level < self.mode {
                    self.worse.push(level);
                    if (self.worse.len() as u32) < self.hysteresis.degrade_after {
                        return None;
                    }
                    let target = *self.worse.iter().max().expect("streak is not empty");
                    let reason = format!(
                        "{} consecutive probe rounds: {}",
                        self.worse.len(),
                        observation.describe()
                    );
                    (target, reason)
                } else {
                    self.worse.clear();
                    self.recovery()?
                }
            }
        };
        if target == self.mode {
            return None;
        }
        let from = self.mode();
        self.mode = target;
        self.worse.clear();
        // Behind a pin the facts may change without changing what is served.
        let to = self.mode();
        (from != to).then(|| Transition {
            from,
            to,
            reason,
            at_unix_ms: unix_ms(now),
        })
    }

    /// The mode the current good streaks allow, when it is above the current one.
    fn recovery(&self) -> Option<(Mode, String)> {
        let enough = self.hysteresis.recover_after;
        let target = if self.quorum_streak >= enough && self.watching {
            (
                Mode::Full,
                format!(
                    "{} consecutive probe rounds with quorum, watch resynced",
                    self.quorum_streak
                ),
            )
        } else if self.reach_streak >= enough {
            (
                Mode::ReadOnly,
                format!(
                    "{} consecutive probe rounds with a member answering{}",
                    self.reach_streak,
                    if self.quorum_streak >= enough {
                        " (quorum, waiting for the watch to resync)"
                    } else {
                        ""
                    }
                ),
            )
        } else {
            return None;
        };
        (target.0 > self.mode).then_some(target)
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// How many transitions `/v1/status` lists.
pub const TRANSITION_HISTORY: usize = 20;

/// The published mode: read per request, written by the mode task.
pub struct ModeHandle {
    /// The current mode, as `Mode as u8`.
    mode: AtomicU8,
    /// Unix ms of the last time the sidecar confirmed, with quorum, that it holds the latest data;
    /// 0 when never.
    confirmed_at_ms: AtomicU64,
    /// The last transitions, newest last, and how many there were in all.
    history: Mutex<(VecDeque<Transition>, u64)>,
    /// How many transitions there were between each pair of modes, for metrics.
    counts: Mutex<Vec<((Mode, Mode), u64)>>,
    /// Current health.
    health: Mutex<Health>,
    /// Each transition, for change streams (`event: mode`).
    transitions_tx: tokio::sync::broadcast::Sender<Transition>,
    /// The operator's pin, as the mode task last applied it.
    pin: Mutex<Option<Pin>>,
    /// The pinned mode as `Mode as u8` (0: none), read per response for `X-Config-Pinned`.
    pinned: AtomicU8,
    /// Where pin requests go: the mode task, once it runs.
    pin_requests: OnceLock<PinRequests>,
}

impl Default for ModeHandle {
    fn default() -> Self {
        let (transitions_tx, _) = tokio::sync::broadcast::channel(64);
        ModeHandle {
            transitions_tx,
            mode: AtomicU8::new(Mode::Starting as u8),
            confirmed_at_ms: AtomicU64::new(0),
            history: Mutex::new((VecDeque::new(), 0)),
            counts: Mutex::new(Vec::new()),
            health: Mutex::new(Health::Unhealthy),
            pin: Mutex::new(None),
            pinned: AtomicU8::new(0),
            pin_requests: OnceLock::new(),
        }
    }
}

impl ModeHandle {
    /// The current mode.
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Acquire))
    }

    /// Publishes a transition.
    pub fn publish(&self, transition: &Transition) {
        self.mode.store(transition.to as u8, Ordering::Release);
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        h.0.push_back(transition.clone());
        if h.0.len() > TRANSITION_HISTORY {
            h.0.pop_front();
        }
        h.1 += 1;
        drop(h);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let pair = (transition.from, transition.to);
        match counts.iter_mut().find(|(p, _)| *p == pair) {
            Some((_, n)) => *n += 1,
            None => counts.push((pair, 1)),
        }
        drop(counts);
        // No receivers is fine: no stream is open.
        let _ = self.transitions_tx.send(transition.clone());
    }

    /// The pin in force, if any.
    pub fn pin(&self) -> Option<Pin> {
        self.pin.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The pinned mode, if any (cheap: for every response's headers).
    pub fn pinned(&self) -> Option<Mode> {
        match self.pinned.load(Ordering::Acquire) {
            0 => None,
            v => Some(Mode::from_u8(v)),
        }
    }

    fn set_pin(&self, pin: Option<Pin>) {
        self.pinned
            .store(pin.as_ref().map_or(0, |p| p.mode as u8), Ordering::Release);
        *self.pin.lock().unwrap_or_else(|e| e.into_inner()) = pin;
    }

    /// Asks the mode task to pin `mode` (`None`: unpin) and waits until it is in force.
    pub async fn request_pin(
        &self,
        mode: Option<Mode>,
        reason: String,
        source: PinSource,
    ) -> Result<(), PinUnavailable> {
        let requests = self.pin_requests.get().ok_or(PinUnavailable)?;
        let (done, applied) = tokio::sync::oneshot::channel();
        let request = PinRequest {
            mode,
            reason,
            source,
            done: Some(done),
        };
        requests.send(request).await.map_err(|_| PinUnavailable)?;
        applied.await.map_err(|_| PinUnavailable)
    }

    /// Follows the transitions from now on.
    pub fn follow(&self) -> tokio::sync::broadcast::Receiver<Transition> {
        self.transitions_tx.subscribe()
    }

    /// Publishes the health of the last probe round.
    pub fn set_health(&self, health: Health) {
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = health;
    }

    /// The health of the last probe round.
    pub fn health(&self) -> Health {
        *self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that at `at` the mirror was confirmed to hold the latest data.
    pub fn confirm(&self, at: SystemTime) {
        self.confirmed_at_ms
            .fetch_max(unix_ms(at), Ordering::AcqRel);
    }

    /// Time since the last confirmation (`None`: never confirmed).
    pub fn staleness(&self, now: SystemTime) -> Option<Duration> {
        match self.confirmed_at_ms.load(Ordering::Acquire) {
            0 => None,
            at => Some(Duration::from_millis(unix_ms(now).saturating_sub(at))),
        }
    }

    /// How many transitions there were between each pair of modes (pairs never seen are absent).
    pub fn transition_counts(&self) -> Vec<((Mode, Mode), u64)> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The last transitions (oldest first) and the total count.
    pub fn history(&self) -> (Vec<Transition>, u64) {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        (h.0.iter().cloned().collect(), h.1)
    }
}

/// Drives the machine: feeds it every signal, publishes each transition to the handle, logs it,
/// and hands it to the alerts task without ever waiting for it.
pub struct ModeTask {
    /// The machine.
    machine: ModeMachine,
    /// Where readers look.
    handle: std::sync::Arc<ModeHandle>,
    /// Signals from the sync and the snapshot loader.
    signals: tokio::sync::mpsc::Receiver<Signal>,
    /// Each probe round's verdict.
    verdicts: tokio::sync::mpsc::Receiver<Observation>,
    /// Transitions for the alerts task, which logs, counts and posts them.
    alerts: tokio::sync::mpsc::Sender<Transition>,
    /// Pin requests from the admin API.
    pins: tokio::sync::mpsc::Receiver<PinRequest>,
    /// The settings, followed for a change of the `pin` setting.
    live: Option<Live>,
    /// The pool to hold while `cache-only` is pinned.
    pool: Option<Arc<EndpointPool>>,
}

impl ModeTask {
    /// A task publishing into `handle`.
    pub fn new(
        hysteresis: Hysteresis,
        handle: std::sync::Arc<ModeHandle>,
        signals: tokio::sync::mpsc::Receiver<Signal>,
        verdicts: tokio::sync::mpsc::Receiver<Observation>,
        alerts: tokio::sync::mpsc::Sender<Transition>,
    ) -> Self {
        let (requests, pins) = tokio::sync::mpsc::channel(8);
        // One mode task per handle; a second one's requests would go nowhere.
        let _ = handle.pin_requests.set(requests);
        ModeTask {
            machine: ModeMachine::new(hysteresis),
            handle,
            signals,
            verdicts,
            alerts,
            pins,
            live: None,
            pool: None,
        }
    }

    /// The same task, following `live` for the `pin` setting and holding `pool` while
    /// `cache-only` is pinned.
    pub fn with_pin_control(mut self, live: Live, pool: Arc<EndpointPool>) -> Self {
        // Held before any task that calls etcd starts, so a configured cache-only pin sends
        // nothing, not even the first load.
        pool.hold(live.get(|c| pin::from_setting(c.mode.pin)) == Some(Mode::CacheOnly));
        self.live = Some(live);
        self.pool = Some(pool);
        self
    }

    /// The `pin` setting now, if the task follows the settings.
    fn pin_setting(&self) -> Option<Option<Mode>> {
        self.live
            .as_ref()
            .map(|live| live.get(|c| pin::from_setting(c.mode.pin)))
    }

    /// Runs until every sender of signals and of verdicts is gone.
    pub async fn run(mut self) {
        let mut setting = self.pin_setting().flatten();
        if setting.is_some() {
            self.apply_pin(
                setting,
                "set in the configuration".into(),
                PinSource::Config,
            );
        }
        loop {
            let signal = tokio::select! {
                Some(signal) = self.signals.recv() => signal,
                Some(verdict) = self.verdicts.recv() => Signal::Probe(verdict),
                Some(mut request) = self.pins.recv() => {
                    self.apply_pin(request.mode, request.reason, request.source);
                    if let Some(done) = request.done.take() {
                        let _ = done.send(());
                    }
                    continue;
                }
                true = changed(&mut self.live) => {
                    // Only a change of the setting itself pins: a reload that leaves it alone
                    // leaves the admin API's pin alone too.
                    let now = self.pin_setting().flatten();
                    if now != setting {
                        setting = now;
                        self.apply_pin(now, "changed in the configuration".into(), PinSource::Config);
                    }
                    continue;
                }
                else => return,
            };
            let transition = self.machine.on(signal, SystemTime::now());
            if matches!(signal, Signal::Probe(_) | Signal::LeaderLost) {
                self.handle.set_health(self.machine.health());
            }
            if let Some(transition) = transition {
                self.publish(transition);
            }
        }
    }

    /// Pins (or unpins) and publishes the pin and the transition it causes. The pool is held
    /// first, so that nothing reaches etcd once `cache-only` is pinned.
    fn apply_pin(&mut self, mode: Option<Mode>, reason: String, source: PinSource) {
        let now = SystemTime::now();
        if let Some(pool) = &self.pool {
            pool.hold(mode == Some(Mode::CacheOnly));
        }
        let transition = self.machine.pin(mode, &reason, now);
        match mode {
            Some(m) => {
                tracing::warn!(mode = m.as_str(), ?source, %reason, "mode pinned by the operator")
            }
            None => tracing::info!(?source, %reason, "mode unpinned by the operator"),
        }
        self.handle.set_pin(mode.map(|mode| Pin {
            mode,
            reason,
            source,
            since_unix_ms: unix_ms(now),
        }));
        if let Some(transition) = transition {
            self.publish(transition);
        }
    }

    /// Logs a transition, publishes it to readers and hands it to the alerts task without waiting.
    fn publish(&self, transition: Transition) {
        if transition.to < transition.from {
            tracing::warn!(from = transition.from.as_str(), to = transition.to.as_str(), reason = %transition.reason, "mode degraded");
        } else {
            tracing::info!(from = transition.from.as_str(), to = transition.to.as_str(), reason = %transition.reason, "mode changed");
        }
        self.handle.publish(&transition);
        if self.alerts.try_send(transition).is_err() {
            tracing::warn!("alert queue full or closed; a mode transition was not alerted");
        }
    }
}

/// Completes with `true` when the followed settings change; never without settings to follow
/// (or once their sender is gone).
async fn changed(live: &mut Option<Live>) -> bool {
    if let Some(live) = live {
        if live.changed().await {
            return true;
        }
    }
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Hysteresis = Hysteresis {
        degrade_after: 3,
        recover_after: 2,
    };
    const QUORUM: Signal = Signal::Probe(Observation::Quorum { all_members: true });
    const NO_QUORUM: Signal = Signal::Probe(Observation::NoQuorum);
    const GONE: Signal = Signal::Probe(Observation::Unreachable);

    fn full() -> ModeMachine {
        let mut m = ModeMachine::new(H);
        let now = SystemTime::now();
        assert!(m.on(Signal::WatchRunning, now).is_none(), "no data yet");
        assert!(
            m.on(QUORUM, now).is_none(),
            "probes do not move a sidecar with no data"
        );
        let t = m.on(Signal::LoadedFromEtcd, now).unwrap();
        assert_eq!((t.from, t.to), (Mode::Starting, Mode::Full));
        m
    }

    fn feed(m: &mut ModeMachine, signals: &[Signal]) -> Vec<(Mode, Mode)> {
        signals
            .iter()
            .filter_map(|s| m.on(*s, SystemTime::now()))
            .map(|t| (t.from, t.to))
            .collect()
    }

    #[test]
    fn degrades_only_after_three_bad_rounds_in_a_row() {
        let mut m = full();
        assert!(feed(
            &mut m,
            &[NO_QUORUM, NO_QUORUM, QUORUM, NO_QUORUM, NO_QUORUM]
        )
        .is_empty());
        assert_eq!(
            feed(&mut m, &[NO_QUORUM]),
            vec![(Mode::Full, Mode::ReadOnly)]
        );
        assert_eq!(m.health(), Health::Unhealthy);
        assert_eq!(
            feed(&mut m, &[GONE, GONE, GONE]),
            vec![(Mode::ReadOnly, Mode::CacheOnly)]
        );
    }

    #[test]
    fn a_watch_ended_for_no_leader_degrades_at_once() {
        let mut m = full();
        assert_eq!(
            feed(&mut m, &[Signal::WatchLost, Signal::LeaderLost]),
            vec![(Mode::Full, Mode::ReadOnly)]
        );
        assert_eq!(m.health(), Health::Unhealthy);
        // From there the probes decide, as after any degradation.
        assert_eq!(
            feed(&mut m, &[GONE, GONE, GONE]),
            vec![(Mode::ReadOnly, Mode::CacheOnly)]
        );
        assert_eq!(feed(&mut m, &[Signal::LeaderLost]), vec![]);
        assert_eq!(m.mode(), Mode::CacheOnly, "never upgrades a worse mode");
    }

    #[test]
    fn a_read_only_pin_lowers_what_is_served_and_never_raises_it() {
        let mut m = full();
        let now = SystemTime::now();
        let t = m.pin(Some(Mode::ReadOnly), "maintenance", now).unwrap();
        assert_eq!((t.from, t.to), (Mode::Full, Mode::ReadOnly));
        assert!(t.reason.contains("maintenance"), "{}", t.reason);
        // The facts still move behind the pin; only a change of what is served is a transition.
        assert_eq!(feed(&mut m, &[NO_QUORUM, NO_QUORUM, NO_QUORUM]), vec![]);
        assert_eq!(m.facts(), Mode::ReadOnly);
        assert_eq!(
            feed(&mut m, &[GONE, GONE, GONE]),
            vec![(Mode::ReadOnly, Mode::CacheOnly)],
            "a pin never claims more than the facts"
        );
        assert_eq!(
            feed(&mut m, &[QUORUM, QUORUM, Signal::WatchRunning]),
            vec![(Mode::CacheOnly, Mode::ReadOnly)]
        );
        assert_eq!(m.facts(), Mode::Full);
        let t = m.pin(None, "done", now).unwrap();
        assert_eq!((t.from, t.to), (Mode::ReadOnly, Mode::Full));
    }

    #[test]
    fn a_cache_only_pin_forgets_the_facts_and_unpinned_they_climb_back() {
        let mut m = full();
        let now = SystemTime::now();
        let t = m.pin(Some(Mode::CacheOnly), "etcd upgrade", now).unwrap();
        assert_eq!((t.from, t.to), (Mode::Full, Mode::CacheOnly));
        assert_eq!(m.facts(), Mode::CacheOnly);
        assert!(
            m.pin(None, "upgrade done", now).is_none(),
            "nothing known yet"
        );
        assert_eq!(feed(&mut m, &[QUORUM]), vec![]);
        assert_eq!(
            feed(&mut m, &[QUORUM]),
            vec![(Mode::CacheOnly, Mode::ReadOnly)]
        );
        assert_eq!(
            feed(&mut m, &[Signal::WatchRunning]),
            vec![(Mode::ReadOnly, Mode::Full)],
            "full again only with the watch resynced"
        );
        // A pin before anything is loaded keeps `starting`, then lowers the first mode.
        let mut m = ModeMachine::new(H);
        assert!(m.pin(Some(Mode::ReadOnly), "early", now).is_none());
        let t = m.on(Signal::LoadedFromEtcd, now).unwrap();
        assert_eq!((t.from, t.to), (Mode::Starting, Mode::ReadOnly));
    }

    #[test]
    fn a_mixed_bad_streak_degrades_to_the_best_level_seen() {
        let mut m = full();
        assert_eq!(
            feed(&mut m, &[GONE, NO_QUORUM, GONE]),
            vec![(Mode::Full, Mode::ReadOnly)]
        );
    }

    #[test]
    fn full_needs_two_good_rounds_and_a_resync() {
        let mut m = full();
        feed(&mut m, &[Signal::WatchLost, GONE, GONE, GONE]);
        assert_eq!(m.mode(), Mode::CacheOnly);
        // Quorum is back, but the watch is not: read-only at most.
        assert_eq!(feed(&mut m, &[QUORUM]), vec![]);
        assert_eq!(
            feed(&mut m, &[QUORUM]),
            vec![(Mode::CacheOnly, Mode::ReadOnly)]
        );
        assert_eq!(feed(&mut m, &[QUORUM, QUORUM]), vec![]);
        assert_eq!(
            feed(&mut m, &[Signal::WatchRunning]),
            vec![(Mode::ReadOnly, Mode::Full)]
        );
    }

    #[test]
    fn a_streak_is_judged_against_the_mode_it_ends_in() {
        let mut m = full();
        feed(&mut m, &[Signal::WatchLost, GONE, GONE, GONE]);
        assert_eq!(
            feed(&mut m, &[NO_QUORUM, NO_QUORUM]),
            vec![(Mode::CacheOnly, Mode::ReadOnly)]
        );
        feed(&mut m, &[Signal::WatchRunning]);
        assert_eq!(
            feed(&mut m, &[QUORUM, QUORUM]),
            vec![(Mode::ReadOnly, Mode::Full)]
        );
    }

    #[test]
    fn a_resync_alone_does_not_recover() {
        let mut m = full();
        feed(
            &mut m,
            &[Signal::WatchLost, NO_QUORUM, NO_QUORUM, NO_QUORUM],
        );
        assert_eq!(m.mode(), Mode::ReadOnly);
        assert_eq!(feed(&mut m, &[Signal::WatchRunning]), vec![]);
        assert_eq!(feed(&mut m, &[QUORUM]), vec![]);
        assert_eq!(feed(&mut m, &[QUORUM]), vec![(Mode::ReadOnly, Mode::Full)]);
    }

    #[test]
    fn quorum_with_a_member_down_is_full_and_degraded() {
        let mut m = full();
        let partial = Signal::Probe(Observation::Quorum { all_members: false });
        assert!(feed(&mut m, &[partial, partial, partial, partial]).is_empty());
        assert_eq!(m.mode(), Mode::Full);
        assert_eq!(m.health(), Health::Degraded);
    }

    #[test]
    fn a_load_without_a_watch_still_follows_the_probes() {
        let mut m = ModeMachine::new(H);
        let t = m.on(Signal::LoadedFromEtcd, SystemTime::now()).unwrap();
        assert_eq!(t.to, Mode::Full);
        assert_eq!(
            feed(&mut m, &[GONE, GONE, GONE]),
            vec![(Mode::Full, Mode::CacheOnly)]
        );
    }

    #[test]
    fn a_snapshot_start_is_cache_only_until_etcd_is_back() {
        let mut m = ModeMachine::new(H);
        let t = m.on(Signal::LoadedFromSnapshot, SystemTime::now()).unwrap();
        assert_eq!((t.from, t.to), (Mode::Starting, Mode::CacheOnly));
        assert_eq!(feed(&mut m, &[GONE, GONE, GONE, GONE]), vec![]);
        feed(&mut m, &[QUORUM, QUORUM]);
        assert_eq!(m.mode(), Mode::ReadOnly);
        assert_eq!(
            feed(&mut m, &[Signal::WatchRunning]),
            vec![(Mode::ReadOnly, Mode::Full)]
        );
    }

    #[test]
    fn handle_keeps_the_last_twenty_and_the_total() {
        let h = ModeHandle::default();
        for i in 0..25u64 {
            h.publish(&Transition {
                from: Mode::Full,
                to: if i % 2 == 0 {
                    Mode::ReadOnly
                } else {
                    Mode::Full
                },
                reason: format!("{i}"),
                at_unix_ms: i,
            });
        }
        let (list, total) = h.history();
        assert_eq!(total, 25);
        assert_eq!(list.len(), TRANSITION_HISTORY);
        assert_eq!(list[0].reason, "5");
        assert_eq!(h.mode(), Mode::ReadOnly);
        assert_eq!(h.staleness(SystemTime::now()), None);
        let now = SystemTime::now();
        h.confirm(now - Duration::from_millis(1500));
        let s = h.staleness(now).unwrap();
        assert!(s >= Duration::from_millis(1499) && s <= Duration::from_millis(1501));
    }
}

#[cfg(test)]
mod probe_timing {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::*;
    use crate::config::{Config, Live};
    use crate::upstream::{EndpointPool, ProbeTask};

    /// With time paused, the whole path from probes to the mode runs on virtual time: with nothing
    /// listening at any endpoint, a full sidecar degrades to cache-only after three probe rounds
    /// of one second, not before.
    #[tokio::test(start_paused = true)]
    async fn three_failed_rounds_of_one_second_make_cache_only() {
        let dead: Vec<String> = (0..3)
            .map(|_| {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port();
                format!("http://127.0.0.1:{port}")
            })
            .collect();
        let config = Config::for_endpoints(&dead, &["/p/"]).unwrap();
        let pool = Arc::new(EndpointPool::new(config.etcd.clone(), "/p/".into()));
        let handle = Arc::new(ModeHandle::default());
        let (signals, rx) = mpsc::channel(16);
        let (verdicts, verdicts_rx) = mpsc::channel(16);
        let hysteresis = Hysteresis {
            degrade_after: 3,
            recover_after: 2,
        };
        // Transitions for a webhook task there is none of: kept, so sending never fails.
        let (transitions, _unposted) = mpsc::channel(64);
        tokio::spawn(ModeTask::new(hysteresis, handle.clone(), rx, verdicts_rx, transitions).run());
        signals.send(Signal::LoadedFromEtcd).await.unwrap();
        let start = tokio::time::Instant::now();
        while handle.mode() != Mode::Full {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The defaults: rounds every 1 s, checks time out after 800 ms.
        let probes = ProbeTask::new(pool, Live::fixed(config), verdicts, "/p/".into());
        tokio::spawn(probes.run());
        while handle.mode() == Mode::Full {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = start.elapsed();
        assert_eq!(handle.mode(), Mode::CacheOnly);
        // Rounds at 0 s, 1 s and 2 s; the third verdict lands within that round's timeout.
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(3),
            "degraded after {took:?}"
        );
    }
}
