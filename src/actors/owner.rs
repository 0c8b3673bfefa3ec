//! `Owner`: runs the owner reactor on an orchestrator worker, feeds it the
//! registry's Online/Offline feed and the progress executors report.
//!
//! This is the owner's actor half; its logic (key layout, state, the
//! `OwnerReactor`, the `WorkBoard`, the changefeed API's txns) is in
//! `crate::owner`, which knows nothing of actix.
//! Heartbeats are answered without it: [`WorkDesk`] reads each executor's
//! committed assignments from the [`WorkBoard`] the worker's state keeps
//! current, and hands progress to the reactor's input channel, all on the
//! HTTP worker's thread.
//!
//! Progress goes into [`ProgressSlots`] (one per changefeed and executor, a
//! newer report replacing the one before), which the reactor takes at each
//! tick: however many reports arrive, what waits is bounded by the
//! assignments. The other inputs travel through an unbounded channel the
//! reactor drains at each tick, each bounded at its source: acknowledged stops
//! by the tasks the board lists as revoked, registry events by the feed (the
//! registry cuts off a subscriber that falls behind; on a cut-off the owner
//! subscribes again and hands the reactor a fresh snapshot). If the worker stops with an
//! error, the owner starts a new one after a backoff: all its state is in
//! etcd and the registry.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use actix::prelude::*;
use etcd_client::Client;
use futures::{stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::executor_registry::{
    ExecutorEvent, ExecutorInfo, ExecutorRegistry, ExecutorStatus, Subscribe,
};
use super::ticker::{Activate, StopWorker};
use super::worker::{start, start_standby, Fence, WorkerConfig};
use crate::owner::board::WorkBoard;
pub use crate::owner::board::{Assignment, Rejected, Revoked, Work};
use crate::owner::model::ChangefeedId;
use crate::owner::model::Keys;
use crate::owner::progress::ProgressSlots;
use crate::owner::reactor::{LiveExecutor, OwnerConfig, OwnerInput, OwnerReactor, ProgressReport};
use crate::owner::state::GlobalState;

/// Settings of the owner.
#[derive(Debug, Clone)]
pub struct OwnerSettings {
    pub worker: WorkerConfig,
    pub owner: OwnerConfig,
    /// Wait before restarting a worker that stopped with an error.
    pub restart_backoff: Duration,
}

/// Why the owner could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The owner's worker is (re)starting.
    #[error("the changefeed owner is not running yet")]
    NotRunning,
}

/// Longest a [`StopOwner`] waits for the worker's end.
pub const STOP_WAIT: Duration = Duration::from_secs(10);

type Inputs = Arc<RwLock<Option<mpsc::UnboundedSender<OwnerInput>>>>;

/// The owner's part of a heartbeat, callable from any thread. Cheap to clone.
#[derive(Clone)]
pub struct WorkDesk {
    board: Arc<WorkBoard>,
    /// Where accepted progress waits for the reactor's next tick.
    progress: Arc<ProgressSlots>,
    /// The running reactor's input channel; `None` while it restarts.
    inputs: Inputs,
}

impl WorkDesk {
    /// Whether the owner has loaded its snapshot and answers [`Self::work`].
    pub fn is_running(&self) -> bool {
        self.board.is_ready()
    }

    /// The changefeeds (`namespace/id`) each of `executors` must run.
    pub fn assigned<'a>(&self, executors: impl IntoIterator<Item = &'a str>) -> Vec<Vec<String>> {
        self.board.assigned(executors)
    }

    /// The committed work of `executor`; its progress reports for its
    /// current assignments and its acknowledged stops of tasks taken away
    /// from it go to the reactor, other reports come back rejected (other
    /// stops are ignored: they release nothing). Call it only for an executor
    /// the registry just accepted a heartbeat from.
    pub fn work(
        &self,
        executor: &str,
        progress: Vec<ProgressReport>,
        stopped: Vec<(ChangefeedId, u64)>,
        known: Option<u64>,
    ) -> Result<Work, Error> {
        let (work, accepted) = self
            .board
            .work_for(executor, progress, stopped, known)
            .ok_or(Error::NotRunning)?;
        for report in accepted.progress {
            self.progress.put(executor, report);
        }
        if !accepted.stopped.is_empty() {
            let inputs = self.inputs.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(inputs) = inputs.as_ref() {
                // Fails only while the worker stops; the executor acknowledges
                // again at its next heartbeat (the task is still listed as
                // revoked).
                for (changefeed, epoch) in accepted.stopped {
                    let _ = inputs.send(OwnerInput::Released {
                        executor: executor.to_owned(),
                        changefeed,
                        epoch,
                    });
                }
            }
        }
        Ok(work)
    }
}

