//! The orchestrator worker against a real etcd: the behaviour of tiflow's
//! `etcd_worker_test.go` and `batch_test.go`, ported, plus the holes tiflow
//! leaves open.

use crate::harness;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::reactors::{add, append, failed, Bank, FnReactor, KvState, Linearizability};
use crate::harness::EtcdCluster;
use etcd_client::{Client, GetOptions};
use flotilla::actors::{self, worker, Fence, WorkerConfig};
use flotilla::state::{plan, reactor, Change, DataPatch, Reactor};

const WAIT: Duration = Duration::from_secs(60);

fn config(prefix: &str) -> WorkerConfig {
    WorkerConfig {
        tick_interval: Duration::from_millis(10),
        ..WorkerConfig::new(prefix)
    }
}

async fn run<R>(client: &Client, prefix: &str, reactor: R) -> Result<(), worker::Error>
where
    R: Reactor<State = KvState> + 'static,
{
    run_with(client, config(prefix), reactor).await
}

async fn run_with<R>(client: &Client, config: WorkerConfig, reactor: R) -> Result<(), worker::Error>
where
    R: Reactor<State = KvState> + 'static,
{
    let handle = actors::start(client.clone(), reactor, KvState::default(), config);
    tokio::time::timeout(WAIT, handle.wait())
        .await
        .expect("the worker ended in time")
}

async fn get(client: &Client, key: &str) -> Option<String> {
    let mut client = client.clone();
    let resp = client.get(key, None).await.expect("get");
    resp.kvs()
        .first()
        .map(|kv| String::from_utf8(kv.value().to_vec()).expect("utf8"))
}

async fn revision(client: &Client) -> i64 {
    let mut client = client.clone();
    client
        .get("/", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision()
}

#[actix_rt::test]
async fn sum_invariant_holds_with_six_concurrent_workers() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    const P: &str = "/sum";
    const KEYS: usize = 10;
    const WRITERS: usize = 5;
    const TARGET: i64 = 20;
    let mut c = client.clone();
    c.put(format!("{P}/total"), "0", None).await.unwrap();
    for k in 0..KEYS {
        for w in 0..WRITERS {
            c.put(format!("{P}/v/{k}/{w}"), "0", None).await.unwrap();
        }
    }
    // Every tick of every worker checks the invariant on its snapshot: total
    // equals the sum of all values, and each writer's column is equal across
    // all keys (it is always bumped in one group).
    let check = |state: &KvState| -> Result<i64, reactor::Error> {
        let total = state.get_i64(&format!("{P}/total")).unwrap();
        let mut sum = 0;
        for w in 0..WRITERS {
            let column = state.get_i64(&format!("{P}/v/0/{w}")).unwrap();
            for k in 0..KEYS {
                let v = state.get_i64(&format!("{P}/v/{k}/{w}")).unwrap();
                if v != column {
                    return Err(failed(format!("column {w} is torn: {v} != {column}")));
                }
                sum += v;
            }
        }
        if sum != total {
            return Err(failed(format!("total {total} != sum {sum}")));
        }
        Ok(total)
    };
    let mut workers = Vec::new();
    for w in 0..WRITERS {
        let reactor = FnReactor::new(move |state: &mut KvState, _| {
            check(state)?;
            let mine = state.get_i64(&format!("{P}/v/0/{w}")).unwrap();
            if mine >= TARGET {
                return Err(reactor::Error::Finished);
            }
            let mut group: Vec<DataPatch> = (0..KEYS)
                .map(|k| {
                    DataPatch::single(format!("{P}/v/{k}/{w}"), move |old| {
                        let v: i64 = std::str::from_utf8(old.unwrap()).unwrap().parse().unwrap();
                        // Decided on the snapshot: the compare guarantees it
                        // is still below the target when it commits.
                        Ok(Change::Put((v + 1).to_string().into_bytes()))
                    })
                })
                .collect();
            group.push(add(format!("{P}/total"), KEYS as i64));
            state.queue(group);
            Ok(())
        });
        let client = client.clone();
        workers.push(actix_rt::spawn(
            async move { run(&client, P, reactor).await },
        ));
    }
    let observer = FnReactor::new(move |state: &mut KvState, _| {
        let total = check(state)?;
        if total == (KEYS * WRITERS) as i64 * TARGET {
            return Err(reactor::Error::Finished);
        }
        Ok(())
    });
    let observer_ticks = observer.ticks.clone();
    run(&client, P, observer).await.expect("observer");
    for w in workers {
        w.await.unwrap().expect("writer");
    }
    assert!(observer_ticks.load(Ordering::SeqCst) > 1);
    for k in 0..KEYS {
        for w in 0..WRITERS {
            assert_eq!(
                get(&client, &format!("{P}/v/{k}/{w}")).await.as_deref(),
                Some("20")
            );
        }
    }
    assert_eq!(
        get(&client, &format!("{P}/total")).await.as_deref(),
        Some("1000")
    );
}

