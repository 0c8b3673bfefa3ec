//! The integration tests: one crate (one binary, one link of the dependency tree),
//! one module per area, and one harness (`harness`) they all share.
//! Run one area with `cargo test --test it -- chaos::`.

#![allow(dead_code)]

mod harness;

mod agent;
mod changefeeds_api;
mod chaos;
mod cli;
mod client;
mod cluster_e2e;
mod compaction;
mod dashboard;
mod etcd_harness;
mod etcd_worker;
mod etcd_worker_faults;
mod executor_registry;
mod executors_api;
mod ha;
mod hardening;
mod observability;
mod openapi;
mod owner;
mod readme;
mod serve;
mod store;
mod tidy;
mod tls;
