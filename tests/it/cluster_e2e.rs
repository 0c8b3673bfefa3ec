//! The real `flotilla serve` process (embedded etcd, SQLite), driven over
//! HTTP the way executors and operators use it: changefeeds balance over
//! executors, move off a silent one, and survive a restart of the server.

use std::collections::BTreeMap;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness;
use crate::harness::server::{Etcd, FlotillaServer, ServerOptions, Startup};

/// One request that must be answered: (status, JSON body or `Null`).
fn request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let answer = harness::http::request(port, method, path, token, body.as_ref());
    (answer.status, answer.json())
}

struct Executor {
    id: String,
    token: String,
}

fn register(port: u16, name: &str) -> Executor {
    let (status, body) = request(
        port,
        "POST",
        "/api/v1/executors",
        Some(json!({"name": name, "address": format!("{name}:9000")})),
        None,
    );
    assert_eq!(status, 201, "{body}");
    Executor {
        id: body["id"].as_str().unwrap().into(),
        token: body["token"].as_str().unwrap().into(),
    }
}

/// One heartbeat; returns (changefeed -> epoch) of the assignments.
fn heartbeat(port: u16, e: &Executor) -> BTreeMap<String, u64> {
    let (status, body) = request(
        port,
        "POST",
        &format!("/api/v1/executors/{}/heartbeat", e.id),
        Some(json!({})),
        Some(&e.token),
    );
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
fn until_assigned(
    port: u16,
    executors: &[&Executor],
    total: usize,
) -> BTreeMap<String, BTreeMap<String, u64>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut all = BTreeMap::new();
        for e in executors {
            all.insert(e.id.clone(), heartbeat(port, e));
        }
        if all.values().map(BTreeMap::len).sum::<usize>() == total {
            return all;
        }
        assert!(Instant::now() < deadline, "not all assigned: {all:?}");
        sleep(Duration::from_millis(200));
    }
}

/// SIGTERM, and a clean exit.
fn stop(server: &mut FlotillaServer) {
    let status = server.stop(libc::SIGTERM);
    assert!(
        status.success(),
        "flotilla exited with {status}:\n{}",
        server.log()
    );
}

#[test]
fn changefeeds_balance_fail_over_and_survive_a_server_restart() {
    harness::init_tracing();
    let mut server = FlotillaServer::start_with(
        ServerOptions::default(),
        Startup {
            etcd: Etcd::Embedded,
            ..Startup::default()
        },
    );
    let port = server.port();

    // Refused heartbeats keep their codes on the owner's path too.
    let (status, body) = request(
        port,
        "POST",
        "/api/v1/executors/nobody-00000000/heartbeat",
        Some(json!({})),
        Some("x"),
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("unknown_executor")),
        "{body}"
    );
    let executors = [
        register(port, "a"),
        register(port, "b"),
        register(port, "c"),
    ];
    // Each heartbeats once before any work exists: an executor that has not is
    // last in line, and a tick between two first heartbeats would give the one
    // that was first everything created meanwhile.
    for e in &executors {
        heartbeat(port, e);
    }
    for i in 0..30 {
        let (status, body) = request(
            port,
            "POST",
            "/api/v1/changefeeds",
            Some(json!({"id": format!("cf{i:02}"), "sink_uri": "blackhole://"})),
            None,
        );
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = request(
        port,
        "POST",
        &format!("/api/v1/executors/{}/heartbeat", executors[0].id),
        Some(json!({"progress": [{"changefeed": "cf00", "epoch": 1, "checkpoint_ts": 1}]})),
        Some(&executors[1].token),
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );
    let refs: Vec<&Executor> = executors.iter().collect();
    let first = until_assigned(port, &refs, 30);
    assert!(
        first.values().all(|a| a.len() == 10),
        "balanced 10/10/10: {first:?}"
    );

    // Restart the server mid-run: executors are reloaded from SQLite and keep
    // heartbeating with their tokens; no changefeed moves.
    stop(&mut server);
    server.restart();
    let after_restart = until_assigned(port, &refs, 30);
    assert_eq!(first, after_restart, "nothing moved across the restart");

    // `a` stops heartbeating: its 10 changefeeds go to b and c with higher
    // epochs; nothing else moves.
    let survivors = [&executors[1], &executors[2]];
    let moved = until_assigned(port, &survivors, 30);
    for (executor, assignments) in &moved {
        for (cf, epoch) in assignments {
            match first[&executors[0].id].get(cf) {
                Some(old) => assert!(epoch > old, "{cf} moved with a higher epoch"),
                None => assert_eq!(first[executor].get(cf), Some(epoch), "{cf} did not move"),
            }
        }
    }
    let (status, one) = request(port, "GET", "/api/v1/changefeeds/cf00", None, None);
    assert_eq!(status, 200, "{one}");
    assert!(one["executor"].is_string(), "{one}");
    let epoch = one["epoch"].as_u64().unwrap();

    // Pause: no executor is told to run it any more. Resume: it runs again,
    // with a higher epoch.
    let (status, body) = request(port, "POST", "/api/v1/changefeeds/cf00/pause", None, None);
    assert_eq!(status, 200, "{body}");
    let paused = until_assigned(port, &survivors, 29);
    assert!(paused.values().all(|a| !a.contains_key("cf00")));
    // The owner unassigns it (its task key goes) at its next tick.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, view) = request(port, "GET", "/api/v1/changefeeds/cf00", None, None);
        if view["executor"].is_null() {
            assert_eq!(view["state"], "stopped", "{view}");
            break;
        }
        assert!(Instant::now() < deadline, "still assigned: {view}");
        sleep(Duration::from_millis(50));
    }
    let (status, body) = request(port, "POST", "/api/v1/changefeeds/cf00/resume", None, None);
    assert_eq!(status, 200, "{body}");
    let resumed = until_assigned(port, &survivors, 30);
    let new_epoch = resumed
        .values()
        .find_map(|a| a.get("cf00"))
        .copied()
        .unwrap();
    assert!(new_epoch > epoch, "{new_epoch} > {epoch}");

    // Delete: gone from the executors and from etcd.
    let (status, body) = request(port, "DELETE", "/api/v1/changefeeds/cf00", None, None);
    assert_eq!(status, 204, "{body}");
    until_assigned(port, &survivors, 29);
    let (status, _) = request(port, "GET", "/api/v1/changefeeds/cf00", None, None);
    assert_eq!(status, 404);
    stop(&mut server);
}
