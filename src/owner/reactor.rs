//! `OwnerReactor`: the scheduling logic, one tick at a time.
//!
//! Each tick it reads the live executors and the progress reports that
//! arrived since the last tick (from an input channel), then, for every
//! changefeed, queues ONE patch group that moves it toward its desired
//! state: assigned to exactly one live executor whose labels match its
//! selector (the least loaded, ties by id) when it is `normal`, unassigned
//! otherwise. Every group guards the changefeed's info key, so a concurrent
//! pause or delete through the API makes the group fail instead of writing a
//! stale decision.
//!
//! The owner keeps no truth of its own: everything it decides is derived from
//! the etcd snapshot plus the live executors, so a restarted owner continues
//! where the last one stopped. It does nothing before it has seen the first
//! list of live executors: without it, every assignment would look dead.
//!
//! Ticks are incremental: a tick visits the changefeeds an etcd update
//! touched, those with new progress that is more than a checkpoint advance,
//! those of an executor that went offline (from the state's per-executor
//! index), those waiting for an executor when one comes online, and those
//! whose retry backoff ended. As a safety net a sweep visits every changefeed
//! once per `full_pass_interval`, a slice per tick in key order (all of them on
//! the first tick, or after a gap of a whole interval). A steady changefeed's
//! progress (one live task at the current epoch, nothing pending) only queues
//! its checkpoint for the write budget. An idle cluster's tick costs
//! changefeeds / `full_pass_interval` x tick interval visits. The least loaded matching executor comes
//! from an ordered (load, id) index built once per tick that assigns, so a
//! mass move costs O(moves x log executors) plus one pass over the executors.
//!
//! Progress lives in the leader's memory; etcd holds what a new leader needs.
//! A changefeed's checkpoint (a lower bound: after a failover executors report
//! their real positions again, and the checkpoint never goes backward) is
//! persisted at most once per `checkpoint_interval` per changefeed, within a
//! budget of `max_checkpoint_writes` keys per second for all of them, the
//! least recently written first: the write rate stays bounded however many
//! changefeeds there are. Every other change of the status (an epoch, a
//! retry, a pending reason, an error, a finish) is written at once and
//! carries the latest checkpoint with it. Task positions are not written
//! (an error reaches the status and the info instead); old ones are deleted
//! with their task.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use tokio::sync::mpsc;

use super::model::{
    ChangefeedId, ChangefeedInfo, ChangefeedStatus, ExecutorRecord, FeedState, Releasing,
    TaskStatus,
};
use super::progress::ProgressSlots;
use super::small_map::SmallMap;
use super::state::{ChangefeedEntry, GlobalState};
use crate::state::{reactor, DataPatch, PatchGroup, Reactor};
use budget::CheckpointQueue;
use plan::{Held, Plan, Scheduled, Tick, Wait};
use release::Releases;

/// An executor the registry says is alive: the same record the owner
/// mirrors under `__meta__/executor/`.
pub type LiveExecutor = ExecutorRecord;

/// Progress an executor reported for one of its assignments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressReport {
    pub changefeed: ChangefeedId,
    pub epoch: u64,
    pub checkpoint_ts: u64,
    pub resolved_ts: u64,
    pub error: Option<String>,
}

/// What reaches the owner between ticks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerInput {
    /// The full set of live executors (after a (re)subscription), and those
    /// of them that have not heartbeated to this leader yet.
    Executors {
        live: Vec<LiveExecutor>,
        initing: Vec<String>,
    },
    /// An executor registered (`initing`: no heartbeat yet), or heartbeated to
    /// this leader for the first time (`initing: false`).
    Online {
        executor: LiveExecutor,
        initing: bool,
    },
    /// An executor is gone (expired or deregistered); its lease has
    /// certainly lapsed `lease_left` from now (zero for an expiry).
    Offline {
        executor: String,
        lease_left: Duration,
    },
    Progress {
        executor: String,
        report: ProgressReport,
    },
    /// The executor stopped a task taken away from it (its heartbeat said so,
    /// and the heartbeat path checked the task was no longer its to run).
    Released {
        executor: String,
        changefeed: ChangefeedId,
        epoch: u64,
    },
}

