//! Behind etcd's own gRPC proxy (`etcd grpc-proxy start`, Debian's etcd 3.4): reads, writes,
//! change notifications and the ladder, with sidecars that talk only to the proxy.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;

/// A sidecar that knows its endpoint is a gRPC proxy, with writes on and quick probes.
fn proxied_config(proxy: &GrpcProxy) -> config_sidecar::config::Config {
    let mut config = sidecar_config(std::slice::from_ref(&proxy.endpoint), &["/app/"]);
    config.etcd.grpc_proxy = true;
    config.mode.probe_interval = Duration::from_millis(250);
    // A round still starts every 250 ms; each check gets longer than a busy 2-core machine can
    // stall a healthy member's answer. At 200 ms three slow rounds in a row were a quorum loss
    // to the mode machine: a spurious read-only dip.
    config.mode.probe_timeout = Duration::from_secs(1);
    config.writes.allowed = true;
    config.writes.token = Some("s3cret".into());
    config
}

async fn put(sidecar: &Sidecar, key: &str, value: &str) -> reqwest::Response {
    sidecar
        .http
        .put(sidecar.url(&format!("/v1/kv{key}")))
        .bearer_auth("s3cret")
        .body(value.to_string())
        .send()
        .await
        .unwrap()
}

/// The watchers etcd's members hold, from their own `/metrics`.
async fn member_watchers(cluster: &EtcdCluster) -> f64 {
    let mut total = 0.0;
    for endpoint in cluster.endpoints() {
        let text = metrics_text(&endpoint).await;
        assert!(
            text.contains("etcd_debugging_mvcc_watcher_total "),
            "watcher gauge"
        );
        total += metric_sum(&text, "etcd_debugging_mvcc_watcher_total ");
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_behind_etcds_grpc_proxy_read_write_notify_and_degrade() {
    let mut cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    etcd.put("/app/name", "demo", None).await.unwrap();
    let proxy = cluster.grpc_proxy().await;
    let before = member_watchers(&cluster).await;

    // Three sidecars on one prefix: the proxy gives etcd one watch for all of them.
    let mut sidecars = Vec::new();
    for _ in 0..3 {
        sidecars.push(Arc::new(start_sidecar(proxied_config(&proxy)).await));
    }
    for s in &sidecars {
        assert_eq!(s.value("/v1/kv/app/name").await.as_deref(), Some("demo"));
    }
    eventually(
        Duration::from_secs(5),
        "the proxy's watch opened",
        || async { member_watchers(&cluster).await > before },
    )
    .await;
    let added = member_watchers(&cluster).await - before;
    assert_eq!(
        added, 1.0,
        "three sidecars' watches merged into one at etcd"
    );

    // A change made at etcd reaches every sidecar, and wakes a blocking query.
    let a = sidecars[0].clone();
    let index = index_of(&a.get("/v1/kv/app/name").await);
    let blocked = tokio::spawn(async move {
        let r = a
            .get(&format!("/v1/kv/app/name?index={index}&wait=30s"))
            .await;
        r.text().await.unwrap()
    });
    etcd.put("/app/name", "changed", None).await.unwrap();
    let woke = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("the blocking query answers after the change")
        .unwrap();
    assert_eq!(woke, "changed");
    for s in &sidecars {
        eventually(Duration::from_secs(5), "the change is served", || async {
            s.value("/v1/kv/app/name").await.as_deref() == Some("changed")
        })
        .await;
    }

    // Writes and consistent reads go through the proxy to etcd.
    let r = put(&sidecars[1], "/app/written", "by-sidecar").await;
    assert_eq!(r.status(), 200);
    let got = etcd.get("/app/written", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"by-sidecar");
    etcd.put("/app/direct", "1", None).await.unwrap();
    let r = sidecars[2].get("/v1/kv/app/direct?consistent").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "1");

    // At rest for longer than the watch deadline (3 s) and than the proxy takes to close a
    // connection pinged every second (about 4 s): the watches stay open.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for s in &sidecars {
        let status = s.json("/v1/status").await;
        assert_eq!(
            status["sync"]["reconnects"], 0,
            "the proxied watch was never reopened: {}",
            status["sync"]
        );
        assert_eq!(status["mode"], "full");
        // Silence through the proxy is normal: the watch check does not call it stuck.
        let watch = status["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "watch")
            .unwrap()
            .clone();
        assert_eq!(watch["status"], "healthy", "{watch}");
    }

    // The cluster behind the proxy loses quorum: read-only, reads served, writes refused.
    let leader = cluster.leader_index().await;
    let (a, b) = ((leader + 1) % 3, (leader + 2) % 3);
    cluster.kill(a);
    cluster.kill(b);
    for s in &sidecars {
        let took = s.wait_mode("read-only", Duration::from_secs(20)).await;
        eprintln!("behind the proxy: read-only {took:?} after quorum was lost");
    }
    let s = &sidecars[0];
    let r = s.get("/v1/kv/app/name").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-config-mode"], "read-only");
    let r = put(s, "/app/refused", "no").await;
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "writes_refused");

    // Quorum back: full again by itself, writes accepted, changes flow.
    cluster.restart(a);
    cluster.restart(b);
    cluster.wait_writable(Duration::from_secs(20)).await;
    for s in &sidecars {
        let took = s.wait_mode("full", Duration::from_secs(20)).await;
        eprintln!("behind the proxy: full {took:?} after the cluster became writable");
    }
    assert_eq!(put(s, "/app/after", "back").await.status(), 200);
    etcd.put("/app/name", "after", None).await.unwrap();
    for s in &sidecars {
        eventually(Duration::from_secs(10), "changes flow again", || async {
            s.value("/v1/kv/app/name").await.as_deref() == Some("after")
        })
        .await;
    }
    drop(proxy);
}
