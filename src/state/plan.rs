//! Commit planning: patch groups -> etcd transactions, with no I/O.
//!
//! The planner applies each group once to a scratch view of the committed
//! snapshot, keeps only the keys whose value really changes, and packs whole
//! groups into transactions under the operation and byte limits. A group that
//! fails is rolled back (it only ever touched its own staging map), so the
//! scratch state never holds half a group, and a group is never applied twice.

use std::collections::{BTreeMap, BTreeSet};

use super::patch::{self, Change, DataPatch, MultiPatchView, PatchGroup, ValueSource};

/// A key's committed value and the etcd revision that last modified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// The committed snapshot of the watched prefix, key -> entry.
pub type RawState = BTreeMap<String, RawEntry>;

/// Bytes a write costs on top of its key and value: the compare, the op
/// header and protobuf framing. Generous on purpose; it only has to keep a
/// txn under etcd's request limit.
const WRITE_OVERHEAD_BYTES: usize = 32;

/// Limits for one etcd transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnLimits {
    /// etcd's `--max-txn-ops`: no branch (compares, success ops, failure
    /// ops) of a txn may hold more operations.
    pub max_ops: usize,
    /// Upper bound for the encoded size of a txn (etcd rejects requests over
    /// `--max-request-bytes`, 1.5 MiB by default).
    pub max_bytes: usize,
    /// Compares the worker adds to every txn besides one per written key
    /// (the fence, for example). They count against `max_ops`.
    pub extra_compares: usize,
}

impl Default for TxnLimits {
    fn default() -> Self {
        Self {
            max_ops: 128,
            max_bytes: 1_310_720,
            extra_compares: 0,
        }
    }
}

impl TxnLimits {
    /// How many distinct keys (written or guarded) one txn may hold.
    pub fn max_keys(&self) -> usize {
        self.max_ops.saturating_sub(self.extra_compares)
    }
}

/// Errors of planning a commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// One atomic group needs more than a single transaction can hold. It can
    /// never be committed, so retrying is pointless: the reactor must split
    /// its work differently.
    #[error(
        "patch group {group} touches {keys} keys ({bytes} bytes); one txn holds at most \
         {max_keys} keys and {max_bytes} bytes"
    )]
    GroupTooLarge {
        group: usize,
        keys: usize,
        bytes: usize,
        max_keys: usize,
        max_bytes: usize,
    },
    /// A patch names a key outside the prefix the worker watches. The worker
    /// could never observe such a write, so it refuses it.
    #[error("patch group {group} writes {key:?}, outside the watched prefix {prefix:?}")]
    KeyOutsidePrefix {
        group: usize,
        key: String,
        prefix: String,
    },
}

/// One key to write: `value: None` deletes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// A compare every txn carries: `key` must still have the mod_revision the
/// plan was made on (0: must not exist). Written keys and keys a group read
/// without writing both get one, so a txn commits only if everything its
/// groups decided on is unchanged. Because a deleted key compares as 0 and a
/// re-created key gets a new revision, a concurrent delete always fails the
/// compare (the modify-after-delete case).
///
/// A key already written by an earlier txn of the same plan is compared on
/// that txn's revision instead; the committer tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    pub key: String,
    pub mod_revision: i64,
}

/// One transaction of a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlannedTxn {
    /// One per distinct key, written or read.
    pub guards: Vec<Guard>,
    pub writes: Vec<Write>,
    /// How many patch groups this txn carries.
    pub groups: usize,
    /// Estimated request size in bytes.
    pub bytes: usize,
}

/// A patch group discarded because one of its patches returned an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedGroup {
    pub group: usize,
    pub error: patch::Error,
}

/// The transactions to send, in order, and the groups that were dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitPlan {
    pub txns: Vec<PlannedTxn>,
    pub rejected: Vec<RejectedGroup>,
}

impl CommitPlan {
    /// Number of keys the plan writes, over all txns.
    pub fn writes(&self) -> usize {
        self.txns.iter().map(|t| t.writes.len()).sum()
    }
}

/// The committed snapshot plus the effects of the groups accepted so far.
struct Scratch<'a> {
    raw: &'a RawState,
    overlay: BTreeMap<String, Option<Vec<u8>>>,
}

impl ValueSource for Scratch<'_> {
    fn value(&self, key: &str) -> Option<&[u8]> {
        match self.overlay.get(key) {
            Some(v) => v.as_deref(),
            None => self.raw.get(key).map(|e| e.value.as_slice()),
        }
    }

    fn scan_prefix(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let mut merged: BTreeMap<&str, &[u8]> = self
            .raw
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| (k.as_str(), e.value.as_slice()))
            .collect();
        for (key, value) in self
            .overlay
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            match value {
                Some(v) => merged.insert(key.as_str(), v.as_slice()),
                None => merged.remove(key.as_str()),
            };
        }
        merged
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_vec()))
            .collect()
    }
}

