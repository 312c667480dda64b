//! etcd's gRPC API on the sidecar (`--grpc-listen`, issue 30's first steps): etcd's own clients
//! (the etcd-client crate as an app uses it, and Debian's etcdctl) read the mirror over gRPC with
//! etcd's range options, read outside it through the sidecar (forwarded to etcd), list members,
//! endpoint status and alarms (forwarded) but cannot change the cluster, and keep reading the
//! mirror with no member reachable, while a forwarded read fails fast with `UNAVAILABLE`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use etcd_client::{GetOptions, SortOrder, SortTarget};

fn etcdctl(endpoint: &str, args: &[&str]) -> std::process::Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "--command-timeout", "10s"])
        .args(args)
        .output()
        .expect("etcdctl runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_clients_read_the_mirror_over_grpc() {
    let mut cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    etcd.put("/app/a", "1", None).await.unwrap();
    etcd.put("/app/b", "2", None).await.unwrap();
    etcd.put("/app/c", "3", None).await.unwrap();
    etcd.put("/other/x", "outside", None).await.unwrap();
    let mut config = sidecar_config(&cluster.endpoints(), &["/app/"]);
    let port = free_port();
    config.http.grpc_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let sidecar = start_sidecar(config).await;
    let revision = sidecar.json("/v1/status").await["revision"]
        .as_i64()
        .unwrap();
    let grpc = format!("http://127.0.0.1:{port}");

    // etcd-client, as an app would use it.
    let mut app = etcd_client::Client::connect([grpc.as_str()], None)
        .await
        .unwrap();
    let one = app.get("/app/a", None).await.unwrap();
    assert_eq!(one.kvs()[0].value(), b"1");
    assert_eq!(one.header().unwrap().revision(), revision);
    let all = app
        .get("/app/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let keys: Vec<&[u8]> = all.kvs().iter().map(|kv| kv.key()).collect();
    assert_eq!(keys, [&b"/app/a"[..], b"/app/b", b"/app/c"]);
    assert_eq!((all.count(), all.more()), (3, false));
    let page = app
        .get(
            "/app/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_limit(2)
                    .with_sort(SortTarget::Key, SortOrder::Descend),
            ),
        )
        .await
        .unwrap();
    let keys: Vec<&[u8]> = page.kvs().iter().map(|kv| kv.key()).collect();
    assert_eq!(keys, [&b"/app/c"[..], b"/app/b"]);
    assert_eq!((page.count(), page.more()), (3, true));
    let counted = app
        .get(
            "/app/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!((counted.count(), counted.kvs().len()), (3, 0));
    let keys_only = app
        .get("/app/b", Some(GetOptions::new().with_keys_only()))
        .await
        .unwrap();
    assert!(keys_only.kvs()[0].value().is_empty());
    // Outside the mirror: asked of etcd, answered as etcd answers.
    let outside = app.get("/other/x", None).await.unwrap();
    assert_eq!(outside.kvs()[0].value(), b"outside");
    // A range over a compacted revision is etcd's own error, passed through.
    let head = etcd.put("/other/y", "1", None).await.unwrap();
    compact_to(&mut etcd, head.header().unwrap().revision()).await;
    let err = app
        .get("/other/x", Some(GetOptions::new().with_revision(2)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("compacted"), "{err}");

    // etcdctl, over gRPC.
    let out = etcdctl(&grpc, &["get", "--prefix", "/app/"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/app/a\n1\n/app/b\n2\n/app/c\n3\n"
    );
    let out = etcdctl(
        &grpc,
        &["get", "--consistency=s", "--print-value-only", "/app/b"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2\n", "{out:?}");
    let rev = revision.to_string();
    let out = etcdctl(
        &grpc,
        &["get", "--rev", &rev, "--print-value-only", "/app/c"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3\n", "{out:?}");
    let out = etcdctl(&grpc, &["put", "/app/a", "9"]);
    assert!(!out.status.success(), "a write is not served yet: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unimplemented"),
        "{out:?}"
    );

    // The cluster's state, forwarded; what would change the cluster, refused.
    let out = etcdctl(&grpc, &["member", "list"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        3,
        "{out:?}"
    );
    let member_id = String::from_utf8_lossy(&out.stdout)
        .split(',')
        .next()
        .unwrap()
        .to_string();
    // etcdctl 3.4's `endpoint status` sends ":authority: http://host:port" (its passthrough
    // target), which Rust's HTTP/2 server refuses as malformed; the call itself, from a client
    // that sends a valid authority:
    let status = app.status().await.unwrap();
    assert!(status.version().starts_with("3.4."), "{status:?}");
    let out = etcdctl(&grpc, &["alarm", "list"]);
    assert!(out.status.success(), "{out:?}");
    let id = |text: &str| u64::from_str_radix(text, 16).unwrap();
    let refusals = [
        app.member_remove(id(&member_id)).await.map(|_| ()),
        app.defragment().await.map(|_| ()),
        app.alarm(
            etcd_client::AlarmAction::Deactivate,
            etcd_client::AlarmType::Nospace,
            None,
        )
        .await
        .map(|_| ()),
    ];
    for refusal in refusals {
        assert!(
            matches!(&refusal, Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::PermissionDenied),
            "{refusal:?}"
        );
    }
    assert_eq!(
        etcd.member_list().await.unwrap().members().len(),
        3,
        "no member was removed"
    );

    // No member reachable: the mirror still answers; a forwarded read fails, and fast.
    for i in 0..3 {
        cluster.kill(i);
    }
    sidecar
        .wait_mode("cache-only", Duration::from_secs(30))
        .await;
    let still = app.get("/app/a", None).await.unwrap();
    assert_eq!(still.kvs()[0].value(), b"1");
    let asked = Instant::now();
    let err = app.get("/other/x", None).await.unwrap_err();
    assert!(
        matches!(&err, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable),
        "{err}"
    );
    // Within the request timeout (2 s in tests) and a retry's dial, not a hang.
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "{:?}",
        asked.elapsed()
    );
    sidecar.stop().await;
}
