//! One control-plane server in this process: [`run`] is what `flotilla serve` does once
//! the configuration is loaded. It starts the embedded etcd when no endpoints are
//! configured, connects etcd and the metadata store, starts the leader roles and the
//! election, serves the HTTP API until asked to shut down, and then stops in order:
//! HTTP drains first (requests in flight may still need the owner, the registry and
//! etcd), then the leader roles step down, the election resigns, and the embedded etcd
//! stops last.
//!
//! `run` must be called inside an actix `System` (the leader roles are actors, the HTTP
//! server runs on actix-rt). Tests and benches can start a server in process with it;
//! the binary passes its SIGINT/SIGTERM handling as the shutdown stream.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Recipient};
use futures::{Stream, StreamExt};
use tracing::{info, warn};

use crate::actors::etcd_alarms::{AlarmMonitor, AlarmMonitorConfig, StopAlarmMonitor};
use crate::actors::executor_registry::RegistryConfig;
use crate::actors::leader::{LeaderRoles, RoleSettings, RoleSlot, StepDown};
use crate::actors::owner::OwnerSettings;
use crate::actors::WorkerConfig;
use crate::config::{self, Config};
use crate::data_dir::DataDir;
use crate::election::{self, ElectionConfig, ElectionHandle, Leadership};
use crate::etcd_server::{self, EmbeddedEtcd, EmbeddedEtcdOptions};
use crate::http::{self, AppState, EtcdProbe, ServerInfo};
use crate::owner::feeds::Changefeeds;
use crate::owner::model::Keys;
use crate::owner::reactor::OwnerConfig;
use crate::store::{self, Store, StoreOptions};
use crate::tls;

