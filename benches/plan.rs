//! Tick + patch + batch for 10,000 changefeeds, no I/O.
//!
//! A fleet of 10,000 changefeeds, three keys each (info ~400 B, status
//! ~80 B, task status ~60 B). The reactor queues one group per changefeed:
//! guard the info key, advance the checkpoint in the status, rewrite the task
//! status. The planner turns the groups into txns under the default limits.
//!
//! Cases (criterion; throughput is in changefeeds, i.e. groups):
//! - `tick_and_plan`: one reactor tick, `get_patches`, `plan_commit`.
//! - `tick_only`: the tick and `get_patches`, groups dropped.
//! - `plan_commit_only`: `plan_commit` on groups queued outside the timing.
//! - `unchanged_tick_and_plan`: the same groups, but nothing advanced: every
//!   patch decodes its value and returns `Keep`, so the plan is empty.
//!
//! Run with `cargo bench --bench plan`. Under `cargo test` criterion runs each
//! case once, as a smoke test.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use flotilla::state::{
    self as state, patch, plan_commit, reactor, Change, CommitPlan, DataPatch, PatchGroup,
    RawEntry, RawState, Reactor, ReactorState, TxnLimits,
};
use serde::{Deserialize, Serialize};

const CHANGEFEEDS: usize = 10_000;
const PREFIX: &str = "/flotilla/default/";
const NAMESPACE: &str = "/flotilla/default/default/";

fn info_key(id: &str) -> String {
    format!("{NAMESPACE}changefeed/info/{id}")
}

fn status_key(id: &str) -> String {
    format!("{NAMESPACE}changefeed/status/{id}")
}

fn task_key(id: &str) -> String {
    format!("{NAMESPACE}task/status/{id}")
}

/// ~80 bytes once encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct ChangefeedStatus {
    checkpoint_ts: u64,
    resolved_ts: u64,
    admin_job_type: u8,
}

/// ~60 bytes once encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TaskStatus {
    capture: String,
    checkpoint_ts: u64,
    state: String,
}

impl TaskStatus {
    fn encode(checkpoint_ts: u64) -> Vec<u8> {
        serde_json::to_vec(&TaskStatus {
            capture: "c-1".into(),
            checkpoint_ts,
            state: "ok".into(),
        })
        .expect("encode a task status")
    }
}

fn info_value(i: usize) -> Vec<u8> {
    let info = serde_json::json!({
        "upstream_id": 7_212_846_529_138_415_u64,
        "namespace": "default",
        "changefeed_id": format!("cf-{i:05}"),
        "sink_uri": format!("kafka://broker-{}.kafka.svc:9092/topic-{i:05}?protocol=canal-json&partition-num=6", i % 3),
        "start_ts": 449_000_000_000_000_000_u64 + i as u64,
        "target_ts": 0,
        "admin_job_type": 0,
        "sort_engine": "unified",
        "state": "normal",
        "config": {
            "case_sensitive": false,
            "force_replicate": false,
            "filter": {"rules": ["app.*", "!app.tmp_*"]},
            "mounter": {"worker_num": 16}
        }
    });
    serde_json::to_vec(&info).expect("encode an info")
}

fn status_value(checkpoint_ts: u64) -> Vec<u8> {
    serde_json::to_vec(&ChangefeedStatus {
        checkpoint_ts,
        resolved_ts: checkpoint_ts + 5_000,
        admin_job_type: 0,
    })
    .expect("encode a status")
}

/// The raw snapshot of the fleet, as the worker would have read it.
fn fleet_raw() -> RawState {
    let mut raw = RawState::new();
    for i in 0..CHANGEFEEDS {
        let id = format!("cf-{i:05}");
        let checkpoint = 449_000_000_000_000_000_u64 + 1_000 * i as u64;
        let revision = 100 + 3 * i as i64;
        for (key, value, rev) in [
            (info_key(&id), info_value(i), revision),
            (status_key(&id), status_value(checkpoint), revision + 1),
            (task_key(&id), TaskStatus::encode(checkpoint), revision + 2),
        ] {
            raw.insert(
                key,
                RawEntry {
                    value,
                    mod_revision: rev,
                },
            );
        }
    }
    raw
}

/// What the reactor knows of one changefeed.
#[derive(Default)]
struct Changefeed {
    has_info: bool,
    status: Option<ChangefeedStatus>,
}

/// The typed view: changefeeds by id, values decoded once in `update`.
#[derive(Default)]
struct FleetState {
    changefeeds: BTreeMap<String, Changefeed>,
    patches: Vec<PatchGroup>,
}

impl ReactorState for FleetState {
    fn update(&mut self, key: &str, value: Option<&[u8]>, _: bool) -> Result<(), state::Error> {
        let rest = key
            .strip_prefix(NAMESPACE)
            .ok_or_else(|| state::Error::UnexpectedKey(key.to_owned()))?;
        let malformed = |e: serde_json::Error| state::Error::Malformed {
            key: key.to_owned(),
            reason: e.to_string(),
        };
        if let Some(id) = rest.strip_prefix("changefeed/info/") {
            self.changefeeds.entry(id.to_owned()).or_default().has_info = value.is_some();
        } else if let Some(id) = rest.strip_prefix("changefeed/status/") {
            let status = value
                .map(serde_json::from_slice::<ChangefeedStatus>)
                .transpose()
                .map_err(malformed)?;
            self.changefeeds.entry(id.to_owned()).or_default().status = status;
        } else if !rest.starts_with("task/status/") {
            return Err(state::Error::UnexpectedKey(key.to_owned()));
        }
        Ok(())
    }

