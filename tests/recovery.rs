//! Recovery costs etcd little (issue 28): a sidecar that holds data catches up from its revision
//! (which keys exist now, and the values changed since) instead of reading every value again,
//! whether it held the data in memory while cut off, while pinned `cache-only`, or from its disk
//! snapshot served while etcd was too slow to answer a restart; even when etcd compacted the
//! revisions it would have resumed its watch from, and when a catch-up is cut short. Costs are
//! counted by etcd itself.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    compact_to, etcd_prefix, eventually, metric_sum, metrics_text, proxy_every_member,
    sidecar_config, sidecar_prefix, start_sidecar, EtcdCluster, Fault, Proxy, Sidecar, SseClient,
};

const KEYS: usize = 200;
const PREFIX: &str = "/rec/";
const ADMIN: &str = "adm1n-token";

/// A value of about 1 KiB, so a full load is worth avoiding and its cost shows in etcd's bytes.
fn value(i: usize, version: &str) -> String {
    format!("{version}-{i}-{}", "x".repeat(1000))
}

/// Bytes every member has sent its gRPC clients so far, from etcd's own `/metrics`.
async fn sent_bytes(cluster: &EtcdCluster) -> f64 {
    let mut total = 0.0;
    for endpoint in cluster.endpoints() {
        let text = metrics_text(&endpoint).await;
        total += metric_sum(&text, "etcd_network_client_grpc_sent_bytes_total ");
    }
    total
}

/// Sets `fault` on every proxy.
fn set_all(proxies: &[Proxy], fault: Fault) {
    for p in proxies {
        p.set(fault);
    }
}

/// The sidecar's `sync` counters: full loads and catch-ups.
async fn loads(sidecar: &Sidecar) -> (u64, u64) {
    let status = sidecar.json("/v1/status").await;
    (
        status["sync"]["full_loads"].as_u64().unwrap(),
        status["sync"]["resumes"].as_u64().unwrap(),
    )
}

async fn fill(etcd: &mut etcd_client::Client) {
    for i in 0..KEYS {
        etcd.put(format!("{PREFIX}k{i:03}"), value(i, "v0"), None)
            .await
            .unwrap();
    }
}

/// What happens while the sidecar is away: 20 keys deleted, 10 changed, 5 added, then every
/// revision compacted, so no watch can resume. Returns etcd's state after it, read now (etcd's
/// bytes count every client, this test's too, so nothing is read from etcd after the heal).
async fn outage(etcd: &mut etcd_client::Client) -> Vec<(String, String)> {
    for i in 0..20 {
        etcd.delete(format!("{PREFIX}k{i:03}"), None).await.unwrap();
    }
    for i in 20..30 {
        etcd.put(format!("{PREFIX}k{i:03}"), value(i, "v1"), None)
            .await
            .unwrap();
    }
    let mut head = 0;
    for i in KEYS..KEYS + 5 {
        let put = etcd
            .put(format!("{PREFIX}k{i:03}"), value(i, "v1"), None)
            .await
            .unwrap();
        head = put.header().unwrap().revision();
    }
    compact_to(etcd, head).await;
    let expected = etcd_prefix(etcd, PREFIX).await;
    assert_eq!(expected.len(), KEYS - 20 + 5);
    expected
}

/// After the heal: the mirror equals etcd's `expected` state (keys deleted in the outage gone),
/// the sidecar counted `loads` (full loads, catch-ups), and etcd sent since `before` a small part
/// of what one full load costs it, `full_load` bytes.
async fn caught_up(
    sidecar: &Sidecar,
    cluster: &EtcdCluster,
    expected: &[(String, String)],
    loads_after: (u64, u64),
    before: f64,
    full_load: f64,
) {
    eventually(
        Duration::from_secs(20),
        "mirror equals etcd after the catch-up",
        || async { sidecar_prefix(sidecar, PREFIX).await.as_deref() == Some(expected) },
    )
    .await;
    assert_eq!(sidecar.get("/v1/kv/rec/k000").await.status(), 404);
    // The counters follow the publication a moment later (same task).
    eventually(Duration::from_secs(5), "the catch-up counted", || async {
        loads(sidecar).await == loads_after
    })
    .await;
    let catch_up = sent_bytes(cluster).await - before;
    eprintln!("full load {full_load} bytes, catch-up {catch_up} bytes");
    // 15 values of 200 and every key's name: about a tenth of a full load, which would cost all
    // of it again. The bound leaves room for a catch-up tried twice (an attempt cut short on a
    // busy machine is retried as a catch-up) and for the probes' and the watch's own messages,
    // which the count includes.
    assert!(
        catch_up < full_load / 3.0,
        "the catch-up cost etcd {catch_up} bytes, a full load {full_load}"
    );
}

