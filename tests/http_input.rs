//! Bad input over a real socket: each gets a JSON error with the right 4xx, and the sidecar keeps
//! serving.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw request bytes on a new connection and returns everything the server answers
/// before it closes.
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the server answers and closes")
        .unwrap();
    String::from_utf8_lossy(&buf).to_string()
}

/// Sends raw request bytes and returns (status, body) of the answer.
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String) {
    let text = exchange(addr, request).await;
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

/// Sends `request` raw and checks the answer: `status` with the JSON error `code`.
async fn refused_with(addr: std::net::SocketAddr, request: &str, status: u16, code: &str) {
    let (got, body) = raw(addr, request.as_bytes()).await;
    let shown = &request[..request.len().min(80)];
    let body: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|_| panic!("{shown:?}: body is not JSON: {body:?}"));
    assert_eq!(
        (got, body["error"].as_str().unwrap_or_default()),
        (status, code),
        "{shown:?}: {body}"
    );
}

/// A one-member cluster holding `/cfg/ok` = `fine`.
async fn cluster_with_ok() -> EtcdCluster {
    let cluster = EtcdCluster::start(1).await;
    cluster
        .client()
        .await
        .put("/cfg/ok", "fine", None)
        .await
        .unwrap();
    cluster
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
    let cluster = cluster_with_ok().await;
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
        // Revision parameters: negative, not a number, beyond i64, ahead of the mirror.
        ("/v1/kv/cfg/ok?index=-1", 400, "bad_query"),
        ("/v1/kv/cfg/ok?index=abc", 400, "bad_query"),
        ("/v1/kv/cfg/ok?index=99999999999999999999", 400, "bad_query"),
        ("/v1/kv/cfg/ok?index=1&wait=forever", 400, "bad_query"),
        ("/v1/watch/cfg/?since=-1", 400, "bad_query"),
        (
            "/v1/watch/cfg/?since=99999999999999999999",
            400,
            "bad_query",
        ),
        ("/v1/watch/cfg/?since=9000000000", 400, "bad_query"),
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

    // Revision 0 is valid: a blocking query from index 0 answers at once (the key changed after
    // it), and a stream resumed from 0 (before any history the sidecar holds, as a compacted
    // revision is) starts with a reset and the whole state.
    // A wait far longer than the bound, so a loaded machine's delays never pass for blocking.
    let started = std::time::Instant::now();
    let (status, body) = raw(
        addr,
        b"GET /v1/kv/cfg/ok?index=0&wait=60s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "fine"));
    assert!(started.elapsed() < Duration::from_secs(20), "did not block");
    let mut stream =
        SseClient::connect(&sidecar.http, &sidecar.url("/v1/watch/cfg/?since=0"), None).await;
    let first = stream.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.event, "reset");
    let put = stream.next(Duration::from_secs(5)).await.unwrap();
    assert!(put.data.contains("/cfg/ok"), "{put:?}");
    drop(stream);

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

    // Slowloris: a byte of header every 50 ms, never finishing the head. The clock starts before
    // the first byte is sent, so however late this task runs, the cut cannot look early.
    let started = std::time::Instant::now();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /v1/kv/cfg/k HTTP/1.1\r\n")
        .await
        .unwrap();
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
    let mut last_request = std::time::Instant::now();
    for _ in 0..10 {
        last_request = std::time::Instant::now();
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

    // Now idle: closed after the idle timeout (give it a generous upper bound). Idle since its
    // last answer, which came after the last request was sent: measured from there, not from
    // now (the sleep and the wait above may have used up most of the timeout).
    closed_within(&mut busy, Duration::from_secs(10))
        .await
        .expect("an idle connection is closed");
    let idle_for = last_request.elapsed();
    assert!(
        idle_for >= Duration::from_millis(1200),
        "closed before the idle timeout: {idle_for:?}"
    );

    // And serving goes on.
    assert_eq!(sidecar.value("/v1/kv/cfg/k").await.as_deref(), Some("1"));
    sidecar.stop().await;
}

/// Hostile requests: foreign Host names and origins (DNS rebinding, cross-site requests), missing
/// Host, header floods, request smuggling shapes, TRACE and CONNECT, bodies that never end or
/// never parse. Each gets the right 4xx as a JSON error — heads the HTTP parser would refuse are
/// refused on the wire by the screen first — and serving goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_and_serving_goes_on() {
    let cluster = cluster_with_ok().await;
    let mut config = sidecar_config(&cluster.endpoints(), &["/cfg/"]);
    config.writes.allowed = true;
    config.http.body_read_timeout = Duration::from_secs(1);
    let sidecar = start_sidecar(config).await;
    let addr = sidecar.addr();
    let get_with =
        |headers: &str| format!("GET /v1/kv/cfg/ok HTTP/1.1\r\n{headers}Connection: close\r\n\r\n");
    let port_host = format!("Host: 127.0.0.1:{}\r\n", addr.port());
    let json_cases: Vec<(String, u16, &str)> = vec![
        (get_with("Host: evil.example\r\n"), 403, "host_not_allowed"),
        (get_with("Host: localhost.evil.example\r\n"), 403, "host_not_allowed"),
        (get_with("Host: localhost:1\r\n"), 403, "host_not_allowed"),
        (get_with(""), 400, "missing_host"),
        (
            "GET /v1/kv/cfg/ok HTTP/1.0\r\n\r\n".to_string(),
            400,
            "missing_host",
        ),
        (
            get_with("Host: localhost\r\nOrigin: http://evil.example\r\n"),
            403,
            "cross_origin",
        ),
        (
            get_with("Host: localhost\r\nOrigin: null\r\n"),
            403,
            "cross_origin",
        ),
        (
            get_with("Host: localhost\r\nSec-Fetch-Site: cross-site\r\n"),
            403,
            "cross_origin",
        ),
        (
            "TRACE /v1/kv/cfg/ok HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".into(),
            405,
            "method_not_allowed",
        ),
        (
            "CONNECT localhost:7379 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                .into(),
            404,
            "unknown_route",
        ),
        // A chunked body that is not chunked encoding.
        (
            "PUT /v1/kv/cfg/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".into(),
            400,
            "bad_body",
        ),
    ];
    for (request, status, code) in &json_cases {
        refused_with(addr, request, *status, code).await;
    }
    // The same request with a proper Host passes the gate.
    let (status, body) = raw(addr, get_with(&port_host).as_bytes()).await;
    assert_eq!((status, body.as_str()), (200, "fine"));

    // Heads the HTTP parser cannot take, refused on the wire before it sees them: the same
    // statuses it would give, in the JSON error form, and the connection closed.
    let many_headers: String = (0..10_000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let long_line = format!("X-Long: {}\r\n", "a".repeat(1 << 20));
    let head_cases: Vec<(String, u16, &str)> = vec![
        (get_with(&format!("Host: localhost\r\n{many_headers}")), 431, "too_many_headers"),
        (get_with(&format!("Host: localhost\r\n{long_line}")), 431, "head_too_large"),
        (
            "GET /v1/kv/cfg/ok HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nab".into(),
            400,
            "bad_content_length",
        ),
        (
            "PUT /v1/kv/cfg/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\n\r\nab".into(),
            400,
            "bad_transfer_encoding",
        ),
        ("GET /v1/kv/cfg/ok HTTP/1.1\r\nHost localhost\r\n\r\n".into(), 400, "malformed_request"),
        // A TLS hello sent to the plain-text port.
        ("\u{16}\u{3}\u{1}\u{2}\u{0}\u{1}\u{0}\r\n\r\n".into(), 400, "malformed_request"),
    ];
    for (request, status, code) in &head_cases {
        refused_with(addr, request, *status, code).await;
    }

    // Two framings, Content-Length and chunked, the second request on a connection: the first is
    // answered, the second refused (RFC 9112 6.3 allows refusing it), the connection closed
    // after it, and what follows is never read as a request nor stored.
    let answers = exchange(
        addr,
        b"GET /v1/kv/cfg/ok HTTP/1.1\r\nHost: localhost\r\n\r\n\
          PUT /v1/kv/cfg/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
          PUT /v1/kv/cfg/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\nhi",
    )
    .await;
    let statuses: Vec<&str> = answers
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &answers[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "400"], "{answers}");
    assert!(answers.contains(r#""error":"two_framings""#), "{answers}");
    assert!(
        answers.to_ascii_lowercase().contains("connection: close"),
        "{answers}"
    );

    // A body that never ends: the write is refused once the body timeout passes.
    // The clock starts before the head is sent: the body timeout cannot start earlier.
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"PUT /v1/kv/cfg/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n1\r\na\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("answered within the body timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    // Too large a value.
    let big = sidecar
        .http
        .put(sidecar.url("/v1/kv/cfg/big"))
        .body(vec![b'x'; 2 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);

    assert_eq!(
        sidecar.value("/v1/kv/cfg/ok").await.as_deref(),
        Some("fine")
    );
    assert_eq!(
        cluster
            .client()
            .await
            .get("/cfg/x", None)
            .await
            .unwrap()
            .count(),
        0,
        "no refused write reached etcd"
    );
    sidecar.stop().await;
}

/// Caps: streams beyond `max_streams` get 429, connections beyond `max_connections` a 503, and
/// both work again once one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_connections_are_capped() {
    let cluster = cluster_with_ok().await;
    let mut config = sidecar_config(&cluster.endpoints(), &["/cfg/"]);
    config.http.max_streams = 2;
    config.http.max_blocking_queries = 1;
    config.http.max_connections = 8;
    let sidecar = start_sidecar(config).await;
    let url = sidecar.url("/v1/watch/cfg/");
    let first = SseClient::connect(&sidecar.http, &url, None).await;
    let _second = SseClient::connect(&sidecar.http, &url, None).await;
    let third = sidecar.get("/v1/watch/cfg/").await;
    assert_eq!(third.status(), 429);
    assert_eq!(third.headers()["retry-after"], "1");
    let body: serde_json::Value = third.json().await.unwrap();
    assert_eq!(body["error"], "too_many_subscribers");
    drop(first);
    eventually(Duration::from_secs(5), "a stream slot frees", || async {
        sidecar.get("/v1/watch/cfg/").await.status() == 200
    })
    .await;
    // One blocking query waits; a second is refused while it does.
    let index = sidecar.get("/v1/kv/cfg/ok").await.headers()["x-config-index"]
        .to_str()
        .unwrap()
        .to_string();
    let blocking = sidecar.url(&format!("/v1/kv/cfg/ok?index={index}&wait=60s"));
    let waiting = tokio::spawn(sidecar.http.get(blocking.clone()).send());
    eventually(
        Duration::from_secs(5),
        "the first blocking query waits",
        || async {
            let metrics = sidecar.get("/metrics").await.text().await.unwrap();
            metrics.contains("config_sidecar_subscribers{kind=\"blocking_query\"} 1")
        },
    )
    .await;
    let second = sidecar
        .get(&format!("/v1/kv/cfg/ok?index={index}&wait=60s"))
        .await;
    assert_eq!(second.status(), 429);
    waiting.abort();
    drop(sidecar.http.clone());

    // Fill the connection table with idle connections (plus the client's own pooled ones).
    let mut held = Vec::new();
    let refused = loop {
        let mut s = TcpStream::connect(sidecar.addr()).await.unwrap();
        s.write_all(b"GET /v1/kv/cfg/ok HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if text.starts_with("HTTP/1.1 503") {
            break text;
        }
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        held.push(s);
        assert!(held.len() <= 8, "the cap holds");
    };
    assert!(refused.contains("too_many_connections"), "{refused}");
    held.pop();
    eventually(
        Duration::from_secs(5),
        "a connection slot frees",
        || async {
            let Ok(mut s) = TcpStream::connect(sidecar.addr()).await else {
                return false;
            };
            let req = b"GET /v1/kv/cfg/ok HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
            if s.write_all(req).await.is_err() {
                return false;
            }
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
            buf.starts_with(b"HTTP/1.1 200")
        },
    )
    .await;
    drop(held);
    sidecar.stop().await;
}

/// HTTP/2 in the clear (prior knowledge) is served on the same port as HTTP/1: the wire screen
/// lets a connection that opens with HTTP/2's preface through untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_served() {
    let cluster = cluster_with_ok().await;
    let sidecar = start_sidecar(sidecar_config(&cluster.endpoints(), &["/cfg/"])).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    // Several streams, one connection.
    for _ in 0..3 {
        let r = h2.get(sidecar.url("/v1/kv/cfg/ok")).send().await.unwrap();
        assert_eq!(
            (r.version(), r.status().as_u16()),
            (reqwest::Version::HTTP_2, 200)
        );
        assert_eq!(r.text().await.unwrap(), "fine");
    }
    let r = h2
        .get(sidecar.url("/v1/kv/cfg/missing"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "key_not_found");
    sidecar.stop().await;
}