#[actix_rt::test]
async fn linearizability_values_never_go_back_and_ticks_see_own_writes() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    const P: &str = "/lin";
    let mut c = client.clone();
    for i in 0..200 {
        c.put(format!("{P}/value"), i.to_string(), None)
            .await
            .unwrap();
    }
    let writer = {
        let mut c = client.clone();
        actix_rt::spawn(async move {
            for i in 200..=1000 {
                c.put(format!("{P}/value"), i.to_string(), None)
                    .await
                    .unwrap();
            }
        })
    };
    let reactor = Linearizability::new(P, 1000, true);
    run(&client, P, reactor).await.expect("linearizable");
    writer.await.unwrap();
}

#[actix_rt::test]
async fn finished_commits_the_last_patches_then_stops() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let reactor = FnReactor::new(|state: &mut KvState, n| {
        if n < 2 {
            state.queue(vec![append("/fin/key1", "abc"), append("/fin/key2", "123")]);
            return Ok(());
        }
        state.queue(vec![
            append("/fin/key1", "fin"),
            DataPatch::delete("/fin/key2"),
        ]);
        Err(reactor::Error::Finished)
    });
    run(&client, "/fin", reactor)
        .await
        .expect("finished cleanly");
    assert_eq!(
        get(&client, "/fin/key1").await.as_deref(),
        Some("abcabcfin")
    );
    assert_eq!(get(&client, "/fin/key2").await, None);
}

#[actix_rt::test]
async fn patches_on_one_key_compose_in_order() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let reactor = FnReactor::new(|state: &mut KvState, n| {
        if n < 2 {
            state.queue(vec![
                append("/cover/key1", "abc"),
                append("/cover/key2", "123"),
                append("/cover/key1", "cba"),
                append("/cover/key2", "321"),
            ]);
            return Ok(());
        }
        state.queue(vec![
            append("/cover/key1", "fin"),
            append("/cover/key1", "fin"),
            DataPatch::delete("/cover/key2"),
            append("/cover/key2", "fin"),
        ]);
        Err(reactor::Error::Finished)
    });
    run(&client, "/cover", reactor).await.expect("finished");
    assert_eq!(
        get(&client, "/cover/key1").await.as_deref(),
        Some("abccbaabccbafinfin")
    );
    assert_eq!(get(&client, "/cover/key2").await.as_deref(), Some("fin"));
}

/// Proves nothing is written (the revision stays put). That no txn is even
/// sent is the planner's job, proven by its unit test
/// `changes_that_cancel_out_write_nothing` (an empty plan).
#[actix_rt::test]
async fn ticks_whose_patches_change_nothing_write_nothing() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let mut c = client.clone();
    c.put("/empty/key2", "123", None).await.unwrap();
    let before = revision(&client).await;
    let reactor = FnReactor::new(|state: &mut KvState, n| {
        match n {
            // Put then delete an absent key in one group; delete absent keys.
            0 => state.queue(vec![
                DataPatch::put("/empty/key1", "abc"),
                DataPatch::delete("/empty/key1"),
                DataPatch::delete("/empty/never"),
            ]),
            // Re-put a key with the bytes it already has.
            1 => state.queue(vec![
                DataPatch::put("/empty/key2", "123"),
                DataPatch::delete("/empty/key1"),
            ]),
            _ => {
                state.queue(vec![
                    DataPatch::delete("/empty/key1"),
                    DataPatch::put("/empty/key2", "123"),
                ]);
                return Err(reactor::Error::Finished);
            }
        }
        Ok(())
    });
    run(&client, "/empty", reactor).await.expect("finished");
    assert_eq!(revision(&client).await, before, "no txn was sent");
    assert_eq!(get(&client, "/empty/key1").await, None);
    assert_eq!(get(&client, "/empty/key2").await.as_deref(), Some("123"));
}

