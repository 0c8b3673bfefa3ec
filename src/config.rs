//! Server configuration: the `config.toml` schema, its defaults, and the one place where
//! the file, `FLOTILLA_<SECTION>_<KEY>` environment variables and command-line flags are
//! merged (in that order, later wins) and validated.
//!
//! Everything is checked once, at start-up, by [`Config::load`]; the rest of the program
//! can trust a `Config` it is handed. Errors name the key, the bad value and where the
//! value came from, so an operator can fix the right layer.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The file `flotilla serve` reads when `--config` is not given, if it exists.
pub const DEFAULT_FILE: &str = "config.toml";

/// Prefix of the environment variables that override keys: `FLOTILLA_ETCD_ENDPOINTS`
/// sets `etcd.endpoints`.
pub const ENV_PREFIX: &str = "FLOTILLA_";

/// Section names, in the order they appear in `config.toml`.
pub const SECTIONS: [&str; 6] = ["server", "http", "etcd", "store", "registry", "log"];

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
    pub log: LogConfig,
}

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

/// `[etcd]`: where job state lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client URLs of an existing cluster; empty starts an embedded etcd.
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster; empty means `/flotilla/<cluster_id>`, filled in by
    /// [`Config::load`].
    pub prefix: String,
    #[serde(with = "human_duration")]
    pub dial_timeout: Duration,
    #[serde(with = "human_duration")]
    pub request_timeout: Duration,
    /// How often the reactor ticks when nothing happens.
    #[serde(with = "human_duration")]
    pub tick_interval: Duration,
    /// Most operations in one txn (etcd's `--max-txn-ops`).
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

/// The worker's fields (`request_timeout`, `tick_interval`, `max_txn_*`) take their
/// defaults from [`crate::actors::worker::WorkerConfig::new`], written once there.
impl Default for EtcdConfig {
    fn default() -> Self {
        let worker = crate::actors::worker::WorkerConfig::new("");
        Self {
            endpoints: Vec::new(),
            prefix: String::new(),
            dial_timeout: Duration::from_secs(5),
            request_timeout: worker.request_timeout,
            tick_interval: worker.tick_interval,
            max_txn_ops: worker.max_txn_ops,
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
}

/// `[store]`: the SQL metadata store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// sea-orm URL; empty means `sqlite://<data_dir>/meta.db?mode=rwc`, filled in by
    /// [`Config::load`] so that `--data-dir` moves the database too.
    pub url: String,
}

/// `[registry]`: executor liveness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// How often expired executors are looked for.
    #[serde(with = "human_duration")]
    pub keepalive_interval: Duration,
    /// Interval the server asks executors to heartbeat at.
    #[serde(with = "human_duration")]
    pub heartbeat_interval: Duration,
    /// TTL of an executor that asks for none.
    #[serde(with = "human_duration")]
    pub default_ttl: Duration,
    /// Bounds an executor's requested TTL is clamped to.
    #[serde(with = "human_duration")]
    pub min_ttl: Duration,
    #[serde(with = "human_duration")]
    pub max_ttl: Duration,
    /// TTL given to every executor loaded from the store at start-up or failover.
    #[serde(with = "human_duration")]
    pub failover_grace: Duration,
    /// Share of live executors that, expiring at once, counts as a mass expiry.
    pub mass_expiry_fraction: f64,
    /// Executors expired per second during a mass expiry.
    pub mass_expiry_rate: f64,
    /// Most executors registered at once; beyond it 503 `registry_full`.
    pub max_executors: usize,
}

