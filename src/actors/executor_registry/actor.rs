//! The `ExecutorRegistry` actor and its messages: registration, deregistration,
//! lists, the feed's subscriptions and stats. The expiry pass is in `expiry.rs`,
//! the SQL side in `sql.rs`; heartbeats are answered from the `ExecutorTable`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::model::{
    compact_labels, Executor, ExecutorEvent, ExecutorInfo, ExecutorStatus, OfflineReason,
};
use super::sql::PendingInsert;
use super::table::{set_gauges, ExecutorTable};
use super::token::{encode_hash, hash_token, new_token};
use super::{Error, ExecutorId, RegistryConfig, Result, MAX_ADDRESS_LEN, MAX_NAME_LEN};
use crate::election::LeaseGuard;
use crate::labels;
use crate::metrics;
use crate::store::{self, Store, StoredExecutor};

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
pub struct Subscribe {
    /// A client's watch (`GET /api/v1/executors/watch`): at most
    /// `max_watchers` at once ([`Error::TooManyWatchers`] beyond). The
    /// server's own subscribers (the owner) are not counted.
    pub watcher: bool,
}

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

/// Pings the SQL store; why it does not answer, if it does not.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Result<(), store::Error>")]
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

/// A started registry: the actor, and the tables heartbeats are answered
/// from without it.
#[derive(Clone)]
pub struct RegistryHandle {
    pub addr: Addr<ExecutorRegistry>,
    pub table: Arc<ExecutorTable>,
}

pub struct ExecutorRegistry {
    pub(super) config: RegistryConfig,
    pub(super) store: Store,
    pub(super) table: Arc<ExecutorTable>,
    /// Ids being written to SQL by a registration in flight.
    pub(super) reserved: HashSet<ExecutorId>,
    pub(super) subscribers: Vec<Subscriber>,
    pub(super) seq: u64,
    pub(super) mass_silence: bool,
    /// Expiry tokens while throttled (a token bucket).
    pub(super) expiry_tokens: f64,
    pub(super) last_expiry_pass: Instant,
    pub(super) pending_deletes: BTreeSet<ExecutorId>,
    pub(super) deleting: bool,
    /// Registrations waiting for their SQL insert, written a batch per statement
    /// by [`Self::flush_inserts`] (one batch in flight at a time).
    pub(super) pending_inserts: Vec<PendingInsert>,
    pub(super) inserting: bool,
    /// Whether this server still holds the leadership it runs under.
    pub(super) lease: LeaseGuard,
    /// The table's promotions (first heartbeats), until `started` streams them.
    promoted: Option<mpsc::UnboundedReceiver<ExecutorId>>,
}

/// One subscriber of the feed.
pub(super) struct Subscriber {
    tx: mpsc::Sender<ExecutorEvent>,
    /// A client's watch, counted against `max_watchers`.
    watcher: bool,
}

/// An executor's first heartbeat to this leader, from the table.
struct Promoted(ExecutorId);