#[actix_rt::test]
async fn a_write_outside_the_prefix_stops_the_worker_with_a_typed_error() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let reactor = FnReactor::new(|state: &mut KvState, _| {
        state.queue(vec![DataPatch::put("/elsewhere/key3", "123")]);
        Ok(())
    });
    let err = run(&client, "/outside", reactor).await.unwrap_err();
    assert!(
        matches!(
            err,
            worker::Error::Plan(plan::Error::KeyOutsidePrefix { .. })
        ),
        "{err}"
    );
    assert_eq!(get(&client, "/elsewhere/key3").await, None);
}

#[actix_rt::test]
async fn an_empty_value_is_a_value_and_a_missing_one_a_delete() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let reactor = FnReactor::new(|state: &mut KvState, n| {
        let (empty, missing) = if n % 2 == 0 {
            ("/nil/key1", "/nil/key2")
        } else {
            ("/nil/key2", "/nil/key1")
        };
        state.queue(vec![DataPatch::put(empty, ""), DataPatch::delete(missing)]);
        if n == 2 {
            // The state saw the empty value as present.
            return Err(reactor::Error::Finished);
        }
        Ok(())
    });
    run(&client, "/nil", reactor).await.expect("finished");
    assert_eq!(get(&client, "/nil/key1").await.as_deref(), Some(""));
    assert_eq!(get(&client, "/nil/key2").await, None);
}

/// Runs a worker on its own thread and actix system, so its reactor can block
/// inside a tick while the test goes on.
fn spawn_blocking_worker<F>(
    endpoints: Vec<String>,
    prefix: &'static str,
    tick: F,
) -> std::thread::JoinHandle<(Result<(), worker::Error>, u64)>
where
    F: FnMut(&mut KvState, u64) -> Result<(), reactor::Error> + Send + 'static,
{
    std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let client = Client::connect(endpoints, None).await.expect("connect");
            let reactor = FnReactor::new(tick);
            let ticks = reactor.ticks.clone();
            let result = run(&client, prefix, reactor).await;
            (result, ticks.load(Ordering::SeqCst))
        })
    })
}

#[actix_rt::test]
async fn a_modify_decided_before_a_delete_does_not_resurrect_the_key() {
    // tiflow's TestModifyAfterDelete: worker 1 decides to modify a key that
    // exists in its snapshot; worker 2 deletes it meanwhile. The modify must
    // fail its compare, and on fresh state worker 1 sees nothing to modify.
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let mut c = client.clone();
    c.put("/mad/key1", "original value", None).await.unwrap();

    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let modifier = spawn_blocking_worker(etcd.endpoints(), "/mad", move |state, n| {
        if n == 0 {
            assert!(state.get("/mad/key1").is_some());
            entered_tx.send(()).unwrap();
            release_rx.recv().unwrap();
        }
        state.queue(vec![DataPatch::single("/mad/key1", |old| {
            Ok(match old {
                Some(_) => Change::Put(b"modified value".to_vec()),
                None => Change::Keep,
            })
        })]);
        Err(reactor::Error::Finished)
    });
    entered_rx.recv().unwrap();

    let deleter = FnReactor::new(|state: &mut KvState, _| {
        state.queue(vec![DataPatch::delete("/mad/key1")]);
        Err(reactor::Error::Finished)
    });
    run(&client, "/mad", deleter).await.expect("deleter");
    assert_eq!(get(&client, "/mad/key1").await, None);

    release_tx.send(()).unwrap();
    let (result, ticks) = modifier.join().unwrap();
    result.expect("the modifier stops cleanly");
    assert!(
        ticks >= 2,
        "the stale modify conflicted and was re-derived (ticks: {ticks})"
    );
    assert_eq!(
        get(&client, "/mad/key1").await,
        None,
        "the deleted key stays deleted"
    );
}

