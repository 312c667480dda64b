//! The fleet benchmark: what N idle sidecars cost one etcd cluster, counted from etcd's own
//! `/metrics`, and what a mass restart of all of them costs.
//!
//! A real 3-member etcd and N sidecar binaries (each mirroring its own prefix of 200 keys of about
//! 1 KiB, with a disk snapshot), all ready and idle. Over a rest of some seconds it reports: etcd
//! unary RPCs per second per sidecar (`grpc_server_handled_total`, by method), watch stream
//! messages per second per sidecar (`grpc_server_msg_*_total`), etcd CPU per sidecar (`process_cpu_seconds_total`), watches and watch streams per member
//! (`etcd_debugging_mvcc_watcher_total`, `..._watch_stream_total`), and each sidecar's CPU and
//! resident memory. Then every sidecar is killed, one key of each prefix changes, and all start
//! at once: the bytes etcd sends (`etcd_network_client_grpc_sent_bytes_total`) against the bytes
//! of the first start's full loads, and the time until every sidecar serves the new revision.
//!
//! `cargo bench --bench fleet` runs it at full size (`FLEET_SIDECARS`, default 40; `FLEET_REST`
//! seconds, default 150: long enough for two or three of the light probe rounds a sidecar at rest
//! makes about every minute) and writes `benches/results/fleet.md`. At full size it runs the binary
//! as fleets run it, linked statically by `scripts/build-static.sh` (which it calls). Without
//! `--bench` (as `cargo test` runs it) it is a smoke run of 3 sidecars of the test build that
//! only checks that every part works.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{eventually, free_port, sidecar_command_of, EtcdCluster, Process};

/// One etcd member's counters, from its `/metrics`.
#[derive(Debug, Default, Clone)]
struct Counters {
    /// Unary RPCs handled, by method.
    unary: BTreeMap<String, f64>,
    /// Messages received and sent on watch streams (progress requests and their answers).
    watch_messages: f64,
    /// Process CPU seconds.
    cpu: f64,
    /// Bytes sent to gRPC clients.
    sent: f64,
    /// Watchers and watch streams open.
    watchers: f64,
    streams: f64,
}

/// A Prometheus sample's value, and its labels' text.
fn sample(line: &str) -> Option<(&str, &str, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, labels)) => (name, labels.trim_end_matches('}')),
        None => (series, ""),
    };
    Some((name, labels, value))
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.trim_matches('"'))
    })
}

async fn counters(endpoint: &str) -> Counters {
    let text = common::metrics_text(endpoint).await;
    let mut c = Counters::default();
    for (name, labels, value) in text.lines().filter_map(sample) {
        match name {
            "grpc_server_handled_total" if label(labels, "grpc_type") == Some("unary") => {
                let method = label(labels, "grpc_method").unwrap_or("?").to_string();
                *c.unary.entry(method).or_default() += value;
            }
            "grpc_server_msg_received_total" | "grpc_server_msg_sent_total"
                if label(labels, "grpc_method") == Some("Watch") =>
            {
                c.watch_messages += value;
            }
            "process_cpu_seconds_total" => c.cpu = value,
            "etcd_network_client_grpc_sent_bytes_total" => c.sent = value,
            "etcd_debugging_mvcc_watcher_total" => c.watchers = value,
            "etcd_debugging_mvcc_watch_stream_total" => c.streams = value,
            _ => {}
        }
    }
    c
}

async fn all_counters(cluster: &EtcdCluster) -> Vec<Counters> {
    let mut all = Vec::new();
    for endpoint in cluster.endpoints() {
        all.push(counters(&endpoint).await);
    }
    all
}

/// etcd's revision now.
async fn head_revision(etcd: &mut etcd_client::Client) -> i64 {
    let answer = etcd.get("/", None).await.expect("a read of etcd");
    answer.header().expect("response header").revision()
}

/// The sidecar binary every [`Sidecar`] runs: set once in `main`.
static BINARY: OnceLock<PathBuf> = OnceLock::new();

/// The statically linked release binary, as the image ships it, built by the script that says how.
fn static_binary() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-static.sh");
    let output = std::process::Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run scripts/build-static.sh");
    assert!(output.status.success(), "scripts/build-static.sh failed");
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// The binary's path as the results show it: from the repository's root.
fn binary_shown() -> String {
    let binary = BINARY.get().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    binary
        .strip_prefix(root)
        .unwrap_or(binary)
        .display()
        .to_string()
}

/// One sidecar process.
struct Sidecar {
    process: Process,
    base: String,
    prefix: String,
    args: Vec<String>,
}

impl Sidecar {
    fn start(args: Vec<String>, base: String, prefix: String) -> Sidecar {
        Sidecar {
            process: Process::spawn(&mut sidecar_command_of(BINARY.get().unwrap(), &args)),
            base,
            prefix,
            args,
        }
    }

