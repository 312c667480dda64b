//! Consul's KV API served by the sidecar on its own listener, against a real etcd, with the real
//! Python client `py-consul` (from PyPI, in a virtualenv the harness makes): get, a missing key,
//! recurse, keys with and without a separator, a blocking get woken by a change, writes with
//! Consul's check-and-set, and reads once the cluster behind has lost quorum; and Consul's
//! headers and refusals as raw HTTP.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Runs the py-consul client script once with `args`; its one JSON line.
fn client(port: u16, args: &[&str]) -> Value {
    let python = python_venv("venv-py-consul", &["py-consul==1.8.0"]);
    run_python_client(&python, "consul_client.py", port, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_reads_blocks_writes_and_reads_on_without_quorum() {
    let mut cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    etcd.put("/cs/app/a", "1", None).await.unwrap();
    etcd.put("/cs/app/dir/b", "2", None).await.unwrap();
    let c = put_rev(&mut etcd, "/cs/app/dir/c", "3").await;
    etcd.put("/cs/other", "not mirrored", None).await.unwrap();
    let mut config = sidecar_config(&cluster.endpoints(), &["/cs/app/"]);
    config.writes.allowed = true;
    let consul_port = free_port();
    config.http.consul_listen = Some(format!("127.0.0.1:{consul_port}").parse().unwrap());
    let sidecar = start_sidecar(config).await;
    let http = reqwest::Client::new();
    let consul = format!("http://127.0.0.1:{consul_port}");

    let read =
        tokio::task::spawn_blocking(move || client(consul_port, &["read", "cs/app/a", "cs/app/"]))
            .await
            .unwrap();
    let status = sidecar.json("/v1/status").await;
    assert_eq!(
        read["index"], status["revision"],
        "X-Consul-Index is the mirror's revision"
    );
    assert_eq!(read["get"], "1");
    assert_eq!(read["missing"], Value::Null);
    assert_eq!(
        read["recurse"],
        json!([
            ["cs/app/a", "1"],
            ["cs/app/dir/b", "2"],
            ["cs/app/dir/c", "3"]
        ])
    );
    assert_eq!(
        read["keys"],
        json!(["cs/app/a", "cs/app/dir/b", "cs/app/dir/c"])
    );
    assert_eq!(read["dirs"], json!(["cs/app/a", "cs/app/dir/"]));

    // Raw HTTP: ?raw, Consul's headers, a missing key's empty 404, a key outside the mirror.
    let raw = http
        .get(format!("{consul}/v1/kv/cs/app/dir/c?raw"))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.headers()["x-consul-knownleader"], "true");
    assert!(raw.headers().contains_key("x-consul-lastcontact"));
    assert_eq!(raw.text().await.unwrap(), "3");
    let entry = get_json(&http, &format!("{consul}/v1/kv/cs/app/dir/c")).await;
    assert_eq!(entry[0]["ModifyIndex"], c);
    assert_eq!(entry[0]["Value"], "Mw==");
    let missing = http
        .get(format!("{consul}/v1/kv/cs/app/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.headers().contains_key("x-consul-index"));
    assert_eq!(missing.text().await.unwrap(), "");
    let outside = http
        .get(format!("{consul}/v1/kv/cs/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(outside.status(), 403);
    let consistent = http
        .get(format!("{consul}/v1/kv/cs/app/a?consistent&raw"))
        .send()
        .await
        .unwrap();
    assert_eq!(consistent.text().await.unwrap(), "1");
    // The main listener keeps the sidecar's own API.
    assert_eq!(sidecar.value("/v1/kv/cs/app/a").await.as_deref(), Some("1"));

    // A blocking get from the current index returns once the key changes, with the new value.
    let index = read["index"].as_i64().unwrap().to_string();
    let blocked =
        tokio::task::spawn_blocking(move || client(consul_port, &["block", "cs/app/a", &index]));
    eventually(
        Duration::from_secs(10),
        "the blocking query waiting",
        || async {
            let metrics = sidecar.get("/metrics").await.text().await.unwrap();
            metric_sum(
                &metrics,
                "config_sidecar_subscribers{kind=\"blocking_query\"}",
            ) >= 1.0
        },
    )
    .await;
    let changed = put_rev(&mut etcd, "/cs/app/a", "changed").await;
    let woke = blocked.await.unwrap();
    assert_eq!(woke, json!({"index": changed, "value": "changed"}));

    // Writes: put, create-only on an existing key refused, check-and-set, delete.
    let wrote = tokio::task::spawn_blocking(move || client(consul_port, &["write", "cs/app/"]))
        .await
        .unwrap();
    assert_eq!(
        wrote,
        json!({"put": true, "create_existing": false, "cas_stale": false, "cas": true,
               "after": "four", "delete": true, "gone": null})
    );

    // Quorum lost: reads go on, and say no leader is known; writes are refused.
    cluster.lose_quorum().await;
    sidecar
        .wait_mode("read-only", Duration::from_secs(15))
        .await;
    let read =
        tokio::task::spawn_blocking(move || client(consul_port, &["read", "cs/app/a", "cs/app/"]))
            .await
            .unwrap();
    assert_eq!(read["get"], "changed");
    assert_eq!(
        read["keys"],
        json!(["cs/app/a", "cs/app/dir/b", "cs/app/dir/c"])
    );
    let raw = http
        .get(format!("{consul}/v1/kv/cs/app/a?raw"))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.headers()["x-consul-knownleader"], "false");
    let refused = http
        .put(format!("{consul}/v1/kv/cs/app/x"))
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    // ?consistent needs the quorum the sidecar checks with: refused now, served by default.
    let consistent = http
        .get(format!("{consul}/v1/kv/cs/app/a?consistent"))
        .send()
        .await
        .unwrap();
    assert_eq!(consistent.status(), 503);
    let stale = http
        .get(format!("{consul}/v1/kv/cs/app/a?stale&raw"))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.text().await.unwrap(), "changed");
    sidecar.stop().await;
}

/// Both adapters keep the sidecar's rules: the write token (`Authorization: Bearer`, or Consul's
/// `X-Consul-Token`), and the Host guard on the Consul listener too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adapters_keep_the_write_token_and_the_host_guard() {
    let cluster = EtcdCluster::start(1).await;
    let mut config = sidecar_config(&cluster.endpoints(), &["/t/"]);
    config.writes.allowed = true;
    config.writes.token = Some("s3cret".into());
    let consul_port = free_port();
    config.http.consul_listen = Some(format!("127.0.0.1:{consul_port}").parse().unwrap());
    let sidecar = start_sidecar(config).await;
    let http = reqwest::Client::new();
    let consul = format!("http://127.0.0.1:{consul_port}");

    let put = json!({"key": "L3Qvaw==", "value": "djE="}); // /t/k = v1
    let gateway_put = |token: Option<&'static str>| {
        let mut request = http.post(sidecar.url("/v3/kv/put")).json(&put);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let refused = gateway_put(None).await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.json::<Value>().await.unwrap()["code"], 16);
    assert_eq!(gateway_put(Some("wrong")).await.unwrap().status(), 401);
    assert_eq!(gateway_put(Some("s3cret")).await.unwrap().status(), 200);
    assert_eq!(sidecar.value("/v1/kv/t/k").await.as_deref(), Some("v1"));

    let consul_put = |token: Option<&'static str>| {
        let mut request = http.put(format!("{consul}/v1/kv/t/k")).body("v2");
        if let Some(token) = token {
            request = request.header("X-Consul-Token", token);
        }
        request.send()
    };
    assert_eq!(consul_put(None).await.unwrap().status(), 401);
    let written = consul_put(Some("s3cret")).await.unwrap();
    assert_eq!(written.text().await.unwrap(), "true");
    assert_eq!(sidecar.value("/v1/kv/t/k").await.as_deref(), Some("v2"));

    // A page that rebinds its own name to loopback is refused on the Consul listener too.
    let rebound = http
        .get(format!("{consul}/v1/kv/t/k"))
        .header("Host", "attacker.example")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403);
    sidecar.stop().await;
}
