//! The executor registry actor on a real SQL store: the behaviour of
//! tiflow's `executor_manager_test.go`, ported, and what tiflow lacks.

use crate::harness;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use actix::prelude::*;
use flotilla::actors::executor_registry::{
    self, Caller, Deregister, ExecutorEvent, ExecutorRegistry, ExecutorStatus, ExecutorTable,
    GetExecutor, GetRegistryStats, HeartbeatAck, ListExecutors, Register, Registration,
    RegistryConfig, RegistryHandle, StopRegistry, Subscribe, TokenHash,
};
use flotilla::store::{Store, StoreOptions};
use tempfile::TempDir;

fn fast_config() -> RegistryConfig {
    RegistryConfig {
        heartbeat_interval: Duration::from_millis(100),
        default_ttl: Duration::from_millis(600),
        min_ttl: Duration::from_millis(300),
        max_ttl: Duration::from_secs(5),
        keepalive_interval: Duration::from_millis(50),
        failover_grace: Duration::from_millis(1500),
        ..RegistryConfig::default()
    }
}

async fn sqlite_store(dir: &TempDir) -> Store {
    let url = format!("sqlite://{}/meta.db?mode=rwc", dir.path().display());
    Store::connect(&url, &StoreOptions::default())
        .await
        .expect("sqlite store")
}

