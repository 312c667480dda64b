//! The churn benchmark: resident memory of one sidecar binary while its mirror is rewritten
//! through etcd as fast as etcd takes it, against the settings that bound every buffer.
//!
//! A real 1-member etcd holds 500 keys under `/churn/`; the sidecar (release build, default
//! settings) mirrors them. For `CHURN_SECONDS` (default 30) writers rewrite them in transactions of
//! 20 puts at `CHURN_PUTS_PER_SECOND` (default 4000), 4 readers fetch `/v1/tree/churn/` in a loop, 20 change streams stay open reading and 4 more
//! reconnect each time they have read a reset's whole state (so resets happen mid-churn);
//! the sidecar's RSS is sampled every 100 ms. Then everything stops and RSS is sampled again for
//! 10 s. It runs with values of 1 KiB and of 10 KiB and reports, for each: RSS at rest before,
//! peak during, and 10 s after; puts per second achieved; the peak against the bound of docs/benchmarks.md
//! `64 MiB + 2 x mirrored bytes`; and the sidecar's own history and render cache use.
//!
//! `cargo bench --bench churn` runs it at full size (`CHURN_ROUNDS` rounds per value size,
//! default 3: the median and the worst are reported) and writes `benches/results/churn.md`.
//! Without `--bench` (as `cargo test` runs it) it is a 2-second smoke run that only checks that
//! every part works.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{eventually, free_port, sidecar_command, EtcdCluster, Process};
use futures_util::StreamExt;

/// Keys in the mirror.
const KEYS: usize = 500;
/// Puts per transaction.
const PER_TXN: usize = 20;
/// Streams that reconnect as soon as they have read a reset's whole state.
const RESETTING_STREAMS: usize = 4;

