//! Changefeed administration for the HTTP API: create, read, list, update,
//! pause, resume and delete changefeeds, directly in etcd.
//!
//! The owner reactor writes the same keys (status, task status and position,
//! and info when it marks a changefeed failed or finished), so nothing here is
//! a blind write: a create must find none of the changefeed's keys, and every
//! other mutation compares the `mod_revision`s it decided on. When a compare
//! fails, the failure branch of the same txn returns the fresh keys and the
//! mutation decides again from them, at most [`MAX_ATTEMPTS`] times, so a
//! request never acts on a state it has not seen.
//!
//! Reads of one changefeed are a single txn of range reads, so the info, the
//! status and the task keys in an answer are from one revision. The executor
//! of a changefeed is found among the task status keys of its namespace
//! (`<p>/<ns>/task/status/<executor>/<id>`: the executor comes first, so there
//! is no prefix of one changefeed's task keys); a read is therefore linear in
//! the number of assignments in the namespace, which are small values.
//!
//! Range reads come in pages of [`PAGE_KEYS`] keys; the pages after the first
//! are read at the first page's revision, so a long listing is still one
//! consistent snapshot and no response nears gRPC's message size limit.

use crate::error_code::ErrorCode;
use crate::labels::shorten;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, KvClient, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::model::{
    is_valid_id, ChangefeedId, ChangefeedInfo, ChangefeedStatus, FeedState, Key, Keys, TaskStatus,
    MAX_ID_LEN,
};

/// Longest sink URI.
pub const MAX_SINK_URI_LEN: usize = 1024;
/// Largest `config`, as encoded JSON.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;
/// Most labels a selector may require (as many as an executor may have).
pub use crate::labels::MAX_LABELS as MAX_SELECTOR_LABELS;
/// Longest selector key or value (the executor label rule).
pub use crate::labels::MAX_LABEL_LEN;
/// Compare failures a mutation absorbs before it answers [`Error::Conflict`].
pub const MAX_ATTEMPTS: usize = 5;
/// Keys per page of a range read.
pub const PAGE_KEYS: i64 = 256;
/// Executors whose task keys (two each) one delete txn removes: with the
/// info, the status and the snapshot's reads it stays under etcd's default
/// `--max-txn-ops` of 128.
const DELETE_EXECUTORS_PER_TXN: usize = 56;
/// Largest etcd response accepted: a page of infos with the largest configs
/// (256 x 64 KiB) fits; tonic's default (4 MiB) would not.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Bits of the logical part of a TiDB-style timestamp (`physical_ms << 18`).
const TSO_LOGICAL_BITS: u32 = 18;

/// Why a changefeed request failed. Each variant has a stable [`Error::code`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field, id, namespace or checkpoint breaks the rules; nothing was written.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such changefeed in that namespace.
    #[error("changefeed {0} does not exist")]
    NotFound(ChangefeedId),
    /// Create found the changefeed's info or status key already there.
    #[error("changefeed {0} already exists")]
    Exists(ChangefeedId),
    /// The operation needs a paused (`stopped`) changefeed.
    #[error("changefeed {id} is {}, not paused: {hint}", .state.as_str())]
    NotPaused {
        id: ChangefeedId,
        state: FeedState,
        hint: &'static str,
    },
    /// The operation does not apply in the changefeed's state (pausing a
    /// failed one, resuming a finished one).
    #[error("cannot {op} changefeed {id}: it is {}", .state.as_str())]
    WrongState {
        id: ChangefeedId,
        state: FeedState,
        op: &'static str,
    },
    /// The changefeed's keys changed under every one of [`MAX_ATTEMPTS`]
    /// compare-and-swaps (the owner or other requests writing them).
    #[error(
        "changefeed {0} kept changing during the request ({MAX_ATTEMPTS} attempts); try again"
    )]
    Conflict(ChangefeedId),
    /// etcd did not answer within the request timeout, or not at all.
    #[error("etcd is unavailable: {0}")]
    Unavailable(String),
    /// etcd answered with an error that retrying will not fix.
    #[error("etcd refused the request: {0}")]
    Etcd(#[source] etcd_client::Error),
    /// A value in etcd is not what flotilla writes (edited by hand, or by an
    /// incompatible version). Nothing was changed; deleting the changefeed
    /// still works, and so does a resume with a checkpoint when only the
    /// status is malformed.
    #[error("the value of {key} in etcd is malformed: {source}; repair the key or delete the changefeed")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The machine-readable code (also a metric label).
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::Exists(_) => ErrorCode::ChangefeedExists,
            Error::NotPaused { .. } => ErrorCode::ChangefeedNotPaused,
            Error::WrongState { .. } => ErrorCode::ChangefeedWrongState,
            Error::Conflict(_) => ErrorCode::Conflict,
            Error::Unavailable(_) => ErrorCode::EtcdUnavailable,
            Error::Etcd(_) => ErrorCode::EtcdError,
            Error::Corrupt { .. } => ErrorCode::CorruptValue,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `POST /api/v1/changefeeds` body.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChangefeed {
    #[schema(pattern = r"^(?!__meta__$)[A-Za-z0-9_-]{1,128}$")]
    pub id: String,
    /// `scheme://...`, at most 1024 bytes, no spaces or control characters
    /// (what `validate_sink_uri` accepts; the schema counts characters).
    #[schema(
        max_length = 1024,
        pattern = r"^[A-Za-z][A-Za-z0-9+.-]*://[^\s\x00-\x1f\x7f-\x9f]*$"
    )]
    pub sink_uri: String,
    /// Absent or 0: now, as a TiDB-style timestamp (unix millis << 18).
    #[serde(default)]
    pub start_ts: Option<u64>,
    /// Absent or 0: runs forever; otherwise greater than `start_ts`.
    #[serde(default)]
    pub target_ts: Option<u64>,
    /// A JSON object of at most 64 KiB; absent: `{}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub config: Option<Value>,
    /// Labels an executor must have (the executor label rules); absent: any
    /// executor.
    #[serde(default)]
    #[schema(value_type = Option<crate::labels::LabelMap>)]
    pub selector: Option<BTreeMap<String, String>>,
}

