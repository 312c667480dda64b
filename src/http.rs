//! HTTP handlers and the router: store → HTTP.
//!
//! [`app`] builds the whole service (routes plus one `ServiceBuilder` chain of middleware), so tests
//! can drive it with `oneshot` and the server runs the very same thing. Every read is answered
//! from the snapshot current when the request started; only `?consistent` reads (one quorum read
//! to know what "current" is) and writes talk to etcd.

use std::borrow::Cow;
use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::{Json, Router};
use bytes::Bytes;
use etcd_client::GetOptions;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use serde_json::json;
use tokio::sync::watch;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::config::{Config, Live, WriteConfig};
use crate::error::ApiError;
use crate::etcd::EndpointPool;
use crate::gate::Gate;
use crate::health::{self, Check, Liveness, WatchFacts};
use crate::keys::{decode_key_path, Prefixes};
use crate::metrics::{RequestMetrics, SubscriberKind, Subscribers};
use crate::mode::{Mode, ModeHandle};
use crate::notify::{event_stream, wait_for_change, Scope, DEFAULT_WAIT, HEARTBEAT, MAX_WAIT};
use crate::persist::WriterStats;
use crate::probe::MemberProbe;
use crate::probe::ProbeResults;
use crate::render::{RenderCache, View};
use crate::service::SidecarService;
use crate::store::{Entry, Snapshot, Store};
use crate::sync::{SyncState, SyncStatus};
use crate::write::{self, WriteOp};

/// Longest request URI accepted (path and query); etcd keys are at most 1.5 MiB but no sensible
/// config key comes near this.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// The route of single keys, which the fast path answers too.
pub const KV_ROUTE: &str = "/v1/kv/{*key}";
/// Largest request body accepted: etcd's default request size limit.
pub const MAX_BODY_BYTES: usize = 1536 * 1024;

// Header names are constants built at compile time: naming a header by `&str` parses it again on
// every insert, which showed in the profile of the read path.
/// Header: the store revision a response was served from.
pub const REVISION_HEADER: HeaderName = HeaderName::from_static("x-config-revision");
/// Header: the mode the sidecar was in when it answered.
pub const MODE_HEADER: HeaderName = HeaderName::from_static("x-config-mode");
/// Header: the index to pass to the next blocking query (`?index=`).
pub const INDEX_HEADER: HeaderName = HeaderName::from_static("x-config-index");
/// Header: milliseconds since the mirror was last confirmed current.
pub const STALE_HEADER: HeaderName = HeaderName::from_static("x-config-stale-ms");

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The mirror.
    pub store: Arc<Store>,
    /// What is mirrored, to tell "outside" from "missing".
    pub prefixes: Prefixes,
    /// Rendered listings and trees.
    pub cache: Arc<RenderCache>,
    /// The sync task's own report.
    pub sync: watch::Receiver<SyncStatus>,
    /// Endpoint health, for status; clients for consistent reads and writes.
    pub pool: Arc<EndpointPool>,
    /// The serving mode and staleness.
    pub mode: Arc<ModeHandle>,
    /// The last probe round, for status.
    pub probes: ProbeResults,
    /// Whether and how writes are accepted.
    pub writes: WriteConfig,
    /// Whether readiness waits for etcd when the mirror came from the disk snapshot.
    pub ready_requires_etcd: bool,
    /// The settings SIGHUP may change (etcd call deadline, retry hint, memory budget), read per use.
    pub live: Live,
    /// Becomes true at shutdown, so that streams and blocking queries end and the drain finishes.
    pub closing: watch::Receiver<bool>,
    /// Sets `closing`.
    close: Arc<watch::Sender<bool>>,
    /// Process start, for uptime.
    pub started: Instant,
    /// Requests by route and status, and their latency, counted per thread.
    pub requests: Arc<RequestMetrics>,
    /// Open streams and blocking queries.
    pub subscribers: Arc<Subscribers>,
    /// The disk snapshot writer's record, when there is a snapshot.
    pub snapshot_stats: Option<Arc<WriterStats>>,
    /// The background tasks, for `/healthz` and the tasks check.
    pub liveness: Arc<Liveness>,
    /// Where the disk snapshot goes, for its health check.
    pub snapshot_path: Option<PathBuf>,
    /// The watch's silence deadline: confirmations of freshness come well within it.
    pub watch_deadline: Duration,
}

