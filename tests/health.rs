//! Layered health and liveness against a real etcd: `/v1/status` lists each component's check and
//! critical checks decide the whole; a snapshot write that hangs (a FIFO where the temp file goes,
//! so the write blocks like one on a wedged disk) fails `/healthz` until it moves again; an
//! unreachable etcd degrades the status but never fails liveness.

mod common;

use std::time::Duration;

use common::*;
use config_sidecar::config::SnapshotConfig;
use serde_json::Value;

/// The check named `name` in a `/v1/status` body.
fn check<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_and_liveness_follow_real_faults() {
    let mut cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    etcd.put("/h/a", "1", None).await.unwrap();
    // On tmpfs: the writer's 1 s limit is for a write stalled on purpose below, and an fsync on
    // a disk that other jobs keep busy can take longer than that, failing liveness too early.
    let dir = tmpfs_dir("cs-health");
    let path = dir.path().join("mirror.snap");
    let mut config = sidecar_config(&cluster.endpoints(), &["/h/"]);
    let mut snapshot = SnapshotConfig::at(path.clone());
    snapshot.write_timeout = Duration::from_secs(1);
    config.snapshot = Some(snapshot);
    // Far below what any process uses: the memory check says so, without deciding the whole.
    config.memory_budget = Some(1 << 20);
    config.http.shutdown_grace = Duration::from_secs(1);
    let sidecar = start_sidecar(config).await;
    let endpoint = format!("etcd:{}", cluster.endpoint(0));

    eventually(Duration::from_secs(10), "every check in", || async {
        let s = sidecar.json("/v1/status").await;
        s["mode"] == "full"
            && check(&s, &endpoint)["status"] == "healthy"
            && check(&s, "watch")["status"] == "healthy"
            && check(&s, "snapshot")["status"] == "healthy"
    })
    .await;
    let s = sidecar.json("/v1/status").await;
    assert_eq!(check(&s, "tasks")["status"], "healthy", "{s}");
    assert_eq!(check(&s, "tasks")["critical"], true);
    let memory = check(&s, "memory");
    assert_eq!(memory["status"], "unhealthy", "{memory}");
    assert_eq!(memory["critical"], false);
    assert_eq!(
        s["status"], "degraded",
        "only a non-critical check is unhealthy"
    );
    assert_eq!(sidecar.get("/healthz").await.status(), 200);

    // The next snapshot write blocks opening its temp file, as on a wedged disk.
    let fifo = dir
        .path()
        .join(format!("mirror.snap.tmp.{}", std::process::id()));
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    etcd.put("/h/b", "2", None).await.unwrap();
    eventually(Duration::from_secs(15), "liveness fails", || async {
        sidecar.get("/healthz").await.status() == 503
    })
    .await;
    let r = sidecar.get("/healthz").await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "not_alive");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("snapshot-writer made no progress"),
        "{message}"
    );
    let s = sidecar.json("/v1/status").await;
    assert_eq!(s["status"], "unhealthy", "a critical check failed: {s}");
    assert_eq!(check(&s, "tasks")["status"], "unhealthy");
    // Reads go on: liveness is for the platform, not a reason to stop serving.
    assert_eq!(sidecar.value("/v1/kv/h/b").await.as_deref(), Some("2"));

    // The disk moves again: the write completes and liveness recovers by itself.
    let reader = std::thread::spawn(move || std::fs::read(&fifo).map(|b| b.len()));
    eventually(Duration::from_secs(10), "liveness recovers", || async {
        sidecar.get("/healthz").await.status() == 200
    })
    .await;
    assert!(
        reader.join().unwrap().unwrap() > 0,
        "the snapshot went through the FIFO"
    );
    // A FIFO cannot be synced to disk: that write failed, and the metrics count it.
    eventually(
        Duration::from_secs(5),
        "the failed write counted",
        || async {
            let metrics = sidecar.get("/metrics").await.text().await.unwrap();
            metrics
                .lines()
                .find_map(|l| l.strip_prefix("config_sidecar_snapshot_write_failures_total "))
                .and_then(|n| n.parse::<f64>().ok())
                .is_some_and(|n| n >= 1.0)
        },
    )
    .await;

    // etcd gone: its member check fails and the watch is stale, but that is not the sidecar's
    // fault, so the whole is degraded and liveness holds.
    cluster.kill(0);
    eventually(Duration::from_secs(20), "etcd loss seen", || async {
        let s = sidecar.json("/v1/status").await;
        check(&s, &endpoint)["status"] == "unhealthy" && check(&s, "watch")["status"] == "degraded"
    })
    .await;
    let s = sidecar.json("/v1/status").await;
    assert_eq!(s["status"], "degraded", "{s}");
    assert_eq!(sidecar.get("/healthz").await.status(), 200);
    sidecar.stop().await;
}

/// `--memory-budget` warns before the limit: at rest, far under the budget, the memory check is
/// already degraded when the settings let a burst of writes pass it (docs/benchmarks.md: Memory under churn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_check_warns_when_a_burst_could_pass_the_budget() {
    let cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    etcd.put("/m/a", "1", None).await.unwrap();
    let mut config = sidecar_config(&cluster.endpoints(), &["/m/"]);
    // A history of 1 GiB could hold that much under churn; the budget is half of it.
    config.sync.history_bytes = 1 << 30;
    config.memory_budget = Some(512 << 20);
    let sidecar = start_sidecar(config).await;
    let s = sidecar.json("/v1/status").await;
    let memory = &s["memory"];
    let resident = memory["resident_bytes"].as_u64().unwrap();
    let estimate = memory["churn_peak_estimate_bytes"].as_u64().unwrap();
    assert!(resident < 400 << 20, "{memory}: under 80% of the budget");
    assert!(
        estimate > 1 << 30,
        "{memory}: the history's bound is in the estimate"
    );
    assert_eq!(memory["budget_bytes"], 512u64 << 20);
    let check = check(&s, "memory");
    assert_eq!(check["status"], "degraded", "{check}");
    assert!(
        check["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("up to about {estimate} under a burst of writes")),
        "{check}"
    );
}
