//! [`Agent`]: an executor's life on top of [`Client`], as one tokio task.
//!
//! The task is a two-state loop (`Unregistered` -> register -> `Registered` ->
//! heartbeat, and back on 404/410/401) with one delay between steps:
//! - registered: the server's `heartbeat_interval_ms`, shortened by up to 20 % at
//!   random so a fleet started together does not beat in lockstep;
//! - after a failure (no answer, a timeout, a 5xx/503): a doubling backoff with jitter
//!   (`Retry-After` respected), keeping the current assignments while the lease holds
//!   (below), with one last try a heartbeat interval before it lapses; while it holds
//!   a lease the backoff never exceeds one heartbeat interval, so after a failover or
//!   a restart of the server it is back within an interval, not after a long sleep
//!   (and logs how long the server was unreachable);
//! - after 404 (unknown), 410 (tombstone) or 401 (token no longer valid): the
//!   assignments are dropped (the server moves them elsewhere) and the agent registers
//!   again at once.
//!
//! The lease: the agent holds its assignments only until the *send* time of its last
//! acknowledged (200) heartbeat plus the TTL that answer granted (`ttl_ms`), less a
//! safety margin ([`AgentConfig::lease_margin`], by default [`lease_margin`]). The
//! server expires an executor no earlier than TTL after the last heartbeat it
//! *received*, which is later than it was sent, so the executor always stops first and
//! no two executors run one changefeed at once, however long a partition lasts. The one
//! assumption: both clocks run at nearly the same rate (they need not agree on the
//! time); the margin covers the difference. When the lease lapses the agent stops every
//! assignment (its [`AgentView`] shows none, and it logs once, at warn, how many and
//! why), keeps its registration, and takes work again only from a new answer. The loop
//! wakes at the lease end even in a long backoff or while a request is in flight.
//! While no leader answers (a failover: about the server's `session_ttl`) leases run
//! down too: the server's default TTL (20 s, an 18 s lease) outlasts one, and a TTL
//! asked for ([`AgentConfig::ttl`]) should too, or every failover stops all work.
//!
//! The hand-off: an assignment the server takes away comes back in `revoked`; the
//! agent names it in a later heartbeat's `stopped` once the workload confirmed the
//! stop ([`AgentHandle::stopped`] / [`ProgressReporter::stopped`]; with
//! [`AgentConfig::confirm_stops`] off, as soon as it left the view), and only then
//! does the server give it to another executor (or after this executor's lease). A
//! task the workload was never shown is acknowledged at once. A slow sink flush
//! therefore counts as running. [`AgentHandle::stop`] waits for the workload to
//! confirm every stop (at most until the lease ends) before it deregisters, which
//! acknowledges them all.
//!
//! The lease clock is `CLOCK_BOOTTIME` on Linux ([`LeaseClock`]): it keeps counting
//! while the machine or VM is suspended, so a lease cannot outlive a suspend (tokio's
//! `Instant`, `CLOCK_MONOTONIC`, stops during one).
//!
//! Every heartbeat carries the latest progress of each assignment (a resend is
//! harmless: a checkpoint never goes backward), packed under the body limit the
//! server announces (`max_heartbeat_bytes`): changed progress first, then what was
//! sent least recently, so an executor with more assignments than one body holds
//! still reports each of them in turn and never sends a body the server refuses.
//! A 413 all the same (a server with a smaller limit) halves the budget.
//!
//! A registration the server refuses (4xx: a bad name, address or label) ends the task
//! with that error: retrying cannot fix the configuration.
//!
//! The embedding program sees the agent through an [`AgentHandle`]: a `watch` of
//! [`AgentView`] (the executor id and the current assignments, replaced after every
//! heartbeat), [`AgentHandle::report`] to queue progress for the next heartbeat, and
//! [`AgentHandle::stop`], which stops the assignments, then deregisters. [`simulate`](super::simulate)
//! is a fake workload on top.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::outbox::{budget_for, Outbox, DEFAULT_BUDGET, MIN_BUDGET};
use super::{
    Assignment, Client, Error, HeartbeatRequest, HeartbeatResponse, Progress, RegisterRequest,
    Rejected, Result, TaskRef,
};

