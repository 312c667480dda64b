//! memory → the app: the routes and their handlers, over one shared [`AppState`].
//!
//! [`app`] builds the router (routes plus one `ServiceBuilder` chain of middleware), so tests can
//! drive it with `oneshot`; [`service`] puts the [`gate`] and the [`fast_path`] for plain key
//! reads in front of it, and that is what every connection runs. Every read is answered from the
//! snapshot current when the request started; only `?consistent` reads (one quorum read to know
//! what "current" is) and writes talk to etcd. [`error`] is the one place errors become
//! responses.
//!
//! - [`read`], [`write`], [`watch`]: the mirror's routes; [`notify`] feeds change streams and
//!   blocking queries; [`operator`]: `/healthz`, `/readyz`, `/v1/status`, `/metrics`;
//!   [`admin`]: the operator's pin (`/v1/admin/mode`); [`etcd_gateway`]: etcd's v3 JSON
//!   gateway over the same store, notifications and write path; [`consul`]: Consul's KV API, on
//!   a listener of its own ([`consul_service`]); [`grpc`]: etcd's gRPC API, on one of its own.
//! - [`query`] and [`path`] parse requests; [`respond`] writes the headers every mirror answer
//!   carries; [`counters`] counts requests and open subscribers.
//! - [`server`]: the sockets that serve it: the accept loop and drain, per-connection deadlines,
//!   and the wire screen of HTTP/1 request heads.

pub mod admin;
pub mod consul;
pub mod counters;
pub mod error;
pub mod etcd_gateway;
pub mod fast_path;
pub mod gate;
pub mod grpc;
pub mod notify;
pub mod operator;
pub mod path;
pub mod query;
pub mod read;
pub mod respond;
pub mod server;
pub mod state;
pub mod watch;
pub mod write;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request};
use axum::response::IntoResponse;
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use http::{HeaderName, Method, Uri};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;

pub use error::ApiError;
pub use fast_path::SidecarService;
pub use gate::Gate;
pub use state::{AppState, Report};

/// Longest request URI accepted (path and query); etcd keys are at most 1.5 MiB but no sensible
/// config key comes near this.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// The route of single keys, which the fast path answers too.
pub const KV_ROUTE: &str = "/v1/kv/{*key}";
/// Largest request body accepted: etcd's default request size limit.
pub const MAX_BODY_BYTES: usize = 1536 * 1024;
/// Most headers accepted on one request (hyper's parser and the wire screen both keep to it).
pub const MAX_HEADERS: usize = 100;
/// Largest request head accepted, in bytes: far below hyper's own buffer, far above any request
/// an application sends a sidecar.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

// Header names are constants built at compile time: naming a header by `&str` parses it again on
// every insert, which showed in the profile of the read path.
/// Header: the store revision a response was served from.
pub const REVISION_HEADER: HeaderName = HeaderName::from_static("x-config-revision");
/// Header: the mode the sidecar was in when it answered.
pub const MODE_HEADER: HeaderName = HeaderName::from_static("x-config-mode");
/// Where the data came from, on every mirror answer not served from etcd's: `snapshot` (the disk
/// snapshot after a restart) or `defaults` (the bundled defaults file).
pub const SOURCE_HEADER: HeaderName = HeaderName::from_static("x-config-source");
/// The mode the operator pinned, on every mirror answer while a pin is in force.
pub const PINNED_HEADER: HeaderName = HeaderName::from_static("x-config-pinned");
/// Header: the index to pass to the next blocking query (`?index=`).
pub const INDEX_HEADER: HeaderName = HeaderName::from_static("x-config-index");
/// Header: milliseconds since the mirror was last confirmed current.
pub const STALE_HEADER: HeaderName = HeaderName::from_static("x-config-stale-ms");

/// What each connection runs: `gate` first, then the fast path for plain key reads, then the
/// router.
pub fn service(state: Arc<AppState>, gate: Gate) -> SidecarService {
    SidecarService::new(state.clone(), router(state), gate)
}

/// What each connection of the Consul listener runs: `gate`, then Consul's KV routes over the
/// same state (no fast path: `/v1/kv/` means Consul's API there).
pub fn consul_service(state: Arc<AppState>, gate: Gate) -> SidecarService {
    let router = with_middleware(consul::routes(), state.clone());
    SidecarService::new(state, router, gate).without_fast_path()
}

