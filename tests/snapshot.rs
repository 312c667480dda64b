//! The disk snapshot through the real binary: a corrupt, truncated or foreign snapshot is ignored
//! with a log line and never served in part; a good one is served at once, with readiness waiting
//! for etcd only when asked to.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, free_port, metrics_text, sidecar_command, Process, Signal};
use config_sidecar::mirror::persist;
use config_sidecar::mirror::snapshot::Entry;
use config_sidecar::mirror::store::Store;

/// A good snapshot of `/snap/` with one key.
fn good_snapshot(prefixes: &[&str]) -> Vec<u8> {
    let store = Store::new();
    let entry = Entry::new(
        Bytes::from_static(b"/snap/k"),
        Bytes::from_static(b"from disk"),
        5,
        9,
        2,
    );
    store.replace_from(42, 10, vec![entry]).unwrap();
    let prefixes: Vec<String> = prefixes.iter().map(|p| p.to_string()).collect();
    persist::encode(&store.snapshot(), &prefixes, 1)
}

/// Starts the binary on a free port against an etcd endpoint where nothing listens.
fn start(snapshot: &Path, extra: &[&str]) -> (Process, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut args = vec![
        "--listen",
        &listen,
        "--endpoints",
        &dead,
        "--prefix",
        "/snap/",
    ];
    args.extend_from_slice(extra);
    let child = Process::spawn(
        sidecar_command(args)
            .arg("--snapshot")
            .arg(snapshot)
            .stderr(Stdio::piped()),
    );
    (child, format!("http://{listen}"))
}

/// SIGTERMs the child and returns its stderr.
fn stop(child: Process) -> String {
    child.signal(Signal::TERM);
    let out = child.into_inner().wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    String::from_utf8_lossy(&out.stderr).to_string()
}

async fn status_of(http: &reqwest::Client, url: String) -> Option<u16> {
    http.get(url).send().await.ok().map(|r| r.status().as_u16())
}