/// `PUT /api/v1/changefeeds/{id}` body: each field given replaces the stored one.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct UpdateChangefeed {
    #[serde(default)]
    #[schema(
        nullable = false,
        max_length = 1024,
        pattern = r"^[A-Za-z][A-Za-z0-9+.-]*://[^\s\x00-\x1f\x7f-\x9f]*$"
    )]
    pub sink_uri: Option<String>,
    #[serde(default)]
    #[schema(value_type = Object, required = false)]
    pub config: Option<Value>,
    #[serde(default)]
    #[schema(value_type = crate::labels::LabelMap, required = false)]
    pub selector: Option<BTreeMap<String, String>>,
}

/// `POST /api/v1/changefeeds/{id}/resume` body (optional).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeChangefeed {
    /// Resume from here instead of the stored checkpoint.
    #[serde(default)]
    pub checkpoint_ts: Option<u64>,
}

/// A changefeed as the API shows it: its info, its status, and the executor
/// holding its current assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChangefeedView {
    pub namespace: String,
    pub id: String,
    pub sink_uri: String,
    pub start_ts: u64,
    pub target_ts: u64,
    #[schema(value_type = Object)]
    pub config: Value,
    pub selector: BTreeMap<String, String>,
    pub state: FeedState,
    pub checkpoint_ts: u64,
    /// The executor whose assignment carries the current epoch; `None` while
    /// unassigned.
    pub executor: Option<String>,
    pub epoch: u64,
    pub error: Option<String>,
    pub create_time: String,
    /// Why a normal changefeed is not running, as the owner last saw it.
    pub pending_reason: Option<String>,
}

/// A changefeed a listing could not decode; the other changefeeds are listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Unreadable {
    pub id: String,
    pub key: String,
    pub message: String,
}

/// The changefeeds of one namespace, sorted by id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Listing {
    pub items: Vec<ChangefeedView>,
    /// Changefeeds with a malformed info or status value (listed whatever the
    /// state filter: their state cannot be known).
    pub unreadable: Vec<Unreadable>,
}

/// Changefeed administration over one etcd client and cluster prefix.
/// Cloning is cheap (the client is a channel handle).
#[derive(Clone)]
pub struct Changefeeds {
    kv: KvClient,
    keys: Keys,
    timeout: Duration,
}

/// One range read of a request.
enum Read {
    Key(String),
    Prefix { prefix: String, keys_only: bool },
}

impl Read {
    /// The first page.
    fn op(&self) -> TxnOp {
        match self {
            Read::Key(key) => TxnOp::get(key.as_str(), None),
            Read::Prefix { prefix, keys_only } => {
                TxnOp::get(prefix.as_str(), Some(page_options(prefix, *keys_only)))
            }
        }
    }
}

fn page_options(prefix: &str, keys_only: bool) -> GetOptions {
    let options = GetOptions::new()
        .with_range(prefix_end(prefix))
        .with_limit(PAGE_KEYS);
    if keys_only {
        options.with_keys_only()
    } else {
        options
    }
}

/// The end of the range of keys starting with `prefix` (etcd's `--prefix`).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (never one of our prefixes): to the end of the keyspace.
    vec![0]
}

/// One key as read: its value and the revision a later write compares against.
#[derive(Debug, Clone)]
struct Raw {
    key: String,
    value: Vec<u8>,
    mod_revision: i64,
}

