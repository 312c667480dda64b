//! The mirror against a real 3-member etcd cluster: load, watch, transactions, large prefixes,
//! compaction while cut off, and member failures under the watch.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use etcd_client::{Txn, TxnOp};

/// A conditional GET.
async fn get_if_none_match(sidecar: &Sidecar, path: &str, etag: &str) -> reqwest::Response {
    sidecar
        .http
        .get(sidecar.url(path))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_load_serves_keys_listings_and_trees() {
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    etcd.put("/config/app/db/host", "db.local", None)
        .await
        .unwrap();
    etcd.put("/config/app/db/port", "5432", None).await.unwrap();
    etcd.put("/config/app/features", r#"{"beta":true}"#, None)
        .await
        .unwrap();
    etcd.put("/config/apple", "not mirrored", None)
        .await
        .unwrap();
    let put = etcd.put("/config/app/name", "demo", None).await.unwrap();
    let rev = put.header().unwrap().revision();

    let sidecar = start_sidecar(sidecar_config(&cluster.endpoints(), &["/config/app/"])).await;

    let r = sidecar.get("/v1/kv/config/app/db/host").await;
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["x-config-mode"], "full");
    assert!(
        h["x-config-revision"]
            .to_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
            >= rev
    );
    let etag = h["etag"].to_str().unwrap().to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert_eq!(r.text().await.unwrap(), "db.local");

    // Conditional reads: the same ETag → 304 without a body; another → 200.
    let r = get_if_none_match(&sidecar, "/v1/kv/config/app/db/host", &etag).await;
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
    assert!(r.text().await.unwrap().is_empty());
    let r = get_if_none_match(&sidecar, "/v1/kv/config/app/db/host", "\"1\"").await;
    assert_eq!(r.status(), 200);

    // A change to the key changes its ETag, so the old one no longer matches.
    etcd.put("/config/app/db/host", "db2.local", None)
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "new value", || async {
        sidecar.value("/v1/kv/config/app/db/host").await.as_deref() == Some("db2.local")
    })
    .await;
    let r = get_if_none_match(&sidecar, "/v1/kv/config/app/db/host", &etag).await;
    assert_eq!(r.status(), 200);
    assert_ne!(r.headers()["etag"].to_str().unwrap(), etag);

    let list = sidecar.json("/v1/kv/config/app/?recurse").await;
    let keys: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "/config/app/db/host",
            "/config/app/db/port",
            "/config/app/features",
            "/config/app/name"
        ]
    );
    assert!(list[0]["mod_revision"].as_i64().unwrap() > 0);
    assert_eq!(list[0]["version"], 2);

    let tree = sidecar.json("/v1/tree/config/app").await;
    assert_eq!(
        tree,
        serde_json::json!({
            "db": {"host": "db2.local", "port": 5432},
            "features": {"beta": true},
            "name": "demo"
        })
    );

    // Outside the mirror: 404 naming what is mirrored; inside but absent: 404 key_not_found.
    let r = sidecar.get("/v1/kv/config/apple").await;
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "outside_mirror");
    assert_eq!(
        body["mirrored_prefixes"],
        serde_json::json!(["/config/app/"])
    );
    let r = sidecar.get("/v1/kv/config/app/nope").await;
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "key_not_found");

    let status = sidecar.json("/v1/status").await;
    assert_eq!(status["mode"], "full");
    assert_eq!(status["keys"], 4);
    assert_eq!(status["endpoints"].as_array().unwrap().len(), 3);
    assert_eq!(status["sync"]["state"], "watching");
    sidecar.stop().await;
}

