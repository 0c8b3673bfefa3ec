//! The `flotilla` binary. `flotilla serve` loads and validates the configuration, starts
//! the embedded etcd when no endpoints are configured, serves the HTTP API, and on
//! SIGINT/SIGTERM drains HTTP before it stops etcd: requests in flight may still need it.
//! The other subcommands (`executors`, `changefeed`, `status`, `agent`) are clients of a
//! server, in `cli`.

mod cli;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use actix::Actor;
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use flotilla::actors::election::{self, ElectionConfig};
use flotilla::actors::executor_registry::RegistryConfig;
use flotilla::actors::leader::{LeaderRoles, RoleSettings, RoleSlot, StepDown};
use flotilla::actors::owner::OwnerSettings;
use flotilla::actors::WorkerConfig;
use flotilla::config::{self, Config, LogFormat, Override};
use flotilla::etcd_server::{EmbeddedEtcd, EmbeddedEtcdOptions};
use flotilla::http::limits::RegisterLimiter;
use flotilla::http::{self, AppState, EtcdProbe, ServerInfo};
use flotilla::owner::feeds::Changefeeds;
use flotilla::owner::model::Keys;
use flotilla::owner::reactor::OwnerConfig;
use flotilla::store::{self, Store, StoreOptions};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{info, warn};

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Control plane for a fleet of executors running changefeeds",
    after_help = cli::top_help()
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a control-plane server.
    Serve(ServeArgs),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

/// Flags override `FLOTILLA_*` environment variables, which override the file.
#[derive(Debug, Args)]
struct ServeArgs {
    /// Configuration file [default: ./config.toml if it exists, else built-in defaults]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// HTTP listen address (http.listen)
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Address other servers and executors use to reach this one (server.advertise_addr)
    #[arg(long, value_name = "ADDR")]
    advertise_addr: Option<String>,
    /// etcd client URLs, comma-separated; none starts an embedded etcd (etcd.endpoints)
    #[arg(long, value_name = "URL[,URL..]")]
    etcd_endpoints: Option<String>,
    /// Metadata store URL (store.url)
    #[arg(long, value_name = "URL")]
    store_url: Option<String>,
    /// Data directory for the embedded etcd and SQLite (server.data_dir)
    #[arg(long, value_name = "DIR")]
    data_dir: Option<String>,
    /// Cluster id; part of the etcd key prefix (server.cluster_id)
    #[arg(long, value_name = "ID")]
    cluster_id: Option<String>,
    /// File holding the admin token (server.admin_token_file)
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<String>,
    /// Log format: human or json (log.format)
    #[arg(long, value_name = "FORMAT", value_parser = ["human", "json", "text"], hide_possible_values = true)]
    log_format: Option<String>,
    /// Log filter such as `info` or `info,flotilla=debug` (log.level)
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

impl ServeArgs {
    fn overrides(&self) -> Vec<Override> {
        [
            ("http.listen", "--listen", &self.listen),
            (
                "server.advertise_addr",
                "--advertise-addr",
                &self.advertise_addr,
            ),
            ("etcd.endpoints", "--etcd-endpoints", &self.etcd_endpoints),
            ("store.url", "--store-url", &self.store_url),
            ("server.data_dir", "--data-dir", &self.data_dir),
            ("server.cluster_id", "--cluster-id", &self.cluster_id),
            (
                "server.admin_token_file",
                "--admin-token-file",
                &self.admin_token_file,
            ),
            ("log.format", "--log-format", &self.log_format),
            ("log.level", "--log-level", &self.log_level),
        ]
        .into_iter()
        .filter_map(|(key, flag, value)| {
            value.as_ref().map(|value| Override {
                key,
                flag,
                value: value.clone(),
            })
        })
        .collect()
    }

