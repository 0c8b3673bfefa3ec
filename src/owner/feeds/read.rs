//! Reads: one changefeed or a namespace's listing, each one consistent read (a txn
//! of range reads, further pages at its revision), and the API's view of a changefeed.

use std::collections::BTreeMap;

use etcd_client::{GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::request::{changefeed_id, validate_id};
use super::{Changefeeds, Error, Result, PAGE_KEYS};
use crate::etcd_range::prefix_end;
use crate::owner::model::{
    ChangefeedId, ChangefeedInfo, ChangefeedStatus, FeedState, Key, Releasing,
};

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
    /// The task taken away from an executor that may still run it: the
    /// changefeed runs nowhere else until that executor acknowledges the stop
    /// or its lease lapses (by `deadline`). `None`: nothing is being released.
    pub releasing: Option<Releasing>,
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

/// One range read of a request.
pub(super) enum Read {
    Key(String),
    Prefix { prefix: String, keys_only: bool },
}

impl Read {
    /// The first page.
    pub(super) fn op(&self) -> TxnOp {
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
        .with_range(prefix_end(prefix.as_bytes()))
        .with_limit(PAGE_KEYS);
    if keys_only {
        options.with_keys_only()
    } else {
        options
    }
}

/// One key as read: its value and the revision a later write compares against.
#[derive(Debug, Clone)]
pub(super) struct Raw {
    pub(super) key: String,
    pub(super) value: Vec<u8>,
    pub(super) mod_revision: i64,
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

    pub(super) fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        crate::json::from_object(&self.value).map_err(|source| Error::Corrupt {
            key: self.key.clone(),
            source,
        })
    }
}

/// The info and status of one changefeed, read at one revision (its task keys
/// are the owner's: the status names the holder).
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    pub(super) info: Option<Raw>,
    pub(super) status: Option<Raw>,
    /// The revision it was read at: a new epoch is above it.
    pub(super) revision: i64,
}

impl Changefeeds {
    /// One changefeed, read at one revision.
    pub async fn get(&self, namespace: &str, id: &str) -> Result<ChangefeedView> {
        let cf = changefeed_id(namespace, id)?;
        let snapshot = self.read(&cf, &self.reads(&cf)).await?;
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
        ];
        let response = self
            .txn(Txn::new().and_then(reads.iter().map(Read::op).collect::<Vec<_>>()))
            .await?;
        let kvs = self.collect(&reads, &response, 0).await?;
        let mut infos = BTreeMap::new();
        let mut statuses = BTreeMap::new();
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
                _ => {}
            }
        }
        let mut listing = Listing::default();
        for (cf, info) in infos {
            // Filtered on the info alone: the status and the tasks of a
            // changefeed left out are never decoded.
            let built = info.decode::<ChangefeedInfo>().and_then(|decoded| {
                if state.is_some_and(|state| decoded.state != state) {
                    return Ok(None);
                }
                build_view(&cf, decoded, statuses.get(&cf)).map(Some)
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

    pub(super) async fn read(&self, cf: &ChangefeedId, reads: &[Read]) -> Result<Snapshot> {
        let ops: Vec<TxnOp> = reads.iter().map(Read::op).collect();
        let response = self.txn(Txn::new().and_then(ops)).await?;
        let kvs = self.collect(reads, &response, 0).await?;
        Ok(self.snapshot(cf, kvs, revision_of(&response)))
    }

    /// The point reads that make a [`Snapshot`] of `cf`: its info and status.
    pub(super) fn reads(&self, cf: &ChangefeedId) -> Vec<Read> {
        vec![
            Read::Key(self.keys.info(cf)),
            Read::Key(self.keys.status(cf)),
        ]
    }

    /// The key-values `reads` found: the first pages are the txn's responses
    /// from index `skip` on; the further pages of a truncated range are read
    /// at the txn's revision, so all belong to one snapshot.
    pub(super) async fn collect(
        &self,
        reads: &[Read],
        response: &TxnResponse,
        skip: usize,
    ) -> Result<Vec<KeyValue>> {
        let revision = revision_of(response);
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

    pub(super) fn snapshot(
        &self,
        cf: &ChangefeedId,
        kvs: Vec<KeyValue>,
        revision: i64,
    ) -> Snapshot {
        let mut snapshot = Snapshot {
            revision,
            ..Snapshot::default()
        };
        for kv in kvs {
            let Some(raw) = Raw::from_kv(kv) else {
                continue;
            };
            match self.keys.parse(&raw.key) {
                Some(Key::ChangefeedInfo(id)) if id == *cf => snapshot.info = Some(raw),
                Some(Key::ChangefeedStatus(id)) if id == *cf => snapshot.status = Some(raw),
                _ => {}
            }
        }
        snapshot
    }

    pub(super) fn view_of(&self, cf: &ChangefeedId, snapshot: &Snapshot) -> Result<ChangefeedView> {
        let info = snapshot
            .info
            .as_ref()
            .ok_or_else(|| Error::NotFound(cf.clone()))?;
        build_view(cf, info.decode()?, snapshot.status.as_ref())
    }
}

/// The view of one changefeed from its info and status alone: the executor is
/// the holder the owner recorded in the status for the current epoch (written
/// in the same txn as the task), so no task key is read.
fn build_view(
    cf: &ChangefeedId,
    info: ChangefeedInfo,
    status: Option<&Raw>,
) -> Result<ChangefeedView> {
    let status: Option<ChangefeedStatus> = status.map(Raw::decode).transpose()?;
    let executor = status
        .as_ref()
        .and_then(ChangefeedStatus::current_holder)
        .map(str::to_owned);
    Ok(view(cf, info, status, executor))
}

pub(super) fn view(
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
        releasing: status.releasing,
    }
}

/// The revision a response was read at.
pub(super) fn revision_of(response: &TxnResponse) -> i64 {
    response.header().map_or(0, |h| h.revision())
}
