//! The registry's SQL side: executors loaded at start (each given the failover
//! grace), registrations inserted a batch per statement, removals deleted in the
//! background.

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::actor::ExecutorRegistry;
use super::model::{compact_labels, Executor, ExecutorStatus};
use super::table::set_gauges;
use super::token::decode_hash;
use super::ExecutorId;
use crate::metrics;
use crate::store::{self, StoredExecutor};

impl ExecutorRegistry {
    pub(super) fn load(&mut self, ctx: &mut Context<Self>, attempt: u32) {
        let store = self.store.clone();
        ctx.spawn(
            async move { store.load_executors().await }
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(rows) => act.on_loaded(rows),
                    Err(error) => {
                        let delay = Duration::from_millis(200 * u64::from(attempt.min(25) + 1));
                        warn!(%error, ?delay, "loading executors from the store failed; retrying");
                        ctx.run_later(delay, move |act, ctx| act.load(ctx, attempt + 1));
                    }
                }),
        );
    }

    pub(super) fn on_loaded(&mut self, rows: Vec<StoredExecutor>) {
        let now = Instant::now();
        let deadline = now + self.config.failover_grace;
        let mut tables = self.table.lock();
        for row in rows {
            let Some(token_hash) = decode_hash(&row.token_hash) else {
                warn!(id = %row.id, "stored executor has a malformed token hash; skipped");
                continue;
            };
            tables.insert(
                row.id.into(),
                Executor {
                    name: row.name.into(),
                    address: row.address.into(),
                    labels: compact_labels(row.labels),
                    token_hash,
                    registered_at: UNIX_EPOCH
                        + Duration::from_millis(row.registered_at_ms.max(0) as u64),
                    status: ExecutorStatus::Initing,
                    last_heartbeat: None,
                    ttl: self.config.default_ttl,
                    deadline,
                },
            );
        }
        tables.loaded = true;
        info!(
            executors = tables.executors.len(),
            grace = ?self.config.failover_grace,
            "executor registry loaded from the store"
        );
        set_gauges(tables.counts());
    }

    /// Deletes removed executors from SQL, a batch at a time, in the
    /// background; failures stay pending and are retried on a later pass.
    pub(super) fn flush_deletes(&mut self, ctx: &mut Context<Self>) {
        if self.deleting || self.pending_deletes.is_empty() || !self.lease.is_valid() {
            return;
        }
        self.deleting = true;
        let batch: Vec<ExecutorId> = self.pending_deletes.iter().take(64).cloned().collect();
        let store = self.store.clone();
        ctx.spawn(
            async move {
                let mut done = Vec::new();
                let mut failure = None;
                for id in batch {
                    match store.delete_executor(&id).await {
                        Ok(_) => done.push(id),
                        Err(error) => {
                            failure = Some((id, error));
                            break;
                        }
                    }
                }
                (done, failure)
            }
            .into_actor(self)
            .map(|(done, failure), act, _| {
                act.deleting = false;
                for id in done {
                    act.pending_deletes.remove(&id);
                }
                if let Some((id, error)) = failure {
                    warn!(id = %id, %error, pending = act.pending_deletes.len(), "deleting an executor from the store failed; will retry");
                }
                metrics::registry_metrics()
                    .pending_store_deletes
                    .set(act.pending_deletes.len() as i64);
            }),
        );
    }

    /// Writes waiting registrations to SQL, up to [`store::MAX_INSERT_BATCH`] rows a
    /// statement, one statement at a time: a burst of a thousand registrations costs
    /// a few statements, not a thousand callers queueing for the pool (where the
    /// last of them ran into its acquire timeout and got 503). Each caller learns
    /// its batch's outcome; a batch refused for a duplicate id (a collision with a
    /// row still being deleted) is retried row by row, so only the colliding
    /// registration fails.
    pub(super) fn flush_inserts(&mut self, ctx: &mut Context<Self>) {
        if self.inserting || self.pending_inserts.is_empty() {
            return;
        }
        self.inserting = true;
        let take = self.pending_inserts.len().min(store::MAX_INSERT_BATCH);
        let batch: Vec<PendingInsert> = self.pending_inserts.drain(..take).collect();
        let store = self.store.clone();
        ctx.spawn(
            async move {
                let (rows, done): (Vec<StoredExecutor>, Vec<_>) =
                    batch.into_iter().map(|p| (p.row, p.done)).unzip();
                match store.insert_executors(&rows).await {
                    Err(store::Error::Duplicate { .. }) if rows.len() > 1 => {
                        for (row, done) in rows.iter().zip(done) {
                            let _ = done.send(store.insert_executor(row).await.map_err(Arc::new));
                        }
                    }
                    outcome => {
                        let outcome = outcome.map_err(Arc::new);
                        for done in done {
                            let _ = done.send(outcome.clone());
                        }
                    }
                }
            }
            .into_actor(self)
            .map(|(), act, ctx| {
                act.inserting = false;
                act.flush_inserts(ctx);
            }),
        );
    }
}

/// A registration's row waiting for [`ExecutorRegistry::flush_inserts`].
pub(super) struct PendingInsert {
    pub(super) row: StoredExecutor,
    pub(super) done: oneshot::Sender<std::result::Result<(), Arc<store::Error>>>,
}
