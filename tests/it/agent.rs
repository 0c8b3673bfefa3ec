//! `flotilla::client::Agent` and `flotilla agent --simulate` against a real server over
//! a real etcd: registration, heartbeats, assignments, progress that moves the
//! changefeed's checkpoint, re-registration, the executor lease (work kept through a
//! short outage, stopped when the lease lapses, taken again from the next answer), and
//! a clean stop that deregisters.

use crate::harness;
use std::collections::BTreeMap;
use std::future::Future;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::cluster::{Ha, SERIAL, SESSION_TTL};
use crate::harness::server::{FlotillaServer, ServerOptions, BIN};
use flotilla::client::{
    simulate, Agent, AgentConfig, AgentHandle, AgentView, Changefeed, Client, CreateChangefeed,
    Error, ExecutorFilter, DEFAULT_NAMESPACE,
};

const ADMIN: &str = "agent-admin";
const START_TS: u64 = 1000;

/// Polls `probe` every 50 ms until it returns `Some`, for at most 10 s.
async fn eventually<T, F, Fut>(what: &str, server: &FlotillaServer, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within 10 s\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn create(admin: &Client, id: &str) {
    admin
        .create_changefeed(
            DEFAULT_NAMESPACE,
            &CreateChangefeed {
                id: id.into(),
                sink_uri: format!("kafka://broker/{id}"),
                start_ts: Some(START_TS),
                ..CreateChangefeed::default()
            },
        )
        .await
        .unwrap();
}

async fn changefeed(client: &Client, id: &str) -> Changefeed {
    client.get_changefeed(DEFAULT_NAMESPACE, id).await.unwrap()
}

/// Waits until `id` runs on `executor` with a checkpoint past `above`.
async fn advances_on(
    server: &FlotillaServer,
    client: &Client,
    id: &str,
    executor: &str,
    above: u64,
) -> u64 {
    eventually("the checkpoint advances", server, || async {
        // Fails while a restarted server waits for its old lease to lapse.
        let feed = client.get_changefeed(DEFAULT_NAMESPACE, id).await.ok()?;
        (feed.executor.as_deref() == Some(executor) && feed.checkpoint_ts > above)
            .then_some(feed.checkpoint_ts)
    })
    .await
}

fn view_of(handle: &AgentHandle) -> AgentView {
    handle.view()
}

/// An agent of `config` with the simulated workload (50 ms steps), once it has
/// registered: its handle, the workload's task and its executor id.
async fn spawn_simulated(
    server: &FlotillaServer,
    client: Client,
    config: AgentConfig,
) -> (AgentHandle, tokio::task::JoinHandle<()>, String) {
    let handle = Agent::spawn(client, config);
    let workload = tokio::spawn(simulate(
        handle.subscribe(),
        handle.reporter(),
        Duration::from_millis(50),
    ));
    let id = eventually("registered", server, || async {
        view_of(&handle).executor_id
    })
    .await;
    (handle, workload, id)
}

#[tokio::test]
async fn agent_runs_its_assignment_reports_progress_and_deregisters_on_stop() {
    harness::init_tracing();
    let server = FlotillaServer::start(ServerOptions {
        admin_token: Some(ADMIN.into()),
        ..ServerOptions::default()
    });
    let admin = Client::new(&server.url()).unwrap().with_admin_token(ADMIN);
    let mut config = AgentConfig::new("worker", "127.0.0.1:9100");
    config.labels.insert("zone".into(), "a".into());
    config.ttl = Some(Duration::from_secs(2));
    let handle = Agent::spawn(admin.clone(), config);

    let id = eventually("registered and running", &server, || async {
        let id = view_of(&handle).executor_id?;
        let executor = admin.get_executor(&id).await.ok()?;
        (executor.status == "running").then_some(id)
    })
    .await;
    assert!(id.starts_with("worker-"), "{id}");
    let executor = admin.get_executor(&id).await.unwrap();
    assert_eq!(executor.ttl_ms, 2000, "the TTL asked for is sent");
    assert_eq!(executor.labels["zone"], "a");

    create(&admin, "orders").await;
    let assignment = eventually("an assignment", &server, || async {
        view_of(&handle).assignments.into_iter().next()
    })
    .await;
    assert_eq!(
        (
            assignment.changefeed.as_str(),
            assignment.checkpoint_ts,
            assignment.sink_uri.as_str()
        ),
        ("orders", START_TS, "kafka://broker/orders")
    );
    // No progress yet: the checkpoint stays where it started.
    assert_eq!(changefeed(&admin, "orders").await.checkpoint_ts, START_TS);

    let workload = tokio::spawn(simulate(
        handle.subscribe(),
        handle.reporter(),
        Duration::from_millis(50),
    ));
    let first = advances_on(&server, &admin, "orders", &id, START_TS).await;
    let second = advances_on(&server, &admin, "orders", &id, first).await;
    assert!(second > first);
    workload.abort();

    handle.stop().await.unwrap();
    let gone = admin.get_executor(&id).await.unwrap();
    assert_eq!(gone.status, "tombstone", "deregistered on stop");
    let running = admin
        .list_executors(&ExecutorFilter {
            status: Some("running".into()),
            ..ExecutorFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(running.total, 0);
}

#[tokio::test]
async fn an_agent_with_more_progress_than_a_heartbeat_holds_reports_it_all_in_turn() {
    harness::init_tracing();
    // 2 KiB holds the progress of about 15 changefeeds; this agent runs 60.
    let server = FlotillaServer::start(ServerOptions {
        admin_token: Some(ADMIN.into()),
        env: vec![("FLOTILLA_HTTP_MAX_HEARTBEAT_BYTES".into(), "2048".into())],
    });
    let admin = Client::new(&server.url()).unwrap().with_admin_token(ADMIN);
    for i in 0..60 {
        create(&admin, &format!("feed-{i:02}")).await;
    }
    let handle = Agent::spawn(admin.clone(), AgentConfig::new("busy", "127.0.0.1:9101"));
    let workload = tokio::spawn(simulate(
        handle.subscribe(),
        handle.reporter(),
        Duration::from_millis(50),
    ));
    let id = eventually("all 60 assigned to the agent", &server, || async {
        let view = view_of(&handle);
        (view.assignments.len() == 60).then_some(view.executor_id?)
    })
    .await;
    // Every checkpoint moves, twice: each changefeed is reported in turn.
    let mut above = START_TS;
    for _ in 0..2 {
        above = eventually("every checkpoint advances", &server, || async {
            let list = admin.list_changefeeds(DEFAULT_NAMESPACE, None).await.ok()?;
            let lowest = list.items.iter().map(|c| c.checkpoint_ts).min()?;
            (list.items.len() == 60 && lowest > above).then_some(lowest)
        })
        .await;
    }
    let view = view_of(&handle);
    assert_eq!(
        view.registrations, 1,
        "never expired: no heartbeat was refused"
    );
    assert_eq!(view.executor_id.as_deref(), Some(id.as_str()));
    assert!(
        !server.log().contains("payload_too_large"),
        "{}",
        server.log()
    );
    workload.abort();
    handle.stop().await.unwrap();
}

#[tokio::test]
async fn agent_registers_again_after_being_deregistered() {
    harness::init_tracing();
    let server = FlotillaServer::start(ServerOptions {
        admin_token: Some(ADMIN.into()),
        ..ServerOptions::default()
    });
    let admin = Client::new(&server.url()).unwrap().with_admin_token(ADMIN);
    create(&admin, "orders").await;
    let (handle, workload, first_id) = spawn_simulated(
        &server,
        Client::new(&server.url()).unwrap(),
        AgentConfig::new("phoenix", "127.0.0.1:9101"),
    )
    .await;
    let before = advances_on(&server, &admin, "orders", &first_id, START_TS).await;

    // An operator removes it; its next heartbeat hears 410 and it comes back.
    admin.deregister(&first_id, None).await.unwrap();
    let second_id = eventually("registered again", &server, || async {
        let view = view_of(&handle);
        view.executor_id.filter(|id| *id != first_id)
    })
    .await;
    assert!(second_id.starts_with("phoenix-"), "{second_id}");
    assert_eq!(view_of(&handle).registrations, 2);
    // The changefeed moves to the new executor and goes on from where it was.
    let after = advances_on(&server, &admin, "orders", &second_id, before).await;
    assert!(after > before);

    workload.abort();
    handle.stop().await.unwrap();
    assert_eq!(
        admin.get_executor(&second_id).await.unwrap().status,
        "tombstone"
    );
}

#[tokio::test]
async fn a_refused_registration_ends_the_agent_with_the_server_error() {
    harness::init_tracing();
    let server = FlotillaServer::start(ServerOptions::default());
    let mut handle = Agent::spawn(
        Client::new(&server.url()).unwrap(),
        AgentConfig::new("not a valid name", "x:1"),
    );
    let result = tokio::time::timeout(Duration::from_secs(5), handle.join())
        .await
        .expect("the agent gives up at once");
    match result {
        Err(Error::Api { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (400, "invalid_argument"));
        }
        other => panic!("expected a 400, got {other:?}"),
    }
}

/// Kills the agent if the test fails half-way.
struct AgentProcess(Child);

impl AgentProcess {
    /// SIGTERM, then its exit status (within 10 s).
    async fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not stop on SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn agent_subcommand_simulates_progress_and_deregisters_on_sigterm() {
    harness::init_tracing();
    let server = FlotillaServer::start(ServerOptions::default());
    let client = Client::new(&server.url()).unwrap();
    create(&client, "orders").await;
    let log = server.data_dir().join("agent.log");
    let mut agent = AgentProcess(
        Command::new(BIN)
            .args(["agent", "--simulate", "--simulate-step", "50ms"])
            .args(["--name", "sim", "--label", "kind=simulated"])
            .args(["--server", &server.url()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let id = eventually("the agent's executor", &server, || async {
        let list = client
            .list_executors(&ExecutorFilter::default())
            .await
            .ok()?;
        list.items.into_iter().map(|e| e.id).next()
    })
    .await;
    assert!(id.starts_with("sim-"), "{id}");
    let first = advances_on(&server, &client, "orders", &id, START_TS).await;
    advances_on(&server, &client, "orders", &id, first).await;

    let status = agent.terminate().await;
    let agent_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{agent_log}");
    assert!(agent_log.contains("deregistered"), "{agent_log}");
    assert_eq!(client.get_executor(&id).await.unwrap().status, "tombstone");
}

/// `--count`: several simulated executors in one process, all running and all
/// deregistered on SIGTERM.
#[tokio::test]
async fn agent_count_runs_a_simulated_fleet_in_one_process() {
    harness::init_tracing();
    let server = FlotillaServer::start(ServerOptions::default());
    let client = Client::new(&server.url()).unwrap();
    let log = server.data_dir().join("fleet.log");
    let mut agent = AgentProcess(
        Command::new(BIN)
            .args(["agent", "--simulate", "--count", "3", "--name", "fleet"])
            .args(["--server", &server.url()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    // The changefeeds come once all three are registered: created before, they
    // would all go to whichever registered first (nothing rebalances yet).
    eventually("three executors registered", &server, || async {
        let list = client
            .list_executors(&ExecutorFilter::default())
            .await
            .ok()?;
        (list.items.len() == 3).then_some(())
    })
    .await;
    for id in ["a", "b", "c", "d", "e", "f"] {
        create(&client, id).await;
    }
    let ids = eventually(
        "three executors holding two changefeeds each",
        &server,
        || async {
            let list = client.list_changefeeds("default", None).await.ok()?;
            let mut on = BTreeMap::<String, usize>::new();
            for feed in &list.items {
                *on.entry(feed.executor.clone()?).or_default() += 1;
            }
            (on.len() == 3 && on.values().all(|n| *n == 2)).then_some(on)
        },
    )
    .await;
    assert!(ids.keys().all(|id| id.starts_with("fleet")), "{ids:?}");
    let status = agent.terminate().await;
    let fleet_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{fleet_log}");
    assert!(fleet_log.contains("fleet agents=3"), "{fleet_log}");
    assert!(fleet_log.contains("simulated fleet stopped"), "{fleet_log}");
    for id in ids.keys() {
        assert_eq!(client.get_executor(id).await.unwrap().status, "tombstone");
    }
}

/// Polls `probe` every 20 ms until it returns `Some`, for at most `limit`.
async fn within<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_keeps_its_work_through_an_outage_shorter_than_its_lease_and_goes_on_after() {
    harness::init_tracing();
    let mut server = FlotillaServer::start(ServerOptions::default());
    let client = Client::new(&server.url()).unwrap();
    create(&client, "orders").await;
    let mut config = AgentConfig::new("steady", "127.0.0.1:9102");
    config.min_backoff = Duration::from_millis(50);
    config.max_backoff = Duration::from_millis(200);
    // A lease (30 s - 3 s) far longer than the outage.
    config.ttl = Some(Duration::from_secs(30));
    let (handle, workload, id) = spawn_simulated(&server, client.clone(), config).await;
    let before = advances_on(&server, &client, "orders", &id, START_TS).await;

    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let down = view_of(&handle);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let still_down = view_of(&handle);
    assert_eq!(
        still_down.heartbeats, down.heartbeats,
        "no answer while down"
    );
    assert_eq!(still_down.executor_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        (still_down.assignments.len(), still_down.lease_lapses),
        (1, 0),
        "an outage shorter than the lease is no reason to stop work"
    );

    // The restarted server reloads the executor (with a grace TTL): same id, no new
    // registration, and progress lands again.
    server.restart();
    let after = advances_on(&server, &client, "orders", &id, before).await;
    assert!(after > before);
    assert_eq!(view_of(&handle).registrations, 1);

    workload.abort();
    handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_stops_its_work_when_its_lease_lapses_and_takes_it_again_from_the_server() {
    harness::init_tracing();
    let mut server = FlotillaServer::start(ServerOptions::default());
    let client = Client::new(&server.url()).unwrap();
    create(&client, "orders").await;
    let ttl = Duration::from_secs(3);
    let mut config = AgentConfig::new("leased", "127.0.0.1:9103");
    config.ttl = Some(ttl);
    // A backoff longer than the TTL: the lease end must wake the agent anyway.
    config.min_backoff = Duration::from_secs(5);
    config.max_backoff = Duration::from_secs(10);
    let (handle, workload, id) = spawn_simulated(&server, client.clone(), config).await;
    advances_on(&server, &client, "orders", &id, START_TS).await;
    let held = view_of(&handle);
    assert_eq!(held.assignments.len(), 1);
    assert!(held.lease_until.is_some(), "a lease while working");

    server.kill();
    // The lease ends TTL - margin after the last acknowledged heartbeat was sent
    // (before the kill): by TTL + one interval (200 ms) at the latest; the deadline
    // adds slack for a loaded machine only.
    let interval = Duration::from_millis(200);
    let stopped = within(
        "the assignments stop when the lease lapses",
        ttl + interval + Duration::from_secs(5),
        || {
            let view = view_of(&handle);
            view.assignments.is_empty().then_some(view)
        },
    )
    .await;
    assert_eq!(stopped.lease_lapses, 1, "reported as a lapse: {stopped:?}");
    assert_eq!(stopped.lease_until, None);
    assert_eq!(
        stopped.executor_id.as_deref(),
        Some(id.as_str()),
        "still registered"
    );

    // The server comes back: its next answer, and only that, gives the work back
    // (under the same id, or a new one if the backoff outlasted the reloaded
    // executor's grace: either way the server's word).
    server.restart();
    let back = within("the assignment comes back", Duration::from_secs(40), || {
        let view = view_of(&handle);
        (!view.assignments.is_empty()).then_some(view)
    })
    .await;
    assert!(back.lease_until.is_some());
    assert!(back.heartbeats > stopped.heartbeats);
    assert!(back.executor_id.is_some());
    assert_eq!(back.lease_lapses, 1);

    workload.abort();
    handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_longer_than_a_failover_keeps_the_work_running_through_it() {
    let _serial = SERIAL.lock().await;
    harness::init_tracing();
    let mut ha = Ha::start("agent_failover").await;
    let leader = ha.leader(Duration::from_secs(10)).await;
    let follower = (leader + 1) % 3;
    let admin = ha.client(follower);
    create(&admin, "orders").await;
    let mut config = AgentConfig::new("survivor", "127.0.0.1:9104");
    // Lease 9 s; the cluster's session TTL is 2 s.
    config.ttl = Some(Duration::from_secs(10));
    config.min_backoff = Duration::from_millis(50);
    config.max_backoff = Duration::from_millis(500);
    let handle = Agent::spawn(Client::new(&ha.url(follower)).unwrap(), config);
    let held = within("an assignment", Duration::from_secs(30), || {
        let view = view_of(&handle);
        (!view.assignments.is_empty()).then_some(view)
    })
    .await;

    // Watch every change of the view from before the kill on.
    let emptied = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut changes = handle.subscribe();
    let watcher = tokio::spawn({
        let emptied = emptied.clone();
        async move {
            while changes.changed().await.is_ok() {
                if changes.borrow_and_update().assignments.is_empty() {
                    emptied.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    });
    let before = view_of(&handle).heartbeats;
    let killed = Instant::now();
    ha.kill(leader);
    ha.leader(SESSION_TTL + Duration::from_secs(10)).await;
    // The first heartbeat the new leader answers (through the follower).
    within(
        "a heartbeat answered after the failover",
        Duration::from_secs(30),
        || (view_of(&handle).heartbeats > before + 1).then_some(()),
    )
    .await;
    let paused = killed.elapsed();
    println!("heartbeats unanswered for about {paused:?} after the leader was killed");

    let view = view_of(&handle);
    assert_eq!(view.lease_lapses, 0, "the lease outlasted the failover");
    assert_eq!(
        view.assignments, held.assignments,
        "the same work, never stopped"
    );
    assert_eq!(view.registrations, 1);
    assert!(
        !emptied.load(std::sync::atomic::Ordering::SeqCst),
        "the assignments never went away"
    );
    watcher.abort();
    handle.stop().await.unwrap();
}

/// The hand-off with a workload that stops slowly: a changefeed moved away from an
/// executor (paused, its selector updated, resumed) runs nowhere else until that
/// executor's workload confirmed the stop; then it moves within a few heartbeats,
/// at a higher epoch. Deleted and created again, it comes back at an epoch above
/// every one the id had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_waits_for_the_old_workload_to_confirm_its_stop() {
    harness::init_tracing();
    // The longest lease (the wait without an acknowledgement) is 10 s here: far
    // beyond what an acknowledged move takes, so the two cannot be mistaken.
    let server = FlotillaServer::start(ServerOptions {
        admin_token: Some(ADMIN.into()),
        env: vec![
            ("FLOTILLA_REGISTRY_MAX_TTL".into(), "10s".into()),
            ("FLOTILLA_REGISTRY_FAILOVER_GRACE".into(), "12s".into()),
        ],
    });
    let admin = Client::new(&server.url()).unwrap().with_admin_token(ADMIN);
    let mut config = AgentConfig::new("alpha", "127.0.0.1:9100");
    config.labels.insert("zone".into(), "a".into());
    // Its workload is this test: it confirms stops by hand.
    let slow = Agent::spawn(admin.clone(), config);
    let alpha = eventually("alpha registered", &server, || async {
        view_of(&slow).executor_id
    })
    .await;
    create(&admin, "moving").await;
    let first = eventually("moving runs on alpha", &server, || async {
        view_of(&slow).assignments.into_iter().next()
    })
    .await;
    let mut config = AgentConfig::new("beta", "127.0.0.1:9101");
    config.labels.insert("zone".into(), "b".into());
    let (fast, _workload, beta) = spawn_simulated(&server, admin.clone(), config).await;

    // Moved to zone b the way an operator does it.
    admin
        .pause_changefeed(DEFAULT_NAMESPACE, "moving")
        .await
        .unwrap();
    admin
        .update_changefeed(
            DEFAULT_NAMESPACE,
            "moving",
            &flotilla::client::UpdateChangefeed {
                selector: Some([("zone".to_owned(), "b".to_owned())].into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    admin
        .resume_changefeed(DEFAULT_NAMESPACE, "moving", Some(START_TS))
        .await
        .unwrap();
    eventually("alpha is told to stop", &server, || async {
        view_of(&slow).assignments.is_empty().then_some(())
    })
    .await;
    let releasing = eventually("releasing shown", &server, || async {
        changefeed(&admin, "moving").await.releasing
    })
    .await;
    assert_eq!(
        (releasing.executor.as_str(), releasing.epoch),
        (alpha.as_str(), first.epoch)
    );
    // Alpha's workload has not confirmed: beta gets nothing, for well over a
    // heartbeat (200 ms) and short of the longest lease (10 s).
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert!(
            view_of(&fast).assignments.is_empty(),
            "beta runs it while alpha has not let go"
        );
        let feed = changefeed(&admin, "moving").await;
        assert_eq!(feed.executor, None, "{feed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    slow.stopped(DEFAULT_NAMESPACE, "moving", first.epoch);
    let confirmed = Instant::now();
    let moved = eventually("moving runs on beta", &server, || async {
        view_of(&fast).assignments.into_iter().next()
    })
    .await;
    assert!(moved.epoch > first.epoch);
    // The lease would have released it 8.5 s from now at the earliest.
    assert!(
        confirmed.elapsed() < Duration::from_secs(5),
        "released by the acknowledgement, not the lease: {:?}",
        confirmed.elapsed()
    );
    let feed = changefeed(&admin, "moving").await;
    assert_eq!(
        (feed.executor.as_deref(), feed.releasing),
        (Some(beta.as_str()), None)
    );

    // Deleted and created again at once: beta's simulation stops the old one
    // and confirms; the new one starts above every epoch the id had.
    admin
        .delete_changefeed(DEFAULT_NAMESPACE, "moving")
        .await
        .unwrap();
    admin
        .create_changefeed(
            DEFAULT_NAMESPACE,
            &CreateChangefeed {
                id: "moving".into(),
                sink_uri: "kafka://broker/again".into(),
                start_ts: Some(START_TS),
                selector: Some([("zone".to_owned(), "b".to_owned())].into()),
                ..CreateChangefeed::default()
            },
        )
        .await
        .unwrap();
    let again = eventually("the new one runs on beta", &server, || async {
        view_of(&fast)
            .assignments
            .into_iter()
            .find(|a| a.sink_uri == "kafka://broker/again")
    })
    .await;
    assert!(
        again.epoch > moved.epoch,
        "{} > {}",
        again.epoch,
        moved.epoch
    );
    slow.stop().await.unwrap();
    fast.stop().await.unwrap();
}
