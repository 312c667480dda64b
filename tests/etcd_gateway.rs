//! etcd's v3 JSON gateway served by the sidecar, against a real etcd: ranges answer as etcd's own
//! gateway answers the same requests; the Python client `etcd3gw` (from PyPI, in a virtualenv the
//! harness makes) gets, lists, writes (put, create and replace transactions, delete) and watches
//! through it, and still reads once the cluster behind has lost quorum.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use common::*;
use serde_json::{json, Value};

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The Python with etcd3gw.
fn etcd3gw() -> PathBuf {
    python_venv("venv-etcd3gw", &["etcd3gw==2.7.0"])
}

/// Runs the client script once with `args`; its one JSON line.
async fn client(port: u16, args: &[&str]) -> Value {
    run_python_client(&etcd3gw(), "etcd3gw_client.py", port, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd3gw_reads_writes_and_watches_and_reads_on_without_quorum() {
    let mut cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    etcd.put("/gw/app/a", "1", None).await.unwrap();
    etcd.put("/gw/app/b", "2", None).await.unwrap();
    etcd.put("/gw/other", "not mirrored", None).await.unwrap();
    let mut config = sidecar_config(&cluster.endpoints(), &["/gw/app/"]);
    config.writes.allowed = true;
    let sidecar = start_sidecar(config).await;
    let port = sidecar.addr().port();

    let read = client(port, &["read", "/gw/app/a", "/gw/app/"]).await;
    assert_eq!(
        read,
        json!({"get": ["1"], "prefix": [["/gw/app/a", "1"], ["/gw/app/b", "2"]]})
    );
    // Outside the mirror: etcd's answer, passed on.
    let outside = client(port, &["read", "/gw/other", "/gw/app/"]).await;
    assert_eq!(
        outside,
        json!({"get": ["not mirrored"], "prefix": [["/gw/app/a", "1"], ["/gw/app/b", "2"]]})
    );

    // Writes go to etcd (a put, transactions that create and compare-and-swap, a delete).
    let wrote = client(port, &["write", "/gw/app/"]).await;
    assert_eq!(
        wrote,
        json!({"put": true, "create": [true, false], "replace": true, "after": ["3"], "delete": true})
    );
    let once = etcd.get("/gw/app/once", None).await.unwrap();
    assert_eq!(once.kvs()[0].value(), b"3");
    assert!(etcd
        .get("/gw/app/written", None)
        .await
        .unwrap()
        .kvs()
        .is_empty());

    // A watch sees a put and a delete made in etcd, at etcd's revisions.
    let mut watcher = Process::spawn(
        python_client(&etcd3gw(), "etcd3gw_client.py")
            .args([&port.to_string(), "watch", "/gw/app/", "2"])
            .stdout(Stdio::piped()),
    );
    let lines = std::sync::Arc::new(std::sync::Mutex::new(BufReader::new(
        watcher.stdout.take().unwrap(),
    )));
    let next_line = || {
        let lines = lines.clone();
        async move {
            let read = tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                lines.lock().unwrap().read_line(&mut line).unwrap();
                line
            });
            tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .expect("the watcher prints within 10 s")
                .unwrap()
        }
    };
    assert_eq!(next_line().await.trim(), "ready");
    let put = put_rev(&mut etcd, "/gw/app/c", "new").await;
    let deleted = etcd.delete("/gw/app/a", None).await.unwrap();
    let deleted = deleted.header().unwrap().revision();
    let first: Value = serde_json::from_str(&next_line().await).unwrap();
    let second: Value = serde_json::from_str(&next_line().await).unwrap();
    assert_eq!(
        first,
        json!({"type": "PUT", "key": "/gw/app/c", "value": "new", "mod_revision": put})
    );
    assert_eq!(
        second,
        json!({"type": "DELETE", "key": "/gw/app/a", "value": "", "mod_revision": deleted})
    );
    assert!(watcher.wait().unwrap().success());

    // Quorum lost: reads go on from the mirror, writes are refused (503: etcd3gw's
    // ConnectionFailedError).
    cluster.lose_quorum().await;
    sidecar
        .wait_mode("read-only", Duration::from_secs(15))
        .await;
    let read = client(port, &["read", "/gw/app/c", "/gw/app/"]).await;
    assert_eq!(
        read,
        json!({"get": ["new"], "prefix": [["/gw/app/b", "2"], ["/gw/app/c", "new"], ["/gw/app/once", "3"]]})
    );
    let refused = client(port, &["write", "/gw/app/"]).await;
    assert_eq!(refused["error"], "ConnectionFailedError", "{refused}");
    sidecar.stop().await;
}

