//! The one place where errors become HTTP responses: every error body is JSON of the form
//! `{"error": "<code>", "message": "<text>", ...}` with the matching status.

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde_json::{json, Value};

use crate::http::path::KeyError;
use crate::http::{MAX_HEADERS, MAX_HEAD_BYTES};
use crate::mode::pin::Pin;
use crate::mode::Mode;

/// Why writes are refused, in words: the operator's pin or the facts.
fn refusal_cause(pin: &Option<Pin>) -> String {
    match pin {
        Some(pin) => format!("the operator pinned {} ({})", pin.mode.as_str(), pin.reason),
        None => "etcd has no quorum".to_string(),
    }
}

/// Anything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No complete load yet: the answer is unknown, which is not the same as missing.
    #[error("the mirror has not completed its first load from etcd yet")]
    NotReady,
    /// The key is not inside any mirrored prefix.
    #[error("{key:?} is outside the mirrored prefixes")]
    OutsideMirror {
        /// The requested key.
        key: String,
        /// What is mirrored.
        prefixes: Vec<String>,
    },
    /// The key is inside a mirrored prefix and etcd does not have it.
    #[error("key {key:?} does not exist")]
    KeyNotFound {
        /// The requested key.
        key: String,
        /// The revision at which it was found missing.
        revision: i64,
    },
    /// The URL path does not name a valid key.
    #[error("bad key: {0}")]
    BadKey(#[from] KeyError),
    /// A query parameter that cannot be understood.
    #[error("bad query: {0}")]
    BadQuery(String),
    /// No such route.
    #[error("no route for {0}")]
    UnknownRoute(String),
    /// The route exists, the method does not.
    #[error("method {0} is not allowed on this route")]
    MethodNotAllowed(String),
    /// The URI is longer than the sidecar accepts.
    #[error("the request URI is longer than {0} bytes")]
    UriTooLong(usize),
    /// The request body is larger than the sidecar accepts.
    #[error("the request body is too large")]
    PayloadTooLarge,
    /// The mirror is staler than the request's `max_stale` allows.
    #[error("the mirror was last confirmed current {stale_ms} ms ago, more than max_stale allows ({max_ms} ms)")]
    TooStale {
        /// Staleness now (`u64::MAX` when never confirmed).
        stale_ms: u64,
        /// What the request allows.
        max_ms: u64,
        /// The current mode.
        mode: Mode,
    },
    /// A `?consistent` read needs a quorum read and none succeeded.
    #[error("a consistent read needs etcd quorum: {0}")]
    NoQuorum(String),
    /// Writes are off (`--allow-writes` not given).
    #[error("writes are disabled on this sidecar (start it with --allow-writes)")]
    WritesDisabled,
    /// The write token is missing or wrong.
    #[error("a valid bearer token is required for writes")]
    Unauthorized,
    /// The mode does not allow writes; nothing was sent to etcd.
    #[error("writes are refused in {} mode: {}; nothing was written", .mode.as_str(), refusal_cause(.pin))]
    WritesRefused {
        /// The current mode.
        mode: Mode,
        /// Seconds after which a retry may succeed.
        retry_after: u64,
        /// The operator's pin, when it is why.
        pin: Option<Pin>,
    },
    /// The admin API is off: no admin token is configured.
    #[error("the admin API is disabled (start the sidecar with --admin-token-file)")]
    AdminDisabled,
    /// The admin token is missing or wrong.
    #[error("a valid admin bearer token is required")]
    AdminUnauthorized,
    /// A pin request names a mode that cannot be pinned.
    #[error("{0}")]
    BadMode(String),
    /// The compare-and-swap revision did not match.
    #[error("the key's mod_revision is {current}, not {expected}; nothing was written")]
    PreconditionFailed {
        /// The key.
        key: String,
        /// What the request expected.
        expected: i64,
        /// What etcd has (0: the key does not exist).
        current: i64,
    },
    /// etcd did not complete the write.
    #[error("the write did not complete: {message}")]
    WriteFailed {
        /// `not_applied` when etcd refused it, `unknown` when the answer was lost.
        outcome: &'static str,
        /// What etcd or the connection said.
        message: String,
    },
    /// A background task died or stopped making progress: liveness fails so the platform
    /// restarts the sidecar.
    #[error("{0}")]
    NotAlive(String),
    /// The request has no `Host` (nor HTTP/2 authority).
    #[error("the request has no Host header")]
    MissingHost,
    /// The `Host` does not name this sidecar as a local client would (DNS rebinding guard).
    #[error("Host {0:?} is not one of this sidecar's names; add it with --allowed-hosts if it should be")]
    HostNotAllowed(String),
    /// A browser sent the request from another origin.
    #[error("cross-origin requests are refused (origin {0:?})")]
    CrossOrigin(String),
    /// The connection is over the cap on open connections; it closes after this answer.
    #[error("the sidecar has as many connections open as it allows; retry later")]
    TooManyConnections,
    /// Too many streams or blocking queries are open.
    #[error("too many {0} are open; retry later")]
    TooManySubscribers(&'static str),
    /// The request body did not arrive in time.
    #[error("the request body did not arrive within {0} ms")]
    BodyTimeout(u64),
    /// The request body could not be read (a malformed chunk, a dropped connection).
    #[error("the request body could not be read: {0}")]
    BadBody(String),
    /// The request head was refused on the wire (by the server's wire screen); the connection closes
    /// after this answer.
    #[error("{}", .0.describe())]
    RequestHead(Refusal),
    /// A handler panicked; the panic was caught and the server keeps serving.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::NotReady
            | ApiError::NotAlive(_)
            | ApiError::TooStale { .. }
            | ApiError::NoQuorum(_)
            | ApiError::WritesRefused { .. }
            | ApiError::WriteFailed { .. }
            | ApiError::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::WritesDisabled
            | ApiError::AdminDisabled
            | ApiError::HostNotAllowed(_)
            | ApiError::CrossOrigin(_) => StatusCode::FORBIDDEN,
            ApiError::AdminUnauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadMode(_) => StatusCode::BAD_REQUEST,
            ApiError::MissingHost | ApiError::BadBody(_) => StatusCode::BAD_REQUEST,
            ApiError::TooManySubscribers(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            ApiError::OutsideMirror { .. }
            | ApiError::KeyNotFound { .. }
            | ApiError::UnknownRoute(_) => StatusCode::NOT_FOUND,
            ApiError::BadKey(_) | ApiError::BadQuery(_) => StatusCode::BAD_REQUEST,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestHead(Refusal::TooManyHeaders | Refusal::HeadTooLarge) => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            ApiError::RequestHead(_) => StatusCode::BAD_REQUEST,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotReady => "not_ready",
            ApiError::NotAlive(_) => "not_alive",
            ApiError::OutsideMirror { .. } => "outside_mirror",
            ApiError::KeyNotFound { .. } => "key_not_found",
            ApiError::BadKey(_) => "bad_key",
            ApiError::BadQuery(_) => "bad_query",
            ApiError::UnknownRoute(_) => "unknown_route",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::UriTooLong(_) => "uri_too_long",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::TooStale { .. } => "too_stale",
            ApiError::NoQuorum(_) => "no_quorum",
            ApiError::WritesDisabled => "writes_disabled",
            ApiError::Unauthorized | ApiError::AdminUnauthorized => "unauthorized",
            ApiError::AdminDisabled => "admin_disabled",
            ApiError::BadMode(_) => "bad_mode",
            ApiError::WritesRefused { .. } => "writes_refused",
            ApiError::PreconditionFailed { .. } => "precondition_failed",
            ApiError::WriteFailed { .. } => "write_failed",
            ApiError::Internal => "internal",
            ApiError::MissingHost => "missing_host",
            ApiError::HostNotAllowed(_) => "host_not_allowed",
            ApiError::CrossOrigin(_) => "cross_origin",
            ApiError::TooManySubscribers(_) => "too_many_subscribers",
            ApiError::TooManyConnections => "too_many_connections",
            ApiError::BodyTimeout(_) => "body_timeout",
            ApiError::BadBody(_) => "bad_body",
            ApiError::RequestHead(refusal) => refusal.code(),
        }
    }

    fn body(&self) -> Value {
        let mut body = json!({ "error": self.code(), "message": self.to_string() });
        match self {
            ApiError::OutsideMirror { key, prefixes } => {
                body["key"] = json!(key);
                body["mirrored_prefixes"] = json!(prefixes);
            }
            ApiError::KeyNotFound { key, revision } => {
                body["key"] = json!(key);
                body["revision"] = json!(revision);
            }
            ApiError::TooStale {
                stale_ms,
                max_ms,
                mode,
            } => {
                body["stale_ms"] = json!(stale_ms);
                body["max_stale_ms"] = json!(max_ms);
                body["mode"] = json!(mode);
            }
            ApiError::WritesRefused {
                mode,
                retry_after,
                pin,
            } => {
                body["mode"] = json!(mode);
                body["retry_after"] = json!(retry_after);
                if let Some(pin) = pin {
                    body["pin"] = json!(pin);
                }
            }
            ApiError::PreconditionFailed {
                key,
                expected,
                current,
            } => {
                body["key"] = json!(key);
                body["expected_mod_revision"] = json!(expected);
                body["mod_revision"] = json!(current);
            }
            ApiError::WriteFailed { outcome, .. } => {
                body["outcome"] = json!(outcome);
            }
            _ => {}
        }
        body
    }
}