/// The router alone (routes and middleware), for tests that drive it with `oneshot`.
pub fn app(state: AppState) -> Router {
    router(Arc::new(state))
}

/// Every route: path (axum syntax) and its handlers. `/v1/kv` and `/v1/tree` without a key are the
/// keyed routes with an empty key (answered with the same JSON errors), not routes of their own.
fn routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("/v1/kv", get(read::kv_get)),
        ("/v1/kv/", get(read::kv_get)),
        (
            KV_ROUTE,
            get(read::kv_get)
                .put(write::kv_put)
                .delete(write::kv_delete),
        ),
        ("/v1/tree", get(read::tree_get)),
        ("/v1/tree/", get(read::tree_get)),
        ("/v1/tree/{*prefix}", get(read::tree_get)),
        ("/v1/watch", get(watch::watch)),
        ("/v1/watch/", get(watch::watch)),
        ("/v1/watch/{*prefix}", get(watch::watch)),
        ("/v1/status", get(operator::status)),
        ("/healthz", get(operator::healthz)),
        ("/readyz", get(operator::readyz)),
        ("/metrics", get(operator::metrics)),
        (
            "/v1/admin/mode",
            get(admin::mode_get).post(admin::mode_post),
        ),
        ("/version", get(etcd_gateway::version)),
        ("/v3/kv/range", post(etcd_gateway::range::range)),
        ("/v3/watch", post(etcd_gateway::watch::watch)),
        ("/v3/kv/put", post(etcd_gateway::write::put)),
        (
            "/v3/kv/deleterange",
            post(etcd_gateway::write::delete_range),
        ),
        ("/v3/kv/txn", post(etcd_gateway::write::txn)),
    ]
}

/// The paths the router serves, in axum syntax; `tests/docs.rs` checks them against
/// `docs/openapi.yaml`.
pub fn route_paths() -> Vec<&'static str> {
    routes().into_iter().map(|(path, _)| path).collect()
}

/// Routes and middleware over the shared state.
fn router(state: Arc<AppState>) -> Router {
    with_middleware(routes(), state)
}

/// `routes` with the middleware every listener runs, over `state`.
fn with_middleware(
    routes: Vec<(&'static str, MethodRouter<Arc<AppState>>)>,
    state: Arc<AppState>,
) -> Router {
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
    for (path, methods) in routes {
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
pub(crate) fn check_uri_length(uri: &Uri) -> Result<(), ApiError> {
    let len = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if len > MAX_URI_BYTES {
        return Err(ApiError::UriTooLong(MAX_URI_BYTES));
    }
    Ok(())
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::body::{to_bytes, Body};
    use bytes::Bytes;
    use http::{header, HeaderMap, StatusCode};
    use tower::ServiceExt;

    use crate::config::Config;
    use crate::http::counters::RequestMetrics;
    use crate::mirror::snapshot::Entry;
    use crate::mirror::store::Store;
    use crate::mode::handle::ModeHandle;
    use crate::mode::machine::Transition;
    use crate::mode::Mode;

    /// The app over a store filled directly: this tests the HTTP layer only (sync is tested
    /// against real etcd in tests/).
    fn app_with(entries: &[(&str, &str)], loaded: bool) -> Router {
        app(state_with(entries, loaded))
    }

    fn state_with(entries: &[(&str, &str)], loaded: bool) -> AppState {
        let config = Config::for_endpoints(&["http://127.0.0.1:1".into()], &["/c/"]).unwrap();
        let store = Arc::new(Store::new());
        let mode = Arc::new(ModeHandle::default());
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
            mode.publish(&Transition {
                from: Mode::Starting,
                to: Mode::Full,
                reason: "test".into(),
                at_unix_ms: 0,
            });
        }
        crate::ops::run::standalone_state(&config, store, mode)
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
            let fast = crate::http::fast_path::plain_read(&state, &request(Method::GET, uri, tag))
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
                crate::http::fast_path::plain_read(&state, &request(method.clone(), uri, None))
                    .is_none(),
                "{method} {uri} is left to the router"
            );
        }
        let not_loaded = state_with(&[("/c/a", "hello")], false);
        assert!(
            crate::http::fast_path::plain_read(
                &not_loaded,
                &request(Method::GET, "/v1/kv/c/a", None)
            )
            .is_none(),
            "before the first load the router answers not_ready"
        );
    }
}