/// The runtime registry's defaults, written once in
/// [`crate::actors::executor_registry::RegistryConfig`]'s `Default`.
impl Default for RegistryConfig {
    fn default() -> Self {
        let runtime = crate::actors::executor_registry::RegistryConfig::default();
        Self {
            keepalive_interval: runtime.keepalive_interval,
            heartbeat_interval: runtime.heartbeat_interval,
            default_ttl: runtime.default_ttl,
            min_ttl: runtime.min_ttl,
            max_ttl: runtime.max_ttl,
            failover_grace: runtime.failover_grace,
            mass_expiry_fraction: runtime.mass_expiry_fraction,
            mass_expiry_rate: runtime.mass_expiry_rate,
            max_executors: runtime.max_executors,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter: `info`, or `info,flotilla=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

/// `log.format`: how log lines look on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event (`text` is accepted as an older name).
    #[default]
    #[serde(alias = "text")]
    Human,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the
    /// event's fields at the top level.
    Json,
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

    /// Checks values and relations between keys, and fills in derived defaults.
    /// `origin_of` names the layer a key came from, for the error message.
    fn validate(&mut self, origin_of: &dyn Fn(&str) -> Origin) -> Result<()> {
        let invalid = |key: &str, message: String| Error::Invalid {
            key: key.into(),
            message,
            origin: origin_of(key),
        };

        let cluster_id = &self.server.cluster_id;
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
        if self.server.data_dir.as_os_str().is_empty() {
            return Err(invalid("server.data_dir", "must not be empty".into()));
        }
        if let Some(addr) = &self.server.advertise_addr {
            check_host_port(addr).map_err(|m| invalid("server.advertise_addr", m))?;
        }
        if let Some(path) = &self.server.admin_token_file {
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

        check_host_port(&self.http.listen).map_err(|m| invalid("http.listen", m))?;
        if self.http.max_body_bytes == 0 {
            return Err(invalid("http.max_body_bytes", "must be > 0".into()));
        }
        if self.http.max_heartbeat_bytes < 1024 {
            return Err(invalid(
                "http.max_heartbeat_bytes",
                "must be at least 1024".into(),
            ));
        }
        if self.http.max_connections == 0 {
            return Err(invalid("http.max_connections", "must be > 0".into()));
        }
        if !self.http.register_rate.is_finite() || self.http.register_rate < 0.0 {
            return Err(invalid(
                "http.register_rate",
                format!(
                    "{} must be a number >= 0 (0: no limit)",
                    self.http.register_rate
                ),
            ));
        }
        if self.http.register_burst == 0 {
            return Err(invalid("http.register_burst", "must be > 0".into()));
        }
        match (&self.http.tls_cert_file, &self.http.tls_key_file) {
            (Some(cert), Some(key)) => {
                crate::tls::server_config(cert, key)
                    .map_err(|e| invalid("http.tls_cert_file", e.to_string()))?;
                let Some(ca) = &self.http.tls_ca_file else {
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
        let etcd_tls = [
            &self.etcd.tls_ca_file,
            &self.etcd.tls_cert_file,
            &self.etcd.tls_key_file,
        ];
        if etcd_tls.iter().any(|f| f.is_some()) {
            if self.etcd.endpoints.is_empty() {
                return Err(invalid(
                    "etcd.tls_ca_file",
                    "needs etcd.endpoints: the embedded etcd runs without TLS".into(),
                ));
            }
            if let Some(plain) = self
                .etcd
                .endpoints
                .iter()
                .find(|e| !e.starts_with("https://"))
            {
                return Err(invalid(
                    "etcd.endpoints",
                    format!("{plain:?} must be https:// when etcd.tls_* is set"),
                ));
            }
            let identity = match (&self.etcd.tls_cert_file, &self.etcd.tls_key_file) {
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
            crate::tls::etcd_options(self.etcd.tls_ca_file.as_deref(), identity)
                .map_err(|e| invalid("etcd.tls_ca_file", e.to_string()))?;
        }
        if self.registry.max_executors == 0 {
            return Err(invalid("registry.max_executors", "must be > 0".into()));
        }

        for endpoint in &self.etcd.endpoints {
            if endpoint.is_empty() || endpoint.contains(char::is_whitespace) {
                return Err(invalid(
                    "etcd.endpoints",
                    format!("{endpoint:?} is not an etcd URL (expected http://host:port)"),
                ));
            }
        }
        if self.etcd.prefix.is_empty() {
            self.etcd.prefix = format!("/flotilla/{}", self.server.cluster_id);
        } else if !self.etcd.prefix.starts_with('/') || self.etcd.prefix.ends_with('/') {
            return Err(invalid(
                "etcd.prefix",
                format!(
                    "{:?} must start with '/' and not end with '/'",
                    self.etcd.prefix
                ),
            ));
        }
        for (key, value) in [
            ("etcd.dial_timeout", self.etcd.dial_timeout),
            ("etcd.request_timeout", self.etcd.request_timeout),
            ("etcd.tick_interval", self.etcd.tick_interval),
            ("http.shutdown_timeout", self.http.shutdown_timeout),
            (
                "registry.keepalive_interval",
                self.registry.keepalive_interval,
            ),
            (
                "registry.heartbeat_interval",
                self.registry.heartbeat_interval,
            ),
            ("registry.default_ttl", self.registry.default_ttl),
            ("registry.min_ttl", self.registry.min_ttl),
            ("registry.max_ttl", self.registry.max_ttl),
            ("server.session_ttl", self.server.session_ttl),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than 0s".into()));
            }
        }
        if self.server.session_ttl.subsec_nanos() != 0 {
            return Err(invalid(
                "server.session_ttl",
                format!(
                    "{} is not a whole number of seconds (etcd leases count seconds)",
                    humantime::format_duration(self.server.session_ttl)
                ),
            ));
        }
        if self.etcd.max_txn_ops == 0 {
            return Err(invalid("etcd.max_txn_ops", "must be > 0".into()));
        }
        if self.etcd.max_txn_bytes == 0 {
            return Err(invalid("etcd.max_txn_bytes", "must be > 0".into()));
        }
        for (key, port) in [
            ("etcd.embedded_client_port", self.etcd.embedded_client_port),
            ("etcd.embedded_peer_port", self.etcd.embedded_peer_port),
        ] {
            if port == 0 {
                return Err(invalid(
                    key,
                    "must be a fixed port (etcd cannot pick one)".into(),
                ));
            }
        }
        if self.etcd.embedded_client_port == self.etcd.embedded_peer_port {
            return Err(invalid(
                "etcd.embedded_peer_port",
                format!(
                    "{} is also etcd.embedded_client_port",
                    self.etcd.embedded_peer_port
                ),
            ));
        }

        if self.store.url.is_empty() {
            self.store.url = format!(
                "sqlite://{}/meta.db?mode=rwc",
                self.server.data_dir.display()
            );
        } else if let Err(reason) = crate::store::check_url(&self.store.url) {
            return Err(invalid(
                "store.url",
                format!("{}: {reason}", crate::store::redact_url(&self.store.url)),
            ));
        }

        let r = &self.registry;
        if r.min_ttl > r.max_ttl {
            return Err(invalid(
                "registry.min_ttl",
                format!(
                    "{} is greater than registry.max_ttl ({})",
                    human(r.min_ttl),
                    human(r.max_ttl)
                ),
            ));
        }
        if r.default_ttl < r.min_ttl || r.default_ttl > r.max_ttl {
            return Err(invalid(
                "registry.default_ttl",
                format!(
                    "{} is outside registry.min_ttl..registry.max_ttl ({}..{})",
                    human(r.default_ttl),
                    human(r.min_ttl),
                    human(r.max_ttl)
                ),
            ));
        }
        // An executor that heartbeats no faster than its TTL would flap between online
        // and expired.
        if r.heartbeat_interval >= r.default_ttl {
            return Err(invalid(
                "registry.heartbeat_interval",
                format!(
                    "{} must be shorter than registry.default_ttl ({})",
                    human(r.heartbeat_interval),
                    human(r.default_ttl)
                ),
            ));
        }
        if !(r.mass_expiry_fraction > 0.0 && r.mass_expiry_fraction <= 1.0) {
            return Err(invalid(
                "registry.mass_expiry_fraction",
                format!("{} must be in (0, 1]", r.mass_expiry_fraction),
            ));
        }
        if !(r.mass_expiry_rate.is_finite() && r.mass_expiry_rate > 0.0) {
            return Err(invalid(
                "registry.mass_expiry_rate",
                format!("{} must be a positive number", r.mass_expiry_rate),
            ));
        }

        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid(
                "log.level",
                format!("{:?} is not a log filter: {e}", self.log.level),
            ));
        }
        Ok(())
    }
}

/// `FLOTILLA_ETCD_TICK_INTERVAL` -> `etcd.tick_interval`; `None` when the variable names
/// no section. Section names have no `_`, so the first `_` after the prefix splits.
fn env_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase();
    let (section, key) = rest.split_once('_')?;
    SECTIONS
        .contains(&section)
        .then(|| format!("{section}.{key}"))
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

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The configuration as TOML tables, layer by layer, with the origin of every key.
#[derive(Default)]
struct Layers {
    table: toml::Table,
    origins: HashMap<String, Origin>,
}

impl Layers {
    fn add_file(&mut self, path: &Path, text: &str) -> Result<()> {
        let table: toml::Table = toml::from_str(text).map_err(|e| Error::Syntax {
            path: path.to_owned(),
            line: e
                .span()
                .map_or(1, |span| text[..span.start].matches('\n').count() + 1),
            message: e.message().trim().to_owned(),
        })?;
        for (section, value) in table {
            let toml::Value::Table(keys) = value else {
                // Let `build` report it with the section's name.
                self.origins
                    .insert(section.clone(), Origin::File(path.to_owned()));
                self.table.insert(section, value);
                continue;
            };
            for (key, value) in keys {
                self.insert(&section, key, value, Origin::File(path.to_owned()));
            }
        }
        Ok(())
    }

    /// Sets `section.key` from a string typed on a command line or in the environment,
    /// converting it to the type the key has in the defaults (lists are comma-separated).
    fn set_str(&mut self, key: &str, raw: &str, origin: Origin) -> Result<()> {
        let (section, name) = key.split_once('.').expect("keys are section.key");
        let defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
        let template = defaults
            .get(section)
            .and_then(|s| s.get(name))
            .cloned()
            // Optional keys have no default; unknown ones are reported by `build`.
            .unwrap_or(toml::Value::String(String::new()));
        let invalid = |what: &str| Error::Invalid {
            key: key.into(),
            message: format!("{raw:?} is not {what}"),
            origin: origin.clone(),
        };
        let value = match template {
            toml::Value::Integer(_) => {
                toml::Value::Integer(raw.trim().parse().map_err(|_| invalid("an integer"))?)
            }
            toml::Value::Float(_) => {
                toml::Value::Float(raw.trim().parse().map_err(|_| invalid("a number"))?)
            }
            toml::Value::Boolean(_) => {
                toml::Value::Boolean(raw.trim().parse().map_err(|_| invalid("true or false"))?)
            }
            toml::Value::Array(_) => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.into()))
                    .collect(),
            ),
            _ => toml::Value::String(raw.into()),
        };
        self.insert(section, name.into(), value, origin);
        Ok(())
    }

    fn insert(&mut self, section: &str, key: String, value: toml::Value, origin: Origin) {
        self.origins.insert(format!("{section}.{key}"), origin);
        let entry = self
            .table
            .entry(section.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(keys) = entry {
            keys.insert(key, value);
        }
    }

    fn origin(&self, key: &str) -> Origin {
        self.origins.get(key).cloned().unwrap_or(Origin::Default)
    }

    fn build(mut self) -> Result<Config> {
        let mut config = Config {
            server: self.section("server")?,
            http: self.section("http")?,
            etcd: self.section("etcd")?,
            store: self.section("store")?,
            registry: self.section("registry")?,
            log: self.section("log")?,
        };
        if let Some(section) = self.table.keys().next() {
            return Err(Error::Invalid {
                key: section.clone(),
                message: format!("unknown section (expected one of {})", SECTIONS.join(", ")),
                origin: self.origin(section),
            });
        }
        config.validate(&|key| self.origin(key))?;
        Ok(config)
    }

    /// Takes `name` out of the table and deserializes it.
    ///
    /// Each key is first deserialized on its own (all fields have defaults, so a
    /// one-key table is a complete section): serde's errors do not say which field
    /// failed, and this way the error can name `section.key` and its origin.
    fn section<T: DeserializeOwned + Default>(&mut self, name: &str) -> Result<T> {
        let Some(value) = self.table.remove(name) else {
            return Ok(T::default());
        };
        let toml::Value::Table(keys) = value else {
            return Err(Error::Invalid {
                key: name.into(),
                message: format!("must be a table ([{name}]), not {}", value.type_str()),
                origin: self.origin(name),
            });
        };
        // BTreeMap for a stable "first" error.
        let sorted: BTreeMap<_, _> = keys.iter().collect();
        for (key, value) in sorted {
            let single = toml::Table::from_iter([(key.clone(), value.clone())]);
            if let Err(e) = single.try_into::<T>() {
                let full = format!("{name}.{key}");
                return Err(Error::Invalid {
                    message: tidy_serde_message(e.message()),
                    origin: self.origin(&full),
                    key: full,
                });
            }
        }
        keys.try_into::<T>().map_err(|e| Error::Invalid {
            key: name.into(),
            message: tidy_serde_message(e.message()),
            origin: self.origin(name),
        })
    }
}

/// serde says "unknown field"; our users write keys.
fn tidy_serde_message(message: &str) -> String {
    let message = message.trim();
    match message.strip_prefix("unknown field ") {
        Some(rest) => format!("unknown key {rest}"),
        None => message.to_owned(),
    }
}

/// Durations as human strings (`"500ms"`, `"10s"`, `"1m 30s"`).
mod human_duration {
    use std::time::Duration;

    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Other(toml::Value),
        }
        match Raw::deserialize(d)? {
            Raw::Text(text) => humantime::parse_duration(text.trim()).map_err(|_| {
                de::Error::custom(format!(
                    "{text:?} is not a duration (write it like \"500ms\", \"10s\" or \"1m\")"
                ))
            }),
            Raw::Other(value) => Err(de::Error::custom(format!(
                "{value} is not a duration (write it as a string like \"500ms\" or \"10s\")"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_env(env: &[(&str, &str)]) -> Result<Config> {
        Config::load(
            None,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            &[],
        )
    }

    #[test]
    fn defaults_are_valid_and_derive_prefix_and_store_url() {
        let config = Config::load(None, [], &[]).unwrap();
        assert_eq!(config.server.cluster_id, "default");
        assert_eq!(config.http.listen, "127.0.0.1:8300");
        assert_eq!(config.http.max_body_bytes, 65536);
        assert_eq!(config.http.max_heartbeat_bytes, 1048576);
        assert_eq!(config.etcd.prefix, "/flotilla/default");
        assert_eq!(config.etcd.tick_interval, Duration::from_millis(100));
        assert_eq!(config.etcd.max_txn_ops, 128);
        assert_eq!(config.etcd.max_txn_bytes, 1_310_720);
        assert_eq!(config.store.url, "sqlite://data/meta.db?mode=rwc");
        assert_eq!(
            config.registry.keepalive_interval,
            Duration::from_millis(500)
        );
        assert_eq!(config.log.format, LogFormat::Human);
        assert!(config.etcd.is_embedded());
    }

    #[test]
    fn empty_document_equals_defaults() {
        assert_eq!(
            Config::from_toml_str("").unwrap(),
            Config::load(None, [], &[]).unwrap()
        );
    }

    #[test]
    fn shipped_config_toml_parses_to_the_defaults() {
        let text = include_str!("../config.toml");
        let shipped = Config::from_toml_str(text).unwrap();
        assert_eq!(shipped, Config::load(None, [], &[]).unwrap());
    }

    #[test]
    fn shipped_config_toml_mentions_every_key() {
        let text = include_str!("../config.toml");
        let mut defaults = toml::Table::try_from(Config::default()).unwrap();
        // Optional keys have no default value, so add them by hand.
        let server = defaults["server"].as_table_mut().unwrap();
        server.insert("advertise_addr".into(), "".into());
        server.insert("admin_token_file".into(), "".into());
        let http = defaults["http"].as_table_mut().unwrap();
        for key in ["tls_cert_file", "tls_key_file", "tls_ca_file"] {
            http.insert(key.into(), "".into());
        }
        let etcd = defaults["etcd"].as_table_mut().unwrap();
        for key in ["tls_ca_file", "tls_cert_file", "tls_key_file"] {
            etcd.insert(key.into(), "".into());
        }
        for (section, keys) in defaults {
            assert!(
                text.contains(&format!("[{section}]")),
                "missing [{section}]"
            );
            for key in keys.as_table().unwrap().keys() {
                assert!(
                    text.lines().any(|l| {
                        let l = l.trim_start_matches(['#', ' ']);
                        l.starts_with(&format!("{key} ="))
                    }),
                    "config.toml does not mention {section}.{key}"
                );
            }
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml_str("[etcd]\nendpoint = []\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("etcd.endpoint: unknown key `endpoint`"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_section_is_named() {
        let msg = Config::from_toml_str("[etc]\nx = 1\n")
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("etc: unknown section"), "{msg}");
    }

    #[test]
    fn bad_duration_names_key_and_value() {
        let msg = Config::from_toml_str("[etcd]\ntick_interval = \"abc\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("etcd.tick_interval: \"abc\" is not a duration"),
            "{msg}"
        );
        assert!(msg.ends_with("(in <string>)"), "{msg}");
    }

    #[test]
    fn duration_as_number_is_rejected() {
        let msg = Config::from_toml_str("[registry]\nmin_ttl = 5\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("registry.min_ttl: 5 is not a duration"),
            "{msg}"
        );
    }

    #[test]
    fn wrong_type_names_key() {
        let msg = Config::from_toml_str("[http]\nmax_body_bytes = \"big\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("http.max_body_bytes: invalid type"),
            "{msg}"
        );
    }

    #[test]
    fn syntax_error_names_line() {
        let msg = Config::from_toml_str("[http]\nlisten = \n")
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("<string>: line 2:"), "{msg}");
        assert_eq!(msg.lines().count(), 1, "{msg}");
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[http]\nlisten = \"127.0.0.1:1\"\n[etcd]\ntick_interval = \"1s\"\n",
        )
        .unwrap();
        let env = [
            ("FLOTILLA_HTTP_LISTEN", "127.0.0.1:2"),
            ("FLOTILLA_ETCD_ENDPOINTS", "http://a:2379, http://b:2379"),
            ("FLOTILLA_ETCD_EMBEDDED_CLIENT_PORT", "12379"),
            ("FLOTILLA_REGISTRY_MASS_EXPIRY_RATE", "2"),
            ("FLOTILLA_STORE_URL", "postgres://u@h/db"),
            ("FLOTILLA_LOG_FORMAT", "json"),
            ("FLOTILLA_TEST_SOMETHING", "ignored: not a section"),
            ("PATH", "/bin"),
        ];
        let flags = [Override {
            key: "http.listen",
            flag: "--listen",
            value: "127.0.0.1:3".into(),
        }];
        let config = Config::load(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            &flags,
        )
        .unwrap();
        assert_eq!(config.http.listen, "127.0.0.1:3");
        assert_eq!(config.etcd.tick_interval, Duration::from_secs(1));
        assert_eq!(config.etcd.endpoints, ["http://a:2379", "http://b:2379"]);
        assert!(!config.etcd.is_embedded());
        assert_eq!(config.etcd.embedded_client_port, 12379);
        assert_eq!(config.registry.mass_expiry_rate, 2.0);
        assert_eq!(config.store.url, "postgres://u@h/db");
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn log_format_text_is_an_alias_of_human() {
        for (value, format) in [
            ("human", LogFormat::Human),
            ("text", LogFormat::Human),
            ("json", LogFormat::Json),
        ] {
            let config = Config::from_toml_str(&format!("[log]\nformat = \"{value}\"\n")).unwrap();
            assert_eq!(config.log.format, format, "{value}");
        }
    }

    #[test]
    fn env_error_names_the_variable() {
        let msg = load_env(&[("FLOTILLA_ETCD_TICK_INTERVAL", "abc")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "etcd.tick_interval: \"abc\" is not a duration (write it like \"500ms\", \"10s\" or \"1m\") (set by FLOTILLA_ETCD_TICK_INTERVAL)"
        );
        let msg = load_env(&[("FLOTILLA_ETCD_EMBEDDED_CLIENT_PORT", "x")])
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("etcd.embedded_client_port: \"x\" is not an integer"));
        let msg = load_env(&[("FLOTILLA_ETCD_EMBEDDED_CLIENT_PORT", "70000")])
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("etcd.embedded_client_port: invalid value"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_env_key_in_known_section_is_an_error() {
        let msg = load_env(&[("FLOTILLA_ETCD_ENDPOINT", "http://a:2379")])
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("etcd.endpoint: unknown key"), "{msg}");
        assert!(msg.ends_with("(set by FLOTILLA_ETCD_ENDPOINT)"), "{msg}");
    }

    #[test]
    fn optional_keys_can_be_set_from_env() {
        let config = load_env(&[("FLOTILLA_SERVER_ADVERTISE_ADDR", "10.0.0.1:8300")]).unwrap();
        assert_eq!(
            config.server.advertise_addr.as_deref(),
            Some("10.0.0.1:8300")
        );
    }

    #[test]
    fn min_ttl_above_max_ttl_is_rejected() {
        let msg = Config::from_toml_str("[registry]\nmin_ttl = \"2m\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "registry.min_ttl: 2m is greater than registry.max_ttl (1m) (in <string>)"
        );
    }

    #[test]
    fn default_ttl_outside_bounds_is_rejected() {
        let msg = Config::from_toml_str("[registry]\ndefault_ttl = \"500ms\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("registry.default_ttl: 500ms is outside"),
            "{msg}"
        );
    }

    #[test]
    fn heartbeat_not_shorter_than_ttl_is_rejected() {
        let msg = load_env(&[("FLOTILLA_REGISTRY_HEARTBEAT_INTERVAL", "5s")])
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("registry.heartbeat_interval: 5s must be shorter"),
            "{msg}"
        );
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        for (toml, key) in [
            (
                "[registry]\nmass_expiry_fraction = 1.5",
                "registry.mass_expiry_fraction",
            ),
            (
                "[registry]\nmass_expiry_rate = 0.0",
                "registry.mass_expiry_rate",
            ),
            ("[etcd]\ntick_interval = \"0s\"", "etcd.tick_interval"),
            ("[etcd]\nmax_txn_ops = 0", "etcd.max_txn_ops"),
            ("[etcd]\nprefix = \"no-slash\"", "etcd.prefix"),
            (
                "[etcd]\nembedded_peer_port = 2379",
                "etcd.embedded_peer_port",
            ),
            ("[http]\nlisten = \"8300\"", "http.listen"),
            ("[http]\nmax_body_bytes = 0", "http.max_body_bytes"),
            (
                "[http]\nmax_heartbeat_bytes = 100",
                "http.max_heartbeat_bytes",
            ),
            ("[server]\ncluster_id = \"a/b\"", "server.cluster_id"),
            (
                "[server]\nadvertise_addr = \"host\"",
                "server.advertise_addr",
            ),
            (
                "[server]\nadmin_token_file = \"/nonexistent/token\"",
                "server.admin_token_file",
            ),
            ("[server]\nsession_ttl = \"1500ms\"", "server.session_ttl"),
            (
                "[http]\ntls_cert_file = \"/nonexistent\"",
                "http.tls_key_file",
            ),
            (
                "[http]\ntls_cert_file = \"/nonexistent\"\ntls_key_file = \"/nonexistent\"",
                "http.tls_cert_file",
            ),
            ("[etcd]\ntls_ca_file = \"/x\"", "etcd.tls_ca_file"),
            (
                "[etcd]\nendpoints = [\"http://h:2379\"]\ntls_ca_file = \"/x\"",
                "etcd.endpoints",
            ),
            ("[server]\nsession_ttl = \"0s\"", "server.session_ttl"),
            ("[store]\nurl = \"redis://x\"", "store.url"),
            ("[log]\nformat = \"xml\"", "log.format"),
            ("[log]\nlevel = \"info,[\"", "log.level"),
            ("etcd = 5", "etcd"),
        ] {
            let msg = Config::from_toml_str(toml).unwrap_err().to_string();
            assert!(msg.starts_with(&format!("{key}: ")), "{toml:?} gave {msg}");
        }
    }

    #[test]
    fn explicit_prefix_and_store_url_are_kept() {
        let config = Config::from_toml_str(
            "[server]\ncluster_id = \"c1\"\ndata_dir = \"/var/lib/f\"\n[etcd]\nprefix = \"/x\"\n",
        )
        .unwrap();
        assert_eq!(config.etcd.prefix, "/x");
        assert_eq!(config.store.url, "sqlite:///var/lib/f/meta.db?mode=rwc");
    }

    #[test]
    fn a_store_url_the_store_cannot_open_is_refused_at_start() {
        for url in ["mysql://u:secret@h/db", "redis://h", "nonsense"] {
            let toml = format!("[store]\nurl = {url:?}\n");
            let msg = Config::from_toml_str(&toml).unwrap_err().to_string();
            assert!(msg.starts_with("store.url: "), "{msg}");
            assert!(!msg.contains("secret"), "the password is redacted: {msg}");
        }
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let err = Config::load(Some(Path::new("/nonexistent/flotilla.toml")), [], &[]).unwrap_err();
        assert!(matches!(err, Error::Read { .. }), "{err}");
    }
}
