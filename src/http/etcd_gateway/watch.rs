//! `POST /v3/watch` from the store's change sets: newline-delimited JSON as etcd's gateway
//! streams it. The first message of the request body is a `create_request` (key, range_end,
//! start_revision, filters, progress_notify); later ones may be a `cancel_request` or a
//! `progress_request`. The answer opens with `created`, replays the history from
//! `start_revision` (or says `canceled` with `compact_revision` when the history no longer
//! reaches back that far: the client reads again and watches from there), then streams one
//! message per revision that touches the range, and a progress message (a header alone) every
//! [`HEARTBEAT`] so an idle stream is seen to be alive. A subscriber that falls behind, or a
//! mirror replaced by another cluster's data, ends the watch with `canceled` and a reason.

use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::body::{Body, BodyDataStream};
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use http::header;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use super::{b64, code, header as response_header, int64, kv_json, GatewayError, KeyRange};
use crate::http::counters::{QueuedMessage, SubscriberKind};
use crate::http::notify::HEARTBEAT;
use crate::http::respond::with_mirror_headers;
use crate::http::state::AppState;
use crate::http::MAX_BODY_BYTES;
use crate::mirror::history::{ChangeSet, Follow};
use crate::mirror::snapshot::Change;

/// Messages a watch queues for its connection beyond the one being written: each is one
/// revision's events, made when the connection has room, so a slow client holds back at most
/// one set's worth of formatted events (the sets themselves are the history's).
const WATCH_QUEUE_MESSAGES: usize = 1;

/// etcd's `WatchCreateRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CreateRequest {
    key: String,
    range_end: String,
    #[serde(deserialize_with = "int64")]
    start_revision: i64,
    /// Taken, and always so: a progress message goes out every [`HEARTBEAT`] anyway.
    #[allow(dead_code)]
    progress_notify: bool,
    filters: Vec<Value>,
    prev_kv: bool,
    #[serde(deserialize_with = "int64")]
    watch_id: i64,
    /// Taken: a revision's events are never split here (they are one message of any size).
    #[allow(dead_code)]
    fragment: bool,
}

/// One watch, as created.
struct Watch {
    range: KeyRange,
    /// Leave out puts (`NOPUT`).
    no_put: bool,
    /// Leave out deletions (`NODELETE`).
    no_delete: bool,
    /// Events before this revision are not sent (the start asked for is ahead of the mirror).
    start: i64,
    /// The client's id for it (0 unless given).
    id: i64,
}

pub(crate) async fn watch(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, GatewayError> {
    let mut body = request.into_body().into_data_stream();
    let mut pending = Vec::new();
    let within = state.live.get(|c| c.http.body_read_timeout);
    let first = tokio::time::timeout(within, next_message(&mut body, &mut pending))
        .await
        .map_err(|_| GatewayError::invalid("no watch request within the body read timeout"))??
        .ok_or_else(|| GatewayError::invalid("the body holds no watch request"))?;
    let create = first
        .get("create_request")
        .ok_or_else(|| GatewayError::invalid("the first message must be a create_request"))?;
    let create: CreateRequest = serde_json::from_value(create.clone())
        .map_err(|e| GatewayError::invalid(format!("create_request: {e}")))?;
    if create.prev_kv {
        return Err(GatewayError::new(
            code::UNIMPLEMENTED,
            "prev_kv is not served: the mirror keeps only current values",
        ));
    }
    let range = KeyRange::decode(&create.key, &create.range_end)?;
    range.check_mirrored(&state)?;
    let mut no_put = false;
    let mut no_delete = false;
    for filter in &create.filters {
        match filter {
            Value::Number(n) if n.as_i64() == Some(0) => no_put = true,
            Value::String(s) if s == "NOPUT" => no_put = true,
            Value::Number(n) if n.as_i64() == Some(1) => no_delete = true,
            Value::String(s) if s == "NODELETE" => no_delete = true,
            other => {
                return Err(GatewayError::invalid(format!(
                    "filters: {other} is not NOPUT or NODELETE"
                )))
            }
        }
    }
    let snapshot = state.store.snapshot();
    if !snapshot.loaded {
        return Err(GatewayError::new(
            code::UNAVAILABLE,
            "the mirror has no data yet",
        ));
    }
    let subscriber = state.subscribers.enter(SubscriberKind::Stream)?;
    // From the revision before the start asked for; no start (0) is "from now".
    let since = match create.start_revision {
        n if n > 0 => (n - 1).min(snapshot.revision),
        _ => snapshot.revision,
    };
    let mut follow = state.store.follow(since);
    // The sets after `since` are read from the history one at a time as the client takes them,
    // so a watch holds no backlog of its own.
    follow.live = follow.live.replaying_from(since);
    let watch = Watch {
        range,
        no_put,
        no_delete,
        start: create.start_revision,
        id: create.watch_id,
    };
    let (tx, rx) = mpsc::channel::<QueuedMessage>(WATCH_QUEUE_MESSAGES);
    let queued = state.subscribers.stream_queue();
    let task_state = state.clone();
    tokio::spawn(async move {
        let _subscriber = subscriber;
        run(task_state, watch, follow, body, pending, tx, queued).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|m| (Ok::<_, Infallible>(m.take()), rx))
    });
    let response = Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("a valid response");
    Ok(with_mirror_headers(response, &state, &snapshot))
}

