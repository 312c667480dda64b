//! What the fleet costs etcd, read from each member's own `/metrics`.

use std::collections::BTreeMap;

use crate::common::{self, EtcdCluster};

/// One etcd member's counters, from its `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Unary RPCs handled, by method.
    pub unary: BTreeMap<String, f64>,
    /// Messages received and sent on watch streams (progress requests and their answers).
    pub watch_messages: f64,
    /// Process CPU seconds.
    pub cpu: f64,
    /// Bytes sent to gRPC clients.
    pub sent: f64,
    /// Watchers open.
    pub watchers: f64,
    /// Watch streams open.
    pub streams: f64,
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

/// Every member's counters now.
pub async fn all_counters(cluster: &EtcdCluster) -> Vec<Counters> {
    let mut all = Vec::new();
    for endpoint in cluster.endpoints() {
        all.push(counters(&endpoint).await);
    }
    all
}

/// `f` summed over the members.
pub fn sum(all: &[Counters], f: impl Fn(&Counters) -> f64) -> f64 {
    all.iter().map(f).sum()
}

/// What a stretch of time cost the members, from two readings of their counters.
#[derive(Debug, Default, Clone)]
pub struct Cost {
    /// Bytes sent to gRPC clients.
    pub bytes: f64,
    /// CPU seconds.
    pub cpu: f64,
    /// Unary RPCs handled, by method.
    pub unary: BTreeMap<String, f64>,
}

/// What all members spent between `from` and `to` (both taken after any restart of a member:
/// its counters start again from zero).
pub fn cost(from: &[Counters], to: &[Counters]) -> Cost {
    let mut unary: BTreeMap<String, f64> = BTreeMap::new();
    for (to, from) in to.iter().zip(from) {
        for (method, v) in &to.unary {
            *unary.entry(method.clone()).or_default() +=
                v - from.unary.get(method).copied().unwrap_or_default();
        }
    }
    unary.retain(|_, v| *v > 0.0);
    Cost {
        bytes: sum(to, |c| c.sent) - sum(from, |c| c.sent),
        cpu: sum(to, |c| c.cpu) - sum(from, |c| c.cpu),
        unary,
    }
}

/// etcd's revision now, asked until a member answers: under a herd of loads etcd may change
/// leaders, which fails a call without saying anything about the benchmark.
pub async fn head_revision(etcd: &mut etcd_client::Client) -> i64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match etcd.get("/", None).await {
            Ok(answer) => return answer.header().expect("response header").revision(),
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("reading etcd's revision: {e}; again");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("a read of etcd: {e}"),
        }
    }
}
