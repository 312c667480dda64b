//! Bundled defaults against a real etcd: a first start with every member down and no snapshot
//! serves them in `cache-only`, saying so, and renders its files from them (an app that starts
//! during an outage has its file); when etcd answers they are replaced wholesale, the file
//! follows, and streams are told to start over.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_serve_a_first_start_without_etcd_and_give_way_to_it() {
    let mut cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    etcd.put("/app/db", "from-etcd", None).await.unwrap();
    etcd.put("/app/only-etcd", "x", None).await.unwrap();
    drop(etcd);
    cluster.kill(0);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("defaults.json");
    std::fs::write(
        &file,
        r#"{"/app/db": "from-defaults", "/app/only-defaults": "d"}"#,
    )
    .unwrap();
    let rendered = dir.path().join("app.env");
    let mut config = sidecar_config(&cluster.endpoints(), &["/app/"]);
    let given = config_sidecar::config::Config::from_args(
        [
            "config-sidecar",
            "--prefix",
            "/app/",
            "--defaults",
            file.to_str().unwrap(),
            "--render",
            &format!("/app/={}", rendered.display()),
        ],
        config_sidecar::config::Environment::Ignored,
    )
    .unwrap();
    config.defaults = given.defaults;
    config.render = given.render;
    let file_holds = |text: &'static str| {
        let rendered = rendered.clone();
        async move {
            eventually(Duration::from_secs(5), text, || async {
                std::fs::read_to_string(&rendered).is_ok_and(|t| t == text)
            })
            .await
        }
    };
    // Ready on the defaults: the app can start.
    let sidecar = start_sidecar(config).await;
    let r = sidecar.get("/v1/kv/app/db").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-config-source"], "defaults");
    assert_eq!(r.headers()["x-config-mode"], "cache-only");
    assert!(
        !r.headers().contains_key("x-config-stale-ms"),
        "never confirmed by etcd"
    );
    assert_eq!(r.text().await.unwrap(), "from-defaults");
    let status = sidecar.json("/v1/status").await;
    assert_eq!(status["source"], "defaults");
    assert_eq!(status["mode"], "cache-only");
    assert_eq!(status["revision"], 0);
    file_holds("DB='from-defaults'\nONLY_DEFAULTS='d'\n").await;
    assert_eq!(
        sidecar.get("/v1/kv/app/only-etcd").await.status(),
        404,
        "the defaults are all there is"
    );

    // A stream opened on the defaults is told to start over when etcd's data replaces them.
    let mut stream = SseClient::connect(&sidecar.http, &sidecar.url("/v1/watch/app/"), None).await;
    let first = stream.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.event, "reset");
    while let Some(e) = stream.next(Duration::from_millis(300)).await {
        assert_ne!(e.event, "reset", "only the initial state so far: {e:?}");
    }

    cluster.restart(0);
    sidecar.wait_mode("full", Duration::from_secs(20)).await;
    let r = sidecar.get("/v1/kv/app/db").await;
    assert!(!r.headers().contains_key("x-config-source"), "etcd's data");
    assert_eq!(r.text().await.unwrap(), "from-etcd");
    assert_eq!(
        sidecar.get("/v1/kv/app/only-defaults").await.status(),
        404,
        "replaced wholesale: a key only the defaults had is gone"
    );
    assert_eq!(
        sidecar.value("/v1/kv/app/only-etcd").await.as_deref(),
        Some("x")
    );
    assert_eq!(sidecar.json("/v1/status").await["source"], "etcd");
    file_holds("DB='from-etcd'\nONLY_ETCD='x'\n").await;
    let mut reset = false;
    while let Some(e) = stream.next(Duration::from_secs(3)).await {
        if e.event == "reset" {
            reset = true;
            break;
        }
    }
    assert!(reset, "the stream was told to start over");
    sidecar.stop().await;
}
