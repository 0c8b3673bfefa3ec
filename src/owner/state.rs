//! `GlobalState`: the typed view of a cluster prefix the owner ticks over.
//!
//! Values are decoded once, as the worker delivers them. A malformed value
//! (written from outside) is reported to the worker, which logs and skips it:
//! the key keeps its last good value here and no other changefeed is
//! affected.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::state::{self as state, PatchGroup, ReactorState};

use super::board::{Touched, WorkBoard};
use super::model::{
    ChangefeedId, ChangefeedInfo, ChangefeedStatus, ExecutorRecord, Key, Keys, TaskPosition,
    TaskStatus,
};
use super::small_map::SmallMap;

/// Everything stored about one changefeed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangefeedEntry {
    pub info: Option<ChangefeedInfo>,
    pub status: Option<ChangefeedStatus>,
    /// Assignments by executor id.
    pub tasks: SmallMap<TaskStatus>,
    /// Progress by executor id.
    pub positions: SmallMap<TaskPosition>,
}

impl ChangefeedEntry {
    fn is_empty(&self) -> bool {
        self.info.is_none()
            && self.status.is_none()
            && self.tasks.is_empty()
            && self.positions.is_empty()
    }

    /// Every executor with a task status or a task position here.
    pub fn task_holders(&self) -> std::collections::BTreeSet<&String> {
        self.tasks.keys().chain(self.positions.keys()).collect()
    }

    /// The executor holding the current assignment (epoch == status.epoch).
    pub fn current_executor(&self) -> Option<&str> {
        let epoch = self.status.as_ref()?.epoch;
        self.tasks
            .iter()
            .find(|(_, t)| t.epoch == epoch)
            .map(|(executor, _)| executor.as_str())
    }
}

/// The cluster as stored in etcd.
#[derive(Debug)]
pub struct GlobalState {
    pub keys: Keys,
    pub changefeeds: BTreeMap<ChangefeedId, ChangefeedEntry>,
    /// The mirror of the registry under `__meta__/executor/`.
    pub executors: BTreeMap<String, ExecutorRecord>,
    /// Changefeeds whose info key holds a value that does not decode. The
    /// owner leaves them alone (it must not mistake them for leftovers of a
    /// deleted changefeed) until the key is fixed or deleted.
    pub unreadable: BTreeSet<ChangefeedId>,
    /// Each executor's work, kept current for the heartbeat path.
    board: Arc<WorkBoard>,
    patches: Vec<PatchGroup>,
    /// Changefeeds changed since the last [`Self::take_touched`].
    touched: BTreeSet<ChangefeedId>,
    /// The changefeeds whose current assignment (the task at the status's
    /// epoch) each executor holds, and the reverse.
    running_on: HashMap<String, BTreeSet<ChangefeedId>>,
    current_of: HashMap<ChangefeedId, String>,
    /// The revision this state reflects (set before each tick).
    revision: i64,
}

impl GlobalState {
    pub fn new(keys: Keys) -> Self {
        Self::with_board(keys, Arc::default())
    }

    /// A state that keeps `board` current; the board is cleared first.
    pub fn with_board(keys: Keys, board: Arc<WorkBoard>) -> Self {
        board.clear();
        Self {
            keys,
            changefeeds: BTreeMap::new(),
            executors: BTreeMap::new(),
            unreadable: BTreeSet::new(),
            board,
            patches: Vec::new(),
            touched: BTreeSet::new(),
            running_on: HashMap::new(),
            current_of: HashMap::new(),
            revision: 0,
        }
    }

    /// The epoch after `epoch`: above it, and above the revision this state
    /// reflects, so epochs rise per changefeed id forever, across a delete
    /// and a create (`None`: `epoch` is the last one).
    ///
    /// Why that holds: every epoch is written at a revision at least as high
    /// as itself (`revision + 1` is written by a txn after `revision`, and
    /// `old + 1` after `old` was), so the epochs of a deleted changefeed are at
    /// most its delete's revision, which a state showing the new changefeed
    /// has passed. The API bumps epochs the same way ([`next_epoch`]).
    pub fn next_epoch(&self, epoch: u64) -> Option<u64> {
        next_epoch(epoch, self.revision)
    }

    /// The changefeeds changed since the last call (by any key of theirs).
    pub fn take_touched(&mut self) -> BTreeSet<ChangefeedId> {
        std::mem::take(&mut self.touched)
    }

