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
//! touched, those with new progress, those of an executor that went offline
//! (from the state's per-executor index), those waiting for an executor when
//! one comes online, and those whose retry backoff ended; every
//! `full_pass_interval` (and on the first tick, and after the registry feed was
//! re-subscribed) it visits all of them, as a safety net. An idle cluster's
//! tick costs nothing per changefeed. The least loaded matching executor comes
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use super::model::{
    ChangefeedId, ChangefeedInfo, ChangefeedStatus, ExecutorRecord, FeedState, TaskStatus,
};
use super::state::{ChangefeedEntry, GlobalState};
use crate::state::{reactor, DataPatch, PatchGroup, Reactor};
use budget::CheckpointBudget;
use plan::{delete_task, Plan, Scheduled, Tick, Wait, MAX_STALE_TASKS_PER_TICK};

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
    /// The full set of live executors (after a (re)subscription).
    Executors(Vec<LiveExecutor>),
    Online(LiveExecutor),
    Offline(String),
    Progress {
        executor: String,
        report: ProgressReport,
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
}

impl Default for OwnerConfig {
    fn default() -> Self {
        Self {
            max_retries: 3,
            retry_backoff: Duration::from_secs(2),
            server_id: String::new(),
            checkpoint_interval: Duration::from_secs(2),
            max_checkpoint_writes: 500,
            full_pass_interval: Duration::from_secs(10),
        }
    }
}

pub struct OwnerReactor {
    inputs: mpsc::UnboundedReceiver<OwnerInput>,
    /// `None` until the first `Executors` input.
    live: Option<BTreeMap<String, LiveExecutor>>,
    /// Latest report per (changefeed, executor). Kept (re-applying is a
    /// no-op once committed) until the assignment it belongs to is gone, so
    /// a report is never lost to a txn conflict.
    progress: BTreeMap<(ChangefeedId, String), ProgressReport>,
    /// When this leader last wrote each changefeed's status (ms); a
    /// changefeed missing here was not written since this leader started.
    status_written: HashMap<ChangefeedId, u64>,
    budget: CheckpointBudget,
    /// Changefeeds the next tick visits besides those the state touched.
    dirty: BTreeSet<ChangefeedId>,
    /// Changefeeds that found no executor: visited when one comes online.
    waiting: BTreeSet<ChangefeedId>,
    /// When changefeeds backing off after an error may be assigned again.
    wakeups: BTreeSet<(u64, ChangefeedId)>,
    /// When the last full pass ran; `None`: the next tick is one.
    full_pass_at: Option<u64>,
    /// This leader's first tick (ms).
    started_at: u64,
    /// Executors that came online or went offline since the last tick: their
    /// mirror records under `__meta__` are compared (all of them on a full
    /// pass).
    mirror_stale: BTreeSet<String>,
    last_tick: TickStats,
    config: OwnerConfig,
    now_ms: fn() -> u64,
}

