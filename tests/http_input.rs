//! Bad input over a real socket: each gets a JSON error with the right 4xx, and the sidecar keeps
//! serving.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw request bytes and returns (status, body) of the answer.
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the server answers and closes")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn get(addr: std::net::SocketAddr, target: &str) -> (u16, serde_json::Value) {
    let req = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let (status, body) = raw(addr, req.as_bytes()).await;
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|_| panic!("{target}: body is not JSON: {body:?}"));
    (status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_4xx_and_serving_goes_on() {
    let cluster = EtcdCluster::start(1).await;
    cluster
        .client()
        .await
        .put("/cfg/ok", "fine", None)
        .await
        .unwrap();
    let sidecar = start_sidecar(sidecar_config(&cluster.endpoints(), &["/cfg/"])).await;
    let addr = sidecar.addr();

    let cases: &[(&str, u16, &str)] = &[
        ("/v1/kv/cfg/%zz", 400, "bad_key"),
        ("/v1/kv/cfg/%4", 400, "bad_key"),
        ("/v1/kv/cfg/%ff%fe", 400, "bad_key"),
        ("/v1/kv/cfg/../etc/passwd", 400, "bad_key"),
        ("/v1/kv/cfg/%2e%2e/x", 400, "bad_key"),
        ("/v1/kv/cfg/./x", 400, "bad_key"),
        ("/v1/kv/cfg//x", 400, "bad_key"),
        ("/v1/kv/cfg%2F%2Fx", 400, "bad_key"),
        ("/v1/kv/cfg/a%00b", 400, "bad_key"),
        ("/v1/kv/", 400, "bad_key"),
        ("/v1/kv", 400, "bad_key"),
        ("/v1/tree/cfg/%2e%2e", 400, "bad_key"),
        ("/v1/kv/cfg/ok?recurse=maybe", 400, "bad_query"),
        ("/v1/kv/other/x", 404, "outside_mirror"),
        ("/v1/kv/cfg%2F..%2Fother", 400, "bad_key"),
        ("/v1/nothing", 404, "unknown_route"),
        ("/", 404, "unknown_route"),
    ];
    for (target, status, code) in cases {
        let (got, body) = get(addr, target).await;
        assert_eq!(
            (got, body["error"].as_str().unwrap()),
            (*status, *code),
            "{target}: {body}"
        );
    }

    let long = format!("/v1/kv/cfg/{}", "a".repeat(10_000));
    let (status, body) = get(addr, &long).await;
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (414, "uri_too_long")
    );

    for (method, status, code) in [
        ("POST", 405, "method_not_allowed"),
        ("PATCH", 405, "method_not_allowed"),
        ("TRACE", 405, "method_not_allowed"),
        // Writes exist, but this sidecar was not started with --allow-writes.
        ("PUT", 403, "writes_disabled"),
        ("DELETE", 403, "writes_disabled"),
    ] {
        let req = format!(
            "{method} /v1/kv/cfg/ok HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let (got, body) = raw(addr, req.as_bytes()).await;
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (got, body["error"].as_str().unwrap()),
            (status, code),
            "{method}"
        );
    }
    let (status, body) = get(addr, "/v1/kv/cfg/ok?max_stale=soon").await;
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (400, "bad_query")
    );

    // A raw non-UTF-8 byte in the request line is refused by the HTTP parser itself.
    let (status, _) = raw(
        addr,
        b"GET /v1/kv/cfg/\xff HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400);
    // Garbage instead of HTTP.
    let (status, _) = raw(addr, b"\x16\x03\x01 hello\r\n\r\n").await;
    assert_eq!(status, 400);

    // Still serving.
    assert_eq!(
        sidecar.value("/v1/kv/cfg/ok").await.as_deref(),
        Some("fine")
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_keys_are_decoded_once() {
    let cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    etcd.put("/cfg/with space", "1", None).await.unwrap();
    etcd.put("/cfg/%41", "literal percent", None).await.unwrap();
    etcd.put("/cfg/A", "letter", None).await.unwrap();
    etcd.put("/cfg/bin", vec![0xffu8, 0x00, 0x01], None)
        .await
        .unwrap();
    let sidecar = start_sidecar(sidecar_config(&cluster.endpoints(), &["/cfg/"])).await;
    assert_eq!(
        sidecar.value("/v1/kv/cfg/with%20space").await.as_deref(),
        Some("1")
    );
    assert_eq!(
        sidecar.value("/v1/kv/cfg/%2541").await.as_deref(),
        Some("literal percent")
    );
    assert_eq!(
        sidecar.value("/v1/kv/cfg/%41").await.as_deref(),
        Some("letter")
    );
    let r = sidecar.get("/v1/kv/cfg/bin").await;
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &[0xff, 0x00, 0x01]);
    let list = sidecar.json("/v1/kv/cfg/?recurse").await;
    let bin = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "/cfg/bin")
        .unwrap();
    assert_eq!(bin["value_encoding"], "base64");
    assert_eq!(bin["value"], "/wAB");
    sidecar.stop().await;
}