impl ApiError {
    /// Status, the headers beside `Content-Type: application/json`, and the JSON body.
    fn parts(&self) -> (StatusCode, Vec<(header::HeaderName, HeaderValue)>, String) {
        let mut headers = Vec::new();
        let retry_after = match self {
            ApiError::NotReady
            | ApiError::NoQuorum(_)
            | ApiError::TooManySubscribers(_)
            | ApiError::TooManyConnections => Some(1),
            ApiError::WritesRefused { retry_after, .. } => Some(*retry_after),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            headers.push((header::RETRY_AFTER, HeaderValue::from(seconds)));
        }
        if matches!(self, ApiError::Unauthorized | ApiError::AdminUnauthorized) {
            headers.push((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        (self.status(), headers, self.body().to_string())
    }

    /// The whole HTTP/1.1 answer as bytes, `Connection: close`: for a connection answered before
    /// any HTTP machinery runs (one over the connection cap).
    pub fn http1_bytes(&self) -> Vec<u8> {
        let (status, headers, body) = self.parts();
        let mut head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        for (name, value) in headers {
            head.push_str(&format!(
                "{name}: {}\r\n",
                value.to_str().unwrap_or_default()
            ));
        }
        head.push_str(&format!(
            "connection: close\r\ncontent-length: {}\r\n\r\n",
            body.len()
        ));
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        bytes
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, headers, body) = self.parts();
        let mut response = (status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (name, value) in headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

/// Why a request head was refused on the wire (by the server's wire screen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// More than [`MAX_HEADERS`] header fields.
    TooManyHeaders,
    /// The head is longer than [`MAX_HEAD_BYTES`].
    HeadTooLarge,
    /// Both `Content-Length` and `Transfer-Encoding`: two framings, a smuggling shape.
    TwoFramings,
    /// The head is not HTTP/1 syntax.
    Malformed,
    /// A `Content-Length` that is not a number, or several that differ.
    BadContentLength,
    /// A `Transfer-Encoding` whose last coding is not `chunked`, or one in an HTTP/1.0 request.
    BadTransferEncoding,
}

impl Refusal {
    /// The stable machine-readable code of the JSON error.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::TooManyHeaders => "too_many_headers",
            Refusal::HeadTooLarge => "head_too_large",
            Refusal::TwoFramings => "two_framings",
            Refusal::Malformed => "malformed_request",
            Refusal::BadContentLength => "bad_content_length",
            Refusal::BadTransferEncoding => "bad_transfer_encoding",
        }
    }

    /// What went wrong, for the error message.
    pub fn describe(self) -> String {
        match self {
            Refusal::TooManyHeaders => format!("the request has more than {MAX_HEADERS} headers"),
            Refusal::HeadTooLarge => {
                format!("the request head is larger than {MAX_HEAD_BYTES} bytes")
            }
            Refusal::TwoFramings => "the request has both Content-Length and Transfer-Encoding; \
                 it is refused and the connection closed (RFC 9112 section 6.3)"
                .to_string(),
            Refusal::Malformed => "the request head is not valid HTTP/1".to_string(),
            Refusal::BadContentLength => {
                "the request's Content-Length is not one decimal length".to_string()
            }
            Refusal::BadTransferEncoding => {
                "the request's Transfer-Encoding must end in chunked, and HTTP/1.0 has none"
                    .to_string()
            }
        }
    }
}
