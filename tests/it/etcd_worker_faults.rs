//! The worker under faults tiflow's worker does not survive: etcd SIGKILLed
//! and restarted, the watched revision compacted, a frozen etcd. No invariant
//! may break and no worker may exit; except after etcd was wiped (its history
//! went back), where the worker must end with `HistoryReset` instead of
//! stalling.

use crate::harness;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::reactors::{
    bank_sum, failed, seed_bank, Bank, FnReactor, KvState, Linearizability,
};
use crate::harness::EtcdCluster;
use etcd_client::Client;
use flotilla::actors::{self, WorkerConfig};
use flotilla::state::{reactor, DataPatch};

const WAIT: Duration = Duration::from_secs(90);

fn config(prefix: &str) -> WorkerConfig {
    WorkerConfig {
        tick_interval: Duration::from_millis(20),
        request_timeout: Duration::from_secs(2),
        backoff_max: Duration::from_millis(500),
        ..WorkerConfig::new(prefix)
    }
}

/// What the fault thread does to etcd while the workers run.
#[derive(Clone, Copy)]
enum Fault {
    /// SIGKILL etcd, keep it down a while, restart it; twice.
    KillAndRestartTwice,
    /// Compact etcd at its current revision every 100 ms.
    CompactRepeatedly,
}

/// Runs `fault` against `etcd` on its own thread (the harness blocks while
/// etcd restarts; the workers must keep running meanwhile) until `stop`.
fn inject(
    mut etcd: EtcdCluster,
    fault: Fault,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(EtcdCluster, u64)> {
    std::thread::spawn(move || {
        let mut injected = 0;
        match fault {
            Fault::KillAndRestartTwice => {
                // On a cluster, a different member each time.
                for round in 0..2 {
                    let member = round % etcd.len();
                    std::thread::sleep(Duration::from_millis(1500));
                    etcd.kill(member);
                    std::thread::sleep(Duration::from_millis(1000));
                    etcd.restart(member);
                    injected += 1;
                }
            }
            Fault::CompactRepeatedly => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let mut client = etcd.client().await;
                    while !stop.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let rev = client
                            .get("/", None)
                            .await
                            .unwrap()
                            .header()
                            .unwrap()
                            .revision();
                        // Compacting the same revision twice is an error; skip.
                        if client.compact(rev, None).await.is_ok() {
                            injected += 1;
                        }
                    }
                });
            }
        }
        (etcd, injected)
    })
}

async fn bank_under(fault: Fault) {
    bank_on(EtcdCluster::single(), fault).await;
}

