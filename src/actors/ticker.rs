//! `ReactorTicker`: owns the raw key map and the typed state, applies what
//! the watcher sees, ticks the reactor and hands its patches to the
//! committer.
//!
//! Invariants it keeps:
//! - Updates are applied in revision order, never while a commit is in
//!   flight (they wait in a queue), and an event at or below the applied
//!   revision is dropped as stale.
//! - The reactor only ticks once the applied revision reaches the barrier:
//!   the revision of this worker's last committed txn (or the highest
//!   revision seen in a failed compare). So every tick sees a consistent
//!   snapshot that includes this worker's own writes.
//! - At most one tick per tick interval; events in between are batched into
//!   the next tick. With nothing happening the reactor still ticks once per
//!   interval.
//! - A standby worker (a follower's) keeps the snapshot current and never
//!   ticks nor writes until [`Activate`]d; its first tick then waits for the
//!   barrier the activation raises, so it sees every write of the leaders
//!   before it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::etcd_watcher::{
    EtcdWatcher, Resync, Rewatched, StopWatcher, WatchEvents, WatchProgress, WatcherFailed,
};
use super::txn_committer::{Commit, CommitOutcome, StopCommitter, TxnCommitter};
use super::worker::{self, Backoff, Fence, WorkerConfig};
use crate::metrics;
use crate::state::{
    self as state, plan_commit, reactor, CommitPlan, RawEntry, RawState, Reactor, ReactorState,
    TxnLimits,
};

/// Stops the worker once its in-flight commit, if any, has ended.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct StopWorker;

/// Makes a standby worker active: from now on its reactor ticks and every
/// txn it commits is fenced on `fence`, the first one once the state has
/// reached `barrier`: a revision of the prefix after every earlier leader's
/// last write (the election's [`crate::election::Leadership::Elected`]); one
/// outside the prefix would never be reached. Ignored by an active worker.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Activate {
    pub fence: Option<Fence>,
    pub barrier: i64,
}

/// Asks for the worker's counters.
#[derive(Message, Debug)]
#[rtype(result = "WorkerStats")]
pub struct GetWorkerStats;

/// What a worker has done since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerStats {
    pub ticks: u64,
    /// Plans fully committed.
    pub commits: u64,
    /// Plans that hit a failed compare.
    pub conflicts: u64,
    /// Plans dropped because etcd stayed unreachable.
    pub unavailable: u64,
    /// Snapshots applied, by reason (`initial`, `compacted`, `canceled`,
    /// `too_large`).
    pub resyncs: std::collections::BTreeMap<&'static str, u64>,
    /// Watches opened again from the next revision, by reason (`lost`,
    /// `silent`).
    pub rewatches: std::collections::BTreeMap<&'static str, u64>,
    /// The revision the reactor's state reflects.
    pub applied_revision: i64,
    pub barrier: i64,
    /// Keys under the prefix.
    pub keys: usize,
}

/// Most watch events held while a commit is in flight. A commit lasts at
/// most the request timeout, and its own echo is at most a plan's keys; more
/// than this means the worker cannot keep up, and a fresh read is cheaper
/// than the queue.
const MAX_QUEUED_EVENTS: usize = 1 << 20;

/// Watch input that arrived while a commit was in flight.
enum Incoming {
    Events(WatchEvents),
    Resync(Resync),
}

