//! Health probes. While the watch is not healthy (lost, reconnecting, silent), every interval
//! each etcd member is asked three things at once, each with a short timeout: its status
//! (leader, raft term and index, version), a serializable read (reachability) and a linearizable
//! read (quorum); once an outage has lasted long enough for the mode machine to act on it, the
//! rounds slow down (doubling, jittered, to `--probe-interval-max`), so that a fleet does not
//! ask a struggling cluster every second, and speed up again as soon as the verdict changes or
//! the watch runs. While it is healthy, nothing is sent: its stream requires a leader and answers
//! progress requests, which shows quorum already; only a slow, jittered light round (status and
//! a serializable read) keeps the member view of `/v1/status` fresh. Each interval's verdict
//! goes to the mode machine as an [`Observation`]; each member's answer is kept for `/v1/status`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use etcd_client::GetOptions;
use futures_util::future::join_all;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::config::Live;
use crate::liveness::Heartbeat;
use crate::upstream::error::Failure;
use crate::upstream::pool::EndpointPool;
use crate::upstream::spread::probe_delay;

/// What one probe round (or a watch error) says about the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// A linearizable read succeeded; `all_members` when every member answered too.
    Quorum {
        /// Every member answered.
        all_members: bool,
    },
    /// Some member answered, but no linearizable read succeeded.
    NoQuorum,
    /// No member answered.
    Unreachable,
}

impl Observation {
    /// The verdict in words, for logs and transition reasons.
    pub fn describe(self) -> &'static str {
        match self {
            Observation::Quorum { all_members: true } => "quorum, every member answers",
            Observation::Quorum { all_members: false } => "quorum, some member does not answer",
            Observation::NoQuorum => {
                "members answer but no linearizable read succeeds (no quorum or leader)"
            }
            Observation::Unreachable => "no etcd member answers",
        }
    }
}

/// What one member answered in the last round.
#[derive(Debug, Clone, Serialize, Default)]
pub struct MemberProbe {
    /// The endpoint.
    pub url: String,
    /// Status or serializable read answered.
    pub reachable: bool,
    /// Linearizable read answered (the member is in a quorum with a leader).
    pub quorum: bool,
    /// Leader's member id as this member sees it (0: none).
    pub leader: u64,
    /// This member's id.
    pub member_id: u64,
    /// Raft term.
    pub raft_term: u64,
    /// Raft index.
    pub raft_index: u64,
    /// etcd version.
    pub version: String,
    /// The cluster's revision as the linearizable read reported it (0: no answer); the watch
    /// check compares the mirror's with it.
    pub revision: i64,
    /// Time the slowest of the three checks took, in milliseconds.
    pub latency_ms: f64,
    /// The first error, if any check failed.
    pub error: Option<String>,
    /// When the round ran (Unix ms).
    pub at_unix_ms: u64,
}

/// How recently the watch must have heard from its member for the probes to rest: about three
/// progress answers' time.
pub const WATCH_FRESH: Duration = Duration::from_secs(3);

/// The probe results shared with the HTTP side.
pub type ProbeResults = Arc<Mutex<Vec<MemberProbe>>>;

/// The periodic prober.
pub struct ProbeTask {
    /// Members.
    pool: Arc<EndpointPool>,
    /// The interval between rounds and each check's timeout, read every round.
    live: Live,
    /// Where each round's verdict goes: the mode machine.
    verdicts: mpsc::Sender<Observation>,
    /// Last answers per member.
    results: ProbeResults,
    /// Beaten every round, for the liveness watchdog.
    heartbeat: Arc<Heartbeat>,
    /// The key the reads ask for (count only: the answer's success is the point, not the value):
    /// the first mirrored prefix itself, a key the sidecar may read when etcd has authentication on.
    key: String,
}

impl ProbeTask {
    /// A prober over `pool`, at the interval and with the timeout `live` says (read each round:
    /// SIGHUP may change them).
    pub fn new(
        pool: Arc<EndpointPool>,
        live: Live,
        verdicts: mpsc::Sender<Observation>,
        key: String,
    ) -> Self {
        let results = (0..pool.len())
            .map(|i| MemberProbe {
                url: pool.url(i),
                ..MemberProbe::default()
            })
            .collect();
        let heartbeat = Heartbeat::new(Duration::ZERO);
        let task = ProbeTask {
            pool,
            live,
            verdicts,
            results: Arc::new(Mutex::new(results)),
            heartbeat,
            key,
        };
        task.settings();
        task
    }

