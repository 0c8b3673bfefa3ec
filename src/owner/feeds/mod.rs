//! Changefeed administration for the HTTP API: create, read, list, update,
//! pause, resume and delete changefeeds, directly in etcd.
//!
//! This module holds [`Changefeeds`] (its etcd client and the request bound), the
//! limits and the [`Error`]; `request` the request bodies and their validation,
//! `read` the reads and the API's view of a changefeed, `mutate` the writes.
//!
//! The owner reactor writes the same keys (status, task status and position,
//! and info when it marks a changefeed failed or finished), so nothing here is
//! a blind write: a create must find none of the changefeed's keys, and every
//! other mutation compares the `mod_revision`s it decided on. When a compare
//! fails, the failure branch of the same txn returns the fresh keys and the
//! mutation decides again from them, at most [`MAX_ATTEMPTS`] times, so a
//! request never acts on a state it has not seen.
//!
//! Reads of one changefeed are a single txn of two point reads, its info and its
//! status, so an answer is from one revision and costs the same whatever the
//! number of changefeeds: the executor is the holder the owner records in the
//! status with each assignment (in the same txn as the task key), so no task key
//! is read. Task keys are the owner's to write and delete (a delete through the
//! API leaves them to be released). A listing reads the namespace's infos and
//! statuses a page at a time (`limit`, `continue`, Kubernetes-style), every page at
//! the revision of the first, so a walk is one consistent snapshot and no response
//! nears gRPC's message size limit.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use etcd_client::{GetOptions, KvClient, Txn, TxnResponse};
use serde::Serialize;

use super::model::{ChangefeedId, FeedState, Keys};
use crate::error_code::ErrorCode;

mod batch;
mod group;
mod mutate;
mod read;
mod request;

pub use batch::{BatchCreated, BatchFailure, MAX_BATCH_ITEMS};
pub use mutate::{create_txn, prepare_create};
pub use read::{
    ChangefeedView, ListOptions, Listing, Unreadable, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT,
};
pub use request::{
    now_ts, parse_state, validate_id, CreateChangefeed, ResumeChangefeed, UpdateChangefeed,
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
/// Largest etcd response accepted: a listing's batch of infos with the largest
/// configs (500 x 64 KiB) fits; tonic's default (4 MiB) would not.
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
    /// A listing's `continue` token asks for a revision etcd has compacted
    /// away since its first page: the walk must start again.
    #[error(
        "the listing's revision {revision} has been compacted in etcd: start the listing again \
         without `continue`"
    )]
    ExpiredContinue { revision: i64 },
    /// etcd did not answer within the request timeout, or not at all.
    #[error("etcd is unavailable: {0}")]
    Unavailable(String),
    /// etcd answered with an error that retrying will not fix. (Shared: one
    /// failed txn answers every create committed together in it.)
    #[error("etcd refused the request: {0}")]
    Etcd(#[source] Arc<etcd_client::Error>),
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
    /// A copy of an error of one txn (etcd unavailable, or refusing it) for
    /// each of the creates it carried.
    pub(super) fn shared(&self) -> Error {
        match self {
            Error::Unavailable(message) => Error::Unavailable(message.clone()),
            Error::Etcd(error) => Error::Etcd(error.clone()),
            other => Error::Unavailable(other.to_string()),
        }
    }

    /// The machine-readable code (also a metric label).
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::Exists(_) => ErrorCode::ChangefeedExists,
            Error::NotPaused { .. } => ErrorCode::ChangefeedNotPaused,
            Error::WrongState { .. } => ErrorCode::ChangefeedWrongState,
            Error::Conflict(_) => ErrorCode::Conflict,
            Error::ExpiredContinue { .. } => ErrorCode::ExpiredContinue,
            Error::Unavailable(_) => ErrorCode::EtcdUnavailable,
            Error::Etcd(_) => ErrorCode::EtcdError,
            Error::Corrupt { .. } => ErrorCode::CorruptValue,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Changefeed administration over one etcd client and cluster prefix.
/// Cloning is cheap (the client is a channel handle).
#[derive(Clone)]
pub struct Changefeeds {
    kv: KvClient,
    keys: Keys,
    timeout: Duration,
    /// etcd's `--max-txn-ops`: how many changefeeds a batch puts in one txn.
    max_txn_ops: usize,
    /// The queue of single creates committed together, started by the first
    /// create (see `group`)...
    creates: Arc<OnceLock<group::Queue>>,
    /// ...on the runtime `new` was called on (the client's, which outlives
    /// the HTTP workers; not the first creator's: a worker that stops would
    /// take the queue with it).
    runtime: Option<tokio::runtime::Handle>,
}

impl Changefeeds {
    /// `client` must live on a runtime that outlives its users, and this
    /// is best called on it (the creates' queue runs there); `timeout`
    /// bounds every etcd request (then [`Error::Unavailable`]).
    pub fn new(client: etcd_client::Client, keys: Keys, timeout: Duration) -> Self {
        Self {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            keys,
            timeout,
            max_txn_ops: crate::etcd_server::ETCD_DEFAULT_MAX_TXN_OPS,
            creates: Arc::new(OnceLock::new()),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// The etcd cluster's `--max-txn-ops` (`etcd.max_txn_ops`); etcd's default
    /// (128) otherwise.
    pub fn with_max_txn_ops(mut self, max_txn_ops: usize) -> Self {
        self.max_txn_ops = max_txn_ops;
        self
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
            Ok(Err(error)) => Err(Error::Etcd(Arc::new(error))),
            Err(_) => Err(Error::Unavailable(format!(
                "no answer within {}",
                humantime::format_duration(self.timeout)
            ))),
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Our values have string map keys only: serializing cannot fail.
    serde_json::to_vec(value).expect("changefeed values serialize to JSON")
}
