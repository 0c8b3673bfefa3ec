//! Server configuration: the `config.toml` schema, its defaults, and the one place where
//! the file, `FLOTILLA_<SECTION>_<KEY>` environment variables and command-line flags are
//! merged (in that order, later wins) and validated.
//!
//! Everything is checked once, at start-up, by [`Config::load`]; the rest of the program
//! can trust a `Config` it is handed. Errors name the key, the bad value and where the
//! value came from, so an operator can fix the right layer.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod etcd;
mod http;
mod human_duration;
mod layers;
mod log;
mod owner;
mod registry;
mod server;
mod store;
#[cfg(test)]
mod tests;

pub use etcd::EtcdConfig;
pub use http::HttpConfig;
pub use log::{LogConfig, LogFormat};
pub use owner::OwnerConfig;
pub use registry::RegistryConfig;
pub use server::ServerConfig;
pub use store::StoreConfig;

use layers::{env_key, Layers};

/// The file `flotilla serve` reads when `--config` is not given, if it exists.
pub const DEFAULT_FILE: &str = "config.toml";

/// Prefix of the environment variables that override keys: `FLOTILLA_ETCD_ENDPOINTS`
/// sets `etcd.endpoints`.
pub const ENV_PREFIX: &str = "FLOTILLA_";

/// Section names, in the order they appear in `config.toml`.
pub const SECTIONS: [&str; 7] = [
    "server", "http", "etcd", "store", "registry", "owner", "log",
];

/// Errors found while loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML.
    #[error("{}: line {line}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A key is unknown, or its value has the wrong type or is out of range.
    #[error("{key}: {message}{origin}")]
    Invalid {
        /// `section.key`, or just `section` when the section itself is wrong.
        key: String,
        message: String,
        /// Where the bad value came from.
        origin: Origin,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a configuration value came from; shown in errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Env(String),
    Flag(String),
}

impl fmt::Display for Origin {
    // Rendered as a suffix of the error message, hence the leading space.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => Ok(()),
            Origin::File(path) => write!(f, " (in {})", path.display()),
            Origin::Env(var) => write!(f, " (set by {var})"),
            Origin::Flag(flag) => write!(f, " (set by {flag})"),
        }
    }
}

/// A command-line flag that overrides one key.
#[derive(Debug, Clone)]
pub struct Override {
    /// `section.key`, for example `http.listen`.
    pub key: &'static str,
    /// The flag as the user typed it, for example `--listen`.
    pub flag: &'static str,
    /// The raw value; parsed like an environment variable.
    pub value: String,
}

/// The whole configuration. Field names are the keys of `config.toml`; keep them stable.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub http: HttpConfig,
    pub etcd: EtcdConfig,
    pub store: StoreConfig,
    pub registry: RegistryConfig,
    pub owner: OwnerConfig,
    pub log: LogConfig,
}

impl Config {
    /// Loads the configuration: built-in defaults, then `file` (if any), then every
    /// `FLOTILLA_<SECTION>_<KEY>` variable in `env`, then `flags`; then validates it and
    /// fills in derived defaults (`etcd.prefix`, `store.url`).
    ///
    /// `env` is a parameter rather than read here so tests need not touch the process
    /// environment. Variables that start with `FLOTILLA_` but name no section are
    /// ignored (scripts may use them); an unknown key in a known section is an error.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &[Override],
    ) -> Result<Config> {
        let mut layers = Layers::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.to_owned(),
                source,
            })?;
            layers.add_file(path, &text)?;
        }
        let mut env: Vec<_> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        // Sorted so that the first error reported does not depend on hash order.
        env.sort();
        for (name, value) in env {
            if let Some(key) = env_key(&name) {
                layers.set_str(&key, &value, Origin::Env(name))?;
            }
        }
        for flag in flags {
            layers.set_str(flag.key, &flag.value, Origin::Flag(flag.flag.into()))?;
        }
        layers.build()
    }

    /// Parses a whole TOML document with no environment or flags; for tests and tools.
    pub fn from_toml_str(text: &str) -> Result<Config> {
        let mut layers = Layers::default();
        layers.add_file(Path::new("<string>"), text)?;
        layers.build()
    }

    /// Checks values and relations between keys, and fills in derived defaults
    /// (`etcd.prefix` from `server.cluster_id`, `store.url` from `server.data_dir`, so
    /// `server` is checked first). `origin_of` names the layer a key came from, for the
    /// error message.
    fn validate(&mut self, origin_of: &dyn Fn(&str) -> Origin) -> Result<()> {
        let invalid = |key: &str, message: String| Error::Invalid {
            key: key.into(),
            message,
            origin: origin_of(key),
        };
        self.server.validate(&invalid)?;
        self.http.validate(&invalid)?;
        self.etcd.validate(&self.server.cluster_id, &invalid)?;
        self.store.validate(&self.server.data_dir, &invalid)?;
        self.registry.validate(&invalid)?;
        self.registry
            .validate_failover_grace(self.server.session_ttl, &invalid)?;
        self.owner.validate(&invalid)?;
        self.log.validate(&invalid)
    }
}

/// A valid setting an operator should know is risky; [`Config::warnings`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// `section.key`.
    pub key: &'static str,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl Config {
    /// Valid settings that are likely a mistake (such as an executor TTL too short to
    /// outlast a leader failover), for the caller to log once logging is set up:
    /// [`Config::load`] runs before it.
    pub fn warnings(&self) -> Vec<Warning> {
        self.registry.warnings(self.server.session_ttl)
    }
}

/// Builds the [`Error::Invalid`] for `key` with a message; the origin is filled in from
/// the layer the key came from. Handed to each section's `validate`.
type Invalid<'a> = &'a dyn Fn(&str, String) -> Error;

/// Rejects the first zero duration of `keys`.
fn check_non_zero<const N: usize>(invalid: Invalid<'_>, keys: [(&str, Duration); N]) -> Result<()> {
    for (key, value) in keys {
        if value.is_zero() {
            return Err(invalid(key, "must be longer than 0s".into()));
        }
    }
    Ok(())
}

/// Checks `host:port` without resolving the host (a DNS lookup at validation time would
/// make start-up depend on the resolver twice).
fn check_host_port(addr: &str) -> std::result::Result<(), String> {
    let bad = || format!("{addr:?} is not host:port");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(())
}