/// Scheduling settings.
#[derive(Debug, Clone)]
pub struct OwnerConfig {
    /// Errors tolerated (each followed by a reassignment) before a
    /// changefeed is marked failed.
    pub max_retries: u32,
    /// Backoff before the n-th reassignment after an error:
    /// `retry_backoff * 2^(n-1)`, capped at 64x.
    pub retry_backoff: Duration,
    /// This server's id, recorded in what the owner writes (`written_by`).
    pub server_id: String,
    /// A changefeed's advanced checkpoint is written at most once per interval.
    pub checkpoint_interval: Duration,
    /// Checkpoint-only status writes per second, for all changefeeds together.
    pub max_checkpoint_writes: u32,
    /// A tick visits every changefeed at least this often (else only those
    /// something happened to).
    pub full_pass_interval: Duration,
    /// The longest lease an executor can hold (the registry's `max_ttl`): a
    /// task taken away from an executor that neither acknowledges the stop
    /// nor goes offline is released this long after the owner saw it go.
    pub max_lease: Duration,
}

impl Default for OwnerConfig {
    fn default() -> Self {
        Self {
            max_retries: 3,
            retry_backoff: Duration::from_secs(2),
            server_id: String::new(),
            checkpoint_interval: Duration::from_secs(2),
            max_checkpoint_writes: 500,
            // A safety net (every change is visited when it happens): at
            // 100,000 changefeeds a 10 s sweep was a fifth of an idle
            // server's CPU.
            full_pass_interval: Duration::from_secs(60),
            max_lease: Duration::from_secs(60),
        }
    }
}

pub struct OwnerReactor {
    /// Registry events and acknowledged stops (each bounded at its source:
    /// the registry's feed, the board's revoked tasks); progress from tests.
    inputs: mpsc::UnboundedReceiver<OwnerInput>,
    /// Progress from heartbeats, one slot per changefeed and executor.
    slots: Arc<ProgressSlots>,
    /// `None` until the first `Executors` input.
    live: Option<BTreeMap<String, LiveExecutor>>,
    /// Live executors that have not heartbeated to this leader yet (just
    /// registered, or loaded from the store after a failover and possibly
    /// gone): they get work only when no other executor matches.
    initing: HashSet<String>,
    /// Latest report per changefeed and executor. Kept (re-applying is a
    /// no-op once committed) until the assignment it belongs to is gone, so
    /// a report is never lost to a txn conflict.
    progress: Progress,
    /// Advanced checkpoints waiting to be persisted, and the write budget.
    checkpoints: CheckpointQueue,
    /// Tasks taken away from their executor and not released yet.
    releases: Releases,
    /// Changefeeds the next tick visits besides those the state touched.
    dirty: BTreeSet<ChangefeedId>,
    /// Changefeeds that found no executor: visited when one comes online.
    waiting: BTreeSet<ChangefeedId>,
    /// When changefeeds backing off after an error may be assigned again.
    wakeups: BTreeSet<(u64, ChangefeedId)>,
    /// The sweep: every changefeed is visited once per `full_pass_interval`,
    /// a slice per tick in key order, from after `sweep_after` (`None`: from
    /// the first). `swept_at`: the last tick (`None`: the next tick visits
    /// everything); `sweep_credit`: changefeeds x ms owed, short of one
    /// changefeed x interval.
    sweep_after: Option<ChangefeedId>,
    swept_at: Option<u64>,
    sweep_credit: u128,
    /// This leader's first tick (ms).
    started_at: u64,
    /// Executors that came online or went offline since the last tick: their
    /// mirror records under `__meta__` are compared (all of them on a full
    /// pass).
    mirror_stale: BTreeSet<String>,
    last_tick: TickStats,
    config: OwnerConfig,
    now_ms: fn() -> u64,
    /// Monotonic ms, for release deadlines.
    mono_ms: fn() -> u64,
}

/// What a tick's sweep visits.
enum Sweep {
    /// Every changefeed (the first tick, or a whole interval passed).
    All,
    /// The next slice; `true`: it completed the sweep.
    Slice(Vec<ChangefeedId>, bool),
}

/// What a tick's visits produced.
#[derive(Default)]
struct Visits {
    groups: Vec<PatchGroup>,
    /// Changefeeds whose status a group writes.
    wrote_status: Vec<ChangefeedId>,
    visited: usize,
}

