//! What every mirror response says (revision, mode, staleness), conditional answers (`ETag`,
//! `If-None-Match` → `304`), and the answer to a read of one key, which the router's handler and
//! the fast path share.

use std::cell::RefCell;
use std::time::SystemTime;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};

use crate::http::state::AppState;
use crate::http::{
    INDEX_HEADER, MODE_HEADER, PINNED_HEADER, REVISION_HEADER, SOURCE_HEADER, STALE_HEADER,
};
use crate::mirror::snapshot::{Entry, Snapshot, Source};

/// Whether `If-None-Match` names `etag` (or `*`).
pub(crate) fn etag_matches(headers: &HeaderMap, etag: &HeaderValue) -> bool {
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
    if let Some(pinned) = state.mode.pinned() {
        headers.insert(PINNED_HEADER, pinned.header());
    }
    if snapshot.source != Source::Etcd {
        headers.insert(
            SOURCE_HEADER,
            HeaderValue::from_static(snapshot.source.as_str()),
        );
    }
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
pub(crate) fn not_modified_or(
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
/// router's handler and the fast path in [`crate::http::fast_path`] both answer with it.
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
pub(crate) fn into_axum(response: http::Response<Option<Bytes>>) -> Response {
    response.map(|body| body.map_or_else(Body::empty, Body::from))
}
