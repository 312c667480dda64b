//! Alerts against a real cluster: a killed member's health check is posted to a real HTTP
//! receiver, as JSON and in Slack's shape, and counted in `/metrics`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Path;
use axum::routing::post;
use axum::{Json, Router};
use common::*;
use config_sidecar::config::WebhookFormat;

type Received = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// An HTTP receiver that records each body with the path it was posted to.
async fn receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let sink = received.clone();
    let app = Router::new().route(
        "/{path}",
        post(
            move |Path(path): Path<String>, Json(body): Json<serde_json::Value>| {
                let sink = sink.clone();
                async move {
                    sink.lock().unwrap().push((path, body));
                    "ok"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, received)
}

fn bodies(received: &Received, path: &str) -> Vec<serde_json::Value> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| p == path)
        .map(|(_, b)| b.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_members_check_is_alerted_as_json_and_as_slack_text() {
    let mut cluster = EtcdCluster::start(3).await;
    cluster
        .client()
        .await
        .put("/app/k", "v", None)
        .await
        .unwrap();
    let (base, received) = receiver().await;
    let mut sidecars = Vec::new();
    for (path, format) in [
        ("json", WebhookFormat::Json),
        ("slack", WebhookFormat::Slack),
    ] {
        let mut config = sidecar_config(&cluster.endpoints(), &["/app/"]);
        // A probe that timed out on a busy machine (the default is 800 ms) would mark a healthy
        // member unhealthy and post an alert early, and the real one would then be held back
        // by alert_min_interval. The killed member refuses connections, so no timeout is waited.
        config.mode.probe_timeout = Duration::from_secs(5);
        config.mode.webhook = Some(format!("{base}/{path}"));
        config.mode.webhook_format = format;
        sidecars.push(start_sidecar(config).await);
    }
    for s in &sidecars {
        s.wait_mode("full", Duration::from_secs(10)).await;
    }
    // Every member healthy in each sidecar's view first: the alert is a change from there.
    for s in &sidecars {
        eventually(Duration::from_secs(10), "every member healthy", || async {
            let status = s.json("/v1/status").await;
            status["checks"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["name"].as_str().unwrap().starts_with("etcd:"))
                .all(|c| c["status"] == "healthy")
        })
        .await;
    }

    let leader = cluster.leader_index().await;
    let victim = (leader + 1) % 3;
    let name = format!("etcd:{}", cluster.endpoint(victim));
    cluster.kill(victim);

    eventually(
        Duration::from_secs(15),
        "the member's alert, as JSON",
        || async {
            bodies(&received, "json").iter().any(|a| {
                a["kind"] == "check" && a["check"] == name.as_str() && a["to"] == "unhealthy"
            })
        },
    )
    .await;
    let alert = bodies(&received, "json")
        .into_iter()
        .find(|a| a["check"] == name.as_str())
        .unwrap();
    assert_eq!(alert["from"], "healthy");
    assert!(!alert["reason"].as_str().unwrap().is_empty());
    assert!(alert["at_unix_ms"].as_u64().unwrap() > 0);
    assert_eq!(alert["held_back"], 0);
    assert!(!alert["sidecar"].as_str().unwrap().is_empty());

    eventually(
        Duration::from_secs(15),
        "the member's alert, as Slack text",
        || async {
            bodies(&received, "slack").iter().any(|b| {
                b["text"]
                    .as_str()
                    .is_some_and(|t| t.contains(&format!("check {name} healthy → unhealthy")))
            })
        },
    )
    .await;
    for body in bodies(&received, "slack") {
        let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["text"], "Slack's shape: {body}");
    }

    // Awaited: the receiver holds the body before its answer reaches the sidecar, which counts
    // the alert as posted only then.
    let line = format!("config_sidecar_alerts_total{{check=\"{name}\",result=\"posted\"}} 1");
    eventually(Duration::from_secs(10), &line, || async {
        let metrics = sidecars[0].get("/metrics").await.text().await.unwrap();
        metrics.contains(&line)
    })
    .await;
    // Quorum held: the only mode alert is the start's.
    let modes: Vec<_> = bodies(&received, "json")
        .into_iter()
        .filter(|a| a["kind"] == "mode")
        .map(|a| (a["from"].clone(), a["to"].clone()))
        .collect();
    assert_eq!(modes, [("starting".into(), "full".into())]);
}