#[actix_rt::test]
async fn a_write_decided_on_a_key_deleted_meanwhile_is_refused() {
    // Write skew through a delete (what tiflow's delete counter is for):
    // worker 1 sees /info/x and creates /task/x for it; worker 2 deletes
    // /info/x meanwhile. Worker 1 guards /info/x, so no orphan task appears.
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let mut c = client.clone();
    c.put("/skew/info/x", "changefeed x", None).await.unwrap();

    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let assigner = spawn_blocking_worker(etcd.endpoints(), "/skew", move |state, n| {
        if n == 0 {
            entered_tx.send(()).unwrap();
            release_rx.recv().unwrap();
        }
        if state.get("/skew/info/x").is_some() && state.get("/skew/task/x").is_none() {
            state.queue(vec![
                DataPatch::guard("/skew/info/x"),
                DataPatch::put("/skew/task/x", "assigned"),
            ]);
        }
        Err(reactor::Error::Finished)
    });
    entered_rx.recv().unwrap();
    let deleter = FnReactor::new(|state: &mut KvState, _| {
        state.queue(vec![DataPatch::delete("/skew/info/x")]);
        Err(reactor::Error::Finished)
    });
    run(&client, "/skew", deleter).await.expect("deleter");
    release_tx.send(()).unwrap();
    let (result, ticks) = assigner.join().unwrap();
    result.expect("the assigner stops cleanly");
    assert!(
        ticks >= 2,
        "the stale assignment conflicted (ticks: {ticks})"
    );
    assert_eq!(
        get(&client, "/skew/task/x").await,
        None,
        "no orphan task key"
    );
}

#[actix_rt::test]
async fn a_thousand_single_key_groups_commit_in_txns_under_the_op_limit() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let before = revision(&client).await;
    let reactor = FnReactor::new(|state: &mut KvState, n| {
        if n == 0 {
            for i in 0..1000 {
                state.queue(vec![DataPatch::put(
                    format!("/batch/key{i:04}"),
                    format!("abc{i}"),
                )]);
            }
            return Ok(());
        }
        if state.values.len() != 1000 {
            return Err(failed(format!(
                "saw {} keys after the commit",
                state.values.len()
            )));
        }
        Err(reactor::Error::Finished)
    });
    run(&client, "/batch", reactor)
        .await
        .expect("all groups committed");
    let mut c = client.clone();
    let resp = c
        .get(
            "/batch/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(resp.count(), 1000);
    // 1000 keys at 128 per txn: 8 txns, 8 revisions.
    assert_eq!(revision(&client).await - before, 8);
}

#[actix_rt::test]
async fn a_group_of_exactly_the_op_limit_commits() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let reactor = FnReactor::new(|state: &mut KvState, _| {
        state.queue(vec![DataPatch::put("/exact/first", "x")]);
        state.queue(
            (0..128)
                .map(|i| DataPatch::put(format!("/exact/k{i:03}"), "v"))
                .collect(),
        );
        Err(reactor::Error::Finished)
    });
    run(&client, "/exact", reactor).await.expect("committed");
    let mut c = client.clone();
    let resp = c
        .get(
            "/exact/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(resp.count(), 129);
}

