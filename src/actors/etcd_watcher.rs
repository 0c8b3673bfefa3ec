//! `EtcdWatcher`: a consistent read of the prefix in pages, then a watch from
//! the revision after it, forwarded to the ticker in order.
//!
//! (About 700 lines with its tests, on purpose: one state machine whose every state
//! and transition is visible in one place.)
//!
//! The watch loop is an explicit state machine ([`WatchState`] and one
//! [`WatchLoop::step`]): every state and transition is visible in one place.
//!
//! ```text
//!   List --ok--> Open --ok--> Watch --events/progress--> Watch
//!    ^  \           ^  \--retryable error--> Backoff --> Open or List
//!    |   \          +---- lost / silent (from the next revision, nothing re-read)
//!    +---- compacted / canceled / an answer over the decode limit
//! ```
//! The list reads the whole prefix in one range by default (`list_page_keys`
//! 0): etcd 3.4 walks every remaining key of a range for each limited page it
//! answers (etcd-io/etcd#11057), so reading 300,000 keys in pages of 1,000 is
//! quadratic (7.3 s at 100,000 changefeeds), one range is linear. An answer over
//! the client's `max_response_bytes` falls back to pages, as does a configured
//! page size: pages at one revision (the first page's), as Kubernetes' pager
//! reads, at most `list_page_keys` keys (1,000 after a fallback), fewer when the
//! values are large (the page shrinks to keep near `list_page_bytes`, and halves
//! when an answer still exceeds the limit). Either starts over at a new revision
//! if that one is compacted meanwhile. It is sent as one [`Resync`]: the ticker
//! diffs it against its own map, so the reactor never misses a key and never
//! stops.
//!
//! A lost or silent watch is opened again from the revision after the last
//! event delivered (client-go's reflector does the same): nothing is re-read.
//! Losses back off like errors, and the count carries across a watch that
//! opened fine and died soon after: it is reset only once a watch stayed up
//! for [`HEALTHY_AFTER`] (kube-rs's watcher resets after 120 s), so an etcd
//! member that accepts watches and drops them at once (overloaded, a proxy
//! cutting HTTP/2 streams, a restart loop) gets a few watches over a minute,
//! not twenty a second. Lost watches wait up to [`REWATCH_MAX`].
//! Only a compaction of that revision, a watch etcd canceled, or a watch answer
//! over the decode limit (re-watching would get the same answer) re-read the
//! prefix. Progress notifications are forwarded for the lag metric only: they
//! never advance a revision.
//!
//! etcd can split a large revision into fragments (`fragment` in the watch
//! request), but etcd-client 0.21 offers no way to ask for it; the decode limit
//! is raised instead, and an answer over it ends in a re-read, never in a stop.

use std::time::Duration;

use actix::prelude::*;
use etcd_client::{
    EventType, GetOptions, GetResponse, KvClient, WatchClient, WatchOptions, WatchStream,
};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::worker::{self, Backoff, WorkerConfig};
use crate::etcd_errors::{is_compacted, is_retryable, is_too_large};
use crate::etcd_range::prefix_end;
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
    /// A watch answer exceeded the decode limit: watching from the same
    /// revision would get it again.
    TooLarge,
    /// etcd's revision is below the one the watch started after: its history
    /// went back (wiped, or restored from a backup). The re-read lets the
    /// ticker see it (`HistoryReset`) instead of waiting for a revision that
    /// may never come.
    HistoryBack,
}

impl ResyncReason {
    /// Every reason, for the metric's series.
    pub const ALL: [ResyncReason; 5] = [
        ResyncReason::Initial,
        ResyncReason::Compacted,
        ResyncReason::Canceled,
        ResyncReason::TooLarge,
        ResyncReason::HistoryBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::Initial => "initial",
            ResyncReason::Compacted => "compacted",
            ResyncReason::Canceled => "canceled",
            ResyncReason::TooLarge => "too_large",
            ResyncReason::HistoryBack => "history_back",
        }
    }
}

