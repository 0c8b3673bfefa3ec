//! Reads: one changefeed (a txn of two point reads) or a page of a namespace's
//! listing (range reads at the revision of the listing's first page), and the API's
//! view of a changefeed.

use std::collections::BTreeMap;

use etcd_client::{GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::request::{changefeed_id, validate_id};
use super::{encode, Changefeeds, Error, Result};
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

/// One page of a namespace's changefeeds, sorted by id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Listing {
    pub items: Vec<ChangefeedView>,
    /// Changefeeds with a malformed info or status value (listed whatever the
    /// filters: their state cannot be known).
    pub unreadable: Vec<Unreadable>,
    /// Changefeeds in the namespace at the listing's revision, before any
    /// filter (the same on every page of one listing).
    pub total: usize,
    /// Asks for the next page; `None` on the last one.
    pub continue_token: Option<String>,
}

/// Default `limit` of a listing page.
pub const DEFAULT_LIST_LIMIT: usize = 500;
/// Largest `limit` of a listing page.
pub const MAX_LIST_LIMIT: usize = 5000;
/// A filtered page stops after reading this many times `limit` changefeeds
/// (answering fewer items than `limit`, with a `continue`), so one request's
/// cost stays bounded however few changefeeds match.
const MAX_SCANNED_PAGES: usize = 10;
/// Infos per range read: with the largest configs (64 KiB) an answer stays
/// within the client's decode limit (`MAX_RESPONSE_BYTES`).
const BATCH_KEYS: usize = 500;

/// What a listing page asks for.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    /// Only changefeeds in this state.
    pub state: Option<FeedState>,
    /// Only changefeeds whose current assignment this executor holds.
    pub executor: Option<String>,
    /// Items per page; `None`: [`DEFAULT_LIST_LIMIT`].
    pub limit: Option<usize>,
    /// The `continue_token` of the previous page.
    pub continue_token: Option<String>,
}

/// Where a listing stands, given to the client as an opaque token: the
/// revision every page is read at (one consistent snapshot), the last id
/// answered, and the total counted on the first page.
#[derive(Debug, Serialize, Deserialize)]
struct Cursor {
    v: u8,
    ns: String,
    rev: i64,
    after: String,
    total: usize,
}

impl Cursor {
    fn encode(&self) -> String {
        encode(self).iter().map(|b| format!("{b:02x}")).collect()
    }

    fn decode(token: &str, namespace: &str) -> Result<Cursor> {
        let invalid = |why: &str| {
            Error::InvalidArgument(format!(
                "invalid continue token ({why}): pass the `continue` of the previous page as it was"
            ))
        };
        if !token.len().is_multiple_of(2) || token.len() > 2048 {
            return Err(invalid("not one of ours"));
        }
        let bytes: Option<Vec<u8>> = (0..token.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
            .collect();
        let cursor: Cursor = bytes
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| invalid("not one of ours"))?;
        if cursor.v != 1 {
            return Err(invalid("an unknown version"));
        }
        if cursor.ns != namespace {
            return Err(invalid(&format!(
                "it lists namespace {}, not {namespace}",
                cursor.ns
            )));
        }
        Ok(cursor)
    }
}

