//! The published mode: the [`ModeHandle`] every request reads, with atomics for the per-request
//! hot path (mode, pin, staleness) and mutexes for the transitions log and counts shown in
//! `/v1/status` and `/metrics`; change streams follow its transitions.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use crate::mode::machine::Transition;
use crate::mode::pin::{Pin, PinRequest, PinRequests, PinSource, PinUnavailable};
use crate::mode::{unix_ms, Health, Mode};

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
    pub(super) pin_requests: OnceLock<PinRequests>,
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

    pub(super) fn set_pin(&self, pin: Option<Pin>) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
