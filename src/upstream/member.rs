//! One member's health as the pool learns it from every request kind: consecutive failures
//! against a threshold per kind of failure, a rest that doubles while the member keeps failing
//! and ends on success, and a latency estimate. Pure: time is passed in, so the rules are tested
//! without etcd or real time.

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::upstream::error::Failure;

/// How long a failing member rests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cooldown {
    /// The first rest.
    pub base: Duration,
    /// The longest rest: each rest in a row doubles up to it.
    pub max: Duration,
}

/// Consecutive failures of `kind` (counted in a streak of any failures) after which a member
/// rests. A refused connection or a member saying it has no leader is certain at once; a
/// deadline may be one slow fsync or a pause, so it takes two in a row; a refusal by etcd (bad
/// argument, permission, size) says nothing against the member, so it never rests it.
pub fn threshold(kind: Failure) -> Option<u32> {
    match kind {
        Failure::Unreachable | Failure::NoLeader => Some(1),
        Failure::Deadline => Some(2),
        Failure::Refused => None,
    }
}

/// A latency estimate that follows increases at once and decays towards lower observations
/// over about [`PeakEwma::DECAY`] (the peak-EWMA that linkerd2-proxy balances by): a member that
/// just became slow is avoided immediately, and one that recovered is trusted again gradually.
#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    /// The estimate, in seconds; `None` before the first observation.
    estimate: Option<f64>,
    /// When it was last updated.
    at: Option<Instant>,
}

impl PeakEwma {
    /// The time constant of the decay.
    pub const DECAY: Duration = Duration::from_secs(10);

    const fn new() -> PeakEwma {
        PeakEwma {
            estimate: None,
            at: None,
        }
    }

    /// Takes in one observed latency.
    pub fn observe(&mut self, latency: Duration, now: Instant) {
        let rtt = latency.as_secs_f64();
        self.estimate = Some(match (self.estimate, self.at) {
            (Some(old), Some(at)) if rtt < old => {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                let keep = (-elapsed / Self::DECAY.as_secs_f64()).exp();
                old * keep + rtt * (1.0 - keep)
            }
            _ => rtt,
        });
        self.at = Some(now);
    }

    /// The estimate, if there has been an observation.
    pub fn estimate(&self) -> Option<Duration> {
        self.estimate.map(Duration::from_secs_f64)
    }
}

/// One member's health.
#[derive(Debug, Clone)]
pub struct MemberHealth {
    /// Consecutive failures since the last success.
    streak: u32,
    /// The kind of the last failure.
    last_kind: Option<Failure>,
    /// Rests in a row: each doubles the next.
    rests: u32,
    /// Until when it rests, if it does.
    resting_until: Option<Instant>,
    /// Its latency.
    latency: PeakEwma,
    /// The last error and when, for operators.
    last_error: Option<(String, SystemTime)>,
    /// Successes and failures in all, for metrics.
    totals: (u64, u64),
}

impl Default for MemberHealth {
    fn default() -> Self {
        MemberHealth {
            streak: 0,
            last_kind: None,
            rests: 0,
            resting_until: None,
            latency: PeakEwma::new(),
            last_error: None,
            totals: (0, 0),
        }
    }
}

impl MemberHealth {
    /// A call succeeded (after `latency`, for a call whose duration is the member's answer
    /// time rather than the size of the work): the streak and the rests end.
    pub fn succeeded(&mut self, latency: Option<Duration>, now: Instant) {
        self.streak = 0;
        self.rests = 0;
        self.resting_until = None;
        if let Some(latency) = latency {
            self.latency.observe(latency, now);
        }
        self.totals.0 += 1;
    }

    /// A call failed as `kind`; returns whether the member now rests.
    pub fn failed(&mut self, kind: Failure, error: &str, now: Instant, cooldown: Cooldown) -> bool {
        self.totals.1 += 1;
        self.last_kind = Some(kind);
        self.last_error = Some((error.to_string(), SystemTime::now()));
        let Some(threshold) = threshold(kind) else {
            return false;
        };
        self.streak += 1;
        if self.streak < threshold {
            return false;
        }
        let rest = cooldown
            .base
            .saturating_mul(1 << self.rests.min(16))
            .min(cooldown.max);
        self.rests += 1;
        self.resting_until = Some(now + rest);
        true
    }

    /// Until when it rests, if it rests at `now`.
    pub fn resting(&self, now: Instant) -> Option<Instant> {
        self.resting_until.filter(|until| *until > now)
    }

