//! `AlarmMonitor`: watches etcd's alarms (what `etcdctl alarm list` shows) on every
//! server and publishes them in [`EtcdAlarms`], a cheap shared read for `/readyz`,
//! and in the `flotilla_etcd_alarm{alarm}` gauge.
//!
//! NOSPACE is the one that matters: etcd raises it when its database reaches its quota
//! (`--quota-backend-bytes`, 2 GiB by default) and from then on refuses every write
//! (`etcdserver: mvcc: database space exceeded`) until an operator frees space and
//! disarms it. The control plane can then change nothing: no assignment, no
//! checkpoint, no changefeed. The alarm is cluster-wide, so every server polls it, leader
//! or not (each one's `/readyz` reports it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use etcd_client::{AlarmAction, AlarmType, Client};
use tracing::{error, info, warn};

/// How often the monitor asks etcd for its alarms.
pub const ALARM_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// The error etcd answers every write with while NOSPACE is raised.
const NOSPACE_ERROR: &str = "database space exceeded";

/// What an operator does about NOSPACE, logged when it is raised.
pub const NOSPACE_REMEDY: &str = "etcd's database reached its quota (--quota-backend-bytes) and etcd refuses every write: \
     compaction (the leader compacts every etcd.compaction_interval) frees space inside the database, \
     then run `etcdctl defrag` on every member to give it back, then `etcdctl alarm disarm`; \
     raise --quota-backend-bytes if the history kept is legitimately larger";

/// etcd's alarms as last seen, shared by the monitor (the only writer) and readers on
/// any thread. Cheap to clone; every read is one atomic load.
#[derive(Debug, Clone, Default)]
pub struct EtcdAlarms(Arc<Flags>);

#[derive(Debug, Default)]
struct Flags {
    nospace: AtomicBool,
    corrupt: AtomicBool,
}

impl EtcdAlarms {
    /// etcd's quota is full: it refuses writes until space is freed and the alarm disarmed.
    pub fn nospace(&self) -> bool {
        self.0.nospace.load(Ordering::Acquire)
    }

    /// etcd found its data corrupt on some member.
    pub fn corrupt(&self) -> bool {
        self.0.corrupt.load(Ordering::Acquire)
    }

    /// Why this server is not ready because of etcd's alarms; `None` while none is
    /// raised. A short sentence for `/readyz`.
    pub fn problem(&self) -> Option<&'static str> {
        if self.nospace() {
            Some("etcd raised NOSPACE: its database is full and it refuses writes (etcdctl defrag on every member, then etcdctl alarm disarm)")
        } else if self.corrupt() {
            Some("etcd raised CORRUPT: a member's data is corrupt")
        } else {
            None
        }
    }

    /// Notes an etcd error seen elsewhere: a write refused for lack of space means
    /// NOSPACE is raised, before the next poll says so. Returns whether it was that.
    pub fn note_error(&self, e: &etcd_client::Error) -> bool {
        let nospace = is_nospace(e);
        if nospace {
            self.set(AlarmType::Nospace, true);
        }
        nospace
    }

    /// Sets one flag and its gauge; returns the previous value.
    fn set(&self, alarm: AlarmType, raised: bool) -> bool {
        let (flag, label) = match alarm {
            AlarmType::Nospace => (&self.0.nospace, "nospace"),
            AlarmType::Corrupt => (&self.0.corrupt, "corrupt"),
            AlarmType::None => return false,
        };
        crate::metrics::etcd()
            .alarm
            .with_label_values(&[label])
            .set(i64::from(raised));
        flag.swap(raised, Ordering::AcqRel)
    }
}

/// Whether `e` is etcd refusing a write because NOSPACE is raised.
pub fn is_nospace(e: &etcd_client::Error) -> bool {
    e.to_string().contains(NOSPACE_ERROR)
}

/// Why a poll told nothing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot list etcd's alarms: {0}")]
    List(#[source] etcd_client::Error),
    #[error("etcd did not list its alarms within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the monitor polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlarmMonitorConfig {
    pub interval: Duration,
    pub request_timeout: Duration,
}

impl Default for AlarmMonitorConfig {
    fn default() -> Self {
        Self {
            interval: ALARM_POLL_INTERVAL,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Stops the monitor; the flags keep their last values.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct StopAlarmMonitor;

pub struct AlarmMonitor {
    client: Client,
    alarms: EtcdAlarms,
    config: AlarmMonitorConfig,
    /// A poll is in flight (a slow etcd must not pile them up).
    polling: bool,
}

impl AlarmMonitor {
    pub fn new(client: Client, config: AlarmMonitorConfig) -> Self {
        Self {
            client,
            alarms: EtcdAlarms::default(),
            config,
            polling: false,
        }
    }

    /// What this monitor publishes; take it before starting the actor.
    pub fn alarms(&self) -> EtcdAlarms {
        self.alarms.clone()
    }

    fn poll(&mut self, ctx: &mut Context<Self>) {
        if self.polling {
            return;
        }
        self.polling = true;
        let client = self.client.clone();
        let timeout = self.config.request_timeout;
        // `ctx.spawn`, not an `AtomicResponse`: nothing waits on a poll.
        ctx.spawn(
            list_alarms(client, timeout)
                .into_actor(self)
                .map(|result, act, _| {
                    act.polling = false;
                    match result {
                        Ok(raised) => act.publish(&raised),
                        // The flags keep what was last known: an unreachable etcd
                        // is reported by the etcd probe, not as an alarm.
                        Err(e) => warn!(error = %e, "cannot check etcd's alarms"),
                    }
                }),
        );
    }

    fn publish(&self, raised: &[AlarmType]) {
        for alarm in [AlarmType::Nospace, AlarmType::Corrupt] {
            let now = raised.contains(&alarm);
            let before = self.alarms.set(alarm, now);
            match (alarm, before, now) {
                (AlarmType::Nospace, false, true) => {
                    error!(alarm = "NOSPACE", "{NOSPACE_REMEDY}")
                }
                (AlarmType::Corrupt, false, true) => error!(
                    alarm = "CORRUPT",
                    "etcd found a member's data corrupt: see etcd's logs, replace that member"
                ),
                (_, true, false) => info!(alarm = ?alarm, "etcd's alarm is cleared"),
                _ => {}
            }
        }
    }
}

/// The alarms raised on any member.
async fn list_alarms(mut client: Client, timeout: Duration) -> Result<Vec<AlarmType>> {
    let response = tokio::time::timeout(
        timeout,
        client.alarm(AlarmAction::Get, AlarmType::None, None),
    )
    .await
    .map_err(|_| Error::Timeout(timeout))?
    .map_err(Error::List)?;
    Ok(response.alarms().iter().map(|a| a.alarm()).collect())
}

impl Actor for AlarmMonitor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.poll(ctx);
        ctx.run_interval(self.config.interval, |act, ctx| act.poll(ctx));
    }
}

impl Handler<StopAlarmMonitor> for AlarmMonitor {
    type Result = ();

    fn handle(&mut self, _: StopAlarmMonitor, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
