//! A cluster of real processes for the high-availability and chaos tests:
//! three `flotilla serve` on a 3-node etcd and one PostgreSQL database, plus
//! a fleet of executors heartbeating over HTTP, and an audit of etcd's
//! history (which leader wrote what).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, WatchOptions};
use flotilla::client::{
    Client, CreateChangefeed, Error as ClientError, HeartbeatRequest, Progress, RegisterRequest,
    ServerStatus,
};
use tempfile::TempDir;

use super::http::readyz;
use super::ports::free_port;
use super::postgres::PostgresServer;
use super::server::ServerSpec;
use super::EtcdCluster;

pub const ADMIN: &str = "ha-admin-token";
pub const CLUSTER: &str = "ha";
pub const SESSION_TTL: Duration = Duration::from_secs(2);
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
pub const FAILOVER_GRACE: Duration = Duration::from_secs(8);

pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct Server {
    pub spec: ServerSpec,
    pub child: Option<Child>,
}

pub struct Ha {
    pub servers: Vec<Server>,
    pub etcd: EtcdCluster,
    _pg: Arc<PostgresServer>,
    _dir: TempDir,
}

impl Ha {
    pub async fn start(name: &str) -> Ha {
        let pg = PostgresServer::shared();
        let store_url = pg.fresh_database(name).await;
        let etcd = EtcdCluster::three();
        let dir = tempfile::Builder::new()
            .prefix("flotilla-ha-")
            .tempdir()
            .unwrap();
        let token = dir.path().join("admin-token");
        std::fs::write(&token, ADMIN).unwrap();
        let mut servers = Vec::new();
        for i in 0..3 {
            let data_dir = dir.path().join(format!("server{i}"));
            std::fs::create_dir_all(&data_dir).unwrap();
            let spec = ServerSpec {
                port: free_port(),
                etcd_endpoints: Some(etcd.endpoints().join(",")),
                log_path: data_dir.join("server.log"),
                data_dir,
                store_url: Some(store_url.clone()),
                cluster_id: CLUSTER.into(),
                admin_token_file: Some(token.clone()),
                config_file: None,
                args: Vec::new(),
                env: [
                    ("FLOTILLA_SERVER_SESSION_TTL", "2s"),
                    ("FLOTILLA_REGISTRY_HEARTBEAT_INTERVAL", "500ms"),
                    ("FLOTILLA_REGISTRY_DEFAULT_TTL", "3s"),
                    ("FLOTILLA_REGISTRY_MAX_TTL", "6s"),
                    ("FLOTILLA_REGISTRY_FAILOVER_GRACE", "8s"),
                    ("FLOTILLA_ETCD_REQUEST_TIMEOUT", "2s"),
                ]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .to_vec(),
            };
            let child = spec.spawn();
            servers.push(Server {
                spec,
                child: Some(child),
            });
        }
        let ha = Ha {
            servers,
            etcd,
            _pg: pg,
            _dir: dir,
        };
        for i in 0..3 {
            ha.wait_ready(i);
        }
        ha
    }

