//! `OwnerReactor` ticks on a `StateTester`, with a clock each test moves. One file of
//! scenarios (about 750 lines) sharing one `Harness`.

use super::*;
use crate::owner::model::{ChangefeedInfo, Keys, TaskPosition};
use crate::owner::reactor::plan::MAX_STALE_TASKS_PER_TICK;
use crate::state::StateTester;

const NOW: u64 = 1_800_000_000_000;

thread_local! {
    /// Each test's clock (tests run on threads of their own).
    static CLOCK: std::cell::Cell<u64> = const { std::cell::Cell::new(NOW) };
}

fn now() -> u64 {
    CLOCK.with(std::cell::Cell::get)
}

/// Moves this test's clock forward.
fn advance(by: Duration) {
    CLOCK.with(|c| c.set(c.get() + by.as_millis() as u64));
}

struct Harness {
    tester: StateTester<GlobalState>,
    owner: OwnerReactor,
    inputs: mpsc::UnboundedSender<OwnerInput>,
    keys: Keys,
}

impl Harness {
    fn new() -> Self {
        Self::with_config(OwnerConfig::default())
    }

    fn with_config(config: OwnerConfig) -> Self {
        let keys = Keys::new("/p");
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tester: StateTester::new("/p/", GlobalState::new(keys.clone())),
            owner: OwnerReactor::new(rx, config).with_clock(now),
            inputs: tx,
            keys,
        }
    }

    fn checkpoint(&self, cf: &ChangefeedId) -> u64 {
        self.entry(cf).status.as_ref().unwrap().checkpoint_ts
    }

    fn executors(&self, list: &[(&str, &[(&str, &str)])]) {
        let list = list
            .iter()
            .map(|(id, labels)| executor(id, labels))
            .collect();
        self.inputs
            .send(OwnerInput::Executors {
                live: list,
                initing: Vec::new(),
            })
            .unwrap();
    }

    /// `id` expired: its lease has lapsed.
    fn offline(&self, id: &str) {
        self.deregistered(id, Duration::ZERO);
    }

    /// `id` was deregistered with `lease_left` of its lease still to run.
    fn deregistered(&self, id: &str, lease_left: Duration) {
        self.inputs
            .send(OwnerInput::Offline {
                executor: id.into(),
                lease_left,
            })
            .unwrap();
    }

    /// `executor` acknowledged the stop of `cf` at `epoch` (the heartbeat path
    /// checked it was taken away).
    fn released(&self, executor: &str, cf: &ChangefeedId, epoch: u64) {
        self.inputs
            .send(OwnerInput::Released {
                executor: executor.into(),
                changefeed: cf.clone(),
                epoch,
            })
            .unwrap();
    }

    fn progress(
        &self,
        executor: &str,
        cf: &ChangefeedId,
        epoch: u64,
        checkpoint: u64,
        error: Option<&str>,
    ) {
        self.inputs
            .send(OwnerInput::Progress {
                executor: executor.into(),
                report: ProgressReport {
                    changefeed: cf.clone(),
                    epoch,
                    checkpoint_ts: checkpoint,
                    resolved_ts: checkpoint,
                    error: error.map(Into::into),
                },
            })
            .unwrap();
    }

    fn create(&mut self, id: &str, selector: &[(&str, &str)]) -> ChangefeedId {
        let cf = ChangefeedId::new("default", id);
        let info = ChangefeedInfo {
            sink_uri: "blackhole://".into(),
            start_ts: 100,
            target_ts: 0,
            config: serde_json::json!({}),
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            state: FeedState::Normal,
            error: None,
            create_time: rfc3339(NOW),
        };
        let status = ChangefeedStatus {
            checkpoint_ts: 100,
            ..Default::default()
        };
        self.tester
            .external_write(&self.keys.info(&cf), Some(&json(&info)));
        self.tester
            .external_write(&self.keys.status(&cf), Some(&json(&status)));
        cf
    }

    /// An admin change of the state, as the API writes it: the info and the
    /// status at a new epoch.
    fn set_state(&mut self, cf: &ChangefeedId, feed_state: FeedState) {
        let entry = &self.tester.state().changefeeds[cf];
        let mut info = entry.info.clone().unwrap();
        info.state = feed_state;
        let mut status = entry.status.clone().unwrap_or_default();
        status.epoch =
            crate::owner::state::next_epoch(status.epoch, self.tester.revision()).unwrap();
        self.tester
            .external_write(&self.keys.info(cf), Some(&json(&info)));
        self.tester
            .external_write(&self.keys.status(cf), Some(&json(&status)));
    }

    /// The executor holding a task of `cf` (current or not), and its epoch.
    fn task(&self, cf: &ChangefeedId) -> Option<(String, u64)> {
        self.entry(cf)
            .tasks
            .iter()
            .next()
            .map(|(e, t)| (e.clone(), t.epoch))
    }

    fn tick(&mut self) {
        let (result, plan) = self.tester.tick(&mut self.owner);
        result.unwrap();
        plan.unwrap();
    }

    fn entry(&self, cf: &ChangefeedId) -> &ChangefeedEntry {
        &self.tester.state().changefeeds[cf]
    }

    /// The executor of the current assignment.
    fn holder(&self, cf: &ChangefeedId) -> Option<String> {
        self.assignment(cf).map(|(e, _)| e)
    }

    fn assignment(&self, cf: &ChangefeedId) -> Option<(String, u64)> {
        let entry = self.entry(cf);
        assert!(
            entry.tasks.len() <= 1,
            "at most one task: {:?}",
            entry.tasks
        );
        entry
            .current_executor()
            .map(|e| (e.to_owned(), entry.status.as_ref().unwrap().epoch))
    }
}

