//! Mutations: create, update, pause, resume and delete, each a compare-and-swap
//! txn decided from a snapshot and decided again from the fresh keys when a compare
//! fails.

use std::time::SystemTime;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::batch::Ready;
use super::read::{collect, read_op, revision_of, view, Raw, Snapshot};
use super::request::{
    changefeed_id, now_ts, validate_config, validate_id, validate_selector, validate_sink_uri,
    CreateChangefeed, ResumeChangefeed, UpdateChangefeed,
};
use super::{encode, ChangefeedView, Changefeeds, Error, Result, MAX_ATTEMPTS};
use crate::owner::model::{ChangefeedId, ChangefeedInfo, ChangefeedStatus, FeedState, Keys};

/// What a mutation decided from a snapshot.
enum Plan {
    /// Already in the requested state: nothing to write.
    Nothing,
    /// Write `ops` if every compare still holds.
    Write {
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
    },
}

impl Changefeeds {
    /// Creates a changefeed in state `normal` with its status at
    /// `checkpoint_ts = start_ts`, epoch 0, in one txn that requires neither
    /// key to exist: a duplicate is [`Error::Exists`] and changes nothing.
    pub async fn create(
        &self,
        namespace: &str,
        request: CreateChangefeed,
    ) -> Result<ChangefeedView> {
        validate_id("namespace", namespace)?;
        let (cf, info, status) = prepare_create(namespace, request)?;
        let Ready {
            cf, info, status, ..
        } = self
            .create_grouped(Ready {
                index: 0,
                cf,
                info,
                status,
            })
            .await?;
        Ok(view(&cf, info, Some(status), None))
    }

    /// Replaces the given fields of a paused changefeed (409
    /// [`Error::NotPaused`] otherwise), at a new epoch. Fields equal to the
    /// stored ones write nothing.
    pub async fn update(
        &self,
        namespace: &str,
        id: &str,
        request: UpdateChangefeed,
    ) -> Result<ChangefeedView> {
        let cf = changefeed_id(namespace, id)?;
        if request.sink_uri.is_none() && request.config.is_none() && request.selector.is_none() {
            return Err(Error::InvalidArgument(
                "nothing to update: give at least one of sink_uri, config, selector".into(),
            ));
        }
        if let Some(sink_uri) = &request.sink_uri {
            validate_sink_uri(sink_uri)?;
        }
        let config = request.config.map(Some).map(validate_config).transpose()?;
        if let Some(selector) = &request.selector {
            validate_selector(selector)?;
        }
        let cf_keys = (self.keys.info(&cf), self.keys.status(&cf));
        let snapshot = self
            .mutate(&cf, |snapshot| {
                let (raw, mut info) = info_of(&cf, snapshot, false)?;
                if info.state != FeedState::Stopped {
                    return Err(Error::NotPaused {
                        id: cf.clone(),
                        state: info.state,
                        hint: "pause it before updating it",
                    });
                }
                let before = info.clone();
                if let Some(sink_uri) = &request.sink_uri {
                    info.sink_uri.clone_from(sink_uri);
                }
                if let Some(config) = &config {
                    info.config.clone_from(config);
                }
                if let Some(selector) = &request.selector {
                    info.selector.clone_from(selector);
                }
                if info == before {
                    return Ok(Plan::Nothing);
                }
                let status = next_epoch(snapshot, &info)?;
                Ok(write_both(&cf_keys, raw, snapshot, &info, &status))
            })
            .await?;
        self.view_of(&cf, &snapshot)
    }