/// Why a server could not start or stopped with an error. Each variant names what
/// failed; the cause is kept as its source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `server.data_dir` could not be taken (in use by another process, or unusable).
    #[error(transparent)]
    DataDir(crate::data_dir::Error),
    /// The embedded etcd did not start.
    #[error(transparent)]
    StartEtcd(etcd_server::Error),
    /// The embedded etcd did not stop cleanly.
    #[error("cannot stop the embedded etcd")]
    StopEtcd(#[source] etcd_server::Error),
    /// The etcd client TLS material (`etcd.tls_*`) could not be loaded.
    #[error("etcd TLS (etcd.tls_*)")]
    EtcdTls(#[source] tls::Error),
    /// An etcd client could not be created.
    #[error("cannot create an etcd client for {endpoints:?}")]
    EtcdClient {
        endpoints: Vec<String>,
        #[source]
        source: etcd_client::Error,
    },
    /// The metadata store could not be opened (`url` is redacted).
    #[error("cannot open the metadata store (store.url / --store-url {url})")]
    Store {
        url: String,
        #[source]
        source: store::Error,
    },
    /// `server.admin_token_file` could not be read.
    #[error("cannot read server.admin_token_file {}", path.display())]
    AdminToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The CA servers forward to each other with (`http.tls_ca_file`) could not be loaded.
    #[error("http.tls_ca_file")]
    PeerTls(#[source] tls::Error),
    /// The HTTP listener or server could not be set up.
    #[error(transparent)]
    Http(http::listen::Error),
    /// The bound HTTP address could not be read back.
    #[error("cannot read the bound HTTP address")]
    BoundAddr(#[source] std::io::Error),
    /// The HTTP server failed while serving.
    #[error("HTTP server failed")]
    Serve(#[source] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Holds the admin token when `server.admin_token_file` is not set.
pub const ADMIN_TOKEN_ENV: &str = "FLOTILLA_ADMIN_TOKEN";

/// Runs one server until `shutdown` asks it to stop, then stops it in order.
///
/// Each item of `shutdown` is a request to shut down, named for the logs (the binary
/// sends `"SIGINT"` / `"SIGTERM"`): the first drains HTTP gracefully, a second one
/// stops waiting for requests in flight. One during start-up (while the embedded etcd
/// starts) ends `run` at once with `Ok`. A stream that ends asks for nothing more.
pub async fn run<S>(config: Config, mut shutdown: S) -> Result<()>
where
    S: Stream<Item = &'static str> + Unpin,
{
    info!(
        version = env!("CARGO_PKG_VERSION"),
        cluster_id = %config.server.cluster_id,
        prefix = %config.etcd.prefix,
        "starting flotilla"
    );

    // First: two live processes never share one identity (nor one embedded etcd).
    let data_dir = Arc::new(DataDir::lock(&config.server.data_dir).map_err(Error::DataDir)?);
    let embedded = match embedded_etcd_options(&config) {
        Some(options) => match start_embedded_etcd(options, &mut shutdown).await? {
            Some(etcd) => Some(etcd),
            None => return Ok(()),
        },
        None => None,
    };
    let endpoints = match &embedded {
        Some(etcd) => vec![etcd.endpoint().to_owned()],
        None => config.etcd.endpoints.clone(),
    };

    // Created here, on the main System, which outlives the HTTP workers that use it.
    let etcd_options = etcd_connect_options(&config)?;
    let (changefeeds, probe) = connect_api_etcd(&config, &endpoints, etcd_options.clone()).await?;
    let store = open_store(&config).await?;
    // The owner gets a client of its own without a request timeout: its
    // watch is a long-lived stream, and the worker bounds each request itself.
    // The election shares it (its requests are bounded by the election).
    let owner_client = connect_etcd(&endpoints, etcd_options).await?;
    // Every server watches etcd's alarms (they concern the whole cluster).
    let alarm_monitor = AlarmMonitor::new(
        owner_client.clone(),
        AlarmMonitorConfig {
            request_timeout: config.etcd.request_timeout,
            ..AlarmMonitorConfig::default()
        },
    );
    let etcd_alarms = alarm_monitor.alarms();
    let alarm_monitor = alarm_monitor.start();
    let keys = Keys::new(config.etcd.prefix.clone());
    let server_id = server_id();
    let roles = RoleSlot::default();
    let leader_roles = start_leader_roles(
        &config,
        store,
        owner_client.clone(),
        keys.clone(),
        server_id.clone(),
        roles.clone(),
    );
    let admin_token = load_admin_token(&config)?;

    let listener = http::listen(&config.http.listen).map_err(Error::Http)?;
    let bound = listener.local_addr().map_err(Error::BoundAddr)?;
    let info = ServerInfo {
        id: server_id,
        version: env!("CARGO_PKG_VERSION"),
        cluster_id: config.server.cluster_id.clone(),
        advertise_addr: config
            .server
            .advertise_addr
            .clone()
            .unwrap_or_else(|| bound.to_string()),
        etcd_endpoints: endpoints,
    };
    let server_id = info.id.clone();
    let peer_tls = peer_tls(&config)?;
    let election = start_election(
        owner_client,
        &config,
        &keys,
        &info,
        data_dir,
        leader_roles.clone().recipient(),
    );
    let state = AppState::new(info, probe)
        .with_roles(roles)
        .with_election(election.view())
        .with_changefeeds(changefeeds)
        .with_admin_token(admin_token)
        .with_http_limits(&config.http)
        .with_peer_tls(peer_tls)
        .with_etcd_alarms(etcd_alarms);
    let server = http::serve(listener, &config.http, state).map_err(Error::Http)?;
    info!(server_id, listen = %bound, "HTTP server listening");

    serve_until_shutdown(server, &config, &mut shutdown).await?;
    stop_leadership(leader_roles, election).await;
    let _ = alarm_monitor.send(StopAlarmMonitor).await;
    if let Some(etcd) = embedded {
        stop_embedded_etcd(etcd).await?;
    }
    info!("flotilla stopped");
    Ok(())
}

/// The next shutdown request; none, ever, once the stream has ended.
async fn next_request<S>(shutdown: &mut S) -> &'static str
where
    S: Stream<Item = &'static str> + Unpin,
{
    match shutdown.next().await {
        Some(request) => request,
        None => std::future::pending().await,
    }
}

/// The embedded etcd's options, or `None` when etcd endpoints are configured.
fn embedded_etcd_options(config: &Config) -> Option<EmbeddedEtcdOptions> {
    config.etcd.is_embedded().then(|| EmbeddedEtcdOptions {
        max_txn_ops: config.etcd.max_txn_ops,
        max_txn_bytes: config.etcd.max_txn_bytes,
        ..EmbeddedEtcdOptions::new(
            &config.server.data_dir,
            config.etcd.embedded_client_port,
            config.etcd.embedded_peer_port,
        )
    })
}

/// Starts the embedded etcd; `None` when shutdown was asked for before it was ready.
async fn start_embedded_etcd<S>(
    options: EmbeddedEtcdOptions,
    shutdown: &mut S,
) -> Result<Option<EmbeddedEtcd>>
where
    S: Stream<Item = &'static str> + Unpin,
{
    info!(
        data_dir = %options.data_dir.display(),
        client_port = options.client_port,
        peer_port = options.peer_port,
        "starting embedded etcd"
    );
    let etcd = tokio::select! {
        etcd = EmbeddedEtcd::start_with(options) => etcd.map_err(Error::StartEtcd)?,
        signal = next_request(shutdown) => {
            // Dropping the start future stops the half-started child.
            info!(signal, "shutdown requested during start-up");
            return Ok(None);
        }
    };
    info!(
        pid = etcd.pid(),
        endpoint = etcd.endpoint(),
        log = %etcd.log_path().display(),
        "embedded etcd is ready"
    );
    Ok(Some(etcd))
}

/// How every etcd client of this server connects: the dial timeout and,
/// for an external etcd with TLS, its CA and this server's identity.
fn etcd_connect_options(config: &Config) -> Result<etcd_client::ConnectOptions> {
    let options = etcd_client::ConnectOptions::new().with_connect_timeout(config.etcd.dial_timeout);
    let etcd = &config.etcd;
    if etcd.tls_ca_file.is_none() && etcd.tls_cert_file.is_none() {
        return Ok(options);
    }
    let identity = etcd
        .tls_cert_file
        .as_deref()
        .zip(etcd.tls_key_file.as_deref());
    let tls = tls::etcd_options(etcd.tls_ca_file.as_deref(), identity).map_err(Error::EtcdTls)?;
    Ok(options.with_tls(tls))
}

async fn connect_etcd(
    endpoints: &[String],
    options: etcd_client::ConnectOptions,
) -> Result<etcd_client::Client> {
    etcd_client::Client::connect(endpoints, Some(options))
        .await
        .map_err(|source| Error::EtcdClient {
            endpoints: endpoints.to_vec(),
            source,
        })
}

/// The etcd client of the HTTP API (every request bounded by `etcd.request_timeout`):
/// the changefeed operations and the readiness probe, checked once here.
async fn connect_api_etcd(
    config: &Config,
    endpoints: &[String],
    options: etcd_client::ConnectOptions,
) -> Result<(Changefeeds, EtcdProbe)> {
    let options = options.with_timeout(config.etcd.request_timeout);
    let client = connect_etcd(endpoints, options).await?;
    let changefeeds = Changefeeds::new(
        client.clone(),
        Keys::new(config.etcd.prefix.clone()),
        config.etcd.request_timeout,
    )
    .with_max_txn_ops(config.etcd.max_txn_ops);
    let probe = EtcdProbe::new(client, config.etcd.request_timeout);
    match probe.check().await {
        Ok(()) => info!(?endpoints, "etcd is reachable"),
        // An external cluster may come up later; /readyz says 503 until it does.
        Err(e) => warn!(?endpoints, error = %e, "etcd is not reachable yet"),
    }
    Ok((changefeeds, probe))
}

async fn open_store(config: &Config) -> Result<Store> {
    let store = Store::connect(&config.store.url, &StoreOptions::default())
        .await
        .map_err(|source| Error::Store {
            url: store::redact_url(&config.store.url),
            source,
        })?;
    info!(backend = store.backend(), "metadata store ready");
    Ok(store)
}

/// Starts `LeaderRoles`, idle until the election reports this server elected.
fn start_leader_roles(
    config: &Config,
    store: Store,
    client: etcd_client::Client,
    keys: Keys,
    server_id: String,
    roles: RoleSlot,
) -> Addr<LeaderRoles> {
    // `registry.failover_grace` >= `max_ttl` + `session_ttl` (>= `default_ttl` +
    // `session_ttl`) is checked by the config.
    let registry = registry_config(&config.registry);
    LeaderRoles::new(
        RoleSettings {
            registry,
            store,
            client,
            keys,
            owner: OwnerSettings {
                worker: WorkerConfig {
                    tick_interval: config.etcd.tick_interval,
                    max_txn_ops: config.etcd.max_txn_ops,
                    max_txn_bytes: config.etcd.max_txn_bytes,
                    request_timeout: config.etcd.request_timeout,
                    ..WorkerConfig::new(format!("{}/", config.etcd.prefix.trim_end_matches('/')))
                },
                owner: config.owner.apply(OwnerConfig {
                    server_id,
                    max_lease: config.registry.max_ttl,
                    ..OwnerConfig::default()
                }),
                restart_backoff: Duration::from_secs(1),
            },
        },
        roles,
    )
    .with_compaction_interval(config.etcd.compaction_interval)
    .start()
}

fn registry_config(c: &config::RegistryConfig) -> RegistryConfig {
    RegistryConfig {
        heartbeat_interval: c.heartbeat_interval,
        default_ttl: c.default_ttl,
        min_ttl: c.min_ttl,
        max_ttl: c.max_ttl,
        keepalive_interval: c.keepalive_interval,
        failover_grace: c.failover_grace,
        mass_expiry_fraction: c.mass_expiry_fraction,
        mass_expiry_rate: c.mass_expiry_rate,
        max_executors: c.max_executors,
        max_watchers: c.max_watchers,
        ..RegistryConfig::default()
    }
}

/// The admin token: from `server.admin_token_file`, else from [`ADMIN_TOKEN_ENV`].
fn load_admin_token(config: &Config) -> Result<Option<String>> {
    let admin_token = match &config.server.admin_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|source| Error::AdminToken {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
        ),
        // The same variable the CLI reads: one secret for both sides, never
        // in a file or on a command line. Not a config key, so never logged
        // with the configuration.
        None => std::env::var(ADMIN_TOKEN_ENV)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty()),
    };
    match (&config.server.admin_token_file, &admin_token) {
        (Some(path), _) => info!(file = %path.display(), "admin token loaded"),
        (None, Some(_)) => info!(env = ADMIN_TOKEN_ENV, "admin token loaded"),
        (None, None) => warn!(
            "no admin token (server.admin_token_file or {ADMIN_TOKEN_ENV}): changefeed writes are open"
        ),
    }
    Ok(admin_token)
}

/// The client TLS configuration a follower forwards to the leader with, when HTTPS
/// is served and a CA is configured.
fn peer_tls(config: &Config) -> Result<Option<Arc<rustls::ClientConfig>>> {
    match (&config.http.tls_cert_file, &config.http.tls_ca_file) {
        (Some(_), Some(ca)) => Ok(Some(Arc::new(
            tls::client_config(ca).map_err(Error::PeerTls)?,
        ))),
        _ => Ok(None),
    }
}

fn start_election(
    client: etcd_client::Client,
    config: &Config,
    keys: &Keys,
    info: &ServerInfo,
    identity: Arc<DataDir>,
    leadership: Recipient<Leadership>,
) -> ElectionHandle {
    election::start(
        client,
        ElectionConfig {
            key_prefix: keys.owner_prefix(),
            server_id: info.id.clone(),
            advertise_addr: info.advertise_addr.clone(),
            session_ttl: config.server.session_ttl,
            request_timeout: config.etcd.request_timeout,
            identity: Some(identity),
        },
        leadership,
    )
}

/// Serves until the server ends or a shutdown request drained it.
async fn serve_until_shutdown<S>(
    server: actix_web::dev::Server,
    config: &Config,
    shutdown: &mut S,
) -> Result<()>
where
    S: Stream<Item = &'static str> + Unpin,
{
    let handle = server.handle();
    let mut server = std::pin::pin!(server);
    let (mut draining, mut abandoned) = (false, false);
    loop {
        tokio::select! {
            result = &mut server => {
                result.map_err(Error::Serve)?;
                break;
            }
            signal = next_request(shutdown) => {
                if draining {
                    // actix handles stop commands one at a time, so a forced stop would
                    // wait behind the graceful one; leave instead (exit ends the workers).
                    warn!(signal, "second signal: not waiting for in-flight requests");
                    abandoned = true;
                    break;
                }
                info!(
                    signal,
                    timeout = %humantime::format_duration(config.http.shutdown_timeout),
                    "shutting down: HTTP stops accepting and drains in-flight requests"
                );
                draining = true;
                // The command is sent at once; the server future reports completion.
                drop(handle.stop(true));
            }
        }
    }
    if !abandoned {
        info!("HTTP server stopped");
    }
    Ok(())
}

/// Requests are drained; nothing sends to the owner or the registry any more.
async fn stop_leadership(leader_roles: Addr<LeaderRoles>, election: ElectionHandle) {
    // The owner's worker finishes its in-flight commit first.
    let _ = leader_roles.send(StepDown).await;
    // The lease is revoked: another server leads at once.
    election.resign().await;
    info!("left the leader election");
}

async fn stop_embedded_etcd(etcd: EmbeddedEtcd) -> Result<()> {
    info!(pid = etcd.pid(), "stopping embedded etcd");
    let status = etcd.stop().await.map_err(Error::StopEtcd)?;
    // etcd re-raises SIGTERM after a graceful shutdown; that is the normal end.
    if status.success() || status.signal() == Some(libc::SIGTERM) {
        info!("embedded etcd stopped");
    } else {
        warn!(%status, "embedded etcd stopped abnormally");
    }
    Ok(())
}

/// A per-process id: readable (host name) and unique across restarts (random suffix).
fn server_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "flotilla".into());
    format!("{host}-{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// Distinct free ports, held at once so that none is handed out twice.
    fn free_ports<const N: usize>() -> [u16; N] {
        let listeners: Vec<_> = (0..N)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
            .collect();
        std::array::from_fn(|i| listeners[i].local_addr().expect("bound").port())
    }

    fn healthz(port: u16) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        Some(answer)
    }

    #[actix_web::test]
    async fn an_in_process_server_serves_until_asked_to_stop_then_stops_its_etcd() {
        let dir = tempfile::tempdir().expect("temp dir");
        let [http, client, peer] = free_ports();
        let env = [
            ("FLOTILLA_SERVER_DATA_DIR", dir.path().display().to_string()),
            ("FLOTILLA_HTTP_LISTEN", format!("127.0.0.1:{http}")),
            ("FLOTILLA_ETCD_EMBEDDED_CLIENT_PORT", client.to_string()),
            ("FLOTILLA_ETCD_EMBEDDED_PEER_PORT", peer.to_string()),
        ]
        .map(|(k, v)| (k.to_owned(), v));
        let config = Config::load(None, env, &[]).expect("valid config");
        let (requests, shutdown) = futures::channel::mpsc::unbounded();
        let server = actix_rt::spawn(run(config, shutdown));

        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let answer = loop {
            let answer = actix_web::rt::task::spawn_blocking(move || healthz(http))
                .await
                .expect("probe");
            match answer {
                Some(answer) if answer.starts_with("HTTP/1.1 200") => break answer,
                _ if std::time::Instant::now() > deadline => panic!("no healthz: {answer:?}"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

        requests.unbounded_send("test").expect("server listening");
        let result = tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .expect("stops within 30 s")
            .expect("run did not panic");
        assert!(result.is_ok(), "{result:?}");
        assert!(
            TcpStream::connect(("127.0.0.1", client)).is_err(),
            "the embedded etcd stopped with the server"
        );
        assert!(healthz(http).is_none(), "HTTP stopped");
    }
}
