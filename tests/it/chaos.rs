//! Fault injection: a 3-server cluster on a 3-node etcd with 100 executors and
//! 1,000 changefeeds, while servers, etcd members and executors are killed,
//! servers are frozen, executors are cut off from the servers (partitions),
//! etcd is compacted and operators pause, update and resume (some with a
//! rewind) changefeeds, deregister cut-off executors and delete and create
//! changefeeds again, at random. Then the invariants: no changefeed lost or
//! duplicated, **no two executors holding one changefeed at the same wall-clock
//! time** (from what each agent's workload held, over time, a stop counted when
//! the workload confirmed it), checkpoints never backward except by a rewind or
//! a re-creation, a rewind never undone, every live executor registered, and
//! nothing written by a server that was not the leader at that revision.
//!
//! The executors are the real [`flotilla::client::Agent`] (its lease decides
//! what it holds), each behind its own loopback TCP proxy to the three servers.
//!
//! `chaos_for_two_minutes` runs in CI; `scripts/chaos` runs the long one
//! (`FLOTILLA_CHAOS_SECONDS`, default 900) and prints the figures.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::cluster::{Auditor, Ha, CLUSTER, FAILOVER_GRACE, SERIAL};
use crate::harness::proxy::{socket_addr, Link, Proxy};
use flotilla::client::{
    Agent, AgentConfig, AgentHandle, AgentView, Client, CreateChangefeed, Progress,
    UpdateChangefeed,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;

const AGENTS: usize = 100;
const CHANGEFEEDS: usize = 1000;
/// Where every changefeed's progress starts: far enough above its `start_ts`
/// ([`CREATE_TS`]) that a rewind can go [`REWIND`] down and still be a valid
/// resume, and a rewind is more than any run's progress (1 per report).
const START_TS: u64 = 1_000_000_000_000;
const REWIND: u64 = 1_000_000_000;
/// Every changefeed's `start_ts`: its first report jumps to [`START_TS`].
const CREATE_TS: u64 = START_TS - 2 * REWIND;

/// One stretch of time an executor process held a changefeed.
#[derive(Debug, Clone)]
struct Held {
    agent: usize,
    executor: String,
    epoch: u64,
    from: Instant,
    /// `None`: still held.
    to: Option<Instant>,
}

/// What the executors' workloads held, over time.
#[derive(Default)]
struct Seen {
    /// changefeed -> who held it when.
    held: HashMap<String, Vec<Held>>,
}

/// One executor process: a real agent behind its own proxy, a task that
/// records what it holds whenever its view changes, and one that reports
/// progress for what it holds.
struct Executor {
    handle: Option<AgentHandle>,
    /// The view when it was killed.
    last: AgentView,
    proxy: Proxy,
    tasks: Vec<JoinHandle<()>>,
}

impl Executor {
    fn spawn(n: usize, proxy: Proxy, seen: Arc<Mutex<Seen>>) -> Executor {
        let client = Client::new(&proxy.url)
            .unwrap()
            .with_timeout(Duration::from_secs(1));
        let mut config = AgentConfig::new(format!("chaos{n}"), format!("10.9.0.{}:9000", n % 250));
        config.max_backoff = Duration::from_secs(1);
        let handle = Agent::spawn(client, config);
        let record = tokio::spawn(record(n, handle.subscribe(), handle.reporter(), seen));
        let report = tokio::spawn(report(handle.subscribe(), handle.reporter()));
        Executor {
            handle: Some(handle),
            last: AgentView::default(),
            proxy,
            tasks: vec![record, report],
        }
    }

    fn view(&self) -> AgentView {
        self.handle
            .as_ref()
            .map_or_else(|| self.last.clone(), |h| h.view())
    }

    /// The process dies: no deregistration, nothing more sent or held.
    fn kill(&mut self) {
        self.proxy.set(Link::Refuse);
        self.last = self.view();
        // Dropped, the agent's task clears its view and ends.
        drop(self.handle.take());
    }

    async fn stop(mut self) {
        self.proxy.set(Link::Refuse);
        if let Some(handle) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), handle.stop()).await;
        }
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

