//! `TxnCommitter`: sends the txns of a commit plan to etcd, in order, up to
//! [`IN_FLIGHT`] at once when their keys are disjoint.
//!
//! Every txn compares each key it touches on the mod_revision the plan was
//! made on (0: must not exist) and, when fenced, the fence key's
//! create_revision. A key written by an earlier txn of the same plan is
//! compared on that txn's revision, so one plan may span many txns without
//! conflicting with itself: a txn touching a key an earlier one writes waits
//! for that one (it starts the next wave). A failed txn ends the plan: the
//! txns that committed stay committed (groups are never split across txns,
//! and each group was decided on its own compares), the rest are dropped and
//! the reactor re-derives them from fresh state.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use actix::prelude::*;
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use tracing::{debug, warn};

use super::worker::{self, Fence, WorkerConfig};
use crate::etcd_errors::is_retryable;
use crate::metrics;
use crate::state::{CommitPlan, PlannedTxn};

/// Commit this plan.
#[derive(Message, Debug)]
#[rtype(result = "CommitOutcome")]
pub struct Commit {
    pub plan: CommitPlan,
    /// Every txn of the plan also compares this key's create_revision: the
    /// leader's election key (a deposed leader's txns fail on it).
    pub fence: Option<Fence>,
}

/// How a commit ended.
#[derive(Debug)]
pub enum CommitOutcome {
    /// Every txn committed; the last one at `revision`.
    Committed { revision: i64, keys: usize },
    /// A compare failed. `committed_revision` is the revision of the last txn
    /// of the plan that did commit, if any; `observed_revision` is the
    /// highest mod_revision seen among the compared keys when it failed.
    Conflict {
        committed_revision: Option<i64>,
        observed_revision: i64,
    },
    /// etcd failed with a retryable error (or timed out). The outcome of the
    /// last txn is unknown; the reactor re-derives its patches after a
    /// jittered backoff.
    Unavailable {
        committed_revision: Option<i64>,
        error: String,
    },
    /// A non-retryable error, or the fence is lost: the worker must stop.
    Failed(worker::Error),
}

/// Stops the committer.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct StopCommitter;

pub struct TxnCommitter {
    client: Client,
    request_timeout: std::time::Duration,
    slow_threshold: std::time::Duration,
}

impl TxnCommitter {
    pub fn new(client: Client, config: &WorkerConfig) -> Self {
        Self {
            client,
            request_timeout: config.request_timeout,
            slow_threshold: config.slow_threshold,
        }
    }
}

impl Actor for TxnCommitter {
    type Context = Context<Self>;
}

impl Handler<StopCommitter> for TxnCommitter {
    type Result = ();

