//! The leader election: campaigns for the leadership of the cluster through etcd and
//! keeps track of who leads. It is a task (one loop spawned by [`start`], driven
//! through its [`ElectionHandle`]), not an actor: it receives no messages and only
//! sends [`Leadership`] to `LeaderRoles` (`actors::leader`).
//!
//! (One file of about 740 lines on purpose: the campaign is one state machine, and its
//! states, transitions and the lease arithmetic read best side by side.)
//!
//! Each server holds a lease of `session_ttl` and one key under
//! `<prefix>/__meta__/owner/<lease-hex>` whose value is this server's id and
//! advertised address. The key with the lowest create_revision leads (etcd's
//! own election recipe); the others wait behind it. The leader is sent
//! [`Leadership::Elected`] with its fence (its key and create_revision); on
//! losing its lease or its key it is sent [`Leadership::Deposed`] and
//! campaigns again with a new lease.
//!
//! The loop is an explicit state machine ([`ElectionState`], one
//! [`Campaign::step`]):
//!
//! ```text
//!   Grant --lease + key--> Member --lease or key lost--> Grant (after a backoff)
//!     \--error--> Grant (after a backoff)      \--stop--> Stopped
//! ```
//!
//! Stepping down comes first. The lease is counted from when each keep-alive
//! was *sent*, less a margin, so this server believes it lost the lease
//! before etcd can expire it, and so before another server can be elected.
//! [`LeaseGuard`] answers "is my lease still mine?" from the clock alone,
//! for work that must not happen after it lapsed even when this loop is
//! stalled (a frozen process, an unreachable etcd).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, SortOrder, SortTarget, Txn, TxnOp, WatchOptions, WatchStream,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::actors::worker::{Backoff, Fence};
use crate::data_dir::DataDir;
use crate::metrics;

/// Election settings.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// `<prefix>/__meta__/owner/`.
    pub key_prefix: String,
    pub server_id: String,
    pub advertise_addr: String,
    /// TTL of this server's lease.
    pub session_ttl: Duration,
    /// Deadline of one etcd request.
    pub request_timeout: Duration,
    /// This server's locked data dir: the lease of its previous run is
    /// revoked before the first campaign, and each lease is recorded there.
    pub identity: Option<Arc<DataDir>>,
}

/// What a server writes in its election key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Candidate {
    pub server_id: String,
    pub advertise_addr: String,
}

/// A server seen in the election, in create_revision order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Member {
    #[serde(flatten)]
    pub candidate: Candidate,
    /// The election key's lease, in hex (the key's last segment).
    pub lease: String,
    pub create_revision: i64,
}

/// What this server knows of the election.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ElectionView {
    /// The current leader, as last read from etcd.
    pub leader: Option<Member>,
    /// Every server campaigning, the leader first.
    pub members: Vec<Member>,
    /// This server's lease (hex), while it holds one.
    pub lease: Option<String>,
    pub is_leader: bool,
}

/// Tells whether this server's lease is still its own, from the clock: the
/// deadline is pushed forward by each keep-alive answer and reset when
/// leadership ends. Cheap to clone and to check.
#[derive(Debug, Clone)]
pub struct LeaseGuard {
    base: Instant,
    /// Milliseconds after `base`; 0: not valid.
    deadline_ms: Arc<AtomicU64>,
}

impl Default for LeaseGuard {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            deadline_ms: Arc::default(),
        }
    }
}

impl LeaseGuard {
    /// A guard that never lapses (a server that runs without an election).
    pub fn always() -> Self {
        let guard = Self::default();
        guard.deadline_ms.store(u64::MAX, Ordering::Release);
        guard
    }

    pub fn is_valid(&self) -> bool {
        let deadline = self.deadline_ms.load(Ordering::Acquire);
        deadline == u64::MAX || (self.base.elapsed().as_millis() as u64) < deadline
    }

