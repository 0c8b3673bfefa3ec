//! Shared integration-test harness: real etcd servers (the system `etcd` binary) run
//! as child processes on free loopback ports, one temp dir per cluster.
//!
//! Guarantees the tests rely on:
//! - `EtcdCluster::start` returns only once every member answers `/health` (a quorum
//!   read through raft), so a test can write immediately.
//! - No etcd outlives the test: `Drop` SIGKILLs and reaps every member, and every
//!   member is spawned with `PR_SET_PDEATHSIG = SIGKILL` so it also dies when the
//!   test process is killed abruptly (a panic that aborts, a SIGKILL from a timeout).
//! - A member keeps its name, ports and data dir across `kill`/`restart`.
//!
//! Spawning is synchronous (`std::process`), so the harness works under any runtime
//! (tokio, actix-rt); only the etcd-client helpers are async.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, CompactionOptions, ConnectOptions};
use tempfile::TempDir;

pub(crate) use super::ports::free_ports;

/// The etcd binary; `FLOTILLA_TEST_ETCD` overrides it (e.g. a newer release).
const DEFAULT_ETCD_BIN: &str = "/usr/bin/etcd";
/// How long a start, a restart or `wait_healthy` may take before the test fails.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Whole-cluster start attempts; a retry only follows a lost port race.
const START_ATTEMPTS: usize = 5;
const POLL_INTERVAL: Duration = Duration::from_millis(50);
const LOG_TAIL_LINES: usize = 40;
const PORT_IN_USE: &str = "address already in use";
/// Logged by etcd once all its listeners are bound, before it has a quorum.
const LISTENING: &str = "now serving peer/client/metrics";

/// One etcd member: stable identity (name, ports, dirs) plus the live process, if any.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    process: Option<Child>,
    /// Length of the log when the current process was spawned: failures of this
    /// process are looked for after it, not in the output of earlier incarnations.
    log_offset: u64,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// Why a member did not become ready.
enum NotReady {
    /// etcd could not bind a port picked for it (another process took it meanwhile).
    PortTaken,
    /// Anything else: the message explains, with the log tails.
    Failed(String),
}

/// A real etcd cluster for one test. Dropping it kills every member.
pub struct EtcdCluster {
    members: Vec<Member>,
    /// `--initial-cluster`, identical for every member.
    initial_cluster: String,
    token: String,
    /// More flags for every member (see [`EtcdCluster::start_with_args`]).
    extra_args: Vec<String>,
    /// Holds data dirs and logs; declared last so it is removed after `Drop` has
    /// killed the processes still writing into it.
    dir: TempDir,
}

impl EtcdCluster {
    /// A one-member cluster, healthy on return.
    pub fn single() -> EtcdCluster {
        EtcdCluster::start(1)
    }

    /// A three-member static cluster, healthy on return.
    pub fn three() -> EtcdCluster {
        EtcdCluster::start(3)
    }

    /// A static cluster of `members` etcd servers, every one healthy on return.
    /// Panics (with the logs) if it cannot be started.
    pub fn start(members: usize) -> EtcdCluster {
        EtcdCluster::start_with_args(members, &[])
    }

    /// Like [`EtcdCluster::start`], every member also given `extra_args` (kept
    /// across restarts), e.g. `["--quota-backend-bytes=1048576"]`.
    pub fn start_with_args(members: usize, extra_args: &[&str]) -> EtcdCluster {
        assert!(members > 0, "an etcd cluster needs at least one member");
        let mut last_race = String::new();
        for _ in 0..START_ATTEMPTS {
            let mut cluster = EtcdCluster::create(members);
            cluster.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
            for i in 0..members {
                cluster.spawn(i);
            }
            let all: Vec<usize> = (0..members).collect();
            match cluster.await_ready(&all, true) {
                Ok(()) => return cluster,
                // Dropping `cluster` kills the members that did start; retry on new ports.
                Err(NotReady::PortTaken) => last_race = cluster.log_tails(),
                Err(NotReady::Failed(why)) => panic!("{why}"),
            }
        }
        panic!("etcd lost the race for free ports {START_ATTEMPTS} times; last logs:\n{last_race}");
    }