/// The point read of `key` in a txn.
pub(super) fn read_op(key: &str) -> TxnOp {
    TxnOp::get(key, None)
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

    /// One page of the changefeeds of `namespace`, sorted by id, filtered
    /// on the server. Every page of one listing is read at the revision of
    /// its first page, so a walk sees each changefeed that existed then
    /// exactly once, whatever is created or deleted meanwhile; a token whose
    /// revision etcd has compacted is [`Error::ExpiredContinue`]. A page reads
    /// the infos after the last one answered and the statuses of the same ids
    /// ([`BATCH_KEYS`] at a time, two range reads each), and stops after
    /// [`MAX_SCANNED_PAGES`] x `limit` of them when a filter leaves few.
    pub async fn list(&self, namespace: &str, options: &ListOptions) -> Result<Listing> {
        validate_id("namespace", namespace)?;
        let limit = options.limit.unwrap_or(DEFAULT_LIST_LIMIT);
        if !(1..=MAX_LIST_LIMIT).contains(&limit) {
            return Err(Error::InvalidArgument(format!(
                "limit must be between 1 and {MAX_LIST_LIMIT}, not {limit}"
            )));
        }
        let cursor = options
            .continue_token
            .as_deref()
            .map(|token| Cursor::decode(token, namespace))
            .transpose()?;
        let infos = self.keys.infos(namespace);
        let statuses = self.keys.statuses(namespace);
        let end = prefix_end(infos.as_bytes());
        let mut revision = cursor.as_ref().map(|c| c.rev);
        let mut after = cursor.as_ref().map(|c| c.after.clone());
        let mut listing = Listing::default();
        let mut more;
        let mut scanned = 0;
        loop {
            let from = match &after {
                Some(id) => format!("{infos}{id}\0"),
                None => infos.clone(),
            };
            let mut range = GetOptions::new()
                .with_range(end.clone())
                .with_limit((limit - listing.items.len()).min(BATCH_KEYS) as i64);
            if let Some(revision) = revision {
                range = range.with_revision(revision);
            }
            let mut page = self.at_revision(from.into_bytes(), range, revision).await?;
            let read_at =
                *revision.get_or_insert_with(|| page.header().map_or(0, |h| h.revision()));
            let batch: Vec<Raw> = page
                .take_kvs()
                .into_iter()
                .filter_map(Raw::from_kv)
                .collect();
            more = page.more();
            let ids: Vec<(ChangefeedId, Raw)> = batch
                .into_iter()
                .filter_map(|raw| match self.keys.parse(&raw.key) {
                    Some(Key::ChangefeedInfo(cf)) => Some((cf, raw)),
                    _ => None,
                })
                .collect();
            let (Some((first, _)), Some((last, _))) = (ids.first(), ids.last()) else {
                more = false;
                break;
            };
            // The statuses of exactly these ids: from the first to the last.
            let status_range = GetOptions::new()
                .with_range(format!("{statuses}{}\0", last.id))
                .with_revision(read_at);
            let status_page = self
                .at_revision(
                    format!("{statuses}{}", first.id).into_bytes(),
                    status_range,
                    Some(read_at),
                )
                .await?;
            let mut status_of: BTreeMap<String, Raw> = BTreeMap::new();
            for raw in status_page.kvs().iter().cloned().filter_map(Raw::from_kv) {
                if let Some(Key::ChangefeedStatus(cf)) = self.keys.parse(&raw.key) {
                    status_of.insert(cf.id, raw);
                }
            }
            after = Some(last.id.clone());
            scanned += ids.len();
            for (cf, info) in ids {
                if let Some(item) = self.list_item(
                    &cf,
                    &info,
                    status_of.get(&cf.id),
                    (options.state, options.executor.as_deref()),
                ) {
                    match item {
                        Ok(view) => listing.items.push(view),
                        Err(bad) => listing.unreadable.push(bad),
                    }
                }
            }
            if listing.items.len() >= limit || !more || scanned >= MAX_SCANNED_PAGES * limit {
                break;
            }
        }
        let revision = revision.unwrap_or(0);
        listing.total = match &cursor {
            Some(cursor) => cursor.total,
            None => self.count(&infos, &end, revision).await?,
        };
        listing.continue_token = match (more, after) {
            (true, Some(after)) => Some(
                Cursor {
                    v: 1,
                    ns: namespace.to_owned(),
                    rev: revision,
                    after,
                    total: listing.total,
                }
                .encode(),
            ),
            _ => None,
        };
        Ok(listing)
    }

    /// One info of a listing page: its view if it passes the filters, or why
    /// it cannot be read.
    fn list_item(
        &self,
        cf: &ChangefeedId,
        info: &Raw,
        status: Option<&Raw>,
        (state, executor): (Option<FeedState>, Option<&str>),
    ) -> Option<Result<ChangefeedView, Unreadable>> {
        // Filtered on the info first: the status of a changefeed left out is
        // never decoded.
        let built = info.decode::<ChangefeedInfo>().and_then(|decoded| {
            if state.is_some_and(|state| decoded.state != state) {
                return Ok(None);
            }
            let view = build_view(cf, decoded, status)?;
            Ok((executor.is_none() || view.executor.as_deref() == executor).then_some(view))
        });
        match built {
            Ok(view) => view.map(Ok),
            Err(e) => {
                let key = match &e {
                    Error::Corrupt { key, .. } => key.clone(),
                    _ => info.key.clone(),
                };
                tracing::warn!(changefeed = %cf, %key, error = %e, "unreadable changefeed");
                Some(Err(Unreadable {
                    id: cf.id.clone(),
                    key,
                    message: e.to_string(),
                }))
            }
        }
    }

    /// A range read at `revision` (`None`: the latest); a revision etcd has
    /// compacted is [`Error::ExpiredContinue`].
    async fn at_revision(
        &self,
        from: Vec<u8>,
        options: GetOptions,
        revision: Option<i64>,
    ) -> Result<etcd_client::GetResponse> {
        match self.page(from, options).await {
            Err(Error::Etcd(e)) if revision.is_some() && crate::etcd_errors::is_compacted(&e) => {
                Err(Error::ExpiredContinue {
                    revision: revision.unwrap_or(0),
                })
            }
            other => other,
        }
    }

    /// The keys in `[prefix, end)` at `revision` (etcd counts them; nothing is sent).
    async fn count(&self, prefix: &str, end: &[u8], revision: i64) -> Result<usize> {
        let options = GetOptions::new()
            .with_range(end.to_vec())
            .with_count_only()
            .with_revision(revision);
        let response = self
            .at_revision(prefix.as_bytes().to_vec(), options, Some(revision))
            .await?;
        Ok(usize::try_from(response.count()).unwrap_or(0))
    }

    pub(super) async fn read(&self, cf: &ChangefeedId, reads: &[String]) -> Result<Snapshot> {
        let ops: Vec<TxnOp> = reads.iter().map(|key| read_op(key)).collect();
        let response = self.txn(Txn::new().and_then(ops)).await?;
        Ok(self.snapshot(cf, collect(&response, 0), revision_of(&response)))
    }

    /// The point reads that make a [`Snapshot`] of `cf`: its info and status.
    pub(super) fn reads(&self, cf: &ChangefeedId) -> Vec<String> {
        vec![self.keys.info(cf), self.keys.status(cf)]
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

/// The key-values a txn's point reads found, from response `skip` on.
pub(super) fn collect(response: &TxnResponse, skip: usize) -> Vec<KeyValue> {
    // `op_responses` copies every response (etcd-client has no owned
    // accessor); from there on the key/values move, they are not copied.
    let mut kvs = Vec::new();
    for response in response.op_responses().into_iter().skip(skip) {
        if let TxnOpResponse::Get(mut page) = response {
            kvs.append(&mut page.take_kvs());
        }
    }
    kvs
}

/// The revision a response was read at.
pub(super) fn revision_of(response: &TxnResponse) -> i64 {
    response.header().map_or(0, |h| h.revision())
}