impl ExecutorRegistry {
    pub fn new(config: RegistryConfig, store: Store) -> Self {
        let (table, promoted) = ExecutorTable::new(config.clone());
        Self {
            table: Arc::new(table),
            promoted: Some(promoted),
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

    pub(super) fn new_id(&self, name: &str) -> ExecutorId {
        let mut rng = rand::rng();
        let tables = self.table.lock();
        loop {
            let id: ExecutorId = format!("{name}-{:08x}", rng.random::<u32>()).into();
            if !tables.executors.contains_key(&id)
                && !self.reserved.contains(&id)
                && !self.pending_deletes.contains(&id)
                && !tables.tombstones.contains_key(&id)
            {
                return id;
            }
        }
    }

    pub(super) fn emit(&mut self, event: impl FnOnce(u64) -> ExecutorEvent) {
        self.seq += 1;
        let event = event(self.seq);
        let before = self.subscribers.len();
        self.subscribers.retain(|Subscriber { tx, .. }| {
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

    /// Queues the SQL delete of `id`, written in the background by
    /// `flush_deletes` and retried there until it succeeds.
    fn queue_store_delete(&mut self, id: &ExecutorId) {
        self.pending_deletes.insert(id.clone());
        metrics::registry_metrics()
            .pending_store_deletes
            .set(self.pending_deletes.len() as i64);
    }

    /// Announces a removal: feed, metric, log, SQL delete in the background.
    pub(super) fn announce_offline(
        &mut self,
        id: &ExecutorId,
        reason: OfflineReason,
        lease_left: std::time::Duration,
    ) {
        self.queue_store_delete(id);
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
            lease_left,
        });
    }
}

impl Actor for ExecutorRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
        if let Some(promoted) = self.promoted.take() {
            ctx.add_stream(futures::stream::unfold(promoted, |mut rx| async move {
                rx.recv().await.map(|id| (Promoted(id), rx))
            }));
        }
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

/// A promotion is announced as `Online` again, now with status `running`: the
/// owner prefers executors that heartbeat to this leader. One that was removed
/// meanwhile (its `Offline` already sent) is not announced.
impl StreamHandler<Promoted> for ExecutorRegistry {
    fn handle(&mut self, Promoted(id): Promoted, _: &mut Self::Context) {
        let info = {
            let tables = self.table.lock();
            match tables.executors.get(&id) {
                Some(e) if e.status == ExecutorStatus::Running => Some(e.info(&id, Instant::now())),
                _ => None,
            }
        };
        if let Some(executor) = info {
            self.emit(|seq| ExecutorEvent::Online { seq, executor });
        }
    }

    /// The table keeps the sender for as long as the actor lives.
    fn finished(&mut self, _: &mut Self::Context) {}
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
                return Box::pin(fut::ready(Err(Error::NotReady)));
            }
            if tables.executors.len() + self.reserved.len() >= self.config.max_executors {
                let result = Err(Error::Full(self.config.max_executors));
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
                        Err(_) => Err(Error::NotReady),
                        Ok(Err(error)) => {
                            // A duplicate id (a collision with a row still being
                            // deleted) is as retryable as an outage: 503 either way.
                            warn!(name = %msg.name, %error, "registration failed: the store refused it");
                            // Whether the row was written is unknown (a timeout
                            // after the commit): it is deleted in the background,
                            // so no failed registration leaves a row a later
                            // leader would load. A duplicate is someone else's row.
                            if !matches!(*error, store::Error::Duplicate { .. }) {
                                act.queue_store_delete(&id);
                            }
                            Err(Error::StoreUnavailable(error))
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

impl Handler<Deregister> for ExecutorRegistry {
    type Result = Result<()>;

    fn handle(&mut self, msg: Deregister, ctx: &mut Self::Context) -> Self::Result {
        let token_hash = match &msg.caller {
            Caller::Executor { token } => Some(hash_token(token)),
            Caller::Admin => None,
        };
        let mut tables = self.table.lock();
        if !tables.loaded {
            return Err(Error::NotReady);
        }
        let id = match token_hash {
            Some(hash) => tables.check(&msg.id, &hash)?,
            None => match tables.executors.get_key_value(msg.id.as_str()) {
                Some((id, _)) => id.clone(),
                None if tables.tombstones.contains_key(msg.id.as_str()) => {
                    return Err(Error::TombstoneExecutor(msg.id))
                }
                None => return Err(Error::UnknownExecutor(msg.id)),
            },
        };
        let now = Instant::now();
        // Deregistered by an operator, the executor may run on until its lease
        // lapses (the TTL after its last heartbeat: its deadline here); by
        // itself, it stopped its work before asking (the agent does), which
        // acknowledges every stop at once.
        let lease_left = match token_hash {
            Some(_) => std::time::Duration::ZERO,
            None => tables
                .executors
                .get(&id)
                .map_or(std::time::Duration::ZERO, |e| {
                    e.deadline.saturating_duration_since(now)
                }),
        };
        tables.remove(&id, now);
        let counts = tables.counts();
        drop(tables);
        self.announce_offline(&id, OfflineReason::Deregistered, lease_left);
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
            .ok_or(Error::UnknownExecutor(msg.id))
    }
}

impl Handler<Subscribe> for ExecutorRegistry {
    type Result = Result<Subscription>;

    fn handle(&mut self, msg: Subscribe, _: &mut Self::Context) -> Self::Result {
        if msg.watcher {
            self.subscribers.retain(|s| !s.tx.is_closed());
            metrics::registry_metrics()
                .watch_subscribers
                .set(self.subscribers.len() as i64);
            let watchers = self.subscribers.iter().filter(|s| s.watcher).count();
            if watchers >= self.config.max_watchers {
                return Err(Error::TooManyWatchers(self.config.max_watchers));
            }
        }
        let tables = self.table.lock();
        if !tables.loaded {
            return Err(Error::NotReady);
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
        self.subscribers.push(Subscriber {
            tx,
            watcher: msg.watcher,
        });
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
            subscribers: self
                .subscribers
                .iter()
                .filter(|s| !s.tx.is_closed())
                .count(),
            pending_store_deletes: self.pending_deletes.len(),
            mass_silence: self.mass_silence,
        })
    }
}

impl Handler<PingStore> for ExecutorRegistry {
    type Result = ResponseFuture<Result<(), store::Error>>;

    fn handle(&mut self, _: PingStore, _: &mut Self::Context) -> Self::Result {
        let store = self.store.clone();
        Box::pin(async move { store.ping().await })
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

pub(super) fn validate_registration(msg: &Register) -> Result<()> {
    let invalid = |m: String| Err(Error::InvalidArgument(m));
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
    labels::validate_map(&msg.labels, "label").map_err(Error::InvalidArgument)
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
            Err(Error::InvalidArgument(_))
        ));
    }
}