    fn extend_to(&self, deadline: Instant) {
        let ms = deadline.saturating_duration_since(self.base).as_millis() as u64;
        self.deadline_ms.store(ms.max(1), Ordering::Release);
    }

    fn revoke(&self) {
        self.deadline_ms.store(0, Ordering::Release);
    }
}

/// Sent to the leadership's supervisor.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum Leadership {
    /// This server leads; every txn of its worker must carry `fence`.
    /// `revision`: a rewrite of this server's key once it saw no member before
    /// it, so after the deletion of the previous leader's key: every write of
    /// an earlier leader (each fenced on its own key) is below it, and it is a
    /// change of the cluster prefix a standby's watch delivers. A standby
    /// state must reach it before deciding anything.
    Elected {
        fence: Fence,
        guard: LeaseGuard,
        revision: i64,
    },
    /// This server no longer leads: stop leader-only work now.
    Deposed { reason: String },
}

/// Why an etcd request of the campaign failed. Never fatal: the campaign logs it and
/// retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// etcd refused or failed the request.
    #[error("{step}: {source}")]
    Etcd {
        step: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    /// etcd did not answer within `etcd.request_timeout`.
    #[error("{step}: no answer within {timeout:?}")]
    Timeout {
        step: &'static str,
        timeout: Duration,
    },
    /// Our election key was there before we created it (a lease id reused).
    #[error("election key {key} exists already")]
    KeyExists { key: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a membership ended.
#[derive(Debug)]
enum Lost {
    LeaseExpired,
    DeadlinePassed,
    KeyDeleted,
    Etcd(Error),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::LeaseExpired => write!(f, "etcd says the lease expired"),
            Lost::DeadlinePassed => {
                write!(f, "no keep-alive answer before the lease's deadline")
            }
            Lost::KeyDeleted => write!(f, "the election key was deleted"),
            Lost::Etcd(e) => write!(f, "etcd error: {e}"),
        }
    }
}

/// A lease and an election key.
struct Session {
    lease: i64,
    ttl: Duration,
    key: String,
    /// What the key holds (this server's [`Candidate`]).
    value: Vec<u8>,
    create_revision: i64,
    keeper: LeaseKeeper,
    keepalives: LeaseKeepAliveStream,
    /// When each unanswered keep-alive was sent (answers come in order).
    sent: VecDeque<Instant>,
    leading: bool,
}

enum ElectionState {
    Grant { attempt: u32 },
    Member(Box<Session>),
    Stopped,
}

/// A running election. Dropping it does not stop it: call [`Self::resign`].
pub struct ElectionHandle {
    view: watch::Receiver<ElectionView>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<oneshot::Receiver<()>>,
}

impl ElectionHandle {
    /// What this server knows of the election, updated as it changes.
    pub fn view(&self) -> watch::Receiver<ElectionView> {
        self.view.clone()
    }

