//! An in-memory stand-in for etcd, for unit tests of reactors.

use super::{
    plan, plan_commit, reactor, CommitPlan, RawEntry, RawState, Reactor, ReactorState, TxnLimits,
};

/// Applies a reactor's patches to an in-memory map, the way the worker would
/// commit them to etcd, and feeds the results back into the state.
///
/// Revisions behave like etcd's: every commit (or external write) gets the
/// next revision, and every key it writes carries it as mod_revision.
pub struct StateTester<S> {
    prefix: String,
    state: S,
    raw: RawState,
    revision: i64,
    limits: TxnLimits,
}

impl<S: ReactorState> StateTester<S> {
    /// A tester over an empty prefix.
    pub fn new(prefix: impl Into<String>, state: S) -> Self {
        Self {
            prefix: prefix.into(),
            state,
            raw: RawState::new(),
            revision: 1,
            limits: TxnLimits::default(),
        }
    }

    /// Uses other txn limits when applying patches.
    pub fn with_limits(mut self, limits: TxnLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Simulates a write from outside the worker (`None` deletes) and
    /// delivers it to the state, as the watch would.
    ///
    /// # Panics
    /// When the state rejects the value: a test should know what it writes.
    pub fn external_write(&mut self, key: &str, value: Option<&[u8]>) {
        self.revision += 1;
        self.store(key, value);
        self.state
            .update(key, value, false)
            .unwrap_or_else(|e| panic!("state rejected {key}: {e}"));
    }

    /// Like [`external_write`](Self::external_write), but returns the state's
    /// verdict instead of panicking: the value is stored either way, as etcd
    /// would store it, and a rejected one is what the worker would skip.
    pub fn try_external_write(
        &mut self,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<(), super::Error> {
        self.revision += 1;
        self.store(key, value);
        self.state.update(key, value, false)
    }

    /// Ticks `reactor` once and commits its patches. Returns the reactor's
    /// result and the plan that was applied.
    pub fn tick<R: Reactor<State = S>>(
        &mut self,
        reactor: &mut R,
    ) -> (Result<(), reactor::Error>, Result<CommitPlan, plan::Error>) {
        self.state.at_revision(self.revision);
        let result = reactor.tick(&mut self.state);
        if matches!(result, Err(reactor::Error::Failed(_))) {
            // The worker drops a failed tick's patches.
            self.state.get_patches();
            return (result, Ok(CommitPlan::default()));
        }
        (result, self.apply_patches())
    }

    /// Commits the queued patches: every txn of the plan becomes one
    /// revision, and the state sees each written key.
    pub fn apply_patches(&mut self) -> Result<CommitPlan, plan::Error> {
        let groups = self.state.get_patches();
        let plan = plan_commit(&self.raw, &self.prefix, groups, &self.limits)?;
        for txn in &plan.txns {
            self.revision += 1;
            for write in &txn.writes {
                self.store(&write.key, write.value.as_deref());
                self.state
                    .update(&write.key, write.value.as_deref(), false)
                    .unwrap_or_else(|e| panic!("state rejected its own write {}: {e}", write.key));
            }
        }
        Ok(plan)
    }

    fn store(&mut self, key: &str, value: Option<&[u8]>) {
        match value {
            Some(v) => {
                self.raw.insert(
                    key.to_owned(),
                    RawEntry {
                        value: v.to_vec(),
                        mod_revision: self.revision,
                    },
                );
            }
            None => {
                self.raw.remove(key);
            }
        }
    }

    /// The typed state.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The typed state, mutably (to queue patches by hand).
    pub fn state_mut(&mut self) -> &mut S {
        &mut self.state
    }

    /// The raw committed key/value map.
    pub fn raw(&self) -> &RawState {
        &self.raw
    }

    /// The committed value of `key`.
    pub fn value(&self, key: &str) -> Option<&[u8]> {
        self.raw.get(key).map(|e| e.value.as_slice())
    }

    /// The revision of the last commit or external write.
    pub fn revision(&self) -> i64 {
        self.revision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{self as state, patch, Change, DataPatch, PatchGroup};
    use std::collections::BTreeMap;

    /// Counters as decimal strings; rejects anything else.
    #[derive(Default)]
    struct Counters {
        values: BTreeMap<String, i64>,
        patches: Vec<PatchGroup>,
        init: usize,
    }

    impl ReactorState for Counters {
        fn update(
            &mut self,
            key: &str,
            value: Option<&[u8]>,
            is_init: bool,
        ) -> Result<(), state::Error> {
            self.init += usize::from(is_init);
            match value {
                None => {
                    self.values.remove(key);
                }
                Some(v) => {
                    let n = std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| state::Error::Malformed {
                            key: key.into(),
                            reason: "not a number".into(),
                        })?;
                    self.values.insert(key.into(), n);
                }
            }
            Ok(())
        }

        fn get_patches(&mut self) -> Vec<PatchGroup> {
            std::mem::take(&mut self.patches)
        }
    }

    fn incr(key: &str) -> DataPatch {
        DataPatch::single(key, |old| {
            let n: i64 = old.map_or(0, |v| std::str::from_utf8(v).unwrap().parse().unwrap());
            Ok(Change::Put((n + 1).to_string().into_bytes()))
        })
    }

    /// Increments `/c/a` until it reaches `stop_at`, then finishes.
    struct Incrementer {
        stop_at: i64,
    }

    impl Reactor for Incrementer {
        type State = Counters;

        fn tick(&mut self, state: &mut Counters) -> Result<(), reactor::Error> {
            let a = state.values.get("/c/a").copied().unwrap_or(0);
            state.patches.push(vec![incr("/c/a")]);
            if a + 1 >= self.stop_at {
                return Err(reactor::Error::Finished);
            }
            Ok(())
        }
    }

    #[test]
    fn each_tick_commits_and_the_state_sees_it() {
        let mut tester = StateTester::new("/c/", Counters::default());
        let mut reactor = Incrementer { stop_at: 3 };
        let start = tester.revision();
        for expected in 1..=3 {
            let (result, plan) = tester.tick(&mut reactor);
            assert_eq!(plan.unwrap().txns.len(), 1);
            assert_eq!(tester.state().values["/c/a"], expected);
            assert_eq!(tester.value("/c/a"), Some(expected.to_string().as_bytes()));
            assert_eq!(result.is_err(), expected == 3, "finished on the third tick");
        }
        assert_eq!(tester.revision(), start + 3, "one revision per commit");
        assert_eq!(tester.raw()["/c/a"].mod_revision, tester.revision());
    }

    #[test]
    fn external_writes_reach_the_state_with_fresh_revisions() {
        let mut tester = StateTester::new("/c/", Counters::default());
        tester.external_write("/c/b", Some(b"41"));
        let rev = tester.revision();
        assert_eq!(tester.state().values["/c/b"], 41);
        assert_eq!(tester.raw()["/c/b"].mod_revision, rev);
        tester.state_mut().patches.push(vec![incr("/c/b")]);
        tester.apply_patches().unwrap();
        assert_eq!(tester.state().values["/c/b"], 42);
        tester.external_write("/c/b", None);
        assert!(!tester.state().values.contains_key("/c/b"));
        assert_eq!(tester.value("/c/b"), None);
    }

    #[test]
    fn a_failed_tick_commits_nothing() {
        struct Failing;
        impl Reactor for Failing {
            type State = Counters;
            fn tick(&mut self, state: &mut Counters) -> Result<(), reactor::Error> {
                state.patches.push(vec![incr("/c/a")]);
                Err(reactor::Error::Failed("broken".into()))
            }
        }
        let mut tester = StateTester::new("/c/", Counters::default());
        let (result, plan) = tester.tick(&mut Failing);
        assert!(matches!(result, Err(reactor::Error::Failed(_))));
        assert!(plan.unwrap().txns.is_empty());
        assert_eq!(tester.value("/c/a"), None);
        assert!(
            tester.state_mut().get_patches().is_empty(),
            "the patches were dropped"
        );
    }

    #[test]
    fn a_rejected_group_leaves_the_others_committed() {
        let mut tester = StateTester::new("/c/", Counters::default());
        tester.state_mut().patches.push(vec![
            incr("/c/x"),
            DataPatch::single("/c/y", |_| {
                Err(patch::Error::Precondition("y is gone".into()))
            }),
        ]);
        tester.state_mut().patches.push(vec![incr("/c/z")]);
        let plan = tester.apply_patches().unwrap();
        assert_eq!(plan.rejected.len(), 1);
        assert_eq!(tester.value("/c/x"), None, "the failed group is atomic");
        assert_eq!(tester.value("/c/z"), Some(&b"1"[..]));
    }

    #[test]
    fn a_plan_error_is_returned_and_nothing_is_committed() {
        let mut tester = StateTester::new("/c/", Counters::default()).with_limits(TxnLimits {
            max_ops: 2,
            ..TxnLimits::default()
        });
        tester
            .state_mut()
            .patches
            .push(vec![incr("/c/a"), incr("/c/b"), incr("/c/c")]);
        assert!(matches!(
            tester.apply_patches(),
            Err(plan::Error::GroupTooLarge { keys: 3, .. })
        ));
        assert!(tester.raw().is_empty());
    }

    #[test]
    #[should_panic(expected = "state rejected /c/bad")]
    fn a_malformed_external_value_is_reported() {
        let mut tester = StateTester::new("/c/", Counters::default());
        tester.external_write("/c/bad", Some(b"garbage"));
    }
}
