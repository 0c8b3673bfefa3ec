//! `ExecutorRegistry`: the live set of executors: registration, heartbeats,
//! expiry, deregistration and the Online/Offline feed.
//!
//! - An executor is written to SQL before it exists here, and deleted from
//!   SQL after it is gone (in the background, retried); heartbeats never
//!   touch SQL. Liveness uses this server's monotonic clock only.
//! - Deadlines live in a `BTreeSet<(Instant, id)>`: an expiry pass reads only
//!   the overdue prefix, so it costs O(expired), not O(executors).
//! - Mass silence: when more than `mass_expiry_fraction` of at least three
//!   executors are overdue at once, the fault is more likely ours (a stalled
//!   server, a partition on our side) than theirs, so expiry is throttled to
//!   `mass_expiry_rate` per second, like Kubernetes' node lifecycle
//!   controller does on a zone disruption.
//! - The feed: a subscription is the snapshot and a bounded channel of
//!   events, taken in one message, so there is no gap or duplicate between
//!   them. A subscriber whose buffer fills gets a final `Resync` and is cut
//!   off; nobody ever waits for a slow subscriber.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use rand::Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::election::LeaseGuard;
use crate::error_code::ErrorCode;
use crate::labels;
use crate::metrics;
use crate::store::{self, Store, StoredExecutor};

/// An executor id: `<name>-<8 hex digits>`. Shared, not copied, between the
/// map and the deadline index.
pub type ExecutorId = Arc<str>;

/// Registry settings (from `[registry]` in the config file).
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// How often executors are told to heartbeat.
    pub heartbeat_interval: Duration,
    /// TTL of an executor that does not ask for one.
    pub default_ttl: Duration,
    /// Bounds a requested TTL is clamped to.
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// How often overdue executors are looked for.
    pub keepalive_interval: Duration,
    /// After a start (or a failover), how long every executor loaded from SQL
    /// may stay silent before it can expire.
    pub failover_grace: Duration,
    /// Fraction of overdue executors above which expiry is throttled.
    pub mass_expiry_fraction: f64,
    /// Expiries per second while throttled.
    pub mass_expiry_rate: f64,
    /// How long an expired executor's id is remembered (answered with 410).
    pub tombstone_retention: Duration,
    /// At most this many tombstones are kept (oldest dropped first).
    pub max_tombstones: usize,
    /// Events buffered per watch subscriber before it is cut off.
    pub watch_buffer: usize,
    /// Most executors registered at once (registrations in flight count);
    /// beyond it a registration is refused, so a flood cannot grow memory
    /// or the SQL table without bound.
    pub max_executors: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(1),
            default_ttl: Duration::from_secs(5),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(60),
            keepalive_interval: Duration::from_millis(500),
            failover_grace: Duration::from_secs(15),
            mass_expiry_fraction: 0.55,
            mass_expiry_rate: 1.0,
            tombstone_retention: Duration::from_secs(600),
            max_tombstones: 100_000,
            watch_buffer: 1024,
            max_executors: 100_000,
        }
    }
}

/// Limits on what an executor may register with.
pub const MAX_NAME_LEN: usize = 64;
pub const MAX_ADDRESS_LEN: usize = 256;
pub use crate::labels::MAX_LABELS;

/// Why a registry request failed. Each variant has a stable code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The request is malformed (bad name, address or label).
    #[error("{0}")]
    InvalidArgument(String),
    /// No executor has this id (and none had recently).
    #[error("executor {0} is not registered")]
    UnknownExecutor(String),
    /// The executor expired or was deregistered; it must register again.
    #[error("executor {0} expired or was deregistered; register again")]
    TombstoneExecutor(String),
    /// Missing or wrong token.
    #[error("missing or wrong token for executor {0}")]
    Unauthorized(String),
    /// The SQL store failed; nothing was changed. (Shared: one failed batch
    /// insert answers every registration in it.)
    #[error("the metadata store is unavailable: {0}")]
    StoreUnavailable(#[source] Arc<store::Error>),
    /// The registry is still loading executors from SQL.
    #[error("the registry is still loading executors from the metadata store")]
    NotReady,
    /// `max_executors` are registered already.
    #[error("the registry holds its maximum of {0} executors; retry later")]
    Full(usize),
}

impl RegistryError {
    /// The machine-readable code (also a metric label).
    pub fn code(&self) -> ErrorCode {
        match self {
            RegistryError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            RegistryError::UnknownExecutor(_) => ErrorCode::UnknownExecutor,
            RegistryError::TombstoneExecutor(_) => ErrorCode::TombstoneExecutor,
            RegistryError::Unauthorized(_) => ErrorCode::Unauthorized,
            RegistryError::StoreUnavailable(_) => ErrorCode::StoreUnavailable,
            RegistryError::NotReady => ErrorCode::NotReady,
            RegistryError::Full(_) => ErrorCode::RegistryFull,
        }
    }
}

/// Equal when they would answer a request alike: the same code and message (the
/// store's errors have no equality of their own).
impl PartialEq for RegistryError {
    fn eq(&self, other: &Self) -> bool {
        self.code() == other.code() && self.to_string() == other.to_string()
    }
}

