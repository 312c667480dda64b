//! Connections to etcd: one client per member, what the sidecar has learnt of each member, and
//! which member each request goes to.
//!
//! etcd-client's own balancer over several endpoints fails calls while one member is down, and it
//! neither reconnects a watch nor fails over; so the sidecar keeps a client per member and one
//! pool that every request kind goes through (the watch and its loads, writes, consistent reads,
//! probes) and learns from: each success with its latency, each failure with its kind
//! ([`Failure`]). A member rests after a threshold of consecutive failures ([`threshold`]), for a
//! cooldown that doubles while it keeps failing; when its rest ends one quorum read checks it
//! before requests go back to it, so no request pays for finding out. When every member rests,
//! the one whose rest ends first is used: there is never a "no member" error.
//!
//! Which healthy member a request goes to is the [`Selection`]: the configured order, an order
//! shuffled once per sidecar (so a fleet spreads its watches), round robin, or the lowest latency.
//!
//! [`threshold`]: crate::upstream::member::threshold

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use rand::seq::SliceRandom;

use crate::config::{EtcdConfig, Selection};
use crate::upstream::error::Failure;
use crate::upstream::member::{Cooldown, MemberHealth, MemberStatus};

/// Largest gRPC message the sidecar accepts from etcd. etcd-client's default of 4 MiB is smaller
/// than one page of large values or one watch response catching up over many revisions.
pub const MAX_DECODE_BYTES: usize = 256 * 1024 * 1024;

/// One etcd member as the sidecar sees it; its URL is `config.endpoints` at the same index.
struct Member {
    /// The clients, by [`ClientKind`], each created on first use. Probes get their own client
    /// without `require_leader`: with it even a serializable read fails once quorum is lost, and
    /// reachability is what a probe must tell.
    clients: [Option<Client>; 2],
    /// What the pool has learnt of it.
    health: MemberHealth,
    /// Whether a task is waiting out its rest to check it.
    checking: bool,
}

/// Which of a member's two clients.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientKind {
    /// Watch, loads, writes, consistent reads, recovery checks: requires a leader.
    Main = 0,
    /// Health probes: no leader required.
    Probe = 1,
}

/// The members and what is known of them.
pub struct EndpointPool {
    /// Connection settings shared by every client, the selection and the cooldown.
    config: EtcdConfig,
    /// The order the selection starts from: the configured one, or for `random` a shuffle of it
    /// made once.
    order: Vec<usize>,
    /// Members, in configured order.
    members: Mutex<Vec<Member>>,
    /// Where round robin is.
    turn: AtomicUsize,
    /// The key a recovery check reads (count only): a mirrored prefix, which the sidecar may
    /// read when etcd has authentication on.
    check_key: String,
    /// When the watch last heard from its member (an event or a progress answer), if it runs.
    watch_heard: Mutex<Option<Instant>>,
    /// The raft term the watch last saw, and until when a change of it keeps the probes active.
    term: Mutex<(u64, Option<Instant>)>,
    /// True while the operator pins `cache-only`: nothing at all is sent to etcd (the watch
    /// closes, probes and requests wait or are refused) until it is false again.
    held: tokio::sync::watch::Sender<bool>,
}

/// How long after an election (a new raft term on the watch) the probes keep running rounds, to
/// find which member failed.
pub const AFTER_ELECTION: Duration = Duration::from_secs(10);

/// A chosen member: its index in the pool and a client for it.
pub struct Chosen {
    /// Index to report outcomes against.
    pub index: usize,
    /// URL, for logs and status.
    pub url: String,
    /// A client bound to this member only.
    pub client: Client,
}

/// When a request that failed may be tried again on another member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A read: after any failure of the member (not after etcd refused the request itself).
    Read,
    /// A write: only when it was certainly not applied (the connection was refused, or etcd
    /// said it has no leader); an outcome that is unknown is answered as it is.
    Write,
}

/// Whether a failed write may have been applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Certainly not: it never reached etcd, or etcd refused it.
    No,
    /// Unknown: it was sent and the answer was lost.
    Unknown,
}

/// Why a request failed on every member it was tried on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct RequestFailed {
    /// The last failure's kind.
    pub kind: Failure,
    /// Whether it may have been applied (writes).
    pub applied: Applied,
    /// What the member or the connection said, with the member's URL.
    pub message: String,
}

impl EndpointPool {
    /// A pool over the configured members; nothing connects yet. Recovery checks read
    /// `check_key`.
    pub fn new(config: EtcdConfig, check_key: String) -> Self {
        let mut order: Vec<usize> = (0..config.endpoints.len()).collect();
        if config.selection == Selection::Random {
            order.shuffle(&mut rand::rng());
        }
        let members = config
            .endpoints
            .iter()
            .map(|_| Member {
                clients: [None, None],
                health: MemberHealth::default(),
                checking: false,
            })
            .collect();
        EndpointPool {
            config,
            order,
            members: Mutex::new(members),
            turn: AtomicUsize::new(0),
            check_key,
            watch_heard: Mutex::new(None),
            term: Mutex::new((0, None)),
            held: tokio::sync::watch::Sender::new(false),
        }
    }

