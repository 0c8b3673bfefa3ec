//! The one integration-test harness: real etcd ([`etcd`]), PostgreSQL ([`postgres`]),
//! `flotilla serve` processes ([`server`], [`cluster`]), reactors for the etcd worker
//! ([`reactors`]).

use std::sync::Once;

pub mod app;
pub mod cluster;
pub mod etcd;
pub mod http;
pub mod ports;
pub mod postgres;
pub mod proxy;
pub mod reactors;
pub mod server;

pub use etcd::{process_is_running, EtcdCluster};

/// Installs a `tracing` fmt subscriber for tests once per process: `RUST_LOG` if set,
/// `warn,flotilla=info` otherwise, written through the test writer so libtest
/// captures it per test.
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,flotilla=info"));
        // Another subscriber may already be installed (a test that set its own).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}
