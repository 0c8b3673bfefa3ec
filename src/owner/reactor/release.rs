//! The hand-off rule, in one place: a task taken away from its executor is
//! *released* before its changefeed may be assigned again.
//!
//! A task is taken away when it stops being the changefeed's current live
//! assignment, whatever the reason: a new epoch (pause, resume, update, an error
//! retry), the changefeed finished, failed or deleted, or the executor gone
//! (expired or deregistered). From then on the heartbeat answers list it under
//! `revoked` instead of `assignments`, and the executor may still run it until
//! one of these:
//! - it acknowledged the stop (a heartbeat's `stopped` names the task's
//!   changefeed and epoch, sent only after its workload confirmed the stop);
//! - its lease has certainly lapsed: it went offline by expiry (the registry
//!   expires no earlier than TTL after the last heartbeat received), or was
//!   deregistered and the TTL after its last heartbeat has passed (the
//!   registry says how long that is), or `max_lease` (the longest TTL the
//!   registry grants) has passed since this owner first saw the task taken
//!   away. That last bound holds in every case, a new leader included: the
//!   answers that listed the task were all given before this owner saw it taken
//!   away (the board drops it before the reactor ticks on the change; a
//!   deposed leader stops answering before the next is elected), and a lease
//!   runs at most `max_lease` from the request it answered.
//!
//! Nothing here is persisted: a new owner starts with nothing pending and
//! derives the rest from the task keys, which stay in etcd until released.
//! The one assumption is the lease's: clocks run at nearly the same rate. Times
//! here are on the owner's monotonic clock (a step of the wall clock cannot
//! release anything early); each wait also keeps its deadline on the wall
//! clock, fixed when the wait starts, for operators.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use super::super::model::ChangefeedId;

/// Whether a task taken away may be deleted (and its changefeed assigned again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Released: the executor confirmed the stop.
    Acknowledged,
    /// Released: its lease has certainly ended.
    Lapsed,
    /// Not before `deadline` (monotonic ms; `wall`: the same on the wall clock),
    /// unless the executor acknowledges earlier.
    Wait { deadline: u64, wall: u64 },
}

/// A task this owner saw taken away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    epoch: u64,
    /// `max_lease` after this owner first saw it taken away (monotonic ms).
    deadline: u64,
    /// `deadline` on the wall clock, as of when the wait started.
    wall: u64,
    acked: bool,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub(super) struct Releases {
    pending: HashMap<ChangefeedId, BTreeMap<String, Pending>>,
    /// The changefeeds each executor has a pending task of (to revisit them
    /// when it goes offline).
    by_executor: HashMap<String, BTreeSet<ChangefeedId>>,
    /// Executors that went offline, and when their lease has certainly
    /// lapsed (ms); forgotten `max_lease` later (every pending deadline then
    /// bounds it anyway), in `gone_order`.
    gone: HashMap<String, u64>,
    gone_order: VecDeque<(u64, String)>,
    /// The longest lease any executor may hold (ms).
    max_lease_ms: u64,
}

impl Releases {
    pub(super) fn new(max_lease_ms: u64) -> Self {
        Self {
            max_lease_ms,
            ..Self::default()
        }
    }

    /// `executor` acknowledged that it stopped `cf` at `epoch` (the heartbeat
    /// path checked that this task was taken away from it).
    pub(super) fn acknowledged(&mut self, cf: &ChangefeedId, executor: &str, epoch: u64, now: u64) {
        let deadline = now.saturating_add(self.max_lease_ms);
        let slot = self
            .pending
            .entry(cf.clone())
            .or_default()
            .entry(executor.to_owned())
            .or_insert(Pending {
                epoch,
                deadline,
                wall: 0,
                acked: false,
            });
        if slot.epoch == epoch {
            slot.acked = true;
        } else {
            // An ack of another task of this executor: a fresh record of it.
            *slot = Pending {
                epoch,
                deadline,
                wall: 0,
                acked: true,
            };
        }
        self.by_executor
            .entry(executor.to_owned())
            .or_default()
            .insert(cf.clone());
    }