/// The latest reports of each changefeed's executors.
type Progress = HashMap<ChangefeedId, SmallMap<ProgressReport>>;

/// What the last tick did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickStats {
    /// It completed a sweep: every changefeed was visited since the last one
    /// completed (or all of them in this tick).
    pub full: bool,
    /// Changefeeds it visited.
    pub visited: usize,
}

/// Milliseconds on the monotonic clock since this process first asked.
fn monotonic_ms() -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// RFC 3339 for `ms` after the Unix epoch. Past the year 9999 humantime's
/// formatter fails (and `to_string` would panic on that): a stored status can
/// hold any `u64` (found by `fuzz/global_state`), so those are printed raw.
fn rfc3339(ms: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let time = UNIX_EPOCH + Duration::from_millis(ms);
    if write!(out, "{}", humantime::format_rfc3339_millis(time)).is_err() {
        out = format!("{ms} ms after the Unix epoch");
    }
    out
}

fn json(value: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("model types serialize")
}

impl OwnerReactor {
    pub fn new(inputs: mpsc::UnboundedReceiver<OwnerInput>, config: OwnerConfig) -> Self {
        Self {
            inputs,
            slots: Arc::default(),
            live: None,
            initing: HashSet::new(),
            progress: HashMap::new(),
            checkpoints: CheckpointQueue::new(config.max_checkpoint_writes),
            releases: Releases::new(config.max_lease.as_millis() as u64),
            dirty: BTreeSet::new(),
            waiting: BTreeSet::new(),
            wakeups: BTreeSet::new(),
            sweep_after: None,
            swept_at: None,
            sweep_credit: 0,
            started_at: 0,
            mirror_stale: BTreeSet::new(),
            last_tick: TickStats::default(),
            config,
            now_ms: unix_now_ms,
            mono_ms: monotonic_ms,
        }
    }

    /// Takes progress from `slots` (the heartbeat path's) at each tick, besides
    /// the reports of the input channel.
    pub fn with_progress_slots(mut self, slots: Arc<ProgressSlots>) -> Self {
        self.slots = slots;
        self
    }

    /// Uses another clock (tests).
    pub fn with_clock(mut self, now_ms: fn() -> u64) -> Self {
        self.now_ms = now_ms;
        self.mono_ms = now_ms;
        self
    }

    /// What the last tick did.
    pub fn last_tick(&self) -> TickStats {
        self.last_tick
    }

    fn drain_inputs(&mut self, state: &GlobalState) {
        while let Ok(input) = self.inputs.try_recv() {
            match input {
                OwnerInput::Executors {
                    live: list,
                    initing,
                } => {
                    self.initing = initing.into_iter().collect();
                    let new: BTreeMap<_, _> = list.into_iter().map(|e| (e.id.clone(), e)).collect();
                    // A re-subscription: what went offline meanwhile moves,
                    // what came online is offered to the waiting, and both
                    // are mirrored. (The first list: the first tick visits
                    // everything.)
                    if let Some(old) = self.live.take() {
                        for (id, record) in &old {
                            if !new.contains_key(id) {
                                self.dirty.extend(state.running_on(id).cloned());
                                self.mirror_stale.insert(id.clone());
                            } else if new.get(id) != Some(record) {
                                self.mirror_stale.insert(id.clone());
                            }
                        }
                        for id in new.keys().filter(|id| !old.contains_key(*id)) {
                            self.mirror_stale.insert(id.clone());
                        }
                        self.dirty.append(&mut self.waiting);
                    }
                    self.live = Some(new);
                }
                OwnerInput::Online {
                    executor: e,
                    initing,
                } => {
                    if let Some(live) = &mut self.live {
                        if initing {
                            self.initing.insert(e.id.clone());
                        } else {
                            self.initing.remove(&e.id);
                        }
                        self.mirror_stale.insert(e.id.clone());
                        live.insert(e.id.clone(), e);
                        self.dirty.append(&mut self.waiting);
                    }
                }
                OwnerInput::Offline {
                    executor: id,
                    lease_left,
                } => {
                    let now = (self.mono_ms)();
                    let lease_ends = now.saturating_add(lease_left.as_millis() as u64);
                    let pending = self.releases.offline(&id, lease_ends, now);
                    self.dirty.extend(pending);
                    if let Some(live) = &mut self.live {
                        live.remove(&id);
                        self.initing.remove(&id);
                        self.dirty.extend(state.running_on(&id).cloned());
                        self.mirror_stale.insert(id);
                    }
                }
                OwnerInput::Released {
                    executor,
                    changefeed,
                    epoch,
                } => {
                    let now = (self.mono_ms)();
                    self.releases
                        .acknowledged(&changefeed, &executor, epoch, now);
                    self.dirty.insert(changefeed);
                }
                OwnerInput::Progress { executor, report } => {
                    self.note_progress(state, executor, report);
                }
            }
        }
        for (executor, report) in self.slots.take() {
            self.note_progress(state, executor, report);
        }
    }

