//! The sync task: etcd → store.
//!
//! [`WatchTask`] loads every mirrored prefix at one revision (in pages, each at that same revision),
//! publishes it as one snapshot, then watches from the next revision and applies each watch
//! response as one new snapshot. It never gives up: on any failure it moves to another endpoint,
//! waits a jittered exponential backoff, and resumes the watch from the last applied revision + 1.
//! When that revision has been compacted it catches up instead: it reads which keys exist now and
//! the values changed since the mirror's revision, never every value again ([`load`]), and
//! publishes the difference, while the old snapshot keeps serving. Every load catches up from
//! the data the sidecar holds (the mirror, or the disk snapshot found at start); only a sidecar
//! that holds nothing, or data of another cluster, loads everything.
//!
//! What it knows about its own progress is published through a `tokio::sync::watch` channel as a
//! [`SyncStatus`], which the HTTP side reads for `/v1/status` and the mode headers.

use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use etcd_client::{Client, EventType, GetOptions, WatchOptions, WatchResponse};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};

use crate::config::{Live, SyncConfig};
use crate::liveness::Heartbeat;
use crate::mirror::load::{self, Held, ReadError, Reader};
use crate::mirror::persist::SnapshotFile;
use crate::mirror::snapshot::{Entry, Event};
use crate::mirror::store::Store;
use crate::mode::handle::ModeHandle;
use crate::mode::machine::Signal;
use crate::upstream::error::{Failure, NO_LEADER};
use crate::upstream::spread::{catch_up_delay, first_load_delay, Backoff};
use crate::upstream::{EndpointPool, MAX_DECODE_BYTES};

/// Where the sync task is in its cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// Nothing loaded yet.
    Starting,
    /// A load (a full load or a catch-up) is in progress.
    Loading,
    /// A watch stream is open and current.
    Watching,
    /// The last attempt failed; waiting to retry.
    Reconnecting,
    /// The operator pinned `cache-only`: no watch, nothing sent to etcd.
    Held,
}

/// Longest time between progress requests on an idle watch.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What the sync task publishes about itself.
#[derive(Debug, Clone, Serialize)]
pub struct SyncStatus {
    /// Current phase.
    pub state: SyncState,
    /// The endpoint the watch runs on (or was last tried).
    pub endpoint: Option<String>,
    /// When the last watch event was applied.
    #[serde(with = "unix_millis")]
    pub last_event_at: Option<SystemTime>,
    /// When the watch stream last said anything (event or progress): its liveness.
    #[serde(with = "unix_millis")]
    pub last_heard_at: Option<SystemTime>,
    /// Number of complete loads: every value read (a first start with nothing held, or data of
    /// another cluster).
    pub full_loads: u64,
    /// Number of catch-ups: loads that read only what changed since the data held (the disk
    /// snapshot at start, the mirror after its watch's resume point was compacted).
    pub resumes: u64,
    /// Number of times the watch had to be reopened.
    pub reconnects: u64,
    /// The last error, for operators; cleared once the watch runs again.
    pub last_error: Option<String>,
    /// Why the watch last ended (kept after it runs again): what made it move or reopen.
    pub last_interruption: Option<String>,
}

impl Default for SyncStatus {
    fn default() -> Self {
        SyncStatus {
            state: SyncState::Starting,
            endpoint: None,
            last_event_at: None,
            last_heard_at: None,
            full_loads: 0,
            resumes: 0,
            reconnects: 0,
            last_error: None,
            last_interruption: None,
        }
    }
}

mod unix_millis {
    use serde::Serializer;
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()) {
            Some(d) => s.serialize_u64(d.as_millis() as u64),
            None => s.serialize_none(),
        }
    }
}

/// Why a session ends when etcd is behind the disk snapshot (restored from an older backup).
const BEHIND: &str = "etcd revision is behind the mirror";

