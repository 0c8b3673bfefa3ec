//! The agent's outbox: the latest progress of each assignment, packed into each
//! heartbeat under the body limit the server announces (changed first, then what was
//! sent least recently), so an executor with more assignments than one body holds still
//! reports each of them in turn.

use std::collections::HashMap;

use super::Progress;

/// A server that does not announce its heartbeat limit has 64 KiB.
pub(super) const DEFAULT_BUDGET: usize = 64 * 1024;
/// Room left in a heartbeat body for everything but the progress items.
pub(super) const BODY_OVERHEAD: usize = 256;
/// The smallest budget a 413 halves it to.
pub(super) const MIN_BUDGET: usize = 512;

/// The bytes of progress a server announcing `max_heartbeat_bytes` takes.
pub(super) fn budget_for(max_heartbeat_bytes: Option<u64>) -> usize {
    max_heartbeat_bytes
        .map_or(DEFAULT_BUDGET, |b| usize::try_from(b).unwrap_or(usize::MAX))
        .saturating_sub(BODY_OVERHEAD)
        .max(MIN_BUDGET)
}

/// The latest progress of each assignment, and when each was last sent.
#[derive(Default)]
pub(super) struct Outbox {
    items: HashMap<(String, String), Pending>,
    /// Heartbeats packed so far.
    round: u64,
}

pub(super) struct Pending {
    progress: Progress,
    /// Its encoded size, commas included.
    bytes: usize,
    /// The round it was last sent in (0: never).
    sent: u64,
    /// Reported again since it was last sent.
    changed: bool,
}

impl Outbox {
    pub(super) fn report(&mut self, progress: Progress) {
        let bytes = serde_json::to_vec(&progress).map_or(0, |v| v.len()) + 1;
        let key = (progress.namespace.clone(), progress.changefeed.clone());
        let sent = self.items.get(&key).map_or(0, |p| p.sent);
        self.items.insert(
            key,
            Pending {
                progress,
                bytes,
                sent,
                changed: true,
            },
        );
    }

    /// What the next heartbeat carries: changed progress first, then the
    /// rest, each the least recently sent first (so progress that changes all
    /// the time is still sent in turn), as much as fits in `budget` bytes.
    pub(super) fn pack(&mut self, budget: usize) -> Vec<Progress> {
        self.round += 1;
        let mut order: Vec<(&(String, String), &mut Pending)> = self.items.iter_mut().collect();
        order.sort_unstable_by_key(|(key, p)| (!p.changed, p.sent, *key));
        let mut left = budget;
        let mut packed = Vec::new();
        for (_, pending) in order {
            // One that does not fit does not stop smaller ones behind it.
            if pending.bytes <= left {
                left -= pending.bytes;
                pending.sent = self.round;
                pending.changed = false;
                packed.push(pending.progress.clone());
            }
        }
        packed
    }

    /// Keeps only the progress of `current` assignments (changefeed -> epoch).
    pub(super) fn retain(&mut self, current: &HashMap<(&str, &str), u64>) {
        self.items.retain(|(ns, cf), p| {
            current.get(&(ns.as_str(), cf.as_str())) == Some(&p.progress.epoch)
        });
    }

    pub(super) fn clear(&mut self) {
        self.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::HeartbeatRequest;

    fn progress(cf: usize, checkpoint_ts: u64) -> Progress {
        Progress {
            namespace: "default".into(),
            changefeed: format!("cf-{cf:03}"),
            epoch: 1,
            checkpoint_ts,
            resolved_ts: None,
            error: None,
        }
    }

    #[test]
    fn the_outbox_packs_under_the_budget_changed_first_then_least_recently_sent() {
        let mut outbox = Outbox::default();
        for cf in 0..100 {
            outbox.report(progress(cf, 1));
        }
        let item = outbox.items.values().next().unwrap().bytes;
        let budget = 30 * item;
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let packed = outbox.pack(budget);
            assert_eq!(packed.len(), 30);
            let body = serde_json::to_vec(&HeartbeatRequest {
                stopped: Vec::new(),
                generation: Some(u64::MAX),
                ttl_ms: Some(10_000),
                progress: packed.clone(),
            })
            .unwrap();
            assert!(body.len() <= budget + BODY_OVERHEAD, "{} bytes", body.len());
            seen.extend(packed.into_iter().map(|p| p.changefeed));
        }
        assert_eq!(seen.len(), 100, "every assignment reported in 4 rounds");
        // A new report goes out at the next heartbeat, whatever was sent when.
        outbox.report(progress(42, 7));
        let packed = outbox.pack(budget);
        assert_eq!(
            (packed[0].changefeed.as_str(), packed[0].checkpoint_ts),
            ("cf-042", 7)
        );
        // Progress that changes before every heartbeat is still sent in turn.
        let mut seen = std::collections::BTreeSet::new();
        for round in 0..4 {
            for cf in 0..100 {
                outbox.report(progress(cf, 10 + round));
            }
            seen.extend(outbox.pack(budget).into_iter().map(|p| p.changefeed));
        }
        assert_eq!(seen.len(), 100, "nothing starves");
        // Everything fits: everything goes, every time.
        assert_eq!(outbox.pack(usize::MAX).len(), 100);
        assert_eq!(outbox.pack(usize::MAX).len(), 100);
        // An item too big for the budget does not hold back the others.
        let mut big = progress(999, 1);
        big.error = Some("x".repeat(budget));
        outbox.report(big);
        let packed = outbox.pack(budget);
        assert!(packed.len() >= 29, "{}", packed.len());
        assert!(packed.iter().all(|p| p.changefeed != "cf-999"));
    }

    #[test]
    fn the_budget_follows_the_server() {
        assert_eq!(budget_for(None), DEFAULT_BUDGET - BODY_OVERHEAD);
        assert_eq!(budget_for(Some(1 << 20)), (1 << 20) - BODY_OVERHEAD);
        assert_eq!(budget_for(Some(10)), MIN_BUDGET);
        assert!(budget_for(Some(u64::MAX)) > 1 << 30);
    }
}