/// Why the watcher opened its watch again from the next revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewatchReason {
    /// The watch stream ended or failed (etcd restarted, connection lost).
    Lost,
    /// The watch answered neither events nor progress requests for too long.
    Silent,
}

impl RewatchReason {
    /// Every reason, for the metric's series.
    pub const ALL: [RewatchReason; 2] = [RewatchReason::Lost, RewatchReason::Silent];

    pub fn as_str(self) -> &'static str {
        match self {
            RewatchReason::Lost => "lost",
            RewatchReason::Silent => "silent",
        }
    }
}

/// The watch is being opened again from `revision` (nothing is re-read).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Rewatched {
    pub revision: i64,
    pub reason: RewatchReason,
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
    pub rewatched: Recipient<Rewatched>,
    pub failed: Recipient<WatcherFailed>,
}

/// The actor: owns the watch loop and stops it on request.
pub struct EtcdWatcher {
    watch_loop: Option<WatchLoop>,
}

impl EtcdWatcher {
    pub fn new(client: etcd_client::Client, config: &WorkerConfig, sink: WatchSink) -> Self {
        let limit = config.max_response_bytes;
        Self {
            watch_loop: Some(WatchLoop {
                kv: client.kv_client().max_decoding_message_size(limit),
                watch: client.watch_client().max_decoding_message_size(limit),
                prefix: config.prefix.clone(),
                sink,
                request_timeout: config.request_timeout,
                progress_interval: config.progress_interval,
                silence_timeout: config.silence_timeout,
                backoff: config.backoff(),
                rewatch_backoff: Backoff {
                    base: config.backoff_base,
                    max: config.backoff_max.max(REWATCH_MAX),
                },
                page: PageSize::new(config.list_page_keys, config.list_page_bytes),
                next_revision: 0,
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
    /// Read the whole prefix, then watch after it.
    List { reason: ResyncReason, attempt: u32 },
    /// Open a watch from the next revision; `reason` is `None` right after a list.
    Open {
        reason: Option<RewatchReason>,
        attempt: u32,
    },
    /// Forward what the watch delivers. `attempt`: the losses before this
    /// watch, carried until it has been up for [`HEALTHY_AFTER`].
    Watch {
        stream: Box<WatchStream>,
        quiet: QuietTimer,
        opened: Instant,
        attempt: u32,
    },
    /// Wait, then do `then` again.
    Backoff { then: Retry, attempt: u32 },
    /// The ticker is gone or a fatal error was reported: end the loop.
    Done,
}

/// What a [`WatchState::Backoff`] goes back to.
#[derive(Debug, Clone, Copy)]
enum Retry {
    List(ResyncReason),
    Open(Option<RewatchReason>),
}

/// Keys per page of a list: the whole prefix at once (`keys` 0, no limit)
/// until an answer is too large; then pages that shrink when values are large
/// and grow back when they are small, never above the configured count.
#[derive(Debug, Clone, Copy)]
struct PageSize {
    /// 0: no limit (one range).
    keys: i64,
    max_keys: i64,
    target_bytes: usize,
}

/// Keys per page once the whole prefix did not fit one answer.
const FALLBACK_PAGE_KEYS: i64 = 1000;

impl PageSize {
    /// `max_keys` 0: the whole prefix in one range.
    fn new(max_keys: i64, target_bytes: usize) -> Self {
        let whole = max_keys <= 0;
        let max_keys = if whole { FALLBACK_PAGE_KEYS } else { max_keys };
        Self {
            keys: if whole { 0 } else { max_keys },
            max_keys,
            target_bytes: target_bytes.max(1),
        }
    }

    /// After a page of `keys` keys holding `bytes` bytes.
    fn observe(&mut self, keys: usize, bytes: usize) {
        if keys == 0 || self.keys == 0 {
            return;
        }
        if bytes > self.target_bytes {
            let fit = (keys as u128 * self.target_bytes as u128 / bytes as u128) as i64;
            self.keys = fit.clamp(1, self.max_keys);
        } else if bytes < self.target_bytes / 2 {
            self.keys = self.keys.saturating_mul(2).min(self.max_keys);
        }
    }

    /// After an answer over the decode limit; `false` if a page is one key already.
    fn halve(&mut self) -> bool {
        if self.keys == 0 {
            // The whole prefix did not fit: pages from now on.
            self.keys = self.max_keys;
            return true;
        }
        if self.keys <= 1 {
            return false;
        }
        self.keys = (self.keys / 2).max(1);
        true
    }
}

/// Why a list did not produce a snapshot.
enum ListError {
    Etcd(etcd_client::Error),
    Timeout,
    /// One key's answer is over the decode limit.
    TooLarge(etcd_client::Error),
}

const LOST: Retry = Retry::Open(Some(RewatchReason::Lost));

/// A watch up this long counts as healthy: its loss starts the backoff over.
pub(crate) const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// The longest wait before opening a lost watch again.
pub(crate) const REWATCH_MAX: Duration = Duration::from_secs(10);

/// The attempt a lost watch opened at `opened` after `attempt` losses goes
/// back off with: the same count, or a fresh start once it was healthy.
fn after_loss(attempt: u32, opened: Instant) -> u32 {
    if opened.elapsed() >= HEALTHY_AFTER {
        0
    } else {
        attempt
    }
}

/// When a watch's last response came and when progress was last asked for:
/// decides what a quiet watch does.
#[derive(Debug, Clone, Copy)]
struct QuietTimer {
    last_response: Instant,
    last_progress_request: Instant,
}

/// What a watch does after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quiet {
    /// Nothing yet.
    Wait,
    /// Quiet for `progress_interval` (and not asked since): ask etcd for progress.
    RequestProgress,
    /// Silent for `silence_timeout` despite the requests: re-create it.
    Recreate,
}

impl QuietTimer {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            last_response: now,
            last_progress_request: now,
        }
    }

    /// Sleeps one check interval (the shorter of the two), then says what to do.
    async fn next(&mut self, progress_interval: Duration, silence_timeout: Duration) -> Quiet {
        tokio::time::sleep(progress_interval.min(silence_timeout)).await;
        let quiet = self.last_response.elapsed();
        if quiet >= silence_timeout {
            Quiet::Recreate
        } else if quiet >= progress_interval
            && self.last_progress_request.elapsed() >= progress_interval
        {
            self.last_progress_request = Instant::now();
            Quiet::RequestProgress
        } else {
            Quiet::Wait
        }
    }
}

struct WatchLoop {
    kv: KvClient,
    watch: WatchClient,
    prefix: String,
    sink: WatchSink,
    request_timeout: Duration,
    progress_interval: Duration,
    silence_timeout: Duration,
    backoff: Backoff,
    /// For lost watches: from the same base, up to [`REWATCH_MAX`].
    rewatch_backoff: Backoff,
    page: PageSize,
    /// The revision a new watch starts at: after the list's revision and
    /// after every event delivered.
    next_revision: i64,
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
            WatchState::Open { reason, attempt } => self.open(reason, attempt).await,
            WatchState::Watch {
                stream,
                quiet,
                opened,
                attempt,
            } => self.watch(stream, quiet, opened, attempt).await,
            WatchState::Backoff { then, attempt } => {
                let delay = match then {
                    Retry::Open(Some(_)) => self.rewatch_backoff.delay(attempt),
                    Retry::Open(None) | Retry::List(_) => self.backoff.delay(attempt),
                };
                debug!(?delay, ?then, "watch: backing off");
                tokio::time::sleep(delay).await;
                let attempt = attempt.saturating_add(1);
                match then {
                    Retry::List(reason) => WatchState::List { reason, attempt },
                    Retry::Open(reason) => WatchState::Open { reason, attempt },
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
        then: Retry,
        attempt: u32,
    ) -> WatchState {
        if is_retryable(&error) {
            metrics::worker().etcd_retries_total.inc();
            warn!(%error, operation, attempt, "watch: retryable etcd error");
            WatchState::Backoff { then, attempt }
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
        let then = Retry::List(reason);
        let started = Instant::now();
        let (revision, entries, pages) = match self.read_prefix().await {
            Ok(read) => read,
            Err(ListError::Etcd(error)) => {
                return self.on_error("range read", error, then, attempt).await
            }
            Err(ListError::Timeout) => {
                metrics::worker().etcd_retries_total.inc();
                warn!(timeout = ?self.request_timeout, "watch: range read timed out");
                return WatchState::Backoff { then, attempt };
            }
            Err(ListError::TooLarge(error)) => {
                // Not fatal: the key may be rewritten smaller, or deleted.
                metrics::worker().etcd_retries_total.inc();
                warn!(%error, "watch: one key of the prefix is larger than the client's decode \
                    limit (max_response_bytes); retrying");
                return WatchState::Backoff { then, attempt };
            }
        };
        let keys = entries.len();
        metrics::worker()
            .resyncs_total
            .with_label_values(&[reason.as_str()])
            .inc();
        let took = started.elapsed();
        if reason == ResyncReason::Initial {
            info!(prefix = %self.prefix, revision, keys, pages, ?took, "watch: read the prefix");
        } else {
            warn!(prefix = %self.prefix, revision, keys, pages, ?took, reason = reason.as_str(),
                "watch: re-read the prefix");
        }
        let snapshot = Resync {
            revision,
            entries,
            reason,
        };
        if self.sink.resync.send(snapshot).await.is_err() {
            return WatchState::Done;
        }
        self.next_revision = revision + 1;
        WatchState::Open {
            reason: None,
            attempt: 0,
        }
    }

    /// The whole prefix at one revision (the first page's), in pages; starts
    /// over at a new revision if that one is compacted during the read.
    /// Returns the revision, the entries and the number of pages read.
    async fn read_prefix(&mut self) -> Result<(i64, RawState, usize), ListError> {
        let end = prefix_end(self.prefix.as_bytes());
        'read: loop {
            let mut entries = RawState::new();
            let mut revision = 0;
            let mut start = self.prefix.as_bytes().to_vec();
            let mut pages = 0;
            loop {
                let mut options = GetOptions::new()
                    .with_range(end.clone())
                    .with_limit(self.page.keys);
                if revision > 0 {
                    options = options.with_revision(revision);
                }
                let get = self.kv.get(start.clone(), Some(options));
                let mut page: GetResponse =
                    match tokio::time::timeout(self.request_timeout, get).await {
                        Ok(Ok(page)) => page,
                        Ok(Err(error)) if is_too_large(&error) => {
                            if !self.page.halve() {
                                return Err(ListError::TooLarge(error));
                            }
                            debug!(
                                keys = self.page.keys,
                                "watch: page over the decode limit, halved"
                            );
                            continue;
                        }
                        Ok(Err(error)) if revision > 0 && is_compacted(&error) => {
                            warn!(
                                revision,
                                pages,
                                "watch: the list's revision was compacted \
                                during the read; starting over"
                            );
                            continue 'read;
                        }
                        Ok(Err(error)) => return Err(ListError::Etcd(error)),
                        Err(_) => return Err(ListError::Timeout),
                    };
                pages += 1;
                if revision == 0 {
                    revision = page.header().map_or(0, |h| h.revision());
                }
                let more = page.more();
                let kvs = page.take_kvs();
                let bytes = kvs.iter().map(|kv| kv.key().len() + kv.value().len()).sum();
                self.page.observe(kvs.len(), bytes);
                if let Some(last) = kvs.last() {
                    start = last.key().to_vec();
                    start.push(0);
                }
                let empty = kvs.is_empty();
                for kv in kvs {
                    let mod_revision = kv.mod_revision();
                    let (key, value) = kv.into_key_value();
                    match String::from_utf8(key) {
                        Ok(key) => {
                            entries.insert(
                                key,
                                RawEntry {
                                    value,
                                    mod_revision,
                                },
                            );
                        }
                        Err(e) => {
                            warn!(key = ?e.as_bytes(), "watch: skipping a key that is not UTF-8")
                        }
                    }
                }
                if !more || empty {
                    return Ok((revision, entries, pages));
                }
            }
        }
    }

    /// Opens a watch from [`Self::next_revision`].
    async fn open(&mut self, reason: Option<RewatchReason>, attempt: u32) -> WatchState {
        if let Some(reason) = reason {
            metrics::worker()
                .rewatches_total
                .with_label_values(&[reason.as_str()])
                .inc();
            info!(
                revision = self.next_revision,
                reason = reason.as_str(),
                "watch: opening the watch again from the next revision"
            );
            let rewatched = Rewatched {
                revision: self.next_revision,
                reason,
            };
            if self.sink.rewatched.send(rewatched).await.is_err() {
                return WatchState::Done;
            }
        }
        let then = Retry::Open(reason.or(Some(RewatchReason::Lost)));
        let options = WatchOptions::new()
            .with_range(prefix_end(self.prefix.as_bytes()))
            .with_start_revision(self.next_revision)
            .with_progress_notify();
        let watch = self.watch.watch(self.prefix.as_str(), Some(options));
        match tokio::time::timeout(self.request_timeout, watch).await {
            Ok(Ok(stream)) => WatchState::Watch {
                stream: Box::new(stream),
                quiet: QuietTimer::new(),
                opened: Instant::now(),
                attempt,
            },
            Ok(Err(error)) => self.on_error("watch", error, then, attempt).await,
            Err(_) => {
                metrics::worker().etcd_retries_total.inc();
                warn!(timeout = ?self.request_timeout, "watch: opening the watch timed out");
                WatchState::Backoff { then, attempt }
            }
        }
    }

    async fn watch(
        &mut self,
        mut stream: Box<WatchStream>,
        mut quiet: QuietTimer,
        opened: Instant,
        attempt: u32,
    ) -> WatchState {
        let lost = |why: &str| {
            let attempt = after_loss(attempt, opened);
            warn!(up = ?opened.elapsed(), attempt, "watch: {why}");
            WatchState::Backoff {
                then: LOST,
                attempt,
            }
        };
        let message = tokio::select! {
            message = stream.message() => message,
            action = quiet.next(self.progress_interval, self.silence_timeout) => {
                match action {
                    Quiet::Wait => {}
                    Quiet::Recreate => {
                        warn!(quiet = ?quiet.last_response.elapsed(), "watch: silent for too long, re-creating it");
                        return WatchState::Open {
                            reason: Some(RewatchReason::Silent),
                            attempt: after_loss(attempt, opened),
                        };
                    }
                    Quiet::RequestProgress => {
                        let request = stream.request_progress();
                        if let Err(error) = tokio::time::timeout(self.request_timeout, request)
                            .await
                            .unwrap_or(Err(etcd_client::Error::WatchError("progress request timed out".into())))
                        {
                            return lost(&format!("progress request failed: {error}"));
                        }
                    }
                }
                return WatchState::Watch { stream, quiet, opened, attempt };
            }
        };
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => return lost("stream ended"),
            Err(error) if is_too_large(&error) => {
                warn!(%error, "watch: an answer exceeded the decode limit (max_response_bytes); \
                    re-reading the prefix instead");
                return WatchState::List {
                    reason: ResyncReason::TooLarge,
                    attempt: 0,
                };
            }
            Err(error) => return lost(&format!("stream failed: {error}")),
        };
        quiet.last_response = Instant::now();
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
        if header_revision > 0 && header_revision < self.next_revision - 1 {
            warn!(
                header_revision,
                next_revision = self.next_revision,
                "watch: etcd's revision is behind the watch: its history went back"
            );
            return WatchState::List {
                reason: ResyncReason::HistoryBack,
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
            // Every event counts, a skipped one too: the watch never goes back.
            if let Some(last) = response.events().iter().rev().find_map(|e| e.kv()) {
                self.next_revision = self.next_revision.max(last.mod_revision() + 1);
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
            quiet,
            opened,
            attempt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{after_loss, PageSize, Quiet, QuietTimer, HEALTHY_AFTER};
    use std::time::Duration;
    use tokio::time::Instant;

    const PROGRESS: Duration = Duration::from_secs(1);
    const SILENCE: Duration = Duration::from_secs(10);

    /// As kube-rs tests its watcher's idle timeout: paused time, advanced by
    /// the sleeps themselves.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_watch_asks_for_progress_each_interval_then_is_re_created() {
        let mut timer = QuietTimer::new();
        let start = Instant::now();
        // One interval of quiet: ask once.
        assert_eq!(timer.next(PROGRESS, SILENCE).await, Quiet::RequestProgress);
        assert_eq!(start.elapsed(), PROGRESS);
        // Asked just now: the next check asks again, an interval later.
        assert_eq!(timer.next(PROGRESS, SILENCE).await, Quiet::RequestProgress);
        // A response resets the quiet; then silence: one request per interval
        // until the timeout, then re-created.
        timer.last_response = Instant::now();
        let silent_from = Instant::now();
        let mut seen = Vec::new();
        for _ in 0..20 {
            let action = timer.next(PROGRESS, SILENCE).await;
            seen.push(action);
            if action == Quiet::Recreate {
                break;
            }
        }
        assert_eq!(silent_from.elapsed(), SILENCE);
        assert_eq!(
            seen.iter()
                .filter(|a| **a == Quiet::RequestProgress)
                .count(),
            9,
            "{seen:?}"
        );
        assert_eq!(seen.last(), Some(&Quiet::Recreate));
        assert!(timer.last_response.elapsed() >= SILENCE);
        assert!(timer.last_response.elapsed() < SILENCE + PROGRESS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_lost_soon_after_opening_keeps_its_backoff_count() {
        let opened = Instant::now();
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(after_loss(5, opened), 5, "died at once: no reset");
        tokio::time::advance(HEALTHY_AFTER).await;
        assert_eq!(after_loss(5, opened), 0, "healthy for a while: reset");
    }

    #[test]
    fn pages_shrink_to_the_byte_target_and_grow_back_to_the_count() {
        let mut page = PageSize::new(1000, 2 << 20);
        // 1000 keys of 64 KiB: 62.5 MiB; 2 MiB hold 32 of them.
        page.observe(1000, 1000 * (64 << 10));
        assert_eq!(page.keys, 32);
        // Small values again: doubles, never above the configured count.
        for _ in 0..10 {
            page.observe(page.keys as usize, 100 * page.keys as usize);
        }
        assert_eq!(page.keys, 1000);
        // One value over the target: one key per page, not zero.
        page.observe(1, 3 << 20);
        assert_eq!(page.keys, 1);
        // An empty page says nothing.
        page.observe(0, 0);
        assert_eq!(page.keys, 1);
    }

    #[test]
    fn the_whole_prefix_is_one_range_until_it_is_too_large() {
        let mut page = PageSize::new(0, 2 << 20);
        assert_eq!(page.keys, 0, "no limit");
        page.observe(300_000, 100 << 20);
        assert_eq!(page.keys, 0, "a whole read does not shrink");
        assert!(page.halve());
        assert_eq!(page.keys, 1000, "too large: pages of the fallback size");
        assert!(page.halve());
        assert_eq!(page.keys, 500);
    }

    #[test]
    fn halving_stops_at_one_key() {
        let mut page = PageSize::new(5, 1 << 20);
        assert!(page.halve());
        assert_eq!(page.keys, 2);
        assert!(page.halve());
        assert_eq!(page.keys, 1);
        assert!(!page.halve());
        assert_eq!(PageSize::new(-1, 0).keys, 0, "no page size: one range");
    }
}
