//! `ExecutorTable`: the registry's tables (executors, deadline index, tombstones)
//! behind one mutex, shared by the actor and the HTTP workers that answer
//! heartbeats from it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::actor::HeartbeatAck;
use super::model::{Executor, ExecutorInfo, ExecutorStatus};
use super::token::{constant_time_eq, TokenHash};
use super::{Error, ExecutorId, RegistryConfig, Result};
use crate::metrics;

/// The registry's tables, shared by the actor and the HTTP workers.
///
/// Heartbeats are the hot path: an HTTP worker refreshes an executor here
/// under one short lock, with no message to the actor and no thread switch.
/// Everything that adds or removes an executor, or talks to subscribers and
/// SQL, stays in the actor; only the actor inserts into or removes from
/// `executors`, so the feed's order is the tables' order.
pub struct ExecutorTable {
    pub(super) tables: Mutex<Tables>,
    pub(super) config: RegistryConfig,
    /// `heartbeats_total{outcome="ok"}`, resolved once.
    pub(super) heartbeats_ok: prometheus::IntCounter,
    /// Executors that heartbeated for the first time (initing to running): the
    /// actor announces them on the feed.
    promotions: mpsc::UnboundedSender<ExecutorId>,
}

#[derive(Default)]
pub(super) struct Tables {
    pub(super) loaded: bool,
    pub(super) executors: HashMap<ExecutorId, Executor>,
    /// Each live executor's expiry deadline, ordered, so an expiry pass reads
    /// only the overdue prefix (mini-redis's `expirations`). The id is part of
    /// the key because deadlines collide (a fleet registered together). Exactly
    /// one entry per executor in `executors`, equal to its `deadline`: whoever
    /// changes a deadline removes the old entry before inserting the new one,
    /// and an insert that replaces an executor removes the replaced one's, so
    /// no stray entry can expire a live executor early (the expiry pass removes
    /// by id).
    pub(super) deadlines: BTreeSet<(Instant, ExecutorId)>,
    pub(super) tombstones: HashMap<ExecutorId, ExecutorInfo>,
    pub(super) tombstone_order: VecDeque<(Instant, ExecutorId)>,
    /// Executors in `executors` with status `Running`, kept up to date so
    /// that no pass over all executors is ever needed.
    pub(super) running: usize,
}

/// Executor counts by status, as of one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) initing: usize,
    pub(super) running: usize,
    pub(super) tombstones: usize,
}

impl Tables {
    pub(super) fn counts(&self) -> Counts {
        Counts {
            initing: self.executors.len() - self.running,
            running: self.running,
            tombstones: self.tombstones.len(),
        }
    }

    pub(super) fn check(&self, id: &str, token_hash: &[u8; 32]) -> Result<ExecutorId> {
        let Some((key, executor)) = self.executors.get_key_value(id) else {
            if self.tombstones.contains_key(id) {
                return Err(Error::TombstoneExecutor(id.to_owned()));
            }
            return Err(Error::UnknownExecutor(id.to_owned()));
        };
        if !constant_time_eq(token_hash, &executor.token_hash) {
            return Err(Error::Unauthorized(id.to_owned()));
        }
        Ok(key.clone())
    }

    /// Refreshes a live executor; whether it just became `Running`.
    pub(super) fn heartbeat(
        &mut self,
        id: &str,
        token_hash: &[u8; 32],
        ttl: Duration,
    ) -> Result<bool> {
        if !self.loaded {
            return Err(Error::NotReady);
        }
        let id = self.check(id, token_hash)?;
        let now = Instant::now();
        let executor = self.executors.get_mut(&id).expect("checked above");
        let old = std::mem::replace(&mut executor.deadline, now + ttl);
        executor.ttl = ttl;
        executor.last_heartbeat = Some(now);
        let promoted = executor.status == ExecutorStatus::Initing;
        if promoted {
            executor.status = ExecutorStatus::Running;
            self.running += 1;
        }
        self.deadlines.remove(&(old, id.clone()));
        self.deadlines.insert((now + ttl, id));
        Ok(promoted)
    }

    pub(super) fn insert(&mut self, id: ExecutorId, executor: Executor) {
        let deadline = executor.deadline;
        if let Some(old) = self.executors.insert(id.clone(), executor) {
            // Ids are unique (checked before the SQL insert); a reload could
            // only bring the same row twice if SQL did. Its deadline goes with
            // it, before the new one is indexed (they may be equal).
            self.deadlines.remove(&(old.deadline, id.clone()));
            if old.status == ExecutorStatus::Running {
                self.running -= 1;
            }
        }
        self.deadlines.insert((deadline, id));
    }

    /// Removes a live executor and remembers it as a tombstone.
    pub(super) fn remove(&mut self, id: &ExecutorId, now: Instant) -> bool {
        let Some(executor) = self.executors.remove(id) else {
            return false;
        };
        self.deadlines.remove(&(executor.deadline, id.clone()));
        if executor.status == ExecutorStatus::Running {
            self.running -= 1;
        }
        let mut info = executor.info(id, now);
        info.status = ExecutorStatus::Tombstone;
        self.tombstones.insert(id.clone(), info);
        self.tombstone_order.push_back((now, id.clone()));
        true
    }

