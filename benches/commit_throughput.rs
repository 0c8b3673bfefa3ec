//! Commit throughput of the worker against a raw etcd-client loop, on one
//! real etcd, in the same run.
//!
//! Method: a plain `main` (no criterion: the worker needs an actix System and
//! one run commits thousands of keys); wall time with `Instant`, CPU time from
//! `/proc/<pid>/task/*/schedstat`. It starts a one-member etcd with the
//! integration tests' launcher (`tests/it/harness/etcd.rs`: `/usr/bin/etcd` or
//! `$FLOTILLA_TEST_ETCD`, free loopback ports, a temp data dir, etcd's default
//! 2 GiB quota: enough for the default runs, which write ~700,000 keys of
//! ~200 B and compact nothing), then, for each round, on a fresh prefix each
//! time:
//! 1. `raw`: one etcd client commits N keys (~200-byte values) sequentially in
//!    txns of 128 puts, each txn with 128 `mod_revision == 0` compares and a
//!    128-get failure branch: the shape of the worker's txns.
//! 2. `worker/all`: a worker whose reactor queues all N single-key groups in
//!    its first tick; timed from `actors::start` until a tick sees all N keys.
//! 3. `raw+watch`: the raw loop while a watch on the prefix drains the
//!    events; it ends when the watch has seen all N keys. The control for
//!    what watching alone costs (the worker must watch what it writes).
//! 4. `raw` again.
//! 5. `worker/2000`: the same reactor as 2, 2,000 groups per tick.
//!
//! It prints committed keys/s per run with a breakdown (time inside txn round
//! trips and outside), the medians, and the ratios to `raw` (medians). Runs
//! alternate so drift of the shared machine hits every mode. Before etcd
//! starts it also times, offline, the tick and `plan_commit` the worker runs
//! before its first txn.
//!
//! `cargo bench --bench commit_throughput` runs the full benchmark (20,000
//! keys, 7 rounds); `FLOTILLA_BENCH_KEYS` and `FLOTILLA_BENCH_ROUNDS`
//! override, `FLOTILLA_BENCH_MODES=worker/all,raw` runs only those modes (to
//! profile one side), `RUST_LOG` sets the log filter (default `warn`). Under
//! `cargo test` (no `--bench` argument) or with `--test`
//! (`cargo bench --bench commit_throughput -- --test`) it runs one 512-key
//! round as a smoke test.

// The integration tests' etcd launcher, shared as it is, with the harness
// modules it uses (`super::ports`, `super::http`); most of their API is for
// the tests.
#[allow(dead_code)]
#[path = "../tests/it/harness/etcd.rs"]
mod etcd;
#[allow(dead_code)]
#[path = "../tests/it/harness/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "../tests/it/harness/ports.rs"]
mod ports;

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};
use flotilla::actors::{self, WorkerConfig};
use flotilla::metrics;
use flotilla::state::{
    self as state, plan_commit, reactor, DataPatch, PatchGroup, RawState, Reactor, ReactorState,
    TxnLimits,
};

const VALUE_BYTES: usize = 200;
const KEYS_PER_TXN: usize = 128;
const WORKER_BATCH: usize = 2_000;
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// CPU time consumed so far by every live thread of `pid` (from
/// `/proc/<pid>/task/*/schedstat`, in nanoseconds).
fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let nanos: u64 = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

fn key(prefix: &str, i: usize) -> String {
    format!("{prefix}key-{i:06}")
}

/// ~200 bytes, distinct per key.
fn value(i: usize) -> Vec<u8> {
    let mut v = format!("{i:06}:").into_bytes();
    v.resize(VALUE_BYTES, b'x');
    v
}

/// One timed run.
struct Run {
    keys: usize,
    elapsed: Duration,
    /// Worker only: time from `start` to the first tick (read + watch).
    startup: Duration,
    ticks: u64,
    txns: u64,
    /// Time spent in txn round trips, summed.
    in_txns: Duration,
    /// Worker only: reactor ticks, summed.
    in_ticks: Duration,
    /// Worker only: from the first tick to the first key applied (with one
    /// plan: tick, plan and every txn) and from there to the final tick.
    commit_phase: Duration,
    catch_up: Duration,
    /// CPU used during the run by this process and by etcd.
    cpu_self: Duration,
    cpu_etcd: Duration,
}

