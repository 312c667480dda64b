//! Connections to etcd: one client per member, each member's health, and the choice of member.
//!
//! etcd-client's own balancer over several endpoints fails calls while one member is down, and it
//! neither reconnects a watch nor fails over; so the sidecar keeps a client per endpoint, records
//! each endpoint's failures, and moves to the next healthy endpoint when the one in use fails. A
//! failed endpoint rests for a cooldown before it is chosen again, unless every endpoint failed.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use serde::Serialize;

use crate::config::EtcdConfig;

/// Largest gRPC message the sidecar accepts from etcd. etcd-client's default of 4 MiB is smaller
/// than one page of large values or one watch response catching up over many revisions.
pub const MAX_DECODE_BYTES: usize = 256 * 1024 * 1024;

/// One etcd member as the sidecar sees it; its URL is `config.endpoints` at the same index.
struct Member {
    /// The clients, by [`ClientKind`], each created on first use. Probes get their own client
    /// without `require_leader`: with it even a serializable read fails once quorum is lost, and
    /// reachability is what a probe must tell.
    clients: [Option<Client>; 2],
    /// Consecutive failures since the last success.
    failures: u32,
    /// Until when the member rests after a failure.
    cooldown_until: Option<Instant>,
    /// The last error, for status.
    last_error: Option<String>,
    /// When the last error happened.
    last_error_at: Option<SystemTime>,
}

/// Which of a member's two clients.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientKind {
    /// Watch, loads and writes: requires a leader.
    Main = 0,
    /// Health probes: no leader required.
    Probe = 1,
}

/// Health of one endpoint, as shown in `/v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointStatus {
    /// The URL.
    pub url: String,
    /// `healthy` or `failing`.
    pub health: &'static str,
    /// Consecutive failures.
    pub consecutive_failures: u32,
    /// The last error seen on this endpoint.
    pub last_error: Option<String>,
    /// Seconds since the Unix epoch of that error.
    pub last_error_unix: Option<u64>,
}

/// The set of endpoints and which one is preferred.
pub struct EndpointPool {
    /// Connection settings shared by every client.
    config: EtcdConfig,
    /// Members, in configured order.
    members: Mutex<Vec<Member>>,
    /// How long a failed endpoint rests.
    cooldown: Duration,
}

/// A chosen endpoint: its index in the pool and a client for it.
pub struct Chosen {
    /// Index to report success or failure against.
    pub index: usize,
    /// URL, for logs and status.
    pub url: String,
    /// A client bound to this endpoint only.
    pub client: Client,
}

impl EndpointPool {
    /// A pool over the configured endpoints; nothing connects yet.
    pub fn new(config: EtcdConfig, cooldown: Duration) -> Self {
        let members = config
            .endpoints
            .iter()
            .map(|_| Member {
                clients: [None, None],
                failures: 0,
                cooldown_until: None,
                last_error: None,
                last_error_at: None,
            })
            .collect();
        EndpointPool {
            config,
            members: Mutex::new(members),
            cooldown,
        }
    }

    /// Picks the endpoint to use next: the first one, starting after `after` (so a failing endpoint
    /// is left for the next one), that is not resting; if all rest, the one whose rest ends first.
    pub async fn choose(&self, after: Option<usize>) -> Result<Chosen, etcd_client::Error> {
        let index = {
            let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
            let n = members.len();
            let start = after.map(|a| (a + 1) % n).unwrap_or(0);
            let now = Instant::now();
            let order = (0..n).map(|i| (start + i) % n);
            order
                .clone()
                .find(|&i| members[i].cooldown_until.is_none_or(|t| t <= now))
                .or_else(|| order.min_by_key(|&i| members[i].cooldown_until))
                .expect("the pool has at least one endpoint")
        };
        let client = self.client(index, ClientKind::Main).await?;
        Ok(Chosen {
            index,
            url: self.url(index),
            client,
        })
    }

    /// The probe client of endpoint `index` (no leader required).
    pub async fn probe_client(&self, index: usize) -> Result<Client, etcd_client::Error> {
        self.client(index, ClientKind::Probe).await
    }

    /// The client of `kind` for endpoint `index`, connected on first use and kept.
    async fn client(&self, index: usize, kind: ClientKind) -> Result<Client, etcd_client::Error> {
        let existing = {
            let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
            members[index].clients[kind as usize].clone()
        };
        if let Some(c) = existing {
            return Ok(c);
        }
        // A member cut off from the majority would otherwise keep a watch open and silent.
        let options = self
            .connect_options()
            .with_require_leader(kind == ClientKind::Main);
        let c = Client::connect([self.url(index).as_str()], Some(options)).await?;
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        members[index].clients[kind as usize] = Some(c.clone());
        Ok(c)
    }

    /// URL of endpoint `index`.
    pub fn url(&self, index: usize) -> String {
        self.config.endpoints[index].clone()
    }

    /// Time allowed to connect to one member.
    pub fn dial_timeout(&self) -> Duration {
        self.config.dial_timeout
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.config.endpoints.len()
    }

    /// Whether the pool is empty (never, once configuration is validated).
    pub fn is_empty(&self) -> bool {
        self.config.endpoints.is_empty()
    }

    /// Records that a call on endpoint `index` succeeded.
    pub fn succeeded(&self, index: usize) {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let m = &mut members[index];
        m.failures = 0;
        m.cooldown_until = None;
    }

    /// Records that endpoint `index` failed; it rests for the cooldown.
    pub fn failed(&self, index: usize, error: &str) {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let m = &mut members[index];
        m.failures += 1;
        m.cooldown_until = Some(Instant::now() + self.cooldown);
        m.last_error = Some(error.to_string());
        m.last_error_at = Some(SystemTime::now());
    }

    /// Every endpoint's health.
    pub fn status(&self) -> Vec<EndpointStatus> {
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        members
            .iter()
            .zip(&self.config.endpoints)
            .map(|(m, url)| EndpointStatus {
                url: url.clone(),
                health: if m.failures == 0 {
                    "healthy"
                } else {
                    "failing"
                },
                consecutive_failures: m.failures,
                last_error: m.last_error.clone(),
                last_error_unix: m
                    .last_error_at
                    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
            })
            .collect()
    }

    /// Options every client is built with. Never print them: with authentication their `Debug`
    /// shows the password.
    fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.config.dial_timeout)
            .with_keep_alive(
                self.config.keepalive_interval,
                self.config.keepalive_timeout,
            )
            .with_keep_alive_while_idle(true);
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