/// Why a watch ends with `canceled`.
struct Canceled {
    reason: String,
    compact_revision: i64,
}

/// Feeds one watch until the client goes, cancels it, or the sidecar shuts down.
async fn run(
    state: Arc<AppState>,
    watch: Watch,
    follow: Follow,
    mut body: BodyDataStream,
    mut pending: Vec<u8>,
    tx: mpsc::Sender<QueuedMessage>,
    queued: Arc<AtomicU64>,
) {
    let Follow {
        snapshot,
        backlog,
        mut live,
    } = follow;
    let cluster = snapshot.cluster_id;
    let send = |result: Map<String, Value>| {
        let (tx, queued) = (tx.clone(), queued.clone());
        async move {
            let mut line = json!({ "result": Value::Object(result) }).to_string();
            line.push('\n');
            tx.send(QueuedMessage::new(Bytes::from(line), &queued))
                .await
                .is_ok()
        }
    };
    let mut created = watch.result(cluster, snapshot.revision);
    created.insert("created".into(), json!(true));
    if !send(created).await {
        return;
    }
    if backlog.is_none() {
        // The first revision a new watch can start from: read, then watch from there.
        let canceled = Canceled {
            reason: "mvcc: required revision has been compacted (the sidecar's history of \
                     changes no longer reaches back to start_revision)"
                .into(),
            compact_revision: state.store.history_floor() + 1,
        };
        send(watch.canceled(cluster, snapshot.revision, canceled)).await;
        return;
    }
    drop(backlog);
    // What progress reports: everything up to it has been sent.
    let mut last = live.received_up_to();
    let mut closing = state.closing.clone();
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    let mut body_open = true;
    loop {
        // A progress answer or heartbeat reports `last`: everything up to it was sent, even in
        // the middle of a replay.
        let outcome = tokio::select! {
            _ = closing.wait_for(|c| *c) => return,
            received = live.recv() => match received {
                Ok(set) if set.reset => Err(Canceled {
                    reason: "the mirror was replaced by another etcd cluster's data".into(),
                    compact_revision: 0,
                }),
                Ok(set) => {
                    last = last.max(set.revision);
                    match watch.events(&set, cluster) {
                        Some(events) => Ok(Some(events)),
                        None => Ok(None),
                    }
                }
                // Behind further than the history reaches.
                Err(RecvError::Lagged(_)) => Err(Canceled {
                    reason: "the watcher fell behind further than the sidecar's history reaches"
                        .into(),
                    compact_revision: state.store.history_floor() + 1,
                }),
                Err(RecvError::Closed) => Err(Canceled {
                    reason: "the mirror stopped".into(),
                    compact_revision: 0,
                }),
            },
            chunk = body.next(), if body_open => match chunk {
                Some(Ok(bytes)) if pending.len() + bytes.len() <= MAX_BODY_BYTES => {
                    pending.extend_from_slice(&bytes);
                    match take_messages(&mut pending) {
                        Ok(messages) => control(&watch, cluster, last, messages),
                        Err(e) => Err(Canceled { reason: e, compact_revision: 0 }),
                    }
                }
                Some(Ok(_)) => Err(Canceled { reason: "request too large".into(), compact_revision: 0 }),
                // The client sent all it will send (or went): events keep flowing until it goes.
                Some(Err(_)) | None => {
                    body_open = false;
                    Ok(None)
                }
            },
            _ = heartbeat.tick() => Ok(Some(watch.result(cluster, last))),
        };
        match outcome {
            Ok(Some(result)) => {
                if !send(result).await {
                    return;
                }
            }
            Ok(None) => {}
            Err(canceled) => {
                send(watch.canceled(cluster, last, canceled)).await;
                return;
            }
        }
    }
}

