//! Reads: one key, a prefix listing, a tree. Each is answered from one snapshot; a blocking query
//! (`?index=`) first waits for a change, `?max_stale` refuses a mirror staler than asked, and
//! `?consistent` first learns from one quorum read what "current" is.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use etcd_client::GetOptions;
use http::{HeaderMap, HeaderValue, Uri};

use crate::http::check_uri_length;
use crate::http::counters::SubscriberKind;
use crate::http::error::ApiError;
use crate::http::notify::{wait_for_change, Scope, DEFAULT_WAIT};
use crate::http::path::decode_key_path;
use crate::http::query::{parse_query, Query};
use crate::http::respond::{
    etag_matches, into_axum, key_response, not_modified_or, with_mirror_headers,
};
use crate::http::state::AppState;
use crate::mirror::render::View;
use crate::mirror::snapshot::Snapshot;
use crate::upstream::Retry;

/// The key named by the path after `route` (`/v1/kv` or `/v1/tree`), decoded once.
pub(crate) fn key_from_path<'u>(uri: &'u Uri, route: &str) -> Result<Cow<'u, str>, ApiError> {
    check_uri_length(uri)?;
    let raw = uri.path().strip_prefix(route).unwrap_or("");
    Ok(decode_key_path(raw)?)
}

/// The key a request names, or for a prefix request (`?recurse`, a watch) the prefix, once the
/// mirror is known to hold everything it covers. A prefix request that names a mirrored prefix
/// without its trailing slash means that directory, as `/v1/tree` does; any other prefix the
/// mirror does not wholly hold is refused rather than answered in part.
pub(crate) fn mirrored<'k>(
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
pub(crate) async fn readable_snapshot(
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
    let mut options = GetOptions::new().with_keys_only();
    if prefix {
        options = options.with_prefix();
    }
    let response = state
        .pool
        .request(Retry::Read, state.etcd_timeout(), |mut client| {
            let options = options.clone();
            async move { client.get(key, Some(options)).await }
        })
        .await
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

pub(crate) async fn kv_get(
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
    Ok(listing(&state, headers, View::List, &key, snapshot))
}

/// A rendered listing or tree from the cache, or 304 when the client holds the snapshot's. The
/// body may be of a newer snapshot than the one given; the headers are that body's.
fn listing(
    state: &AppState,
    headers: &HeaderMap,
    view: View,
    prefix: &str,
    snapshot: Arc<Snapshot>,
) -> Response {
    // A listing changes whenever anything in the mirror changes, so its tag is the revision.
    let (snapshot, body) = if etag_matches(headers, &list_etag(&snapshot)) {
        (snapshot, Bytes::new()) // not sent: the answer is 304
    } else {
        state.cache.get(view, prefix, snapshot)
    };
    let response = not_modified_or(headers, list_etag(&snapshot), json_type(), || body);
    into_axum(with_mirror_headers(response, state, &snapshot))
}

pub(crate) async fn tree_get(
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
    Ok(listing(&state, headers, View::Tree, &dir, snapshot))
}

pub(crate) fn list_etag(snapshot: &Snapshot) -> HeaderValue {
    HeaderValue::try_from(format!("W/\"{}\"", snapshot.revision))
        .expect("a quoted integer is a valid header value")
}

pub(crate) fn json_type() -> HeaderValue {
    HeaderValue::from_static("application/json")
}
