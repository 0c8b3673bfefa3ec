//! The changefeed key layout in etcd and the JSON values stored there.
//!
//! ```text
//! <p>/__meta__/executor/<executor-id>              ExecutorRecord (mirror of the registry)
//! <p>/<ns>/changefeed/info/<id>                    ChangefeedInfo
//! <p>/<ns>/changefeed/status/<id>                  ChangefeedStatus
//! <p>/<ns>/task/status/<executor-id>/<id>          TaskStatus (the assignment)
//! <p>/<ns>/task/position/<executor-id>/<id>        TaskPosition (progress reported)
//! ```
//! Namespaces and changefeed ids: letters, digits, `-` and `_`, 1..128
//! characters; `__meta__` is reserved. Executor ids never contain `/`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The reserved first segment for cluster metadata.
pub const META: &str = "__meta__";
/// Longest namespace or changefeed id.
pub const MAX_ID_LEN: usize = 128;

/// Whether `s` is a valid namespace or changefeed id.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s != META
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A changefeed's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChangefeedId {
    pub namespace: String,
    pub id: String,
}

impl ChangefeedId {
    pub fn new(namespace: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            id: id.into(),
        }
    }
}

impl std::fmt::Display for ChangefeedId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.id)
    }
}

/// What a key under the prefix is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Executor(String),
    /// The leader election key (`__meta__/owner/<lease>`); not the owner's to write.
    Owner(String),
    ChangefeedInfo(ChangefeedId),
    ChangefeedStatus(ChangefeedId),
    TaskStatus {
        changefeed: ChangefeedId,
        executor: String,
    },
    TaskPosition {
        changefeed: ChangefeedId,
        executor: String,
    },
}

/// Builds and parses keys under one cluster prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` without a trailing `/`, e.g. `/flotilla/default`.
    pub fn new(prefix: impl Into<String>) -> Self {
        let mut prefix = prefix.into();
        while prefix.ends_with('/') {
            prefix.pop();
        }
        Self { prefix }
    }

    /// The prefix every key starts with, `/`-terminated (for watches).
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn executor(&self, executor: &str) -> String {
        format!("{}/{META}/executor/{executor}", self.prefix)
    }

    pub fn executors(&self) -> String {
        format!("{}/{META}/executor/", self.prefix)
    }

    pub fn owner_prefix(&self) -> String {
        format!("{}/{META}/owner/", self.prefix)
    }

    pub fn info(&self, cf: &ChangefeedId) -> String {
        format!("{}/{}/changefeed/info/{}", self.prefix, cf.namespace, cf.id)
    }

    pub fn status(&self, cf: &ChangefeedId) -> String {
        format!(
            "{}/{}/changefeed/status/{}",
            self.prefix, cf.namespace, cf.id
        )
    }

    pub fn task_status(&self, cf: &ChangefeedId, executor: &str) -> String {
        format!(
            "{}/{}/task/status/{executor}/{}",
            self.prefix, cf.namespace, cf.id
        )
    }

    pub fn task_position(&self, cf: &ChangefeedId, executor: &str) -> String {
        format!(
            "{}/{}/task/position/{executor}/{}",
            self.prefix, cf.namespace, cf.id
        )
    }

    /// Every changefeed info key of a namespace (for listings).
    pub fn infos(&self, namespace: &str) -> String {
        format!("{}/{namespace}/changefeed/info/", self.prefix)
    }

    /// Every changefeed status key of a namespace.
    pub fn statuses(&self, namespace: &str) -> String {
        format!("{}/{namespace}/changefeed/status/", self.prefix)
    }

    /// Every task status key of a namespace (all executors, all changefeeds).
    pub fn task_statuses(&self, namespace: &str) -> String {
        format!("{}/{namespace}/task/status/", self.prefix)
    }

    /// Every task position key of a namespace (all executors, all changefeeds).
    pub fn task_positions(&self, namespace: &str) -> String {
        format!("{}/{namespace}/task/position/", self.prefix)
    }

    /// Classifies a key; `None` for keys outside the layout.
    pub fn parse(&self, key: &str) -> Option<Key> {
        let rest = key.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        let cf = |ns: &str, id: &str| {
            (is_valid_id(ns) && is_valid_id(id)).then(|| ChangefeedId::new(ns, id))
        };
        match parts.as_slice() {
            [META, "executor", id] if !id.is_empty() => Some(Key::Executor((*id).to_owned())),
            [META, "owner", lease] if !lease.is_empty() => Some(Key::Owner((*lease).to_owned())),
            [ns, "changefeed", "info", id] => cf(ns, id).map(Key::ChangefeedInfo),
            [ns, "changefeed", "status", id] => cf(ns, id).map(Key::ChangefeedStatus),
            [ns, "task", "status", executor, id] if !executor.is_empty() => {
                cf(ns, id).map(|changefeed| Key::TaskStatus {
                    changefeed,
                    executor: (*executor).to_owned(),
                })
            }
            [ns, "task", "position", executor, id] if !executor.is_empty() => {
                cf(ns, id).map(|changefeed| Key::TaskPosition {
                    changefeed,
                    executor: (*executor).to_owned(),
                })
            }
            _ => None,
        }
    }
}