impl AppState {
    /// The state for `config`, reading `store` and reporting the other parts.
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        pool: Arc<EndpointPool>,
        sync: watch::Receiver<SyncStatus>,
        mode: Arc<ModeHandle>,
        probes: ProbeResults,
    ) -> Self {
        let (close, closing) = watch::channel(false);
        AppState {
            store,
            prefixes: config.sync.prefixes.clone(),
            cache: Arc::new(RenderCache::new(config.http.cache_bytes)),
            sync,
            pool,
            mode,
            probes,
            writes: config.writes.clone(),
            ready_requires_etcd: config
                .snapshot
                .as_ref()
                .is_some_and(|s| s.ready_requires_etcd),
            live: Live::fixed(config.clone()),
            closing,
            close: Arc::new(close),
            started: Instant::now(),
            requests: Arc::new(RequestMetrics::new(route_paths())),
            subscribers: Arc::new(Subscribers::new(
                config.http.max_streams,
                config.http.max_blocking_queries,
            )),
            snapshot_stats: None,
            liveness: Arc::default(),
            snapshot_path: config.snapshot.as_ref().map(|s| s.path.clone()),
            watch_deadline: config.sync.watch_deadline,
        }
    }

    /// The same state, following `live` for the settings SIGHUP may change.
    pub fn with_live(mut self, live: Live) -> Self {
        self.live = live;
        self
    }

    /// Seconds a refused write should wait before retrying: about one recovery (the probe rounds
    /// the mode needs to come back), from the settings as they are now.
    pub fn retry_after(&self) -> u64 {
        self.live
            .get(|c| c.mode.probe_interval * c.mode.recover_after)
            .as_secs()
            .max(1)
    }

    /// The deadline of one etcd call made for a request, now.
    pub fn etcd_timeout(&self) -> Duration {
        self.live.get(|c| c.etcd.request_timeout)
    }

    /// The same state, watching these tasks for `/healthz`.
    pub fn with_liveness(mut self, liveness: Arc<Liveness>) -> Self {
        self.liveness = liveness;
        self
    }

    /// Every component check, as `/v1/status` lists them.
    pub fn checks(&self, snapshot: &Snapshot, probes: &[MemberProbe]) -> Vec<Check> {
        let mut checks = health::member_checks(probes);
        let facts = WatchFacts {
            loaded: snapshot.loaded,
            staleness: self.mode.staleness(SystemTime::now()),
            watch_deadline: self.watch_deadline,
            revision: snapshot.revision,
        };
        checks.push(health::watch_check(&facts, probes));
        if let Some(path) = &self.snapshot_path {
            let failing = self.snapshot_stats.as_ref().is_some_and(|s| s.failing());
            checks.push(health::snapshot_check(path, snapshot.bytes, failing));
        }
        checks.push(health::memory_check(
            health::resident_bytes(),
            self.live.get(|c| c.memory_budget),
        ));
        checks.push(health::tasks_check(&self.liveness));
        checks
    }

    /// The same state, reporting the disk snapshot writer's record too.
    pub fn with_snapshot_stats(mut self, stats: Option<Arc<WriterStats>>) -> Self {
        self.snapshot_stats = stats;
        self
    }

    /// Ends every stream and blocking query: called when shutdown begins.
    pub fn close(&self) {
        self.close.send_replace(true);
    }

    fn ready(&self, snapshot: &Snapshot) -> bool {
        if !snapshot.loaded {
            return false;
        }
        if !self.ready_requires_etcd {
            return true;
        }
        let sync = self.sync.borrow();
        sync.full_loads > 0 || sync.state == SyncState::Watching
    }
}

/// What each connection runs: the fast path for plain key reads, then the router.
/// The whole service: `gate` first, then the fast path, then the router.
pub fn service(state: AppState, gate: Gate) -> SidecarService {
    let state = Arc::new(state);
    SidecarService::new(state.clone(), router(state), gate)
}

/// The router alone (routes and middleware), for tests that drive it with `oneshot`.
pub fn app(state: AppState) -> Router {
    router(Arc::new(state))
}

/// Every route: path (axum syntax) and its handlers. `/v1/kv` and `/v1/tree` without a key are the
/// keyed routes with an empty key (answered with the same JSON errors), not routes of their own.
fn routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("/v1/kv", get(kv_get)),
        ("/v1/kv/", get(kv_get)),
        (KV_ROUTE, get(kv_get).put(kv_put).delete(kv_delete)),
        ("/v1/tree", get(tree_get)),
        ("/v1/tree/", get(tree_get)),
        ("/v1/tree/{*prefix}", get(tree_get)),
        ("/v1/watch", get(watch)),
        ("/v1/watch/", get(watch)),
        ("/v1/watch/{*prefix}", get(watch)),
        ("/v1/status", get(status)),
        ("/healthz", get(healthz)),
        ("/readyz", get(readyz)),
        ("/metrics", get(metrics)),
    ]
}

/// The paths the router serves, in axum syntax; `tests/docs.rs` checks them against
/// `docs/openapi.yaml`.
pub fn route_paths() -> Vec<&'static str> {
    routes().into_iter().map(|(path, _)| path).collect()
}

/// Routes and middleware over the shared state.
fn router(state: Arc<AppState>) -> Router {
    let middleware = ServiceBuilder::new()
        .layer(CatchPanicLayer::custom(|_| ApiError::Internal.into_response()))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
                })
                .on_response(
                    DefaultOnResponse::new()
                        .level(Level::DEBUG)
                        .latency_unit(tower_http::LatencyUnit::Micros),
                )
                // A 503 in a degraded mode is the sidecar doing its job, not an error to log per
                // request; what went wrong is logged where it happened.
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
        )
        // Applies to every extractor that reads a body; writes read theirs with the same bound.
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));

    let mut router = Router::new();
    for (path, methods) in routes() {
        router = router.route(path, methods);
    }
    router
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware)
        // One Arc: cloning the state per request costs one increment.
        .with_state(state)
}