    pub(super) fn forget_old_tombstones(&mut self, now: Instant, config: &RegistryConfig) {
        while let Some((at, id)) = self.tombstone_order.front() {
            let too_old = now.saturating_duration_since(*at) > config.tombstone_retention;
            if !too_old && self.tombstone_order.len() <= config.max_tombstones {
                break;
            }
            self.tombstones.remove(id);
            self.tombstone_order.pop_front();
        }
    }
}

impl ExecutorTable {
    /// The table, and the promotions its heartbeats announce.
    pub(super) fn new(config: RegistryConfig) -> (Self, mpsc::UnboundedReceiver<ExecutorId>) {
        let (promotions, promoted) = mpsc::unbounded_channel();
        let table = Self {
            tables: Mutex::new(Tables::default()),
            config,
            heartbeats_ok: metrics::registry_metrics()
                .heartbeats_total
                .with_label_values(&["ok"]),
            promotions,
        };
        (table, promoted)
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Tables> {
        // Nothing under this lock can leave the tables half-changed in a way
        // a later reader would misread (every change keeps `deadlines` equal
        // to the executors' deadlines before it returns), so a panic elsewhere
        // while it was held does not make every later heartbeat fail.
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `token` is the token of `id`, a live executor: the errors of
    /// a heartbeat, without refreshing anything. Lets a heartbeat be refused
    /// before its body is read.
    pub fn authenticate(&self, id: &str, token: &TokenHash) -> Result<()> {
        let outcome = {
            let tables = self.lock();
            if tables.loaded {
                tables.check(id, &token.0).map(drop)
            } else {
                Err(Error::NotReady)
            }
        };
        outcome.inspect_err(|e| {
            metrics::registry_metrics()
                .heartbeats_total
                .with_label_values(&[e.code()])
                .inc();
        })
    }

    /// A heartbeat: checks the token and refreshes the executor's deadline.
    /// Called on the HTTP worker's thread; never touches SQL.
    pub fn heartbeat(
        &self,
        id: &str,
        token: &TokenHash,
        ttl: Option<Duration>,
    ) -> Result<HeartbeatAck> {
        let ttl = self.clamp_ttl(ttl);
        let outcome = {
            let mut tables = self.lock();
            tables
                .heartbeat(id, &token.0, ttl)
                .map(|promoted| promoted.then(|| tables.counts()))
        };
        match outcome {
            Ok(promoted) => {
                self.heartbeats_ok.inc();
                if let Some(counts) = promoted {
                    set_gauges(counts);
                    // Fails only once the actor is gone.
                    let _ = self.promotions.send(id.into());
                }
                Ok(HeartbeatAck {
                    ttl,
                    heartbeat_interval: self.config.heartbeat_interval,
                })
            }
            Err(e) => {
                metrics::registry_metrics()
                    .heartbeats_total
                    .with_label_values(&[e.code()])
                    .inc();
                Err(e)
            }
        }
    }

    pub(super) fn clamp_ttl(&self, ttl: Option<Duration>) -> Duration {
        ttl.unwrap_or(self.config.default_ttl)
            .clamp(self.config.min_ttl, self.config.max_ttl)
    }
}

pub(super) fn set_gauges(counts: Counts) {
    let m = &metrics::registry_metrics().executors;
    m.with_label_values(&["initing"]).set(counts.initing as i64);
    m.with_label_values(&["running"]).set(counts.running as i64);
    m.with_label_values(&["tombstone"])
        .set(counts.tombstones as i64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn executor(deadline: Instant) -> Executor {
        Executor {
            name: "e".into(),
            address: "a:1".into(),
            labels: Box::new([]),
            token_hash: [7; 32],
            registered_at: SystemTime::UNIX_EPOCH,
            status: ExecutorStatus::Initing,
            last_heartbeat: None,
            ttl: Duration::from_secs(1),
            deadline,
        }
    }

    /// A row loaded twice (SQL returned a duplicate) must not leave the first
    /// copy's deadline behind: the expiry pass removes by id, so that stray
    /// deadline would expire the live executor early.
    #[test]
    fn a_row_inserted_twice_leaves_one_deadline_and_no_early_expiry() {
        let mut tables = Tables::default();
        let id: ExecutorId = "e-00000001".into();
        let now = Instant::now();
        tables.insert(id.clone(), executor(now + Duration::from_secs(1)));
        tables.insert(id.clone(), executor(now + Duration::from_secs(60)));
        assert_eq!(
            tables.deadlines.iter().collect::<Vec<_>>(),
            [&(now + Duration::from_secs(60), id.clone())]
        );
        // What the expiry pass would find overdue 2 s from now: nothing.
        let overdue = tables
            .deadlines
            .iter()
            .take_while(|(deadline, _)| *deadline <= now + Duration::from_secs(2))
            .count();
        assert_eq!(overdue, 0);
        // A heartbeat moves the one entry; a removal takes it.
        tables.loaded = true;
        tables
            .heartbeat(&id, &[7; 32], Duration::from_secs(5))
            .unwrap();
        assert_eq!(tables.deadlines.len(), 1);
        assert!(tables.remove(&id, Instant::now()));
        assert!(tables.deadlines.is_empty());
    }
}
