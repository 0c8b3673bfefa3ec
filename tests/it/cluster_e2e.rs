//! The real `flotilla serve` process (embedded etcd, SQLite), driven over
//! HTTP the way executors and operators use it: changefeeds balance over
//! executors, move off a silent one, and survive a restart of the server.

use crate::harness;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::server::BIN;

/// A `flotilla serve` child; SIGKILLed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(data_dir: &Path, http: u16, etcd_client: u16, etcd_peer: u16) -> Server {
        let child = Command::new(BIN)
            .args(["serve", "--config", "/dev/null", "--listen"])
            .arg(format!("127.0.0.1:{http}"))
            .arg("--data-dir")
            .arg(data_dir)
            .env(
                "FLOTILLA_ETCD_EMBEDDED_CLIENT_PORT",
                etcd_client.to_string(),
            )
            .env("FLOTILLA_ETCD_EMBEDDED_PEER_PORT", etcd_peer.to_string())
            .envs(harness::server::FAST_TIMINGS.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start flotilla");
        Server {
            child,
            addr: format!("127.0.0.1:{http}").parse().unwrap(),
        }
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok((200, _)) = try_request(self.addr, "GET", "/readyz", None, None).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("flotilla did not become ready");
    }

    /// SIGTERM, and wait for a clean exit.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "flotilla exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "flotilla did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> std::io::Result<(u16, Value)> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(raw.as_bytes()).await?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response {text:?}")))?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    try_request(addr, method, path, body.as_ref(), token)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

struct Executor {
    id: String,
    token: String,
}

async fn register(addr: SocketAddr, name: &str) -> Executor {
    let (status, body) = request(
        addr,
        "POST",
        "/api/v1/executors",
        Some(json!({"name": name, "address": format!("{name}:9000")})),
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    Executor {
        id: body["id"].as_str().unwrap().into(),
        token: body["token"].as_str().unwrap().into(),
    }
}

/// One heartbeat; returns (changefeed -> epoch) of the assignments.
async fn heartbeat(addr: SocketAddr, e: &Executor) -> BTreeMap<String, u64> {
    let (status, body) = request(
        addr,
        "POST",
        &format!("/api/v1/executors/{}/heartbeat", e.id),
        Some(json!({})),
        Some(&e.token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["changefeed"].as_str().unwrap().to_owned(),
                a["epoch"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Heartbeats every 200 ms until `total` changefeeds are assigned.
async fn until_assigned(
    addr: SocketAddr,
    executors: &[&Executor],
    total: usize,
) -> BTreeMap<String, BTreeMap<String, u64>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut all = BTreeMap::new();
        for e in executors {
            all.insert(e.id.clone(), heartbeat(addr, e).await);
        }
        if all.values().map(BTreeMap::len).sum::<usize>() == total {
            return all;
        }
        assert!(Instant::now() < deadline, "not all assigned: {all:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[actix_rt::test]
async fn changefeeds_balance_fail_over_and_survive_a_server_restart() {
    harness::init_tracing();
    let data = tempfile::tempdir().unwrap();
    let [http, etcd_client, etcd_peer] = harness::ports::free_port_array::<3>();
    let server = Server::start(data.path(), http, etcd_client, etcd_peer);
    server.wait_ready().await;
    let addr = server.addr;

    // Refused heartbeats keep their codes on the owner's path too.
    let (status, body) = request(
        addr,
        "POST",
        "/api/v1/executors/nobody-00000000/heartbeat",
        Some(json!({})),
        Some("x"),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("unknown_executor")),
        "{body}"
    );
    let executors = [
        register(addr, "a").await,
        register(addr, "b").await,
        register(addr, "c").await,
    ];
    for i in 0..30 {
        let (status, body) = request(
            addr,
            "POST",
            "/api/v1/changefeeds",
            Some(json!({"id": format!("cf{i:02}"), "sink_uri": "blackhole://"})),
            None,
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = request(
        addr,
        "POST",
        &format!("/api/v1/executors/{}/heartbeat", executors[0].id),
        Some(json!({"progress": [{"changefeed": "cf00", "epoch": 1, "checkpoint_ts": 1}]})),
        Some(&executors[1].token),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );
    let refs: Vec<&Executor> = executors.iter().collect();
    let first = until_assigned(addr, &refs, 30).await;
    assert!(
        first.values().all(|a| a.len() == 10),
        "balanced 10/10/10: {first:?}"
    );

    // Restart the server mid-run: executors are reloaded from SQLite and keep
    // heartbeating with their tokens; no changefeed moves.
    server.stop();
    let server = Server::start(data.path(), http, etcd_client, etcd_peer);
    server.wait_ready().await;
    let after_restart = until_assigned(addr, &refs, 30).await;
    assert_eq!(first, after_restart, "nothing moved across the restart");

    // `a` stops heartbeating: its 10 changefeeds go to b and c with higher
    // epochs; nothing else moves.
    let survivors = [&executors[1], &executors[2]];
    let moved = until_assigned(addr, &survivors, 30).await;
    for (executor, assignments) in &moved {
        for (cf, epoch) in assignments {
            match first[&executors[0].id].get(cf) {
                Some(old) => assert!(epoch > old, "{cf} moved with a higher epoch"),
                None => assert_eq!(first[executor].get(cf), Some(epoch), "{cf} did not move"),
            }
        }
    }
    let (status, one) = request(addr, "GET", "/api/v1/changefeeds/cf00", None, None).await;
    assert_eq!(status, 200, "{one}");
    assert!(one["executor"].is_string(), "{one}");
    let epoch = one["epoch"].as_u64().unwrap();

    // Pause: no executor is told to run it any more. Resume: it runs again,
    // with a higher epoch.
    let (status, body) = request(addr, "POST", "/api/v1/changefeeds/cf00/pause", None, None).await;
    assert_eq!(status, 200, "{body}");
    let paused = until_assigned(addr, &survivors, 29).await;
    assert!(paused.values().all(|a| !a.contains_key("cf00")));
    // The owner unassigns it (its task key goes) at its next tick.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, view) = request(addr, "GET", "/api/v1/changefeeds/cf00", None, None).await;
        if view["executor"].is_null() {
            assert_eq!(view["state"], "stopped", "{view}");
            break;
        }
        assert!(Instant::now() < deadline, "still assigned: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = request(addr, "POST", "/api/v1/changefeeds/cf00/resume", None, None).await;
    assert_eq!(status, 200, "{body}");
    let resumed = until_assigned(addr, &survivors, 30).await;
    let new_epoch = resumed
        .values()
        .find_map(|a| a.get("cf00"))
        .copied()
        .unwrap();
    assert!(new_epoch > epoch, "{new_epoch} > {epoch}");

    // Delete: gone from the executors and from etcd.
    let (status, body) = request(addr, "DELETE", "/api/v1/changefeeds/cf00", None, None).await;
    assert_eq!(status, 204, "{body}");
    until_assigned(addr, &survivors, 29).await;
    let (status, _) = request(addr, "GET", "/api/v1/changefeeds/cf00", None, None).await;
    assert_eq!(status, 404);
    server.stop();
}
