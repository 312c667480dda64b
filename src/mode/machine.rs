//! The state machine that moves between modes.
//!
//! Health probes and the sync task produce [`Signal`]s; [`ModeMachine`] answers each with the
//! [`Transition`] it causes, if any, and does nothing else, so its rules are tested alone:
//! - `starting` until the mirror is loaded: from etcd (→ `full`: the load began with a quorum
//!   read) or from the disk snapshot (→ `cache-only` until probes say more).
//! - Degrade after `degrade_after` consecutive probe rounds worse than the current mode, to the
//!   best level seen in that streak.
//! - Recover after `recover_after` consecutive rounds better than the current mode, to the worst
//!   level seen in that streak; recovering to `full` also needs the watch running again (a
//!   completed resync), so `full` never means "quorum is back but the mirror is behind".

use std::time::SystemTime;

use serde::Serialize;

use crate::mode::{unix_ms, Health, Mode};
use crate::upstream::Observation;

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
}