    /// `normal` -> `stopped` at a new epoch (the status is written in the
    /// same txn); already stopped: nothing to do; failed or finished:
    /// [`Error::WrongState`]. The owner unassigns it.
    pub async fn pause(&self, namespace: &str, id: &str) -> Result<ChangefeedView> {
        let cf = changefeed_id(namespace, id)?;
        let cf_keys = (self.keys.info(&cf), self.keys.status(&cf));
        let snapshot = self
            .mutate(&cf, |snapshot| {
                let (raw, mut info) = info_of(&cf, snapshot, false)?;
                match info.state {
                    FeedState::Stopped => Ok(Plan::Nothing),
                    FeedState::Normal => {
                        info.state = FeedState::Stopped;
                        let status = next_epoch(snapshot, &info)?;
                        Ok(write_both(&cf_keys, raw, snapshot, &info, &status))
                    }
                    state @ (FeedState::Failed | FeedState::Finished) => Err(Error::WrongState {
                        id: cf.clone(),
                        state,
                        op: "pause",
                    }),
                }
            })
            .await?;
        self.view_of(&cf, &snapshot)
    }

    /// `stopped` or `failed` -> `normal` at a new epoch, clearing the error
    /// and the retry count and backoff in the status; with `checkpoint_ts`, the status
    /// checkpoint is rewritten too (it must lie in `[start_ts, target_ts)`).
    /// Both keys are written in one txn that compares both revisions.
    /// Already normal: nothing to do without a checkpoint, 409
    /// [`Error::NotPaused`] with one; finished: [`Error::WrongState`].
    pub async fn resume(
        &self,
        namespace: &str,
        id: &str,
        request: ResumeChangefeed,
    ) -> Result<ChangefeedView> {
        let cf = changefeed_id(namespace, id)?;
        let cf_keys = (self.keys.info(&cf), self.keys.status(&cf));
        let snapshot = self
            .mutate(&cf, |snapshot| {
                let replaced = request.checkpoint_ts.is_some();
                let (raw, mut info) = info_of(&cf, snapshot, replaced)?;
                match (info.state, request.checkpoint_ts) {
                    (FeedState::Normal, None) => return Ok(Plan::Nothing),
                    (FeedState::Normal, Some(_)) => {
                        return Err(Error::NotPaused {
                            id: cf.clone(),
                            state: info.state,
                            hint: "pause it before resuming it from another checkpoint",
                        })
                    }
                    (FeedState::Finished, _) => {
                        return Err(Error::WrongState {
                            id: cf.clone(),
                            state: info.state,
                            op: "resume",
                        })
                    }
                    (FeedState::Stopped | FeedState::Failed, _) => {}
                }
                let mut status = match (&snapshot.status, request.checkpoint_ts) {
                    // A new checkpoint replaces the status, malformed or not.
                    (Some(old), Some(_)) => old.decode().unwrap_or_default(),
                    (Some(old), None) => old.decode::<ChangefeedStatus>()?,
                    (None, _) => ChangefeedStatus {
                        checkpoint_ts: info.start_ts,
                        ..ChangefeedStatus::default()
                    },
                };
                if let Some(checkpoint_ts) = request.checkpoint_ts {
                    if checkpoint_ts < info.start_ts
                        || (info.target_ts != 0 && checkpoint_ts >= info.target_ts)
                    {
                        return Err(Error::InvalidArgument(format!(
                            "checkpoint_ts ({checkpoint_ts}) must be at least start_ts ({}){}",
                            info.start_ts,
                            if info.target_ts == 0 {
                                String::new()
                            } else {
                                format!(" and less than target_ts ({})", info.target_ts)
                            }
                        )));
                    }
                    status.checkpoint_ts = checkpoint_ts;
                }
                status.retries = 0;
                status.retry_after_ms = 0;
                // A new epoch: whatever still runs the old one stops, and its
                // progress cannot undo a rewind.
                bump_epoch(&mut status, snapshot.revision)?;
                info.state = FeedState::Normal;
                info.error = None;
                Ok(write_both(&cf_keys, raw, snapshot, &info, &status))
            })
            .await?;
        self.view_of(&cf, &snapshot)
    }