impl Eq for RegistryError {}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// Lifecycle of an executor.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorStatus {
    /// Registered (or loaded after a restart), no heartbeat yet.
    Initing,
    /// Heartbeating.
    Running,
    /// Expired or deregistered: gone, remembered for a while.
    Tombstone,
}

impl ExecutorStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorStatus::Initing => "initing",
            ExecutorStatus::Running => "running",
            ExecutorStatus::Tombstone => "tombstone",
        }
    }
}

/// What the outside sees of an executor. Never carries the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ExecutorInfo {
    /// `<name>-<8 hex digits>`.
    pub id: String,
    pub name: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub status: ExecutorStatus,
    /// RFC 3339, UTC.
    #[schema(format = DateTime)]
    pub registered_at: String,
    /// Milliseconds since the last heartbeat; `null` before the first one.
    pub last_heartbeat_ms_ago: Option<u64>,
    pub ttl_ms: u64,
}

/// One live executor. Kept compact (boxed strings, labels as a sorted slice
/// rather than a `BTreeMap`, whose smallest node holds room for 11 pairs):
/// the registry is sized for 100,000 executors.
struct Executor {
    name: Box<str>,
    address: Box<str>,
    labels: Labels,
    token_hash: [u8; 32],
    registered_at: SystemTime,
    status: ExecutorStatus,
    last_heartbeat: Option<Instant>,
    ttl: Duration,
    deadline: Instant,
}

/// Labels in key order.
type Labels = Box<[(Box<str>, Box<str>)]>;

fn compact_labels(labels: BTreeMap<String, String>) -> Labels {
    labels
        .into_iter()
        .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
        .collect()
}

impl Executor {
    fn info(&self, id: &str, now: Instant) -> ExecutorInfo {
        ExecutorInfo {
            id: id.to_owned(),
            name: self.name.to_string(),
            address: self.address.to_string(),
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            status: self.status,
            registered_at: humantime::format_rfc3339_millis(self.registered_at).to_string(),
            last_heartbeat_ms_ago: self
                .last_heartbeat
                .map(|t| now.saturating_duration_since(t).as_millis() as u64),
            ttl_ms: self.ttl.as_millis() as u64,
        }
    }
}

/// Why an executor went offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OfflineReason {
    Expired,
    Deregistered,
}

impl OfflineReason {
    fn as_str(self) -> &'static str {
        match self {
            OfflineReason::Expired => "expired",
            OfflineReason::Deregistered => "deregistered",
        }
    }
}

/// One entry of the feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ExecutorEvent {
    Online {
        seq: u64,
        executor: ExecutorInfo,
    },
    Offline {
        seq: u64,
        id: String,
        reason: OfflineReason,
    },
    /// The subscriber fell behind and was cut off: it must subscribe again
    /// and start from a fresh snapshot. Always the last event of a channel.
    Resync,
}

// ---------------------------------------------------------------- messages

/// Register an executor.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<Registration>")]
pub struct Register {
    pub name: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
}

/// A successful registration. The token is shown here and never again.
#[derive(Debug, Clone)]
pub struct Registration {
    pub executor: ExecutorInfo,
    pub token: String,
    pub heartbeat_interval: Duration,
    pub ttl: Duration,
}

/// A heartbeat from an executor.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<HeartbeatAck>")]
pub struct Heartbeat {
    pub id: String,
    pub token: String,
    /// The TTL the executor asks for; clamped to the configured bounds.
    pub ttl: Option<Duration>,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAck {
    pub ttl: Duration,
    pub heartbeat_interval: Duration,
}

/// Who asks for a deregistration.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The executor itself, with its token.
    Executor { token: String },
    /// An operator holding the admin token (checked by the HTTP layer).
    Admin,
}

/// Remove an executor now (graceful shutdown of the executor, or an
/// operator's decision).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<()>")]
pub struct Deregister {
    pub id: String,
    pub caller: Caller,
}

/// List executors, live ones and remembered tombstones.
#[derive(Message, Debug, Clone, Default)]
#[rtype(result = "Vec<ExecutorInfo>")]
pub struct ListExecutors {
    pub status: Option<ExecutorStatus>,
    /// Every pair must match.
    pub labels: BTreeMap<String, String>,
}

/// One executor by id (a remembered tombstone included).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<ExecutorInfo>")]
pub struct GetExecutor {
    pub id: String,
}

/// Subscribe to the feed.
#[derive(Message, Debug, Clone, Copy, Default)]
#[rtype(result = "Result<Subscription>")]
pub struct Subscribe;

/// A snapshot of the live executors and every event after it.
#[derive(Debug)]
pub struct Subscription {
    pub snapshot: Vec<ExecutorInfo>,
    /// The seq of the last event included in the snapshot.
    pub seq: u64,
    pub events: mpsc::Receiver<ExecutorEvent>,
}

/// Registry counters, for status pages and tests.
#[derive(Message, Debug, Clone, Copy, Default)]
#[rtype(result = "RegistryStats")]
pub struct GetRegistryStats;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    pub loaded: bool,
    pub initing: usize,
    pub running: usize,
    pub tombstones: usize,
    pub subscribers: usize,
    pub pending_store_deletes: usize,
    pub mass_silence: bool,
}