/// The request bytes one key costs a txn: its compare, plus its put/delete.
fn key_bytes(key: &str, write: Option<&Option<Vec<u8>>>) -> usize {
    let compare = key.len() + WRITE_OVERHEAD_BYTES;
    match write {
        None => compare,
        Some(value) => compare + key.len() + value.as_ref().map_or(0, Vec::len),
    }
}

/// What one group does: the keys it changes and the keys it only read.
struct StagedGroup {
    changes: BTreeMap<String, Option<Vec<u8>>>,
    reads: BTreeSet<String>,
}

/// Applies one group to a staging map on top of `scratch`.
fn stage_group(scratch: &Scratch<'_>, group: PatchGroup) -> Result<StagedGroup, patch::Error> {
    let mut staged: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    let mut reads: BTreeSet<String> = BTreeSet::new();
    for patch in group {
        match patch {
            DataPatch::Single { key, apply } => {
                let old = match staged.get(&key) {
                    Some(v) => v.as_deref(),
                    None => scratch.value(&key),
                };
                match apply(old)? {
                    Change::Keep => {}
                    Change::Put(value) => {
                        staged.insert(key.clone(), Some(value));
                    }
                    Change::Delete => {
                        staged.insert(key.clone(), None);
                    }
                }
                reads.insert(key);
            }
            DataPatch::Multi(apply) => {
                let mut view = MultiPatchView::new(scratch, &mut staged, &mut reads);
                apply(&mut view)?;
            }
        }
    }
    // A patch that changes nothing writes nothing: drop staged values equal to
    // what is already there (put-then-delete of an absent key, a put of the
    // same bytes, a delete of an absent key).
    staged.retain(|key, value| scratch.value(key) != value.as_deref());
    reads.retain(|key| !staged.contains_key(key));
    Ok(StagedGroup {
        changes: staged,
        reads,
    })
}

/// One key of the txn being filled.
struct TxnKey {
    /// The revision to compare on.
    mod_revision: i64,
    /// `None`: only guarded; `Some(None)`: deleted; `Some(Some(v))`: put.
    write: Option<Option<Vec<u8>>>,
}

/// The txn being filled, by key.
#[derive(Default)]
struct OpenTxn {
    keys: BTreeMap<String, TxnKey>,
    groups: usize,
    bytes: usize,
}

impl OpenTxn {
    /// Keys and bytes this txn would have with `group` merged in.
    fn size_with(&self, group: &StagedGroup) -> (usize, usize) {
        let mut keys = self.keys.len();
        let mut bytes = self.bytes;
        for (key, value) in &group.changes {
            match self.keys.get(key) {
                Some(existing) => bytes -= key_bytes(key, existing.write.as_ref()),
                None => keys += 1,
            }
            bytes += key_bytes(key, Some(value));
        }
        for key in &group.reads {
            if !self.keys.contains_key(key) {
                keys += 1;
                bytes += key_bytes(key, None);
            }
        }
        (keys, bytes)
    }

    fn merge(&mut self, raw: &RawState, group: StagedGroup, bytes: usize) {
        let revision = |key: &str| raw.get(key).map_or(0, |e| e.mod_revision);
        let entry = |key: &str| TxnKey {
            mod_revision: revision(key),
            write: None,
        };
        for (key, value) in group.changes {
            let slot = entry(&key);
            self.keys.entry(key).or_insert(slot).write = Some(value);
        }
        for key in group.reads {
            let slot = entry(&key);
            self.keys.entry(key).or_insert(slot);
        }
        self.groups += 1;
        self.bytes = bytes;
    }

    fn seal(self) -> PlannedTxn {
        let mut txn = PlannedTxn {
            groups: self.groups,
            bytes: self.bytes,
            ..PlannedTxn::default()
        };
        for (
            key,
            TxnKey {
                mod_revision,
                write,
            },
        ) in self.keys
        {
            if let Some(value) = write {
                txn.writes.push(Write {
                    key: key.clone(),
                    value,
                });
            }
            txn.guards.push(Guard { key, mod_revision });
        }
        txn
    }
}

