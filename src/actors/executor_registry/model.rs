//! What the registry knows of an executor: its status, the compact record the
//! tables keep, what the API shows of it, and the events of the feed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

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
pub(super) struct Executor {
    pub(super) name: Box<str>,
    pub(super) address: Box<str>,
    pub(super) labels: Labels,
    pub(super) token_hash: [u8; 32],
    pub(super) registered_at: SystemTime,
    pub(super) status: ExecutorStatus,
    pub(super) last_heartbeat: Option<Instant>,
    pub(super) ttl: Duration,
    pub(super) deadline: Instant,
}

/// Labels in key order.
pub(super) type Labels = Box<[(Box<str>, Box<str>)]>;

pub(super) fn compact_labels(labels: BTreeMap<String, String>) -> Labels {
    labels
        .into_iter()
        .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
        .collect()
}

impl Executor {
    pub(super) fn info(&self, id: &str, now: Instant) -> ExecutorInfo {
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
    pub(super) fn as_str(self) -> &'static str {
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
        /// How long the executor's lease may still run (zero for an expiry, or
        /// for an executor that deregistered itself: it stopped its work first);
        /// the owner releases its changefeeds no earlier.
        #[serde(skip)]
        lease_left: std::time::Duration,
    },
    /// The subscriber fell behind and was cut off: it must subscribe again
    /// and start from a fresh snapshot. Always the last event of a channel.
    Resync,
}