async fn bank_on(etcd: EtcdCluster, fault: Fault) {
    harness::init_tracing();
    let client = etcd.client().await;
    const P: &str = "/bank";
    seed_bank(&client, P, 25).await;
    let stop = Arc::new(AtomicBool::new(false));
    let faults = inject(etcd, fault, stop.clone());
    let checked = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    let mut slots = Vec::new();
    for slot in 0..10u64 {
        let client = client.clone();
        let checked = checked.clone();
        slots.push(actix_rt::spawn(async move {
            let mut runs = 0u64;
            while tokio::time::Instant::now() < deadline {
                let bank = Bank::new(P, 25, slot * 10_000 + runs, 0.2, checked.clone());
                let handle = actors::start(client.clone(), bank, KvState::default(), config(P));
                tokio::time::timeout(WAIT, handle.wait())
                    .await
                    .expect("a bank worker ends in time")
                    .expect("a bank worker never fails");
                runs += 1;
            }
            runs
        }));
    }
    let mut runs = 0;
    for s in slots {
        runs += s.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let (etcd, injected) = faults.join().unwrap();
    assert!(injected >= 2, "faults injected: {injected}");
    // 10 slots: more than 10 runs means workers finished and new ones started.
    assert!(runs > 10, "bank workers restarted ({runs} runs)");
    assert!(
        checked.load(Ordering::Relaxed) > 50,
        "ticks checked the sum"
    );
    let client = etcd.client().await;
    assert_eq!(bank_sum(&client, P).await, 0);
}

async fn linearizability_under(fault: Fault) {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    const P: &str = "/lin";
    const TARGET: i64 = 400;
    let stop = Arc::new(AtomicBool::new(false));
    let faults = inject(etcd, fault, stop.clone());
    // The writer keeps putting increasing values, retrying through outages,
    // and spreads them over the whole fault window.
    let writer = {
        let mut c = client.clone();
        actix_rt::spawn(async move {
            for i in 0..=TARGET {
                while c
                    .put(format!("{P}/value"), i.to_string(), None)
                    .await
                    .is_err()
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(Duration::from_millis(12)).await;
            }
        })
    };
    let reactor = Linearizability::new(P, TARGET, false);
    let handle = actors::start(client.clone(), reactor, KvState::default(), config(P));
    let result = tokio::time::timeout(WAIT, handle.wait())
        .await
        .expect("in time");
    result.expect("values never went back and the worker never exited");
    writer.await.unwrap();
    stop.store(true, Ordering::SeqCst);
    let (_etcd, injected) = faults.join().unwrap();
    assert!(injected >= 2, "faults injected: {injected}");
}

#[actix_rt::test]
async fn bank_survives_etcd_killed_and_restarted_twice() {
    bank_under(Fault::KillAndRestartTwice).await;
}

#[actix_rt::test]
async fn bank_survives_members_of_a_three_node_cluster_killed_and_restarted() {
    bank_on(EtcdCluster::three(), Fault::KillAndRestartTwice).await;
}

#[actix_rt::test]
async fn bank_survives_repeated_compaction() {
    bank_under(Fault::CompactRepeatedly).await;
}

#[actix_rt::test]
async fn linearizability_survives_etcd_killed_and_restarted_twice() {
    linearizability_under(Fault::KillAndRestartTwice).await;
}

#[actix_rt::test]
async fn linearizability_survives_repeated_compaction() {
    linearizability_under(Fault::CompactRepeatedly).await;
}

/// One attempt: a worker (on its own thread) whose reactor blocks in its
/// second tick while the test writes (values of `value_bytes`), deletes and
/// compacts. Returns whether the watcher saw the compaction; the worker's
/// final state is checked either way.
async fn fall_behind_a_compaction(
    etcd: &EtcdCluster,
    prefix: &'static str,
    value_bytes: usize,
) -> bool {
    let client = etcd.client().await;
    let mut c = client.clone();
    for i in 0..50 {
        c.put(format!("{prefix}/doomed/{i:02}"), "x", None)
            .await
            .unwrap();
    }
    let (blocked_tx, blocked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let endpoints = etcd.endpoints();
    let worker = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let client = Client::connect(endpoints, None).await.unwrap();
            let reactor = FnReactor::new(move |state: &mut KvState, n| {
                if n == 1 {
                    blocked_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                }
                if state.get(&format!("{prefix}/done")).is_none() {
                    return Ok(());
                }
                // The final state: every doomed key deleted, every fresh key
                // present.
                let doomed = state
                    .values
                    .keys()
                    .filter(|k| k.contains("/doomed/"))
                    .count();
                let fresh = state
                    .values
                    .keys()
                    .filter(|k| k.contains("/fresh/"))
                    .count();
                if doomed != 0 || fresh != 300 {
                    return Err(failed(format!(
                        "{doomed} deleted keys left, {fresh} of 300 fresh keys"
                    )));
                }
                Err(reactor::Error::Finished)
            });
            let handle = actors::start(client, reactor, KvState::default(), config(prefix));
            let mut saw_compaction = false;
            while let Some(stats) = handle.stats().await {
                saw_compaction |= stats.resyncs.contains_key("compacted")
                    || stats.resyncs.contains_key("canceled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (handle.wait().await, saw_compaction)
        })
    });
    blocked_rx.recv().unwrap();
    // While the reactor is stuck its watcher cannot hand anything over, so
    // etcd's side of the watch falls behind; compact past it.
    let value = vec![b'v'; value_bytes];
    for i in 0..3000 {
        c.put(format!("{prefix}/fresh/{}", i % 300), value.clone(), None)
            .await
            .unwrap();
    }
    for i in 0..50 {
        c.delete(format!("{prefix}/doomed/{i:02}"), None)
            .await
            .unwrap();
    }
    let rev = c
        .put(format!("{prefix}/done"), "1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    etcd.compact(rev).await;
    release_tx.send(()).unwrap();
    let (result, saw_compaction) = tokio::task::spawn_blocking(move || worker.join().unwrap())
        .await
        .unwrap();
    result.expect("the worker ends cleanly with every change applied");
    saw_compaction
}

#[actix_rt::test]
async fn a_watch_that_falls_behind_a_compaction_resyncs_and_loses_nothing() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    // Whether etcd cancels the lagging watch depends on how much it had
    // already buffered for it; a few attempts make hitting the path certain
    // in practice, and every attempt checks that nothing was lost.
    let prefixes = ["/behind1", "/behind2", "/behind3", "/behind4"];
    let mut hit = false;
    for prefix in prefixes {
        if fall_behind_a_compaction(&etcd, prefix, 4096).await {
            hit = true;
            break;
        }
    }
    assert!(hit, "no attempt made the watch fall behind the compaction");
}

/// The same with a prefix of 4.8 MiB (300 values of 16 KiB, more than tonic's
/// default 4 MiB decode limit): the watch's catch-up answers and the re-read
/// after the compaction are larger than one default answer.
#[actix_rt::test]
async fn a_watch_behind_a_compaction_re_reads_a_large_prefix_in_pages() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let prefixes = ["/large1", "/large2", "/large3", "/large4"];
    let mut hit = false;
    for prefix in prefixes {
        if fall_behind_a_compaction(&etcd, prefix, 16 << 10).await {
            hit = true;
            break;
        }
    }
    assert!(hit, "no attempt made the watch fall behind the compaction");
}

