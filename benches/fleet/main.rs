//! The fleet benchmark: what N idle sidecars cost one etcd cluster, counted from etcd's own
//! `/metrics`, and what each way a fleet comes back costs it.
//!
//! A real 3-member etcd and N sidecar binaries (each mirroring its own prefix of `FLEET_KEYS`
//! keys of about 500 bytes, 2,000 by default, with a disk snapshot), all ready and idle. Over a
//! rest of some seconds it reports: etcd unary RPCs per second per sidecar
//! (`grpc_server_handled_total`, by method), watch stream messages per second per sidecar
//! (`grpc_server_msg_*_total`), etcd CPU per sidecar (`process_cpu_seconds_total`), watches and
//! watch streams per member (`etcd_debugging_mvcc_watcher_total`, `..._watch_stream_total`), and
//! each sidecar's CPU and resident memory. Then the recovery scenarios ([`recovery`]): mass
//! restarts with etcd answering (`FLEET_RUNS` of them), a mass restart while every member is
//! frozen, every member killed and a compaction past every mirror before the fleet reconnects,
//! and `cache-only` pinned and unpinned fleet-wide. Each reports the bytes etcd sends
//! (`etcd_network_client_grpc_sent_bytes_total`) per sidecar, against a first start's full
//! loads, etcd's CPU, the catch-ups and full loads the fleet counted, and the time until every
//! sidecar serves the latest revision.
//!
//! `cargo bench --bench fleet` runs it at full size (`FLEET_SIDECARS`, default 40; `FLEET_REST`
//! seconds, default 150: long enough for two or three of the light probe rounds a sidecar at rest
//! makes about every minute, 0 to skip the rest; `FLEET_RUNS`, default 3) and writes
//! `benches/results/fleet.md` (`fleet-<N>.md` for another N). At full size it runs the binary as
//! fleets run it, linked statically by `scripts/build-static.sh` (which it calls). Without
//! `--bench` (as `cargo test` runs it) it is a smoke run of 3 sidecars of the test build that
//! checks that every part works.

#[path = "../../tests/common/mod.rs"]
mod common;
mod etcd_metrics;
mod recovery;
mod sidecars;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{free_port, EtcdCluster};
use etcd_metrics::{all_counters, cost, head_revision, sum};
use recovery::{Fleet, Outcome};
use sidecars::{until_current, Sidecar, ADMIN, BINARY};

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

