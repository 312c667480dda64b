//! The service each connection runs: the [`Gate`] first (Host allow-list, cross-origin refusal),
//! then plain key reads answered on the spot, everything else through the axum router.
//!
//! A plain read (`GET /v1/kv/<key>`, no query, key present) is what an application does most, so
//! it skips the router's matching, extensions, boxed futures and boxed body: the answer is one
//! lookup in the current snapshot plus header values prepared when the revision was applied
//! ([`key_response`], which the router's handler uses too, so both say the same).
//! Anything unusual — a query, an escape that does not decode, a missing key, an error — falls
//! through to the router, which stays the one place that maps errors to responses.

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::response::IntoResponse;
use axum::Router;
use bytes::Bytes;
use futures_util::future::Either as EitherFuture;
use http::{Method, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tower::ServiceExt;

use crate::http::counters::RouteIndex;
use crate::http::error::{ApiError, Refusal};
use crate::http::gate::Gate;
use crate::http::path::decode_key_path;
use crate::http::respond::key_response;
use crate::http::state::AppState;
use crate::http::{KV_ROUTE, MAX_URI_BYTES};

/// The body of any response: a prepared value, or whatever the router produced.
pub type ServiceBody = Either<Full<Bytes>, axum::body::Body>;

type RouterFuture = Pin<Box<dyn Future<Output = Result<Response<ServiceBody>, Infallible>> + Send>>;

/// The per-connection service: the fast path for plain key reads in front of the router.
#[derive(Clone)]
pub struct SidecarService {
    /// What the fast path reads; the same state the router's handlers hold.
    state: Arc<AppState>,
    /// Every other request.
    router: Router,
    /// The key route's index in the request metrics: what the fast path counts under.
    kv_route: RouteIndex,
    /// Who may ask: checked before anything else looks at a request.
    gate: Arc<Gate>,
    /// Whether plain key reads take the fast path (not on the Consul listener, whose `/v1/kv/`
    /// means something else).
    fast_path: bool,
}

impl SidecarService {
    /// The service over `state`, with `router` (built on the same state) for the other requests.
    pub fn new(state: Arc<AppState>, router: Router, gate: Gate) -> Self {
        let kv_route = state
            .requests
            .route(KV_ROUTE)
            .unwrap_or_else(|| state.requests.unmatched());
        SidecarService {
            state,
            router,
            kv_route,
            gate: Arc::new(gate),
            fast_path: true,
        }
    }

    /// The same, with every request going to `router`.
    pub fn without_fast_path(mut self) -> Self {
        self.fast_path = false;
        self
    }
}

impl hyper::service::Service<Request<Incoming>> for SidecarService {
    type Response = Response<ServiceBody>;
    type Error = Infallible;
    type Future = EitherFuture<Ready<Result<Response<ServiceBody>, Infallible>>, RouterFuture>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let started = Instant::now();
        if let Err(refused) = self.gate.check(&request) {
            let response = refused.into_response();
            let route = self.state.requests.route_of(request.uri().path());
            self.state
                .requests
                .record(route, response.status().as_u16(), started.elapsed());
            return EitherFuture::Left(ready(Ok(response.map(Either::Right))));
        }
        // The fast path never awaits, so catching a panic here costs nothing until one happens;
        // the router has its own catch-panic layer.
        let response = match std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.fast_path
                .then(|| plain_read(&self.state, &request))
                .flatten()
        })) {
            Ok(Some(response)) => {
                tracing::debug!(path = %request.uri().path(), status = %response.status(), "answered from the fast path");
                response.map(|body| Either::Left(Full::new(body.unwrap_or_default())))
            }
            Ok(None) => {
                let state = self.state.clone();
                let route = state.requests.route_of(request.uri().path());
                let routed = self.router.clone().oneshot(request);
                return EitherFuture::Right(Box::pin(async move {
                    let Ok(response) = routed.await;
                    state
                        .requests
                        .record(route, response.status().as_u16(), started.elapsed());
                    Ok(response.map(Either::Right))
                }));
            }
            Err(_) => {
                tracing::error!(path = %request.uri().path(), "the fast path panicked");
                ApiError::Internal.into_response().map(Either::Right)
            }
        };
        self.state
            .requests
            .record(self.kv_route, response.status().as_u16(), started.elapsed());
        EitherFuture::Left(ready(Ok(response)))
    }
}

impl SidecarService {
    /// The answer to a request head refused on the wire (by the server's wire screen): the JSON error,
    /// counted with the requests no route matched.
    pub fn refused(
        &self,
        refusal: Refusal,
    ) -> <Self as hyper::service::Service<Request<Incoming>>>::Future {
        let response = ApiError::RequestHead(refusal).into_response();
        let route = self.state.requests.unmatched();
        self.state
            .requests
            .record(route, response.status().as_u16(), std::time::Duration::ZERO);
        EitherFuture::Left(ready(Ok(response.map(Either::Right))))
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
