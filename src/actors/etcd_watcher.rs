//! `EtcdWatcher`: one consistent read of the prefix, then a watch from the
//! revision after it, forwarded to the ticker in order.
//!
//! The watch loop is an explicit state machine ([`WatchState`] and one
//! [`WatchLoop::step`]): every state and transition is visible in one place.
//!
//! ```text
//!   List --ok--> Watch --events/progress--> Watch
//!    ^  \--retryable error--> Backoff --> List
//!    |                                     ^
//!    +---- compacted / canceled / lost / silent too long (via Backoff when lost)
//! ```
//! Any loss of the watch ends in a fresh read of the whole prefix, sent as a
//! [`Resync`]: the ticker diffs it against its own map, so the reactor never
//! misses a key and never stops. Progress notifications are forwarded for
//! the lag metric only: they never advance a revision.

use std::time::{Duration, Instant};

use actix::prelude::*;
use etcd_client::{Client, EventType, GetOptions, WatchOptions, WatchStream};
use tracing::{debug, info, warn};

use super::worker::{self, Backoff, WorkerConfig};
use crate::etcd_errors::is_retryable;
use crate::metrics;
use crate::state::{RawEntry, RawState};

/// One key change seen by the watch. `value: None` is a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEvent {
    pub key: String,
    pub value: Option<Vec<u8>>,
    /// The revision of the change (for a delete: the revision of the delete).
    pub mod_revision: i64,
}

/// The events of one watch response, in revision order.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct WatchEvents {
    pub events: Vec<KeyEvent>,
    /// etcd's revision when it sent the response (for the lag metric).
    pub header_revision: i64,
}

/// Why the watcher read the whole prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// The first read after start.
    Initial,
    /// The revision to watch from was compacted.
    Compacted,
    /// etcd canceled the watch.
    Canceled,
    /// The watch stream ended or failed (etcd restarted, connection lost).
    Lost,
    /// The watch answered neither events nor progress requests for too long.
    Silent,
}

impl ResyncReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::Initial => "initial",
            ResyncReason::Compacted => "compacted",
            ResyncReason::Canceled => "canceled",
            ResyncReason::Lost => "lost",
            ResyncReason::Silent => "silent",
        }
    }
}

/// A full, consistent snapshot of the prefix at `revision`.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Resync {
    pub revision: i64,
    pub entries: RawState,
    pub reason: ResyncReason,
}

/// A progress notification: etcd was at `header_revision`. Used for the lag
/// metric only.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct WatchProgress {
    pub header_revision: i64,
}

/// The watcher hit an error it cannot retry and stopped.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct WatcherFailed(pub worker::Error);

/// Stops the watcher.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct StopWatcher;

/// Where the watcher sends what it sees.
#[derive(Clone)]
pub struct WatchSink {
    pub events: Recipient<WatchEvents>,
    pub resync: Recipient<Resync>,
    pub progress: Recipient<WatchProgress>,
    pub failed: Recipient<WatcherFailed>,
}

/// The actor: owns the watch loop and stops it on request.
pub struct EtcdWatcher {
    watch_loop: Option<WatchLoop>,
}

impl EtcdWatcher {
    pub fn new(client: Client, config: &WorkerConfig, sink: WatchSink) -> Self {
        Self {
            watch_loop: Some(WatchLoop {
                client,
                prefix: config.prefix.clone(),
                sink,
                request_timeout: config.request_timeout,
                progress_interval: config.progress_interval,
                silence_timeout: config.silence_timeout,
                backoff: config.backoff(),
            }),
        }
    }
}

impl Actor for EtcdWatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let watch_loop = self.watch_loop.take().expect("started once");
        // The loop owns everything it touches; stopping the actor drops it,
        // which cancels the etcd watch.
        ctx.spawn(
            watch_loop
                .run()
                .into_actor(self)
                .map(|_, _, ctx| ctx.stop()),
        );
    }
}

