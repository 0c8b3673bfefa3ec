//! Data patches: the only way a reactor changes etcd.
//!
//! A reactor never writes. It appends patches to its state; the worker applies
//! them to a scratch copy of the last committed snapshot and commits the
//! resulting changes with compare-and-swap. A patch is a closure over the
//! value it finds, so the same patch re-applied on a newer snapshot (after a
//! conflict the reactor simply re-derives it) decides again on fresh data.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What a single-key patch decides to do with the value it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Leave the key as it is. Nothing is written.
    Keep,
    /// Store this value. An empty vector is a value, not a delete.
    Put(Vec<u8>),
    /// Remove the key. Deleting an absent key writes nothing.
    Delete,
}

/// Why a patch refused to produce a change.
///
/// Any error discards the whole patch group it belongs to (groups are atomic);
/// the other groups of the tick are still committed and the reactor sees the
/// unchanged state on its next tick.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The patch's precondition no longer holds on the state it was applied to
    /// (for example the changefeed it updates was removed meanwhile).
    #[error("patch precondition failed: {0}")]
    Precondition(String),
    /// The value found could not be decoded.
    #[error("malformed value at {key}: {reason}")]
    Malformed { key: String, reason: String },
}

type SingleFn = Box<dyn FnOnce(Option<&[u8]>) -> Result<Change, Error>>;
type MultiFn = Box<dyn FnOnce(&mut MultiPatchView<'_>) -> Result<(), Error>>;

/// One change request from a reactor.
///
/// Patches are `FnOnce`: the worker applies each one exactly once per commit
/// plan, which makes "a group applied twice to the same scratch state"
/// impossible by construction.
pub enum DataPatch {
    /// Reads one key and decides its new value.
    Single { key: String, apply: SingleFn },
    /// Reads and writes any number of keys through a [`MultiPatchView`].
    Multi(MultiFn),
}

impl DataPatch {
    /// A patch on one key.
    pub fn single(
        key: impl Into<String>,
        apply: impl FnOnce(Option<&[u8]>) -> Result<Change, Error> + 'static,
    ) -> Self {
        DataPatch::Single {
            key: key.into(),
            apply: Box::new(apply),
        }
    }

    /// A patch that may touch several keys at once.
    pub fn multi(
        apply: impl FnOnce(&mut MultiPatchView<'_>) -> Result<(), Error> + 'static,
    ) -> Self {
        DataPatch::Multi(Box::new(apply))
    }

    /// Unconditionally stores `value` at `key`.
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        let value = value.into();
        Self::single(key, move |_| Ok(Change::Put(value)))
    }

    /// Unconditionally deletes `key`.
    pub fn delete(key: impl Into<String>) -> Self {
        Self::single(key, |_| Ok(Change::Delete))
    }

    /// Writes nothing, but makes the group's txn fail if `key` changed since
    /// the snapshot the reactor decided on. Use it for keys a decision rests
    /// on that the group does not write (closes write skew through deletes).
    pub fn guard(key: impl Into<String>) -> Self {
        Self::single(key, |_| Ok(Change::Keep))
    }
}

impl fmt::Debug for DataPatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataPatch::Single { key, .. } => f.debug_struct("Single").field("key", key).finish(),
            DataPatch::Multi(_) => f.write_str("Multi"),
        }
    }
}

/// A group of patches committed atomically: all of them or none.
pub type PatchGroup = Vec<DataPatch>;

/// Read access to the state a patch applies to: the committed snapshot plus
/// the effects of every patch applied before this one in the same plan.
pub trait ValueSource {
    /// The current value of `key`, `None` when absent.
    fn value(&self, key: &str) -> Option<&[u8]>;
    /// Every present key starting with `prefix`, in key order, with its value.
    fn scan_prefix(&self, prefix: &str) -> Vec<(String, Vec<u8>)>;
}

/// What a multi-key patch sees and edits. Writes are staged in the view and
/// recorded as changed only when they differ from what was there.
///
/// Keys read with [`MultiPatchView::get`] are guarded: the txn commits only if
/// they still hold what the patch saw. Keys seen through
/// [`MultiPatchView::scan_prefix`] are not; `get` the ones a decision rests on.
pub struct MultiPatchView<'a> {
    source: &'a dyn ValueSource,
    staged: &'a mut BTreeMap<String, Option<Vec<u8>>>,
    reads: &'a mut BTreeSet<String>,
}

impl<'a> MultiPatchView<'a> {
    pub(crate) fn new(
        source: &'a dyn ValueSource,
        staged: &'a mut BTreeMap<String, Option<Vec<u8>>>,
        reads: &'a mut BTreeSet<String>,
    ) -> Self {
        Self {
            source,
            staged,
            reads,
        }
    }

    /// The value of `key` as this patch currently sees it.
    pub fn get(&mut self, key: &str) -> Option<&[u8]> {
        if !self.reads.contains(key) {
            self.reads.insert(key.to_owned());
        }
        match self.staged.get(key) {
            Some(staged) => staged.as_deref(),
            None => self.source.value(key),
        }
    }

    /// Stores `value` at `key`.
    pub fn put(&mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.staged.insert(key.into(), Some(value.into()));
    }

    /// Deletes `key` (a no-op when it is absent).
    pub fn delete(&mut self, key: impl Into<String>) {
        self.staged.insert(key.into(), None);
    }

    /// Every present key under `prefix` with its value, staged writes included.
    pub fn scan_prefix(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let mut merged: BTreeMap<String, Vec<u8>> =
            self.source.scan_prefix(prefix).into_iter().collect();
        for (key, value) in self.staged.range(prefix.to_owned()..) {
            if !key.starts_with(prefix) {
                break;
            }
            match value {
                Some(v) => merged.insert(key.clone(), v.clone()),
                None => merged.remove(key),
            };
        }
        merged.into_iter().collect()
    }
}