/// Who the agent registers as, and how it retries.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    /// The TTL to ask for on every heartbeat; `None`: the server's default.
    pub ttl: Option<Duration>,
    /// First delay after a failure; it doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How long before the server could expire this executor it stops its work: the
    /// lease ends at a heartbeat's send time + the granted TTL - this margin. `None`:
    /// [`lease_margin`]'s default (10 % of the TTL, at least 500 ms). Never more than
    /// half the TTL.
    pub lease_margin: Option<Duration>,
    /// Whether the workload confirms each stop ([`AgentHandle::stopped`]): an
    /// assignment that left the view counts as running until it does. `false`: the
    /// program stops an assignment the moment it leaves the view (it runs nothing
    /// of its own, or stops synchronously), so it is acknowledged at once.
    pub confirm_stops: bool,
}

impl AgentConfig {
    pub fn new(name: impl Into<String>, address: impl Into<String>) -> AgentConfig {
        AgentConfig {
            name: name.into(),
            address: address.into(),
            labels: BTreeMap::new(),
            ttl: None,
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            lease_margin: None,
            confirm_stops: true,
        }
    }
}

/// The smallest default lease margin: room for a stalled process and clock-rate drift
/// even at a short TTL.
pub const MIN_LEASE_MARGIN: Duration = Duration::from_millis(500);

/// The safety margin taken off a granted `ttl`: `configured`, or by default
/// max(10 % of the TTL, [`MIN_LEASE_MARGIN`]); never more than half the TTL, so a
/// short TTL still leaves a lease.
pub fn lease_margin(ttl: Duration, configured: Option<Duration>) -> Duration {
    configured
        .unwrap_or_else(|| (ttl / 10).max(MIN_LEASE_MARGIN))
        .min(ttl / 2)
}

/// When the assignments of a heartbeat sent at `sent` and granted `ttl` must stop.
fn lease_end(sent: LeaseClock, ttl: Duration, configured: Option<Duration>) -> LeaseClock {
    sent + (ttl - lease_margin(ttl, configured))
}

/// A point in time on the clock leases are counted on: `CLOCK_BOOTTIME` on Linux,
/// which keeps counting while the machine is suspended (so a lease ends on time
/// however long a suspend lasted), the monotonic clock elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LeaseClock(Duration);

