//! HTTP handlers and the router: store → HTTP.
//!
//! [`app`] builds the whole service (routes plus one `ServiceBuilder` chain of middleware), so tests
//! can drive it with `oneshot` and the server runs the very same thing. Every read is answered
//! from the snapshot current when the request started; nothing here talks to etcd.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use serde_json::json;
use tokio::sync::watch;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::config::Config;
use crate::error::ApiError;
use crate::etcd::EndpointPool;
use crate::keys::{decode_key_path, Prefixes};
use crate::mode::Mode;
use crate::render::{RenderCache, View};
use crate::store::{Snapshot, Store};
use crate::sync::SyncStatus;

/// Longest request URI accepted (path and query); etcd keys are at most 1.5 MiB but no sensible
/// config key comes near this.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Largest request body accepted: etcd's default request size limit.
pub const MAX_BODY_BYTES: usize = 1536 * 1024;

/// Header: the store revision a response was served from.
pub const REVISION_HEADER: &str = "x-config-revision";
/// Header: the mode the sidecar was in when it answered.
pub const MODE_HEADER: &str = "x-config-mode";

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The mirror.
    pub store: Arc<Store>,
    /// What is mirrored, to tell "outside" from "missing".
    pub prefixes: Prefixes,
    /// Rendered listings and trees.
    pub cache: RenderCache,
    /// The sync task's own report.
    pub sync: watch::Receiver<SyncStatus>,
    /// Endpoint health, for status.
    pub pool: Arc<EndpointPool>,
    /// Process start, for uptime.
    pub started: Instant,
}

impl AppState {
    /// The state for `config`, reading `store` and reporting `pool` and `sync`.
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        pool: Arc<EndpointPool>,
        sync: watch::Receiver<SyncStatus>,
    ) -> Self {
        AppState {
            store,
            prefixes: config.sync.prefixes.clone(),
            cache: RenderCache::new(config.http.cache_bytes),
            sync,
            pool,
            started: Instant::now(),
        }
    }

    fn mode(&self, snapshot: &Snapshot) -> Mode {
        if snapshot.loaded {
            Mode::Full
        } else {
            Mode::Starting
        }
    }
}

/// The service: routes and middleware.
pub fn app(state: AppState, request_timeout: Duration) -> Router {
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
                ),
        )
        .layer(middleware::from_fn(reject_overlong_uri))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        // Applies to every extractor that reads a body (writes, later); reads take none.
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));

    Router::new()
        .route("/v1/kv", get(kv_get))
        .route("/v1/kv/", get(kv_get))
        .route("/v1/kv/{*key}", get(kv_get))
        .route("/v1/tree", get(tree_get))
        .route("/v1/tree/", get(tree_get))
        .route("/v1/tree/{*prefix}", get(tree_get))
        .route("/v1/status", get(status))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware)
        .with_state(state)
}

async fn reject_overlong_uri(request: Request, next: Next) -> Response {
    let len = request
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    if len > MAX_URI_BYTES {
        return ApiError::UriTooLong(MAX_URI_BYTES).into_response();
    }
    next.run(request).await
}

async fn unknown_route(uri: Uri) -> ApiError {
    ApiError::UnknownRoute(uri.path().to_string())
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

/// Query flags the read routes understand.
#[derive(Debug, Default)]
struct ReadQuery {
    /// `?recurse`: list the prefix instead of reading one key.
    recurse: bool,
}

fn parse_query(uri: &Uri) -> Result<ReadQuery, ApiError> {
    let mut q = ReadQuery::default();
    for pair in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name == "recurse" {
            q.recurse = match value {
                "" | "true" | "1" => true,
                "false" | "0" => false,
                other => {
                    return Err(ApiError::BadQuery(format!(
                        "recurse={other:?}: expected true or false"
                    )))
                }
            };
        }
    }
    Ok(q)
}

/// The key named by the path after `route` (`/v1/kv` or `/v1/tree`), decoded once.
fn key_from_path(uri: &Uri, route: &str) -> Result<String, ApiError> {
    let raw = uri.path().strip_prefix(route).unwrap_or("");
    Ok(decode_key_path(raw)?)
}

fn loaded_snapshot(state: &AppState) -> Result<Arc<Snapshot>, ApiError> {
    let snapshot = state.store.snapshot();
    if !snapshot.loaded {
        return Err(ApiError::NotReady);
    }
    Ok(snapshot)
}

