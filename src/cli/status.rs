//! `flotilla status`: the server's status (version, leader, etcd and store health,
//! executor counts) as fields.

use clap::Args;

use super::{table, CliResult, ConnectArgs};

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

pub(super) async fn run(args: StatusArgs) -> CliResult {
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