/// Why a sync session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("watch stream silent for {0:?}; reopening")]
    Stuck(Duration),
    #[error("watch stream closed by the server")]
    Closed,
    #[error("watch cancelled by the server: {0}")]
    Cancelled(String),
    #[error("revision {wanted} is compacted (compact revision {compact}); catching up")]
    Compacted { wanted: i64, compact: i64 },
    #[error("{0}")]
    Store(#[from] crate::mirror::store::StoreError),
    #[error("the operator pinned cache-only; watch closed")]
    Held,
}

impl From<ReadError> for SessionError {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::Etcd(e) => SessionError::Etcd(e),
            ReadError::Timeout => SessionError::Timeout("range read"),
        }
    }
}

impl SessionError {
    /// What the session's end says against its member, if anything: a compaction, a store
    /// error or etcd being behind the mirror is not the member's doing.
    fn failure(&self) -> Option<Failure> {
        match self {
            SessionError::Etcd(e) => Some(Failure::of(e)),
            SessionError::Timeout(_) | SessionError::Stuck(_) => Some(Failure::Deadline),
            SessionError::Closed => Some(Failure::Unreachable),
            SessionError::Cancelled(reason) if reason == NO_LEADER => Some(Failure::NoLeader),
            SessionError::Cancelled(reason) if reason == BEHIND => None,
            SessionError::Cancelled(_) => Some(Failure::Refused),
            SessionError::Compacted { .. } | SessionError::Store(_) | SessionError::Held => None,
        }
    }

    /// Whether etcd ended the session saying there is no leader: a call or the watch stream
    /// failed with that status, or a watch was cancelled giving it as the reason.
    fn is_no_leader(&self) -> bool {
        match self {
            SessionError::Etcd(e) => Failure::of(e) == Failure::NoLeader,
            SessionError::Cancelled(reason) => reason == NO_LEADER,
            _ => false,
        }
    }
}

/// Completes once the operator's `cache-only` pin holds calls to etcd.
async fn until_held(holds: &mut watch::Receiver<bool>) {
    loop {
        if *holds.borrow_and_update() {
            return;
        }
        if holds.changed().await.is_err() {
            // The pool is gone: nothing will ever hold.
            std::future::pending::<()>().await;
        }
    }
}

/// The task that keeps the store equal to etcd.
pub struct WatchTask {
    /// Where to connect.
    pool: Arc<EndpointPool>,
    /// Where to publish.
    store: Arc<Store>,
    /// What to mirror and how patiently.
    config: SyncConfig,
    /// The deadline of one unary etcd call, read at each call (SIGHUP may change it).
    live: Live,
    /// Published progress.
    status: watch::Sender<SyncStatus>,
    /// Where freshness is confirmed: every message on a live watch (which requires a leader).
    mode: Arc<ModeHandle>,
    /// Tells the mode machine about loads and the watch starting and stopping.
    signals: tokio::sync::mpsc::Sender<Signal>,
    /// Beaten at every attempt, page and watch message, for the liveness watchdog.
    heartbeat: Arc<Heartbeat>,
    /// The disk snapshot found at start, if any: the first load reads only what changed since.
    resume: Option<Arc<SnapshotFile>>,
}

impl WatchTask {
    /// A task over `pool` that writes into `store`.
    pub fn new(
        pool: Arc<EndpointPool>,
        store: Arc<Store>,
        config: SyncConfig,
        live: Live,
        mode: Arc<ModeHandle>,
        signals: tokio::sync::mpsc::Sender<Signal>,
    ) -> Self {
        let (status, _) = watch::channel(SyncStatus::default());
        let task = WatchTask {
            heartbeat: Heartbeat::new(Duration::ZERO),
            pool,
            store,
            config,
            live,
            status,
            mode,
            signals,
            resume: None,
        };
        task.request_timeout();
        task
    }

