//! etcd security: the sidecar mirrors, watches and writes through a real etcd that serves clients
//! over TLS only, asks for client certificates and has authentication on; the password never
//! shows in logs or `/v1/status`, and a wrong one is named as such.

mod common;

use std::time::Duration;

use common::*;
use config_sidecar::config::{Config, Environment};
use etcd_client::{Client, Permission};

/// The sidecar's etcd user and password.
const USER: &str = "sidecar";
const PASSWORD: &str = "pw-Zq81-never-printed";

/// Turns authentication on: `root` (whom the harness's client certificate names) and a `sidecar`
/// user that may read and write `/app/` and nothing else.
async fn enable_auth(etcd: &mut Client) {
    etcd.user_add("root", "root-pw-unused", None).await.unwrap();
    etcd.user_grant_role("root", "root").await.unwrap();
    etcd.role_add("app").await.unwrap();
    etcd.role_grant_permission("app", Permission::read_write("/app/").with_prefix())
        .await
        .unwrap();
    etcd.user_add(USER, PASSWORD, None).await.unwrap();
    etcd.user_grant_role(USER, "app").await.unwrap();
    etcd.auth_enable().await.unwrap();
}

/// The sidecar's configuration against `cluster` with `pki`'s sidecar certificate, from flags.
fn secure_config(
    cluster: &EtcdCluster,
    pki: &TestPki,
    password_file: &std::path::Path,
) -> Result<Config, config_sidecar::config::ConfigError> {
    let path = |p: &std::path::Path| p.display().to_string();
    Config::from_args(
        [
            "config-sidecar".to_string(),
            format!("--endpoints={}", cluster.endpoints().join(",")),
            "--prefix=/app/".into(),
            format!("--etcd-ca-file={}", path(&pki.path("ca.pem"))),
            format!("--etcd-cert-file={}", path(&pki.path("sidecar.pem"))),
            format!("--etcd-key-file={}", path(&pki.path("sidecar-key.pem"))),
            format!("--etcd-username={USER}"),
            format!("--etcd-password-file={}", path(password_file)),
            "--allow-writes".into(),
        ],
        Environment::Ignored,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_watches_and_writes_over_tls_with_password_auth() {
    let pki = TestPki::generate();
    // Tokens that expire after 2 s unused, so the test sees the sidecar authenticate again.
    let mut cluster = EtcdCluster::start_tls(1, &pki, &["--auth-token-ttl", "2"]).await;
    let mut etcd = cluster.client().await;
    enable_auth(&mut etcd).await;
    etcd.put("/app/a", "1", None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let mut config = secure_config(&cluster, &pki, &password_file).unwrap();
    config.snapshot = Some(config_sidecar::config::SnapshotConfig::at(
        dir.path().join("mirror.snap"),
    ));
    assert!(
        !format!("{config:?}").contains(PASSWORD) && !format!("{config:?}").contains("PRIVATE"),
        "Debug output shows a secret"
    );
    let sidecar = start_sidecar(fast_failure_detection(config.clone())).await;
    assert_eq!(sidecar.value("/v1/kv/app/a").await.as_deref(), Some("1"));
    // The probes read a key the sidecar's role allows, so the mode reaches full.
    sidecar.wait_mode("full", Duration::from_secs(10)).await;

    // The watch delivers.
    etcd.put("/app/b", "2", None).await.unwrap();
    eventually(Duration::from_secs(5), "watched put", || async {
        sidecar.value("/v1/kv/app/b").await.as_deref() == Some("2")
    })
    .await;

    // Let the write client's token expire unused: the next write authenticates again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let put = sidecar
        .http
        .put(sidecar.url("/v1/kv/app/c"))
        .body("3")
        .send()
        .await
        .unwrap();
    assert!(
        put.status().is_success(),
        "write after token expiry: {put:?}"
    );
    eventually(Duration::from_secs(5), "own write mirrored", || async {
        sidecar.value("/v1/kv/app/c").await.as_deref() == Some("3")
    })
    .await;

    // A restarted member has forgotten every token: the watch reconnects and authenticates.
    cluster.kill(0);
    cluster.restart(0);
    cluster.wait_writable(Duration::from_secs(30)).await;
    let mut etcd = cluster.client().await;
    etcd.put("/app/d", "4", None).await.unwrap();
    eventually(
        Duration::from_secs(15),
        "put after etcd restart",
        || async { sidecar.value("/v1/kv/app/d").await.as_deref() == Some("4") },
    )
    .await;

    let status = sidecar.get("/v1/status").await.text().await.unwrap();
    assert!(!status.contains(PASSWORD), "/v1/status shows the password");
    let metrics = sidecar.get("/metrics").await.text().await.unwrap();
    assert!(!metrics.contains(PASSWORD), "/metrics shows the password");
    sidecar.stop().await;

    // Restarted onto its disk snapshot: it checks the cluster and resumes its watch with only
    // what its role may read (no full load, and no key outside /app/ asked for).
    etcd.put("/app/e", "5", None).await.unwrap();
    let sidecar = start_sidecar(fast_failure_detection(config)).await;
    eventually(Duration::from_secs(15), "put after the restart", || async {
        sidecar.value("/v1/kv/app/e").await.as_deref() == Some("5")
    })
    .await;
    let status = sidecar.json("/v1/status").await;
    assert_eq!(status["sync"]["full_loads"], 0, "{status}");
    assert_eq!(status["sync"]["reconnects"], 0, "{status}");
    sidecar.stop().await;
}

/// The binary, at debug level for every crate: a wrong password is reported as an
/// authentication failure and the sidecar is not ready; the right one serves. Neither password
/// appears in the logs or in `/v1/status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_logs_or_status() {
    let pki = TestPki::generate();
    let cluster = EtcdCluster::start_tls(1, &pki, &[]).await;
    let mut etcd = cluster.client().await;
    enable_auth(&mut etcd).await;
    etcd.put("/app/k", "v", None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let wrong = "wrong-pw-Yx42-never-printed";
    let token = "write-token-Qp7-never-printed";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();

    for (password, serves) in [(wrong, false), (PASSWORD, true)] {
        let listen = format!("127.0.0.1:{}", free_port());
        let log_path = dir.path().join(format!("{serves}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Process::spawn(
            sidecar_command([
                "--listen",
                &listen,
                "--log-level",
                "debug",
                "--prefix",
                "/app/",
            ])
            .args(["--endpoints", &cluster.endpoint(0)])
            .arg("--etcd-ca-file")
            .arg(pki.path("ca.pem"))
            .arg("--etcd-cert-file")
            .arg(pki.path("sidecar.pem"))
            .arg("--etcd-key-file")
            .arg(pki.path("sidecar-key.pem"))
            .args(["--etcd-username", USER, "--allow-writes"])
            .arg("--write-token-file")
            .arg(&token_file)
            .env("CONFIG_SIDECAR_ETCD_PASSWORD", password)
            .stderr(log),
        );
        let status_url = format!("http://{listen}/v1/status");
        let status = || async {
            let r = http.get(&status_url).send().await.ok()?;
            r.text().await.ok()
        };
        if serves {
            let url = format!("http://{listen}/v1/kv/app/k");
            eventually(Duration::from_secs(20), "binary serves the key", || async {
                match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => r.text().await.is_ok_and(|t| t == "v"),
                    _ => false,
                }
            })
            .await;
        } else {
            eventually(
                Duration::from_secs(20),
                "status names the failed authentication",
                || async {
                    status()
                        .await
                        .is_some_and(|s| s.contains("authentication failed"))
                },
            )
            .await;
            let ready = http
                .get(format!("http://{listen}/readyz"))
                .send()
                .await
                .unwrap();
            assert_eq!(ready.status(), 503, "ready without etcd access");
        }
        let text = status().await.expect("status answers");
        let metrics = http
            .get(format!("http://{listen}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for (what, body) in [("/v1/status", &text), ("/metrics", &metrics)] {
            assert!(!body.contains(password), "{what} shows the password");
            assert!(!body.contains(token), "{what} shows the write token");
        }
        drop(child);
        let logs = std::fs::read_to_string(&log_path).unwrap();
        assert!(logs.contains("DEBUG"), "debug logging is on");
        let key_pem = std::fs::read_to_string(pki.path("sidecar-key.pem")).unwrap();
        let key_line = key_pem.lines().nth(1).unwrap();
        assert!(
            !logs.contains(password) && !logs.contains(token) && !logs.contains(key_line),
            "the logs show a secret ({} bytes of logs)",
            logs.len()
        );
    }
}