/// Stops the owner and its worker; answers once the worker has ended (its
/// in-flight commit finished) or [`STOP_WAIT`] has passed, so the caller may
/// then stop the owner's arbiter.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct StopOwner;

/// This server leads from now on: the standby worker becomes active (its
/// txns fenced on `fence`; its first tick once its state reached `revision`,
/// see [`crate::election::Leadership::Elected`]) and the owner follows
/// `registry`'s feed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Lead {
    pub registry: Addr<ExecutorRegistry>,
    pub fence: Fence,
    pub revision: i64,
}

/// This server no longer leads: the active worker stops (its in-flight
/// commit finishes, fenced) and a standby one starts in its place. Answers
/// once the active worker has ended (or [`STOP_WAIT`] passed).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Follow;

/// One item of a registry subscription, tagged with the subscription.
#[derive(Message)]
#[rtype(result = "()")]
struct Feed {
    subscription: u64,
    event: Option<ExecutorEvent>,
}

/// What the owner does now.
enum Mode {
    /// A follower's: the worker keeps the snapshot current, ticks nothing,
    /// writes nothing.
    Standby,
    /// The leader's: the worker ticks, fenced on `fence`, and the reactor
    /// follows `registry`'s feed.
    Leading {
        registry: Addr<ExecutorRegistry>,
        fence: Option<Fence>,
    },
}

/// The running worker, as the owner controls it.
struct Running {
    stop: Recipient<StopWorker>,
    activate: Recipient<Activate>,
    /// Whether it was started (or since made) active.
    active: bool,
}

pub struct Owner {
    mode: Mode,
    client: Client,
    keys: Keys,
    settings: OwnerSettings,
    inputs: Option<mpsc::UnboundedSender<OwnerInput>>,
    desk: WorkDesk,
    /// `None` while no worker runs (restarting, stopping).
    worker: Option<Running>,
    /// Each started worker's number; the end of an older one is ignored.
    generation: u64,
    /// [`StopOwner`]s and [`Follow`]s waiting for the running worker's end.
    stop_waiters: Vec<oneshot::Sender<()>>,
    /// Current subscription; events of older ones are ignored.
    subscription: u64,
    stopping: bool,
}

impl Owner {
    /// An owner that leads from the start (fenced on `settings.worker.fence`
    /// if any) and follows `registry`. `keys` must be the cluster prefix
    /// `settings.worker.prefix` watches.
    pub fn new(
        registry: Addr<ExecutorRegistry>,
        client: Client,
        keys: Keys,
        settings: OwnerSettings,
    ) -> Self {
        let fence = settings.worker.fence.clone();
        Self::with_mode(Mode::Leading { registry, fence }, client, keys, settings)
    }

    /// An owner that stands by until [`Lead`]: a follower's hot standby.
    pub fn standby(client: Client, keys: Keys, settings: OwnerSettings) -> Self {
        Self::with_mode(Mode::Standby, client, keys, settings)
    }

    fn with_mode(mode: Mode, client: Client, keys: Keys, settings: OwnerSettings) -> Self {
        Self {
            mode,
            client,
            keys,
            settings,
            inputs: None,
            desk: WorkDesk {
                board: Arc::default(),
                progress: Arc::default(),
                inputs: Arc::default(),
            },
            worker: None,
            generation: 0,
            stop_waiters: Vec::new(),
            subscription: 0,
            stopping: false,
        }
    }

    /// What the HTTP workers answer heartbeats with.
    pub fn desk(&self) -> WorkDesk {
        self.desk.clone()
    }

    fn set_inputs(&mut self, inputs: Option<mpsc::UnboundedSender<OwnerInput>>) {
        *self
            .desk
            .inputs
            .write()
            .unwrap_or_else(PoisonError::into_inner) = inputs.clone();
        self.inputs = inputs;
    }

