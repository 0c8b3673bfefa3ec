//! `flotilla agent`: a thin wrapper over `flotilla::client::Agent`. It logs every
//! change of its assignments; with `--simulate` it also runs the fake workload that
//! advances their checkpoints, and `--count N` runs N such executors in this one
//! process (for load tests: it logs their totals every second instead of every
//! change). SIGINT or SIGTERM deregisters and exits.

use std::time::Duration;

use clap::Args;
use flotilla::client::{self, Agent, AgentConfig, AgentView};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use super::{parse_pair, ConnectArgs, Failure};

pub const AFTER_HELP: &str = "\
The agent registers, heartbeats on the server's interval (with jitter), registers again
when the server has forgotten it (404/410), and backs off with jitter while the server
cannot be reached. It holds its assignments only while its lease is valid: the send time
of its last acknowledged heartbeat + the TTL granted - the lease margin; when that passes
without an answer it stops them all (logged at warn) and resumes from the next answer.
The server expires it no earlier than a TTL after it received that heartbeat, so the
agent has stopped before its work can move. On SIGINT or SIGTERM it deregisters and exits.

Exit codes:
  0  stopped by a signal and deregistered
  1  the server refused the registration (bad name, address or label)
  2  usage error
  3  stopped by a signal, but the deregistration got no usable answer (the executor
     expires after its TTL instead)";

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Executor name (the id is <name>-<8 hex digits>)
    #[arg(long, env = "FLOTILLA_AGENT_NAME", default_value = "agent")]
    name: String,
    /// Address the executor announces
    #[arg(long, env = "FLOTILLA_AGENT_ADDRESS", default_value = "127.0.0.1")]
    address: String,
    /// An executor label (repeatable); changefeed selectors match these
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_pair)]
    labels: Vec<(String, String)>,
    /// TTL to ask for, such as 10s [default: the server's]
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    ttl: Option<Duration>,
    /// How long before its TTL runs out, counted from the send time of its last
    /// acknowledged heartbeat, the agent stops every assignment [default: 10% of the
    /// TTL, at least 500ms; at most half the TTL]
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    lease_margin: Option<Duration>,
    /// Run a fake workload: each assigned changefeed's checkpoint advances with the
    /// wall clock and is reported in heartbeats
    #[arg(long)]
    simulate: bool,
    /// How often the simulation advances checkpoints (0s: never, nothing is
    /// reported: an idle fleet that only heartbeats)
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration, value_name = "DURATION")]
    simulate_step: Duration,
    /// With --simulate: run this many executors (named <name>0, <name>1, ...) in this
    /// process, logging their totals every second
    #[arg(long, default_value_t = 1, requires = "simulate", value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// Log filter (RUST_LOG syntax), on stderr
    #[arg(
        long,
        env = "FLOTILLA_AGENT_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    log_level: String,
}

pub async fn run(args: AgentArgs) -> Result<(), Failure> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .map_err(|e| Failure::Usage(format!("--log-level {:?}: {e}", args.log_level)))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let client = args.connect.client()?;
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|e| Failure::Unavailable(format!("cannot install a SIGINT handler: {e}")))?;
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|e| Failure::Unavailable(format!("cannot install a SIGTERM handler: {e}")))?;

    let config = AgentConfig {
        labels: args.labels.into_iter().collect(),
        ttl: args.ttl,
        lease_margin: args.lease_margin,
        // Without a workload of its own (it only logs), a stop is immediate.
        confirm_stops: args.simulate,
        ..AgentConfig::new(args.name.clone(), args.address.clone())
    };
    if args.count > 1 {
        return run_fleet(
            client,
            config,
            args.count,
            args.simulate_step,
            &mut interrupt,
            &mut terminate,
        )
        .await;
    }
    info!(
        server = client.server(),
        simulate = args.simulate,
        "agent starting"
    );
    let mut handle = Agent::spawn(client, config);
    let mut view = handle.subscribe();
    if args.simulate {
        // Its own task: it must go on confirming stops while `stop` waits for them.
        tokio::spawn(client::simulate(
            handle.subscribe(),
            handle.reporter(),
            args.simulate_step,
        ));
    }
    let mut shown = AgentView::default();
    let signal = loop {
        tokio::select! {
            _ = interrupt.recv() => break "SIGINT",
            _ = terminate.recv() => break "SIGTERM",
            changed = view.changed() => {
                if changed.is_err() {
                    break "";
                }
                let now = view.borrow_and_update().clone();
                log_changes(&shown, &now);
                shown = now;
            }
        }
    };
    if signal.is_empty() {
        // The task ended by itself: a refused registration.
        return handle.join().await.map_err(Failure::from);
    }
    info!(signal, "stopping: deregistering");
    handle.stop().await.map_err(|e| {
        if e.is_client_error() {
            Failure::Refused(format!("deregistration: {e}"))
        } else {
            Failure::Unavailable(format!("deregistration: {e}"))
        }
    })?;
    info!("agent stopped");
    Ok(())
}

/// `--simulate --count N`: N simulated executors, their totals logged every second.
async fn run_fleet(
    client: flotilla::client::Client,
    config: AgentConfig,
    count: u32,
    step: Duration,
    interrupt: &mut tokio::signal::unix::Signal,
    terminate: &mut tokio::signal::unix::Signal,
) -> Result<(), Failure> {
    info!(server = client.server(), count, "simulated fleet starting");
    let mut handles = Vec::with_capacity(count as usize);
    for i in 0..count {
        let config = AgentConfig {
            name: format!("{}{i}", config.name),
            ..config.clone()
        };
        let handle = Agent::spawn(client.clone(), config);
        let (view, reporter) = (handle.subscribe(), handle.reporter());
        tokio::spawn(client::simulate(view, reporter, step));
        handles.push(handle);
    }
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let signal = loop {
        tokio::select! {
            _ = interrupt.recv() => break "SIGINT",
            _ = terminate.recv() => break "SIGTERM",
            _ = every.tick() => {
                let (mut registered, mut assignments, mut lapses, mut heartbeats) = (0, 0, 0, 0);
                for handle in &handles {
                    let view = handle.subscribe();
                    let view = view.borrow();
                    registered += usize::from(view.executor_id.is_some());
                    assignments += view.assignments.len();
                    lapses += view.lease_lapses;
                    heartbeats += view.heartbeats;
                }
                info!(agents = count, registered, assignments, heartbeats, lease_lapses = lapses, "fleet");
            }
        }
    };
    info!(signal, "stopping: deregistering every executor");
    let results = futures::future::join_all(handles.into_iter().map(|h| h.stop())).await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    if failed > 0 {
        return Err(Failure::Unavailable(format!(
            "{failed} of {count} deregistrations got no usable answer"
        )));
    }
    info!("simulated fleet stopped");
    Ok(())
}

fn log_changes(before: &AgentView, now: &AgentView) {
    for a in &now.assignments {
        if !before.assignments.iter().any(|b| {
            b.namespace == a.namespace && b.changefeed == a.changefeed && b.epoch == a.epoch
        }) {
            info!(
                namespace = a.namespace,
                changefeed = a.changefeed,
                epoch = a.epoch,
                sink_uri = a.sink_uri,
                checkpoint_ts = a.checkpoint_ts,
                "assigned"
            );
        }
    }
    for b in &before.assignments {
        if !now.assignments.iter().any(|a| {
            a.namespace == b.namespace && a.changefeed == b.changefeed && a.epoch == b.epoch
        }) {
            info!(
                namespace = b.namespace,
                changefeed = b.changefeed,
                epoch = b.epoch,
                "unassigned"
            );
        }
    }
}