    /// Keeps the furthest report of `executor` for its changefeed, and marks
    /// the changefeed for a visit unless it is steady (then only its
    /// checkpoint moves).
    fn note_progress(&mut self, state: &GlobalState, executor: String, report: ProgressReport) {
        let cf = report.changefeed.clone();
        let reports = self.progress.entry(cf.clone()).or_default();
        // An older report arriving late must not win.
        let keep_old = reports
            .get(&executor)
            .is_some_and(|old| super::progress::is_further(old, &report));
        if !keep_old {
            reports.insert(executor, report);
        }
        let steady = self.live.as_ref().is_some_and(|live| {
            let entry = state.changefeeds.get(&cf);
            entry.is_some_and(|entry| {
                entry.info.as_ref().is_some_and(|info| {
                    !state.unreadable.contains(&cf)
                        && Self::steady(
                            &self.progress,
                            &mut self.checkpoints,
                            live,
                            &cf,
                            entry,
                            info,
                        )
                })
            })
        });
        if !steady {
            self.dirty.insert(cf);
        }
    }

    /// One group per mirror record that differs from the live set, for the
    /// executors in `ids` (`None`: every one): they are independent of each
    /// other.
    fn mirror_executors(
        state: &mut GlobalState,
        live: &BTreeMap<String, LiveExecutor>,
        ids: Option<&BTreeSet<String>>,
    ) {
        let differs = |id: &String| state.executors.get(id) != live.get(id);
        let stale: Vec<String> = match ids {
            Some(ids) => ids.iter().filter(|id| differs(id)).cloned().collect(),
            None => live
                .keys()
                .chain(state.executors.keys().filter(|id| !live.contains_key(*id)))
                .filter(|id| differs(id))
                .cloned()
                .collect(),
        };
        for id in stale {
            let key = state.keys.executor(&id);
            state.queue(vec![match live.get(&id) {
                Some(record) => DataPatch::put(key, json(record)),
                None => DataPatch::delete(key),
            }]);
        }
    }
}

impl OwnerReactor {
    /// Leftovers of a deleted changefeed: remove them, unless the changefeed
    /// is re-created meanwhile (guarded). A task goes only once released (its
    /// executor may still run the deleted changefeed); the first one still
    /// held is returned.
    fn remove_leftovers(
        state: &GlobalState,
        tick: &mut Tick,
        cf: &ChangefeedId,
        entry: &ChangefeedEntry,
    ) -> (PatchGroup, Option<Held>) {
        let mut group = vec![DataPatch::guard(state.keys.info(cf))];
        if entry.status.is_some() {
            group.push(DataPatch::delete(state.keys.status(cf)));
        }
        let held = plan::release_tasks(&mut group, state, tick, cf, entry, None);
        (group, held)
    }