#[actix_rt::test]
async fn a_group_over_a_txn_limit_stops_the_worker_with_a_typed_error() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;

    let too_many = FnReactor::new(|state: &mut KvState, _| {
        state.queue(
            (0..257)
                .map(|i| DataPatch::put(format!("/big/k{i:03}"), "v"))
                .collect(),
        );
        Ok(())
    });
    let err = run(&client, "/big", too_many).await.unwrap_err();
    assert!(
        matches!(
            err,
            worker::Error::Plan(plan::Error::GroupTooLarge {
                keys: 257,
                max_keys: 128,
                ..
            })
        ),
        "{err}"
    );

    let too_big = FnReactor::new(|state: &mut KvState, _| {
        state.queue(vec![DataPatch::put("/big/value", vec![b'x'; 1_310_720])]);
        Ok(())
    });
    let err = run(&client, "/big", too_big).await.unwrap_err();
    assert!(
        matches!(
            err,
            worker::Error::Plan(plan::Error::GroupTooLarge { keys: 1, .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("1310720 bytes"), "{err}");

    let mut c = client.clone();
    let resp = c
        .get(
            "/big/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(resp.count(), 0, "nothing of a rejected group was written");
}

#[actix_rt::test]
async fn a_deposed_fence_stops_the_worker_before_it_writes() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let mut c = client.clone();
    let put = c.put("/fence/leader", "me", None).await.unwrap();
    let create_revision = put.header().unwrap().revision();

    let deposed = Arc::new(AtomicU64::new(0));
    let flag = deposed.clone();
    let reactor = FnReactor::new(move |state: &mut KvState, n| {
        if n == 0 {
            state.queue(vec![DataPatch::put("/fence/data/a", "while leader")]);
        } else if flag.load(Ordering::SeqCst) == 1 {
            state.queue(vec![DataPatch::put(
                "/fence/data/b",
                "after losing the lease",
            )]);
        }
        Ok(())
    });
    let mut config = config("/fence/data");
    config.fence = Some(Fence {
        key: "/fence/leader".into(),
        create_revision,
    });
    let handle = actors::start(client.clone(), reactor, KvState::default(), config);
    // The first write lands while the fence holds.
    for _ in 0..200 {
        if get(&client, "/fence/data/a").await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        get(&client, "/fence/data/a").await.as_deref(),
        Some("while leader")
    );
    // Another leader takes over: the key is deleted and re-created.
    c.delete("/fence/leader", None).await.unwrap();
    c.put("/fence/leader", "someone else", None).await.unwrap();
    deposed.store(1, Ordering::SeqCst);
    let err = tokio::time::timeout(WAIT, handle.wait())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, worker::Error::FenceLost { .. }), "{err}");
    assert_eq!(
        get(&client, "/fence/data/b").await,
        None,
        "a deposed worker wrote nothing"
    );
}

#[actix_rt::test]
async fn bank_sum_stays_zero_with_ten_restarting_workers() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let checked = Arc::new(AtomicU64::new(0));
    harness::reactors::seed_bank(&client, "/bank", 25).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut slots = Vec::new();
    for slot in 0..10u64 {
        let client = client.clone();
        let checked = checked.clone();
        slots.push(actix_rt::spawn(async move {
            let mut runs = 0u64;
            while tokio::time::Instant::now() < deadline {
                let bank = Bank::new("/bank", 25, slot * 1000 + runs, 0.2, checked.clone());
                let mut config = config("/bank");
                config.tick_interval = Duration::from_millis(20);
                run_with(&client, config, bank)
                    .await
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
    // 10 slots: more than 10 runs means workers finished and new ones started.
    assert!(runs > 10, "workers restarted ({runs} runs)");
    assert!(
        checked.load(Ordering::Relaxed) > 50,
        "ticks checked the sum"
    );
    assert_eq!(harness::reactors::bank_sum(&client, "/bank").await, 0);
}

/// A prefix of more than 4 MiB (tonic's default decode limit, where the owner
/// used to stop for good), one value of 1 MiB among them: the worker reads it
/// in pages at one revision and ticks. With a client limit below the first
/// page's size the page is halved until it fits: never fatal.
#[actix_rt::test]
async fn a_prefix_over_the_decode_limit_is_read_in_pages_and_ticks() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    const P: &str = "/big";
    const VALUES: usize = 80;
    let mut c = client.clone();
    let value = vec![b'v'; 64 << 10];
    for i in 0..VALUES {
        c.put(format!("{P}/v/{i:03}"), value.clone(), None)
            .await
            .unwrap();
    }
    c.put(format!("{P}/huge"), vec![b'h'; 1 << 20], None)
        .await
        .unwrap();
    let expected = VALUES * (64 << 10) + (1 << 20);
    let cases = [
        (WorkerConfig::new(P).max_response_bytes, 100),
        (3 << 20, 100),
        // One range (the default), falling back to pages when it is too large.
        (WorkerConfig::new(P).max_response_bytes, 0),
        (3 << 20, 0),
    ];
    for (limit, page_keys) in cases {
        let seen = format!("{P}/seen/{limit}-{page_keys}");
        let key = seen.clone();
        let reactor = FnReactor::new(move |state: &mut KvState, _| {
            let bytes: usize = state
                .values
                .iter()
                .filter(|(k, _)| k.starts_with(&format!("{P}/v/")) || *k == &format!("{P}/huge"))
                .map(|(_, v)| v.len())
                .sum();
            if state.get(&key).is_some() {
                return Err(reactor::Error::Finished);
            }
            state.queue(vec![DataPatch::put(key.clone(), bytes.to_string())]);
            Ok(())
        });
        let config = WorkerConfig {
            max_response_bytes: limit,
            list_page_keys: page_keys,
            ..config(P)
        };
        run_with(&client, config, reactor)
            .await
            .unwrap_or_else(|e| panic!("limit {limit}: {e}"));
        assert_eq!(
            get(&client, &seen).await,
            Some(expected.to_string()),
            "limit {limit}: the first tick saw the whole prefix"
        );
    }
}

/// A standby worker follows the prefix without ticking or writing; activated,
/// its first tick waits until its state reached the barrier it was given (a
/// revision not delivered yet here), then sees every key up to it.
#[actix_rt::test]
async fn a_standby_worker_ticks_only_once_activated_and_past_its_barrier() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let mut kv = client.clone();
    kv.put("/standby/a", "1", None).await.unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<Option<String>>::new()));
    let record = seen.clone();
    let reactor = FnReactor::new(move |state: &mut KvState, n| {
        let b = state
            .get("/standby/b")
            .map(|v| String::from_utf8_lossy(v).into_owned());
        record.lock().unwrap().push(b);
        if n == 0 {
            state.queue(vec![append("/standby/written", "x")]);
        }
        Ok(())
    });
    let ticks = reactor.ticks.clone();
    let handle = actors::start_standby(
        client.clone(),
        reactor,
        KvState::default(),
        config("/standby"),
    );
    // It follows without ticking.
    kv.put("/standby/c", "3", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ticks.load(Ordering::SeqCst), 0, "a standby never ticks");

    // Activated with a barrier one revision ahead: no tick until it arrives.
    let barrier = revision(&client).await + 1;
    kv.put("/fence/standby", "me", None).await.unwrap();
    let fence = Fence {
        key: "/fence/standby".into(),
        create_revision: barrier,
    };
    let barrier = barrier + 1;
    handle.activate(Some(fence), barrier);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        ticks.load(Ordering::SeqCst),
        0,
        "no tick before the barrier"
    );
    let put = kv.put("/standby/b", "2", None).await.unwrap();
    // At or past the barrier (a write elsewhere may have come in between: the
    // barrier is then passed by this one, the prefix's next change).
    assert!(put.header().expect("a header").revision() >= barrier);
    let deadline = tokio::time::Instant::now() + WAIT;
    while get(&client, "/standby/written").await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the active worker wrote"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        seen.lock().unwrap()[0].as_deref(),
        Some("2"),
        "its first tick saw the barrier's write"
    );
    handle.stop();
    let _ = tokio::time::timeout(WAIT, handle.wait())
        .await
        .expect("stopped");
}

