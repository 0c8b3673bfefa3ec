//! `flotilla changefeed`: create, list, show, pause, resume, update and delete
//! changefeeds, and the table and fields changefeeds are shown as.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use flotilla::client::{self, Changefeed, CreateChangefeed, UpdateChangefeed};

use super::{parse_pair, table, CliResult, ConnectArgs, Failure, Output};

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
    /// List changefeeds, a page at a time (the first page unless --all)
    List {
        /// Only changefeeds in this state
        #[arg(long, value_parser = ["normal", "stopped", "failed", "finished"])]
        state: Option<String>,
        /// Only changefeeds whose current assignment this executor holds
        #[arg(long, value_name = "ID")]
        executor: Option<String>,
        /// Changefeeds per page (server default 500, at most 5000)
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Every page, printed as it arrives
        #[arg(long)]
        all: bool,
        /// The page after the one that printed this token
        #[arg(long = "continue", value_name = "TOKEN")]
        continue_token: Option<String>,
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

pub(super) async fn run(args: ChangefeedArgs) -> CliResult {
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
        ChangefeedCommand::List {
            state,
            executor,
            limit,
            all,
            continue_token,
        } => {
            let mut query = client::ListChangefeeds {
                state,
                executor,
                limit,
                continue_token,
            };
            let mut shown = 0;
            loop {
                let page = client.list_changefeeds_page(ns, &query).await?;
                let first = shown == 0;
                shown += page.items.len();
                if all && connect.output == Output::Json {
                    // One JSON document per page, one per line.
                    println!(
                        "{}",
                        serde_json::to_string(&page).expect("API types serialize")
                    );
                } else {
                    connect.print(&page, |page| list_page(page, first, all, shown));
                }
                match page.continue_token {
                    Some(token) if all => query.continue_token = Some(token),
                    _ => break,
                }
            }
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

/// One page of `changefeed list` as a table: the header on the first page only;
/// without `--all`, a last line says how to get the next page.
fn list_page(page: &client::ChangefeedList, first: bool, all: bool, shown: usize) -> String {
    let mut out = changefeed_table(&page.items);
    if !first {
        out = out
            .split_once('\n')
            .map_or_else(String::new, |(_, rows)| rows.to_owned());
    }
    for bad in &page.unreadable {
        out.push_str(&format!(
            "unreadable: {} ({}): {}\n",
            bad.id, bad.key, bad.message
        ));
    }
    if let (Some(token), false) = (&page.continue_token, all) {
        out.push_str(&format!(
            "({shown} of {} shown; the next page: --continue {token}, or --all for every page)\n",
            page.total
        ));
    }
    out
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
        (
            "releasing",
            f.releasing.as_ref().map_or_else(
                || "-".to_owned(),
                |r| format!("{} epoch {} (by {})", r.executor, r.epoch, r.deadline),
            ),
        ),
        ("created", f.create_time.clone()),
    ])
}

fn parse_json_object(value: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str::<serde_json::Value>(value) {
        Ok(object @ serde_json::Value::Object(_)) => Ok(object),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}