/// The benchmark's size.
struct Size {
    sidecars: usize,
    keys: usize,
    rest: Duration,
    /// How long etcd's own idle CPU is measured, before any sidecar starts.
    idle: Duration,
    runs: usize,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let binary = if full {
        static_binary()
    } else {
        PathBuf::from(common::BIN)
    };
    BINARY.set(binary).unwrap();
    let size = if full {
        Size {
            sidecars: common::env_number("FLEET_SIDECARS", 40),
            keys: common::env_number("FLEET_KEYS", 2000),
            rest: Duration::from_secs(common::env_number("FLEET_REST", 150)),
            idle: Duration::from_secs(15),
            runs: common::env_number("FLEET_RUNS", 3),
        }
    } else {
        Size {
            sidecars: 3,
            keys: 20,
            rest: Duration::from_secs(1),
            idle: Duration::from_secs(1),
            runs: 1,
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let table = runtime.block_on(run(&size));
    println!("{table}");
    if full {
        let name = match size.sidecars {
            40 => "fleet.md".to_string(),
            n => format!("fleet-{n}.md"),
        };
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("benches/results")
            .join(name);
        std::fs::write(&path, &table).unwrap();
        println!("written to {}", path.display());
    }
}

/// A value of about 500 bytes.
fn value(app: usize, key: usize) -> String {
    format!(
        "{{\"app\": {app}, \"key\": {key}, \"pad\": \"{}\"}}",
        "x".repeat(460)
    )
}

/// What the fleet cost etcd at rest, and each sidecar's own CPU and memory.
struct Rest {
    seconds: f64,
    by_method: BTreeMap<String, f64>,
    unary: f64,
    etcd_cpu: f64,
    etcd_idle_cpu: f64,
    watch_messages: f64,
    watchers: Vec<f64>,
    streams: Vec<f64>,
    sidecar_cpu: Vec<f64>,
    rss: Vec<u64>,
}

async fn run(size: &Size) -> String {
    let n = size.sidecars;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let cluster = EtcdCluster::start(3).await;
    let mut etcd = cluster.client().await;
    for i in 0..n {
        // etcd takes at most 128 operations per transaction.
        for chunk in (0..size.keys).collect::<Vec<_>>().chunks(100) {
            let puts: Vec<_> = chunk
                .iter()
                .map(|&k| etcd_client::TxnOp::put(format!("/fleet/app{i}/k{k}"), value(i, k), None))
                .collect();
            etcd.txn(etcd_client::Txn::new().and_then(puts))
                .await
                .unwrap();
        }
    }
    // What one full load of one prefix costs etcd: the benchmark's own read of it, the unit
    // every recovery is measured in (a first start under a herd can cost more: loads that time
    // out are read again).
    let before_read = all_counters(&cluster).await;
    let prefix = etcd_client::GetOptions::new().with_prefix();
    let one = etcd.get("/fleet/app0/", Some(prefix)).await.unwrap();
    assert_eq!(one.kvs().len(), size.keys);
    let full_load = cost(&before_read, &all_counters(&cluster).await).bytes;

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, ADMIN).unwrap();
    let endpoints = cluster.endpoints().join(",");

    // etcd's own idle CPU (raft heartbeats, housekeeping), which no sidecar causes.
    let idle_window = size.idle;
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
            "--admin-token-file".into(),
            token.display().to_string(),
            "--log-level".into(),
            "warn".into(),
        ];
        sidecars.push(Sidecar::start(args, format!("http://{listen}"), prefix));
    }
    let head = head_revision(&mut etcd).await;
    let current_after = until_current(&http, &sidecars, head, started).await;
    let after_start = all_counters(&cluster).await;
    let window = started.elapsed();
    let cost = cost(&before_start, &after_start);
    let first_start = Outcome {
        what: "first start: nothing held, every sidecar loads its prefix".into(),
        since: "start",
        cost,
        window,
        current_after,
        loads: sidecars::fleet_loads(&http, &sidecars).await,
        note: String::new(),
    };

    let rest = if size.rest.is_zero() {
        None
    } else {
        Some(at_rest(&cluster, &sidecars, size.rest, etcd_idle_cpu).await)
    };

    let mut fleet = Fleet::new(http, cluster, etcd, sidecars);
    let mut outcomes = vec![first_start];
    for _ in 0..size.runs {
        outcomes.push(fleet.mass_restart().await);
    }
    outcomes.push(fleet.restart_while_frozen().await);
    outcomes.push(fleet.outage_with_compaction().await);
    outcomes.push(fleet.pinned_then_unpinned().await);
    report(size, (full_load, etcd_idle_cpu), rest.as_ref(), &outcomes)
}

/// Nothing changes in etcd for `window`: what the fleet costs it meanwhile.
async fn at_rest(
    cluster: &EtcdCluster,
    sidecars: &[Sidecar],
    window: Duration,
    etcd_idle_cpu: f64,
) -> Rest {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rest_from = all_counters(cluster).await;
    let sidecar_cpu_from: Vec<BTreeMap<String, u64>> =
        sidecars.iter().map(Sidecar::cpu_by_thread).collect();
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let rest_to = all_counters(cluster).await;
    let seconds = started.elapsed().as_secs_f64();
    let sidecar_cpu = sidecars
        .iter()
        .zip(&sidecar_cpu_from)
        .map(|(s, from)| s.cpu_seconds_since(from) / seconds)
        .collect();
    let cost = cost(&rest_from, &rest_to);
    Rest {
        seconds,
        unary: cost.unary.values().sum(),
        by_method: cost.unary,
        etcd_cpu: cost.cpu,
        etcd_idle_cpu,
        watch_messages: sum(&rest_to, |c| c.watch_messages) - sum(&rest_from, |c| c.watch_messages),
        watchers: rest_to.iter().map(|c| c.watchers).collect(),
        streams: rest_to.iter().map(|c| c.streams).collect(),
        sidecar_cpu,
        rss: sidecars.iter().map(Sidecar::rss_bytes).collect(),
    }
}