    fn members(&self) -> std::sync::MutexGuard<'_, Vec<Member>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every member, best first: the healthy ones in the selection's order, then those that
    /// failed since their last success but do not rest (a deadline below its threshold), then
    /// the resting ones by when their rest ends.
    fn preference(&self) -> Vec<usize> {
        let members = self.members();
        let now = Instant::now();
        let mut order = self.order.clone();
        match self.config.selection {
            Selection::Ordered | Selection::Random => {}
            Selection::RoundRobin => {
                let turn = self.turn.fetch_add(1, Ordering::Relaxed) % order.len();
                order.rotate_left(turn);
            }
            // Not measured yet counts as fastest, so every member gets measured.
            Selection::Latency => order.sort_by_key(|&i| members[i].health.latency()),
        }
        let (ready, mut resting): (Vec<usize>, Vec<usize>) = order
            .into_iter()
            .partition(|&i| members[i].health.resting(now).is_none());
        let (healthy, failing): (Vec<usize>, Vec<usize>) = ready
            .into_iter()
            .partition(|&i| !members[i].health.failing());
        resting.sort_by_key(|&i| members[i].health.resting(now));
        healthy.into_iter().chain(failing).chain(resting).collect()
    }

    /// The member to use next, other than `avoid` (the one that just failed) when there is
    /// another.
    pub async fn choose(&self, avoid: Option<usize>) -> Result<Chosen, etcd_client::Error> {
        let preference = self.preference();
        let index = preference
            .iter()
            .copied()
            .find(|&i| Some(i) != avoid)
            .unwrap_or(preference[0]);
        let client = self.client(index, ClientKind::Main).await?;
        Ok(Chosen {
            index,
            url: self.url(index),
            client,
        })
    }