async fn unknown_route(uri: Uri) -> ApiError {
    if let Err(e) = check_uri_length(&uri) {
        return e;
    }
    ApiError::UnknownRoute(uri.path().to_string())
}

/// Refuses URIs longer than [`MAX_URI_BYTES`]. Checked where a path is parsed rather than in a
/// middleware, which would cost an allocation on every request.
fn check_uri_length(uri: &Uri) -> Result<(), ApiError> {
    let len = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if len > MAX_URI_BYTES {
        return Err(ApiError::UriTooLong(MAX_URI_BYTES));
    }
    Ok(())
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

/// Query parameters the routes understand; others are ignored.
#[derive(Debug, Default)]
struct Query {
    /// `?recurse`: the path is a prefix.
    recurse: bool,
    /// `?max_stale=<duration>`: refuse with 503 when the mirror is staler.
    max_stale: Option<Duration>,
    /// `?consistent`: at least as new as a quorum read made for this request.
    consistent: bool,
    /// `?cas=<mod_revision>`: compare-and-swap for writes (like `If-Match`).
    cas: Option<i64>,
    /// `?index=<revision>`: a blocking query: answer once the key or prefix changes after it.
    index: Option<i64>,
    /// `?wait=<duration>`: how long a blocking query may wait (capped at `MAX_WAIT`).
    wait: Option<Duration>,
    /// `?since=<revision>`: where a change stream resumes (like `Last-Event-ID`).
    since: Option<i64>,
}

fn flag(name: &str, value: &str) -> Result<bool, ApiError> {
    match value {
        "" | "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(ApiError::BadQuery(format!(
            "{name}={other:?}: expected true or false"
        ))),
    }
}

fn parse_query(uri: &Uri) -> Result<Query, ApiError> {
    let mut q = Query::default();
    for pair in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "recurse" => q.recurse = flag(name, value)?,
            "consistent" => q.consistent = flag(name, value)?,
            "max_stale" => {
                let d = humantime::parse_duration(value).map_err(|_| {
                    ApiError::BadQuery(format!(
                        "max_stale={value:?}: expected a duration such as 5s or 500ms"
                    ))
                })?;
                q.max_stale = Some(d);
            }
            "cas" => q.cas = Some(parse_revision("cas", value)?),
            "index" => q.index = Some(parse_revision("index", value)?),
            "since" => q.since = Some(parse_revision("since", value)?),
            "wait" => {
                let d = humantime::parse_duration(value).map_err(|_| {
                    ApiError::BadQuery(format!(
                        "wait={value:?}: expected a duration such as 30s or 5m"
                    ))
                })?;
                q.wait = Some(d.min(MAX_WAIT));
            }
            _ => {}
        }
    }
    Ok(q)
}

/// A mod_revision given by a client: 0 (the key must not exist) or a positive revision.
fn parse_revision(what: &str, text: &str) -> Result<i64, ApiError> {
    match text.trim().trim_matches('"').parse::<i64>() {
        Ok(r) if r >= 0 => Ok(r),
        _ => Err(ApiError::BadQuery(format!(
            "{what}={text:?}: expected a mod_revision (0 for \"must not exist\")"
        ))),
    }
}

/// The key named by the path after `route` (`/v1/kv` or `/v1/tree`), decoded once.
fn key_from_path<'u>(uri: &'u Uri, route: &str) -> Result<Cow<'u, str>, ApiError> {
    check_uri_length(uri)?;
    let raw = uri.path().strip_prefix(route).unwrap_or("");
    Ok(decode_key_path(raw)?)
}

/// The key a request names, or for a prefix request (`?recurse`, a watch) the prefix, once the
/// mirror is known to hold everything it covers. A prefix request that names a mirrored prefix
/// without its trailing slash means that directory, as `/v1/tree` does; any other prefix the
/// mirror does not wholly hold is refused rather than answered in part.
fn mirrored<'k>(
    state: &AppState,
    key: Cow<'k, str>,
    prefix: bool,
) -> Result<Cow<'k, str>, ApiError> {
    if state.prefixes.contains(key.as_bytes()) {
        return Ok(key);
    }
    if prefix {
        if let Some(directory) = state.prefixes.named_without_slash(&key) {
            return Ok(Cow::Owned(directory.to_string()));
        }
    }
    Err(ApiError::OutsideMirror {
        key: key.into_owned(),
        prefixes: state.prefixes.as_slice().to_vec(),
    })
}

