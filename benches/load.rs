//! The load benchmark: in one run on this machine, a real 3-member etcd cluster, the sidecar
//! (release build), nginx (`worker_processes auto`, serving the same value from a file), a bare
//! hyper server answering a fixed body (the stack's ceiling) and etcd's own JSON gateway, each
//! driven by wrk at the same settings; plus propagation, reads under writes, memory, cold start
//! and resync. It prints one table and, on a full run, writes it to `benches/results/latest.md`.
//!
//! `cargo bench --bench load` runs it at full size. Without `--bench` (as `cargo test` runs it) it
//! is a smoke run at tiny size that only checks that every part still works. `LOAD_SECONDS`
//! overrides the wrk duration.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    compact_to, eventually, proxy_every_member, put_rev, sidecar_command, EtcdCluster, Fault,
    Nginx, Process, SseClient,
};
use etcd_client::{Txn, TxnOp};

/// Sizes of one run.
struct Plan {
    /// wrk duration per target and round.
    seconds: u64,
    /// Rounds of the sidecar / ceiling / nginx comparison: each round runs all three back to
    /// back (in a rotating order), and the table reports the median, so that a burst of noise
    /// on the machine moves one round rather than the ratio.
    rounds: usize,
    /// Keys in the memory / cold start / resync part.
    keys: usize,
    /// Puts timed for propagation.
    propagation_puts: usize,
    /// Whether to write the results file.
    full: bool,
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], common::free_port()))
}

/// What wrk measured.
#[derive(Debug, Clone, Copy, Default)]
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Wrk {
    /// The median of each figure over several runs.
    fn median(runs: &[Wrk]) -> Wrk {
        let mid = |f: fn(&Wrk) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            percentile(&v, 0.5)
        };
        Wrk {
            rps: mid(|w| w.rps),
            p50_ms: mid(|w| w.p50_ms),
            p99_ms: mid(|w| w.p99_ms),
        }
    }
}

