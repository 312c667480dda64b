//! The binary: bad configuration exits 2 with one message naming the setting; SIGTERM drains and
//! exits 0; `--healthcheck` tells a live sidecar from a gone one.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// Runs the binary to its end with `args` and `env`: its exit code, stdout and stderr.
fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = sidecar_command(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run the binary");
    let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).to_string();
    (
        out.status.code().unwrap_or(-1),
        text(out.stdout),
        text(out.stderr),
    )
}

/// Runs the binary to its end: its exit code and stderr.
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let (code, _, stderr) = run_to_end(args, env);
    (code, stderr)
}

/// Whether `url` answers 200 with the body `v`.
async fn serves_v(http: reqwest::Client, url: String) -> bool {
    match http.get(url).send().await {
        Ok(r) if r.status() == 200 => r.text().await.is_ok_and(|t| t == "v"),
        _ => false,
    }
}

/// One case: arguments, environment, and the text the error must contain.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn bad_configuration_exits_2_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "prefixes = [\"/a/\"]\nlisten = 7\n").unwrap();
    let bad_toml = bad_toml.to_str().unwrap();
    let cases: &[Case] = &[
        (&[], &[], "--prefix"),
        (&["--bogus-flag"], &[], "--bogus-flag"),
        (&["--prefix", "config/app"], &[], "must start with '/'"),
        (
            &["--prefix", "/a/", "--endpoints", "etcd:2379"],
            &[],
            "--endpoints",
        ),
        (
            &["--prefix", "/a/", "--endpoints", "http://127.0.0.1"],
            &[],
            "no port",
        ),
        (
            &["--prefix", "/a/", "--listen", "localhost"],
            &[],
            "--listen",
        ),
        (
            &["--prefix", "/a/", "--log-format", "yaml"],
            &[],
            "--log-format",
        ),
        (
            &["--prefix", "/a/", "--endpoint-selection", "fastest"],
            &[],
            "--endpoint-selection",
        ),
        (
            &["--prefix", "/a/", "--config", "/does/not/exist.toml"],
            &[],
            "--config",
        ),
        (&["--config", bad_toml], &[], "--config"),
        (
            &[],
            &[
                ("CONFIG_SIDECAR_PREFIXES", "/a/"),
                ("CONFIG_SIDECAR_ENDPOINTS", "nope"),
            ],
            "--endpoints",
        ),
        (
            &[],
            &[("CONFIG_SIDECAR_PREFIXES", "relative/")],
            "must start with '/'",
        ),
    ];
    for (args, env, needle) in cases {
        let (code, stderr) = run(args, env);
        assert_eq!(code, 2, "{args:?} {env:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?} {env:?}: expected {needle:?} in {stderr:?}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// `--check-config` resolves every setting by flag, then environment, then file, then default,
/// says where each came from, and prints it in the file's syntax: fed back as the file, the same
/// values come out, now from the file.
#[test]
fn check_config_shows_each_setting_and_where_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "prefixes = [\"/a/\", \"/b/\"]\ndial_timeout = \"3s\"\nwatch_deadline = \"9s\"\npage_size = 50\n",
    )
    .unwrap();
    let check = |args: &[&str], env: &[(&str, &str)]| {
        let mut args = args.to_vec();
        args.push("--check-config");
        let (code, stdout, stderr) = run_to_end(&args, env);
        assert_eq!(code, 0, "{stderr}");
        stdout
    };
    let text = check(
        &["--config", file.to_str().unwrap(), "--dial-timeout", "4s"],
        &[
            ("CONFIG_SIDECAR_WATCH_DEADLINE", "7s"),
            ("CONFIG_SIDECAR_ETCD_USERNAME", "u"),
            ("CONFIG_SIDECAR_ETCD_PASSWORD", "pw-never-printed"),
        ],
    );
    for line in [
        "dial_timeout = \"4s\"  # flag",
        "watch_deadline = \"7s\"  # environment",
        "prefixes = [\"/a/\", \"/b/\"]  # file",
        "page_size = \"50\"  # file",
        "request_timeout = \"5s\"  # default",
        "etcd_password = \"<redacted>\"  # environment",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing in:\n{text}"
        );
    }
    assert!(!text.contains("pw-never-printed"));

    let roundtrip = dir.path().join("out.toml");
    let without_password: String = text
        .lines()
        .filter(|l| !l.starts_with("etcd_username") && !l.starts_with("etcd_password"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&roundtrip, &without_password).unwrap();
    let again = check(&["--config", roundtrip.to_str().unwrap()], &[]);
    assert_eq!(
        again.replace("# file", "#"),
        without_password
            .replace("# flag", "#")
            .replace("# environment", "#")
            .replace("# file", "#")
            .replace("# default", "#"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_binary_with_exit_0() {
    let cluster = EtcdCluster::start(1).await;
    cluster
        .client()
        .await
        .put("/bin/k", "v", None)
        .await
        .unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Process::spawn(
        sidecar_command(["--listen", &listen, "--log-format", "json"])
            .env("CONFIG_SIDECAR_ENDPOINTS", cluster.endpoint(0))
            .env("CONFIG_SIDECAR_PREFIXES", "/bin/")
            .stderr(Stdio::piped()),
    );
    let http = reqwest::Client::new();
    let url = format!("http://{listen}/v1/kv/bin/k");
    eventually(Duration::from_secs(20), "binary serves the key", || {
        serves_v(http.clone(), url.clone())
    })
    .await;
    // The container health check: needs only the listen address, not the serving settings.
    let (code, stderr) = run(&["--healthcheck"], &[("CONFIG_SIDECAR_LISTEN", &listen)]);
    assert_eq!(code, 0, "healthy sidecar: {stderr}");
    let (code, stderr) = run(&["--healthcheck", "/readyz", "--listen", &listen], &[]);
    assert_eq!(code, 0, "ready sidecar: {stderr}");
    let status = child.terminate(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
    let (code, stderr_check) = run(&["--healthcheck", "--listen", &listen], &[]);
    assert_eq!(code, 1, "no sidecar any more: {stderr_check}");
    assert!(stderr_check.contains("unhealthy"), "{stderr_check}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    // JSON logs: every line is one JSON object.
    for line in stderr.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
    assert!(stderr.contains("SIGTERM"), "{stderr}");
}

/// SIGHUP reads the file again: a new log level takes effect at once (debug lines appear), a
/// changed prefix is refused with a log line naming its section, and serving goes on. A second
/// reload sets a webhook and a 1 s header-read timeout: a new connection that trickles its head
/// is cut after that, and the next mode transition is posted to the new webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_live_settings_and_refuses_what_needs_a_restart() {
    let mut cluster = EtcdCluster::start(1).await;
    cluster
        .client()
        .await
        .put("/hup/k", "v", None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    let endpoint = cluster.endpoint(0);
    let write_config = |level: &str, prefix: &str, more: &str| {
        std::fs::write(
            &file,
            format!(
                "endpoints = [\"{endpoint}\"]\nprefixes = [\"{prefix}\"]\nlog_level = \"{level}\"\n{more}"
            ),
        )
        .unwrap();
    };
    write_config("info", "/hup/", "");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = Process::spawn(
        sidecar_command(["--config", file.to_str().unwrap(), "--listen", &listen])
            .stderr(Stdio::piped()),
    );
    // Collect stderr lines as they come.
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                lines.lock().unwrap().push(line);
            }
        })
    };
    let logged = |text: &'static str| {
        let lines = lines.clone();
        move || {
            let found = lines.lock().unwrap().iter().any(|l| l.contains(text));
            async move { found }
        }
    };
    let http = reqwest::Client::new();
    let url = format!("http://{listen}/v1/kv/hup/k");
    let read = || serves_v(http.clone(), url.clone());
    eventually(Duration::from_secs(20), "binary serves the key", read).await;
    assert!(
        !logged("answered from the fast path")().await,
        "no debug lines at info"
    );
    assert!(
        !lines.lock().unwrap().iter().any(|l| l.contains('\x1b')),
        "no terminal colour codes when stderr is not a terminal"
    );

    write_config("debug", "/other/", "");
    child.signal(Signal::HUP);
    eventually(
        Duration::from_secs(10),
        "the new level is logged",
        logged("log_level"),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the prefix change is refused",
        logged("needs a restart"),
    )
    .await;
    assert!(
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("needs a restart") && l.contains("sync")),
        "the refusal names the section"
    );
    // Still serving the old prefix, now with debug lines.
    assert!(read().await, "still serving /hup/");
    eventually(
        Duration::from_secs(10),
        "debug lines appear",
        logged("answered from the fast path"),
    )
    .await;

    // A webhook that records what it is sent.
    let posted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let hook = {
        let posted = posted.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(t): axum::Json<serde_json::Value>| {
                let posted = posted.clone();
                async move { posted.lock().unwrap().push(t) }
            }),
        )
    };
    let hook_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", hook_listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(hook_listener, hook).await });
    write_config(
        "debug",
        "/hup/",
        &format!("webhook = \"{hook_url}\"\nheader_read_timeout = \"1s\"\n"),
    );
    child.signal(Signal::HUP);
    eventually(
        Duration::from_secs(10),
        "the webhook change is logged",
        logged("setting=\"webhook\""),
    )
    .await;
    assert!(
        !lines.lock().unwrap().iter().any(|l| l.contains(&hook_url)),
        "the webhook URL is not logged"
    );
    // New connections get the new header-read timeout: a trickled head is cut within 1-1.5 s.
    // The clock starts before the head's first byte is sent, so a late-scheduled test cannot
    // see the cut as early.
    let started = Instant::now();
    let mut slow = tokio::net::TcpStream::connect(&listen).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, b"GET /v1/kv/hup/k HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut slow, &mut buf),
    )
    .await
    .expect("the connection is cut well before the old 10 s timeout")
    .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "cut after the timeout, not before"
    );
    // The pin setting is live too: pinned read-only by the file, then back to auto.
    let more = format!(
        "webhook = \"{hook_url}\"\nheader_read_timeout = \"1s\"\nalert_min_interval = \"0s\"\n"
    );
    write_config("debug", "/hup/", &format!("{more}pin = \"read-only\"\n"));
    child.signal(Signal::HUP);
    let mode_of = || {
        let (http, url) = (http.clone(), format!("http://{listen}/v1/kv/hup/k"));
        async move {
            let r = http.get(url).send().await.ok()?;
            let mode = r.headers().get("x-config-mode")?.to_str().ok()?.to_string();
            let pinned = r
                .headers()
                .get("x-config-pinned")
                .map(|v| v.to_str().unwrap().to_string());
            Some((mode, pinned))
        }
    };
    eventually(Duration::from_secs(10), "pinned by the file", || async {
        mode_of().await == Some(("read-only".into(), Some("read-only".into())))
    })
    .await;
    eventually(Duration::from_secs(10), "the pin is posted", || async {
        posted.lock().unwrap().iter().any(|t| {
            t["to"] == "read-only"
                && t["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("pinned to read-only by the operator"))
        })
    })
    .await;
    write_config("debug", "/hup/", &format!("{more}pin = \"auto\"\n"));
    child.signal(Signal::HUP);
    eventually(Duration::from_secs(10), "unpinned by the file", || async {
        mode_of().await == Some(("full".into(), None))
    })
    .await;

    // The next transition goes to the new webhook.
    cluster.kill(0);
    eventually(
        Duration::from_secs(20),
        "the transition is posted",
        || async {
            posted
                .lock()
                .unwrap()
                .iter()
                .any(|t| t["to"] == "cache-only")
        },
    )
    .await;
    assert_eq!(child.terminate(Duration::from_secs(15)).code(), Some(0));
    reader.join().unwrap();
}

