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
//!
//! One file per part: `model.rs` (what an executor is, its status and the feed's
//! events), `table.rs` (`ExecutorTable`: the tables and the deadline index, shared
//! with the HTTP workers), `token.rs` (tokens and their hashes), `actor.rs` (the
//! `ExecutorRegistry` actor and its messages), `expiry.rs` (the expiry pass and the
//! mass-silence throttle), `sql.rs` (loading from SQL, batched inserts, background
//! deletes). This file holds the settings, the limits and the error.

use std::sync::Arc;
use std::time::Duration;

use crate::error_code::ErrorCode;
use crate::store;

mod actor;
mod expiry;
mod model;
mod sql;
mod table;
mod token;

pub use actor::{
    Caller, Deregister, ExecutorRegistry, GetExecutor, GetRegistryStats, HeartbeatAck,
    ListExecutors, PingStore, Register, Registration, RegistryHandle, RegistryStats, RunExpiryPass,
    StopRegistry, Subscribe, Subscription,
};
pub use model::{ExecutorEvent, ExecutorInfo, ExecutorStatus, OfflineReason};
pub use table::ExecutorTable;
pub use token::TokenHash;

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
    /// may stay silent before it can expire. At least `max_ttl` + the election's
    /// session TTL keeps the lease rule through a failover (the new leader does not
    /// know the TTLs granted, nor when the old leader last answered).
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
    /// Most clients watching the feed at once (the server's own subscribers
    /// aside): each holds a buffer of `watch_buffer` events and a snapshot.
    pub max_watchers: usize,
    /// Most executors registered at once (registrations in flight count);
    /// beyond it a registration is refused, so a flood cannot grow memory
    /// or the SQL table without bound.
    pub max_executors: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(1),
            // Long enough that an executor's lease (TTL less its margin: 18 s with
            // the agent's default) outlasts a leader failover (about
            // `server.session_ttl`, 10 s) plus a few heartbeats: a failover stops no
            // work. The price: a dead executor's work moves after 20 s.
            default_ttl: Duration::from_secs(20),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(60),
            keepalive_interval: Duration::from_millis(500),
            // At least `max_ttl` + `server.session_ttl` (checked by the config): a new
            // leader knows no executor's TTL, and must not expire one whose lease,
            // granted by the old leader, still holds.
            failover_grace: Duration::from_secs(70),
            mass_expiry_fraction: 0.55,
            mass_expiry_rate: 1.0,
            tombstone_retention: Duration::from_secs(600),
            max_tombstones: 100_000,
            watch_buffer: 1024,
            max_watchers: 256,
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
pub enum Error {
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
    /// `max_watchers` clients watch the feed already.
    #[error("{0} clients watch the executors already (registry.max_watchers); retry later")]
    TooManyWatchers(usize),
}

impl Error {
    /// The machine-readable code (also a metric label).
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Error::UnknownExecutor(_) => ErrorCode::UnknownExecutor,
            Error::TombstoneExecutor(_) => ErrorCode::TombstoneExecutor,
            Error::Unauthorized(_) => ErrorCode::Unauthorized,
            Error::StoreUnavailable(_) => ErrorCode::StoreUnavailable,
            Error::NotReady => ErrorCode::NotReady,
            Error::Full(_) => ErrorCode::RegistryFull,
            Error::TooManyWatchers(_) => ErrorCode::TooManyWatchers,
        }
    }
}

/// Equal when they would answer a request alike: the same code and message (the
/// store's errors have no equality of their own).
impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        self.code() == other.code() && self.to_string() == other.to_string()
    }
}

impl Eq for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;
