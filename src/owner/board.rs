//! `WorkBoard`: what every executor must run, readable from any thread.
//!
//! [`GlobalState`](super::state::GlobalState) keeps it current as committed
//! updates arrive (each update refreshes only the changefeed it touched), so
//! a heartbeat is answered on the HTTP worker's own thread: no message to the
//! owner, no wait for a tick. It holds committed data only, like the state
//! it mirrors.
//!
//! Until the worker's first tick (the first consistent snapshot of etcd) and
//! after the worker stops, the board is not ready and answers nothing: an
//! empty list would tell every executor to stop its work.
//!
//! Each executor's work has a generation, changed whenever what it must run or
//! stop changes (not when only a persisted checkpoint moves: that matters only
//! where an assignment starts). An executor that sends the generation it last
//! saw gets "unchanged" instead of its whole list while it is current: an
//! answer of a few bytes, not one per assignment, every heartbeat. Generations
//! start at a random base per board, so a new leader's cannot be mistaken for
//! the last one's, and the base itself always means "nothing".

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::Serialize;

use super::model::{ChangefeedId, FeedState};
use super::reactor::ProgressReport;
use super::state::ChangefeedEntry;

/// A changefeed an executor must run, as committed in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Assignment {
    pub namespace: String,
    pub changefeed: String,
    pub epoch: u64,
    pub sink_uri: String,
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    /// Where to resume from.
    pub checkpoint_ts: u64,
}

/// A progress report the owner refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Rejected {
    pub namespace: String,
    pub changefeed: String,
    pub epoch: u64,
    pub reason: String,
}

/// A task taken away from an executor that has not acknowledged the stop yet:
/// the executor must stop it (if it still runs it) and then name it in a
/// heartbeat's `stopped`; until then, or until its lease lapses, the changefeed
/// is not assigned to anyone else.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Revoked {
    pub namespace: String,
    pub changefeed: String,
    pub epoch: u64,
}

/// What an executor learns from a heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Work {
    pub assignments: Vec<Assignment>,
    pub rejected: Vec<Rejected>,
    pub revoked: Vec<Revoked>,
    /// The generation of `assignments` and `revoked`.
    pub generation: u64,
    /// The executor's known generation is current: `assignments` and `revoked`
    /// are left out (empty), the ones it has still hold.
    pub unchanged: bool,
}

/// What the owner takes from a heartbeat: the progress of current assignments,
/// and the stops acknowledged of tasks taken away (changefeed, epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accepted {
    pub progress: Vec<ProgressReport>,
    pub stopped: Vec<(ChangefeedId, u64)>,
}

/// Which key of a changefeed changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Touched<'a> {
    /// Its info or status: every executor it has a task on.
    Feed,
    /// The task key of this executor.
    Task(&'a str),
    /// A position key: no assignment changes.
    Position,
}

/// One task key of an executor.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    /// The epoch in the task key.
    epoch: u64,
    /// `Some` when the executor must run it: the changefeed is `normal` and
    /// this task is its current epoch.
    assignment: Option<Assignment>,
}

/// Where a changefeed runs now, for the reason a report is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Current {
    epoch: Option<u64>,
    executor: Option<String>,
}

#[derive(Debug, Default)]
struct Tables {
    by_executor: HashMap<String, BTreeMap<ChangefeedId, Slot>>,
    /// Every changefeed with at least one key.
    feeds: HashMap<ChangefeedId, Current>,
    /// The generation of each executor's slots; `base` for one with none.
    generations: HashMap<String, u64>,
    /// This board's first generation (random), and the next one to hand out.
    base: u64,
    next: u64,
}

impl Tables {
    fn fresh() -> Self {
        let base = rand::random::<u64>() >> 1;
        Tables {
            base,
            next: base.wrapping_add(1),
            ..Tables::default()
        }
    }

    /// `executor`'s work changed: a new generation.
    fn bump(&mut self, executor: &str) {
        let generation = self.next;
        self.next = self.next.wrapping_add(1);
        if self.next == self.base {
            self.next = self.next.wrapping_add(1);
        }
        self.generations.insert(executor.to_owned(), generation);
    }