/// A listen address beyond loopback is refused without `--allow-remote`, and with it the
/// sidecar starts and warns. Started with a low soft limit on open files, it raises it to the
/// hard limit (connections are files).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_beyond_loopback_needs_a_flag_and_warns() {
    let listen = format!("0.0.0.0:{}", free_port());
    let dead = format!("http://127.0.0.1:{}", free_port());
    let args = ["--listen", &listen, "--endpoints", &dead, "--prefix", "/a/"];
    let (code, stderr) = run(&args, &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--allow-remote"), "{stderr}");

    let mut command = sidecar_command(args);
    command.arg("--allow-remote").stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (getrlimit, setrlimit) between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            limit.rlim_cur = limit.rlim_max.min(256);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            Ok(())
        });
    }
    let mut child = Process::spawn(&mut command);
    let port = listen.rsplit(':').next().unwrap();
    let local = format!("127.0.0.1:{port}");
    eventually(Duration::from_secs(10), "listening", || async {
        tokio::net::TcpStream::connect(&local).await.is_ok()
    })
    .await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        open_files[3], open_files[4],
        "soft limit raised to hard: {open_files:?}"
    );
    assert_ne!(open_files[3], "256");
    assert_eq!(child.terminate(Duration::from_secs(15)).code(), Some(0));
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("other hosts can reach"), "{stderr}");
}

/// A supervisor may signal the sidecar the moment its port answers: SIGTERM then still stops it
/// with exit 0 and SIGHUP still reloads rather than ending it (both signals' default action).
/// Before the handlers were registered ahead of the bind, about half of such signals killed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_sent_as_soon_as_the_port_answers_are_handled() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    for round in 0..10 {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut child = Process::spawn(&mut sidecar_command([
            "--listen",
            &listen,
            "--endpoints",
            &dead,
            "--prefix",
            "/a/",
        ]));
        // As soon as it answers: a tight loop, no polling interval to hide the window in.
        let started = Instant::now();
        while std::net::TcpStream::connect(&listen).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "never listened"
            );
            std::thread::yield_now();
        }
        let hangup_first = round % 2 == 1;
        if hangup_first {
            child.signal(Signal::HUP);
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(child.try_wait().unwrap(), None, "SIGHUP ended the process");
        }
        let status = child.terminate(Duration::from_secs(15));
        assert_eq!(
            status.code(),
            Some(0),
            "round {round} (SIGHUP first: {hangup_first}): {status:?}"
        );
    }
}