impl Raw {
    /// Takes the key/value apart (no copy); `None` for a key that is not UTF-8.
    fn from_kv(kv: KeyValue) -> Option<Raw> {
        let mod_revision = kv.mod_revision();
        let (key, value) = kv.into_key_value();
        Some(Raw {
            key: String::from_utf8(key).ok()?,
            value,
            mod_revision,
        })
    }

    fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        crate::json::from_object(&self.value).map_err(|source| Error::Corrupt {
            key: self.key.clone(),
            source,
        })
    }
}

/// Every key of one changefeed, read at one revision.
#[derive(Debug, Default)]
struct Snapshot {
    info: Option<Raw>,
    status: Option<Raw>,
    /// Task status keys, by executor.
    tasks: BTreeMap<String, Raw>,
    /// Executors holding a task position (read only when deleting).
    positions: BTreeSet<String>,
}

impl Snapshot {
    fn is_empty(&self) -> bool {
        self.info.is_none()
            && self.status.is_none()
            && self.tasks.is_empty()
            && self.positions.is_empty()
    }
}

/// What a mutation decided from a snapshot.
enum Plan {
    /// Already in the requested state: nothing to write.
    Nothing,
    /// Write `ops` if every compare still holds.
    Write {
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
    },
}

impl Changefeeds {
    /// `client` must live on a runtime that outlives its users; `timeout`
    /// bounds every etcd request (then [`Error::Unavailable`]).
    pub fn new(client: etcd_client::Client, keys: Keys, timeout: Duration) -> Self {
        Self {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            keys,
            timeout,
        }
    }