/// The snapshot to answer from, after the request's freshness conditions hold.
async fn readable_snapshot(
    state: &AppState,
    query: &Query,
    key: &str,
) -> Result<Arc<Snapshot>, ApiError> {
    let mut snapshot = state.store.snapshot();
    if !snapshot.loaded {
        return Err(ApiError::NotReady);
    }
    if let Some(index) = query.index {
        let scope = if query.recurse {
            Scope::Prefix(Bytes::copy_from_slice(key.as_bytes()))
        } else {
            Scope::Key(Bytes::copy_from_slice(key.as_bytes()))
        };
        let wait = query.wait.unwrap_or(DEFAULT_WAIT);
        let _waiting = state.subscribers.enter(SubscriberKind::Blocking)?;
        snapshot = wait_for_change(&state.store, &scope, index, wait, state.closing.clone()).await;
    }
    if let Some(max) = query.max_stale {
        let stale = state.mode.staleness(SystemTime::now());
        if stale.is_none_or(|s| s > max) {
            return Err(ApiError::TooStale {
                stale_ms: stale.map_or(u64::MAX, |s| s.as_millis() as u64),
                max_ms: max.as_millis() as u64,
                mode: state.mode.mode(),
            });
        }
    }
    if query.consistent && query.index.is_none() {
        return consistent_snapshot(state, key, query.recurse).await;
    }
    Ok(snapshot)
}

/// Reads, with quorum, the keys and mod_revisions under `key` (or the one key), then waits until
/// the mirror holds exactly those: the answer, served from memory, is then at least as new as a
/// quorum read made for this request. This works on every etcd version, unlike waiting for a
/// watch progress notification, which etcd before 3.4.25 / 3.5.8 can send ahead of the events it
/// covers (etcd #15220).
async fn consistent_snapshot(
    state: &AppState,
    key: &str,
    prefix: bool,
) -> Result<Arc<Snapshot>, ApiError> {
    let chosen = state
        .pool
        .choose(None)
        .await
        .map_err(|e| ApiError::NoQuorum(e.to_string()))?;
    let mut client = chosen.client;
    let mut options = GetOptions::new().with_keys_only();
    if prefix {
        options = options.with_prefix();
    }
    let response = tokio::time::timeout(state.etcd_timeout(), client.get(key, Some(options)))
        .await
        .map_err(|_| ApiError::NoQuorum("the quorum read timed out".into()))?
        .map_err(|e| ApiError::NoQuorum(e.to_string()))?;
    let quorum_revision = response.header().map_or(i64::MAX, |h| h.revision());
    let wanted: Vec<(Vec<u8>, i64)> = response
        .kvs()
        .iter()
        .map(|kv| (kv.key().to_vec(), kv.mod_revision()))
        .collect();
    let matches = |snapshot: &Snapshot| -> bool {
        let held: Vec<(&[u8], i64)> = if prefix {
            snapshot
                .scan_prefix(key.as_bytes())
                .map(|e| (&e.key[..], e.mod_revision))
                .collect()
        } else {
            snapshot
                .get(key.as_bytes())
                .map(|e| (&e.key[..], e.mod_revision))
                .into_iter()
                .collect()
        };
        held.len() == wanted.len()
            && held
                .iter()
                .zip(&wanted)
                .all(|(h, w)| h.0 == &w.0[..] && h.1 == w.1)
    };
    let mut revisions = state.store.subscribe();
    let deadline = tokio::time::Instant::now() + state.etcd_timeout();
    loop {
        let snapshot = state.store.snapshot();
        // The keys asked for are exactly as the quorum read saw them.
        if matches(&snapshot) {
            return Ok(snapshot);
        }
        // Everything up to the quorum read's revision applied: at least as new, whatever changed.
        if snapshot.revision >= quorum_revision {
            return Ok(snapshot);
        }
        match tokio::time::timeout_at(deadline, revisions.changed()).await {
            Ok(Ok(())) => {}
            _ => {
                return Err(ApiError::NoQuorum(
                    "the mirror did not reach the quorum read in time".into(),
                ))
            }
        }
    }
}

/// Whether `If-None-Match` names `etag` (or `*`).
fn etag_matches(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|candidate| {
            candidate == "*"
                || candidate.as_bytes() == etag.as_bytes()
                || candidate.strip_prefix("W/").map(str::as_bytes) == Some(etag.as_bytes())
        })
}

/// Header values formatted on this thread for the last revision and staleness it answered with.
/// Requests in the same millisecond share the staleness values instead of formatting them again,
/// and each thread clones its own copy of the revision value, so the two cores do not contend for
/// one reference count on every response.
struct ThreadHeaders {
    /// The revision `revision` was formatted for.
    revision_of: i64,
    /// `X-Config-Revision` and `X-Config-Index`.
    revision: HeaderValue,
    /// The staleness in milliseconds `stale_ms` and `age` were formatted for.
    stale_of: u64,
    /// `X-Config-Stale-Ms`.
    stale_ms: HeaderValue,
    /// `Age`, in seconds.
    age: HeaderValue,
}

thread_local! {
    static THREAD_HEADERS: RefCell<ThreadHeaders> = const {
        RefCell::new(ThreadHeaders {
            revision_of: 0,
            revision: HeaderValue::from_static("0"),
            stale_of: 0,
            stale_ms: HeaderValue::from_static("0"),
            age: HeaderValue::from_static("0"),
        })
    };
}