    /// CPU nanoseconds each of its threads has used so far, from the scheduler's own count
    /// (`/proc/<pid>/task/*/schedstat`): utime and stime come in 10 ms ticks, and an idle
    /// sidecar uses about 7 of them in a 150 s rest, too coarse to compare 40 of them.
    fn cpu_by_thread(&self) -> BTreeMap<String, u64> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.process.id())).unwrap();
        tasks
            .filter_map(|task| {
                let task = task.ok()?;
                let line = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
                let nanos = line.split_whitespace().next()?.parse().ok()?;
                Some((task.file_name().to_string_lossy().into_owned(), nanos))
            })
            .collect()
    }

    /// CPU seconds used since `from` (threads started since count whole; a blocking thread
    /// that ended meanwhile, idle until it did, counts nothing).
    fn cpu_seconds_since(&self, from: &BTreeMap<String, u64>) -> f64 {
        let nanos: u64 = self
            .cpu_by_thread()
            .iter()
            .map(|(tid, now)| now.saturating_sub(from.get(tid).copied().unwrap_or(0)))
            .sum();
        nanos as f64 / 1e9
    }

    fn rss_bytes(&self) -> u64 {
        self.process.rss_bytes()
    }

    /// The revision it serves its prefix at, if it answers.
    async fn revision(&self, http: &reqwest::Client) -> Option<i64> {
        let r = http
            .get(format!("{}/v1/kv{}?recurse", self.base, self.prefix))
            .send()
            .await
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        r.headers()
            .get("x-config-revision")?
            .to_str()
            .ok()?
            .parse()
            .ok()
    }
}