/// The workload of agent `n`: it holds what the agent's view lists, noting every
/// change with the time it was seen, and confirms each stop to the agent only
/// after it noted it (so the server moves nothing before the stop is recorded).
async fn record(
    n: usize,
    mut view: tokio::sync::watch::Receiver<AgentView>,
    reporter: flotilla::client::ProgressReporter,
    seen: Arc<Mutex<Seen>>,
) {
    let mut holding: HashMap<String, u64> = HashMap::new();
    loop {
        let (now, executor, assignments) = {
            let v = view.borrow_and_update();
            let executor = v.executor_id.clone().unwrap_or_default();
            let assignments: HashMap<String, u64> = v
                .assignments
                .iter()
                .map(|a| (a.changefeed.clone(), a.epoch))
                .collect();
            (Instant::now(), executor, assignments)
        };
        let mut stopped = Vec::new();
        {
            let mut g = seen.lock().unwrap();
            for (cf, epoch) in &holding {
                if assignments.get(cf) != Some(epoch) {
                    close(&mut g, cf, n, now);
                    stopped.push((cf.clone(), *epoch));
                }
            }
            for (cf, epoch) in &assignments {
                if holding.get(cf) != Some(epoch) {
                    g.held.entry(cf.clone()).or_default().push(Held {
                        agent: n,
                        executor: executor.clone(),
                        epoch: *epoch,
                        from: now,
                        to: None,
                    });
                }
            }
        }
        for (cf, epoch) in stopped {
            reporter.stopped("default", &cf, epoch);
        }
        holding = assignments;
        if view.changed().await.is_err() {
            // The agent is gone: it holds nothing from now on.
            let now = Instant::now();
            let mut seen = seen.lock().unwrap();
            for cf in holding.keys() {
                close(&mut seen, cf, n, now);
            }
            return;
        }
    }
}

fn close(seen: &mut Seen, cf: &str, agent: usize, at: Instant) {
    if let Some(open) = seen.held.get_mut(cf).and_then(|h| {
        h.iter_mut()
            .rev()
            .find(|h| h.agent == agent && h.to.is_none())
    }) {
        open.to = Some(at);
    }
}

/// Reports progress for what the agent holds every 250 ms: the assignment's
/// checkpoint (or [`START_TS`], the first time) plus one per report, so a run's
/// progress stays far below a rewind.
async fn report(
    view: tokio::sync::watch::Receiver<AgentView>,
    reporter: flotilla::client::ProgressReporter,
) {
    let mut made: HashMap<(String, u64), (u64, u64)> = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if view.has_changed().is_err() {
            return;
        }
        let assignments = view.borrow().assignments.clone();
        let live: HashSet<(String, u64)> = assignments
            .iter()
            .map(|a| (a.changefeed.clone(), a.epoch))
            .collect();
        made.retain(|k, _| live.contains(k));
        for a in assignments {
            // A changefeed that never progressed jumps to START_TS at once; one
            // assigned from anywhere else (a rewind) goes on from there.
            let from = if a.checkpoint_ts == CREATE_TS {
                START_TS
            } else {
                a.checkpoint_ts
            };
            let (base, n) = made
                .entry((a.changefeed.clone(), a.epoch))
                .or_insert((from, 0));
            *n += 1;
            reporter.report(Progress {
                namespace: a.namespace,
                changefeed: a.changefeed,
                epoch: a.epoch,
                checkpoint_ts: *base + *n,
                resolved_ts: None,
                error: None,
            });
        }
    }
}

/// Checkpoints as the monitor saw them, and the operators' rewinds.
#[derive(Default)]
struct Checkpoints {
    /// The highest checkpoint seen since the last rewind.
    seen: HashMap<String, u64>,
    /// After a rewind to X: X + REWIND / 10; reaching it means the rewind was undone.
    ceiling: HashMap<String, u64>,
    /// Changefeeds whose rewind answer was lost (it may or may not have
    /// happened): no longer checked.
    untracked: HashSet<String>,
    violations: Vec<String>,
}

impl Checkpoints {
    /// `cf` was deleted and created again: it starts from [`CREATE_TS`] again.
    fn recreated(&mut self, cf: &str) {
        self.seen.insert(cf.to_owned(), CREATE_TS);
        self.ceiling.remove(cf);
    }

    fn observe(&mut self, cf: &str, checkpoint: u64) {
        if self.untracked.contains(cf) {
            return;
        }
        let before = self.seen.entry(cf.to_owned()).or_insert(checkpoint);
        if checkpoint < *before {
            self.violations.push(format!(
                "{cf}: checkpoint went back from {before} to {checkpoint}"
            ));
        }
        *before = (*before).max(checkpoint);
        if let Some(&ceiling) = self.ceiling.get(cf) {
            if checkpoint >= ceiling {
                self.violations.push(format!(
                    "{cf}: a rewind was undone: checkpoint {checkpoint}, {} above the rewind",
                    checkpoint + REWIND / 10 - ceiling
                ));
            }
        }
    }
}