    fn get_patches(&mut self) -> Vec<PatchGroup> {
        std::mem::take(&mut self.patches)
    }
}

/// Advances every changefeed's checkpoint by `advance` (0: nothing changes).
struct CheckpointReactor {
    advance: u64,
}

/// Moves the status checkpoint forward to `target`; `Keep` when it is there.
fn advance_status(key: String, target: u64) -> DataPatch {
    DataPatch::single(key.clone(), move |old| {
        let old = old.ok_or_else(|| patch::Error::Precondition(format!("{key} is gone")))?;
        let status: ChangefeedStatus =
            serde_json::from_slice(old).map_err(|e| patch::Error::Malformed {
                key: key.clone(),
                reason: e.to_string(),
            })?;
        if status.checkpoint_ts >= target {
            return Ok(Change::Keep);
        }
        Ok(Change::Put(status_value(target)))
    })
}

/// Rewrites the task status for `checkpoint`; `Keep` when it already says so.
fn set_task(key: String, checkpoint: u64) -> DataPatch {
    DataPatch::single(key, move |old| {
        let new = TaskStatus::encode(checkpoint);
        if old == Some(new.as_slice()) {
            return Ok(Change::Keep);
        }
        Ok(Change::Put(new))
    })
}

impl Reactor for CheckpointReactor {
    type State = FleetState;

    fn tick(&mut self, state: &mut FleetState) -> Result<(), reactor::Error> {
        let mut groups = Vec::with_capacity(state.changefeeds.len());
        for (id, changefeed) in &state.changefeeds {
            let (true, Some(status)) = (changefeed.has_info, changefeed.status) else {
                continue;
            };
            let target = status.checkpoint_ts + self.advance;
            groups.push(vec![
                DataPatch::guard(info_key(id)),
                advance_status(status_key(id), target),
                set_task(task_key(id), target),
            ]);
        }
        state.patches.extend(groups);
        Ok(())
    }
}

fn loaded_state(raw: &RawState) -> FleetState {
    let mut state = FleetState::default();
    for (key, entry) in raw {
        state
            .update(key, Some(&entry.value), true)
            .expect("a well-formed fleet");
    }
    state
}

fn tick_and_plan(
    reactor: &mut CheckpointReactor,
    state: &mut FleetState,
    raw: &RawState,
    limits: &TxnLimits,
) -> CommitPlan {
    reactor.tick(state).expect("tick");
    let groups = state.get_patches();
    plan_commit(raw, PREFIX, groups, limits).expect("a plannable tick")
}

fn describe(name: &str, plan: &CommitPlan) {
    let guards: usize = plan.txns.iter().map(|t| t.guards.len()).sum();
    let bytes: usize = plan.txns.iter().map(|t| t.bytes).sum();
    let groups: usize = plan.txns.iter().map(|t| t.groups).sum();
    println!(
        "{name}: {CHANGEFEEDS} changefeeds -> {} txns, {groups} groups, {} writes, {guards} compares, \
         {bytes} bytes (est.), {} rejected",
        plan.txns.len(),
        plan.writes(),
        plan.rejected.len()
    );
}

fn bench_plan(c: &mut Criterion) {
    let raw = fleet_raw();
    let limits = TxnLimits::default();
    let mut state = loaded_state(&raw);
    let id = "cf-00042";
    println!(
        "{} keys; value sizes: info {} B, status {} B, task status {} B; e.g. {}",
        raw.len(),
        raw[&info_key(id)].value.len(),
        raw[&status_key(id)].value.len(),
        raw[&task_key(id)].value.len(),
        info_key(id)
    );
    let mut advancing = CheckpointReactor { advance: 1_000 };
    let mut unchanged = CheckpointReactor { advance: 0 };

    let plan = tick_and_plan(&mut advancing, &mut state, &raw, &limits);
    assert_eq!(
        plan.writes(),
        2 * CHANGEFEEDS,
        "every changefeed writes two keys"
    );
    describe("advancing", &plan);
    let plan = tick_and_plan(&mut unchanged, &mut state, &raw, &limits);
    assert!(plan.txns.is_empty(), "nothing changed, nothing to commit");
    describe("unchanged", &plan);

    let mut group = c.benchmark_group("plan_10k_changefeeds");
    group.throughput(Throughput::Elements(CHANGEFEEDS as u64));
    // Tens of ms per iteration: flat sampling, as criterion advises.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));

    group.bench_function("tick_and_plan", |b| {
        b.iter(|| tick_and_plan(&mut advancing, &mut state, &raw, &limits));
    });
    group.bench_function("tick_only", |b| {
        b.iter(|| {
            advancing.tick(&mut state).expect("tick");
            state.get_patches()
        });
    });
    group.bench_function("plan_commit_only", |b| {
        b.iter_batched(
            || {
                advancing.tick(&mut state).expect("tick");
                state.get_patches()
            },
            |groups| plan_commit(black_box(&raw), PREFIX, groups, &limits).expect("plan"),
            BatchSize::PerIteration,
        );
    });
    group.bench_function("unchanged_tick_and_plan", |b| {
        b.iter(|| tick_and_plan(&mut unchanged, &mut state, &raw, &limits));
    });
    group.finish();
}

criterion_group!(benches, bench_plan);
criterion_main!(benches);