impl Run {
    fn keys_per_sec(&self) -> f64 {
        self.keys as f64 / self.elapsed.as_secs_f64()
    }
}

/// The baseline: the same txns, sent back to back by one client. With
/// `watch`, a watch on the prefix drains the events meanwhile and the run
/// ends when it has seen all n keys (the control for the worker, which must
/// watch what it writes).
async fn raw_run(client: &Client, prefix: &str, n: usize, watch: bool) -> Run {
    let mut client = client.clone();
    let started = Instant::now();
    let watcher = if watch {
        // Read then watch from the next revision, as the worker does.
        let read = client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .expect("read the prefix");
        let revision = read.header().expect("a header").revision();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = client.watch(prefix, Some(options)).await.expect("watch");
        Some(actix_rt::spawn(async move {
            let mut seen = 0;
            while seen < n {
                let response = stream.message().await.expect("watch").expect("open");
                seen += response.events().len();
            }
        }))
    } else {
        None
    };
    let mut txns = 0;
    let mut in_txns = Duration::ZERO;
    for first in (0..n).step_by(KEYS_PER_TXN) {
        let range = first..(first + KEYS_PER_TXN).min(n);
        let keys: Vec<String> = range.clone().map(|i| key(prefix, i)).collect();
        let compares = keys
            .iter()
            .map(|k| Compare::mod_revision(k.as_str(), CompareOp::Equal, 0))
            .collect::<Vec<_>>();
        let puts = keys
            .iter()
            .zip(range)
            .map(|(k, i)| TxnOp::put(k.as_str(), value(i), None))
            .collect::<Vec<_>>();
        let on_failure = keys
            .iter()
            .map(|k| TxnOp::get(k.as_str(), Some(GetOptions::new().with_keys_only())))
            .collect::<Vec<_>>();
        let txn = Txn::new().when(compares).and_then(puts).or_else(on_failure);
        let sent = Instant::now();
        let response = client.txn(txn).await.expect("raw txn");
        in_txns += sent.elapsed();
        assert!(
            response.succeeded(),
            "a raw txn on a fresh prefix conflicted"
        );
        txns += 1;
    }
    if let Some(watcher) = watcher {
        watcher.await.expect("the watch saw every key");
    }
    Run {
        keys: n,
        elapsed: started.elapsed(),
        startup: Duration::ZERO,
        ticks: 0,
        txns,
        in_txns,
        in_ticks: Duration::ZERO,
        commit_phase: Duration::ZERO,
        catch_up: Duration::ZERO,
        cpu_self: Duration::ZERO,
        cpu_etcd: Duration::ZERO,
    }
}

/// The keys present under the worker's prefix.
#[derive(Default)]
struct FillState {
    keys: HashSet<String>,
    patches: Vec<PatchGroup>,
    /// When the first key was applied: the ticker holds watch events back
    /// while a commit is in flight, so with one plan this is when it ended.
    first_applied: Option<Instant>,
}

impl ReactorState for FillState {
    fn update(&mut self, key: &str, value: Option<&[u8]>, _: bool) -> Result<(), state::Error> {
        self.first_applied.get_or_insert_with(Instant::now);
        match value {
            Some(_) => self.keys.insert(key.to_owned()),
            None => self.keys.remove(key),
        };
        Ok(())
    }

    fn get_patches(&mut self) -> Vec<PatchGroup> {
        std::mem::take(&mut self.patches)
    }
}

/// When the fill reactor ticked first and when it saw every key.
#[derive(Default)]
struct FillTimes {
    first_tick: Option<Instant>,
    first_applied: Option<Instant>,
    all_seen: Option<Instant>,
    ticks: u64,
}

/// Writes keys 0..n, `batch` single-key groups per tick, and finishes on the
/// first tick that sees all n. Keys are written in order, so the ones present
/// are a prefix of 0..n and the next batch starts at their count (a dropped
/// plan is simply queued again).
struct Fill {
    prefix: String,
    n: usize,
    batch: usize,
    times: Rc<RefCell<FillTimes>>,
}

impl Reactor for Fill {
    type State = FillState;