/// Pings the SQL store; the error text when it does not answer.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Result<(), String>")]
pub struct PingStore;

/// Runs one expiry pass now and returns how many executors it expired. The
/// actor runs one every `keepalive_interval` by itself; this is for
/// benchmarks and tests that need a pass at a known moment.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "usize")]
pub struct RunExpiryPass;

/// Stops the registry.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct StopRegistry;

// ------------------------------------------------------------------- actor

/// The registry's tables, shared by the actor and the HTTP workers.
///
/// Heartbeats are the hot path: an HTTP worker refreshes an executor here
/// under one short lock, with no message to the actor and no thread switch.
/// Everything that adds or removes an executor, or talks to subscribers and
/// SQL, stays in the actor; only the actor inserts into or removes from
/// `executors`, so the feed's order is the tables' order.
pub struct ExecutorTable {
    tables: Mutex<Tables>,
    config: RegistryConfig,
    /// `heartbeats_total{outcome="ok"}`, resolved once.
    heartbeats_ok: prometheus::IntCounter,
}

#[derive(Default)]
struct Tables {
    loaded: bool,
    executors: HashMap<ExecutorId, Executor>,
    deadlines: BTreeSet<(Instant, ExecutorId)>,
    tombstones: HashMap<ExecutorId, ExecutorInfo>,
    tombstone_order: VecDeque<(Instant, ExecutorId)>,
    /// Executors in `executors` with status `Running`, kept up to date so
    /// that no pass over all executors is ever needed.
    running: usize,
}

/// Executor counts by status, as of one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    initing: usize,
    running: usize,
    tombstones: usize,
}

impl Tables {
    fn counts(&self) -> Counts {
        Counts {
            initing: self.executors.len() - self.running,
            running: self.running,
            tombstones: self.tombstones.len(),
        }
    }

    fn check(&self, id: &str, token_hash: &[u8; 32]) -> Result<ExecutorId> {
        let Some((key, executor)) = self.executors.get_key_value(id) else {
            if self.tombstones.contains_key(id) {
                return Err(RegistryError::TombstoneExecutor(id.to_owned()));
            }
            return Err(RegistryError::UnknownExecutor(id.to_owned()));
        };
        if !constant_time_eq(token_hash, &executor.token_hash) {
            return Err(RegistryError::Unauthorized(id.to_owned()));
        }
        Ok(key.clone())
    }

    /// Refreshes a live executor; whether it just became `Running`.
    fn heartbeat(&mut self, id: &str, token_hash: &[u8; 32], ttl: Duration) -> Result<bool> {
        if !self.loaded {
            return Err(RegistryError::NotReady);
        }
        let id = self.check(id, token_hash)?;
        let now = Instant::now();
        let executor = self.executors.get_mut(&id).expect("checked above");
        let old = std::mem::replace(&mut executor.deadline, now + ttl);
        executor.ttl = ttl;
        executor.last_heartbeat = Some(now);
        let promoted = executor.status == ExecutorStatus::Initing;
        if promoted {
            executor.status = ExecutorStatus::Running;
            self.running += 1;
        }
        self.deadlines.remove(&(old, id.clone()));
        self.deadlines.insert((now + ttl, id));
        Ok(promoted)
    }

    fn insert(&mut self, id: ExecutorId, executor: Executor) {
        self.deadlines.insert((executor.deadline, id.clone()));
        if let Some(old) = self.executors.insert(id, executor) {
            // Ids are unique (checked before the SQL insert); a reload could
            // only bring the same row twice if SQL did.
            if old.status == ExecutorStatus::Running {
                self.running -= 1;
            }
        }
    }

    /// Removes a live executor and remembers it as a tombstone.
    fn remove(&mut self, id: &ExecutorId, now: Instant) -> bool {
        let Some(executor) = self.executors.remove(id) else {
            return false;
        };
        self.deadlines.remove(&(executor.deadline, id.clone()));
        if executor.status == ExecutorStatus::Running {
            self.running -= 1;
        }
        let mut info = executor.info(id, now);
        info.status = ExecutorStatus::Tombstone;
        self.tombstones.insert(id.clone(), info);
        self.tombstone_order.push_back((now, id.clone()));
        true
    }

    fn forget_old_tombstones(&mut self, now: Instant, config: &RegistryConfig) {
        while let Some((at, id)) = self.tombstone_order.front() {
            let too_old = now.saturating_duration_since(*at) > config.tombstone_retention;
            if !too_old && self.tombstone_order.len() <= config.max_tombstones {
                break;
            }
            self.tombstones.remove(id);
            self.tombstone_order.pop_front();
        }
    }
}

/// An executor's token, hashed (once per request, before any lock is taken):
/// what the tables compare.
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        Self(hash_token(token))
    }
}

