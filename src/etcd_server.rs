//! The embedded etcd: a real `etcd` server started from PATH as a child process when no
//! `etcd.endpoints` are configured, so a single machine needs no separate set-up.
//!
//! It owns the child's whole life: the pre-flight port checks, the start, the wait until
//! it serves requests, and the stop. The child dies with us even if we are killed
//! (`PR_SET_PDEATHSIG`), and lives in its own process group so that a Ctrl-C in the
//! terminal reaches only flotilla, which then stops etcd *after* draining HTTP.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Hint appended to every "cannot start" error: the two ways out.
const INSTALL_HINT: &str = "install it with `apt-get install etcd-server` or set `etcd.endpoints` / `--etcd-endpoints` to use an existing cluster";

/// etcd's own `--max-request-bytes` default; we never configure less.
const ETCD_DEFAULT_MAX_REQUEST_BYTES: usize = 1_572_864;
/// Room for gRPC and txn framing on top of `max_txn_bytes` of keys and values.
const REQUEST_OVERHEAD_BYTES: usize = 256 * 1024;
const MEMBER_NAME: &str = "flotilla";
/// How many log lines an error shows.
const LOG_TAIL_LINES: usize = 15;

/// Errors starting or stopping the embedded etcd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No `etcd` executable on PATH.
    #[error("the `etcd` binary was not found on PATH; {INSTALL_HINT}")]
    BinaryNotFound,
    /// The data directory or log file could not be created.
    #[error("cannot prepare {}: {source}", path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another etcd already listens on one of our ports.
    #[error("port {port} on 127.0.0.1 ({key}) is already used by another etcd ({version}); stop it, choose other ports with etcd.embedded_client_port / etcd.embedded_peer_port, or set `etcd.endpoints` / `--etcd-endpoints` to use it")]
    PortUsedByEtcd {
        port: u16,
        key: &'static str,
        version: String,
    },
    /// Some other program listens on one of our ports.
    #[error("port {port} on 127.0.0.1 ({key}) is already in use by another program; choose another with {key}")]
    PortInUse { port: u16, key: &'static str },
    /// `etcd` was found but could not be executed.
    #[error("cannot run {}: {source}; {INSTALL_HINT}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    /// etcd exited before it became healthy.
    #[error("embedded etcd exited during start-up ({status}); last lines of {}:\n{tail}", log.display())]
    Exited {
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    /// etcd kept running but never answered.
    #[error("embedded etcd did not become healthy within {}: {last_error}; last lines of {}:\n{tail}", humantime::format_duration(*timeout), log.display())]
    Unhealthy {
        timeout: Duration,
        last_error: String,
        log: PathBuf,
        tail: String,
    },
    /// Waiting for the child failed (only if the OS misbehaves).
    #[error("cannot wait for the embedded etcd: {0}")]
    Wait(#[source] io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// etcd's own default `--max-txn-ops`: what flotilla assumes of an etcd it does
/// not start.
pub const ETCD_DEFAULT_MAX_TXN_OPS: usize = 128;

/// The embedded etcd's `--max-txn-ops`, and so the owner's ops per txn with it:
/// a mass move (an executor holding 10,000 changefeeds gone) commits in 40 txns
/// of 1,024 ops instead of 320 of 128 (etcd's default, kept for an external etcd,
/// which flotilla does not configure).
pub const EMBEDDED_MAX_TXN_OPS: usize = 1024;

/// How to run the embedded etcd. [`EmbeddedEtcd::start`] covers the usual case.
#[derive(Debug, Clone)]
pub struct EmbeddedEtcdOptions {
    /// etcd keeps its data in `<data_dir>/etcd` and logs to `<data_dir>/etcd.log`.
    pub data_dir: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
    /// Passed as `--max-txn-ops` so the server accepts what the committer sends.
    pub max_txn_ops: usize,
    /// Largest txn payload the committer sends; `--max-request-bytes` gets headroom above.
    pub max_txn_bytes: usize,
    /// How long to wait for the first successful request.
    pub start_timeout: Duration,
    /// Where to look for `etcd`; `None` reads the PATH environment variable.
    pub search_path: Option<std::ffi::OsString>,
}

impl EmbeddedEtcdOptions {
    pub fn new(data_dir: impl Into<PathBuf>, client_port: u16, peer_port: u16) -> Self {
        Self {
            data_dir: data_dir.into(),
            client_port,
            peer_port,
            max_txn_ops: EMBEDDED_MAX_TXN_OPS,
            max_txn_bytes: crate::actors::worker::WorkerConfig::new("").max_txn_bytes,
            start_timeout: Duration::from_secs(15),
            search_path: None,
        }
    }
}

/// A running etcd child process. Stop it with [`EmbeddedEtcd::stop`]; dropping it stops
/// it too, but blocks the thread while doing so.
#[derive(Debug)]
pub struct EmbeddedEtcd {
    child: Option<Child>,
    endpoint: String,
    log_path: PathBuf,
    /// Where this run's output starts in the (appended) log file.
    log_offset: u64,
}

impl EmbeddedEtcd {
    /// Starts etcd on 127.0.0.1 with etcd's default limits and waits until it serves.
    pub async fn start(data_dir: &Path, client_port: u16, peer_port: u16) -> Result<Self> {
        Self::start_with(EmbeddedEtcdOptions::new(data_dir, client_port, peer_port)).await
    }

    /// Starts etcd as `options` say and waits until it serves requests.
    ///
    /// Call it from a thread that outlives the child (the main thread): the parent-death
    /// signal fires when the *thread* that spawned the child exits.
    pub async fn start_with(options: EmbeddedEtcdOptions) -> Result<Self> {
        let binary =
            find_binary("etcd", options.search_path.clone()).ok_or(Error::BinaryNotFound)?;
        check_port_free(options.client_port, "etcd.embedded_client_port")?;
        check_port_free(options.peer_port, "etcd.embedded_peer_port")?;

        let etcd_dir = options.data_dir.join("etcd");
        let log_path = options.data_dir.join("etcd.log");
        let data_dir_error = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::DataDir { path, source }
        };
        std::fs::create_dir_all(&options.data_dir).map_err(data_dir_error(&options.data_dir))?;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(data_dir_error(&log_path))?;
        let log_offset = log
            .seek(SeekFrom::End(0))
            .map_err(data_dir_error(&log_path))?;
        // Best effort: a marker makes runs easy to tell apart when reading the file.
        let _ = writeln!(log, "--- flotilla: starting {} ---", binary.display());
        let log_err = log.try_clone().map_err(data_dir_error(&log_path))?;

        let client_url = format!("http://127.0.0.1:{}", options.client_port);
        let peer_url = format!("http://127.0.0.1:{}", options.peer_port);
        let max_request_bytes =
            ETCD_DEFAULT_MAX_REQUEST_BYTES.max(options.max_txn_bytes + REQUEST_OVERHEAD_BYTES);
        let mut command = Command::new(&binary);
        command
            .arg(format!("--name={MEMBER_NAME}"))
            .arg(format!("--data-dir={}", etcd_dir.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={MEMBER_NAME}={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg(format!("--max-txn-ops={}", options.max_txn_ops))
            .arg(format!("--max-request-bytes={max_request_bytes}"))
            // Without compaction the history, and the database with it, grows forever.
            // The leader compacts every `etcd.compaction_interval` (5 min); etcd's own
            // hourly compaction stays as a backstop for the times nobody does: no leader
            // (an election that cannot complete), compaction turned off, or a flotilla
            // that is down while something else writes. With our compactor running it
            // is a no-op (the history is already compacted past an hour ago), so
            // keeping it costs nothing and bounds the history in every case.
            // One member has no peer to lose touch with: the election timeout
            // (etcd's default 1 s, randomized up to 2 s) only delays the restart,
            // where the member waits it out before electing itself.
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=250")
            .arg("--auto-compaction-mode=periodic")
            .arg("--auto-compaction-retention=1h")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (prctl, getppid), allocating nothing.
        unsafe {
            command.pre_exec(move || {
                // SIGKILL is safe for etcd: its WAL is fsynced before it acknowledges.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl; then nobody will
                // send the signal, so do not start at all.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| Error::Spawn {
            binary: binary.clone(),
            source,
        })?;
        tracing::debug!(pid = child.id(), binary = %binary.display(), "spawned etcd");

        // Own the child from here on: if this future is dropped mid-wait (a shutdown
        // signal during start-up), `Drop` stops it.
        let mut etcd = EmbeddedEtcd {
            child: Some(child),
            endpoint: client_url,
            log_path,
            log_offset,
        };
        etcd.wait_healthy(options.start_timeout).await?;
        Ok(etcd)
    }

    /// The client URL, `http://127.0.0.1:<client_port>`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The child's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `<data_dir>/etcd.log`.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Asks etcd to stop (SIGTERM), waits up to 5 s, then kills it. A graceful stop
    /// usually reports "signal 15": etcd re-raises SIGTERM once it has shut down.
    pub async fn stop(mut self) -> Result<ExitStatus> {
        // Only a failed start-up takes the child early, and that never returns `self`.
        let mut child = self.child.take().expect("a started etcd has a child");
        terminate(&child);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = child.try_wait().map_err(Error::Wait)? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                tracing::warn!(pid = child.id(), "etcd ignored SIGTERM for 5s; killing it");
                let _ = child.kill();
                return child.wait().map_err(Error::Wait);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut client: Option<etcd_client::Client> = None;
        loop {
            let child = self.child.as_mut().expect("running during start-up");
            if let Some(status) = child.try_wait().map_err(Error::Wait)? {
                self.child = None;
                return Err(Error::Exited {
                    status,
                    log: self.log_path.clone(),
                    tail: self.log_tail(),
                });
            }
            let last_error = match self.probe(&mut client).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(Error::Unhealthy {
                    timeout,
                    last_error,
                    log: self.log_path.clone(),
                    tail: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One health check: the port accepts, a leader exists, and a read goes through raft.
    async fn probe(&self, client: &mut Option<etcd_client::Client>) -> Result<(), String> {
        let addr = self.endpoint.trim_start_matches("http://");
        // A cheap TCP check first: the gRPC client would otherwise back off on refusals.
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| "TCP connect timed out".to_string())?
            .map_err(|e| format!("TCP connect: {e}"))?;
        if client.is_none() {
            let options = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(1))
                .with_timeout(Duration::from_secs(2));
            *client = Some(
                etcd_client::Client::connect([self.endpoint.as_str()], Some(options))
                    .await
                    .map_err(|e| format!("connect: {e}"))?,
            );
        }
        let client = client.as_mut().expect("set above");
        let status = client.status().await.map_err(|e| format!("status: {e}"))?;
        if status.leader() == 0 {
            return Err("no leader elected yet".into());
        }
        client
            .get("/", None)
            .await
            .map_err(|e| format!("get: {e}"))?;
        Ok(())
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log_path, self.log_offset, LOG_TAIL_LINES)
    }
}

impl Drop for EmbeddedEtcd {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Only reached on error paths (a failed start-up, a panic); the normal path is
        // the async `stop`. Blocking here is acceptable because the process is leaving.
        tracing::info!(pid = child.id(), "stopping embedded etcd (drop)");
        terminate(&child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Sends SIGTERM to a child we have not reaped yet.
fn terminate(child: &Child) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions. The pid cannot have been
    // recycled: the child is not reaped until we wait for it.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// Finds an executable `name` in `search_path` (default: `$PATH`).
fn find_binary(name: &str, search_path: Option<std::ffi::OsString>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let search_path = search_path.or_else(|| std::env::var_os("PATH"))?;
    std::env::split_paths(&search_path)
        .map(|dir| dir.join(name))
        .find(|path| {
            path.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Fails when `port` is taken, saying whether an etcd has it.
fn check_port_free(port: u16, key: &'static str) -> Result<()> {
    match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
        Ok(_) => Ok(()),
        Err(_) => match etcd_version_at(port) {
            Some(version) => Err(Error::PortUsedByEtcd { port, key, version }),
            None => Err(Error::PortInUse { port, key }),
        },
    }
}

/// Asks whatever listens on `port` for etcd's `/version` (served on client and peer
/// ports alike); `None` if it is not an etcd.
fn etcd_version_at(port: u16) -> Option<String> {
    let timeout = Duration::from_secs(1);
    let mut stream =
        TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    stream
        .write_all(b"GET /version HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut response = Vec::new();
    let _ = stream.take(64 * 1024).read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    let body = response.split_once("\r\n\r\n")?.1.trim();
    let version: serde_json::Value = serde_json::from_str(body).ok()?;
    Some(format!("etcd {}", version.get("etcdserver")?.as_str()?))
}

/// The last `lines` lines written to `path` after `offset`, each cut to a readable length.
fn log_tail(path: &Path, offset: u64, lines: usize) -> String {
    let mut text = String::new();
    let read = File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(offset))?;
        f.read_to_string(&mut text)
    });
    if let Err(e) = read {
        return format!("(cannot read the log: {e})");
    }
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if all.is_empty() {
        return "(the log is empty)".into();
    }
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|line| match line.char_indices().nth(400) {
            Some((cut, _)) => format!("  {}...", &line[..cut]),
            None => format!("  {line}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        free_ports::<1>()[0]
    }

    /// `N` distinct free ports: the listeners are held until all are bound
    /// (one at a time, the kernel may hand out the same port twice).
    fn free_ports<const N: usize>() -> [u16; N] {
        let listeners: [TcpListener; N] =
            std::array::from_fn(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap());
        listeners.map(|l| l.local_addr().unwrap().port())
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(find_binary("etcd", Some(empty.path().into())), None);
        let msg = Error::BinaryNotFound.to_string();
        assert!(msg.contains("apt-get install etcd-server"), "{msg}");
        assert!(msg.contains("--etcd-endpoints"), "{msg}");
    }

    #[tokio::test]
    async fn start_reports_missing_binary() {
        let empty = tempfile::tempdir().unwrap();
        let [client_port, peer_port] = free_ports::<2>();
        let mut options = EmbeddedEtcdOptions::new(empty.path(), client_port, peer_port);
        options.search_path = Some(empty.path().into());
        let err = EmbeddedEtcd::start_with(options).await.unwrap_err();
        assert!(matches!(err, Error::BinaryNotFound), "{err}");
    }

    #[test]
    fn port_taken_by_another_program_is_reported() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        // Answer nothing: the version probe must give up and call it "another program".
        let err = check_port_free(port, "etcd.embedded_client_port").unwrap_err();
        assert!(matches!(err, Error::PortInUse { .. }), "{err}");
    }

    #[test]
    fn log_tail_shows_only_this_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etcd.log");
        std::fs::write(&path, "old run\n").unwrap();
        let offset = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        writeln!(f, "a\nb\nc").unwrap();
        assert_eq!(log_tail(&path, offset, 2), "  b\n  c");
    }

    /// Needs `etcd` on PATH, as every integration test does.
    #[tokio::test]
    async fn starts_serves_detects_a_second_etcd_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let [client_port, peer_port] = free_ports::<2>();
        let etcd = EmbeddedEtcd::start(dir.path(), client_port, peer_port)
            .await
            .expect("etcd starts");
        let pid = etcd.pid().unwrap();

        let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        client.put("k", "v", None).await.unwrap();

        let other = tempfile::tempdir().unwrap();
        let err = EmbeddedEtcd::start(other.path(), client_port, free_port())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PortUsedByEtcd { .. }), "{err}");
        assert!(err.to_string().contains("another etcd"), "{err}");

        let status = etcd.stop().await.unwrap();
        // etcd re-raises SIGTERM after its graceful shutdown, so it "dies" of it.
        use std::os::unix::process::ExitStatusExt;
        assert!(
            status.success() || status.signal() == Some(libc::SIGTERM),
            "etcd exited with {status}"
        );
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(dir.path().join("etcd").is_dir());
        assert!(dir.path().join("etcd.log").is_file());
    }
}
