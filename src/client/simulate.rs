//! [`simulate`]: the fake workload of `flotilla agent --simulate`.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

use super::agent::{AgentView, ProgressReporter};
use super::Progress;

/// A fake workload: every `step`, each assigned changefeed's checkpoint moves to where
/// it was assigned from plus the wall-clock time since (as a TiDB-style timestamp
/// delta, milliseconds `<< 18`), and is reported. Runs until the future is dropped.
/// Takes [`AgentHandle::subscribe`] and [`AgentHandle::reporter`].
pub async fn simulate(
    view: watch::Receiver<AgentView>,
    reporter: ProgressReporter,
    step: Duration,
) {
    // Where each (namespace, changefeed) was assigned from, at which epoch, and when.
    let mut running: HashMap<(String, String), (u64, u64, Instant)> = HashMap::new();
    let mut ticker = tokio::time::interval(step);
    loop {
        ticker.tick().await;
        let view = view.borrow().clone();
        running.retain(|(ns, cf), (epoch, _, _)| {
            let kept = view
                .assignments
                .iter()
                .any(|a| &a.namespace == ns && &a.changefeed == cf && a.epoch == *epoch);
            if !kept {
                info!(namespace = ns, changefeed = cf, "simulation: stopped");
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
