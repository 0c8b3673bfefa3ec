//! `[etcd]`: where job state lives (endpoints or the embedded etcd, key prefix, timeouts,
//! txn limits, client TLS), its defaults and its validation, which also derives the
//! default prefix from the cluster id.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{check_non_zero, human_duration, Invalid, Result};

/// The shortest `etcd.compaction_interval` other than 0.
pub const MIN_COMPACTION_INTERVAL: Duration = Duration::from_secs(1);

/// `[etcd]`: where job state lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client URLs of an existing cluster; empty starts an embedded etcd.
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster; empty means `/flotilla/<cluster_id>`, filled in by
    /// [`Config::load`](super::Config::load).
    pub prefix: String,
    #[serde(with = "human_duration")]
    pub dial_timeout: Duration,
    #[serde(with = "human_duration")]
    pub request_timeout: Duration,
    /// How often the reactor ticks when nothing happens.
    #[serde(with = "human_duration")]
    pub tick_interval: Duration,
    /// How often the leader compacts etcd's history, to the revision it saw one
    /// interval earlier; `0` turns it off (for operators who compact etcd themselves).
    #[serde(with = "human_duration")]
    pub compaction_interval: Duration,
    /// Most operations in one txn (etcd's `--max-txn-ops`); 0, the default, is
    /// filled in by [`Config::load`](super::Config::load): the embedded etcd's
    /// [`EMBEDDED_MAX_TXN_OPS`](crate::etcd_server::EMBEDDED_MAX_TXN_OPS) (it is
    /// started with it), else etcd's own default (128).
    pub max_txn_ops: usize,
    /// Most bytes of keys and values in one txn (below etcd's `--max-request-bytes`).
    pub max_txn_bytes: usize,
    /// Client port of the embedded etcd, on 127.0.0.1.
    pub embedded_client_port: u16,
    /// Peer port of the embedded etcd, on 127.0.0.1.
    pub embedded_peer_port: u16,
    /// PEM CA that signed etcd's certificate (endpoints are then `https://`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM certificate and key flotilla presents to an etcd that checks
    /// client certificates (`--client-cert-auth`); both or neither.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