    /// Starts a worker: active (fenced) while leading, standing by otherwise.
    fn start_worker(&mut self, ctx: &mut Context<Self>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let reactor = OwnerReactor::new(rx, self.settings.owner.clone())
            .with_progress_slots(self.desk.progress.clone());
        let state = GlobalState::with_board(self.keys.clone(), self.desk.board.clone());
        let mut config = self.settings.worker.clone();
        let (handle, active) = match &self.mode {
            Mode::Leading { fence, .. } => {
                config.fence = fence.clone();
                (start(self.client.clone(), reactor, state, config), true)
            }
            Mode::Standby => {
                config.fence = None;
                (
                    start_standby(self.client.clone(), reactor, state, config),
                    false,
                )
            }
        };
        self.set_inputs(Some(tx));
        self.generation += 1;
        let generation = self.generation;
        self.worker = Some(Running {
            stop: handle.stopper(),
            activate: handle.activator(),
            active,
        });
        if active {
            info!(prefix = %self.settings.worker.prefix, "changefeed owner started");
        } else {
            info!(prefix = %self.settings.worker.prefix, "changefeed owner standing by (following the prefix)");
        }
        ctx.spawn(handle.wait().into_actor(self).map(move |result, act, ctx| {
            if generation != act.generation {
                return;
            }
            act.worker = None;
            act.set_inputs(None);
            // No answer is better than one from a state nobody updates.
            act.desk.board.clear();
            let waited = !act.stop_waiters.is_empty();
            for waiter in act.stop_waiters.drain(..) {
                let _ = waiter.send(());
            }
            if act.stopping {
                return;
            }
            if waited {
                // Stopped on purpose (a step down): the next one starts at once.
                act.start_worker(ctx);
                act.subscribe(ctx);
                return;
            }
            match result {
                Ok(()) => warn!("the owner's worker stopped; restarting it"),
                Err(e) => error!(error = %e, backoff = ?act.settings.restart_backoff, "the owner's worker failed; restarting it"),
            }
            ctx.run_later(act.settings.restart_backoff, move |act, ctx| {
                if !act.stopping && act.worker.is_none() {
                    act.start_worker(ctx);
                    act.subscribe(ctx);
                }
            });
        }));
    }

    /// Asks the running worker to stop; the returned receiver answers at its end.
    fn stop_worker(&mut self) -> Option<oneshot::Receiver<()>> {
        let running = self.worker.as_ref()?;
        let (tx, rx) = oneshot::channel();
        self.stop_waiters.push(tx);
        running.stop.do_send(StopWorker);
        Some(rx)
    }

    /// Follows the registry's feed while leading; does nothing standing by.
    fn subscribe(&mut self, ctx: &mut Context<Self>) {
        self.subscription += 1;
        let id = self.subscription;
        let Mode::Leading { registry, .. } = &self.mode else {
            return;
        };
        ctx.spawn(
            registry
                .send(Subscribe { watcher: false })
                .into_actor(self)
                .map(move |result, act, ctx| {
                    if id != act.subscription || act.stopping {
                        return;
                    }
                    match result {
                        Ok(Ok(subscription)) => {
                            let initing = subscription
                                .snapshot
                                .iter()
                                .filter(|e| e.status == ExecutorStatus::Initing)
                                .map(|e| e.id.clone())
                                .collect();
                            let live = subscription
                                .snapshot
                                .into_iter()
                                .map(live_executor)
                                .collect();
                            act.send(OwnerInput::Executors { live, initing });
                            let events = stream::unfold(subscription.events, |mut rx| async move {
                                rx.recv().await.map(|e| (e, rx))
                            })
                            .map(move |event| Feed {
                                subscription: id,
                                event: Some(event),
                            })
                            .chain(stream::once(async move {
                                Feed {
                                    subscription: id,
                                    event: None,
                                }
                            }));
                            ctx.add_stream(events);
                        }
                        Ok(Err(e)) => {
                            // The registry is still loading: try again soon.
                            warn!(error = %e, "owner: cannot subscribe to the registry yet");
                            ctx.run_later(Duration::from_millis(200), move |act, ctx| {
                                if id == act.subscription {
                                    act.subscribe(ctx)
                                }
                            });
                        }
                        Err(e) => error!(error = %e, "owner: the registry is gone"),
                    }
                }),
        );
    }