fn report(
    size: &Size,
    (full_load, etcd_idle_cpu): (f64, f64),
    rest: Option<&Rest>,
    outcomes: &[Outcome],
) -> String {
    let n = size.sidecars;
    let per = |v: f64| v / n as f64;
    let mut out = String::new();
    let when = common::utc_minute();
    let _ = writeln!(
        out,
        "Fleet benchmark, {when}: {n} sidecars against one 3-member etcd on this machine, each mirroring {} keys of about 500 bytes, with a disk snapshot. Binary: {}.\n",
        size.keys,
        binary_shown()
    );
    if let Some(r) = rest {
        let _ = writeln!(
            out,
            "| at rest, over {:.0} s | value |\n| --- | ---: |",
            r.seconds
        );
        let _ = writeln!(
            out,
            "| etcd unary RPCs/s per sidecar | {:.2} |",
            per(r.unary / r.seconds)
        );
        for (method, v) in &r.by_method {
            if *v > 0.0 {
                let _ = writeln!(
                    out,
                    "| &nbsp; of which {method} | {:.2} |",
                    per(v / r.seconds)
                );
            }
        }
        let _ = writeln!(
            out,
            "| watch stream messages/s per sidecar (progress asked and answered) | {:.2} |",
            per(r.watch_messages / r.seconds)
        );
        let _ = writeln!(
            out,
            "| etcd CPU per sidecar, above etcd's own idle (% of a core) | {:.3} |",
            per(r.etcd_cpu / r.seconds - r.etcd_idle_cpu).max(0.0) * 100.0
        );
        let _ = writeln!(
            out,
            "| etcd's own idle CPU, no sidecar (% of a core, 3 members) | {:.2} |",
            r.etcd_idle_cpu * 100.0
        );
        let _ = writeln!(out, "| watchers per member | {:?} |", r.watchers);
        let _ = writeln!(out, "| watch streams per member | {:?} |", r.streams);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let _ = writeln!(
            out,
            "| sidecar CPU at rest (% of a core), mean / max | {:.3} / {:.3} |",
            mean(&r.sidecar_cpu) * 100.0,
            r.sidecar_cpu.iter().cloned().fold(0.0, f64::max) * 100.0
        );
        let _ = writeln!(
            out,
            "| sidecar RSS (MiB), mean / max | {:.1} / {:.1} |\n",
            r.rss.iter().sum::<u64>() as f64 / r.rss.len().max(1) as f64 / 1048576.0,
            r.rss.iter().copied().max().unwrap_or(0) as f64 / 1048576.0
        );
    }
    let _ = writeln!(
        out,
        "A full load of one prefix (the benchmark's own read of it) costs etcd {full_load:.0} bytes: the unit of the column \"of a full load\".\n"
    );
    let _ = writeln!(
        out,
        "| start or recovery | bytes etcd sent per sidecar | of a full load | etcd CPU per sidecar above its idle (ms) | full loads / catch-ups | all current after (s), median / slowest | counted from | etcd RPCs per sidecar | seen |\n| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"
    );
    for o in outcomes {
        let rpcs: Vec<String> = (o.cost.unary.iter())
            .map(|(method, v)| format!("{method} {:.1}", per(*v)))
            .collect();
        let rpcs = rpcs.join(", ");
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.3} | {:.1} | {} / {} | {:.2} / {:.2} | {} | {} | {} |",
            o.what,
            per(o.cost.bytes),
            per(o.cost.bytes) / full_load,
            per(o.cost.cpu - etcd_idle_cpu * o.window.as_secs_f64()).max(0.0) * 1000.0,
            o.loads.0,
            o.loads.1,
            o.median().as_secs_f64(),
            o.all_current().as_secs_f64(),
            o.since,
            rpcs,
            o.note
        );
    }
    out
}