fn ensure_mirrored(state: &AppState, key: &str) -> Result<(), ApiError> {
    if state.prefixes.contains(key.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::OutsideMirror {
            key: key.to_string(),
            prefixes: state.prefixes.as_slice().to_vec(),
        })
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

fn with_mirror_headers(mut response: Response, state: &AppState, snapshot: &Snapshot) -> Response {
    let headers = response.headers_mut();
    headers.insert(REVISION_HEADER, snapshot.revision_header.clone());
    headers.insert(MODE_HEADER, state.mode(snapshot).header());
    response
}

fn not_modified_or(
    headers: &HeaderMap,
    etag: HeaderValue,
    content_type: HeaderValue,
    body: impl FnOnce() -> Body,
) -> Response {
    let (status, body) = if etag_matches(headers, &etag) {
        (StatusCode::NOT_MODIFIED, Body::empty())
    } else {
        (StatusCode::OK, body())
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::ETAG, etag);
    h.insert(header::CONTENT_TYPE, content_type);
    response
}

async fn kv_get(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let query = parse_query(&uri)?;
    let key = key_from_path(&uri, "/v1/kv")?;
    ensure_mirrored(&state, &key)?;
    let snapshot = loaded_snapshot(&state)?;
    let response = if query.recurse {
        // A listing changes whenever anything in the mirror changes, so its tag is the revision.
        let etag = list_etag(&snapshot);
        not_modified_or(&headers, etag, json_type(), || {
            Body::from(state.cache.get(View::List, &key, &snapshot))
        })
    } else {
        match snapshot.get(key.as_bytes()) {
            Some(entry) => not_modified_or(
                &headers,
                entry.etag.clone(),
                entry.content_type.clone(),
                || Body::from(entry.value.clone()),
            ),
            // Missing at a known revision: the headers say which one.
            None => ApiError::KeyNotFound {
                key,
                revision: snapshot.revision,
            }
            .into_response(),
        }
    };
    Ok(with_mirror_headers(response, &state, &snapshot))
}

async fn tree_get(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    parse_query(&uri)?;
    let mut dir = key_from_path(&uri, "/v1/tree")?;
    if !dir.ends_with('/') {
        dir.push('/');
    }
    ensure_mirrored(&state, &dir)?;
    let snapshot = loaded_snapshot(&state)?;
    let response = not_modified_or(&headers, list_etag(&snapshot), json_type(), || {
        Body::from(state.cache.get(View::Tree, &dir, &snapshot))
    });
    Ok(with_mirror_headers(response, &state, &snapshot))
}

fn list_etag(snapshot: &Snapshot) -> HeaderValue {
    HeaderValue::try_from(format!("W/\"{}\"", snapshot.revision))
        .expect("a quoted integer is a valid header value")
}

fn json_type() -> HeaderValue {
    HeaderValue::from_static("application/json")
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let snapshot = state.store.snapshot();
    if snapshot.loaded {
        with_mirror_headers(
            Json(json!({ "status": "ready", "revision": snapshot.revision })).into_response(),
            &state,
            &snapshot,
        )
    } else {
        ApiError::NotReady.into_response()
    }
}

async fn status(State(state): State<AppState>) -> Response {
    let snapshot = state.store.snapshot();
    let sync = state.sync.borrow().clone();
    let body = json!({
        "mode": state.mode(&snapshot),
        "ready": snapshot.loaded,
        "revision": snapshot.revision,
        "keys": snapshot.len(),
        "bytes": snapshot.bytes,
        "prefixes": state.prefixes.as_slice(),
        "endpoints": state.pool.status(),
        "sync": sync,
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
    use crate::store::Entry;
    use crate::sync::WatchTask;
    use axum::body::to_bytes;
    use bytes::Bytes;
    use tower::ServiceExt;

    /// The app over a store filled directly: this tests the HTTP layer only (sync is tested
    /// against real etcd in tests/).
    fn app_with(entries: &[(&str, &str)], loaded: bool) -> Router {
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
        let task = WatchTask::new(
            pool.clone(),
            store.clone(),
            config.sync.clone(),
            Duration::from_secs(1),
        );
        app(
            AppState::new(&config, store, pool, task.status()),
            Duration::from_secs(5),
        )
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

    #[tokio::test]
    async fn key_read_has_prepared_headers_and_honours_if_none_match() {
        let app = app_with(&[("/c/a", "hello")], true);
        let (status, headers, body) = call(app.clone(), "/v1/kv/c/a", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "hello");
        assert_eq!(headers[header::ETAG], "\"3\"");
        assert_eq!(headers[REVISION_HEADER], "7");
        assert_eq!(headers[MODE_HEADER], "full");
        for tag in ["\"3\"", "W/\"3\"", "\"9\", \"3\"", "*"] {
            let (status, headers, body) = call(app.clone(), "/v1/kv/c/a", Some(tag)).await;
            assert_eq!(status, StatusCode::NOT_MODIFIED, "{tag}");
            assert!(body.is_empty());
            assert_eq!(headers[REVISION_HEADER], "7");
        }
        let (status, _, _) = call(app, "/v1/kv/c/a", Some("\"2\"")).await;
        assert_eq!(status, StatusCode::OK);
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
            headers[REVISION_HEADER], "7",
            "a miss says at which revision"
        );
        assert_eq!(headers[MODE_HEADER], "full");
    }
}