impl LeaseClock {
    #[cfg(target_os = "linux")]
    pub fn now() -> LeaseClock {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `clock_gettime` writes only the timespec it is given, which lives
        // on this stack frame; CLOCK_BOOTTIME exists since Linux 2.6.39.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME)");
        LeaseClock(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    #[cfg(not(target_os = "linux"))]
    pub fn now() -> LeaseClock {
        static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        LeaseClock(BASE.get_or_init(std::time::Instant::now).elapsed())
    }

    pub fn saturating_duration_since(self, earlier: LeaseClock) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// The same point on tokio's clock (for timers and [`AgentView::lease_until`]).
    fn to_tokio(self) -> Instant {
        Instant::now() + self.saturating_duration_since(LeaseClock::now())
    }
}

impl std::ops::Add<Duration> for LeaseClock {
    type Output = LeaseClock;
    fn add(self, d: Duration) -> LeaseClock {
        LeaseClock(self.0 + d)
    }
}

/// When to try again after a failure: `backoff` from `now`, but once, a heartbeat
/// `interval` before the lease ends, when the backoff would sleep past that (a long
/// backoff must not turn a short outage into a lapse).
fn next_attempt(
    now: Instant,
    backoff: Duration,
    lease: Option<Instant>,
    interval: Duration,
) -> Instant {
    let planned = now + backoff;
    match lease.and_then(|end| end.checked_sub(interval)) {
        Some(last_chance) if now < last_chance && last_chance < planned => last_chance,
        _ => planned,
    }
}

/// What the embedding program sees of the agent; replaced as a whole after every
/// registration and heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentView {
    /// The executor id while registered.
    pub executor_id: Option<String>,
    /// What this executor must run, as of the last answered heartbeat; empty once
    /// the lease lapses. A changefeed that leaves this list must be stopped
    /// (paused, deleted, moved, or no longer leased).
    pub assignments: Vec<Assignment>,
    /// Progress the server refused at the last heartbeat.
    pub rejected: Vec<Rejected>,
    /// Registrations so far: 1 + re-registrations.
    pub registrations: u64,
    /// Heartbeats answered so far.
    pub heartbeats: u64,
    /// When the current assignments must stop unless a later heartbeat is
    /// acknowledged; `None`: no lease (unregistered, or lapsed).
    pub lease_until: Option<Instant>,
    /// Times the lease lapsed (no heartbeat acknowledged in time) and every
    /// assignment was stopped for it.
    pub lease_lapses: u64,
}

/// Starts agents.
pub struct Agent;

impl Agent {
    /// Starts the agent task on the current tokio runtime; it registers at once.
    pub fn spawn(client: Client, config: AgentConfig) -> AgentHandle {
        let (view_tx, view_rx) = watch::channel(AgentView::default());
        let (report_tx, report_rx) = mpsc::unbounded_channel();
        let reports = ProgressReporter {
            signals: report_tx,
            stop_confirmed: Arc::new(Notify::new()),
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(
            Runner {
                client,
                config,
                view: view_tx,
                reports: report_rx,
                stop_confirmed: reports.stop_confirmed.clone(),
                outbox: Outbox::default(),
                budget: DEFAULT_BUDGET,
                running: HashSet::new(),
                revoked: Vec::new(),
                known: None,
            }
            .run(stop_rx),
        );
        AgentHandle {
            view: view_rx,
            reports,
            stop: Some(stop_tx),
            task,
        }
    }
}

/// What the workload tells the agent.
#[derive(Debug)]
enum Signal {
    Progress(Progress),
    Stopped(TaskRef),
}

/// The embedding program's side of a running agent. Dropping it stops the agent
/// (which deregisters) without waiting for it.
pub struct AgentHandle {
    view: watch::Receiver<AgentView>,
    reports: ProgressReporter,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
}

impl AgentHandle {
    /// The agent as of now.
    pub fn view(&self) -> AgentView {
        self.view.borrow().clone()
    }

    /// A receiver that wakes on every change (`changed().await`).
    pub fn subscribe(&self) -> watch::Receiver<AgentView> {
        self.view.clone()
    }

    /// Something that reports progress, for a workload running on its own.
    pub fn reporter(&self) -> ProgressReporter {
        self.reports.clone()
    }

    /// Queues progress for the next heartbeat; a later report of the same changefeed
    /// replaces it. Progress of a changefeed no longer assigned at that epoch is dropped.
    pub fn report(&self, progress: Progress) {
        self.reports.report(progress);
    }

    /// The workload has stopped `changefeed` at `epoch` (one that left the view):
    /// see [`ProgressReporter::stopped`].
    pub fn stopped(&self, namespace: &str, changefeed: &str, epoch: u64) {
        self.reporter().stopped(namespace, changefeed, epoch);
    }

    /// Whether the task ended by itself (a refused registration).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the assignments (the view shows none), deregisters (when registered) and
    /// waits for the task. An error: the task had already ended with one, or the
    /// deregistration failed.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join().await
    }

    /// Waits for the task to end by itself.
    pub async fn join(&mut self) -> Result<()> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down.
            Err(_) => Ok(()),
        }
    }
}