/// Waits until every sidecar serves at least `revision`; how long since `started` that took.
async fn all_current(
    http: &reqwest::Client,
    sidecars: &[Sidecar],
    revision: i64,
    started: Instant,
) -> Duration {
    eventually(
        Duration::from_secs(120),
        "every sidecar current",
        || async {
            for s in sidecars {
                if s.revision(http).await.is_none_or(|r| r < revision) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    started.elapsed()
}

fn sum(all: &[Counters], f: impl Fn(&Counters) -> f64) -> f64 {
    all.iter().map(f).sum()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let binary = if full {
        static_binary()
    } else {
        PathBuf::from(common::BIN)
    };
    BINARY.set(binary).unwrap();
    let n = if full {
        common::env_number("FLEET_SIDECARS", 40)
    } else {
        3
    };
    let rest = Duration::from_secs(if full {
        common::env_number("FLEET_REST", 150)
    } else {
        1
    });
    // Each prefix: 200 keys of about 1 KiB at full size, so a full load is worth avoiding.
    let keys = if full { 200 } else { 20 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let table = runtime.block_on(run(n, keys, rest));
    println!("{table}");
    if full {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/fleet.md");
        std::fs::write(&path, &table).unwrap();
        println!("written to {}", path.display());
    }
}

async fn run(n: usize, keys: usize, rest: Duration) -> String {
    let http = reqwest::Client::new();
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    for i in 0..n {
        // etcd takes at most 128 operations per transaction.
        for chunk in (0..keys).collect::<Vec<_>>().chunks(100) {
            let puts: Vec<_> = chunk
                .iter()
                .map(|k| {
                    let value = format!(
                        "{{\"app\": {i}, \"key\": {k}, \"pad\": \"{}\"}}",
                        "x".repeat(1000)
                    );
                    etcd_client::TxnOp::put(format!("/fleet/app{i}/k{k}"), value, None)
                })
                .collect();
            etcd.txn(etcd_client::Txn::new().and_then(puts))
                .await
                .unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let endpoints = cluster.endpoints().join(",");

    // etcd's own idle CPU (raft heartbeats, housekeeping), which no sidecar causes.
    let idle_window = rest.min(Duration::from_secs(15));
    let idle_from = all_counters(&cluster).await;
    let idle_started = Instant::now();
    tokio::time::sleep(idle_window).await;
    let idle_to = all_counters(&cluster).await;
    let etcd_idle_cpu = (sum(&idle_to, |c| c.cpu) - sum(&idle_from, |c| c.cpu))
        / idle_started.elapsed().as_secs_f64();

    // First start: every sidecar loads its prefix.
    let before_start = all_counters(&cluster).await;
    let started = Instant::now();
    let mut sidecars = Vec::new();
    for i in 0..n {
        let listen = format!("127.0.0.1:{}", free_port());
        let prefix = format!("/fleet/app{i}/");
        let snapshot = dir.path().join(format!("app{i}.snap"));
        let args = vec![
            "--listen".to_string(),
            listen.clone(),
            "--endpoints".into(),
            endpoints.clone(),
            "--prefix".into(),
            prefix.clone(),
            "--snapshot".into(),
            snapshot.display().to_string(),
            "--log-level".into(),
            "warn".into(),
        ];
        sidecars.push(Sidecar::start(args, format!("http://{listen}"), prefix));
    }
    let head = head_revision(&mut etcd).await;
    let first_start = all_current(&http, &sidecars, head, started).await;
    let after_start = all_counters(&cluster).await;
    let first_bytes = sum(&after_start, |c| c.sent) - sum(&before_start, |c| c.sent);

    // At rest: nothing changes in etcd.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rest_from = all_counters(&cluster).await;
    let sidecar_cpu_from: Vec<BTreeMap<String, u64>> =
        sidecars.iter().map(Sidecar::cpu_by_thread).collect();
    let started = Instant::now();
    tokio::time::sleep(rest).await;
    let rest_to = all_counters(&cluster).await;
    let seconds = started.elapsed().as_secs_f64();
    let sidecar_cpu: Vec<f64> = sidecars
        .iter()
        .zip(&sidecar_cpu_from)
        .map(|(s, from)| s.cpu_seconds_since(from) / seconds)
        .collect();
    let rss: Vec<u64> = sidecars.iter().map(Sidecar::rss_bytes).collect();
    let mut by_method: BTreeMap<String, f64> = BTreeMap::new();
    for (to, from) in rest_to.iter().zip(&rest_from) {
        for (method, v) in &to.unary {
            *by_method.entry(method.clone()).or_default() +=
                v - from.unary.get(method).copied().unwrap_or_default();
        }
    }
    let unary: f64 = by_method.values().sum();
    let etcd_cpu = sum(&rest_to, |c| c.cpu) - sum(&rest_from, |c| c.cpu);
    let watch_messages =
        sum(&rest_to, |c| c.watch_messages) - sum(&rest_from, |c| c.watch_messages);
    let watchers: Vec<f64> = rest_to.iter().map(|c| c.watchers).collect();
    let streams: Vec<f64> = rest_to.iter().map(|c| c.streams).collect();

    // Mass restart: all killed, one key of each prefix changed, all started at once.
    for s in &mut sidecars {
        s.process.signal(common::Signal::KILL);
        let _ = s.process.wait();
    }
    for i in 0..n {
        etcd.put(format!("/fleet/app{i}/k0"), "changed", None)
            .await
            .unwrap();
    }
    let head = head_revision(&mut etcd).await;
    let restart_from = all_counters(&cluster).await;
    let started = Instant::now();
    let restarted: Vec<Sidecar> = sidecars
        .iter()
        .map(|s| Sidecar::start(s.args.clone(), s.base.clone(), s.prefix.clone()))
        .collect();
    drop(sidecars);
    let restart_time = all_current(&http, &restarted, head, started).await;
    let restart_to = all_counters(&cluster).await;
    let restart_bytes = sum(&restart_to, |c| c.sent) - sum(&restart_from, |c| c.sent);

    let per = |v: f64| v / n as f64;
    let mut out = String::new();
    let when = common::utc_minute();
    let _ = writeln!(
        out,
        "Fleet benchmark, {when}: {n} idle sidecars against one 3-member etcd on this machine, each mirroring {keys} keys of about 1 KiB; rest measured over {seconds:.0} s. Binary: {}.\n",
        binary_shown()
    );
    let _ = writeln!(out, "| at rest | value |\n| --- | ---: |");
    let _ = writeln!(
        out,
        "| etcd unary RPCs/s per sidecar | {:.2} |",
        per(unary / seconds)
    );
    for (method, v) in &by_method {
        if *v > 0.0 {
            let _ = writeln!(
                out,
                "| &nbsp; of which {method} | {:.2} |",
                per(v / seconds)
            );
        }
    }
    let _ = writeln!(
        out,
        "| watch stream messages/s per sidecar (progress asked and answered) | {:.2} |",
        per(watch_messages / seconds)
    );
    let _ = writeln!(
        out,
        "| etcd CPU per sidecar, above etcd's own idle (% of a core) | {:.3} |",
        per(etcd_cpu / seconds - etcd_idle_cpu).max(0.0) * 100.0
    );
    let _ = writeln!(
        out,
        "| etcd's own idle CPU, no sidecar (% of a core, 3 members) | {:.2} |",
        etcd_idle_cpu * 100.0
    );
    let _ = writeln!(out, "| watchers per member | {watchers:?} |");
    let _ = writeln!(out, "| watch streams per member | {streams:?} |");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let _ = writeln!(
        out,
        "| sidecar CPU at rest (% of a core), mean / max | {:.3} / {:.3} |",
        mean(&sidecar_cpu) * 100.0,
        sidecar_cpu.iter().cloned().fold(0.0, f64::max) * 100.0
    );
    let _ = writeln!(
        out,
        "| sidecar RSS (MiB), mean / max | {:.1} / {:.1} |",
        rss.iter().sum::<u64>() as f64 / rss.len().max(1) as f64 / 1048576.0,
        rss.iter().copied().max().unwrap_or(0) as f64 / 1048576.0
    );
    let _ = writeln!(out, "\n| start | value |\n| --- | ---: |");
    let _ = writeln!(
        out,
        "| first start: bytes etcd sent per sidecar | {:.0} |",
        per(first_bytes)
    );
    let _ = writeln!(
        out,
        "| first start: all current after (s) | {:.2} |",
        first_start.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| mass restart: bytes etcd sent per sidecar | {:.0} ({:.2} of a first start) |",
        per(restart_bytes),
        restart_bytes / first_bytes.max(1.0)
    );
    let _ = writeln!(
        out,
        "| mass restart: all current after (s) | {:.2} |",
        restart_time.as_secs_f64()
    );
    out
}
