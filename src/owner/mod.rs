//! The owner: keeps every changefeed assigned to exactly one live executor.
//! `model` is the key layout and values in etcd, `state` the typed view the
//! reactor ticks over, `reactor` the scheduling logic, `board` each executor's work for the
//! heartbeat path, `feeds` the changefeed
//! administration behind the HTTP API (CAS txns on the same keys).

pub mod board;
pub mod feeds;
pub mod model;
pub mod reactor;
pub mod state;
