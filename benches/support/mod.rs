//! Shared by the registry benches (a `benches/support.rs` would be taken for
//! a bench target of its own).

use std::time::Duration;

use flotilla::actors::executor_registry::{
    ExecutorRegistry, GetRegistryStats, RegistryConfig, RegistryHandle,
};
use flotilla::store::{Store, StoreOptions};

/// A loaded registry on the store at `url` where nothing expires by itself
/// (hour-long TTLs and keepalive): the benches trigger what they measure.
pub async fn quiet_registry(url: &str) -> RegistryHandle {
    let store = Store::connect(url, &StoreOptions::default())
        .await
        .expect("bench store");
    let config = RegistryConfig {
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(3600),
        keepalive_interval: Duration::from_secs(3600),
        ..RegistryConfig::default()
    };
    let registry = ExecutorRegistry::new(config, store).start_with_table();
    while !registry.addr.send(GetRegistryStats).await.unwrap().loaded {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    registry
}
