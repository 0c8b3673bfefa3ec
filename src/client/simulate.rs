//! [`simulate`]: the fake workload of `flotilla agent --simulate`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

use super::agent::{AgentView, ProgressReporter};
use super::Progress;

/// How often an idle simulation looks at its assignments.
const IDLE_STEP: Duration = Duration::from_millis(200);

/// A fake workload: every `step`, each assigned changefeed's checkpoint moves to where
/// it was assigned from plus the wall-clock time since (as a TiDB-style timestamp
/// delta, milliseconds `<< 18`), and is reported. An assignment that left the view is
/// stopped at the next step (logged `simulation: stopped`) and only then confirmed to
/// the agent ([`ProgressReporter::stopped`]), so the server moves it only after the
/// loop let go. Runs until the agent is gone or the future is dropped.
/// Takes [`AgentHandle::subscribe`] and [`AgentHandle::reporter`]. A zero `step`:
/// checkpoints never advance and nothing is reported (an idle fleet that only
/// heartbeats).
pub async fn simulate(
    view: watch::Receiver<AgentView>,
    reporter: ProgressReporter,
    step: Duration,
) {
    // Where each (namespace, changefeed) was assigned from, at which epoch, and when.
    let mut running: HashMap<(String, String), (u64, u64, Instant)> = HashMap::new();
    // `0s`: an idle fleet; the assignments are still followed (and logged).
    let idle = step.is_zero();
    let mut ticker = tokio::time::interval(if idle { IDLE_STEP } else { step });
    loop {
        ticker.tick().await;
        if view.has_changed().is_err() {
            // The agent is gone.
            return;
        }
        let view = view.borrow().clone();
        let assigned: HashSet<(&str, &str, u64)> = view
            .assignments
            .iter()
            .map(|a| (a.namespace.as_str(), a.changefeed.as_str(), a.epoch))
            .collect();
        running.retain(|(ns, cf), (epoch, _, _)| {
            let kept = assigned.contains(&(ns.as_str(), cf.as_str(), *epoch));
            if !kept {
                info!(
                    namespace = ns,
                    changefeed = cf,
                    epoch,
                    "simulation: stopped"
                );
                reporter.stopped(ns, cf, *epoch);
            }
            kept
        });
        for a in &view.assignments {
            let key = (a.namespace.clone(), a.changefeed.clone());
            let (epoch, from, since) = *running.entry(key).or_insert_with(|| {
                info!(
                    namespace = a.namespace,
                    changefeed = a.changefeed,
                    epoch = a.epoch,
                    checkpoint_ts = a.checkpoint_ts,
                    "simulation: started"
                );
                (a.epoch, a.checkpoint_ts, Instant::now())
            });
            if idle {
                continue;
            }
            let elapsed_ms = since.elapsed().as_millis() as u64;
            reporter.report(Progress {
                namespace: a.namespace.clone(),
                changefeed: a.changefeed.clone(),
                epoch,
                checkpoint_ts: from.saturating_add(elapsed_ms << 18),
                resolved_ts: None,
                error: None,
            });
        }
    }
}