impl Handler<StopWatcher> for EtcdWatcher {
    type Result = ();

    fn handle(&mut self, _: StopWatcher, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// The states of the watch loop.
enum WatchState {
    /// Read the whole prefix, then start watching after it.
    List { reason: ResyncReason, attempt: u32 },
    /// Forward what the watch delivers.
    Watch {
        stream: Box<WatchStream>,
        last_response: Instant,
        last_progress_request: Instant,
    },
    /// Wait before listing again.
    Backoff { reason: ResyncReason, attempt: u32 },
    /// The ticker is gone or a fatal error was reported: end the loop.
    Done,
}

struct WatchLoop {
    client: Client,
    prefix: String,
    sink: WatchSink,
    request_timeout: Duration,
    progress_interval: Duration,
    silence_timeout: Duration,
    backoff: Backoff,
}

impl WatchLoop {
    async fn run(mut self) {
        let mut state = WatchState::List {
            reason: ResyncReason::Initial,
            attempt: 0,
        };
        while !matches!(state, WatchState::Done) {
            state = self.step(state).await;
        }
    }

    async fn step(&mut self, state: WatchState) -> WatchState {
        match state {
            WatchState::List { reason, attempt } => self.list(reason, attempt).await,
            WatchState::Watch {
                stream,
                last_response,
                last_progress_request,
            } => {
                self.watch(stream, last_response, last_progress_request)
                    .await
            }
            WatchState::Backoff { reason, attempt } => {
                let delay = self.backoff.delay(attempt);
                debug!(
                    ?delay,
                    reason = reason.as_str(),
                    "watch: backing off before re-listing"
                );
                tokio::time::sleep(delay).await;
                WatchState::List {
                    reason,
                    attempt: attempt.saturating_add(1),
                }
            }
            WatchState::Done => WatchState::Done,
        }
    }

    /// Fails the worker with a non-retryable error, or backs off.
    async fn on_error(
        &mut self,
        operation: &'static str,
        error: etcd_client::Error,
        reason: ResyncReason,
        attempt: u32,
    ) -> WatchState {
        if is_retryable(&error) {
            metrics::worker().etcd_retries_total.inc();
            warn!(%error, operation, attempt, "watch: retryable etcd error");
            WatchState::Backoff { reason, attempt }
        } else {
            let _ = self
                .sink
                .failed
                .send(WatcherFailed(worker::Error::Etcd {
                    operation,
                    source: error,
                }))
                .await;
            WatchState::Done
        }
    }

    async fn list(&mut self, reason: ResyncReason, attempt: u32) -> WatchState {
        let get = self
            .client
            .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()));
        let response = match tokio::time::timeout(self.request_timeout, get).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return self.on_error("range read", error, reason, attempt).await,
            Err(_) => {
                metrics::worker().etcd_retries_total.inc();
                warn!(timeout = ?self.request_timeout, "watch: range read timed out");
                return WatchState::Backoff { reason, attempt };
            }
        };
        let revision = response.header().map_or(0, |h| h.revision());
        let mut entries = RawState::new();
        for kv in response.kvs() {
            match kv.key_str() {
                Ok(key) => {
                    entries.insert(
                        key.to_owned(),
                        RawEntry {
                            value: kv.value().to_vec(),
                            mod_revision: kv.mod_revision(),
                        },
                    );
                }
                Err(_) => warn!(key = ?kv.key(), "watch: skipping a key that is not UTF-8"),
            }
        }
        let keys = entries.len();
        metrics::worker()
            .resyncs_total
            .with_label_values(&[reason.as_str()])
            .inc();
        if reason == ResyncReason::Initial {
            info!(prefix = %self.prefix, revision, keys, "watch: read the prefix");
        } else {
            warn!(prefix = %self.prefix, revision, keys, reason = reason.as_str(), "watch: re-read the prefix");
        }
        let snapshot = Resync {
            revision,
            entries,
            reason,
        };
        if self.sink.resync.send(snapshot).await.is_err() {
            return WatchState::Done;
        }

        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1)
            .with_progress_notify();
        let watch = self.client.watch(self.prefix.as_str(), Some(options));
        match tokio::time::timeout(self.request_timeout, watch).await {
            Ok(Ok(stream)) => {
                let now = Instant::now();
                WatchState::Watch {
                    stream: Box::new(stream),
                    last_response: now,
                    last_progress_request: now,
                }
            }
            Ok(Err(error)) => self.on_error("watch", error, ResyncReason::Lost, 0).await,
            Err(_) => WatchState::Backoff {
                reason: ResyncReason::Lost,
                attempt: 0,
            },
        }
    }

    async fn watch(
        &mut self,
        mut stream: Box<WatchStream>,
        mut last_response: Instant,
        mut last_progress_request: Instant,
    ) -> WatchState {
        let quiet_check = self.progress_interval.min(self.silence_timeout);
        let message = tokio::select! {
            message = stream.message() => message,
            () = tokio::time::sleep(quiet_check) => {
                let quiet = last_response.elapsed();
                if quiet >= self.silence_timeout {
                    warn!(?quiet, "watch: silent for too long, re-creating it");
                    return WatchState::List { reason: ResyncReason::Silent, attempt: 0 };
                }
                if quiet >= self.progress_interval
                    && last_progress_request.elapsed() >= self.progress_interval
                {
                    last_progress_request = Instant::now();
                    let request = stream.request_progress();
                    if let Err(error) = tokio::time::timeout(self.request_timeout, request)
                        .await
                        .unwrap_or(Err(etcd_client::Error::WatchError("progress request timed out".into())))
                    {
                        warn!(%error, "watch: progress request failed");
                        return WatchState::Backoff { reason: ResyncReason::Lost, attempt: 0 };
                    }
                }
                return WatchState::Watch { stream, last_response, last_progress_request };
            }
        };
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => {
                warn!("watch: stream ended");
                return WatchState::Backoff {
                    reason: ResyncReason::Lost,
                    attempt: 0,
                };
            }
            Err(error) => {
                warn!(%error, "watch: stream failed");
                return WatchState::Backoff {
                    reason: ResyncReason::Lost,
                    attempt: 0,
                };
            }
        };
        last_response = Instant::now();
        let header_revision = response.header().map_or(0, |h| h.revision());
        if response.compact_revision() > 0 {
            warn!(
                compact_revision = response.compact_revision(),
                "watch: revision compacted"
            );
            return WatchState::List {
                reason: ResyncReason::Compacted,
                attempt: 0,
            };
        }
        if response.canceled() {
            warn!(reason = response.cancel_reason(), "watch: canceled by etcd");
            return WatchState::List {
                reason: ResyncReason::Canceled,
                attempt: 0,
            };
        }
        if response.events().is_empty() {
            if !response.created() {
                // A progress notification: only a lag reading, never a new
                // revision (etcd may send it before events of that revision).
                let progress = WatchProgress { header_revision };
                if self.sink.progress.send(progress).await.is_err() {
                    return WatchState::Done;
                }
            }
        } else {
            let mut events = Vec::with_capacity(response.events().len());
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let Ok(key) = kv.key_str() else {
                    warn!(key = ?kv.key(), "watch: skipping a key that is not UTF-8");
                    continue;
                };
                events.push(KeyEvent {
                    key: key.to_owned(),
                    value: match event.event_type() {
                        EventType::Put => Some(kv.value().to_vec()),
                        EventType::Delete => None,
                    },
                    mod_revision: kv.mod_revision(),
                });
            }
            let batch = WatchEvents {
                events,
                header_revision,
            };
            // Waiting on the ticker is the backpressure: a slow reactor slows
            // the watch down instead of growing a queue.
            if self.sink.events.send(batch).await.is_err() {
                return WatchState::Done;
            }
        }
        WatchState::Watch {
            stream,
            last_response,
            last_progress_request,
        }
    }
}