    /// The deadline of one etcd call now. The heartbeat's allowance follows it: the longest the
    /// task waits between beats is a backoff, a connection, one call, or a silent watch before
    /// it is declared stuck; twice that is a task that stopped.
    fn request_timeout(&self) -> Duration {
        let request_timeout = self.live.get(|c| c.etcd.request_timeout);
        let longest_wait = (self.config.backoff_max)
            .max(self.config.first_load_jitter)
            .max(self.config.catch_up_jitter)
            + self.pool.dial_timeout()
            + request_timeout
            + self.config.watch_deadline;
        self.heartbeat.set_allowance(2 * longest_wait);
        request_timeout
    }

    async fn signal(&self, signal: Signal) {
        // The mode task lives as long as the sidecar; if it is gone we are shutting down.
        let _ = self.signals.send(signal).await;
    }

    /// The same task, bringing the disk snapshot `base` up to date for its first load instead
    /// of loading everything.
    pub fn with_resume(mut self, base: Arc<SnapshotFile>) -> Self {
        self.resume = Some(base);
        self
    }

    /// Its sign of life.
    pub fn heartbeat(&self) -> Arc<Heartbeat> {
        self.heartbeat.clone()
    }

    /// A receiver of the task's status.
    pub fn status(&self) -> watch::Receiver<SyncStatus> {
        self.status.subscribe()
    }

    /// Runs forever; abort the task to stop it (the store stays as last published).
    pub async fn run(self) {
        let mut backoff = Backoff::new(self.config.backoff_min, self.config.backoff_max);
        let mut previous: Option<usize> = None;
        // A mirror restored from the disk snapshot resumes its watch without a reload, once etcd
        // has shown it is the same cluster.
        let mut must_load = !self.store.is_loaded();
        let mut cluster_checked = must_load;
        // Whether that check found the mirror to be another cluster's: nothing to catch up from.
        let mut foreign = false;
        // The disk snapshot, to bring up to date instead of a first full load.
        let mut resume = self.resume.clone();
        let wait = first_load_delay(self.config.first_load_jitter, must_load && resume.is_none());
        if !wait.is_zero() {
            tracing::debug!(
                ?wait,
                "first load without a snapshot: waiting a random part of --first-load-jitter"
            );
            sleep(wait).await;
        }
        loop {
            self.heartbeat.beat();
            // The wait after an unpin also spreads the catch-up it may lead to.
            let spread = self.wait_while_held().await;
            if spread {
                self.wait_to_catch_up("unpinned").await;
            }
            let chosen = match self.pool.choose(previous).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot build an etcd client");
                    sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            self.status
                .send_modify(|s| s.endpoint = Some(chosen.url.clone()));
            let err = self
                .session(
                    chosen.client,
                    chosen.index,
                    (&mut must_load, &mut cluster_checked, &mut foreign),
                    &mut resume,
                    &mut backoff,
                )
                .await;
            self.pool.watch_lost();
            self.signal(Signal::WatchLost).await;
            if matches!(err, SessionError::Held) {
                tracing::info!(endpoint = %chosen.url, "cache-only pinned: watch closed, nothing sent to etcd until unpinned");
                previous = None;
                continue;
            }
            if err.is_no_leader() {
                // The member says there is no leader (etcd cancels a watch that requires one
                // after three election timeouts without): the mode machine degrades at once.
                self.signal(Signal::LeaderLost).await;
            }
            let compacted = matches!(err, SessionError::Compacted { .. });
            if compacted {
                // Not the member's fault: catch up from any member, after a random part of the
                // catch-up jitter (the whole fleet learns of it as it comes back).
                tracing::warn!(endpoint = %chosen.url, error = %err, "watch resume point compacted");
                must_load = true;
                previous = None;
            } else {
                tracing::warn!(endpoint = %chosen.url, error = %err, "etcd sync interrupted");
                if let Some(kind) = err.failure() {
                    self.pool.report(chosen.index, Err((kind, err.to_string())));
                }
                previous = Some(chosen.index);
            }
            self.status.send_modify(|s| {
                s.state = SyncState::Reconnecting;
                s.reconnects += 1;
                s.last_error = Some(err.to_string());
                s.last_interruption = Some(format!("{}: {err}", chosen.url));
            });
            if compacted {
                if !spread {
                    self.wait_to_catch_up("watch resume point compacted").await;
                }
            } else {
                sleep(backoff.next_delay()).await;
            }
        }
    }

