//! `GET /metrics`: Prometheus / OpenMetrics text, encoded by `prometheus-client`.
//!
//! Nothing here counts anything: request counts and latencies are kept per thread where requests
//! are served ([`crate::http::counters`]); everything else — mode, revision, keys, resyncs,
//! probes, snapshot writes, subscribers — lives with the part that owns it. The scrape's collector
//! reads them all at scrape time, so nothing is counted twice.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::config::Selection;
use crate::files::FileStatuses;
use crate::http::counters::{count_in, SubscriberKind, BUCKETS, STATUSES, STRIDE};
use crate::http::AppState;
use crate::mirror::persist::WriterStats;
use crate::mode::Mode;
use crate::ops::alerts::AlertCounts;
use crate::upstream::ProbeResults;

/// What only the operator's side holds, read at scrape time (and by `/v1/status`).
#[derive(Clone)]
pub struct OperatorParts {
    /// The last probe round.
    pub probes: ProbeResults,
    /// The disk snapshot writer's record, when there is a snapshot.
    pub snapshot_stats: Option<Arc<WriterStats>>,
    /// Process start, for uptime.
    pub started: Instant,
    /// Alerts by check and outcome.
    pub alerts: Arc<AlertCounts>,
    /// The rendered files, when there are any.
    pub files: Option<FileStatuses>,
}

/// The exposition of everything `state` and `parts` know, as of now.
pub fn render(state: &Arc<AppState>, parts: &OperatorParts) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("config_sidecar");
    registry.register_collector(Box::new(Collector {
        state: state.clone(),
        parts: parts.clone(),
    }));
    let mut text = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// Reads the sidecar's parts at scrape time.
struct Collector {
    /// What the HTTP side holds: the mirror, the mode, the request and subscriber counts.
    state: Arc<AppState>,
    /// What only the operator's side holds: the probes, the snapshot writer, the start time.
    parts: OperatorParts,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Collector")
    }
}

/// Encodes one unlabelled counter.
fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