    /// Creates a changefeed in state `normal` with its status at
    /// `checkpoint_ts = start_ts`, epoch 0, in one txn that requires neither
    /// key to exist: a duplicate is [`Error::Exists`] and changes nothing.
    pub async fn create(
        &self,
        namespace: &str,
        request: CreateChangefeed,
    ) -> Result<ChangefeedView> {
        validate_id("namespace", namespace)?;
        validate_id("changefeed id", &request.id)?;
        validate_sink_uri(&request.sink_uri)?;
        let config = validate_config(request.config)?;
        let selector = request.selector.unwrap_or_default();
        validate_selector(&selector)?;
        let start_ts = match request.start_ts {
            None | Some(0) => now_ts(),
            Some(ts) => ts,
        };
        let target_ts = request.target_ts.unwrap_or(0);
        if target_ts != 0 && target_ts <= start_ts {
            return Err(Error::InvalidArgument(format!(
                "target_ts ({target_ts}) must be 0 (run forever) or greater than start_ts ({start_ts})"
            )));
        }
        let cf = ChangefeedId::new(namespace, request.id);
        let info = ChangefeedInfo {
            sink_uri: request.sink_uri,
            start_ts,
            target_ts,
            config,
            selector,
            state: FeedState::Normal,
            error: None,
            create_time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        };
        let status = ChangefeedStatus {
            checkpoint_ts: start_ts,
            ..ChangefeedStatus::default()
        };
        let (info_key, status_key) = (self.keys.info(&cf), self.keys.status(&cf));
        let txn = Txn::new()
            .when([
                Compare::create_revision(info_key.as_str(), CompareOp::Equal, 0),
                Compare::create_revision(status_key.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(info_key, encode(&info), None),
                TxnOp::put(status_key, encode(&status), None),
            ]);
        if !self.txn(txn).await?.succeeded() {
            return Err(Error::Exists(cf));
        }
        Ok(view(&cf, info, Some(status), None))
    }

    /// One changefeed, read at one revision.
    pub async fn get(&self, namespace: &str, id: &str) -> Result<ChangefeedView> {
        let cf = changefeed_id(namespace, id)?;
        let snapshot = self.read(&cf, &self.reads(&cf, false)).await?;
        self.view_of(&cf, &snapshot)
    }

    /// The changefeeds of `namespace` (optionally only those in `state`),
    /// sorted by id, from one consistent read.
    pub async fn list(&self, namespace: &str, state: Option<FeedState>) -> Result<Listing> {
        validate_id("namespace", namespace)?;
        let prefix = |prefix: String| Read::Prefix {
            prefix,
            keys_only: false,
        };
        let reads = [
            prefix(self.keys.infos(namespace)),
            prefix(self.keys.statuses(namespace)),
            prefix(self.keys.task_statuses(namespace)),
        ];
        let response = self
            .txn(Txn::new().and_then(reads.iter().map(Read::op).collect::<Vec<_>>()))
            .await?;
        let kvs = self.collect(&reads, &response, 0).await?;
        let mut infos = BTreeMap::new();
        let mut statuses = BTreeMap::new();
        let mut tasks: BTreeMap<ChangefeedId, BTreeMap<String, Raw>> = BTreeMap::new();
        for kv in kvs {
            let Some(raw) = Raw::from_kv(kv) else {
                continue;
            };
            match self.keys.parse(&raw.key) {
                Some(Key::ChangefeedInfo(cf)) => {
                    infos.insert(cf, raw);
                }
                Some(Key::ChangefeedStatus(cf)) => {
                    statuses.insert(cf, raw);
                }
                Some(Key::TaskStatus {
                    changefeed,
                    executor,
                }) => {
                    tasks.entry(changefeed).or_default().insert(executor, raw);
                }
                _ => {}
            }
        }
        let no_tasks = BTreeMap::new();
        let mut listing = Listing::default();
        for (cf, info) in infos {
            let assigned = tasks.get(&cf).unwrap_or(&no_tasks);
            // Filtered on the info alone: the status and the tasks of a
            // changefeed left out are never decoded.
            let built = info.decode::<ChangefeedInfo>().and_then(|decoded| {
                if state.is_some_and(|state| decoded.state != state) {
                    return Ok(None);
                }
                build_view(&cf, decoded, statuses.get(&cf), assigned).map(Some)
            });
            match built {
                Ok(Some(view)) => listing.items.push(view),
                Ok(None) => {}
                Err(e) => {
                    let key = match &e {
                        Error::Corrupt { key, .. } => key.clone(),
                        _ => info.key.clone(),
                    };
                    tracing::warn!(changefeed = %cf, %key, error = %e, "unreadable changefeed");
                    listing.unreadable.push(Unreadable {
                        id: cf.id,
                        key,
                        message: e.to_string(),
                    });
                }
            }
        }
        Ok(listing)
    }

    /// Replaces the given fields of a paused changefeed (409
    /// [`Error::NotPaused`] otherwise). Fields equal to the stored ones write
    /// nothing.
    pub async fn update(
        &self,
        namespace: &str,
        id: &str,
        request: UpdateChangefeed,
    ) -> Result<ChangefeedView> {
        let cf = changefeed_id(namespace, id)?;
        if request.sink_uri.is_none() && request.config.is_none() && request.selector.is_none() {
            return Err(Error::InvalidArgument(
                "nothing to update: give at least one of sink_uri, config, selector".into(),
            ));
        }
        if let Some(sink_uri) = &request.sink_uri {
            validate_sink_uri(sink_uri)?;
        }
        let config = request.config.map(Some).map(validate_config).transpose()?;
        if let Some(selector) = &request.selector {
            validate_selector(selector)?;
        }
        let info_key = self.keys.info(&cf);
        let snapshot = self
            .mutate(&cf, false, |snapshot| {
                let (raw, mut info) = info_of(&cf, snapshot, false)?;
                if info.state != FeedState::Stopped {
                    return Err(Error::NotPaused {
                        id: cf.clone(),
                        state: info.state,
                        hint: "pause it before updating it",
                    });
                }
                let before = info.clone();
                if let Some(sink_uri) = &request.sink_uri {
                    info.sink_uri.clone_from(sink_uri);
                }
                if let Some(config) = &config {
                    info.config.clone_from(config);
                }
                if let Some(selector) = &request.selector {
                    info.selector.clone_from(selector);
                }
                if info == before {
                    return Ok(Plan::Nothing);
                }
                Ok(Plan::Write {
                    compares: vec![unchanged(&info_key, Some(raw))],
                    ops: vec![TxnOp::put(info_key.as_str(), encode(&info), None)],
                })
            })
            .await?;
        self.view_of(&cf, &snapshot)
    }

    /// `normal` -> `stopped`; already stopped: nothing to do; failed or
    /// finished: [`Error::WrongState`]. The owner unassigns it.
    pub async fn pause(&self, namespace: &str, id: &str) -> Result<ChangefeedView> {
        let cf = changefeed_id(namespace, id)?;
        let info_key = self.keys.info(&cf);
        let snapshot = self
            .mutate(&cf, false, |snapshot| {
                let (raw, mut info) = info_of(&cf, snapshot, false)?;
                match info.state {
                    FeedState::Stopped => Ok(Plan::Nothing),
                    FeedState::Normal => {
                        info.state = FeedState::Stopped;
                        Ok(Plan::Write {
                            compares: vec![unchanged(&info_key, Some(raw))],
                            ops: vec![TxnOp::put(info_key.as_str(), encode(&info), None)],
                        })
                    }
                    state @ (FeedState::Failed | FeedState::Finished) => Err(Error::WrongState {
                        id: cf.clone(),
                        state,
                        op: "pause",
                    }),
                }
            })
            .await?;
        self.view_of(&cf, &snapshot)
    }

    /// `stopped` or `failed` -> `normal`, clearing the error and the retry
    /// count and backoff in the status; with `checkpoint_ts`, the status
    /// checkpoint is rewritten too (it must lie in `[start_ts, target_ts)`).
    /// Both keys are written in one txn that compares both revisions.
    /// Already normal: nothing to do without a checkpoint, 409
    /// [`Error::NotPaused`] with one; finished: [`Error::WrongState`].
    pub async fn resume(
        &self,
        namespace: &str,
        id: &str,
        request: ResumeChangefeed,
    ) -> Result<ChangefeedView> {
        let cf = changefeed_id(namespace, id)?;
        let (info_key, status_key) = (self.keys.info(&cf), self.keys.status(&cf));
        let snapshot = self
            .mutate(&cf, false, |snapshot| {
                let replaced = request.checkpoint_ts.is_some();
                let (raw, mut info) = info_of(&cf, snapshot, replaced)?;
                match (info.state, request.checkpoint_ts) {
                    (FeedState::Normal, None) => return Ok(Plan::Nothing),
                    (FeedState::Normal, Some(_)) => {
                        return Err(Error::NotPaused {
                            id: cf.clone(),
                            state: info.state,
                            hint: "pause it before resuming it from another checkpoint",
                        })
                    }
                    (FeedState::Finished, _) => {
                        return Err(Error::WrongState {
                            id: cf.clone(),
                            state: info.state,
                            op: "resume",
                        })
                    }
                    (FeedState::Stopped | FeedState::Failed, _) => {}
                }
                let mut status = match (&snapshot.status, request.checkpoint_ts) {
                    // A new checkpoint replaces the status, malformed or not.
                    (Some(old), Some(_)) => old.decode().unwrap_or_default(),
                    (Some(old), None) => old.decode::<ChangefeedStatus>()?,
                    (None, _) => ChangefeedStatus {
                        checkpoint_ts: info.start_ts,
                        ..ChangefeedStatus::default()
                    },
                };
                if let Some(checkpoint_ts) = request.checkpoint_ts {
                    if checkpoint_ts < info.start_ts
                        || (info.target_ts != 0 && checkpoint_ts >= info.target_ts)
                    {
                        return Err(Error::InvalidArgument(format!(
                            "checkpoint_ts ({checkpoint_ts}) must be at least start_ts ({}){}",
                            info.start_ts,
                            if info.target_ts == 0 {
                                String::new()
                            } else {
                                format!(" and less than target_ts ({})", info.target_ts)
                            }
                        )));
                    }
                    status.checkpoint_ts = checkpoint_ts;
                }
                status.retries = 0;
                status.retry_after_ms = 0;
                info.state = FeedState::Normal;
                info.error = None;
                Ok(Plan::Write {
                    compares: vec![
                        unchanged(&info_key, Some(raw)),
                        unchanged(&status_key, snapshot.status.as_ref()),
                    ],
                    ops: vec![
                        TxnOp::put(info_key.as_str(), encode(&info), None),
                        TxnOp::put(status_key.as_str(), encode(&status), None),
                    ],
                })
            })
            .await?;
        self.view_of(&cf, &snapshot)
    }

    /// Removes every key of the changefeed (info, status, and each task
    /// status and position) in one txn, guarded by the revisions of the info
    /// and status keys: the owner writes the status whenever it assigns the
    /// changefeed, so a task key created after the read fails the compare
    /// and the delete reads again. Works on malformed values too, and on the
    /// leftovers of a changefeed whose info is gone. [`Error::NotFound`] when
    /// there is no key at all.
    pub async fn delete(&self, namespace: &str, id: &str) -> Result<()> {
        let cf = changefeed_id(namespace, id)?;
        let (info_key, status_key) = (self.keys.info(&cf), self.keys.status(&cf));
        // One txn holds the info, the status and at most
        // DELETE_EXECUTORS_PER_TXN executors' task keys; further txns delete
        // the rest only while the info is still absent, so a changefeed
        // re-created meanwhile keeps its keys.
        let mut first = true;
        loop {
            let after = self
                .mutate(&cf, true, |snapshot| {
                    if first && snapshot.is_empty() {
                        return Err(Error::NotFound(cf.clone()));
                    }
                    if !first && snapshot.info.is_some() {
                        return Ok(Plan::Nothing);
                    }
                    let executors: BTreeSet<&String> = snapshot
                        .tasks
                        .keys()
                        .chain(snapshot.positions.iter())
                        .collect();
                    let mut ops = vec![
                        TxnOp::delete(info_key.as_str(), None),
                        TxnOp::delete(status_key.as_str(), None),
                    ];
                    for executor in executors.into_iter().take(DELETE_EXECUTORS_PER_TXN) {
                        ops.push(TxnOp::delete(self.keys.task_status(&cf, executor), None));
                        ops.push(TxnOp::delete(self.keys.task_position(&cf, executor), None));
                    }
                    Ok(Plan::Write {
                        compares: vec![
                            unchanged(&info_key, snapshot.info.as_ref()),
                            unchanged(&status_key, snapshot.status.as_ref()),
                        ],
                        ops,
                    })
                })
                .await?;
            first = false;
            if after.info.is_some() || (after.tasks.is_empty() && after.positions.is_empty()) {
                return Ok(());
            }
        }
    }

    /// Reads the changefeed, decides with `plan`, and writes under the
    /// plan's compares; on a failed compare decides again from the fresh
    /// keys the failure branch returned. Returns the keys after the write.
    async fn mutate(
        &self,
        cf: &ChangefeedId,
        positions: bool,
        mut plan: impl FnMut(&Snapshot) -> Result<Plan>,
    ) -> Result<Snapshot> {
        let reads = self.reads(cf, positions);
        let read_ops = || reads.iter().map(Read::op).collect::<Vec<_>>();
        let mut snapshot = self.read(cf, &reads).await?;
        for _ in 0..MAX_ATTEMPTS {
            let (compares, mut ops) = match plan(&snapshot)? {
                Plan::Nothing => return Ok(snapshot),
                Plan::Write { compares, ops } => (compares, ops),
            };
            let writes = ops.len();
            // Reads after the writes in one txn see the writes.
            ops.extend(read_ops());
            let txn = Txn::new().when(compares).and_then(ops).or_else(read_ops());
            let response = self.txn(txn).await?;
            let skip = if response.succeeded() { writes } else { 0 };
            let kvs = self.collect(&reads, &response, skip).await?;
            snapshot = self.snapshot(cf, kvs);
            if response.succeeded() {
                return Ok(snapshot);
            }
        }
        Err(Error::Conflict(cf.clone()))
    }

    async fn read(&self, cf: &ChangefeedId, reads: &[Read]) -> Result<Snapshot> {
        let ops: Vec<TxnOp> = reads.iter().map(Read::op).collect();
        let response = self.txn(Txn::new().and_then(ops)).await?;
        let kvs = self.collect(reads, &response, 0).await?;
        Ok(self.snapshot(cf, kvs))
    }

    /// The range reads that make a [`Snapshot`] of `cf`.
    fn reads(&self, cf: &ChangefeedId, positions: bool) -> Vec<Read> {
        let mut reads = vec![
            Read::Key(self.keys.info(cf)),
            Read::Key(self.keys.status(cf)),
            Read::Prefix {
                prefix: self.keys.task_statuses(&cf.namespace),
                keys_only: false,
            },
        ];
        if positions {
            reads.push(Read::Prefix {
                prefix: self.keys.task_positions(&cf.namespace),
                keys_only: true,
            });
        }
        reads
    }

    /// The key-values `reads` found: the first pages are the txn's responses
    /// from index `skip` on; the further pages of a truncated range are read
    /// at the txn's revision, so all belong to one snapshot.
    async fn collect(
        &self,
        reads: &[Read],
        response: &TxnResponse,
        skip: usize,
    ) -> Result<Vec<KeyValue>> {
        let revision = response.header().map_or(0, |h| h.revision());
        // `op_responses` copies every response (etcd-client has no owned
        // accessor); from there on the key/values move, they are not copied.
        let responses = response.op_responses();
        let mut kvs = Vec::new();
        for (read, response) in reads.iter().zip(responses.into_iter().skip(skip)) {
            let TxnOpResponse::Get(mut page) = response else {
                continue;
            };
            kvs.append(&mut page.take_kvs());
            let mut more = page.more();
            while more {
                let (Read::Prefix { prefix, keys_only }, Some(last)) = (read, kvs.last()) else {
                    break;
                };
                let mut after = last.key().to_vec();
                after.push(0);
                let options = page_options(prefix, *keys_only).with_revision(revision);
                let mut page = self.page(after, options).await?;
                kvs.append(&mut page.take_kvs());
                more = page.more();
            }
        }
        Ok(kvs)
    }

    fn snapshot(&self, cf: &ChangefeedId, kvs: Vec<KeyValue>) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for kv in kvs {
            let Some(raw) = Raw::from_kv(kv) else {
                continue;
            };
            match self.keys.parse(&raw.key) {
                Some(Key::ChangefeedInfo(id)) if id == *cf => snapshot.info = Some(raw),
                Some(Key::ChangefeedStatus(id)) if id == *cf => snapshot.status = Some(raw),
                Some(Key::TaskStatus {
                    changefeed,
                    executor,
                }) if changefeed == *cf => {
                    snapshot.tasks.insert(executor, raw);
                }
                Some(Key::TaskPosition {
                    changefeed,
                    executor,
                }) if changefeed == *cf => {
                    snapshot.positions.insert(executor);
                }
                _ => {}
            }
        }
        snapshot
    }

