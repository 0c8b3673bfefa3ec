//! The owner's tick at scale, no I/O: `OwnerReactor` on a `StateTester` holding
//! N changefeeds, every one assigned, and E live executors.
//!
//! Cases (criterion, one tick per iteration; `FLOTILLA_BENCH_CHANGEFEEDS`
//! sets N, default 100,000):
//! - `idle`: nothing happened since the last tick.
//! - `progress`: N/10 changefeeds reported an advanced checkpoint (E executors
//!   heartbeating every second with 100 ms ticks).
//! - `full_pass`: the safety-net pass over every changefeed, nothing to do.
//! - `move`: one of 10 executors (N/10 changefeeds) went offline; its
//!   changefeeds are assigned to the nine others.
//!
//! Run with `cargo bench --bench owner_tick`. Under `cargo test` criterion
//! runs each case once, as a smoke test.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use flotilla::owner::model::{
    ChangefeedId, ChangefeedInfo, ChangefeedStatus, ExecutorRecord, FeedState, Keys,
};
use flotilla::owner::reactor::{OwnerConfig, OwnerInput, OwnerReactor, ProgressReport};
use flotilla::owner::state::GlobalState;
use flotilla::state::{Reactor, StateTester};
use tokio::sync::mpsc;

static CLOCK: AtomicU64 = AtomicU64::new(1_800_000_000_000);

fn now() -> u64 {
    CLOCK.load(Ordering::Relaxed)
}

fn advance(by: Duration) {
    CLOCK.fetch_add(by.as_millis() as u64, Ordering::Relaxed);
}

fn changefeeds() -> usize {
    std::env::var("FLOTILLA_BENCH_CHANGEFEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

struct Fleet {
    tester: StateTester<GlobalState>,
    owner: OwnerReactor,
    inputs: mpsc::UnboundedSender<OwnerInput>,
    ids: Vec<ChangefeedId>,
    checkpoint: u64,
}

impl Fleet {
    /// N changefeeds assigned over `executors` executors, settled.
    fn new(n: usize, executors: usize) -> Self {
        let keys = Keys::new("/b");
        let (inputs, rx) = mpsc::unbounded_channel();
        let mut tester = StateTester::new("/b/", GlobalState::new(keys.clone()));
        let owner = OwnerReactor::new(rx, OwnerConfig::default()).with_clock(now);
        let info = ChangefeedInfo {
            sink_uri: "kafka://broker.kafka.svc:9092/topic?protocol=canal-json".into(),
            start_ts: 100,
            target_ts: 0,
            config: serde_json::json!({"filter": {"rules": ["app.*"]}}),
            selector: BTreeMap::new(),
            state: FeedState::Normal,
            error: None,
            create_time: "2027-01-15T08:00:00.000Z".into(),
        };
        let info = serde_json::to_vec(&info).unwrap();
        let status = serde_json::to_vec(&ChangefeedStatus {
            checkpoint_ts: 100,
            ..Default::default()
        })
        .unwrap();
        let ids: Vec<_> = (0..n)
            .map(|i| ChangefeedId::new("default", format!("cf{i:06}")))
            .collect();
        for cf in &ids {
            tester.external_write(&keys.info(cf), Some(&info));
            tester.external_write(&keys.status(cf), Some(&status));
        }
        let list = (0..executors)
            .map(|i| ExecutorRecord {
                id: format!("e{i:04}"),
                name: format!("e{i:04}"),
                address: format!("10.0.{}.{}:9000", i / 250, i % 250),
                labels: BTreeMap::new(),
            })
            .collect();
        inputs
            .send(OwnerInput::Executors {
                live: list,
                initing: Vec::new(),
            })
            .unwrap();
        let mut fleet = Self {
            tester,
            owner,
            inputs,
            ids,
            checkpoint: 100,
        };
        fleet.tick();
        // Settle: the pending reasons and checkpoints of the first tick.
        advance(Duration::from_secs(11));
        fleet.tick();
        fleet.tick();
        fleet
    }

    fn tick(&mut self) {
        let (result, plan) = self.tester.tick(&mut self.owner);
        result.unwrap();
        plan.unwrap();
    }

    /// Every `step`-th changefeed (from `offset`) reports an advanced
    /// checkpoint from its executor.
    fn report(&mut self, step: usize, offset: usize) {
        self.checkpoint += 1;
        let state = self.tester.state();
        for cf in self.ids.iter().skip(offset).step_by(step) {
            let entry = &state.changefeeds[cf];
            let executor = entry.current_executor().unwrap().to_owned();
            let epoch = entry.status.as_ref().unwrap().epoch;
            self.inputs
                .send(OwnerInput::Progress {
                    executor,
                    report: ProgressReport {
                        changefeed: cf.clone(),
                        epoch,
                        checkpoint_ts: self.checkpoint,
                        resolved_ts: self.checkpoint,
                        error: None,
                    },
                })
                .unwrap();
        }
    }
}

impl Fleet {
    /// One tick, timed; its patches are committed outside the timing (the
    /// commit is `benches/plan.rs`'s subject).
    fn timed_tick(&mut self) -> Duration {
        let start = Instant::now();
        self.owner.tick(self.tester.state_mut()).unwrap();
        let took = start.elapsed();
        self.tester.apply_patches().unwrap();
        took
    }
}

/// `iters` ticks on `fleet`, each after `prepare`.
fn timed(fleet: &mut Fleet, iters: u64, mut prepare: impl FnMut(&mut Fleet, u64)) -> Duration {
    (0..iters)
        .map(|i| {
            prepare(fleet, i);
            fleet.timed_tick()
        })
        .sum()
}

fn owner_tick(c: &mut Criterion) {
    let n = changefeeds();
    let mut group = c.benchmark_group(format!("owner_tick/{n}"));
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(100));
    group.measurement_time(Duration::from_secs(5));

    let mut fleet = Fleet::new(n, 1_000);
    group.bench_function("idle", |b| {
        b.iter_custom(|iters| {
            timed(&mut fleet, iters, |_, _| {
                advance(Duration::from_millis(100))
            })
        })
    });
    group.bench_function("progress", |b| {
        b.iter_custom(|iters| {
            timed(&mut fleet, iters, |f, i| {
                advance(Duration::from_millis(100));
                f.report(10, (i % 10) as usize);
            })
        })
    });
    group.bench_function("full_pass", |b| {
        b.iter_custom(|iters| timed(&mut fleet, iters, |_, _| advance(Duration::from_secs(11))))
    });
    drop(fleet);

    group.bench_function("move", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut fleet = Fleet::new(n, 10);
                advance(Duration::from_millis(100));
                fleet
                    .inputs
                    .send(OwnerInput::Offline {
                        executor: "e0003".into(),
                        lease_left: Duration::ZERO,
                    })
                    .unwrap();
                total += fleet.timed_tick();
                black_box(&fleet.tester);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, owner_tick);
criterion_main!(benches);
