//! Test harness: real etcd members on free loopback ports in temp dirs (always stopped on drop),
//! a fault-injecting TCP proxy, the sidecar started in-process on port 0, and waiting helpers.
#![allow(dead_code)]

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use config_sidecar::config::Config;
use config_sidecar::Running;
use etcd_client::Client;
use rustix::process::Pid;
pub use rustix::process::Signal;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The etcd binary: `$ETCD_BIN`, else `etcd` on PATH (Debian's etcd-server).
fn etcd_bin() -> String {
    std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into())
}

/// A free loopback port for an etcd member to bind later. Taken below the kernel's ephemeral range
/// (32768 and up), from a counter unique within this process: a port picked by binding port 0 and
/// letting go could be handed to one of the thousands of outgoing connections a test makes before
/// etcd binds it. Other test processes (a second `cargo test`, another checkout's suite) count
/// from their own offsets, which may meet ours, so each port is also claimed machine-wide (see
/// [`claim_port`]): a bind check alone lets two processes pick the same port before either binds
/// it, and never protects one that is free for now (a killed member's, to be restarted; the dead
/// endpoint a test points at).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = (std::process::id() % 40) * 300;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (20_000 + (offset + n) % 12_000) as u16;
        if claim_port(port) && StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Claims `port` for this process until it exits: an exclusive `flock` on a file named after the
/// port, in a directory every test process on the machine shares. The kernel drops the lock when
/// the process ends, however it ends, so no claim outlives its owner. False when another live
/// process holds it. (A port this process let go of stays claimed: a member restarts on it.)
fn claim_port(port: u16) -> bool {
    use rustix::fs::{flock, FlockOperation};
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("config-sidecar-test-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return true; // No shared directory: the bind check alone, as before.
    }
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))
    else {
        return true;
    };
    if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
        return false;
    }
    HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
    true
}

/// A temp dir on tmpfs when there is one: etcd fsyncs every commit, and a disk makes tests slow;
/// on a disk that other jobs keep busy, one fsync can also take seconds.
pub fn tmpfs_dir(prefix: &str) -> tempfile::TempDir {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix(prefix).tempdir_in(&shm) {
            return d;
        }
    }
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}

/// Certificates for etcd members started with TLS, written as PEM files in a temp dir: a CA, a
/// server certificate for 127.0.0.1 and localhost, the harness's client certificate (its common
/// name `root` is etcd's root user once authentication is on) and the sidecar's (a name that is no
/// etcd user, so the sidecar gets in by password or not at all).
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    pub fn generate() -> TestPki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::Builder::new()
            .prefix("cs-pki")
            .tempdir()
            .expect("temp dir");
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "config-sidecar test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        write("ca.pem", ca.self_signed(&ca_key).unwrap().pem());
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |name: &str, common_name: &str, sans: Vec<String>, usage| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        };
        let server_names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        leaf(
            "server",
            "etcd",
            server_names,
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        leaf("root", "root", vec![], ExtendedKeyUsagePurpose::ClientAuth);
        leaf(
            "sidecar",
            "config-sidecar",
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        TestPki { dir }
    }

    /// Path of `name`: `ca.pem`, `server.pem`, `sidecar-key.pem`, ...
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn pem(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).expect("PEM file")
    }
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// The running etcd, if any: dropping it kills it.
    child: Option<Process>,
}

/// A real etcd cluster on loopback.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial_cluster: String,
    /// PEM files when the members serve clients over TLS (and ask for client certificates).
    tls: Option<TlsFiles>,
    /// More etcd flags for every member.
    extra_args: Vec<String>,
}

