//! Change notifications against real etcd: blocking queries and server-sent event streams.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use etcd_client::{Txn, TxnOp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_fire_on_change_and_time_out() {
    let cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    etcd.put("/lp/a", "1", None).await.unwrap();
    let sidecar = Arc::new(start_sidecar(sidecar_config(&cluster.endpoints(), &["/lp/"])).await);
    let index = index_of(&sidecar.get("/v1/kv/lp/a").await);

    // A blocking read of one key returns when that key changes, and not before.
    let s = sidecar.clone();
    let mut blocked = tokio::spawn(async move {
        let r = s.get(&format!("/v1/kv/lp/a?index={index}&wait=30s")).await;
        let i = index_of(&r);
        (i, r.text().await.unwrap())
    });
    if let Ok(done) = tokio::time::timeout(Duration::from_millis(300), &mut blocked).await {
        panic!("the blocking query returned without a change: {done:?}");
    }
    // Another key in the prefix does not wake a query on /lp/a.
    etcd.put("/lp/other", "x", None).await.unwrap();
    let t = Instant::now();
    etcd.put("/lp/a", "2", None).await.unwrap();
    let (new_index, value) = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("the blocking query answers after the change")
        .unwrap();
    assert_eq!(value, "2");
    assert!(new_index > index);
    eprintln!("blocking query woke {:?} after the put", t.elapsed());

    // An index already behind the key's last change answers at once.
    let t = Instant::now();
    let r = sidecar
        .get(&format!("/v1/kv/lp/a?index={index}&wait=30s"))
        .await;
    assert_eq!(r.text().await.unwrap(), "2");
    assert!(t.elapsed() < Duration::from_secs(5));

    // Nothing changes: it answers when `wait` ends (plus at most 1/16 jitter) with the current state.
    let current = index_of(&sidecar.get("/v1/kv/lp/a").await);
    let t = Instant::now();
    let r = sidecar
        .get(&format!("/v1/kv/lp/a?index={current}&wait=1s"))
        .await;
    let waited = t.elapsed();
    assert_eq!(r.status(), 200);
    assert_eq!(index_of(&r), current);
    assert!(
        waited >= Duration::from_secs(1),
        "answered early: {waited:?}"
    );
    // A liveness bound, not the promise (`wait` plus 1/16): a loaded machine can be seconds late
    // answering, and a query that ignored `wait` would still be waiting at 30 s.
    assert!(waited < Duration::from_secs(8), "answered late: {waited:?}");

    // Prefix and tree queries wake on a new key under them.
    let current = index_of(&sidecar.get("/v1/kv/lp/?recurse").await);
    let s = sidecar.clone();
    let list = tokio::spawn(async move {
        s.get(&format!("/v1/kv/lp/?recurse&index={current}&wait=30s"))
            .await
    });
    let s = sidecar.clone();
    let tree = tokio::spawn(async move {
        s.get(&format!("/v1/tree/lp?index={current}&wait=30s"))
            .await
    });
    tokio::task::yield_now().await;
    etcd.put("/lp/new", "3", None).await.unwrap();
    for handle in [list, tree] {
        let r = tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .unwrap()
            .unwrap();
        assert!(index_of(&r) > current);
        assert!(r.text().await.unwrap().contains("new"));
    }

    assert_eq!(sidecar.get("/v1/kv/lp/a?index=-1").await.status(), 400);
    assert_eq!(
        sidecar
            .get("/v1/kv/lp/a?index=1&wait=forever")
            .await
            .status(),
        400
    );
}

/// Reads events until one carries `id >= revision`; returns every event read.
async fn read_until(client: &mut SseClient, revision: i64, within: Duration) -> Vec<SseEvent> {
    let deadline = Instant::now() + within;
    let mut events = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(event) = client.next(left).await else {
            panic!("stream ended or stalled before revision {revision}; got {events:?}");
        };
        let done = event
            .id
            .as_deref()
            .is_some_and(|id| id.parse::<i64>().unwrap() >= revision);
        events.push(event);
        if done {
            return events;
        }
    }
}