/// Reports progress to an agent (see [`AgentHandle::report`]); cheap to clone.
#[derive(Debug, Clone)]
pub struct ProgressReporter {
    signals: mpsc::UnboundedSender<Signal>,
    /// Wakes the agent to acknowledge a stop at once, not at the next beat.
    stop_confirmed: Arc<Notify>,
}

impl ProgressReporter {
    pub fn report(&self, progress: Progress) {
        let _ = self.signals.send(Signal::Progress(progress));
    }

    /// The workload has stopped `changefeed` at `epoch`, for good (its sink
    /// flushed, nothing more will be written under that epoch): the agent may
    /// tell the server, which then gives it to another executor. Call it for every
    /// assignment that leaves the view (taken away, or the lease lapsed); until
    /// then the changefeed runs nowhere else (or only after this executor's lease).
    pub fn stopped(&self, namespace: &str, changefeed: &str, epoch: u64) {
        let _ = self.signals.send(Signal::Stopped(TaskRef {
            namespace: namespace.to_owned(),
            changefeed: changefeed.to_owned(),
            epoch,
        }));
        self.stop_confirmed.notify_one();
    }
}

/// The executor's credentials while registered.
struct Session {
    id: String,
    token: String,
}

struct Runner {
    client: Client,
    config: AgentConfig,
    view: watch::Sender<AgentView>,
    reports: mpsc::UnboundedReceiver<Signal>,
    /// Notified when the workload confirms a stop.
    stop_confirmed: Arc<Notify>,
    /// The latest report per changefeed, sent until the assignment goes.
    outbox: Outbox,
    /// Bytes of progress one heartbeat may carry.
    budget: usize,
    /// Tasks shown to the workload in this registration whose stop it has not
    /// confirmed: running, as far as the server must know.
    running: HashSet<TaskRef>,
    /// The last answer's tasks taken away, to acknowledge once stopped.
    revoked: Vec<TaskRef>,
    /// The generation of the lists last received and the assignments of it: an
    /// `unchanged` answer means these still hold.
    known: Option<(u64, Vec<Assignment>)>,
}