    fn send(&self, input: OwnerInput) {
        if let Some(inputs) = &self.inputs {
            // Fails only while the worker restarts; the next subscription
            // brings a fresh snapshot.
            let _ = inputs.send(input);
        }
    }
}

fn live_executor(e: ExecutorInfo) -> LiveExecutor {
    crate::owner::model::ExecutorRecord {
        id: e.id,
        name: e.name,
        address: e.address,
        labels: e.labels,
    }
}

impl Actor for Owner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.start_worker(ctx);
        self.subscribe(ctx);
    }
}

impl StreamHandler<Feed> for Owner {
    fn handle(&mut self, feed: Feed, ctx: &mut Self::Context) {
        if feed.subscription != self.subscription || self.stopping {
            return;
        }
        match feed.event {
            Some(ExecutorEvent::Online { executor, .. }) => {
                let initing = executor.status == ExecutorStatus::Initing;
                self.send(OwnerInput::Online {
                    executor: live_executor(executor),
                    initing,
                })
            }
            Some(ExecutorEvent::Offline { id, lease_left, .. }) => self.send(OwnerInput::Offline {
                executor: id,
                lease_left,
            }),
            Some(ExecutorEvent::Resync) | None => {
                warn!("owner: the executor feed ended; subscribing again");
                let id = self.subscription;
                ctx.run_later(Duration::from_millis(100), move |act, ctx| {
                    if id == act.subscription {
                        act.subscribe(ctx)
                    }
                });
            }
        }
    }

    // One subscription ending is not the owner's end.
    fn finished(&mut self, _: &mut Self::Context) {}
}

impl Handler<Lead> for Owner {
    type Result = ();

    fn handle(&mut self, msg: Lead, ctx: &mut Self::Context) {
        if self.stopping {
            return;
        }
        let fence = Some(msg.fence);
        self.mode = Mode::Leading {
            registry: msg.registry,
            fence: fence.clone(),
        };
        let stopping = !self.stop_waiters.is_empty();
        match &mut self.worker {
            // The hot standby: its snapshot is current, it only starts ticking.
            Some(running) if !running.active && !stopping => {
                running.activate.do_send(Activate {
                    fence,
                    barrier: msg.revision,
                });
                running.active = true;
                info!(prefix = %self.settings.worker.prefix, "changefeed owner started from its standby state");
            }
            // Active on another fence (elected again without a step down in
            // between): stopped, the next one starts on this fence.
            Some(running) if running.active && !stopping => {
                let _ = self.stop_worker();
            }
            // A worker of an earlier leadership still stopping, or none
            // (restarting): the next one starts active, on this fence.
            _ => {}
        }
        self.subscribe(ctx);
    }
}

impl Handler<Follow> for Owner {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Follow, _: &mut Self::Context) -> Self::Result {
        let was_leading = matches!(self.mode, Mode::Leading { .. });
        self.mode = Mode::Standby;
        // Events of the old registry's feed are ignored from now on.
        self.subscription += 1;
        let ended = if was_leading {
            self.stop_worker()
        } else {
            None
        };
        Box::pin(
            async move {
                if let Some(ended) = ended {
                    if tokio::time::timeout(STOP_WAIT, ended).await.is_err() {
                        warn!(wait = ?STOP_WAIT, "the owner's worker did not stop in time");
                    }
                }
            }
            .into_actor(self),
        )
    }
}

impl Handler<StopOwner> for Owner {
    // A `ResponseActFuture`, not an `AtomicResponse`: while it waits, the
    // worker's end must still reach the actor (the future spawned in
    // `start_worker`), which answers the waiters.
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: StopOwner, _: &mut Self::Context) -> Self::Result {
        self.stopping = true;
        let ended = self.stop_worker();
        Box::pin(
            async move {
                if let Some(ended) = ended {
                    if tokio::time::timeout(STOP_WAIT, ended).await.is_err() {
                        warn!(wait = ?STOP_WAIT, "the owner's worker did not stop in time");
                    }
                }
            }
            .into_actor(self)
            .map(|(), _, ctx| ctx.stop()),
        )
    }
}