/// Reads from `s` until the peer closes; `Err` if it stays open past `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Result<Vec<u8>, ()> {
    let mut buf = Vec::new();
    match tokio::time::timeout(within, s.read_to_end(&mut buf)).await {
        Ok(_) => Ok(buf),
        Err(_) => Err(()),
    }
}

/// Connection deadlines over a real socket: a client trickling its headers is cut off after the
/// header-read timeout, an idle keep-alive connection after the idle timeout, while a blocking
/// query that outlasts both, and a keep-alive connection in steady use, are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_and_idle_connections_are_closed_and_busy_ones_kept() {
    let cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    let rev = put_rev(&mut etcd, "/cfg/k", "1").await;
    let mut config = sidecar_config(&cluster.endpoints(), &["/cfg/"]);
    config.http.header_read_timeout = Duration::from_millis(400);
    config.http.idle_timeout = Duration::from_millis(1200);
    let sidecar = start_sidecar(config).await;
    let addr = sidecar.addr();

    // Slowloris: a byte of header every 50 ms, never finishing the head.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /v1/kv/cfg/k HTTP/1.1\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let trickle = async {
        loop {
            if slow.write_all(b"X").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), trickle)
        .await
        .expect("a trickled head is cut off");
    let cut_after = started.elapsed();
    assert!(
        cut_after >= Duration::from_millis(400),
        "cut before the timeout: {cut_after:?}"
    );

    // A blocking query waiting 2 s (longer than both timeouts) gets its answer.
    let mut waiting = TcpStream::connect(addr).await.unwrap();
    let query = format!("GET /v1/kv/cfg/k?index={rev}&wait=2s HTTP/1.1\r\nHost: localhost\r\n\r\n");
    waiting.write_all(query.as_bytes()).await.unwrap();

    // A keep-alive connection used every 200 ms for 2 s stays open and answers every time.
    let mut busy = TcpStream::connect(addr).await.unwrap();
    for _ in 0..10 {
        busy.write_all(b"GET /v1/kv/cfg/k HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), busy.read(&mut buf))
            .await
            .expect("an answer on a connection in use")
            .unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut answer = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), waiting.read(&mut answer))
        .await
        .expect("the blocking query is answered")
        .unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );

    // Now idle: closed after the idle timeout (give it a generous upper bound).
    let idle_from = std::time::Instant::now();
    closed_within(&mut busy, Duration::from_secs(5))
        .await
        .expect("an idle connection is closed");
    assert!(idle_from.elapsed() >= Duration::from_millis(1000));

    // And serving goes on.
    assert_eq!(sidecar.value("/v1/kv/cfg/k").await.as_deref(), Some("1"));
    sidecar.stop().await;
}
