//! The fleet's sidecar processes, and what the benchmark asks of them over HTTP.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::{self, sidecar_command_of, Process, Signal};

/// The sidecar binary every [`Sidecar`] runs: set once in `main`.
pub static BINARY: OnceLock<PathBuf> = OnceLock::new();

/// The admin token every sidecar of the fleet takes, to pin and unpin modes.
pub const ADMIN: &str = "fleet-admin-token";

/// One sidecar process.
pub struct Sidecar {
    /// The running binary.
    pub process: Process,
    /// Its HTTP base URL.
    pub base: String,
    /// The prefix it mirrors (its own).
    pub prefix: String,
    /// Its command line, to start it again the same way (same snapshot file).
    pub args: Vec<String>,
}

impl Sidecar {
    pub fn start(args: Vec<String>, base: String, prefix: String) -> Sidecar {
        Sidecar {
            process: Process::spawn(&mut sidecar_command_of(BINARY.get().unwrap(), &args)),
            base,
            prefix,
            args,
        }
    }

    /// The same sidecar started again (after it was killed).
    pub fn restarted(&self) -> Sidecar {
        Sidecar::start(self.args.clone(), self.base.clone(), self.prefix.clone())
    }

    /// CPU nanoseconds each of its threads has used so far, from the scheduler's own count
    /// (`/proc/<pid>/task/*/schedstat`): utime and stime come in 10 ms ticks, and an idle
    /// sidecar uses about 7 of them in a 150 s rest, too coarse to compare 40 of them.
    pub fn cpu_by_thread(&self) -> BTreeMap<String, u64> {
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
    pub fn cpu_seconds_since(&self, from: &BTreeMap<String, u64>) -> f64 {
        let nanos: u64 = self
            .cpu_by_thread()
            .iter()
            .map(|(tid, now)| now.saturating_sub(from.get(tid).copied().unwrap_or(0)))
            .sum();
        nanos as f64 / 1e9
    }

    pub fn rss_bytes(&self) -> u64 {
        self.process.rss_bytes()
    }

    /// `GET` of one key of its prefix: the status, the revision it was served at, the body.
    async fn read(&self, http: &reqwest::Client, key: &str) -> Option<(u16, i64, String)> {
        let r = http
            .get(format!("{}/v1/kv{}{key}", self.base, self.prefix))
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        let revision = r
            .headers()
            .get("x-config-revision")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        Some((status, revision, r.text().await.ok()?))
    }

    /// The revision it serves its prefix at, if it answers (one key: the fleet's every poll
    /// must not cost more than the recovery it waits for).
    pub async fn revision(&self, http: &reqwest::Client) -> Option<i64> {
        let (status, revision, _) = self.read(http, "k0").await?;
        (status == 200).then_some(revision)
    }

    /// Its `/v1/status` counters: full loads and catch-ups since it started.
    pub async fn loads(&self, http: &reqwest::Client) -> (u64, u64) {
        let status = common::get_json(http, &format!("{}/v1/status", self.base)).await;
        let sync = &status["sync"];
        (
            sync["full_loads"].as_u64().unwrap(),
            sync["resumes"].as_u64().unwrap(),
        )
    }

    /// Pins `mode` (`auto` unpins) with the admin token.
    pub async fn pin(&self, http: &reqwest::Client, mode: &str) {
        let r = http
            .post(format!("{}/v1/admin/mode", self.base))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({ "mode": mode, "reason": "fleet benchmark" }))
            .send()
            .await
            .expect("pin request");
        assert_eq!(r.status(), 200, "pin {mode} at {}", self.base);
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) it.
    pub fn signal(&self, signal: Signal) {
        self.process.signal(signal);
    }
}

/// Full loads and catch-ups counted by the whole fleet.
pub async fn fleet_loads(http: &reqwest::Client, sidecars: &[Sidecar]) -> (u64, u64) {
    let mut total = (0, 0);
    for s in sidecars {
        let (full, resumes) = s.loads(http).await;
        total.0 += full;
        total.1 += resumes;
    }
    total
}

/// Waits until every sidecar's disk snapshot holds the revision it serves, as a pod that ran a
/// while has it (a sidecar killed before its first write has no snapshot and must load
/// everything: that is not what a restart of a running fleet finds).
pub async fn until_persisted(http: &reqwest::Client, sidecars: &[Sidecar]) {
    common::eventually(
        Duration::from_secs(120),
        "every snapshot written",
        || async {
            for s in sidecars {
                let status = common::get_json(http, &format!("{}/v1/status", s.base)).await;
                if status["snapshot_file"]["revision"] != status["revision"] {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

/// For each sidecar, how long after `since` it was first seen serving `revision` or later; waits
/// until every one does, failing the benchmark after two minutes.
pub async fn until_current(
    http: &reqwest::Client,
    sidecars: &[Sidecar],
    revision: i64,
    since: Instant,
) -> Vec<Duration> {
    let mut when: Vec<Option<Duration>> = vec![None; sidecars.len()];
    loop {
        for (s, seen) in sidecars.iter().zip(when.iter_mut()) {
            if seen.is_none() && s.revision(http).await.is_some_and(|r| r >= revision) {
                *seen = Some(since.elapsed());
            }
        }
        let current = when.iter().flatten().count();
        if current == sidecars.len() {
            return when.into_iter().flatten().collect();
        }
        assert!(
            since.elapsed() < Duration::from_secs(120),
            "{current} of {} sidecars serve revision {revision} after 120 s",
            sidecars.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How many of `sidecars` answer a read of their prefix now, at any revision.
pub async fn answering(http: &reqwest::Client, sidecars: &[Sidecar]) -> usize {
    let mut n = 0;
    for s in sidecars {
        n += usize::from(s.revision(http).await.is_some());
    }
    n
}

/// Fails the benchmark unless every sidecar serves what round `round` of changes left in its
/// prefix (see `recovery::change`): `k0` rewritten, `k{round}` deleted, `new{round}` created.
pub async fn check_round(http: &reqwest::Client, sidecars: &[Sidecar], round: usize) {
    for s in sidecars {
        let k0 = s.read(http, "k0").await.expect("answers");
        assert_eq!(
            (k0.0, k0.2.as_str()),
            (200, format!("round-{round}").as_str()),
            "{} k0",
            s.prefix
        );
        let gone = s.read(http, &format!("k{round}")).await.expect("answers");
        assert_eq!(gone.0, 404, "{}k{round} was deleted", s.prefix);
        let new = s.read(http, &format!("new{round}")).await.expect("answers");
        assert_eq!(new.0, 200, "{}new{round} was created", s.prefix);
    }
}
