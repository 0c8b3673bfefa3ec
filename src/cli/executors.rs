//! `flotilla executors`: list, show, watch and deregister executors, and the table and
//! fields executors are shown as.

use clap::{Args, Subcommand};
use flotilla::client::{Executor, ExecutorFilter};

use super::{parse_pair, table, watch, CliResult, ConnectArgs, Output};

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

pub(super) async fn run(args: ExecutorsArgs) -> CliResult {
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
        ExecutorsCommand::Watch => watch::run(connect, &client).await?,
    }
    Ok(())
}

pub(super) fn executor_table(executors: &[Executor]) -> String {
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
