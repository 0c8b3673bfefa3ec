//! The actix actors of the orchestrator worker. Each file holds one actor and
//! the messages it receives; [`worker`] wires them together.

pub mod compactor;
pub mod etcd_alarms;
pub mod etcd_watcher;
pub mod executor_registry;
pub mod leader;
pub mod owner;
pub mod ticker;
pub mod txn_committer;
pub mod worker;

pub use ticker::WorkerStats;
pub use worker::{start, start_standby, Fence, WorkerConfig, WorkerHandle};