/// A prefix request naming a mirrored prefix without its trailing slash (`/config/app` for
/// `/config/app/`) means that directory for a listing, a stream and a recursive delete alike, as
/// `/v1/tree` does; a shorter or different prefix stays refused, and the recursive delete leaves
/// `/config/apple/` (outside the mirror, though it starts with `/config/app`) untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_named_without_its_slash_means_that_directory() {
    let cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    etcd.put("/config/app/a", "1", None).await.unwrap();
    etcd.put("/config/apple/x", "outside", None).await.unwrap();
    let mut config = sidecar_config(&cluster.endpoints(), &["/config/app/"]);
    config.writes.allowed = true;
    let sidecar = start_sidecar(config).await;

    let with_slash = sidecar.get("/v1/kv/config/app/?recurse").await;
    let revision = with_slash.headers()["x-config-index"].clone();
    let with_slash: serde_json::Value = with_slash.json().await.unwrap();
    let without = sidecar.get("/v1/kv/config/app?recurse").await;
    assert_eq!(without.status(), 200);
    assert_eq!(without.headers()["x-config-index"], revision);
    assert_eq!(
        without.json::<serde_json::Value>().await.unwrap(),
        with_slash
    );
    assert_eq!(with_slash[0]["key"], "/config/app/a");
    assert_eq!(with_slash.as_array().unwrap().len(), 1);

    for refused in [
        "/v1/kv/config/ap?recurse",
        "/v1/kv/config/apple?recurse",
        "/v1/kv/config/app",
        "/v1/watch/config/ap",
        "/v1/watch/config/apple",
    ] {
        let r = sidecar.get(refused).await;
        assert_eq!(r.status(), 404, "{refused}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "outside_mirror", "{refused}");
    }

    let mut stream =
        SseClient::connect(&sidecar.http, &sidecar.url("/v1/watch/config/app"), None).await;
    let put = put_rev(&mut etcd, "/config/app/b", "2").await;
    // The stream opens with the directory's current state, then its changes.
    let mut keys = Vec::new();
    loop {
        let event = stream
            .next(Duration::from_secs(5))
            .await
            .expect("the stream delivers the put");
        if event.event == "put" {
            keys.push(event.json()["key"].as_str().unwrap().to_string());
        }
        if event.id == Some(put.to_string()) {
            break;
        }
    }
    assert_eq!(keys.last().map(String::as_str), Some("/config/app/b"));
    assert!(
        keys.iter().all(|k| k.starts_with("/config/app/")),
        "{keys:?}"
    );

    let r = sidecar
        .http
        .delete(sidecar.url("/v1/kv/config/app?recurse"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let left = etcd
        .get(
            "/config/app",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let left: Vec<&str> = left.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    assert_eq!(left, ["/config/apple/x"]);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_and_deletes_are_visible_within_100ms() {
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    let sidecar = start_sidecar(sidecar_config(&cluster.endpoints(), &["/live/"])).await;
    let mut delays = Vec::new();
    for i in 0..10 {
        let key = format!("/live/k{i}");
        let value = format!("v{i}");
        etcd.put(key.as_str(), value.as_str(), None).await.unwrap();
        let t = Instant::now();
        let path = format!("/v1/kv{key}");
        eventually(Duration::from_secs(5), "put visible", || async {
            sidecar.value(&path).await.as_deref() == Some(value.as_str())
        })
        .await;
        delays.push(t.elapsed());
        etcd.delete(key.as_str(), None).await.unwrap();
        let t = Instant::now();
        eventually(Duration::from_secs(5), "delete visible", || async {
            sidecar.get(&path).await.status() == 404
        })
        .await;
        delays.push(t.elapsed());
    }
    // The promise is 100 ms, and a change typically shows in a few. On a 2-core machine shared
    // with CPU-heavy jobs one change now and then waits out a scheduling delay longer than that,
    // which says nothing of the sidecar: most changes must meet the promise, and every one must
    // show within a second (a sidecar that polled, or missed an event, would not).
    delays.sort();
    eprintln!("visibility delays: {delays:?}");
    let within = delays
        .iter()
        .filter(|d| **d <= Duration::from_millis(100))
        .count();
    assert!(
        within >= 15,
        "only {within} of 20 changes within 100 ms: {delays:?}"
    );
    assert!(
        delays[19] < Duration::from_secs(1),
        "a change took {:?}",
        delays[19]
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_never_seen_half_applied() {
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    let keys = ["/tx/a", "/tx/b", "/tx/c", "/tx/d"];
    let put_all = |i: usize| {
        Txn::new().and_then(
            keys.iter()
                .map(|k| TxnOp::put(*k, i.to_string(), None))
                .collect::<Vec<_>>(),
        )
    };
    etcd.txn(put_all(0)).await.unwrap();
    let sidecar = Arc::new(start_sidecar(sidecar_config(&cluster.endpoints(), &["/tx/"])).await);

    let done = Arc::new(AtomicBool::new(false));
    let seen: [Arc<AtomicUsize>; 2] = Default::default();
    let mut readers = Vec::new();
    for reader in 0..2 {
        let (sidecar, done, distinct) = (sidecar.clone(), done.clone(), seen[reader].clone());
        readers.push(tokio::spawn(async move {
            let mut seen = BTreeSet::new();
            let mut last_revision = 0i64;
            while !done.load(Ordering::Relaxed) {
                let path = if reader == 0 {
                    "/v1/kv/tx/?recurse"
                } else {
                    "/v1/tree/tx"
                };
                let r = sidecar.get(path).await;
                assert_eq!(r.status(), 200);
                let revision: i64 = r.headers()["x-config-revision"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(
                    revision >= last_revision,
                    "revision went back: {last_revision} → {revision}"
                );
                last_revision = revision;
                let body: serde_json::Value = r.json().await.unwrap();
                let values: Vec<String> = if reader == 0 {
                    let list = body.as_array().unwrap();
                    let mods: BTreeSet<i64> = list
                        .iter()
                        .map(|e| e["mod_revision"].as_i64().unwrap())
                        .collect();
                    assert_eq!(mods.len(), 1, "one txn, one mod_revision: {body}");
                    assert!(*mods.iter().next().unwrap() <= revision);
                    list.iter()
                        .map(|e| e["value"].as_str().unwrap().to_string())
                        .collect()
                } else {
                    ["a", "b", "c", "d"]
                        .iter()
                        .map(|k| body[k].to_string())
                        .collect()
                };
                assert_eq!(values.len(), 4, "{body}");
                assert!(
                    values.iter().all(|v| *v == values[0]),
                    "half-applied txn seen: {values:?}"
                );
                seen.insert(values[0].clone());
                distinct.store(seen.len(), Ordering::Relaxed);
            }
            seen.len()
        }));
    }
    // 300 transactions, and more while a reader has seen few states: how many states a reader
    // catches depends on how the machine schedules it, not on the sidecar.
    let started = Instant::now();
    let mut last = 0;
    while last < 300
        || (seen.iter().any(|n| n.load(Ordering::Relaxed) <= 5)
            && started.elapsed() < Duration::from_secs(60))
    {
        last += 1;
        etcd.txn(put_all(last)).await.unwrap();
    }
    let last = last.to_string();
    eventually(Duration::from_secs(10), "last txn visible", || async {
        sidecar.value("/v1/kv/tx/d").await.as_deref() == Some(last.as_str())
    })
    .await;
    done.store(true, Ordering::Relaxed);
    for r in readers {
        let distinct = r.await.unwrap();
        assert!(
            distinct > 5,
            "readers saw only {distinct} states: the test did not exercise much"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_larger_than_4_mib_loads_in_pages() {
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    let value = "x".repeat(1024);
    let n = 20_000;
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|i| TxnOp::put(format!("/big/k{i:05}"), value.clone(), None))
            .collect();
        etcd.txn(Txn::new().and_then(ops)).await.unwrap();
    }
    let sidecar = start_sidecar(sidecar_config(&cluster.endpoints(), &["/big/"])).await;
    let status = sidecar.json("/v1/status").await;
    assert_eq!(status["keys"], n);
    assert!(
        status["bytes"].as_u64().unwrap() > n as u64 * 1024,
        "{status}"
    );
    assert_eq!(
        sidecar.value("/v1/kv/big/k19999").await.unwrap().len(),
        1024
    );
    let list = sidecar.json("/v1/kv/big/?recurse").await;
    assert_eq!(list.as_array().unwrap().len(), n);
    // A change after the load still arrives through the watch.
    etcd.put("/big/k00000", "changed", None).await.unwrap();
    eventually(
        Duration::from_secs(5),
        "watch after a paged load",
        || async { sidecar.value("/v1/kv/big/k00000").await.as_deref() == Some("changed") },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_cut_off_converges_to_etcd_exactly() {
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    let puts = (0..100).map(|i| TxnOp::put(format!("/cmp/k{i:02}"), "v0", None));
    etcd.txn(Txn::new().and_then(puts.collect::<Vec<_>>()))
        .await
        .unwrap();
    let (proxies, urls) = proxy_every_member(&cluster).await;
    let sidecar = start_sidecar(sidecar_config(&urls, &["/cmp/"])).await;
    assert_eq!(sidecar_prefix(&sidecar, "/cmp/").await.unwrap().len(), 100);

    for p in &proxies {
        p.set(Fault::Blackhole);
    }
    // While cut off: delete some, change many, add one, then compact to head. 71 keys changed:
    // more than a catch-up reads one by one (`POINT_READS_AT_MOST`), so it takes the other way,
    // one scan filtered by mod revision (tests/recovery.rs catches up a few by point reads).
    for i in 0..10 {
        etcd.delete(format!("/cmp/k{i:02}"), None).await.unwrap();
    }
    let changes = (10..80).map(|i| TxnOp::put(format!("/cmp/k{i:02}"), "v1", None));
    etcd.txn(Txn::new().and_then(changes.collect::<Vec<_>>()))
        .await
        .unwrap();
    let last = etcd.put("/cmp/new", "fresh", None).await.unwrap();
    let head = last.header().unwrap().revision();
    compact_to(&mut etcd, head).await;
    // The mirror keeps serving what it had while cut off; it never empties.
    assert_eq!(sidecar_prefix(&sidecar, "/cmp/").await.unwrap().len(), 100);

    for p in &proxies {
        p.set(Fault::Pass);
    }
    let expected = etcd_prefix(&mut etcd, "/cmp/").await;
    assert_eq!(expected.len(), 91);
    eventually(
        Duration::from_secs(15),
        "mirror equals etcd after compaction",
        || async { sidecar_prefix(&sidecar, "/cmp/").await.as_ref() == Some(&expected) },
    )
    .await;
    assert_eq!(sidecar.get("/v1/kv/cmp/k00").await.status(), 404);
    // A catch-up, not a full load (tests/recovery.rs measures what it costs etcd). The count
    // follows the published load a moment later (same task, no ordering with reads).
    eventually(Duration::from_secs(5), "the catch-up counted", || async {
        sidecar.json("/v1/status").await["sync"]["resumes"].as_u64() >= Some(1)
    })
    .await;
    let full_loads = sidecar.json("/v1/status").await["sync"]["full_loads"].as_u64();
    assert_eq!(full_loads, Some(1), "only the first load reads every value");
    // And the watch is live again afterwards.
    etcd.put("/cmp/after", "1", None).await.unwrap();
    eventually(Duration::from_secs(5), "watch after resync", || async {
        sidecar.value("/v1/kv/cmp/after").await.as_deref() == Some("1")
    })
    .await;
}

/// Index of the member the sidecar's watch runs on, from `/v1/status`.
async fn watched_member(sidecar: &Sidecar, cluster: &EtcdCluster) -> usize {
    let status = sidecar.json("/v1/status").await;
    let endpoint = status["sync"]["endpoint"].as_str().unwrap().to_string();
    cluster
        .endpoints()
        .iter()
        .position(|e| *e == endpoint)
        .expect("watched endpoint is a member")
}

/// Reads a key in a loop until stopped; every read must succeed.
fn reader(sidecar: Arc<Sidecar>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut reads = 0;
        while !stop.load(Ordering::Relaxed) {
            let r = sidecar.get("/v1/kv/fo/stable").await;
            assert_eq!(r.status(), 200, "a read failed during a member fault");
            reads += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        reads
    })
}

/// What happens to the member the watch runs on.
#[derive(Clone, Copy, Debug)]
enum MemberFault {
    /// SIGKILL, then a restart.
    Kill,
    /// SIGSTOP, then SIGCONT.
    Freeze,
}

/// Faults the watched member while a reader hammers the sidecar: every read succeeds, a change
/// made through another member arrives, and after the member is back changes still arrive.
async fn watched_member_fault_leaves_reads_undisturbed(fault: MemberFault) {
    let mut cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    etcd.put("/fo/stable", "1", None).await.unwrap();
    let sidecar = Arc::new(start_sidecar(sidecar_config(&cluster.endpoints(), &["/fo/"])).await);
    let stop = Arc::new(AtomicBool::new(false));
    let reads = reader(sidecar.clone(), stop.clone());

    // Ready means loaded; the watch (the member to fault) is established a moment later.
    eventually(Duration::from_secs(10), "watch established", || async {
        sidecar.json("/v1/status").await["sync"]["state"] == "watching"
    })
    .await;
    let victim = watched_member(&sidecar, &cluster).await;
    match fault {
        MemberFault::Kill => cluster.kill(victim),
        MemberFault::Freeze => cluster.freeze(victim),
    }
    cluster.wait_writable(Duration::from_secs(15)).await;
    let mut etcd = cluster.client_for((victim + 1) % 3).await;
    etcd.put("/fo/during", "yes", None).await.unwrap();
    let t = Instant::now();
    eventually(
        Duration::from_secs(15),
        "change with the watched member down",
        || async { sidecar.value("/v1/kv/fo/during").await.as_deref() == Some("yes") },
    )
    .await;
    eprintln!("{fault:?}: watch moved off the member in {:?}", t.elapsed());
    assert_ne!(watched_member(&sidecar, &cluster).await, victim);

    match fault {
        MemberFault::Kill => cluster.restart(victim),
        MemberFault::Freeze => cluster.thaw(victim),
    }
    cluster.wait_writable(Duration::from_secs(15)).await;
    etcd.put("/fo/after", "yes", None).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "change after the member is back",
        || async { sidecar.value("/v1/kv/fo/after").await.as_deref() == Some("yes") },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    assert!(reads.await.unwrap() > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_and_restarting_the_watched_member_does_not_disturb_reads() {
    watched_member_fault_leaves_reads_undisturbed(MemberFault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_watched_member_is_detected_and_left() {
    watched_member_fault_leaves_reads_undisturbed(MemberFault::Freeze).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_with_one_endpoint_dead() {
    let mut cluster = EtcdCluster::start(3).await;
    cluster
        .client()
        .await
        .put("/fo/stable", "1", None)
        .await
        .unwrap();
    cluster.kill(0);
    cluster.wait_writable(Duration::from_secs(10)).await;
    // The dead member is first in the list, tried first: the sidecar must move past it.
    let mut config = sidecar_config(&cluster.endpoints(), &["/fo/"]);
    config.etcd.selection = config_sidecar::config::Selection::Ordered;
    let sidecar = start_sidecar(config).await;
    assert_eq!(
        sidecar.value("/v1/kv/fo/stable").await.as_deref(),
        Some("1")
    );
    cluster
        .client_for(1)
        .await
        .put("/fo/k", "2", None)
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "watch on a live member", || async {
        sidecar.value("/v1/kv/fo/k").await.as_deref() == Some("2")
    })
    .await;
    // The dead member rests, is checked when its rest ends, fails and rests again (longer):
    // between a rest's end and its check failing it shows `failing`, so a single look may land
    // there on a slow machine. Resting is what it does nearly all the time; wait to see it.
    eventually(
        Duration::from_secs(10),
        "the dead member resting",
        || async {
            let status = sidecar.json("/v1/status").await;
            let dead = &status["endpoints"][0];
            dead["state"] == "resting" && dead["last_failure"] == "unreachable"
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_is_not_missing_before_the_first_load() {
    // Nothing listens on this endpoint: the sidecar serves HTTP but has no data yet.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let config = sidecar_config(&[dead], &["/cfg/"]);
    let running = config_sidecar::Running::start(config).await.unwrap();
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{base}/v1/kv/cfg/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "not_ready"
    );
    assert_eq!(
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let status = get_json(&http, &format!("{base}/v1/status")).await;
    assert_eq!(status["mode"], "starting");
    assert_eq!(status["ready"], false);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_watch_is_reopened_by_its_deadline_alone() {
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    etcd.put("/quiet/k", "0", None).await.unwrap();
    let (proxies, urls) = proxy_every_member(&cluster).await;
    let mut config = sidecar_config(&urls, &["/quiet/"]);
    // Keep-alive effectively off: only the sidecar's own deadline can notice the silence.
    config.etcd.keepalive_interval = Duration::from_secs(3600);
    config.etcd.keepalive_timeout = Duration::from_secs(3600);
    config.sync.watch_deadline = Duration::from_secs(1);
    let sidecar = start_sidecar(config).await;
    // Ready means loaded; wait until the watch stream itself is established.
    eventually(Duration::from_secs(5), "watch established", || async {
        sidecar.json("/v1/status").await["sync"]["state"] == "watching"
    })
    .await;

    let status = sidecar.json("/v1/status").await;
    let watched = status["sync"]["endpoint"].as_str().unwrap().to_string();
    let proxy = proxies
        .iter()
        .find(|p| p.url() == watched)
        .expect("watched proxy");
    proxy.set(Fault::Blackhole);
    etcd.put("/quiet/k", "1", None).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "change after the watched link went silent",
        || async { sidecar.value("/v1/kv/quiet/k").await.as_deref() == Some("1") },
    )
    .await;
    let status = sidecar.json("/v1/status").await;
    assert_ne!(status["sync"]["endpoint"].as_str().unwrap(), watched);
    let why = status["sync"]["last_interruption"].as_str().unwrap();
    assert!(why.starts_with(&watched) && why.contains("silent"), "{why}");
}
