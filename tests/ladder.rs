//! The degradation ladder against a real 3-member cluster: full → read-only → cache-only as members
//! die, writes refused cleanly, a restart served from the disk snapshot, and recovery by itself.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use common::*;
use config_sidecar::config::{Config, SnapshotConfig};

/// A sidecar config with quick probes and the ladder's features on.
fn ladder_config(
    endpoints: &[String],
    snapshot: &std::path::Path,
    webhook: Option<String>,
) -> Config {
    let mut config = sidecar_config(endpoints, &["/app/"]);
    config.mode.probe_interval = Duration::from_millis(250);
    // A round still starts every 250 ms; each check gets longer than a busy 2-core machine can
    // stall a healthy member's answer. At 200 ms three slow rounds in a row were a quorum loss
    // to the mode machine: a spurious read-only dip.
    config.mode.probe_timeout = Duration::from_secs(1);
    config.mode.webhook = webhook;
    // Every transition posted as it happens: the test checks them in order.
    config.mode.alert_min_interval = Duration::ZERO;
    config.writes.allowed = true;
    config.writes.token = Some("s3cret".into());
    config.snapshot = Some(SnapshotConfig::at(snapshot.to_path_buf()));
    config
}

/// A webhook receiver: collects every posted body.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    let app = Router::new().route(
        "/hook",
        post(move |Json(body): Json<serde_json::Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

/// `(from, to)` of each transition as JSON.
/// The mode transitions among the alerts posted (health check changes are posted too).
fn modes_posted(posted: &Mutex<Vec<serde_json::Value>>) -> Vec<serde_json::Value> {
    posted
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "mode")
        .cloned()
        .collect()
}

fn from_to(transitions: &[serde_json::Value]) -> Vec<(String, String)> {
    transitions
        .iter()
        .map(|t| {
            (
                t["from"].as_str().unwrap().into(),
                t["to"].as_str().unwrap().into(),
            )
        })
        .collect()
}