    fn view_of(&self, cf: &ChangefeedId, snapshot: &Snapshot) -> Result<ChangefeedView> {
        let info = snapshot
            .info
            .as_ref()
            .ok_or_else(|| Error::NotFound(cf.clone()))?;
        build_view(
            cf,
            info.decode()?,
            snapshot.status.as_ref(),
            &snapshot.tasks,
        )
    }

    /// One txn, bounded by the request timeout.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let mut kv = self.kv.clone();
        self.bounded(kv.txn(txn)).await
    }

    /// One further page of a range read.
    async fn page(&self, from: Vec<u8>, options: GetOptions) -> Result<etcd_client::GetResponse> {
        let mut kv = self.kv.clone();
        self.bounded(kv.get(from, Some(options))).await
    }

    async fn bounded<T>(
        &self,
        request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) if crate::etcd_errors::is_retryable(&error) => {
                Err(Error::Unavailable(error.to_string()))
            }
            Ok(Err(error)) => Err(Error::Etcd(error)),
            Err(_) => Err(Error::Unavailable(format!(
                "no answer within {}",
                humantime::format_duration(self.timeout)
            ))),
        }
    }
}

/// The changefeed's info, and the raw key to compare against. The status is
/// decoded too, unless `status_replaced`: a mutation must not write when
/// its answer could not be shown, so "500 corrupt_value" means "nothing
/// written".
fn info_of<'a>(
    cf: &ChangefeedId,
    snapshot: &'a Snapshot,
    status_replaced: bool,
) -> Result<(&'a Raw, ChangefeedInfo)> {
    let raw = snapshot
        .info
        .as_ref()
        .ok_or_else(|| Error::NotFound(cf.clone()))?;
    let info = raw.decode()?;
    if !status_replaced {
        if let Some(status) = &snapshot.status {
            status.decode::<ChangefeedStatus>()?;
        }
    }
    Ok((raw, info))
}