/// Adds what every mirror response says: revision, mode and staleness.
pub(crate) fn with_mirror_headers<B>(
    mut response: http::Response<B>,
    state: &AppState,
    snapshot: &Snapshot,
) -> http::Response<B> {
    let stale = state.mode.staleness(SystemTime::now());
    let headers = response.headers_mut();
    headers.insert(MODE_HEADER, state.mode.mode().header());
    THREAD_HEADERS.with(|cell| {
        let mut mine = cell.borrow_mut();
        if mine.revision_of != snapshot.revision {
            mine.revision_of = snapshot.revision;
            mine.revision = HeaderValue::from(snapshot.revision);
        }
        headers.insert(REVISION_HEADER, mine.revision.clone());
        headers.insert(INDEX_HEADER, mine.revision.clone());
        if let Some(stale) = stale {
            let ms = stale.as_millis() as u64;
            if mine.stale_of != ms {
                mine.stale_of = ms;
                mine.stale_ms = HeaderValue::from(ms);
                mine.age = HeaderValue::from(stale.as_secs());
            }
            headers.insert(STALE_HEADER, mine.stale_ms.clone());
            headers.insert(header::AGE, mine.age.clone());
        }
    });
    response
}

/// A `200` with `body`, or a bodiless `304` when `If-None-Match` names `etag`.
fn not_modified_or(
    headers: &HeaderMap,
    etag: HeaderValue,
    content_type: HeaderValue,
    body: impl FnOnce() -> Bytes,
) -> http::Response<Option<Bytes>> {
    let (status, body) = if etag_matches(headers, &etag) {
        (StatusCode::NOT_MODIFIED, None)
    } else {
        (StatusCode::OK, Some(body()))
    };
    let mut response = http::Response::new(body);
    *response.status_mut() = status;
    // Room for these two and the five mirror headers: the map is allocated once.
    response.headers_mut().reserve(7);
    let h = response.headers_mut();
    h.insert(header::ETAG, etag);
    h.insert(header::CONTENT_TYPE, content_type);
    response
}

/// The answer to a read of one present key, with every header a mirror response carries. The
/// router's handler and the fast path in [`crate::service`] both answer with it.
pub(crate) fn key_response(
    state: &AppState,
    snapshot: &Snapshot,
    entry: &Entry,
    request_headers: &HeaderMap,
) -> http::Response<Option<Bytes>> {
    let response = not_modified_or(request_headers, entry.etag(), entry.content_type(), || {
        entry.value_bytes()
    });
    with_mirror_headers(response, state, snapshot)
}

/// An axum response from an optional body.
fn into_axum(response: http::Response<Option<Bytes>>) -> Response {
    response.map(|body| body.map_or_else(Body::empty, Body::from))
}

async fn kv_get(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (uri, headers) = (request.uri(), request.headers());
    let query = parse_query(uri)?;
    let key = mirrored(&state, key_from_path(uri, "/v1/kv")?, query.recurse)?;
    let snapshot = readable_snapshot(&state, &query, &key).await?;
    if !query.recurse {
        return Ok(match snapshot.get(key.as_bytes()) {
            Some(entry) => into_axum(key_response(&state, &snapshot, entry, headers)),
            // Missing at a known revision: the headers say which one.
            None => with_mirror_headers(
                ApiError::KeyNotFound {
                    key: key.into_owned(),
                    revision: snapshot.revision,
                }
                .into_response(),
                &state,
                &snapshot,
            ),
        });
    }
    // A listing changes whenever anything in the mirror changes, so its tag is the revision.
    let response = not_modified_or(headers, list_etag(&snapshot), json_type(), || {
        state.cache.get(View::List, &key, &snapshot)
    });
    Ok(into_axum(with_mirror_headers(response, &state, &snapshot)))
}

async fn tree_get(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (uri, headers) = (request.uri(), request.headers());
    let mut query = parse_query(uri)?;
    let mut dir = key_from_path(uri, "/v1/tree")?;
    if !dir.ends_with('/') {
        dir.to_mut().push('/');
    }
    let dir = mirrored(&state, dir, true)?;
    query.recurse = true;
    let snapshot = readable_snapshot(&state, &query, &dir).await?;
    let response = not_modified_or(headers, list_etag(&snapshot), json_type(), || {
        state.cache.get(View::Tree, &dir, &snapshot)
    });
    Ok(into_axum(with_mirror_headers(response, &state, &snapshot)))
}

fn list_etag(snapshot: &Snapshot) -> HeaderValue {
    HeaderValue::try_from(format!("W/\"{}\"", snapshot.revision))
        .expect("a quoted integer is a valid header value")
}

fn json_type() -> HeaderValue {
    HeaderValue::from_static("application/json")
}

/// Compares two byte strings in time that depends only on their lengths, so a wrong token
/// reveals nothing about the right one through timing (`subtle` keeps the optimiser from
/// turning the comparison back into an early exit).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

/// Checks that writes are on, the token (if any) is right, the key is mirrored and the mode
/// allows writes; returns the key and the compare-and-swap revision, if asked for.
fn admit_write(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(String, Query, Option<i64>), ApiError> {
    if !state.writes.allowed {
        return Err(ApiError::WritesDisabled);
    }
    if let Some(token) = &state.writes.token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(presented.as_bytes(), token.expose().as_bytes()) {
            return Err(ApiError::Unauthorized);
        }
    }
    let query = parse_query(uri)?;
    let key = mirrored(state, key_from_path(uri, "/v1/kv")?, query.recurse)?;
    let if_match = match headers.get(header::IF_MATCH) {
        None => None,
        Some(v) => Some(parse_revision(
            "If-Match",
            v.to_str()
                .map_err(|_| ApiError::BadQuery("If-Match is not text".into()))?,
        )?),
    };
    let cas = if_match.or(query.cas);
    let mode = state.mode.mode();
    if mode != Mode::Full {
        return Err(ApiError::WritesRefused {
            mode,
            retry_after: state.retry_after(),
        });
    }
    Ok((key.into_owned(), query, cas))
}

