//! The operator's endpoints: `/healthz` and `/readyz` for the platform's probes, `/v1/status` and
//! `/metrics` for people and scrapers. The last two answer what the [`Report`] says.
//!
//! [`Report`]: crate::http::state::Report

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{header, HeaderValue};
use serde_json::json;

use crate::http::error::ApiError;
use crate::http::respond::with_mirror_headers;
use crate::http::state::AppState;

/// The media type of the metrics exposition (OpenMetrics text, which Prometheus reads).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.report.metrics(&state) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(METRICS_CONTENT_TYPE),
            )],
            text,
        )
            .into_response(),
        Err(_) => ApiError::Internal.into_response(),
    }
}

/// Liveness: fails only when a background task died or stopped making progress, which a restart
/// cures; an unreachable etcd never fails it.
pub(crate) async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let problems = state.liveness.problems();
    if problems.is_empty() {
        Json(json!({ "status": "alive" })).into_response()
    } else {
        ApiError::NotAlive(problems.join("; ")).into_response()
    }
}

pub(crate) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let snapshot = state.store.snapshot();
    if state.ready(&snapshot) {
        with_mirror_headers(
            Json(json!({ "status": "ready", "revision": snapshot.revision })).into_response(),
            &state,
            &snapshot,
        )
    } else {
        ApiError::NotReady.into_response()
    }
}

pub(crate) async fn status(State(state): State<Arc<AppState>>) -> Response {
    let snapshot = state.store.snapshot();
    let body = state.report.status(&state, &snapshot);
    with_mirror_headers(Json(body).into_response(), &state, &snapshot)
}
