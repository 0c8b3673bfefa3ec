//! A real PostgreSQL server for store tests: Debian's `postgresql` binaries
//! (`/usr/lib/postgresql/<version>/bin`), a throw-away cluster in a temp dir, on a free
//! loopback port, trust authentication for the `postgres` superuser.
//!
//! Guarantees the tests rely on:
//! - `PostgresServer::start` returns only once the server answers a real query over TCP
//!   and that query proves it is *our* server (its data directory is ours).
//! - No postgres outlives the test: `Drop` asks for an immediate shutdown (SIGQUIT,
//!   which also stops its backends), escalates to SIGKILL, and reaps it; the postmaster
//!   is spawned with `PR_SET_PDEATHSIG = SIGKILL` from a thread that lives as long as
//!   the test process, and its backends exit when they lose their postmaster.
//! - Running as root works: postgres refuses root, so initdb and the server run as the
//!   `postgres` OS user, which owns the temp dir.
//!
//! `FLOTILLA_TEST_POSTGRES_URL` (a superuser URL, e.g. `postgres://postgres@127.0.0.1/postgres`)
//! makes the harness use that server instead of starting one.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use sea_orm::{ConnectOptions, ConnectionTrait, Database};
use tempfile::TempDir;

use super::etcd::{free_ports, spawn_from_long_lived_thread, tail};

const PG_ROOT: &str = "/usr/lib/postgresql";
const INSTALL_HINT: &str = "install PostgreSQL: apt-get install -y postgresql";
const EXTERNAL_URL_VAR: &str = "FLOTILLA_TEST_POSTGRES_URL";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Whole-start attempts; a retry only follows a lost race for the port.
const START_ATTEMPTS: usize = 5;

/// A running PostgreSQL server (or an external one, see the module docs).
pub struct PostgresServer {
    /// Superuser URL of the `postgres` database.
    admin_url: String,
    local: Option<LocalServer>,
}

/// A server this harness started.
struct LocalServer {
    process: Child,
    port: u16,
    log_path: PathBuf,
    /// Removed once dropped, which is after `PostgresServer::drop` reaped the server.
    _dir: TempDir,
}

