//! The operator's pin against a real etcd: read-only refuses writes with the operator's reason;
//! cache-only closes the watch and sends etcd nothing at all (counted by etcd itself) until
//! unpinned, when the sidecar catches up and returns to `full` by itself.

mod common;

use std::time::{Duration, Instant};

use common::*;

const ADMIN: &str = "adm1n-token";
const WRITER: &str = "wr1ter-token";

async fn put(sidecar: &Sidecar, key: &str, value: &str) -> reqwest::Response {
    sidecar
        .http
        .put(sidecar.url(&format!("/v1/kv{key}")))
        .bearer_auth(WRITER)
        .body(value.to_string())
        .send()
        .await
        .unwrap()
}

/// One member's counters: every gRPC call started (unary and streams), every stream message it
/// received, and the watchers it holds.
async fn etcd_counts(endpoint: &str) -> (f64, f64, f64) {
    let text = metrics_text(endpoint).await;
    (
        metric_sum(&text, "grpc_server_started_total{"),
        metric_sum(&text, "grpc_server_msg_received_total{"),
        metric_sum(&text, "etcd_debugging_mvcc_watcher_total "),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_modes_refuse_writes_or_go_silent_and_unpinned_recover() {
    let cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    etcd.put("/app/name", "demo", None).await.unwrap();
    let mut config = sidecar_config(&cluster.endpoints(), &["/app/"]);
    config.mode.probe_interval = Duration::from_millis(250);
    // A round still starts every 250 ms; each check gets longer than a busy 2-core machine can
    // stall a healthy member's answer. At 200 ms three slow rounds in a row were a quorum loss
    // to the mode machine: a spurious read-only dip.
    config.mode.probe_timeout = Duration::from_secs(1);
    config.mode.admin_token = Some(ADMIN.into());
    config.writes.allowed = true;
    config.writes.token = Some(WRITER.into());
    let sidecar = start_sidecar(config).await;
    sidecar.wait_mode("full", Duration::from_secs(10)).await;

    // Pinned read-only: reads served, writes refused with the operator's reason, shown everywhere.
    let answer = sidecar.pin(ADMIN, "read-only", "etcd maintenance").await;
    assert_eq!(answer["mode"], "read-only");
    let r = sidecar.get("/v1/kv/app/name").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-config-mode"], "read-only");
    assert_eq!(r.headers()["x-config-pinned"], "read-only");
    let r = put(&sidecar, "/app/refused", "no").await;
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "writes_refused");
    assert_eq!(body["pin"]["reason"], "etcd maintenance");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("etcd maintenance"));
    assert_eq!(etcd.get("/app/refused", None).await.unwrap().count(), 0);
    let status = sidecar.json("/v1/status").await;
    assert_eq!(status["pin"]["mode"], "read-only");
    assert_eq!(status["pin"]["source"], "api");
    assert!(status["pin"]["since_unix_ms"].as_u64().unwrap() > 0);
    let metrics = sidecar.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("config_sidecar_mode_pinned{mode=\"read-only\"} 1"),
        "{metrics}"
    );
    // The facts still flow behind a read-only pin.
    etcd.put("/app/name", "seen-while-read-only", None)
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "changes flow", || async {
        sidecar.value("/v1/kv/app/name").await.as_deref() == Some("seen-while-read-only")
    })
    .await;
    sidecar.pin(ADMIN, "auto", "maintenance over").await;
    sidecar.wait_mode("full", Duration::from_secs(5)).await;
    assert_eq!(put(&sidecar, "/app/written", "yes").await.status(), 200);

    // Pinned cache-only: the watch closes and etcd hears nothing more from the sidecar.
    let answer = sidecar.pin(ADMIN, "cache-only", "etcd upgrade").await;
    assert_eq!(answer["mode"], "cache-only");
    let endpoint = cluster.endpoint(0);
    // The count starts once the watch has closed and nothing has arrived for two probe intervals:
    // a probe round that began just before the pin may still have calls on their way, and a busy
    // machine delays them past the watch's close. A sidecar that keeps calling is never quiet
    // that long, and one that calls again later is caught by the window below.
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = loop {
        let seen = etcd_counts(&endpoint).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        if seen.2 == 0.0 && etcd_counts(&endpoint).await == seen {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar's watch did not close, or calls kept arriving: {seen:?}"
        );
    };
    // A window of many probe intervals (250 ms) and idle rounds (2 s): nothing may arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = etcd_counts(&endpoint).await;
    assert_eq!(
        (after.0 - before.0, after.1 - before.1, after.2),
        (0.0, 0.0, 0.0),
        "calls started, stream messages received, watchers: etcd heard nothing"
    );
    let status = sidecar.json("/v1/status").await;
    assert_eq!(status["sync"]["state"], "held");
    let r = sidecar.get("/v1/kv/app/name").await;
    assert_eq!(r.status(), 200, "reads are served from memory");
    assert_eq!(r.headers()["x-config-mode"], "cache-only");
    assert_eq!(r.headers()["x-config-pinned"], "cache-only");
    assert_eq!(
        sidecar.get("/v1/kv/app/name?consistent").await.status(),
        503,
        "a consistent read would need etcd"
    );
    let after_consistent = etcd_counts(&endpoint).await;
    assert_eq!(after_consistent.0, after.0, "not even for ?consistent");
    etcd.put("/app/name", "changed-while-pinned", None)
        .await
        .unwrap();

    // Unpinned: it resumes from its revision, catches up and is full again by itself.
    sidecar.pin(ADMIN, "auto", "upgrade done").await;
    let took = sidecar.wait_mode("full", Duration::from_secs(10)).await;
    eprintln!("full {took:?} after the cache-only pin was lifted");
    eventually(Duration::from_secs(5), "caught up", || async {
        sidecar.value("/v1/kv/app/name").await.as_deref() == Some("changed-while-pinned")
    })
    .await;
    let status = sidecar.json("/v1/status").await;
    assert!(status["pin"].is_null());
    let reasons: Vec<String> = status["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["reason"].as_str().unwrap().to_string())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("pinned to cache-only by the operator: etcd upgrade")),
        "{reasons:?}"
    );
    assert_eq!(status["sync"]["full_loads"], 1, "resumed, not reloaded");
    sidecar.stop().await;
}
