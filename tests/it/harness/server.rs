//! `flotilla serve` as a child process, the one way tests start it. [`ServerSpec`]
//! spawns one process; [`FlotillaServer`] owns one with its etcd (a real one from
//! [`EtcdCluster`], the server's own embedded one, or endpoints the test runs), a temp
//! dir for data, config and log (SQLite store, fast registry timings unless told
//! otherwise), and waits for `/readyz`. Dropping it kills the server, then etcd.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::http::readyz;
pub use super::ports::free_port;
use super::ports::free_port_array;
use super::EtcdCluster;

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// How long a server may take to be ready, or to exit once told to.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The server binary the tests spawn: `FLOTILLA_TEST_BIN` when set (a copy, so a
/// long chaos run survives a rebuild of `target/`), else the one cargo built.
/// Absolute, since the server runs in its data dir.
fn server_bin() -> PathBuf {
    let bin = std::env::var_os("FLOTILLA_TEST_BIN").map_or_else(|| BIN.into(), PathBuf::from);
    std::path::absolute(&bin).unwrap_or(bin)
}

/// Which etcd a [`FlotillaServer`] talks to.
#[derive(Debug, Clone, Default)]
pub enum Etcd {
    /// A fresh single-node [`EtcdCluster`], owned by the server handle.
    #[default]
    Harness,
    /// The server's embedded etcd, on free ports.
    Embedded,
    /// An etcd the test runs itself: comma-separated client URLs.
    Endpoints(String),
}

/// Where a [`FlotillaServer`] takes its settings from (`env` goes over all of them).
#[derive(Debug, Clone, Default)]
pub enum ServerConfig {
    /// `--config /dev/null`, and [`FAST_TIMINGS`] in the environment.
    #[default]
    FastTimings,
    /// `--config /dev/null` alone: the built-in defaults.
    Defaults,
    /// `--config` with this path (a relative one is read from the data dir).
    File(PathBuf),
    /// This TOML, written to a file in the data dir and given as `--config`.
    Toml(String),
}

/// How a test server is started.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Starts the server with `--admin-token-file` holding this token.
    pub admin_token: Option<String>,
    /// Extra environment variables (`FLOTILLA_*` settings, `PATH`).
    pub env: Vec<(String, String)>,
}

/// How a test server is started, beyond [`ServerOptions`]: for the tests of
/// `flotilla serve` itself (its etcd, config, flags, start-up and shutdown).
/// Its own struct because tests build `ServerOptions` with every field named.
#[derive(Debug, Clone, Default)]
pub struct Startup {
    pub etcd: Etcd,
    pub config: ServerConfig,
    /// `--cluster-id`; `client-test` when `None`.
    pub cluster_id: Option<String>,
    /// Extra arguments to `flotilla serve` (`--log-format json`).
    pub args: Vec<String>,
    /// Return once the process is spawned, not once `/readyz` answers 200: for a
    /// server over HTTPS, or one that must fail to start.
    pub no_wait: bool,
}

pub struct FlotillaServer {
    child: Option<Child>,
    spec: ServerSpec,
    etcd_url: String,
    wait_ready: bool,
    // Dropped after the child is killed (fields drop in order): etcd last.
    dir: TempDir,
    etcd: Option<EtcdCluster>,
}

impl FlotillaServer {
    /// Starts etcd and the server; returns once `/readyz` says 200.
    pub fn start(options: ServerOptions) -> FlotillaServer {
        FlotillaServer::start_with(options, Startup::default())
    }

