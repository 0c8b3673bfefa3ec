//! Starting and stopping an orchestrator worker: three actors wired together.
//!
//! ```text
//! EtcdWatcher --WatchEvents/Resync--> ReactorTicker --Commit--> TxnCommitter
//!                                          ^------ CommitOutcome -----+
//! ```
//! The caller gets a [`WorkerHandle`]: stop the worker, or wait for it to end.

use std::time::Duration;

use actix::prelude::*;
use etcd_client::Client;
use rand::Rng;
use tokio::sync::oneshot;

use super::etcd_watcher::{EtcdWatcher, WatchSink};
use super::ticker::{Activate, GetWorkerStats, ReactorTicker, StopWorker, WorkerStats};
use super::txn_committer::TxnCommitter;
use crate::state::{plan, Reactor, TxnLimits};

/// A key whose create_revision every txn of the worker must match: the
/// leader's election key. A deposed leader's txns fail on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub create_revision: i64,
}

/// How a worker runs. [`WorkerConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Every key the worker reads or writes starts with this.
    pub prefix: String,
    /// At most one tick per interval; events in between are batched. The
    /// reactor is also ticked once per interval when nothing happens.
    pub tick_interval: Duration,
    /// etcd's `--max-txn-ops` (128 by default).
    pub max_txn_ops: usize,
    /// Upper bound of one txn's request size (etcd allows 1.5 MiB).
    pub max_txn_bytes: usize,
    /// Optional fencing on a leader key.
    pub fence: Option<Fence>,
    /// Deadline of one etcd request (txn, one page of a range read, progress
    /// request).
    pub request_timeout: Duration,
    /// At most this many keys per page of the prefix's list; 0: the whole
    /// prefix in one range (pages only if it exceeds `max_response_bytes`).
    pub list_page_keys: i64,
    /// Pages shrink to stay near this many bytes of keys and values.
    pub list_page_bytes: usize,
    /// The largest etcd answer (a page, a watch response) the worker's
    /// client decodes; tonic's default is 4 MiB.
    pub max_response_bytes: usize,
    /// Ask etcd for watch progress after this much quiet.
    pub progress_interval: Duration,
    /// Re-create a watch that stayed silent this long despite progress
    /// requests.
    pub silence_timeout: Duration,
    /// First and largest delay of the jittered exponential backoff used for
    /// retryable etcd errors.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A tick or txn slower than this is logged as a warning.
    pub slow_threshold: Duration,
}

impl WorkerConfig {
    /// Defaults matching etcd's own limits.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            tick_interval: Duration::from_millis(100),
            max_txn_ops: crate::etcd_server::ETCD_DEFAULT_MAX_TXN_OPS,
            max_txn_bytes: 1_310_720,
            fence: None,
            request_timeout: Duration::from_secs(5),
            list_page_keys: 0,
            list_page_bytes: 2 << 20,
            max_response_bytes: 256 << 20,
            progress_interval: Duration::from_secs(1),
            silence_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            slow_threshold: Duration::from_secs(1),
        }
    }

    pub(crate) fn txn_limits(&self) -> TxnLimits {
        TxnLimits {
            max_ops: self.max_txn_ops,
            max_bytes: self.max_txn_bytes,
            extra_compares: usize::from(self.fence.is_some()),
        }
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff {
            base: self.backoff_base,
            max: self.backoff_max,
        }
    }
}

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reactor queued patches that can never be committed.
    #[error(transparent)]
    Plan(#[from] plan::Error),
    /// The reactor's tick failed.
    #[error("reactor failed: {0}")]
    Reactor(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// etcd answered with an error that retrying cannot fix.
    #[error("etcd {operation} failed: {source}")]
    Etcd {
        operation: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    /// The fence key is gone or was re-created: this node is no longer the
    /// leader and must not write.
    #[error("fence lost: {key} no longer has create_revision {create_revision}")]
    FenceLost { key: String, create_revision: i64 },
    /// etcd's revision went back below what the worker had applied: the
    /// cluster was wiped or restored from a backup. A new worker reads the
    /// prefix afresh.
    #[error(
        "etcd's history went back: a snapshot at revision {snapshot} after revision {applied} \
         was applied (was the etcd cluster wiped or restored?)"
    )]
    HistoryReset { snapshot: i64, applied: i64 },
    /// More watch events arrived during one commit than the worker holds
    /// (`MAX_QUEUED_EVENTS`): a new worker reads the prefix afresh.
    #[error("{queued} watch events queued during one commit: the worker fell behind")]
    FellBehind { queued: usize },
    /// An actor of the worker vanished without reporting (a bug, or the
    /// actix system shut down underneath it).
    #[error("worker actor stopped unexpectedly")]
    Gone,
}

