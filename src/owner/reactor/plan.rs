//! One changefeed's decision in a tick ([`Plan`], turned into one patch group) and
//! what all decisions of a tick share ([`Tick`], with the executors' [`Load`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::super::model::{
    ChangefeedId, ChangefeedInfo, ChangefeedStatus, FeedState, Holder, Releasing,
};
use super::super::state::{ChangefeedEntry, GlobalState};
use super::release::{Releases, Verdict};
use super::{json, LiveExecutor};
use crate::state::{DataPatch, PatchGroup};

/// At most this many executors' stale task keys (two keys each) are deleted
/// from one changefeed per tick, so that its patch group always fits one txn
/// (etcd's default `--max-txn-ops` is 128) however many accumulated, for
/// example written from outside; the rest go in the next ticks.
pub(super) const MAX_STALE_TASKS_PER_TICK: usize = 32;

/// The most keys one owner patch group touches: the stale task keys of
/// [`MAX_STALE_TASKS_PER_TICK`] executors, the info (guard, or the failed or
/// finished info), the status and a new task. Each is one op and one compare in
/// the txn, and a fenced worker adds the fence's compare: etcd's `--max-txn-ops`
/// (`etcd.max_txn_ops`) must allow `MAX_GROUP_KEYS + 1`.
pub const MAX_GROUP_KEYS: usize = 2 * MAX_STALE_TASKS_PER_TICK + 3;

/// What every changefeed's decision in one tick shares.
pub(super) struct Tick<'a> {
    pub(super) live: &'a BTreeMap<String, LiveExecutor>,
    /// Live executors that have not heartbeated to this leader yet.
    pub(super) initing: &'a HashSet<String>,
    /// Built when the tick first needs it (an assignment or an unassignment).
    pub(super) load: Option<Load>,
    /// The hand-off rule's state: tasks taken away, not released yet.
    pub(super) releases: &'a mut Releases,
    /// Wall-clock ms (what is written and shown).
    pub(super) now: u64,
    /// Monotonic ms (what release deadlines are counted on).
    pub(super) mono: u64,
}

impl<'a> Tick<'a> {
    pub(super) fn new(
        live: &'a BTreeMap<String, LiveExecutor>,
        initing: &'a HashSet<String>,
        releases: &'a mut Releases,
        now: u64,
        mono: u64,
    ) -> Self {
        Self {
            live,
            initing,
            load: None,
            releases,
            now,
            mono,
        }
    }

    pub(super) fn load(&mut self, state: &GlobalState) -> &mut Load {
        let (live, initing) = (self.live, self.initing);
        self.load
            .get_or_insert_with(|| Load::new(state, live, initing))
    }
}

/// Current assignments per live executor, ordered by (initing, load, id):
/// executors that heartbeat to this leader first, the least loaded first; kept
/// current as the tick unassigns and assigns.
pub(super) struct Load {
    /// (initing, load) per live executor.
    pub(super) count: HashMap<String, (bool, usize)>,
    pub(super) order: BTreeSet<(bool, usize, String)>,
}

impl Load {
    pub(super) fn new(
        state: &GlobalState,
        live: &BTreeMap<String, LiveExecutor>,
        initing: &HashSet<String>,
    ) -> Self {
        let count: HashMap<String, (bool, usize)> = live
            .keys()
            .map(|id| (id.clone(), (initing.contains(id), state.load_of(id))))
            .collect();
        let order = count
            .iter()
            .map(|(id, (initing, n))| (*initing, *n, id.clone()))
            .collect();
        Self { count, order }
    }

    pub(super) fn add(&mut self, executor: &str, delta: isize) {
        let Some((initing, n)) = self.count.get_mut(executor) else {
            return;
        };
        self.order.remove(&(*initing, *n, executor.to_owned()));
        *n = n.saturating_add_signed(delta);
        self.order.insert((*initing, *n, executor.to_owned()));
    }