    /// Starts etcd (unless the server brings its own or is given one) and the server;
    /// returns once `/readyz` says 200, unless `startup.no_wait`.
    pub fn start_with(options: ServerOptions, startup: Startup) -> FlotillaServer {
        let etcd = matches!(startup.etcd, Etcd::Harness).then(EtcdCluster::single);
        let dir = tempfile::Builder::new()
            .prefix("flotilla-server-")
            .tempdir()
            .unwrap();
        let admin_token_file = options.admin_token.as_ref().map(|token| {
            let file = dir.path().join("admin-token");
            std::fs::write(&file, token).unwrap();
            file
        });
        let [port, etcd_client, etcd_peer] = free_port_array::<3>();
        let mut env = Vec::new();
        let (etcd_endpoints, etcd_url) = match startup.etcd {
            Etcd::Harness => {
                let url = etcd.as_ref().expect("a harness etcd").endpoint(0);
                (Some(url.clone()), url)
            }
            Etcd::Embedded => {
                env.push((
                    "FLOTILLA_ETCD_EMBEDDED_CLIENT_PORT".to_owned(),
                    etcd_client.to_string(),
                ));
                env.push((
                    "FLOTILLA_ETCD_EMBEDDED_PEER_PORT".to_owned(),
                    etcd_peer.to_string(),
                ));
                (None, format!("http://127.0.0.1:{etcd_client}"))
            }
            Etcd::Endpoints(urls) => (Some(urls.clone()), urls),
        };
        env.extend(options.env);
        let config_file = match startup.config {
            ServerConfig::FastTimings => None,
            ServerConfig::Defaults => Some(PathBuf::from("/dev/null")),
            ServerConfig::File(path) => Some(path),
            ServerConfig::Toml(toml) => {
                let file = dir.path().join("config.toml");
                std::fs::write(&file, toml).unwrap();
                Some(file)
            }
        };
        let spec = ServerSpec {
            port,
            etcd_endpoints,
            data_dir: dir.path().to_owned(),
            store_url: None,
            cluster_id: startup.cluster_id.unwrap_or_else(|| "client-test".into()),
            admin_token_file,
            log_path: dir.path().join("server.log"),
            config_file,
            args: startup.args,
            env,
        };
        let mut server = FlotillaServer {
            child: None,
            spec,
            etcd_url,
            wait_ready: !startup.no_wait,
            dir,
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

    /// Sends `signal` to the server, then waits for it to exit.
    pub fn stop(&mut self, signal: libc::c_int) -> ExitStatus {
        let pid = self.child.as_ref().expect("a server process").id();
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
        self.wait_exit()
    }

    /// Waits for the server to exit (a server that must fail to start, or one
    /// that was told to stop); returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("a server process");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "flotilla serve still runs after {EXIT_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the server again on the same port, etcd and store; returns once
    /// ready, unless it was started with `no_wait`.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(self.spec.spawn());
        if self.wait_ready {
            self.wait_ready();
        }
    }

    /// The harness etcd under the server, to kill or pause it.
    pub fn etcd(&mut self) -> &mut EtcdCluster {
        self.etcd
            .as_mut()
            .expect("the server runs on no harness etcd")
    }

    /// The client URL(s) of the server's etcd, whichever it is.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The HTTP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.spec.port
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.spec.port)
    }

    /// The server's stderr so far (across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.spec.log_path).unwrap_or_default()
    }

    /// The server's data dir, also its working directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if readyz(self.spec.port) {
                return;
            }
            let child = self.child.as_mut().expect("a server process");
            if let Some(status) = child.try_wait().unwrap() {
                panic!("flotilla serve exited early ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "flotilla serve not ready after {READY_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The settings every test server runs with unless it reads a config: fast
/// heartbeats and expiry, a short session TTL (a killed server's leadership lapses
/// quickly), quick ticks, and logs that keep flotilla's own lines.
pub const FAST_TIMINGS: &[(&str, &str)] = &[
    ("FLOTILLA_REGISTRY_HEARTBEAT_INTERVAL", "200ms"),
    ("FLOTILLA_REGISTRY_DEFAULT_TTL", "1500ms"),
    ("FLOTILLA_REGISTRY_MIN_TTL", "500ms"),
    // The longest lease: what the owner waits for an executor that neither
    // acknowledges a stop nor goes offline; with the session TTL, within the grace.
    ("FLOTILLA_REGISTRY_MAX_TTL", "3s"),
    ("FLOTILLA_REGISTRY_KEEPALIVE_INTERVAL", "100ms"),
    ("FLOTILLA_REGISTRY_FAILOVER_GRACE", "5s"),
    ("FLOTILLA_SERVER_SESSION_TTL", "2s"),
    ("FLOTILLA_ETCD_TICK_INTERVAL", "50ms"),
    ("FLOTILLA_ETCD_REQUEST_TIMEOUT", "1s"),
    ("FLOTILLA_LOG_LEVEL", "warn,flotilla=info"),
];

/// How to start one `flotilla serve` process.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub port: u16,
    /// Comma-separated client URLs; `None`: the server's embedded etcd (its ports
    /// in `env`).
    pub etcd_endpoints: Option<String>,
    /// Also the working directory.
    pub data_dir: PathBuf,
    /// `None`: SQLite under `data_dir`.
    pub store_url: Option<String>,
    pub cluster_id: String,
    pub admin_token_file: Option<PathBuf>,
    /// stderr goes here (appended across restarts).
    pub log_path: PathBuf,
    /// `--config`; `None`: `/dev/null`, and [`FAST_TIMINGS`] in the environment.
    pub config_file: Option<PathBuf>,
    /// Extra arguments after the ones the fields above give.
    pub args: Vec<String>,
    /// Extra environment variables, after (so over) the fast test timings.
    pub env: Vec<(String, String)>,
}

impl ServerSpec {
    /// Starts the process; does not wait for it.
    pub fn spawn(&self) -> Child {
        let mut command = Command::new(server_bin());
        command
            .arg("serve")
            .arg("--config")
            .arg(
                self.config_file
                    .as_deref()
                    .unwrap_or(Path::new("/dev/null")),
            )
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--cluster-id")
            .arg(&self.cluster_id)
            .current_dir(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log_path)
                    .unwrap(),
            );
        if self.config_file.is_none() {
            command.envs(FAST_TIMINGS.iter().copied());
        }
        if let Some(urls) = &self.etcd_endpoints {
            command.arg("--etcd-endpoints").arg(urls);
        }
        if let Some(url) = &self.store_url {
            command.arg("--store-url").arg(url);
        }
        if let Some(file) = &self.admin_token_file {
            command.arg("--admin-token-file").arg(file);
        }
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        die_with_test(&mut command);
        command.spawn().expect("start flotilla serve")
    }
}

/// Makes a child started from `command` die with the test process, even one
/// that is SIGKILLed.
pub fn die_with_test(command: &mut Command) {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
}

impl Drop for FlotillaServer {
    fn drop(&mut self) {
        self.kill();
    }
}
