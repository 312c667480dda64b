//! The service each connection runs: plain key reads are answered on the spot, everything else
//! goes through the axum router.
//!
//! A plain read (`GET /v1/kv/<key>`, no query, key present) is what an application does most, so
//! it skips the router's matching, extensions, boxed futures and boxed body: the answer is one
//! lookup in the current snapshot plus header values prepared when the revision was applied
//! ([`crate::http::key_response`], which the router's handler uses too, so both say the same).
//! Anything unusual — a query, an escape that does not decode, a missing key, an error — falls
//! through to the router, which stays the one place that maps errors to responses.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::response::IntoResponse;
use axum::Router;
use bytes::Bytes;
use futures_util::future::{Either as EitherFuture, Map};
use futures_util::FutureExt;
use http::{Method, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tower::util::Oneshot;
use tower::ServiceExt;

use crate::error::ApiError;
use crate::http::{key_response, AppState, MAX_URI_BYTES};
use crate::keys::decode_key_path;

/// The body of any response: a prepared value, or whatever the router produced.
pub type ServiceBody = Either<Full<Bytes>, axum::body::Body>;

type RouterFuture = Map<
    Oneshot<Router, Request<Incoming>>,
    fn(Result<axum::response::Response, Infallible>) -> Result<Response<ServiceBody>, Infallible>,
>;

/// The per-connection service: the fast path for plain key reads in front of the router.
#[derive(Clone)]
pub struct SidecarService {
    /// What the fast path reads; the same state the router's handlers hold.
    state: Arc<AppState>,
    /// Every other request.
    router: Router,
}

impl SidecarService {
    /// The service over `state`, with `router` (built on the same state) for the other requests.
    pub fn new(state: Arc<AppState>, router: Router) -> Self {
        SidecarService { state, router }
    }
}

impl hyper::service::Service<Request<Incoming>> for SidecarService {
    type Response = Response<ServiceBody>;
    type Error = Infallible;
    type Future = EitherFuture<Ready<Result<Response<ServiceBody>, Infallible>>, RouterFuture>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        // The fast path never awaits, so catching a panic here costs nothing until one happens;
        // the router has its own catch-panic layer.
        match std::panic::catch_unwind(AssertUnwindSafe(|| plain_read(&self.state, &request))) {
            Ok(Some(response)) => {
                tracing::debug!(path = %request.uri().path(), status = %response.status(), "answered from the fast path");
                let response =
                    response.map(|body| Either::Left(Full::new(body.unwrap_or_default())));
                EitherFuture::Left(ready(Ok(response)))
            }
            Ok(None) => EitherFuture::Right(
                self.router
                    .clone()
                    .oneshot(request)
                    .map(|result| result.map(|response| response.map(Either::Right))),
            ),
            Err(_) => {
                tracing::error!(path = %request.uri().path(), "the fast path panicked");
                let response = ApiError::Internal.into_response().map(Either::Right);
                EitherFuture::Left(ready(Ok(response)))
            }
        }
    }
}

/// The answer to `request` if it is a plain read of a present key, else `None` (the router then
/// answers it, errors included).
pub fn plain_read<B>(state: &AppState, request: &Request<B>) -> Option<Response<Option<Bytes>>> {
    if request.method() != Method::GET {
        return None;
    }
    let uri = request.uri();
    if uri.query().is_some() || uri.path().len() > MAX_URI_BYTES {
        return None;
    }
    let raw = uri.path().strip_prefix("/v1/kv")?;
    let key = decode_key_path(raw).ok()?;
    if !state.prefixes.contains(key.as_bytes()) {
        return None;
    }
    let snapshot = state.store.peek();
    if !snapshot.loaded {
        return None;
    }
    let entry = snapshot.get(key.as_bytes())?;
    Some(key_response(state, &snapshot, entry, request.headers()))
}
