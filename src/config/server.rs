//! `[server]`: who this server is (cluster id, data directory, advertised address,
//! admin token, election lease TTL), its defaults and its validation.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{check_host_port, check_non_zero, human_duration, Invalid, Result};

/// `[server]`: who this server is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Names the cluster; servers sharing an etcd prefix must share it.
    pub cluster_id: String,
    /// Directory for the embedded etcd and the default SQLite file.
    pub data_dir: PathBuf,
    /// `host:port` other servers and executors use to reach this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_addr: Option<String>,
    /// File holding the admin bearer token (the whole file, trimmed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// TTL of this server's lease in the leader election: how long a leader
    /// that stopped answering keeps the leadership (whole seconds, >= 1s).
    #[serde(with = "human_duration")]
    pub session_ttl: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            cluster_id: "default".into(),
            data_dir: PathBuf::from("data"),
            advertise_addr: None,
            admin_token_file: None,
            session_ttl: Duration::from_secs(10),
        }
    }
}

impl ServerConfig {
    pub(super) fn validate(&self, invalid: Invalid<'_>) -> Result<()> {
        let cluster_id = &self.cluster_id;
        if cluster_id.is_empty()
            || !cluster_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(invalid(
                "server.cluster_id",
                format!("{cluster_id:?} must be non-empty and use only letters, digits, '-', '_' and '.' (it is part of etcd keys)"),
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("server.data_dir", "must not be empty".into()));
        }
        if let Some(addr) = &self.advertise_addr {
            check_host_port(addr).map_err(|m| invalid("server.advertise_addr", m))?;
        }
        if let Some(path) = &self.admin_token_file {
            // Read once here so a typo fails the start, not the first admin request.
            let token = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    "server.admin_token_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            if token.trim().is_empty() {
                return Err(invalid(
                    "server.admin_token_file",
                    format!("{} is empty", path.display()),
                ));
            }
        }
        check_non_zero(invalid, [("server.session_ttl", self.session_ttl)])?;
        if self.session_ttl.subsec_nanos() != 0 {
            return Err(invalid(
                "server.session_ttl",
                format!(
                    "{} is not a whole number of seconds (etcd leases count seconds)",
                    humantime::format_duration(self.session_ttl)
                ),
            ));
        }
        Ok(())
    }
}
