//! `flotilla::client` against a real `flotilla serve` over a real etcd: every method,
//! and how each kind of failure maps onto `client::Error`.

use crate::harness;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::harness::server::{FlotillaServer, ServerOptions};
use flotilla::client::{
    Client, CreateChangefeed, Error, ExecutorFilter, HeartbeatRequest, Progress, RegisterRequest,
    UpdateChangefeed, WatchEvent, WatchStream, DEFAULT_NAMESPACE,
};
use futures::StreamExt;

const ADMIN: &str = "s3cret-admin";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn register_request(name: &str, zone: &str) -> RegisterRequest {
    RegisterRequest {
        name: name.into(),
        address: format!("{name}.local:9000"),
        labels: labels(&[("zone", zone)]),
    }
}

/// Asserts `result` is the server's `code` with `status`.
#[track_caller]
fn assert_api_error<T: std::fmt::Debug>(result: Result<T, Error>, status: u16, code: &str) {
    let error = match result {
        Ok(value) => panic!("expected {status} {code}, got {value:?}"),
        Err(error) => error,
    };
    match &error {
        Error::Api {
            status: s,
            code: c,
            message,
            ..
        } if *s == status && c == code => assert!(!message.is_empty()),
        other => panic!("expected {status} {code}, got {other:?}"),
    }
    assert!(
        error.to_string().starts_with(&format!("{code}: ")),
        "{error}"
    );
}

async fn next_event(stream: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a watch event within 5 s")
        .expect("the watch stream goes on")
        .expect("a well-formed event")
}