/// An operator's change in progress: paused, and resumed at `at`.
struct AdminCycle {
    changefeed: String,
    at: Instant,
    update: bool,
    rewind: bool,
}

/// The figures of one run.
#[derive(Debug, Default)]
struct Report {
    faults: BTreeMap<&'static str, usize>,
    violations: Vec<String>,
    max_without_leader: Duration,
    registrations: u64,
    lease_lapses: u64,
    audited_writes: usize,
    leader_changes: usize,
    audit_gaps: Vec<String>,
    /// Hand-offs of a changefeed from one executor process to another.
    handoffs: usize,
    /// The summed time two executors held one changefeed at once (0 expected).
    overlap: Duration,
    /// Every time between one executor letting go and the next taking it.
    gaps: Vec<Duration>,
    /// The longest of them, described.
    slowest: Vec<(Duration, String)>,
    rewinds: usize,
    /// Rewinds whose answer was lost (no longer checked).
    rewinds_untracked: usize,
}

/// Overlaps between executor processes, from what each one held when (every pair
/// of stretches of two processes), and the hand-offs: consecutive stretches of
/// two processes, with the gap from the end of everything before to the start
/// of the next. `t0`: the start of the run, for the descriptions.
fn overlaps(seen: &Seen, t0: Instant, end: Instant, report: &mut Report) {
    for (cf, held) in &seen.held {
        let mut held: Vec<&Held> = held.iter().collect();
        held.sort_by_key(|h| h.from);
        for (i, a) in held.iter().enumerate() {
            let a_to = a.to.unwrap_or(end);
            for b in &held[i + 1..] {
                if b.agent == a.agent || b.from >= a_to {
                    continue;
                }
                let overlap = a_to.min(b.to.unwrap_or(end)) - b.from;
                report.overlap += overlap;
                report.violations.push(format!(
                    "{cf}: held by {} (epoch {}) and {} (epoch {}) at once for {overlap:?}",
                    a.executor, a.epoch, b.executor, b.epoch
                ));
            }
        }
        // Hand-offs: where the holder changes, from the latest end so far.
        let mut released: Option<(Instant, &Held)> = None;
        for b in &held {
            if let Some((at, a)) = released {
                if a.agent != b.agent && b.from >= at {
                    report.handoffs += 1;
                    let gap = b.from - at;
                    report.gaps.push(gap);
                    report.slowest.push((
                        gap,
                        format!(
                            "{cf}: {} (epoch {}) let go at {:?}, {} (epoch {}) took it at {:?}",
                            a.executor,
                            a.epoch,
                            at.saturating_duration_since(t0),
                            b.executor,
                            b.epoch,
                            b.from.saturating_duration_since(t0)
                        ),
                    ));
                    report.slowest.sort_by_key(|s| std::cmp::Reverse(s.0));
                    report.slowest.truncate(5);
                }
            }
            let b_to = b.to.unwrap_or(end);
            if released.is_none_or(|(at, _)| b_to >= at) {
                released = Some((b_to, b));
            }
        }
    }
}