    /// The interval and timeout now; the heartbeat's allowance follows them (a round takes at
    /// most a connection attempt and the checks' timeout, after the interval; the wait before it
    /// beats every interval).
    fn settings(&self) -> (Duration, Duration) {
        let (interval, timeout) = self
            .live
            .get(|c| (c.mode.probe_interval, c.mode.probe_timeout));
        self.heartbeat
            .set_allowance(3 * (interval + self.pool.dial_timeout() + timeout));
        (interval, timeout)
    }

    /// Waits from `started` (a round's start) until the next round is due: `interval` while
    /// things change, longer once `steady` rounds in a row found the same verdict `last` with the
    /// watch down (see [`probe_delay`]). A longer wait ends early when the watch runs again,
    /// which the next round then reports at once.
    async fn wait_for_next_round(
        &self,
        started: tokio::time::Instant,
        interval: Duration,
        (last, steady): (Option<Observation>, u32),
    ) {
        let (max, degrade_after, recover_after) = self.live.get(|c| {
            let m = &c.mode;
            (m.probe_interval_max, m.degrade_after, m.recover_after)
        });
        // The rounds the mode machine needs to act on the verdict: to climb on a healthy one
        // (while a load or catch-up runs, say), to degrade on any other.
        let decided_after = match last {
            Some(Observation::Quorum { all_members: true }) => recover_after,
            _ => degrade_after,
        };
        let due = started + probe_delay(interval, max, steady, decided_after);
        let mut next = started + interval;
        loop {
            tokio::time::sleep_until(next).await;
            self.heartbeat.beat();
            if next >= due || self.pool.watch_fresh(WATCH_FRESH) {
                return;
            }
            next = (next + interval).min(due);
        }
    }

    /// The shared results.
    pub fn results(&self) -> ProbeResults {
        self.results.clone()
    }

    /// Its sign of life: one beat per round.
    pub fn heartbeat(&self) -> Arc<Heartbeat> {
        self.heartbeat.clone()
    }

    /// Probes forever: a full round every probe interval while the watch is not healthy; while
    /// it is, no call at all but a slow light round about every idle interval, and each interval
    /// the watch's own verdict (quorum) for the mode machine.
    pub async fn run(self) {
        let mut next_light = tokio::time::Instant::now();
        let proxied = self.pool.grpc_proxy();
        // Through a gRPC proxy the watch shows nothing about quorum: a light round that found a
        // member without a leader, or a failed request, makes every round full until a round
        // sees quorum everywhere again.
        let mut suspect = false;
        let mut holds = self.pool.holds();
        // The last verdict of a round that sent calls, and how many rounds in a row found it.
        let mut last: Option<Observation> = None;
        let mut steady = 0u32;
        loop {
            let started = tokio::time::Instant::now();
            let (interval, timeout) = self.settings();
            self.heartbeat.beat();
            if *holds.borrow_and_update() {
                // The operator pinned cache-only: nothing is sent, and nothing is judged.
                let _ = tokio::time::timeout(interval, holds.changed()).await;
                // Unpinned, the first round is a full one.
                next_light = tokio::time::Instant::now();
                (last, steady) = (None, 0);
                continue;
            }
            let quiet = self.pool.watch_fresh(WATCH_FRESH)
                && !(proxied && (suspect || !self.pool.all_healthy()));
            let observation = if quiet && started < next_light {
                // At rest: the watch, which requires a leader, shows quorum; nothing is sent.
                (last, steady) = (None, 0);
                let answers = self.results.lock().unwrap_or_else(|e| e.into_inner());
                Observation::Quorum {
                    all_members: answers.iter().all(|m| m.reachable) && self.pool.all_healthy(),
                }
            } else {
                let round =
                    join_all((0..self.pool.len()).map(|i| self.probe(i, timeout, !quiet))).await;
                // Once the watch is healthy again, the first light round waits an interval.
                next_light = started + self.idle_interval();
                let observation = if quiet && !proxied {
                    // The watch shows quorum; the round shows who answers.
                    Observation::Quorum {
                        all_members: round.iter().all(|m| m.reachable),
                    }
                } else {
                    verdict(&round)
                };
                suspect = observation != Observation::Quorum { all_members: true };
                *self.results.lock().unwrap_or_else(|e| e.into_inner()) = round;
                // A verdict that lasts with the watch down (an outage, or a slow load or
                // catch-up under a fleet's herd) slows the rounds.
                steady = match last {
                    Some(before) if before == observation && !quiet => steady + 1,
                    _ => 1,
                };
                last = Some(observation);
                observation
            };
            if self.verdicts.send(observation).await.is_err() {
                return;
            }
            // Rounds start an interval apart (or more, in a lasting outage); a round that ran
            // long starts the next at once.
            self.wait_for_next_round(started, interval, (last, steady))
                .await;
        }
    }