    /// Waits a random part of `--catch-up-jitter` before a catch-up after an outage.
    async fn wait_to_catch_up(&self, why: &'static str) {
        let wait = catch_up_delay(self.config.catch_up_jitter);
        tracing::info!(
            why,
            ?wait,
            "catching up after a random part of --catch-up-jitter"
        );
        self.heartbeat.beat();
        sleep(wait).await;
    }

    /// Waits while the operator's `cache-only` pin holds calls to etcd, beating the heartbeat;
    /// whether it held.
    async fn wait_while_held(&self) -> bool {
        let mut holds = self.pool.holds();
        if !*holds.borrow_and_update() {
            return false;
        }
        self.status.send_modify(|s| s.state = SyncState::Held);
        while *holds.borrow_and_update() {
            self.heartbeat.beat();
            let _ = timeout(Duration::from_secs(1), holds.changed()).await;
        }
        tracing::info!("unpinned: resuming the watch from the mirror's revision");
        true
    }

    /// One connection's worth of work: load if needed, then watch until something fails.
    async fn session(
        &self,
        mut client: Client,
        index: usize,
        (must_load, cluster_checked, foreign): (&mut bool, &mut bool, &mut bool),
        resume: &mut Option<Arc<SnapshotFile>>,
        backoff: &mut Backoff,
    ) -> SessionError {
        if !*cluster_checked {
            // Any answer carries the cluster's id; the first prefix is a key the sidecar's etcd
            // user may read when authentication is on (as the probes' reads).
            let probe = GetOptions::new().with_count_only();
            let key = self.config.prefixes.as_slice()[0].clone();
            let response = match timeout(self.request_timeout(), client.get(key, Some(probe))).await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return e.into(),
                Err(_) => return SessionError::Timeout("cluster check"),
            };
            let cluster = response
                .header()
                .map(|h| h.cluster_id())
                .unwrap_or_default();
            let current = response.header().map(|h| h.revision()).unwrap_or_default();
            if cluster != self.store.cluster_id() {
                tracing::warn!(
                    snapshot_cluster = self.store.cluster_id(),
                    etcd_cluster = cluster,
                    "the snapshot is from another etcd cluster; replacing it wholesale"
                );
                *must_load = true;
                *foreign = true;
            } else if current < self.store.revision() {
                tracing::warn!(
                    snapshot_revision = self.store.revision(),
                    etcd_revision = current,
                    "etcd is behind the snapshot (restored from an older backup?); keeping the snapshot's data until etcd catches up"
                );
                return SessionError::Cancelled(BEHIND.into());
            }
            *cluster_checked = true;
        }
        if *must_load || !self.store.is_loaded() {
            self.status.send_modify(|s| s.state = SyncState::Loading);
            let started = SystemTime::now();
            // Data of another cluster is no base to catch up from: its keys would not match.
            let held = if *foreign {
                None
            } else {
                Held::now(&self.store, resume)
            };
            let caught_up = match held {
                // A catch-up that fails is tried again as a catch-up on the next session: what
                // is held stays held, and a fleet coming back reads no more than it must.
                Some(held) => match self.catch_up(&mut client, &held).await {
                    Ok(caught_up) => caught_up,
                    Err(e) => return e,
                },
                None => false,
            };
            if !caught_up {
                if let Err(e) = self.full_load(&mut client).await {
                    return e;
                }
            }
            // The mirror now holds newer data than the disk snapshot found at start.
            *resume = None;
            *foreign = false;
            // The load began with a linearizable read: the mirror was current as of then.
            self.mode.confirm(started);
            self.signal(Signal::LoadedFromEtcd).await;
            *must_load = false;
            self.pool.report(index, Ok(None));
            backoff.reset();
        }
        match self.watch(&mut client, index, backoff).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    /// A reader of every prefix over `client`.
    fn reader<'a>(&'a self, client: &mut Client) -> Reader<'a> {
        Reader {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_DECODE_BYTES),
            prefixes: &self.config.prefixes,
            page_size: self.config.page_size,
            deadline: self.request_timeout(),
            heartbeat: &self.heartbeat,
        }
    }

    /// Loads every prefix, page by page, all at the revision of the first page, and publishes the
    /// result as one snapshot.
    async fn full_load(&self, client: &mut Client) -> Result<(), SessionError> {
        let pages = self.reader(client).read(|o| o, 0).await?;
        let entries = load::entries(pages.kvs);
        let count = entries.len();
        let changes = self
            .store
            .replace_from(pages.cluster, pages.revision, entries)?;
        tracing::info!(
            revision = pages.revision,
            keys = count,
            changed = changes.len(),
            "full load published"
        );
        self.status.send_modify(|s| s.full_loads += 1);
        Ok(())
    }

    /// Brings the data `held` up to etcd's revision by reading only what changed since it (see
    /// [`crate::mirror::load`]) and publishes the result as one snapshot, as a full load would.
    /// `Ok(false)`, with nothing published, when what is held does not fit etcd's data (another
    /// cluster, a revision etcd has not reached, keys that disagree): a full load follows.
    async fn catch_up(&self, client: &mut Client, held: &Held) -> Result<bool, SessionError> {
        let (cluster_id, revision) = held.at();
        let mut reader = self.reader(client);
        let listing = reader.read(GetOptions::with_keys_only, 0).await?;
        if listing.cluster != cluster_id || listing.revision < revision {
            return Ok(false);
        }
        let keys: Vec<(Bytes, i64)> = listing
            .kvs
            .iter()
            .map(|kv| (Bytes::copy_from_slice(kv.key()), kv.mod_revision()))
            .collect();
        let changed_keys: Vec<Bytes> = keys
            .iter()
            .filter(|(_, mod_revision)| *mod_revision > revision)
            .map(|(key, _)| key.clone())
            .collect();
        let changed = if changed_keys.len() <= load::POINT_READS_AT_MOST {
            reader.read_keys(&changed_keys, listing.revision).await?
        } else {
            let at = listing.revision;
            let since = |o: GetOptions| o.with_min_mod_revision(revision + 1);
            reader.read(since, at).await?.kvs
        };
        let changed = load::entries(changed);
        let changed_count = changed.len();
        let Some(entries) = held.bring_up_to_date(&keys, changed) else {
            return Ok(false);
        };
        let count = entries.len();
        self.store
            .replace_from(listing.cluster, listing.revision, entries)?;
        tracing::info!(
            held = held.what(),
            from_revision = revision,
            revision = listing.revision,
            keys = count,
            changed = changed_count,
            "caught up from the data held and published"
        );
        self.status.send_modify(|s| s.resumes += 1);
        Ok(true)
    }

    /// Watches the covering range from the next revision, applying each response as one snapshot.
    /// Returns only with the reason it stopped.
    async fn watch(
        &self,
        client: &mut Client,
        index: usize,
        backoff: &mut Backoff,
    ) -> Result<std::convert::Infallible, SessionError> {
        let from = self.store.revision() + 1;
        let (key, end) = self.config.prefixes.covering_range();
        let options = WatchOptions::new()
            .with_range(end.unwrap_or_else(|| vec![0]))
            .with_start_revision(from)
            .with_progress_notify();
        let mut watch_client = client
            .watch_client()
            .max_decoding_message_size(MAX_DECODE_BYTES);
        let mut stream = timeout(
            self.request_timeout(),
            watch_client.watch(key, Some(options)),
        )
        .await
        .map_err(|_| SessionError::Timeout("opening the watch"))??;

        let deadline = self.config.watch_deadline;
        // An etcd gRPC proxy answers no progress request, so through one a quiet watch is silent
        // and its silence means nothing; the ticks still beat the heartbeat.
        let proxied = self.pool.grpc_proxy();
        let mut holds = self.pool.holds();
        // Asking often keeps the staleness of a quiet mirror near zero; answers are tiny.
        let mut ask_progress = tokio::time::interval((deadline / 3).min(PROGRESS_EVERY));
        ask_progress.tick().await;
        let silence = sleep(deadline);
        let mut silence = pin!(silence);
        loop {
            tokio::select! {
                message = stream.message() => {
                    let response = message?.ok_or(SessionError::Closed)?;
                    self.heartbeat.beat();
                    self.pool.watch_heard();
                    silence.as_mut().reset(Instant::now() + deadline);
                    let created = self.handle(response, from, index, backoff)?;
                    if created {
                        self.signal(Signal::WatchRunning).await;
                    }
                }
                _ = ask_progress.tick() => {
                    self.heartbeat.beat();
                    if !proxied {
                        stream.request_progress().await?;
                    }
                }
                _ = &mut silence, if !proxied => return Err(SessionError::Stuck(deadline)),
                _ = until_held(&mut holds) => return Err(SessionError::Held),
            }
        }
    }

    /// Applies one response; returns whether it was the watch's creation.
    fn handle(
        &self,
        response: WatchResponse,
        from: i64,
        index: usize,
        backoff: &mut Backoff,
    ) -> Result<bool, SessionError> {
        let now = SystemTime::now();
        if let Some(header) = response.header() {
            // A new raft term is an election: some member failed or froze. The probes look.
            self.pool.raft_term(header.raft_term());
        }
        if response.canceled() {
            let compact = response.compact_revision();
            if compact > 0 {
                return Err(SessionError::Compacted {
                    wanted: from,
                    compact,
                });
            }
            return Err(SessionError::Cancelled(
                response.cancel_reason().to_string(),
            ));
        }
        if response.created() {
            tracing::info!(from_revision = from, "watch established");
            self.pool.report(index, Ok(None));
            backoff.reset();
            self.status.send_modify(|s| {
                s.state = SyncState::Watching;
                s.last_error = None;
            });
        }
        let created = response.created();
        if !created {
            // An event or a progress answer on a stream that requires a leader: the mirror is as
            // current as that member. (The creation itself may precede a backlog, so it does not
            // count.)
            self.mode.confirm(now);
        }
        let events = response.events();
        if events.is_empty() {
            // Created, or a progress notification: liveness only. The revision in a progress
            // notification is not trusted to advance the mirror (etcd #15220: before 3.4.25 it
            // can run ahead of events not yet delivered).
            self.status.send_modify(|s| s.last_heard_at = Some(now));
            return Ok(created);
        }
        let mut revision = 0;
        let mut batch = Vec::with_capacity(events.len());
        for event in events {
            let Some(kv) = event.kv() else { continue };
            // The highest event revision, not the header's, which was seen to go backwards.
            revision = revision.max(kv.mod_revision());
            if !self.config.prefixes.contains(kv.key()) {
                continue;
            }
            let key = Bytes::copy_from_slice(kv.key());
            batch.push(match event.event_type() {
                EventType::Put => Event::Put(Entry::new(
                    key,
                    kv.value(),
                    kv.create_revision(),
                    kv.mod_revision(),
                    kv.version(),
                )),
                EventType::Delete => Event::Delete {
                    key,
                    revision: kv.mod_revision(),
                },
            });
        }
        let changes = self.store.apply(revision, batch);
        tracing::debug!(revision, changes = changes.len(), "watch batch applied");
        self.status.send_modify(|s| {
            s.last_event_at = Some(now);
            s.last_heard_at = Some(now);
        });
        Ok(created)
    }
}