    /// The file to read: the flag, else `config.toml` when present.
    fn config_file(&self) -> Option<PathBuf> {
        self.config.clone().or_else(|| {
            let default = Path::new(config::DEFAULT_FILE);
            default.is_file().then(|| default.to_owned())
        })
    }
}

fn main() -> ExitCode {
    let args = match Cli::parse().command {
        Command::Serve(args) => args,
        Command::Client(command) => return cli::run(command),
    };

    let file = args.config_file();
    // Non-UTF-8 variables cannot be ours; skipping them beats refusing to start.
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    let config = match Config::load(file.as_deref(), env, &args.overrides()) {
        Ok(config) => config,
        Err(e) => {
            // Logging is not set up yet (its settings are part of what failed).
            eprintln!("flotilla: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&config.log);
    match &file {
        Some(path) => info!(file = %path.display(), "configuration loaded"),
        None => info!("no config file; using built-in defaults"),
    }

    match actix_web::rt::System::new().block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flotilla: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(log: &config::LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.level)
        .expect("log.level was validated with the same parser");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only help a person at a terminal; in files they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match log.format {
        LogFormat::Human => builder.init(),
        // Fields at the top level, so `message` and `level` sit side by side.
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Installed first: a signal during the (slow) etcd start must not kill us before
    // we can stop etcd.
    let mut signals = Signals::install().context("cannot install signal handlers")?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        cluster_id = %config.server.cluster_id,
        prefix = %config.etcd.prefix,
        "starting flotilla"
    );

    let embedded = if config.etcd.is_embedded() {
        let options = EmbeddedEtcdOptions {
            max_txn_ops: config.etcd.max_txn_ops,
            max_txn_bytes: config.etcd.max_txn_bytes,
            ..EmbeddedEtcdOptions::new(
                &config.server.data_dir,
                config.etcd.embedded_client_port,
                config.etcd.embedded_peer_port,
            )
        };
        info!(
            data_dir = %config.server.data_dir.display(),
            client_port = options.client_port,
            peer_port = options.peer_port,
            "starting embedded etcd"
        );
        let etcd = tokio::select! {
            etcd = EmbeddedEtcd::start_with(options) => etcd?,
            signal = signals.recv() => {
                // Dropping the start future stops the half-started child.
                info!(signal, "shutdown requested during start-up");
                return Ok(());
            }
        };
        info!(
            pid = etcd.pid(),
            endpoint = etcd.endpoint(),
            log = %etcd.log_path().display(),
            "embedded etcd is ready"
        );
        Some(etcd)
    } else {
        None
    };
    let endpoints = match &embedded {
        Some(etcd) => vec![etcd.endpoint().to_owned()],
        None => config.etcd.endpoints.clone(),
    };

    // Created here, on the main System, which outlives the HTTP workers that use it.
    let etcd_options = etcd_connect_options(&config)?;
    let options = etcd_options
        .clone()
        .with_timeout(config.etcd.request_timeout);
    let client = etcd_client::Client::connect(&endpoints, Some(options))
        .await
        .with_context(|| format!("cannot create an etcd client for {endpoints:?}"))?;
    let changefeeds = Changefeeds::new(
        client.clone(),
        Keys::new(config.etcd.prefix.clone()),
        config.etcd.request_timeout,
    );
    let probe = EtcdProbe::new(client, config.etcd.request_timeout);
    match probe.check().await {
        Ok(()) => info!(?endpoints, "etcd is reachable"),
        // An external cluster may come up later; /readyz says 503 until it does.
        Err(e) => warn!(?endpoints, error = %e, "etcd is not reachable yet"),
    }

    let store_options = StoreOptions::default();
    let store = Store::connect(&config.store.url, &store_options)
        .await
        .with_context(|| {
            format!(
                "cannot open the metadata store (store.url / --store-url {})",
                store::redact_url(&config.store.url)
            )
        })?;
    info!(backend = store.backend(), "metadata store ready");
    // The owner gets a client of its own without a request timeout: its
    // watch is a long-lived stream, and the worker bounds each request itself.
    // The election shares it (its requests are bounded by the election).
    let owner_client = etcd_client::Client::connect(&endpoints, Some(etcd_options))
        .await
        .with_context(|| format!("cannot create an etcd client for {endpoints:?}"))?;
    let keys = Keys::new(config.etcd.prefix.clone());
    let registry_settings = registry_config(&config.registry);
    let failover_floor = registry_settings.default_ttl + config.server.session_ttl;
    if registry_settings.failover_grace < failover_floor {
        warn!(
            failover_grace = %humantime::format_duration(registry_settings.failover_grace),
            advised = %humantime::format_duration(failover_floor),
            "registry.failover_grace is shorter than registry.default_ttl + server.session_ttl: \
             executors may expire after a failover although they kept heartbeating"
        );
    }
    let server_id = server_id();
    let roles = RoleSlot::default();
    let leader_roles = LeaderRoles::new(
        RoleSettings {
            registry: registry_settings,
            store,
            client: owner_client.clone(),
            keys: keys.clone(),
            owner: OwnerSettings {
                worker: WorkerConfig {
                    tick_interval: config.etcd.tick_interval,
                    max_txn_ops: config.etcd.max_txn_ops,
                    max_txn_bytes: config.etcd.max_txn_bytes,
                    request_timeout: config.etcd.request_timeout,
                    ..WorkerConfig::new(format!("{}/", config.etcd.prefix.trim_end_matches('/')))
                },
                owner: OwnerConfig {
                    server_id: server_id.clone(),
                    ..OwnerConfig::default()
                },
                restart_backoff: Duration::from_secs(1),
            },
        },
        roles.clone(),
    )
    .start();
    let admin_token = match &config.server.admin_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read server.admin_token_file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        // The same variable the CLI reads: one secret for both sides, never
        // in a file or on a command line. Not a config key, so never logged
        // with the configuration.
        None => std::env::var(ADMIN_TOKEN_ENV)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty()),
    };
    match (&config.server.admin_token_file, &admin_token) {
        (Some(path), _) => info!(file = %path.display(), "admin token loaded"),
        (None, Some(_)) => info!(env = ADMIN_TOKEN_ENV, "admin token loaded"),
        (None, None) => warn!(
            "no admin token (server.admin_token_file or {ADMIN_TOKEN_ENV}): changefeed writes are open"
        ),
    }

    let listener = http::listen(&config.http.listen)?;
    let bound = listener
        .local_addr()
        .context("cannot read the bound HTTP address")?;
    let info = ServerInfo {
        id: server_id,
        version: env!("CARGO_PKG_VERSION"),
        cluster_id: config.server.cluster_id.clone(),
        advertise_addr: config
            .server
            .advertise_addr
            .clone()
            .unwrap_or_else(|| bound.to_string()),
        etcd_endpoints: endpoints,
    };
    let server_id = info.id.clone();
    let peer_tls = match (&config.http.tls_cert_file, &config.http.tls_ca_file) {
        (Some(_), Some(ca)) => Some(std::sync::Arc::new(
            flotilla::tls::client_config(ca).context("http.tls_ca_file")?,
        )),
        _ => None,
    };
    let election = election::start(
        owner_client,
        ElectionConfig {
            key_prefix: keys.owner_prefix(),
            server_id: info.id.clone(),
            advertise_addr: info.advertise_addr.clone(),
            session_ttl: config.server.session_ttl,
            request_timeout: config.etcd.request_timeout,
        },
        leader_roles.clone().recipient(),
    );
    let state = AppState {
        info,
        etcd: probe,
        roles,
        election: Some(election.view()),
        changefeeds: Some(changefeeds),
        admin_token,
        max_body_bytes: config.http.max_body_bytes,
        max_heartbeat_bytes: config.http.max_heartbeat_bytes,
        register_limit: RegisterLimiter::new(config.http.register_rate, config.http.register_burst),
        peer_tls,
    };
    let server = http::serve(listener, &config.http, state)?;
    info!(server_id, listen = %bound, "HTTP server listening");

    let handle = server.handle();
    let mut server = std::pin::pin!(server);
    let (mut draining, mut abandoned) = (false, false);
    loop {
        tokio::select! {
            result = &mut server => {
                result.context("HTTP server failed")?;
                break;
            }
            signal = signals.recv() => {
                if draining {
                    // actix handles stop commands one at a time, so a forced stop would
                    // wait behind the graceful one; leave instead (exit ends the workers).
                    warn!(signal, "second signal: not waiting for in-flight requests");
                    abandoned = true;
                    break;
                }
                info!(
                    signal,
                    timeout = %humantime::format_duration(config.http.shutdown_timeout),
                    "shutting down: HTTP stops accepting and drains in-flight requests"
                );
                draining = true;
                // The command is sent at once; the server future reports completion.
                drop(handle.stop(true));
            }
        }
    }
    if !abandoned {
        info!("HTTP server stopped");
    }
    // Requests are drained; nothing sends to the owner or the registry any
    // more. The owner's worker finishes its in-flight commit first.
    let _ = leader_roles.send(StepDown).await;
    // The lease is revoked: another server leads at once.
    election.resign().await;
    info!("left the leader election");

    if let Some(etcd) = embedded {
        info!(pid = etcd.pid(), "stopping embedded etcd");
        let status = etcd.stop().await.context("cannot stop the embedded etcd")?;
        // etcd re-raises SIGTERM after a graceful shutdown; that is the normal end.
        if status.success() || status.signal() == Some(libc::SIGTERM) {
            info!("embedded etcd stopped");
        } else {
            warn!(%status, "embedded etcd stopped abnormally");
        }
    }
    info!("flotilla stopped");
    Ok(())
}

fn registry_config(c: &flotilla::config::RegistryConfig) -> RegistryConfig {
    RegistryConfig {
        heartbeat_interval: c.heartbeat_interval,
        default_ttl: c.default_ttl,
        min_ttl: c.min_ttl,
        max_ttl: c.max_ttl,
        keepalive_interval: c.keepalive_interval,
        failover_grace: c.failover_grace,
        mass_expiry_fraction: c.mass_expiry_fraction,
        mass_expiry_rate: c.mass_expiry_rate,
        max_executors: c.max_executors,
        ..RegistryConfig::default()
    }
}

/// How every etcd client of this server connects: the dial timeout and,
/// for an external etcd with TLS, its CA and this server's identity.
fn etcd_connect_options(config: &Config) -> anyhow::Result<etcd_client::ConnectOptions> {
    let options = etcd_client::ConnectOptions::new().with_connect_timeout(config.etcd.dial_timeout);
    let etcd = &config.etcd;
    if etcd.tls_ca_file.is_none() && etcd.tls_cert_file.is_none() {
        return Ok(options);
    }
    let identity = etcd
        .tls_cert_file
        .as_deref()
        .zip(etcd.tls_key_file.as_deref());
    let tls = flotilla::tls::etcd_options(etcd.tls_ca_file.as_deref(), identity)
        .context("etcd TLS (etcd.tls_*)")?;
    Ok(options.with_tls(tls))
}

/// Holds the admin token when `server.admin_token_file` is not set.
const ADMIN_TOKEN_ENV: &str = "FLOTILLA_ADMIN_TOKEN";

/// A per-process id: readable (host name) and unique across restarts (random suffix).
fn server_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "flotilla".into());
    format!("{host}-{:08x}", rand::random::<u32>())
}

/// SIGINT and SIGTERM both mean "shut down gracefully"; a second one means "now".
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}
