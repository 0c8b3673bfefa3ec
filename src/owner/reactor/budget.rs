//! The checkpoint write budget of the owner.

/// The checkpoint write budget: a token bucket of `rate` writes per second
/// holding at most one second's worth.
#[derive(Debug)]
pub(super) struct CheckpointBudget {
    rate: f64,
    tokens: f64,
    refilled_at: Option<u64>,
}

impl CheckpointBudget {
    pub(super) fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: 0.0,
            refilled_at: None,
        }
    }

    /// Up to `wanted` writes allowed at `now` (ms); they are spent.
    pub(super) fn take(&mut self, now: u64, wanted: usize) -> usize {
        let elapsed = self.refilled_at.map_or(1000, |at| now.saturating_sub(at));
        self.refilled_at = Some(now);
        self.tokens = (self.tokens + self.rate * elapsed as f64 / 1000.0).min(self.rate);
        let granted = (self.tokens.floor() as usize).min(wanted);
        self.tokens -= granted as f64;
        granted
    }
}