impl Runner {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) -> Result<()> {
        let mut session: Option<Session> = None;
        let mut failures: u32 = 0;
        // When the current run of failures began.
        let mut failing_since: Option<Instant> = None;
        let mut next = Instant::now();
        // The end of the lease on the current assignments; `None`: no lease.
        let mut lease: Option<LeaseClock> = None;
        // The server's heartbeat interval (the registration's, then each answer's).
        let mut interval = Duration::from_secs(1);
        loop {
            tokio::select! {
                // A dropped handle stops the agent too.
                _ = &mut stop => break,
                () = tokio::time::sleep_until(next) => {}
                () = until(lease) => {
                    lapse(&self.view, &mut lease);
                    continue;
                }
                // A stop the server waits for was confirmed: tell it now (the
                // move completes a heartbeat sooner), unless backing off.
                () = self.stop_confirmed.notified(), if session.is_some() && failures == 0 => {
                    while let Ok(signal) = self.reports.try_recv() {
                        self.signal(signal);
                    }
                    if !self.revoked.iter().any(|t| !self.running.contains(t)) {
                        continue;
                    }
                }
            }
            let outcome = match &session {
                None => self.register().await.map(|(s, beat)| {
                    session = Some(s);
                    interval = beat;
                    // Beat at once: the first heartbeat makes the executor `running`.
                    Duration::ZERO
                }),
                Some(s) => {
                    let (request, sent) = self.prepare();
                    let answer = {
                        let call = self.client.heartbeat(&s.id, &s.token, &request);
                        let mut call = std::pin::pin!(call);
                        // The lease may end while the request waits for its timeout.
                        loop {
                            tokio::select! {
                                answer = &mut call => break answer,
                                () = until(lease) => lapse(&self.view, &mut lease),
                            }
                        }
                    };
                    answer.map(|answer| {
                        interval = Duration::from_millis(answer.heartbeat_interval_ms.max(1));
                        self.take(answer, sent, &mut lease);
                        interval.mul_f64(rand::rng().random_range(0.8..=1.0))
                    })
                }
            };
            let now = Instant::now();
            next = match outcome {
                Ok(delay) => {
                    if let Some(since) = failing_since.take() {
                        info!(
                            unreachable_for = ?now.saturating_duration_since(since),
                            failures,
                            "server answering again"
                        );
                    }
                    failures = 0;
                    now + delay
                }
                Err(e) if session.is_none() && e.is_client_error() => {
                    warn!(error = %e, "registration refused; the agent stops");
                    return Err(e);
                }
                Err(e) if matches!(e.status(), Some(401 | 404 | 410)) => {
                    let id = session.take().map(|s| s.id).unwrap_or_default();
                    warn!(id, error = %e, "executor no longer registered; registering again");
                    self.outbox.clear();
                    // The old registration's tasks are the server's to release
                    // (by its lease); the new one starts with none.
                    self.running.clear();
                    self.revoked.clear();
                    self.known = None;
                    lease = None;
                    self.view.send_modify(|v| {
                        v.executor_id = None;
                        v.assignments.clear();
                        v.rejected.clear();
                        v.lease_until = None;
                    });
                    failures = 0;
                    now
                }
                Err(e) if e.status() == Some(413) => {
                    // A server with a smaller limit than it announced (or than
                    // the default, if it announces none).
                    failures += 1;
                    self.budget = (self.budget / 2).max(MIN_BUDGET);
                    warn!(
                        budget = self.budget,
                        "heartbeat too large; sending less progress"
                    );
                    let holding = lease.map(|_| interval);
                    next_attempt(
                        now,
                        self.backoff(failures, &e, holding),
                        lease.map(LeaseClock::to_tokio),
                        interval,
                    )
                }
                Err(e) => {
                    failures += 1;
                    failing_since.get_or_insert(now);
                    let holding = lease.map(|_| interval);
                    let at = next_attempt(
                        now,
                        self.backoff(failures, &e, holding),
                        lease.map(LeaseClock::to_tokio),
                        interval,
                    );
                    warn!(
                        error = %e,
                        failures,
                        retry_in = ?at.saturating_duration_since(now),
                        lease_left = ?lease.map(|end| end.saturating_duration_since(LeaseClock::now())),
                        "server request failed"
                    );
                    at
                }
            };
        }
        // The work stops before the server hears of it: once deregistered, the
        // executor's changefeeds move to another at once.
        self.view.send_if_modified(|v| {
            let changed = !v.assignments.is_empty();
            v.assignments.clear();
            v.lease_until = None;
            changed
        });
        let Some(session) = session else {
            return Ok(());
        };
        self.wait_for_stops(lease).await;
        let result = match self
            .client
            .deregister(&session.id, Some(&session.token))
            .await
        {
            Ok(()) => {
                info!(id = session.id, "deregistered");
                Ok(())
            }
            // Already gone: what deregistering wanted.
            Err(e) if matches!(e.status(), Some(404 | 410)) => Ok(()),
            Err(e) => Err(e),
        };
        self.view.send_modify(|v| v.executor_id = None);
        result
    }

    /// Registers; the session and the server's heartbeat interval. No assignment
    /// comes with a registration, so it grants no lease.
    async fn register(&mut self) -> Result<(Session, Duration)> {
        let registration = self
            .client
            .register(&RegisterRequest {
                name: self.config.name.clone(),
                address: self.config.address.clone(),
                labels: self.config.labels.clone(),
            })
            .await?;
        let id = registration.executor.id;
        self.budget = budget_for(registration.max_heartbeat_bytes);
        info!(id, "registered");
        self.view.send_modify(|v| {
            v.executor_id = Some(id.clone());
            v.registrations += 1;
        });
        let session = Session {
            id,
            token: registration.token,
        };
        Ok((
            session,
            Duration::from_millis(registration.heartbeat_interval_ms.max(1)),
        ))
    }

    /// Takes what the workload said: progress, and confirmed stops.
    fn signal(&mut self, signal: Signal) {
        match signal {
            Signal::Progress(report) => self.outbox.report(report),
            Signal::Stopped(task) => {
                self.running.remove(&task);
            }
        }
    }

    /// Until the workload confirmed the stop of everything it was shown, or the
    /// lease ends (from then on the server may move the work anyway).
    async fn wait_for_stops(&mut self, lease: Option<LeaseClock>) {
        if !self.config.confirm_stops {
            return;
        }
        loop {
            while let Ok(signal) = self.reports.try_recv() {
                self.signal(signal);
            }
            if self.running.is_empty() {
                return;
            }
            tokio::select! {
                signal = self.reports.recv() => match signal {
                    Some(signal) => self.signal(signal),
                    None => return,
                },
                () = until(lease) => {
                    warn!(
                        unconfirmed = self.running.len(),
                        "the lease ended before the workload confirmed every stop; deregistering"
                    );
                    return;
                }
            }
        }
    }

    /// The next heartbeat's body, and its send time (taken before the request: the
    /// lease counts from it).
    fn prepare(&mut self) -> (HeartbeatRequest, LeaseClock) {
        while let Ok(signal) = self.reports.try_recv() {
            self.signal(signal);
        }
        if !self.config.confirm_stops {
            // What left the view is stopped.
            let view = self.view.borrow();
            let shown: HashSet<TaskRef> = view.assignments.iter().map(task_of).collect();
            drop(view);
            self.running.retain(|t| shown.contains(t));
        }
        let stopped = self
            .revoked
            .iter()
            .filter(|t| !self.running.contains(*t))
            .take(MAX_STOPPED_ITEMS)
            .cloned()
            .collect();
        let request = HeartbeatRequest {
            ttl_ms: self.config.ttl.map(|ttl| ttl.as_millis() as u64),
            progress: self.outbox.pack(self.budget),
            stopped,
            generation: self.known.as_ref().map(|(generation, _)| *generation),
        };
        (request, LeaseClock::now())
    }

    /// Takes an acknowledged heartbeat sent at `sent`: its assignments, under a new
    /// lease. An answer that arrives after the lease it grants has ended grants nothing.
    fn take(
        &mut self,
        mut answer: HeartbeatResponse,
        sent: LeaseClock,
        lease: &mut Option<LeaseClock>,
    ) {
        // "Unchanged": the lists of the generation it named still hold.
        match (&self.known, answer.unchanged, answer.generation) {
            (Some((known, assignments)), true, Some(generation)) if *known == generation => {
                answer.assignments = assignments.clone();
                answer.revoked = self.revoked.clone();
            }
            (_, true, _) => {
                // Not the generation it has: take nothing, ask for the lists.
                warn!("the server answered unchanged to an unknown generation; asking again");
                self.known = None;
                return;
            }
            (_, false, Some(generation)) => {
                self.known = Some((generation, answer.assignments.clone()));
            }
            (_, false, None) => self.known = None,
        }
        // Progress of work this executor no longer has at that epoch is stale.
        let current: HashMap<(&str, &str), u64> = answer
            .assignments
            .iter()
            .map(|a| ((a.namespace.as_str(), a.changefeed.as_str()), a.epoch))
            .collect();
        self.outbox.retain(&current);
        self.budget = budget_for(answer.max_heartbeat_bytes);
        for rejected in &answer.rejected {
            warn!(
                changefeed = rejected.changefeed,
                reason = rejected.reason,
                "progress rejected"
            );
        }
        // What the server still holds against this executor: tasks it runs, and
        // tasks taken away whose stop it waits for. Anything else was released.
        let revoked: HashSet<&TaskRef> = answer.revoked.iter().collect();
        let assigned: HashSet<TaskRef> = answer.assignments.iter().map(task_of).collect();
        self.running
            .retain(|t| assigned.contains(t) || revoked.contains(t));
        self.revoked = answer.revoked.clone();
        let ttl = Duration::from_millis(answer.ttl_ms);
        let end = lease_end(sent, ttl, self.config.lease_margin);
        let now = LeaseClock::now();
        if end <= now {
            warn!(
                ttl = ?ttl,
                answered_after = ?now.saturating_duration_since(sent),
                "heartbeat answered after the lease it grants had ended; no work taken"
            );
            lapse(&self.view, lease);
            self.view.send_modify(|v| v.heartbeats += 1);
            return;
        }
        *lease = Some(end);
        // Shown to the workload from now on: running until it confirms a stop.
        self.running.extend(assigned);
        self.view.send_if_modified(|v| {
            // A new lease alone is no change a subscriber must wake for.
            let changed = v.assignments != answer.assignments || v.rejected != answer.rejected;
            v.assignments = answer.assignments;
            v.rejected = answer.rejected;
            v.heartbeats += 1;
            v.lease_until = Some(end.to_tokio());
            changed
        });
    }

    /// `holding`: the heartbeat interval, while a lease is held.
    fn backoff(&self, failures: u32, error: &Error, holding: Option<Duration>) -> Duration {
        let retry_after = match error {
            Error::Api { retry_after, .. } => *retry_after,
            _ => None,
        };
        let jitter = rand::rng().random_range(0.5..=1.0);
        backoff(&self.config, failures, retry_after, jitter, holding)
    }
}

