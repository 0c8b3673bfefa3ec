//! `GlobalState::update` with arbitrary keys and values, interleaved with
//! owner ticks, as the worker would deliver them.
//!
//! Checked after every step:
//! - nothing panics (the update, the owner's tick, the commit of its patches);
//! - a rejected value changes nothing (the last good value is kept);
//! - the state built step by step equals a state built at once from the
//!   values it accepted, index and work board included (order does not matter);
//! - `unreadable` is exactly the changefeeds whose info key holds a value
//!   that does not decode;
//! - a tick never moves a checkpoint or an epoch backward, leaves every
//!   readable changefeed with at most one task at its current epoch (others
//!   wait to be released), removes a deleted one's status, and assigns a
//!   changefeed only when no other task of it remains (the hand-off).
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use flotilla::owner::model::{
    ChangefeedId, ChangefeedInfo, ChangefeedStatus, ExecutorRecord, FeedState, Key, Keys,
    TaskPosition, TaskStatus,
};
use flotilla::owner::reactor::{OwnerConfig, OwnerInput, OwnerReactor, ProgressReport};
use flotilla::owner::state::GlobalState;
use flotilla::state::{ReactorState, StateTester};
use libfuzzer_sys::fuzz_target;
use tokio::sync::mpsc;

const PREFIX: &str = "/p";
const FEEDS: [(&str, &str); 4] = [
    ("default", "a"),
    ("default", "b"),
    ("other", "a"),
    ("default", "c"),
];
const EXECUTORS: [&str; 3] = ["e1", "e2", "e3"];
const LABELS: [(&str, &str); 3] = [("zone", "a"), ("zone", "b"), ("disk", "ssd")];
/// 2027-01-15T08:00:00Z: a fixed clock keeps a crash reproducible.
const NOW_MS: u64 = 1_800_000_000_000;

fn feed(i: u8) -> ChangefeedId {
    let (ns, id) = FEEDS[usize::from(i) % FEEDS.len()];
    ChangefeedId::new(ns, id)
}

fn executor(i: u8) -> &'static str {
    EXECUTORS[usize::from(i) % EXECUTORS.len()]
}