    /// The least loaded live executor (ties by id) whose labels match, among
    /// those that heartbeat to this leader; an initing one (just registered,
    /// or loaded from the store by a new leader and possibly gone) only when
    /// none of those matches.
    pub(super) fn least_loaded(
        &self,
        live: &BTreeMap<String, LiveExecutor>,
        selector: &BTreeMap<String, String>,
    ) -> Option<String> {
        self.order
            .iter()
            .find(|(_, _, id)| {
                let labels = &live[id.as_str()].labels;
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .map(|(_, _, id)| id.clone())
    }
}

/// The decision for one changefeed, turned into one patch group.
pub(super) struct Plan<'a> {
    pub(super) cf: &'a ChangefeedId,
    pub(super) entry: &'a ChangefeedEntry,
    pub(super) info: &'a ChangefeedInfo,
    pub(super) group: PatchGroup,
    pub(super) status: ChangefeedStatus,
    pub(super) status_changed: bool,
    /// The checkpoint moved forward this tick (written with any other status
    /// change, else when the write budget lets it).
    pub(super) checkpoint_advanced: bool,
    /// The info to write: the changefeed failed or finished this tick.
    pub(super) new_info: Option<ChangefeedInfo>,
    /// The changefeed's state is `normal`.
    pub(super) running: bool,
    /// Its current assignment, if it runs and the executor is live.
    pub(super) current: Option<String>,
    /// The assignment it keeps after this tick's progress.
    pub(super) assigned: Option<String>,
}

impl<'a> Plan<'a> {
    pub(super) fn new(
        state: &GlobalState,
        live: &BTreeMap<String, LiveExecutor>,
        cf: &'a ChangefeedId,
        entry: &'a ChangefeedEntry,
        info: &'a ChangefeedInfo,
    ) -> Self {
        let running = info.state == FeedState::Normal;
        let current = entry
            .current_executor()
            .filter(|e| running && live.contains_key(*e))
            .map(str::to_owned);
        Self {
            cf,
            entry,
            info,
            group: vec![DataPatch::guard(state.keys.info(cf))],
            status: entry.status.clone().unwrap_or_default(),
            status_changed: entry.status.is_none(),
            checkpoint_advanced: false,
            new_info: None,
            running,
            assigned: current.clone(),
            current,
        }
    }

    /// Every task that is not the current live assignment goes once it is
    /// released (the hand-off rule, [`super::release`]); the first one still
    /// held, if any: nothing is assigned while it is.
    pub(super) fn release_stale_tasks(
        &mut self,
        state: &GlobalState,
        tick: &mut Tick,
    ) -> Option<Held> {
        release_tasks(
            &mut self.group,
            state,
            tick,
            self.cf,
            self.entry,
            self.current.as_deref(),
        )
    }

    /// Records the executor of the current assignment in the status (what the
    /// API reads instead of scanning task keys): set when it runs somewhere,
    /// cleared when the status would otherwise still name one for this epoch.
    pub(super) fn set_holder(&mut self) {
        let desired = self
            .assigned
            .as_ref()
            .filter(|_| self.still_running())
            .map(|executor| Holder {
                executor: executor.clone(),
                epoch: self.status.epoch,
            });
        let shown = self.status.current_holder().is_some();
        if self.status.holder != desired && (desired.is_some() || shown) {
            self.status.holder = desired;
            self.status_changed = true;
        }
    }

    /// Shows the task being released (`None`: nothing is) in the status.
    pub(super) fn set_releasing(&mut self, releasing: Option<Releasing>) {
        if self.status.releasing != releasing {
            self.status.releasing = releasing;
            self.status_changed = true;
        }
    }

    /// Still `normal` after this tick (not failed or finished by it).
    pub(super) fn still_running(&self) -> bool {
        self.new_info
            .as_ref()
            .map_or(self.running, |i| i.state == FeedState::Normal)
    }

    /// It should run and has no executor.
    pub(super) fn needs_executor(&self) -> bool {
        self.still_running() && self.assigned.is_none() && self.current.is_none()
    }

    pub(super) fn set_pending_reason(&mut self, reason: Option<String>) {
        if self.status.pending_reason != reason {
            self.status.pending_reason = reason;
            self.status_changed = true;
        }
    }

    /// Running on a live executor, or deliberately not running (paused,
    /// finished): nothing is pending.
    pub(super) fn clear_pending_reason(&mut self) {
        if (self.assigned.is_some() || !self.still_running())
            && self.new_info.is_none()
            && self.status.pending_reason.is_some()
        {
            self.status.pending_reason = None;
            self.status_changed = true;
        }
    }