    /// The idle interval now, jittered by ±20% so that a fleet does not probe in step.
    fn idle_interval(&self) -> Duration {
        let idle = self.live.get(|c| c.mode.probe_idle_interval);
        idle.mul_f64(rand::random_range(0.8..=1.2))
    }

    /// Asks member `index` for its status and a serializable read, and with `quorum` a
    /// linearizable read too.
    async fn probe(&self, index: usize, limit: Duration, quorum: bool) -> MemberProbe {
        let started = Instant::now();
        let mut answer = MemberProbe {
            url: self.pool.url(index),
            at_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            ..MemberProbe::default()
        };
        let client = match self.pool.probe_client(index).await {
            Ok(c) => c,
            Err(e) => {
                answer.error = Some(e.to_string());
                self.pool
                    .report(index, Err((Failure::of(&e), e.to_string())));
                return answer;
            }
        };
        let (mut c1, mut c2, mut c3) = (client.clone(), client.clone(), client);
        let (status, serializable, linearizable) = tokio::join!(
            timeout(limit, c1.status()),
            timeout(
                limit,
                c2.get(
                    self.key.as_str(),
                    Some(GetOptions::new().with_serializable().with_count_only())
                )
            ),
            async {
                if !quorum {
                    return None;
                }
                let read = c3.get(self.key.as_str(), Some(GetOptions::new().with_count_only()));
                Some(timeout(limit, read).await)
            },
        );
        // The first check that failed, and how: what the pool learns from this probe.
        let mut failure: Option<Failure> = None;
        let mut note = |kind: Failure, e: String| {
            if answer.error.is_none() {
                answer.error = Some(e);
                failure = Some(kind);
            }
        };
        match status {
            Ok(Ok(s)) => {
                answer.reachable = true;
                answer.leader = s.leader();
                answer.raft_term = s.raft_term();
                answer.raft_index = s.raft_index();
                answer.version = s.version().to_string();
                answer.member_id = s.header().map(|h| h.member_id()).unwrap_or_default();
            }
            Ok(Err(e)) => note(Failure::of(&e), format!("status: {e}")),
            Err(_) => note(Failure::Deadline, "status: timed out".into()),
        }
        match serializable {
            Ok(Ok(_)) => answer.reachable = true,
            Ok(Err(e)) => note(Failure::of(&e), format!("serializable read: {e}")),
            Err(_) => note(Failure::Deadline, "serializable read: timed out".into()),
        }
        match linearizable {
            Some(Ok(Ok(r))) => {
                answer.quorum = true;
                answer.revision = r.header().map(|h| h.revision()).unwrap_or_default();
            }
            Some(Ok(Err(e))) => note(Failure::of(&e), format!("linearizable read: {e}")),
            Some(Err(_)) => note(Failure::Deadline, "linearizable read: timed out".into()),
            // A light round: the watch shows quorum; a member with a leader is taken as in it.
            None => answer.quorum = answer.leader != 0,
        }
        let latency = started.elapsed();
        match failure {
            None => self.pool.report(index, Ok(Some(latency))),
            Some(kind) => self
                .pool
                .report(index, Err((kind, answer.error.clone().unwrap_or_default()))),
        }
        answer.latency_ms = latency.as_secs_f64() * 1000.0;
        answer
    }
}

/// One round's verdict: quorum if any member served a linearizable read.
pub fn verdict(round: &[MemberProbe]) -> Observation {
    if round.iter().any(|m| m.quorum) {
        Observation::Quorum {
            all_members: round.iter().all(|m| m.quorum),
        }
    } else if round.iter().any(|m| m.reachable) {
        Observation::NoQuorum
    } else {
        Observation::Unreachable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(reachable: bool, quorum: bool) -> MemberProbe {
        MemberProbe {
            reachable,
            quorum,
            ..MemberProbe::default()
        }
    }

    #[test]
    fn verdict_reads_the_round() {
        assert_eq!(
            verdict(&[member(true, true), member(true, true)]),
            Observation::Quorum { all_members: true }
        );
        assert_eq!(
            verdict(&[member(true, true), member(false, false)]),
            Observation::Quorum { all_members: false }
        );
        assert_eq!(
            verdict(&[member(true, false), member(false, false)]),
            Observation::NoQuorum
        );
        assert_eq!(verdict(&[member(false, false)]), Observation::Unreachable);
    }
}
