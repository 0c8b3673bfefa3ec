//! Tests of the shared etcd harness itself (`tests/it/harness`): real etcd servers start,
//! serve, survive member loss, keep data across restarts, compact, and never outlive
//! the test.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{init_tracing, process_is_running, EtcdCluster};
use etcd_client::{Client, EventType, GetOptions, WatchOptions};

/// Writes `key`, retrying while the cluster elects a leader or the client's channel
/// notices a dead endpoint. Returns the revision of the write.
async fn put_until_ok(client: &mut Client, key: &str, value: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(2), client.put(key, value, None));
        match attempt.await {
            Ok(Ok(resp)) => return resp.header().expect("put response header").revision(),
            Ok(Err(e)) if Instant::now() < deadline => tracing::info!("put {key}: {e}; retrying"),
            Err(_) if Instant::now() < deadline => tracing::info!("put {key}: timed out; retrying"),
            other => panic!("put {key} kept failing: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get_value(client: &mut Client, key: &str) -> Option<String> {
    let resp = client.get(key, None).await.expect("get");
    resp.kvs()
        .first()
        .map(|kv| kv.value_str().expect("utf-8 value").to_owned())
}

async fn leader_index(cluster: &EtcdCluster) -> usize {
    for i in 0..cluster.len() {
        if !cluster.is_running(i) {
            continue;
        }
        let status = cluster
            .member_client(i)
            .await
            .status()
            .await
            .expect("status");
        let me = status.header().expect("status header").member_id();
        if status.leader() == me {
            return i;
        }
    }
    panic!("no running member is the leader:\n{}", cluster.log_tails());
}

#[tokio::test]
async fn single_node_put_then_get_returns_value() {
    init_tracing();
    let cluster = EtcdCluster::single();
    assert_eq!(cluster.endpoints(), vec![cluster.endpoint(0)]);
    assert!(cluster.endpoint(0).starts_with("http://127.0.0.1:"));

    let mut client = cluster.client().await;
    client.put("/flotilla/k", "v", None).await.expect("put");
    assert_eq!(
        get_value(&mut client, "/flotilla/k").await.as_deref(),
        Some("v")
    );
}

#[tokio::test]
async fn three_node_write_on_one_member_is_read_on_another() {
    init_tracing();
    let cluster = EtcdCluster::three();
    assert_eq!(cluster.endpoints().len(), 3);

    let mut writer = cluster.member_client(0).await;
    writer
        .put("/flotilla/shared", "hello", None)
        .await
        .expect("put");
    let mut reader = cluster.member_client(2).await;
    assert_eq!(
        get_value(&mut reader, "/flotilla/shared").await.as_deref(),
        Some("hello")
    );

    let members = reader.member_list().await.expect("member list");
    assert_eq!(members.members().len(), 3);
}

#[tokio::test]
async fn three_node_cluster_serves_writes_without_its_leader_and_it_rejoins() {
    init_tracing();
    let mut cluster = EtcdCluster::three();
    let leader = leader_index(&cluster).await;
    let leader_pid = cluster.pid(leader).expect("leader pid");

    cluster.kill(leader);
    assert!(!cluster.is_running(leader));
    assert!(!Path::new(&format!("/proc/{leader_pid}")).exists());
    assert_eq!(cluster.live_endpoints().len(), 2);
    cluster.wait_healthy().await;

    // Through the all-endpoints client, which still lists the dead member.
    let mut client = cluster.client().await;
    put_until_ok(&mut client, "/flotilla/during-outage", "1").await;
    let survivor = (leader + 1) % 3;
    let mut survivor_client = cluster.member_client(survivor).await;
    put_until_ok(&mut survivor_client, "/flotilla/during-outage-2", "2").await;

    cluster.restart(leader);
    assert!(cluster.is_running(leader));
    assert_ne!(cluster.pid(leader), Some(leader_pid));
    cluster.wait_healthy().await;

    // A linearizable read through the rejoined member sees what it missed.
    let mut rejoined = cluster.member_client(leader).await;
    assert_eq!(
        get_value(&mut rejoined, "/flotilla/during-outage")
            .await
            .as_deref(),
        Some("1")
    );
    assert_eq!(
        get_value(&mut rejoined, "/flotilla/during-outage-2")
            .await
            .as_deref(),
        Some("2")
    );
    put_until_ok(&mut rejoined, "/flotilla/after-rejoin", "3").await;
}

#[tokio::test]
async fn three_node_cluster_comes_back_from_full_outage_with_its_data() {
    init_tracing();
    let mut cluster = EtcdCluster::three();
    let mut client = cluster.client().await;
    client
        .put("/flotilla/durable", "yes", None)
        .await
        .expect("put");
    drop(client);

    cluster.kill_all();
    assert!(cluster.pids().is_empty());
    // One member alone has no quorum: restart returns once it listens.
    cluster.restart(0);
    cluster.restart_all();
    cluster.wait_healthy().await;

    let mut client = cluster.member_client(2).await;
    assert_eq!(
        get_value(&mut client, "/flotilla/durable").await.as_deref(),
        Some("yes")
    );
}

#[tokio::test]
async fn single_node_restart_keeps_data() {
    init_tracing();
    let mut cluster = EtcdCluster::single();
    let mut client = cluster.client().await;
    let rev = put_until_ok(&mut client, "/flotilla/kept", "v1").await;
    drop(client);
    let data_dir = cluster.data_dir(0).to_owned();

    cluster.kill(0);
    assert!(data_dir.exists());
    cluster.restart(0);
    cluster.wait_healthy().await;

    let mut client = cluster.client().await;
    let resp = client.get("/flotilla/kept", None).await.expect("get");
    let kv = resp.kvs().first().expect("key survives a restart");
    assert_eq!(kv.value(), b"v1");
    assert_eq!(kv.mod_revision(), rev);
    assert!(
        cluster.log_tail(0).contains("\"level\""),
        "zap log is written"
    );
}

#[tokio::test]
async fn watch_below_compacted_revision_is_canceled_with_compact_revision() {
    init_tracing();
    let cluster = EtcdCluster::single();
    let mut client = cluster.client().await;
    let mut revs = Vec::new();
    for v in ["v1", "v2", "v3", "v4", "v5"] {
        revs.push(put_until_ok(&mut client, "/flotilla/compacted", v).await);
    }
    let compacted = revs[2];
    cluster.compact(compacted).await;

    // Reading history below the compaction point fails.
    let err = client
        .get(
            "/flotilla/compacted",
            Some(GetOptions::new().with_revision(revs[0])),
        )
        .await
        .expect_err("read below the compacted revision");
    assert!(err.to_string().contains("compacted"), "{err}");

    // A watch from below it is canceled, naming the compacted revision.
    let mut stream = client
        .watch(
            "/flotilla/compacted",
            Some(WatchOptions::new().with_start_revision(revs[0])),
        )
        .await
        .expect("watch");
    let canceled = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let resp = stream
                .message()
                .await
                .expect("watch stream")
                .expect("watch stream ended before the cancel");
            if resp.canceled() || resp.compact_revision() > 0 {
                return resp;
            }
            assert!(
                resp.events().is_empty(),
                "no events from a compacted revision"
            );
        }
    })
    .await
    .expect("watch canceled within 10s");
    assert!(canceled.canceled());
    assert_eq!(canceled.compact_revision(), compacted);

    // A watch from the compacted revision itself replays the history still kept.
    let mut stream = client
        .watch(
            "/flotilla/compacted",
            Some(WatchOptions::new().with_start_revision(compacted)),
        )
        .await
        .expect("watch");
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while seen.len() < 3 {
            let resp = stream
                .message()
                .await
                .expect("watch stream")
                .expect("watch stream open");
            assert!(!resp.canceled(), "{}", resp.cancel_reason());
            for event in resp.events() {
                assert_eq!(event.event_type(), EventType::Put);
                let kv = event.kv().expect("put event kv");
                seen.push((kv.mod_revision(), kv.value_str().unwrap().to_owned()));
            }
        }
    })
    .await
    .expect("replayed events within 10s");
    assert_eq!(
        seen,
        vec![
            (revs[2], "v3".to_owned()),
            (revs[3], "v4".to_owned()),
            (revs[4], "v5".to_owned()),
        ]
    );
}

