//! Fault injection: a 3-server cluster on a 3-node etcd with 100 executors and
//! 1,000 changefeeds, while servers, etcd members and executors are killed,
//! servers are frozen and etcd is compacted, at random. Then the invariants:
//! no changefeed lost or duplicated, no epoch given to two executors,
//! checkpoints never backward, every live executor registered, and nothing
//! written by a server that was not the leader at that revision.
//!
//! `chaos_for_two_minutes` runs in CI; `scripts/chaos` runs the long one
//! (`FLOTILLA_CHAOS_SECONDS`, default 900) and prints the figures.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::cluster::{
    create_changefeeds, record_and_advance, Auditor, Ha, CLUSTER, FAILOVER_GRACE, SERIAL,
};
use flotilla::client::{Client, Error as ClientError, HeartbeatRequest, Progress, RegisterRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const AGENTS: usize = 100;
const CHANGEFEEDS: usize = 1000;
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

/// What the executors saw.
#[derive(Default)]
struct Seen {
    /// (changefeed, epoch) -> executor ids told to run it.
    served: HashMap<(String, u64), BTreeSet<String>>,
}

/// An executor that survives the chaos: it tries the next server when one
/// does not answer, and registers again when told it is gone.
struct Agent {
    task: tokio::task::JoinHandle<()>,
    /// Its current executor id.
    id: Arc<Mutex<String>>,
    /// What happened to its last request, and when: told when a check fails.
    last: Arc<Mutex<(Instant, String)>>,
}

struct Shared {
    urls: Vec<String>,
    seen: Mutex<Seen>,
    refused: AtomicU64,
    registrations: AtomicU64,
    stop: AtomicBool,
}

impl Agent {
    fn spawn(n: usize, shared: Arc<Shared>) -> Agent {
        let id = Arc::new(Mutex::new(String::new()));
        let my_id = id.clone();
        let last = Arc::new(Mutex::new((Instant::now(), "started".to_owned())));
        let my_last = last.clone();
        let note = move |server: usize, what: String| {
            *my_last.lock().unwrap() = (Instant::now(), format!("server {server}: {what}"));
        };
        let task = tokio::spawn(async move {
            let clients: Vec<Client> = shared
                .urls
                .iter()
                .map(|u| Client::new(u).unwrap().with_timeout(Duration::from_secs(3)))
                .collect();
            let mut server = n % clients.len();
            let mut registration = None;
            let mut progress: Vec<Progress> = Vec::new();
            let mut clock = 1_000u64;
            while !shared.stop.load(Ordering::Relaxed) {
                let client = &clients[server];
                let Some((id, token)) = registration.clone() else {
                    match client
                        .register(&RegisterRequest {
                            name: format!("chaos{n}"),
                            address: format!("10.9.0.{}:9000", n % 250),
                            labels: BTreeMap::new(),
                        })
                        .await
                    {
                        Ok(r) => {
                            note(server, format!("registered as {}", r.executor.id));
                            shared.registrations.fetch_add(1, Ordering::Relaxed);
                            *my_id.lock().unwrap() = r.executor.id.clone();
                            registration = Some((r.executor.id, r.token));
                            progress.clear();
                        }
                        Err(e) => {
                            note(server, format!("register failed: {e}"));
                            server = (server + 1) % clients.len();
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                    continue;
                };
                clock += 1;
                let request = HeartbeatRequest {
                    ttl_ms: None,
                    progress: progress.clone(),
                };
                match client.heartbeat(&id, &token, &request).await {
                    Ok(answer) => {
                        note(server, "heartbeat ok".into());
                        let mut seen = shared.seen.lock().unwrap();
                        progress =
                            record_and_advance(&answer.assignments, &id, clock, &mut seen.served);
                    }
                    Err(
                        e @ ClientError::Api {
                            status: 401 | 404 | 410,
                            ..
                        },
                    ) => {
                        note(server, format!("heartbeat refused: {e}"));
                        shared.refused.fetch_add(1, Ordering::Relaxed);
                        registration = None;
                        continue;
                    }
                    // No answer or a 503: try another server soon.
                    Err(e) => {
                        note(server, format!("heartbeat failed: {e}"));
                        server = (server + 1) % clients.len();
                    }
                }
                tokio::time::sleep(HEARTBEAT_INTERVAL).await;
            }
        });
        Agent { task, id, last }
    }
}

/// The figures of one run.
#[derive(Debug, Default)]
struct Report {
    faults: BTreeMap<&'static str, usize>,
    violations: Vec<String>,
    max_without_leader: Duration,
    refused_heartbeats: u64,
    registrations: u64,
    audited_writes: usize,
    leader_changes: usize,
    audit_gaps: Vec<String>,
}

async fn chaos(duration: Duration, seed: u64) -> Report {
    let mut ha = Ha::start("chaos").await;
    let mut rng = StdRng::seed_from_u64(seed);
    let auditor = Auditor::start(ha.etcd.endpoints(), CLUSTER).await;
    let leader = ha.leader(Duration::from_secs(10)).await;
    create_changefeeds(&ha.client(leader), CHANGEFEEDS).await;
    let shared = Arc::new(Shared {
        urls: (0..3).map(|i| ha.url(i)).collect(),
        seen: Mutex::default(),
        refused: AtomicU64::new(0),
        registrations: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let mut agents: Vec<Agent> = (0..AGENTS)
        .map(|n| Agent::spawn(n, shared.clone()))
        .collect();
    let mut report = Report::default();

    // Watches the checkpoints (never backward) and the leader (how long none).
    let watching = Arc::new(AtomicBool::new(true));
    let monitor = {
        let urls = shared.urls.clone();
        let watching = watching.clone();
        tokio::spawn(async move {
            let clients: Vec<Client> = urls
                .iter()
                .map(|u| Client::new(u).unwrap().with_timeout(Duration::from_secs(1)))
                .collect();
            let mut checkpoints: HashMap<String, u64> = HashMap::new();
            let mut violations = Vec::new();
            let mut last_leader = Instant::now();
            let mut max_gap = Duration::ZERO;
            let mut turn = 0;
            while watching.load(Ordering::Relaxed) {
                turn += 1;
                let mut leading = false;
                for client in &clients {
                    if let Ok(status) = client.status().await {
                        leading |= status.election.is_some_and(|e| e.is_leader);
                    }
                }
                if leading {
                    last_leader = Instant::now();
                } else {
                    max_gap = max_gap.max(last_leader.elapsed());
                }
                if turn % 5 == 0 {
                    for client in &clients {
                        let Ok(list) = client.list_changefeeds("default", None).await else {
                            continue;
                        };
                        for cf in list.items {
                            let before = checkpoints.entry(cf.id.clone()).or_default();
                            if cf.checkpoint_ts < *before {
                                violations.push(format!(
                                    "{}: checkpoint went back from {} to {}",
                                    cf.id, before, cf.checkpoint_ts
                                ));
                            }
                            *before = (*before).max(cf.checkpoint_ts);
                        }
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (violations, max_gap)
        })
    };

    // The faults, one every 1-4 s, each undone within a few seconds.
    let started = Instant::now();
    let mut down_servers: Vec<(usize, Instant)> = Vec::new();
    let mut paused_servers: Vec<(usize, Instant)> = Vec::new();
    let mut down_members: Vec<(usize, Instant)> = Vec::new();
    let mut next_fault = Instant::now() + Duration::from_secs(2);
    while started.elapsed() < duration {
        let now = Instant::now();
        down_servers.retain(|(i, at)| {
            if *at <= now {
                ha.respawn_nowait(*i);
                false
            } else {
                true
            }
        });
        paused_servers.retain(|(i, at)| {
            if *at <= now {
                ha.signal(*i, libc::SIGCONT);
                false
            } else {
                true
            }
        });
        down_members.retain(|(i, at)| {
            if *at <= now {
                ha.etcd.restart(*i);
                false
            } else {
                true
            }
        });
        if now >= next_fault {
            let back = now + Duration::from_millis(rng.random_range(1000..4000));
            let busy: BTreeSet<usize> = down_servers
                .iter()
                .chain(&paused_servers)
                .map(|(i, _)| *i)
                .collect();
            let server = rng.random_range(0..3);
            match rng.random_range(0..5) {
                // One server at a time: two down would be a different test.
                0 if busy.is_empty() => {
                    ha.kill(server);
                    down_servers.push((server, back));
                    *report.faults.entry("kill -9 server").or_default() += 1;
                }
                1 if busy.is_empty() => {
                    ha.signal(server, libc::SIGSTOP);
                    paused_servers.push((server, back));
                    *report.faults.entry("pause server").or_default() += 1;
                }
                // Quorum kept: one etcd member down at most.
                2 if down_members.is_empty() => {
                    let member = rng.random_range(0..3);
                    ha.etcd.kill(member);
                    down_members.push((member, back));
                    *report.faults.entry("kill -9 etcd member").or_default() += 1;
                }
                3 => {
                    let n = rng.random_range(0..agents.len());
                    agents[n].task.abort();
                    agents[n] = Agent::spawn(n, shared.clone());
                    *report.faults.entry("kill executor").or_default() += 1;
                }
                4 => {
                    if let Ok(mut client) =
                        etcd_client::Client::connect(ha.etcd.live_endpoints(), None).await
                    {
                        if let Ok(now) = client.get("/", None).await {
                            let revision = now.header().map_or(0, |h| h.revision()) - 500;
                            if revision > 0 && client.compact(revision, None).await.is_ok() {
                                *report.faults.entry("compact etcd").or_default() += 1;
                            }
                        }
                    }
                }
                _ => {}
            }
            next_fault = now + Duration::from_millis(rng.random_range(1000..4000));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Everything back, then time to settle: a leader, every executor
    // registered again within the failover grace.
    for (i, _) in down_servers.drain(..) {
        ha.respawn_nowait(i);
    }
    for (i, _) in paused_servers.drain(..) {
        ha.signal(i, libc::SIGCONT);
    }
    for (i, _) in down_members.drain(..) {
        ha.etcd.restart(i);
    }
    for i in 0..3 {
        ha.wait_ready(i);
    }
    let leader = ha.leader(Duration::from_secs(30)).await;
    tokio::time::sleep(FAILOVER_GRACE + Duration::from_secs(4)).await;

    let admin = ha.client(leader);
    let feeds = admin
        .list_changefeeds("default", None)
        .await
        .expect("list changefeeds");
    let ids: BTreeSet<&str> = feeds.items.iter().map(|c| c.id.as_str()).collect();
    if feeds.items.len() != CHANGEFEEDS || ids.len() != CHANGEFEEDS {
        report.violations.push(format!(
            "{} changefeeds listed, {} distinct, {CHANGEFEEDS} created",
            feeds.items.len(),
            ids.len()
        ));
    }
    let executors = admin
        .list_executors(&Default::default())
        .await
        .expect("list executors");
    let status: HashMap<&str, &str> = executors
        .items
        .iter()
        .map(|e| (e.id.as_str(), e.status.as_str()))
        .collect();
    for agent in &agents {
        let id = agent.id.lock().unwrap().clone();
        if status.get(id.as_str()) != Some(&"running") {
            let (at, last) = agent.last.lock().unwrap().clone();
            report.violations.push(format!(
                "live executor {id:?} is not registered and running (the leader, server \
                 {leader}, says {:?}; the agent's last request, {:?} ago: {last})\n{}",
                status.get(id.as_str()),
                at.elapsed(),
                ha.log_lines_with(&id, 20),
            ));
        }
    }

    shared.stop.store(true, Ordering::Relaxed);
    for agent in agents {
        let _ = agent.task.await;
    }
    watching.store(false, Ordering::Relaxed);
    let (checkpoint_violations, max_gap) = monitor.await.unwrap();
    report.violations.extend(checkpoint_violations);
    report.max_without_leader = max_gap;
    for ((cf, epoch), executors) in &shared.seen.lock().unwrap().served {
        if executors.len() > 1 {
            report
                .violations
                .push(format!("{cf} epoch {epoch} given to {executors:?}"));
        }
    }
    let audit = auditor.finish().await;
    report.violations.extend(audit.violations);
    report.audited_writes = audit.writes_by.values().sum();
    report.leader_changes = audit.leader_changes;
    report.audit_gaps = audit.gaps;
    report.refused_heartbeats = shared.refused.load(Ordering::Relaxed);
    report.registrations = shared.registrations.load(Ordering::Relaxed);
    report
}

fn print(report: &Report, duration: Duration) {
    eprintln!("chaos: {} s", duration.as_secs());
    for (kind, n) in &report.faults {
        eprintln!("chaos: fault {kind}: {n}");
    }
    eprintln!("chaos: invariant violations: {}", report.violations.len());
    eprintln!(
        "chaos: max time without a leader: {:?}",
        report.max_without_leader
    );
    eprintln!(
        "chaos: heartbeats refused (404/410/401): {}, registrations: {}",
        report.refused_heartbeats, report.registrations
    );
    eprintln!(
        "chaos: owner writes audited: {}, leader changes: {}, audit gaps: {}",
        report.audited_writes,
        report.leader_changes,
        report.audit_gaps.len()
    );
}

fn check(report: &Report) {
    assert!(
        report.violations.is_empty(),
        "invariant violations:\n{}",
        report.violations.join("\n")
    );
    assert!(report.audited_writes > 0, "the audit saw the owners write");
    assert!(
        report.faults.values().sum::<usize>() > 0,
        "faults were injected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_for_two_minutes() {
    let _serial = SERIAL.lock().await;
    let duration = Duration::from_secs(120);
    let report = chaos(duration, 7).await;
    print(&report, duration);
    check(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by scripts/chaos"]
async fn chaos_long() {
    let _serial = SERIAL.lock().await;
    let seconds = std::env::var("FLOTILLA_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(900);
    let seed = std::env::var("FLOTILLA_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("chaos: seed {seed}");
    let duration = Duration::from_secs(seconds);
    let report = chaos(duration, seed).await;
    print(&report, duration);
    check(&report);
}