/// A compare that holds while `key` is as read (absent: still absent).
fn unchanged(key: &str, read: Option<&Raw>) -> Compare {
    Compare::mod_revision(
        key,
        CompareOp::Equal,
        read.map_or(0, |raw| raw.mod_revision),
    )
}

fn build_view(
    cf: &ChangefeedId,
    info: ChangefeedInfo,
    status: Option<&Raw>,
    tasks: &BTreeMap<String, Raw>,
) -> Result<ChangefeedView> {
    let status: Option<ChangefeedStatus> = status.map(Raw::decode).transpose()?;
    let epoch = status.as_ref().map(|s| s.epoch);
    let executor = epoch.filter(|&e| e > 0).and_then(|epoch| {
        tasks.iter().find_map(|(executor, raw)| {
            // A malformed assignment only hides the executor; the owner
            // reports and replaces it.
            match raw.decode::<TaskStatus>() {
                Ok(task) => (task.epoch == epoch).then(|| executor.clone()),
                Err(e) => {
                    tracing::warn!(changefeed = %cf, error = %e, "malformed task status");
                    None
                }
            }
        })
    });
    Ok(view(cf, info, status, executor))
}

fn view(
    cf: &ChangefeedId,
    info: ChangefeedInfo,
    status: Option<ChangefeedStatus>,
    executor: Option<String>,
) -> ChangefeedView {
    // A changefeed always gets its status with its info; without one (a
    // hand-made key) it has not started yet.
    let status = status.unwrap_or_else(|| ChangefeedStatus {
        checkpoint_ts: info.start_ts,
        ..ChangefeedStatus::default()
    });
    ChangefeedView {
        namespace: cf.namespace.clone(),
        id: cf.id.clone(),
        sink_uri: info.sink_uri,
        start_ts: info.start_ts,
        target_ts: info.target_ts,
        config: info.config,
        selector: info.selector,
        state: info.state,
        checkpoint_ts: status.checkpoint_ts,
        executor,
        epoch: status.epoch,
        error: info.error,
        create_time: info.create_time,
        pending_reason: status.pending_reason,
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Our values have string map keys only: serializing cannot fail.
    serde_json::to_vec(value).expect("changefeed values serialize to JSON")
}

/// Now as a TiDB-style timestamp: unix millis in the physical bits, logical 0.
pub fn now_ts() -> u64 {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    millis << TSO_LOGICAL_BITS
}

/// Parses a `?state=` filter.
pub fn parse_state(s: &str) -> Result<FeedState> {
    FeedState::parse(s).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "state {:?} is not one of normal, stopped, failed, finished",
            shorten(s)
        ))
    })
}