    /// Removes the changefeed's info and status in one txn, each compared on
    /// the revision it was read at (works on malformed values too). Its task
    /// keys stay for the owner, which deletes each once released (its executor
    /// acknowledged the stop, or its lease lapsed): a changefeed created again
    /// under the same id is not assigned while an old holder may still run the
    /// deleted one, and its epochs start above the old ones. [`Error::NotFound`]
    /// when neither key exists.
    pub async fn delete(&self, namespace: &str, id: &str) -> Result<()> {
        let cf = changefeed_id(namespace, id)?;
        let (info_key, status_key) = (self.keys.info(&cf), self.keys.status(&cf));
        self.mutate(&cf, |snapshot| {
            if snapshot.info.is_none() && snapshot.status.is_none() {
                return Err(Error::NotFound(cf.clone()));
            }
            Ok(Plan::Write {
                compares: vec![
                    unchanged(&info_key, snapshot.info.as_ref()),
                    unchanged(&status_key, snapshot.status.as_ref()),
                ],
                ops: vec![
                    TxnOp::delete(info_key.as_str(), None),
                    TxnOp::delete(status_key.as_str(), None),
                ],
            })
        })
        .await?;
        Ok(())
    }

    /// Reads the changefeed, decides with `plan`, and writes under the
    /// plan's compares; on a failed compare decides again from the fresh
    /// keys the failure branch returned. Returns the keys after the write.
    async fn mutate(
        &self,
        cf: &ChangefeedId,
        mut plan: impl FnMut(&Snapshot) -> Result<Plan>,
    ) -> Result<Snapshot> {
        let reads = self.reads(cf);
        let read_ops = || reads.iter().map(|key| read_op(key)).collect::<Vec<_>>();
        let mut snapshot = self.read(cf, &reads).await?;
        for _ in 0..MAX_ATTEMPTS {
            let (compares, mut ops) = match plan(&snapshot)? {
                Plan::Nothing => return Ok(snapshot),
                Plan::Write { compares, ops } => (compares, ops),
            };
            let writes = ops.len();
            // Reads after the writes in one txn see the writes.
            ops.extend(read_ops());
            let txn = Txn::new().when(compares).and_then(ops).or_else(read_ops());
            let response = self.txn(txn).await?;
            let skip = if response.succeeded() { writes } else { 0 };
            let kvs = collect(&response, skip);
            snapshot = self.snapshot(cf, kvs, revision_of(&response));
            if response.succeeded() {
                return Ok(snapshot);
            }
        }
        Err(Error::Conflict(cf.clone()))
    }
}

/// The status with the next epoch: an admin change that resets what the
/// executor runs (pause, resume, update) starts a new epoch, so the executor
/// that held the old one is told to stop and its progress (however late it
/// arrives) is rejected as stale; the owner assigns the changefeed again at a
/// later epoch, once the old one is released. A missing status starts from
/// `info.start_ts`.
fn next_epoch(snapshot: &Snapshot, info: &ChangefeedInfo) -> Result<ChangefeedStatus> {
    let mut status = match &snapshot.status {
        Some(raw) => raw.decode::<ChangefeedStatus>()?,
        None => ChangefeedStatus {
            checkpoint_ts: info.start_ts,
            ..ChangefeedStatus::default()
        },
    };
    bump_epoch(&mut status, snapshot.revision)?;
    Ok(status)
}

/// The next epoch (above the old one and the revision read at, so epochs rise
/// across a delete and a create: `owner::state::next_epoch`), or a 400 when
/// the status holds the last one.
fn bump_epoch(status: &mut ChangefeedStatus, revision: i64) -> Result<()> {
    status.epoch = crate::owner::state::next_epoch(status.epoch, revision).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "epoch {} is the last one: re-create the changefeed",
            status.epoch
        ))
    })?;
    Ok(())
}

/// Writes the info and the status of a changefeed in one txn, each compared
/// on the revision it was read at. `keys` are its (info, status) keys. The
/// status says the API wrote it (an empty `written_by`), whoever wrote the
/// value it started from: an audit of etcd's history must not take it for a
/// write of that server's owner.
fn write_both(
    keys: &(String, String),
    info_raw: &Raw,
    snapshot: &Snapshot,
    info: &ChangefeedInfo,
    status: &ChangefeedStatus,
) -> Plan {
    let (info_key, status_key) = keys;
    let status = &ChangefeedStatus {
        written_by: String::new(),
        ..status.clone()
    };
    Plan::Write {
        compares: vec![
            unchanged(info_key, Some(info_raw)),
            unchanged(status_key, snapshot.status.as_ref()),
        ],
        ops: vec![
            TxnOp::put(info_key.as_str(), encode(info), None),
            TxnOp::put(status_key.as_str(), encode(status), None),
        ],
    }
}