    /// The group that moves a changefeed toward its desired state, if it
    /// needs one: stale tasks deleted, the current executor's progress
    /// applied, an executor assigned when it needs one, the pending reason
    /// kept true.
    fn schedule(
        &self,
        state: &GlobalState,
        tick: &mut Tick,
        cf: &ChangefeedId,
        entry: &ChangefeedEntry,
        info: &ChangefeedInfo,
    ) -> Scheduled {
        let mut plan = Plan::new(state, tick.live, cf, entry, info);
        let held = plan.release_stale_tasks(state, tick);
        self.apply_progress(state, tick, &mut plan);
        let mut wait = Wait::Nothing;
        if plan.needs_executor() {
            let reason = match &held {
                // The hand-off rule: nothing new while an old holder may run it.
                Some(held) => Some(format!(
                    "releasing: waiting for executor {} to stop epoch {} (acknowledged, or its \
                     lease lapsed by {})",
                    held.executor,
                    held.epoch,
                    rfc3339(held.deadline)
                )),
                None => self.assign(state, tick, &mut plan),
            };
            if reason.is_some() {
                wait = if let Some(held) = &held {
                    Wait::Until(held.deadline)
                } else if tick.now < plan.status.retry_after_ms {
                    Wait::Until(plan.status.retry_after_ms)
                } else {
                    Wait::Executor
                };
            }
            plan.set_pending_reason(reason);
        } else {
            plan.clear_pending_reason();
            if let Some(held) = &held {
                wait = Wait::Until(held.deadline);
            }
        }
        plan.set_holder();
        plan.set_releasing(held.map(|held| Releasing {
            executor: held.executor,
            epoch: held.epoch,
            deadline: rfc3339(held.deadline),
        }));
        let mut scheduled = plan.into_scheduled(state, &self.config.server_id);
        scheduled.wait = wait;
        scheduled
    }

    /// The latest report at the current epoch of the executor holding it:
    /// the checkpoint, and (from a live executor) an error (unassign, retry
    /// or fail) or the target reached (unassign, finish). The checkpoint of an
    /// executor that just went offline still counts: it got that far, and
    /// its successor starts from there.
    fn apply_progress(&self, state: &GlobalState, tick: &mut Tick, plan: &mut Plan) {
        let holder = match &plan.current {
            Some(executor) => Some(executor.clone()),
            None if plan.running => plan.entry.current_executor().map(str::to_owned),
            None => None,
        };
        let Some(executor) = holder else {
            return;
        };
        let Some(report) = self.progress.get(plan.cf).and_then(|r| r.get(&executor)) else {
            return;
        };
        if report.epoch != plan.status.epoch {
            return;
        }
        if report.checkpoint_ts > plan.status.checkpoint_ts {
            plan.status.checkpoint_ts = report.checkpoint_ts;
            plan.checkpoint_advanced = true;
            if plan.status.retries != 0 {
                plan.status.retries = 0;
                plan.status_changed = true;
            }
        }
        if plan.current.is_none() {
            return;
        }
        if let Some(error) = &report.error {
            self.unassign_after_error(state, tick, plan, &executor, error);
        } else if plan.info.target_ts > 0 && plan.status.checkpoint_ts >= plan.info.target_ts {
            // The task stays until released (the executor is told to stop:
            // the changefeed is no longer `normal`).
            tick.load(state).add(&executor, -1);
            plan.assigned = None;
            let mut finished = plan.info.clone();
            finished.state = FeedState::Finished;
            plan.new_info = Some(finished);
            plan.status.pending_reason = None;
            plan.status_changed = true;
        }
    }

    /// Unassign (a new epoch: the executor is told to stop, and the task is
    /// released by the hand-off rule before the retry is assigned); retry
    /// after a backoff, or give up.
    fn unassign_after_error(
        &self,
        state: &GlobalState,
        tick: &mut Tick,
        plan: &mut Plan,
        executor: &str,
        error: &str,
    ) {
        tick.load(state).add(executor, -1);
        plan.assigned = None;
        plan.status.retries = plan.status.retries.saturating_add(1);
        plan.status_changed = true;
        let next_epoch = state.next_epoch(plan.status.epoch);
        if let Some(epoch) = next_epoch {
            plan.status.epoch = epoch;
        }
        if plan.status.retries > self.config.max_retries || next_epoch.is_none() {
            let mut failed = plan.info.clone();
            failed.state = FeedState::Failed;
            failed.error = Some(error.to_owned());
            plan.new_info = Some(failed);
            plan.status.pending_reason = Some(format!("failed: {error}"));
        } else {
            let backoff = self
                .config
                .retry_backoff
                .saturating_mul(1 << (plan.status.retries - 1).min(6));
            plan.status.retry_after_ms = tick.now + backoff.as_millis() as u64;
            plan.status.pending_reason = Some(format!(
                "executor {executor} reported an error (retry {} of {}): {error}",
                plan.status.retries, self.config.max_retries
            ));
        }
    }

