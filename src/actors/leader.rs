//! `LeaderRoles`: starts the leader-only actors when the election says this
//! server leads, and stops them when it says it no longer does.
//!
//! Leader-only: the executor registry (expiry, registrations, the feed), the
//! changefeed owner (its reactor and worker, fenced on the election key) and
//! the compactor of etcd's history (one compactor per cluster is enough).
//! They are published in a [`RoleSlot`] that the HTTP layer reads on every
//! request: a server whose slot is empty forwards leader-only requests.
//!
//! The owner runs on every server, on an arbiter (thread) of its own: on a
//! follower it stands by (its worker follows the prefix, so its state stays
//! current, and writes nothing); elected, it starts ticking from that state
//! at once instead of reading the prefix from cold. The registry, the
//! compactor and this actor share the server's thread.
//!
//! On deposition the slot is emptied first (no request reaches the old
//! actors any more), then the owner's active worker is stopped (its
//! in-flight commit finishes, fenced) and a standby one starts, then the
//! registry stops. A new election starts a fresh registry, which loads the
//! executors from SQL with a grace period, and activates the standby owner.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use actix::prelude::*;
use etcd_client::Client;
use tracing::{info, warn};

use super::compactor::{Compactor, CompactorConfig, StopCompactor};
use super::executor_registry::{ExecutorRegistry, RegistryConfig, RegistryHandle, StopRegistry};
use super::owner::{Follow, Lead, Owner, OwnerSettings, StopOwner, WorkDesk};
use crate::election::{Leadership, LeaseGuard};
use crate::owner::model::Keys;
use crate::store::Store;

/// What a leader runs, as the HTTP layer uses it.
#[derive(Clone)]
pub struct Roles {
    pub registry: RegistryHandle,
    /// `None` on a server built without an owner (registry-only tests).
    pub owner: Option<WorkDesk>,
    /// Valid while this server's election lease certainly holds: a leader
    /// answers heartbeats only then (a frozen one that wakes up after a new
    /// leader was elected must not extend leases nor hand out work).
    pub lease: LeaseGuard,
}

/// Where the current [`Roles`] are published; empty while this server does
/// not lead. Cheap to clone. Every request asks [`Self::is_empty`] (one
/// atomic load); handlers borrow the roles under a shared lock.
#[derive(Clone, Default)]
pub struct RoleSlot(Arc<SlotInner>);

#[derive(Default)]
struct SlotInner {
    roles: RwLock<Option<Roles>>,
    /// Mirrors `roles.is_some()`, for the per-request routing check.
    filled: AtomicBool,
}

impl RoleSlot {
    /// A slot that always holds `roles` (a server without an election).
    pub fn fixed(roles: Roles) -> Self {
        let slot = Self::default();
        slot.set(Some(roles));
        slot
    }

    pub fn get(&self) -> Option<Roles> {
        self.with(|roles| roles.cloned())
    }

    /// Runs `f` on the current roles without copying them. Keep `f` short
    /// and synchronous: a role change waits for it.
    pub fn with<T>(&self, f: impl FnOnce(Option<&Roles>) -> T) -> T {
        f(self
            .0
            .roles
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref())
    }

    pub fn is_empty(&self) -> bool {
        !self.0.filled.load(Ordering::Acquire)
    }

    fn set(&self, roles: Option<Roles>) {
        let mut slot = self.0.roles.write().unwrap_or_else(PoisonError::into_inner);
        self.0.filled.store(roles.is_some(), Ordering::Release);
        *slot = roles;
    }
}

/// What the leader-only actors are built from.
pub struct RoleSettings {
    pub registry: RegistryConfig,
    pub store: Store,
    /// The owner's etcd client (created on this arbiter's runtime).
    pub client: Client,
    pub keys: Keys,
    pub owner: OwnerSettings,
}

/// Stops the leader-only actors (graceful shutdown); answers once they
/// have been asked to stop, in order.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct StepDown;

struct Running {
    registry: Addr<ExecutorRegistry>,
    /// `None` while compaction is off.
    compactor: Option<Addr<Compactor>>,
}

/// The owner, leading or standing by, for the server's whole life.
struct StandingOwner {
    addr: Addr<Owner>,
    desk: WorkDesk,
    /// The owner's and its worker's own thread, stopped after the owner.
    arbiter: Arbiter,
}

pub struct LeaderRoles {
    settings: RoleSettings,
    compaction: CompactorConfig,
    slot: RoleSlot,
    running: Option<Running>,
    /// Started with this actor, stopped by [`StepDown`].
    owner: Option<StandingOwner>,
}