/// The registry as the server starts it: the actor, and the table heartbeats go to.
async fn start(store: Store, config: RegistryConfig) -> RegistryHandle {
    let handle = ExecutorRegistry::new(config, store).start_with_table();
    for _ in 0..500 {
        if handle.addr.send(GetRegistryStats).await.unwrap().loaded {
            return handle;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the registry did not load");
}

fn register_msg(name: &str, labels: &[(&str, &str)]) -> Register {
    Register {
        name: name.into(),
        address: format!("127.0.0.1:{}", 10_000 + name.len()),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

async fn register(addr: &Addr<ExecutorRegistry>, name: &str) -> Registration {
    addr.send(register_msg(name, &[]))
        .await
        .unwrap()
        .expect("registered")
}

/// One heartbeat, on the path the HTTP handler takes.
fn heartbeat(table: &ExecutorTable, r: &Registration) -> Result<(), executor_registry::Error> {
    beat(table, &r.executor.id, &r.token, None).map(|_| ())
}

fn beat(
    table: &ExecutorTable,
    id: &str,
    token: &str,
    ttl: Option<Duration>,
) -> Result<HeartbeatAck, executor_registry::Error> {
    table.heartbeat(id, &TokenHash::of(token), ttl)
}

#[actix_rt::test]
async fn register_heartbeat_expire_and_watch() {
    harness::init_tracing();
    let dir = TempDir::new().unwrap();
    let RegistryHandle { addr, table } = start(sqlite_store(&dir).await, fast_config()).await;

    let mut sub = addr.send(Subscribe::default()).await.unwrap().unwrap();
    assert!(sub.snapshot.is_empty());

    let r = register(&addr, "exec").await;
    assert!(r.executor.id.starts_with("exec-") && r.executor.id.len() == "exec-".len() + 8);
    assert_eq!(r.executor.status, ExecutorStatus::Initing);
    assert_eq!(r.token.len(), 64);
    match sub.events.recv().await.unwrap() {
        ExecutorEvent::Online { seq, executor } => {
            assert_eq!(seq, sub.seq + 1);
            assert_eq!(executor.id, r.executor.id);
        }
        other => panic!("expected online, got {other:?}"),
    }

    heartbeat(&table, &r).unwrap();
    let info = addr
        .send(GetExecutor {
            id: r.executor.id.clone(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.status, ExecutorStatus::Running);
    assert!(info.last_heartbeat_ms_ago.unwrap() < 1000);
    // The first heartbeat is announced: online again, now running (the
    // owner prefers executors that heartbeat to this leader).
    match sub.events.recv().await.unwrap() {
        ExecutorEvent::Online { executor, .. } => {
            assert_eq!(executor.id, r.executor.id);
            assert_eq!(executor.status, ExecutorStatus::Running);
        }
        other => panic!("expected online (running), got {other:?}"),
    }
    heartbeat(&table, &r).unwrap();

    // Silence: past the TTL it expires, is announced offline, and its
    // heartbeats are refused with "tombstone" from then on.
    tokio::time::sleep(Duration::from_millis(900)).await;
    match sub.events.recv().await.unwrap() {
        ExecutorEvent::Offline { id, .. } => assert_eq!(id, r.executor.id),
        other => panic!("expected offline, got {other:?}"),
    }
    assert_eq!(
        heartbeat(&table, &r),
        Err(executor_registry::Error::TombstoneExecutor(
            r.executor.id.clone()
        ))
    );
    let info = addr
        .send(GetExecutor {
            id: r.executor.id.clone(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.status, ExecutorStatus::Tombstone);
    let live = addr
        .send(ListExecutors {
            status: Some(ExecutorStatus::Running),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(live.is_empty());

    // The SQL row is deleted in the background.
    let store = sqlite_store(&dir).await;
    for _ in 0..100 {
        if store.load_executors().await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(store.load_executors().await.unwrap().is_empty());
}

#[actix_rt::test]
async fn unknown_ids_and_wrong_tokens_are_refused_and_do_not_count() {
    harness::init_tracing();
    let dir = TempDir::new().unwrap();
    let RegistryHandle { addr, table } = start(sqlite_store(&dir).await, fast_config()).await;
    let a = register(&addr, "a").await;
    let b = register(&addr, "b").await;
    let unknown = beat(&table, "nobody-00000000", &a.token, None);
    assert_eq!(
        unknown,
        Err(executor_registry::Error::UnknownExecutor(
            "nobody-00000000".into()
        ))
    );

    // b's token on a, then a wrong one: refused, and they do not keep a
    // alive (its TTL is 600 ms; it turns into a tombstone meanwhile).
    let mut b_token_on_a = Registration {
        token: b.token.clone(),
        ..a.clone()
    };
    let mut refused = 0;
    for _ in 0..10 {
        match heartbeat(&table, &b_token_on_a) {
            Err(executor_registry::Error::Unauthorized(id)) => {
                assert_eq!(id, a.executor.id);
                refused += 1;
            }
            Err(executor_registry::Error::TombstoneExecutor(id)) => assert_eq!(id, a.executor.id),
            other => panic!("unexpected {other:?}"),
        }
        b_token_on_a.token = "wrong".into();
        heartbeat(&table, &b).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused >= 3, "refused {refused} times before expiry");
    let a_now = addr
        .send(GetExecutor {
            id: a.executor.id.clone(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        a_now.status,
        ExecutorStatus::Tombstone,
        "bad heartbeats did not count"
    );
    let b_now = addr
        .send(GetExecutor {
            id: b.executor.id.clone(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b_now.status, ExecutorStatus::Running);

    // Deregistration needs the executor's own token (or the admin).
    let wrong = addr
        .send(Deregister {
            id: b.executor.id.clone(),
            caller: Caller::Executor {
                token: a.token.clone(),
            },
        })
        .await
        .unwrap();
    assert_eq!(
        wrong,
        Err(executor_registry::Error::Unauthorized(
            b.executor.id.clone()
        ))
    );
    addr.send(Deregister {
        id: b.executor.id.clone(),
        caller: Caller::Executor {
            token: b.token.clone(),
        },
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        heartbeat(&table, &b),
        Err(executor_registry::Error::TombstoneExecutor(
            b.executor.id.clone()
        ))
    );
}

#[actix_rt::test]
async fn ttl_requests_are_clamped_to_the_configured_bounds() {
    let dir = TempDir::new().unwrap();
    let RegistryHandle { addr, table } = start(sqlite_store(&dir).await, fast_config()).await;
    let r = register(&addr, "ttl").await;
    for (asked, granted) in [(1u64, 300u64), (700, 700), (3_600_000, 5_000)] {
        let ack = beat(
            &table,
            &r.executor.id,
            &r.token,
            Some(Duration::from_millis(asked)),
        )
        .unwrap();
        assert_eq!(ack.ttl, Duration::from_millis(granted), "asked {asked} ms");
    }
}

#[actix_rt::test]
async fn a_thousand_concurrent_registrations_with_one_name_get_distinct_ids() {
    harness::init_tracing();
    let dir = TempDir::new().unwrap();
    let config = RegistryConfig {
        default_ttl: Duration::from_secs(60),
        max_ttl: Duration::from_secs(60),
        ..fast_config()
    };
    let addr = start(sqlite_store(&dir).await, config).await.addr;
    let sends: Vec<_> = (0..1000)
        .map(|_| addr.send(register_msg("same", &[])))
        .collect();
    let results = futures::future::join_all(sends).await;
    let ids: BTreeSet<String> = results
        .into_iter()
        .map(|r| r.unwrap().expect("registered").executor.id)
        .collect();
    assert_eq!(ids.len(), 1000);
    let listed = addr.send(ListExecutors::default()).await.unwrap();
    assert_eq!(listed.len(), 1000);
    assert_eq!(
        sqlite_store(&dir)
            .await
            .load_executors()
            .await
            .unwrap()
            .len(),
        1000
    );
}

/// A burst is written a batch per statement: with one pooled connection (an
/// in-memory SQLite) and a 100 ms acquire timeout, 1,000 registrations queued
/// a row per statement made the last ones wait out the timeout (503
/// `store_unavailable`; CI saw it in the registry bench's smoke run).
#[actix_rt::test]
async fn a_burst_of_a_thousand_registrations_on_one_connection_is_never_refused() {
    harness::init_tracing();
    let options = StoreOptions {
        acquire_timeout: Duration::from_millis(100),
        ..StoreOptions::default()
    };
    let store = Store::connect("sqlite::memory:", &options)
        .await
        .expect("in-memory store");
    let config = RegistryConfig {
        default_ttl: Duration::from_secs(60),
        max_ttl: Duration::from_secs(60),
        ..fast_config()
    };
    let addr = start(store.clone(), config).await.addr;
    let sends: Vec<_> = (0..1000)
        .map(|i| addr.send(register_msg(&format!("burst{i}"), &[])))
        .collect();
    let refused: Vec<executor_registry::Error> = futures::future::join_all(sends)
        .await
        .into_iter()
        .filter_map(|r| r.unwrap().err())
        .collect();
    assert!(
        refused.is_empty(),
        "{} refused, first: {:?}",
        refused.len(),
        refused.first()
    );
    assert_eq!(store.load_executors().await.unwrap().len(), 1000);
}

#[actix_rt::test]
async fn of_ten_thousand_executors_exactly_the_hundred_silent_ones_expire() {
    harness::init_tracing();
    let dir = TempDir::new().unwrap();
    let config = RegistryConfig {
        default_ttl: Duration::from_secs(60),
        min_ttl: Duration::from_millis(300),
        max_ttl: Duration::from_secs(60),
        keepalive_interval: Duration::from_millis(100),
        // Room for the 10,000 first heartbeats' announcements.
        watch_buffer: 20_000,
        ..RegistryConfig::default()
    };
    let RegistryHandle { addr, table } = start(sqlite_store(&dir).await, config).await;
    let mut all = Vec::with_capacity(10_000);
    for chunk in 0..10 {
        let sends: Vec<_> = (0..1000)
            .map(|i| addr.send(register_msg(&format!("e{chunk}x{i}"), &[])))
            .collect();
        for r in futures::future::join_all(sends).await {
            all.push(r.unwrap().expect("registered"));
        }
    }
    let mut sub = addr.send(Subscribe::default()).await.unwrap().unwrap();
    let silent: BTreeSet<String> = all
        .iter()
        .step_by(100)
        .map(|r| r.executor.id.clone())
        .collect();
    assert_eq!(silent.len(), 100);
    // Everyone heartbeats once with a 2 s TTL; then all but the silent ones
    // go on every 200 ms for 3.5 s (a debug build needs a few hundred ms for
    // one round of 9,900 heartbeats).
    for r in &all {
        beat(
            &table,
            &r.executor.id,
            &r.token,
            Some(Duration::from_secs(2)),
        )
        .expect("first heartbeat");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(3500);
    let mut slowest_round = Duration::ZERO;
    while tokio::time::Instant::now() < deadline {
        let round = tokio::time::Instant::now();
        for r in all.iter().filter(|r| !silent.contains(&r.executor.id)) {
            beat(
                &table,
                &r.executor.id,
                &r.token,
                Some(Duration::from_secs(2)),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "a live executor's heartbeat is refused: {e} (slowest round {slowest_round:?})"
                )
            });
        }
        slowest_round = slowest_round.max(round.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("slowest round of 9,900 heartbeats: {slowest_round:?}");
    let mut expired = BTreeSet::new();
    while let Ok(event) = sub.events.try_recv() {
        match event {
            ExecutorEvent::Offline { id, .. } => {
                expired.insert(id);
            }
            ExecutorEvent::Online { executor, .. } => {
                assert_eq!(
                    executor.status,
                    ExecutorStatus::Running,
                    "a first heartbeat"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(expired, silent);
    let stats = addr.send(GetRegistryStats).await.unwrap();
    assert_eq!(stats.running, 9_900);
    assert!(!stats.mass_silence);
}

#[actix_rt::test]
async fn a_mass_silence_expires_executors_at_the_throttled_rate() {
    harness::init_tracing();
    let dir = TempDir::new().unwrap();
    let config = RegistryConfig {
        default_ttl: Duration::from_millis(400),
        min_ttl: Duration::from_millis(100),
        keepalive_interval: Duration::from_millis(50),
        mass_expiry_fraction: 0.55,
        mass_expiry_rate: 2.0,
        ..fast_config()
    };
    let RegistryHandle { addr, table } = start(sqlite_store(&dir).await, config).await;
    let mut all = Vec::new();
    for i in 0..10 {
        all.push(register(&addr, &format!("m{i}")).await);
    }
    let mut sub = addr.send(Subscribe::default()).await.unwrap().unwrap();
    // 8 of 10 go silent at once (80% > 55%): the registry suspects itself and
    // expires at most 2 per second. The 2 others keep heartbeating.
    let started = tokio::time::Instant::now();
    let mut expired_at = Vec::new();
    while started.elapsed() < Duration::from_millis(2600) {
        for r in &all[8..] {
            heartbeat(&table, r).unwrap();
        }
        while let Ok(event) = sub.events.try_recv() {
            if let ExecutorEvent::Offline { .. } = event {
                expired_at.push(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = addr.send(GetRegistryStats).await.unwrap();
    assert!(stats.mass_silence, "{stats:?}");
    // 0.4 s until they are overdue, then 2 per second: about 4 in 2.2 s; never
    // all 8 at once.
    assert!(
        (3..=6).contains(&expired_at.len()),
        "expired at {expired_at:?}"
    );
    for pair in expired_at.windows(3) {
        assert!(
            pair[2] - pair[0] >= Duration::from_millis(700),
            "too fast: {expired_at:?}"
        );
    }
    // Once the remaining silent executors are few enough, expiry is normal
    // again; the two heartbeating ones stay.
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        for r in &all[8..] {
            heartbeat(&table, r).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = addr.send(GetRegistryStats).await.unwrap();
    assert_eq!(stats.running + stats.initing, 2, "{stats:?}");
    assert!(!stats.mass_silence);
}

#[actix_rt::test]
async fn a_restarted_registry_reloads_executors_and_keeps_heartbeating_ones() {
    harness::init_tracing();
    let dir = TempDir::new().unwrap();
    let first = start(sqlite_store(&dir).await, fast_config()).await.addr;
    let kept = register(&first, "kept").await;
    let lost = register(&first, "lost").await;
    first.send(StopRegistry).await.unwrap();

    let RegistryHandle {
        addr: second,
        table: second_table,
    } = start(sqlite_store(&dir).await, fast_config()).await;
    let reloaded = second.send(ListExecutors::default()).await.unwrap();
    assert_eq!(reloaded.len(), 2);
    assert!(reloaded.iter().all(|e| e.status == ExecutorStatus::Initing));
    let mut sub = loop {
        match second.send(Subscribe::default()).await.unwrap() {
            Ok(sub) => break sub,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert!(sub
        .snapshot
        .iter()
        .all(|e| e.status == ExecutorStatus::Initing));
    // Within the grace (1.5 s) nothing expires; the one that heartbeats with
    // its old token stays, the silent one goes after the grace.
    for _ in 0..25 {
        heartbeat(&second_table, &kept).expect("old token still valid");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept_now = second
        .send(GetExecutor {
            id: kept.executor.id.clone(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept_now.status, ExecutorStatus::Running);
    // The new leader's owner learns which of the loaded executors heartbeat
    // to it: the first heartbeat is announced once, the loss as usual.
    let mut events = Vec::new();
    while let Ok(event) = sub.events.try_recv() {
        events.push(event);
    }
    let online: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            ExecutorEvent::Online { executor, .. } => Some((executor.id.clone(), executor.status)),
            _ => None,
        })
        .collect();
    assert_eq!(
        online,
        [(kept.executor.id.clone(), ExecutorStatus::Running)]
    );
    let lost_now = second
        .send(GetExecutor {
            id: lost.executor.id.clone(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lost_now.status, ExecutorStatus::Tombstone);
    let labels: BTreeMap<String, String> = BTreeMap::new();
    assert_eq!(kept_now.labels, labels);
}

#[actix_rt::test]
async fn a_subscriber_that_falls_behind_is_cut_off_with_a_resync() {
    harness::init_tracing();
    let dir = TempDir::new().unwrap();
    let config = RegistryConfig {
        watch_buffer: 4,
        default_ttl: Duration::from_secs(60),
        max_ttl: Duration::from_secs(60),
        ..fast_config()
    };
    let addr = start(sqlite_store(&dir).await, config).await.addr;
    let mut slow = addr.send(Subscribe::default()).await.unwrap().unwrap();
    let mut fast = addr.send(Subscribe::default()).await.unwrap().unwrap();
    let mut fast_seen = 0;
    for i in 0..10 {
        register(&addr, &format!("w{i}")).await;
        while let Ok(event) = fast.events.try_recv() {
            assert!(matches!(event, ExecutorEvent::Online { .. }));
            fast_seen += 1;
        }
    }
    assert_eq!(fast_seen, 10, "the fast subscriber got everything");
    let mut slow_events = Vec::new();
    while let Some(event) = slow.events.recv().await {
        slow_events.push(event);
    }
    assert_eq!(slow_events.len(), 4, "{slow_events:?}");
    assert_eq!(slow_events.last(), Some(&ExecutorEvent::Resync));
    assert_eq!(addr.send(GetRegistryStats).await.unwrap().subscribers, 1);
}

#[actix_rt::test]
async fn client_watches_are_bounded_and_the_servers_own_subscribers_are_not() {
    let dir = TempDir::new().unwrap();
    let config = RegistryConfig {
        max_watchers: 2,
        ..fast_config()
    };
    let addr = start(sqlite_store(&dir).await, config).await.addr;
    let watch = Subscribe { watcher: true };
    let first = addr.send(watch).await.unwrap().unwrap();
    let _second = addr.send(watch).await.unwrap().unwrap();
    let refused = addr.send(watch).await.unwrap().unwrap_err();
    assert!(
        matches!(refused, executor_registry::Error::TooManyWatchers(2)),
        "{refused:?}"
    );
    assert_eq!(refused.code().as_str(), "too_many_watchers");
    // The owner's subscription never counts against the bound.
    let _owner = addr.send(Subscribe::default()).await.unwrap().unwrap();
    // A watch that went away frees its place.
    drop(first);
    let _third = addr.send(watch).await.unwrap().unwrap();
    assert!(addr.send(watch).await.unwrap().is_err());
    assert_eq!(addr.send(GetRegistryStats).await.unwrap().subscribers, 3);
}

#[actix_rt::test]
async fn invalid_registrations_are_refused_with_a_reason() {
    let dir = TempDir::new().unwrap();
    let addr = start(sqlite_store(&dir).await, fast_config()).await.addr;
    for bad in [
        register_msg("", &[]),
        register_msg("has space", &[]),
        register_msg(&"n".repeat(65), &[]),
        register_msg("ok", &[("-bad", "v")]),
        register_msg("ok", &[("k", &"v".repeat(64))]),
        Register {
            address: String::new(),
            ..register_msg("ok", &[])
        },
    ] {
        let err = addr.send(bad.clone()).await.unwrap().unwrap_err();
        assert!(
            matches!(err, executor_registry::Error::InvalidArgument(_)),
            "{bad:?}: {err}"
        );
    }
    assert!(addr
        .send(ListExecutors::default())
        .await
        .unwrap()
        .is_empty());
}
