//! flotilla: an actor-based control plane for executors running changefeeds.
//! See ARCHITECTURE.md for the map.
pub mod actors;
pub mod client;
pub mod config;
pub mod data_dir;
pub mod election;
pub mod error_code;
pub mod etcd_errors;
pub mod etcd_range;
pub mod etcd_server;
pub mod http;
pub mod json;
pub mod labels;
pub mod metrics;
pub mod owner;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;