    /// Whether it failed since its last success (below the threshold or not): requests prefer
    /// members that did not, so the one after an unknown outcome goes elsewhere.
    pub fn failing(&self) -> bool {
        self.streak > 0
    }

    /// Its latency estimate.
    pub fn latency(&self) -> Option<Duration> {
        self.latency.estimate()
    }

    /// As shown in `/v1/status`.
    pub fn status(&self, url: &str, now: Instant) -> MemberStatus {
        let unix_ms = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        let resting = self.resting(now);
        MemberStatus {
            url: url.to_string(),
            state: if resting.is_some() {
                "resting"
            } else if self.streak > 0 {
                "failing"
            } else {
                "healthy"
            },
            resting_for_ms: resting.map(|until| (until - now).as_millis() as u64),
            consecutive_failures: self.streak,
            last_failure: self.last_kind.map(Failure::as_str),
            latency_ms: self.latency().map(|l| l.as_secs_f64() * 1000.0),
            successes: self.totals.0,
            failures: self.totals.1,
            last_error: self.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_unix_ms: self.last_error.as_ref().map(|(_, at)| unix_ms(*at)),
        }
    }
}

/// A member's health as `/v1/status` and `/metrics` show it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    /// The URL.
    pub url: String,
    /// `healthy`, `failing` (failures below the threshold) or `resting`.
    pub state: &'static str,
    /// How much longer it rests, in milliseconds.
    pub resting_for_ms: Option<u64>,
    /// Consecutive failures.
    pub consecutive_failures: u32,
    /// The kind of the last failure: `unreachable`, `deadline`, `no_leader` or `refused`.
    pub last_failure: Option<&'static str>,
    /// The latency estimate, in milliseconds.
    pub latency_ms: Option<f64>,
    /// Calls that succeeded, in all.
    pub successes: u64,
    /// Calls that failed, in all.
    pub failures: u64,
    /// The last error seen on this member.
    pub last_error: Option<String>,
    /// When, in Unix milliseconds.
    pub last_error_unix_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Cooldown = Cooldown {
        base: Duration::from_secs(5),
        max: Duration::from_secs(60),
    };

    #[test]
    fn thresholds_differ_by_kind_and_rests_double_until_a_success() {
        let t0 = Instant::now();
        let mut m = MemberHealth::default();
        assert!(!m.failed(Failure::Refused, "permission denied", t0, COOLDOWN));
        assert!(m.resting(t0).is_none(), "a refusal never rests a member");
        assert!(
            !m.failed(Failure::Deadline, "slow", t0, COOLDOWN),
            "one deadline"
        );
        assert!(
            m.failed(Failure::Deadline, "slow", t0, COOLDOWN),
            "two in a row"
        );
        assert_eq!(m.resting(t0), Some(t0 + Duration::from_secs(5)));
        let mut rests = Vec::new();
        let mut now = t0;
        for _ in 0..6 {
            now += Duration::from_secs(61);
            assert!(m.failed(Failure::Unreachable, "refused", now, COOLDOWN));
            rests.push(m.resting(now).unwrap() - now);
        }
        assert_eq!(
            rests.iter().map(Duration::as_secs).collect::<Vec<_>>(),
            [10, 20, 40, 60, 60, 60]
        );
        m.succeeded(Some(Duration::from_millis(2)), now);
        assert!(m.resting(now).is_none());
        assert!(m.failed(Failure::NoLeader, "no leader", now, COOLDOWN));
        assert_eq!(m.resting(now), Some(now + Duration::from_secs(5)), "reset");
        let status = m.status("http://m", now);
        assert_eq!(status.state, "resting");
        assert_eq!(status.last_failure, Some("no_leader"));
        assert_eq!((status.successes, status.failures), (1, 10));
    }

    #[test]
    fn the_latency_estimate_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new();
        assert_eq!(e.estimate(), None);
        e.observe(Duration::from_millis(2), t0);
        e.observe(Duration::from_millis(200), t0 + Duration::from_millis(1));
        assert_eq!(
            e.estimate(),
            Some(Duration::from_millis(200)),
            "a peak at once"
        );
        e.observe(Duration::from_millis(2), t0 + Duration::from_secs(1));
        let after_one = e.estimate().unwrap();
        assert!(after_one > Duration::from_millis(150), "{after_one:?}");
        e.observe(Duration::from_millis(2), t0 + Duration::from_secs(40));
        assert!(
            e.estimate().unwrap() < Duration::from_millis(10),
            "{:?}",
            e.estimate()
        );
    }
}
