//! The owner end to end, in process: a real etcd, the registry on SQLite,
//! the owner actor, executors heartbeating on the path the HTTP handler takes
//! (the registry's table, then the owner's work desk).

use crate::harness;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::harness::EtcdCluster;
use actix::prelude::*;
use etcd_client::{Client, GetOptions, Txn, TxnOp};
use flotilla::actors::executor_registry::{
    ExecutorRegistry, ExecutorStatus, GetExecutor, GetRegistryStats, Register, Registration,
    RegistryConfig, RegistryHandle, TokenHash,
};
use flotilla::actors::owner::{Assignment, Lead, Owner, OwnerSettings, StopOwner, Work, WorkDesk};
use flotilla::actors::{Fence, WorkerConfig};
use flotilla::owner::model::{
    ChangefeedId, ChangefeedInfo, ChangefeedStatus, FeedState, Keys, TaskStatus,
};
use flotilla::owner::reactor::{OwnerConfig, ProgressReport};
use flotilla::store::{Store, StoreOptions};
use tempfile::TempDir;

const PREFIX: &str = "/flotilla/test";

struct Cluster {
    _etcd: EtcdCluster,
    _dir: TempDir,
    client: Client,
    keys: Keys,
    registry: RegistryHandle,
    owner: Addr<Owner>,
    desk: WorkDesk,
}

fn registry_config() -> RegistryConfig {
    RegistryConfig {
        heartbeat_interval: Duration::from_millis(100),
        default_ttl: Duration::from_millis(800),
        min_ttl: Duration::from_millis(300),
        max_ttl: Duration::from_secs(10),
        keepalive_interval: Duration::from_millis(50),
        failover_grace: Duration::from_secs(2),
        ..RegistryConfig::default()
    }
}

fn owner_settings() -> OwnerSettings {
    OwnerSettings {
        worker: WorkerConfig {
            tick_interval: Duration::from_millis(50),
            ..WorkerConfig::new(format!("{PREFIX}/"))
        },
        owner: OwnerConfig {
            max_retries: 3,
            retry_backoff: Duration::from_millis(100),
            server_id: "owner-test".into(),
            // Every advanced checkpoint is persisted at the next tick here.
            checkpoint_interval: Duration::ZERO,
            ..OwnerConfig::default()
        },
        restart_backoff: Duration::from_millis(200),
    }
}

async fn cluster() -> Cluster {
    cluster_with(registry_config()).await
}

async fn cluster_with(registry: RegistryConfig) -> Cluster {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let dir = TempDir::new().unwrap();
    let url = format!("sqlite://{}/meta.db?mode=rwc", dir.path().display());
    let store = Store::connect(&url, &StoreOptions::default())
        .await
        .unwrap();
    let registry = ExecutorRegistry::new(registry, store).start_with_table();
    while !registry.addr.send(GetRegistryStats).await.unwrap().loaded {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let keys = Keys::new(PREFIX);
    let owner = Owner::new(
        registry.addr.clone(),
        client.clone(),
        keys.clone(),
        owner_settings(),
    );
    let desk = owner.desk();
    Cluster {
        _etcd: etcd,
        _dir: dir,
        client,
        keys,
        registry,
        owner: owner.start(),
        desk,
    }
}

fn info(selector: &BTreeMap<String, String>) -> ChangefeedInfo {
    ChangefeedInfo {
        sink_uri: "blackhole://".into(),
        start_ts: 100,
        target_ts: 0,
        config: serde_json::json!({"worker-count": 4}),
        selector: selector.clone(),
        state: FeedState::Normal,
        error: None,
        create_time: "2026-11-21T00:00:00Z".into(),
    }
}

/// Creates changefeeds straight in etcd, 64 per txn.
async fn create(c: &Cluster, ids: &[String]) {
    let mut client = c.client.clone();
    for chunk in ids.chunks(64) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .flat_map(|id| {
                let cf = ChangefeedId::new("default", id.as_str());
                let status = ChangefeedStatus {
                    checkpoint_ts: 100,
                    ..Default::default()
                };
                [
                    TxnOp::put(
                        c.keys.info(&cf),
                        serde_json::to_vec(&info(&BTreeMap::new())).unwrap(),
                        None,
                    ),
                    TxnOp::put(
                        c.keys.status(&cf),
                        serde_json::to_vec(&status).unwrap(),
                        None,
                    ),
                ]
            })
            .collect();
        client.txn(Txn::new().and_then(ops)).await.unwrap();
    }
}