/// Whether a changefeed should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FeedState {
    /// Should run on exactly one live executor.
    Normal,
    /// Paused by an operator.
    Stopped,
    /// Gave up after `max_retries` errors.
    Failed,
    /// Reached its target_ts.
    Finished,
}

impl FeedState {
    pub const ALL: [FeedState; 4] = [
        FeedState::Normal,
        FeedState::Stopped,
        FeedState::Failed,
        FeedState::Finished,
    ];

    /// The name used in JSON and in `?state=` filters.
    pub fn as_str(self) -> &'static str {
        match self {
            FeedState::Normal => "normal",
            FeedState::Stopped => "stopped",
            FeedState::Failed => "failed",
            FeedState::Finished => "finished",
        }
    }

    /// The state named `s`, if any.
    pub fn parse(s: &str) -> Option<FeedState> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

/// `<p>/<ns>/changefeed/info/<id>`: what to run. Written by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangefeedInfo {
    pub sink_uri: String,
    pub start_ts: u64,
    /// 0: runs forever.
    #[serde(default)]
    pub target_ts: u64,
    /// Opaque configuration handed to the executor.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Labels an executor must have to run this changefeed.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub state: FeedState,
    /// The last error, when failed.
    #[serde(default)]
    pub error: Option<String>,
    /// RFC 3339.
    pub create_time: String,
}

/// `<p>/<ns>/changefeed/status/<id>`: where it is. Written by the owner
/// (and by the API on resume with a new checkpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangefeedStatus {
    /// Never goes backward (except by an explicit resume from a checkpoint).
    pub checkpoint_ts: u64,
    /// Incremented at every assignment; an executor's reports must carry it.
    pub epoch: u64,
    /// Errors reported since the last successful progress.
    #[serde(default)]
    pub retries: u32,
    /// Why the changefeed is not running, when it is not.
    #[serde(default)]
    pub pending_reason: Option<String>,
    /// Unix millis before which it is not reassigned (backoff after an error).
    #[serde(default)]
    pub retry_after_ms: u64,
    /// The server whose owner wrote this value (empty: the API wrote it).
    /// Lets an audit of etcd's history tell which leader wrote what.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub written_by: String,
    /// The assignment taken away from an executor that may still run it: the
    /// changefeed is not assigned again until it is released. Shown by the
    /// API; the rule itself does not depend on it (a new leader derives it
    /// from the task keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub releasing: Option<Releasing>,
    /// The executor the owner assigned, and at which epoch (written with the
    /// task, in one txn): the holder while `holder.epoch == epoch`, so reading
    /// one changefeed's executor is a point read of this key, never a scan of
    /// the namespace's task keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<Holder>,
}