#[tokio::test]
async fn executor_methods_and_their_errors() {
    harness::init_tracing();
    let server = FlotillaServer::start(ServerOptions::default());
    let client = Client::new(&server.url()).unwrap();

    let mut watch = client.watch_executors().await.unwrap();
    match next_event(&mut watch).await {
        WatchEvent::Snapshot { executors, .. } => assert!(executors.is_empty()),
        other => panic!("expected a snapshot first, got {other:?}"),
    }

    let a = client.register(&register_request("a", "z1")).await.unwrap();
    assert!(a.executor.id.starts_with("a-"), "{a:?}");
    assert_eq!(a.executor.labels, labels(&[("zone", "z1")]));
    assert_eq!(a.executor.status, "initing");
    assert_eq!(a.heartbeat_interval_ms, 200);
    assert!(!a.token.is_empty());
    match next_event(&mut watch).await {
        WatchEvent::Online { executor, seq } => {
            assert_eq!(executor.id, a.executor.id);
            assert!(seq > 0);
        }
        other => panic!("expected online, got {other:?}"),
    }
    let b = client.register(&register_request("b", "z2")).await.unwrap();
    assert!(matches!(
        next_event(&mut watch).await,
        WatchEvent::Online { .. }
    ));

    let beat = client
        .heartbeat(
            &a.executor.id,
            &a.token,
            &HeartbeatRequest {
                ttl_ms: Some(60_000),
                progress: vec![],
                stopped: vec![],
                generation: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(beat.ttl_ms, 3_000, "clamped to registry.max_ttl");
    assert_eq!(beat.heartbeat_interval_ms, 200);
    assert!(beat.assignments.is_empty());
    // The first heartbeat to this leader is announced: the executor is running.
    match next_event(&mut watch).await {
        WatchEvent::Online { executor, .. } => {
            assert_eq!(
                (executor.id.as_str(), executor.status.as_str()),
                (a.executor.id.as_str(), "running")
            );
        }
        other => panic!("expected online (running), got {other:?}"),
    }

    let one = client.get_executor(&a.executor.id).await.unwrap();
    assert_eq!(one.status, "running");
    assert!(one.last_heartbeat_ms_ago.is_some());
    let all = client
        .list_executors(&ExecutorFilter::default())
        .await
        .unwrap();
    assert_eq!(all.total, 2);
    let z2 = client
        .list_executors(&ExecutorFilter {
            status: None,
            labels: labels(&[("zone", "z2")]),
        })
        .await
        .unwrap();
    assert_eq!(
        z2.items.iter().map(|e| &e.id).collect::<Vec<_>>(),
        [&b.executor.id]
    );
    let running = client
        .list_executors(&ExecutorFilter {
            status: Some("running".into()),
            labels: BTreeMap::new(),
        })
        .await
        .unwrap();
    assert_eq!(running.items.len(), 1);
    assert_eq!(running.items[0].id, a.executor.id);

    // Errors keep the server's status and code.
    assert_api_error(
        client.get_executor("nobody-00000000").await,
        404,
        "unknown_executor",
    );
    assert_api_error(
        client
            .heartbeat(&a.executor.id, "wrong", &HeartbeatRequest::default())
            .await,
        401,
        "unauthorized",
    );
    assert_api_error(
        client.register(&register_request("bad name", "z1")).await,
        400,
        "invalid_argument",
    );
    assert_api_error(
        client
            .list_executors(&ExecutorFilter {
                status: Some("sleeping".into()),
                labels: BTreeMap::new(),
            })
            .await,
        400,
        "invalid_argument",
    );
    // Without an executor token, and with no admin token configured, no one may
    // deregister.
    assert_api_error(
        client.deregister(&b.executor.id, None).await,
        401,
        "unauthorized",
    );

    client
        .deregister(&b.executor.id, Some(&b.token))
        .await
        .unwrap();
    match next_event(&mut watch).await {
        WatchEvent::Offline { id, reason, .. } => {
            assert_eq!(
                (id.as_str(), reason.as_str()),
                (b.executor.id.as_str(), "deregistered")
            );
        }
        other => panic!("expected offline, got {other:?}"),
    }
    let gone = client
        .heartbeat(&b.executor.id, &b.token, &HeartbeatRequest::default())
        .await;
    let error = gone.unwrap_err();
    assert_eq!(error.status(), Some(410), "{error}");
    assert_eq!(error.code(), Some("tombstone_executor"));
    assert!(error.is_client_error() && !error.is_retryable());
}

#[tokio::test]
async fn changefeed_methods_with_the_admin_token_and_progress() {
    harness::init_tracing();
    let server = FlotillaServer::start(ServerOptions {
        admin_token: Some(ADMIN.into()),
        ..ServerOptions::default()
    });
    let anonymous = Client::new(&server.url()).unwrap();
    let admin = Client::new(&server.url()).unwrap().with_admin_token(ADMIN);
    let ns = DEFAULT_NAMESPACE;

    let status = admin.status().await.unwrap();
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(status.cluster_id, "client-test");
    assert!(status.etcd.healthy, "{status:?}");
    assert_eq!(status.store.map(|s| s.healthy), Some(true));

    let create = CreateChangefeed {
        id: "orders".into(),
        sink_uri: "kafka://broker/orders".into(),
        start_ts: Some(1000),
        config: Some(serde_json::json!({"batch": 10})),
        ..CreateChangefeed::default()
    };
    assert_api_error(
        anonymous.create_changefeed(ns, &create).await,
        401,
        "unauthorized",
    );
    let wrong = Client::new(&server.url()).unwrap().with_admin_token("nope");
    assert_api_error(
        wrong.create_changefeed(ns, &create).await,
        401,
        "unauthorized",
    );

    let created = admin.create_changefeed(ns, &create).await.unwrap();
    assert_eq!(
        (
            created.id.as_str(),
            created.state.as_str(),
            created.checkpoint_ts
        ),
        ("orders", "normal", 1000)
    );
    assert_eq!(created.config, serde_json::json!({"batch": 10}));
    assert_api_error(
        admin.create_changefeed(ns, &create).await,
        409,
        "changefeed_exists",
    );
    assert_api_error(admin.get_changefeed(ns, "missing").await, 404, "not_found");
    // A namespace of its own is a separate space.
    assert_eq!(
        admin.list_changefeeds("other", None).await.unwrap().total,
        0
    );

    // An executor gets it, reports progress, and the checkpoint moves.
    let executor = admin
        .register(&register_request("worker", "z1"))
        .await
        .unwrap();
    let id = &executor.executor.id;
    let deadline = Instant::now() + Duration::from_secs(10);
    let assignment = loop {
        let beat = admin
            .heartbeat(id, &executor.token, &HeartbeatRequest::default())
            .await
            .unwrap();
        if let Some(a) = beat.assignments.into_iter().next() {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no assignment:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (
            assignment.changefeed.as_str(),
            assignment.sink_uri.as_str(),
            assignment.checkpoint_ts
        ),
        ("orders", "kafka://broker/orders", 1000)
    );
    let report = |epoch, checkpoint_ts| HeartbeatRequest {
        ttl_ms: None,
        stopped: vec![],
        generation: None,
        progress: vec![Progress {
            namespace: ns.into(),
            changefeed: "orders".into(),
            epoch,
            checkpoint_ts,
            resolved_ts: Some(checkpoint_ts),
            error: None,
        }],
    };
    let beat = admin
        .heartbeat(id, &executor.token, &report(assignment.epoch + 7, 5000))
        .await
        .unwrap();
    assert_eq!(beat.rejected.len(), 1, "a stale epoch is refused: {beat:?}");
    assert!(
        beat.rejected[0].reason.starts_with("stale_epoch"),
        "{beat:?}"
    );
    // The executor keeps beating (the checkpoint is persisted within the
    // owner's checkpoint interval, not at once).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        admin
            .heartbeat(id, &executor.token, &report(assignment.epoch, 2000))
            .await
            .unwrap();
        let feed = anonymous.get_changefeed(ns, "orders").await.unwrap();
        if feed.checkpoint_ts == 2000 {
            assert_eq!(feed.executor.as_deref(), Some(id.as_str()));
            break;
        }
        assert!(Instant::now() < deadline, "checkpoint stuck: {feed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let update = UpdateChangefeed {
        sink_uri: Some("kafka://broker/orders-v2".into()),
        ..UpdateChangefeed::default()
    };
    assert_api_error(
        admin.update_changefeed(ns, "orders", &update).await,
        409,
        "changefeed_not_paused",
    );
    assert_api_error(
        anonymous.pause_changefeed(ns, "orders").await,
        401,
        "unauthorized",
    );
    assert_eq!(
        admin.pause_changefeed(ns, "orders").await.unwrap().state,
        "stopped"
    );
    let updated = admin
        .update_changefeed(ns, "orders", &update)
        .await
        .unwrap();
    assert_eq!(updated.sink_uri, "kafka://broker/orders-v2");
    let resumed = admin
        .resume_changefeed(ns, "orders", Some(3000))
        .await
        .unwrap();
    assert_eq!(
        (resumed.state.as_str(), resumed.checkpoint_ts),
        ("normal", 3000)
    );
    assert_eq!(
        admin
            .resume_changefeed(ns, "orders", None)
            .await
            .unwrap()
            .state,
        "normal",
        "resuming a normal changefeed without a checkpoint is a no-op"
    );

    let listed = anonymous.list_changefeeds(ns, None).await.unwrap();
    assert_eq!(listed.total, 1);
    assert_eq!(listed.items[0].id, "orders");
    let stopped = anonymous
        .list_changefeeds(ns, Some("stopped"))
        .await
        .unwrap();
    assert!(stopped.items.is_empty(), "{stopped:?}");
    assert_eq!(
        stopped.total, 1,
        "the namespace's changefeeds, before the filter"
    );

    assert_api_error(
        anonymous.delete_changefeed(ns, "orders").await,
        401,
        "unauthorized",
    );
    admin.delete_changefeed(ns, "orders").await.unwrap();
    assert_api_error(admin.get_changefeed(ns, "orders").await, 404, "not_found");
    assert_api_error(
        admin.delete_changefeed(ns, "orders").await,
        404,
        "not_found",
    );

    // The admin token deregisters any executor.
    admin.deregister(id, None).await.unwrap();
    assert_eq!(admin.get_executor(id).await.unwrap().status, "tombstone");
}

#[tokio::test]
async fn no_server_is_unreachable_and_retryable() {
    // Bound then dropped: nothing listens there.
    let port = harness::server::free_port();
    let client = Client::new(&format!("127.0.0.1:{port}")).unwrap();
    let error = client.status().await.unwrap_err();
    assert!(matches!(error, Error::Unreachable { .. }), "{error:?}");
    assert!(error.is_retryable() && error.status().is_none());
    let message = error.to_string();
    assert!(message.contains("Connection refused"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
}

/// Several servers (`URL,URL`): one that refuses the connection never saw the
/// request, so the next is asked at once; the client stays with the one that
/// answered. An agent pointed at a dead server and a live one registers and runs.
#[tokio::test]
async fn a_client_of_several_servers_moves_past_one_that_is_down() {
    harness::init_tracing();
    let server = FlotillaServer::start(ServerOptions::default());
    let dead = harness::server::free_port();
    let list = format!("127.0.0.1:{dead},{}", server.url());
    let client = Client::new(&list).unwrap();
    assert_eq!(client.servers().len(), 2);
    assert_eq!(client.server(), format!("http://127.0.0.1:{dead}"));
    client
        .status()
        .await
        .expect("answered by the second server");
    assert_eq!(client.server(), server.url().trim_end_matches('/'));
    // Both down: the last error is the caller's.
    let other = harness::server::free_port();
    let none = Client::new(&format!("127.0.0.1:{dead},127.0.0.1:{other}")).unwrap();
    assert!(matches!(
        none.status().await,
        Err(Error::Unreachable { .. })
    ));
    assert!(
        Client::new(&format!("127.0.0.1:{dead},,")).is_err(),
        "an empty entry"
    );

    let handle = flotilla::client::Agent::spawn(
        Client::new(&list).unwrap(),
        flotilla::client::AgentConfig::new("listed", "127.0.0.1:9300"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.view().heartbeats == 0 {
        assert!(Instant::now() < deadline, "no heartbeat answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handle.stop().await.unwrap();
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts (the kernel does) and never answers.
    let client = Client::new(&format!("127.0.0.1:{port}"))
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let error = client.get_executor("x").await.unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    assert!(error.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(listener);
}

#[tokio::test]
async fn an_answer_that_is_not_ours_is_unexpected() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let proxy = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf);
        let body = "<html>bad gateway</html>";
        write!(
            stream,
            "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
    });
    let client = Client::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let error = client.status().await.unwrap_err();
    match &error {
        Error::Unexpected { status, detail, .. } => {
            assert_eq!(*status, 502);
            assert!(detail.contains("bad gateway"), "{detail}");
        }
        other => panic!("expected Unexpected, got {other:?}"),
    }
    assert!(error.is_retryable());
    proxy.join().unwrap();
}

/// An executor that sends back the generation it last saw gets "unchanged" and
/// no lists while nothing changed (a small answer however much it runs); a
/// change (a pause) brings the lists again, with the change in them.
#[tokio::test]
async fn an_unchanged_heartbeat_answer_is_small_and_a_change_brings_the_lists() {
    harness::init_tracing();
    let server = FlotillaServer::start(ServerOptions {
        admin_token: Some(ADMIN.into()),
        ..ServerOptions::default()
    });
    let admin = Client::new(&server.url()).unwrap().with_admin_token(ADMIN);
    // Created first, in one batch: an executor registered before 200 single
    // creates could expire (TTL 1.5 s here) before its first heartbeat.
    const N: usize = 200;
    let creates: Vec<CreateChangefeed> = (0..N)
        .map(|i| CreateChangefeed {
            id: format!("cf{i:03}"),
            sink_uri: format!("kafka://broker/{i}"),
            ..CreateChangefeed::default()
        })
        .collect();
    let batch = admin
        .create_changefeeds(DEFAULT_NAMESPACE, &creates)
        .await
        .unwrap();
    assert_eq!((batch.created.len(), batch.failed.len()), (N, 0));
    let reg = admin
        .register(&register_request("big", "z1"))
        .await
        .unwrap();
    let id = reg.executor.id.clone();
    let beat = |generation: Option<u64>| {
        let body = match generation {
            Some(g) => serde_json::json!({ "generation": g }),
            None => serde_json::json!({}),
        };
        crate::harness::http::request(
            server.port(),
            "POST",
            &format!("/api/v1/executors/{id}/heartbeat"),
            Some(&reg.token),
            Some(&body),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let full = loop {
        let answer = beat(None);
        assert_eq!(answer.status, 200, "{}", answer.body);
        let json: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        if json["assignments"].as_array().unwrap().len() == N {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "not all assigned: {}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let json: serde_json::Value = serde_json::from_str(&full.body).unwrap();
    let generation = json["generation"].as_u64().unwrap();
    assert_eq!(json["unchanged"], false);
    let same = beat(Some(generation));
    let same_json: serde_json::Value = serde_json::from_str(&same.body).unwrap();
    assert_eq!(same_json["unchanged"], true, "{}", same.body);
    assert!(same_json["assignments"].as_array().unwrap().is_empty());
    assert!(
        same.body.len() < 1024 && full.body.len() > 10 * 1024,
        "unchanged {} bytes, full {} bytes",
        same.body.len(),
        full.body.len()
    );

    admin
        .pause_changefeed(DEFAULT_NAMESPACE, "cf007")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let changed = loop {
        let answer = beat(Some(generation));
        let json: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        if json["unchanged"] == false {
            break json;
        }
        assert!(Instant::now() < deadline, "the pause never showed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(changed["generation"].as_u64(), Some(generation));
    assert_eq!(changed["assignments"].as_array().unwrap().len(), N - 1);
    assert_eq!(changed["revoked"][0]["changefeed"], "cf007");
}
