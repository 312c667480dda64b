//! `GET /v1/watch/{prefix}`: the change stream of a prefix as server-sent events.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http::HeaderName;

use crate::http::counters::SubscriberKind;
use crate::http::error::ApiError;
use crate::http::notify::{event_stream, Scope, HEARTBEAT};
use crate::http::query::{header_revision, parse_query};
use crate::http::read::{key_from_path, mirrored};
use crate::http::respond::with_mirror_headers;
use crate::http::state::AppState;

/// `GET /v1/watch/{prefix}`: a server-sent event stream of the changes under a prefix.
pub(crate) async fn watch(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (uri, headers) = (request.uri(), request.headers());
    let query = parse_query(uri)?;
    let prefix = mirrored(&state, key_from_path(uri, "/v1/watch")?, true)?;
    let snapshot = state.store.snapshot();
    if !snapshot.loaded {
        return Err(ApiError::NotReady);
    }
    let last_event_id = header_revision(
        headers,
        HeaderName::from_static("last-event-id"),
        "Last-Event-ID",
    )?;
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
        state.subscribers.stream_queue(),
    )
    // The guard lives as long as the stream: the gauge drops when the client goes.
    .map(move |event| {
        let _ = &subscriber;
        event
    });
    let sse = Sse::new(stream).keep_alive(KeepAlive::new().interval(HEARTBEAT).text("keep-alive"));
    Ok(with_mirror_headers(sse.into_response(), &state, &snapshot))
}
