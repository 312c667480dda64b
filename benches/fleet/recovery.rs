//! The recovery scenarios (issue 28): what each way a fleet comes back costs etcd, counted by
//! etcd itself, and how long until every sidecar serves the latest revision again.
//!
//! Each scenario changes every prefix while the fleet is away (one key rewritten, one deleted,
//! one created: a round), measures, then checks that every sidecar serves exactly what the round
//! left. A sidecar that holds data should catch up from its revision (a few percent of a full
//! load's bytes); a full load would show as a fraction near 1.

use std::time::{Duration, Instant};

use futures_util::future::join_all;

use crate::common::{self, compact_to, EtcdCluster, Signal};
use crate::etcd_metrics::{all_counters, cost, Cost, Counters};
use crate::sidecars::{
    answering, check_round, fleet_loads, until_current, until_persisted, Sidecar,
};

/// How long every member stays frozen in the restart-while-frozen scenario: longer than the 2 s
/// after which a starting sidecar serves its disk snapshot.
const FREEZE: Duration = Duration::from_secs(4);

/// What one scenario cost and how long it took.
pub struct Outcome {
    /// What happened.
    pub what: String,
    /// The moment the times count from.
    pub since: &'static str,
    /// What it cost all members.
    pub cost: Cost,
    /// How long etcd ran between the two readings of its counters (frozen time left out), to
    /// take its own idle CPU out of `cpu`.
    pub window: Duration,
    /// For each sidecar, how long after `since` it first served the latest revision.
    pub current_after: Vec<Duration>,
    /// Full loads and catch-ups the fleet counted meanwhile (its `/v1/status`).
    pub loads: (u64, u64),
    /// What else was seen.
    pub note: String,
}

impl Outcome {
    /// The slowest sidecar's time.
    pub fn all_current(&self) -> Duration {
        self.current_after.iter().copied().max().unwrap_or_default()
    }

    /// The median sidecar's time.
    pub fn median(&self) -> Duration {
        let mut times = self.current_after.clone();
        times.sort();
        times.get(times.len() / 2).copied().unwrap_or_default()
    }
}

/// The fleet and the cluster it mirrors.
pub struct Fleet {
    pub http: reqwest::Client,
    pub cluster: EtcdCluster,
    /// The benchmark's own etcd client (writes and compactions; never counted: every cost is
    /// read after its calls).
    pub etcd: etcd_client::Client,
    pub sidecars: Vec<Sidecar>,
    /// Rounds of changes made so far.
    round: usize,
}

impl Fleet {
    pub fn new(
        http: reqwest::Client,
        cluster: EtcdCluster,
        etcd: etcd_client::Client,
        sidecars: Vec<Sidecar>,
    ) -> Fleet {
        Fleet {
            http,
            cluster,
            etcd,
            sidecars,
            round: 0,
        }
    }

    /// One round of changes in every prefix, each prefix's in one transaction; etcd's revision
    /// after them.
    async fn change(&mut self) -> i64 {
        self.round += 1;
        let r = self.round;
        let mut head = 0;
        for s in &self.sidecars {
            let p = &s.prefix;
            let txn = etcd_client::Txn::new().and_then([
                etcd_client::TxnOp::put(format!("{p}k0"), format!("round-{r}"), None),
                etcd_client::TxnOp::delete(format!("{p}k{r}"), None),
                etcd_client::TxnOp::put(format!("{p}new{r}"), format!("new-{r}"), None),
            ]);
            let answer = self.etcd.txn(txn).await.expect("a round of changes");
            head = answer.header().expect("response header").revision();
        }
        head
    }

    /// Kills every sidecar once its disk snapshot is written.
    async fn kill_all(&mut self) {
        until_persisted(&self.http, &self.sidecars).await;
        for s in &mut self.sidecars {
            s.process.signal(Signal::KILL);
            let _ = s.process.wait();
        }
    }

    fn start_all(&mut self) {
        self.sidecars = self.sidecars.iter().map(Sidecar::restarted).collect();
    }

    /// Waits until the fleet serves `head`, checks what it serves, and reads what it cost since
    /// `from` (full loads and catch-ups since `loads_before`); what happened is for the caller
    /// to fill in.
    async fn settle(
        &self,
        head: i64,
        since: Instant,
        from: Vec<Counters>,
        loads_before: (u64, u64),
    ) -> Outcome {
        let current_after = until_current(&self.http, &self.sidecars, head, since).await;
        let to = all_counters(&self.cluster).await;
        let window = since.elapsed();
        let cost = cost(&from, &to);
        check_round(&self.http, &self.sidecars, self.round).await;
        let loads = fleet_loads(&self.http, &self.sidecars).await;
        Outcome {
            what: String::new(),
            since: "",
            cost,
            window,
            current_after,
            loads: (loads.0 - loads_before.0, loads.1 - loads_before.1),
            note: String::new(),
        }
    }