impl LeaderRoles {
    /// Compacts etcd every [`DEFAULT_COMPACTION_INTERVAL`](super::compactor::DEFAULT_COMPACTION_INTERVAL)
    /// while leading; see [`Self::with_compaction_interval`].
    pub fn new(settings: RoleSettings, slot: RoleSlot) -> Self {
        let compaction = CompactorConfig {
            request_timeout: settings.owner.worker.request_timeout,
            ..CompactorConfig::default()
        };
        Self {
            settings,
            compaction,
            slot,
            running: None,
            owner: None,
        }
    }

    /// `etcd.compaction_interval`: how often the leader compacts etcd; zero: never.
    pub fn with_compaction_interval(mut self, interval: std::time::Duration) -> Self {
        self.compaction.interval = interval;
        self
    }

    /// Starts the owner standing by, on its own thread: a long tick must not
    /// delay heartbeats, expiry or the election's keep-alive, which run on
    /// this one. Its worker's actors start on that arbiter too
    /// (`actors::start` uses the current one).
    fn start_owner(&mut self) {
        let owner = Owner::standby(
            self.settings.client.clone(),
            self.settings.keys.clone(),
            self.settings.owner.clone(),
        );
        let desk = owner.desk();
        let arbiter = Arbiter::new();
        let addr = Owner::start_in_arbiter(&arbiter.handle(), move |_| owner);
        self.owner = Some(StandingOwner {
            addr,
            desk,
            arbiter,
        });
    }

    fn start_roles(&mut self, fence: super::worker::Fence, guard: LeaseGuard, revision: i64) {
        if self.running.is_some() {
            warn!("elected while the leader roles still run; restarting them");
            actix_rt::spawn(self.stop_roles(false));
        }
        let Some(owner) = &self.owner else {
            warn!("elected while shutting down; not starting the leader roles");
            return;
        };
        let registry =
            ExecutorRegistry::new(self.settings.registry.clone(), self.settings.store.clone())
                .with_lease_guard(guard.clone())
                .start_with_table();
        // Queued after the `Follow` of `stop_roles` above, if any.
        owner.addr.do_send(Lead {
            registry: registry.addr.clone(),
            fence,
            revision,
        });
        let compactor = (!self.compaction.interval.is_zero())
            .then(|| Compactor::new(self.settings.client.clone(), self.compaction).start());
        self.running = Some(Running {
            registry: registry.addr.clone(),
            compactor,
        });
        self.slot.set(Some(Roles {
            registry,
            owner: Some(owner.desk.clone()),
            lease: guard,
        }));
        info!("leader roles started: executor registry, changefeed owner and etcd compactor");
    }

    /// Empties the slot now and returns the stop of the leader roles, in
    /// order: the owner's active worker finishes its in-flight commit
    /// (fenced) while the registry still answers it, then the registry
    /// stops. The owner is told before this returns: to stand by again
    /// (`Follow`), or on `shutdown` to stop for good (and its thread with it).
    fn stop_roles(&mut self, shutdown: bool) -> impl std::future::Future<Output = ()> + 'static {
        // Emptied first: from now on requests are forwarded (or refused),
        // none reaches the old actors.
        self.slot.set(None);
        let running = self.running.take();
        let owner: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>> = if shutdown {
            self.owner.take().map(|owner| {
                let stopped = owner.addr.send(StopOwner);
                Box::pin(async move {
                    // Answers once its worker has ended; only then may its thread go.
                    let _ = stopped.await;
                    owner.arbiter.stop();
                }) as _
            })
        } else {
            match (&running, &self.owner) {
                (Some(_), Some(owner)) => {
                    let followed = owner.addr.send(Follow);
                    Some(Box::pin(async move {
                        let _ = followed.await;
                    }) as _)
                }
                _ => None,
            }
        };
        async move {
            if let Some(compactor) = running.as_ref().and_then(|r| r.compactor.clone()) {
                let _ = compactor.send(StopCompactor).await;
            }
            if let Some(owner) = owner {
                owner.await;
            }
            if let Some(running) = running {
                let _ = running.registry.send(StopRegistry).await;
                info!("leader roles stopped");
            }
        }
    }
}

impl Actor for LeaderRoles {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        self.start_owner();
    }
}

impl Handler<Leadership> for LeaderRoles {
    type Result = ();

    fn handle(&mut self, msg: Leadership, _: &mut Self::Context) {
        match msg {
            Leadership::Elected {
                fence,
                guard,
                revision,
            } => self.start_roles(fence, guard, revision),
            Leadership::Deposed { reason } => {
                warn!(%reason, "deposed: stopping the leader roles");
                actix_rt::spawn(self.stop_roles(false));
            }
        }
    }
}

impl Handler<StepDown> for LeaderRoles {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: StepDown, _: &mut Self::Context) -> Self::Result {
        Box::pin(self.stop_roles(true))
    }
}
