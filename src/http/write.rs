//! Writes through the sidecar (`--allow-writes`): admitted only with the token, inside the mirror
//! and in `full` mode; forwarded to etcd as one transaction; answered once the mirror has applied
//! them, so a read after the write sees it.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{header, HeaderMap, Uri};
use serde_json::json;

use crate::config::Secret;
use crate::http::error::ApiError;
use crate::http::query::{header_revision, parse_query, Query};
use crate::http::read::{key_from_path, mirrored};
use crate::http::respond::with_mirror_headers;
use crate::http::state::AppState;
use crate::http::MAX_BODY_BYTES;
use crate::mode::Mode;
use crate::upstream::write::{self, WriteError, WriteOp};

/// Compares two byte strings in time that depends only on their lengths, so a wrong token
/// reveals nothing about the right one through timing (`subtle` keeps the optimiser from
/// turning the comparison back into an early exit).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

/// Whether the request presents `token` as its `Authorization: Bearer` credential.
pub(crate) fn bearer_matches(headers: &HeaderMap, token: &Secret) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(presented.as_bytes(), token.expose().as_bytes())
}

/// A request body of at most `limit` bytes, read within the body read timeout.
pub(crate) async fn read_body(
    state: &AppState,
    body: axum::body::Body,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    let within = state.live.get(|c| c.http.body_read_timeout);
    tokio::time::timeout(within, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::BodyTimeout(within.as_millis() as u64))?
        .map_err(|e| {
            let e = e.into_inner();
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::PayloadTooLarge
            } else {
                ApiError::BadBody(e.to_string())
            }
        })
}

/// Checks that writes are on, the token (if any) is right and the mode allows writes: what
/// every write route asks first, the etcd gateway's too.
pub(crate) fn admit(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    admit_caller(state, headers)?;
    admit_mode(state)
}

/// Writes are on and the token (if any) is right.
pub(crate) fn admit_caller(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if !state.writes.allowed {
        return Err(ApiError::WritesDisabled);
    }
    if let Some(token) = &state.writes.token {
        if !bearer_matches(headers, token) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(())
}

/// The mode allows writes.
pub(crate) fn admit_mode(state: &AppState) -> Result<(), ApiError> {
    let mode = state.mode.mode();
    if mode != Mode::Full {
        return Err(ApiError::WritesRefused {
            mode,
            retry_after: state.retry_after(),
            pin: state.mode.pin(),
        });
    }
    Ok(())
}

/// The caller and the key (which must be mirrored) checked, then the mode; returns the key and
/// the compare-and-swap revision, if asked for.
fn admit_write(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(String, Query, Option<i64>), ApiError> {
    admit_caller(state, headers)?;
    let query = parse_query(uri)?;
    let key = mirrored(state, key_from_path(uri, "/v1/kv")?, query.recurse)?;
    let if_match = header_revision(headers, header::IF_MATCH, "If-Match")?;
    let cas = if_match.or(query.cas);
    admit_mode(state)?;
    Ok((key.into_owned(), query, cas))
}

/// Waits (up to the etcd timeout) until the mirror has applied `revision`; whether it did.
pub(crate) async fn mirrored_by(state: &AppState, revision: i64) -> bool {
    let mut revisions = state.store.subscribe();
    tokio::time::timeout(state.etcd_timeout(), revisions.wait_for(|r| *r >= revision))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Forwards a write, then waits until the mirror has applied it, so that a read from this sidecar
/// that starts after the write returned sees it.
async fn forward_write(
    state: &AppState,
    op: WriteOp,
    cas: Option<i64>,
) -> Result<Response, ApiError> {
    let result = write::apply(&state.pool, op, cas, state.etcd_timeout())
        .await
        .map_err(write_failed)?;
    let visible = mirrored_by(state, result.revision).await;
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

/// The answer to a write etcd did not complete.
pub(crate) fn write_failed(error: WriteError) -> ApiError {
    match error {
        WriteError::PreconditionFailed {
            key,
            expected,
            current,
        } => ApiError::PreconditionFailed {
            key,
            expected,
            current,
        },
        WriteError::NotApplied(message) => ApiError::WriteFailed {
            outcome: "not_applied",
            message,
        },
        WriteError::Unknown(message) => ApiError::WriteFailed {
            outcome: "unknown",
            message,
        },
    }
}

pub(crate) async fn kv_put(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let (key, _, cas) = admit_write(&state, &parts.uri, &parts.headers)?;
    let value = read_body(&state, body, MAX_BODY_BYTES).await?;
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

pub(crate) async fn kv_delete(
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
}