    pub fn wait_ready(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !readyz(self.servers[i].spec.port) {
            assert!(
                Instant::now() < deadline,
                "server {i} not ready in 30 s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.servers[i].spec.port)
    }

    pub fn client(&self, i: usize) -> Client {
        Client::new(&self.url(i))
            .unwrap()
            .with_admin_token(ADMIN)
            .with_timeout(Duration::from_secs(5))
    }

    pub fn pid(&self, i: usize) -> i32 {
        self.servers[i].child.as_ref().expect("running").id() as i32
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed server again without waiting for it to be ready.
    pub fn respawn_nowait(&mut self, i: usize) {
        assert!(self.servers[i].child.is_none(), "server {i} still runs");
        let child = self.servers[i].spec.spawn();
        self.servers[i].child = Some(child);
    }

    /// Starts a killed server again (same port, data dir and log).
    pub fn respawn(&mut self, i: usize) {
        assert!(self.servers[i].child.is_none(), "server {i} still runs");
        let child = self.servers[i].spec.spawn();
        self.servers[i].child = Some(child);
        self.wait_ready(i);
    }

    pub fn signal(&self, i: usize, signal: libc::c_int) {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(self.pid(i), signal) }, 0);
    }

    /// The last 40 lines of each server's log.
    pub fn logs(&self) -> String {
        self.log_tails(40, None)
    }

    /// The last `n` lines of each server's log that mention `needle`.
    pub fn log_lines_with(&self, needle: &str, n: usize) -> String {
        self.log_tails(n, Some(needle))
    }

    fn log_tails(&self, n: usize, needle: Option<&str>) -> String {
        self.servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let log = std::fs::read_to_string(&s.spec.log_path).unwrap_or_default();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| needle.is_none_or(|needle| l.contains(needle)))
                    .collect();
                let tail = &lines[lines.len().saturating_sub(n)..];
                format!("--- server {i} ---\n{}", tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub async fn status(&self, i: usize) -> Option<ServerStatus> {
        self.servers[i].child.as_ref()?;
        self.client(i).status().await.ok()
    }

    /// The index of the server that says it leads, waiting up to `within`.
    pub async fn leader(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            for i in 0..self.servers.len() {
                if let Some(status) = self.status(i).await {
                    if status.election.as_ref().is_some_and(|e| e.is_leader) {
                        return i;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader within {within:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Ha {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            if self.servers[i].child.is_some() {
                // A paused server must be able to die.
                self.signal(i, libc::SIGCONT);
            }
            self.kill(i);
        }
    }
}

/// What the executors saw, shared by their heartbeat tasks.
#[derive(Default)]
pub struct Observed {
    /// Heartbeats refused as if the executor were gone (404, 410, 401).
    pub refused: Vec<String>,
    /// (changefeed, epoch) -> executors that were told to run it.
    pub served: HashMap<(String, u64), BTreeSet<String>>,
    /// When a heartbeat last succeeded.
    pub last_ok: Option<Instant>,
    /// Successful heartbeats.
    pub ok: u64,
}

/// Notes which executor was told to run which (changefeed, epoch), and
/// answers with progress for each assignment: the checkpoint moved to at
/// least `clock`.
pub fn record_and_advance(
    assignments: &[flotilla::client::Assignment],
    executor: &str,
    clock: u64,
    served: &mut HashMap<(String, u64), BTreeSet<String>>,
) -> Vec<Progress> {
    assignments
        .iter()
        .map(|a| {
            served
                .entry((a.changefeed.clone(), a.epoch))
                .or_default()
                .insert(executor.to_owned());
            Progress {
                namespace: a.namespace.clone(),
                changefeed: a.changefeed.clone(),
                epoch: a.epoch,
                checkpoint_ts: a.checkpoint_ts.max(clock),
                resolved_ts: None,
                error: None,
            }
        })
        .collect()
}

/// Executors heartbeating through `urls` (round robin) until stopped;
/// every assignment is reported back with an advancing checkpoint.
pub struct Fleet {
    pub stop: Arc<AtomicBool>,
    pub observed: Arc<Mutex<Observed>>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The executor id each member registered as.
    pub ids: BTreeSet<String>,
}

impl Fleet {
    pub async fn start(urls: &[String], n: usize) -> Fleet {
        let stop = Arc::new(AtomicBool::new(false));
        let observed = Arc::new(Mutex::new(Observed::default()));
        let mut tasks = Vec::new();
        let mut ids = BTreeSet::new();
        for i in 0..n {
            let client = Client::new(&urls[i % urls.len()])
                .unwrap()
                .with_timeout(Duration::from_secs(3));
            let registration = loop {
                match client
                    .register(&RegisterRequest {
                        name: format!("ha{i}"),
                        address: format!("10.7.{}.{}:9000", i / 250, i % 250),
                        labels: BTreeMap::new(),
                    })
                    .await
                {
                    Ok(r) => break r,
                    Err(e) if e.is_retryable() => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(e) => panic!("register: {e}"),
                }
            };
            ids.insert(registration.executor.id.clone());
            let (stop, observed) = (stop.clone(), observed.clone());
            tasks.push(tokio::spawn(async move {
                let id = registration.executor.id;
                let mut progress: Vec<Progress> = Vec::new();
                // It runs only what the last answer listed: whatever was
                // revoked is stopped already, acknowledged at once.
                let mut stopped = Vec::new();
                let mut checkpoint = 1_000u64;
                while !stop.load(Ordering::Relaxed) {
                    checkpoint += 1;
                    let request = HeartbeatRequest {
                        ttl_ms: None,
                        progress: progress.clone(),
                        stopped: std::mem::take(&mut stopped),
                        generation: None,
                    };
                    match client.heartbeat(&id, &registration.token, &request).await {
                        Ok(answer) => {
                            let mut seen = observed.lock().unwrap();
                            seen.ok += 1;
                            seen.last_ok = Some(Instant::now());
                            stopped.clone_from(&answer.revoked);
                            progress = record_and_advance(
                                &answer.assignments,
                                &id,
                                checkpoint,
                                &mut seen.served,
                            );
                        }
                        Err(ClientError::Api { status, code, .. })
                            if matches!(status, 401 | 404 | 410) =>
                        {
                            observed
                                .lock()
                                .unwrap()
                                .refused
                                .push(format!("{id}: {status} {code}"));
                        }
                        // 503 no_leader, a connection refused mid-failover:
                        // an executor keeps trying.
                        Err(_) => {}
                    }
                    tokio::time::sleep(HEARTBEAT_INTERVAL).await;
                }
            }));
        }
        Fleet {
            stop,
            observed,
            tasks,
            ids,
        }
    }

    pub async fn stop(self) -> Observed {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        Arc::try_unwrap(self.observed)
            .ok()
            .expect("tasks ended")
            .into_inner()
            .unwrap()
    }
}

/// Changefeed id -> (executor, epoch), once all `n` are assigned.
pub async fn assignments(
    client: &Client,
    n: usize,
    within: Duration,
) -> BTreeMap<String, (String, u64)> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(list) = client.list_changefeeds("default", None).await {
            let assigned: BTreeMap<String, (String, u64)> = list
                .items
                .iter()
                .filter_map(|cf| Some((cf.id.clone(), (cf.executor.clone()?, cf.epoch))))
                .collect();
            if assigned.len() == n {
                return assigned;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not all {n} changefeeds assigned in time"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn create_changefeeds(client: &Client, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        let creates = chunk.iter().map(|i| async move {
            let request = CreateChangefeed {
                id: format!("cf{i:04}"),
                sink_uri: format!("kafka://broker/t{i}"),
                start_ts: Some(1_000),
                ..CreateChangefeed::default()
            };
            client.create_changefeed("default", &request).await
        });
        for result in futures::future::join_all(creates).await {
            result.expect("create changefeed");
        }
    }
}

/// What etcd's history says about who wrote what.
#[derive(Debug, Default)]
pub struct Audit {
    /// Values carrying `written_by`, by writer.
    pub writes_by: BTreeMap<String, usize>,
    /// Writes by a server that was not the leader at that revision.
    pub violations: Vec<String>,
    /// Times the leader (the oldest live election key) changed.
    pub leader_changes: usize,
    /// Revisions the watch could not see (compacted before it caught up).
    pub gaps: Vec<String>,
    pub last_revision: i64,
}

/// Follows the whole cluster prefix from a revision on, through member
/// kills (the watch is re-created from the last revision seen), and checks
/// each value with `"written_by": X` against the leader at that revision:
/// the server whose election key was the oldest one alive.
pub struct Auditor {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Audit>,
}

#[derive(serde::Deserialize)]
struct Written {
    #[serde(default)]
    written_by: String,
}

#[derive(serde::Deserialize)]
struct Candidate {
    server_id: String,
}

impl Auditor {
    pub async fn start(endpoints: Vec<String>, cluster: &str) -> Auditor {
        let prefix = format!("/flotilla/{cluster}/");
        let owners = format!("{prefix}__meta__/owner/");
        let mut client = etcd_client::Client::connect(&endpoints, None)
            .await
            .unwrap();
        // The election keys alive now, and the revision to follow from.
        let now = client
            .get(owners.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        let from = now.header().unwrap().revision() + 1;
        let mut alive: BTreeMap<String, (i64, String)> = now
            .kvs()
            .iter()
            .map(|kv| {
                let id = serde_json::from_slice::<Candidate>(kv.value())
                    .map_or_else(|_| "?".to_owned(), |c| c.server_id);
                (kv.key_str().unwrap().to_owned(), (kv.create_revision(), id))
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            let mut audit = Audit {
                last_revision: from - 1,
                ..Audit::default()
            };
            let leader = |alive: &BTreeMap<String, (i64, String)>| {
                alive
                    .values()
                    .min_by_key(|(rev, _)| *rev)
                    .map(|(_, id)| id.clone())
            };
            let mut current = leader(&alive);
            while !stopping.load(Ordering::Relaxed) {
                let start = audit.last_revision + 1;
                let mut stream = match client
                    .watch(
                        prefix.as_str(),
                        Some(WatchOptions::new().with_prefix().with_start_revision(start)),
                    )
                    .await
                {
                    Ok(stream) => stream,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                loop {
                    let message =
                        tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
                    let response = match message {
                        Err(_) if stopping.load(Ordering::Relaxed) => break,
                        Err(_) => continue,
                        Ok(Ok(Some(response))) => response,
                        Ok(_) => break,
                    };
                    if response.compact_revision() > 0 {
                        audit.gaps.push(format!(
                            "revisions {start}..{} compacted before the audit saw them",
                            response.compact_revision()
                        ));
                        audit.last_revision = response.compact_revision() - 1;
                        break;
                    }
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let key = kv.key_str().unwrap_or("").to_owned();
                        let revision = kv.mod_revision();
                        audit.last_revision = audit.last_revision.max(revision);
                        if key.starts_with(&owners) {
                            match event.event_type() {
                                EventType::Put => {
                                    let id = serde_json::from_slice::<Candidate>(kv.value())
                                        .map_or_else(|_| "?".to_owned(), |c| c.server_id);
                                    alive.insert(key, (kv.create_revision(), id));
                                }
                                EventType::Delete => {
                                    alive.remove(&key);
                                }
                            }
                            let now_leading = leader(&alive);
                            if now_leading != current {
                                audit.leader_changes += 1;
                                current = now_leading;
                            }
                            continue;
                        }
                        if event.event_type() != EventType::Put {
                            continue;
                        }
                        let Ok(written) = serde_json::from_slice::<Written>(kv.value()) else {
                            continue;
                        };
                        if written.written_by.is_empty() {
                            continue;
                        }
                        *audit
                            .writes_by
                            .entry(written.written_by.clone())
                            .or_default() += 1;
                        if current.as_deref() != Some(written.written_by.as_str()) {
                            audit.violations.push(format!(
                                "{key} written by {} at revision {revision} while {current:?} led",
                                written.written_by
                            ));
                        }
                    }
                }
            }
            audit
        });
        Auditor { stop, task }
    }

    /// Stops following (after catching up for a moment) and reports.
    pub async fn finish(self) -> Audit {
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}