/// What a TLS cluster's members and the harness's clients use.
#[derive(Clone)]
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// The harness's client identity (CA, certificate, key PEM).
    client: (String, String, String),
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster commits a write.
    pub async fn start(n: usize) -> EtcdCluster {
        Self::start_with(n, None, Vec::new()).await
    }

    /// Starts `n` members serving clients over TLS only, with client certificates required
    /// (`--client-cert-auth`); the harness's own clients present `pki`'s `root` certificate.
    /// `extra_args` go to every member (e.g. `--auth-token-ttl 2`).
    pub async fn start_tls(n: usize, pki: &TestPki, extra_args: &[&str]) -> EtcdCluster {
        let tls = TlsFiles {
            ca: pki.path("ca.pem"),
            cert: pki.path("server.pem"),
            key: pki.path("server-key.pem"),
            client: (
                pki.pem("ca.pem"),
                pki.pem("root.pem"),
                pki.pem("root-key.pem"),
            ),
        };
        let extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        Self::start_with(n, Some(tls), extra_args).await
    }

    async fn start_with(n: usize, tls: Option<TlsFiles>, extra_args: Vec<String>) -> EtcdCluster {
        let dir = tmpfs_dir("cs-etcd");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            dir,
            members,
            initial_cluster,
            tls,
            extra_args,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_writable(Duration::from_secs(30)).await;
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .expect("log file");
        let client = self.endpoint(i);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut command = Command::new(etcd_bin());
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &self.initial_cluster])
            .args([
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "cs-test",
            ])
            // etcd's defaults: shorter timeouts cause spurious elections when the test machine is busy.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} (install Debian's etcd-server): {e}",
                    etcd_bin()
                )
            });
        self.members[i].child = Some(Process(Some(child)));
    }

    /// Starts etcd's own gRPC proxy (`etcd grpc-proxy start`, from the same binary) in front of
    /// every member, and waits until it serves a write and a read.
    pub async fn grpc_proxy(&self) -> GrpcProxy {
        let port = free_port();
        let name = format!("grpc-proxy-{port}");
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).expect("log");
        let process = Process::spawn(
            Command::new(etcd_bin())
                .args(["grpc-proxy", "start"])
                .arg(format!("--endpoints={}", self.endpoints().join(",")))
                .arg(format!("--listen-addr=127.0.0.1:{port}"))
                // Its default is a directory in the working directory.
                .arg("--data-dir")
                .arg(self.dir.path().join(&name))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log),
        );
        let proxy = GrpcProxy {
            process,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        eventually(Duration::from_secs(20), "the grpc-proxy serves", || async {
            let Ok(mut c) = Client::connect([proxy.endpoint.as_str()], None).await else {
                return false;
            };
            c.put("/grpc-proxy-check", "1", None).await.is_ok()
                && c.get("/grpc-proxy-check", None).await.is_ok()
        })
        .await;
        proxy
    }

    /// Client URLs of every member, in order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client_port)
    }

    /// Client address of member `i`.
    pub fn addr(&self, i: usize) -> SocketAddr {
        format!("127.0.0.1:{}", self.members[i].client_port)
            .parse()
            .unwrap()
    }

    /// A client bound to member `i` alone.
    pub async fn client_for(&self, i: usize) -> Client {
        Client::connect([self.endpoint(i)], self.connect_options())
            .await
            .expect("etcd client")
    }

    /// How the harness's clients connect: with its client certificate on a TLS cluster.
    fn connect_options(&self) -> Option<etcd_client::ConnectOptions> {
        self.tls.as_ref().map(|tls| {
            let (ca, cert, key) = &tls.client;
            etcd_client::ConnectOptions::new().with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(ca))
                    .identity(etcd_client::Identity::from_pem(cert, key)),
            )
        })
    }

    /// A client on the first member that is running.
    pub async fn client(&self) -> Client {
        let i = (0..self.members.len())
            .find(|&i| self.members[i].child.is_some())
            .expect("a running member");
        self.client_for(i).await
    }

    /// Waits until a linearizable write through some running member succeeds.
    pub async fn wait_writable(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            for i in 0..self.members.len() {
                if self.members[i].child.is_none() {
                    continue;
                }
                let mut c = self.client_for(i).await;
                let ok =
                    tokio::time::timeout(Duration::from_secs(2), c.put("/__harness", "ok", None))
                        .await
                        .is_ok_and(|r| r.is_ok());
                if ok {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd cluster not writable within {within:?}; logs in {}",
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the current leader, once the running members agree there is one (a member
    /// just restarted may not answer yet, and an election may be under way).
    pub async fn leader_index(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut ids = Vec::new();
            let mut leader = 0;
            for i in 0..self.members.len() {
                if self.members[i].child.is_none() {
                    continue;
                }
                let status = async {
                    let mut c = tokio::time::timeout(
                        Duration::from_secs(1),
                        Client::connect([self.endpoint(i)], self.connect_options()),
                    )
                    .await
                    .ok()?
                    .ok()?;
                    tokio::time::timeout(Duration::from_secs(1), c.status())
                        .await
                        .ok()?
                        .ok()
                };
                if let Some(s) = status.await {
                    ids.push((i, s.header().map(|h| h.member_id()).unwrap_or_default()));
                    leader = leader.max(s.leader());
                }
            }
            if let Some((i, _)) = ids.iter().find(|(_, id)| leader != 0 && *id == leader) {
                return *i;
            }
            assert!(
                Instant::now() < deadline,
                "no leader among the running members"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        self.members[i].child = None;
    }

    /// Kills both followers of a 3-member cluster: the leader that is left has no quorum.
    pub async fn lose_quorum(&mut self) {
        let leader = self.leader_index().await;
        for i in (0..self.members.len()).filter(|&i| i != leader) {
            self.kill(i);
        }
    }

    /// Starts member `i` again on its old data dir.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
    }

    fn signal(&self, i: usize, signal: Signal) {
        self.members[i]
            .child
            .as_ref()
            .expect("running")
            .signal(signal);
    }

    /// Freezes member `i` (SIGSTOP): its sockets stay open and silent.
    pub fn freeze(&self, i: usize) {
        self.signal(i, Signal::STOP);
    }

    /// Thaws member `i` (SIGCONT).
    pub fn thaw(&self, i: usize) {
        self.signal(i, Signal::CONT);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed: show what etcd said, since the temp dir goes away with us.
            for m in &self.members {
                let log = self.dir.path().join(format!("{}.log", m.name));
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!("--- etcd {} (last lines) ---", m.name);
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        // Stopped here, before the fields drop: the data dir goes first in field order.
        for m in &mut self.members {
            m.child = None;
        }
    }
}

/// The sidecar binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_config-sidecar");

/// A number from the environment variable `name` (a benchmark's size), or `default` when it is
/// unset or not a number.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The time now as benchmark results are dated: `2026-12-04 05:10 UTC`.
pub fn utc_minute() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A command running the sidecar binary with `args`, as every test that runs the binary starts
/// it: the test's own `CONFIG_SIDECAR_*` environment removed (so only what the test gives
/// counts), stdin closed, stdout discarded, stderr discarded unless the caller redirects it.
pub fn sidecar_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    sidecar_command_of(BIN, args)
}

/// [`sidecar_command`] of another build of the binary (the fleet benchmark's static one).
pub fn sidecar_command_of<I, S>(binary: impl AsRef<std::ffi::OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(binary);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CONFIG_SIDECAR_") {
            command.env_remove(name);
        }
    }
    command
}

/// A child process the test owns, killed and reaped when dropped: also when the test fails half
/// way, so no test leaves a process running (`scripts/test.sh` checks that the suite leaves none).
pub struct Process(Option<Child>);

impl Process {
    pub fn spawn(command: &mut Command) -> Process {
        Process(Some(command.spawn().expect("spawn the process")))
    }

    /// Its resident memory, in bytes (0 when /proc does not say).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.id() as i32).expect("a child has a pid");
        rustix::process::kill_process(pid, signal)
            .unwrap_or_else(|e| panic!("{signal:?} to {pid:?}: {e}"));
    }

    /// SIGTERM, then its exit status once it has exited, failing the test after `within`.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        self.signal(Signal::TERM);
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The child, no longer killed on drop (to wait for its output, say).
    pub fn into_inner(mut self) -> Child {
        self.0.take().expect("not yet taken")
    }
}

