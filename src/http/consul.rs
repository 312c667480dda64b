//! Consul's KV API over the mirror, on a listener of its own (`--consul-listen`), for clients that
//! speak it (py-consul, Spring Cloud Consul Config, consul-template, envconsul). The Consul key
//! `a/b` is the etcd key `/a/b`. Reads are answered from the mirror with Consul's JSON
//! (`Key`, base64 `Value`, `CreateIndex`, `ModifyIndex`, `LockIndex`, `Flags`), `?raw`,
//! `?recurse`, `?keys` with `?separator`, blocking queries (`?index=&wait=`) fed by the store's
//! changes, `?consistent` by the sidecar's quorum check, and Consul's headers: `X-Consul-Index`
//! (the mirror's revision), `X-Consul-KnownLeader` (the mode is `full`) and
//! `X-Consul-LastContact` (milliseconds since the mirror was last confirmed). `PUT` and `DELETE`
//! (with `?cas`, `?recurse`) go through the sidecar's write path under `--allow-writes`.
//!
//! A thin adapter: the store, the notifier and the write path are the sidecar's own.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use serde_json::{json, Value};

use crate::http::error::ApiError;
use crate::http::query::{parse_query, query_pairs, Query};
use crate::http::read::{key_from_path, mirrored, readable_snapshot};
use crate::http::state::AppState;
use crate::http::write::{admit_caller, admit_mode, mirrored_by, read_body, write_failed};
use crate::http::MAX_BODY_BYTES;
use crate::mirror::snapshot::{Entry, Snapshot};
use crate::mode::Mode;
use crate::upstream::write::{self, WriteError, WriteOp};

/// The routes of the Consul listener.
pub fn routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    let kv = || get(kv_get).put(kv_put).delete(kv_delete);
    vec![("/v1/kv", kv()), ("/v1/kv/", kv()), ("/v1/kv/{*key}", kv())]
}

/// Consul's own query parameters, beside those [`parse_query`] reads.
#[derive(Debug, Default)]
struct ConsulQuery {
    /// `?raw`: the value alone.
    raw: bool,
    /// `?keys`: the key names under the prefix.
    keys: bool,
    /// `?separator=`: with `?keys`, names up to the first separator after the prefix.
    separator: Option<String>,
    /// `?flags=`: Consul's opaque number per key, which etcd has no place for.
    flags: Option<u64>,
    /// `?acquire=` / `?release=`: sessions, which the sidecar does not serve.
    session: bool,
}

fn consul_query(uri: &Uri) -> Result<ConsulQuery, Refusal> {
    let mut q = ConsulQuery::default();
    for (name, value) in query_pairs(uri) {
        match name {
            "raw" => q.raw = true,
            "keys" => q.keys = true,
            "separator" => {
                let decoded = crate::http::path::decode_query_value(value)
                    .map_err(|e| Refusal::bad(format!("separator: {e}")))?;
                q.separator = Some(decoded).filter(|s| !s.is_empty());
            }
            "flags" => {
                q.flags = Some(
                    value
                        .parse()
                        .map_err(|_| Refusal::bad(format!("flags={value:?} is not a number")))?,
                )
            }
            "acquire" | "release" => q.session = true,
            _ => {}
        }
    }
    Ok(q)
}

/// A refusal as Consul gives one: a status and a line of text.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn bad(message: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.status, format!("{}\n", self.message)).into_response()
    }
}

/// A sidecar error as a Consul refusal: its status, its message as the text. A key outside the
/// mirror is 403, Consul's answer to a key one may not read.
fn refused(error: ApiError) -> Refusal {
    let message = error.to_string();
    let status = match error.into_response().status() {
        StatusCode::NOT_FOUND => StatusCode::FORBIDDEN,
        other => other,
    };
    Refusal { status, message }
}

async fn kv_get(State(state): State<Arc<AppState>>, request: Request) -> Result<Response, Refusal> {
    let uri = request.uri();
    let mut query = parse_query(uri).map_err(refused)?;
    let consul = consul_query(uri)?;
    // `?keys` lists a prefix, as `?recurse` does.
    let prefix = query.recurse || consul.keys;
    query.recurse = prefix;
    let key = key_from_path(uri, "/v1/kv").map_err(refused)?;
    let key = if prefix && key.is_empty() {
        "/".into()
    } else {
        key
    };
    let key = mirrored(&state, key, prefix).map_err(refused)?.into_owned();
    let snapshot = readable_snapshot(&state, &query, &key)
        .await
        .map_err(refused)?;
    let entries: Vec<&Arc<Entry>> = if prefix {
        snapshot.scan_prefix(key.as_bytes()).collect()
    } else {
        snapshot.get(key.as_bytes()).into_iter().collect()
    };
    let headers = consul_headers(&state, &snapshot);
    if entries.is_empty() {
        return Ok((StatusCode::NOT_FOUND, headers, "").into_response());
    }
    if consul.keys {
        let mut names: Vec<String> = Vec::new();
        for entry in &entries {
            let name = consul_key(&entry.key);
            let name = match &consul.separator {
                Some(sep) => {
                    let start = key.len() - 1;
                    match name[start.min(name.len())..].find(sep.as_str()) {
                        Some(at) => name[..start + at + sep.len()].to_string(),
                        None => name,
                    }
                }
                None => name,
            };
            if names.last() != Some(&name) {
                names.push(name);
            }
        }
        return Ok((headers, axum::Json(json!(names))).into_response());
    }
    if consul.raw && !prefix {
        let entry = entries[0];
        return Ok((headers, Bytes::copy_from_slice(entry.value())).into_response());
    }
    let body: Vec<Value> = entries.iter().map(|e| entry_json(e)).collect();
    Ok((headers, axum::Json(Value::Array(body))).into_response())
}

