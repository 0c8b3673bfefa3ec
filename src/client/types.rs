//! The JSON shapes of the HTTP API, as a client sees them.
//!
//! These are the client's own types, not the server's: a client must not depend on the
//! actors, and it must keep working against a server that adds fields. So every answer
//! type ignores unknown fields and defaults the optional ones, while every request type
//! sends only what the API accepts (the server rejects unknown fields).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The namespace of requests that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// `POST /api/v1/executors` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RegisterRequest {
    pub name: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
}

/// An executor as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Executor {
    pub id: String,
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `initing`, `running` or `tombstone`.
    pub status: String,
    /// RFC 3339, UTC.
    #[serde(default)]
    pub registered_at: String,
    /// `None` before the first heartbeat.
    #[serde(default)]
    pub last_heartbeat_ms_ago: Option<u64>,
    #[serde(default)]
    pub ttl_ms: u64,
    /// The changefeeds assigned to it, when the server reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changefeeds: Option<Vec<String>>,
}

/// The answer to a registration: the executor, its secret token and its timing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Registration {
    #[serde(flatten)]
    pub executor: Executor,
    /// Proves the caller is this executor (heartbeats, deregistration). Returned once.
    pub token: String,
    pub heartbeat_interval_ms: u64,
    /// The largest heartbeat body the server reads (`None`: a server that
    /// does not say; its limit is then 64 KiB).
    #[serde(default)]
    pub max_heartbeat_bytes: Option<u64>,
}

/// `POST /api/v1/executors/{id}/heartbeat` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HeartbeatRequest {
    /// The TTL to ask for; the server clamps it to its bounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub progress: Vec<Progress>,
    /// Tasks of an earlier answer's `revoked` this executor has stopped (the
    /// workload confirmed it): each releases its changefeed to run elsewhere.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stopped: Vec<TaskRef>,
    /// The `generation` of the last answer whose lists this executor took: while
    /// it is current the answer is `unchanged` and carries no lists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// One task: a changefeed at an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskRef {
    pub namespace: String,
    pub changefeed: String,
    pub epoch: u64,
}

/// Progress of one assignment, as an executor reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub namespace: String,
    pub changefeed: String,
    /// The epoch of the assignment this progress was made under.
    pub epoch: u64,
    pub checkpoint_ts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_ts: Option<u64>,
    /// A failure of the changefeed on this executor: the server unassigns it and retries
    /// later, elsewhere or here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HeartbeatResponse {
    pub ttl_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// The largest heartbeat body the server reads (`None`: not said).
    #[serde(default)]
    pub max_heartbeat_bytes: Option<u64>,
    /// The changefeeds this executor must run; one missing here must be stopped.
    #[serde(default)]
    pub assignments: Vec<Assignment>,
    /// Progress reports the server refused (stale epoch, unknown changefeed).
    #[serde(default)]
    pub rejected: Vec<Rejected>,
    /// Tasks taken away from this executor: stop each, then name it in a later
    /// request's `stopped`; the changefeed runs nowhere else until then (or
    /// until this executor's lease lapses).
    #[serde(default)]
    pub revoked: Vec<TaskRef>,
    /// The generation of `assignments` and `revoked` (`None`: a server that does
    /// not say).
    #[serde(default)]
    pub generation: Option<u64>,
    /// The request's `generation` is current: the lists are left out and the
    /// ones of that generation still hold.
    #[serde(default)]
    pub unchanged: bool,
}

/// A changefeed an executor must run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub namespace: String,
    pub changefeed: String,
    pub epoch: u64,
    pub sink_uri: String,
    #[serde(default)]
    pub config: Value,
    /// Where to resume from.
    pub checkpoint_ts: u64,
}

/// A progress report the server refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub namespace: String,
    pub changefeed: String,
    pub epoch: u64,
    pub reason: String,
}

/// `GET /api/v1/executors` filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecutorFilter {
    /// `initing`, `running` or `tombstone`.
    pub status: Option<String>,
    /// Labels an executor must all have.
    pub labels: BTreeMap<String, String>,
}

/// A listing: `{"items":[...],"total":N}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct List<T> {
    pub items: Vec<T>,
    pub total: usize,
}

/// `POST /api/v1/changefeeds` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CreateChangefeed {
    pub id: String,
    pub sink_uri: String,
    /// Absent: now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_ts: Option<u64>,
    /// Absent: run forever.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_ts: Option<u64>,
    /// A JSON object; absent: `{}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<Value>,
    /// Labels an executor must have to run it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
}

/// `PUT /api/v1/changefeeds/{id}` body: each field given replaces the stored one.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UpdateChangefeed {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink_uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
}

