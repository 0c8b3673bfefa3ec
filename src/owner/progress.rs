//! `ProgressSlots`: where heartbeats leave progress for the reactor, one slot per
//! changefeed and executor, so reports between two ticks cost memory bounded by the
//! assignments, not by the reports: a report replaces the one before it (unless that
//! one is further along at the same epoch), and the reactor takes them all at the
//! start of its tick. HTTP workers write, the reactor drains; the map is split in
//! shards so writers on different changefeeds rarely wait for one another.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, PoisonError};

use super::model::ChangefeedId;
use super::reactor::ProgressReport;

const SHARDS: usize = 16;

type Slots = HashMap<(ChangefeedId, String), ProgressReport>;

/// See the module documentation.
#[derive(Debug)]
pub struct ProgressSlots {
    shards: [Mutex<Slots>; SHARDS],
}

impl Default for ProgressSlots {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::default()),
        }
    }
}

impl ProgressSlots {
    fn shard(&self, cf: &ChangefeedId) -> std::sync::MutexGuard<'_, Slots> {
        let mut hasher = DefaultHasher::new();
        cf.hash(&mut hasher);
        // Every write replaces a whole entry: a panic elsewhere leaves no
        // half-written one.
        self.shards[hasher.finish() as usize % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Leaves `executor`'s `report`; an older report arriving late (same
    /// epoch, a lower checkpoint, no error) does not replace a newer one.
    pub fn put(&self, executor: &str, report: ProgressReport) {
        let mut shard = self.shard(&report.changefeed);
        let key = (report.changefeed.clone(), executor.to_owned());
        if let Some(old) = shard.get(&key) {
            if is_further(old, &report) {
                return;
            }
        }
        shard.insert(key, report);
    }

    /// Every report left since the last call, with its executor.
    pub fn take(&self) -> Vec<(String, ProgressReport)> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let slots = std::mem::take(&mut *shard.lock().unwrap_or_else(PoisonError::into_inner));
            out.extend(
                slots
                    .into_iter()
                    .map(|((_, executor), report)| (executor, report)),
            );
        }
        out
    }

    /// Reports waiting for the next tick.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// Whether `old` must stay rather than be replaced by `new`: the same epoch,
/// further along, and `new` carries no error.
pub(crate) fn is_further(old: &ProgressReport, new: &ProgressReport) -> bool {
    old.epoch == new.epoch && old.checkpoint_ts > new.checkpoint_ts && new.error.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(cf: &str, epoch: u64, checkpoint_ts: u64) -> ProgressReport {
        ProgressReport {
            changefeed: ChangefeedId::new("default", cf),
            epoch,
            checkpoint_ts,
            resolved_ts: checkpoint_ts,
            error: None,
        }
    }

    #[test]
    fn a_flood_of_reports_holds_one_slot_per_changefeed_and_executor() {
        let slots = ProgressSlots::default();
        for round in 0..200u64 {
            for cf in 0..500 {
                slots.put("e1", report(&format!("cf{cf}"), 1, 100 + round));
            }
        }
        assert_eq!(
            slots.len(),
            500,
            "bounded by the assignments, not the reports"
        );
        let taken = slots.take();
        assert_eq!(taken.len(), 500);
        assert!(taken
            .iter()
            .all(|(e, r)| e == "e1" && r.checkpoint_ts == 299));
        assert_eq!(slots.len(), 0, "taken");
    }

    #[test]
    fn a_late_older_report_does_not_replace_a_newer_one_but_an_error_or_an_epoch_does() {
        let slots = ProgressSlots::default();
        slots.put("e1", report("a", 1, 500));
        slots.put("e1", report("a", 1, 400));
        assert_eq!(slots.take()[0].1.checkpoint_ts, 500);
        slots.put("e1", report("a", 1, 500));
        slots.put("e1", report("a", 2, 100));
        assert_eq!(slots.take()[0].1.epoch, 2);
        slots.put("e1", report("a", 1, 500));
        let mut failed = report("a", 1, 400);
        failed.error = Some("sink down".into());
        slots.put("e1", failed);
        assert!(slots.take()[0].1.error.is_some());
        // Two executors of one changefeed (a move in progress): two slots.
        slots.put("e1", report("a", 1, 500));
        slots.put("e2", report("a", 2, 600));
        assert_eq!(slots.take().len(), 2);
    }
}