    /// `executor` went offline; its lease has certainly lapsed at
    /// `lease_ends` (ms; now or earlier for an expiry). Returns the
    /// changefeeds with a task of it pending, to visit again.
    pub(super) fn offline(
        &mut self,
        executor: &str,
        lease_ends: u64,
        now: u64,
    ) -> Vec<ChangefeedId> {
        self.gone.insert(executor.to_owned(), lease_ends);
        self.gone_order.push_back((now, executor.to_owned()));
        self.by_executor
            .get(executor)
            .map(|cfs| cfs.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether `executor`'s task of `cf` at `epoch`, taken away, is released;
    /// the first call for a task starts its wait. `now`: monotonic ms;
    /// `wall_now`: the wall clock's, for the deadline shown.
    pub(super) fn check(
        &mut self,
        cf: &ChangefeedId,
        executor: &str,
        epoch: u64,
        now: u64,
        wall_now: u64,
    ) -> Verdict {
        let fresh = Pending {
            epoch,
            deadline: now.saturating_add(self.max_lease_ms),
            wall: wall_now.saturating_add(self.max_lease_ms),
            acked: false,
        };
        let slot = self
            .pending
            .entry(cf.clone())
            .or_default()
            .entry(executor.to_owned())
            .or_insert(fresh);
        if slot.epoch != epoch {
            *slot = fresh;
        }
        let pending = *slot;
        self.by_executor
            .entry(executor.to_owned())
            .or_default()
            .insert(cf.clone());
        if pending.acked {
            return Verdict::Acknowledged;
        }
        let deadline = match self.gone.get(executor) {
            Some(&lapsed) => pending.deadline.min(lapsed),
            None => pending.deadline,
        };
        if now >= deadline {
            Verdict::Lapsed
        } else {
            Verdict::Wait {
                deadline,
                wall: pending.wall.saturating_sub(pending.deadline - deadline),
            }
        }
    }

    /// Forgets `cf`'s pending tasks of executors `has_task` says no longer
    /// hold one (deleted: released, or the changefeed is gone).
    pub(super) fn forget(&mut self, cf: &ChangefeedId, has_task: impl Fn(&str, u64) -> bool) {
        let Some(tasks) = self.pending.get_mut(cf) else {
            return;
        };
        let by_executor = &mut self.by_executor;
        tasks.retain(|executor, pending| {
            let keep = has_task(executor, pending.epoch);
            if !keep {
                if let Some(cfs) = by_executor.get_mut(executor) {
                    cfs.remove(cf);
                    if cfs.is_empty() {
                        by_executor.remove(executor);
                    }
                }
            }
            keep
        });
        if tasks.is_empty() {
            self.pending.remove(cf);
        }
    }

    /// Forgets the offline executors noted more than `max_lease` ago: any
    /// task of theirs pending since has a deadline no later than theirs.
    pub(super) fn prune(&mut self, now: u64) {
        while let Some((at, _)) = self.gone_order.front() {
            if now.saturating_sub(*at) <= self.max_lease_ms {
                break;
            }
            let (_, executor) = self.gone_order.pop_front().expect("not empty");
            self.gone.remove(&executor);
        }
    }

    /// Tasks waiting to be released (for the metrics).
    pub(super) fn len(&self) -> usize {
        self.pending.values().map(BTreeMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cf() -> ChangefeedId {
        ChangefeedId::new("default", "a")
    }

    #[test]
    fn a_task_waits_for_the_longest_lease_unless_acknowledged() {
        let mut r = Releases::new(60_000);
        assert_eq!(
            r.check(&cf(), "e1", 3, 1_000, 1_000),
            Verdict::Wait {
                deadline: 61_000,
                wall: 61_000
            }
        );
        // The deadline is from when the task was first seen taken away.
        assert_eq!(
            r.check(&cf(), "e1", 3, 30_000, 30_000),
            Verdict::Wait {
                deadline: 61_000,
                wall: 61_000
            }
        );
        assert_eq!(r.check(&cf(), "e1", 3, 61_000, 61_000), Verdict::Lapsed);
        let mut r = Releases::new(60_000);
        r.check(&cf(), "e1", 3, 1_000, 1_000);
        // An ack of another epoch releases nothing of this one.
        r.acknowledged(&cf(), "e2", 3, 2_000);
        assert!(matches!(
            r.check(&cf(), "e1", 3, 2_000, 2_000),
            Verdict::Wait { .. }
        ));
        r.acknowledged(&cf(), "e1", 3, 2_000);
        assert_eq!(r.check(&cf(), "e1", 3, 2_000, 2_000), Verdict::Acknowledged);
    }

    #[test]
    fn an_offline_executor_s_lease_end_shortens_the_wait() {
        let mut r = Releases::new(60_000);
        r.check(&cf(), "e1", 3, 1_000, 1_000);
        assert_eq!(r.offline("e1", 9_000, 2_000), vec![cf()]);
        assert_eq!(
            r.check(&cf(), "e1", 3, 2_000, 2_000),
            Verdict::Wait {
                deadline: 9_000,
                wall: 9_000
            }
        );
        assert_eq!(r.check(&cf(), "e1", 3, 9_000, 9_000), Verdict::Lapsed);
        // Expired: lapsed already.
        r.offline("e2", 2_000, 2_000);
        assert_eq!(r.check(&cf(), "e2", 7, 2_000, 2_000), Verdict::Lapsed);
        // Forgotten a longest lease later; a task seen after that waits its own.
        r.prune(62_001);
        assert_eq!(
            r.check(&cf(), "e3", 1, 62_001, 62_001),
            Verdict::Wait {
                deadline: 122_001,
                wall: 122_001
            }
        );
    }

    #[test]
    fn a_new_task_of_the_same_executor_starts_a_new_wait() {
        let mut r = Releases::new(10);
        r.acknowledged(&cf(), "e1", 3, 0);
        assert_eq!(r.check(&cf(), "e1", 3, 0, 0), Verdict::Acknowledged);
        assert_eq!(
            r.check(&cf(), "e1", 5, 0, 0),
            Verdict::Wait {
                deadline: 10,
                wall: 10
            }
        );
        r.forget(&cf(), |_, _| false);
        assert_eq!(r.len(), 0);
        assert!(r.by_executor.is_empty());
    }
}
