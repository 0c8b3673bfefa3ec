//! `LeaderRoles`: starts the leader-only actors when the election says this
//! server leads, and stops them when it says it no longer does.
//!
//! Leader-only: the executor registry (expiry, registrations, the feed), the
//! changefeed owner (its reactor and worker, fenced on the election key) and
//! the compactor of etcd's history (one compactor per cluster is enough).
//! They are published in a [`RoleSlot`] that the HTTP layer reads on every
//! request: a server whose slot is empty forwards leader-only requests.
//!
//! The owner and its worker run on an arbiter (thread) of their own; the
//! registry, the compactor and this actor share the server's.
//!
//! On deposition the slot is emptied first (no request reaches the old
//! actors any more), then the owner is stopped (and its arbiter once its
//! worker has ended), then the registry. A new
//! election starts a fresh registry, which loads the executors from SQL with
//! a grace period, and a fresh owner, which continues from etcd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use actix::prelude::*;
use etcd_client::Client;
use tracing::{info, warn};

use super::compactor::{Compactor, CompactorConfig, StopCompactor};
use super::executor_registry::{ExecutorRegistry, RegistryConfig, RegistryHandle, StopRegistry};
use super::owner::{Owner, OwnerSettings, StopOwner, WorkDesk};
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
    owner: Addr<Owner>,
    /// The owner's and its worker's own thread, stopped after the owner.
    owner_arbiter: Arbiter,
    /// `None` while compaction is off.
    compactor: Option<Addr<Compactor>>,
}

pub struct LeaderRoles {
    settings: RoleSettings,
    compaction: CompactorConfig,
    slot: RoleSlot,
    running: Option<Running>,
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
        }
    }

    /// `etcd.compaction_interval`: how often the leader compacts etcd; zero: never.
    pub fn with_compaction_interval(mut self, interval: std::time::Duration) -> Self {
        self.compaction.interval = interval;
        self
    }

    fn start_roles(&mut self, fence: super::worker::Fence, guard: LeaseGuard) {
        if self.running.is_some() {
            warn!("elected while the leader roles still run; restarting them");
            actix_rt::spawn(self.stop_roles());
        }
        let registry =
            ExecutorRegistry::new(self.settings.registry.clone(), self.settings.store.clone())
                .with_lease_guard(guard.clone())
                .start_with_table();
        let mut owner_settings = self.settings.owner.clone();
        owner_settings.worker.fence = Some(fence);
        let owner = Owner::new(
            registry.addr.clone(),
            self.settings.client.clone(),
            self.settings.keys.clone(),
            owner_settings,
        );
        let desk = owner.desk();
        // Its own thread: a long tick must not delay heartbeats, expiry or the
        // election's keep-alive, which run on this one. The worker's actors start
        // on the owner's arbiter too (`actors::start` uses the current one).
        let owner_arbiter = Arbiter::new();
        let owner = Owner::start_in_arbiter(&owner_arbiter.handle(), move |_| owner);
        let compactor = (!self.compaction.interval.is_zero())
            .then(|| Compactor::new(self.settings.client.clone(), self.compaction).start());
        self.running = Some(Running {
            registry: registry.addr.clone(),
            owner,
            owner_arbiter,
            compactor,
        });
        self.slot.set(Some(Roles {
            registry,
            owner: Some(desk),
            lease: guard,
        }));
        info!("leader roles started: executor registry, changefeed owner and etcd compactor");
    }

    /// Empties the slot now and returns the stop of the actors, in order:
    /// the owner's worker finishes its in-flight commit (fenced) while the
    /// registry still answers it, then the registry stops.
    fn stop_roles(&mut self) -> impl std::future::Future<Output = ()> + 'static {
        // Emptied first: from now on requests are forwarded (or refused),
        // none reaches the old actors.
        self.slot.set(None);
        let running = self.running.take();
        async move {
            if let Some(running) = running {
                if let Some(compactor) = running.compactor {
                    let _ = compactor.send(StopCompactor).await;
                }
                // Answers once the worker has ended; only then may its thread go.
                let _ = running.owner.send(StopOwner).await;
                running.owner_arbiter.stop();
                let _ = running.registry.send(StopRegistry).await;
                info!("leader roles stopped");
            }
        }
    }
}

impl Actor for LeaderRoles {
    type Context = Context<Self>;
}

impl Handler<Leadership> for LeaderRoles {
    type Result = ();

    fn handle(&mut self, msg: Leadership, _: &mut Self::Context) {
        match msg {
            Leadership::Elected { fence, guard } => self.start_roles(fence, guard),
            Leadership::Deposed { reason } => {
                warn!(%reason, "deposed: stopping the leader roles");
                actix_rt::spawn(self.stop_roles());
            }
        }
    }
}

impl Handler<StepDown> for LeaderRoles {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: StepDown, _: &mut Self::Context) -> Self::Result {
        Box::pin(self.stop_roles())
    }
}
