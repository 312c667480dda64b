//! Rendered files against a real etcd and real files: the JSON is the `/v1/tree` body, a reader
//! never sees a partial file or a partial revision, an unchanged render keeps the file (same
//! inode), `.env` files source in `sh` and `bash`, and the permission is 0644; YAML reads back as
//! the tree; a template feeds a real nginx, reloaded by `on_change` when the value changes.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use etcd_client::{Txn, TxnOp};

/// The render targets `--render` values give, mirroring `/app/`.
fn targets(values: &[String]) -> Vec<config_sidecar::config::RenderTarget> {
    let mut args = vec![
        "config-sidecar".to_string(),
        "--prefix".into(),
        "/app/".into(),
    ];
    for value in values {
        args.push("--render".into());
        args.push(value.clone());
    }
    config_sidecar::config::Config::from_args(args, config_sidecar::config::Environment::Ignored)
        .unwrap()
        .render
}

/// The sidecar's status of rendered file `path`.
async fn file_status(sidecar: &Sidecar, path: &Path) -> serde_json::Value {
    let path = path.display().to_string();
    let status = sidecar.json("/v1/status").await;
    status["render"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == path.as_str())
        .unwrap()
        .clone()
}

/// Waits until the sidecar reports `path` rendered at `revision` or later; its status then.
async fn rendered(sidecar: &Sidecar, path: &Path, revision: i64) -> serde_json::Value {
    eventually(Duration::from_secs(5), "the file rendered", || async {
        file_status(sidecar, path).await["revision"]
            .as_i64()
            .unwrap()
            >= revision
    })
    .await;
    file_status(sidecar, path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_files_are_whole_revisions_written_only_when_they_change() {
    let cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    etcd.put("/app/web/title", "Hello", None).await.unwrap();
    etcd.put("/app/web/limits/conns", "10", None).await.unwrap();
    etcd.put("/app/web/pair/a", "0", None).await.unwrap();
    etcd.put("/app/web/pair/b", "0", None).await.unwrap();
    etcd.put("/app/db/url", "postgres://db/app", None)
        .await
        .unwrap();
    etcd.put("/app/env/greeting", "it's $HOME `uname` \"quoted\"", None)
        .await
        .unwrap();
    etcd.put("/app/env/db/max-conns", "32", None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("web.json");
    let env = dir.path().join("app.env");
    let mut config = sidecar_config(&cluster.endpoints(), &["/app/"]);
    config.render = targets(&[
        format!("/app/web={}", json.display()),
        format!("/app/env/={}", env.display()),
    ]);
    let sidecar = start_sidecar(config).await;
    let revision = put_rev(&mut etcd, "/app/web/title", "Hello!").await;
    rendered(&sidecar, &json, revision).await;

    // The JSON is exactly the tree the HTTP API serves, and the file is 0644.
    let tree = sidecar.get("/v1/tree/app/web").await.bytes().await.unwrap();
    assert_eq!(std::fs::read(&json).unwrap(), tree.to_vec());
    let value: serde_json::Value = serde_json::from_slice(&tree).unwrap();
    assert_eq!(value["title"], "Hello!");
    assert_eq!(value["limits"]["conns"], 10);
    assert_eq!(
        std::fs::metadata(&json).unwrap().permissions().mode() & 0o777,
        0o644
    );

    // A reader parsing the file in a loop while 60 two-key transactions land never sees a
    // partial file, nor a revision half applied (both keys always equal).
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, reads, path) = (stop.clone(), reads.clone(), json.clone());
        std::thread::spawn(move || {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                let bytes = std::fs::read(&path).expect("the file is always there");
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).expect("never a partial file");
                let (a, b) = (&v["pair"]["a"], &v["pair"]["b"]);
                assert_eq!(a, b, "never half a revision");
                let n = a.as_i64().unwrap();
                assert!(n >= last, "never back in time: {n} after {last}");
                last = n;
                reads.fetch_add(1, Ordering::Relaxed);
            }
            last
        })
    };
    let before = file_status(&sidecar, &json).await["writes"]
        .as_u64()
        .unwrap();
    let burst = std::time::Instant::now();
    let mut last_revision = 0;
    for n in 1..=60 {
        let txn = Txn::new().and_then([
            TxnOp::put("/app/web/pair/a", n.to_string(), None),
            TxnOp::put("/app/web/pair/b", n.to_string(), None),
        ]);
        last_revision = etcd.txn(txn).await.unwrap().header().unwrap().revision();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = rendered(&sidecar, &json, last_revision).await;
    let took = burst.elapsed();
    // The reader is a thread the machine may have starved so far: let it check enough reads,
    // two of them counted from now, so that one at least opened the file after its last write
    // (the one under way now may hold an older revision).
    let reads_then = reads.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(10),
        "a read of the last revision",
        || async {
            let n = reads.load(Ordering::Relaxed);
            n > 60 && n >= reads_then + 2
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    assert_eq!(reader.join().unwrap(), 60, "the last revision is written");
    // Coalesced: each write waits out COALESCE after a change, so the burst got at most one
    // write per 100 ms it lasted (plus one already waiting when it began). A count against the
    // burst's own duration, not a fixed one, since a loaded machine spreads the revisions out.
    let writes = status["writes"].as_u64().unwrap() - before;
    let most = took.as_millis() as u64 / 100 + 1;
    assert!(
        writes <= most,
        "bursts coalesced: {writes} writes for 60 revisions in {took:?}"
    );
    eprintln!(
        "60 revisions, {writes} writes, {} reads checked",
        reads.load(Ordering::Relaxed)
    );

    // A change outside the rendered directory: rendered again, unchanged, not rewritten.
    let inode = std::fs::metadata(&json).unwrap().ino();
    let revision = put_rev(&mut etcd, "/app/db/url", "postgres://db2/app").await;
    let after = rendered(&sidecar, &json, revision).await;
    assert_eq!(after["writes"], status["writes"], "not rewritten");
    assert!(after["unchanged"].as_u64().unwrap() > status["unchanged"].as_u64().unwrap());
    assert_eq!(std::fs::metadata(&json).unwrap().ino(), inode, "same file");

    // The .env file sources in sh and in bash, every value literal.
    rendered(&sidecar, &env, revision).await;
    for shell in ["sh", "bash"] {
        let out = std::process::Command::new(shell)
            .arg("-c")
            .arg(format!(
                "set -a; . '{}'; printf '%s|%s' \"$GREETING\" \"$DB_MAX_CONNS\"",
                env.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "it's $HOME `uname` \"quoted\"|32",
            "{shell}"
        );
    }

    // A value the format cannot hold: the render fails, the last good file stays, the render
    // check says which file and why; fixed, it is healthy again.
    assert_eq!(render_check(&sidecar).await["status"], "healthy");
    let good = std::fs::read(&env).unwrap();
    let bad = put_rev(&mut etcd, "/app/env/bad", "a\0b").await;
    eventually(Duration::from_secs(5), "the failure shown", || async {
        let check = render_check(&sidecar).await;
        check["status"] == "unhealthy" && check["reason"].as_str().unwrap().contains("NUL")
    })
    .await;
    assert_eq!(
        std::fs::read(&env).unwrap(),
        good,
        "the last good file stays"
    );
    let status = file_status(&sidecar, &env).await;
    assert!(status["failures"].as_u64().unwrap() >= 1);
    assert!(status["revision"].as_i64().unwrap() < bad);
    let metrics = sidecar.get("/metrics").await.text().await.unwrap();
    let series = format!(
        "config_sidecar_render_failures_total{{path=\"{}\"}}",
        env.display()
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(&series) && !l.ends_with(" 0")),
        "{series} in\n{metrics}"
    );
    etcd.delete("/app/env/bad", None).await.unwrap();
    eventually(Duration::from_secs(5), "healthy again", || async {
        render_check(&sidecar).await["status"] == "healthy"
    })
    .await;
    sidecar.stop().await;
}

/// The render check in `/v1/status`.
async fn render_check(sidecar: &Sidecar) -> serde_json::Value {
    let status = sidecar.json("/v1/status").await;
    status["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "render")
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_feeds_nginx_which_on_change_reloads() {
    let cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    etcd.put("/app/web/greeting", "hello", None).await.unwrap();
    etcd.put("/app/web/limits/conns", "10", None).await.unwrap();
    let nginx_dir = tempfile::tempdir().unwrap();
    let d = nginx_dir.path().to_path_buf();
    let template = d.join("site.conf.j2");
    std::fs::write(
        &template,
        "location / { default_type text/plain; return 200 \"{{ tree.greeting }} ({{ tree.limits.conns }})\\n\"; }\n",
    )
    .unwrap();
    let site = d.join("site.conf");
    let yaml = d.join("web.yaml");
    let mut reload = vec![Nginx::bin().to_string()];
    reload.extend(Nginx::args(&nginx_dir));
    reload.extend(["-s".to_string(), "reload".to_string()]);
    let mut config = sidecar_config(&cluster.endpoints(), &["/app/"]);
    config.render = targets(&[
        serde_json::json!({
            "prefix": "/app/web/", "path": site, "template": template, "mode": "0600",
            "on_change": { "command": reload, "timeout": "10s" },
        })
        .to_string(),
        format!("/app/web/={}", yaml.display()),
    ]);
    let sidecar = start_sidecar(config).await;
    let first = rendered(&sidecar, &site, 1).await;
    assert_eq!(
        std::fs::read_to_string(&site).unwrap(),
        "location / { default_type text/plain; return 200 \"hello (10)\\n\"; }\n"
    );
    assert_eq!(
        std::fs::metadata(&site).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The sidecar came first: its reload found no nginx to reload, and says so.
    assert_eq!(first["actions"], 0);
    eventually(
        Duration::from_secs(5),
        "the failed reload shown",
        || async {
            let check = render_check(&sidecar).await;
            check["status"] == "unhealthy"
                && check["reason"].as_str().unwrap().contains("on_change")
        },
    )
    .await;

    // YAML reads back as the tree the HTTP API serves.
    rendered(&sidecar, &yaml, 1).await;
    let tree: serde_json::Value = sidecar.json("/v1/tree/app/web").await;
    let docs =
        yaml_rust2::YamlLoader::load_from_str(&std::fs::read_to_string(&yaml).unwrap()).unwrap();
    assert_eq!(docs[0]["greeting"].as_str(), tree["greeting"].as_str());
    assert_eq!(
        docs[0]["limits"]["conns"].as_i64(),
        tree["limits"]["conns"].as_i64()
    );

    // nginx starts on the rendered file and serves the value.
    let nginx = Nginx::start(nginx_dir, &format!("include {};", site.display()));
    let http = reqwest::Client::new();
    let url = format!("http://{}/", nginx.addr);
    let served = |want: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            eventually(Duration::from_secs(10), want, || async {
                match http.get(&url).send().await {
                    Ok(r) => r.text().await.unwrap_or_default() == want,
                    Err(_) => false,
                }
            })
            .await
        }
    };
    served("hello (10)\n").await;

    // The value changes in etcd: the file is rewritten, on_change runs `nginx -s reload`, and
    // nginx serves the new value; the owed reload having succeeded, the check is healthy.
    let revision = put_rev(&mut etcd, "/app/web/greeting", "world").await;
    rendered(&sidecar, &site, revision).await;
    served("world (10)\n").await;
    eventually(Duration::from_secs(5), "the reload counted", || async {
        file_status(&sidecar, &site).await["actions"]
            .as_u64()
            .unwrap()
            >= 1
    })
    .await;
    assert_eq!(render_check(&sidecar).await["status"], "healthy");

    // A key the template needs is deleted: the render fails naming it, the file and nginx keep
    // the last good value, and no reload runs.
    let actions = file_status(&sidecar, &site).await["actions"].clone();
    etcd.delete("/app/web/limits/conns", None).await.unwrap();
    eventually(
        Duration::from_secs(5),
        "the template error shown",
        || async {
            let check = render_check(&sidecar).await;
            check["status"] == "unhealthy" && check["reason"].as_str().unwrap().contains("template")
        },
    )
    .await;
    assert!(std::fs::read_to_string(&site)
        .unwrap()
        .contains("world (10)"));
    served("world (10)\n").await;
    assert_eq!(file_status(&sidecar, &site).await["actions"], actions);
    sidecar.stop().await;
    drop(nginx);
}