/// The next newline-delimited JSON message of a watch stream (`read` holds what came after the
/// last one); `None` once the stream has ended.
async fn next_message(stream: &mut reqwest::Response, read: &mut String) -> Option<Value> {
    loop {
        if let Some(end) = read.find('\n') {
            let line: Value = serde_json::from_str(&read[..end]).unwrap();
            read.drain(..=end);
            return Some(line);
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
            .await
            .expect("a watch message within 10 s")
            .unwrap()?;
        read.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

/// POSTs `body` to `path` at `base`: status and JSON.
async fn post(http: &reqwest::Client, base: &str, path: &str, body: &Value) -> (u16, Value) {
    let response = http
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// A gateway answer without its header, which names a member (etcd's) or none (the sidecar's).
fn without_header(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("header");
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_and_watches_answer_as_etcds_own_gateway() {
    let cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    for (k, v) in [("/r/app/a", "1"), ("/r/app/b/c", "2"), ("/r/app/d", "3")] {
        etcd.put(k, v, None).await.unwrap();
    }
    etcd.put("/r/app/a", "1b", None).await.unwrap();
    let sidecar = start_sidecar(sidecar_config(&cluster.endpoints(), &["/r/app/"])).await;
    let http = reqwest::Client::new();
    let etcd_base = cluster.endpoint(0);

    let version = sidecar.json("/version").await;
    assert!(version["etcdserver"].as_str().unwrap().starts_with("3.4"));

    let prefix = json!({"key": b64("/r/app/"), "range_end": b64("/r/app0")});
    let with = |extra: Value| {
        let mut body = prefix.clone();
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    for request in [
        json!({"key": b64("/r/app/a")}),
        json!({"key": b64("/r/app/missing")}),
        prefix.clone(),
        with(json!({"limit": 2})),
        with(json!({"limit": "1", "keys_only": true})),
        with(json!({"count_only": true})),
        with(json!({"sort_order": "DESCEND", "sort_target": "KEY"})),
        with(json!({"sort_order": 1, "sort_target": 3})),
        with(json!({"min_mod_revision": 4})),
        json!({"key": "not base64!"}),
    ] {
        let (ours_status, ours) = post(&http, &sidecar.base, "/v3/kv/range", &request).await;
        let (theirs_status, theirs) = post(&http, &etcd_base, "/v3/kv/range", &request).await;
        assert_eq!(ours_status, theirs_status, "{request}");
        if ours_status == 200 {
            assert_eq!(
                without_header(ours.clone()),
                without_header(theirs),
                "{request}"
            );
            let revision: i64 = ours["header"]["revision"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(
                Some(revision),
                sidecar.json("/v1/status").await["revision"].as_i64()
            );
        } else {
            assert_eq!(ours["code"], theirs["code"], "{request}: {ours} / {theirs}");
        }
    }
    // A past revision the range did not change after is answered, as etcd answers it; one it
    // changed after is refused (the mirror keeps current values only).
    let head = put_rev(&mut etcd, "/r/app/d", "4").await;
    // Asked before its watch delivered the put, the mirror would still take /r/app/d for
    // unchanged since head - 1.
    eventually(Duration::from_secs(10), "the put mirrored", || async {
        sidecar.json("/v1/status").await["revision"].as_i64() >= Some(head)
    })
    .await;
    let unchanged = json!({"key": b64("/r/app/a"), "revision": head - 1});
    let (status, ours) = post(&http, &sidecar.base, "/v3/kv/range", &unchanged).await;
    let (_, theirs) = post(&http, &etcd_base, "/v3/kv/range", &unchanged).await;
    assert_eq!(status, 200);
    assert_eq!(without_header(ours), without_header(theirs));
    let changed = json!({"key": b64("/r/app/d"), "revision": head - 1});
    let (status, refused) = post(&http, &sidecar.base, "/v3/kv/range", &changed).await;
    assert_eq!(
        (status, refused["code"].as_i64()),
        (400, Some(11)),
        "{refused}"
    );
    // Outside the mirror: passed on to etcd, answered as etcd's own gateway answers (a member's
    // header aside), its errors too.
    let outside = json!({"key": b64("/r/"), "range_end": b64("/r0"), "sort_order": "DESCEND"});
    let (status, ours) = post(&http, &sidecar.base, "/v3/kv/range", &outside).await;
    let (_, theirs) = post(&http, &etcd_base, "/v3/kv/range", &outside).await;
    assert_eq!(status, 200, "{ours}");
    assert_eq!(without_header(ours), without_header(theirs));
    let too_new = json!({"key": b64("/r/other"), "revision": head + 1000});
    let (status, ours) = post(&http, &sidecar.base, "/v3/kv/range", &too_new).await;
    let (their_status, theirs) = post(&http, &etcd_base, "/v3/kv/range", &too_new).await;
    assert_eq!(
        (status, ours["code"].as_i64()),
        (their_status, theirs["code"].as_i64()),
        "{ours} {theirs}"
    );

    // A watch from a revision still in the history replays it, then streams; one from before
    // the history is canceled with the revision to read and start again from.
    let lines = |start: i64| {
        let http = http.clone();
        let url = sidecar.url("/v3/watch");
        async move {
            let body = json!({"create_request": {"key": b64("/r/app/"), "range_end": b64("/r/app0"), "start_revision": start}});
            http.post(url).json(&body).send().await.unwrap()
        }
    };
    let mut stream = lines(head).await;
    let mut read = String::new();
    let mut messages: Vec<Value> = Vec::new();
    let later = put_rev(&mut etcd, "/r/app/b/c", "5").await;
    while messages.len() < 3 {
        let message = next_message(&mut stream, &mut read).await;
        messages.push(message.expect("the stream stays open"));
    }
    assert_eq!(messages[0]["result"]["created"], true);
    let event = |m: &Value| m["result"]["events"][0]["kv"].clone();
    assert_eq!(event(&messages[1])["key"], b64("/r/app/d"));
    assert_eq!(event(&messages[1])["mod_revision"], head.to_string());
    assert_eq!(event(&messages[2])["key"], b64("/r/app/b/c"));
    assert_eq!(event(&messages[2])["value"], b64("5"));
    assert_eq!(
        messages[2]["result"]["header"]["revision"],
        later.to_string()
    );
    drop(stream);

    // On the request stream: a progress request is answered with the header alone, a cancel
    // request ends the watch with `canceled`.
    let (requests, body) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(4);
    let body = futures_util::stream::unfold(body, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let create = json!({"create_request": {"key": b64("/r/app/a")}}).to_string();
    requests.send(Ok(create)).await.unwrap();
    let mut stream = http
        .post(sidecar.url("/v3/watch"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    let mut read = String::new();
    assert_eq!(
        next_message(&mut stream, &mut read).await.unwrap()["result"]["created"],
        true
    );
    requests
        .send(Ok(json!({"progress_request": {}}).to_string()))
        .await
        .unwrap();
    let progress = next_message(&mut stream, &mut read).await.unwrap();
    assert_eq!(
        progress["result"]["header"]["revision"],
        later.to_string(),
        "{progress}"
    );
    assert!(progress["result"].get("events").is_none(), "{progress}");
    requests
        .send(Ok(json!({"cancel_request": {}}).to_string()))
        .await
        .unwrap();
    let canceled = next_message(&mut stream, &mut read).await.unwrap();
    assert_eq!(canceled["result"]["canceled"], true, "{canceled}");
    assert!(
        next_message(&mut stream, &mut read).await.is_none(),
        "the stream ends after canceled"
    );

    let old = lines(1).await.text().await.unwrap();
    let old: Vec<Value> = old
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(old.len(), 2, "{old:?}");
    assert_eq!(old[1]["result"]["canceled"], true);
    let restart: i64 = old[1]["result"]["compact_revision"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(restart > 1 && restart <= head, "{old:?}");
    sidecar.stop().await;
}