/// A connection that asks for the stream at `path` and then reads nothing (until the test does).
async fn unread_stream(sidecar: &Sidecar, path: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut socket = tokio::net::TcpStream::connect(sidecar.addr())
        .await
        .unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    socket.write_all(head.as_bytes()).await.unwrap();
    socket
}

/// `(event, key, mod_revision)` of each put/delete event.
fn summary(events: &[SseEvent]) -> Vec<(String, String, i64)> {
    events
        .iter()
        .filter(|e| e.event == "put" || e.event == "delete")
        .map(|e| {
            let j = e.json();
            (
                e.event.clone(),
                j["key"].as_str().unwrap().to_string(),
                j["mod_revision"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_delivers_every_event_in_order_to_1000_subscribers() {
    let cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    etcd.put("/sse/seed", "0", None).await.unwrap();
    let sidecar = start_sidecar(sidecar_config(&cluster.endpoints(), &["/sse/"])).await;
    let start = index_of(&sidecar.get("/v1/kv/sse/seed").await);

    let subscribers = 1000;
    let url = sidecar.url(&format!("/v1/watch/sse/?since={start}"));
    let mut clients = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        clients.push(SseClient::connect(&sidecar.http, &url, None).await);
    }
    assert_eq!(clients[0].headers["content-type"], "text/event-stream");

    // Puts, deletes and a three-key transaction.
    let mut expected = Vec::new();
    for i in 0..20 {
        let key = format!("/sse/k{i}");
        let r = etcd.put(key.as_str(), format!("v{i}"), None).await.unwrap();
        expected.push(("put".to_string(), key, r.header().unwrap().revision()));
    }
    let txn = Txn::new().and_then(vec![
        TxnOp::put("/sse/t1", "x", None),
        TxnOp::put("/sse/t2", "x", None),
        TxnOp::delete("/sse/k0", None),
    ]);
    let r = etcd.txn(txn).await.unwrap();
    let txn_rev = r.header().unwrap().revision();
    expected.push(("put".into(), "/sse/t1".into(), txn_rev));
    expected.push(("put".into(), "/sse/t2".into(), txn_rev));
    expected.push(("delete".into(), "/sse/k0".into(), txn_rev));
    let r = etcd.delete("/sse/k1", None).await.unwrap();
    let last = r.header().unwrap().revision();
    expected.push(("delete".into(), "/sse/k1".into(), last));
    etcd.put("/outside-the-prefix", "ignored", None)
        .await
        .unwrap();

    let t = Instant::now();
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move { read_until(&mut c, last, Duration::from_secs(30)).await })
        })
        .collect();
    for reader in readers {
        let events = reader.await.unwrap();
        let mut got = summary(&events);
        // Within one revision the order of keys is etcd's; compare revision by revision as sets.
        got.sort_by(|a, b| (a.2, &a.1).cmp(&(b.2, &b.1)));
        let mut want = expected.clone();
        want.sort_by(|a, b| (a.2, &a.1).cmp(&(b.2, &b.1)));
        assert_eq!(got, want);
        // Ids only on the last event of a revision, and increasing.
        let ids: Vec<i64> = events
            .iter()
            .filter_map(|e| e.id.as_ref())
            .map(|i| i.parse().unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert_eq!(ids.len(), 22, "one id per revision");
    }
    eprintln!(
        "{subscribers} subscribers got all events within {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumes_with_and_without_a_gap() {
    let cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    etcd.put("/rs/a", "1", None).await.unwrap();
    etcd.put("/rs/b", "1", None).await.unwrap();
    let sidecar = start_sidecar(sidecar_config(&cluster.endpoints(), &["/rs/"])).await;

    // A fresh stream starts with reset and the full state.
    let mut c = SseClient::connect(&sidecar.http, &sidecar.url("/v1/watch/rs/"), None).await;
    let reset = c.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(reset.event, "reset");
    let state: Vec<SseEvent> = vec![
        c.next(Duration::from_secs(5)).await.unwrap(),
        c.next(Duration::from_secs(5)).await.unwrap(),
    ];
    assert_eq!(
        summary(&state)
            .iter()
            .map(|s| s.1.as_str())
            .collect::<Vec<_>>(),
        ["/rs/a", "/rs/b"]
    );
    let resume_at = state[1]
        .id
        .clone()
        .expect("the last event of the reset carries the id");

    let r = etcd.put("/rs/c", "2", None).await.unwrap();
    let first = r.header().unwrap().revision();
    let got = read_until(&mut c, first, Duration::from_secs(5)).await;
    assert_eq!(
        summary(&got),
        vec![("put".to_string(), "/rs/c".to_string(), first)]
    );
    drop(c);

    // Changes while disconnected, then resume with Last-Event-ID: exactly the missed events.
    let mut missed = Vec::new();
    etcd.delete("/rs/a", None).await.unwrap();
    for key in ["/rs/d", "/rs/e"] {
        let r = etcd.put(key, "3", None).await.unwrap();
        missed.push(r.header().unwrap().revision());
    }
    let last = *missed.last().unwrap();
    let mut c = SseClient::connect(
        &sidecar.http,
        &sidecar.url("/v1/watch/rs/"),
        Some(&first.to_string()),
    )
    .await;
    let got = read_until(&mut c, last, Duration::from_secs(5)).await;
    assert!(
        got.iter().all(|e| e.event != "reset"),
        "no reset when the history covers the gap"
    );
    let keys: Vec<(String, String)> = summary(&got).into_iter().map(|s| (s.0, s.1)).collect();
    assert_eq!(
        keys,
        [("delete", "/rs/a"), ("put", "/rs/d"), ("put", "/rs/e")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
    );

    // Resuming from before the history (older than the sidecar's first load): reset, then state.
    let mut c =
        SseClient::connect(&sidecar.http, &sidecar.url("/v1/watch/rs/?since=1"), None).await;
    let got = read_until(&mut c, last, Duration::from_secs(5)).await;
    assert_eq!(got[0].event, "reset");
    let keys: Vec<String> = summary(&got).into_iter().map(|s| s.1).collect();
    assert_eq!(keys, ["/rs/b", "/rs/c", "/rs/d", "/rs/e"]);
    assert!(resume_at.parse::<i64>().unwrap() < first);
    assert_eq!(
        sidecar
            .get(&format!("/v1/watch/rs/?since={}", last + 1000))
            .await
            .status(),
        400,
        "a revision ahead of the mirror is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_does_not_delay_the_others() {
    use tokio::io::AsyncReadExt;
    let cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    etcd.put("/st/seed", "0", None).await.unwrap();
    let mut config = sidecar_config(&cluster.endpoints(), &["/st/"]);
    // The stalled client must still be connected when it reads at last, however long the 1220
    // revisions take on a loaded machine: its send timeout (60 s by default) is not under test.
    config.http.send_timeout = Duration::from_secs(600);
    let sidecar = start_sidecar(config).await;

    // The stalled one: asks for the stream and never reads.
    let mut stalled = unread_stream(&sidecar, "/v1/watch/st/").await;
    let mut healthy = SseClient::connect(&sidecar.http, &sidecar.url("/v1/watch/st/"), None).await;
    assert_eq!(
        healthy.next(Duration::from_secs(5)).await.unwrap().event,
        "reset"
    );

    // Enough to fill the stalled socket's buffers and overrun its place in the shared buffer.
    let value = "v".repeat(16 * 1024);
    let mut last = 0;
    let t = Instant::now();
    let mut reader_progress = Vec::new();
    for batch in 0..120 {
        let ops: Vec<TxnOp> = (0..12)
            .map(|i| TxnOp::put(format!("/st/k{batch}-{i}"), value.clone(), None))
            .collect();
        last = etcd
            .txn(Txn::new().and_then(ops))
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        // The healthy subscriber keeps up while the stalled one does not read.
        let got = read_until(&mut healthy, last, Duration::from_secs(5)).await;
        reader_progress.push(got.len());
    }
    for batch in 0..1100 {
        last = put_rev(&mut etcd, format!("/st/small{batch}"), "s").await;
    }
    read_until(&mut healthy, last, Duration::from_secs(10)).await;
    eprintln!(
        "healthy subscriber kept up with {} revisions in {:?}",
        120 + 1100,
        t.elapsed()
    );

    // The stalled one, reading at last, is told to reset instead of being fed a gap.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 1 << 20];
    while Instant::now() < deadline {
        // Generous: a quiet gap between chunks only means the sidecar was slow to be scheduled.
        let n = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf)).await;
        match n {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => break,
        }
        if String::from_utf8_lossy(&seen).contains("fell behind") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(
        text.contains("event: reset") && text.contains("fell behind"),
        "no reset for the stalled subscriber"
    );
    // Its reset is the whole prefix (1440 values of 16 KiB, 23 MB) still to send: it is made one
    // event at a time as the socket drains, so the stream queues no more than about one value.
    let status = sidecar.json("/v1/status").await;
    let queued = status["streams"]["queued_bytes"].as_u64().unwrap();
    assert!(queued < 64 * 1024, "{queued} bytes queued by streams");
    assert!(status["bytes"].as_u64().unwrap() > 20 << 20, "{status}");
}

/// A client that asks for a stream and stops reading is closed after the send timeout: its
/// stream slot, and whatever the stream holds, are freed; clients that read are not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_takes_nothing_is_closed_after_the_send_timeout() {
    let cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    let value = "v".repeat(16 * 1024);
    let mut seeded = 0;
    for batch in 0..50 {
        let ops: Vec<TxnOp> = (0..12)
            .map(|i| TxnOp::put(format!("/sd/k{batch}-{i}"), value.clone(), None))
            .collect();
        let txn = etcd.txn(Txn::new().and_then(ops)).await.unwrap();
        seeded = txn.header().unwrap().revision();
    }
    let mut config = sidecar_config(&cluster.endpoints(), &["/sd/"]);
    config.http.send_timeout = Duration::from_secs(2);
    // The watchdog looks every half header-read timeout.
    config.http.header_read_timeout = Duration::from_secs(1);
    let sidecar = start_sidecar(config).await;

    // 600 values of 16 KiB (9.6 MB) to send as the stream's reset: more than the socket buffers
    // hold (here up to 4 MiB sent and 128 KiB received unread). Taken before the stream is asked
    // for, so the stall (which starts later, when the buffers are full) is at least this old.
    let stalled_at = Instant::now();
    let stalled = unread_stream(&sidecar, "/v1/watch/sd/").await;
    let mut reading = SseClient::connect(&sidecar.http, &sidecar.url("/v1/watch/sd/"), None).await;
    // The reading client takes its whole reset at once, and is then idle: not stalled. Read in a
    // task from the start: left unread while the test looks at the status, it would itself be
    // stalled past its send timeout on a slow enough machine.
    let reader = tokio::spawn(async move {
        let state = read_until(&mut reading, seeded, Duration::from_secs(30)).await;
        (reading, state)
    });
    let open = || async { sidecar.json("/v1/status").await["streams"]["open"].as_u64() };
    eventually(Duration::from_secs(5), "both streams open", || async {
        open().await == Some(2)
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "the stalled stream closed",
        || async { open().await == Some(1) },
    )
    .await;
    assert!(
        stalled_at.elapsed() >= Duration::from_millis(1500),
        "closed before its send timeout: {:?}",
        stalled_at.elapsed()
    );
    let (mut reading, state) = reader.await.unwrap();
    assert_eq!(state.len(), 601, "the reset and 600 values");
    // The reading client has all it asked for and goes on.
    let r = put_rev(&mut etcd, "/sd/after", "1").await;
    let got = read_until(&mut reading, r, Duration::from_secs(10)).await;
    assert!(got.iter().any(|e| e.event == "put"), "{}", got.len());
    assert_eq!(open().await, Some(1));
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_during_a_compaction_resync_are_correct() {
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    for i in 0..10 {
        etcd.put(format!("/cr/k{i}"), "v0", None).await.unwrap();
    }
    let (proxies, urls) = proxy_every_member(&cluster).await;
    let mut config = sidecar_config(&urls, &["/cr/"]);
    config.mode.probe_interval = Duration::from_millis(200);
    config.mode.probe_timeout = Duration::from_millis(150);
    let sidecar = start_sidecar(config).await;
    let mut c = SseClient::connect(&sidecar.http, &sidecar.url("/v1/watch/cr/"), None).await;
    // Rebuild the state from the stream alone.
    let mut state = std::collections::BTreeMap::new();
    let apply = |state: &mut std::collections::BTreeMap<String, String>, events: &[SseEvent]| {
        for e in events {
            match e.event.as_str() {
                "reset" => state.clear(),
                "put" => {
                    let j = e.json();
                    state.insert(
                        j["key"].as_str().unwrap().to_string(),
                        j["value"].as_str().unwrap().to_string(),
                    );
                }
                "delete" => {
                    state.remove(e.json()["key"].as_str().unwrap());
                }
                _ => {}
            }
        }
    };
    let first = read_until(&mut c, 1, Duration::from_secs(5)).await;
    apply(&mut state, &first);
    assert_eq!(state.len(), 10);

    for p in &proxies {
        p.set(Fault::Blackhole);
    }
    for i in 0..5 {
        etcd.delete(format!("/cr/k{i}"), None).await.unwrap();
    }
    etcd.put("/cr/k7", "v1", None).await.unwrap();
    let head = put_rev(&mut etcd, "/cr/new", "n").await;
    compact_to(&mut etcd, head).await;
    // The stream says the mode changed while the sidecar is cut off.
    let mut modes = Vec::new();
    while !modes.iter().any(|m: &String| m == "cache-only") {
        let Some(e) = c.next(Duration::from_secs(15)).await else {
            panic!("no mode event; got {modes:?}")
        };
        if e.event == "mode" {
            modes.push(e.json()["mode"].as_str().unwrap().to_string());
        }
    }
    for p in &proxies {
        p.set(Fault::Pass);
    }
    let events = read_until(&mut c, head, Duration::from_secs(20)).await;
    apply(&mut state, &events);
    let expected: std::collections::BTreeMap<String, String> =
        etcd_prefix(&mut etcd, "/cr/").await.into_iter().collect();
    assert_eq!(
        state, expected,
        "the stream alone rebuilds etcd's state, deletions included"
    );
    let deletes = events.iter().filter(|e| e.event == "delete").count();
    assert_eq!(deletes, 5, "the resync's deletions arrive as events");
    let resync = events
        .iter()
        .position(|e| e.event == "resync")
        .expect("the stream says the changes are summed up");
    assert!(
        events[..resync].iter().all(|e| e.event != "delete"),
        "the resync marker comes before the summed-up changes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_streams_and_blocking_queries_without_waiting_out_the_grace() {
    let cluster = EtcdCluster::start(1).await;
    cluster
        .client()
        .await
        .put("/sd/a", "1", None)
        .await
        .unwrap();
    let mut config = sidecar_config(&cluster.endpoints(), &["/sd/"]);
    config.http.shutdown_grace = Duration::from_secs(30);
    let sidecar = start_sidecar(config).await;
    let index = index_of(&sidecar.get("/v1/kv/sd/a").await);
    let mut stream = SseClient::connect(&sidecar.http, &sidecar.url("/v1/watch/sd/"), None).await;
    read_until(&mut stream, 1, Duration::from_secs(5)).await;
    let (http, url) = (
        sidecar.http.clone(),
        sidecar.url(&format!("/v1/kv/sd/a?index={index}&wait=60s")),
    );
    let mut blocked =
        tokio::spawn(async move { http.get(url).send().await.map(|r| r.status().as_u16()) });
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut blocked)
            .await
            .is_err(),
        "blocking"
    );

    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), sidecar.stop())
        .await
        .expect("the drain does not wait for open streams");
    assert_eq!(
        blocked.await.unwrap().unwrap(),
        200,
        "the blocking query answered at shutdown"
    );
    // Ended, not merely quiet: `next` also answers `None` when nothing comes for a while.
    while stream.next(Duration::from_secs(10)).await.is_some() {}
    assert!(stream.ended(), "the stream ended");
    eprintln!(
        "stopped with a stream and a blocking query open in {:?}",
        t.elapsed()
    );
}