    fn tick(&mut self, state: &mut FillState) -> Result<(), reactor::Error> {
        let mut times = self.times.borrow_mut();
        times.ticks += 1;
        times.first_tick.get_or_insert_with(Instant::now);
        let present = state.keys.len();
        if present >= self.n {
            times.all_seen = Some(Instant::now());
            times.first_applied = state.first_applied;
            return Err(reactor::Error::Finished);
        }
        for i in present..(present + self.batch).min(self.n) {
            state
                .patches
                .push(vec![DataPatch::put(key(&self.prefix, i), value(i))]);
        }
        Ok(())
    }
}

async fn worker_run(client: &Client, prefix: &str, n: usize, batch: usize) -> Run {
    let txn_metric = &metrics::worker().txn_duration_seconds;
    let tick_metric = &metrics::worker().tick_duration_seconds;
    let (txns_before, txn_secs_before) =
        (txn_metric.get_sample_count(), txn_metric.get_sample_sum());
    let tick_secs_before = tick_metric.get_sample_sum();
    let times = Rc::new(RefCell::new(FillTimes::default()));
    let reactor = Fill {
        prefix: prefix.to_owned(),
        n,
        batch,
        times: times.clone(),
    };
    let config = WorkerConfig {
        tick_interval: Duration::from_millis(10),
        ..WorkerConfig::new(prefix)
    };
    let started = Instant::now();
    let handle = actors::start(client.clone(), reactor, FillState::default(), config);
    tokio::time::timeout(RUN_TIMEOUT, handle.wait())
        .await
        .expect("the worker finished in time")
        .expect("the worker finished without error");
    let times = times.borrow();
    let all_seen = times.all_seen.expect("the reactor saw every key");
    let txns = txn_metric.get_sample_count() - txns_before;
    let txn_secs = txn_metric.get_sample_sum() - txn_secs_before;
    let first_tick = times.first_tick.expect("ticked");
    let first_applied = times.first_applied.expect("keys were applied");
    Run {
        keys: n,
        elapsed: all_seen - started,
        startup: first_tick - started,
        ticks: times.ticks,
        txns,
        in_txns: Duration::from_secs_f64(txn_secs),
        in_ticks: Duration::from_secs_f64(tick_metric.get_sample_sum() - tick_secs_before),
        commit_phase: first_applied - first_tick,
        catch_up: all_seen - first_applied,
        cpu_self: Duration::ZERO,
        cpu_etcd: Duration::ZERO,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.is_empty() {
        f64::NAN
    } else if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(name: &str, run: &Run) {
    let mean_txn = run.in_txns / run.txns.max(1) as u32;
    println!(
        "{name:<12} {:>6} keys in {:>6.1} ms = {:>6.0} keys/s | {} txns, mean txn {:.2} ms, \
         in txns {:.1} ms, outside {:.1} ms | cpu: bench {:.0} ms, etcd {:.0} ms",
        run.keys,
        ms(run.elapsed),
        run.keys_per_sec(),
        run.txns,
        ms(mean_txn),
        ms(run.in_txns),
        ms(run.elapsed.saturating_sub(run.in_txns)),
        ms(run.cpu_self),
        ms(run.cpu_etcd),
    );
    if run.ticks > 0 {
        println!(
            "{:<12} {} ticks ({:.1} ms in ticks), startup {:.1} ms, first tick -> first key \
             applied {:.1} ms, -> last tick {:.1} ms",
            "",
            run.ticks,
            ms(run.in_ticks),
            ms(run.startup),
            ms(run.commit_phase),
            ms(run.catch_up),
        );
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// The CPU the worker spends before its first txn, measured without etcd:
/// one tick queueing `batch` groups, then `plan_commit`.
fn plan_cost(n: usize, batch: usize) -> (Duration, Duration, usize) {
    let prefix = "/bench/offline/";
    let mut reactor = Fill {
        prefix: prefix.to_owned(),
        n,
        batch,
        times: Rc::default(),
    };
    let mut state = FillState::default();
    let mut best = (Duration::MAX, Duration::MAX, 0);
    for _ in 0..5 {
        let started = Instant::now();
        reactor.tick(&mut state).expect("tick");
        let groups = state.get_patches();
        let ticked = Instant::now();
        let plan =
            plan_commit(&RawState::new(), prefix, groups, &TxnLimits::default()).expect("plan");
        let planned = ticked.elapsed();
        best = (
            best.0.min(ticked - started),
            best.1.min(planned),
            plan.txns.len(),
        );
    }
    best
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test` (no `--bench`) and
    // `cargo bench -- --test` (as criterion's benches read it) run a small
    // smoke round.
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    let n = env_usize("FLOTILLA_BENCH_KEYS", if full { 20_000 } else { 512 });
    let rounds = env_usize("FLOTILLA_BENCH_ROUNDS", if full { 7 } else { 1 });
    // The worker's warnings (slow txns, dropped groups, resyncs) show by default.
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .try_init();

    println!(
        "commit_throughput: {n} keys of {VALUE_BYTES} B per run, {KEYS_PER_TXN} keys per txn, \
         {rounds} rounds"
    );
    for batch in [n, WORKER_BATCH.min(n)] {
        let (tick, plan, txns) = plan_cost(n, batch);
        println!(
            "offline: tick queueing {batch} groups {:.1} ms, plan_commit {:.1} ms -> {txns} txns",
            ms(tick),
            ms(plan)
        );
    }

    let etcd = etcd::EtcdCluster::single();
    let etcd_pid = etcd.pid(0).expect("etcd runs");
    let all_modes = ["raw", "worker/all", "raw+watch", "raw", "worker/2000"];
    // For profiling one side alone: FLOTILLA_BENCH_MODES=worker/all.
    let selected = std::env::var("FLOTILLA_BENCH_MODES").unwrap_or_default();
    let modes: Vec<&'static str> = all_modes
        .into_iter()
        .filter(|m| selected.is_empty() || selected.split(',').any(|s| s == *m))
        .collect();
    let runs = actix_rt::System::new().block_on(async {
        let client = etcd.client().await;
        let mut runs: Vec<(&str, Run)> = Vec::new();
        for round in 0..rounds {
            for (slot, &mode) in modes.iter().enumerate() {
                let prefix = format!("/bench/{round}/{slot}/");
                let cpu_before = (cpu_time(std::process::id()), cpu_time(etcd_pid));
                let mut run = match mode {
                    "raw" => raw_run(&client, &prefix, n, false).await,
                    "raw+watch" => raw_run(&client, &prefix, n, true).await,
                    "worker/all" => worker_run(&client, &prefix, n, n).await,
                    _ => worker_run(&client, &prefix, n, WORKER_BATCH).await,
                };
                run.cpu_self = cpu_time(std::process::id()).saturating_sub(cpu_before.0);
                run.cpu_etcd = cpu_time(etcd_pid).saturating_sub(cpu_before.1);
                report(mode, &run);
                runs.push((mode, run));
            }
        }
        runs
    });
    drop(etcd);

    let median_of = |mode: &str, f: fn(&Run) -> f64| {
        median(
            runs.iter()
                .filter(|(m, _)| *m == mode)
                .map(|(_, r)| f(r))
                .collect(),
        )
    };
    let worker = metrics::worker();
    println!(
        "worker counters over all runs: {} keys committed, {} conflicts, {} etcd retries, \
         {} resyncs ({} initial)",
        worker.committed_keys_total.get(),
        worker.txn_conflicts_total.get(),
        worker.etcd_retries_total.get(),
        ["initial", "compacted", "canceled", "lost", "silent"]
            .iter()
            .map(|r| worker.resyncs_total.with_label_values(&[*r]).get())
            .sum::<u64>(),
        worker.resyncs_total.with_label_values(&["initial"]).get(),
    );
    let raw_rate = median_of("raw", Run::keys_per_sec);
    for mode in ["raw", "raw+watch", "worker/all", "worker/2000"] {
        if !modes.contains(&mode) {
            continue;
        }
        let rate = median_of(mode, Run::keys_per_sec);
        let mean_txn = median_of(mode, |r| ms(r.in_txns) / r.txns.max(1) as f64);
        let outside = median_of(mode, |r| ms(r.elapsed.saturating_sub(r.in_txns)));
        println!(
            "median {mode:<12} {rate:>6.0} keys/s = {:.2} x raw | mean txn {mean_txn:.2} ms, \
             outside txns {outside:.1} ms",
            rate / raw_rate
        );
    }
}