    fn generation(&self, executor: &str) -> u64 {
        self.generations.get(executor).copied().unwrap_or(self.base)
    }
}

/// Whether two slots ask the same of their executor (a moved checkpoint
/// alone does not: it matters only where an assignment starts).
fn same_work(a: &Slot, b: &Slot) -> bool {
    let strip = |s: &Slot| {
        s.assignment.as_ref().map(|a| Assignment {
            checkpoint_ts: 0,
            ..a.clone()
        })
    };
    a.epoch == b.epoch && strip(a) == strip(b)
}

/// See the module documentation.
#[derive(Debug)]
pub struct WorkBoard {
    ready: AtomicBool,
    tables: RwLock<Tables>,
}

/// Not derived: `Tables::default()` has base 0 and next 0, so its first
/// generation would equal the base ("nothing") and an executor that saw it
/// empty would be told "unchanged" about its first assignment.
impl Default for WorkBoard {
    fn default() -> Self {
        Self {
            ready: AtomicBool::new(false),
            tables: RwLock::new(Tables::fresh()),
        }
    }
}

impl WorkBoard {
    /// Whether the board reflects a consistent snapshot of etcd.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Called at each tick: the state behind the board is a consistent
    /// snapshot.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Forgets everything (a new worker starts from an empty state).
    pub fn clear(&self) {
        self.ready.store(false, Ordering::Release);
        *self.write() = Tables::fresh();
    }

    fn read(&self) -> RwLockReadGuard<'_, Tables> {
        // Every write replaces whole values: a panic elsewhere cannot leave
        // a half-written one behind.
        self.tables.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Brings `cf` up to date after one of its keys changed. `entry` is
    /// `None` once the changefeed has no key left.
    pub(super) fn refresh(
        &self,
        cf: &ChangefeedId,
        entry: Option<&ChangefeedEntry>,
        touched: Touched<'_>,
    ) {
        let executor = match touched {
            Touched::Task(executor) => Some(executor),
            Touched::Feed | Touched::Position => None,
        };
        let mut tables = self.write();
        let Some(entry) = entry else {
            tables.feeds.remove(cf);
            if let Some(executor) = executor {
                remove_slot(&mut tables, executor, cf);
            }
            return;
        };
        if touched == Touched::Position {
            // Progress changes no assignment; only a changefeed seen for the
            // first time through a position key needs an entry.
            if !tables.feeds.contains_key(cf) {
                tables.feeds.insert(cf.clone(), Current::default());
            }
            return;
        }
        let current = Current {
            epoch: entry.status.as_ref().map(|s| s.epoch),
            executor: entry.current_executor().map(str::to_owned),
        };
        if tables.feeds.get(cf) != Some(&current) {
            tables.feeds.insert(cf.clone(), current);
        }
        if let Some(executor) = executor {
            if !entry.tasks.contains_key(executor) {
                remove_slot(&mut tables, executor, cf);
            }
        }
        for (executor, task) in &entry.tasks {
            let assignment = match (&entry.info, &entry.status) {
                (Some(info), Some(status))
                    if info.state == FeedState::Normal && task.epoch == status.epoch =>
                {
                    Some(Assignment {
                        namespace: cf.namespace.clone(),
                        changefeed: cf.id.clone(),
                        epoch: task.epoch,
                        sink_uri: info.sink_uri.clone(),
                        config: info.config.clone(),
                        checkpoint_ts: status.checkpoint_ts,
                    })
                }
                _ => None,
            };
            let slot = Slot {
                epoch: task.epoch,
                assignment,
            };
            let slots = tables.by_executor.entry(executor.clone()).or_default();
            match slots.get(cf) {
                Some(old) if *old == slot => {}
                Some(old) if same_work(old, &slot) => {
                    slots.insert(cf.clone(), slot);
                }
                _ => {
                    slots.insert(cf.clone(), slot);
                    tables.bump(executor);
                }
            }
        }
    }