impl ExecutorTable {
    fn new(config: RegistryConfig) -> Self {
        Self {
            tables: Mutex::new(Tables::default()),
            config,
            heartbeats_ok: metrics::registry_metrics()
                .heartbeats_total
                .with_label_values(&["ok"]),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // Nothing under this lock can leave the tables half-changed in a way
        // a later reader would misread (a stray deadline of a removed
        // executor is skipped by the expiry pass), so a panic elsewhere while
        // it was held does not make every later heartbeat fail.
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `token` is the token of `id`, a live executor: the errors of
    /// a heartbeat, without refreshing anything. Lets a heartbeat be refused
    /// before its body is read.
    pub fn authenticate(&self, id: &str, token: &TokenHash) -> Result<()> {
        let outcome = {
            let tables = self.lock();
            if tables.loaded {
                tables.check(id, &token.0).map(drop)
            } else {
                Err(RegistryError::NotReady)
            }
        };
        outcome.inspect_err(|e| {
            metrics::registry_metrics()
                .heartbeats_total
                .with_label_values(&[e.code()])
                .inc();
        })
    }

    /// A heartbeat: checks the token and refreshes the executor's deadline.
    /// Called on the HTTP worker's thread; never touches SQL.
    pub fn heartbeat(
        &self,
        id: &str,
        token: &TokenHash,
        ttl: Option<Duration>,
    ) -> Result<HeartbeatAck> {
        let ttl = self.clamp_ttl(ttl);
        let outcome = {
            let mut tables = self.lock();
            tables
                .heartbeat(id, &token.0, ttl)
                .map(|promoted| promoted.then(|| tables.counts()))
        };
        match outcome {
            Ok(promoted) => {
                self.heartbeats_ok.inc();
                if let Some(counts) = promoted {
                    set_gauges(counts);
                }
                Ok(HeartbeatAck {
                    ttl,
                    heartbeat_interval: self.config.heartbeat_interval,
                })
            }
            Err(e) => {
                metrics::registry_metrics()
                    .heartbeats_total
                    .with_label_values(&[e.code()])
                    .inc();
                Err(e)
            }
        }
    }

    fn clamp_ttl(&self, ttl: Option<Duration>) -> Duration {
        ttl.unwrap_or(self.config.default_ttl)
            .clamp(self.config.min_ttl, self.config.max_ttl)
    }
}

fn set_gauges(counts: Counts) {
    let m = &metrics::registry_metrics().executors;
    m.with_label_values(&["initing"]).set(counts.initing as i64);
    m.with_label_values(&["running"]).set(counts.running as i64);
    m.with_label_values(&["tombstone"])
        .set(counts.tombstones as i64);
}

/// A started registry: the actor, and the tables heartbeats are answered
/// from without it.
#[derive(Clone)]
pub struct RegistryHandle {
    pub addr: Addr<ExecutorRegistry>,
    pub table: Arc<ExecutorTable>,
}

pub struct ExecutorRegistry {
    config: RegistryConfig,
    store: Store,
    table: Arc<ExecutorTable>,
    /// Ids being written to SQL by a registration in flight.
    reserved: HashSet<ExecutorId>,
    subscribers: Vec<mpsc::Sender<ExecutorEvent>>,
    seq: u64,
    mass_silence: bool,
    /// Expiry tokens while throttled (a token bucket).
    expiry_tokens: f64,
    last_expiry_pass: Instant,
    pending_deletes: BTreeSet<ExecutorId>,
    deleting: bool,
    /// Registrations waiting for their SQL insert, written a batch per statement
    /// by [`Self::flush_inserts`] (one batch in flight at a time).
    pending_inserts: Vec<PendingInsert>,
    inserting: bool,
    /// Whether this server still holds the leadership it runs under.
    lease: LeaseGuard,
}

impl ExecutorRegistry {
    pub fn new(config: RegistryConfig, store: Store) -> Self {
        Self {
            table: Arc::new(ExecutorTable::new(config.clone())),
            config,
            store,
            reserved: HashSet::new(),
            subscribers: Vec::new(),
            seq: 0,
            mass_silence: false,
            expiry_tokens: 0.0,
            last_expiry_pass: Instant::now(),
            pending_deletes: BTreeSet::new(),
            deleting: false,
            pending_inserts: Vec::new(),
            inserting: false,
            lease: LeaseGuard::always(),
        }
    }

    /// Expires nothing and deletes nothing from SQL once `lease` lapses: a
    /// deposed leader, frozen and woken up, would otherwise find every
    /// executor overdue (they heartbeat to the new leader meanwhile).
    pub fn with_lease_guard(mut self, lease: LeaseGuard) -> Self {
        self.lease = lease;
        self
    }

    /// Starts the actor on the current arbiter.
    pub fn start_with_table(self) -> RegistryHandle {
        let table = self.table.clone();
        RegistryHandle {
            addr: self.start(),
            table,
        }
    }

    fn load(&mut self, ctx: &mut Context<Self>, attempt: u32) {
        let store = self.store.clone();
        ctx.spawn(
            async move { store.load_executors().await }
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(rows) => act.on_loaded(rows),
                    Err(error) => {
                        let delay = Duration::from_millis(200 * u64::from(attempt.min(25) + 1));
                        warn!(%error, ?delay, "loading executors from the store failed; retrying");
                        ctx.run_later(delay, move |act, ctx| act.load(ctx, attempt + 1));
                    }
                }),
        );
    }