fn changefeed_id(namespace: &str, id: &str) -> Result<ChangefeedId> {
    validate_id("namespace", namespace)?;
    validate_id("changefeed id", id)?;
    Ok(ChangefeedId::new(namespace, id))
}

/// Namespaces and ids: the pattern of [`is_valid_id`].
pub fn validate_id(what: &str, s: &str) -> Result<()> {
    if is_valid_id(s) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "{what} {:?} must be 1..{MAX_ID_LEN} characters, each a letter, a digit, '-' or '_' \
         (and not \"__meta__\")",
        shorten(s)
    )))
}

fn validate_sink_uri(uri: &str) -> Result<()> {
    let invalid = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "sink_uri {:?} {why}",
            shorten(uri)
        )))
    };
    if uri.is_empty() {
        return invalid("must not be empty");
    }
    if uri.len() > MAX_SINK_URI_LEN {
        return invalid(&format!("is longer than {MAX_SINK_URI_LEN} bytes"));
    }
    if uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return invalid("must not contain spaces or control characters");
    }
    // RFC 3986: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
    let scheme_ok = uri.split_once("://").is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    });
    if !scheme_ok {
        return invalid("must start with a scheme, as in kafka://host:9092/topic");
    }
    Ok(())
}

/// `None` -> `{}`; otherwise a JSON object of at most [`MAX_CONFIG_BYTES`].
fn validate_config(config: Option<Value>) -> Result<Value> {
    let config = config.unwrap_or_else(|| Value::Object(Default::default()));
    if !config.is_object() {
        return Err(Error::InvalidArgument(
            "config must be a JSON object".into(),
        ));
    }
    let size = encode(&config).len();
    if size > MAX_CONFIG_BYTES {
        return Err(Error::InvalidArgument(format!(
            "config is {size} bytes as JSON; at most {MAX_CONFIG_BYTES} are allowed"
        )));
    }
    Ok(config)
}

