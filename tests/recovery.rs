//! Recovery costs etcd little (issue 28): a sidecar that holds data catches up from its revision
//! (which keys exist now, and the values changed since) instead of reading every value again,
//! even when etcd compacted the revisions it would have resumed its watch from.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    compact_to, etcd_prefix, eventually, metric_sum, metrics_text, proxy_every_member,
    sidecar_config, sidecar_prefix, start_sidecar, EtcdCluster, Fault, SseClient,
};

const KEYS: usize = 200;

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

/// The sidecar's `sync` counters: full loads and catch-ups.
async fn loads(sidecar: &common::Sidecar) -> (u64, u64) {
    let status = sidecar.json("/v1/status").await;
    (
        status["sync"]["full_loads"].as_u64().unwrap(),
        status["sync"]["resumes"].as_u64().unwrap(),
    )
}

/// Cut off from every member while etcd deletes, changes and adds keys and then compacts past
/// the mirror's revision, the sidecar comes back with a catch-up, not a full load: the mirror
/// equals etcd (keys deleted during the outage gone), a change stream receives each change of the
/// outage exactly once, and etcd sends a small part of what the first load cost it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_resume_point_is_caught_up_not_reloaded() {
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    for i in 0..KEYS {
        etcd.put(format!("/rec/k{i:03}"), value(i, "v0"), None)
            .await
            .unwrap();
    }
    let (proxies, urls) = proxy_every_member(&cluster).await;
    let before_start = sent_bytes(&cluster).await;
    let sidecar = start_sidecar(sidecar_config(&urls, &["/rec/"])).await;
    assert_eq!(sidecar_prefix(&sidecar, "/rec/").await.unwrap().len(), KEYS);
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

    for p in &proxies {
        p.set(Fault::Blackhole);
    }
    // While cut off: 20 deleted, 10 changed, 5 added, then everything compacted.
    for i in 0..20 {
        etcd.delete(format!("/rec/k{i:03}"), None).await.unwrap();
    }
    for i in 20..30 {
        etcd.put(format!("/rec/k{i:03}"), value(i, "v1"), None)
            .await
            .unwrap();
    }
    let mut head = 0;
    for i in KEYS..KEYS + 5 {
        let put = etcd
            .put(format!("/rec/k{i:03}"), value(i, "v1"), None)
            .await
            .unwrap();
        head = put.header().unwrap().revision();
    }
    compact_to(&mut etcd, head).await;
    // Read before the heal: etcd's bytes count every client, this test's too.
    let expected = etcd_prefix(&mut etcd, "/rec/").await;
    assert_eq!(expected.len(), KEYS - 20 + 5);
    let before_heal = sent_bytes(&cluster).await;

    for p in &proxies {
        p.set(Fault::Pass);
    }
    eventually(
        Duration::from_secs(20),
        "mirror equals etcd after the catch-up",
        || async { sidecar_prefix(&sidecar, "/rec/").await.as_ref() == Some(&expected) },
    )
    .await;
    assert_eq!(sidecar.get("/v1/kv/rec/k000").await.status(), 404);
    // The counters follow the publication a moment later (same task).
    eventually(Duration::from_secs(5), "the catch-up counted", || async {
        loads(&sidecar).await == (1, 1)
    })
    .await;
    let catch_up = sent_bytes(&cluster).await - before_heal;
    eprintln!("first load {first_load} bytes, catch-up {catch_up} bytes");

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

    // 15 values of 200 and every key's name: about a tenth of the first load here, and a full
    // load would cost all of it again. The bound leaves room for a catch-up tried twice (an
    // attempt cut short on a busy machine is retried as a catch-up) and for the probes' and the
    // watch's own messages, which the count includes.
    assert!(
        catch_up < first_load / 3.0,
        "the catch-up cost etcd {catch_up} bytes, the first load {first_load}"
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