    /// Steps down (if leading), revokes the lease so that another server
    /// takes over at once, and ends the campaign.
    pub async fn resign(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

/// Starts campaigning on the current actix arbiter. `client` must have been
/// created on this arbiter's runtime.
pub fn start(
    client: Client,
    config: ElectionConfig,
    leadership: Recipient<Leadership>,
) -> ElectionHandle {
    let (view_tx, view) = watch::channel(ElectionView::default());
    let (stop, stop_rx) = oneshot::channel();
    let (done_tx, done) = oneshot::channel();
    let mut campaign = Campaign {
        client,
        config,
        leadership,
        view: view_tx,
        guard: LeaseGuard::default(),
        stop: stop_rx,
        stopping: false,
        backoff: Backoff {
            base: Duration::from_millis(200),
            max: Duration::from_secs(2),
        },
    };
    actix_rt::spawn(async move {
        let mut state = ElectionState::Grant { attempt: 0 };
        loop {
            state = campaign.step(state).await;
            if matches!(state, ElectionState::Stopped) {
                break;
            }
        }
        let _ = done_tx.send(());
    });
    ElectionHandle {
        view,
        stop: Some(stop),
        done: Some(done),
    }
}

struct Campaign {
    client: Client,
    config: ElectionConfig,
    leadership: Recipient<Leadership>,
    view: watch::Sender<ElectionView>,
    guard: LeaseGuard,
    stop: oneshot::Receiver<()>,
    stopping: bool,
    backoff: Backoff,
}

/// Time kept between this server's idea of its lease's end and etcd's.
fn safety_margin(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

impl Campaign {
    async fn step(&mut self, state: ElectionState) -> ElectionState {
        match state {
            ElectionState::Stopped => ElectionState::Stopped,
            ElectionState::Grant { attempt } => {
                if self.stopping || self.stop_requested() {
                    return ElectionState::Stopped;
                }
                let started = Instant::now();
                match self.join().await {
                    Ok(session) => {
                        metrics::election()
                            .campaign_seconds
                            .observe(started.elapsed().as_secs_f64());
                        ElectionState::Member(Box::new(session))
                    }
                    Err(e) => {
                        let delay = self.backoff.delay(attempt);
                        warn!(error = %e, ?delay, "election: cannot join; retrying");
                        if self.sleep_or_stop(delay).await {
                            return ElectionState::Stopped;
                        }
                        ElectionState::Grant {
                            attempt: attempt + 1,
                        }
                    }
                }
            }
            ElectionState::Member(mut session) => {
                let lost = self.serve(&mut session).await;
                self.end(&session, lost.as_ref()).await;
                match lost {
                    None => ElectionState::Stopped,
                    Some(_) => {
                        let delay = self.backoff.delay(0);
                        if self.sleep_or_stop(delay).await {
                            return ElectionState::Stopped;
                        }
                        ElectionState::Grant { attempt: 0 }
                    }
                }
            }
        }
    }

    fn stop_requested(&mut self) -> bool {
        !matches!(
            self.stop.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        )
    }

    /// Sleeps, unless asked to stop first; whether it was.
    async fn sleep_or_stop(&mut self, delay: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = &mut self.stop => { self.stopping = true; true }
        }
    }

    async fn timed<T>(
        &self,
        step: &'static str,
        request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        let timeout = self.config.request_timeout;
        match tokio::time::timeout(timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(Error::Etcd { step, source }),
            Err(_) => Err(Error::Timeout { step, timeout }),
        }
    }

    /// The lease of this server's previous run (its data dir is locked by
    /// this process, so that run is gone): revoked, so that its key goes now
    /// instead of after up to `session_ttl`. Tried once; a lease etcd no
    /// longer knows is fine.
    async fn revoke_previous_run(&mut self) {
        let Some(identity) = &self.config.identity else {
            return;
        };
        let Some(previous) = identity.take_previous_lease() else {
            return;
        };
        match self.revoke(previous).await {
            Ok(()) => info!(
                lease = format!("{previous:x}"),
                "election: revoked the lease of this server's previous run"
            ),
            Err(error) => info!(
                lease = format!("{previous:x}"),
                %error,
                "election: the previous run's lease is gone already"
            ),
        }
    }

    /// A lease and a key under it.
    async fn join(&mut self) -> Result<Session> {
        self.revoke_previous_run().await;
        let mut client = self.client.clone();
        let ttl_secs = self.config.session_ttl.as_secs().max(1) as i64;
        let grant = self
            .timed("lease grant", client.lease_grant(ttl_secs, None))
            .await?;
        let lease = grant.id();
        if let Some(identity) = &self.config.identity {
            if let Err(error) = identity.record_lease(lease) {
                warn!(%error, dir = %identity.path().display(),
                    "election: cannot record the lease in the data dir; a restart will wait for it to expire");
            }
        }
        let sent_at = Instant::now();
        let ttl = Duration::from_secs(grant.ttl().max(1) as u64);
        let key = format!("{}{lease:x}", self.config.key_prefix);
        let value = serde_json::to_vec(&Candidate {
            server_id: self.config.server_id.clone(),
            advertise_addr: self.config.advertise_addr.clone(),
        })
        .expect("a candidate serializes");
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let put = self.timed("election key put", client.txn(txn)).await;
        let put = match put {
            Ok(put) if put.succeeded() => put,
            other => {
                let _ = self.revoke(lease).await;
                return Err(match other {
                    Ok(_) => Error::KeyExists { key },
                    Err(e) => e,
                });
            }
        };
        let create_revision = put.header().map_or(0, |h| h.revision());
        let (keeper, keepalives) = match self
            .timed("lease keep-alive", client.lease_keep_alive(lease))
            .await
        {
            Ok(pair) => pair,
            Err(e) => {
                let _ = self.revoke(lease).await;
                return Err(e);
            }
        };
        info!(key, lease = format!("{lease:x}"), ttl = ?ttl, "election: campaigning");
        self.guard = LeaseGuard::default();
        self.guard.extend_to(sent_at + ttl - safety_margin(ttl));
        Ok(Session {
            lease,
            ttl,
            key,
            value,
            create_revision,
            keeper,
            keepalives,
            sent: VecDeque::new(),
            leading: false,
        })
    }

    /// Keeps the lease alive and follows the election until the session is
    /// lost (`Some`) or a stop is asked for (`None`).
    async fn serve(&mut self, session: &mut Session) -> Option<Lost> {
        // `None` while broken; re-created at the next keep-alive tick.
        let mut events = match self.watch(session.create_revision).await {
            Ok(events) => Some(events),
            Err(e) => return Some(Lost::Etcd(e)),
        };
        if let Err(lost) = self.evaluate(session).await {
            return Some(lost);
        }
        let mut keepalive = tokio::time::interval(session.ttl / 3);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let margin = safety_margin(session.ttl);
        let mut deadline = self.deadline(session, margin);
        let mut broken = false;
        loop {
            tokio::select! {
                _ = &mut self.stop => {
                    self.stopping = true;
                    return None;
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    return Some(Lost::DeadlinePassed);
                }
                _ = keepalive.tick() => {
                    if broken {
                        // The stream to etcd broke (a member restarted, the
                        // connection dropped): open another for the same
                        // lease. Only the lease's deadline ends the session.
                        let mut client = self.client.clone();
                        let reopen = self.timed("lease keep-alive", client.lease_keep_alive(session.lease));
                        match tokio::time::timeout_at(deadline.into(), reopen).await {
                            Ok(Ok((keeper, keepalives))) => {
                                session.keeper = keeper;
                                session.keepalives = keepalives;
                                session.sent.clear();
                                broken = false;
                            }
                            Ok(Err(e)) => {
                                warn!(error = %e, "election: cannot renew the lease yet");
                                continue;
                            }
                            Err(_) => return Some(Lost::DeadlinePassed),
                        }
                    }
                    if events.is_none() {
                        match self.watch(session.create_revision).await {
                            Ok(stream) => {
                                events = Some(stream);
                                if let Err(lost) = self.evaluate(session).await {
                                    return Some(lost);
                                }
                            }
                            Err(e) => warn!(error = %e, "election: cannot watch the members yet"),
                        }
                    }
                    match tokio::time::timeout(self.config.request_timeout, session.keeper.keep_alive()).await {
                        Ok(Ok(())) => session.sent.push_back(Instant::now()),
                        Ok(Err(e)) => {
                            warn!(error = %e, "election: keep-alive failed; reconnecting");
                            broken = true;
                            continue;
                        }
                        Err(_) => {
                            warn!("election: keep-alive stuck; reconnecting");
                            broken = true;
                            continue;
                        }
                    }
                    // Read the members at every tick too, not only on watch
                    // events: a read that failed after the last event (etcd
                    // busy, a member down) would otherwise leave this server
                    // believing another leads while its own key is the
                    // oldest, and nobody would lead until the next event.
                    let read = tokio::time::timeout_at(deadline.into(), self.evaluate(session));
                    match read.await {
                        Ok(Ok(())) => {}
                        Ok(Err(lost)) => return Some(lost),
                        Err(_) => return Some(Lost::DeadlinePassed),
                    }
                }
                answer = session.keepalives.message(), if !broken => match answer {
                    Ok(Some(answer)) => {
                        let sent = session.sent.pop_front().unwrap_or_else(Instant::now);
                        if answer.ttl() <= 0 {
                            return Some(Lost::LeaseExpired);
                        }
                        let ttl = Duration::from_secs(answer.ttl() as u64);
                        self.guard.extend_to(sent + ttl - margin);
                        deadline = self.deadline(session, margin);
                    }
                    Ok(None) | Err(_) => {
                        warn!("election: the keep-alive stream broke; reconnecting");
                        broken = true;
                    }
                },
                event = next_event(&mut events) => {
                    let deleted_ours = match event {
                        Ok(Some(response)) => response.events().iter().any(|e| {
                            e.event_type() == EventType::Delete
                                && e.kv().is_some_and(|kv| kv.key() == session.key.as_bytes())
                        }),
                        Ok(None) | Err(_) => {
                            // The watch broke (etcd restarted, a member went
                            // away): a new one at the next tick, then a
                            // fresh read.
                            warn!("election: the members watch broke; re-creating it");
                            events = None;
                            continue;
                        }
                    };
                    if deleted_ours {
                        return Some(Lost::KeyDeleted);
                    }
                    let read = tokio::time::timeout_at(deadline.into(), self.evaluate(session));
                    match read.await {
                        Ok(Ok(())) => {}
                        Ok(Err(lost)) => return Some(lost),
                        Err(_) => return Some(Lost::DeadlinePassed),
                    }
                }
            }
        }
    }

    fn deadline(&self, session: &Session, margin: Duration) -> Instant {
        let left = self.guard.deadline_ms.load(Ordering::Acquire);
        let by_guard = self.guard.base + Duration::from_millis(left);
        // Never later than one TTL after now, whatever the guard says.
        by_guard.min(Instant::now() + session.ttl - margin)
    }

    async fn watch(&self, from_revision: i64) -> Result<WatchStream> {
        let mut client = self.client.clone();
        self.timed(
            "election watch",
            client.watch(
                self.config.key_prefix.clone(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(from_revision),
                ),
            ),
        )
        .await
    }

    /// Reads the members; tells the supervisor when this server becomes the
    /// leader. A transient read failure is not a loss.
    async fn evaluate(&mut self, session: &mut Session) -> Result<(), Lost> {
        let mut client = self.client.clone();
        // The client balances over every endpoint and may pick a dead member
        // again and again: a read refused at once is retried (each attempt
        // may pick another member); a slow failure is not, so the keep-alive
        // loop is never held up.
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            let started = Instant::now();
            let read = self
                .timed(
                    "election read",
                    client.get(
                        self.config.key_prefix.clone(),
                        Some(
                            GetOptions::new()
                                .with_prefix()
                                .with_sort(SortTarget::Create, SortOrder::Ascend),
                        ),
                    ),
                )
                .await;
            match read {
                Ok(response) => break response,
                Err(_) if attempt < 4 && started.elapsed() < Duration::from_millis(100) => {}
                Err(e) => {
                    warn!(error = %e, attempt, "election: cannot read the members; keeping the last view");
                    return Ok(());
                }
            }
        };
        let members: Vec<Member> = response
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = kv.key_str().ok()?;
                let lease = key.strip_prefix(&self.config.key_prefix)?.to_owned();
                match crate::json::from_object::<Candidate>(kv.value()) {
                    Ok(candidate) => Some(Member {
                        candidate,
                        lease,
                        create_revision: kv.create_revision(),
                    }),
                    Err(e) => {
                        warn!(key, error = %e, "election: a member key holds garbage; ignored");
                        None
                    }
                }
            })
            .collect();
        let ours = members
            .iter()
            .any(|m| m.create_revision == session.create_revision);
        if !ours {
            return Err(Lost::KeyDeleted);
        }
        let leader = response
            .kvs()
            .first()
            .and_then(|kv| {
                members
                    .iter()
                    .find(|m| m.create_revision == kv.create_revision())
            })
            .cloned();
        let leading = leader
            .as_ref()
            .is_some_and(|l| l.create_revision == session.create_revision);
        let view = ElectionView {
            leader,
            members,
            lease: Some(format!("{:x}", session.lease)),
            is_leader: leading,
        };
        if leading && !session.leading {
            // Rewritten (same value, same lease) to learn a revision after
            // the previous leader's key went: its every write is below it,
            // and the watch on the prefix delivers this one.
            let touch = Txn::new()
                .when([Compare::create_revision(
                    session.key.clone(),
                    CompareOp::Equal,
                    session.create_revision,
                )])
                .and_then([TxnOp::put(
                    session.key.clone(),
                    session.value.clone(),
                    Some(PutOptions::new().with_lease(session.lease)),
                )]);
            let revision = match client.txn(touch).await {
                Ok(touched) if touched.succeeded() => touched.header().map_or(0, |h| h.revision()),
                Ok(_) => return Err(Lost::KeyDeleted),
                Err(e) => {
                    warn!(error = %e, "election: cannot confirm the leadership yet; trying again");
                    // Not the leader until confirmed: the view must not say so.
                    self.view.send_replace(ElectionView {
                        is_leader: false,
                        ..view
                    });
                    return Ok(());
                }
            };
            session.leading = true;
            info!(key = session.key, "election: this server is the leader");
            metrics::is_leader().set(1);
            metrics::election().leader_changes_total.inc();
            self.leadership.do_send(Leadership::Elected {
                fence: Fence {
                    key: session.key.clone(),
                    create_revision: session.create_revision,
                },
                guard: self.guard.clone(),
                revision,
            });
        }
        self.view.send_replace(view);
        Ok(())
    }

    /// Ends a session: the supervisor first, then the lease.
    async fn end(&mut self, session: &Session, lost: Option<&Lost>) {
        if session.leading {
            self.guard.revoke();
            metrics::is_leader().set(0);
            let reason = lost.map_or_else(|| "shutdown".to_owned(), ToString::to_string);
            warn!(%reason, "election: this server is no longer the leader");
            self.leadership.do_send(Leadership::Deposed { reason });
        } else if let Some(lost) = lost {
            warn!(reason = %lost, "election: lost the campaign session; campaigning again");
        }
        self.view.send_modify(|v| {
            v.is_leader = false;
            v.lease = None;
            if v.leader
                .as_ref()
                .is_some_and(|l| l.create_revision == session.create_revision)
            {
                v.leader = None;
            }
        });
        // Revoked rather than left to expire: another server can take over
        // at once. A lost lease makes this fail harmlessly.
        let _ = self.revoke(session.lease).await;
        if self.stopping {
            if let Some(identity) = &self.config.identity {
                let _ = identity.clear_lease();
            }
        }
    }

    async fn revoke(&self, lease: i64) -> Result<()> {
        let mut client = self.client.clone();
        self.timed("lease revoke", client.lease_revoke(lease))
            .await
            .map(|_| ())
    }
}

/// The next watch response; never resolves while there is no watch.
async fn next_event(
    events: &mut Option<WatchStream>,
) -> Result<Option<etcd_client::WatchResponse>, etcd_client::Error> {
    match events {
        Some(events) => events.message().await,
        None => std::future::pending().await,
    }
}
