//! Writes and consistent reads fail over while the cluster keeps its quorum: the first member
//! dead, frozen or blackholed, paced requests keep succeeding once the fault can be noticed; and
//! each endpoint selection sends requests where it says, counted by etcd itself (its
//! `grpc_server_handled_total` of `Txn` on each member: writes are the sidecar's only `Txn`s).

mod common;

use std::time::{Duration, Instant};

use common::*;
use config_sidecar::config::Selection;

/// `Txn` RPCs member `i` has handled, from its own `/metrics`.
async fn txns(cluster: &EtcdCluster, i: usize) -> u64 {
    let text = metrics_text(&cluster.endpoint(i)).await;
    text.lines()
        .filter(|l| {
            l.starts_with("grpc_server_handled_total{")
                && l.contains("grpc_method=\"Txn\"")
                && l.contains("grpc_type=\"unary\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// One paced request's outcome.
struct Attempt {
    started: Instant,
    ok: bool,
    what: String,
}

/// A write and a consistent read every 100 ms through `sidecar`, for `run` and then on until at
/// least `at_least` of them started after `after`. A count reached over a fixed wall-clock window
/// holds only on an idle machine (each request is slower on a busy one); the test needs that many
/// requests after the fault could be noticed, however long they take. The hard stop keeps a
/// broken build (every request hanging) from running forever: the caller's count check fails.
async fn paced(sidecar: &Sidecar, run: Duration, after: Instant, at_least: usize) -> Vec<Attempt> {
    let mut attempts: Vec<Attempt> = Vec::new();
    let started = Instant::now();
    let until = started + run;
    let hard_stop = until + Duration::from_secs(60);
    let enough =
        |attempts: &[Attempt]| attempts.iter().filter(|a| a.started > after).count() >= at_least;
    let mut n = 0;
    while Instant::now() < hard_stop && (Instant::now() < until || !enough(&attempts)) {
        n += 1;
        let started = Instant::now();
        let put = sidecar
            .http
            .put(sidecar.url(&format!("/v1/kv/fo/w{}", n % 5)))
            .body(format!("{n}"))
            .send()
            .await;
        let (ok, what) = match put {
            Ok(r) if r.status() == 200 => (true, String::new()),
            Ok(r) => (
                false,
                format!(
                    "write {}: {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ),
            ),
            Err(e) => (false, format!("write: {e}")),
        };
        attempts.push(Attempt { started, ok, what });
        let started = Instant::now();
        let read = sidecar.get("/v1/kv/fo/w0?consistent").await;
        let status = read.status();
        let ok = status == 200 || status == 404;
        let what = format!(
            "consistent read {status}: {}",
            read.text().await.unwrap_or_default()
        );
        attempts.push(Attempt { started, ok, what });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    attempts
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum MemberFault {
    Kill,
    Freeze,
    Blackhole,
}

/// The first member (a follower, so the cluster keeps its leader and quorum) fails as `fault`;
/// writes and consistent reads through the sidecar, which prefers it (`ordered`), keep
/// succeeding. Only requests that began before the failure could be noticed may fail: for a
/// dead member, those in the moment before the sidecar reads its closed connection (after that
/// its connection is refused, so a request is retried on the next one); for a frozen or
/// blackholed one, those within one HTTP/2 keep-alive interval and timeout.
async fn first_member_fails_over(fault: MemberFault) {
    let mut cluster = EtcdCluster::start(3).await;
    let leader = cluster.leader_index().await;
    let first = (leader + 1) % 3;
    let proxy = Proxy::start(cluster.addr(first)).await;
    let mut endpoints = vec![if fault == MemberFault::Blackhole {
        proxy.url()
    } else {
        cluster.endpoint(first)
    }];
    endpoints.extend((0..3).filter(|&i| i != first).map(|i| cluster.endpoint(i)));
    let mut config = sidecar_config(&endpoints, &["/fo/"]);
    config.writes.allowed = true;
    config.etcd.selection = Selection::Ordered;
    let detect = config.etcd.keepalive_interval + config.etcd.keepalive_timeout;
    let sidecar = start_sidecar(config).await;
    sidecar.wait_mode("full", Duration::from_secs(10)).await;
    let warm = paced(&sidecar, Duration::from_millis(500), Instant::now(), 0).await;
    assert!(warm.iter().all(|a| a.ok), "before the fault");

    // Asked again at the fault, for the failure message: on a busy machine a spurious election
    // can make the member chosen as a follower the leader, and killing a leader costs requests.
    let leader_at_fault = cluster.leader_index().await;
    let injected = Instant::now();
    match fault {
        MemberFault::Kill => cluster.kill(first),
        MemberFault::Freeze => cluster.freeze(first),
        MemberFault::Blackhole => proxy.set(Fault::Blackhole),
    }
    // In flight when the fault began, or sent before it could be noticed.
    let window = match fault {
        // The kernel closes a killed member's connections at once, but the sidecar learns it on
        // the connection task's next poll: a write sent in between went out and its answer was
        // lost, which is honestly `outcome: unknown`, never retried (docs/writes.md). Idle, that
        // moment is microseconds; a busy machine can delay the poll (failed once in 26 runs
        // under two CPU hogs with no window at all). Requests after it must all succeed.
        MemberFault::Kill => Duration::from_millis(500),
        MemberFault::Freeze | MemberFault::Blackhole => detect + Duration::from_millis(500),
    };
    let noticed = injected + window;
    let attempts = paced(&sidecar, Duration::from_secs(8), noticed, 40).await;
    let late: Vec<&String> = attempts
        .iter()
        .filter(|a| !a.ok && a.started > noticed)
        .map(|a| &a.what)
        .collect();
    assert!(
        late.is_empty(),
        "{fault:?}: failed after {window:?} (first member m{first}, leader m{leader_at_fault}): {late:?}"
    );
    let early = attempts.iter().filter(|a| !a.ok).count();
    assert!(early <= 6, "{fault:?}: {early} failed within {window:?}");
    let after = attempts.iter().filter(|a| a.started > noticed).count();
    assert!(
        after >= 40,
        "{fault:?}: only {after} attempts after {window:?}"
    );
    // The member was marked: read while the fault still holds, and awaited. Each rest ends in a
    // recovery check (`failing` while it runs), and a thawed member passes its check at once, so
    // one read after the fault was undone raced the rest timer and could find it `healthy`
    // (issue 27). While the fault holds, a correct build shows `resting` most of the time.
    eventually(
        Duration::from_secs(15),
        "the first member resting while it is faulty",
        || async { sidecar.json("/v1/status").await["endpoints"][0]["state"] == "resting" },
    )
    .await;
    if fault == MemberFault::Freeze {
        cluster.thaw(first);
    }
    let status = sidecar.json("/v1/status").await;
    assert_eq!(status["endpoint_selection"], "ordered");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_consistent_reads_pass_a_dead_first_member() {
    first_member_fails_over(MemberFault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_consistent_reads_pass_a_frozen_first_member() {
    first_member_fails_over(MemberFault::Freeze).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_consistent_reads_pass_a_blackholed_first_member() {
    first_member_fails_over(MemberFault::Blackhole).await;
}

/// The request that finds a member dead is itself retried on the next one: with `round-robin`
/// every third request goes to the killed follower (not the one the watch is on, and with the
/// probes slowed so that only requests learn of it), and still none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_that_finds_a_member_dead_is_retried_on_the_next() {
    let mut cluster = EtcdCluster::start(3).await;
    let mut config = sidecar_config(&cluster.endpoints(), &["/fo/"]);
    config.writes.allowed = true;
    config.etcd.selection = Selection::RoundRobin;
    config.mode.probe_interval = Duration::from_secs(60);
    let sidecar = start_sidecar(config).await;
    let leader = cluster.leader_index().await;
    let watched = sidecar.json("/v1/status").await["sync"]["endpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let victim = (0..3)
        .find(|&i| i != leader && cluster.endpoint(i) != watched)
        .expect("a follower the watch is not on");
    let warm = paced(&sidecar, Duration::from_millis(500), Instant::now(), 0).await;
    assert!(warm.iter().all(|a| a.ok), "before the fault");
    cluster.kill(victim);
    // Round robin sends every third request to the victim: 30 make sure some did.
    let attempts = paced(&sidecar, Duration::from_secs(3), Instant::now(), 30).await;
    let failed: Vec<&String> = attempts.iter().filter(|a| !a.ok).map(|a| &a.what).collect();
    assert!(failed.is_empty(), "{failed:?}");
    // Awaited rather than read once: each rest (1 s, then 2 s, ...) ends with a recovery check
    // that shows `failing` while it runs, and the paced run ends near the end of the second rest.
    eventually(
        Duration::from_secs(15),
        "the dead member resting",
        || async { sidecar.json("/v1/status").await["endpoints"][victim]["state"] == "resting" },
    )
    .await;
    let status = sidecar.json("/v1/status").await;
    let dead = &status["endpoints"][victim];
    assert_eq!(dead["last_failure"], "unreachable", "{status}");
    sidecar.stop().await;
}

/// A probe timeout no busy machine reaches. A light probe round that timed out (the default
/// 800 ms is short for a loaded 2-core machine) marks a healthy member failing, and requests then
/// avoid it: `ordered` would send writes past the first member, and `latency` would lose the
/// slowed member's measurement (a probe through the 150 ms proxy takes about 300 ms).
const PATIENT_PROBES: Duration = Duration::from_secs(5);

/// `ordered` sends every write to the first member, `round-robin` spreads them over all three,
/// and `latency` avoids a member slowed by 150 ms once the probes have measured it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_selection_sends_requests_where_it_says() {
    let cluster = EtcdCluster::start(3).await;
    let (proxies, urls) = proxy_every_member(&cluster).await;
    let writes = |sidecar: &Sidecar, n: usize| {
        let (http, url) = (sidecar.http.clone(), sidecar.url("/v1/kv/fo/s"));
        async move {
            for i in 0..n {
                let r = http.put(&url).body(format!("{i}")).send().await.unwrap();
                assert_eq!(r.status(), 200);
            }
        }
    };
    let counts = || async {
        let mut c = Vec::new();
        for i in 0..3 {
            c.push(txns(&cluster, i).await);
        }
        c
    };
    let spread = |before: &[u64], after: &[u64]| -> Vec<u64> {
        before.iter().zip(after).map(|(b, a)| a - b).collect()
    };

    for (selection, check) in [
        (
            Selection::Ordered,
            (|d: &[u64]| d == [30, 0, 0]) as fn(&[u64]) -> bool,
        ),
        (Selection::RoundRobin, |d: &[u64]| d.iter().all(|&n| n >= 5)),
    ] {
        let mut config = sidecar_config(&cluster.endpoints(), &["/fo/"]);
        config.writes.allowed = true;
        config.etcd.selection = selection;
        config.mode.probe_timeout = PATIENT_PROBES;
        let sidecar = start_sidecar(config).await;
        sidecar.wait_mode("full", Duration::from_secs(10)).await;
        let before = counts().await;
        writes(&sidecar, 30).await;
        let d = spread(&before, &counts().await);
        assert!(check(&d), "{selection:?}: writes per member {d:?}");
        sidecar.stop().await;
    }

    proxies[0].set(Fault::Delay {
        base: Duration::from_millis(150),
        jitter: Duration::ZERO,
    });
    let mut config = sidecar_config(&urls, &["/fo/"]);
    config.writes.allowed = true;
    config.etcd.selection = Selection::Latency;
    config.mode.probe_timeout = PATIENT_PROBES;
    let sidecar = start_sidecar(config).await;
    eventually(Duration::from_secs(10), "every member measured", || async {
        let status = sidecar.json("/v1/status").await;
        status["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["latency_ms"].is_number())
    })
    .await;
    let status = sidecar.json("/v1/status").await;
    let slow = status["endpoints"][0]["latency_ms"].as_f64().unwrap();
    let fast = status["endpoints"][1]["latency_ms"].as_f64().unwrap();
    assert!(slow > 100.0 && fast < slow / 2.0, "{status}");
    let before = counts().await;
    writes(&sidecar, 30).await;
    let d = spread(&before, &counts().await);
    assert!(
        d[0] <= 1 && d[1] + d[2] >= 29,
        "latency: writes per member {d:?}"
    );
    sidecar.stop().await;
}