pub struct ReactorTicker<R: Reactor> {
    // Boxed so that the actor is Unpin whatever the reactor is.
    reactor: Box<R>,
    state: Box<R::State>,
    raw: RawState,
    prefix: String,
    limits: TxnLimits,
    /// Compared by every txn (see [`Commit::fence`]).
    fence: Option<Fence>,
    /// `false` while the worker stands by: it applies what it watches but
    /// does not tick.
    active: bool,
    tick_interval: Duration,
    slow_threshold: Duration,
    backoff: Backoff,
    watcher: Addr<EtcdWatcher>,
    committer: Addr<TxnCommitter>,
    done: Option<oneshot::Sender<Result<(), worker::Error>>>,
    /// The revision `raw` reflects; meaningful once `initialized`.
    applied_revision: i64,
    initialized: bool,
    /// The reactor ticks only when `applied_revision >= barrier`.
    barrier: i64,
    committing: bool,
    /// What the watcher delivered during a commit, applied once it ends. A
    /// resync supersedes everything queued before it; beyond
    /// [`MAX_QUEUED_EVENTS`] events the worker stops with
    /// [`worker::Error::FellBehind`] and its owner starts a fresh one.
    queued: VecDeque<Incoming>,
    queued_events: usize,
    /// The reactor returned `Finished`: stop once this tick's patches commit.
    finishing: bool,
    stopping: bool,
    last_tick: Option<Instant>,
    tick_timer: Option<SpawnHandle>,
    /// No tick before this instant (backing off after etcd was unavailable).
    not_before: Option<Instant>,
    unavailable_streak: u32,
    stats: WorkerStats,
}

impl<R: Reactor> ReactorTicker<R> {
    /// `active: false` starts it standing by (see [`Activate`]).
    pub fn new(
        reactor: R,
        state: R::State,
        config: WorkerConfig,
        active: bool,
        watcher: Addr<EtcdWatcher>,
        committer: Addr<TxnCommitter>,
        done: oneshot::Sender<Result<(), worker::Error>>,
    ) -> Self {
        Self {
            reactor: Box::new(reactor),
            state: Box::new(state),
            raw: RawState::new(),
            limits: config.txn_limits(),
            fence: config.fence.clone(),
            active,
            backoff: config.backoff(),
            prefix: config.prefix,
            tick_interval: config.tick_interval,
            slow_threshold: config.slow_threshold,
            watcher,
            committer,
            done: Some(done),
            applied_revision: 0,
            initialized: false,
            barrier: 0,
            committing: false,
            queued: VecDeque::new(),
            queued_events: 0,
            finishing: false,
            stopping: false,
            last_tick: None,
            tick_timer: None,
            not_before: None,
            unavailable_streak: 0,
            stats: WorkerStats::default(),
        }
    }
}