/// Encodes one unlabelled gauge.
fn gauge<N>(e: &mut DescriptorEncoder, name: &str, help: &str, v: N) -> std::fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let (state, parts) = (&self.state, &self.parts);
        let requests = &state.requests;
        let totals = requests.totals();

        let mut m = e.encode_descriptor(
            "requests",
            "HTTP requests answered, by route and status",
            None,
            MetricType::Counter,
        )?;
        for (r, route) in requests.routes.iter().enumerate() {
            let labels = STATUSES
                .iter()
                .map(|s| s.to_string())
                .chain(["other".into()]);
            for (i, status) in labels.enumerate() {
                let n = totals[r * STRIDE + i];
                if n > 0 {
                    let l = [("route", *route), ("status", status.as_str())];
                    ConstCounter::new(n).encode(m.encode_family(&l)?)?;
                }
            }
        }
        let mut m = e.encode_descriptor(
            "request_duration_seconds",
            "Time from a request's head to its response's head, by route",
            None,
            MetricType::Histogram,
        )?;
        for (r, route) in requests.routes.iter().enumerate() {
            let base = r * STRIDE + STATUSES.len() + 1;
            let counts = &totals[base..base + BUCKETS.len() + 1];
            let count: u64 = counts.iter().sum();
            if count == 0 {
                continue;
            }
            // Per-bucket counts: the encoder makes them cumulative.
            let buckets: Vec<(f64, u64)> = BUCKETS
                .iter()
                .chain([f64::INFINITY].iter())
                .zip(counts)
                .map(|(bound, n)| (*bound, *n))
                .collect();
            let sum = totals[r * STRIDE + STRIDE - 1] as f64 / 1e9;
            m.encode_family(&[("route", *route)])?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum, count, &buckets, None,
                )?;
        }

        // Key reads are answered from memory: a hit is a 200 or 304, a miss a 404.
        let kv = requests
            .route(crate::http::KV_ROUTE)
            .unwrap_or_else(|| requests.unmatched());
        // From the same sums as the request counts above, so the two always agree.
        let hits = count_in(&totals, kv, 200) + count_in(&totals, kv, 304);
        let (render_hits, render_misses) = state.cache.hits_and_misses();
        let mut m = e.encode_descriptor(
            "cache_requests",
            "Lookups in memory: keys (hit: present, miss: absent) and rendered listings/trees",
            None,
            MetricType::Counter,
        )?;
        for (cache, result, n) in [
            ("keys", "hit", hits),
            ("keys", "miss", count_in(&totals, kv, 404)),
            ("rendered", "hit", render_hits),
            ("rendered", "miss", render_misses),
        ] {
            ConstCounter::new(n)
                .encode(m.encode_family(&[("cache", cache), ("result", result)])?)?;
        }

        let current = state.mode.mode();
        let mut m = e.encode_descriptor(
            "mode",
            "1 for the serving mode the sidecar is in, 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for mode in [Mode::Starting, Mode::Full, Mode::ReadOnly, Mode::CacheOnly] {
            let v = i64::from(mode == current);
            ConstGauge::new(v).encode(m.encode_family(&[("mode", mode.as_str())])?)?;
        }
        let pinned = state.mode.pinned();
        let mut m = e.encode_descriptor(
            "mode_pinned",
            "1 for the mode the operator pinned (read-only or cache-only), 0 for the other",
            None,
            MetricType::Gauge,
        )?;
        for mode in [Mode::ReadOnly, Mode::CacheOnly] {
            let v = i64::from(pinned == Some(mode));
            ConstGauge::new(v).encode(m.encode_family(&[("mode", mode.as_str())])?)?;
        }
        let mut m = e.encode_descriptor(
            "mode_transitions",
            "Mode changes, by from and to",
            None,
            MetricType::Counter,
        )?;
        for ((from, to), n) in state.mode.transition_counts() {
            ConstCounter::new(n)
                .encode(m.encode_family(&[("from", from.as_str()), ("to", to.as_str())])?)?;
        }
        if let Some(files) = &self.parts.files {
            let files = files.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for (name, help, value) in [
                (
                    "render_writes",
                    "Rendered files written, by path",
                    (|f: &crate::files::FileStatus| f.writes) as fn(&_) -> u64,
                ),
                (
                    "render_failures",
                    "Renders, writes or on_change actions of a rendered file that failed, by path",
                    |f| f.failures,
                ),
                (
                    "render_actions",
                    "on_change actions (command or signal) that succeeded, by path",
                    |f| f.actions,
                ),
            ] {
                let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
                for f in &files {
                    ConstCounter::new(value(f))
                        .encode(m.encode_family(&[("path", f.path.as_str())])?)?;
                }
            }
        }
        let mut m = e.encode_descriptor(
            "alerts",
            "Alerts (mode transitions and check changes) by check and outcome: posted, held_back (flapping bound), dropped (queue full)",
            None,
            MetricType::Counter,
        )?;
        for ((check, result), n) in self.parts.alerts.snapshot() {
            ConstCounter::new(n)
                .encode(m.encode_family(&[("check", check.as_str()), ("result", result)])?)?;
        }

        let snapshot = state.store.peek();
        gauge(
            &mut e,
            "revision",
            "etcd revision the mirror is at",
            snapshot.revision,
        )?;
        gauge(&mut e, "keys", "Keys mirrored", snapshot.len() as i64)?;
        gauge(
            &mut e,
            "bytes",
            "Bytes of keys and values mirrored",
            snapshot.bytes as i64,
        )?;
        drop(snapshot);
        gauge(
            &mut e,
            "history_bytes",
            "Bytes of recent changes kept for streams and blocking queries",
            state.store.history_use().1 as i64,
        )?;
        gauge(
            &mut e,
            "render_cache_bytes",
            "Bytes of rendered listings and trees held (one body per view and prefix)",
            state.cache.held().1 as i64,
        )?;
        gauge(
            &mut e,
            "stream_queue_bytes",
            "Bytes of events queued in change streams, not yet handed to their connections",
            state.subscribers.stream_queue_bytes() as i64,
        )?;
        gauge(
            &mut e,
            "rendered_bytes_alive",
            "Bytes of rendered listings and trees alive: cached, being sent, or rendered for a request on an older revision",
            state.cache.alive_bytes() as i64,
        )?;
        if let Some(stale) = state.mode.staleness(SystemTime::now()) {
            gauge(
                &mut e,
                "staleness_seconds",
                "Time since the mirror was last known current",
                stale.as_secs_f64(),
            )?;
        }
        counter(
            &mut e,
            "watch_events_applied",
            "etcd events (puts and deletes) applied from the watch",
            state.store.events_applied(),
        )?;
        let sync = state.sync.borrow().clone();
        counter(
            &mut e,
            "resyncs",
            "Full reloads after the first load (compaction, or a gap the watch cannot cover)",
            (sync.full_loads + sync.resumes).saturating_sub(1),
        )?;
        counter(
            &mut e,
            "watch_reconnects",
            "Times the watch was reopened",
            sync.reconnects,
        )?;

        if let Some(stats) = &parts.snapshot_stats {
            counter(
                &mut e,
                "snapshot_writes",
                "Disk snapshot writes",
                stats.writes(),
            )?;
            counter(
                &mut e,
                "snapshot_write_failures",
                "Disk snapshot writes that failed",
                stats.failures(),
            )?;
        }

        let probes = parts
            .probes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut m = e.encode_descriptor(
            "probe_latency_seconds",
            "Time the last health probe of each etcd member took",
            None,
            MetricType::Gauge,
        )?;
        for p in &probes {
            ConstGauge::new(p.latency_ms / 1000.0)
                .encode(m.encode_family(&[("endpoint", p.url.as_str())])?)?;
        }
        let mut m = e.encode_descriptor(
            "probe_success",
            "Last probe result per etcd member and check (reachable: status or serializable read answered; quorum: linearizable read answered)",
            None,
            MetricType::Gauge,
        )?;
        for p in &probes {
            for (check, ok) in [("reachable", p.reachable), ("quorum", p.quorum)] {
                ConstGauge::new(i64::from(ok))
                    .encode(m.encode_family(&[("endpoint", p.url.as_str()), ("check", check)])?)?;
            }
        }

        let mut m = e.encode_descriptor(
            "endpoint_selection",
            "1 for how healthy etcd members are chosen (--endpoint-selection), 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for selection in [
            Selection::Ordered,
            Selection::Random,
            Selection::RoundRobin,
            Selection::Latency,
        ] {
            ConstGauge::new(i64::from(selection == state.pool.selection()))
                .encode(m.encode_family(&[("selection", selection.as_str())])?)?;
        }
        let members = state.pool.status();
        let mut m = e.encode_descriptor(
            "endpoint_state",
            "1 for each etcd member's state (healthy, failing below the threshold, resting), 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for member in &members {
            for st in ["healthy", "failing", "resting"] {
                ConstGauge::new(i64::from(member.state == st)).encode(
                    m.encode_family(&[("endpoint", member.url.as_str()), ("state", st)])?,
                )?;
            }
        }
        let mut m = e.encode_descriptor(
            "endpoint_latency_seconds",
            "Each etcd member's latency estimate (peak-EWMA of requests and probes)",
            None,
            MetricType::Gauge,
        )?;
        for member in &members {
            if let Some(ms) = member.latency_ms {
                ConstGauge::new(ms / 1000.0)
                    .encode(m.encode_family(&[("endpoint", member.url.as_str())])?)?;
            }
        }
        let mut m = e.encode_descriptor(
            "endpoint_calls",
            "Calls to each etcd member (watch sessions, loads, writes, quorum reads, probes), by result",
            None,
            MetricType::Counter,
        )?;
        for member in &members {
            for (result, n) in [("success", member.successes), ("failure", member.failures)] {
                ConstCounter::new(n).encode(
                    m.encode_family(&[("endpoint", member.url.as_str()), ("result", result)])?,
                )?;
            }
        }

        let mut m = e.encode_descriptor(
            "subscribers",
            "Open change streams and waiting blocking queries",
            None,
            MetricType::Gauge,
        )?;
        for (kind, k) in [
            ("stream", SubscriberKind::Stream),
            ("blocking_query", SubscriberKind::Blocking),
        ] {
            ConstGauge::new(state.subscribers.open(k))
                .encode(m.encode_family(&[("kind", kind)])?)?;
        }
        gauge(
            &mut e,
            "uptime_seconds",
            "Time since the sidecar started",
            parts.started.elapsed().as_secs_f64(),
        )?;
        Ok(())
    }
}
