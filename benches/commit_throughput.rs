//! Commit throughput of the worker against a raw etcd-client loop, on one
//! real etcd, in the same run.
//!
//! Method: a plain `main` (no criterion: the worker needs an actix System and
//! one run commits thousands of keys); wall time with `Instant`, CPU time from
//! `/proc/<pid>/task/*/schedstat`. It spawns `/usr/bin/etcd` (or
//! `$FLOTILLA_TEST_ETCD`) on free loopback ports with a temp data dir, then,
//! for each round, on a fresh prefix each time:
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
//! `cargo test` (no `--bench` argument) it runs one 512-key round as a smoke
//! test.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::thread;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, WatchOptions,
};
use flotilla::actors::{self, WorkerConfig};
use flotilla::metrics;
use flotilla::state::{
    self as state, plan_commit, reactor, DataPatch, PatchGroup, RawState, Reactor, ReactorState,
    TxnLimits,
};
use tempfile::TempDir;

const VALUE_BYTES: usize = 200;
const KEYS_PER_TXN: usize = 128;
const WORKER_BATCH: usize = 2_000;
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A single-member etcd in a temp dir, SIGKILLed on drop (and by the kernel
/// if this process dies first).
struct Etcd {
    process: Child,
    endpoint: String,
    log: std::path::PathBuf,
    // Removed after `drop` has killed the process writing into it.
    _dir: TempDir,
}

impl Etcd {
    fn start() -> Etcd {
        // A lost race for a free port makes etcd exit; try again on new ports.
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("flotilla-bench-etcd-")
                .tempdir()
                .expect("create a temp dir for etcd");
            let (client_port, peer_port) = free_ports();
            let client = format!("http://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{peer_port}");
            let log = dir.path().join("etcd.log");
            let out = File::create(&log).expect("create the etcd log");
            let bin =
                std::env::var_os("FLOTILLA_TEST_ETCD").unwrap_or(OsString::from("/usr/bin/etcd"));
            let mut cmd = Command::new(&bin);
            cmd.args(["--name", "bench", "--data-dir"])
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("bench={peer}")])
                // 8 GiB: every run writes fresh keys and nothing is compacted.
                .args(["--quota-backend-bytes", "8589934592"])
                .args(["--logger", "zap", "--log-outputs", "stderr"])
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("clone the log handle"))
                .stderr(out);
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("ETCD_") {
                    cmd.env_remove(&key);
                }
            }
            die_with_parent(&mut cmd);
            let process = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.to_string_lossy()));
            let mut etcd = Etcd {
                process,
                endpoint: client,
                log,
                _dir: dir,
            };
            if etcd.wait_healthy(client_port) {
                return etcd;
            }
            // Drop kills it; a port race leaves "address already in use".
            if !etcd.log_text().contains("address already in use") {
                panic!("etcd did not become healthy:\n{}", etcd.log_text());
            }
        }
        panic!("etcd lost the race for free ports 5 times");
    }

    /// Polls `/health` until it reports a leader; false if etcd exited.
    fn wait_healthy(&mut self, port: u16) -> bool {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if matches!(self.process.try_wait(), Ok(Some(_))) {
                return false;
            }
            if http_health(port) {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy after {READY_TIMEOUT:?}:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Asks the kernel to SIGKILL etcd when this process dies, so an interrupted
/// benchmark leaves no server behind. `main` spawns it, and PDEATHSIG fires
/// when the forking *thread* exits: the main thread lives as long as we do.
fn die_with_parent(cmd: &mut Command) {
    let parent = libc::pid_t::try_from(std::process::id()).expect("pid fits pid_t");
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe syscalls (prctl, getppid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let port = |l: &TcpListener| l.local_addr().expect("a bound address").port();
    (port(&a), port(&b))
}

fn http_health(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(3));
    if stream.set_read_timeout(timeout).is_err()
        || stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
    {
        return false;
    }
    let mut response = String::new();
    stream.read_to_string(&mut response).is_ok() && response.contains(r#""health":"true""#)
}

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
    // `cargo bench` passes `--bench`; `cargo test` runs a small smoke round.
    let full = std::env::args().any(|a| a == "--bench");
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

    let etcd = Etcd::start();
    let endpoint = etcd.endpoint.clone();
    let etcd_pid = etcd.process.id();
    let all_modes = ["raw", "worker/all", "raw+watch", "raw", "worker/2000"];
    // For profiling one side alone: FLOTILLA_BENCH_MODES=worker/all.
    let selected = std::env::var("FLOTILLA_BENCH_MODES").unwrap_or_default();
    let modes: Vec<&'static str> = all_modes
        .into_iter()
        .filter(|m| selected.is_empty() || selected.split(',').any(|s| s == *m))
        .collect();
    let run_modes = modes.clone();
    let runs = actix_rt::System::new().block_on(async move {
        let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
        let client = Client::connect([endpoint.as_str()], Some(options))
            .await
            .expect("connect to etcd");
        let mut runs: Vec<(&str, Run)> = Vec::new();
        for round in 0..rounds {
            for (slot, &mode) in run_modes.iter().enumerate() {
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
