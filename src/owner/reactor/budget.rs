//! The owner's checkpoint writes: which changefeeds wait to persist an advanced
//! checkpoint, in which order, and the budget that bounds them.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::super::model::ChangefeedId;

/// The checkpoint write budget: a token bucket of `rate` writes per second
/// holding at most one second's worth.
#[derive(Debug)]
struct CheckpointBudget {
    rate: f64,
    tokens: f64,
    refilled_at: Option<u64>,
}

impl CheckpointBudget {
    fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: 0.0,
            refilled_at: None,
        }
    }

    /// The whole writes allowed at `now` (ms).
    fn refill(&mut self, now: u64) -> usize {
        let elapsed = self.refilled_at.map_or(1000, |at| now.saturating_sub(at));
        self.refilled_at = Some(now);
        self.tokens = (self.tokens + self.rate * elapsed as f64 / 1000.0).min(self.rate);
        self.tokens.floor() as usize
    }

    fn spend(&mut self, writes: usize) {
        self.tokens -= writes as f64;
    }
}

/// The changefeeds whose checkpoint advanced past the persisted one, least
/// recently written first. Queueing costs O(log n) and a tick's grants
/// O(granted x log n): nothing here walks every changefeed.
#[derive(Debug)]
pub(super) struct CheckpointQueue {
    budget: CheckpointBudget,
    /// When this leader last wrote each changefeed's status (ms); missing:
    /// not since it started.
    written: HashMap<ChangefeedId, u64>,
    /// (last written, 0 for never; changefeed).
    queue: BTreeSet<(u64, ChangefeedId)>,
    queued: HashSet<ChangefeedId>,
}

impl CheckpointQueue {
    pub(super) fn new(rate: u32) -> Self {
        Self {
            budget: CheckpointBudget::new(rate),
            written: HashMap::new(),
            queue: BTreeSet::new(),
            queued: HashSet::new(),
        }
    }

    fn written_at(&self, cf: &ChangefeedId) -> u64 {
        self.written.get(cf).copied().unwrap_or(0)
    }

    /// `cf`'s checkpoint advanced: it waits for its turn.
    pub(super) fn advanced(&mut self, cf: &ChangefeedId) {
        if !self.queued.contains(cf) {
            self.queued.insert(cf.clone());
            self.queue.insert((self.written_at(cf), cf.clone()));
        }
    }

    /// `cf`'s status was written at `now` (with its latest checkpoint).
    pub(super) fn wrote(&mut self, cf: &ChangefeedId, now: u64) {
        self.dequeue(cf);
        self.written.insert(cf.clone(), now);
    }

    /// `cf` is gone.
    pub(super) fn forget(&mut self, cf: &ChangefeedId) {
        self.dequeue(cf);
        self.written.remove(cf);
    }

    fn dequeue(&mut self, cf: &ChangefeedId) {
        if self.queued.remove(cf) {
            self.queue.remove(&(self.written_at(cf), cf.clone()));
        }
    }

    /// Pops the changefeeds whose turn it is at `now`: due (not written
    /// within `interval` ms), least recently written first, as many as the
    /// budget allows. `write` says what to write for each (`None`: nothing
    /// any more; costs no budget). Returns the groups and how long the
    /// oldest of those left waiting for the budget has waited (0: none;
    /// never written by this leader: since `started`).
    pub(super) fn grant<G>(
        &mut self,
        now: u64,
        interval: u64,
        started: u64,
        mut write: impl FnMut(&ChangefeedId) -> Option<G>,
    ) -> (Vec<G>, u64) {
        let allowed = self.budget.refill(now);
        let due = |at: u64| at == 0 || now >= at.saturating_add(interval);
        let mut groups = Vec::new();
        while groups.len() < allowed {
            let Some((at, _)) = self.queue.first() else {
                break;
            };
            if !due(*at) {
                break;
            }
            let (_, cf) = self.queue.pop_first().expect("not empty");
            self.queued.remove(&cf);
            if let Some(group) = write(&cf) {
                groups.push(group);
                self.written.insert(cf, now);
            }
        }
        self.budget.spend(groups.len());
        let lag = match self.queue.first() {
            Some((at, _)) if due(*at) => now.saturating_sub(if *at == 0 { started } else { *at }),
            _ => 0,
        };
        (groups, lag)
    }
}