/// The changefeed's info, and the raw key to compare against. The status is
/// decoded too, unless `status_replaced`: a mutation must not write when
/// its answer could not be shown, so "500 corrupt_value" means "nothing
/// written".
fn info_of<'a>(
    cf: &ChangefeedId,
    snapshot: &'a Snapshot,
    status_replaced: bool,
) -> Result<(&'a Raw, ChangefeedInfo)> {
    let raw = snapshot
        .info
        .as_ref()
        .ok_or_else(|| Error::NotFound(cf.clone()))?;
    let info = raw.decode()?;
    if !status_replaced {
        if let Some(status) = &snapshot.status {
            status.decode::<ChangefeedStatus>()?;
        }
    }
    Ok((raw, info))
}

/// A compare that holds while `key` is as read (absent: still absent).
fn unchanged(key: &str, read: Option<&Raw>) -> Compare {
    Compare::mod_revision(
        key,
        CompareOp::Equal,
        read.map_or(0, |raw| raw.mod_revision),
    )
}

/// One changefeed's create: the compares that require neither of its keys to
/// exist, and the puts of both. The API sends several in one txn
/// (`create_chunk`); [`create_txn`] sends one.
pub(super) fn create_ops(
    keys: &Keys,
    cf: &ChangefeedId,
    info: &ChangefeedInfo,
    status: &ChangefeedStatus,
) -> ([Compare; 2], [TxnOp; 2]) {
    let (info_key, status_key) = (keys.info(cf), keys.status(cf));
    (
        [
            Compare::create_revision(info_key.as_str(), CompareOp::Equal, 0),
            Compare::create_revision(status_key.as_str(), CompareOp::Equal, 0),
        ],
        [
            TxnOp::put(info_key, encode(info), None),
            TxnOp::put(status_key, encode(status), None),
        ],
    )
}

/// One changefeed's create as a txn of its own: what a client writing to
/// etcd directly would send. Public for `examples/create_load.rs`, the raw-etcd
/// baseline of `scripts/bench-scale`'s create rate.
pub fn create_txn(
    keys: &Keys,
    cf: &ChangefeedId,
    info: &ChangefeedInfo,
    status: &ChangefeedStatus,
) -> Txn {
    let (compares, puts) = create_ops(keys, cf, info, status);
    Txn::new().when(compares).and_then(puts)
}

/// A create request checked and turned into what is stored: the changefeed's
/// info (state `normal`) and its status (`checkpoint_ts = start_ts`, epoch 0).
/// `namespace` must be valid already.
pub fn prepare_create(
    namespace: &str,
    request: CreateChangefeed,
) -> Result<(ChangefeedId, ChangefeedInfo, ChangefeedStatus)> {
    validate_id("changefeed id", &request.id)?;
    validate_sink_uri(&request.sink_uri)?;
    let config = validate_config(request.config)?;
    let selector = request.selector.unwrap_or_default();
    validate_selector(&selector)?;
    let start_ts = match request.start_ts {
        None | Some(0) => now_ts(),
        Some(ts) => ts,
    };
    let target_ts = request.target_ts.unwrap_or(0);
    if target_ts != 0 && target_ts <= start_ts {
        return Err(Error::InvalidArgument(format!(
            "target_ts ({target_ts}) must be 0 (run forever) or greater than start_ts ({start_ts})"
        )));
    }
    let cf = ChangefeedId::new(namespace, request.id);
    let info = ChangefeedInfo {
        sink_uri: request.sink_uri,
        start_ts,
        target_ts,
        config,
        selector,
        state: FeedState::Normal,
        error: None,
        create_time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
    };
    let status = ChangefeedStatus {
        checkpoint_ts: start_ts,
        ..ChangefeedStatus::default()
    };
    Ok((cf, info, status))
}
