//! End-to-end tests of `flotilla serve`: the real binary, a real embedded etcd, plain
//! HTTP over a TcpStream, and signals.

use crate::harness;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::ports::free_port_array;
use crate::harness::server::BIN;

/// The shipped config, so the test also proves it works.
fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")
}

/// A minimal HTTP/1.0 GET: (status, content-type, body).
fn get(port: u16, path: &str) -> std::io::Result<(u16, String, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    Ok((status, content_type, body.to_owned()))
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(50));
    }
    None
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

fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Kills the server if a test fails half-way, so no process outlives the test.
struct Server {
    child: Child,
    stderr_path: PathBuf,
}

impl Server {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_answers_and_stops_cleanly_with_its_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let [http_port, client_port, peer_port] = free_port_array::<3>();
    let stderr_path = dir.path().join("stderr.log");
    let started = Instant::now();
    let child = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(shipped_config())
        .arg("--listen")
        .arg(format!("127.0.0.1:{http_port}"))
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--cluster-id")
        .arg("serve-test")
        .env(
            "FLOTILLA_ETCD_EMBEDDED_CLIENT_PORT",
            client_port.to_string(),
        )
        .env("FLOTILLA_ETCD_EMBEDDED_PEER_PORT", peer_port.to_string())
        .env("FLOTILLA_LOG_LEVEL", "info")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let mut server = Server { child, stderr_path };

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _, _)) = get(http_port, "/healthz") {
            break;
        }
        if let Some(status) = server.child.try_wait().unwrap() {
            panic!("server exited early ({status}):\n{}", server.stderr());
        }
        assert!(
            Instant::now() < deadline,
            "no /healthz:\n{}",
            server.stderr()
        );
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("ready after {:?}", started.elapsed());

    let (status, _, body) = get(http_port, "/healthz").unwrap();
    assert_eq!(
        (status, json(&body)),
        (200, serde_json::json!({"status": "ok"}))
    );

    let (status, _, body) = get(http_port, "/readyz").unwrap();
    assert_eq!(status, 200, "{body}");

    let (status, content_type, _) = get(http_port, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );

    let (status, _, body) = get(http_port, "/api/v1/status").unwrap();
    assert_eq!(status, 200);
    let body = json(&body);
    assert_eq!(body["cluster_id"], "serve-test");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        body["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{body}"
    );
    assert_eq!(body["etcd"]["healthy"], true, "{body}");
    assert_eq!(
        body["etcd"]["endpoints"],
        serde_json::json!([format!("http://127.0.0.1:{client_port}")])
    );
    assert_eq!(body["leader"], serde_json::Value::Null);

    let (status, content_type, body) = get(http_port, "/no/such/route").unwrap();
    assert_eq!(status, 404);
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    assert_eq!(json(&body)["code"], "not_found");

    let etcd_data = data_dir.join("etcd");
    let etcd_pids = processes_mentioning(&format!("--data-dir={}", etcd_data.display()));
    assert_eq!(etcd_pids.len(), 1, "expected one embedded etcd");

    send_signal(server.child.id(), "TERM");
    let status = wait_exit(&mut server.child, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", server.stderr()));
    let stderr = server.stderr();
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

fn run(command: &mut Command) -> Output {
    command.stdin(Stdio::null()).output().unwrap()
}

#[test]
fn missing_etcd_binary_fails_with_install_hint() {
    let dir = tempfile::tempdir().unwrap();
    let empty_path = dir.path().join("bin");
    std::fs::create_dir(&empty_path).unwrap();
    let [client_port, peer_port] = free_port_array::<2>();
    let output = run(Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("PATH", &empty_path)
        .env(
            "FLOTILLA_ETCD_EMBEDDED_CLIENT_PORT",
            client_port.to_string(),
        )
        .env("FLOTILLA_ETCD_EMBEDDED_PEER_PORT", peer_port.to_string())
        .current_dir(dir.path()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("apt-get install etcd-server"), "{stderr}");
    assert!(stderr.contains("--etcd-endpoints"), "{stderr}");
}

#[test]
fn bad_config_value_fails_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(Command::new(BIN)
        .arg("serve")
        .env("FLOTILLA_ETCD_TICK_INTERVAL", "abc")
        .current_dir(dir.path()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("etcd.tick_interval: \"abc\" is not a duration"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn unknown_key_in_config_file_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[http]\nlisten_addr = \"127.0.0.1:1\"\n").unwrap();
    let output = run(Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&file)
        .current_dir(dir.path()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("http.listen_addr: unknown key"), "{stderr}");
}

#[test]
fn missing_explicit_config_file_fails() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(Command::new(BIN)
        .args(["serve", "--config", "nope.toml"])
        .current_dir(dir.path()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("cannot read config file nope.toml"),
        "{stderr}"
    );
}

/// `http.max_connections` caps open connections per HTTP worker: with every
/// worker full, a new connection gets no answer; when one closes, it does.
#[test]
fn connections_beyond_the_limit_wait_until_one_closes() {
    let server = harness::server::FlotillaServer::start(harness::server::ServerOptions {
        env: vec![("FLOTILLA_HTTP_MAX_CONNECTIONS".into(), "2".into())],
        ..Default::default()
    });
    let addr = server.url().trim_start_matches("http://").to_owned();
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
        let mut stream = TcpStream::connect(&addr).unwrap();
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