/// Most tasks one heartbeat acknowledges (the server's limit).
const MAX_STOPPED_ITEMS: usize = 10_000;

fn task_of(a: &Assignment) -> TaskRef {
    TaskRef {
        namespace: a.namespace.clone(),
        changefeed: a.changefeed.clone(),
        epoch: a.epoch,
    }
}

/// The longest a lease end is waited for in one timer: tokio's timers run on the
/// monotonic clock, which stops during a suspend; after a resume the lease clock is
/// read again within this, so a lease outlives a suspend by at most this much.
const LEASE_POLL: Duration = Duration::from_millis(200);

/// Waits for the end of `lease` on the lease clock; never, without one.
async fn until(lease: Option<LeaseClock>) {
    let Some(end) = lease else {
        return std::future::pending().await;
    };
    loop {
        let left = end.saturating_duration_since(LeaseClock::now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(LEASE_POLL)).await;
    }
}

/// The lease has ended: stops every assignment (once per lease).
fn lapse(view: &watch::Sender<AgentView>, lease: &mut Option<LeaseClock>) {
    if lease.take().is_none() {
        return;
    }
    let mut stopped = 0;
    view.send_modify(|v| {
        stopped = v.assignments.len();
        v.assignments.clear();
        v.rejected.clear();
        v.lease_until = None;
        v.lease_lapses += 1;
    });
    warn!(
        stopped,
        "lease lapsed: no heartbeat acknowledged within the TTL less the margin; stopped \
         every assignment (the server may give them to another executor) until it answers again"
    );
}

