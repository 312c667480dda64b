//! When the sync task calls etcd again: the waits that keep a fleet of sidecars from arriving
//! together. One sidecar runs in every pod, and the moments they all need etcd at once are the
//! moments etcd is weakest: a deployment starting, a cluster coming back from an outage, an
//! operator unpinning `cache-only` everywhere. Each wait here is random within a bound, so a
//! fleet's calls spread over that bound instead of landing in the same instant, and the bound is
//! small because a sidecar that holds data keeps serving it (saying how stale) while it waits.

use std::time::Duration;

/// A random part of `bound`: uniform in `[0, bound)`; nothing when `bound` is zero.
fn random_part(bound: Duration) -> Duration {
    if bound.is_zero() {
        return Duration::ZERO;
    }
    bound.mul_f64(rand::random_range(0.0..1.0))
}

/// A random part of the upper half of `window`: the waits that back off, never short, never in
/// step.
fn upper_half(window: Duration) -> Duration {
    window / 2 + random_part(window / 2)
}

/// How long to wait before the first load: a random part of `jitter` when it loads everything
/// (`full`), so that a fleet of pods started together (a new deployment, a node's restart)
/// spreads its full loads; nothing when a disk snapshot is brought up to date, which costs etcd
/// little and decides when the sidecar is ready.
pub fn first_load_delay(jitter: Duration, full: bool) -> Duration {
    if !full {
        return Duration::ZERO;
    }
    random_part(jitter)
}

/// How long to wait before catching up after an outage: when the watch's resume point was
/// compacted (every sidecar that was cut off longer than the cluster's compaction interval
/// learns it as it reconnects), and when the operator's `cache-only` pin is lifted (likely for
/// the whole fleet at once). A catch-up reads every key's name, which costs etcd about as much
/// work per key as a full load does, if far fewer bytes; the mirror serves meanwhile.
pub fn catch_up_delay(jitter: Duration) -> Duration {
    random_part(jitter)
}

/// The wait before the next probe round. `interval` while things change: the mode machine needs
/// its rounds to decide. Once `steady` rounds in a row found the same trouble and the machine
/// has acted on it (`steady` past `decided_after`), a window that doubles each further round up
/// to `max`, the wait drawn from its upper half (never under `interval`): a fleet that probes a
/// cluster through a long outage asks it less and less often, and not in step.
pub fn probe_delay(interval: Duration, max: Duration, steady: u32, decided_after: u32) -> Duration {
    if steady <= decided_after || max <= interval {
        return interval;
    }
    let doublings = (steady - decided_after).min(16);
    let window = interval.saturating_mul(1 << doublings).min(max);
    upper_half(window).max(interval)
}

/// Jittered exponential backoff: each delay is drawn from the upper half of a doubling window, so
/// many sidecars that lost the same cluster do not reconnect in step, and a cluster that stays
/// down (or answers too slowly: a timeout is a failure too) is asked less and less often.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    window: Duration,
}

impl Backoff {
    /// A backoff between `min` and `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            window: min,
        }
    }

    /// The next delay; the window doubles up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let window = self.window;
        self.window = (self.window * 2).min(self.max);
        upper_half(window)
    }

    /// Back to the smallest window, after a success.
    pub fn reset(&mut self) {
        self.window = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 200 draws of `draw` fall within `bound` and spread over it: neither half gets fewer
    /// than 40 (a fair draw misses that once in about 10^19).
    fn spreads_over(bound: Duration, draw: impl Fn() -> Duration) {
        let waits: Vec<Duration> = (0..200).map(|_| draw()).collect();
        assert!(waits.iter().all(|w| *w < bound), "{waits:?}");
        let early = waits.iter().filter(|w| **w < bound / 2).count();
        assert!(
            (40..=160).contains(&early),
            "{early} of 200 in the first half"
        );
    }

    #[test]
    fn only_a_full_first_load_waits_and_the_waits_spread() {
        let jitter = Duration::from_millis(500);
        assert_eq!(first_load_delay(jitter, false), Duration::ZERO);
        assert_eq!(first_load_delay(Duration::ZERO, true), Duration::ZERO);
        spreads_over(jitter, || first_load_delay(jitter, true));
    }

    #[test]
    fn catch_ups_spread_over_their_jitter() {
        assert_eq!(catch_up_delay(Duration::ZERO), Duration::ZERO);
        let jitter = Duration::from_secs(2);
        spreads_over(jitter, || catch_up_delay(jitter));
    }

    #[test]
    fn probes_slow_down_only_once_an_outage_is_decided() {
        let (interval, max) = (Duration::from_secs(1), Duration::from_secs(5));
        // While the mode machine counts its rounds (3 to degrade), every interval.
        for steady in 0..=3 {
            assert_eq!(probe_delay(interval, max, steady, 3), interval);
        }
        // Then a doubling window, from its upper half, up to the bound.
        for (steady, window) in [(4, 2), (5, 4), (6, 5), (40, 5)] {
            let window = Duration::from_secs(window);
            for _ in 0..50 {
                let d = probe_delay(interval, max, steady, 3);
                assert!(
                    d >= window / 2 && d <= window && d >= interval,
                    "{steady}: {d:?}"
                );
            }
        }
        spreads_over_upper_half(Duration::from_secs(5), || probe_delay(interval, max, 9, 3));
        // A bound at or under the interval: never slower.
        assert_eq!(probe_delay(interval, interval, 9, 3), interval);
    }

    /// 200 draws of `draw` spread over the upper half of `window`.
    fn spreads_over_upper_half(window: Duration, draw: impl Fn() -> Duration) {
        let half = window / 2;
        let shifted = || draw() - half;
        spreads_over(half + Duration::from_nanos(1), shifted);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let windows = [100, 200, 400, 800, 800];
        for w in windows {
            let d = b.next_delay();
            let w = Duration::from_millis(w);
            assert!(d >= w / 2 && d <= w, "{d:?} outside [{:?}, {w:?}]", w / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