impl<R> ReactorTicker<R>
where
    R: Reactor + 'static,
    R::State: 'static,
{
    fn apply_events(&mut self, batch: WatchEvents) {
        // Every event of one revision arrives in one response: compare with
        // the revision applied before this response, not event by event.
        let floor = self.applied_revision;
        let mut newest = floor;
        for event in batch.events {
            if event.mod_revision <= floor {
                debug!(key = %event.key, revision = event.mod_revision, floor, "dropping a stale watch event");
                continue;
            }
            newest = newest.max(event.mod_revision);
            // The value moves into the raw map and the state reads it there:
            // no copy per event.
            let result = match event.value {
                Some(value) => {
                    let entry = self.raw.entry(event.key.clone()).insert_entry(RawEntry {
                        value,
                        mod_revision: event.mod_revision,
                    });
                    self.state
                        .update(&event.key, Some(&entry.get().value), false)
                }
                None => {
                    self.raw.remove(&event.key);
                    self.state.update(&event.key, None, false)
                }
            };
            skip_rejected(&event.key, result);
        }
        self.applied_revision = newest;
        self.observe_lag(batch.header_revision);
    }

    /// A snapshot older than what was applied means etcd's history went
    /// back (the cluster was wiped or restored from a backup): nothing this
    /// worker derived can be trusted, and its barrier may never be reached
    /// again, so the worker ends with [`worker::Error::HistoryReset`] for its
    /// owner to start a fresh one.
    fn apply_resync(&mut self, resync: Resync) -> Result<(), worker::Error> {
        if self.initialized && resync.revision < self.applied_revision {
            return Err(worker::Error::HistoryReset {
                snapshot: resync.revision,
                applied: self.applied_revision,
            });
        }
        *self
            .stats
            .resyncs
            .entry(resync.reason.as_str())
            .or_default() += 1;
        let old = std::mem::replace(&mut self.raw, resync.entries);
        if self.initialized {
            let mut changed = 0usize;
            let deleted: Vec<String> = old
                .keys()
                .filter(|k| !self.raw.contains_key(*k))
                .cloned()
                .collect();
            for key in deleted {
                self.update_state(&key, None, false);
                changed += 1;
            }
            // The state reads the values where they are: no copy.
            for (key, entry) in &self.raw {
                if old.get(key).map(|o| o.mod_revision) != Some(entry.mod_revision) {
                    skip_rejected(key, self.state.update(key, Some(&entry.value), false));
                    changed += 1;
                }
            }
            info!(
                revision = resync.revision,
                changed,
                reason = resync.reason.as_str(),
                "resync applied"
            );
        } else {
            for (key, entry) in &self.raw {
                skip_rejected(key, self.state.update(key, Some(&entry.value), true));
            }
            self.initialized = true;
        }
        self.applied_revision = resync.revision;
        self.observe_lag(resync.revision);
        Ok(())
    }

    fn update_state(&mut self, key: &str, value: Option<&[u8]>, is_init: bool) {
        skip_rejected(key, self.state.update(key, value, is_init));
    }

    fn apply(&mut self, incoming: Incoming) -> Result<(), worker::Error> {
        match incoming {
            Incoming::Events(batch) => {
                self.apply_events(batch);
                Ok(())
            }
            Incoming::Resync(resync) => self.apply_resync(resync),
        }
    }

    fn observe_lag(&self, header_revision: i64) {
        metrics::worker()
            .watch_lag_revisions
            .set((header_revision - self.applied_revision).max(0));
    }

    fn take_or_queue(&mut self, incoming: Incoming, ctx: &mut Context<Self>) {
        if self.committing {
            match &incoming {
                // A full read replaces whatever came before it.
                Incoming::Resync(_) => {
                    self.queued.clear();
                    self.queued_events = 1;
                }
                Incoming::Events(batch) => self.queued_events += batch.events.len(),
            }
            self.queued.push_back(incoming);
            metrics::worker()
                .queued_events
                .set(self.queued_events as i64);
            if self.queued_events > MAX_QUEUED_EVENTS {
                let queued = self.queued_events;
                self.queued.clear();
                self.queued_events = 0;
                self.finish(Err(worker::Error::FellBehind { queued }), ctx);
            }
            return;
        }
        match self.apply(incoming) {
            Ok(()) => self.schedule_tick(ctx),
            Err(error) => self.finish(Err(error), ctx),
        }
    }

    /// Arms the tick timer for the earliest instant the rate limit allows.
    fn schedule_tick(&mut self, ctx: &mut Context<Self>) {
        if !self.active || self.tick_timer.is_some() || self.committing || self.done.is_none() {
            return;
        }
        let now = Instant::now();
        let mut at = self.last_tick.map_or(now, |t| t + self.tick_interval);
        if let Some(not_before) = self.not_before {
            at = at.max(not_before);
        }
        self.tick_timer = Some(
            ctx.run_later(at.saturating_duration_since(now), |act, ctx| {
                act.tick_timer = None;
                act.try_tick(ctx);
            }),
        );
    }

    fn try_tick(&mut self, ctx: &mut Context<Self>) {
        if !self.active || !self.initialized || self.committing || self.done.is_none() {
            return;
        }
        if self.applied_revision < self.barrier {
            // The watch has not delivered our own last write yet; its events
            // re-arm the timer.
            debug!(
                applied = self.applied_revision,
                barrier = self.barrier,
                "waiting for the barrier"
            );
            return;
        }
        self.tick(ctx);
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.last_tick = Some(Instant::now());
        self.stats.ticks += 1;
        let started = Instant::now();
        self.state.at_revision(self.applied_revision);
        let result = self.reactor.tick(&mut self.state);
        let elapsed = started.elapsed();
        metrics::worker()
            .tick_duration_seconds
            .observe(elapsed.as_secs_f64());
        if elapsed > self.slow_threshold {
            warn!(?elapsed, keys = self.raw.len(), "slow reactor tick");
        }
        match result {
            Ok(()) => {}
            Err(reactor::Error::Finished) => self.finishing = true,
            Err(reactor::Error::Failed(error)) => {
                self.state.get_patches();
                self.finish(Err(worker::Error::Reactor(error)), ctx);
                return;
            }
        }
        let groups = self.state.get_patches();
        let plan = if groups.is_empty() {
            CommitPlan::default()
        } else {
            match plan_commit(&self.raw, &self.prefix, groups, &self.limits) {
                Ok(plan) => plan,
                Err(error) => {
                    self.finish(Err(error.into()), ctx);
                    return;
                }
            }
        };
        for rejected in &plan.rejected {
            warn!(group = rejected.group, error = %rejected.error, "patch group dropped");
        }
        if plan.txns.is_empty() {
            if self.finishing {
                self.finish(Ok(()), ctx);
            } else {
                self.schedule_tick(ctx);
            }
            return;
        }
        self.committing = true;
        let commit = self.committer.send(Commit {
            plan,
            fence: self.fence.clone(),
        });
        ctx.spawn(
            commit
                .into_actor(self)
                .map(|outcome, act, ctx| act.on_commit(outcome, ctx)),
        );
    }

    fn on_commit(&mut self, outcome: Result<CommitOutcome, MailboxError>, ctx: &mut Context<Self>) {
        self.committing = false;
        match outcome {
            Err(_) => {
                self.finish(Err(worker::Error::Gone), ctx);
                return;
            }
            Ok(CommitOutcome::Committed { revision, keys }) => {
                debug!(revision, keys, "committed");
                self.barrier = self.barrier.max(revision);
                self.stats.commits += 1;
                self.unavailable_streak = 0;
                self.not_before = None;
                if self.finishing {
                    self.finish(Ok(()), ctx);
                    return;
                }
            }
            Ok(CommitOutcome::Conflict {
                committed_revision,
                observed_revision,
            }) => {
                debug!(
                    ?committed_revision,
                    observed_revision, "txn conflict; patches dropped"
                );
                self.barrier = self
                    .barrier
                    .max(committed_revision.unwrap_or(0))
                    .max(observed_revision);
                // Finished patches that did not commit are re-derived: the
                // reactor gets another tick.
                self.finishing = false;
            }
            Ok(CommitOutcome::Unavailable {
                committed_revision,
                error,
            }) => {
                warn!(%error, "etcd unavailable; patches dropped, backing off");
                self.stats.unavailable += 1;
                self.barrier = self.barrier.max(committed_revision.unwrap_or(0));
                self.finishing = false;
                self.not_before =
                    Some(Instant::now() + self.backoff.delay(self.unavailable_streak));
                self.unavailable_streak = self.unavailable_streak.saturating_add(1);
            }
            Ok(CommitOutcome::Failed(error)) => {
                self.finish(Err(error), ctx);
                return;
            }
        }
        if self.stopping {
            self.finish(Ok(()), ctx);
            return;
        }
        self.queued_events = 0;
        metrics::worker().queued_events.set(0);
        while let Some(incoming) = self.queued.pop_front() {
            if let Err(error) = self.apply(incoming) {
                self.finish(Err(error), ctx);
                return;
            }
        }
        self.schedule_tick(ctx);
    }

    fn finish(&mut self, result: Result<(), worker::Error>, ctx: &mut Context<Self>) {
        let Some(done) = self.done.take() else { return };
        match &result {
            Ok(()) => info!(prefix = %self.prefix, "worker stopped"),
            Err(error) => error!(prefix = %self.prefix, %error, "worker stopped with an error"),
        }
        let _ = done.send(result);
        self.watcher.do_send(StopWatcher);
        self.committer.do_send(StopCommitter);
        ctx.stop();
    }
}

