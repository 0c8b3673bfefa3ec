//! End-to-end tests of `flotilla serve`: the real binary, a real embedded etcd, plain
//! HTTP over a TcpStream, and signals.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::http::request;
use crate::harness::server::{Etcd, FlotillaServer, ServerConfig, ServerOptions, Startup};

/// The shipped config, so the test also proves it works.
fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Pids of live (non-zombie) processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'));
        if !zombie && String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn serve_answers_and_stops_cleanly_with_its_etcd() {
    let started = Instant::now();
    let mut server = FlotillaServer::start_with(
        ServerOptions {
            env: vec![("FLOTILLA_LOG_LEVEL".into(), "info".into())],
            ..ServerOptions::default()
        },
        Startup {
            etcd: Etcd::Embedded,
            config: ServerConfig::File(shipped_config()),
            cluster_id: Some("serve-test".into()),
            ..Startup::default()
        },
    );
    eprintln!("ready after {:?}", started.elapsed());
    let http_port = server.port();
    let data_dir = server.data_dir().to_owned();

    let answer = request(http_port, "GET", "/healthz", None, None);
    assert_eq!(
        (answer.status, json(&answer.body)),
        (200, serde_json::json!({"status": "ok"}))
    );

    let answer = request(http_port, "GET", "/readyz", None, None);
    assert_eq!(answer.status, 200, "{}", answer.body);

    let answer = request(http_port, "GET", "/metrics", None, None);
    assert_eq!(answer.status, 200);
    let content_type = answer.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );

    let answer = request(http_port, "GET", "/api/v1/status", None, None);
    assert_eq!(answer.status, 200);
    let body = json(&answer.body);
    assert_eq!(body["cluster_id"], "serve-test");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        body["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{body}"
    );
    assert_eq!(body["etcd"]["healthy"], true, "{body}");
    assert_eq!(
        body["etcd"]["endpoints"],
        serde_json::json!([server.etcd_url()])
    );
    assert_eq!(body["leader"], serde_json::Value::Null);

    let answer = request(http_port, "GET", "/no/such/route", None, None);
    assert_eq!(answer.status, 404);
    let content_type = answer.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    assert_eq!(json(&answer.body)["code"], "not_found");

    let etcd_data = data_dir.join("etcd");
    let etcd_pids = processes_mentioning(&format!("--data-dir={}", etcd_data.display()));
    assert_eq!(etcd_pids.len(), 1, "expected one embedded etcd");

    let status = server.stop(libc::SIGTERM);
    let stderr = server.log();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        processes_mentioning(&format!("--data-dir={}", etcd_data.display())).is_empty(),
        "embedded etcd (pid {}) still runs:\n{stderr}",
        etcd_pids[0]
    );
    // The shutdown order is part of the contract: HTTP drains before etcd stops.
    let http_stopped = stderr.find("HTTP server stopped").expect(&stderr);
    let etcd_stopped = stderr.find("embedded etcd stopped").expect(&stderr);
    assert!(http_stopped < etcd_stopped, "{stderr}");
    assert!(data_dir.join("etcd.log").is_file());
}

/// Starts a server on `config` and `env` (its etcd embedded) that must fail to
/// start; returns its stderr.
fn start_failure(config: ServerConfig, env: &[(&str, &str)]) -> String {
    let options = ServerOptions {
        env: env.iter().map(|&(k, v)| (k.into(), v.into())).collect(),
        ..ServerOptions::default()
    };
    let startup = Startup {
        etcd: Etcd::Embedded,
        config,
        no_wait: true,
        ..Startup::default()
    };
    let mut server = FlotillaServer::start_with(options, startup);
    let status = server.wait_exit();
    let stderr = server.log();
    assert!(!status.success(), "{stderr}");
    stderr
}

#[test]
fn missing_etcd_binary_fails_with_install_hint() {
    let empty_path = tempfile::tempdir().unwrap();
    let path = empty_path.path().to_str().unwrap();
    let stderr = start_failure(ServerConfig::Defaults, &[("PATH", path)]);
    assert!(stderr.contains("apt-get install etcd-server"), "{stderr}");
    assert!(stderr.contains("--etcd-endpoints"), "{stderr}");
}