    /// Assigns the least loaded live executor that matches the selector (ties
    /// by id) at the next epoch, unless the changefeed backs off after an
    /// error; returns why it is still pending (`None`: assigned).
    fn assign(&self, state: &GlobalState, tick: &mut Tick, plan: &mut Plan) -> Option<String> {
        if tick.now < plan.status.retry_after_ms {
            return Some(format!(
                "backing off after an error until {}",
                rfc3339(plan.status.retry_after_ms)
            ));
        }
        let live = tick.live;
        let candidate = tick.load(state).least_loaded(live, &plan.info.selector);
        // A hand-written status can hold the last epoch: the
        // changefeed cannot be assigned again (reusing an epoch
        // would accept a stale executor's reports) until an
        // operator repairs the status or re-creates it.
        let next_epoch = state.next_epoch(plan.status.epoch);
        match (candidate, next_epoch) {
            (Some(_), None) => Some(format!(
                "epoch {} is the last one: repair the status key or re-create the changefeed",
                plan.status.epoch
            )),
            (Some(executor), Some(epoch)) => {
                plan.status.epoch = epoch;
                let task = TaskStatus {
                    epoch: plan.status.epoch,
                    assigned_at: rfc3339(tick.now),
                    written_by: self.config.server_id.clone(),
                };
                plan.group.push(DataPatch::put(
                    state.keys.task_status(plan.cf, &executor),
                    json(&task),
                ));
                tick.load(state).add(&executor, 1);
                plan.assigned = Some(executor);
                plan.status_changed = true;
                None
            }
            (None, _) if live.is_empty() => Some("no live executor".to_owned()),
            (None, _) => Some(format!(
                "no live executor matches the selector {:?}",
                plan.info.selector
            )),
        }
    }

    /// A changefeed running on a live executor with nothing pending (one
    /// task, at the current epoch; no pending reason, retry or position):
    /// only its checkpoint can change, and no plan is needed. `false`: it
    /// needs [`Self::schedule`].
    fn steady(
        progress: &Progress,
        checkpoints: &mut CheckpointQueue,
        live: &BTreeMap<String, LiveExecutor>,
        cf: &ChangefeedId,
        entry: &ChangefeedEntry,
        info: &ChangefeedInfo,
    ) -> bool {
        let Some(status) = &entry.status else {
            return false;
        };
        if info.state != FeedState::Normal
            || status.pending_reason.is_some()
            || status.retries != 0
            || !entry.positions.is_empty()
            || entry.tasks.len() != 1
        {
            return false;
        }
        let (executor, task) = entry.tasks.iter().next().expect("one task");
        if task.epoch != status.epoch
            || !live.contains_key(executor)
            || status.current_holder() != Some(executor.as_str())
        {
            return false;
        }
        let report = progress.get(cf).and_then(|r| r.get(executor));
        if let Some(report) = report.filter(|r| r.epoch == status.epoch) {
            let finished = info.target_ts > 0 && report.checkpoint_ts >= info.target_ts;
            if report.error.is_some() || finished {
                return false;
            }
            if report.checkpoint_ts > status.checkpoint_ts {
                checkpoints.advanced(cf);
            }
        }
        true
    }

    /// The checkpoint-only writes the budget allows this tick, least recently
    /// written first, each due (not written within `checkpoint_interval`).
    fn checkpoint_groups(&mut self, state: &GlobalState, now: u64) -> Vec<PatchGroup> {
        let interval = self.config.checkpoint_interval.as_millis() as u64;
        let progress = &self.progress;
        let server_id = &self.config.server_id;
        let (groups, lag_ms) = self
            .checkpoints
            .grant(now, interval, self.started_at, |cf| {
                let mut status = advanced_status(state, progress, cf)?;
                status.written_by = server_id.clone();
                Some(vec![
                    DataPatch::guard(state.keys.info(cf)),
                    DataPatch::put(state.keys.status(cf), json(&status)),
                ])
            });
        let metrics = crate::metrics::owner();
        metrics
            .checkpoint_persist_lag_seconds
            .set(lag_ms as f64 / 1000.0);
        metrics.checkpoint_writes_total.inc_by(groups.len() as u64);
        groups
    }

