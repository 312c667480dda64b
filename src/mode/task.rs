//! The mode task: the one owner of the [`ModeMachine`], fed by the sync's signals, the probes'
//! verdicts, pin requests and the `pin` setting; it publishes each transition to the handle and
//! hands it to the alerts task.

use std::sync::Arc;
use std::time::SystemTime;

use crate::config::Live;
use crate::mode::handle::ModeHandle;
use crate::mode::machine::{Hysteresis, ModeMachine, Signal, Transition};
use crate::mode::pin::{self, Pin, PinRequest, PinSource};
use crate::mode::{unix_ms, Mode};
use crate::upstream::{EndpointPool, Observation};

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