/// Forwards a write, then waits until the mirror has applied it, so that a read from this sidecar
/// that starts after the write returned sees it.
async fn forward_write(
    state: &AppState,
    op: WriteOp,
    cas: Option<i64>,
) -> Result<Response, ApiError> {
    let chosen = state
        .pool
        .choose(None)
        .await
        .map_err(|e| ApiError::WriteFailed {
            outcome: "not_applied",
            message: e.to_string(),
        })?;
    let mut client = chosen.client;
    let result = write::apply(&mut client, op, cas, state.etcd_timeout()).await?;
    let mut revisions = state.store.subscribe();
    let visible = tokio::time::timeout(
        state.etcd_timeout(),
        revisions.wait_for(|r| *r >= result.revision),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let snapshot = state.store.snapshot();
    let body = json!({
        "revision": result.revision,
        "deleted": result.deleted,
        "mirrored": visible,
    });
    Ok(with_mirror_headers(
        Json(body).into_response(),
        state,
        &snapshot,
    ))
}

async fn kv_put(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let (key, _, cas) = admit_write(&state, &parts.uri, &parts.headers)?;
    let limit = state.live.get(|c| c.http.body_read_timeout);
    let value = tokio::time::timeout(limit, axum::body::to_bytes(body, MAX_BODY_BYTES))
        .await
        .map_err(|_| ApiError::BodyTimeout(limit.as_millis() as u64))?
        .map_err(|e| {
            let e = e.into_inner();
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::PayloadTooLarge
            } else {
                ApiError::BadBody(e.to_string())
            }
        })?;
    forward_write(
        &state,
        WriteOp::Put {
            key,
            value: value.to_vec(),
        },
        cas,
    )
    .await
}

async fn kv_delete(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (key, query, cas) = admit_write(&state, request.uri(), request.headers())?;
    if query.recurse && cas.is_some() {
        return Err(ApiError::BadQuery(
            "compare-and-swap applies to one key, not with recurse".into(),
        ));
    }
    forward_write(
        &state,
        WriteOp::Delete {
            key,
            prefix: query.recurse,
        },
        cas,
    )
    .await
}

/// `GET /v1/watch/{prefix}`: a server-sent event stream of the changes under a prefix.
async fn watch(State(state): State<Arc<AppState>>, request: Request) -> Result<Response, ApiError> {
    let (uri, headers) = (request.uri(), request.headers());
    let query = parse_query(uri)?;
    let prefix = mirrored(&state, key_from_path(uri, "/v1/watch")?, true)?;
    let snapshot = state.store.snapshot();
    if !snapshot.loaded {
        return Err(ApiError::NotReady);
    }
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(parse_revision(
            "Last-Event-ID",
            v.to_str()
                .map_err(|_| ApiError::BadQuery("Last-Event-ID is not text".into()))?,
        )?),
    };
    let since = last_event_id.or(query.since);
    if let Some(since) = since {
        if since > snapshot.revision {
            return Err(ApiError::BadQuery(format!(
                "since={since} is ahead of the mirror's revision {}",
                snapshot.revision
            )));
        }
    }
    let scope = Scope::Prefix(Bytes::from(prefix.into_owned().into_bytes()));
    let subscriber = state.subscribers.enter(SubscriberKind::Stream)?;
    let stream = event_stream(
        state.store.clone(),
        &state.mode,
        scope,
        since,
        state.closing.clone(),
    )
    // The guard lives as long as the stream: the gauge drops when the client goes.
    .map(move |event| {
        let _ = &subscriber;
        event
    });
    let sse = Sse::new(stream).keep_alive(KeepAlive::new().interval(HEARTBEAT).text("keep-alive"));
    Ok(with_mirror_headers(sse.into_response(), &state, &snapshot))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match crate::metrics::render(&state) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            )],
            text,
        )
            .into_response(),
        Err(_) => ApiError::Internal.into_response(),
    }
}

/// Liveness: fails only when a background task died or stopped making progress, which a restart
/// cures; an unreachable etcd never fails it.
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let problems = state.liveness.problems();
    if problems.is_empty() {
        Json(json!({ "status": "alive" })).into_response()
    } else {
        ApiError::NotAlive(problems.join("; ")).into_response()
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let snapshot = state.store.snapshot();
    if state.ready(&snapshot) {
        with_mirror_headers(
            Json(json!({ "status": "ready", "revision": snapshot.revision })).into_response(),
            &state,
            &snapshot,
        )
    } else {
        ApiError::NotReady.into_response()
    }
}