    /// The changefeeds whose current assignment `executor` holds.
    pub fn running_on(&self, executor: &str) -> impl Iterator<Item = &ChangefeedId> {
        self.running_on.get(executor).into_iter().flatten()
    }

    /// How many current assignments `executor` holds.
    pub fn load_of(&self, executor: &str) -> usize {
        self.running_on.get(executor).map_or(0, BTreeSet::len)
    }

    /// Keeps [`Self::running_on`] true for `cf` after a change of it.
    fn reindex(&mut self, cf: &ChangefeedId) {
        let now = self
            .changefeeds
            .get(cf)
            .and_then(ChangefeedEntry::current_executor);
        if self.current_of.get(cf).map(String::as_str) == now {
            return;
        }
        let now = now.map(str::to_owned);
        if let Some(old) = self.current_of.remove(cf) {
            if let Some(set) = self.running_on.get_mut(&old) {
                set.remove(cf);
                if set.is_empty() {
                    self.running_on.remove(&old);
                }
            }
        }
        if let Some(executor) = now {
            self.running_on
                .entry(executor.clone())
                .or_default()
                .insert(cf.clone());
            self.current_of.insert(cf.clone(), executor);
        }
    }

    /// The board this state keeps current.
    pub fn board(&self) -> &Arc<WorkBoard> {
        &self.board
    }

