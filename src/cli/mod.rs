//! The operator and executor commands of the `flotilla` binary (everything but `serve`):
//! `executors`, `changefeed`, `status` and `agent`, all clients of a server's HTTP API
//! through `flotilla::client`.
//!
//! Output: a human table by default, the API's JSON with `--output json`. Errors: one
//! line on stderr, `error: <code>: <message>`, and an exit code from [`EXIT_CODES`].

mod agent;
mod table;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use flotilla::client::{
    self, Changefeed, Client, CreateChangefeed, Executor, ExecutorFilter, UpdateChangefeed,
    WatchEvent,
};
use futures::StreamExt;
use serde::Serialize;

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
    /// Server URL
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
    /// JSON with the API's field names (one document; `executors watch` prints one per line)
    Json,
}

#[derive(Debug, Args)]
pub struct ExecutorsArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(subcommand)]
    command: ExecutorsCommand,
}

#[derive(Debug, Subcommand)]
enum ExecutorsCommand {
    /// List executors
    List {
        /// Only executors in this status
        #[arg(long, value_parser = ["initing", "running", "tombstone"])]
        status: Option<String>,
        /// Only executors with this label (repeatable; all must match)
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_pair)]
        labels: Vec<(String, String)>,
    },
    /// Show one executor
    Get { id: String },
    /// Follow executors going online and offline (until interrupted)
    Watch,
    /// Deregister an executor (with the admin token, or the executor's own --token)
    Deregister {
        id: String,
        /// The executor's own token instead of the admin token
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct ChangefeedArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Namespace of the changefeeds
    #[arg(
        long,
        short = 'n',
        global = true,
        env = "FLOTILLA_NAMESPACE",
        default_value = client::DEFAULT_NAMESPACE
    )]
    namespace: String,
    #[command(subcommand)]
    command: ChangefeedCommand,
}

