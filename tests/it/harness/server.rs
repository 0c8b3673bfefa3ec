//! A real `flotilla serve` process over a real etcd from [`EtcdCluster`], with a
//! SQLite store in a temp dir and fast registry timings, for tests of the client, the
//! CLI and the agent. Dropping it kills the server, then etcd.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::http::readyz;
pub use super::ports::free_port;
use super::EtcdCluster;

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// The server binary the cluster tests spawn: `FLOTILLA_TEST_BIN` when set
/// (a copy, so a long chaos run survives a rebuild of `target/`), else the
/// one cargo built.
fn server_bin() -> std::ffi::OsString {
    std::env::var_os("FLOTILLA_TEST_BIN").unwrap_or_else(|| BIN.into())
}

/// How a test server is started.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Starts the server with `--admin-token-file` holding this token.
    pub admin_token: Option<String>,
    /// Extra `FLOTILLA_*` settings.
    pub env: Vec<(String, String)>,
}

pub struct FlotillaServer {
    child: Option<Child>,
    env: Vec<(String, String)>,
    port: u16,
    log_path: PathBuf,
    admin_token_file: Option<PathBuf>,
    // Dropped after the child is killed (fields drop in order): etcd last.
    _dir: TempDir,
    etcd: EtcdCluster,
}

impl FlotillaServer {
    /// Starts etcd and the server; returns once `/readyz` says 200.
    pub fn start(options: ServerOptions) -> FlotillaServer {
        let etcd = EtcdCluster::single();
        let dir = tempfile::Builder::new()
            .prefix("flotilla-server-")
            .tempdir()
            .unwrap();
        let admin_token_file = options.admin_token.as_ref().map(|token| {
            let file = dir.path().join("admin-token");
            std::fs::write(&file, token).unwrap();
            file
        });
        let mut server = FlotillaServer {
            child: None,
            env: options.env,
            port: free_port(),
            log_path: dir.path().join("server.log"),
            admin_token_file,
            _dir: dir,
            etcd,
        };
        server.restart();
        server
    }

    /// SIGKILLs the server (etcd and the store stay).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, etcd and store; returns once ready.
    pub fn restart(&mut self) {
        self.kill();
        let spec = ServerSpec {
            port: self.port,
            etcd_endpoints: self.etcd.endpoint(0),
            data_dir: self._dir.path().to_owned(),
            store_url: None,
            cluster_id: "client-test".into(),
            admin_token_file: self.admin_token_file.clone(),
            log_path: self.log_path.clone(),
            env: self.env.clone(),
        };
        self.child = Some(spec.spawn());
        self.wait_ready();
    }

    /// The etcd under the server, to kill or pause it.
    pub fn etcd(&mut self) -> &mut EtcdCluster {
        &mut self.etcd
    }

    /// The HTTP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's stderr so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn data_dir(&self) -> &Path {
        self._dir.path()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if readyz(self.port) {
                return;
            }
            let child = self.child.as_mut().expect("a server process");
            if let Some(status) = child.try_wait().unwrap() {
                panic!("flotilla serve exited early ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "flotilla serve not ready after 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The settings every test server runs with: fast heartbeats and expiry, a
/// short session TTL (a killed server's leadership lapses quickly), quick
/// ticks, and logs that keep flotilla's own lines.
pub const FAST_TIMINGS: &[(&str, &str)] = &[
    ("FLOTILLA_REGISTRY_HEARTBEAT_INTERVAL", "200ms"),
    ("FLOTILLA_REGISTRY_DEFAULT_TTL", "1500ms"),
    ("FLOTILLA_REGISTRY_MIN_TTL", "500ms"),
    ("FLOTILLA_REGISTRY_KEEPALIVE_INTERVAL", "100ms"),
    ("FLOTILLA_REGISTRY_FAILOVER_GRACE", "5s"),
    ("FLOTILLA_SERVER_SESSION_TTL", "2s"),
    ("FLOTILLA_ETCD_TICK_INTERVAL", "50ms"),
    ("FLOTILLA_LOG_LEVEL", "warn,flotilla=info"),
];

/// How to start one `flotilla serve` process.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub port: u16,
    /// Comma-separated client URLs.
    pub etcd_endpoints: String,
    pub data_dir: PathBuf,
    /// `None`: SQLite under `data_dir`.
    pub store_url: Option<String>,
    pub cluster_id: String,
    pub admin_token_file: Option<PathBuf>,
    /// stderr goes here (appended across restarts).
    pub log_path: PathBuf,
    /// Extra `FLOTILLA_*` settings, after (so over) the fast test timings.
    pub env: Vec<(String, String)>,
}

impl ServerSpec {
    /// Starts the process with fast registry timings; does not wait for it.
    pub fn spawn(&self) -> Child {
        let mut command = Command::new(server_bin());
        command
            .args(["serve", "--config", "/dev/null", "--listen"])
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--etcd-endpoints")
            .arg(&self.etcd_endpoints)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--cluster-id")
            .arg(&self.cluster_id)
            .envs(FAST_TIMINGS.iter().copied())
            .env("FLOTILLA_ETCD_REQUEST_TIMEOUT", "1s")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log_path)
                    .unwrap(),
            );
        if let Some(url) = &self.store_url {
            command.arg("--store-url").arg(url);
        }
        if let Some(file) = &self.admin_token_file {
            command.arg("--admin-token-file").arg(file);
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // The server must not outlive a test process that is killed.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        command.spawn().expect("start flotilla serve")
    }
}

impl Drop for FlotillaServer {
    fn drop(&mut self) {
        self.kill();
    }
}