    fn on_loaded(&mut self, rows: Vec<StoredExecutor>) {
        let now = Instant::now();
        let deadline = now + self.config.failover_grace;
        let mut tables = self.table.lock();
        for row in rows {
            let Some(token_hash) = decode_hash(&row.token_hash) else {
                warn!(id = %row.id, "stored executor has a malformed token hash; skipped");
                continue;
            };
            tables.insert(
                row.id.into(),
                Executor {
                    name: row.name.into(),
                    address: row.address.into(),
                    labels: compact_labels(row.labels),
                    token_hash,
                    registered_at: UNIX_EPOCH
                        + Duration::from_millis(row.registered_at_ms.max(0) as u64),
                    status: ExecutorStatus::Initing,
                    last_heartbeat: None,
                    ttl: self.config.default_ttl,
                    deadline,
                },
            );
        }
        tables.loaded = true;
        info!(
            executors = tables.executors.len(),
            grace = ?self.config.failover_grace,
            "executor registry loaded from the store"
        );
        set_gauges(tables.counts());
    }

    fn new_id(&self, name: &str) -> ExecutorId {
        let mut rng = rand::rng();
        let tables = self.table.lock();
        loop {
            let id: ExecutorId = format!("{name}-{:08x}", rng.random::<u32>()).into();
            if !tables.executors.contains_key(&id)
                && !self.reserved.contains(&id)
                && !tables.tombstones.contains_key(&id)
            {
                return id;
            }
        }
    }

    fn emit(&mut self, event: impl FnOnce(u64) -> ExecutorEvent) {
        self.seq += 1;
        let event = event(self.seq);
        let before = self.subscribers.len();
        self.subscribers.retain(|tx| {
            if tx.is_closed() {
                return false;
            }
            if tx.capacity() <= 1 {
                // The last slot is kept for this: tell it why it was cut off.
                let _ = tx.try_send(ExecutorEvent::Resync);
                metrics::registry_metrics().watch_disconnects_total.inc();
                warn!("an executor watch subscriber fell behind and was cut off");
                return false;
            }
            tx.try_send(event.clone()).is_ok()
        });
        if self.subscribers.len() != before {
            metrics::registry_metrics()
                .watch_subscribers
                .set(self.subscribers.len() as i64);
        }
    }

    /// Announces a removal: feed, metric, log, SQL delete in the background.
    fn announce_offline(&mut self, id: &ExecutorId, reason: OfflineReason) {
        self.pending_deletes.insert(id.clone());
        metrics::registry_metrics()
            .expiries_total
            .with_label_values(&[reason.as_str()])
            .inc();
        info!(id = %id, reason = reason.as_str(), "executor offline");
        let offline_id = id.to_string();
        self.emit(|seq| ExecutorEvent::Offline {
            seq,
            id: offline_id,
            reason,
        });
    }