async fn put(
    sidecar: &Sidecar,
    key: &str,
    value: &str,
    if_match: Option<&str>,
) -> reqwest::Response {
    let mut req = sidecar
        .http
        .put(sidecar.url(&format!("/v1/kv{key}")))
        .bearer_auth("s3cret")
        .body(value.to_string());
    if let Some(tag) = if_match {
        req = req.header("if-match", tag);
    }
    req.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ladder_down_and_back_up() {
    let mut cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    etcd.put("/app/name", "demo", None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("mirror.snap");
    let (hook, posted) = webhook_receiver().await;
    let sidecar = start_sidecar(ladder_config(&cluster.endpoints(), &snap, Some(hook))).await;
    sidecar.wait_mode("full", Duration::from_secs(5)).await;

    // Writes in full mode, with read-your-writes and the token.
    let r = put(&sidecar, "/app/color", "blue", None).await;
    assert_eq!(r.status(), 200);
    let written: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        sidecar.value("/v1/kv/app/color").await.as_deref(),
        Some("blue"),
        "read-your-writes"
    );
    let rev = written["revision"].as_i64().unwrap();
    let r = sidecar
        .http
        .put(sidecar.url("/v1/kv/app/color"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no token");
    let r = sidecar
        .http
        .put(sidecar.url("/v1/kv/app/color"))
        .bearer_auth("wrong")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "wrong token");
    let r = put(&sidecar, "/outside", "x", None).await;
    assert_eq!(r.status(), 404, "writes only inside mirrored prefixes");

    // Compare-and-swap: a stale revision is refused and nothing changes; the right one wins.
    let r = put(
        &sidecar,
        "/app/color",
        "red",
        Some(&format!("\"{}\"", rev - 1)),
    )
    .await;
    assert_eq!(r.status(), 412);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["mod_revision"], rev);
    assert_eq!(
        sidecar.value("/v1/kv/app/color").await.as_deref(),
        Some("blue")
    );
    let r = put(&sidecar, "/app/color", "green", Some(&format!("\"{rev}\""))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        sidecar.value("/v1/kv/app/color").await.as_deref(),
        Some("green")
    );
    let r = put(&sidecar, "/app/color", "again", Some("0")).await;
    assert_eq!(r.status(), 412, "If-Match 0 means the key must not exist");
    let r = sidecar
        .http
        .delete(sidecar.url("/v1/kv/app/color"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        sidecar.get("/v1/kv/app/color").await.status(),
        404,
        "read-your-deletes"
    );

    // A consistent read sees a write made straight to etcd a moment ago.
    etcd.put("/app/direct", "1", None).await.unwrap();
    let r = sidecar.get("/v1/kv/app/direct?consistent").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "1");

    // One member down: still full (quorum), health degraded, writes accepted.
    let first = cluster.leader_index().await;
    let (a, b) = ((first + 1) % 3, (first + 2) % 3);
    cluster.kill(a);
    eventually(Duration::from_secs(10), "health degraded", || async {
        sidecar.json("/v1/status").await["health"] == "degraded"
    })
    .await;
    assert_eq!(sidecar.mode().await, "full");
    assert_eq!(
        put(&sidecar, "/app/one-down", "ok", None).await.status(),
        200
    );

    // Two down: read-only. Reads served, writes refused with 503 and nothing written.
    cluster.kill(b);
    let took = sidecar
        .wait_mode("read-only", Duration::from_secs(15))
        .await;
    eprintln!("read-only detected {took:?} after the second kill (probe every 250 ms)");
    let r = sidecar.get("/v1/kv/app/name").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-config-mode"], "read-only");
    assert!(r.headers().contains_key("x-config-stale-ms"));
    assert!(r.headers().contains_key("age"));
    let r = put(&sidecar, "/app/refused", "no", None).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (body["error"].as_str(), body["mode"].as_str()),
        (Some("writes_refused"), Some("read-only"))
    );
    assert!(body["retry_after"].as_u64().unwrap() >= 1);
    assert_eq!(
        sidecar.get("/v1/kv/app/name?consistent").await.status(),
        503
    );

    // Three down: cache-only, reads still served from memory.
    cluster.kill(first);
    sidecar
        .wait_mode("cache-only", Duration::from_secs(15))
        .await;
    let r = sidecar.get("/v1/kv/app/name").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-config-mode"], "cache-only");
    let revision_before: i64 = r.headers()["x-config-revision"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "max_stale refuses a stale mirror",
        || async { sidecar.get("/v1/kv/app/name?max_stale=1s").await.status() == 503 },
    )
    .await;
    let status = sidecar.json("/v1/status").await;
    let transitions = from_to(status["transitions"].as_array().unwrap());
    let expected: Vec<(String, String)> = [
        ("starting", "full"),
        ("full", "read-only"),
        ("read-only", "cache-only"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(transitions, expected);
    eventually(
        Duration::from_secs(10),
        "webhook got every transition",
        || async { modes_posted(&posted).len() >= 3 },
    )
    .await;
    let hooked = from_to(&modes_posted(&posted));
    assert_eq!(
        hooked, expected,
        "the webhook received the transitions in order"
    );
    sidecar.stop().await;

    // A restart while every member is down serves the snapshot.
    let sidecar = start_sidecar(ladder_config(&cluster.endpoints(), &snap, None)).await;
    let r = sidecar.get("/v1/kv/app/name").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-config-mode"], "cache-only");
    let revision_after: i64 = r.headers()["x-config-revision"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        revision_after >= revision_before,
        "revisions never go back across a restart"
    );
    assert_eq!(
        sidecar.value("/v1/kv/app/one-down").await.as_deref(),
        Some("ok")
    );
    assert_eq!(
        put(&sidecar, "/app/refused", "no", None).await.status(),
        503
    );

    // Members back: full again by itself, the mirror equals etcd, writes accepted.
    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_writable(Duration::from_secs(20)).await;
    let took = sidecar.wait_mode("full", Duration::from_secs(20)).await;
    eprintln!("full again {took:?} after the cluster became writable");
    let mut etcd = cluster.client().await;
    etcd.put("/app/after", "back", None).await.unwrap();
    let expected = etcd_prefix(&mut etcd, "/app/").await;
    eventually(Duration::from_secs(5), "mirror equals etcd", || async {
        sidecar_prefix(&sidecar, "/app/").await.as_ref() == Some(&expected)
    })
    .await;
    assert!(
        expected.iter().all(|(k, _)| k != "/app/refused"),
        "a refused write was never written"
    );
    assert_eq!(
        put(&sidecar, "/app/refused", "now-ok", None).await.status(),
        200
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_detected_and_recovered() {
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    etcd.put("/app/k", "0", None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sidecar = start_sidecar(ladder_config(
        &cluster.endpoints(),
        &dir.path().join("s"),
        None,
    ))
    .await;
    sidecar.wait_mode("full", Duration::from_secs(5)).await;

    let leader = cluster.leader_index().await;
    cluster.freeze(leader);
    eventually(Duration::from_secs(10), "frozen leader noticed", || async {
        let status = sidecar.json("/v1/status").await;
        status["health"] == "degraded" && status["probes"][leader]["quorum"] == false
    })
    .await;
    cluster.wait_writable(Duration::from_secs(15)).await;
    let mut other = cluster.client_for((leader + 1) % 3).await;
    other.put("/app/k", "1", None).await.unwrap();
    eventually(
        Duration::from_secs(15),
        "writes flow again with the leader frozen",
        || async { sidecar.value("/v1/kv/app/k").await.as_deref() == Some("1") },
    )
    .await;
    // With probes this quick (250 ms) the election after the freeze (about 1 s) can look like a
    // quorum loss and dip the mode to read-only; either way it must come back by itself.
    sidecar.wait_mode("full", Duration::from_secs(10)).await;

    cluster.thaw(leader);
    eventually(
        Duration::from_secs(15),
        "every member healthy again",
        || async { sidecar.json("/v1/status").await["health"] == "healthy" },
    )
    .await;
    sidecar.stop().await;
}
