//! The `flotilla` binary. `flotilla serve` parses its flags, loads and validates the
//! configuration, sets up logging and runs [`flotilla::server::run`] with SIGINT/SIGTERM
//! as its shutdown requests (the server drains HTTP before it stops etcd).
//! The other subcommands (`executors`, `changefeed`, `status`, `agent`) are clients of a
//! server, in `cli`.

mod cli;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use flotilla::config::{self, Config, LogFormat, Override};
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
    for warning in config.warnings() {
        warn!(key = warning.key, "{}", warning.message);
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
    let signals = Signals::install().context("cannot install signal handlers")?;
    flotilla::server::run(config, Box::pin(signals.requests())).await?;
    Ok(())
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

    /// Every signal received, as the server's shutdown requests.
    fn requests(self) -> impl futures::Stream<Item = &'static str> {
        futures::stream::unfold(self, |mut signals| async move {
            let signal = signals.recv().await;
            Some((signal, signals))
        })
    }
}
