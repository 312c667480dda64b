//! Keeps the documents honest: `docs/openapi.yaml` describes exactly the router's routes and
//! methods, and the deployment files (compose, Kubernetes) give the sidecar only flags and
//! environment variables it has, probe only its real health paths, on its real port.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use clap::CommandFactory;
use config_sidecar::config::{Cli, Config};
use config_sidecar::etcd::EndpointPool;
use config_sidecar::http::{app, route_paths, AppState};
use config_sidecar::mode::ModeHandle;
use config_sidecar::store::Store;
use config_sidecar::sync::SyncStatus;
use http::{Method, Request, StatusCode};
use tower::ServiceExt;
use yaml_rust2::{Yaml, YamlLoader};

fn load_yaml(path: &str) -> Vec<Yaml> {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}"));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A router path in the spec's form: `{*key}` → `{key}`; `/v1/kv` and `/v1/kv/` are the keyed
/// route with an empty key.
fn spec_form(path: &str, all: &[&str]) -> String {
    let path = path.replace("{*", "{");
    let bare = path.trim_end_matches('/');
    all.iter()
        .map(|p| p.replace("{*", "{"))
        .find(|p| p.starts_with(&format!("{bare}/{{")))
        .unwrap_or(path)
}

fn router() -> axum::Router {
    let config = Config::for_endpoints(&["http://127.0.0.1:1".into()], &["/c/"]).unwrap();
    let pool = Arc::new(EndpointPool::new(
        config.etcd.clone(),
        Duration::from_secs(1),
    ));
    let (_, sync) = tokio::sync::watch::channel(SyncStatus::default());
    let state = AppState::new(
        &config,
        Arc::new(Store::new()),
        pool,
        sync,
        Arc::new(ModeHandle::default()),
        Default::default(),
    );
    app(state)
}

/// Whether the router routes `method` on `path` (anything but its unknown-route and
/// method-not-allowed answers).
async fn routed(router: &axum::Router, method: &Method, path: &str) -> bool {
    let uri = path.replace("{key}", "c/k").replace("{prefix}", "c/");
    let request = Request::builder()
        .method(method.clone())
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        return false;
    }
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    !String::from_utf8_lossy(&body).contains("\"unknown_route\"")
}

#[tokio::test]
async fn the_openapi_spec_lists_exactly_the_routes_and_methods_served() {
    let spec = &load_yaml("docs/openapi.yaml")[0];
    let paths = spec["paths"].as_hash().expect("the spec has paths");
    let mut documented = BTreeSet::new();
    let mut documented_methods = BTreeSet::new();
    for (path, item) in paths {
        let path = path.as_str().unwrap().to_string();
        for (method, _) in item.as_hash().unwrap() {
            let method = method.as_str().unwrap().to_uppercase();
            if method != "PARAMETERS" {
                documented_methods.insert((path.clone(), method));
            }
        }
        documented.insert(path);
    }
    let all = route_paths();
    let served: BTreeSet<String> = all.iter().map(|p| spec_form(p, &all)).collect();
    assert_eq!(
        served, documented,
        "router paths (left) and spec paths (right) differ"
    );

    let router = router();
    let candidates = [
        Method::GET,
        Method::PUT,
        Method::DELETE,
        Method::POST,
        Method::PATCH,
    ];
    for path in &documented {
        for method in &candidates {
            let in_spec = documented_methods.contains(&(path.clone(), method.to_string()));
            assert_eq!(
                routed(&router, method, path).await,
                in_spec,
                "{method} {path}: served and documented disagree"
            );
        }
    }
}
