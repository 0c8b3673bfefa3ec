//! The expiry pass: every `keepalive_interval`, the executors past their deadline
//! (the overdue prefix of the deadline index, O(expired)) become tombstones and are
//! announced offline; a mass silence throttles it to `mass_expiry_rate` per second.

use std::time::Instant;

use actix::prelude::*;
use tracing::{info, warn};

use super::actor::ExecutorRegistry;
use super::model::OfflineReason;
use super::table::set_gauges;
use super::ExecutorId;
use crate::metrics;

impl ExecutorRegistry {
    pub(super) fn expiry_pass(&mut self, ctx: &mut Context<Self>) -> usize {
        if !self.lease.is_valid() {
            return 0;
        }
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last_expiry_pass);
        let mut tables = self.table.lock();
        if !tables.loaded {
            return 0;
        }
        self.last_expiry_pass = now;
        let overdue: Vec<ExecutorId> = tables
            .deadlines
            .iter()
            .take_while(|(deadline, _)| *deadline <= now)
            .map(|(_, id)| id.clone())
            .collect();
        let total = tables.executors.len();
        let mass =
            total >= 3 && overdue.len() as f64 > self.config.mass_expiry_fraction * total as f64;
        if mass != self.mass_silence {
            self.mass_silence = mass;
            metrics::registry_metrics()
                .mass_silence
                .set(i64::from(mass));
            if mass {
                warn!(
                    overdue = overdue.len(),
                    total,
                    rate = self.config.mass_expiry_rate,
                    "mass silence: most executors are overdue at once; throttling expiry"
                );
                self.expiry_tokens = 0.0;
            } else {
                info!("mass silence over; expiring normally");
            }
        }
        let allowed = if mass {
            let burst = self.config.mass_expiry_rate.max(1.0);
            self.expiry_tokens = (self.expiry_tokens
                + self.config.mass_expiry_rate * elapsed.as_secs_f64())
            .min(burst);
            let n = self.expiry_tokens.floor();
            self.expiry_tokens -= n;
            n as usize
        } else {
            usize::MAX
        };
        let mut expired = Vec::new();
        for id in overdue.into_iter().take(allowed) {
            if tables.remove(&id, now) {
                expired.push(id);
            } else {
                // A deadline left behind by a removal a panic cut short.
                tables.deadlines.retain(|(_, other)| *other != id);
            }
        }
        tables.forget_old_tombstones(now, &self.config);
        let counts = tables.counts();
        // Announced after the lock is released: heartbeats need not wait
        // for logging and subscribers.
        drop(tables);
        for id in &expired {
            // Expired TTL after its last heartbeat: its lease has lapsed.
            self.announce_offline(id, OfflineReason::Expired, std::time::Duration::ZERO);
        }
        self.flush_deletes(ctx);
        set_gauges(counts);
        expired.len()
    }
}