impl ChangefeedStatus {
    /// The executor running the current epoch, as the owner recorded it.
    pub fn current_holder(&self) -> Option<&str> {
        self.holder
            .as_ref()
            .filter(|h| h.epoch == self.epoch && self.epoch > 0)
            .map(|h| h.executor.as_str())
    }
}

/// Who the owner assigned a changefeed to, at which epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Holder {
    pub executor: String,
    pub epoch: u64,
}

/// A task taken away from its executor (a move, a pause, an update, an error
/// retry, a delete, the executor gone) and not released yet: released when the
/// executor acknowledges the stop in a heartbeat, or when its lease has
/// certainly lapsed (`deadline`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Releasing {
    /// The executor that may still run it.
    pub executor: String,
    /// The epoch of its task.
    pub epoch: u64,
    /// RFC 3339, on the owner's clock: by then the executor's lease has
    /// certainly lapsed, whether or not it acknowledges.
    pub deadline: String,
}

/// `<p>/<ns>/task/status/<executor>/<id>`: the assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub epoch: u64,
    /// RFC 3339.
    pub assigned_at: String,
    /// The server whose owner made the assignment.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub written_by: String,
}

/// `<p>/<ns>/task/position/<executor>/<id>`: the last progress reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskPosition {
    pub epoch: u64,
    pub checkpoint_ts: u64,
    #[serde(default)]
    pub resolved_ts: u64,
    #[serde(default)]
    pub error: Option<String>,
}

/// `<p>/__meta__/executor/<id>`: the registry, mirrored for operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorRecord {
    pub id: String,
    pub name: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let keys = Keys::new("/flotilla/c1/");
        let cf = ChangefeedId::new("default", "cf-1");
        assert_eq!(keys.info(&cf), "/flotilla/c1/default/changefeed/info/cf-1");
        for (key, parsed) in [
            (keys.info(&cf), Key::ChangefeedInfo(cf.clone())),
            (keys.status(&cf), Key::ChangefeedStatus(cf.clone())),
            (
                keys.task_status(&cf, "exec-0000abcd"),
                Key::TaskStatus {
                    changefeed: cf.clone(),
                    executor: "exec-0000abcd".into(),
                },
            ),
            (
                keys.task_position(&cf, "e.x-1"),
                Key::TaskPosition {
                    changefeed: cf.clone(),
                    executor: "e.x-1".into(),
                },
            ),
            (keys.executor("e-1"), Key::Executor("e-1".into())),
            (
                format!("{}694d7a1b", keys.owner_prefix()),
                Key::Owner("694d7a1b".into()),
            ),
        ] {
            assert_eq!(keys.parse(&key), Some(parsed), "{key}");
        }
    }

    #[test]
    fn foreign_and_malformed_keys_are_not_parsed() {
        let keys = Keys::new("/flotilla/c1");
        for key in [
            "/flotilla/c10/default/changefeed/info/x",
            "/flotilla/c1",
            "/flotilla/c1/",
            "/flotilla/c1/default/changefeed/info/",
            "/flotilla/c1/default/changefeed/info/a/b",
            "/flotilla/c1/de fault/changefeed/info/x",
            "/flotilla/c1/__meta__/changefeed/info/x",
            "/flotilla/c1/default/task/status//x",
            "/flotilla/c1/default/other/thing",
        ] {
            assert_eq!(keys.parse(key), None, "{key}");
        }
    }

    #[test]
    fn feed_state_names_match_their_json() {
        for state in FeedState::ALL {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
            assert_eq!(FeedState::parse(state.as_str()), Some(state));
        }
        assert_eq!(FeedState::parse("paused"), None);
    }

    #[test]
    fn ids_follow_the_documented_pattern() {
        assert!(is_valid_id("a"));
        assert!(is_valid_id("cf_1-B"));
        assert!(is_valid_id(&"x".repeat(128)));
        for bad in ["", "a/b", "a.b", "a b", "__meta__", "é"] {
            assert!(!is_valid_id(bad), "{bad}");
        }
        assert!(!is_valid_id(&"x".repeat(129)));
    }
}