    fn expiry_pass(&mut self, ctx: &mut Context<Self>) -> usize {
        if !self.lease.is_valid() {
            return 0;
        }
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last_expiry_pass);
        let mut tables = self.table.lock();
        if !tables.loaded {
            return 0;
        }
        self.last_expiry_pass = now;
        let overdue: Vec<ExecutorId> = tables
            .deadlines
            .iter()
            .take_while(|(deadline, _)| *deadline <= now)
            .map(|(_, id)| id.clone())
            .collect();
        let total = tables.executors.len();
        let mass =
            total >= 3 && overdue.len() as f64 > self.config.mass_expiry_fraction * total as f64;
        if mass != self.mass_silence {
            self.mass_silence = mass;
            metrics::registry_metrics()
                .mass_silence
                .set(i64::from(mass));
            if mass {
                warn!(
                    overdue = overdue.len(),
                    total,
                    rate = self.config.mass_expiry_rate,
                    "mass silence: most executors are overdue at once; throttling expiry"
                );
                self.expiry_tokens = 0.0;
            } else {
                info!("mass silence over; expiring normally");
            }
        }
        let allowed = if mass {
            let burst = self.config.mass_expiry_rate.max(1.0);
            self.expiry_tokens = (self.expiry_tokens
                + self.config.mass_expiry_rate * elapsed.as_secs_f64())
            .min(burst);
            let n = self.expiry_tokens.floor();
            self.expiry_tokens -= n;
            n as usize
        } else {
            usize::MAX
        };
        let mut expired = Vec::new();
        for id in overdue.into_iter().take(allowed) {
            if tables.remove(&id, now) {
                expired.push(id);
            } else {
                // A deadline left behind by a removal a panic cut short.
                tables.deadlines.retain(|(_, other)| *other != id);
            }
        }
        tables.forget_old_tombstones(now, &self.config);
        let counts = tables.counts();
        // Announced after the lock is released: heartbeats need not wait
        // for logging and subscribers.
        drop(tables);
        for id in &expired {
            self.announce_offline(id, OfflineReason::Expired);
        }
        self.flush_deletes(ctx);
        set_gauges(counts);
        expired.len()
    }

    /// Deletes removed executors from SQL, a batch at a time, in the
    /// background; failures stay pending and are retried on a later pass.
    fn flush_deletes(&mut self, ctx: &mut Context<Self>) {
        if self.deleting || self.pending_deletes.is_empty() || !self.lease.is_valid() {
            return;
        }
        self.deleting = true;
        let batch: Vec<ExecutorId> = self.pending_deletes.iter().take(64).cloned().collect();
        let store = self.store.clone();
        ctx.spawn(
            async move {
                let mut done = Vec::new();
                let mut failure = None;
                for id in batch {
                    match store.delete_executor(&id).await {
                        Ok(_) => done.push(id),
                        Err(error) => {
                            failure = Some((id, error));
                            break;
                        }
                    }
                }
                (done, failure)
            }
            .into_actor(self)
            .map(|(done, failure), act, _| {
                act.deleting = false;
                for id in done {
                    act.pending_deletes.remove(&id);
                }
                if let Some((id, error)) = failure {
                    warn!(id = %id, %error, pending = act.pending_deletes.len(), "deleting an executor from the store failed; will retry");
                }
                metrics::registry_metrics()
                    .pending_store_deletes
                    .set(act.pending_deletes.len() as i64);
            }),
        );
    }

    /// Writes waiting registrations to SQL, up to [`store::MAX_INSERT_BATCH`] rows a
    /// statement, one statement at a time: a burst of a thousand registrations costs
    /// a few statements, not a thousand callers queueing for the pool (where the
    /// last of them ran into its acquire timeout and got 503). Each caller learns
    /// its batch's outcome; a batch refused for a duplicate id (a collision with a
    /// row still being deleted) is retried row by row, so only the colliding
    /// registration fails.
    fn flush_inserts(&mut self, ctx: &mut Context<Self>) {
        if self.inserting || self.pending_inserts.is_empty() {
            return;
        }
        self.inserting = true;
        let take = self.pending_inserts.len().min(store::MAX_INSERT_BATCH);
        let batch: Vec<PendingInsert> = self.pending_inserts.drain(..take).collect();
        let store = self.store.clone();
        ctx.spawn(
            async move {
                let rows: Vec<StoredExecutor> = batch.iter().map(|p| p.row.clone()).collect();
                match store.insert_executors(&rows).await {
                    Err(store::Error::Duplicate { .. }) if batch.len() > 1 => {
                        for pending in batch {
                            let outcome = store.insert_executor(&pending.row).await;
                            let _ = pending.done.send(outcome.map_err(Arc::new));
                        }
                    }
                    outcome => {
                        let outcome = outcome.map_err(Arc::new);
                        for pending in batch {
                            let _ = pending.done.send(outcome.clone());
                        }
                    }
                }
            }
            .into_actor(self)
            .map(|(), act, ctx| {
                act.inserting = false;
                act.flush_inserts(ctx);
            }),
        );
    }
}

/// A registration's row waiting for [`ExecutorRegistry::flush_inserts`].
struct PendingInsert {
    row: StoredExecutor,
    done: oneshot::Sender<std::result::Result<(), Arc<store::Error>>>,
}

impl Actor for ExecutorRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
        self.load(ctx, 0);
        ctx.run_interval(self.config.keepalive_interval, |act, ctx| {
            act.expiry_pass(ctx);
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        metrics::registry_metrics().watch_subscribers.set(0);
        info!("executor registry stopped");
    }
}

impl Handler<Register> for ExecutorRegistry {
    // ResponseActFuture, not AtomicResponse: heartbeats keep flowing while a
    // registration waits for SQL; the id is reserved meanwhile.
    type Result = ResponseActFuture<Self, Result<Registration>>;