/// Cut off from every member while etcd changes and compacts past the mirror's revision, the
/// sidecar comes back with a catch-up, not a full load, and a change stream receives each change
/// of the outage exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_resume_point_is_caught_up_not_reloaded() {
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    fill(&mut etcd).await;
    let (proxies, urls) = proxy_every_member(&cluster).await;
    let before_start = sent_bytes(&cluster).await;
    let sidecar = start_sidecar(sidecar_config(&urls, &[PREFIX])).await;
    assert_eq!(sidecar_prefix(&sidecar, PREFIX).await.unwrap().len(), KEYS);
    let first_load = sent_bytes(&cluster).await - before_start;
    assert_eq!(loads(&sidecar).await, (1, 0));
    let mut stream = SseClient::connect(&sidecar.http, &sidecar.url("/v1/watch/rec/"), None).await;
    // A new stream starts with the state: `reset`, then every key.
    let first = stream.next(Duration::from_secs(10)).await.expect("reset");
    assert_eq!(first.event, "reset", "{}", first.data);
    for _ in 0..KEYS {
        let event = stream
            .next(Duration::from_secs(10))
            .await
            .expect("the state");
        assert_eq!(event.event, "put", "{}", event.data);
    }

    set_all(&proxies, Fault::Blackhole);
    let expected = outage(&mut etcd).await;
    let before_heal = sent_bytes(&cluster).await;
    set_all(&proxies, Fault::Pass);
    caught_up(
        &sidecar,
        &cluster,
        &expected,
        (1, 1),
        before_heal,
        first_load,
    )
    .await;

    // The stream: after the outage, each of its 35 changes once (a `resync` first says they sum
    // up revisions etcd no longer has), and nothing else.
    let mut changes: BTreeMap<String, (String, usize)> = BTreeMap::new();
    let mut resyncs = 0;
    while changes.len() < 35 {
        let Some(event) = stream.next(Duration::from_secs(10)).await else {
            panic!("the stream stopped after {changes:?}");
        };
        match event.event.as_str() {
            "resync" => resyncs += 1,
            "put" | "delete" => {
                let key = event.json()["key"].as_str().unwrap().to_string();
                changes.entry(key).or_insert((event.event.clone(), 0)).1 += 1;
            }
            other => panic!("unexpected event {other}: {}", event.data),
        }
    }
    assert_eq!(resyncs, 1);
    assert!(changes.values().all(|(_, n)| *n == 1), "{changes:?}");
    let deletes = changes.values().filter(|(e, _)| e == "delete").count();
    assert_eq!((deletes, changes.len() - deletes), (20, 15));
    assert!(
        stream.next(Duration::from_millis(500)).await.is_none(),
        "more than the outage's changes"
    );

    // And the watch runs again from the caught-up revision.
    etcd.put("/rec/after", "1", None).await.unwrap();
    eventually(
        Duration::from_secs(5),
        "watch after the catch-up",
        || async { sidecar.value("/v1/kv/rec/after").await.as_deref() == Some("1") },
    )
    .await;
}

/// A catch-up cut short (its listing stalls past the request timeout, as under a herd of
/// reconnecting sidecars) is tried again as a catch-up from the data still held: never a full load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_cut_short_is_retried_as_a_catch_up() {
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    fill(&mut etcd).await;
    let (proxies, urls) = proxy_every_member(&cluster).await;
    let mut config = sidecar_config(&urls, &[PREFIX]);
    // Small pages through a slow link make the catch-up's listing take many seconds (41 pages,
    // each at least two delayed chunks): a wide window to cut it in, found by polling, not timed.
    config.sync.page_size = 5;
    let before_start = sent_bytes(&cluster).await;
    let sidecar = start_sidecar(config).await;
    let first_load = sent_bytes(&cluster).await - before_start;
    assert_eq!(loads(&sidecar).await, (1, 0));

    set_all(&proxies, Fault::Blackhole);
    let expected = outage(&mut etcd).await;
    let before_heal = sent_bytes(&cluster).await;
    let slow = Fault::Delay {
        base: Duration::from_millis(200),
        jitter: Duration::ZERO,
    };
    set_all(&proxies, slow);
    // The watch's resume point is compacted: the sidecar starts catching up, slowly.
    eventually(
        Duration::from_secs(30),
        "the catch-up under way",
        || async { sidecar.json("/v1/status").await["sync"]["state"] == "loading" },
    )
    .await;
    let status = sidecar.json("/v1/status").await;
    let reconnects = status["sync"]["reconnects"].as_u64().unwrap();
    set_all(&proxies, Fault::Blackhole);
    assert_eq!(loads(&sidecar).await, (1, 0), "cut before it completed");
    eventually(Duration::from_secs(20), "the catch-up failed", || async {
        let status = sidecar.json("/v1/status").await;
        status["sync"]["reconnects"].as_u64().unwrap() > reconnects
    })
    .await;
    let status = sidecar.json("/v1/status").await;
    assert_eq!(loads(&sidecar).await, (1, 0), "{status}");
    // Meanwhile it serves what it held (a key the outage deleted), not an empty or half mirror.
    assert_eq!(
        sidecar.value("/v1/kv/rec/k000").await,
        Some(value(0, "v0")),
        "the data held"
    );

    set_all(&proxies, Fault::Pass);
    caught_up(
        &sidecar,
        &cluster,
        &expected,
        (1, 1),
        before_heal,
        first_load,
    )
    .await;
}