    /// Number of members, running or not.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Client URL of every member (`http://127.0.0.1:<port>`), running or not; the
    /// ports never change, so this is what a flotilla config should list.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        self.member(i).client_url()
    }

    /// Client URLs of the members currently running.
    pub fn live_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.process.is_some())
            .map(Member::client_url)
            .collect()
    }

    /// The `--name` of member `i` (`node0`, `node1`, ...).
    pub fn name(&self, i: usize) -> &str {
        &self.member(i).name
    }

    /// Whether member `i` has a running process (it has not been killed).
    pub fn is_running(&self, i: usize) -> bool {
        self.member(i).process.is_some()
    }

    /// OS pid of member `i`, if it is running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.member(i).process.as_ref().map(Child::id)
    }

    /// OS pids of all running members.
    pub fn pids(&self) -> Vec<u32> {
        (0..self.len()).filter_map(|i| self.pid(i)).collect()
    }

    /// Data dir of member `i` (kept across restarts).
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.member(i).data_dir
    }

    /// Log file of member `i` (etcd's zap log plus its stdout/stderr, all incarnations).
    pub fn log_path(&self, i: usize) -> &Path {
        &self.member(i).log_path
    }

    /// The last lines of member `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize) -> String {
        tail(&self.member(i).log_path, LOG_TAIL_LINES)
    }

    /// The log tails of every member, each under a header.
    pub fn log_tails(&self) -> String {
        (0..self.len())
            .map(|i| {
                format!(
                    "----- {} log tail -----\n{}",
                    self.name(i),
                    self.log_tail(i)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGKILLs member `i` and reaps it. Panics if it is not running.
    pub fn kill(&mut self, i: usize) {
        let name = self.member(i).name.clone();
        let mut process = self.members[i]
            .process
            .take()
            .unwrap_or_else(|| panic!("kill: {name} is not running"));
        // Fails only if the process already exited; `wait` reaps it either way.
        let _ = process.kill();
        process
            .wait()
            .unwrap_or_else(|e| panic!("kill: waiting for {name}: {e}"));
    }

    /// Freezes member `i` with SIGSTOP: its connections stay open but nothing
    /// answers (a partition, seen from a client).
    pub fn pause(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    /// Thaws a member frozen by [`EtcdCluster::pause`].
    pub fn resume(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    fn signal(&self, i: usize, signal: libc::c_int) {
        let pid = self
            .pid(i)
            .unwrap_or_else(|| panic!("signal: {} is not running", self.name(i)));
        // SAFETY: kill(2) with a pid we spawned and still own (not reaped).
        let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// SIGKILLs every running member.
    pub fn kill_all(&mut self) {
        for i in 0..self.len() {
            if self.is_running(i) {
                self.kill(i);
            }
        }
    }

    /// Starts member `i` again with the same name, ports and data dir (etcd ignores
    /// the `--initial-*` flags when the data dir exists). Returns once the member is
    /// healthy if the members now running form a quorum, otherwise once it listens
    /// (it cannot be healthy before more members come back: use `restart_all`).
    /// Panics if it is already running or does not come up.
    pub fn restart(&mut self, i: usize) {
        assert!(!self.is_running(i), "restart: {} is running", self.name(i));
        let running = (0..self.len()).filter(|&j| self.is_running(j)).count() + 1;
        let quorum = running > self.len() / 2;
        self.respawn_until_bound(&[i], quorum);
    }

    /// Starts every member that is not running and returns once all are healthy.
    pub fn restart_all(&mut self) {
        let stopped: Vec<usize> = (0..self.len()).filter(|&i| !self.is_running(i)).collect();
        if !stopped.is_empty() {
            self.respawn_until_bound(&stopped, true);
        }
        self.wait_healthy_blocking();
    }

    /// Blocks until every running member answers `/health`; panics with the logs
    /// after 30 s.
    pub fn wait_healthy_blocking(&self) {
        let live: Vec<usize> = (0..self.len()).filter(|&i| self.is_running(i)).collect();
        match self.await_ready(&live, true) {
            Ok(()) => {}
            Err(NotReady::Failed(why)) => panic!("{why}"),
            Err(NotReady::PortTaken) => {
                panic!("a member lost its port:\n{}", self.log_tails())
            }
        }
    }

    /// Waits until every running member serves a linearizable Get through the gRPC
    /// API; panics with the logs after 30 s.
    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        for endpoint in self.live_endpoints() {
            loop {
                let Err(last_error) = probe(&endpoint).await else {
                    break;
                };
                assert!(
                    Instant::now() < deadline,
                    "etcd at {endpoint} not healthy after {READY_TIMEOUT:?}: {last_error}\n{}",
                    self.log_tails()
                );
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
    }

    /// A client over every member's endpoint (killed ones included: the channel
    /// balances over those that answer). No request timeout, so watches live on.
    pub async fn client(&self) -> Client {
        self.connect(&self.endpoints()).await
    }

    /// A client that talks to member `i` only.
    pub async fn member_client(&self, i: usize) -> Client {
        self.connect(&[self.endpoint(i)]).await
    }

    /// Range requests member `i` has answered so far (OK ones), from its own
    /// `/metrics`: how a test counts the reads a piece of code made.
    pub fn ranges_served(&self, i: usize) -> u64 {
        self.metric_sum(
            i,
            "grpc_server_handled_total",
            &["grpc_method=\"Range\"", "grpc_code=\"OK\""],
        )
    }

    /// Txn requests member `i` has answered so far (its gRPC server's own
    /// count): how many txns a piece of code sent.
    pub fn txns_served(&self, i: usize) -> u64 {
        self.metric_sum(
            i,
            "grpc_server_handled_total",
            &["grpc_method=\"Txn\"", "grpc_code=\"OK\""],
        )
    }

    /// Bytes member `i` has sent to its gRPC clients so far (its own
    /// `etcd_network_client_grpc_sent_bytes_total`): what a piece of code read.
    pub fn bytes_sent(&self, i: usize) -> u64 {
        self.metric_sum(i, "etcd_network_client_grpc_sent_bytes_total", &[])
    }

    /// The sum of member `i`'s series `name` whose labels contain every one of
    /// `labels`, read from its `/metrics`.
    fn metric_sum(&self, i: usize, name: &str, labels: &[&str]) -> u64 {
        let body = super::http::try_request(
            self.member(i).client_port,
            "GET",
            "/metrics",
            None,
            None,
            Duration::from_secs(5),
        )
        .map(|r| r.body)
        .expect("etcd's /metrics answers");
        body.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    /// Physically compacts the key-value history up to `rev` (the call returns once
    /// the compaction is applied). Panics on error.
    pub async fn compact(&self, rev: i64) {
        self.client()
            .await
            .compact(rev, Some(CompactionOptions::new().with_physical()))
            .await
            .unwrap_or_else(|e| panic!("compact({rev}): {e}"));
    }

    fn create(members: usize) -> EtcdCluster {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-etcd-")
            .tempdir()
            .expect("create a temp dir for etcd");
        let ports = free_ports(2 * members);
        let members: Vec<Member> = (0..members)
            .map(|i| Member {
                name: format!("node{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.path().join(format!("node{i}.etcd")),
                log_path: dir.path().join(format!("node{i}.log")),
                process: None,
                log_offset: 0,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        EtcdCluster {
            members,
            initial_cluster,
            token: unique_token(),
            extra_args: Vec::new(),
            dir,
        }
    }

    fn member(&self, i: usize) -> &Member {
        self.members
            .get(i)
            .unwrap_or_else(|| panic!("no member {i}: the cluster has {} members", self.len()))
    }

    /// Spawns member `i`'s etcd process; panics if the binary cannot be run at all.
    fn spawn(&mut self, i: usize) {
        let member = &self.members[i];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", member.log_path.display()));
        let log_offset = log.metadata().map_or(0, |m| m.len());
        let stderr = log.try_clone().expect("clone the etcd log handle");
        let client_url = member.client_url();
        let peer_url = member.peer_url();

        let mut cmd = Command::new(etcd_bin());
        cmd.arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&member.data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            // Fast elections and small snapshots: tests kill leaders and want the
            // survivors to take over within a second.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--snapshot-count", "10000"])
            .args(&self.extra_args)
            .args(["--logger", "zap", "--log-outputs"])
            .arg(&member.log_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        // etcd reads ETCD_* variables as flags; one meant for the code under test
        // (or the CI) must not reconfigure or reject the test server.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(&key);
            }
        }
        die_with_test_process(&mut cmd);

        let process = spawn_from_long_lived_thread(cmd).unwrap_or_else(|e| {
            panic!(
                "spawn {} for {}: {e} (is etcd installed? set FLOTILLA_TEST_ETCD to its path)",
                etcd_bin().to_string_lossy(),
                self.members[i].name
            )
        });
        let member = &mut self.members[i];
        member.process = Some(process);
        member.log_offset = log_offset;
    }

    /// Spawns the given (stopped) members and waits for them; if one loses its port
    /// to another process, waits a little and tries again (ports cannot change on
    /// a restart: they are in every member's configuration).
    fn respawn_until_bound(&mut self, members: &[usize], healthy: bool) {
        for attempt in 1..=START_ATTEMPTS * 4 {
            for &i in members {
                if !self.is_running(i) {
                    self.spawn(i);
                }
            }
            match self.await_ready(members, healthy) {
                Ok(()) => return,
                Err(NotReady::PortTaken) if attempt < START_ATTEMPTS * 4 => {
                    self.reap_exited();
                    thread::sleep(Duration::from_millis(250));
                }
                Err(NotReady::PortTaken) => panic!(
                    "restart: a port stayed taken by another process:\n{}",
                    self.log_tails()
                ),
                Err(NotReady::Failed(why)) => panic!("{why}"),
            }
        }
    }

    /// Polls the given members until each answers `/health` (`healthy`) or at least
    /// has bound its ports. A member whose process exited fails the wait; the caller
    /// reaps it (`reap_exited`, or `Drop`).
    fn await_ready(&self, members: &[usize], healthy: bool) -> Result<(), NotReady> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut pending: Vec<usize> = members.to_vec();
        loop {
            for &i in &pending {
                if self.has_exited(i) {
                    let member = &self.members[i];
                    if log_since(&member.log_path, member.log_offset).contains(PORT_IN_USE) {
                        return Err(NotReady::PortTaken);
                    }
                    return Err(NotReady::Failed(format!(
                        "etcd {} exited before becoming ready:\n{}",
                        member.name,
                        self.log_tails()
                    )));
                }
            }
            pending.retain(|&i| {
                let member = &self.members[i];
                let ready = if healthy {
                    http_health(member.client_port)
                } else {
                    // The log line, not a TCP connect: a process squatting on the port
                    // would accept connections too.
                    log_since(&member.log_path, member.log_offset).contains(LISTENING)
                };
                !ready
            });
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let names: Vec<&str> = pending.iter().map(|&i| self.name(i)).collect();
                return Err(NotReady::Failed(format!(
                    "etcd {names:?} not {} after {READY_TIMEOUT:?}:\n{}",
                    if healthy { "healthy" } else { "listening" },
                    self.log_tails()
                )));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Whether member `i` was spawned and its process has exited since. Reads /proc
    /// so readiness polling can run on `&self` (`Child::try_wait` needs `&mut`).
    fn has_exited(&self, i: usize) -> bool {
        self.members[i]
            .process
            .as_ref()
            .is_some_and(|p| !process_is_running(p.id()))
    }

    /// Reaps members whose process exited, so they count as stopped again.
    fn reap_exited(&mut self) {
        for member in &mut self.members {
            if let Some(process) = &mut member.process {
                if matches!(process.try_wait(), Ok(Some(_))) {
                    member.process = None;
                }
            }
        }
    }

    async fn connect(&self, endpoints: &[String]) -> Client {
        let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
        Client::connect(endpoints, Some(options))
            .await
            .unwrap_or_else(|e| panic!("connect to etcd {endpoints:?}: {e}\n{}", self.log_tails()))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut process) = member.process.take() {
                let _ = process.kill();
                let _ = process.wait();
            }
        }
    }
}

/// Whether `pid` is a live process (not gone, not a zombie waiting to be reaped).
pub fn process_is_running(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => match stat
            .rfind(')')
            .and_then(|at| stat[at + 1..].split_whitespace().next())
        {
            Some(state) => state != "Z" && state != "X",
            None => false,
        },
        Err(_) => false,
    }
}

fn etcd_bin() -> OsString {
    std::env::var_os("FLOTILLA_TEST_ETCD").unwrap_or_else(|| DEFAULT_ETCD_BIN.into())
}

/// Asks the kernel to SIGKILL the child when its parent dies, so an etcd never
/// outlives a test process that was killed before `Drop` could run.
fn die_with_test_process(cmd: &mut Command) {
    let parent = libc::pid_t::try_from(std::process::id()).expect("pid fits pid_t");
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe syscalls (prctl, getppid); it allocates nothing and takes no
    // locks. Integration tests need this one `unsafe`: std offers no pdeathsig.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would
            // ever kill us.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Spawns `cmd` from one thread that lives as long as the process. PDEATHSIG fires
/// when the *thread* that forked the child exits, and a test may well start or
/// restart etcd from a thread that ends early (a tokio blocking-pool thread, a
/// helper thread); forking from a permanent thread ties etcd to the process instead.
pub(crate) fn spawn_from_long_lived_thread(cmd: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("etcd-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the etcd spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("etcd spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("etcd spawner thread dropped the request"))?
}

fn unique_token() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "flotilla-test-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// etcd's `/health` on the client port: true only when the member has a leader and
/// a quorum read through raft succeeds.
fn http_health(port: u16) -> bool {
    super::http::try_request(port, "GET", "/health", None, None, Duration::from_secs(3))
        .is_ok_and(|r| r.body.contains(r#""health":"true""#))
}

/// One linearizable Get against a single endpoint, bounded in time.
async fn probe(endpoint: &str) -> Result<(), String> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(2));
    let attempt = async {
        let mut client = Client::connect([endpoint], Some(options))
            .await
            .map_err(|e| e.to_string())?;
        client
            .get("flotilla-test-health-probe", None)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .map_err(|_| "probe timed out".to_owned())?
}

/// The text appended to `path` after byte `offset`.
fn log_since(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    text
}

/// The last `lines` lines of `path` (or why it could not be read).
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