async fn chaos(duration: Duration, seed: u64) -> Report {
    let mut ha = Ha::start("chaos").await;
    let mut rng = StdRng::seed_from_u64(seed);
    let auditor = Auditor::start(ha.etcd.endpoints(), CLUSTER).await;
    let leader = ha.leader(Duration::from_secs(10)).await;
    create(&ha.client(leader)).await;
    let urls: Vec<String> = (0..3).map(|i| ha.url(i)).collect();
    let upstreams: Vec<_> = urls.iter().map(|u| socket_addr(u)).collect();
    let admins: Vec<Client> = (0..3).map(|i| ha.client(i)).collect();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut executors = Vec::new();
    for n in 0..AGENTS {
        let proxy = Proxy::start(upstreams.clone()).await;
        executors.push(Executor::spawn(n, proxy, seen.clone()));
    }
    // Killed executors, kept until the end (their records close when they stop).
    let mut dead: Vec<Executor> = Vec::new();
    let mut report = Report::default();

    // Watches the checkpoints (never backward but by a rewind, a rewind never
    // undone) and the leader (how long none).
    let checkpoints = Arc::new(tokio::sync::Mutex::new(Checkpoints::default()));
    let watching = Arc::new(AtomicBool::new(true));
    let monitor = {
        let urls = urls.clone();
        let watching = watching.clone();
        let checkpoints = checkpoints.clone();
        tokio::spawn(async move {
            let clients: Vec<Client> = urls
                .iter()
                .map(|u| Client::new(u).unwrap().with_timeout(Duration::from_secs(1)))
                .collect();
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
                    // Held across the read: a rewind waits, so no read straddles one.
                    let mut checkpoints = checkpoints.lock().await;
                    for client in &clients {
                        let Ok(list) = client.list_changefeeds("default", None).await else {
                            continue;
                        };
                        for cf in list.items {
                            checkpoints.observe(&cf.id, cf.checkpoint_ts);
                        }
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            max_gap
        })
    };

    // The faults, one every 1-4 s, each undone within a few seconds (a
    // partition: within 12, longer than an executor's TTL).
    let started = Instant::now();
    let mut down_servers: Vec<(usize, Instant)> = Vec::new();
    let mut paused_servers: Vec<(usize, Instant)> = Vec::new();
    let mut down_members: Vec<(usize, Instant)> = Vec::new();
    let mut partitions: Vec<(usize, Instant)> = Vec::new();
    let mut cycles: Vec<AdminCycle> = Vec::new();
    // Changefeeds deleted (or maybe deleted) whose creation is still to succeed.
    let mut recreate: Vec<String> = Vec::new();
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
        partitions.retain(|(n, at)| {
            if *at <= now {
                executors[*n].proxy.set(Link::Up);
                false
            } else {
                true
            }
        });
        let mut due = Vec::new();
        cycles.retain(|c| {
            if c.at <= now {
                due.push((c.changefeed.clone(), c.update, c.rewind));
                false
            } else {
                true
            }
        });
        for (cf, update, rewind) in due {
            let admin = &admins[rng.random_range(0..3)];
            if !finish_cycle(admin, &cf, update, rewind, &checkpoints, &mut report).await {
                // Not resumed: tried again soon.
                cycles.push(AdminCycle {
                    changefeed: cf,
                    at: now + Duration::from_millis(500),
                    update: false,
                    rewind: false,
                });
            }
        }
        if !recreate.is_empty() {
            let admin = &admins[rng.random_range(0..3)];
            let mut checkpoints = checkpoints.lock().await;
            let mut left = Vec::new();
            for cf in recreate.drain(..) {
                if create_again(admin, &cf, &mut checkpoints).await {
                    *report.faults.entry("create changefeed again").or_default() += 1;
                } else {
                    left.push(cf);
                }
            }
            recreate = left;
        }
        if now >= next_fault {
            let back = now + Duration::from_millis(rng.random_range(1000..4000));
            let busy: BTreeSet<usize> = down_servers
                .iter()
                .chain(&paused_servers)
                .map(|(i, _)| *i)
                .collect();
            let server = rng.random_range(0..3);
            match rng.random_range(0..9) {
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
                    let n = rng.random_range(0..executors.len());
                    let proxy = Proxy::start(upstreams.clone()).await;
                    let mut old = std::mem::replace(
                        &mut executors[n],
                        Executor::spawn(n, proxy, seen.clone()),
                    );
                    old.kill();
                    partitions.retain(|(p, _)| *p != n);
                    dead.push(old);
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
                5 => {
                    let n = rng.random_range(0..executors.len());
                    if !partitions.iter().any(|(p, _)| *p == n) {
                        let (link, kind) = if rng.random_bool(0.5) {
                            (Link::Drop, "partition executor (drop)")
                        } else {
                            (Link::Refuse, "partition executor (refuse)")
                        };
                        executors[n].proxy.set(link);
                        let until = now + Duration::from_millis(rng.random_range(1000..12000));
                        partitions.push((n, until));
                        *report.faults.entry(kind).or_default() += 1;
                    }
                }
                6 => {
                    let cf = format!("cf{:04}", rng.random_range(0..CHANGEFEEDS));
                    if !cycles.iter().any(|c| c.changefeed == cf) {
                        let admin = &admins[rng.random_range(0..3)];
                        match admin.pause_changefeed("default", &cf).await {
                            Ok(_) => {
                                *report.faults.entry("pause changefeed").or_default() += 1;
                                cycles.push(AdminCycle {
                                    changefeed: cf,
                                    at: back,
                                    update: rng.random_bool(0.5),
                                    rewind: rng.random_bool(0.5),
                                });
                            }
                            // It may have been paused all the same: resumed later.
                            Err(e) if !e.is_client_error() => cycles.push(AdminCycle {
                                changefeed: cf,
                                at: back,
                                update: false,
                                rewind: false,
                            }),
                            Err(_) => {}
                        }
                    }
                }
                // An operator deregisters an executor that is cut off (its
                // lease still holds: its work must wait for it).
                7 if !partitions.is_empty() => {
                    let (n, _) = partitions[rng.random_range(0..partitions.len())];
                    if let Some(id) = executors[n].view().executor_id {
                        let admin = &admins[rng.random_range(0..3)];
                        if admin.deregister(&id, None).await.is_ok() {
                            *report
                                .faults
                                .entry("deregister a cut-off executor")
                                .or_default() += 1;
                        }
                    }
                }
                // Delete a changefeed and create it again at once: the old
                // holder may still run the old one.
                8 => {
                    let cf = format!("cf{:04}", rng.random_range(0..CHANGEFEEDS));
                    if !recreate.contains(&cf) {
                        let admin = &admins[rng.random_range(0..3)];
                        let mut checkpoints = checkpoints.lock().await;
                        match admin.delete_changefeed("default", &cf).await {
                            Ok(()) => {
                                *report.faults.entry("delete changefeed").or_default() += 1;
                                if create_again(admin, &cf, &mut checkpoints).await {
                                    *report.faults.entry("create changefeed again").or_default() +=
                                        1;
                                } else {
                                    recreate.push(cf);
                                }
                            }
                            // Maybe deleted: created again (or found there) later.
                            Err(e) if !e.is_client_error() => recreate.push(cf),
                            Err(_) => {}
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
    // registered again within the failover grace, every changefeed resumed.
    for (i, _) in down_servers.drain(..) {
        ha.respawn_nowait(i);
    }
    for (i, _) in paused_servers.drain(..) {
        ha.signal(i, libc::SIGCONT);
    }
    for (i, _) in down_members.drain(..) {
        ha.etcd.restart(i);
    }
    for (n, _) in partitions.drain(..) {
        executors[n].proxy.set(Link::Up);
    }
    for i in 0..3 {
        ha.wait_ready(i);
    }
    let leader = ha.leader(Duration::from_secs(30)).await;
    let admin = ha.client(leader);
    for cf in recreate.drain(..) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !create_again(&admin, &cf, &mut *checkpoints.lock().await).await {
            assert!(Instant::now() < deadline, "{cf} not created again");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for cycle in cycles.drain(..) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !finish_cycle(
            &admin,
            &cycle.changefeed,
            false,
            false,
            &checkpoints,
            &mut report,
        )
        .await
        {
            assert!(
                Instant::now() < deadline,
                "{} not resumed",
                cycle.changefeed
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    tokio::time::sleep(FAILOVER_GRACE + Duration::from_secs(4)).await;

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
    let listed = admin
        .list_executors(&Default::default())
        .await
        .expect("list executors");
    let status: HashMap<&str, &str> = listed
        .items
        .iter()
        .map(|e| (e.id.as_str(), e.status.as_str()))
        .collect();
    for executor in &executors {
        let view = executor.view();
        let id = view.executor_id.clone().unwrap_or_default();
        if status.get(id.as_str()) != Some(&"running") {
            report.violations.push(format!(
                "live executor {id:?} is not registered and running (the leader, server \
                 {leader}, says {:?}; its agent: {view:?})\n{}",
                status.get(id.as_str()),
                ha.log_lines_with(&id, 20),
            ));
        }
    }

    watching.store(false, Ordering::Relaxed);
    report.max_without_leader = monitor.await.unwrap();
    for executor in executors.into_iter().chain(dead) {
        let view = executor.view();
        report.registrations += view.registrations;
        report.lease_lapses += view.lease_lapses;
        executor.stop().await;
    }
    let checkpoints = std::mem::take(&mut *checkpoints.lock().await);
    report.violations.extend(checkpoints.violations);
    report.rewinds_untracked = checkpoints.untracked.len();
    overlaps(&seen.lock().unwrap(), started, Instant::now(), &mut report);
    let audit = auditor.finish().await;
    report.violations.extend(audit.violations);
    report.audited_writes = audit.writes_by.values().sum();
    report.leader_changes = audit.leader_changes;
    report.audit_gaps = audit.gaps;
    report
}

/// The changefeeds, each from [`CREATE_TS`].
async fn create(client: &Client) {
    for chunk in (0..CHANGEFEEDS).collect::<Vec<_>>().chunks(50) {
        let creates = chunk.iter().map(|i| async move {
            let request = CreateChangefeed {
                id: format!("cf{i:04}"),
                sink_uri: format!("kafka://broker/t{i}"),
                start_ts: Some(CREATE_TS),
                ..CreateChangefeed::default()
            };
            client.create_changefeed("default", &request).await
        });
        for result in futures::future::join_all(creates).await {
            result.expect("create changefeed");
        }
    }
}

/// Creates `cf` again (after a delete): true once it exists (created now, or
/// found there: an earlier answer was lost).
async fn create_again(admin: &Client, cf: &str, checkpoints: &mut Checkpoints) -> bool {
    let i: usize = cf.trim_start_matches("cf").parse().unwrap_or(0);
    let request = CreateChangefeed {
        id: cf.to_owned(),
        sink_uri: format!("kafka://broker/t{i}"),
        start_ts: Some(CREATE_TS),
        ..CreateChangefeed::default()
    };
    match admin.create_changefeed("default", &request).await {
        Ok(_) => {
            checkpoints.recreated(cf);
            true
        }
        Err(e) if e.status() == Some(409) => {
            checkpoints.recreated(cf);
            true
        }
        Err(_) => false,
    }
}

/// Ends an operator's change of a paused changefeed: an update of its sink
/// (if `update`), then a resume, from a checkpoint [`REWIND`] below the
/// current one (if `rewind`). False when it is not resumed yet.
async fn finish_cycle(
    admin: &Client,
    cf: &str,
    update: bool,
    rewind: bool,
    checkpoints: &tokio::sync::Mutex<Checkpoints>,
    report: &mut Report,
) -> bool {
    if update {
        let request = UpdateChangefeed {
            sink_uri: Some(format!("kafka://broker/{cf}-updated")),
            ..UpdateChangefeed::default()
        };
        if admin
            .update_changefeed("default", cf, &request)
            .await
            .is_ok()
        {
            *report.faults.entry("update changefeed").or_default() += 1;
        }
    }
    if !rewind {
        return match admin.resume_changefeed("default", cf, None).await {
            Ok(_) => true,
            // Not paused (any more, or never): nothing to resume.
            Err(e) => e.is_client_error(),
        };
    }
    let Ok(current) = admin.get_changefeed("default", cf).await else {
        return false;
    };
    let to = current.checkpoint_ts.saturating_sub(REWIND);
    // The monitor does not read while a rewind is on its way.
    let mut checkpoints = checkpoints.lock().await;
    match admin.resume_changefeed("default", cf, Some(to)).await {
        Ok(_) => {
            report.rewinds += 1;
            *report.faults.entry("resume with a rewind").or_default() += 1;
            checkpoints.seen.insert(cf.to_owned(), to);
            checkpoints.ceiling.insert(cf.to_owned(), to + REWIND / 10);
            true
        }
        Err(e) if e.is_client_error() => true,
        Err(_) => {
            // It may have happened or not: this changefeed is no longer checked.
            checkpoints.untracked.insert(cf.to_owned());
            false
        }
    }
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
    let mut gaps = report.gaps.clone();
    gaps.sort();
    let at = |q: f64| {
        gaps.get(((gaps.len() as f64 * q) as usize).min(gaps.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    eprintln!(
        "chaos: hand-offs between executors: {}, overlap: {:?}; gap from a stop to the \
         next start: min {:?}, median {:?}, p90 {:?}, p99 {:?}, max {:?}",
        report.handoffs,
        report.overlap,
        at(0.0),
        at(0.5),
        at(0.9),
        at(0.99),
        gaps.last().copied().unwrap_or_default()
    );
    for (_, what) in &report.slowest {
        eprintln!("chaos: slow hand-off: {what}");
    }
    eprintln!(
        "chaos: rewinds: {} ({} answers lost, not checked)",
        report.rewinds, report.rewinds_untracked
    );
    eprintln!(
        "chaos: registrations: {}, executor leases lapsed: {}",
        report.registrations, report.lease_lapses
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
    assert!(report.handoffs > 0, "changefeeds changed hands");
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
