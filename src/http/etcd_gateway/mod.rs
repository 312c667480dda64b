//! etcd's v3 JSON gateway, served from the mirror, for clients that already speak it (Python
//! `etcd3gw`, `lua-resty-etcd`, curl): `GET /version`, `POST /v3/kv/range` ([`range`]),
//! `POST /v3/watch` ([`watch`]), and `POST /v3/kv/put`, `/v3/kv/deleterange`, `/v3/kv/txn`
//! forwarded to etcd under `--allow-writes` ([`write`]). A range outside the mirrored prefixes is
//! passed on to etcd and answered with etcd's response; the other routes serve the mirror only;
//! the JSON is the gateway's (base64 keys and values, 64-bit integers as strings, zero values
//! left out, errors as `{"error", "message", "code"}` with gRPC's code).
//!
//! A thin adapter: the data is the store's, change events the store's change sets, writes the
//! sidecar's write path; nothing here keeps a copy or opens a watch of its own.

pub mod range;
pub mod watch;
pub mod write;

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use http::StatusCode;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Map, Value};

use crate::config::prefix_range_end;
use crate::http::error::ApiError;
use crate::http::respond::with_mirror_headers;
use crate::http::state::AppState;
use crate::mirror::snapshot::{Entry, Snapshot};

/// What `GET /version` says: the etcd release whose gateway this answers like, so clients that
/// pick their API path from it (etcd3gw) choose `/v3/`.
pub const ETCD_VERSION: &str = "3.4.23";

/// `GET /version`.
pub(crate) async fn version() -> Response {
    Json(json!({ "etcdserver": ETCD_VERSION, "etcdcluster": "3.4.0" })).into_response()
}

/// An error in the gateway's shape: gRPC's code, and the HTTP status grpc-gateway gives it.
#[derive(Debug)]
pub struct GatewayError {
    /// gRPC status code.
    pub code: u16,
    /// What went wrong.
    pub message: String,
}

/// gRPC codes the gateway answers with.
pub mod code {
    /// A malformed request.
    pub const INVALID_ARGUMENT: u16 = 3;
    /// A key outside the mirrored prefixes.
    pub const PERMISSION_DENIED: u16 = 7;
    /// The compare of a write failed in a way etcd reports as a precondition.
    pub const FAILED_PRECONDITION: u16 = 9;
    /// A revision the mirror does not hold.
    pub const OUT_OF_RANGE: u16 = 11;
    /// A field or route the sidecar does not serve.
    pub const UNIMPLEMENTED: u16 = 12;
    /// No data yet, or writes refused in this mode.
    pub const UNAVAILABLE: u16 = 14;
    /// The write token is missing or wrong.
    pub const UNAUTHENTICATED: u16 = 16;
    /// The outcome of a write is unknown.
    pub const UNKNOWN: u16 = 2;
}

impl GatewayError {
    /// An error with `code` and `message`.
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        GatewayError {
            code,
            message: message.into(),
        }
    }

    /// A malformed request.
    pub fn invalid(message: impl Into<String>) -> Self {
        GatewayError::new(code::INVALID_ARGUMENT, message)
    }

    /// The HTTP status grpc-gateway maps the code to.
    fn status(&self) -> StatusCode {
        match self.code {
            code::INVALID_ARGUMENT | code::FAILED_PRECONDITION | code::OUT_OF_RANGE => {
                StatusCode::BAD_REQUEST
            }
            code::PERMISSION_DENIED => StatusCode::FORBIDDEN,
            code::UNIMPLEMENTED => StatusCode::NOT_IMPLEMENTED,
            code::UNAVAILABLE => StatusCode::SERVICE_UNAVAILABLE,
            code::UNAUTHENTICATED => StatusCode::UNAUTHORIZED,
            // As grpc-gateway maps etcd's own codes, for calls passed on to etcd.
            4 => StatusCode::GATEWAY_TIMEOUT,
            5 => StatusCode::NOT_FOUND,
            6 | 10 => StatusCode::CONFLICT,
            8 => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.message, "message": self.message, "code": self.code });
        (self.status(), Json(body)).into_response()
    }
}

/// etcd's status for a call passed on to it, in the gateway's shape.
impl From<tonic::Status> for GatewayError {
    fn from(status: tonic::Status) -> Self {
        GatewayError::new(status.code() as u16, status.message())
    }
}

/// The sidecar's own refusals, in the gateway's shape.
impl From<ApiError> for GatewayError {
    fn from(error: ApiError) -> Self {
        let code = match &error {
            ApiError::OutsideMirror { .. } => code::PERMISSION_DENIED,
            ApiError::Unauthorized => code::UNAUTHENTICATED,
            ApiError::WritesDisabled => code::UNIMPLEMENTED,
            ApiError::NotReady | ApiError::WritesRefused { .. } => code::UNAVAILABLE,
            ApiError::PayloadTooLarge
            | ApiError::BodyTimeout(_)
            | ApiError::BadBody(_)
            | ApiError::BadQuery(_) => code::INVALID_ARGUMENT,
            ApiError::WriteFailed {
                outcome: "unknown", ..
            } => code::UNKNOWN,
            ApiError::WriteFailed { .. } => code::UNAVAILABLE,
            _ => code::UNKNOWN,
        };
        GatewayError::new(code, error.to_string())
    }
}

/// A request body as `T`, refusing what is not JSON of its shape.
pub(crate) async fn request_json<T: serde::de::DeserializeOwned>(
    state: &AppState,
    body: axum::body::Body,
) -> Result<T, GatewayError> {
    let bytes = crate::http::write::read_body(state, body, crate::http::MAX_BODY_BYTES).await?;
    serde_json::from_slice(&bytes).map_err(|e| GatewayError::invalid(e.to_string()))
}