/// Turns the patch groups of one tick into transactions.
///
/// `prefix` is the watched prefix; every written key must be under it.
pub fn plan_commit(
    raw: &RawState,
    prefix: &str,
    groups: Vec<PatchGroup>,
    limits: &TxnLimits,
) -> Result<CommitPlan, Error> {
    let max_keys = limits.max_keys();
    let mut scratch = Scratch {
        raw,
        overlay: BTreeMap::new(),
    };
    let mut plan = CommitPlan::default();
    let mut open = OpenTxn::default();

    for (index, group) in groups.into_iter().enumerate() {
        let staged = match stage_group(&scratch, group) {
            Ok(staged) => staged,
            Err(error) => {
                plan.rejected.push(RejectedGroup {
                    group: index,
                    error,
                });
                continue;
            }
        };
        // Reads alone commit nothing: a group that changes nothing is done.
        if staged.changes.is_empty() {
            continue;
        }
        if let Some(key) = staged.changes.keys().find(|k| !k.starts_with(prefix)) {
            return Err(Error::KeyOutsidePrefix {
                group: index,
                key: key.clone(),
                prefix: prefix.to_owned(),
            });
        }
        let (group_keys, group_bytes) = OpenTxn::default().size_with(&staged);
        if group_keys > max_keys || group_bytes > limits.max_bytes {
            return Err(Error::GroupTooLarge {
                group: index,
                keys: group_keys,
                bytes: group_bytes,
                max_keys,
                max_bytes: limits.max_bytes,
            });
        }
        let (mut keys, mut bytes) = open.size_with(&staged);
        if keys > max_keys || bytes > limits.max_bytes {
            plan.txns.push(std::mem::take(&mut open).seal());
            (keys, bytes) = (group_keys, group_bytes);
        }
        debug_assert!(keys <= max_keys);
        for (key, value) in &staged.changes {
            scratch.overlay.insert(key.clone(), value.clone());
        }
        open.merge(raw, staged, bytes);
    }
    if !open.keys.is_empty() {
        plan.txns.push(open.seal());
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(entries: &[(&str, &str, i64)]) -> RawState {
        entries
            .iter()
            .map(|(k, v, r)| {
                (
                    k.to_string(),
                    RawEntry {
                        value: v.as_bytes().to_vec(),
                        mod_revision: *r,
                    },
                )
            })
            .collect()
    }

    fn limits(max_ops: usize, max_bytes: usize) -> TxnLimits {
        TxnLimits {
            max_ops,
            max_bytes,
            extra_compares: 0,
        }
    }

    #[test]
    fn patches_on_one_key_compose_in_order() {
        let state = raw(&[("/p/a", "1", 5)]);
        let group = vec![
            DataPatch::single("/p/a", |old| {
                assert_eq!(old, Some(&b"1"[..]));
                Ok(Change::Put(b"2".to_vec()))
            }),
            DataPatch::single("/p/a", |old| {
                assert_eq!(old, Some(&b"2"[..]));
                Ok(Change::Put(b"3".to_vec()))
            }),
        ];
        let later = vec![DataPatch::single("/p/a", |old| {
            assert_eq!(old, Some(&b"3"[..]), "a later group sees earlier groups");
            Ok(Change::Put(b"4".to_vec()))
        })];
        let plan = plan_commit(&state, "/p/", vec![group, later], &TxnLimits::default()).unwrap();
        assert_eq!(plan.txns.len(), 1);
        assert_eq!(
            plan.txns[0].writes,
            vec![Write {
                key: "/p/a".into(),
                value: Some(b"4".to_vec()),
            }]
        );
        assert_eq!(
            plan.txns[0].guards,
            vec![Guard {
                key: "/p/a".into(),
                mod_revision: 5
            }]
        );
        assert_eq!(plan.txns[0].groups, 2);
    }

    #[test]
    fn changes_that_cancel_out_write_nothing() {
        let state = raw(&[("/p/same", "v", 3)]);
        let groups = vec![vec![
            DataPatch::put("/p/new", "x"),
            DataPatch::delete("/p/new"),
            DataPatch::delete("/p/absent"),
            DataPatch::put("/p/same", "v"),
        ]];
        let plan = plan_commit(&state, "/p/", groups, &TxnLimits::default()).unwrap();
        assert!(plan.txns.is_empty(), "{plan:?}");
    }

    #[test]
    fn empty_value_is_a_value_and_missing_is_a_delete() {
        let state = raw(&[("/p/gone", "v", 3)]);
        let groups = vec![vec![
            DataPatch::put("/p/empty", ""),
            DataPatch::delete("/p/gone"),
        ]];
        let plan = plan_commit(&state, "/p/", groups, &TxnLimits::default()).unwrap();
        let txn = &plan.txns[0];
        assert_eq!(txn.writes[0].key, "/p/empty");
        assert_eq!(txn.writes[0].value, Some(vec![]));
        assert_eq!(txn.guards[0].mod_revision, 0, "a new key must not exist");
        assert_eq!(txn.writes[1].key, "/p/gone");
        assert_eq!(txn.writes[1].value, None);
        assert_eq!(txn.guards[1].mod_revision, 3);
    }

    #[test]
    fn failed_group_is_discarded_whole_and_others_commit() {
        let state = raw(&[]);
        let groups = vec![
            vec![
                DataPatch::put("/p/a", "1"),
                DataPatch::single("/p/b", |_| Err(patch::Error::Precondition("no".into()))),
            ],
            vec![DataPatch::single("/p/a", |old| {
                assert_eq!(old, None, "the failed group left no trace");
                Ok(Change::Put(b"2".to_vec()))
            })],
        ];
        let plan = plan_commit(&state, "/p/", groups, &TxnLimits::default()).unwrap();
        assert_eq!(plan.rejected.len(), 1);
        assert_eq!(plan.rejected[0].group, 0);
        assert_eq!(plan.writes(), 1);
        assert_eq!(plan.txns[0].writes[0].value, Some(b"2".to_vec()));
    }

    #[test]
    fn groups_are_packed_without_splitting_any() {
        // 1000 single-key groups under a 128-op limit: 8 txns, every one full
        // but the last.
        let groups = (0..1000)
            .map(|i| vec![DataPatch::put(format!("/p/{i:04}"), "v")])
            .collect();
        let plan = plan_commit(&raw(&[]), "/p/", groups, &limits(128, 1 << 20)).unwrap();
        let sizes: Vec<usize> = plan.txns.iter().map(|t| t.writes.len()).collect();
        assert_eq!(sizes, vec![128, 128, 128, 128, 128, 128, 128, 104]);

        // Groups of 3 keys never straddle two txns.
        let groups = (0..100)
            .map(|i| {
                (0..3)
                    .map(|j| DataPatch::put(format!("/p/{i:03}/{j}"), "v"))
                    .collect()
            })
            .collect();
        let plan = plan_commit(&raw(&[]), "/p/", groups, &limits(128, 1 << 20)).unwrap();
        assert!(plan
            .txns
            .iter()
            .all(|t| t.writes.len() == 126 || t.writes.len() == 300 % 126));
        assert_eq!(plan.writes(), 300);
    }

    #[test]
    fn a_group_of_exactly_max_ops_keys_fits_one_txn() {
        let small = vec![DataPatch::put("/p/first", "v")];
        let exact: PatchGroup = (0..128)
            .map(|i| DataPatch::put(format!("/p/k{i:03}"), "v"))
            .collect();
        let plan =
            plan_commit(&raw(&[]), "/p/", vec![small, exact], &limits(128, 1 << 20)).unwrap();
        let sizes: Vec<usize> = plan.txns.iter().map(|t| t.writes.len()).collect();
        assert_eq!(sizes, vec![1, 128]);
    }

    #[test]
    fn a_group_over_the_op_limit_is_a_typed_error() {
        let big: PatchGroup = (0..257)
            .map(|i| DataPatch::put(format!("/p/k{i:03}"), "v"))
            .collect();
        let err = plan_commit(&raw(&[]), "/p/", vec![big], &limits(128, 1 << 20)).unwrap_err();
        assert!(matches!(
            err,
            Error::GroupTooLarge {
                group: 0,
                keys: 257,
                max_keys: 128,
                ..
            }
        ));
    }

    #[test]
    fn extra_compares_reduce_the_writes_per_txn() {
        let exact: PatchGroup = (0..128)
            .map(|i| DataPatch::put(format!("/p/k{i:03}"), "v"))
            .collect();
        let fenced = TxnLimits {
            extra_compares: 1,
            ..limits(128, 1 << 20)
        };
        let err = plan_commit(&raw(&[]), "/p/", vec![exact], &fenced).unwrap_err();
        assert!(matches!(err, Error::GroupTooLarge { max_keys: 127, .. }));
    }

    #[test]
    fn an_oversized_value_is_a_typed_error() {
        let huge = vec![DataPatch::put("/p/big", vec![b'x'; 2 << 20])];
        let err = plan_commit(&raw(&[]), "/p/", vec![huge], &TxnLimits::default()).unwrap_err();
        assert!(matches!(err, Error::GroupTooLarge { keys: 1, .. }));
    }

    #[test]
    fn byte_limit_splits_txns() {
        let groups = (0..10)
            .map(|i| vec![DataPatch::put(format!("/p/{i}"), vec![b'x'; 400])])
            .collect();
        let plan = plan_commit(&raw(&[]), "/p/", groups, &limits(128, 1000)).unwrap();
        assert_eq!(plan.txns.len(), 5);
        assert!(plan.txns.iter().all(|t| t.bytes <= 1000));
    }

    #[test]
    fn writes_outside_the_prefix_are_refused() {
        let groups = vec![vec![DataPatch::put("/elsewhere", "v")]];
        let err = plan_commit(&raw(&[]), "/p/", groups, &TxnLimits::default()).unwrap_err();
        assert!(matches!(err, Error::KeyOutsidePrefix { .. }));
    }

    #[test]
    fn multi_patch_sees_scratch_and_its_own_writes() {
        let state = raw(&[("/p/a/1", "1", 2), ("/p/a/2", "2", 3), ("/p/b", "x", 4)]);
        let groups = vec![
            vec![DataPatch::delete("/p/a/1")],
            vec![DataPatch::multi(|view| {
                view.put("/p/a/3", "3");
                let keys: Vec<String> = view
                    .scan_prefix("/p/a/")
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect();
                assert_eq!(keys, vec!["/p/a/2".to_string(), "/p/a/3".to_string()]);
                assert_eq!(view.get("/p/a/1"), None);
                assert_eq!(view.get("/p/b"), Some(&b"x"[..]));
                Ok(())
            })],
        ];
        let plan = plan_commit(&state, "/p/", groups, &TxnLimits::default()).unwrap();
        assert_eq!(plan.writes(), 2);
    }

    #[test]
    fn a_key_rewritten_across_txns_keeps_one_write_per_txn() {
        // 128 groups fill the first txn; the 129th rewrites a key of the first
        // txn plus a new one, so it lands in the second: each txn writes the
        // key once, and the second one's compare is fixed up by the committer.
        let mut groups: Vec<PatchGroup> = (0..128)
            .map(|i| vec![DataPatch::put(format!("/p/{i:03}"), "a")])
            .collect();
        groups.push(vec![
            DataPatch::put("/p/000", "b"),
            DataPatch::put("/p/new", "c"),
        ]);
        let state = raw(&[("/p/000", "old", 7)]);
        let plan = plan_commit(&state, "/p/", groups, &limits(128, 1 << 20)).unwrap();
        assert_eq!(plan.txns.len(), 2);
        assert_eq!(plan.txns[1].writes[0].key, "/p/000");
        assert_eq!(plan.txns[1].writes[0].value, Some(b"b".to_vec()));
        assert_eq!(plan.txns[1].guards[0].mod_revision, 7);
    }

    #[test]
    fn keys_read_but_not_written_are_guarded() {
        let state = raw(&[("/p/info/x", "info", 4), ("/p/task/x", "t", 6)]);
        let groups = vec![vec![
            DataPatch::guard("/p/info/x"),
            DataPatch::single("/p/task/x", |_| Ok(Change::Put(b"t2".to_vec()))),
            DataPatch::multi(|view| {
                assert!(view.get("/p/absent").is_none());
                Ok(())
            }),
        ]];
        let plan = plan_commit(&state, "/p/", groups, &TxnLimits::default()).unwrap();
        let txn = &plan.txns[0];
        assert_eq!(txn.writes.len(), 1);
        let guards: Vec<(&str, i64)> = txn
            .guards
            .iter()
            .map(|g| (g.key.as_str(), g.mod_revision))
            .collect();
        assert_eq!(
            guards,
            vec![("/p/absent", 0), ("/p/info/x", 4), ("/p/task/x", 6)]
        );
    }

    #[test]
    fn a_group_that_only_reads_commits_nothing() {
        let state = raw(&[("/p/a", "v", 2)]);
        let groups = vec![vec![DataPatch::guard("/p/a"), DataPatch::guard("/p/b")]];
        let plan = plan_commit(&state, "/p/", groups, &TxnLimits::default()).unwrap();
        assert!(plan.txns.is_empty());
    }

    #[test]
    fn guards_count_against_the_op_limit() {
        // 100 writes + 100 guarded reads = 200 compares: over 128.
        let group: PatchGroup = (0..100)
            .flat_map(|i| {
                [
                    DataPatch::put(format!("/p/w{i}"), "v"),
                    DataPatch::guard(format!("/p/r{i}")),
                ]
            })
            .collect();
        let err = plan_commit(&raw(&[]), "/p/", vec![group], &TxnLimits::default()).unwrap_err();
        assert!(matches!(err, Error::GroupTooLarge { keys: 200, .. }));
    }
}