/// What the last tick did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickStats {
    /// It visited every changefeed.
    pub full: bool,
    /// Changefeeds it visited.
    pub visited: usize,
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
            live: None,
            progress: BTreeMap::new(),
            status_written: HashMap::new(),
            budget: CheckpointBudget::new(config.max_checkpoint_writes),
            dirty: BTreeSet::new(),
            waiting: BTreeSet::new(),
            wakeups: BTreeSet::new(),
            full_pass_at: None,
            started_at: 0,
            mirror_stale: BTreeSet::new(),
            last_tick: TickStats::default(),
            config,
            now_ms: unix_now_ms,
        }
    }

    /// Uses another clock (tests).
    pub fn with_clock(mut self, now_ms: fn() -> u64) -> Self {
        self.now_ms = now_ms;
        self
    }

    /// What the last tick did.
    pub fn last_tick(&self) -> TickStats {
        self.last_tick
    }

    fn drain_inputs(&mut self, state: &GlobalState) {
        while let Ok(input) = self.inputs.try_recv() {
            match input {
                OwnerInput::Executors(list) => {
                    self.live = Some(list.into_iter().map(|e| (e.id.clone(), e)).collect());
                    self.full_pass_at = None;
                }
                OwnerInput::Online(e) => {
                    if let Some(live) = &mut self.live {
                        self.mirror_stale.insert(e.id.clone());
                        live.insert(e.id.clone(), e);
                        self.dirty.append(&mut self.waiting);
                    }
                }
                OwnerInput::Offline(id) => {
                    if let Some(live) = &mut self.live {
                        live.remove(&id);
                        self.dirty.extend(state.running_on(&id).cloned());
                        self.mirror_stale.insert(id);
                    }
                }
                OwnerInput::Progress { executor, report } => {
                    self.dirty.insert(report.changefeed.clone());
                    let key = (report.changefeed.clone(), executor);
                    // Keep the furthest report; an older one arriving late
                    // must not win.
                    let keep_old = self.progress.get(&key).is_some_and(|old| {
                        old.epoch == report.epoch
                            && old.checkpoint_ts > report.checkpoint_ts
                            && report.error.is_none()
                    });
                    if !keep_old {
                        self.progress.insert(key, report);
                    }
                }
            }
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
    /// is re-created meanwhile (guarded).
    fn remove_leftovers(
        state: &GlobalState,
        cf: &ChangefeedId,
        entry: &ChangefeedEntry,
    ) -> PatchGroup {
        let mut group = vec![DataPatch::guard(state.keys.info(cf))];
        if entry.status.is_some() {
            group.push(DataPatch::delete(state.keys.status(cf)));
        }
        for executor in entry
            .task_holders()
            .into_iter()
            .take(MAX_STALE_TASKS_PER_TICK)
        {
            delete_task(&mut group, state, cf, entry, executor);
        }
        group
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
        plan.delete_stale_tasks(state);
        self.apply_progress(state, tick, &mut plan);
        let mut wait = Wait::Nothing;
        if plan.needs_executor() {
            let reason = self.assign(state, tick, &mut plan);
            if reason.is_some() {
                wait = if tick.now < plan.status.retry_after_ms {
                    Wait::Until(plan.status.retry_after_ms)
                } else {
                    Wait::Executor
                };
            }
            plan.set_pending_reason(reason);
        } else {
            plan.clear_pending_reason();
        }
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
        let Some(report) = self.progress.get(&(plan.cf.clone(), executor.clone())) else {
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
            plan.delete_task(state, &executor);
            tick.load(state).add(&executor, -1);
            plan.assigned = None;
            let mut finished = plan.info.clone();
            finished.state = FeedState::Finished;
            plan.new_info = Some(finished);
            plan.status.pending_reason = None;
            plan.status_changed = true;
        }
    }

    /// Unassign; retry after a backoff, or give up.
    fn unassign_after_error(
        &self,
        state: &GlobalState,
        tick: &mut Tick,
        plan: &mut Plan,
        executor: &str,
        error: &str,
    ) {
        plan.delete_task(state, executor);
        tick.load(state).add(executor, -1);
        plan.assigned = None;
        plan.status.retries = plan.status.retries.saturating_add(1);
        plan.status_changed = true;
        if plan.status.retries > self.config.max_retries {
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
        let next_epoch = plan.status.epoch.checked_add(1);
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

    /// The checkpoint-only writes the budget allows this tick, least recently
    /// written first, each due (not written within `checkpoint_interval`).
    fn checkpoint_groups(
        &mut self,
        state: &GlobalState,
        now: u64,
        mut waiting: Vec<(&ChangefeedId, ChangefeedStatus)>,
    ) -> Vec<PatchGroup> {
        let interval = self.config.checkpoint_interval.as_millis() as u64;
        let written = &self.status_written;
        let last = |cf: &ChangefeedId| written.get(cf).copied();
        waiting.retain(|(cf, _)| last(cf).is_none_or(|at| now >= at.saturating_add(interval)));
        let granted = self.budget.take(now, waiting.len());
        let mut lag_ms = 0;
        if granted < waiting.len() {
            // `None` (never written by this leader) sorts first.
            waiting.select_nth_unstable_by_key(granted, |(cf, _)| last(cf));
            // The oldest of those left waiting (never written: since this
            // leader's first tick).
            let oldest = waiting[granted..]
                .iter()
                .map(|(cf, _)| last(cf).unwrap_or(self.started_at))
                .min();
            lag_ms = oldest.map_or(0, |at| now.saturating_sub(at));
            waiting.truncate(granted);
        }
        let metrics = crate::metrics::owner();
        metrics
            .checkpoint_persist_lag_seconds
            .set(lag_ms as f64 / 1000.0);
        metrics.checkpoint_writes_total.inc_by(waiting.len() as u64);
        let mut groups = Vec::with_capacity(waiting.len());
        for (cf, mut status) in waiting {
            status.written_by = self.config.server_id.clone();
            groups.push(vec![
                DataPatch::guard(state.keys.info(cf)),
                DataPatch::put(state.keys.status(cf), json(&status)),
            ]);
            self.status_written.insert(cf.clone(), now);
        }
        groups
    }

    /// Reports of assignments that no longer exist are dropped.
    fn forget_stale_progress(&mut self, state: &GlobalState) {
        self.progress.retain(|(cf, executor), report| {
            state.changefeeds.get(cf).is_some_and(|e| {
                e.status.as_ref().is_some_and(|s| s.epoch == report.epoch)
                    && e.tasks.contains_key(executor)
            })
        });
        self.status_written
            .retain(|cf, _| state.changefeeds.contains_key(cf));
    }
}

impl Reactor for OwnerReactor {
    type State = GlobalState;

    /// One tick: the inputs, the executor mirror if the live set changed,
    /// then for every changefeed to visit (all of them on a full pass) one
    /// group: its leftovers removed when it was deleted, else
    /// [`Self::schedule`]; then the checkpoints the budget allows.
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
        let interval = self.config.full_pass_interval.as_millis() as u64;
        let full = self
            .full_pass_at
            .is_none_or(|at| now >= at.saturating_add(interval));
        let changed = std::mem::take(&mut self.mirror_stale);
        if full {
            Self::mirror_executors(state, &live, None);
        } else if !changed.is_empty() {
            Self::mirror_executors(state, &live, Some(&changed));
        }
        let touched = state.take_touched();
        let visit: BTreeSet<ChangefeedId> = if full {
            self.full_pass_at = Some(now);
            self.dirty.clear();
            self.waiting.clear();
            self.wakeups.clear();
            state.changefeeds.keys().cloned().collect()
        } else {
            let mut visit = touched;
            visit.append(&mut self.dirty);
            while let Some(first) = self.wakeups.first() {
                if first.0 > now {
                    break;
                }
                let (_, cf) = self.wakeups.pop_first().expect("not empty");
                visit.insert(cf);
            }
            visit
        };
        let mut tick = Tick::new(&live, now);
        let mut groups = Vec::new();
        let mut wrote_status = Vec::new();
        let mut waiting = Vec::new();
        let mut visited = 0;
        for cf in &visit {
            let Some(entry) = state.changefeeds.get(cf) else {
                // Gone (every key deleted): nothing left to do.
                self.waiting.remove(cf);
                continue;
            };
            visited += 1;
            if state.unreadable.contains(cf) {
                // Reported by the worker when it was written; nothing is
                // decided on it until someone fixes or deletes it.
                continue;
            }
            match &entry.info {
                None => groups.push(Self::remove_leftovers(state, cf, entry)),
                Some(info) => {
                    let scheduled = self.schedule(state, &mut tick, cf, entry, info);
                    groups.extend(scheduled.group);
                    if scheduled.wrote_status {
                        wrote_status.push(cf);
                    }
                    if let Some(status) = scheduled.checkpoint {
                        waiting.push((cf, status));
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
        }
        for cf in wrote_status {
            self.status_written.insert(cf.clone(), now);
        }
        groups.extend(self.checkpoint_groups(state, now, waiting));
        for group in groups {
            state.queue(group);
        }
        if full {
            self.forget_stale_progress(state);
        }
        self.last_tick = TickStats { full, visited };
        let metrics = crate::metrics::owner();
        metrics.tick_visited_changefeeds.observe(visited as f64);
        if full {
            metrics.full_passes_total.inc();
        }
        self.live = Some(live);
        Ok(())
    }
}

mod budget;
mod plan;
pub use plan::MAX_GROUP_KEYS;
#[cfg(test)]
mod tests;