impl std::ops::Deref for Process {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("not yet taken")
    }
}

impl std::ops::DerefMut for Process {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("not yet taken")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The JSON body of a 200 answer to `GET url` (any other status fails the test).
pub async fn get_json(http: &reqwest::Client, url: &str) -> serde_json::Value {
    let r = http.get(url).send().await.expect("request");
    assert_eq!(r.status(), 200, "GET {url}");
    r.json().await.expect("JSON body")
}

/// The mode `/v1/status` at `base` reports, or `None` when it does not answer.
pub async fn mode_at(http: &reqwest::Client, base: &str) -> Option<String> {
    let status: serde_json::Value = http
        .get(format!("{base}/v1/status"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    status["mode"].as_str().map(str::to_string)
}

/// What a [`Proxy`] does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward both ways.
    Pass,
    /// Accept and hold connections, forward nothing (a partition).
    Blackhole,
    /// Close every connection at once, and new ones on accept.
    Reset,
    /// Forward both ways, each chunk held `base` ± up to `jitter` first (order kept).
    Delay { base: Duration, jitter: Duration },
}

/// A fault-injecting TCP proxy in front of one address.
pub struct Proxy {
    pub addr: SocketAddr,
    fault: watch::Sender<Fault>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding from a free loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let (fault, rx) = watch::channel(Fault::Pass);
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(Self::carry(inbound, target, rx.clone()));
            }
        });
        Proxy { addr, fault, task }
    }

    /// URL to give the sidecar.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes what the proxy does, for new and existing connections.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    async fn carry(mut inbound: TcpStream, target: SocketAddr, mut fault: watch::Receiver<Fault>) {
        let current = *fault.borrow_and_update();
        match current {
            Fault::Reset => {
                let _ = inbound.set_zero_linger();
                return;
            }
            Fault::Blackhole => {
                // Hold the connection, say nothing, until the fault changes; then drop it.
                let _ = fault.changed().await;
                return;
            }
            Fault::Pass | Fault::Delay { .. } => {}
        }
        let Ok(mut outbound) = TcpStream::connect(target).await else {
            let _ = inbound.set_zero_linger();
            return;
        };
        let forwarding = |f: &Fault| matches!(f, Fault::Pass | Fault::Delay { .. });
        let (mut in_read, mut in_write) = inbound.split();
        let (mut out_read, mut out_write) = outbound.split();
        let (up, down) = (fault.clone(), fault.clone());
        // Biased, and each pump looks at the fault before it writes (below): a chunk read after
        // the fault changed is never forwarded, so a change made after `set` returned cannot slip
        // through a cut connection.
        let stopped = tokio::select! {
            biased;
            _ = async { while fault.changed().await.is_ok() && forwarding(&fault.borrow()) {} } => true,
            _ = async {
                tokio::join!(
                    Self::pump(&mut in_read, &mut out_write, up),
                    Self::pump(&mut out_read, &mut in_write, down),
                )
            } => false,
        };
        if stopped {
            if *fault.borrow() == Fault::Blackhole {
                // Silence: keep both sockets open and idle until the fault changes again.
                let _ = fault.changed().await;
            }
            let _ = inbound.set_zero_linger();
            let _ = outbound.shutdown().await;
        }
    }

    /// Copies `from` to `to` until either ends, holding each chunk while the fault is a delay.
    async fn pump(
        from: &mut (impl tokio::io::AsyncRead + Unpin),
        to: &mut (impl tokio::io::AsyncWrite + Unpin),
        fault: watch::Receiver<Fault>,
    ) {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let delay = *fault.borrow();
            if !matches!(delay, Fault::Pass | Fault::Delay { .. }) {
                // Cut: `carry` ends this pump and acts on the fault; the chunk is not sent.
                std::future::pending::<()>().await;
            }
            if let Fault::Delay { base, jitter } = delay {
                let spread = jitter.as_micros() as i64;
                let offset = if spread > 0 {
                    rand::random_range(-spread..=spread)
                } else {
                    0
                };
                let micros = (base.as_micros() as i64 + offset).max(0) as u64;
                tokio::time::sleep(Duration::from_micros(micros)).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A proxy in front of every member of `cluster`, and the URLs to give the sidecar.
pub async fn proxy_every_member(cluster: &EtcdCluster) -> (Vec<Proxy>, Vec<String>) {
    let mut proxies = Vec::new();
    for i in 0..cluster.endpoints().len() {
        proxies.push(Proxy::start(cluster.addr(i)).await);
    }
    let urls = proxies.iter().map(|p| p.url()).collect();
    (proxies, urls)
}

/// etcd's gRPC proxy, started by [`EtcdCluster::grpc_proxy`]; stopped when dropped.
pub struct GrpcProxy {
    /// The proxy process.
    pub process: Process,
    /// Its client URL (plain HTTP/2, like a member's).
    pub endpoint: String,
}

/// A sidecar configuration with fast failure detection, for tests.
pub fn sidecar_config(endpoints: &[String], prefixes: &[&str]) -> Config {
    fast_failure_detection(Config::for_endpoints(endpoints, prefixes).expect("valid test config"))
}

/// `config` listening on a free port, with the short timeouts and backoffs tests use.
pub fn fast_failure_detection(mut config: Config) -> Config {
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.sync.watch_deadline = Duration::from_secs(3);
    config.sync.backoff_max = Duration::from_millis(500);
    config.etcd.cooldown = Duration::from_secs(1);
    // The slow round at rest, made quick: tests watch member health change within seconds.
    config.mode.probe_idle_interval = Duration::from_secs(2);
    config.etcd.request_timeout = Duration::from_secs(2);
    config.etcd.dial_timeout = Duration::from_millis(500);
    config
}

/// Starts a sidecar in-process and waits until it is ready.
pub async fn start_sidecar(config: Config) -> Sidecar {
    let running = Running::start(config).await.expect("sidecar starts");
    let sidecar = Sidecar {
        base: format!("http://{}", running.addr),
        running: Some(running),
        http: reqwest::Client::builder().build().unwrap(),
    };
    let url = sidecar.url("/readyz");
    let http = sidecar.http.clone();
    eventually(Duration::from_secs(20), "sidecar ready", || {
        let (http, url) = (http.clone(), url.clone());
        async move { http.get(url).send().await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    // Ready means loaded; the mode follows a moment later.
    eventually(Duration::from_secs(5), "mode set", || async {
        sidecar.json("/v1/status").await["mode"] != "starting"
    })
    .await;
    sidecar
}

/// A running in-process sidecar and an HTTP client for it.
pub struct Sidecar {
    pub base: String,
    pub http: reqwest::Client,
    running: Option<Running>,
}

impl Sidecar {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.as_ref().unwrap().addr
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.expect("request")
    }

    /// Body text of a 200 answer, or `None` for any other status.
    pub async fn value(&self, path: &str) -> Option<String> {
        let r = self.http.get(self.url(path)).send().await.ok()?;
        if r.status() != 200 {
            return None;
        }
        r.text().await.ok()
    }

    pub async fn json(&self, path: &str) -> serde_json::Value {
        get_json(&self.http, &self.url(path)).await
    }

    /// The mode it reports.
    pub async fn mode(&self) -> String {
        mode_at(&self.http, &self.base)
            .await
            .expect("status answers")
    }

    /// Waits until it reports `mode`, failing the test after `within`; how long that took.
    /// Pins `mode` (or `auto`) by the operator's API with the admin `token`; its JSON answer.
    pub async fn pin(&self, token: &str, mode: &str, reason: &str) -> serde_json::Value {
        let r = self
            .http
            .post(self.url("/v1/admin/mode"))
            .bearer_auth(token)
            .json(&serde_json::json!({ "mode": mode, "reason": reason }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "pin {mode}");
        r.json().await.unwrap()
    }

    pub async fn wait_mode(&self, mode: &str, within: Duration) -> Duration {
        let started = Instant::now();
        eventually(within, &format!("mode {mode}"), || async {
            mode_at(&self.http, &self.base).await.as_deref() == Some(mode)
        })
        .await;
        started.elapsed()
    }

    pub async fn stop(mut self) {
        self.running
            .take()
            .unwrap()
            .stop()
            .await
            .expect("clean stop");
    }
}

/// Polls `check` until it holds, failing the test with `what` after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Puts `key` and returns the revision of the put.
pub async fn put_rev(etcd: &mut Client, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> i64 {
    let response = etcd.put(key, value, None).await.expect("put");
    response.header().expect("response header").revision()
}

/// Compacts etcd's history up to `revision`, physically (waits until the space is reclaimed).
/// History already compacted past it (another compaction came first) is what was asked for.
pub async fn compact_to(etcd: &mut Client, revision: i64) {
    let result = etcd
        .compact(
            revision,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await;
    match result {
        Ok(_) => {}
        Err(etcd_client::Error::GRpcStatus(status))
            if status.code() == tonic::Code::OutOfRange
                && status.message().contains("has been compacted") => {}
        Err(e) => panic!("compact: {e:?}"),
    }
}

/// Every key and value under `prefix` as etcd has it now (linearizable read), sorted by key.
pub async fn etcd_prefix(client: &mut Client, prefix: &str) -> Vec<(String, String)> {
    let resp = client
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("range");
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Every key and value under `prefix` as the sidecar serves it, sorted by key.
pub async fn sidecar_prefix(sidecar: &Sidecar, prefix: &str) -> Option<Vec<(String, String)>> {
    let r = sidecar
        .http
        .get(sidecar.url(&format!("/v1/kv{prefix}?recurse")))
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    let list: serde_json::Value = r.json().await.ok()?;
    Some(
        list.as_array()?
            .iter()
            .map(|e| {
                (
                    e["key"].as_str().unwrap().to_string(),
                    e["value"].as_str().unwrap().to_string(),
                )
            })
            .collect(),
    )
}

/// One server-sent event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    /// `event:` (empty means "message").
    pub event: String,
    /// `data:` lines joined with newlines.
    pub data: String,
    /// `id:`, when the event carried one.
    pub id: Option<String>,
}

impl SseEvent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or_else(|_| panic!("not JSON: {:?}", self.data))
    }
}

/// A minimal client of a `text/event-stream`, enough to check what the sidecar sends.
pub struct SseClient {
    stream:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
    pub headers: reqwest::header::HeaderMap,
    /// The stream ended (closed, or failed) rather than fell quiet.
    ended: bool,
}

impl SseClient {
    /// Opens `url`, resuming after `last_event_id` when given.
    pub async fn connect(
        http: &reqwest::Client,
        url: &str,
        last_event_id: Option<&str>,
    ) -> SseClient {
        let mut req = http.get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let response = req.send().await.expect("stream request");
        assert_eq!(response.status(), 200, "GET {url}");
        SseClient::from_response(response)
    }

    /// The next event (comments skipped), or `None` after `within` or at the end of the stream.
    pub async fn next(&mut self, within: Duration) -> Option<SseEvent> {
        use futures_util::StreamExt;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent::default();
                let mut data = Vec::new();
                let mut any = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event.event = v.trim_start().to_string();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                        any = true;
                    } else if let Some(v) = line.strip_prefix("id:") {
                        event.id = Some(v.trim_start().to_string());
                        any = true;
                    }
                }
                if !any {
                    continue; // a comment (heartbeat)
                }
                event.data = data.join("\n");
                return Some(event);
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(_) => {
                    self.ended = true;
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    /// Whether the stream has ended (as opposed to falling quiet for a while).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// A client reading an answer already received.
    pub fn from_response(response: reqwest::Response) -> SseClient {
        SseClient {
            headers: response.headers().clone(),
            stream: Box::pin(response.bytes_stream()),
            buffer: String::new(),
            ended: false,
        }
    }
}

/// The text of an etcd member's (or gRPC proxy's) own `/metrics`.
pub async fn metrics_text(endpoint: &str) -> String {
    reqwest::get(format!("{endpoint}/metrics"))
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text")
}

/// The sum of every sample whose line starts with `series` (a name, with `{` for labelled ones
/// or a space for a bare one) in a metrics text.
pub fn metric_sum(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The `X-Config-Index` of an answer: what the next blocking query passes.
pub fn index_of(r: &reqwest::Response) -> i64 {
    r.headers()["x-config-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// nginx (`worker_processes auto`) as a child process, its one server block listening on
/// [`Nginx::addr`] with `server` as its body. Its files (configuration, pid, error log) live in
/// `dir`. Its master leads a process group of its own, which holds its workers too; stopping it
/// (on drop, so also when a test panics) leaves none of them behind.
pub struct Nginx {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its directory, removed once it has stopped.
    pub dir: tempfile::TempDir,
}

impl Nginx {
    /// Debian puts nginx in /usr/sbin, which not every PATH has.
    pub fn bin() -> &'static str {
        if std::path::Path::new("/usr/sbin/nginx").exists() {
            "/usr/sbin/nginx"
        } else {
            "nginx"
        }
    }

    pub fn start(dir: tempfile::TempDir, server: &str) -> Nginx {
        use std::os::unix::process::CommandExt as _;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "worker_processes auto;\ndaemon off;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{ access_log off; sendfile on; tcp_nodelay on; keepalive_requests 1000000;\n\
                 server {{ listen {addr}; {server} }} }}\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new(Nginx::bin())
            .args(Nginx::args(&dir))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx runs (scripts/install-deps.sh installs it)");
        Nginx { child, addr, dir }
    }

    /// The arguments that name this nginx's configuration: `nginx {args} -s reload` reloads it.
    pub fn args(dir: &tempfile::TempDir) -> [String; 4] {
        [
            "-c".into(),
            dir.path().join("nginx.conf").display().to_string(),
            "-p".into(),
            dir.path().display().to_string(),
        ]
    }
}

impl Drop for Nginx {
    /// SIGQUIT is nginx's graceful stop: the master stops its workers, waits for them, then exits.
    /// Killing the master alone would orphan the workers, so the group is killed too, in case the
    /// master did not exit within the grace time or left a worker behind. The master is reaped
    /// only after that: until then its pid, which names the group, cannot be reused.
    fn drop(&mut self) {
        use rustix::process::{kill_process, kill_process_group, waitid, WaitId, WaitIdOptions};
        let master = Pid::from_raw(self.child.id() as i32).expect("a child has a pid");
        let _ = kill_process(master, Signal::QUIT);
        // Exited, but not reaped (NOWAIT).
        let exited = || {
            let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
            matches!(waitid(WaitId::Pid(master), options), Ok(Some(_)))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = kill_process_group(master, Signal::KILL);
        let _ = self.child.wait();
    }
}

/// The Python of a virtualenv holding `packages` (pinned, from PyPI), made once in the target
/// directory under `name` and reused while its package list stays the same. Real clients of the
/// protocols the sidecar speaks run from it.
pub fn python_venv(name: &str, packages: &[&str]) -> PathBuf {
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let python = dir.join("bin/python");
    let marker = dir.join("installed.txt");
    let wanted = packages.join("\n");
    if std::fs::read_to_string(&marker).is_ok_and(|had| had == wanted) {
        return python;
    }
    let run = |command: &mut Command, what: &str| {
        let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&dir),
        "python3 -m venv (scripts/install-deps.sh checks it works)",
    );
    run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(packages),
        "pip install from PyPI",
    );
    std::fs::write(&marker, wanted).unwrap();
    python
}

/// A client script of `tests/clients/` run by `python` (see [`python_venv`]), its command.
pub fn python_client(python: &std::path::Path, script: &str) -> Command {
    let mut command = Command::new(python);
    command.arg(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/clients")
            .join(script),
    );
    command
}

/// Runs a client script once with `args` (after the port it talks to); its one JSON line.
pub fn run_python_client(
    python: &std::path::Path,
    script: &str,
    port: u16,
    args: &[&str],
) -> serde_json::Value {
    let out = python_client(python, script)
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{script}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}