impl PostgresServer {
    /// Starts a fresh server; panics with the server's log if it cannot.
    pub fn start() -> PostgresServer {
        if let Some(url) = std::env::var_os(EXTERNAL_URL_VAR) {
            let admin_url = url
                .into_string()
                .unwrap_or_else(|_| panic!("{EXTERNAL_URL_VAR} is not UTF-8"));
            return PostgresServer {
                admin_url,
                local: None,
            };
        }
        let bin = bin_dir();
        let run_as = if is_root() {
            Some(postgres_user())
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("flotilla-pg-")
            .tempdir()
            .expect("create a temp dir for postgres");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", dir.path().display()));
        }
        let data = dir.path().join("data");
        init_cluster(&bin, &data, run_as);

        let log_path = dir.path().join("postgres.log");
        for attempt in 1..=START_ATTEMPTS {
            let port = free_ports(1)[0];
            let mut process = spawn_server(&bin, dir.path(), &data, port, &log_path, run_as);
            match await_ready(&bin, &mut process, port, &data, &log_path) {
                Ok(()) => {
                    return PostgresServer {
                        admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                        local: Some(LocalServer {
                            process,
                            port,
                            log_path,
                            _dir: dir,
                        }),
                    };
                }
                Err(NotReady::PortTaken) if attempt < START_ATTEMPTS => {
                    stop(&mut process);
                    thread::sleep(Duration::from_millis(100));
                }
                Err(why) => {
                    stop(&mut process);
                    panic!("postgres did not start ({why:?}):\n{}", tail(&log_path, 40));
                }
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// One server shared by every test of the process that holds it at the same time;
    /// the last holder's drop stops it, and a later call starts a new one. Cheaper than
    /// one server per test when tests run in parallel; give each test its own
    /// `fresh_database`.
    pub fn shared() -> Arc<PostgresServer> {
        static SHARED: Mutex<Weak<PostgresServer>> = Mutex::new(Weak::new());
        // A test that panicked while starting the server poisons the lock; the Weak
        // inside is still valid.
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(server) = shared.upgrade() {
            return server;
        }
        let server = Arc::new(PostgresServer::start());
        *shared = Arc::downgrade(&server);
        server
    }

    /// Superuser URL of the server's `postgres` database.
    pub fn url(&self) -> String {
        self.admin_url.clone()
    }

    /// The port a harness-started server listens on (None for an external server).
    pub fn port(&self) -> Option<u16> {
        self.local.as_ref().map(|local| local.port)
    }

    /// Creates a new, empty database whose name starts with `name` (made unique per
    /// call) and returns a superuser URL to it.
    pub async fn fresh_database(&self, name: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut db: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        db = format!(
            "{db}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );

        let mut options = ConnectOptions::new(self.url());
        options
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .sqlx_logging(false);
        let admin = Database::connect(options)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", self.url(), self.log_tail()));
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{db}\""))
            .await
            .unwrap_or_else(|e| panic!("create database {db}: {e}"));
        let _ = admin.close().await;

        let mut url = url::Url::parse(&self.admin_url)
            .unwrap_or_else(|e| panic!("{EXTERNAL_URL_VAR} is not a URL: {e}"));
        url.set_path(&db);
        url.to_string()
    }

    /// The last lines of the server's log (empty for an external server).
    pub fn log_tail(&self) -> String {
        self.local
            .as_ref()
            .map(|local| tail(&local.log_path, 40))
            .unwrap_or_default()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if let Some(local) = &mut self.local {
            stop(&mut local.process);
        }
    }
}

#[derive(Debug)]
enum NotReady {
    /// Another process bound the port between our pick and postgres' bind.
    PortTaken,
    Exited,
    TimedOut,
}

/// The `bin` directory of the newest installed PostgreSQL; panics with the install
/// hint if there is none.
fn bin_dir() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(PG_ROOT)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = entry.path().join("bin");
                (bin.join("postgres").is_file() && bin.join("initdb").is_file())
                    .then_some((version, bin))
            })
            .collect();
        versions.sort();
        match versions.pop() {
            Some((_, bin)) => bin,
            None => panic!("no PostgreSQL server under {PG_ROOT}/<version>/bin: {INSTALL_HINT}"),
        }
    })
    .clone()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of the `postgres` OS user (created by Debian's package).
fn postgres_user() -> (libc::uid_t, libc::gid_t) {
    static USER: OnceLock<(libc::uid_t, libc::gid_t)> = OnceLock::new();
    *USER.get_or_init(|| {
        let name = CString::new("postgres").expect("no NUL in a literal");
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut entry = std::mem::MaybeUninit::<libc::passwd>::uninit();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buf.len()` is its size;
        // getpwnam_r (unlike getpwnam) writes only into our buffers, so concurrent
        // tests cannot clobber each other's result.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                entry.as_mut_ptr(),
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc != 0 || found.is_null() {
            panic!("no `postgres` OS user (getpwnam_r: {rc}): {INSTALL_HINT}");
        }
        // SAFETY: getpwnam_r succeeded and pointed `found` at `entry`, so it is filled.
        let entry = unsafe { entry.assume_init() };
        (entry.pw_uid, entry.pw_gid)
    })
}

/// Makes `cmd` run as `user` (when given) and die with the test process. Both happen in
/// the forked child before exec.
fn run_as(cmd: &mut Command, user: Option<(libc::uid_t, libc::gid_t)>) {
    let parent = libc::pid_t::try_from(std::process::id()).expect("pid fits pid_t");
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe syscalls (setgroups, setgid, setuid, prctl, getppid); it
    // allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = user {
                // Drop root's supplementary groups too, then the group, then the user
                // (after setuid we could no longer change groups).
                if libc::setgroups(1, &gid) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            // After the uid change: changing credentials clears the death signal.
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

/// Variables that would point libpq tools (or the server) somewhere else.
fn clear_pg_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(&key);
        }
    }
}

fn init_cluster(bin: &Path, data: &Path, user: Option<(libc::uid_t, libc::gid_t)>) {
    let mut cmd = Command::new(bin.join("initdb"));
    cmd.args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale"])
        // No fsync: a test cluster never needs to survive a power loss.
        .arg("--no-sync")
        .arg("-D")
        .arg(data)
        .stdin(Stdio::null());
    clear_pg_env(&mut cmd);
    run_as(&mut cmd, user);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e} ({INSTALL_HINT})", bin.join("initdb").display()));
    assert!(
        output.status.success(),
        "initdb failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn spawn_server(
    bin: &Path,
    dir: &Path,
    data: &Path,
    port: u16,
    log_path: &Path,
    user: Option<(libc::uid_t, libc::gid_t)>,
) -> Child {
    let log =
        File::create(log_path).unwrap_or_else(|e| panic!("create {}: {e}", log_path.display()));
    let stderr = log.try_clone().expect("clone the postgres log handle");
    let mut cmd = Command::new(bin.join("postgres"));
    cmd.arg("-D")
        .arg(data)
        .args(["-p", &port.to_string()])
        .arg("-k")
        .arg(dir)
        .args(["-c", "listen_addresses=127.0.0.1"])
        // Speed over durability: the cluster is deleted after the test.
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
        .args(["-c", "full_page_writes=off"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr);
    clear_pg_env(&mut cmd);
    run_as(&mut cmd, user);
    // PDEATHSIG fires when the forking *thread* exits; a test thread ends long before
    // a shared server should.
    spawn_from_long_lived_thread(cmd)
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.join("postgres").display()))
}

/// Waits until the server on `port` answers `SHOW data_directory` with `data`.
fn await_ready(
    bin: &Path,
    process: &mut Child,
    port: u16,
    data: &Path,
    log_path: &Path,
) -> Result<(), NotReady> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if matches!(process.try_wait(), Ok(Some(_))) {
            let log = fs::read_to_string(log_path).unwrap_or_default();
            return Err(if log.contains("Address already in use") {
                NotReady::PortTaken
            } else {
                NotReady::Exited
            });
        }
        let listening =
            TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
                .is_ok();
        if listening && query_data_directory(bin, port).as_deref() == Some(data) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(NotReady::TimedOut);
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// The data directory of the server on `port`, asked over TCP with psql (so a server
/// that merely accepts connections, or someone else's, does not count as ready).
fn query_data_directory(bin: &Path, port: u16) -> Option<PathBuf> {
    let mut cmd = Command::new(bin.join("psql"));
    clear_pg_env(&mut cmd);
    let output = cmd
        .args(["-X", "-q", "-A", "-t", "-w", "-h", "127.0.0.1"])
        .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
        .args(["-c", "SHOW data_directory"])
        .env("PGCONNECT_TIMEOUT", "2")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    Some(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
    ))
}

/// Immediate shutdown (the postmaster SIGQUITs its backends and removes its shared
/// memory), then SIGKILL if that takes too long; always reaps.
fn stop(process: &mut Child) {
    if matches!(process.try_wait(), Ok(Some(_))) {
        return;
    }
    if let Ok(pid) = libc::pid_t::try_from(process.id()) {
        // SAFETY: kill has no memory-safety preconditions; `pid` is our unreaped child,
        // so it cannot have been recycled for another process.
        unsafe {
            libc::kill(pid, libc::SIGQUIT);
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if matches!(process.try_wait(), Ok(Some(_))) {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = process.kill();
    let _ = process.wait();
}