#[derive(Debug, Subcommand)]
enum ChangefeedCommand {
    /// Create a changefeed
    Create {
        id: String,
        /// Where it writes, such as kafka://broker/topic
        #[arg(long, value_name = "URI")]
        sink_uri: String,
        /// Where it starts (a TiDB-style timestamp); absent: now
        #[arg(long, value_name = "TS")]
        start_ts: Option<u64>,
        /// Where it finishes; absent: runs forever
        #[arg(long, value_name = "TS")]
        target_ts: Option<u64>,
        /// Configuration, a JSON object
        #[arg(long, value_name = "JSON", value_parser = parse_json_object)]
        config: Option<serde_json::Value>,
        /// A label an executor must have to run it (repeatable)
        #[arg(long = "selector", value_name = "KEY=VALUE", value_parser = parse_pair)]
        selector: Vec<(String, String)>,
    },
    /// List changefeeds
    List {
        /// Only changefeeds in this state
        #[arg(long, value_parser = ["normal", "stopped", "failed", "finished"])]
        state: Option<String>,
    },
    /// Show one changefeed
    Get { id: String },
    /// Stop a changefeed (normal -> stopped)
    Pause { id: String },
    /// Start a stopped or failed changefeed again
    Resume {
        id: String,
        /// Resume from this checkpoint instead of the stored one
        #[arg(long, value_name = "TS")]
        checkpoint_ts: Option<u64>,
    },
    /// Change a paused changefeed: each option given replaces the stored value
    Update {
        id: String,
        #[arg(long, value_name = "URI")]
        sink_uri: Option<String>,
        /// Configuration, a JSON object
        #[arg(long, value_name = "JSON", value_parser = parse_json_object)]
        config: Option<serde_json::Value>,
        /// The whole new selector (repeatable); see --clear-selector to remove it
        #[arg(long = "selector", value_name = "KEY=VALUE", value_parser = parse_pair)]
        selector: Vec<(String, String)>,
        /// Replace the selector with none (any executor may run it)
        #[arg(long, conflicts_with = "selector")]
        clear_selector: bool,
    },
    /// Delete a changefeed and everything stored for it
    Delete { id: String },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    connect: ConnectArgs,
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
            ClientCommand::Executors(args) => executors(args).await,
            ClientCommand::Changefeed(args) => changefeed(args).await,
            ClientCommand::Status(args) => status(args).await,
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

async fn executors(args: ExecutorsArgs) -> CliResult {
    let connect = &args.connect;
    let client = connect.client()?;
    match args.command {
        ExecutorsCommand::List { status, labels } => {
            let filter = ExecutorFilter {
                status,
                labels: labels.into_iter().collect(),
            };
            let list = client.list_executors(&filter).await?;
            connect.print(&list, |list| executor_table(&list.items));
        }
        ExecutorsCommand::Get { id } => {
            let executor = client.get_executor(&id).await?;
            connect.print(&executor, executor_fields);
        }
        ExecutorsCommand::Deregister { id, token } => {
            client.deregister(&id, token.as_deref()).await?;
            if connect.output == Output::Table {
                println!("executor {id} deregistered");
            }
        }
        ExecutorsCommand::Watch => watch(connect, &client).await?,
    }
    Ok(())
}

/// Prints every event as it comes. A `resync` (this watcher fell behind) opens a new
/// watch, which starts with a fresh snapshot; the server ending the stream is an error.
async fn watch(connect: &ConnectArgs, client: &Client) -> CliResult {
    use std::io::Write as _;
    loop {
        let mut events = client.watch_executors().await?;
        let mut resync = false;
        while let Some(event) = events.next().await {
            let event = event?;
            match connect.output {
                Output::Json => println!("{}", watch_json(&event)),
                Output::Table => print!("{}", watch_line(&event)),
            }
            // Someone may read this through a pipe as it happens.
            let _ = std::io::stdout().flush();
            resync = matches!(event, WatchEvent::Resync { .. });
        }
        if !resync {
            return Err(Failure::Unavailable(format!(
                "the server at {} ended the watch",
                client.server()
            )));
        }
    }
}

fn watch_json(event: &WatchEvent) -> serde_json::Value {
    match event {
        WatchEvent::Snapshot { seq, executors } => {
            serde_json::json!({"event": "snapshot", "seq": seq, "executors": executors})
        }
        WatchEvent::Online { seq, executor } => {
            serde_json::json!({"event": "online", "seq": seq, "executor": executor})
        }
        WatchEvent::Offline { seq, id, reason } => {
            serde_json::json!({"event": "offline", "seq": seq, "id": id, "reason": reason})
        }
        WatchEvent::Resync { reason } => serde_json::json!({"event": "resync", "reason": reason}),
    }
}

fn watch_line(event: &WatchEvent) -> String {
    match event {
        WatchEvent::Snapshot { seq, executors } => {
            let mut out = format!("snapshot at seq {seq}: {} executors\n", executors.len());
            if !executors.is_empty() {
                out.push_str(&executor_table(executors));
            }
            out
        }
        WatchEvent::Online { seq, executor } => format!(
            "[{seq}] online   {} {} {}\n",
            executor.id,
            executor.address,
            table::labels(&executor.labels)
        ),
        WatchEvent::Offline { seq, id, reason } => format!("[{seq}] offline  {id} ({reason})\n"),
        WatchEvent::Resync { reason } => format!("resync: {reason}\n"),
    }
}

fn executor_table(executors: &[Executor]) -> String {
    let rows: Vec<Vec<String>> = executors
        .iter()
        .map(|e| {
            vec![
                e.id.clone(),
                e.status.clone(),
                e.address.clone(),
                e.last_heartbeat_ms_ago.map_or("-".into(), table::millis),
                table::millis(e.ttl_ms),
                table::labels(&e.labels),
            ]
        })
        .collect();
    table::render(
        &["ID", "STATUS", "ADDRESS", "HEARTBEAT", "TTL", "LABELS"],
        &rows,
    )
}

fn executor_fields(e: &Executor) -> String {
    let mut pairs = vec![
        ("id", e.id.clone()),
        ("name", e.name.clone()),
        ("address", e.address.clone()),
        ("status", e.status.clone()),
        ("labels", table::labels(&e.labels)),
        ("registered_at", e.registered_at.clone()),
        (
            "last_heartbeat",
            e.last_heartbeat_ms_ago
                .map_or("never".into(), |ms| format!("{} ago", table::millis(ms))),
        ),
        ("ttl", table::millis(e.ttl_ms)),
    ];
    if let Some(changefeeds) = &e.changefeeds {
        pairs.push(("changefeeds", changefeeds.join(",")));
    }
    table::fields(&pairs)
}

async fn changefeed(args: ChangefeedArgs) -> CliResult {
    let connect = &args.connect;
    let client = connect.client()?;
    let ns = args.namespace.as_str();
    match args.command {
        ChangefeedCommand::Create {
            id,
            sink_uri,
            start_ts,
            target_ts,
            config,
            selector,
        } => {
            let request = CreateChangefeed {
                id,
                sink_uri,
                start_ts,
                target_ts,
                config,
                selector: (!selector.is_empty()).then(|| selector.into_iter().collect()),
            };
            let feed = client.create_changefeed(ns, &request).await?;
            connect.print(&feed, changefeed_fields);
        }
        ChangefeedCommand::List { state } => {
            let list = client.list_changefeeds(ns, state.as_deref()).await?;
            connect.print(&list, |list| {
                let mut out = changefeed_table(&list.items);
                for bad in &list.unreadable {
                    out.push_str(&format!(
                        "unreadable: {} ({}): {}\n",
                        bad.id, bad.key, bad.message
                    ));
                }
                out
            });
        }
        ChangefeedCommand::Get { id } => {
            let feed = client.get_changefeed(ns, &id).await?;
            connect.print(&feed, changefeed_fields);
        }
        ChangefeedCommand::Pause { id } => {
            let feed = client.pause_changefeed(ns, &id).await?;
            connect.print(&feed, changefeed_fields);
        }
        ChangefeedCommand::Resume { id, checkpoint_ts } => {
            let feed = client.resume_changefeed(ns, &id, checkpoint_ts).await?;
            connect.print(&feed, changefeed_fields);
        }
        ChangefeedCommand::Update {
            id,
            sink_uri,
            config,
            selector,
            clear_selector,
        } => {
            let selector: Option<BTreeMap<String, String>> = if clear_selector {
                Some(BTreeMap::new())
            } else {
                (!selector.is_empty()).then(|| selector.into_iter().collect())
            };
            if sink_uri.is_none() && config.is_none() && selector.is_none() {
                return Err(Failure::Usage(
                    "nothing to update: give --sink-uri, --config, --selector or --clear-selector"
                        .into(),
                ));
            }
            let request = UpdateChangefeed {
                sink_uri,
                config,
                selector,
            };
            let feed = client.update_changefeed(ns, &id, &request).await?;
            connect.print(&feed, changefeed_fields);
        }
        ChangefeedCommand::Delete { id } => {
            client.delete_changefeed(ns, &id).await?;
            if connect.output == Output::Table {
                println!("changefeed {ns}/{id} deleted");
            }
        }
    }
    Ok(())
}

fn changefeed_table(feeds: &[Changefeed]) -> String {
    let rows: Vec<Vec<String>> = feeds
        .iter()
        .map(|f| {
            vec![
                f.id.clone(),
                f.state.clone(),
                table::or_dash(f.executor.as_deref()),
                f.epoch.to_string(),
                f.checkpoint_ts.to_string(),
                table::lag(f.checkpoint_ts),
                f.sink_uri.clone(),
                table::or_dash(f.error.as_deref().or(f.pending_reason.as_deref())),
            ]
        })
        .collect();
    table::render(
        &[
            "ID",
            "STATE",
            "EXECUTOR",
            "EPOCH",
            "CHECKPOINT",
            "LAG",
            "SINK",
            "NOTE",
        ],
        &rows,
    )
}

fn changefeed_fields(f: &Changefeed) -> String {
    let target = if f.target_ts == 0 {
        "none (runs forever)".to_owned()
    } else {
        f.target_ts.to_string()
    };
    table::fields(&[
        ("namespace", f.namespace.clone()),
        ("id", f.id.clone()),
        ("state", f.state.clone()),
        ("sink_uri", f.sink_uri.clone()),
        ("executor", table::or_dash(f.executor.as_deref())),
        ("epoch", f.epoch.to_string()),
        (
            "checkpoint_ts",
            format!("{} (lag {})", f.checkpoint_ts, table::lag(f.checkpoint_ts)),
        ),
        ("start_ts", f.start_ts.to_string()),
        ("target_ts", target),
        ("selector", table::labels(&f.selector)),
        ("config", f.config.to_string()),
        ("error", table::or_dash(f.error.as_deref())),
        ("pending", table::or_dash(f.pending_reason.as_deref())),
        ("created", f.create_time.clone()),
    ])
}

async fn status(args: StatusArgs) -> CliResult {
    let connect = &args.connect;
    let status = connect.client()?.status().await?;
    connect.print(&status, |s| {
        let health = |healthy: bool, error: &Option<String>| match (healthy, error) {
            (true, _) => "healthy".to_owned(),
            (false, Some(e)) => format!("UNHEALTHY: {e}"),
            (false, None) => "UNHEALTHY".to_owned(),
        };
        let mut pairs = vec![
            ("id", s.id.clone()),
            ("version", s.version.clone()),
            ("cluster", s.cluster_id.clone()),
            ("address", s.advertise_addr.clone()),
            (
                "leader",
                match s.election.as_ref().and_then(|e| e.leader.as_ref()) {
                    Some(l) if s.election.as_ref().is_some_and(|e| e.is_leader) => {
                        format!("this server ({})", l.advertise_addr)
                    }
                    Some(l) => format!("{} ({})", l.server_id, l.advertise_addr),
                    None => "-".to_owned(),
                },
            ),
            (
                "etcd",
                format!(
                    "{} ({})",
                    health(s.etcd.healthy, &s.etcd.error),
                    s.etcd.endpoints.join(",")
                ),
            ),
        ];
        if let Some(store) = &s.store {
            pairs.push(("store", health(store.healthy, &store.error)));
        }
        if let Some(c) = &s.executors {
            pairs.push((
                "executors",
                format!(
                    "{} running, {} initing, {} tombstone{}{}",
                    c.running,
                    c.initing,
                    c.tombstone,
                    if c.loaded { "" } else { " (not loaded yet)" },
                    if c.mass_silence {
                        " (MASS SILENCE)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        table::fields(&pairs)
    });
    Ok(())
}

fn parse_pair(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{value:?} is not KEY=VALUE")),
    }
}

fn parse_json_object(value: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str::<serde_json::Value>(value) {
        Ok(object @ serde_json::Value::Object(_)) => Ok(object),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}