    fn handle(&mut self, msg: Register, ctx: &mut Self::Context) -> Self::Result {
        let outcome = |r: &Result<Registration>| match r {
            Ok(_) => "ok",
            Err(e) => e.code().as_str(),
        };
        if let Err(error) = validate_registration(&msg) {
            let result = Err(error);
            metrics::registry_metrics()
                .registrations_total
                .with_label_values(&[outcome(&result)])
                .inc();
            return Box::pin(fut::ready(result));
        }
        {
            let tables = self.table.lock();
            if !tables.loaded {
                return Box::pin(fut::ready(Err(RegistryError::NotReady)));
            }
            if tables.executors.len() + self.reserved.len() >= self.config.max_executors {
                let result = Err(RegistryError::Full(self.config.max_executors));
                metrics::registry_metrics()
                    .registrations_total
                    .with_label_values(&[outcome(&result)])
                    .inc();
                return Box::pin(fut::ready(result));
            }
        }
        let id = self.new_id(&msg.name);
        self.reserved.insert(id.clone());
        let token = new_token();
        let token_hash = hash_token(&token);
        let registered_at = SystemTime::now();
        let row = StoredExecutor {
            id: id.to_string(),
            name: msg.name.clone(),
            address: msg.address.clone(),
            labels: msg.labels.clone(),
            token_hash: encode_hash(&token_hash),
            registered_at_ms: registered_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as i64,
        };
        let (done, stored) = oneshot::channel();
        self.pending_inserts.push(PendingInsert { row, done });
        self.flush_inserts(ctx);
        Box::pin(
            // Unanswered only if the actor stopped, and then this never runs.
            stored
                .into_actor(self)
                .map(move |stored, act, _| {
                    act.reserved.remove(&id);
                    let result = match stored {
                        // The batch was dropped unanswered: only if it panicked.
                        Err(_) => Err(RegistryError::NotReady),
                        Ok(Err(error)) => {
                            // A duplicate id (a collision with a row still being
                            // deleted) is as retryable as an outage: 503 either way.
                            warn!(name = %msg.name, %error, "registration failed: the store refused it");
                            Err(RegistryError::StoreUnavailable(error))
                        }
                        Ok(Ok(())) => {
                            let now = Instant::now();
                            let ttl = act.config.default_ttl;
                            let executor = Executor {
                                name: msg.name.into(),
                                address: msg.address.into(),
                                labels: compact_labels(msg.labels),
                                token_hash,
                                registered_at,
                                status: ExecutorStatus::Initing,
                                last_heartbeat: None,
                                ttl,
                                deadline: now + ttl,
                            };
                            let info = executor.info(&id, now);
                            let counts = {
                                let mut tables = act.table.lock();
                                tables.insert(id.clone(), executor);
                                tables.counts()
                            };
                            info!(id = %id, address = %info.address, "executor registered");
                            let online = info.clone();
                            act.emit(|seq| ExecutorEvent::Online {
                                seq,
                                executor: online,
                            });
                            set_gauges(counts);
                            Ok(Registration {
                                executor: info,
                                token,
                                heartbeat_interval: act.config.heartbeat_interval,
                                ttl,
                            })
                        }
                    };
                    metrics::registry_metrics()
                        .registrations_total
                        .with_label_values(&[outcome(&result)])
                        .inc();
                    result
                }),
        )
    }
}

impl Handler<Heartbeat> for ExecutorRegistry {
    type Result = Result<HeartbeatAck>;

    /// The same as [`ExecutorTable::heartbeat`], for callers holding only
    /// the actor's address.
    fn handle(&mut self, msg: Heartbeat, _: &mut Self::Context) -> Self::Result {
        self.table
            .heartbeat(&msg.id, &TokenHash::of(&msg.token), msg.ttl)
    }
}

impl Handler<Deregister> for ExecutorRegistry {
    type Result = Result<()>;

    fn handle(&mut self, msg: Deregister, ctx: &mut Self::Context) -> Self::Result {
        let token_hash = match &msg.caller {
            Caller::Executor { token } => Some(hash_token(token)),
            Caller::Admin => None,
        };
        let mut tables = self.table.lock();
        if !tables.loaded {
            return Err(RegistryError::NotReady);
        }
        let id = match token_hash {
            Some(hash) => tables.check(&msg.id, &hash)?,
            None => match tables.executors.get_key_value(msg.id.as_str()) {
                Some((id, _)) => id.clone(),
                None if tables.tombstones.contains_key(msg.id.as_str()) => {
                    return Err(RegistryError::TombstoneExecutor(msg.id))
                }
                None => return Err(RegistryError::UnknownExecutor(msg.id)),
            },
        };
        tables.remove(&id, Instant::now());
        let counts = tables.counts();
        drop(tables);
        self.announce_offline(&id, OfflineReason::Deregistered);
        self.flush_deletes(ctx);
        set_gauges(counts);
        Ok(())
    }
}

impl Handler<ListExecutors> for ExecutorRegistry {
    type Result = MessageResult<ListExecutors>;

    fn handle(&mut self, msg: ListExecutors, _: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        // Filtered before a view is built: only matching executors are copied.
        let live_matches = |e: &Executor| {
            msg.status.is_none_or(|s| s == e.status)
                && msg.labels.iter().all(|(k, v)| {
                    e.labels
                        .binary_search_by(|(key, _)| key.as_ref().cmp(k.as_str()))
                        .is_ok_and(|i| *e.labels[i].1 == **v)
                })
        };
        let tables = self.table.lock();
        let mut items: Vec<ExecutorInfo> = tables
            .executors
            .iter()
            .filter(|(_, e)| live_matches(e))
            .map(|(id, e)| e.info(id, now))
            .collect();
        if msg.status.is_none_or(|s| s == ExecutorStatus::Tombstone) {
            items.extend(
                tables
                    .tombstones
                    .values()
                    .filter(|i| msg.labels.iter().all(|(k, v)| i.labels.get(k) == Some(v)))
                    .cloned(),
            );
        }
        drop(tables);
        items.sort_by(|a, b| a.id.cmp(&b.id));
        MessageResult(items)
    }
}

impl Handler<GetExecutor> for ExecutorRegistry {
    type Result = Result<ExecutorInfo>;

