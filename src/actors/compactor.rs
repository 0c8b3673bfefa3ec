//! `Compactor`: the leader keeps etcd's key history small, as kube-apiserver does with
//! `--etcd-compaction-interval`.
//!
//! Every `interval` it reads etcd's current revision and compacts the history to the
//! revision it read at its previous run, one interval earlier: a watcher less than an
//! interval behind never finds its next revision compacted away, and every write of
//! the last interval stays readable. It runs on the leader only (started and stopped
//! with the other leader roles) and on any etcd, embedded or external; an interval of
//! zero turns it off for operators who compact etcd themselves.
//!
//! A failed run is logged and counted, never fatal: the next run tries again. A
//! compaction to a revision that is already compacted (another compactor, an
//! operator, etcd's own auto-compaction) counts as `already_compacted`, not as an error.

use std::time::Duration;

use actix::prelude::*;
use etcd_client::{Client, GetOptions};
use tracing::{debug, info, warn};

/// `etcd.compaction_interval`'s default (kube-apiserver's too).
pub const DEFAULT_COMPACTION_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// etcd's answer to a compaction at or below its compacted revision.
const ALREADY_COMPACTED: &str = "required revision has been compacted";

/// How the compactor runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactorConfig {
    /// Time between runs; each run compacts to the revision read at the previous
    /// one. Zero: never compact.
    pub interval: Duration,
    /// Bound of each etcd request (the leader's client has none of its own).
    pub request_timeout: Duration,
}

impl Default for CompactorConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_COMPACTION_INTERVAL,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a run compacted nothing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading etcd's current revision failed.
    #[error("cannot read etcd's current revision: {0}")]
    Revision(#[source] etcd_client::Error),
    /// The compaction request failed.
    #[error("cannot compact etcd to revision {revision}: {source}")]
    Compact {
        revision: i64,
        #[source]
        source: etcd_client::Error,
    },
    /// etcd did not answer within the request timeout.
    #[error("etcd did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What one run did, also the `outcome` label of `flotilla_etcd_compactions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The history up to `revision` was compacted.
    Compacted { revision: i64 },
    /// Someone had already compacted at least that far.
    AlreadyCompacted,
    /// The run failed; the next one tries again.
    Failed,
}

impl Outcome {
    pub const LABELS: [&'static str; 3] = ["compacted", "already_compacted", "failed"];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Compacted { .. } => "compacted",
            Outcome::AlreadyCompacted => "already_compacted",
            Outcome::Failed => "failed",
        }
    }
}

/// Stops the compactor (a run in flight is let finish; no new one starts).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct StopCompactor;

pub struct Compactor {
    client: Client,
    config: CompactorConfig,
    /// The revision read at the previous run: the next run compacts to it.
    previous: Option<i64>,
    /// A run is in flight (a slow etcd must not pile runs up).
    running: bool,
}

impl Compactor {
    pub fn new(client: Client, config: CompactorConfig) -> Self {
        Self {
            client,
            config,
            previous: None,
            running: false,
        }
    }

    fn run(&mut self, ctx: &mut Context<Self>) {
        if self.running {
            debug!("etcd compaction still running; skipping this interval");
            return;
        }
        self.running = true;
        let client = self.client.clone();
        let previous = self.previous;
        let timeout = self.config.request_timeout;
        // `ctx.spawn` (not an `AtomicResponse`): the actor stays free to stop meanwhile.
        ctx.spawn(
            compact_once(client, previous, timeout)
                .into_actor(self)
                .map(|(current, outcome), act, _| {
                    act.running = false;
                    if let Some(current) = current {
                        act.previous = Some(current);
                    }
                    if let Some(outcome) = outcome {
                        crate::metrics::etcd()
                            .compactions_total
                            .with_label_values(&[outcome.as_str()])
                            .inc();
                        if let Outcome::Compacted { revision } = outcome {
                            crate::metrics::etcd().compacted_revision.set(revision);
                        }
                    }
                }),
        );
    }
}

/// One run: reads the current revision, then compacts to `previous`. Returns the
/// revision read (the next run's target; `None` if it could not be read) and what
/// happened (`None` on the first run, which only reads).
async fn compact_once(
    mut client: Client,
    previous: Option<i64>,
    timeout: Duration,
) -> (Option<i64>, Option<Outcome>) {
    let current = match current_revision(&mut client, timeout).await {
        Ok(revision) => revision,
        Err(e) => {
            warn!(error = %e, "etcd compaction skipped; trying again next interval");
            return (None, Some(Outcome::Failed));
        }
    };
    let Some(target) = previous else {
        return (Some(current), None);
    };
    // History that went back (etcd restored or wiped): compact nothing this time.
    if target > current {
        warn!(
            target,
            current, "etcd's revision went back; compacting from the next interval on"
        );
        return (Some(current), Some(Outcome::Failed));
    }
    let outcome = match compact(&mut client, target, timeout).await {
        Ok(()) => {
            info!(revision = target, "compacted etcd's history");
            Outcome::Compacted { revision: target }
        }
        Err(Error::Compact { source, .. }) if source.to_string().contains(ALREADY_COMPACTED) => {
            debug!(
                revision = target,
                "etcd's history was already compacted that far"
            );
            Outcome::AlreadyCompacted
        }
        Err(e) => {
            warn!(error = %e, "etcd compaction failed; trying again next interval");
            Outcome::Failed
        }
    };
    (Some(current), Some(outcome))
}

async fn current_revision(client: &mut Client, timeout: Duration) -> Result<i64> {
    // Any key serves: the header carries the store's revision. Count only, so no
    // value travels.
    let response = tokio::time::timeout(
        timeout,
        client.get("/", Some(GetOptions::new().with_count_only())),
    )
    .await
    .map_err(|_| Error::Timeout(timeout))?
    .map_err(Error::Revision)?;
    Ok(response.header().map_or(0, |h| h.revision()))
}

async fn compact(client: &mut Client, revision: i64, timeout: Duration) -> Result<()> {
    // Not physical: etcd answers once the compaction is applied to its index and
    // frees the space in the background; old revisions are unreadable at once.
    tokio::time::timeout(timeout, client.compact(revision, None))
        .await
        .map_err(|_| Error::Timeout(timeout))?
        .map_err(|source| Error::Compact { revision, source })?;
    Ok(())
}

impl Actor for Compactor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.config.interval.is_zero() {
            info!("etcd compaction is off (etcd.compaction_interval = 0)");
            return;
        }
        info!(
            interval = %humantime::format_duration(self.config.interval),
            "compacting etcd's history every interval, to the revision of one interval earlier"
        );
        // The first run only reads the revision the second one compacts to.
        self.run(ctx);
        ctx.run_interval(self.config.interval, |act, ctx| act.run(ctx));
    }
}

impl Handler<StopCompactor> for Compactor {
    type Result = ();

    fn handle(&mut self, _: StopCompactor, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