/// Pinned `cache-only` (etcd maintenance) while etcd changes and compacts, then unpinned: a
/// catch-up from the mirror's revision, not a full load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpinning_after_a_compaction_catches_up() {
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    fill(&mut etcd).await;
    let mut config = sidecar_config(&cluster.endpoints(), &[PREFIX]);
    config.mode.admin_token = Some(ADMIN.into());
    let before_start = sent_bytes(&cluster).await;
    let sidecar = start_sidecar(config).await;
    let first_load = sent_bytes(&cluster).await - before_start;
    assert_eq!(loads(&sidecar).await, (1, 0));

    sidecar.pin(ADMIN, "cache-only", "etcd maintenance").await;
    eventually(Duration::from_secs(10), "the watch held", || async {
        sidecar.json("/v1/status").await["sync"]["state"] == "held"
    })
    .await;
    let expected = outage(&mut etcd).await;
    let before_unpin = sent_bytes(&cluster).await;
    sidecar.pin(ADMIN, "auto", "maintenance over").await;
    caught_up(
        &sidecar,
        &cluster,
        &expected,
        (1, 1),
        before_unpin,
        first_load,
    )
    .await;
}

/// A restart while every member is frozen: the sidecar serves its disk snapshot after the
/// fallback wait, and once etcd answers it catches up from that snapshot (which is older than
/// etcd by a compacted outage), without a full load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_that_served_its_snapshot_catches_up_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    fill(&mut etcd).await;
    let mut config = sidecar_config(&cluster.endpoints(), &[PREFIX]);
    config.snapshot = Some(config_sidecar::config::SnapshotConfig::at(
        dir.path().join("mirror.snap"),
    ));
    let before_start = sent_bytes(&cluster).await;
    let sidecar = start_sidecar(config.clone()).await;
    let first_load = sent_bytes(&cluster).await - before_start;
    sidecar.stop().await; // writes the snapshot

    let expected = outage(&mut etcd).await;
    let before_restart = sent_bytes(&cluster).await;
    for i in 0..3 {
        cluster.freeze(i);
    }
    let sidecar = start_sidecar(config).await;
    let r = sidecar.get("/v1/kv/rec/k000").await;
    assert_eq!(r.status(), 200, "the snapshot's data");
    assert_eq!(r.headers()["x-config-mode"], "cache-only");
    for i in 0..3 {
        cluster.thaw(i);
    }
    caught_up(
        &sidecar,
        &cluster,
        &expected,
        (0, 1),
        before_restart,
        first_load,
    )
    .await;
}

/// Calls of etcd's `Status` that member `i` has started so far: only the sidecar's probes call it.
async fn status_calls(cluster: &EtcdCluster, i: usize) -> f64 {
    let text = metrics_text(&cluster.endpoint(i)).await;
    metric_sum(&text, "grpc_server_started_total{grpc_method=\"Status\"")
}

/// A quorum loss that lasts: once the sidecar has gone `read-only` (its rounds decided it), the
/// probes slow down, so a fleet does not ask the surviving member every second; when quorum
/// returns, the sidecar is `full` again promptly (the watch running again cuts a slow wait short).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_slow_down_in_a_lasting_outage_and_recovery_stays_prompt() {
    let mut cluster = EtcdCluster::start(3).await;
    let sidecar = start_sidecar(sidecar_config(&cluster.endpoints(), &[PREFIX])).await;
    // Both followers killed: the leader that is left has no quorum.
    let survivor = cluster.leader_index().await;
    for i in (0..3).filter(|&i| i != survivor) {
        cluster.kill(i);
    }
    sidecar
        .wait_mode("read-only", Duration::from_secs(30))
        .await;
    // Rounds of one second would make 15 in these 15 s (they did, before the rounds slowed);
    // slowed (a window doubling from 1 s to the 5 s bound, each wait drawn from its upper half)
    // they make 7 at most.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = status_calls(&cluster, survivor).await;
    let window = Duration::from_secs(15);
    tokio::time::sleep(window).await;
    let rounds = status_calls(&cluster, survivor).await - before;
    assert!(
        (2.0..=8.0).contains(&rounds),
        "{rounds} probe rounds reached the surviving member in {window:?}"
    );
    assert_eq!(sidecar.mode().await, "read-only");

    for i in (0..3).filter(|&i| i != survivor) {
        cluster.restart(i);
    }
    let back = sidecar.wait_mode("full", Duration::from_secs(20)).await;
    eprintln!("{rounds} probe rounds in {window:?} of the outage; full again after {back:?}");
}