    /// The changefeeds (`namespace/id`) each of `executors` must run, under
    /// one read lock; empty lists while the board is not ready.
    pub fn assigned<'a>(&self, executors: impl IntoIterator<Item = &'a str>) -> Vec<Vec<String>> {
        let ready = self.is_ready();
        let tables = self.read();
        executors
            .into_iter()
            .map(|executor| match tables.by_executor.get(executor) {
                Some(slots) if ready => slots
                    .iter()
                    .filter(|(_, slot)| slot.assignment.is_some())
                    .map(|(cf, _)| format!("{}/{}", cf.namespace, cf.id))
                    .collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// The committed assignments of `executor` and the tasks taken away from
    /// it, which of its reports to accept (only those for its current
    /// assignment at the current epoch) and which of its acknowledged stops
    /// (only those of a task taken away from it: a stop of a current
    /// assignment releases nothing). `None` while the board is not ready.
    pub fn work_for(
        &self,
        executor: &str,
        progress: Vec<ProgressReport>,
        stopped: Vec<(ChangefeedId, u64)>,
        known: Option<u64>,
    ) -> Option<(Work, Accepted)> {
        if !self.is_ready() {
            return None;
        }
        let tables = self.read();
        let slots = tables.by_executor.get(executor);
        let generation = tables.generation(executor);
        let mut work = Work {
            generation,
            unchanged: known == Some(generation),
            ..Work::default()
        };
        let listed = if work.unchanged { None } else { slots };
        for (cf, slot) in listed.into_iter().flatten() {
            match &slot.assignment {
                Some(assignment) => work.assignments.push(assignment.clone()),
                None => work.revoked.push(Revoked {
                    namespace: cf.namespace.clone(),
                    changefeed: cf.id.clone(),
                    epoch: slot.epoch,
                }),
            }
        }
        let stopped = stopped
            .into_iter()
            .filter(|(cf, epoch)| {
                let slot = slots.and_then(|slots| slots.get(cf));
                slot.is_some_and(|s| s.epoch == *epoch && s.assignment.is_none())
            })
            .collect();
        let mut accepted = Vec::new();
        for report in progress {
            let reason = match tables.feeds.get(&report.changefeed) {
                None => Some("unknown_changefeed".to_owned()),
                Some(current) => {
                    let task = slots.and_then(|slots| slots.get(&report.changefeed));
                    if task.is_some_and(|t| t.epoch == report.epoch)
                        && current.epoch == Some(report.epoch)
                    {
                        None
                    } else {
                        Some(format!(
                            "stale_epoch: the changefeed runs at epoch {} on {}",
                            current.epoch.unwrap_or(0),
                            current.executor.as_deref().unwrap_or("no executor")
                        ))
                    }
                }
            };
            match reason {
                None => accepted.push(report),
                Some(reason) => work.rejected.push(Rejected {
                    namespace: report.changefeed.namespace.clone(),
                    changefeed: report.changefeed.id.clone(),
                    epoch: report.epoch,
                    reason,
                }),
            }
        }
        drop(tables);
        Some((
            work,
            Accepted {
                progress: accepted,
                stopped,
            },
        ))
    }
}

fn remove_slot(tables: &mut Tables, executor: &str, cf: &ChangefeedId) {
    if let Some(slots) = tables.by_executor.get_mut(executor) {
        if slots.remove(cf).is_some() {
            if slots.is_empty() {
                // Nothing left: the base generation, which means nothing.
                tables.by_executor.remove(executor);
                tables.generations.remove(executor);
            } else {
                tables.bump(executor);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever way a board is made, an executor's first slot is a new
    /// generation, never the base an empty executor was told.
    #[test]
    fn a_first_assignment_is_never_the_empty_generation() {
        for board in [WorkBoard::default(), {
            let b = WorkBoard::default();
            b.clear();
            b
        }] {
            board.set_ready();
            let (empty, _) = board.work_for("e1", vec![], vec![], None).unwrap();
            let mut tables = board.write();
            tables.by_executor.entry("e1".into()).or_default().insert(
                ChangefeedId::new("default", "a"),
                Slot {
                    epoch: 1,
                    assignment: None,
                },
            );
            tables.bump("e1");
            drop(tables);
            let (after, _) = board
                .work_for("e1", vec![], vec![], Some(empty.generation))
                .unwrap();
            assert!(!after.unchanged, "the first slot must be a change");
            assert_eq!(after.revoked.len(), 1);
        }
    }
}
