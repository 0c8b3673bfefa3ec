//! Creating many changefeeds in one request (`POST /api/v1/changefeeds:batch`), for
//! operators who import thousands. Every item is checked first: one that breaks a
//! rule (or an id given twice) refuses the whole batch, naming it, and nothing is
//! written. Then the items go in txns of as many as `max_txn_ops` allows (each still
//! requiring that its keys do not exist), several txns in flight at once; the answer
//! says per item what happened. A txn refused because some of its changefeeds exist
//! learns which from its failure branch and is sent again without them.

use std::collections::HashSet;

use etcd_client::{GetOptions, Txn, TxnOp, TxnOpResponse};
use futures::{stream, StreamExt};
use serde::Serialize;

use super::mutate::{create_ops, prepare_create};
use super::read::view;
use super::request::{validate_id, CreateChangefeed};
use super::{ChangefeedView, Changefeeds, Error, Result, MAX_ATTEMPTS};
use crate::owner::model::{ChangefeedId, ChangefeedInfo, ChangefeedStatus};

/// Most changefeeds one batch request may create.
pub const MAX_BATCH_ITEMS: usize = 1000;
/// Txns of one batch in flight at once.
const IN_FLIGHT: usize = 4;

/// What a batch create did, item by item.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct BatchCreated {
    /// The changefeeds created, in the request's order.
    pub created: Vec<ChangefeedView>,
    /// The items not created, each with why (`changefeed_exists`, `conflict`,
    /// or etcd's error).
    pub failed: Vec<BatchFailure>,
}

/// One item of a batch that was not created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BatchFailure {
    /// The item's position in the request.
    pub index: usize,
    pub id: String,
    #[schema(value_type = String)]
    pub code: &'static str,
    pub message: String,
}

/// An item ready to write.
pub(super) struct Ready {
    pub(super) index: usize,
    pub(super) cf: ChangefeedId,
    pub(super) info: ChangefeedInfo,
    pub(super) status: ChangefeedStatus,
}

impl Changefeeds {
    /// Creates every item of `requests` that does not exist yet (see the
    /// module documentation). Fails as a whole, writing nothing, for a bad
    /// namespace, more than [`MAX_BATCH_ITEMS`] items, or any item that breaks
    /// a rule; existing changefeeds and etcd failures are per item.
    pub async fn create_many(
        &self,
        namespace: &str,
        requests: Vec<CreateChangefeed>,
    ) -> Result<BatchCreated> {
        validate_id("namespace", namespace)?;
        if requests.len() > MAX_BATCH_ITEMS {
            return Err(Error::InvalidArgument(format!(
                "{} items: a batch creates at most {MAX_BATCH_ITEMS}",
                requests.len()
            )));
        }
        let mut outcome = BatchCreated::default();
        let mut seen = HashSet::new();
        let mut ready = Vec::with_capacity(requests.len());
        let mut invalid = Vec::new();
        for (index, request) in requests.into_iter().enumerate() {
            let id = request.id.clone();
            match prepare_create(namespace, request) {
                Ok(_) if !seen.insert(id.clone()) => {
                    invalid.push(format!("item {index}: changefeed {id} is given twice"));
                }
                Ok((cf, info, status)) => ready.push(Ready {
                    index,
                    cf,
                    info,
                    status,
                }),
                Err(e) => invalid.push(format!("item {index} ({id:?}): {e}")),
            }
        }
        if !invalid.is_empty() {
            let more = invalid.len().saturating_sub(3);
            invalid.truncate(3);
            let mut message = format!("nothing created: {}", invalid.join("; "));
            if more > 0 {
                message.push_str(&format!("; and {more} more"));
            }
            return Err(Error::InvalidArgument(message));
        }
        // Two compares and two puts per changefeed.
        let per_txn = (self.max_txn_ops / 2).max(1);
        let mut chunks = Vec::new();
        let mut ready = ready.into_iter().peekable();
        while ready.peek().is_some() {
            chunks.push(ready.by_ref().take(per_txn).collect::<Vec<_>>());
        }
        let results: Vec<Vec<(Ready, Result<()>)>> = stream::iter(chunks)
            .map(|chunk| self.create_chunk(chunk))
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        let mut created = Vec::new();
        for (r, result) in results.into_iter().flatten() {
            match result {
                Ok(()) => created.push(r),
                Err(e) => outcome.failed.push(failure(r.index, r.cf.id, &e)),
            }
        }
        created.sort_by_key(|r| r.index);
        outcome.created = created
            .into_iter()
            .map(|r| view(&r.cf, r.info, Some(r.status), None))
            .collect();
        outcome.failed.sort_by_key(|f| f.index);
        Ok(outcome)
    }

    /// One txn of `chunk` (no changefeed twice); on a failed compare, the
    /// changefeeds found to exist are dropped and the rest sent again (at most
    /// [`MAX_ATTEMPTS`] times). Every item comes back with its outcome.
    pub(super) async fn create_chunk(&self, mut chunk: Vec<Ready>) -> Vec<(Ready, Result<()>)> {
        let mut done = Vec::with_capacity(chunk.len());
        for _ in 0..MAX_ATTEMPTS {
            if chunk.is_empty() {
                return done;
            }
            let mut compares = Vec::with_capacity(2 * chunk.len());
            let mut puts = Vec::with_capacity(2 * chunk.len());
            let mut checks = Vec::with_capacity(chunk.len());
            for r in &chunk {
                let (create, put) = create_ops(&self.keys, &r.cf, &r.info, &r.status);
                compares.extend(create);
                puts.extend(put);
                // Either key existing refuses the changefeed: read both back
                // (without values) when the txn fails.
                for key in [self.keys.info(&r.cf), self.keys.status(&r.cf)] {
                    checks.push(TxnOp::get(
                        key,
                        Some(GetOptions::new().with_keys_only().with_count_only()),
                    ));
                }
            }
            let txn = Txn::new().when(compares).and_then(puts).or_else(checks);
            let response = match self.txn(txn).await {
                Ok(response) => response,
                Err(e) => {
                    done.extend(chunk.into_iter().map(|r| (r, Err(e.shared()))));
                    return done;
                }
            };
            if response.succeeded() {
                done.extend(chunk.into_iter().map(|r| (r, Ok(()))));
                return done;
            }
            let exists: Vec<bool> = response
                .op_responses()
                .chunks(2)
                .map(|pair| {
                    pair.iter()
                        .any(|r| matches!(r, TxnOpResponse::Get(g) if g.count() > 0))
                })
                .collect();
            let mut kept = Vec::with_capacity(chunk.len());
            for (r, exists) in chunk
                .into_iter()
                .zip(exists.into_iter().chain(std::iter::repeat(false)))
            {
                if exists {
                    let e = Error::Exists(r.cf.clone());
                    done.push((r, Err(e)));
                } else {
                    kept.push(r);
                }
            }
            chunk = kept;
        }
        // Created meanwhile again and again by someone else.
        done.extend(chunk.into_iter().map(|r| {
            let e = Error::Conflict(r.cf.clone());
            (r, Err(e))
        }));
        done
    }
}

fn failure(index: usize, id: String, error: &Error) -> BatchFailure {
    BatchFailure {
        index,
        id,
        code: error.code().as_str(),
        message: error.to_string(),
    }
}
