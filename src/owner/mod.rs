//! The owner's logic: keeps every changefeed assigned to exactly one live executor.
//!
//! This is the half with no runtime: no actix, no actor, no task of its own. The
//! actor that runs it (`Owner`: the reactor on an orchestrator worker, the registry
//! feed, restarts) and its heartbeat side (`WorkDesk`) are in `crate::actors::owner`,
//! beside the other actors.
//!
//! `model` is the key layout and values in etcd, `state` the typed view the
//! reactor ticks over, `reactor` the scheduling logic, `board` each executor's work for the
//! heartbeat path, `progress` the slots heartbeats leave progress in for the reactor,
//! `feeds` the changefeed administration behind the HTTP API (CAS txns on the same keys).

pub mod board;
pub mod feeds;
pub mod model;
pub mod progress;
pub mod reactor;
pub mod small_map;
pub mod state;