#[actix_rt::test]
async fn a_frozen_etcd_stalls_the_worker_but_does_not_stop_it() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    const P: &str = "/frozen";
    let reactor = FnReactor::new(|state: &mut KvState, _| {
        let n = state.get_i64(&format!("{P}/counter")).unwrap_or(0);
        if n >= 30 {
            return Err(reactor::Error::Finished);
        }
        state.queue(vec![DataPatch::put(
            format!("{P}/counter"),
            (n + 1).to_string(),
        )]);
        Ok(())
    });
    let config = WorkerConfig {
        progress_interval: Duration::from_millis(200),
        silence_timeout: Duration::from_millis(800),
        request_timeout: Duration::from_millis(500),
        ..config(P)
    };
    let handle = actors::start(client.clone(), reactor, KvState::default(), config);
    tokio::time::sleep(Duration::from_millis(200)).await;
    etcd.pause(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    etcd.resume(0);
    // The watch went silent during the freeze and was re-created.
    let mut noticed = None;
    for _ in 0..500 {
        let stats = handle
            .stats()
            .await
            .expect("still running after the freeze");
        if stats.rewatches.contains_key("silent") || stats.rewatches.contains_key("lost") {
            noticed = Some(stats);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(noticed.is_some(), "the silent watch was re-created");
    let result = tokio::time::timeout(WAIT, handle.wait())
        .await
        .expect("in time");
    result.expect("the worker survived the freeze");
    let mut c = client.clone();
    let resp = c.get(format!("{P}/counter"), None).await.unwrap();
    assert_eq!(resp.kvs()[0].value_str().unwrap(), "30");
}

#[actix_rt::test]
async fn a_wiped_etcd_ends_the_worker_with_history_reset_instead_of_stalling() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    const P: &str = "/wiped";
    let reactor = FnReactor::new(|state: &mut KvState, _| {
        let n = state.get_i64(&format!("{P}/counter")).unwrap_or(0);
        if n < 20 {
            state.queue(vec![DataPatch::put(
                format!("{P}/counter"),
                (n + 1).to_string(),
            )]);
        }
        Ok(())
    });
    let handle = actors::start(client, reactor, KvState::default(), config(P));
    let mut applied = 0;
    for _ in 0..500 {
        applied = handle
            .stats()
            .await
            .expect("the worker runs")
            .applied_revision;
        if applied >= 21 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        applied >= 21,
        "the counter did not reach 20 (revision {applied})"
    );
    // A new, empty etcd on the same address: its revision starts again at 1.
    let etcd = tokio::task::spawn_blocking(move || {
        let mut etcd = etcd;
        etcd.kill(0);
        std::fs::remove_dir_all(etcd.data_dir(0)).unwrap();
        etcd.restart(0);
        etcd
    })
    .await
    .unwrap();
    let result = tokio::time::timeout(WAIT, handle.wait())
        .await
        .unwrap_or_else(|_| panic!("the worker stalled\n{}", etcd.log_tails()));
    match result {
        Err(actors::worker::Error::HistoryReset {
            snapshot,
            applied: seen,
        }) => {
            assert!(seen >= applied, "applied {seen} < {applied} seen before");
            assert!(
                snapshot < seen,
                "snapshot {snapshot} is not older than {seen}"
            );
        }
        other => panic!("expected HistoryReset, got {other:?}"),
    }
}

/// An etcd that accepts every watch and drops it at once (through a proxy that
/// resets each connection 100 ms after accepting it): the worker opens the
/// watch again with a growing backoff, not every 25-50 ms forever. The bound:
/// with delays from 50 ms doubling (jittered down to half), n attempts take at
/// least 25 ms x (2^n - 1), so 10 s hold at most log2(10 s / 25 ms + 1) + 1, 9.6:
/// 12 leaves room for the connections' own 100 ms.
#[actix_rt::test]
async fn a_watch_that_dies_at_once_is_opened_again_with_a_growing_backoff() {
    use crate::harness::proxy::{socket_addr, Link, Proxy};
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let proxy = Proxy::start(vec![socket_addr(&etcd.endpoints()[0])]).await;
    let client = Client::connect([proxy.url.as_str()], None).await.unwrap();
    const P: &str = "/flapping";
    let reactor = FnReactor::new(|_: &mut KvState, _| Ok(()));
    let handle = actors::start(client, reactor, KvState::default(), config(P));
    for _ in 0..500 {
        if handle.stats().await.is_some_and(|s| s.ticks > 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = handle.stats().await.expect("running");
    assert!(before.ticks > 0, "listed and ticking");
    let rewatched = |s: &flotilla::actors::WorkerStats| s.rewatches.values().sum::<u64>();
    proxy.set(Link::Flap(Duration::from_millis(100)));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = handle.stats().await.expect("still running");
    let attempts = rewatched(&after) - rewatched(&before);
    assert!(
        (2..=12).contains(&attempts),
        "{attempts} watches opened in 10 s: {:?}",
        after.rewatches
    );
    // Back to normal: it goes on.
    proxy.set(Link::Up);
    let mut c = etcd.client().await;
    c.put(format!("{P}/k"), "v", None).await.unwrap();
    handle.stop();
    tokio::time::timeout(WAIT, handle.wait())
        .await
        .expect("in time")
        .expect("stopped cleanly");
}