fn executor(id: &str, labels: &[(&str, &str)]) -> LiveExecutor {
    ExecutorRecord {
        id: id.into(),
        name: id.into(),
        address: format!("{id}:9000"),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// Found by `fuzz/global_state`: a status written from outside with a
/// `retry_after_ms` past the year 9999 made every tick panic formatting
/// it; the last epoch or retry count overflowed.
#[test]
fn extreme_values_in_a_stored_status_do_not_panic_the_tick() {
    let mut h = Harness::new();
    h.executors(&[("e1", &[])]);
    let put_status = |h: &mut Harness, cf: &ChangefeedId, status: ChangefeedStatus| {
        h.tester
            .external_write(&h.keys.status(cf), Some(&json(&status)));
    };
    let backing_off = h.create("backoff", &[]);
    put_status(
        &mut h,
        &backing_off,
        ChangefeedStatus {
            retry_after_ms: u64::MAX,
            ..Default::default()
        },
    );
    let last_epoch = h.create("last-epoch", &[]);
    put_status(
        &mut h,
        &last_epoch,
        ChangefeedStatus {
            epoch: u64::MAX,
            ..Default::default()
        },
    );
    h.tick();
    let reason = |h: &Harness, cf| h.entry(cf).status.clone().unwrap().pending_reason;
    assert_eq!(h.assignment(&backing_off), None);
    assert!(
        reason(&h, &backing_off)
            .unwrap()
            .contains("18446744073709551615 ms after the Unix epoch"),
        "{:?}",
        reason(&h, &backing_off)
    );
    assert_eq!(h.assignment(&last_epoch), None);
    assert!(reason(&h, &last_epoch).unwrap().contains("is the last one"));
    assert_eq!(
        h.entry(&last_epoch).status.as_ref().unwrap().epoch,
        u64::MAX
    );

    // Retries at their maximum: one more error is still counted.
    let failing = h.create("failing", &[]);
    h.tick();
    let (executor, epoch) = h.assignment(&failing).unwrap();
    put_status(
        &mut h,
        &failing,
        ChangefeedStatus {
            epoch,
            // Ahead of the report: no progress resets the count.
            checkpoint_ts: 1_000,
            retries: u32::MAX,
            ..Default::default()
        },
    );
    h.progress(&executor, &failing, epoch, 200, Some("boom"));
    h.tick();
    assert_eq!(h.entry(&failing).status.as_ref().unwrap().retries, u32::MAX);
    assert_eq!(
        h.entry(&failing).info.as_ref().unwrap().state,
        FeedState::Failed
    );
}

#[test]
fn nothing_is_scheduled_before_the_live_executors_are_known() {
    let mut h = Harness::new();
    let cf = h.create("a", &[]);
    h.tick();
    assert_eq!(h.assignment(&cf), None);
    assert!(h
        .entry(&cf)
        .status
        .as_ref()
        .unwrap()
        .pending_reason
        .is_none());
    h.executors(&[("e1", &[])]);
    h.tick();
    assert_eq!(h.holder(&cf), Some("e1".into()));
}

#[test]
fn thirty_changefeeds_balance_ten_per_executor() {
    let mut h = Harness::new();
    h.executors(&[("e1", &[]), ("e2", &[]), ("e3", &[])]);
    let cfs: Vec<_> = (0..30)
        .map(|i| h.create(&format!("cf{i:02}"), &[]))
        .collect();
    h.tick();
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for cf in &cfs {
        *per.entry(h.assignment(cf).unwrap().0).or_default() += 1;
    }
    assert_eq!(per.values().copied().collect::<Vec<_>>(), vec![10, 10, 10]);
    // A second tick changes nothing.
    let before = h.tester.revision();
    h.tick();
    assert_eq!(
        h.tester.revision(),
        before,
        "a stable assignment writes nothing"
    );
}

#[test]
fn ties_go_to_the_lowest_id_and_selectors_are_respected() {
    let mut h = Harness::new();
    h.executors(&[("b", &[("zone", "x")]), ("a", &[("zone", "y")])]);
    let any = h.create("any", &[]);
    let x = h.create("x", &[("zone", "x")]);
    let none = h.create("none", &[("zone", "z")]);
    h.tick();
    assert_eq!(h.holder(&any), Some("a".into()));
    assert_eq!(h.holder(&x), Some("b".into()));
    assert_eq!(h.assignment(&none), None);
    let reason = h
        .entry(&none)
        .status
        .as_ref()
        .unwrap()
        .pending_reason
        .clone()
        .unwrap();
    assert!(reason.contains("selector"), "{reason}");
}

/// After a failover the registry loads every stored executor as `initing`,
/// some of them gone for good (their delete had not reached SQL): with load 0
/// they would take every moved changefeed and stall it for the grace. Work
/// goes to executors heartbeating to this leader first.
#[test]
fn initing_executors_get_work_only_when_no_heartbeating_one_matches() {
    let mut h = Harness::new();
    h.executors(&[("busy", &[])]);
    for i in 0..3 {
        h.create(&format!("old{i}"), &[]);
    }
    h.tick();
    // A new leader: "ghost" (load 0, zone a) never heartbeats to it.
    h.inputs
        .send(OwnerInput::Executors {
            live: vec![executor("busy", &[]), executor("ghost", &[("zone", "a")])],
            initing: vec!["ghost".into()],
        })
        .unwrap();
    let any = h.create("any", &[]);
    let only_ghost = h.create("zone-a", &[("zone", "a")]);
    h.tick();
    assert_eq!(
        h.holder(&any),
        Some("busy".into()),
        "the least loaded is initing"
    );
    assert_eq!(
        h.holder(&only_ghost),
        Some("ghost".into()),
        "no heartbeating executor matches: the initing one is better than none"
    );
    // Its first heartbeat: now the least loaded wins again.
    h.inputs
        .send(OwnerInput::Online {
            executor: executor("ghost", &[("zone", "a")]),
            initing: false,
        })
        .unwrap();
    let next = h.create("next", &[]);
    h.tick();
    assert_eq!(h.holder(&next), Some("ghost".into()));
}

#[test]
fn an_offline_executor_s_changefeeds_move_with_a_higher_epoch() {
    let mut h = Harness::new();
    h.executors(&[("e1", &[]), ("e2", &[])]);
    let cf = h.create("a", &[]);
    h.tick();
    let (first, epoch) = h.assignment(&cf).unwrap();
    // Reported, not yet persisted (within the checkpoint interval) when the
    // executor goes offline: the successor still starts from it.
    let start = h.checkpoint(&cf);
    assert!(start < 150);
    h.progress(&first, &cf, epoch, 150, None);
    h.tick();
    assert!(
        !h.entry(&cf).positions.contains_key(&first),
        "positions are not written"
    );
    assert_eq!(
        h.checkpoint(&cf),
        start,
        "not persisted within the interval"
    );
    h.offline(&first);
    h.tick();
    let (second, new_epoch) = h.assignment(&cf).unwrap();
    assert_ne!(first, second);
    assert!(new_epoch > epoch, "{new_epoch} > {epoch}");
    let entry = h.entry(&cf);
    assert!(
        !entry.tasks.contains_key(&first) && !entry.positions.contains_key(&first),
        "old task keys deleted"
    );
    assert_eq!(
        entry.status.as_ref().unwrap().checkpoint_ts,
        150,
        "the new one resumes from the checkpoint"
    );
    assert_eq!(
        h.tester.value(&h.keys.executor(&first)),
        None,
        "mirror updated"
    );
}

#[test]
fn the_checkpoint_never_goes_back_and_stale_epochs_are_ignored() {
    let mut h = Harness::new();
    h.executors(&[("e1", &[]), ("e2", &[])]);
    let cf = h.create("a", &[]);
    h.tick();
    let (e, epoch) = h.assignment(&cf).unwrap();
    let other = if e == "e1" { "e2" } else { "e1" };
    for (checkpoint, expected) in [(200, 200), (180, 200), (200, 200), (250, 250)] {
        h.progress(&e, &cf, epoch, checkpoint, None);
        advance(OwnerConfig::default().checkpoint_interval);
        h.tick();
        assert_eq!(
            h.entry(&cf).status.as_ref().unwrap().checkpoint_ts,
            expected
        );
    }
    // A zombie (another executor, or an old epoch) cannot move it.
    h.progress(other, &cf, epoch, 900, None);
    h.progress(&e, &cf, epoch - 1, 900, None);
    advance(OwnerConfig::default().checkpoint_interval);
    h.tick();
    assert_eq!(h.entry(&cf).status.as_ref().unwrap().checkpoint_ts, 250);
    assert!(!h.entry(&cf).positions.contains_key(other));
}

#[test]
fn paused_and_resumed_changefeeds_are_unassigned_and_reassigned() {
    let mut h = Harness::new();
    h.executors(&[("e1", &[])]);
    let cf = h.create("a", &[]);
    h.tick();
    let (_, first) = h.assignment(&cf).unwrap();
    h.set_state(&cf, FeedState::Stopped);
    h.tick();
    // Taken away, not released: the task stays, and the status says so.
    assert_eq!(h.task(&cf), Some(("e1".into(), first)));
    let releasing = h.entry(&cf).status.clone().unwrap().releasing.unwrap();
    assert_eq!(
        (releasing.executor.as_str(), releasing.epoch),
        ("e1", first)
    );
    h.released("e1", &cf, first);
    h.tick();
    assert!(h.entry(&cf).tasks.is_empty());
    assert_eq!(h.entry(&cf).status.clone().unwrap().releasing, None);
    h.set_state(&cf, FeedState::Normal);
    h.tick();
    let (e, epoch) = h.assignment(&cf).unwrap();
    assert_eq!(e, "e1");
    assert!(
        epoch > first + 1,
        "a pause and a resume each start an epoch"
    );
}

/// The hand-off rule on each path that takes a changefeed away from a live
/// executor: nothing is assigned again until the old holder acknowledged the
/// stop of that very task, or the longest lease passed since the owner saw it
/// taken away.
#[test]
fn a_changefeed_taken_away_is_assigned_again_only_once_released() {
    let max_lease = OwnerConfig::default().max_lease;
    // Pause + resume (a rewind) while the old holder still runs it.
    let mut h = Harness::new();
    h.executors(&[("e1", &[]), ("e2", &[]), ("e3", &[])]);
    let cf = h.create("a", &[]);
    h.tick();
    let (old, epoch) = h.assignment(&cf).unwrap();
    h.set_state(&cf, FeedState::Stopped);
    h.set_state(&cf, FeedState::Normal);
    h.tick();
    assert_eq!(h.assignment(&cf), None, "the old holder may still run it");
    assert_eq!(h.task(&cf), Some((old.clone(), epoch)));
    let reason = h.entry(&cf).status.clone().unwrap().pending_reason.unwrap();
    assert!(
        reason.starts_with("releasing: waiting for executor"),
        "{reason}"
    );
    // An acknowledgement of another task (another epoch, another executor)
    // releases nothing.
    h.released(&old, &cf, epoch + 1);
    h.released("e2", &cf, epoch);
    h.tick();
    assert_eq!(h.assignment(&cf), None);
    assert_eq!(h.task(&cf), Some((old.clone(), epoch)));
    h.released(&old, &cf, epoch);
    h.tick();
    let (_, new_epoch) = h.assignment(&cf).expect("released: assigned again");
    assert!(new_epoch > epoch);
    assert_eq!(h.entry(&cf).tasks.len(), 1, "the old task is gone");
    assert_eq!(h.entry(&cf).status.clone().unwrap().releasing, None);

    // No acknowledgement: the longest lease from when the owner saw it go.
    let (holder, epoch) = h.assignment(&cf).unwrap();
    h.set_state(&cf, FeedState::Stopped);
    h.set_state(&cf, FeedState::Normal);
    h.tick();
    advance(max_lease - Duration::from_millis(1));
    h.tick();
    assert_eq!(h.task(&cf), Some((holder.clone(), epoch)), "not yet");
    advance(Duration::from_millis(1));
    h.tick();
    assert!(
        h.assignment(&cf).is_some(),
        "its lease has certainly lapsed"
    );

    // Deregistered by an operator: released when the lease it had left ends,
    // or at once by an acknowledgement.
    let (holder, _) = h.assignment(&cf).unwrap();
    h.deregistered(&holder, Duration::from_secs(5));
    h.tick();
    assert_eq!(
        h.entry(&cf).tasks.keys().collect::<Vec<_>>(),
        [&holder],
        "still the gone holder's only"
    );
    advance(Duration::from_secs(5));
    h.tick();
    let (next, _) = h.assignment(&cf).expect("its lease lapsed");
    assert_ne!(next, holder);

    // Expired: its lease has lapsed already; moved in the same tick.
    h.offline(&next);
    h.tick();
    let (last, _) = h.assignment(&cf).expect("moved at once");
    assert_ne!(last, next);
}

#[test]
fn errors_back_off_then_fail_after_max_retries() {
    let mut h = Harness::new();
    h.owner.config.retry_backoff = Duration::ZERO;
    h.executors(&[("e1", &[])]);
    let cf = h.create("a", &[]);
    h.tick();
    for retry in 1..=3 {
        let (e, epoch) = h.assignment(&cf).expect("assigned");
        h.progress(&e, &cf, epoch, 100, Some("sink down"));
        h.tick(); // unassigned, retries = n
        assert_eq!(h.entry(&cf).status.as_ref().unwrap().retries, retry);
        h.tick();
        assert_eq!(
            h.assignment(&cf),
            None,
            "not before the stop is acknowledged"
        );
        h.released(&e, &cf, epoch);
        h.tick(); // reassigned (zero backoff)
    }
    let (e, epoch) = h.assignment(&cf).expect("assigned");
    h.progress(&e, &cf, epoch, 100, Some("sink down"));
    h.tick();
    let info = h.entry(&cf).info.clone().unwrap();
    assert_eq!(info.state, FeedState::Failed);
    assert_eq!(info.error.as_deref(), Some("sink down"));
    assert_eq!(h.assignment(&cf), None);
    h.released(&e, &cf, epoch);
    h.tick();
    assert!(h.entry(&cf).tasks.is_empty());
    h.tick();
    assert!(
        h.entry(&cf).tasks.is_empty(),
        "a failed changefeed stays unassigned"
    );
}

#[test]
fn an_error_waits_for_its_backoff_before_reassignment() {
    let mut h = Harness::new();
    h.executors(&[("e1", &[])]);
    let cf = h.create("a", &[]);
    h.tick();
    let (e, epoch) = h.assignment(&cf).unwrap();
    h.progress(&e, &cf, epoch, 100, Some("boom"));
    h.tick();
    let reason = h.entry(&cf).status.clone().unwrap().pending_reason.unwrap();
    assert!(
        reason.contains("reported an error (retry 1 of 3): boom"),
        "{reason}"
    );
    h.released(&e, &cf, epoch);
    h.tick();
    assert_eq!(h.assignment(&cf), None, "backing off (2 s by default)");
    let status = h.entry(&cf).status.clone().unwrap();
    assert_eq!(status.retry_after_ms, NOW + 2_000);
    assert!(status.pending_reason.unwrap().contains("backing off"));
    // Nothing else happens to it; its wake-up brings it back before the
    // next full pass.
    advance(Duration::from_millis(1_000));
    h.tick();
    assert_eq!(h.assignment(&cf), None);
    advance(Duration::from_millis(1_000));
    h.tick();
    assert!(!h.owner.last_tick().full);
    assert!(
        h.assignment(&cf).is_some(),
        "reassigned when the backoff ended"
    );
}

#[test]
fn reaching_the_target_finishes_the_changefeed() {
    let mut h = Harness::new();
    h.executors(&[("e1", &[])]);
    let cf = h.create("a", &[]);
    let mut info = h.entry(&cf).info.clone().unwrap();
    info.target_ts = 500;
    h.tester
        .external_write(&h.keys.info(&cf), Some(&json(&info)));
    h.tick();
    let (e, epoch) = h.assignment(&cf).unwrap();
    h.progress(&e, &cf, epoch, 500, None);
    h.tick();
    assert_eq!(
        h.entry(&cf).info.as_ref().unwrap().state,
        FeedState::Finished
    );
    h.tick();
    assert_eq!(h.task(&cf), Some((e.clone(), epoch)), "until released");
    h.released(&e, &cf, epoch);
    h.tick();
    assert!(h.entry(&cf).tasks.is_empty());
}

#[test]
fn leftovers_of_a_deleted_changefeed_are_removed() {
    let mut h = Harness::new();
    h.executors(&[("e1", &[])]);
    let cf = h.create("a", &[]);
    h.tick();
    let (e, epoch) = h.assignment(&cf).unwrap();
    // Deleted as the API does: info and status; the task is the owner's.
    h.tester.external_write(&h.keys.info(&cf), None);
    h.tester.external_write(&h.keys.status(&cf), None);
    h.tick();
    assert_eq!(h.task(&cf), Some((e.clone(), epoch)), "until released");

    // Created again meanwhile: not assigned while the old task is held, then
    // at an epoch above every one the id had.
    let again = h.create("a", &[]);
    h.tick();
    assert_eq!(h.assignment(&again), None);
    assert_eq!(h.task(&cf), Some((e.clone(), epoch)));
    h.released(&e, &cf, epoch);
    h.tick();
    let (_, new_epoch) = h.assignment(&again).unwrap();
    assert!(new_epoch > epoch, "{new_epoch} > {epoch}");

    let (e, epoch) = h.assignment(&cf).unwrap();
    h.tester.external_write(&h.keys.info(&cf), None);
    h.tester.external_write(&h.keys.status(&cf), None);
    h.tick();
    h.released(&e, &cf, epoch);
    h.tick();
    assert!(!h.tester.state().changefeeds.contains_key(&cf));
    assert!(
        h.tester.raw().keys().all(|k| !k.contains("/a")),
        "{:?}",
        h.tester.raw().keys()
    );
}

/// Writes task keys (status and position) for `n` executors that are
/// not live, as if they had accumulated or were written from outside.
fn write_stale_tasks(h: &mut Harness, cf: &ChangefeedId, n: usize) {
    for i in 0..n {
        let executor = format!("gone-{i:03}");
        let task = TaskStatus {
            epoch: 1,
            assigned_at: rfc3339(NOW),
            written_by: String::new(),
        };
        let position = TaskPosition {
            epoch: 1,
            checkpoint_ts: 100,
            resolved_ts: 100,
            error: None,
        };
        h.tester
            .external_write(&h.keys.task_status(cf, &executor), Some(&json(&task)));
        h.tester
            .external_write(&h.keys.task_position(cf, &executor), Some(&json(&position)));
    }
}

#[test]
fn hundreds_of_stale_tasks_go_over_several_ticks_each_group_fitting_one_txn() {
    let mut h = Harness::new();
    h.executors(&[("e1", &[])]);
    let live = h.create("live", &[]);
    let deleted = h.create("deleted", &[]);
    write_stale_tasks(&mut h, &live, 150);
    write_stale_tasks(&mut h, &deleted, 150);
    h.tester.external_write(&h.keys.info(&deleted), None);
    // Executors this owner never knew: released the longest lease after it
    // first saw their tasks.
    h.tick();
    advance(OwnerConfig::default().max_lease);
    // 300 keys per changefeed: one group would need 300+ ops. Each tick's
    // plan must succeed (Harness::tick unwraps it) and make progress.
    for _ in 0..150usize.div_ceil(MAX_STALE_TASKS_PER_TICK) {
        h.tick();
    }
    let entry = h.entry(&live);
    assert_eq!(entry.tasks.keys().collect::<Vec<_>>(), ["e1"]);
    assert!(entry.positions.keys().all(|e| e == "e1"));
    assert!(!h.tester.state().changefeeds.contains_key(&deleted));
    assert!(
        h.tester.raw().keys().all(|k| !k.contains("gone-")),
        "stale keys left"
    );
}

#[test]
fn executors_are_mirrored_under_meta() {
    let mut h = Harness::new();
    h.executors(&[("e1", &[("zone", "a")])]);
    h.tick();
    let record: ExecutorRecord =
        serde_json::from_slice(h.tester.value(&h.keys.executor("e1")).unwrap()).unwrap();
    assert_eq!(record.labels["zone"], "a");
    h.inputs
        .send(OwnerInput::Online {
            executor: executor("e2", &[]),
            initing: false,
        })
        .unwrap();
    h.offline("e1");
    h.tick();
    assert!(h.tester.value(&h.keys.executor("e1")).is_none());
    assert!(h.tester.value(&h.keys.executor("e2")).is_some());
}

#[test]
fn a_restarted_owner_keeps_the_assignments_it_finds() {
    let mut h = Harness::new();
    h.executors(&[("e1", &[]), ("e2", &[])]);
    let cfs: Vec<_> = (0..6).map(|i| h.create(&format!("cf{i}"), &[])).collect();
    h.tick();
    let before: Vec<_> = cfs.iter().map(|cf| h.assignment(cf)).collect();
    // A new owner over the same state (same executors alive).
    let (tx, rx) = mpsc::unbounded_channel();
    h.owner = OwnerReactor::new(rx, OwnerConfig::default()).with_clock(now);
    h.inputs = tx;
    h.executors(&[("e2", &[]), ("e1", &[])]);
    let revision = h.tester.revision();
    h.tick();
    assert_eq!(h.tester.revision(), revision, "nothing moved");
    let after: Vec<_> = cfs.iter().map(|cf| h.assignment(cf)).collect();
    assert_eq!(before, after);
}

#[test]
fn a_checkpoint_is_persisted_at_most_once_per_interval() {
    let interval = Duration::from_secs(10);
    let mut h = Harness::with_config(OwnerConfig {
        checkpoint_interval: interval,
        ..OwnerConfig::default()
    });
    h.executors(&[("e1", &[])]);
    let cf = h.create("a", &[]);
    h.tick(); // assigned: the status is written now
    let (e, epoch) = h.assignment(&cf).unwrap();
    let start = h.checkpoint(&cf);
    let tick = Duration::from_millis(100);
    let ticks = (interval.as_millis() / tick.as_millis()) as u64;
    for n in 1..ticks {
        h.progress(&e, &cf, epoch, start + n, None);
        advance(tick);
        h.tick();
        assert_eq!(
            h.checkpoint(&cf),
            start,
            "tick {n}: written within the interval"
        );
    }
    h.progress(&e, &cf, epoch, start + ticks, None);
    advance(tick);
    h.tick();
    assert_eq!(h.checkpoint(&cf), start + ticks, "due after the interval");
    // Any other status change carries the latest checkpoint at once.
    h.progress(&e, &cf, epoch, start + ticks + 5, Some("sink down"));
    advance(tick);
    h.tick();
    let status = h.entry(&cf).status.clone().unwrap();
    assert_eq!(
        (status.checkpoint_ts, status.retries),
        (start + ticks + 5, 1)
    );
}

#[test]
fn the_checkpoint_write_budget_holds_and_reaches_every_changefeed() {
    const FEEDS: u64 = 100;
    const RATE: u32 = 10;
    let mut h = Harness::with_config(OwnerConfig {
        checkpoint_interval: Duration::ZERO,
        max_checkpoint_writes: RATE,
        ..OwnerConfig::default()
    });
    h.executors(&[("e1", &[]), ("e2", &[])]);
    let feeds: Vec<_> = (0..FEEDS)
        .map(|i| h.create(&format!("f{i:03}"), &[]))
        .collect();
    h.tick();
    let assigned: Vec<_> = feeds.iter().map(|cf| h.assignment(cf).unwrap()).collect();
    let start: Vec<u64> = feeds.iter().map(|cf| h.checkpoint(cf)).collect();
    // A flood: every changefeed advances at every tick (100 ms) for 20 s.
    let tick = Duration::from_millis(100);
    let mut written = 0;
    for n in 1..=200u64 {
        for ((cf, (e, epoch)), start) in feeds.iter().zip(&assigned).zip(&start) {
            h.progress(e, cf, *epoch, start + n, None);
        }
        let before: Vec<u64> = feeds.iter().map(|cf| h.checkpoint(cf)).collect();
        advance(tick);
        h.tick();
        let now_written = feeds
            .iter()
            .zip(&before)
            .filter(|(cf, b)| h.checkpoint(cf) != **b)
            .count();
        written += now_written;
        // One second's worth at most at once, then the rate.
        assert!(
            now_written <= RATE as usize,
            "tick {n}: {now_written} writes"
        );
    }
    // 20 s at 10/s, plus the first second's burst.
    assert!(written <= 21 * RATE as usize, "{written} writes in 20 s");
    assert!(
        written >= 19 * RATE as usize,
        "{written} writes in 20 s: budget unused"
    );
    // Least recently written first: every changefeed got its turn (200
    // writes over 100 changefeeds: each at least once).
    for (cf, start) in feeds.iter().zip(&start) {
        assert!(h.checkpoint(cf) > *start, "{cf:?} never persisted");
    }
}

#[test]
fn an_incremental_tick_visits_only_what_something_happened_to() {
    const FEEDS: usize = 1000;
    let mut h = Harness::new();
    h.executors(&[("e1", &[]), ("e2", &[]), ("e3", &[]), ("e4", &[])]);
    let feeds: Vec<_> = (0..FEEDS)
        .map(|i| h.create(&format!("f{i:04}"), &[]))
        .collect();
    h.tick();
    assert_eq!(
        h.owner.last_tick(),
        TickStats {
            full: true,
            visited: FEEDS
        }
    );
    // The commit touched every changefeed once; then the cluster is idle.
    h.tick();
    assert_eq!(
        h.owner.last_tick(),
        TickStats {
            full: false,
            visited: FEEDS
        }
    );
    h.tick();
    assert_eq!(
        h.owner.last_tick(),
        TickStats {
            full: false,
            visited: 0
        }
    );

    // Progress of three steady changefeeds: no visit (only their
    // checkpoints move), and the checkpoints are persisted once due.
    for cf in &feeds[..3] {
        let (e, epoch) = h.assignment(cf).unwrap();
        h.progress(&e, cf, epoch, 500, None);
    }
    h.tick();
    assert_eq!(h.owner.last_tick().visited, 0);
    advance(OwnerConfig::default().checkpoint_interval);
    h.tick();
    for cf in &feeds[..3] {
        assert_eq!(h.checkpoint(cf), 500);
    }
    // The writes touched them: visited once more, then idle again.
    h.tick();
    assert_eq!(h.owner.last_tick().visited, 3);
    h.tick();
    assert_eq!(h.owner.last_tick().visited, 0);

    // An executor goes offline: exactly its changefeeds are visited, and
    // exactly they move.
    let on_e2: Vec<_> = feeds
        .iter()
        .filter(|cf| h.assignment(cf).unwrap().0 == "e2")
        .cloned()
        .collect();
    assert_eq!(on_e2.len(), FEEDS / 4);
    let before: Vec<_> = feeds.iter().map(|cf| h.assignment(cf).unwrap()).collect();
    h.offline("e2");
    h.tick();
    assert_eq!(
        h.owner.last_tick(),
        TickStats {
            full: false,
            visited: on_e2.len()
        }
    );
    for (cf, (was, epoch)) in feeds.iter().zip(&before) {
        let (now, new_epoch) = h.assignment(cf).unwrap();
        if was == "e2" {
            assert_ne!(now, "e2");
            assert!(new_epoch > *epoch, "{new_epoch} > {epoch}");
        } else {
            assert_eq!((&now, new_epoch), (was, *epoch), "{cf:?} moved");
        }
    }
    // Balanced over the three left: 333 or 334 each.
    let mut load = BTreeMap::<String, usize>::new();
    for cf in &feeds {
        *load.entry(h.assignment(cf).unwrap().0).or_default() += 1;
    }
    assert!(load.values().all(|n| (333..=334).contains(n)), "{load:?}");

    // The safety net: a full pass once the interval has passed.
    h.tick();
    advance(OwnerConfig::default().full_pass_interval);
    h.tick();
    assert_eq!(
        h.owner.last_tick(),
        TickStats {
            full: true,
            visited: FEEDS
        }
    );
}

#[test]
fn a_changefeed_waiting_for_a_matching_executor_gets_the_one_that_comes_online() {
    let mut h = Harness::new();
    h.executors(&[("e1", &[("zone", "a")])]);
    let cf = h.create("b-only", &[("zone", "b")]);
    h.tick();
    assert_eq!(h.assignment(&cf), None);
    h.tick();
    h.tick();
    assert_eq!(h.owner.last_tick().visited, 0, "idle while nothing changes");
    h.inputs
        .send(OwnerInput::Online {
            executor: executor("e2", &[("zone", "b")]),
            initing: false,
        })
        .unwrap();
    h.tick();
    assert!(!h.owner.last_tick().full);
    assert_eq!(h.assignment(&cf).map(|a| a.0), Some("e2".to_owned()));
    assert!(
        h.tester.value(&h.keys.executor("e2")).is_some(),
        "mirrored without a full pass"
    );
}

#[test]
fn the_sweep_visits_every_changefeed_once_per_interval_a_slice_per_tick() {
    const FEEDS: usize = 1200;
    let mut h = Harness::new();
    h.executors(&[("e1", &[]), ("e2", &[])]);
    let feeds: Vec<_> = (0..FEEDS)
        .map(|i| h.create(&format!("f{i:04}"), &[]))
        .collect();
    h.tick();
    h.tick(); // the commit touched every changefeed once
              // The default: every changefeed once per 60 s; ticks of 100 ms visit
              // 2 each, in key order, and the 600th completes the sweep.
    let tick = Duration::from_millis(100);
    let ticks = OwnerConfig::default().full_pass_interval.as_millis() / tick.as_millis();
    let mut visited = 0;
    for n in 1..=ticks {
        advance(tick);
        h.tick();
        let stats = h.owner.last_tick();
        assert_eq!(stats.visited, FEEDS / ticks as usize, "tick {n}");
        assert_eq!(stats.full, n == ticks, "tick {n}");
        visited += stats.visited;
    }
    assert_eq!(visited, FEEDS);
    advance(tick);
    h.tick();
    assert_eq!(
        h.owner.last_tick(),
        TickStats {
            full: false,
            visited: FEEDS / ticks as usize
        },
        "the next sweep begins"
    );
    // A changefeed the sweep finds out of order is fixed by it: an
    // assignment deleted from outside (the update not seen as a touch) is
    // made again.
    let cf = &feeds[FEEDS / 2];
    let (e, _) = h.assignment(cf).unwrap();
    h.tester.external_write(&h.keys.task_status(cf, &e), None);
    h.tester.state_mut().take_touched();
    for _ in 0..ticks {
        advance(tick);
        h.tick();
    }
    assert!(h.assignment(cf).is_some(), "the sweep reassigned it");
}

/// The status names the executor of the current assignment (what the API
/// reads instead of the task keys): set with the task, moved with it, cleared
/// while nobody runs it.
#[test]
fn the_status_names_the_holder_of_the_current_epoch() {
    let mut h = Harness::new();
    h.executors(&[("e1", &[]), ("e2", &[])]);
    let cf = h.create("a", &[]);
    h.tick();
    let holder = |h: &Harness| {
        h.entry(&cf)
            .status
            .as_ref()
            .unwrap()
            .current_holder()
            .map(str::to_owned)
    };
    let (first, _) = h.assignment(&cf).unwrap();
    assert_eq!(holder(&h), Some(first.clone()));
    // Paused: the epoch moved on, so nobody is named.
    h.set_state(&cf, FeedState::Stopped);
    h.tick();
    assert_eq!(holder(&h), None);
    let (_, epoch) = h.task(&cf).unwrap();
    h.released(&first, &cf, epoch);
    h.set_state(&cf, FeedState::Normal);
    h.tick();
    let (second, _) = h.assignment(&cf).unwrap();
    assert_eq!(holder(&h), Some(second.clone()));
    // Its executor deregistered with lease left: nobody runs it meanwhile.
    h.deregistered(&second, Duration::from_secs(5));
    h.tick();
    assert_eq!(holder(&h), None);
    advance(Duration::from_secs(5));
    h.tick();
    let (third, _) = h.assignment(&cf).unwrap();
    assert_eq!(holder(&h), Some(third));
}

/// More stale tasks than one tick deletes, one of them (past the cap) still
/// held: the changefeed is not assigned while it is.
#[test]
fn a_task_held_beyond_the_per_tick_cap_still_holds_the_changefeed_back() {
    let mut h = Harness::new();
    h.executors(&[("zz-live", &[])]);
    let cf = h.create("a", &[]);
    h.tick();
    let (holder, epoch) = h.assignment(&cf).unwrap();
    // Many released leftovers (executors this owner saw go: lapsed)...
    write_stale_tasks(&mut h, &cf, MAX_STALE_TASKS_PER_TICK + 5);
    for i in 0..MAX_STALE_TASKS_PER_TICK + 5 {
        h.offline(&format!("gone-{i:03}"));
    }
    // ...and the live holder's task taken away (sorted after them: past the cap).
    assert!(holder.as_str() > "gone-", "{holder}");
    h.set_state(&cf, FeedState::Stopped);
    h.set_state(&cf, FeedState::Normal);
    for _ in 0..3 {
        h.tick();
        assert!(
            h.entry(&cf).tasks.contains_key(&holder),
            "the live holder's task is held"
        );
        assert_eq!(
            h.entry(&cf).status.as_ref().unwrap().current_holder(),
            None,
            "not assigned while it is held"
        );
    }
    h.released(&holder, &cf, epoch);
    h.tick();
    h.tick();
    assert!(h.assignment(&cf).is_some());
}