/// Bytes as the gateway writes them: standard base64.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A base64 field of a request, decoded.
pub fn unb64(field: &str, text: &str) -> Result<Vec<u8>, GatewayError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| GatewayError::invalid(format!("{field}: {e}")))
}

/// A 64-bit integer as the gateway takes it: a number or a string of digits.
pub fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Number(i64),
        Text(String),
    }
    match Int::deserialize(d)? {
        Int::Number(n) => Ok(n),
        Int::Text(t) => t.parse().map_err(serde::de::Error::custom),
    }
}

/// The keys `[key, end)` a request names, as etcd reads them: no `end` is `key` alone, an `end`
/// of `"\0"` every key from `key` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    /// The first key.
    pub key: Vec<u8>,
    /// The end, exclusive (`None`: `key` alone; `Some(empty)`: no end).
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    /// The range of `key` and `range_end` as base64 fields.
    pub fn decode(key: &str, range_end: &str) -> Result<KeyRange, GatewayError> {
        Ok(KeyRange::new(
            unb64("key", key)?,
            unb64("range_end", range_end)?,
        ))
    }

    /// The range of `key` and `range_end` as etcd's protobuf fields carry them.
    pub fn new(key: Vec<u8>, range_end: Vec<u8>) -> KeyRange {
        let end = match range_end.as_slice() {
            [] => None,
            [0] => Some(Vec::new()),
            _ => Some(range_end),
        };
        KeyRange { key, end }
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            None => key == self.key.as_slice(),
            Some(end) => key >= self.key.as_slice() && (end.is_empty() || key < end.as_slice()),
        }
    }

    /// Refuses a range not wholly inside one mirrored prefix: the mirror cannot answer for keys
    /// it does not hold.
    pub fn check_mirrored(&self, state: &AppState) -> Result<(), GatewayError> {
        let inside = state.prefixes.as_slice().iter().any(|p| {
            let p = p.as_bytes();
            self.key.starts_with(p)
                && match (&self.end, prefix_range_end(p)) {
                    (None, _) => true,
                    (Some(end), Some(bound)) => !end.is_empty() && *end <= bound,
                    (Some(_), None) => true,
                }
        });
        if inside {
            return Ok(());
        }
        Err(GatewayError::new(
            code::PERMISSION_DENIED,
            format!(
                "the range from {:?} is not inside the mirrored prefixes {:?}",
                String::from_utf8_lossy(&self.key),
                state.prefixes.as_slice()
            ),
        ))
    }

    /// The entries of `snapshot` in the range, in key order.
    pub fn scan<'a>(&'a self, snapshot: &'a Snapshot) -> impl Iterator<Item = &'a Arc<Entry>> + 'a {
        snapshot
            .from_key(&self.key)
            .take_while(move |e| match &self.end {
                None => e.key.as_ref() == self.key.as_slice(),
                Some(end) => end.is_empty() || e.key.as_ref() < end.as_slice(),
            })
    }
}

/// A response header: the mirror's cluster and revision (the sidecar is no member: no member id
/// or raft term).
pub fn header(cluster_id: u64, revision: i64) -> Value {
    let mut h = Map::new();
    if cluster_id != 0 {
        h.insert("cluster_id".into(), cluster_id.to_string().into());
    }
    if revision != 0 {
        h.insert("revision".into(), revision.to_string().into());
    }
    Value::Object(h)
}

/// A key-value as the gateway writes it, zero fields left out; `keys_only` leaves the value out.
pub fn kv_json(entry: &Entry, keys_only: bool) -> Value {
    let mut kv = Map::new();
    kv.insert("key".into(), b64(&entry.key).into());
    for (name, n) in [
        ("create_revision", entry.create_revision),
        ("mod_revision", entry.mod_revision),
        ("version", entry.version),
    ] {
        if n != 0 {
            kv.insert(name.into(), n.to_string().into());
        }
    }
    if !keys_only && !entry.value().is_empty() {
        kv.insert("value".into(), b64(entry.value()).into());
    }
    Value::Object(kv)
}

/// etcd's protobuf key-value as the gateway writes it, zero fields left out.
pub fn pb_kv_json(kv: &etcd_client::proto::PbKeyValue) -> Value {
    let mut out = Map::new();
    out.insert("key".into(), b64(&kv.key).into());
    for (name, n) in [
        ("create_revision", kv.create_revision),
        ("mod_revision", kv.mod_revision),
        ("version", kv.version),
        ("lease", kv.lease),
    ] {
        if n != 0 {
            out.insert(name.into(), n.to_string().into());
        }
    }
    if !kv.value.is_empty() {
        out.insert("value".into(), b64(&kv.value).into());
    }
    Value::Object(out)
}

/// A JSON answer with the mirror's headers (mode, revision, staleness).
pub(crate) fn answer(state: &AppState, snapshot: &Snapshot, body: Value) -> Response {
    with_mirror_headers(Json(body).into_response(), state, snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_read_as_etcd_reads_them() {
        let r = KeyRange::decode(&b64(b"/a/k"), "").unwrap();
        assert!(r.contains(b"/a/k") && !r.contains(b"/a/k2"));
        let r = KeyRange::decode(&b64(b"/a/"), &b64(b"/a0")).unwrap();
        assert!(r.contains(b"/a/") && r.contains(b"/a/zz") && !r.contains(b"/a0"));
        let r = KeyRange::decode(&b64(b"/a/"), &b64(b"\0")).unwrap();
        assert!(r.contains(b"/b") && !r.contains(b"/0"));
        assert!(KeyRange::decode("!!", "").is_err());
    }
}