#[test]
fn bad_config_value_fails_naming_the_key() {
    let stderr = start_failure(
        ServerConfig::Defaults,
        &[("FLOTILLA_ETCD_TICK_INTERVAL", "abc")],
    );
    assert!(
        stderr.contains("etcd.tick_interval: \"abc\" is not a duration"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn unknown_key_in_config_file_fails_naming_it() {
    let toml = "[http]\nlisten_addr = \"127.0.0.1:1\"\n";
    let stderr = start_failure(ServerConfig::Toml(toml.into()), &[]);
    assert!(stderr.contains("http.listen_addr: unknown key"), "{stderr}");
}

#[test]
fn missing_explicit_config_file_fails() {
    let stderr = start_failure(ServerConfig::File("nope.toml".into()), &[]);
    assert!(
        stderr.contains("cannot read config file nope.toml"),
        "{stderr}"
    );
}

/// `http.max_connections` caps open connections per HTTP worker: with every
/// worker full, a new connection gets no answer; when one closes, it does.
#[test]
fn connections_beyond_the_limit_wait_until_one_closes() {
    let server = FlotillaServer::start(ServerOptions {
        env: vec![("FLOTILLA_HTTP_MAX_CONNECTIONS".into(), "2".into())],
        ..ServerOptions::default()
    });
    let addr = ("127.0.0.1", server.port());
    // Answered within 500 ms on a fresh keep-alive connection, or not.
    let answered = |stream: &mut TcpStream| {
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 12];
        stream.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200")
    };
    let mut open = Vec::new();
    let blocked = loop {
        let mut stream = TcpStream::connect(addr).unwrap();
        if !answered(&mut stream) {
            break stream;
        }
        open.push(stream);
        assert!(open.len() <= 64, "64 connections and no limit reached");
    };
    assert!(!open.is_empty(), "the limit lets connections in first");
    // The waiting connection is served once another closes.
    drop(open.pop());
    let mut blocked = blocked;
    blocked
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 12];
    blocked
        .read_exact(&mut buf)
        .expect("served after a slot freed");
    assert!(buf.starts_with(b"HTTP/1.1 200"));
}

/// A server killed with SIGKILL and started again on its data dir is the same
/// server: it revokes the lease of its previous run before campaigning, so the
/// old election key is gone at once instead of after `server.session_ttl`
/// (30 s here). A second live server on that data dir is refused, naming the
/// process that holds it.
#[test]
fn a_restarted_server_revokes_its_previous_lease_and_its_data_dir_takes_one_process() {
    let mut server = FlotillaServer::start(ServerOptions {
        env: vec![
            ("FLOTILLA_SERVER_SESSION_TTL".into(), "30s".into()),
            ("FLOTILLA_REGISTRY_FAILOVER_GRACE".into(), "33s".into()),
        ],
        ..ServerOptions::default()
    });
    let election_keys = |server: &mut FlotillaServer| {
        let etcd = server.etcd();
        actix_rt::System::new().block_on(async {
            let mut client = etcd.client().await;
            let all = client
                .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
                .await
                .unwrap();
            all.kvs()
                .iter()
                .filter_map(|kv| kv.key_str().ok().map(str::to_owned))
                .filter(|key| key.contains("/__meta__/owner/"))
                .collect::<Vec<_>>()
        })
    };
    let first = election_keys(&mut server);
    assert_eq!(first.len(), 1, "{first:?}");

    // A second process on the same data dir (another port) stops at once.
    let second = std::process::Command::new(crate::harness::server::BIN)
        .args(["serve", "--config", "/dev/null", "--data-dir"])
        .arg(server.data_dir())
        .args(["--listen", "127.0.0.1:0", "--cluster-id", "client-test"])
        .env("FLOTILLA_ETCD_ENDPOINTS", server.etcd_url())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is in use by another flotilla process (pid "),
        "{stderr}"
    );

    server.kill();
    server.restart();
    let after = election_keys(&mut server);
    assert_eq!(after.len(), 1, "the old key went with its lease: {after:?}");
    assert_ne!(after, first);
    assert!(
        server
            .log()
            .contains("revoked the lease of this server's previous run"),
        "{}",
        server.log()
    );
}