    /// Queues one atomic group of patches.
    pub fn queue(&mut self, group: PatchGroup) {
        if !group.is_empty() {
            self.patches.push(group);
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, state::Error> {
    crate::json::from_object(value).map_err(|e| state::Error::Malformed {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// Stores `value` (decoded) in `slot`, or clears it on a delete.
fn set<T: serde::de::DeserializeOwned>(
    slot: &mut Option<T>,
    key: &str,
    value: Option<&[u8]>,
) -> Result<(), state::Error> {
    *slot = value.map(|v| decode(key, v)).transpose()?;
    Ok(())
}

fn set_in<T: serde::de::DeserializeOwned>(
    map: &mut SmallMap<T>,
    executor: &str,
    key: &str,
    value: Option<&[u8]>,
) -> Result<(), state::Error> {
    match value {
        Some(v) => {
            map.insert(executor.to_owned(), decode(key, v)?);
        }
        None => {
            map.remove(executor);
        }
    }
    Ok(())
}

impl ReactorState for GlobalState {
    fn update(
        &mut self,
        key: &str,
        value: Option<&[u8]>,
        _is_init: bool,
    ) -> Result<(), state::Error> {
        let Some(parsed) = self.keys.parse(key) else {
            // Not part of the layout (another tool's key under our prefix):
            // not ours to interpret.
            return Ok(());
        };
        let changefeed = match &parsed {
            Key::Owner(_) => return Ok(()),
            Key::Executor(id) => {
                match value {
                    Some(v) => {
                        self.executors.insert(id.clone(), decode(key, v)?);
                    }
                    None => {
                        self.executors.remove(id);
                    }
                }
                return Ok(());
            }
            Key::ChangefeedInfo(cf) | Key::ChangefeedStatus(cf) => cf,
            Key::TaskStatus { changefeed, .. } | Key::TaskPosition { changefeed, .. } => changefeed,
        };
        let entry = self.changefeeds.entry(changefeed.clone()).or_default();
        let result = match &parsed {
            Key::ChangefeedInfo(_) => {
                let result = set(&mut entry.info, key, value);
                if result.is_err() {
                    self.unreadable.insert(changefeed.clone());
                } else {
                    self.unreadable.remove(changefeed);
                }
                result
            }
            Key::ChangefeedStatus(_) => set(&mut entry.status, key, value),
            Key::TaskStatus { executor, .. } => set_in(&mut entry.tasks, executor, key, value),
            Key::TaskPosition { executor, .. } => {
                set_in(&mut entry.positions, executor, key, value)
            }
            Key::Owner(_) | Key::Executor(_) => unreachable!("handled above"),
        };
        let touched = match &parsed {
            Key::TaskStatus { executor, .. } => Touched::Task(executor),
            Key::TaskPosition { .. } => Touched::Position,
            _ => Touched::Feed,
        };
        if entry.is_empty() {
            self.changefeeds.remove(changefeed);
            self.board.refresh(changefeed, None, touched);
        } else {
            self.board.refresh(changefeed, Some(entry), touched);
        }
        let changefeed = changefeed.clone();
        self.reindex(&changefeed);
        self.touched.insert(changefeed);
        result
    }

    fn get_patches(&mut self) -> Vec<PatchGroup> {
        std::mem::take(&mut self.patches)
    }

    fn at_revision(&mut self, revision: i64) {
        self.revision = revision;
    }
}

/// The epoch after `epoch` for a write based on a read at `revision`: above
/// both (`None`: `epoch` is the last one). See [`GlobalState::next_epoch`].
pub fn next_epoch(epoch: u64, revision: i64) -> Option<u64> {
    let floor = u64::try_from(revision).unwrap_or(0).saturating_add(1);
    epoch.checked_add(1).map(|next| next.max(floor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::owner::model::FeedState;

    fn info() -> ChangefeedInfo {
        ChangefeedInfo {
            sink_uri: "blackhole://".into(),
            start_ts: 1,
            target_ts: 0,
            config: serde_json::json!({}),
            selector: BTreeMap::new(),
            state: FeedState::Normal,
            error: None,
            create_time: "2026-11-21T00:00:00Z".into(),
        }
    }

    #[test]
    fn updates_build_entries_and_the_executor_index() {
        let keys = Keys::new("/p");
        let mut state = GlobalState::new(keys.clone());
        let cf = ChangefeedId::new("default", "a");
        state
            .update(
                &keys.info(&cf),
                Some(&serde_json::to_vec(&info()).unwrap()),
                true,
            )
            .unwrap();
        let task = TaskStatus {
            epoch: 1,
            assigned_at: "now".into(),
            written_by: String::new(),
        };
        state
            .update(
                &keys.task_status(&cf, "e1"),
                Some(&serde_json::to_vec(&task).unwrap()),
                false,
            )
            .unwrap();
        assert_eq!(
            state.changefeeds[&cf].tasks.keys().collect::<Vec<_>>(),
            vec!["e1"]
        );
        state
            .update(&keys.task_status(&cf, "e1"), None, false)
            .unwrap();
        assert!(state.changefeeds[&cf].tasks.is_empty());
        state.update(&keys.info(&cf), None, false).unwrap();
        assert!(
            state.changefeeds.is_empty(),
            "an entry with no keys left is dropped"
        );
    }

    #[test]
    fn a_malformed_value_is_reported_and_the_last_good_one_kept() {
        let keys = Keys::new("/p");
        let mut state = GlobalState::new(keys.clone());
        let cf = ChangefeedId::new("default", "a");
        let good = serde_json::to_vec(&info()).unwrap();
        state.update(&keys.info(&cf), Some(&good), false).unwrap();
        let err = state
            .update(&keys.info(&cf), Some(b"garbage"), false)
            .unwrap_err();
        assert!(matches!(err, state::Error::Malformed { .. }));
        assert!(state.changefeeds[&cf].info.is_some());
        // Keys outside the layout are ignored.
        state
            .update("/p/something/else", Some(b"x"), false)
            .unwrap();
        state
            .update("/p/__meta__/owner/abc", Some(b"x"), false)
            .unwrap();
    }

    fn report(cf: &ChangefeedId, epoch: u64) -> crate::owner::reactor::ProgressReport {
        crate::owner::reactor::ProgressReport {
            changefeed: cf.clone(),
            epoch,
            checkpoint_ts: 10,
            resolved_ts: 10,
            error: None,
        }
    }

    #[test]
    fn the_board_follows_assignments_pauses_epochs_and_deletes() {
        use crate::owner::board::Revoked;
        use crate::owner::model::ChangefeedStatus;
        let keys = Keys::new("/p");
        let mut state = GlobalState::new(keys.clone());
        let board = state.board().clone();
        let cf = ChangefeedId::new("default", "a");
        let put = |state: &mut GlobalState, key: String, value: Vec<u8>| {
            state.update(&key, Some(&value), false).unwrap()
        };
        let task = |epoch| {
            serde_json::to_vec(&TaskStatus {
                epoch,
                assigned_at: "now".into(),
                written_by: String::new(),
            })
            .unwrap()
        };
        let status = |epoch, checkpoint_ts| {
            serde_json::to_vec(&ChangefeedStatus {
                epoch,
                checkpoint_ts,
                ..Default::default()
            })
            .unwrap()
        };
        assert!(
            board.work_for("e1", vec![], vec![], None).is_none(),
            "not ready before the first tick"
        );
        board.set_ready();
        put(
            &mut state,
            keys.info(&cf),
            serde_json::to_vec(&info()).unwrap(),
        );
        put(&mut state, keys.status(&cf), status(1, 5));
        put(&mut state, keys.task_status(&cf, "e1"), task(1));
        let (work, accepted) = board
            .work_for("e1", vec![report(&cf, 1)], vec![], None)
            .unwrap();
        assert_eq!(work.assignments.len(), 1);
        assert_eq!(work.assignments[0].epoch, 1);
        assert_eq!(work.assignments[0].checkpoint_ts, 5);
        assert_eq!(accepted.progress, vec![report(&cf, 1)]);
        assert!(work.rejected.is_empty());

        // The checkpoint moves: the assignment says where to resume from. The
        // work is the same: an executor that knows this generation gets
        // "unchanged" and no list.
        let before = work.generation;
        put(&mut state, keys.status(&cf), status(1, 9));
        let (work, _) = board.work_for("e1", vec![], vec![], None).unwrap();
        assert_eq!(work.assignments[0].checkpoint_ts, 9);
        assert_eq!(work.generation, before, "a checkpoint alone is no change");
        let (same, _) = board.work_for("e1", vec![], vec![], Some(before)).unwrap();
        assert!(same.unchanged && same.assignments.is_empty() && same.revoked.is_empty());
        let (old, _) = board
            .work_for("e1", vec![], vec![], Some(before.wrapping_sub(1)))
            .unwrap();
        assert!(!old.unchanged && old.assignments.len() == 1);

        // A stop acknowledged of a task still assigned releases nothing.
        let (_, accepted) = board
            .work_for("e1", vec![], vec![(cf.clone(), 1)], None)
            .unwrap();
        assert!(accepted.stopped.is_empty());

        // Moved to e2 at epoch 2: e1's report is stale, e1 runs nothing and is
        // told its task is revoked; its acknowledgement of that task counts, one
        // of another epoch does not.
        put(&mut state, keys.task_status(&cf, "e2"), task(2));
        put(&mut state, keys.status(&cf), status(2, 9));
        let (work, accepted) = board
            .work_for(
                "e1",
                vec![report(&cf, 1)],
                vec![(cf.clone(), 1), (cf.clone(), 7)],
                None,
            )
            .unwrap();
        assert!(work.assignments.is_empty());
        assert_ne!(work.generation, before, "moved away: a new generation");
        assert!(accepted.progress.is_empty());
        assert_eq!(accepted.stopped, vec![(cf.clone(), 1)]);
        assert_eq!(
            work.revoked,
            vec![Revoked {
                namespace: "default".into(),
                changefeed: "a".into(),
                epoch: 1
            }]
        );
        assert_eq!(
            work.rejected[0].reason,
            "stale_epoch: the changefeed runs at epoch 2 on e2"
        );
        state
            .update(&keys.task_status(&cf, "e1"), None, false)
            .unwrap();
        let (work, _) = board.work_for("e2", vec![], vec![], None).unwrap();
        assert_eq!(work.assignments[0].epoch, 2);

        // Paused: still e2's task, but nothing to run.
        let mut paused = info();
        paused.state = FeedState::Stopped;
        put(
            &mut state,
            keys.info(&cf),
            serde_json::to_vec(&paused).unwrap(),
        );
        let (work, accepted) = board
            .work_for("e2", vec![report(&cf, 2)], vec![], None)
            .unwrap();
        assert!(work.assignments.is_empty());
        assert_eq!(
            work.revoked.len(),
            1,
            "a paused changefeed's task is revoked"
        );
        assert_eq!(
            accepted.progress.len(),
            1,
            "progress of the current epoch counts"
        );

        // Deleted key by key: the changefeed becomes unknown.
        for key in [
            keys.task_status(&cf, "e2"),
            keys.status(&cf),
            keys.info(&cf),
        ] {
            state.update(&key, None, false).unwrap();
        }
        let (work, _) = board
            .work_for("e2", vec![report(&cf, 2)], vec![], None)
            .unwrap();
        assert_eq!(work.rejected[0].reason, "unknown_changefeed");

        // A new state (a restarted worker) starts from an empty board.
        let _fresh = GlobalState::with_board(keys, board.clone());
        assert!(board.work_for("e2", vec![], vec![], None).is_none());
    }
}
