//! The operator and executor commands of the `flotilla` binary (everything but `serve`):
//! `executors`, `changefeed`, `status` and `agent`, all clients of a server's HTTP API
//! through `flotilla::client`.
//!
//! Output: a human table by default, the API's JSON with `--output json`. Errors: one
//! line on stderr, `error: <code>: <message>`, and an exit code from [`EXIT_CODES`].

mod agent;
mod changefeed;
mod executors;
mod status;
mod table;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use flotilla::client::{self, Client};
use serde::Serialize;

pub use changefeed::ChangefeedArgs;
pub use executors::ExecutorsArgs;
pub use status::StatusArgs;

/// The exit codes of `executors`, `changefeed` and `status`, the one table both help
/// texts ([`exit_codes_help`], [`top_help`]) are generated from; shown in the README too.
pub const EXIT_CODES: &[(u8, &str)] = &[
    (0, "success"),
    (
        1,
        "the server refused the request (4xx: not found, unauthorized, conflict, invalid)",
    ),
    (
        2,
        "usage error: bad flags or arguments, unreadable token file, invalid --config JSON",
    ),
    (
        3,
        "no usable answer: cannot connect, timeout, a 5xx (the server is unavailable or\n     \
         failed), or an answer that is not flotilla's API",
    ),
];

/// [`EXIT_CODES`] as help lines, `  <code>  <meaning>`.
fn exit_code_lines() -> String {
    EXIT_CODES
        .iter()
        .map(|(code, meaning)| format!("  {code}  {meaning}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The client subcommands' `--help` epilogue: what scripts can rely on.
pub fn exit_codes_help() -> String {
    format!("Exit codes:\n{}", exit_code_lines())
}

/// The binary's `--help` epilogue: both families of exit codes.
pub fn top_help() -> String {
    format!(
        "Exit codes of executors, changefeed and status:\n{}\n\
         Exit codes of serve: 0 clean shutdown, 1 start-up failure, 2 configuration error.\n\
         Exit codes of agent: see `flotilla agent --help`.",
        exit_code_lines()
    )
}

/// The subcommands this module runs; flattened into the binary's command list.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// List, inspect, watch and deregister executors.
    #[command(after_help = exit_codes_help())]
    Executors(ExecutorsArgs),
    /// Create, list, inspect, pause, resume, update and delete changefeeds.
    #[command(after_help = exit_codes_help())]
    Changefeed(ChangefeedArgs),
    /// Show the server's status: version, etcd and store health, executor counts.
    #[command(after_help = exit_codes_help())]
    Status(StatusArgs),
    /// Run an executor agent: register, heartbeat, report progress, deregister on exit.
    #[command(after_help = agent::AFTER_HELP)]
    Agent(agent::AgentArgs),
}

/// How to reach the server; every client subcommand takes these.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Server URL, or several separated by commas (any server answers; when one
    /// cannot be reached the next is tried)
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_SERVER",
        default_value = client::DEFAULT_SERVER,
        value_name = "URL"
    )]
    server: String,
    /// Admin token, sent as `Authorization: Bearer` on changefeed writes and deregistrations
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    admin_token: Option<String>,
    /// File holding the admin token (wins over --admin-token)
    #[arg(long, global = true, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// Request timeout, such as 500ms or 10s
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    timeout: Duration,
    /// Output format
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Human-readable tables
    Table,
    /// JSON with the API's field names (one document; `executors watch` and `changefeed
    /// list --all` print one per line)
    Json,
}

/// Why a command failed, and so its exit code.
#[derive(Debug)]
enum Failure {
    /// The server refused (exit 1).
    Refused(String),
    /// Bad input found before asking the server (exit 2).
    Usage(String),
    /// No usable answer (exit 3).
    Unavailable(String),
}

impl From<client::Error> for Failure {
    fn from(error: client::Error) -> Failure {
        let message = error.to_string();
        if error.is_client_error() {
            Failure::Refused(message)
        } else if matches!(error, client::Error::InvalidUrl { .. }) {
            Failure::Usage(message)
        } else {
            Failure::Unavailable(message)
        }
    }
}

type CliResult<T = ()> = Result<T, Failure>;

/// Runs a client subcommand to its end; the exit code follows [`EXIT_CODES`].
pub fn run(command: ClientCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let result = runtime.block_on(async {
        match command {
            ClientCommand::Executors(args) => executors::run(args).await,
            ClientCommand::Changefeed(args) => changefeed::run(args).await,
            ClientCommand::Status(args) => status::run(args).await,
            ClientCommand::Agent(args) => agent::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let (code, message) = match failure {
                Failure::Refused(m) => (1, m),
                Failure::Usage(m) => (2, m),
                Failure::Unavailable(m) => (3, m),
            };
            // One line whatever the server put in its message.
            eprintln!("error: {}", message.replace(['\r', '\n'], " "));
            ExitCode::from(code)
        }
    }
}

impl ConnectArgs {
    fn client(&self) -> CliResult<Client> {
        let mut client = Client::new(&self.server)?.with_timeout(self.timeout);
        let token = match &self.admin_token_file {
            Some(path) => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    Failure::Usage(format!(
                        "cannot read --admin-token-file {}: {e}",
                        path.display()
                    ))
                })?;
                let token = token.trim().to_owned();
                if token.is_empty() {
                    return Err(Failure::Usage(format!(
                        "--admin-token-file {} is empty",
                        path.display()
                    )));
                }
                Some(token)
            }
            None => self.admin_token.clone().filter(|t| !t.trim().is_empty()),
        };
        if let Some(token) = token {
            client = client.with_admin_token(token);
        }
        Ok(client)
    }

    /// Prints `value` as JSON, or `human()` as text.
    fn print<T: Serialize>(&self, value: &T, human: impl FnOnce(&T) -> String) {
        match self.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(value).expect("API types serialize")
            ),
            Output::Table => print!("{}", human(value)),
        }
    }
}

fn parse_pair(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{value:?} is not KEY=VALUE")),
    }
}
