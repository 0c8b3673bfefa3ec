//! `[http]`: the API listener (address, body and connection limits, registration rate,
//! HTTPS files), its defaults and its validation.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{check_host_port, check_non_zero, human_duration, Invalid, Result};

/// `[http]`: the API listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `host:port` to listen on; port 0 picks a free port.
    pub listen: String,
    /// Largest accepted request body, but for heartbeats.
    pub max_body_bytes: usize,
    /// Largest accepted heartbeat body: it carries the progress of every
    /// assignment, and only a registered executor's is read.
    pub max_heartbeat_bytes: usize,
    /// How long in-flight requests may take to finish after a shutdown signal.
    #[serde(with = "human_duration")]
    pub shutdown_timeout: Duration,
    /// Open connections per HTTP worker thread; beyond it new connections
    /// wait in the listen backlog.
    pub max_connections: usize,
    /// Registrations per second per client address (0: no limit); beyond
    /// it 429 `too_many_requests` with `Retry-After`.
    pub register_rate: f64,
    /// Registrations a client address may make at once.
    pub register_burst: u32,
    /// PEM certificate chain and key: set both to serve HTTPS only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA the other servers' certificates are checked against when
    /// forwarding to the leader over HTTPS; required with `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8300".into(),
            max_body_bytes: 64 * 1024,
            max_heartbeat_bytes: 1024 * 1024,
            shutdown_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            register_rate: 100.0,
            register_burst: 1000,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
        }
    }
}

impl HttpConfig {
    pub(super) fn validate(&self, invalid: Invalid<'_>) -> Result<()> {
        check_host_port(&self.listen).map_err(|m| invalid("http.listen", m))?;
        if self.max_body_bytes == 0 {
            return Err(invalid("http.max_body_bytes", "must be > 0".into()));
        }
        if self.max_heartbeat_bytes < 1024 {
            return Err(invalid(
                "http.max_heartbeat_bytes",
                "must be at least 1024".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("http.max_connections", "must be > 0".into()));
        }
        if !self.register_rate.is_finite() || self.register_rate < 0.0 {
            return Err(invalid(
                "http.register_rate",
                format!("{} must be a number >= 0 (0: no limit)", self.register_rate),
            ));
        }
        if self.register_burst == 0 {
            return Err(invalid("http.register_burst", "must be > 0".into()));
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => {
                crate::tls::server_config(cert, key)
                    .map_err(|e| invalid("http.tls_cert_file", e.to_string()))?;
                let Some(ca) = &self.tls_ca_file else {
                    return Err(invalid(
                        "http.tls_ca_file",
                        "is required with http.tls_cert_file: servers check each other's \
                         certificates when they forward to the leader"
                            .into(),
                    ));
                };
                crate::tls::client_config(ca)
                    .map_err(|e| invalid("http.tls_ca_file", e.to_string()))?;
            }
            (Some(_), None) => {
                return Err(invalid(
                    "http.tls_key_file",
                    "is required with http.tls_cert_file".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "http.tls_cert_file",
                    "is required with http.tls_key_file".into(),
                ))
            }
            (None, None) => {}
        }
        check_non_zero(invalid, [("http.shutdown_timeout", self.shutdown_timeout)])
    }
}