/// An etcd key as Consul names it: without the leading `/`.
fn consul_key(key: &[u8]) -> String {
    let key = String::from_utf8_lossy(key);
    key.strip_prefix('/').unwrap_or(&key).to_string()
}

/// An entry in Consul's shape.
fn entry_json(entry: &Entry) -> Value {
    json!({
        "LockIndex": 0,
        "Key": consul_key(&entry.key),
        "Flags": 0,
        "Value": if entry.value().is_empty() {
            Value::Null
        } else {
            base64::engine::general_purpose::STANDARD.encode(entry.value()).into()
        },
        "CreateIndex": entry.create_revision,
        "ModifyIndex": entry.mod_revision,
    })
}

/// Consul's headers from the mirror's facts.
fn consul_headers(state: &AppState, snapshot: &Snapshot) -> HeaderMap {
    let mut headers = HeaderMap::new();
    // Consul's index is never 0: clients treat 0 as "no index".
    headers.insert(
        HeaderName::from_static("x-consul-index"),
        HeaderValue::from(snapshot.revision.max(1)),
    );
    let known_leader = if state.mode.mode() == Mode::Full {
        "true"
    } else {
        "false"
    };
    headers.insert(
        HeaderName::from_static("x-consul-knownleader"),
        HeaderValue::from_static(known_leader),
    );
    let stale = state.mode.staleness(SystemTime::now());
    headers.insert(
        HeaderName::from_static("x-consul-lastcontact"),
        HeaderValue::from(stale.map_or(0, |s| s.as_millis() as u64)),
    );
    headers.insert(crate::http::MODE_HEADER, state.mode.mode().header());
    headers
}

/// The token of a Consul write: `X-Consul-Token`, or `Authorization: Bearer` as for every write.
fn with_consul_token(headers: &HeaderMap) -> HeaderMap {
    let mut headers = headers.clone();
    if let Some(token) = headers.get("x-consul-token").cloned() {
        if let Ok(bearer) =
            HeaderValue::from_str(&format!("Bearer {}", token.to_str().unwrap_or("")))
        {
            headers.insert(http::header::AUTHORIZATION, bearer);
        }
    }
    headers
}

/// A write's checks: writes on, the token, no Consul feature the sidecar cannot keep, the key
/// mirrored, the mode.
fn admit_consul_write(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(String, Query), Refusal> {
    admit_caller(state, &with_consul_token(headers)).map_err(refused)?;
    let query = parse_query(uri).map_err(refused)?;
    let consul = consul_query(uri)?;
    if consul.flags.is_some_and(|f| f != 0) {
        return Err(Refusal::bad(
            "flags are not stored: etcd has no place for them",
        ));
    }
    if consul.session {
        return Err(Refusal::bad(
            "sessions (acquire, release) are not served by the sidecar",
        ));
    }
    let key = key_from_path(uri, "/v1/kv").map_err(refused)?;
    let key = mirrored(state, key, query.recurse)
        .map_err(refused)?
        .into_owned();
    admit_mode(state).map_err(refused)?;
    Ok((key, query))
}

/// `true` or `false`, as Consul answers a write; a compare that failed is `false`, not an error.
async fn consul_write(
    state: &AppState,
    op: WriteOp,
    cas: Option<i64>,
) -> Result<Response, Refusal> {
    match write::apply(&state.pool, op, cas, state.etcd_timeout()).await {
        Ok(result) => {
            mirrored_by(state, result.revision).await;
            Ok(axum::Json(true).into_response())
        }
        Err(WriteError::PreconditionFailed { .. }) => Ok(axum::Json(false).into_response()),
        Err(e) => Err(refused(write_failed(e))),
    }
}

async fn kv_put(State(state): State<Arc<AppState>>, request: Request) -> Result<Response, Refusal> {
    let (parts, body) = request.into_parts();
    let (key, query) = admit_consul_write(&state, &parts.uri, &parts.headers)?;
    if query.recurse || key.ends_with('/') && key.len() <= 1 {
        return Err(Refusal::bad("a PUT names one key"));
    }
    let value = read_body(&state, body, MAX_BODY_BYTES)
        .await
        .map_err(refused)?;
    consul_write(
        &state,
        WriteOp::Put {
            key,
            value: value.to_vec(),
        },
        query.cas,
    )
    .await
}

async fn kv_delete(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, Refusal> {
    let (key, query) = admit_consul_write(&state, request.uri(), request.headers())?;
    // Consul: a delete with cas=0 does nothing.
    if query.cas == Some(0) {
        return Ok(axum::Json(false).into_response());
    }
    if query.recurse && query.cas.is_some() {
        return Err(Refusal::bad("cas applies to one key, not with recurse"));
    }
    consul_write(
        &state,
        WriteOp::Delete {
            key,
            prefix: query.recurse,
        },
        query.cas,
    )
    .await
}