/// What one run measured.
struct Run {
    value_bytes: usize,
    mirrored: u64,
    rest: u64,
    /// The peak the formula of docs/benchmarks.md predicts, from `/v1/status` at rest.
    predicted: u64,
    peak: u64,
    after: u64,
    puts_per_second: f64,
    history_bytes: u64,
    cache_bytes: u64,
    /// Streams that received a reset's whole state during the churn (then reconnected).
    resets: u64,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let seconds = if full {
        common::env_number("CHURN_SECONDS", 30)
    } else {
        2
    };
    let settle = Duration::from_secs(if full { 10 } else { 1 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // `CHURN_VALUE_KIB=10` runs one value size only (comma-separated for several).
    let sizes: Vec<usize> = match std::env::var("CHURN_VALUE_KIB") {
        Ok(list) if full => list
            .split(',')
            .filter_map(|v| v.trim().parse::<usize>().ok())
            .map(|kib| kib * 1024)
            .collect(),
        _ if full => vec![1024, 10 * 1024],
        _ => vec![1024],
    };
    // RSS under churn varies from run to run as much as many effects do: rounds, each with a
    // fresh etcd and sidecar, and the median and worst reported.
    let rounds = if full {
        common::env_number("CHURN_ROUNDS", 3)
    } else {
        1
    };
    let runs: Vec<Run> = sizes
        .iter()
        .flat_map(|&size| std::iter::repeat_n(size, rounds))
        .map(|size| runtime.block_on(run(size, Duration::from_secs(seconds), settle)))
        .collect();
    for r in &runs {
        // A stage that checked nothing is no result: streams were reset under churn.
        assert!(r.resets > 0, "no stream read a reset during the churn");
    }
    let mut table = String::new();
    let when = common::utc_minute();
    writeln!(
        table,
        "Churn benchmark, {when}: one sidecar (default settings) mirroring {KEYS} keys rewritten through a 1-member etcd in transactions of {PER_TXN} puts (aiming at {:.0} puts/s) for {seconds} s, with 4 readers of /v1/tree in a loop, 20 open change streams and {RESETTING_STREAMS} streams that reconnect as soon as they have read a reset's whole state; RSS sampled every 100 ms; {rounds} rounds per value size, each with a fresh etcd and sidecar.\n",
        puts_per_second_target()
    )
    .unwrap();
    writeln!(
        table,
        "| value size | mirrored MiB | puts/s | RSS at rest MiB | RSS peak MiB | goal MiB (64 + 2 x mirrored) | predicted MiB (docs formula) | RSS 10 s after MiB | history MiB at the end | render cache MiB | resets read |"
    )
    .unwrap();
    writeln!(
        table,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    .unwrap();
    let mib = |b: u64| b as f64 / 1048576.0;
    for r in &runs {
        let bound = 64.0 + 2.0 * mib(r.mirrored);
        writeln!(
            table,
            "| {} KiB | {:.1} | {:.0} | {:.1} | {:.1} | {:.1}{} | {:.1}{} | {:.1} | {:.1} | {:.1} | {} |",
            r.value_bytes / 1024,
            mib(r.mirrored),
            r.puts_per_second,
            mib(r.rest),
            mib(r.peak),
            bound,
            if mib(r.peak) <= bound { "" } else { " (over)" },
            mib(r.predicted),
            if r.peak <= r.predicted { "" } else { " (over)" },
            mib(r.after),
            mib(r.history_bytes),
            mib(r.cache_bytes),
            r.resets,
        )
        .unwrap();
    }
    writeln!(
        table,
        "\n| value size | RSS peak MiB, median / max | RSS 10 s after MiB, median / max |"
    )
    .unwrap();
    writeln!(table, "| ---: | ---: | ---: |").unwrap();
    for size in &sizes {
        let of_size: Vec<&Run> = runs.iter().filter(|r| r.value_bytes == *size).collect();
        let median_max = |f: fn(&Run) -> u64| {
            let mut v: Vec<u64> = of_size.iter().map(|r| f(r)).collect();
            v.sort_unstable();
            (mib(v[v.len() / 2]), mib(*v.last().unwrap()))
        };
        let (peak_median, peak_max) = median_max(|r| r.peak);
        let (after_median, after_max) = median_max(|r| r.after);
        writeln!(
            table,
            "| {} KiB | {peak_median:.1} / {peak_max:.1} | {after_median:.1} / {after_max:.1} |",
            size / 1024
        )
        .unwrap();
    }
    println!("{table}");
    if full {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/churn.md");
        std::fs::write(&path, &table).unwrap();
        println!("written to {}", path.display());
    }
}

/// Puts per second the writers aim at: `CHURN_PUTS_PER_SECOND`, default 4000 (the rate at which
/// issue 20 saw resident memory climb to 211 MB).
fn puts_per_second_target() -> f64 {
    common::env_number("CHURN_PUTS_PER_SECOND", 4000.0)
}

async fn run(value_bytes: usize, churn: Duration, settle: Duration) -> Run {
    let cluster = EtcdCluster::start(1).await;
    let mut etcd = cluster.client().await;
    let value = move |round: u64, k: usize| {
        let mut v = format!("{round}:{k}:");
        v.push_str(&"x".repeat(value_bytes.saturating_sub(v.len())));
        v
    };
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(100) {
        let puts: Vec<_> = chunk
            .iter()
            .map(|&k| etcd_client::TxnOp::put(format!("/churn/k{k:03}"), value(0, k), None))
            .collect();
        etcd.txn(etcd_client::Txn::new().and_then(puts))
            .await
            .unwrap();
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let sidecar = Process::spawn(&mut sidecar_command([
        "--listen",
        &listen,
        "--endpoints",
        &cluster.endpoints().join(","),
        "--prefix",
        "/churn/",
        "--log-level",
        "warn",
        // The Kubernetes manifest's limit: the memory check reports the formula against it.
        "--memory-budget",
        "256MiB",
    ]));
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(20), "sidecar ready", || async {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let status = |http: reqwest::Client, base: String| async move {
        http.get(format!("{base}/v1/status"))
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };
    let at_rest = status(http.clone(), base.clone()).await;
    let mirrored = at_rest["bytes"].as_u64().unwrap();
    let predicted = at_rest["memory"]["churn_peak_estimate_bytes"]
        .as_u64()
        .expect("the status predicts the peak");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rest = sidecar.rss_bytes();

    let stop = Arc::new(AtomicBool::new(false));
    let puts = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    // Writers: each rewrites its share of the keys, 20 per transaction, at a quarter of the rate
    // (or as fast as etcd takes, when slower).
    let txns_per_writer = (puts_per_second_target() / PER_TXN as f64 / 4.0).max(1.0);
    for w in 0..4 {
        let (stop, puts) = (stop.clone(), puts.clone());
        let mut etcd = cluster.client().await;
        let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / txns_per_writer));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tasks.push(tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                round += 1;
                let start = (round as usize * PER_TXN * 4 + w * PER_TXN) % KEYS;
                let ops: Vec<_> = (start..start + PER_TXN)
                    .map(|k| {
                        let k = k % KEYS;
                        etcd_client::TxnOp::put(format!("/churn/k{k:03}"), value(round, k), None)
                    })
                    .collect();
                if etcd
                    .txn(etcd_client::Txn::new().and_then(ops))
                    .await
                    .is_ok()
                {
                    puts.fetch_add(PER_TXN as u64, Ordering::Relaxed);
                }
            }
        }));
    }
    // Readers of the whole tree.
    for _ in 0..4 {
        let (stop, http, base) = (stop.clone(), http.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = http.get(format!("{base}/v1/tree/churn/")).send().await {
                    let _ = r.bytes().await;
                }
            }
        }));
    }
    // Open change streams, read as they come.
    for _ in 0..20 {
        let (stop, http, base) = (stop.clone(), http.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(r) = http.get(format!("{base}/v1/watch/churn/")).send().await else {
                return;
            };
            let mut body = r.bytes_stream();
            while !stop.load(Ordering::Relaxed) {
                if body.next().await.is_none() {
                    return;
                }
            }
        }));
    }
    // Streams that start over all the time: each reads a reset's whole state (up to the event
    // that carries the revision's `id:`), then reconnects, so resets happen mid-churn.
    let resets = Arc::new(AtomicU64::new(0));
    for _ in 0..RESETTING_STREAMS {
        let (stop, http, base, resets) = (stop.clone(), http.clone(), base.clone(), resets.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(r) = http.get(format!("{base}/v1/watch/churn/")).send().await else {
                    continue;
                };
                let mut body = r.bytes_stream();
                let mut tail = Vec::new();
                while let Some(Ok(chunk)) = body.next().await {
                    tail.extend_from_slice(&chunk);
                    if tail.windows(4).any(|w| w == b"\nid:") {
                        resets.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    // Only the end can hold the marker's start.
                    tail.drain(..tail.len().saturating_sub(4));
                }
            }
        }));
    }
    let started = Instant::now();
    let mut peak = rest;
    // At least `churn`, and on until a resetting stream has read a whole reset (the check below):
    // on a busy machine the first one can take longer than a 2-second smoke run.
    let resets_seen = || resets.load(Ordering::Relaxed) > 0;
    while started.elapsed() < churn
        || (!resets_seen() && started.elapsed() < churn + Duration::from_secs(60))
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(sidecar.rss_bytes());
    }
    stop.store(true, Ordering::Relaxed);
    let puts_per_second = puts.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    for task in tasks {
        task.abort();
    }
    let status_at_end = status(http.clone(), base.clone()).await;
    let settled = Instant::now();
    while settled.elapsed() < settle {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(sidecar.rss_bytes());
    }
    let after = sidecar.rss_bytes();
    Run {
        value_bytes,
        mirrored,
        rest,
        predicted,
        peak,
        after,
        puts_per_second,
        history_bytes: status_at_end["history"]["bytes"].as_u64().unwrap_or(0),
        cache_bytes: status_at_end["render_cache"]["bytes"].as_u64().unwrap_or(0),
        resets: resets.load(Ordering::Relaxed),
    }
}