/// The executor label rules ([`crate::labels`]).
fn validate_selector(selector: &BTreeMap<String, String>) -> Result<()> {
    crate::labels::validate_map(selector, "selector").map_err(Error::InvalidArgument)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_uris_need_a_scheme() {
        for good in [
            "kafka://h:9092/t",
            "blackhole://",
            "mysql+ssl://u@h/db",
            "s3://b/p?x=1",
        ] {
            assert!(validate_sink_uri(good).is_ok(), "{good}");
        }
        let long = format!("kafka://{}", "x".repeat(MAX_SINK_URI_LEN));
        for bad in [
            "",
            "kafka",
            "://h",
            "1ka://h",
            "ka fka://h",
            "kafka://a b",
            "k_a://h",
            &long,
        ] {
            assert!(validate_sink_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn selectors_follow_the_label_rules() {
        let sel = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert!(validate_selector(&sel("zone", "us-east.1")).is_ok());
        assert!(validate_selector(&sel(&"k".repeat(63), "v")).is_ok());
        for (k, v) in [
            ("", "v"),
            ("k", ""),
            ("-k", "v"),
            ("k", "v."),
            ("k/x", "v"),
            ("k", "é"),
        ] {
            assert!(validate_selector(&sel(k, v)).is_err(), "{k}={v}");
        }
        assert!(validate_selector(&sel(&"k".repeat(64), "v")).is_err());
        let many: BTreeMap<_, _> = (0..=MAX_SELECTOR_LABELS)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect();
        assert!(validate_selector(&many).is_err());
    }

    #[test]
    fn config_is_an_object_of_bounded_size() {
        assert_eq!(validate_config(None).unwrap(), serde_json::json!({}));
        assert!(validate_config(Some(serde_json::json!({"a": [1, 2]}))).is_ok());
        for bad in [serde_json::json!([1]), serde_json::json!("x"), Value::Null] {
            assert!(validate_config(Some(bad.clone())).is_err(), "{bad}");
        }
        let big = serde_json::json!({ "x": "y".repeat(MAX_CONFIG_BYTES) });
        assert!(validate_config(Some(big)).is_err());
    }

    #[test]
    fn prefix_ends_bound_exactly_the_prefix() {
        assert_eq!(prefix_end("/p/ns/task/status/"), b"/p/ns/task/status0");
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80");
    }

    #[test]
    fn now_is_a_tso_with_a_zero_logical_part() {
        let ts = now_ts();
        assert_eq!(ts & ((1 << TSO_LOGICAL_BITS) - 1), 0);
        let millis = ts >> TSO_LOGICAL_BITS;
        // After 2020 and before 2100.
        assert!(
            millis > 1_577_836_800_000 && millis < 4_102_444_800_000,
            "{millis}"
        );
    }

    #[test]
    fn long_inputs_are_shortened_in_messages() {
        let Err(Error::InvalidArgument(message)) = validate_id("namespace", &"x".repeat(10_000))
        else {
            panic!("a 10000-character namespace is invalid");
        };
        assert!(message.len() < 300, "{message}");
    }
}