fn labels(pairs: &[(u8, u8)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .take(4)
        .map(|&(k, v)| {
            let key = LABELS[usize::from(k) % LABELS.len()].0;
            let value = LABELS[usize::from(v) % LABELS.len()].1;
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

#[derive(Arbitrary, Debug)]
enum KeySpec {
    Info(u8),
    Status(u8),
    Task(u8, u8),
    Position(u8, u8),
    Executor(u8),
    Owner,
    /// Anything, under the prefix.
    Raw(String),
}

impl KeySpec {
    fn key(&self, keys: &Keys) -> String {
        match self {
            KeySpec::Info(cf) => keys.info(&feed(*cf)),
            KeySpec::Status(cf) => keys.status(&feed(*cf)),
            KeySpec::Task(cf, e) => keys.task_status(&feed(*cf), executor(*e)),
            KeySpec::Position(cf, e) => keys.task_position(&feed(*cf), executor(*e)),
            KeySpec::Executor(e) => keys.executor(executor(*e)),
            KeySpec::Owner => format!("{}694d7a1b", keys.owner_prefix()),
            KeySpec::Raw(rest) => format!("{}{rest}", keys.root()),
        }
    }
}

/// A value: arbitrary bytes, or a well-formed value of any model type (not
/// necessarily the one its key holds) with arbitrary fields.
#[derive(Arbitrary, Debug)]
enum ValueSpec {
    Raw(Vec<u8>),
    Info {
        sink_uri: String,
        start_ts: u64,
        target_ts: u64,
        state: u8,
        selector: Vec<(u8, u8)>,
        error: Option<String>,
    },
    Status {
        checkpoint_ts: u64,
        epoch: u64,
        retries: u32,
        pending_reason: Option<String>,
        retry_after_ms: u64,
    },
    Task {
        epoch: u64,
        assigned_at: String,
    },
    Position {
        epoch: u64,
        checkpoint_ts: u64,
        resolved_ts: u64,
        error: Option<String>,
    },
    Executor {
        executor: u8,
        labels: Vec<(u8, u8)>,
    },
}

impl ValueSpec {
    fn bytes(self) -> Vec<u8> {
        let json = match self {
            ValueSpec::Raw(bytes) => return bytes,
            ValueSpec::Info {
                sink_uri,
                start_ts,
                target_ts,
                state,
                selector,
                error,
            } => serde_json::to_vec(&ChangefeedInfo {
                sink_uri,
                start_ts,
                target_ts,
                config: serde_json::json!({}),
                selector: labels(&selector),
                state: FeedState::ALL[usize::from(state) % FeedState::ALL.len()],
                error,
                create_time: "2027-01-15T08:00:00Z".into(),
            }),
            ValueSpec::Status {
                checkpoint_ts,
                epoch,
                retries,
                pending_reason,
                retry_after_ms,
            } => serde_json::to_vec(&ChangefeedStatus {
                checkpoint_ts,
                epoch,
                retries,
                pending_reason,
                retry_after_ms,
                ..ChangefeedStatus::default()
            }),
            ValueSpec::Task { epoch, assigned_at } => serde_json::to_vec(&TaskStatus {
                epoch,
                assigned_at,
                written_by: String::new(),
            }),
            ValueSpec::Position {
                epoch,
                checkpoint_ts,
                resolved_ts,
                error,
            } => serde_json::to_vec(&TaskPosition {
                epoch,
                checkpoint_ts,
                resolved_ts,
                error,
            }),
            ValueSpec::Executor {
                executor: e,
                labels: l,
            } => serde_json::to_vec(&ExecutorRecord {
                id: executor(e).into(),
                name: executor(e).into(),
                address: "127.0.0.1:1".into(),
                labels: labels(&l),
            }),
        };
        json.expect("model types serialize")
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Put(KeySpec, ValueSpec),
    Delete(KeySpec),
    /// The live executors, as a bit set over `EXECUTORS` (bits 0-2); bits 4-6
    /// mark which of them are still initing (not yet heartbeated to this leader).
    Live(u8),
    Progress {
        executor: u8,
        changefeed: u8,
        /// `None`: the changefeed's current epoch.
        epoch: Option<u64>,
        checkpoint_ts: u64,
        error: Option<String>,
    },
    Tick,
}

struct Run {
    keys: Keys,
    tester: StateTester<GlobalState>,
    owner: OwnerReactor,
    inputs: mpsc::UnboundedSender<OwnerInput>,
    /// The last value the state accepted for each key.
    accepted: BTreeMap<String, Vec<u8>>,
    live_known: bool,
}

fn now() -> u64 {
    NOW_MS
}

impl Run {
    fn new() -> Self {
        let keys = Keys::new(PREFIX);
        let (inputs, rx) = mpsc::unbounded_channel();
        Self {
            tester: StateTester::new(keys.root(), GlobalState::new(keys.clone())),
            owner: OwnerReactor::new(rx, OwnerConfig::default()).with_clock(now),
            inputs,
            keys,
            accepted: BTreeMap::new(),
            live_known: false,
        }
    }

    fn state(&self) -> &GlobalState {
        self.tester.state()
    }

    fn write(&mut self, key: String, value: Option<Vec<u8>>) {
        let before = (
            self.state().changefeeds.clone(),
            self.state().executors.clone(),
        );
        match self.tester.try_external_write(&key, value.as_deref()) {
            Ok(()) => match value {
                Some(value) => {
                    self.accepted.insert(key, value);
                }
                None => {
                    self.accepted.remove(&key);
                }
            },
            Err(_) => {
                assert!(value.is_some(), "a delete of {key} was rejected");
                assert!(
                    before.0 == self.state().changefeeds && before.1 == self.state().executors,
                    "a rejected value of {key} changed the state"
                );
            }
        }
    }

    fn current_epoch(&self, cf: &ChangefeedId) -> u64 {
        self.state()
            .changefeeds
            .get(cf)
            .and_then(|e| e.status.as_ref())
            .map_or(0, |s| s.epoch)
    }

    fn tick(&mut self) {
        let before: BTreeMap<ChangefeedId, ChangefeedStatus> = self
            .state()
            .changefeeds
            .iter()
            .filter_map(|(cf, e)| Some((cf.clone(), e.status.clone()?)))
            .collect();
        let (result, plan) = self.tester.tick(&mut self.owner);
        result.expect("the owner's tick fails");
        let plan = plan.expect("the owner's patches cannot be planned");
        assert!(
            plan.rejected.is_empty(),
            "rejected groups: {:?}",
            plan.rejected
        );
        // Changefeeds this tick assigned (a task key put).
        let mut assigned: BTreeSet<ChangefeedId> = BTreeSet::new();
        for write in plan.txns.into_iter().flat_map(|txn| txn.writes) {
            if let (Some(Key::TaskStatus { changefeed, .. }), Some(_)) =
                (self.keys.parse(&write.key), &write.value)
            {
                assigned.insert(changefeed);
            }
            match write.value {
                Some(value) => self.accepted.insert(write.key, value),
                None => self.accepted.remove(&write.key),
            };
        }
        let state = self.tester.state();
        for (cf, old) in &before {
            if let Some(new) = state.changefeeds.get(cf).and_then(|e| e.status.as_ref()) {
                assert!(
                    new.checkpoint_ts >= old.checkpoint_ts,
                    "{cf}: {old:?} -> {new:?}"
                );
                assert!(new.epoch >= old.epoch, "{cf}: {old:?} -> {new:?}");
            }
        }
        if !self.live_known {
            return;
        }
        for (cf, entry) in &state.changefeeds {
            if state.unreadable.contains(cf) {
                continue;
            }
            // A deleted changefeed's status goes at once; its task keys stay
            // until released (their executors may still run it).
            if entry.info.is_none() {
                assert!(
                    entry.status.is_none(),
                    "{cf}: leftovers not removed: {entry:?}"
                );
            }
            let epoch = entry.status.as_ref().map(|s| s.epoch);
            let current = entry
                .tasks
                .values()
                .filter(|t| Some(t.epoch) == epoch)
                .count();
            assert!(current <= 1, "{cf}: several tasks at its epoch: {entry:?}");
            // The hand-off: a tick assigns a changefeed only once every other
            // task of it is gone (released and deleted in the same txn).
            if assigned.contains(cf) {
                assert_eq!(
                    entry.tasks.len(),
                    1,
                    "{cf}: assigned while another task is held: {entry:?}"
                );
            }
        }
    }

    /// The invariants that hold after any step.
    fn check(&self) {
        let state = self.state();
        let mut rebuilt = GlobalState::new(self.keys.clone());
        for (key, value) in &self.accepted {
            rebuilt
                .update(key, Some(value), true)
                .unwrap_or_else(|e| panic!("an accepted value is rejected on replay: {e}"));
        }
        assert_eq!(state.changefeeds, rebuilt.changefeeds);
        assert_eq!(state.executors, rebuilt.executors);

        let mut holders: BTreeSet<String> = EXECUTORS.iter().map(|e| e.to_string()).collect();
        for entry in state.changefeeds.values() {
            holders.extend(entry.tasks.keys().cloned());
        }
        state.board().set_ready();
        rebuilt.board().set_ready();
        for executor in &holders {
            let reports: Vec<ProgressReport> = (0..FEEDS.len() as u8)
                .map(|i| {
                    let cf = feed(i);
                    ProgressReport {
                        epoch: self.current_epoch(&cf),
                        changefeed: cf,
                        checkpoint_ts: 1,
                        resolved_ts: 1,
                        error: None,
                    }
                })
                .collect();
            // Generations are per board (a random base): compared are the
            // lists and what is accepted.
            let lists = |board: &flotilla::owner::board::WorkBoard, reports| {
                board
                    .work_for(executor, reports, Vec::new(), None)
                    .map(|(w, accepted)| (w.assignments, w.rejected, w.revoked, accepted))
            };
            assert_eq!(
                lists(state.board(), reports.clone()),
                lists(rebuilt.board(), reports),
                "the board of {executor} differs from a rebuilt one"
            );
        }

        let unreadable: BTreeSet<ChangefeedId> = self
            .tester
            .raw()
            .iter()
            .filter_map(|(key, entry)| match self.keys.parse(key) {
                Some(Key::ChangefeedInfo(cf))
                    if serde_json::from_slice::<ChangefeedInfo>(&entry.value).is_err() =>
                {
                    Some(cf)
                }
                _ => None,
            })
            .collect();
        assert_eq!(state.unreadable, unreadable);
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Put(key, value) => self.write(key.key(&self.keys), Some(value.bytes())),
            Op::Delete(key) => self.write(key.key(&self.keys), None),
            Op::Live(mask) => {
                let live = EXECUTORS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(i, id)| ExecutorRecord {
                        id: id.to_string(),
                        name: id.to_string(),
                        address: "127.0.0.1:1".into(),
                        labels: labels(&[(i as u8, i as u8)]),
                    })
                    .collect();
                let initing = EXECUTORS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0 && mask & (1 << (i + 4)) != 0)
                    .map(|(_, id)| id.to_string())
                    .collect();
                self.inputs
                    .send(OwnerInput::Executors { live, initing })
                    .unwrap();
                self.live_known = true;
            }
            Op::Progress {
                executor: e,
                changefeed,
                epoch,
                checkpoint_ts,
                error,
            } => {
                let cf = feed(changefeed);
                let epoch = epoch.unwrap_or_else(|| self.current_epoch(&cf));
                let report = ProgressReport {
                    changefeed: cf,
                    epoch,
                    checkpoint_ts,
                    resolved_ts: checkpoint_ts,
                    error,
                };
                let executor = executor(e).to_owned();
                self.inputs
                    .send(OwnerInput::Progress { executor, report })
                    .unwrap();
            }
            Op::Tick => self.tick(),
        }
        self.check();
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut run = Run::new();
    for op in ops.into_iter().take(64) {
        run.step(op);
    }
});