#[test]
fn dropping_the_cluster_kills_and_reaps_every_member() {
    init_tracing();
    let mut cluster = EtcdCluster::three();
    let mut pids = cluster.pids();
    assert_eq!(pids.len(), 3);
    cluster.kill(1);
    cluster.restart(1);
    pids.push(cluster.pid(1).expect("restarted pid"));
    for &pid in &pids[..] {
        if pid != pids[1] {
            assert!(Path::new(&format!("/proc/{pid}")).exists(), "{pid} runs");
        }
    }
    let dir = cluster
        .data_dir(0)
        .parent()
        .expect("cluster dir")
        .to_owned();

    drop(cluster);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "etcd {pid} left behind"
        );
    }
    assert!(!dir.exists(), "temp dir {} removed", dir.display());
}

#[test]
fn restart_waits_out_a_port_taken_while_the_member_was_down() {
    init_tracing();
    let mut cluster = EtcdCluster::single();
    cluster.kill(0);
    let endpoint = cluster.endpoint(0);
    let port: u16 = endpoint.rsplit(':').next().unwrap().parse().expect("port");
    let squatter = TcpListener::bind(("127.0.0.1", port)).expect("take the client port");
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(squatter);
    });

    cluster.restart(0);
    release.join().expect("release thread");
    assert!(cluster.is_running(0));
    assert!(
        cluster.log_tail(0).contains("address already in use"),
        "the first restart attempt lost the port:\n{}",
        cluster.log_tail(0)
    );
    cluster.wait_healthy_blocking();
}