async fn wait_status(http: &reqwest::Client, url: String, want: u16, what: &str) {
    eventually(Duration::from_secs(10), what, || {
        let (http, url) = (http.clone(), url.clone());
        async move { status_of(&http, url).await == Some(want) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_snapshots_are_ignored_with_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = good_snapshot(&["/snap/"]);
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"not a snapshot at all".to_vec(), "bad magic"),
        ("truncated", good[..good.len() - 7].to_vec(), "checksum"),
        ("bit-flipped", flipped, "checksum"),
        ("foreign", good_snapshot(&["/other/"]), "mirrors"),
    ];
    let http = reqwest::Client::new();
    for (name, bytes, reason) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let (child, base) = start(&path, &[]);
        wait_status(&http, format!("{base}/healthz"), 200, "binary answers").await;
        // Nothing was loaded: unknown, not missing, and not ready.
        assert_eq!(
            status_of(&http, format!("{base}/v1/kv/snap/k")).await,
            Some(503),
            "{name}"
        );
        assert_eq!(
            status_of(&http, format!("{base}/readyz")).await,
            Some(503),
            "{name}"
        );
        let stderr = stop(child);
        assert!(
            stderr.contains("snapshot ignored") && stderr.contains(reason),
            "{name}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_snapshot_is_served_at_once_and_readiness_can_wait_for_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mirror.snap");
    std::fs::write(&path, good_snapshot(&["/snap/"])).unwrap();
    let http = reqwest::Client::new();

    let (child, base) = start(&path, &[]);
    wait_status(
        &http,
        format!("{base}/readyz"),
        200,
        "ready on the snapshot",
    )
    .await;
    let r = http
        .get(format!("{base}/v1/kv/snap/k"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-config-mode"], "cache-only");
    assert_eq!(r.headers()["x-config-revision"], "10");
    assert_eq!(r.headers()["etag"], "\"9\"");
    assert!(
        r.headers()["x-config-stale-ms"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 1000
    );
    assert_eq!(r.text().await.unwrap(), "from disk");
    stop(child);

    let (child, base) = start(&path, &["--ready-requires-etcd"]);
    wait_status(
        &http,
        format!("{base}/v1/kv/snap/k"),
        200,
        "serving the snapshot",
    )
    .await;
    assert_eq!(status_of(&http, format!("{base}/readyz")).await, Some(503));
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_from_another_cluster_is_replaced_wholesale() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mirror.snap");
    let first = common::EtcdCluster::start(1).await;
    let mut etcd = first.client().await;
    for i in 0..30 {
        etcd.put(format!("/snap/old{i}"), "a", None).await.unwrap();
    }
    let mut config = common::sidecar_config(&first.endpoints(), &["/snap/"]);
    config.snapshot = Some(config_sidecar::config::SnapshotConfig::at(path.clone()));
    let sidecar = common::start_sidecar(config.clone()).await;
    let old_revision: i64 = sidecar.get("/v1/kv/snap/old0").await.headers()["x-config-revision"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The status says what the file on disk holds: none at first, then the mirror's revision.
    eventually(Duration::from_secs(10), "the snapshot written", || async {
        sidecar.json("/v1/status").await["snapshot_file"]["revision"].as_i64() == Some(old_revision)
    })
    .await;
    sidecar.stop().await;
    drop(first);

    // A new cluster, with a lower revision and other keys.
    let second = common::EtcdCluster::start(1).await;
    let mut etcd = second.client().await;
    etcd.put("/snap/new", "b", None).await.unwrap();
    config.etcd.endpoints = second.endpoints();
    let sidecar = common::start_sidecar(config).await;
    let expected = common::etcd_prefix(&mut etcd, "/snap/").await;
    eventually(
        Duration::from_secs(10),
        "mirror equals the new cluster",
        || async { common::sidecar_prefix(&sidecar, "/snap/").await.as_ref() == Some(&expected) },
    )
    .await;
    let status = sidecar.json("/v1/status").await;
    assert!(
        status["revision"].as_i64().unwrap() < old_revision,
        "{status}"
    );
    assert_eq!(status["sync"]["full_loads"], 1);
    assert_eq!(
        status["sync"]["resumes"], 0,
        "another cluster's data: nothing to catch up from"
    );
    sidecar.stop().await;
}

/// A restart while etcd is up serves etcd's data, not the snapshot, which may be older than what
/// was served before the restart: revisions never go back across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_etcd_up_never_serves_an_older_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mirror.snap");
    let cluster = common::EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    etcd.put("/snap/k", "old", None).await.unwrap();
    let mut config = common::sidecar_config(&cluster.endpoints(), &["/snap/"]);
    config.snapshot = Some(config_sidecar::config::SnapshotConfig::at(path.clone()));
    let sidecar = common::start_sidecar(config.clone()).await;
    sidecar.stop().await;
    let on_disk = persist::load(&path, &["/snap/".to_string()])
        .unwrap()
        .unwrap()
        .revision;
    // etcd moves on while the sidecar is down.
    let newer = etcd
        .put("/snap/k", "new", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert!(newer > on_disk);

    let running = config_sidecar::Running::start(config).await.unwrap();
    let url = format!("http://{}/v1/kv/snap/k", running.addr);
    let http = reqwest::Client::new();
    // The first answer that is not "not ready" must already be etcd's (within a deadline: a
    // sidecar that never became ready fails here rather than hanging the suite).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let first = loop {
        let r = http.get(&url).send().await.unwrap();
        if r.status() != 503 {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let revision: i64 = first.headers()["x-config-revision"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        revision >= newer,
        "served revision {revision}, etcd had {newer}"
    );
    assert_eq!(first.text().await.unwrap(), "new");
    running.stop().await.unwrap();
}

/// A restart with etcd up and a current-enough snapshot reads only what changed since it: a
/// changed key, a deleted one and a new one come out exactly as etcd has them, at etcd's
/// revision, counted as a resume rather than a full load, and etcd sends a small part of what the
/// first start's full load cost it (counted by its own `etcd_network_client_grpc_sent_bytes_total`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_etcd_up_reads_only_what_changed_since_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mirror.snap");
    let cluster = common::EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    let value = "v".repeat(1000);
    for i in 0..100 {
        etcd.put(format!("/snap/k{i:03}"), value.as_str(), None)
            .await
            .unwrap();
    }
    let sent = || async {
        let text = metrics_text(&cluster.endpoint(0)).await;
        text.lines()
            .find_map(|l| l.strip_prefix("etcd_network_client_grpc_sent_bytes_total "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap()
    };
    let mut config = common::sidecar_config(&cluster.endpoints(), &["/snap/"]);
    config.snapshot = Some(config_sidecar::config::SnapshotConfig::at(path.clone()));
    let before = sent().await;
    let sidecar = common::start_sidecar(config.clone()).await;
    let first_start = sent().await - before;
    assert_eq!(sidecar.json("/v1/status").await["sync"]["full_loads"], 1);
    sidecar.stop().await;

    etcd.put("/snap/k000", "changed", None).await.unwrap();
    etcd.delete("/snap/k001", None).await.unwrap();
    etcd.put("/snap/new", "born", None).await.unwrap();
    let before = sent().await;
    let sidecar = common::start_sidecar(config).await;
    let restart = sent().await - before;
    let status = sidecar.json("/v1/status").await;
    assert_eq!(status["sync"]["resumes"], 1, "{status}");
    assert_eq!(status["sync"]["full_loads"], 0, "{status}");
    assert_eq!(
        common::sidecar_prefix(&sidecar, "/snap/").await.unwrap(),
        common::etcd_prefix(&mut etcd, "/snap/").await
    );
    assert!(
        restart < first_start / 5.0,
        "etcd sent {restart} bytes for the restart, {first_start} for the first start"
    );
    sidecar.stop().await;
}