    /// One changefeed's visit: its leftovers removed when it was deleted,
    /// nothing when it is steady, else [`Self::schedule`].
    fn visit(
        &mut self,
        state: &GlobalState,
        tick: &mut Tick,
        cf: &ChangefeedId,
        entry: &ChangefeedEntry,
        out: &mut Visits,
    ) {
        out.visited += 1;
        if state.unreadable.contains(cf) {
            // Reported by the worker when it was written; nothing is
            // decided on it until someone fixes or deletes it.
            return;
        }
        match &entry.info {
            None => {
                let (group, held) = Self::remove_leftovers(state, tick, cf, entry);
                out.groups.push(group);
                if let Some(held) = held {
                    self.wakeups.insert((held.deadline, cf.clone()));
                }
            }
            Some(info)
                if Self::steady(
                    &self.progress,
                    &mut self.checkpoints,
                    tick.live,
                    cf,
                    entry,
                    info,
                ) =>
            {
                self.waiting.remove(cf);
            }
            Some(info) => {
                let scheduled = self.schedule(state, tick, cf, entry, info);
                out.groups.extend(scheduled.group);
                if scheduled.wrote_status {
                    out.wrote_status.push(cf.clone());
                } else if scheduled.checkpoint_advanced {
                    self.checkpoints.advanced(cf);
                }
                match scheduled.wait {
                    Wait::Nothing => {
                        self.waiting.remove(cf);
                    }
                    Wait::Executor => {
                        self.waiting.insert(cf.clone());
                    }
                    Wait::Until(at) => {
                        self.waiting.remove(cf);
                        self.wakeups.insert((at, cf.clone()));
                    }
                }
            }
        }
        self.forget_stale_progress(cf, entry);
        tick.releases.forget(cf, |executor, epoch| {
            entry.tasks.get(executor).is_some_and(|t| t.epoch == epoch)
        });
    }

    /// `cf` is gone (every key deleted): nothing is left to do for it.
    fn gone(&mut self, tick: &mut Tick, cf: &ChangefeedId) {
        self.waiting.remove(cf);
        self.progress.remove(cf);
        self.checkpoints.forget(cf);
        tick.releases.forget(cf, |_, _| false);
    }

    /// Drops `cf`'s reports of assignments that no longer exist.
    fn forget_stale_progress(&mut self, cf: &ChangefeedId, entry: &ChangefeedEntry) {
        let Some(reports) = self.progress.get_mut(cf) else {
            return;
        };
        let epoch = entry.status.as_ref().map(|s| s.epoch);
        reports.retain(|executor, report| {
            Some(report.epoch) == epoch && entry.tasks.contains_key(executor)
        });
        if reports.is_empty() {
            self.progress.remove(cf);
        }
    }

    /// The next slice of the sweep: as many changefeeds as `now` is a share
    /// of `full_pass_interval` since the last tick (all of them on the
    /// first tick, or when an interval has passed).
    fn sweep(&mut self, state: &GlobalState, now: u64) -> Sweep {
        let n = state.changefeeds.len() as u128;
        let interval = self.config.full_pass_interval.as_millis().max(1);
        let elapsed = self
            .swept_at
            .map_or(interval, |at| u128::from(now.saturating_sub(at)));
        self.swept_at = Some(now);
        if elapsed >= interval {
            self.sweep_after = None;
            self.sweep_credit = 0;
            return Sweep::All;
        }
        // Exact: the credit counts changefeeds x ms.
        self.sweep_credit += n * elapsed;
        let quota = (self.sweep_credit / interval) as usize;
        self.sweep_credit %= interval;
        if quota == 0 {
            return Sweep::Slice(Vec::new(), false);
        }
        let from = match &self.sweep_after {
            Some(cf) => Bound::Excluded(cf),
            None => Bound::Unbounded,
        };
        let slice: Vec<ChangefeedId> = state
            .changefeeds
            .range::<ChangefeedId, _>((from, Bound::Unbounded))
            .take(quota)
            .map(|(cf, _)| cf.clone())
            .collect();
        let last = state.changefeeds.last_key_value().map(|(cf, _)| cf);
        let completed = slice.len() < quota || slice.last() == last;
        if completed {
            self.sweep_after = None;
            self.sweep_credit = 0;
        } else {
            self.sweep_after = slice.last().cloned();
        }
        Sweep::Slice(slice, completed)
    }
}