const ORPHAN_PROBE_ENV: &str = "FLOTILLA_HARNESS_ORPHAN_PROBE";

/// Not a test on its own: the body of a child process that
/// `etcd_dies_when_the_test_process_is_killed` starts and then SIGKILLs.
#[test]
#[ignore = "helper process for etcd_dies_when_the_test_process_is_killed"]
fn orphan_probe_starts_a_cluster_and_hangs() {
    if std::env::var_os(ORPHAN_PROBE_ENV).is_none() {
        return;
    }
    let cluster = EtcdCluster::three();
    let pids: Vec<String> = cluster.pids().iter().map(u32::to_string).collect();
    println!("ETCD_PIDS {}", pids.join(" "));
    // Killed long before this ends; the bound keeps a lost probe from hanging forever.
    std::thread::sleep(Duration::from_secs(60));
}

/// Kills the probe process if the test fails before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn etcd_dies_when_the_test_process_is_killed() {
    init_tracing();
    let probe = Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "etcd_harness::orphan_probe_starts_a_cluster_and_hangs",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ORPHAN_PROBE_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the probe process");
    let mut probe = KillOnDrop(probe);
    let stdout = probe.0.stdout.take().expect("probe stdout");
    let pids: Vec<u32> = BufReader::new(stdout)
        .lines()
        .map(|line| line.expect("probe output"))
        .find_map(|line| {
            // libtest prints the test name on the same line, before our output.
            let at = line.find("ETCD_PIDS ")?;
            Some(
                line[at + "ETCD_PIDS ".len()..]
                    .split_whitespace()
                    .map(|p| p.parse().expect("pid"))
                    .collect(),
            )
        })
        .expect("probe printed its etcd pids");
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|&pid| process_is_running(pid)));

    // SIGKILL: no destructor runs in the probe, only PDEATHSIG can stop its etcds.
    probe.0.kill().expect("kill the probe");
    probe.0.wait().expect("reap the probe");

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut alive: Vec<u32> = pids.clone();
    while !alive.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        alive.retain(|&pid| process_is_running(pid));
    }
    for &pid in &alive {
        // Clean up before failing so the leak does not outlive this test either.
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    assert!(
        alive.is_empty(),
        "etcd {alive:?} outlived the killed test process"
    );
}