/// Registers `name` and heartbeats it once, returning when the registry has
/// announced it `running`: the owner prefers executors that heartbeat to this
/// leader, so an executor still `initing` when the first changefeeds arrive
/// would get none of them (a test that expects a balance would then depend on
/// when the owner ticks).
async fn register(c: &Cluster, name: &str) -> Registration {
    let registration = c
        .registry
        .addr
        .send(Register {
            name: name.into(),
            address: format!("{name}:9000"),
            labels: BTreeMap::new(),
        })
        .await
        .unwrap()
        .unwrap();
    let id = registration.executor.id.clone();
    c.registry
        .table
        .heartbeat(&id, &TokenHash::of(&registration.token), None)
        .expect("heartbeat accepted");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let info = c
            .registry
            .addr
            .send(GetExecutor { id: id.clone() })
            .await
            .unwrap()
            .unwrap();
        if info.status == ExecutorStatus::Running {
            // The table flips the status at the heartbeat; the actor announces
            // it from its promotions stream, polled after its mailbox: one
            // more round trip and the announcement is out.
            c.registry.addr.send(GetRegistryStats).await.unwrap();
            return registration;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} not running");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One heartbeat: the registry, then the owner (as the HTTP handler does).
async fn beat(c: &Cluster, r: &Registration, progress: Vec<ProgressReport>) -> Work {
    beat_stopping(c, r, progress, Vec::new()).await
}

/// One heartbeat that also acknowledges the stop of `stopped`.
async fn beat_stopping(
    c: &Cluster,
    r: &Registration,
    progress: Vec<ProgressReport>,
    stopped: Vec<(ChangefeedId, u64)>,
) -> Work {
    c.registry
        .table
        .heartbeat(&r.executor.id, &TokenHash::of(&r.token), None)
        .expect("heartbeat accepted");
    loop {
        match c
            .desk
            .work(&r.executor.id, progress.clone(), stopped.clone(), None)
        {
            Ok(work) => return work,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Heartbeats `executors` every 100 ms until every changefeed in `expected`
/// is assigned (to one of them); returns assignments per executor.
async fn beat_until_assigned(
    c: &Cluster,
    executors: &[&Registration],
    expected: usize,
    within: Duration,
) -> BTreeMap<String, Vec<Assignment>> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut all = BTreeMap::new();
        for r in executors {
            all.insert(r.executor.id.clone(), beat(c, r, vec![]).await.assignments);
        }
        let total: usize = all.values().map(Vec::len).sum();
        if total == expected {
            return all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {total} of {expected} assigned: {:?}",
            all.iter().map(|(k, v)| (k, v.len())).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn task_keys(c: &Cluster) -> Vec<(String, TaskStatus)> {
    let mut client = c.client.clone();
    let resp = client
        .get(
            format!("{PREFIX}/default/task/status/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_owned(),
                serde_json::from_slice(kv.value()).unwrap(),
            )
        })
        .collect()
}

#[actix_rt::test]
async fn thirty_changefeeds_balance_and_move_off_a_silent_executor() {
    let c = cluster().await;
    let e: Vec<Registration> = vec![
        register(&c, "a").await,
        register(&c, "b").await,
        register(&c, "c").await,
    ];
    let ids: Vec<String> = (0..30).map(|i| format!("cf{i:02}")).collect();
    create(&c, &ids).await;
    let refs: Vec<&Registration> = e.iter().collect();
    let assigned = beat_until_assigned(&c, &refs, 30, Duration::from_secs(10)).await;
    let sizes: Vec<usize> = assigned.values().map(Vec::len).collect();
    assert_eq!(sizes, vec![10, 10, 10], "balanced");
    let first = assigned[&e[0].executor.id][0].clone();
    assert_eq!(first.sink_uri, "blackhole://");
    assert_eq!(first.config["worker-count"], 4);
    assert_eq!(first.checkpoint_ts, 100);
    let moved: BTreeSet<String> = assigned[&e[0].executor.id]
        .iter()
        .map(|a| a.changefeed.clone())
        .collect();
    let old_epochs: BTreeMap<String, u64> = assigned
        .values()
        .flatten()
        .map(|a| (a.changefeed.clone(), a.epoch))
        .collect();

    // `a` goes silent: within ttl (0.8 s) + keepalive (50 ms) + 2 ticks its
    // changefeeds run on b and c, each with a higher epoch.
    let survivors = [&e[1], &e[2]];
    let started = tokio::time::Instant::now();
    let after = beat_until_assigned(&c, &survivors, 30, Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(800 + 50 + 100 + 1000),
        "moved in {took:?}"
    );
    for a in after.values().flatten() {
        if moved.contains(&a.changefeed) {
            assert!(a.epoch > old_epochs[&a.changefeed], "{a:?}");
        } else {
            assert_eq!(a.epoch, old_epochs[&a.changefeed], "untouched: {a:?}");
        }
    }
    assert_eq!(after.values().map(Vec::len).sum::<usize>(), 30);
    // Exactly one task key per changefeed, none left on the dead executor.
    let tasks = task_keys(&c).await;
    assert_eq!(tasks.len(), 30);
    assert!(tasks.iter().all(|(k, _)| !k.contains(&e[0].executor.id)));
    // The dead executor's mirror is gone.
    let mut client = c.client.clone();
    let mirror = client
        .get(c.keys.executors(), Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(mirror.kvs().len(), 2);
}

#[actix_rt::test]
async fn progress_moves_the_checkpoint_forward_only_and_zombies_are_rejected() {
    let c = cluster().await;
    let a = register(&c, "a").await;
    let b = register(&c, "b").await;
    create(&c, &["feed".to_string()]).await;
    let assigned = beat_until_assigned(&c, &[&a, &b], 1, Duration::from_secs(10)).await;
    let (holder, other) = if assigned[&a.executor.id].is_empty() {
        (&b, &a)
    } else {
        (&a, &b)
    };
    let epoch = assigned[&holder.executor.id][0].epoch;
    let cf = ChangefeedId::new("default", "feed");
    let report = |checkpoint: u64, epoch: u64| ProgressReport {
        changefeed: cf.clone(),
        epoch,
        checkpoint_ts: checkpoint,
        resolved_ts: checkpoint + 5,
        error: None,
    };
    // Reordered and duplicated reports: the checkpoint only grows.
    for checkpoint in [300, 200, 300, 250, 400, 400, 150] {
        let work = beat(&c, holder, vec![report(checkpoint, epoch)]).await;
        assert!(work.rejected.is_empty(), "{:?}", work.rejected);
        tokio::time::sleep(Duration::from_millis(120)).await;
        beat(&c, other, vec![]).await;
    }
    let mut seen = Vec::new();
    for _ in 0..20 {
        let work = beat(&c, holder, vec![]).await;
        seen.push(work.assignments[0].checkpoint_ts);
        if seen.last() == Some(&400) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        beat(&c, other, vec![]).await;
    }
    assert_eq!(seen.last(), Some(&400), "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "never backward: {seen:?}"
    );

    // A zombie (the other executor, or a wrong epoch) is rejected and not written.
    let work = beat(&c, other, vec![report(900, epoch)]).await;
    assert_eq!(work.rejected.len(), 1);
    assert!(
        work.rejected[0].reason.starts_with("stale_epoch"),
        "{:?}",
        work.rejected
    );
    let work = beat(&c, holder, vec![report(900, epoch + 7)]).await;
    assert_eq!(work.rejected.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let work = beat(&c, holder, vec![]).await;
    assert_eq!(work.assignments[0].checkpoint_ts, 400);
    let mut client = c.client.clone();
    let position = client
        .get(c.keys.task_position(&cf, &other.executor.id), None)
        .await
        .unwrap();
    assert!(position.kvs().is_empty(), "nothing written for the zombie");
}

#[actix_rt::test]
async fn a_restarted_owner_moves_nothing() {
    let c = cluster().await;
    let a = register(&c, "a").await;
    let b = register(&c, "b").await;
    let ids: Vec<String> = (0..8).map(|i| format!("r{i}")).collect();
    create(&c, &ids).await;
    let before = beat_until_assigned(&c, &[&a, &b], 8, Duration::from_secs(10)).await;
    c.owner.send(StopOwner).await.unwrap();
    let owner = Owner::new(
        c.registry.addr.clone(),
        c.client.clone(),
        c.keys.clone(),
        owner_settings(),
    );
    let desk = owner.desk();
    let c = Cluster {
        owner: owner.start(),
        desk,
        ..c
    };
    for _ in 0..5 {
        let after = beat_until_assigned(&c, &[&a, &b], 8, Duration::from_secs(10)).await;
        assert_eq!(before, after, "no changefeed moved because of a restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A follower's owner stands by: it follows the prefix without writing, and
/// told to lead it answers from the state it holds (no read of the prefix),
/// with the very assignments of the leader before it, and moves nothing.
#[actix_rt::test]
async fn a_standby_owner_takes_over_from_memory_and_moves_nothing() {
    let c = cluster().await;
    let ranges_at_start = c._etcd.ranges_served(0);
    let standby = Owner::standby(c.client.clone(), c.keys.clone(), owner_settings());
    let standby_desk = standby.desk();
    let standby = standby.start();
    // A stream of changes while it stands by: creations, assignments, an
    // executor going silent and its changefeeds moving, more creations.
    let a = register(&c, "a").await;
    let b = register(&c, "b").await;
    let silent = register(&c, "silent").await;
    let ids: Vec<String> = (0..12).map(|i| format!("s{i:02}")).collect();
    create(&c, &ids).await;
    beat_until_assigned(&c, &[&a, &b, &silent], 12, Duration::from_secs(10)).await;
    let more: Vec<String> = (12..20).map(|i| format!("s{i:02}")).collect();
    create(&c, &more).await;
    let before = beat_until_assigned(&c, &[&a, &b], 20, Duration::from_secs(10)).await;
    assert!(
        standby_desk
            .work(&a.executor.id, vec![], vec![], None)
            .is_err(),
        "a standby answers nothing"
    );
    let mut client = c.client.clone();
    let revision = |r: etcd_client::GetResponse| r.header().expect("a header").revision();
    let before_revision = revision(client.get("/nothing", None).await.unwrap());

    // The leader goes; the standby leads, fenced on an election key created
    // now (under the prefix, as the election's is).
    c.owner.send(StopOwner).await.unwrap();
    let fence_key = format!("{PREFIX}/__meta__/owner/standby-test");
    client.put(fence_key.as_str(), "", None).await.unwrap();
    let fence = client.get(fence_key.as_str(), None).await.unwrap().kvs()[0].create_revision();
    // The test's own reads end here.
    let standby_read = c._etcd.ranges_served(0);
    assert!(
        standby_read > ranges_at_start,
        "the standby read the prefix when it started"
    );
    standby
        .send(Lead {
            registry: c.registry.addr.clone(),
            fence: Fence {
                key: fence_key.clone(),
                create_revision: fence,
            },
            // As the election's rewrite of its key: the key's own revision here.
            revision: fence,
        })
        .await
        .unwrap();
    let c = Cluster {
        owner: standby,
        desk: standby_desk,
        ..c
    };
    for _ in 0..5 {
        let after = beat_until_assigned(&c, &[&a, &b], 20, Duration::from_secs(10)).await;
        assert_eq!(before, after, "the same assignments, at the same epochs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        c._etcd.ranges_served(0),
        standby_read,
        "the new leader did not read the prefix again"
    );
    let after_revision = revision(client.get("/nothing", None).await.unwrap());
    assert_eq!(
        after_revision,
        before_revision + 1,
        "nothing written but the fence key"
    );
}

#[actix_rt::test]
async fn ten_thousand_changefeeds_over_a_hundred_executors_commit_in_batches() {
    // A debug build needs a while for the first 10,000-changefeed tick; the
    // executors must not expire meanwhile.
    let c = cluster_with(RegistryConfig {
        default_ttl: Duration::from_secs(10),
        ..registry_config()
    })
    .await;
    let mut executors = Vec::new();
    for i in 0..100 {
        executors.push(register(&c, &format!("x{i:03}")).await);
    }
    let ids: Vec<String> = (0..10_000).map(|i| format!("big{i:05}")).collect();
    create(&c, &ids).await;
    let refs: Vec<&Registration> = executors.iter().collect();
    let assigned = beat_until_assigned(&c, &refs, 10_000, Duration::from_secs(120)).await;
    assert!(assigned.values().all(|v| v.len() == 100), "100 each");
    assert_eq!(task_keys(&c).await.len(), 10_000);
}

#[actix_rt::test]
async fn garbage_written_from_outside_is_skipped_and_poisons_nothing() {
    let c = cluster().await;
    let a = register(&c, "a").await;
    create(&c, &["good1".to_string()]).await;
    let mut client = c.client.clone();
    // etcdctl put <info key> garbage, and garbage under the executor mirror.
    let bad = ChangefeedId::new("default", "bad");
    client
        .put(c.keys.info(&bad), "garbage{", None)
        .await
        .unwrap();
    client
        .put(c.keys.executor("junk"), "not json", None)
        .await
        .unwrap();
    create(&c, &["good2".to_string()]).await;
    let assigned = beat_until_assigned(&c, &[&a], 2, Duration::from_secs(10)).await;
    let names: BTreeSet<String> = assigned[&a.executor.id]
        .iter()
        .map(|x| x.changefeed.clone())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["good1".to_string(), "good2".to_string()])
    );
    // The owner is still running and still scheduling.
    create(&c, &["good3".to_string()]).await;
    beat_until_assigned(&c, &[&a], 3, Duration::from_secs(10)).await;
    // The garbage is left alone, not "cleaned up" as an orphan: a status
    // next to an unreadable info keeps its checkpoint.
    let status = serde_json::to_vec(&ChangefeedStatus {
        checkpoint_ts: 777,
        ..Default::default()
    })
    .unwrap();
    client.put(c.keys.status(&bad), status, None).await.unwrap();
    create(&c, &["good4".to_string()]).await;
    beat_until_assigned(&c, &[&a], 4, Duration::from_secs(10)).await;
    let info = client.get(c.keys.info(&bad), None).await.unwrap();
    assert_eq!(info.kvs()[0].value(), b"garbage{");
    let status = client.get(c.keys.status(&bad), None).await.unwrap();
    assert_eq!(
        status.kvs().len(),
        1,
        "the status of an unreadable changefeed is kept"
    );
}

/// A rewind is never undone: a changefeed runs at epoch e with checkpoint
/// 900,000; the operator pauses it and resumes it from 5,000 at once, before
/// the owner has ticked; the executor, which has not noticed, keeps reporting
/// epoch-e progress. Its reports are rejected, it is told to stop, and the
/// changefeed runs again at a later epoch from 5,000.
#[actix_rt::test]
async fn a_rewind_is_never_undone_by_the_old_epoch_s_progress() {
    use flotilla::owner::feeds::{Changefeeds, ResumeChangefeed};
    let c = cluster().await;
    let a = register(&c, "a").await;
    create(&c, &["feed".to_string()]).await;
    let assigned = beat_until_assigned(&c, &[&a], 1, Duration::from_secs(10)).await;
    let epoch = assigned[&a.executor.id][0].epoch;
    let cf = ChangefeedId::new("default", "feed");
    let report = |checkpoint: u64, epoch: u64| ProgressReport {
        changefeed: cf.clone(),
        epoch,
        checkpoint_ts: checkpoint,
        resolved_ts: checkpoint,
        error: None,
    };
    let feeds = Changefeeds::new(c.client.clone(), c.keys.clone(), Duration::from_secs(5));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while feeds.get("default", "feed").await.unwrap().checkpoint_ts != 900_000 {
        beat(&c, &a, vec![report(900_000, epoch)]).await;
        assert!(
            std::time::Instant::now() < deadline,
            "checkpoint not persisted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    feeds.pause("default", "feed").await.unwrap();
    let resumed = feeds
        .resume(
            "default",
            "feed",
            ResumeChangefeed {
                checkpoint_ts: Some(5_000),
            },
        )
        .await
        .unwrap();
    assert!(resumed.epoch > epoch, "{resumed:?}");
    assert_eq!(resumed.checkpoint_ts, 5_000);

    // The old epoch's reports go on (late, after the executor acknowledged its
    // stop); the new assignment comes with 5,000.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut stopped = Vec::new();
    let assignment = loop {
        let work = beat_stopping(&c, &a, vec![report(900_001, epoch)], stopped).await;
        stopped = work
            .revoked
            .iter()
            .map(|t| (ChangefeedId::new(&t.namespace, &t.changefeed), t.epoch))
            .collect();
        match work.assignments.first() {
            Some(assignment) if assignment.epoch > epoch => break assignment.clone(),
            Some(assignment) => assert_eq!(assignment.epoch, epoch),
            None => assert_eq!(work.rejected.len(), 1, "{work:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "not assigned again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(assignment.checkpoint_ts, 5_000);
    for _ in 0..5 {
        let work = beat(&c, &a, vec![report(900_001, epoch)]).await;
        assert_eq!(work.rejected.len(), 1, "the old epoch is stale: {work:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let view = feeds.get("default", "feed").await.unwrap();
    assert_eq!(
        (view.checkpoint_ts, view.epoch),
        (5_000, assignment.epoch),
        "the rewind held"
    );
    c.owner.send(StopOwner).await.unwrap();
}
