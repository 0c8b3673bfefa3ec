//! The state model of the orchestrator: what a reactor sees and how it asks
//! for changes. Pure data and closures: nothing here knows about actix, etcd
//! clients or HTTP, so every reactor can be unit-tested with [`StateTester`].
//!
//! Each submodule has its own error: [`Error`] (a state rejected an update),
//! [`reactor::Error`] (a tick's outcome), [`patch::Error`] and [`plan::Error`].

pub mod patch;
pub mod plan;
pub mod reactor;
mod tester;

pub use patch::{Change, DataPatch, MultiPatchView, PatchGroup, ValueSource};
pub use plan::{
    plan_commit, CommitPlan, Guard, PlannedTxn, RawEntry, RawState, RejectedGroup, TxnLimits, Write,
};
pub use reactor::Reactor;
pub use tester::StateTester;

/// A typed view of the keys under the worker's prefix.
///
/// The worker feeds it every change in revision order and collects the patch
/// groups its reactor queued. Implementations decode values here, once, so
/// that a reactor works on typed data.
pub trait ReactorState {
    /// One key changed: `value: None` means it was deleted. `is_init` is true
    /// while the worker loads the first snapshot.
    ///
    /// An error (a malformed value written from outside, say) is logged with
    /// the key and skipped by the worker; it never stops it.
    fn update(&mut self, key: &str, value: Option<&[u8]>, is_init: bool) -> Result<(), Error>;

    /// Takes the patch groups queued since the last call, in order.
    fn get_patches(&mut self) -> Vec<PatchGroup>;

    /// Called before each tick with the revision the state reflects (at
    /// least the revision of every key in it): a reactor can derive values
    /// that must rise across deletes (the owner's epochs) from it.
    fn at_revision(&mut self, _revision: i64) {}
}

/// Why a [`ReactorState`] rejected an update.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The value could not be decoded.
    #[error("malformed value at {key}: {reason}")]
    Malformed { key: String, reason: String },
    /// The key does not belong to the layout this state understands.
    #[error("unexpected key {0}")]
    UnexpectedKey(String),
}
