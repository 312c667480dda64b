//! The one place where errors become HTTP responses: every error body is JSON of the form
//! `{"error": "<code>", "message": "<text>", ...}` with the matching status.

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde_json::{json, Value};

use crate::keys::KeyError;

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
    /// The handler did not finish in time.
    #[error("the request timed out")]
    Timeout,
    /// A handler panicked; the panic was caught and the server keeps serving.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::NotReady | ApiError::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::OutsideMirror { .. }
            | ApiError::KeyNotFound { .. }
            | ApiError::UnknownRoute(_) => StatusCode::NOT_FOUND,
            ApiError::BadKey(_) | ApiError::BadQuery(_) => StatusCode::BAD_REQUEST,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotReady => "not_ready",
            ApiError::OutsideMirror { .. } => "outside_mirror",
            ApiError::KeyNotFound { .. } => "key_not_found",
            ApiError::BadKey(_) => "bad_key",
            ApiError::BadQuery(_) => "bad_query",
            ApiError::UnknownRoute(_) => "unknown_route",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::UriTooLong(_) => "uri_too_long",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::Timeout => "timeout",
            ApiError::Internal => "internal",
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
            _ => {}
        }
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), self.body().to_string()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if matches!(self, ApiError::NotReady) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
