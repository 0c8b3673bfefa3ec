//! `flotilla executors watch`: follows the executor watch stream, opening a new one after
//! a `resync`, and prints each event as a line (or a JSON document).

use flotilla::client::{Client, WatchEvent};
use futures::StreamExt;

use super::executors::executor_table;
use super::{table, CliResult, ConnectArgs, Failure, Output};

/// Prints every event as it comes. A `resync` (this watcher fell behind) opens a new
/// watch, which starts with a fresh snapshot; the server ending the stream is an error.
pub(super) async fn run(connect: &ConnectArgs, client: &Client) -> CliResult {
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