    fn handle(&mut self, _: StopCommitter, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<Commit> for TxnCommitter {
    // AtomicResponse: the committer takes no other message until a plan is
    // fully sent, so txns of two plans can never interleave.
    type Result = AtomicResponse<Self, CommitOutcome>;

    fn handle(&mut self, msg: Commit, _: &mut Self::Context) -> Self::Result {
        let sender = TxnSender {
            client: self.client.clone(),
            fence: msg.fence,
            request_timeout: self.request_timeout,
            slow_threshold: self.slow_threshold,
        };
        AtomicResponse::new(Box::pin(sender.commit(msg.plan).into_actor(self)))
    }
}

/// Everything one commit needs, owned, so the future borrows no actor state.
struct TxnSender {
    client: Client,
    fence: Option<Fence>,
    request_timeout: std::time::Duration,
    slow_threshold: std::time::Duration,
}

/// Txns of one plan in flight at once (on disjoint keys).
pub const IN_FLIGHT: usize = 4;

/// What one txn did.
enum TxnResult {
    Committed(i64),
    CompareFailed {
        observed_revision: i64,
        fence_held: bool,
    },
}

/// A txn ready to send, and what to remember of it once it commits.
struct BuiltTxn {
    request: Txn,
    /// Written keys; `true` for a put, `false` for a delete.
    written: Vec<(String, bool)>,
    keys: usize,
    bytes: usize,
    groups: usize,
}

impl TxnSender {
    async fn commit(self, plan: CommitPlan) -> CommitOutcome {
        // Revisions of keys written by earlier txns of this plan (0: deleted).
        let mut written: HashMap<String, i64> = HashMap::new();
        let mut committed_revision = None;
        let mut keys = 0;
        let mut txns = plan.txns.into_iter().peekable();
        while txns.peek().is_some() {
            // A wave: the next txns whose keys no other txn of the wave
            // touches (a guard covers every key a txn reads or writes).
            let mut wave = Vec::new();
            let mut touched: HashSet<String> = HashSet::new();
            while let Some(txn) = txns.peek() {
                let disjoint = txn.guards.iter().all(|g| !touched.contains(&g.key));
                if wave.len() == IN_FLIGHT || (!wave.is_empty() && !disjoint) {
                    break;
                }
                touched.extend(txn.guards.iter().map(|g| g.key.clone()));
                wave.push(txns.next().expect("peeked"));
            }
            let sends = wave.into_iter().map(|txn| {
                let mut built = self.build(txn, &written);
                let written_keys = std::mem::take(&mut built.written);
                let count = built.keys;
                let sent = self.send(built);
                async move { (written_keys, count, sent.await) }
            });
            let results = futures::future::join_all(sends).await;
            let mut failure: Option<CommitOutcome> = None;
            let mut conflict: Option<i64> = None;
            for (written_keys, count, result) in results {
                match result {
                    Ok(TxnResult::Committed(revision)) => {
                        for (key, is_put) in written_keys {
                            written.insert(key, if is_put { revision } else { 0 });
                        }
                        committed_revision = committed_revision.max(Some(revision));
                        keys += count;
                        metrics::worker().committed_keys_total.inc_by(count as u64);
                    }
                    Ok(TxnResult::CompareFailed {
                        observed_revision,
                        fence_held,
                    }) => {
                        if !fence_held {
                            let fence = self
                                .fence
                                .clone()
                                .expect("fence_held is false only when fenced");
                            failure = Some(CommitOutcome::Failed(worker::Error::FenceLost {
                                key: fence.key,
                                create_revision: fence.create_revision,
                            }));
                        } else {
                            metrics::worker().txn_conflicts_total.inc();
                            conflict = conflict.max(Some(observed_revision));
                        }
                    }
                    Err(SendError::Retryable(error)) => {
                        metrics::worker().etcd_retries_total.inc();
                        if !matches!(failure, Some(CommitOutcome::Failed(_))) {
                            failure = Some(CommitOutcome::Unavailable {
                                committed_revision: None,
                                error,
                            });
                        }
                    }
                    Err(SendError::Fatal(error)) => {
                        failure = Some(CommitOutcome::Failed(error));
                    }
                }
            }
            // The worst of the wave: a lost fence or a fatal error, then an
            // unavailable etcd, then a conflict; every txn that did commit
            // counts in the revision the worker waits for.
            match failure {
                Some(CommitOutcome::Unavailable { error, .. }) => {
                    return CommitOutcome::Unavailable {
                        committed_revision,
                        error,
                    }
                }
                Some(outcome) => return outcome,
                None => {
                    if let Some(observed_revision) = conflict {
                        return CommitOutcome::Conflict {
                            committed_revision,
                            observed_revision,
                        };
                    }
                }
            }
        }
        CommitOutcome::Committed {
            revision: committed_revision.unwrap_or(0),
            keys,
        }
    }

    /// Builds the request, moving the values out of the plan (no copy).
    fn build(&self, txn: PlannedTxn, written: &HashMap<String, i64>) -> BuiltTxn {
        let mut compares = Vec::with_capacity(txn.guards.len() + 1);
        // On failure, read back the compared keys (without values) to learn
        // how far the watch must get before the reactor should tick again.
        let mut on_failure = Vec::with_capacity(txn.guards.len() + 1);
        for guard in &txn.guards {
            let expected = written
                .get(&guard.key)
                .copied()
                .unwrap_or(guard.mod_revision);
            compares.push(Compare::mod_revision(
                guard.key.as_str(),
                CompareOp::Equal,
                expected,
            ));
            on_failure.push(TxnOp::get(
                guard.key.as_str(),
                Some(GetOptions::new().with_keys_only()),
            ));
        }
        if let Some(fence) = &self.fence {
            compares.push(Compare::create_revision(
                fence.key.as_str(),
                CompareOp::Equal,
                fence.create_revision,
            ));
            on_failure.push(TxnOp::get(
                fence.key.as_str(),
                Some(GetOptions::new().with_keys_only()),
            ));
        }
        let keys = txn.writes.len();
        let mut written_keys = Vec::with_capacity(keys);
        let ops: Vec<TxnOp> = txn
            .writes
            .into_iter()
            .map(|w| {
                written_keys.push((w.key.clone(), w.value.is_some()));
                match w.value {
                    Some(value) => TxnOp::put(w.key, value, None),
                    None => TxnOp::delete(w.key, None),
                }
            })
            .collect();
        BuiltTxn {
            request: Txn::new().when(compares).and_then(ops).or_else(on_failure),
            written: written_keys,
            keys,
            bytes: txn.bytes,
            groups: txn.groups,
        }
    }

    /// Sends one txn, once. A retryable failure drops the rest of the plan:
    /// the ticker backs off with jitter and the reactor re-derives its
    /// patches from fresh state, which is also what makes a txn whose
    /// outcome is unknown (it may have been applied) safe.
    async fn send(&self, txn: BuiltTxn) -> Result<TxnResult, SendError> {
        let started = Instant::now();
        let mut client = self.client.clone();
        let sent = tokio::time::timeout(self.request_timeout, client.txn(txn.request)).await;
        let elapsed = started.elapsed();
        metrics::worker()
            .txn_duration_seconds
            .observe(elapsed.as_secs_f64());
        metrics::worker().txn_size_bytes.observe(txn.bytes as f64);
        if elapsed > self.slow_threshold {
            warn!(
                ?elapsed,
                keys = txn.keys,
                bytes = txn.bytes,
                groups = txn.groups,
                "slow etcd txn"
            );
        }
        match sent {
            Ok(Ok(response)) => Ok(self.read_response(&response)),
            Ok(Err(error)) if !is_retryable(&error) => Err(SendError::Fatal(worker::Error::Etcd {
                operation: "txn",
                source: error,
            })),
            Ok(Err(error)) => {
                debug!(%error, "etcd txn failed; patches dropped, re-derived after a backoff");
                Err(SendError::Retryable(error.to_string()))
            }
            Err(_) => Err(SendError::Retryable(format!(
                "txn timed out after {:?}",
                self.request_timeout
            ))),
        }
    }

    fn read_response(&self, response: &etcd_client::TxnResponse) -> TxnResult {
        let revision = response.header().map_or(0, |h| h.revision());
        if response.succeeded() {
            return TxnResult::Committed(revision);
        }
        let mut observed_revision = 0;
        let mut fence_held = true;
        let responses = response.op_responses();
        let fence_index = self
            .fence
            .as_ref()
            .map(|_| responses.len().saturating_sub(1));
        for (i, op) in responses.iter().enumerate() {
            let TxnOpResponse::Get(get) = op else {
                continue;
            };
            if Some(i) == fence_index {
                let fence = self.fence.as_ref().expect("fence_index implies a fence");
                fence_held = get
                    .kvs()
                    .first()
                    .is_some_and(|kv| kv.create_revision() == fence.create_revision);
            } else {
                for kv in get.kvs() {
                    observed_revision = observed_revision.max(kv.mod_revision());
                }
            }
        }
        TxnResult::CompareFailed {
            observed_revision,
            fence_held,
        }
    }
}

enum SendError {
    Retryable(String),
    Fatal(worker::Error),
}
