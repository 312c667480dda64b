//! The admin API: `GET` and `POST /v1/admin/mode` read and set the operator's pin. Guarded by its
//! own bearer token (`--admin-token-file`), compared in constant time; without one configured the
//! routes answer `403 admin_disabled`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::HeaderMap;
use serde::Deserialize;
use serde_json::json;

use crate::http::error::ApiError;
use crate::http::state::AppState;
use crate::http::write::{bearer_matches, read_body};
use crate::mode::pin::{self, PinSource};

/// Largest pin request body: a mode and a reason.
const MAX_PIN_BODY: usize = 4096;

/// What `POST /v1/admin/mode` takes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PinBody {
    /// `read-only`, `cache-only` or `auto`.
    mode: String,
    /// Why, for the people who will see it in refusals, status, logs and alerts.
    #[serde(default)]
    reason: Option<String>,
}

fn admit(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let token = state.admin_token.as_ref().ok_or(ApiError::AdminDisabled)?;
    if !bearer_matches(headers, token) {
        return Err(ApiError::AdminUnauthorized);
    }
    Ok(())
}

/// The mode served and the pin, if any.
fn current(state: &AppState) -> Response {
    Json(json!({ "mode": state.mode.mode(), "pin": state.mode.pin() })).into_response()
}

pub(crate) async fn mode_get(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&state, &headers)?;
    Ok(current(&state))
}

pub(crate) async fn mode_post(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    admit(&state, &parts.headers)?;
    let body = read_body(&state, body, MAX_PIN_BODY).await?;
    let body: PinBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadBody(format!(
            "expected {{\"mode\": \"read-only\" | \"cache-only\" | \"auto\", \"reason\": \"...\"}}: {e}"
        ))
    })?;
    let mode = pin::parse(&body.mode).map_err(ApiError::BadMode)?;
    let reason = body
        .reason
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "no reason given".to_string());
    state
        .mode
        .request_pin(mode, reason, PinSource::Api)
        .await
        .map_err(|e| ApiError::NotAlive(e.to_string()))?;
    Ok(current(&state))
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::body::{to_bytes, Body};
    use bytes::Bytes;
    use http::{header, StatusCode};
    use tower::ServiceExt;

    use crate::config::Config;
    use crate::mirror::snapshot::Entry;
    use crate::mirror::store::Store;
    use crate::mode::handle::ModeHandle;
    use crate::mode::machine::{Hysteresis, Signal};
    use crate::mode::task::ModeTask;
    use crate::mode::Mode;

    /// The app with a loaded mirror in `full` and a running mode task; `token` configures the
    /// admin API. The returned senders keep the mode task alive.
    async fn app_with_mode_task(
        token: Option<&str>,
    ) -> (
        axum::Router,
        tokio::sync::mpsc::Sender<Signal>,
        tokio::sync::mpsc::Sender<crate::upstream::Observation>,
    ) {
        let mut config = Config::for_endpoints(&["http://127.0.0.1:1".into()], &["/c/"]).unwrap();
        config.mode.admin_token = token.map(Into::into);
        let store = Arc::new(Store::new());
        let entry = Entry::new(Bytes::from("/c/a"), Bytes::from("1"), 2, 2, 1);
        store.replace(2, vec![entry]).unwrap();
        let mode = Arc::new(ModeHandle::default());
        let (signals, signals_rx) = tokio::sync::mpsc::channel(8);
        let (verdicts, verdicts_rx) = tokio::sync::mpsc::channel(8);
        let (webhook, _) = tokio::sync::mpsc::channel(8);
        let hysteresis = Hysteresis {
            degrade_after: 3,
            recover_after: 2,
        };
        let task = ModeTask::new(hysteresis, mode.clone(), signals_rx, verdicts_rx, webhook);
        tokio::spawn(task.run());
        signals.send(Signal::LoadedFromEtcd).await.unwrap();
        while mode.mode() != Mode::Full {
            tokio::task::yield_now().await;
        }
        let state = crate::ops::run::standalone_state(&config, store, mode);
        (crate::http::app(state), signals, verdicts)
    }

    async fn call(
        app: &axum::Router,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: &str,
    ) -> (StatusCode, http::HeaderMap, serde_json::Value) {
        let mut request = http::Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let body = to_bytes(body, 1 << 20).await.unwrap();
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (parts.status, parts.headers, json)
    }

    #[tokio::test]
    async fn without_a_token_configured_the_admin_routes_are_disabled() {
        let (app, _s, _v) = app_with_mode_task(None).await;
        for method in ["GET", "POST"] {
            let (status, _, body) = call(&app, method, "/v1/admin/mode", Some("x"), "{}").await;
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert_eq!(body["error"], "admin_disabled");
        }
    }

    #[tokio::test]
    async fn a_missing_or_wrong_token_is_401_and_bad_requests_are_400() {
        let (app, _s, _v) = app_with_mode_task(Some("adm1n")).await;
        for token in [None, Some("wrong"), Some("adm1")] {
            let (status, headers, body) = call(&app, "GET", "/v1/admin/mode", token, "").await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
            assert_eq!(body["error"], "unauthorized");
            assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        }
        let post = |body: &'static str| {
            let app = app.clone();
            async move { call(&app, "POST", "/v1/admin/mode", Some("adm1n"), body).await }
        };
        let (status, _, body) = post(r#"{"mode": "full"}"#).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("bad_mode"))
        );
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("cannot be pinned"));
        for bad in [
            "not json",
            r#"{"mode": 3}"#,
            r#"{"mode": "auto", "extra": 1}"#,
            "{}",
        ] {
            let (status, _, body) = post(bad).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(body["error"], "bad_body", "{bad}");
        }
        let (status, _, body) = post(r#"{"mode": "sideways"}"#).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("bad_mode"))
        );
    }

    #[tokio::test]
    async fn a_pin_lowers_the_mode_served_and_shows_until_unpinned() {
        let (app, _s, _v) = app_with_mode_task(Some("adm1n")).await;
        let body = r#"{"mode": "read-only", "reason": "etcd maintenance at 10:00"}"#;
        let (status, _, answer) = call(&app, "POST", "/v1/admin/mode", Some("adm1n"), body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer["mode"], "read-only");
        assert_eq!(answer["pin"]["mode"], "read-only");
        assert_eq!(answer["pin"]["reason"], "etcd maintenance at 10:00");
        assert_eq!(answer["pin"]["source"], "api");
        let (_, _, got) = call(&app, "GET", "/v1/admin/mode", Some("adm1n"), "").await;
        assert_eq!(got, answer);

        // Every mirror answer says so.
        let (status, headers, _) = call(&app, "GET", "/v1/kv/c/a", None, "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-config-mode"], "read-only");
        assert_eq!(headers["x-config-pinned"], "read-only");

        let (_, _, answer) = call(
            &app,
            "POST",
            "/v1/admin/mode",
            Some("adm1n"),
            r#"{"mode": "auto"}"#,
        )
        .await;
        assert_eq!(answer["mode"], "full");
        assert!(answer["pin"].is_null());
        let (_, headers, _) = call(&app, "GET", "/v1/kv/c/a", None, "").await;
        assert_eq!(headers["x-config-mode"], "full");
        assert!(!headers.contains_key("x-config-pinned"));
    }
}