    /// Runs `call` on the best member, and on the next ones while `retry` allows and `deadline`
    /// (for the whole request) has time left; learns from every attempt.
    pub async fn request<T, F, Fut>(
        self: &Arc<Self>,
        retry: Retry,
        deadline: Duration,
        mut call: F,
    ) -> Result<T, RequestFailed>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        if self.held() {
            return Err(RequestFailed {
                kind: Failure::Refused,
                applied: Applied::No,
                message: "the operator pinned cache-only: nothing is sent to etcd".to_string(),
            });
        }
        let started = Instant::now();
        let mut last = RequestFailed {
            kind: Failure::Deadline,
            applied: Applied::No,
            message: format!("no etcd member could be tried within {deadline:?}"),
        };
        for index in self.preference() {
            let left = deadline.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            let url = self.url(index);
            let attempt = Instant::now();
            let outcome = match self.client(index, ClientKind::Main).await {
                Ok(client) => tokio::time::timeout(left, call(client)).await,
                Err(e) => Ok(Err(e)),
            };
            let error = match outcome {
                Ok(Ok(value)) => {
                    self.report(index, Ok(Some(attempt.elapsed())));
                    return Ok(value);
                }
                Ok(Err(error)) => error,
                Err(_) => {
                    let message = format!("{url}: no answer within {deadline:?}");
                    self.report(index, Err((Failure::Deadline, message.clone())));
                    return Err(RequestFailed {
                        kind: Failure::Deadline,
                        applied: Applied::Unknown,
                        message,
                    });
                }
            };
            let kind = Failure::of(&error);
            let not_applied = Failure::not_sent(&error) || kind.not_applied();
            let message = format!("{url}: {error}");
            self.report(index, Err((kind, message.clone())));
            last = RequestFailed {
                kind,
                applied: if not_applied {
                    Applied::No
                } else {
                    Applied::Unknown
                },
                message,
            };
            let again = kind != Failure::Refused
                && match retry {
                    Retry::Read => true,
                    Retry::Write => not_applied,
                };
            if !again {
                break;
            }
        }
        Err(last)
    }

    /// Learns the outcome of a call on member `index`: a success (with the member's answer time,
    /// when the call's duration is that), or the kind of its failure. A failure that starts a
    /// rest starts the check that ends it.
    pub fn report(
        self: &Arc<Self>,
        index: usize,
        outcome: Result<Option<Duration>, (Failure, String)>,
    ) {
        let cooldown = self.cooldown();
        let now = Instant::now();
        let mut members = self.members();
        let member = &mut members[index];
        match outcome {
            Ok(latency) => member.health.succeeded(latency, now),
            Err((kind, error)) => {
                if member.health.failed(kind, &error, now, cooldown) && !member.checking {
                    member.checking = true;
                    tokio::spawn(self.clone().recover(index));
                }
            }
        }
    }

    /// Waits out member `index`'s rest, then checks it with one quorum read: a success ends its
    /// failures, a failure rests it again (longer). Only while a member fails does this run.
    async fn recover(self: Arc<Self>, index: usize) {
        loop {
            let Some(until) = self.members()[index].health.resting(Instant::now()) else {
                break;
            };
            tokio::time::sleep_until(until.into()).await;
            let started = Instant::now();
            let outcome = match self.client(index, ClientKind::Main).await {
                Ok(mut client) => {
                    let read = client.get(
                        self.check_key.as_str(),
                        Some(GetOptions::new().with_count_only()),
                    );
                    match tokio::time::timeout(self.config.request_timeout, read).await {
                        Ok(Ok(_)) => Ok(started.elapsed()),
                        Ok(Err(e)) => Err((Failure::of(&e), e.to_string())),
                        Err(_) => Err((Failure::Deadline, "the recovery check timed out".into())),
                    }
                }
                Err(e) => Err((Failure::of(&e), e.to_string())),
            };
            let cooldown = self.cooldown();
            let mut members = self.members();
            let health = &mut members[index].health;
            match outcome {
                Ok(latency) => {
                    health.succeeded(Some(latency), Instant::now());
                    break;
                }
                Err((kind, error)) => {
                    if !health.failed(kind, &error, Instant::now(), cooldown) {
                        break;
                    }
                }
            }
        }
        self.members()[index].checking = false;
    }

    /// The watch heard from its member just now. Its stream requires a leader, so while it
    /// keeps hearing, its member has a leader, and the cluster a quorum.
    pub fn watch_heard(&self) {
        *self.watch_heard.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// The watch ended.
    pub fn watch_lost(&self) {
        *self.watch_heard.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The raft term in a watch response: a new one (an election) keeps the probes active for
    /// [`AFTER_ELECTION`].
    pub fn raft_term(&self, term: u64) {
        let mut known = self.term.lock().unwrap_or_else(|e| e.into_inner());
        if known.0 != 0 && term > known.0 {
            known.1 = Some(Instant::now() + AFTER_ELECTION);
        }
        known.0 = known.0.max(term);
    }

    /// Whether the watch heard from its member within `within`, and no election is recent:
    /// then nothing needs probing.
    pub fn watch_fresh(&self, within: Duration) -> bool {
        let settled = self
            .term
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .is_none_or(|until| Instant::now() >= until);
        settled
            && self
                .watch_heard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                // Through a gRPC proxy a quiet watch hears nothing: an open one is all there is.
                .is_some_and(|at| self.config.grpc_proxy || at.elapsed() <= within)
    }

    /// Whether no member failed since its last success.
    pub fn all_healthy(&self) -> bool {
        let now = Instant::now();
        self.members()
            .iter()
            .all(|m| !m.health.failing() && m.health.resting(now).is_none())
    }

    fn cooldown(&self) -> Cooldown {
        Cooldown {
            base: self.config.cooldown,
            max: self.config.cooldown_max,
        }
    }

    /// Holds (`true`) or releases every call to etcd: the operator's `cache-only` pin.
    pub fn hold(&self, on: bool) {
        self.held.send_replace(on);
        if on {
            // Dropping the kept clients closes their connections once the tasks let go of
            // theirs: etcd then sees nothing of this sidecar, not even keep-alive pings.
            for member in self.members().iter_mut() {
                member.clients = Default::default();
            }
        }
    }

    /// Whether calls to etcd are held.
    pub fn held(&self) -> bool {
        *self.held.borrow()
    }

    /// Follows the hold: tasks that call etcd on their own wait on it.
    pub fn holds(&self) -> tokio::sync::watch::Receiver<bool> {
        self.held.subscribe()
    }

    /// Whether the endpoints are etcd gRPC proxies.
    pub fn grpc_proxy(&self) -> bool {
        self.config.grpc_proxy
    }

    /// The probe client of member `index` (no leader required).
    pub async fn probe_client(&self, index: usize) -> Result<Client, etcd_client::Error> {
        self.client(index, ClientKind::Probe).await
    }

    /// The client of `kind` for member `index`, connected on first use and kept.
    async fn client(&self, index: usize, kind: ClientKind) -> Result<Client, etcd_client::Error> {
        let existing = self.members()[index].clients[kind as usize].clone();
        if let Some(c) = existing {
            return Ok(c);
        }
        // A member cut off from the majority would otherwise keep a watch open and silent.
        let options = self
            .connect_options()
            .with_require_leader(kind == ClientKind::Main);
        let c = Client::connect([self.url(index).as_str()], Some(options)).await?;
        self.members()[index].clients[kind as usize] = Some(c.clone());
        Ok(c)
    }

    /// URL of member `index`.
    pub fn url(&self, index: usize) -> String {
        self.config.endpoints[index].clone()
    }

    /// Time allowed to connect to one member.
    pub fn dial_timeout(&self) -> Duration {
        self.config.dial_timeout
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.config.endpoints.len()
    }

    /// Whether the pool is empty (never, once configuration is validated).
    pub fn is_empty(&self) -> bool {
        self.config.endpoints.is_empty()
    }

    /// How members are chosen.
    pub fn selection(&self) -> Selection {
        self.config.selection
    }

    /// Every member's health, in configured order.
    pub fn status(&self) -> Vec<MemberStatus> {
        let now = Instant::now();
        self.members()
            .iter()
            .zip(&self.config.endpoints)
            .map(|(m, url)| m.health.status(url, now))
            .collect()
    }

    /// Options every client is built with. Never print them: with authentication their `Debug`
    /// shows the password.
    fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new().with_connect_timeout(self.config.dial_timeout);
        // Pings only while a call or the watch is open on the connection: etcd answers pings on
        // an idle connection (more often than its --grpc-keepalive-min-time, 5 s) with GOAWAY
        // `too_many_pings`, measured here on every idle probe connection. etcd's gRPC proxy
        // closes a connection pinged more often than every 5 minutes (gRPC's default policy)
        // unless it sends data, which a quiet proxied watch does not: no pings at all there.
        if !self.config.grpc_proxy {
            options = options
                .with_keep_alive(
                    self.config.keepalive_interval,
                    self.config.keepalive_timeout,
                )
                .with_keep_alive_while_idle(false);
        }
        if let Some(tls) = &self.config.tls {
            let mut t = TlsOptions::new();
            t = match &tls.ca_pem {
                Some(ca) => t.ca_certificate(Certificate::from_pem(ca)),
                None => t.with_native_roots(),
            };
            if let (Some(cert), Some(key)) = (&tls.cert_pem, &tls.key_pem) {
                t = t.identity(Identity::from_pem(cert, key.expose()));
            }
            options = options.with_tls(t);
        }
        if let Some(auth) = &self.config.auth {
            // etcd's tokens expire (5 minutes unused by default); a call that meets an expired
            // token authenticates again and is retried once.
            options = options
                .with_user(auth.username.clone(), auth.password.expose())
                .with_auto_token_refresh(true);
        }
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Environment};

    fn pool_of(selection: &str) -> EndpointPool {
        let config = Config::from_args(
            [
                "config-sidecar",
                "--endpoints=http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3",
                "--prefix=/p/",
                &format!("--endpoint-selection={selection}"),
            ],
            Environment::Ignored,
        )
        .unwrap();
        EndpointPool::new(config.etcd, "/p/".into())
    }

    /// `random` shuffles once per sidecar: a fleet's first choices spread over the members, and
    /// each sidecar keeps its own choice (its watch stays put).
    #[tokio::test]
    async fn random_spreads_a_fleet_and_keeps_each_sidecars_choice() {
        let mut firsts = [0; 3];
        for _ in 0..90 {
            let pool = pool_of("random");
            let first = pool.choose(None).await.unwrap().index;
            assert_eq!(pool.choose(None).await.unwrap().index, first);
            firsts[first] += 1;
        }
        assert!(firsts.iter().all(|&n| n >= 15), "{firsts:?}");
    }

    /// A resting member goes last, the others keep their order; when all rest, the one whose
    /// rest ends first comes first; `avoid` skips the member that just failed; a member that
    /// failed below its threshold goes after the healthy ones.
    #[tokio::test]
    async fn resting_members_go_last_and_never_leave_no_member() {
        let pool = Arc::new(pool_of("ordered"));
        assert_eq!(pool.preference(), [0, 1, 2]);
        pool.report(0, Err((Failure::Unreachable, "refused".into())));
        assert_eq!(pool.preference(), [1, 2, 0]);
        assert_eq!(pool.choose(Some(1)).await.unwrap().index, 2);
        pool.report(2, Err((Failure::Unreachable, "refused".into())));
        pool.report(1, Err((Failure::Unreachable, "refused".into())));
        assert_eq!(pool.preference(), [0, 2, 1], "by the end of their rests");
        pool.report(1, Ok(None));
        assert_eq!(pool.preference(), [1, 0, 2]);
        assert_eq!(pool.status()[0].state, "resting");
        assert_eq!(pool.status()[1].state, "healthy");

        // One deadline does not rest a member, but the next request goes elsewhere.
        let pool = Arc::new(pool_of("ordered"));
        pool.report(0, Err((Failure::Deadline, "no answer".into())));
        assert_eq!(pool.status()[0].state, "failing");
        assert_eq!(pool.preference(), [1, 2, 0]);
        pool.report(0, Ok(None));
        assert_eq!(pool.preference(), [0, 1, 2]);
    }
}
