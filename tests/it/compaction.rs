//! The leader's compaction of etcd's history (`Compactor`) against a real etcd: it
//! compacts, again and again, to a revision one interval old; a worker's watch lives
//! through it; an interval of zero compacts nothing.

use std::time::Duration;

use crate::harness;
use crate::harness::reactors::{KvState, Linearizability};
use crate::harness::EtcdCluster;
use actix::Actor;
use etcd_client::{
    AlarmAction, AlarmOptions, AlarmType, Client, CompactionOptions, DeleteOptions, GetOptions,
};
use flotilla::actors::compactor::{Compactor, CompactorConfig, StopCompactor};
use flotilla::actors::etcd_alarms::{AlarmMonitor, AlarmMonitorConfig, StopAlarmMonitor};
use flotilla::actors::{self, WorkerConfig};

const DEADLINE: Duration = Duration::from_secs(30);

fn compactor(client: &Client, interval: Duration) -> actix::Addr<Compactor> {
    Compactor::new(
        client.clone(),
        CompactorConfig {
            interval,
            request_timeout: Duration::from_secs(2),
        },
    )
    .start()
}

async fn put(client: &Client, key: &str, value: &str) -> i64 {
    client
        .clone()
        .put(key, value, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

/// Whether `revision` can no longer be read because the history was compacted.
async fn is_compacted(client: &Client, revision: i64) -> bool {
    match client
        .clone()
        .get("/k", Some(GetOptions::new().with_revision(revision)))
        .await
    {
        Ok(_) => false,
        Err(e) if e.to_string().contains("compacted") => true,
        Err(e) => panic!("read at revision {revision}: {e}"),
    }
}

/// Writes a key every 20 ms until dropped, so the revision keeps moving.
fn writer(client: &Client) -> actix_rt::task::JoinHandle<()> {
    let client = client.clone();
    actix_rt::spawn(async move {
        for i in 0u64.. {
            put(&client, "/k", &i.to_string()).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

async fn until_compacted(client: &Client, revision: i64) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !is_compacted(client, revision).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "revision {revision} still readable after {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_rt::test]
async fn compaction_runs_every_interval_and_old_revisions_read_compacted() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let first = put(&client, "/k", "first").await;
    let writes = writer(&client);
    let started = tokio::time::Instant::now();
    let compactor = compactor(&client, Duration::from_millis(300));

    until_compacted(&client, first).await;
    // Compacted to a revision read one interval earlier: never before the second run.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "compacted after {:?}, before one interval had passed",
        started.elapsed()
    );
    // It keeps going: a revision written after the first compaction goes too.
    let later = put(&client, "/k", "later").await;
    until_compacted(&client, later).await;
    // The newest writes stay readable: the history kept is about one interval long.
    let newest = put(&client, "/k", "newest").await;
    assert!(!is_compacted(&client, newest).await);

    // Process-wide metrics, shared with the other tests here: only lower bounds hold.
    let metrics = flotilla::metrics::etcd();
    assert!(metrics.compacted_revision.get() > 0);
    assert!(
        metrics
            .compactions_total
            .with_label_values(&["compacted"])
            .get()
            >= 2
    );
    compactor.send(StopCompactor).await.unwrap();
    writes.abort();
}

#[actix_rt::test]
async fn a_worker_keeps_watching_through_compactions() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    const P: &str = "/lin";
    const TARGET: i64 = 150;
    let first = put(&client, &format!("{P}/value"), "0").await;
    let compactor = compactor(&client, Duration::from_millis(100));
    // The writer spreads its values over a few seconds, many compaction intervals.
    let writer = {
        let client = client.clone();
        actix_rt::spawn(async move {
            for i in 1..=TARGET {
                put(&client, &format!("{P}/value"), &i.to_string()).await;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    let config = WorkerConfig {
        tick_interval: Duration::from_millis(20),
        request_timeout: Duration::from_secs(2),
        ..WorkerConfig::new(P)
    };
    // It ends once it has seen TARGET, and fails if a value ever went back.
    let handle = actors::start(
        client.clone(),
        Linearizability::new(P, TARGET, false),
        KvState::default(),
        config,
    );
    tokio::time::timeout(Duration::from_secs(60), handle.wait())
        .await
        .expect("the worker saw every value in time")
        .expect("the worker never failed and never saw a value go back");
    writer.await.unwrap();
    // The history the worker started on was compacted while it ran.
    until_compacted(&client, first).await;
    compactor.send(StopCompactor).await.unwrap();
}

#[actix_rt::test]
async fn interval_zero_compacts_nothing() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let first = put(&client, "/k", "first").await;
    let compactor = compactor(&client, Duration::ZERO);
    // A control compactor cannot run beside it (it would compact the same etcd);
    // instead, give it many times a short interval to misbehave in.
    for i in 0..50 {
        put(&client, "/k", &i.to_string()).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !is_compacted(&client, first).await,
        "interval 0 compacted the history"
    );
    assert!(compactor.connected(), "the compactor still runs, idle");
    compactor.send(StopCompactor).await.unwrap();
}

/// Polls `f` every 20 ms until it holds; panics with `what` after [`DEADLINE`].
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_rt::test]
async fn a_full_etcd_quota_is_reported_as_nospace_until_defrag_and_disarm() {
    harness::init_tracing();
    // 4 MiB: a few dozen 100 KiB values fill it.
    let etcd = EtcdCluster::start_with_args(1, &["--quota-backend-bytes=4194304"]);
    let client = etcd.client().await;
    let monitor = AlarmMonitor::new(
        client.clone(),
        AlarmMonitorConfig {
            interval: Duration::from_millis(100),
            request_timeout: Duration::from_secs(2),
        },
    );
    let alarms = monitor.alarms();
    let monitor = monitor.start();
    let gauge = flotilla::metrics::etcd()
        .alarm
        .with_label_values(&["nospace"]);
    assert!(alarms.problem().is_none(), "no alarm before any was seen");

    // Distinct keys, so compaction alone cannot make room: etcd must refuse a write.
    let value = vec![b'x'; 100 * 1024];
    let mut refused = None;
    for i in 0..1000 {
        match client
            .clone()
            .put(format!("/fill/{i}"), value.clone(), None)
            .await
        {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("etcd refused a write once its quota was full");
    assert!(
        flotilla::actors::etcd_alarms::is_nospace(&refused),
        "refused with: {refused}"
    );
    until("the monitor reports NOSPACE", || alarms.nospace()).await;
    assert_eq!(gauge.get(), 1);
    assert!(alarms.problem().unwrap().contains("NOSPACE"));

    // The remedy the log gives: free space (delete, compact, defrag), then disarm.
    let mut c = client.clone();
    let rev = c
        .delete("/fill/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.compact(rev, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    c.defragment().await.unwrap();
    // `etcdctl alarm disarm`: deactivate each raised alarm on its member.
    let raised = c
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .unwrap();
    for member in raised.alarms() {
        let mut options = AlarmOptions::new();
        options.with_member(member.member_id());
        c.alarm(AlarmAction::Deactivate, member.alarm(), Some(options))
            .await
            .unwrap();
    }
    until("the monitor reports NOSPACE cleared", || !alarms.nospace()).await;
    assert_eq!(gauge.get(), 0);
    put(&client, "/k", "writable again").await;
    monitor.send(StopAlarmMonitor).await.unwrap();
}

/// `LeaderRoles` elected, then deposed: it compacts while it leads (its owner on its
/// own arbiter meanwhile loads its snapshot), and neither after deposition.
#[actix_rt::test]
async fn the_leader_compacts_while_it_leads_and_stops_when_deposed() {
    use flotilla::actors::executor_registry::RegistryConfig;
    use flotilla::actors::leader::{LeaderRoles, RoleSettings, RoleSlot};
    use flotilla::actors::owner::OwnerSettings;
    use flotilla::actors::Fence;
    use flotilla::election::{Leadership, LeaseGuard};
    use flotilla::owner::model::Keys;
    use flotilla::owner::reactor::OwnerConfig;
    use flotilla::store::{Store, StoreOptions};

    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let dir = tempfile::TempDir::new().unwrap();
    let url = format!("sqlite://{}/meta.db?mode=rwc", dir.path().display());
    let store = Store::connect(&url, &StoreOptions::default())
        .await
        .unwrap();
    const PREFIX: &str = "/flotilla/leader";
    let fence_key = format!("{PREFIX}/__meta__/owner/1");
    let create_revision = put(&client, &fence_key, "me").await;
    let slot = RoleSlot::default();
    let roles = LeaderRoles::new(
        RoleSettings {
            registry: RegistryConfig::default(),
            store,
            client: client.clone(),
            keys: Keys::new(PREFIX),
            owner: OwnerSettings {
                worker: WorkerConfig {
                    tick_interval: Duration::from_millis(50),
                    request_timeout: Duration::from_secs(2),
                    ..WorkerConfig::new(format!("{PREFIX}/"))
                },
                owner: OwnerConfig::default(),
                restart_backoff: Duration::from_millis(200),
            },
        },
        slot.clone(),
    )
    .with_compaction_interval(Duration::from_secs(1))
    .start();
    let writes = writer(&client);
    let first = put(&client, "/k", "first").await;
    roles
        .send(Leadership::Elected {
            fence: Fence {
                key: fence_key,
                create_revision,
            },
            guard: LeaseGuard::always(),
            revision: create_revision,
        })
        .await
        .unwrap();
    until_compacted(&client, first).await;
    let desk = slot.get().unwrap().owner.unwrap();
    until("the owner (on its own arbiter) loads its snapshot", || {
        desk.is_running()
    })
    .await;

    roles
        .send(Leadership::Deposed {
            reason: "test".into(),
        })
        .await
        .unwrap();
    until("the slot empties", || slot.is_empty()).await;
    until("the owner's board is cleared", || !desk.is_running()).await;
    let kept = put(&client, "/k", "kept").await;
    // Two intervals: a compactor still running would have compacted `kept`.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !is_compacted(&client, kept).await,
        "a deposed leader compacted"
    );
    writes.abort();
}