    /// Every sidecar killed, a round of changes, all started at once with etcd answering.
    pub async fn mass_restart(&mut self) -> Outcome {
        self.kill_all().await;
        let head = self.change().await;
        let from = all_counters(&self.cluster).await;
        let started = Instant::now();
        self.start_all();
        let settled = self.settle(head, started, from, (0, 0)).await;
        Outcome {
            what: "mass restart, etcd answering".into(),
            since: "start",
            note: String::new(),
            ..settled
        }
    }

    /// (1) Every sidecar killed, a round of changes, every member frozen, all sidecars started,
    /// the members thawed after [`FREEZE`].
    pub async fn restart_while_frozen(&mut self) -> Outcome {
        self.kill_all().await;
        let head = self.change().await;
        let from = all_counters(&self.cluster).await;
        for i in 0..3 {
            self.cluster.freeze(i);
        }
        let started = Instant::now();
        self.start_all();
        // While etcd is frozen: how many start serving their disk snapshot.
        let mut served = 0;
        while started.elapsed() < FREEZE {
            served = answering(&self.http, &self.sidecars).await;
            if served == self.sidecars.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(FREEZE.saturating_sub(started.elapsed())).await;
        for i in 0..3 {
            self.cluster.thaw(i);
        }
        let thawed = Instant::now();
        let settled = self.settle(head, thawed, from, (0, 0)).await;
        Outcome {
            what: format!(
                "(1) mass restart while every member is frozen {} s",
                FREEZE.as_secs()
            ),
            since: "thaw",
            note: format!(
                "{served} of {} served their disk snapshot while etcd was frozen",
                self.sidecars.len()
            ),
            ..settled
        }
    }

    /// (2) Every member killed; once the whole fleet says `cache-only`, the sidecars are frozen
    /// (so nothing reconnects early), the members started again, a round of changes made and
    /// every revision compacted; then all sidecars thawed at once: every one's retry is due at
    /// the same instant and every watch's resume point is gone.
    pub async fn outage_with_compaction(&mut self) -> Outcome {
        let loads_before = fleet_loads(&self.http, &self.sidecars).await;
        for i in 0..3 {
            self.cluster.kill(i);
        }
        let noticed = Instant::now();
        common::eventually(
            Duration::from_secs(120),
            "every sidecar cache-only",
            || async {
                for s in &self.sidecars {
                    if common::mode_at(&self.http, &s.base).await.as_deref() != Some("cache-only") {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        let to_cache_only = noticed.elapsed();
        for s in &self.sidecars {
            s.signal(Signal::STOP);
        }
        for i in 0..3 {
            self.cluster.restart(i);
        }
        self.cluster.wait_writable(Duration::from_secs(60)).await;
        self.etcd = self.cluster.client().await;
        let head = self.change().await;
        compact_to(&mut self.etcd, head).await;
        let from = all_counters(&self.cluster).await;
        let released = Instant::now();
        for s in &self.sidecars {
            s.signal(Signal::CONT);
        }
        let settled = self.settle(head, released, from, loads_before).await;
        Outcome {
            what: "(2) every member killed, fleet cache-only, members back, compaction past every mirror".into(),
            since: "thaw of the fleet",
            note: format!(
                "all cache-only {:.1} s after the kill",
                to_cache_only.as_secs_f64()
            ),
            ..settled
        }
    }

    /// (3) `cache-only` pinned on every sidecar, a round of changes and a compaction, then all
    /// unpinned at once.
    pub async fn pinned_then_unpinned(&mut self) -> Outcome {
        let loads_before = fleet_loads(&self.http, &self.sidecars).await;
        join_all(
            self.sidecars
                .iter()
                .map(|s| s.pin(&self.http, "cache-only")),
        )
        .await;
        let head = self.change().await;
        compact_to(&mut self.etcd, head).await;
        let from = all_counters(&self.cluster).await;
        let released = Instant::now();
        join_all(self.sidecars.iter().map(|s| s.pin(&self.http, "auto"))).await;
        let settled = self.settle(head, released, from, loads_before).await;
        Outcome {
            what: "(3) cache-only pinned fleet-wide, changes and a compaction, unpinned at once"
                .into(),
            since: "unpin",
            note: String::new(),
            ..settled
        }
    }
}