    fn handle(&mut self, msg: GetExecutor, _: &mut Self::Context) -> Self::Result {
        let tables = self.table.lock();
        if let Some(e) = tables.executors.get(msg.id.as_str()) {
            return Ok(e.info(&msg.id, Instant::now()));
        }
        tables
            .tombstones
            .get(msg.id.as_str())
            .cloned()
            .ok_or(RegistryError::UnknownExecutor(msg.id))
    }
}

impl Handler<Subscribe> for ExecutorRegistry {
    type Result = Result<Subscription>;

    fn handle(&mut self, _: Subscribe, _: &mut Self::Context) -> Self::Result {
        let tables = self.table.lock();
        if !tables.loaded {
            return Err(RegistryError::NotReady);
        }
        let now = Instant::now();
        // Heartbeats never add or remove executors, and only this actor
        // does: the snapshot and `seq` agree.
        let mut snapshot: Vec<ExecutorInfo> = tables
            .executors
            .iter()
            .map(|(id, e)| e.info(id, now))
            .collect();
        drop(tables);
        snapshot.sort_by(|a, b| a.id.cmp(&b.id));
        let (tx, rx) = mpsc::channel(self.config.watch_buffer.max(2));
        self.subscribers.push(tx);
        metrics::registry_metrics()
            .watch_subscribers
            .set(self.subscribers.len() as i64);
        Ok(Subscription {
            snapshot,
            seq: self.seq,
            events: rx,
        })
    }
}

impl Handler<GetRegistryStats> for ExecutorRegistry {
    type Result = MessageResult<GetRegistryStats>;

    fn handle(&mut self, _: GetRegistryStats, _: &mut Self::Context) -> Self::Result {
        let (loaded, counts) = {
            let tables = self.table.lock();
            (tables.loaded, tables.counts())
        };
        MessageResult(RegistryStats {
            loaded,
            initing: counts.initing,
            running: counts.running,
            tombstones: counts.tombstones,
            subscribers: self.subscribers.iter().filter(|s| !s.is_closed()).count(),
            pending_store_deletes: self.pending_deletes.len(),
            mass_silence: self.mass_silence,
        })
    }
}

impl Handler<PingStore> for ExecutorRegistry {
    type Result = ResponseFuture<Result<(), String>>;

    fn handle(&mut self, _: PingStore, _: &mut Self::Context) -> Self::Result {
        let store = self.store.clone();
        Box::pin(async move { store.ping().await.map_err(|e| e.to_string()) })
    }
}

impl Handler<RunExpiryPass> for ExecutorRegistry {
    type Result = usize;

    fn handle(&mut self, _: RunExpiryPass, ctx: &mut Self::Context) -> usize {
        self.expiry_pass(ctx)
    }
}

impl Handler<StopRegistry> for ExecutorRegistry {
    type Result = ();

    fn handle(&mut self, _: StopRegistry, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

// ----------------------------------------------------------------- helpers

fn validate_registration(msg: &Register) -> Result<()> {
    let invalid = |m: String| Err(RegistryError::InvalidArgument(m));
    if msg.name.is_empty() || msg.name.len() > MAX_NAME_LEN || !labels::matches_pattern(&msg.name) {
        return invalid(format!(
            "name {:?} must be 1..{MAX_NAME_LEN} characters of letters, digits, '-' and '.', \
             starting and ending with a letter or digit",
            labels::shorten(&msg.name)
        ));
    }
    if msg.address.trim().is_empty()
        || msg.address.len() > MAX_ADDRESS_LEN
        || msg
            .address
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return invalid(format!(
            "address {:?} must be 1..{MAX_ADDRESS_LEN} characters without spaces",
            labels::shorten(&msg.address)
        ));
    }
    labels::validate_map(&msg.labels, "label").map_err(RegistryError::InvalidArgument)
}

fn new_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    encode_hash(&bytes)
}

fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn encode_hash(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hash(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Compares without an early exit, so the time taken does not tell how many
/// leading bytes matched.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(name: &str, labels: &[(&str, &str)]) -> Register {
        Register {
            name: name.into(),
            address: "127.0.0.1:9000".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn label_rules_follow_tiflow() {
        assert!(validate_registration(&register("exec", &[("zone", "us-east-1")])).is_ok());
        assert!(validate_registration(&register("exec", &[("zone", &"x".repeat(63))])).is_ok());
        assert!(validate_registration(&register("exec", &[("zone", &"x".repeat(64))])).is_err());
        assert!(validate_registration(&register("", &[])).is_err());
        assert!(validate_registration(&register(&"n".repeat(65), &[])).is_err());
        let mut r = register("exec", &[]);
        r.address = " ".into();
        assert!(matches!(
            validate_registration(&r),
            Err(RegistryError::InvalidArgument(_))
        ));
    }

    #[test]
    fn token_hashes_roundtrip_and_compare() {
        let token = new_token();
        assert_eq!(token.len(), 64);
        let hash = hash_token(&token);
        assert_eq!(decode_hash(&encode_hash(&hash)), Some(hash));
        assert!(constant_time_eq(&hash, &hash_token(&token)));
        assert!(!constant_time_eq(&hash, &hash_token("other")));
        assert_eq!(decode_hash("zz"), None);
        assert_eq!(decode_hash(&"g".repeat(64)), None);
    }
}