/// Jittered exponential backoff: attempt n waits a random delay between half
/// and all of `min(max, base * 2^n)`, so that workers hit by the same outage
/// do not retry in lockstep.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        ceiling.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

/// A running worker.
pub struct WorkerHandle {
    stop: Recipient<StopWorker>,
    activate: Recipient<Activate>,
    stats: Recipient<GetWorkerStats>,
    done: oneshot::Receiver<Result<(), Error>>,
}

impl WorkerHandle {
    /// Asks the worker to stop after its in-flight commit, if any.
    pub fn stop(&self) {
        self.stop.do_send(StopWorker);
    }

    /// Makes a worker started by [`start_standby`] active: its reactor ticks
    /// from now on, once its state reached `barrier`, every txn fenced on
    /// `fence` (see [`Activate`]).
    pub fn activate(&self, fence: Option<Fence>, barrier: i64) {
        self.activate.do_send(Activate { fence, barrier });
    }

    /// A recipient that activates the worker, for callers that keep the
    /// handle elsewhere (see [`Self::activate`]).
    pub fn activator(&self) -> Recipient<Activate> {
        self.activate.clone()
    }

    /// The worker's counters, `None` once it has stopped.
    pub async fn stats(&self) -> Option<WorkerStats> {
        self.stats.send(GetWorkerStats).await.ok()
    }

    /// Waits until the worker ends: `Ok` after the reactor finished or after
    /// [`WorkerHandle::stop`], the error otherwise.
    pub async fn wait(self) -> Result<(), Error> {
        self.done.await.unwrap_or(Err(Error::Gone))
    }

    /// A recipient that stops the worker, for callers that keep the handle
    /// elsewhere.
    pub fn stopper(&self) -> Recipient<StopWorker> {
        self.stop.clone()
    }
}

/// Starts a worker on the current actix arbiter.
///
/// `client` must have been created on this arbiter's runtime (an etcd client
/// dies with the runtime that made it). The reactor is first ticked once the
/// whole prefix has been read.
pub fn start<R>(client: Client, reactor: R, state: R::State, config: WorkerConfig) -> WorkerHandle
where
    R: Reactor + 'static,
    R::State: 'static,
{
    spawn(client, reactor, state, config, true)
}

/// Starts a worker that stands by: it reads the prefix and follows it, so its
/// state stays current, but its reactor does not tick and it writes nothing
/// until [`WorkerHandle::activate`] (a follower's hot standby: a new leader
/// starts from memory instead of reading the prefix from cold).
pub fn start_standby<R>(
    client: Client,
    reactor: R,
    state: R::State,
    config: WorkerConfig,
) -> WorkerHandle
where
    R: Reactor + 'static,
    R::State: 'static,
{
    spawn(client, reactor, state, config, false)
}

fn spawn<R>(
    client: Client,
    reactor: R,
    state: R::State,
    config: WorkerConfig,
    active: bool,
) -> WorkerHandle
where
    R: Reactor + 'static,
    R::State: 'static,
{
    let (done_tx, done_rx) = oneshot::channel();
    let committer = TxnCommitter::new(client.clone(), &config).start();
    let ticker = ReactorTicker::create(move |ctx| {
        let me = ctx.address();
        let sink = WatchSink {
            events: me.clone().recipient(),
            resync: me.clone().recipient(),
            progress: me.clone().recipient(),
            rewatched: me.clone().recipient(),
            failed: me.recipient(),
        };
        let watcher = EtcdWatcher::new(client, &config, sink).start();
        ReactorTicker::new(reactor, state, config, active, watcher, committer, done_tx)
    });
    WorkerHandle {
        stop: ticker.clone().recipient(),
        activate: ticker.clone().recipient(),
        stats: ticker.recipient(),
        done: done_rx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for _ in 0..100 {
            let d0 = b.delay(0);
            assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100));
            let d10 = b.delay(10);
            assert!(d10 >= Duration::from_millis(500) && d10 <= Duration::from_secs(1));
            assert!(b.delay(u32::MAX) <= Duration::from_secs(1));
        }
    }
}