/// A malformed value written from outside is logged and counted, never fatal.
fn skip_rejected(key: &str, result: Result<(), state::Error>) {
    if let Err(error) = result {
        metrics::worker().skipped_updates_total.inc();
        warn!(key, %error, "reactor state rejected an update; skipped");
    }
}

impl<R> Actor for ReactorTicker<R>
where
    R: Reactor + 'static,
    R::State: 'static,
{
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        if let Some(done) = self.done.take() {
            let _ = done.send(Err(worker::Error::Gone));
            self.watcher.do_send(StopWatcher);
            self.committer.do_send(StopCommitter);
        }
    }
}

impl<R> Handler<WatchEvents> for ReactorTicker<R>
where
    R: Reactor + 'static,
    R::State: 'static,
{
    type Result = ();

    fn handle(&mut self, msg: WatchEvents, ctx: &mut Self::Context) {
        self.take_or_queue(Incoming::Events(msg), ctx);
    }
}

impl<R> Handler<Resync> for ReactorTicker<R>
where
    R: Reactor + 'static,
    R::State: 'static,
{
    type Result = ();

    fn handle(&mut self, msg: Resync, ctx: &mut Self::Context) {
        self.take_or_queue(Incoming::Resync(msg), ctx);
    }
}

impl<R> Handler<WatchProgress> for ReactorTicker<R>
where
    R: Reactor + 'static,
    R::State: 'static,
{
    type Result = ();

    fn handle(&mut self, msg: WatchProgress, _: &mut Self::Context) {
        self.observe_lag(msg.header_revision);
    }
}