/// `cf`'s status with the checkpoint its holder reported at the current
/// epoch, when that is ahead of the stored one (`None`: nothing to persist).
/// The holder of an assignment whose executor just went offline still
/// counts, as in [`OwnerReactor::apply_progress`].
fn advanced_status(
    state: &GlobalState,
    progress: &Progress,
    cf: &ChangefeedId,
) -> Option<ChangefeedStatus> {
    let entry = state.changefeeds.get(cf)?;
    let info = entry.info.as_ref()?;
    if info.state != FeedState::Normal || state.unreadable.contains(cf) {
        return None;
    }
    let status = entry.status.as_ref()?;
    let executor = entry.current_executor()?;
    let report = progress.get(cf)?.get(executor)?;
    if report.epoch != status.epoch || report.checkpoint_ts <= status.checkpoint_ts {
        return None;
    }
    let mut status = status.clone();
    status.checkpoint_ts = report.checkpoint_ts;
    Some(status)
}

impl Reactor for OwnerReactor {
    type State = GlobalState;

    /// One tick: the inputs, the executor mirror if the live set changed,
    /// then for every changefeed to visit (something happened to it, or the
    /// sweep reached it) one group: its leftovers removed when it was
    /// deleted, nothing when it is steady, else [`Self::schedule`]; then the
    /// checkpoints the budget allows.
    fn tick(&mut self, state: &mut GlobalState) -> Result<(), reactor::Error> {
        // Ticks come only at a consistent snapshot of etcd: from now on the
        // board may answer heartbeats.
        state.board().set_ready();
        self.drain_inputs(state);
        // Taken for the tick (not cloned), put back at its end.
        let Some(live) = self.live.take() else {
            return Ok(());
        };
        let now = (self.now_ms)();
        if self.started_at == 0 {
            self.started_at = now;
        }
        let sweep = self.sweep(state, now);
        let full = matches!(sweep, Sweep::All | Sweep::Slice(_, true));
        let changed = std::mem::take(&mut self.mirror_stale);
        if full {
            Self::mirror_executors(state, &live, None);
        } else if !changed.is_empty() {
            Self::mirror_executors(state, &live, Some(&changed));
        }
        let touched = state.take_touched();
        let initing = std::mem::take(&mut self.initing);
        let mono = (self.mono_ms)();
        let mut releases = std::mem::take(&mut self.releases);
        releases.prune(mono);
        let mut tick = Tick::new(&live, &initing, &mut releases, now, mono);
        let mut out = Visits::default();
        if let Sweep::Slice(swept, _) = sweep {
            let mut visit = touched;
            visit.append(&mut self.dirty);
            while let Some(first) = self.wakeups.first() {
                if first.0 > now {
                    break;
                }
                let (_, cf) = self.wakeups.pop_first().expect("not empty");
                visit.insert(cf);
            }
            visit.extend(swept);
            for cf in &visit {
                match state.changefeeds.get(cf) {
                    Some(entry) => self.visit(state, &mut tick, cf, entry, &mut out),
                    None => self.gone(&mut tick, cf),
                }
            }
        } else {
            // Every changefeed, in order, straight from the map; nothing
            // waits for a wake-up then. Progress of a changefeed that does
            // not exist is dropped.
            self.wakeups.clear();
            for cf in std::mem::take(&mut self.dirty) {
                if !state.changefeeds.contains_key(&cf) {
                    self.gone(&mut tick, &cf);
                }
            }
            for (cf, entry) in &state.changefeeds {
                self.visit(state, &mut tick, cf, entry, &mut out);
            }
        }
        drop(tick);
        crate::metrics::owner()
            .releasing_tasks
            .set(releases.len() as i64);
        self.releases = releases;
        let Visits {
            mut groups,
            wrote_status,
            visited,
        } = out;
        for cf in wrote_status {
            self.checkpoints.wrote(&cf, now);
        }
        groups.extend(self.checkpoint_groups(state, now));
        for group in groups {
            state.queue(group);
        }
        self.last_tick = TickStats { full, visited };
        let metrics = crate::metrics::owner();
        metrics.tick_visited_changefeeds.observe(visited as f64);
        if full {
            metrics.full_passes_total.inc();
        }
        self.live = Some(live);
        self.initing = initing;
        Ok(())
    }
}

mod budget;
mod plan;
mod release;
pub use plan::MAX_GROUP_KEYS;
#[cfg(test)]
mod tests;