/// The delay after `failures` failures in a row: `min_backoff` doubling up to
/// `max_backoff`, times `jitter` (0.5..=1: a fleet that lost the server together does
/// not come back together), at least the server's `Retry-After` but never above
/// `max_backoff`. While a lease is held (`holding`: the heartbeat interval) never above
/// one interval either: the work it holds is worth a try every interval, and a server
/// that comes back (a failover, a restart) is heard from within one.
fn backoff(
    config: &AgentConfig,
    failures: u32,
    retry_after: Option<Duration>,
    jitter: f64,
    holding: Option<Duration>,
) -> Duration {
    let cap = holding.map_or(config.max_backoff, |interval| {
        config.max_backoff.min(interval)
    });
    let exponent = failures.saturating_sub(1).min(16);
    let base = config.min_backoff.saturating_mul(1 << exponent).min(cap);
    let delay = base.mul_f64(jitter);
    match retry_after {
        Some(after) => delay.max(after).min(cap),
        None => delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_ends_at_the_send_time_plus_the_ttl_less_the_margin() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // Default: 10 % of the TTL, at least 500 ms, at most half the TTL.
        assert_eq!(lease_margin(s(20), None), s(2));
        assert_eq!(lease_margin(s(3), None), ms(500));
        assert_eq!(lease_margin(ms(600), None), ms(300));
        assert_eq!(lease_margin(Duration::ZERO, None), Duration::ZERO);
        // A configured margin, capped the same way.
        assert_eq!(lease_margin(s(20), Some(s(5))), s(5));
        assert_eq!(lease_margin(s(4), Some(s(5))), s(2));
        let sent = LeaseClock::now();
        assert_eq!(lease_end(sent, s(20), None), sent + s(18));
        assert_eq!(lease_end(sent, s(20), Some(ms(100))), sent + ms(19_900));
        assert_eq!(
            lease_end(sent, Duration::ZERO, None),
            sent,
            "no TTL, no lease"
        );
    }

    #[test]
    fn a_long_backoff_still_tries_once_before_the_lease_ends() {
        let s = Duration::from_secs;
        let now = Instant::now();
        let interval = s(1);
        // No lease, or one that outlasts the backoff: the backoff as planned.
        assert_eq!(next_attempt(now, s(8), None, interval), now + s(8));
        assert_eq!(
            next_attempt(now, s(8), Some(now + s(30)), interval),
            now + s(8)
        );
        // The backoff would sleep past the lease: one try an interval before it ends.
        assert_eq!(
            next_attempt(now, s(8), Some(now + s(5)), interval),
            now + s(4)
        );
        // That try failed (or it is too late for one): the backoff again; the loop
        // wakes at the lease end by itself to stop the work.
        assert_eq!(
            next_attempt(now + s(4), s(8), Some(now + s(5)), interval),
            now + s(12)
        );
        assert_eq!(
            next_attempt(now, s(8), Some(now + s(1)), interval),
            now + s(8)
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let config = AgentConfig::new("a", "b"); // 200 ms .. 10 s
        let ms = |failures, retry_after: Option<u64>, jitter| {
            backoff(
                &config,
                failures,
                retry_after.map(Duration::from_millis),
                jitter,
                None,
            )
            .as_millis()
        };
        assert_eq!(ms(1, None, 1.0), 200);
        assert_eq!(ms(2, None, 1.0), 400);
        assert_eq!(ms(3, None, 0.5), 400);
        assert_eq!(ms(7, None, 1.0), 10_000);
        assert_eq!(ms(1000, None, 1.0), 10_000, "no overflow");
        assert_eq!(ms(1, Some(3000), 1.0), 3000, "Retry-After is respected");
        assert_eq!(ms(1, Some(60_000), 1.0), 10_000, "but capped");
    }

    /// While it holds a lease an agent that lost the server keeps trying about
    /// once a heartbeat interval: 0.2 + 0.4 + 0.8 + 1 + 1 ... s, never the 10 s a
    /// long outage would reach, so it is back within an interval of the server.
    #[test]
    fn while_a_lease_is_held_the_backoff_stays_within_one_interval() {
        let config = AgentConfig::new("a", "b");
        let interval = Duration::from_secs(1);
        let delay = |failures, retry_after: Option<u64>| {
            backoff(
                &config,
                failures,
                retry_after.map(Duration::from_millis),
                1.0,
                Some(interval),
            )
        };
        let delays: Vec<u128> = (1..=8).map(|n| delay(n, None).as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1000, 1000, 1000, 1000, 1000]);
        assert_eq!(delay(3, Some(5_000)), interval, "Retry-After capped too");
        // The lease lost: the long backoff again.
        assert_eq!(
            backoff(&config, 8, None, 1.0, None),
            Duration::from_secs(10)
        );
    }
}