async fn status(State(state): State<Arc<AppState>>) -> Response {
    let snapshot = state.store.snapshot();
    let sync = state.sync.borrow().clone();
    let (transitions, transitions_total) = state.mode.history();
    let probes = state
        .probes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let checks = state.checks(&snapshot, &probes);
    let body = json!({
        "status": health::overall(&checks),
        "checks": checks,
        "mode": state.mode.mode(),
        "health": state.mode.health(),
        "ready": state.ready(&snapshot),
        "revision": snapshot.revision,
        "cluster_id": snapshot.cluster_id,
        "stale_ms": state.mode.staleness(SystemTime::now()).map(|s| s.as_millis() as u64),
        "keys": snapshot.len(),
        "bytes": snapshot.bytes,
        "prefixes": state.prefixes.as_slice(),
        "endpoints": state.pool.status(),
        "probes": probes,
        "sync": sync,
        "transitions": transitions,
        "transitions_total": transitions_total,
        "writes_allowed": state.writes.allowed,
        "last_applied_unix_ms": snapshot
            .published_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default(),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    with_mirror_headers(Json(body).into_response(), &state, &snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(
            !constant_time_eq(b"s3cret", b"s3creT"),
            "same length, last byte differs"
        );
        assert!(!constant_time_eq(b"s3cret", b"s3cre"), "a prefix");
        assert!(!constant_time_eq(b"", b"s3cret"));
    }
    use crate::mode::Transition;
    use crate::store::Entry;
    use axum::body::to_bytes;
    use bytes::Bytes;
    use tower::ServiceExt;

    /// The app over a store filled directly: this tests the HTTP layer only (sync is tested
    /// against real etcd in tests/).
    fn app_with(entries: &[(&str, &str)], loaded: bool) -> Router {
        app(state_with(entries, loaded))
    }

    fn state_with(entries: &[(&str, &str)], loaded: bool) -> AppState {
        let config = Config::for_endpoints(&["http://127.0.0.1:1".into()], &["/c/"]).unwrap();
        let store = Arc::new(Store::new());
        if loaded {
            let entries = entries
                .iter()
                .map(|(k, v)| {
                    Entry::new(
                        Bytes::from(k.to_string()),
                        Bytes::from(v.to_string()),
                        2,
                        3,
                        1,
                    )
                })
                .collect();
            store.replace(7, entries).unwrap();
        }
        let pool = Arc::new(EndpointPool::new(
            config.etcd.clone(),
            Duration::from_secs(1),
        ));
        let mode = Arc::new(ModeHandle::default());
        if loaded {
            mode.publish(&Transition {
                from: Mode::Starting,
                to: Mode::Full,
                reason: "test".into(),
                at_unix_ms: 0,
            });
        }
        let (_, sync) = watch::channel(SyncStatus::default());
        AppState::new(&config, store, pool, sync, mode, Default::default())
    }

    async fn call(
        app: Router,
        uri: &str,
        if_none_match: Option<&str>,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let mut req = Request::builder().uri(uri);
        if let Some(tag) = if_none_match {
            req = req.header(header::IF_NONE_MATCH, tag);
        }
        let resp = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        let (parts, body) = resp.into_parts();
        (
            parts.status,
            parts.headers,
            to_bytes(body, usize::MAX).await.unwrap(),
        )
    }

    /// The metrics' own route matching names the route axum's router picks, for every route
    /// and for paths that only nearly match one.
    #[tokio::test]
    async fn metrics_route_matching_agrees_with_the_router() {
        use axum::extract::MatchedPath;
        let mut router = Router::new();
        for path in route_paths() {
            router = router.route(
                path,
                axum::routing::any(|m: MatchedPath| async move { m.as_str().to_string() }),
            );
        }
        let router = router.fallback(|| async { "unmatched".to_string() });
        let metrics = RequestMetrics::new(route_paths());
        let paths = [
            "/",
            "/v1",
            "/v1/",
            "/v1/kv",
            "/v1/kv/",
            "/v1/kv/a",
            "/v1/kv//a/b%2F",
            "/v1/kvx",
            "/v1/tree",
            "/v1/tree/",
            "/v1/tree/a/",
            "/v1/watch",
            "/v1/watch/",
            "/v1/watch/a",
            "/v1/status",
            "/v1/status/",
            "/healthz",
            "/healthz/x",
            "/readyz",
            "/metrics",
            "/metricsx",
            "/v2/kv/a",
        ];
        for path in paths {
            let response = router
                .clone()
                .oneshot(Request::builder().uri(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
            let ours = metrics.route_of(path);
            let expected = if &body[..] == b"unmatched" {
                metrics.unmatched()
            } else {
                metrics.route(std::str::from_utf8(&body).unwrap()).unwrap()
            };
            assert_eq!(ours, expected, "{path}: router said {body:?}");
        }
    }

    #[tokio::test]
    async fn key_read_has_prepared_headers_and_honours_if_none_match() {
        let app = app_with(&[("/c/a", "hello")], true);
        let (status, headers, body) = call(app.clone(), "/v1/kv/c/a", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "hello");
        assert_eq!(headers[header::ETAG], "\"3\"");
        assert_eq!(headers[&REVISION_HEADER], "7");
        assert_eq!(headers[&MODE_HEADER], "full");
        for tag in ["\"3\"", "W/\"3\"", "\"9\", \"3\"", "*"] {
            let (status, headers, body) = call(app.clone(), "/v1/kv/c/a", Some(tag)).await;
            assert_eq!(status, StatusCode::NOT_MODIFIED, "{tag}");
            assert!(body.is_empty());
            assert_eq!(headers[&REVISION_HEADER], "7");
        }
        let (status, _, _) = call(app.clone(), "/v1/kv/c/a", Some("\"2\"")).await;
        assert_eq!(status, StatusCode::OK);
        // HEAD answers with the same headers and no body: how scripts learn the index.
        let req = Request::builder()
            .method(Method::HEAD)
            .uri("/v1/kv/c/a")
            .body(Body::empty())
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[&INDEX_HEADER], "7");
        assert!(to_bytes(resp.into_body(), 16).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn before_the_first_load_keys_are_unknown_not_missing() {
        let app = app_with(&[], false);
        let (status, headers, body) = call(app.clone(), "/v1/kv/c/a", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[header::RETRY_AFTER], "1");
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "not_ready");
        let (status, _, _) = call(app.clone(), "/readyz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, _, _) = call(app, "/healthz", None).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn listing_and_tree_share_the_revision_etag() {
        let app = app_with(&[("/c/x/y", "1"), ("/c/x/z", "\"s\"")], true);
        let (status, headers, body) = call(app.clone(), "/v1/tree/c/x", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(body, r#"{"y":1,"z":"s"}"#);
        let tag = headers[header::ETAG].to_str().unwrap().to_string();
        assert_eq!(tag, "W/\"7\"");
        let (status, _, _) = call(app.clone(), "/v1/kv/c/x/?recurse", Some(&tag)).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        let (status, _, body) = call(app, "/v1/kv/c/x/?recurse=false", None).await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "recurse=false reads the key itself"
        );
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "key_not_found");
        let (_, headers, _) = call(app_with(&[], true), "/v1/kv/c/none", None).await;
        assert_eq!(
            headers[&REVISION_HEADER], "7",
            "a miss says at which revision"
        );
        assert_eq!(headers[&MODE_HEADER], "full");
    }

    /// The fast path answers plain reads of present keys exactly as the router does, and leaves
    /// everything else (queries, other methods, misses, errors) to the router.
    #[tokio::test]
    async fn the_fast_path_answers_like_the_router_or_not_at_all() {
        let state = state_with(&[("/c/a", "hello"), ("/c/b%", "{\"j\": 1}")], true);
        let router = app(state.clone());
        let request = |method: Method, uri: &str, tag: Option<&str>| {
            let mut req = Request::builder().method(method).uri(uri);
            if let Some(tag) = tag {
                req = req.header(header::IF_NONE_MATCH, tag);
            }
            req.body(Body::empty()).unwrap()
        };
        for (uri, tag) in [
            ("/v1/kv/c/a", None),
            ("/v1/kv/c/a", Some("\"3\"")),
            ("/v1/kv/c/a", Some("\"2\"")),
            ("/v1/kv/c/b%25", None),
        ] {
            let fast = crate::service::plain_read(&state, &request(Method::GET, uri, tag))
                .unwrap_or_else(|| panic!("{uri} is a plain read"));
            let mut routed = router
                .clone()
                .oneshot(request(Method::GET, uri, tag))
                .await
                .unwrap();
            // axum sets Content-Length itself; hyper adds it to both from the body's length.
            routed.headers_mut().remove(header::CONTENT_LENGTH);
            assert_eq!(fast.status(), routed.status(), "{uri} {tag:?}");
            assert_eq!(fast.headers(), routed.headers(), "{uri} {tag:?}");
            let routed_body = to_bytes(routed.into_body(), usize::MAX).await.unwrap();
            assert_eq!(fast.into_body().unwrap_or_default(), routed_body, "{uri}");
        }
        let long = format!("/v1/kv/c/{}", "x".repeat(MAX_URI_BYTES));
        for (method, uri) in [
            (Method::GET, "/v1/kv/c/a?consistent"),
            (Method::GET, "/v1/kv/c/a?index=1"),
            (Method::HEAD, "/v1/kv/c/a"),
            (Method::PUT, "/v1/kv/c/a"),
            (Method::GET, "/v1/kv/c/missing"),
            (Method::GET, "/v1/kv/elsewhere/a"),
            (Method::GET, "/v1/kv/c/%2e%2e/x"),
            (Method::GET, "/v1/kv/c/%ff"),
            (Method::GET, "/v1/kvc/a"),
            (Method::GET, "/v1/tree/c/"),
            (Method::GET, long.as_str()),
        ] {
            assert!(
                crate::service::plain_read(&state, &request(method.clone(), uri, None)).is_none(),
                "{method} {uri} is left to the router"
            );
        }
        let not_loaded = state_with(&[("/c/a", "hello")], false);
        assert!(
            crate::service::plain_read(&not_loaded, &request(Method::GET, "/v1/kv/c/a", None))
                .is_none(),
            "before the first load the router answers not_ready"
        );
    }
}