impl<R> Handler<Rewatched> for ReactorTicker<R>
where
    R: Reactor + 'static,
    R::State: 'static,
{
    type Result = ();

    fn handle(&mut self, msg: Rewatched, _: &mut Self::Context) {
        *self.stats.rewatches.entry(msg.reason.as_str()).or_default() += 1;
    }
}

impl<R> Handler<WatcherFailed> for ReactorTicker<R>
where
    R: Reactor + 'static,
    R::State: 'static,
{
    type Result = ();

    fn handle(&mut self, msg: WatcherFailed, ctx: &mut Self::Context) {
        self.finish(Err(msg.0), ctx);
    }
}

impl<R> Handler<StopWorker> for ReactorTicker<R>
where
    R: Reactor + 'static,
    R::State: 'static,
{
    type Result = ();

    fn handle(&mut self, _: StopWorker, ctx: &mut Self::Context) {
        self.stopping = true;
        if !self.committing {
            self.finish(Ok(()), ctx);
        }
    }
}

impl<R> Handler<Activate> for ReactorTicker<R>
where
    R: Reactor + 'static,
    R::State: 'static,
{
    type Result = ();

    fn handle(&mut self, msg: Activate, ctx: &mut Self::Context) {
        if self.active {
            warn!("activate: the worker is active already; ignored");
            return;
        }
        // A revision of the prefix (the election's rewrite of its key): the
        // watch delivers it.
        self.barrier = self.barrier.max(msg.barrier);
        self.limits.extra_compares = usize::from(msg.fence.is_some());
        self.fence = msg.fence;
        self.active = true;
        info!(
            prefix = %self.prefix,
            applied = self.applied_revision,
            barrier = self.barrier,
            keys = self.raw.len(),
            "standby worker activated"
        );
        self.schedule_tick(ctx);
    }
}

impl<R> Handler<GetWorkerStats> for ReactorTicker<R>
where
    R: Reactor + 'static,
    R::State: 'static,
{
    type Result = MessageResult<GetWorkerStats>;

    fn handle(&mut self, _: GetWorkerStats, _: &mut Self::Context) -> Self::Result {
        MessageResult(WorkerStats {
            applied_revision: self.applied_revision,
            barrier: self.barrier,
            keys: self.raw.len(),
            ..self.stats.clone()
        })
    }
}