/// The worker's fields (`request_timeout`, `tick_interval`, `max_txn_bytes`) take
/// their defaults from [`crate::actors::worker::WorkerConfig::new`], written once
/// there; `max_txn_ops` is derived in `validate` (see the field).
impl Default for EtcdConfig {
    fn default() -> Self {
        let worker = crate::actors::worker::WorkerConfig::new("");
        Self {
            endpoints: Vec::new(),
            prefix: String::new(),
            dial_timeout: Duration::from_secs(5),
            request_timeout: worker.request_timeout,
            tick_interval: worker.tick_interval,
            compaction_interval: crate::actors::compactor::DEFAULT_COMPACTION_INTERVAL,
            max_txn_ops: 0,
            max_txn_bytes: worker.max_txn_bytes,
            embedded_client_port: 2379,
            embedded_peer_port: 2380,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl EtcdConfig {
    /// True when the server must start its own etcd.
    pub fn is_embedded(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Checks the section and fills in `prefix` from the (already valid) `cluster_id`.
    pub(super) fn validate(&mut self, cluster_id: &str, invalid: Invalid<'_>) -> Result<()> {
        let tls = [&self.tls_ca_file, &self.tls_cert_file, &self.tls_key_file];
        if tls.iter().any(|f| f.is_some()) {
            if self.endpoints.is_empty() {
                return Err(invalid(
                    "etcd.tls_ca_file",
                    "needs etcd.endpoints: the embedded etcd runs without TLS".into(),
                ));
            }
            if let Some(plain) = self.endpoints.iter().find(|e| !e.starts_with("https://")) {
                return Err(invalid(
                    "etcd.endpoints",
                    format!("{plain:?} must be https:// when etcd.tls_* is set"),
                ));
            }
            let identity = match (&self.tls_cert_file, &self.tls_key_file) {
                (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(invalid(
                        "etcd.tls_key_file",
                        "is required with etcd.tls_cert_file".into(),
                    ))
                }
                (None, Some(_)) => {
                    return Err(invalid(
                        "etcd.tls_cert_file",
                        "is required with etcd.tls_key_file".into(),
                    ))
                }
            };
            crate::tls::etcd_options(self.tls_ca_file.as_deref(), identity)
                .map_err(|e| invalid("etcd.tls_ca_file", e.to_string()))?;
        }

        for endpoint in &self.endpoints {
            if endpoint.is_empty() || endpoint.contains(char::is_whitespace) {
                return Err(invalid(
                    "etcd.endpoints",
                    format!("{endpoint:?} is not an etcd URL (expected http://host:port)"),
                ));
            }
        }
        if self.prefix.is_empty() {
            self.prefix = format!("/flotilla/{cluster_id}");
        } else if !self.prefix.starts_with('/') || self.prefix.ends_with('/') {
            return Err(invalid(
                "etcd.prefix",
                format!("{:?} must start with '/' and not end with '/'", self.prefix),
            ));
        }
        check_non_zero(
            invalid,
            [
                ("etcd.dial_timeout", self.dial_timeout),
                ("etcd.request_timeout", self.request_timeout),
                ("etcd.tick_interval", self.tick_interval),
            ],
        )?;
        // Zero is allowed (off); a compaction more often than every second would cut
        // off watchers that are merely a little behind.
        if !self.compaction_interval.is_zero() && self.compaction_interval < MIN_COMPACTION_INTERVAL
        {
            return Err(invalid(
                "etcd.compaction_interval",
                format!(
                    "{} is too short: use at least {} (or 0 to turn compaction off)",
                    humantime::format_duration(self.compaction_interval),
                    humantime::format_duration(MIN_COMPACTION_INTERVAL),
                ),
            ));
        }
        if self.max_txn_ops == 0 {
            self.max_txn_ops = if self.is_embedded() {
                crate::etcd_server::EMBEDDED_MAX_TXN_OPS
            } else {
                crate::etcd_server::ETCD_DEFAULT_MAX_TXN_OPS
            };
        }
        // The owner's largest patch group must fit one txn, with the fence.
        let needed = crate::owner::reactor::MAX_GROUP_KEYS + 1;
        if self.max_txn_ops < needed {
            return Err(invalid(
                "etcd.max_txn_ops",
                format!(
                    "{} is below the {needed} operations the owner's largest transaction needs \
                     (one changefeed's task keys of 32 executors, its info, status and new task, \
                     and the leader fence); etcd's default is 128",
                    self.max_txn_ops
                ),
            ));
        }
        if self.max_txn_bytes == 0 {
            return Err(invalid("etcd.max_txn_bytes", "must be > 0".into()));
        }
        for (key, port) in [
            ("etcd.embedded_client_port", self.embedded_client_port),
            ("etcd.embedded_peer_port", self.embedded_peer_port),
        ] {
            if port == 0 {
                return Err(invalid(
                    key,
                    "must be a fixed port (etcd cannot pick one)".into(),
                ));
            }
        }
        if self.embedded_client_port == self.embedded_peer_port {
            return Err(invalid(
                "etcd.embedded_peer_port",
                format!(
                    "{} is also etcd.embedded_client_port",
                    self.embedded_peer_port
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::Config;

    #[test]
    fn compaction_interval_defaults_to_five_minutes() {
        let config = Config::from_toml_str("").unwrap();
        assert_eq!(config.etcd.compaction_interval, Duration::from_secs(300));
    }

    #[test]
    fn compaction_interval_zero_turns_compaction_off() {
        let config = Config::from_toml_str("[etcd]\ncompaction_interval = \"0\"\n").unwrap();
        assert!(config.etcd.compaction_interval.is_zero());
    }

    #[test]
    fn compaction_interval_below_a_second_names_key_and_value() {
        let msg = Config::from_toml_str("[etcd]\ncompaction_interval = \"200ms\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("etcd.compaction_interval: 200ms is too short"),
            "{msg}"
        );
    }
}