/// What the client's later messages ask: a progress report now, or the end of the watch.
fn control(
    watch: &Watch,
    cluster: u64,
    last: i64,
    messages: Vec<Value>,
) -> Result<Option<Map<String, Value>>, Canceled> {
    let mut answer = None;
    for message in messages {
        if message.get("cancel_request").is_some() {
            return Err(Canceled {
                reason: "canceled by the client".into(),
                compact_revision: 0,
            });
        }
        if message.get("progress_request").is_some() {
            answer = Some(watch.result(cluster, last));
        } else {
            return Err(Canceled {
                reason: format!("{message} is not a cancel_request or progress_request"),
                compact_revision: 0,
            });
        }
    }
    Ok(answer)
}

impl Watch {
    /// A result with the header at `revision` and the watch's id.
    fn result(&self, cluster: u64, revision: i64) -> Map<String, Value> {
        let mut result = Map::new();
        result.insert("header".into(), response_header(cluster, revision));
        if self.id != 0 {
            result.insert("watch_id".into(), self.id.to_string().into());
        }
        result
    }

    /// The result ending the watch.
    fn canceled(&self, cluster: u64, revision: i64, why: Canceled) -> Map<String, Value> {
        let mut result = self.result(cluster, revision);
        result.insert("canceled".into(), json!(true));
        if why.compact_revision != 0 {
            result.insert(
                "compact_revision".into(),
                why.compact_revision.to_string().into(),
            );
        }
        result.insert("cancel_reason".into(), why.reason.into());
        result
    }

    /// The events of `set` in the range, or `None` when it has none for this watch.
    fn events(&self, set: &ChangeSet, cluster: u64) -> Option<Map<String, Value>> {
        if set.revision < self.start {
            return None;
        }
        let events: Vec<Value> = set
            .changes
            .iter()
            .filter(|c| self.range.contains(c.key()))
            .filter_map(|c| match c {
                Change::Put(entry) if !self.no_put => Some(json!({ "kv": kv_json(entry, false) })),
                Change::Delete { key, revision } if !self.no_delete => Some(json!({
                    "type": "DELETE",
                    "kv": { "key": b64(key), "mod_revision": revision.to_string() },
                })),
                _ => None,
            })
            .collect();
        if events.is_empty() {
            return None;
        }
        let mut result = self.result(cluster, set.revision);
        result.insert("events".into(), Value::Array(events));
        Some(result)
    }
}

/// The next whole JSON message of the body, reading more as needed; `None` when the body ends
/// first.
async fn next_message(
    body: &mut BodyDataStream,
    pending: &mut Vec<u8>,
) -> Result<Option<Value>, GatewayError> {
    loop {
        let mut messages = take_messages_limited(pending, 1).map_err(GatewayError::invalid)?;
        if let Some(message) = messages.pop() {
            return Ok(Some(message));
        }
        match body.next().await {
            Some(Ok(bytes)) if pending.len() + bytes.len() <= MAX_BODY_BYTES => {
                pending.extend_from_slice(&bytes)
            }
            Some(Ok(_)) => return Err(GatewayError::invalid("request too large")),
            Some(Err(e)) => return Err(GatewayError::invalid(e.to_string())),
            None => return Ok(None),
        }
    }
}

/// Every whole JSON message at the start of `pending`, removed from it; a partial one stays.
fn take_messages(pending: &mut Vec<u8>) -> Result<Vec<Value>, String> {
    take_messages_limited(pending, usize::MAX)
}

/// At most `most` whole JSON messages from the start of `pending`, removed from it.
fn take_messages_limited(pending: &mut Vec<u8>, most: usize) -> Result<Vec<Value>, String> {
    let mut stream = serde_json::Deserializer::from_slice(pending).into_iter::<Value>();
    let mut messages = Vec::new();
    let mut used = 0;
    while messages.len() < most {
        match stream.next() {
            Some(Ok(value)) => {
                messages.push(value);
                used = stream.byte_offset();
            }
            Some(Err(e)) if e.is_eof() => break,
            Some(Err(e)) => return Err(format!("a watch message is not JSON: {e}")),
            None => break,
        }
    }
    pending.drain(..used);
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_split_as_they_arrive() {
        let mut pending = br#"{"a":1} {"b":"#.to_vec();
        let messages = take_messages(&mut pending).unwrap();
        assert_eq!(messages, vec![json!({"a":1})]);
        pending.extend_from_slice(b"2}\n");
        assert_eq!(take_messages(&mut pending).unwrap(), vec![json!({"b":2})]);
        assert!(pending.iter().all(u8::is_ascii_whitespace));
        let mut bad = b"{x".to_vec();
        assert!(take_messages(&mut bad).is_err());
    }
}