/// The first read of a prefix of more than 100,000 keys is one range request
/// (counted by etcd itself), and in pages it is one request per page: the
/// requests grow linearly with the keys, never with their square.
#[actix_rt::test]
async fn the_first_read_of_over_a_hundred_thousand_keys_is_one_range_request() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    const P: &str = "/many";
    const KEYS: usize = 100_100;
    let mut c = client.clone();
    let keys: Vec<String> = (0..KEYS).map(|i| format!("{P}/k/{i:06}")).collect();
    for chunk in keys.chunks(128) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|k| etcd_client::TxnOp::put(k.as_str(), "v", None))
            .collect();
        c.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }
    for (page_keys, most_requests) in [(0, 1), (10_000, KEYS as u64 / 10_000 + 1)] {
        let counted = Arc::new(AtomicU64::new(0));
        let count = counted.clone();
        let reactor = FnReactor::new(move |state: &mut KvState, _| {
            count.store(state.values.len() as u64, Ordering::SeqCst);
            Err(reactor::Error::Finished)
        });
        let before = etcd.ranges_served(0);
        let config = WorkerConfig {
            list_page_keys: page_keys,
            ..config(P)
        };
        run_with(&client, config, reactor).await.expect("finished");
        let requests = etcd.ranges_served(0) - before;
        assert_eq!(
            counted.load(Ordering::SeqCst),
            KEYS as u64,
            "every key read"
        );
        assert!(
            (1..=most_requests).contains(&requests),
            "pages of {page_keys}: {requests} range requests for {KEYS} keys"
        );
    }
}
