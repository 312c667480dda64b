//! `GET /metrics` against a real etcd: what a Prometheus scrape sees matches what was done —
//! requests by route and status (the fast path included), latency, cache hits and misses, mode,
//! revision, keys, watch events, probes, snapshot writes and open streams.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

/// One scrape: series (name plus labels, as printed) → value.
struct Scrape(HashMap<String, f64>);

impl Scrape {
    async fn take(sidecar: &Sidecar) -> Scrape {
        let r = sidecar.get("/metrics").await;
        assert_eq!(r.status(), 200);
        let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{content_type}"
        );
        let text = r.text().await.unwrap();
        assert!(text.ends_with("# EOF\n"), "a complete exposition");
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').expect("name value");
                (name.to_string(), value.parse::<f64>().expect("a number"))
            })
            .collect();
        Scrape(series)
    }

    /// The value of `series` (e.g. `config_sidecar_keys` or `..._total{route="/x",status="200"}`).
    fn get(&self, series: &str) -> Option<f64> {
        self.0.get(series).copied()
    }

    fn value(&self, series: &str) -> f64 {
        self.get(series).unwrap_or_else(|| {
            let name = series.split('{').next().unwrap();
            let similar: Vec<_> = self.0.keys().filter(|k| k.starts_with(name)).collect();
            panic!("no series {series}; have {similar:?}")
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_reports_what_the_sidecar_did() {
    let cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    for i in 0..5 {
        etcd.put(format!("/app/k{i}"), "v", None).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = sidecar_config(&cluster.endpoints(), &["/app/"]);
    config.snapshot = Some(config_sidecar::config::SnapshotConfig::at(
        dir.path().join("mirror.snap"),
    ));
    let sidecar = start_sidecar(config).await;
    sidecar.wait_mode("full", Duration::from_secs(10)).await;

    // 7 hits (fast path), 3 misses, a tree rendered once and then served from the cache.
    for i in 0..7 {
        assert!(sidecar
            .value(&format!("/v1/kv/app/k{}", i % 5))
            .await
            .is_some());
    }
    for _ in 0..3 {
        assert_eq!(sidecar.get("/v1/kv/app/absent").await.status(), 404);
    }
    for _ in 0..2 {
        assert_eq!(sidecar.get("/v1/tree/app/").await.status(), 200);
    }
    // A stream open while we scrape, and watch events arriving.
    let mut stream = SseClient::connect(&sidecar.http, &sidecar.url("/v1/watch/app/"), None).await;
    assert!(
        stream.next(Duration::from_secs(5)).await.is_some(),
        "initial state"
    );
    let before = Scrape::take(&sidecar)
        .await
        .value("config_sidecar_watch_events_applied_total");
    etcd.put("/app/k0", "v2", None).await.unwrap();
    etcd.delete("/app/k1", None).await.unwrap();
    let revision = etcd
        .get("/app/k0", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    eventually(Duration::from_secs(5), "events applied", || async {
        sidecar.value("/v1/kv/app/k0").await.as_deref() == Some("v2")
            && sidecar.get("/v1/kv/app/k1").await.status() == 404
    })
    .await;
    // The open stream has sent both events on (its queue is empty below): read them, since the
    // stream's task takes them a moment after the store publishes them.
    loop {
        let event = stream
            .next(Duration::from_secs(10))
            .await
            .expect("the stream delivers the put and the delete");
        if event.id.as_deref() == Some(revision.to_string().as_str()) {
            break;
        }
    }

    let kv = |status: &str| {
        format!("config_sidecar_requests_total{{route=\"/v1/kv/{{*key}}\",status=\"{status}\"}}")
    };
    let m = Scrape::take(&sidecar).await;
    // Exact: every request is counted once, fast path or router. The wait above read k0 and
    // k1 at least once each, so hits and misses are at least 7 + 1 and 3 + 1.
    let (hits, misses) = (m.value(&kv("200")), m.value(&kv("404")));
    assert!(hits >= 8.0 && misses >= 4.0, "hits {hits}, misses {misses}");
    assert_eq!(
        m.value(r#"config_sidecar_cache_requests_total{cache="keys",result="hit"}"#),
        hits
    );
    assert_eq!(
        m.value(r#"config_sidecar_cache_requests_total{cache="keys",result="miss"}"#),
        misses
    );
    assert_eq!(
        m.value(r#"config_sidecar_cache_requests_total{cache="rendered",result="miss"}"#),
        1.0
    );
    assert_eq!(
        m.value(r#"config_sidecar_cache_requests_total{cache="rendered",result="hit"}"#),
        1.0
    );
    assert_eq!(
        m.value(r#"config_sidecar_requests_total{route="/v1/tree/{*prefix}",status="200"}"#),
        2.0
    );
    // The latency histogram counts the same requests; its buckets only grow.
    let route = r#"route="/v1/kv/{*key}""#;
    assert_eq!(
        m.value(&format!(
            "config_sidecar_request_duration_seconds_count{{{route}}}"
        )),
        hits + misses
    );
    let mut last = 0.0;
    for le in ["0.00001", "0.001", "1.0", "+Inf"] {
        let n = m.value(&format!(
            "config_sidecar_request_duration_seconds_bucket{{le=\"{le}\",{route}}}"
        ));
        assert!(n >= last, "bucket {le}: {n} < {last}");
        last = n;
    }
    assert_eq!(last, hits + misses);

    assert_eq!(m.value(r#"config_sidecar_mode{mode="full"}"#), 1.0);
    assert_eq!(m.value(r#"config_sidecar_mode{mode="cache-only"}"#), 0.0);
    assert!(m.value(r#"config_sidecar_mode_transitions_total{from="starting",to="full"}"#) >= 1.0);
    assert!(m.value("config_sidecar_revision") >= revision as f64);
    assert_eq!(m.value("config_sidecar_keys"), 4.0);
    assert!(m.value("config_sidecar_bytes") > 0.0);
    // One tree body held, whatever revisions were rendered: the gauge and /v1/status agree.
    let status = sidecar.json("/v1/status").await;
    assert_eq!(status["render_cache"]["bodies"], 1, "{status}");
    assert!(
        m.value("config_sidecar_history_bytes") > 0.0,
        "the two puts above are history"
    );
    assert!(
        status["history"]["revisions"].as_u64().unwrap() >= 2,
        "{status}"
    );
    let held = m.value("config_sidecar_render_cache_bytes");
    assert!(held > 0.0 && held == status["render_cache"]["bytes"].as_f64().unwrap());
    // The open stream has sent all it had: nothing queued, and the gauge and the status agree.
    assert_eq!(m.value("config_sidecar_stream_queue_bytes"), 0.0);
    assert_eq!(status["streams"]["queued_bytes"], 0, "{status}");
    // No request is running: the one cached body is all rendering holds.
    let alive = m.value("config_sidecar_rendered_bytes_alive");
    assert!(
        alive > 0.0 && alive <= held,
        "alive {alive}, held {held}: {status}"
    );
    assert_eq!(
        m.value("config_sidecar_watch_events_applied_total"),
        before + 2.0
    );
    assert_eq!(m.value("config_sidecar_resyncs_total"), 0.0);
    assert!(m.value("config_sidecar_staleness_seconds") < 5.0);
    let endpoint = cluster.endpoint(0);
    assert_eq!(
        m.value(&format!(
            "config_sidecar_probe_success{{endpoint=\"{endpoint}\",check=\"quorum\"}}"
        )),
        1.0
    );
    assert!(m
        .get(&format!(
            "config_sidecar_probe_latency_seconds{{endpoint=\"{endpoint}\"}}"
        ))
        .is_some());
    assert_eq!(
        m.value(&format!(
            "config_sidecar_endpoint_state{{endpoint=\"{endpoint}\",state=\"healthy\"}}"
        )),
        1.0
    );
    assert!(
        m.value(&format!(
            "config_sidecar_endpoint_calls_total{{endpoint=\"{endpoint}\",result=\"success\"}}"
        )) >= 1.0
    );
    assert_eq!(
        m.value(r#"config_sidecar_endpoint_selection{selection="random"}"#),
        1.0
    );
    assert_eq!(m.value(r#"config_sidecar_subscribers{kind="stream"}"#), 1.0);
    assert_eq!(
        m.value(r#"config_sidecar_subscribers{kind="blocking_query"}"#),
        0.0
    );

    // The stream's end is seen; the snapshot writer has written.
    drop(stream);
    eventually(
        Duration::from_secs(5),
        "stream gone, snapshot written",
        || async {
            let m = Scrape::take(&sidecar).await;
            m.value(r#"config_sidecar_subscribers{kind="stream"}"#) == 0.0
                && m.value("config_sidecar_snapshot_writes_total") >= 1.0
        },
    )
    .await;
    sidecar.stop().await;
}