fn parse_latency(text: &str) -> f64 {
    let text = text.trim();
    let (num, scale) = if let Some(v) = text.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = text.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = text.strip_suffix('s') {
        (v, 1000.0)
    } else {
        (text, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * scale
}

/// Runs wrk with 2 threads and 32 connections against `url`.
fn wrk(url: &str, seconds: u64, script: Option<&Path>) -> Wrk {
    let mut cmd = Command::new("wrk");
    // wrk counts an answer later than its timeout (2 s by default) as a socket error, which
    // fails the run: on a machine busy with other work that is a stall, not a broken server.
    cmd.args([
        "-t2",
        "-c32",
        &format!("-d{seconds}s"),
        "--timeout",
        "10s",
        "--latency",
    ]);
    if let Some(s) = script {
        cmd.arg("-s").arg(s);
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("wrk runs (scripts/install-deps.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut result = Wrk::default();
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            result.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("50%") {
            result.p50_ms = parse_latency(v);
        } else if let Some(v) = line.strip_prefix("99%") {
            result.p99_ms = parse_latency(v);
        }
    }
    let errors = text.contains("Non-2xx") || text.contains("Socket errors");
    assert!(
        result.rps > 0.0 && !errors,
        "wrk against {url} failed:\n{text}"
    );
    result
}

/// The ceiling: a bare hyper server answering a fixed body, on its own 2-thread runtime. wrk asks
/// it for the same path as the sidecar, so both parse the same request.
fn start_ceiling(body: Bytes) -> SocketAddr {
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let addr = free_addr();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let _ = stream.set_nodelay(true);
                let body = body.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        let body = body.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(body)))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    addr
}

/// The sidecar binary as a child process.
struct SidecarProcess {
    /// The running binary (killed when dropped).
    process: Process,
    /// Its URL.
    base: String,
}

impl SidecarProcess {
    fn start(endpoints: &[String], prefix: &str, snapshot: &Path) -> SidecarProcess {
        let addr = free_addr();
        let process = Process::spawn(
            sidecar_command(["--listen", &addr.to_string(), "--prefix", prefix])
                .args(["--endpoints", &endpoints.join(",")])
                .arg("--snapshot")
                .arg(snapshot)
                .args(["--log-level", "warn"]),
        );
        SidecarProcess {
            process,
            base: format!("http://{addr}"),
        }
    }

    async fn wait_ready(&self, http: &reqwest::Client, within: Duration) {
        let url = format!("{}/readyz", self.base);
        eventually(within, "sidecar ready", || {
            let (http, url) = (http.clone(), url.clone());
            async move { http.get(url).send().await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
    }

    fn rss_bytes(&self) -> u64 {
        self.process.rss_bytes()
    }

    fn stop(mut self) {
        self.process.terminate(Duration::from_secs(15));
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn put_many(etcd: &mut etcd_client::Client, prefix: &str, n: usize, value: &str) -> i64 {
    let mut revision = 0;
    let keys: Vec<usize> = (0..n).collect();
    for chunk in keys.chunks(100) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|i| TxnOp::put(format!("{prefix}k{i:06}"), value, None))
            .collect();
        revision = etcd
            .txn(Txn::new().and_then(ops))
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
    }
    revision
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let seconds = common::env_number("LOAD_SECONDS", if full { 6 } else { 1 });
    let plan = Plan {
        seconds,
        rounds: if full { 5 } else { 1 },
        keys: if full { 100_000 } else { 1_000 },
        propagation_puts: if full { 1000 } else { 50 },
        full,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let table = runtime.block_on(run(plan));
    println!("{table}");
    if full {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/latest.md");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &table).unwrap();
        println!("written to {}", path.display());
    }
}

async fn run(plan: Plan) -> String {
    let http = reqwest::Client::new();
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    let value = "v".repeat(256);
    etcd.put("/bench/key", value.as_str(), None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Single-key GET: the sidecar, the ceiling, nginx, etcd's gateway.
    let sidecar =
        SidecarProcess::start(&cluster.endpoints(), "/bench/", &dir.path().join("a.snap"));
    sidecar.wait_ready(&http, Duration::from_secs(30)).await;
    let key_url = format!("{}/v1/kv/bench/key", sidecar.base);
    let r = http.get(&key_url).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), value);
    let ceiling = start_ceiling(Bytes::from(value.clone()));
    let nginx = {
        let dir = tempfile::tempdir().unwrap();
        let www = dir.path().join("www/bench");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("key"), value.as_bytes()).unwrap();
        let root = dir.path().join("www");
        Nginx::start(dir, &format!("location / {{ root {}; }}", root.display()))
    };
    let nginx_url = format!("http://{}/bench/key", nginx.addr);
    eventually(Duration::from_secs(10), "nginx serves", || {
        let (http, url) = (http.clone(), nginx_url.clone());
        async move { http.get(url).send().await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    let script = |serializable: bool| {
        let path = dir.path().join(format!("range-{serializable}.lua"));
        let body = format!(
            "{{\"key\":\"{}\",\"serializable\":{serializable}}}",
            base64_encode(b"/bench/key")
        );
        std::fs::write(
            &path,
            format!(
                "wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
            ),
        )
        .unwrap();
        path
    };
    let gateway = format!("{}/v3/kv/range", cluster.endpoint(0));
    let s = plan.seconds;
    let urls = [
        key_url.clone(),
        format!("http://{ceiling}/v1/kv/bench/key"),
        nginx_url.clone(),
    ];
    let mut runs: [Vec<Wrk>; 3] = Default::default();
    let mut round_ratios = Vec::new();
    for round in 0..plan.rounds {
        let mut this = [Wrk::default(); 3];
        for i in 0..3 {
            let target = (round + i) % 3;
            let url = urls[target].clone();
            this[target] = tokio::task::spawn_blocking(move || wrk(&url, s, None))
                .await
                .unwrap();
            runs[target].push(this[target]);
        }
        round_ratios.push((this[0].rps / this[1].rps, this[0].rps / this[2].rps));
    }
    let [side, ceil, ngx] = runs.map(|r| Wrk::median(&r));
    let etcd_ser = wrk(&gateway, s, Some(&script(true)));
    let etcd_lin = wrk(&gateway, s, Some(&script(false)));
    drop(nginx);

    // Propagation: an etcd put until its event arrives on the sidecar's stream.
    let mut stream = SseClient::connect(
        &http,
        &format!("{}/v1/watch/bench/prop/", sidecar.base),
        None,
    )
    .await;
    while stream.next(Duration::from_millis(200)).await.is_some() {}
    let mut samples = Vec::with_capacity(plan.propagation_puts);
    for i in 0..plan.propagation_puts {
        let t = Instant::now();
        let rev = put_rev(&mut etcd, format!("/bench/prop/k{}", i % 10), i.to_string()).await;
        loop {
            let e = stream.next(Duration::from_secs(5)).await.expect("event");
            if e.id.as_deref() == Some(&rev.to_string()) {
                break;
            }
        }
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (prop50, prop99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));

    // Read p99 while 1000 writes/s flow through the watch.
    let writer = {
        let mut etcd = cluster.client().await;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            let mut i = 0u64;
            loop {
                tick.tick().await;
                let _ = etcd
                    .put(format!("/bench/churn/k{}", i % 100), i.to_string(), None)
                    .await;
                i += 1;
            }
        })
    };
    let busy = tokio::task::spawn_blocking({
        let u = key_url.clone();
        move || wrk(&u, s, None)
    })
    .await
    .unwrap();
    writer.abort();
    sidecar.stop();

    // Memory, cold start and resync at `keys` keys of 1 KiB.
    let kib = "x".repeat(1024);
    put_many(&mut etcd, "/mem/", plan.keys, &kib).await;
    let (proxies, proxied) = proxy_every_member(&cluster).await;
    let snap = dir.path().join("mem.snap");
    let mem = SidecarProcess::start(&proxied, "/mem/", &snap);
    mem.wait_ready(&http, Duration::from_secs(120)).await;
    let status = common::get_json(&http, &format!("{}/v1/status", mem.base)).await;
    assert_eq!(status["keys"], plan.keys);
    let raw = status["bytes"].as_u64().unwrap();
    let rss = mem.rss_bytes();

    // Resync after compaction while cut off.
    for p in &proxies {
        p.set(Fault::Blackhole);
    }
    etcd.put("/mem/k000000", "changed", None).await.unwrap();
    let head = put_rev(&mut etcd, "/mem/k000001", "changed").await;
    compact_to(&mut etcd, head).await;
    let t = Instant::now();
    for p in &proxies {
        p.set(Fault::Pass);
    }
    let status_url = format!("{}/v1/status", mem.base);
    eventually(Duration::from_secs(120), "resync", || {
        let (http, url) = (http.clone(), status_url.clone());
        async move {
            let s: serde_json::Value = match http.get(url).send().await {
                Ok(r) => r.json().await.unwrap_or_default(),
                Err(_) => return false,
            };
            // A catch-up from the mirror's revision, not a full load (issue 28).
            s["sync"]["resumes"].as_u64() >= Some(1) && s["revision"].as_i64() >= Some(head)
        }
    })
    .await;
    let resync_ms = t.elapsed().as_secs_f64() * 1000.0;
    mem.stop();

    // Cold start from the snapshot, with etcd unreachable.
    let dead = format!("http://{}", free_addr());
    let t = Instant::now();
    let cold = SidecarProcess::start(&[dead], "/mem/", &snap);
    let ready_url = format!("{}/readyz", cold.base);
    loop {
        if http
            .get(&ready_url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "cold start");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let cold_ms = t.elapsed().as_secs_f64() * 1000.0;
    cold.stop();

    report(
        &plan,
        &round_ratios,
        side,
        ceil,
        ngx,
        etcd_ser,
        etcd_lin,
        busy,
        (prop50, prop99),
        (rss, raw),
        cold_ms,
        resync_ms,
    )
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[allow(clippy::too_many_arguments)]
fn report(
    plan: &Plan,
    round_ratios: &[(f64, f64)],
    side: Wrk,
    ceil: Wrk,
    ngx: Wrk,
    etcd_ser: Wrk,
    etcd_lin: Wrk,
    busy: Wrk,
    (prop50, prop99): (f64, f64),
    (rss, raw): (u64, u64),
    cold_ms: f64,
    resync_ms: f64,
) -> String {
    let mark = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut t = String::new();
    let when = common::utc_minute();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        t,
        "Load benchmark, {when}, {cpus} cores, wrk -t2 -c32 -d{}s on the same machine; sidecar, \
         ceiling and nginx: median of {} rounds run back to back{}.\n",
        plan.seconds,
        plan.rounds,
        if plan.full {
            ""
        } else {
            " (SMOKE RUN: tiny sizes, numbers mean nothing)"
        }
    );
    let _ = writeln!(t, "| single-key GET | requests/s | p50 ms | p99 ms |");
    let _ = writeln!(t, "| --- | ---: | ---: | ---: |");
    for (name, w) in [
        ("config-sidecar", side),
        ("bare hyper (ceiling)", ceil),
        ("nginx static", ngx),
        ("etcd gateway, serializable", etcd_ser),
        ("etcd gateway, linearizable", etcd_lin),
        ("config-sidecar under 1000 writes/s", busy),
    ] {
        let _ = writeln!(
            t,
            "| {name} | {:.0} | {:.3} | {:.3} |",
            w.rps, w.p50_ms, w.p99_ms
        );
    }
    let _ = writeln!(t, "\n| target | measured | goal | |");
    let _ = writeln!(t, "| --- | ---: | ---: | --- |");
    let rows = [
        (
            "throughput / ceiling",
            side.rps / ceil.rps,
            ">= 0.85",
            side.rps / ceil.rps >= 0.85,
        ),
        (
            "throughput / nginx",
            side.rps / ngx.rps,
            ">= 1.15",
            side.rps / ngx.rps >= 1.15,
        ),
        (
            "throughput / etcd serializable",
            side.rps / etcd_ser.rps,
            ">= 8",
            side.rps / etcd_ser.rps >= 8.0,
        ),
        (
            "throughput / etcd linearizable",
            side.rps / etcd_lin.rps,
            "",
            true,
        ),
        (
            "p99 / ceiling p99",
            side.p99_ms / ceil.p99_ms,
            "<= 1.2",
            side.p99_ms / ceil.p99_ms <= 1.2,
        ),
        (
            "p99 under writes / idle p99",
            busy.p99_ms / side.p99_ms,
            "<= 2",
            busy.p99_ms / side.p99_ms <= 2.0,
        ),
        ("propagation p50 (ms)", prop50, "", true),
        ("propagation p99 (ms)", prop99, "<= 5", prop99 <= 5.0),
        (
            "RSS / raw key+value bytes",
            rss as f64 / raw as f64,
            "<= 1.5",
            (rss as f64) <= 1.5 * raw as f64,
        ),
        (
            "cold start from snapshot (ms)",
            cold_ms,
            "<= 300",
            cold_ms <= 300.0,
        ),
        ("resync after compaction (ms)", resync_ms, "", true),
    ];
    for (name, value, goal, ok) in rows {
        let verdict = if goal.is_empty() { "" } else { mark(ok) };
        let _ = writeln!(t, "| {name} | {value:.2} | {goal} | {verdict} |");
    }
    let list = |f: fn(&(f64, f64)) -> f64| {
        round_ratios
            .iter()
            .map(|r| format!("{:.2}", f(r)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        t,
        "\nPer round: sidecar / ceiling {}; sidecar / nginx {}.",
        list(|r| r.0),
        list(|r| r.1)
    );
    let _ = writeln!(
        t,
        "\nMemory: {} keys x 1 KiB, raw {:.1} MiB, RSS {:.1} MiB.",
        plan.keys,
        raw as f64 / 1048576.0,
        rss as f64 / 1048576.0
    );
    t
}