    /// The group: what was decided, then the new info and status (`None`
    /// when nothing but the guard is in it), and whether the status is in it.
    /// A status whose only change is an advanced checkpoint is left out and
    /// is flagged as [`Scheduled::checkpoint_advanced`].
    pub(super) fn into_scheduled(mut self, state: &GlobalState, server_id: &str) -> Scheduled {
        if let Some(info) = self.new_info {
            self.group
                .push(DataPatch::put(state.keys.info(self.cf), json(&info)));
        }
        if self.status_changed {
            self.status.written_by = server_id.to_owned();
            self.group.push(DataPatch::put(
                state.keys.status(self.cf),
                json(&self.status),
            ));
        }
        Scheduled {
            group: (self.group.len() > 1).then_some(self.group),
            wait: Wait::Nothing,
            wrote_status: self.status_changed,
            checkpoint_advanced: self.checkpoint_advanced && !self.status_changed,
        }
    }
}

/// What a changefeed still waits for after a tick.
pub(super) enum Wait {
    Nothing,
    /// An executor that matches (none is live, or none matches).
    Executor,
    /// The end of its backoff after an error (ms).
    Until(u64),
}

/// One changefeed's outcome of a tick.
pub(super) struct Scheduled {
    pub(super) group: Option<PatchGroup>,
    pub(super) wait: Wait,
    /// The status is written by `group`.
    pub(super) wrote_status: bool,
    /// Only the checkpoint advanced: it waits for the write budget.
    pub(super) checkpoint_advanced: bool,
}

/// A task taken away from its executor and not released yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Held {
    pub(super) executor: String,
    pub(super) epoch: u64,
    /// When its executor's lease has certainly lapsed (wall-clock ms, for the
    /// status and the wake-up; the rule itself counts on the monotonic clock).
    pub(super) deadline: u64,
}

/// Queues the deletes of `cf`'s task keys other than `current`'s that are
/// released (a position without a task goes at once), at most
/// [`MAX_STALE_TASKS_PER_TICK`] executors' worth (the rest next tick); returns the
/// held task with the latest deadline, if any (the changefeed waits for all of
/// them). Every task is checked, those past the cap too: one held beyond it still
/// holds the changefeed back.
pub(super) fn release_tasks(
    group: &mut PatchGroup,
    state: &GlobalState,
    tick: &mut Tick,
    cf: &ChangefeedId,
    entry: &ChangefeedEntry,
    current: Option<&str>,
) -> Option<Held> {
    let mut held: Option<Held> = None;
    let mut deleted = 0;
    for executor in entry.task_holders() {
        if Some(executor.as_str()) == current {
            continue;
        }
        if let Some(task) = entry.tasks.get(executor) {
            let how = match tick
                .releases
                .check(cf, executor, task.epoch, tick.mono, tick.now)
            {
                Verdict::Wait { wall, .. } => {
                    if held.as_ref().is_none_or(|h| h.deadline < wall) {
                        held = Some(Held {
                            executor: executor.clone(),
                            epoch: task.epoch,
                            deadline: wall,
                        });
                    }
                    continue;
                }
                Verdict::Acknowledged => "acknowledged",
                Verdict::Lapsed => "lapsed",
            };
            if deleted == MAX_STALE_TASKS_PER_TICK {
                // Released, deleted next tick: it no longer holds anything back.
                continue;
            }
            crate::metrics::owner()
                .released_total
                .with_label_values(&[how])
                .inc();
        } else if deleted == MAX_STALE_TASKS_PER_TICK {
            continue;
        }
        delete_task(group, state, cf, entry, executor);
        deleted += 1;
    }
    held
}

/// Queues the deletes of `executor`'s task keys of `cf` that exist.
pub(super) fn delete_task(
    group: &mut PatchGroup,
    state: &GlobalState,
    cf: &ChangefeedId,
    entry: &ChangefeedEntry,
    executor: &str,
) {
    if entry.tasks.contains_key(executor) {
        group.push(DataPatch::delete(state.keys.task_status(cf, executor)));
    }
    if entry.positions.contains_key(executor) {
        group.push(DataPatch::delete(state.keys.task_position(cf, executor)));
    }
}