/// A changefeed as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Changefeed {
    pub namespace: String,
    pub id: String,
    pub sink_uri: String,
    #[serde(default)]
    pub start_ts: u64,
    #[serde(default)]
    pub target_ts: u64,
    #[serde(default)]
    pub config: Value,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// `normal`, `stopped`, `failed` or `finished`.
    pub state: String,
    #[serde(default)]
    pub checkpoint_ts: u64,
    /// The executor running it; `None` while unassigned.
    #[serde(default)]
    pub executor: Option<String>,
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub create_time: String,
    /// Why a normal changefeed is not running.
    #[serde(default)]
    pub pending_reason: Option<String>,
    /// The task being taken away from an executor that may still run it.
    #[serde(default)]
    pub releasing: Option<Releasing>,
}

/// A changefeed's task being taken away: it runs nowhere else until `executor`
/// acknowledges the stop or its lease lapses (by `deadline`, RFC 3339).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Releasing {
    pub executor: String,
    pub epoch: u64,
    pub deadline: String,
}

/// `GET /api/v1/changefeeds`: the listing, and the changefeeds that could not be read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChangefeedList {
    pub items: Vec<Changefeed>,
    /// Changefeeds in the namespace when the listing began, before filters.
    pub total: usize,
    #[serde(default)]
    pub unreadable: Vec<Unreadable>,
    /// The next page's token; `None` on the last page.
    #[serde(rename = "continue", default, skip_serializing_if = "Option::is_none")]
    pub continue_token: Option<String>,
}

/// `POST /api/v1/changefeeds:batch`: what was created and what was not.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchCreated {
    pub created: Vec<Changefeed>,
    pub failed: Vec<BatchFailure>,
}

/// One item of a batch that was not created, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchFailure {
    /// Its position in the request.
    pub index: usize,
    pub id: String,
    pub code: String,
    pub message: String,
}

/// Most changefeeds one batch may create.
pub const MAX_BATCH_ITEMS: usize = 1000;

/// Default items per page of a listing (the server's).
pub const DEFAULT_LIST_LIMIT: usize = 500;
/// Most items per page of a listing.
pub const MAX_LIST_LIMIT: usize = 5000;

/// What one page of `GET /api/v1/changefeeds` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListChangefeeds {
    /// Only changefeeds in this state (`normal`, `stopped`, ...).
    pub state: Option<String>,
    /// Only changefeeds whose current assignment this executor holds.
    pub executor: Option<String>,
    /// Items per page; `None`: the server's default ([`DEFAULT_LIST_LIMIT`]).
    pub limit: Option<usize>,
    /// The previous page's `continue_token`.
    pub continue_token: Option<String>,
}

/// A changefeed whose stored value is malformed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unreadable {
    pub id: String,
    pub key: String,
    pub message: String,
}

/// `GET /api/v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub id: String,
    pub version: String,
    #[serde(default)]
    pub cluster_id: String,
    #[serde(default)]
    pub advertise_addr: String,
    pub etcd: EtcdHealth,
    /// `None` on a server without a registry.
    #[serde(default)]
    pub store: Option<StoreHealth>,
    #[serde(default)]
    pub executors: Option<ExecutorCounts>,
    /// The leader election as that server sees it; `None` on a server that
    /// runs none.
    #[serde(default)]
    pub election: Option<ElectionStatus>,
}

/// `election` of [`ServerStatus`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElectionStatus {
    #[serde(default)]
    pub leader: Option<ElectionMember>,
    /// Every server campaigning, the leader first.
    #[serde(default)]
    pub members: Vec<ElectionMember>,
    /// The server's own lease (hex), while it holds one.
    #[serde(default)]
    pub lease: Option<String>,
    #[serde(default)]
    pub is_leader: bool,
}

/// A server in the leader election.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElectionMember {
    pub server_id: String,
    pub advertise_addr: String,
    #[serde(default)]
    pub lease: String,
    #[serde(default)]
    pub create_revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdHealth {
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreHealth {
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorCounts {
    pub loaded: bool,
    pub initing: usize,
    pub running: usize,
    pub tombstone: usize,
    #[serde(default)]
    pub mass_silence: bool,
}

/// One event of `GET /api/v1/executors/watch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Every live executor at `seq`; always the first event.
    Snapshot { seq: u64, executors: Vec<Executor> },
    /// An executor registered.
    Online { seq: u64, executor: Executor },
    /// An executor left: expired or deregistered.
    Offline {
        seq: u64,
        id: String,
        reason: String,
    },
    /// This watcher fell behind; the stream ends after this. Watch again for a fresh
    /// snapshot.
    Resync { reason: String },
}
