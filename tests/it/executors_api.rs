//! `/api/v1/executors` over HTTP: the JSON contract, every error code, a
//! fuzzing pass, a store outage, the SSE feed read by a real client, and
//! readiness while the owner that answers heartbeats loads.

use crate::harness;
use crate::harness::app::{app, assert_error, call};
use crate::harness::EtcdCluster;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::http::StatusCode;
use actix_web::{test, web};
use flotilla::actors::executor_registry::{ExecutorRegistry, GetRegistryStats, RegistryConfig};
use flotilla::actors::leader::{RoleSlot, Roles};
use flotilla::actors::owner::{Owner, OwnerSettings, StopOwner};
use flotilla::actors::WorkerConfig;
use flotilla::http::limits::RegisterLimiter;
use flotilla::http::{self, AppState, EtcdProbe, ServerInfo};
use flotilla::owner::model::Keys;
use flotilla::owner::reactor::OwnerConfig;
use flotilla::store::{Store, StoreOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const ADMIN: &str = "admin-secret-token";
const MAX_BODY: usize = 4096;
const MAX_HEARTBEAT: usize = 64 * 1024;

fn config() -> RegistryConfig {
    RegistryConfig {
        heartbeat_interval: Duration::from_millis(100),
        default_ttl: Duration::from_secs(30),
        min_ttl: Duration::from_millis(300),
        max_ttl: Duration::from_secs(60),
        keepalive_interval: Duration::from_millis(50),
        ..RegistryConfig::default()
    }
}

async fn state_with(store: Store) -> (web::Data<AppState>, Addr<ExecutorRegistry>) {
    state_with_limits(store, config(), RegisterLimiter::default()).await
}

async fn state_with_limits(
    store: Store,
    config: RegistryConfig,
    register_limit: RegisterLimiter,
) -> (web::Data<AppState>, Addr<ExecutorRegistry>) {
    let (state, registry) = registry_state(store, config, register_limit).await;
    (web::Data::new(state), registry)
}

/// A server running a loaded registry on `store`, without owner or etcd.
async fn registry_state(
    store: Store,
    config: RegistryConfig,
    register_limit: RegisterLimiter,
) -> (AppState, Addr<ExecutorRegistry>) {
    let handle = ExecutorRegistry::new(config, store).start_with_table();
    let registry = handle.addr.clone();
    for _ in 0..500 {
        if registry.send(GetRegistryStats).await.unwrap().loaded {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // etcd is not part of these tests: a lazy client to a closed port.
    let client = crate::harness::app::closed_etcd().await;
    let info = crate::harness::app::server_info();
    let state = AppState::new(info, EtcdProbe::new(client, Duration::from_millis(100)))
        .with_roles(RoleSlot::fixed(Roles {
            registry: handle,
            owner: None,
            lease: flotilla::election::LeaseGuard::always(),
        }))
        .with_admin_token(Some(ADMIN.into()))
        .with_max_body_bytes(MAX_BODY)
        .with_max_heartbeat_bytes(MAX_HEARTBEAT)
        .with_register_limit(register_limit);
    (state, registry)
}

async fn sqlite(dir: &TempDir) -> Store {
    let url = format!("sqlite://{}/meta.db?mode=rwc", dir.path().display());
    Store::connect(&url, &StoreOptions::default())
        .await
        .unwrap()
}

fn register_req(name: &str, labels: Value) -> test::TestRequest {
    test::TestRequest::post()
        .uri("/api/v1/executors")
        .set_json(json!({ "name": name, "address": "10.0.0.1:8080", "labels": labels }))
}

fn heartbeat_req(id: &str, token: &str) -> test::TestRequest {
    test::TestRequest::post()
        .uri(&format!("/api/v1/executors/{id}/heartbeat"))
        .insert_header(("Authorization", format!("Bearer {token}")))
}

#[actix_rt::test]
async fn register_heartbeat_list_get_and_deregister() {
    harness::init_tracing();
    let dir = TempDir::new().unwrap();
    let (state, _) = state_with(sqlite(&dir).await).await;
    let app = app!(state);

    let (status, reg) = call!(
        app,
        register_req("exec", json!({"zone": "a", "disk": "ssd"}))
    );
    assert_eq!(status, StatusCode::CREATED, "{reg}");
    let id = reg["id"].as_str().unwrap().to_owned();
    let token = reg["token"].as_str().unwrap().to_owned();
    assert!(id.starts_with("exec-"));
    assert_eq!(reg["status"], "initing");
    assert_eq!(reg["labels"]["zone"], "a");
    assert_eq!(reg["heartbeat_interval_ms"], 100);
    assert_eq!(reg["ttl_ms"], 30_000);
    assert!(reg["registered_at"].as_str().unwrap().ends_with('Z'));

    let (status, ack) = call!(
        app,
        heartbeat_req(&id, &token).set_json(json!({"ttl_ms": 1_000}))
    );
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(ack["ttl_ms"], 1_000);
    assert_eq!(ack["assignments"], json!([]));
    assert_eq!(ack["rejected"], json!([]));
    // Without an owner on this server, progress is refused, not dropped.
    let (status, ack) = call!(
        app,
        heartbeat_req(&id, &token)
            .set_json(json!({"progress": [{"changefeed": "cf", "epoch": 1, "checkpoint_ts": 5}]}))
    );
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(ack["rejected"][0]["changefeed"], "cf");
    assert_eq!(ack["rejected"][0]["namespace"], "default");
    assert!(ack["rejected"][0]["reason"]
        .as_str()
        .unwrap()
        .starts_with("no_owner"));
    // An empty body is a heartbeat with no options.
    let (status, ack) = call!(app, heartbeat_req(&id, &token));
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(ack["ttl_ms"], 30_000);

    let (status, one) = call!(
        app,
        test::TestRequest::get().uri(&format!("/api/v1/executors/{id}"))
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["status"], "running");
    assert!(one["last_heartbeat_ms_ago"].as_u64().unwrap() < 5_000);
    assert!(!one.to_string().contains(&token), "no token in reads");

    call!(app, register_req("other", json!({"zone": "b"})));
    let (status, server) = call!(app, test::TestRequest::get().uri("/api/v1/status"));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server["store"]["healthy"], true, "{server}");
    assert_eq!(server["executors"]["running"], 1, "{server}");
    assert_eq!(server["executors"]["initing"], 1, "{server}");
    for (query, expected) in [
        ("", 2),
        ("?status=running", 1),
        ("?status=initing", 1),
        ("?label=zone=a", 1),
        ("?label=zone=a&label=disk=ssd", 1),
        ("?label=zone=a&label=disk=hdd", 0),
        ("?status=tombstone", 0),
    ] {
        let (status, list) = call!(
            app,
            test::TestRequest::get().uri(&format!("/api/v1/executors{query}"))
        );
        assert_eq!(status, StatusCode::OK, "{query}: {list}");
        assert_eq!(list["total"], expected, "{query}: {list}");
        assert_eq!(list["items"].as_array().unwrap().len(), expected);
        assert!(!list.to_string().contains(&token));
    }

    let (status, body) = call!(
        app,
        test::TestRequest::delete()
            .uri(&format!("/api/v1/executors/{id}"))
            .insert_header(("Authorization", format!("Bearer {token}")))
    );
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = call!(app, heartbeat_req(&id, &token));
    assert_error(status, &body, 410, "tombstone_executor");
    let (status, list) = call!(
        app,
        test::TestRequest::get().uri("/api/v1/executors?status=tombstone")
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["total"], 1);
}

#[actix_rt::test]
async fn heartbeats_have_their_own_body_limit_read_only_for_a_live_executor() {
    let dir = TempDir::new().unwrap();
    let (state, _) = state_with(sqlite(&dir).await).await;
    let app = app!(state);
    let (status, reg) = call!(app, register_req("big", json!({})));
    assert_eq!(status, StatusCode::CREATED, "{reg}");
    assert_eq!(reg["max_heartbeat_bytes"], MAX_HEARTBEAT);
    let (id, token) = (
        reg["id"].as_str().unwrap().to_owned(),
        reg["token"].as_str().unwrap().to_owned(),
    );
    // The progress of 500 assignments: past the other routes' limit.
    let progress: Vec<Value> = (0..500)
        .map(
            |i| json!({"changefeed": format!("changefeed-{i:04}"), "epoch": 1, "checkpoint_ts": 5}),
        )
        .collect();
    let body = json!({ "progress": progress });
    assert!(body.to_string().len() > MAX_BODY);
    let (status, ack) = call!(app, heartbeat_req(&id, &token).set_json(&body));
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(ack["rejected"].as_array().unwrap().len(), 500);
    assert_eq!(ack["max_heartbeat_bytes"], MAX_HEARTBEAT);
    // Past the heartbeat limit: 413 for the executor itself...
    let huge = || {
        let mut body = b"{\"progress\": [".to_vec();
        body.resize(MAX_HEARTBEAT + 1, b' ');
        body
    };
    let (status, body) = call!(
        app,
        heartbeat_req(&id, &token)
            .insert_header(("Content-Type", "application/json"))
            .set_payload(huge())
    );
    assert_error(status, &body, 413, "payload_too_large");
    // ...and, before any body is read, what the caller is for the others:
    // an executor that is gone learns it whatever it sent, a large body or
    // a small malformed one (read first, but its error comes second).
    let small_bad = || b"{\"ttl_ms\": ".to_vec();
    for (who, token, want_status, want_code) in [
        (id.as_str(), "wrong", 401, "unauthorized"),
        ("nobody-00000000", token.as_str(), 404, "unknown_executor"),
    ] {
        for payload in [huge(), small_bad()] {
            let (status, body) = call!(
                app,
                heartbeat_req(who, token)
                    .insert_header(("Content-Type", "application/json"))
                    .set_payload(payload)
            );
            assert_error(status, &body, want_status, want_code);
        }
    }
    let (status, _) = call!(
        app,
        test::TestRequest::delete()
            .uri(&format!("/api/v1/executors/{id}"))
            .insert_header(("Authorization", format!("Bearer {token}")))
    );
    assert_eq!(status, StatusCode::NO_CONTENT);
    for payload in [huge(), small_bad()] {
        let (status, body) = call!(
            app,
            heartbeat_req(&id, &token)
                .insert_header(("Content-Type", "application/json"))
                .set_payload(payload)
        );
        assert_error(status, &body, 410, "tombstone_executor");
    }
}

#[actix_rt::test]
async fn every_bad_request_gets_its_code_and_status() {
    harness::init_tracing();
    let dir = TempDir::new().unwrap();
    let (state, _) = state_with(sqlite(&dir).await).await;
    let app = app!(state);
    let (_, reg) = call!(app, register_req("exec", json!({})));
    let id = reg["id"].as_str().unwrap().to_owned();
    let token = reg["token"].as_str().unwrap().to_owned();
    let (_, other) = call!(app, register_req("other", json!({})));
    let other_token = other["token"].as_str().unwrap().to_owned();

    let cases: Vec<(test::TestRequest, u16, &str)> = vec![
        (
            heartbeat_req("nobody-00000000", &token),
            404,
            "unknown_executor",
        ),
        (
            test::TestRequest::post().uri(&format!("/api/v1/executors/{id}/heartbeat")),
            401,
            "unauthorized",
        ),
        (heartbeat_req(&id, "wrong"), 401, "unauthorized"),
        (heartbeat_req(&id, &other_token), 401, "unauthorized"),
        (
            test::TestRequest::post()
                .uri(&format!("/api/v1/executors/{id}/heartbeat"))
                .insert_header(("Authorization", "Basic Zm9vOmJhcg=="))
                .insert_header(("Content-Type", "application/json"))
                .set_payload("{}"),
            401,
            "unauthorized",
        ),
        (
            heartbeat_req(&id, &token)
                .insert_header(("Content-Type", "application/json"))
                .set_payload("{\"ttl_ms\": "),
            400,
            "invalid_argument",
        ),
        (
            heartbeat_req(&id, &token).set_json(json!({"ttl_ms": 0})),
            400,
            "invalid_argument",
        ),
        (
            heartbeat_req(&id, &token)
                .set_json(json!({"stopped": [{"changefeed": "a b", "epoch": 1}]})),
            400,
            "invalid_argument",
        ),
        (
            heartbeat_req(&id, &token)
                .set_json(json!({"stopped": [{"changefeed": "a", "epoch": -1}]})),
            400,
            "invalid_argument",
        ),
        (
            heartbeat_req(&id, &token)
                .set_json(json!({"stopped": [{"changefeed": "a", "epoch": 1, "x": 1}]})),
            400,
            "invalid_argument",
        ),
        (
            heartbeat_req(&id, &token).set_json(json!({"ttl_ms": -5})),
            400,
            "invalid_argument",
        ),
        (
            heartbeat_req(&id, &token).set_json(json!({"unknown": 1})),
            400,
            "invalid_argument",
        ),
        (
            heartbeat_req(&id, &token)
                .insert_header(("Content-Type", "text/plain"))
                .set_payload("{}"),
            415,
            "unsupported_media_type",
        ),
        (
            test::TestRequest::post()
                .uri("/api/v1/executors")
                .insert_header(("Content-Type", "application/json"))
                .set_payload(vec![b' '; MAX_BODY + 1]),
            413,
            "payload_too_large",
        ),
        (
            test::TestRequest::post().uri("/api/v1/executors"),
            400,
            "invalid_argument",
        ),
        (register_req("bad name", json!({})), 400, "invalid_argument"),
        (
            register_req("ok", json!({"-k": "v"})),
            400,
            "invalid_argument",
        ),
        (register_req("ok", json!({"k": 5})), 400, "invalid_argument"),
        (
            test::TestRequest::post()
                .uri("/api/v1/executors")
                .set_json(json!({"name": "ok"})),
            400,
            "invalid_argument",
        ),
        (
            test::TestRequest::get().uri("/api/v1/executors?status=dead"),
            400,
            "invalid_argument",
        ),
        (
            test::TestRequest::get().uri("/api/v1/executors?label=novalue"),
            400,
            "invalid_argument",
        ),
        (
            test::TestRequest::get().uri("/api/v1/executors?color=red"),
            400,
            "invalid_argument",
        ),
        (
            test::TestRequest::get().uri("/api/v1/executors/nobody-1"),
            404,
            "unknown_executor",
        ),
        (
            test::TestRequest::delete().uri(&format!("/api/v1/executors/{id}")),
            401,
            "unauthorized",
        ),
        (
            test::TestRequest::delete()
                .uri(&format!("/api/v1/executors/{id}"))
                .insert_header(("Authorization", format!("Bearer {other_token}"))),
            401,
            "unauthorized",
        ),
        (
            test::TestRequest::put().uri("/api/v1/executors"),
            405,
            "method_not_allowed",
        ),
        (
            test::TestRequest::get().uri("/api/v1/nothing"),
            404,
            "not_found",
        ),
    ];
    for (req, want_status, want_code) in cases {
        let (status, body) = call!(app, req);
        assert_error(status, &body, want_status, want_code);
    }
    // None of that touched the executor.
    let (_, one) = call!(
        app,
        test::TestRequest::get().uri(&format!("/api/v1/executors/{id}"))
    );
    assert_eq!(one["status"], "initing");

    // The admin token may deregister anyone.
    let (status, _) = call!(
        app,
        test::TestRequest::delete()
            .uri(&format!("/api/v1/executors/{id}"))
            .insert_header(("Authorization", format!("Bearer {ADMIN}")))
    );
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[actix_rt::test]
async fn hostile_requests_never_get_a_5xx_nor_change_the_registry() {
    harness::init_tracing();
    let dir = TempDir::new().unwrap();
    let (state, _) = state_with(sqlite(&dir).await).await;
    let app = app!(state);
    let (_, reg) = call!(app, register_req("victim", json!({"zone": "a"})));
    let id = reg["id"].as_str().unwrap().to_owned();
    let snapshot = |list: &Value| -> Vec<(String, String)> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["id"].as_str().unwrap().to_owned(),
                    e["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let (_, before) = call!(app, test::TestRequest::get().uri("/api/v1/executors"));

    let mut rng = StdRng::seed_from_u64(7);
    let ids = [
        id.clone(),
        String::new(),
        "..".into(),
        "%2e%2e%2f".into(),
        "a".repeat(5000),
        "%00".into(),
        "victim-ZZZZZZZZ".into(),
        "%F0%9F%92%A5".into(),
    ];
    let bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"null".to_vec(),
        b"[]".to_vec(),
        b"{\"name\":null}".to_vec(),
        b"{\"name\":\"x\",\"address\":\"y\",\"labels\":{\"a\":[]}}".to_vec(),
        b"{\"ttl_ms\":18446744073709551616}".to_vec(),
        b"{\"ttl_ms\":1e309}".to_vec(),
        vec![0xff, 0xfe, 0x00],
        "{\"name\":\"\u{0000}\",\"address\":\"a\"}"
            .as_bytes()
            .to_vec(),
        b"{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{".to_vec(),
        vec![b'['; 3000],
    ];
    let tokens: [&[u8]; 7] = [
        b"",
        b"Bearer",
        b"Bearer ",
        b"Bearer x y",
        b"bearer \xff\xfe",
        b"Token abc",
        b"Bearer admin-secret-tokeN",
    ];
    let content_types = [
        "application/json",
        "text/plain",
        "application/json; charset=utf-16",
        "",
        "application/x+json",
    ];
    for _ in 0..1500 {
        let id = &ids[rng.random_range(0..ids.len())];
        let route = rng.random_range(0..6);
        let (method, uri) = match route {
            0 => ("POST", "/api/v1/executors".to_owned()),
            1 => ("POST", format!("/api/v1/executors/{id}/heartbeat")),
            2 => ("GET", format!("/api/v1/executors/{id}")),
            3 => ("DELETE", format!("/api/v1/executors/{id}")),
            4 => ("GET", format!("/api/v1/executors?status={id}&label={id}")),
            _ => ("PATCH", format!("/api/v1/executors/{id}")),
        };
        let mut req = test::TestRequest::default()
            .method(method.parse().unwrap())
            .uri(&uri)
            .set_payload(bodies[rng.random_range(0..bodies.len())].clone());
        let auth = tokens[rng.random_range(0..tokens.len())];
        if !auth.is_empty() {
            let value = actix_web::http::header::HeaderValue::from_bytes(auth).unwrap();
            req = req.insert_header(("Authorization", value));
        }
        let ct = content_types[rng.random_range(0..content_types.len())];
        if !ct.is_empty() {
            req = req.insert_header(("Content-Type", ct));
        }
        let resp = test::call_service(&app, req.to_request()).await;
        let status = resp.status();
        let bytes = test::read_body(resp).await;
        assert!(
            !status.is_server_error(),
            "{method} {uri}: {status} {bytes:?}"
        );
        if !bytes.is_empty() && status.as_u16() >= 400 {
            let body: Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("{method} {uri}: {bytes:?}"));
            assert!(body["code"].is_string(), "{body}");
        }
    }
    let (_, after) = call!(app, test::TestRequest::get().uri("/api/v1/executors"));
    // Registrations with valid bodies may have happened; the victim is intact.
    let before = snapshot(&before);
    let after = snapshot(&after);
    assert!(
        before.iter().all(|e| after.contains(e)),
        "{before:?} vs {after:?}"
    );
}

#[actix_rt::test]
async fn a_store_outage_refuses_registration_and_leaves_no_trace() {
    harness::init_tracing();
    let pg = harness::postgres::PostgresServer::start();
    let url = pg.fresh_database("outage").await;
    let options = StoreOptions {
        connect_timeout: Duration::from_secs(2),
        acquire_timeout: Duration::from_millis(500),
        max_connections: 2,
    };
    let store = Store::connect(&url, &options).await.unwrap();
    let (state, registry) = state_with(store).await;
    let app = app!(state);
    let (status, body) = call!(app, register_req("before", json!({})));
    assert_eq!(status, StatusCode::CREATED, "{body}");
    drop(pg);
    let (status, body) = call!(app, register_req("during", json!({})));
    assert_error(status, &body, 503, "store_unavailable");
    // Whether the refused row reached the store is unknown (an outage can
    // strike after the commit): its delete is queued, so that no later
    // leader loads it as an executor.
    let stats = registry.send(GetRegistryStats).await.unwrap();
    assert_eq!(stats.pending_store_deletes, 1, "{stats:?}");
    let (_, list) = call!(app, test::TestRequest::get().uri("/api/v1/executors"));
    assert_eq!(
        list["total"], 1,
        "the refused executor left no trace: {list}"
    );
    assert_eq!(list["items"][0]["name"], "before");
}

/// Reads one SSE frame (up to a blank line) as (event, data).
async fn read_frame(reader: &mut BufReader<tokio::net::TcpStream>) -> (String, Value) {
    let mut event = String::new();
    let mut data = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
            .await
            .expect("an SSE frame in time")
            .unwrap();
        assert!(n > 0, "stream ended");
        let line = line.trim_end_matches(['\r', '\n']);
        // Chunked transfer: skip chunk-size lines.
        if line.chars().all(|c| c.is_ascii_hexdigit())
            && !line.is_empty()
            && event.is_empty()
            && data.is_empty()
        {
            continue;
        }
        if line.is_empty() {
            if !event.is_empty() {
                return (event, serde_json::from_str(&data).unwrap());
            }
            continue;
        }
        if let Some(v) = line.strip_prefix("event: ") {
            event = v.to_owned();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = v.to_owned();
        }
    }
}

#[actix_rt::test]
async fn the_watch_feed_is_readable_by_a_real_http_client() {
    harness::init_tracing();
    let dir = TempDir::new().unwrap();
    let (state, _) = registry_state(sqlite(&dir).await, config(), RegisterLimiter::default()).await;
    let listener = http::listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = http::serve(listener, &flotilla::config::HttpConfig::default(), state).unwrap();
    let handle = server.handle();
    actix_rt::spawn(server);

    let request = |method: &str, path: &str, body: &str, token: Option<&str>| {
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    async fn send(addr: std::net::SocketAddr, raw: String) -> Value {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str(body).unwrap_or(Value::Null)
    }

    let first = send(
        addr,
        request(
            "POST",
            "/api/v1/executors",
            r#"{"name":"first","address":"h:1"}"#,
            None,
        ),
    )
    .await;

    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut reader = BufReader::new(stream);
    reader
        .get_mut()
        .write_all(format!("GET /api/v1/executors/watch HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut status_line = String::new();
    reader.read_line(&mut status_line).await.unwrap();
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    let mut content_type = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line.to_ascii_lowercase().starts_with("content-type:") {
            content_type = line.clone();
        }
        if line == "\r\n" {
            break;
        }
    }
    assert!(content_type.contains("text/event-stream"), "{content_type}");

    let (event, snapshot) = read_frame(&mut reader).await;
    assert_eq!(event, "snapshot");
    assert_eq!(snapshot["executors"][0]["id"], first["id"]);

    let second = send(
        addr,
        request(
            "POST",
            "/api/v1/executors",
            r#"{"name":"second","address":"h:2"}"#,
            None,
        ),
    )
    .await;
    let (event, online) = read_frame(&mut reader).await;
    assert_eq!(event, "online");
    assert_eq!(online["id"], second["id"]);
    assert!(online.get("token").is_none());

    let path = format!("/api/v1/executors/{}", first["id"].as_str().unwrap());
    send(addr, request("DELETE", &path, "", first["token"].as_str())).await;
    let (event, offline) = read_frame(&mut reader).await;
    assert_eq!(event, "offline");
    assert_eq!(offline["id"], first["id"]);
    assert_eq!(offline["reason"], "deregistered");
    handle.stop(false).await;
}

#[actix_rt::test]
async fn registrations_beyond_a_clients_burst_get_429_and_leave_no_trace() {
    let dir = TempDir::new().unwrap();
    let (state, registry) =
        state_with_limits(sqlite(&dir).await, config(), RegisterLimiter::new(1.0, 3)).await;
    let app = app!(state);
    let peer = |ip: &str| {
        format!("{ip}:40000")
            .parse::<std::net::SocketAddr>()
            .unwrap()
    };
    for i in 0..3 {
        let (status, body) = call!(
            app,
            register_req(&format!("burst{i}"), json!({})).peer_addr(peer("10.1.1.1"))
        );
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let resp = test::call_service(
        &app,
        register_req("burst3", json!({}))
            .peer_addr(peer("10.1.1.1"))
            .to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        resp.headers().get("retry-after").unwrap().to_str().unwrap(),
        "1"
    );
    let body: Value = serde_json::from_slice(&test::read_body(resp).await).unwrap();
    assert_error(
        StatusCode::TOO_MANY_REQUESTS,
        &body,
        429,
        "too_many_requests",
    );
    // Another address has its own budget; the refused one left nothing.
    let (status, _) = call!(
        app,
        register_req("other", json!({})).peer_addr(peer("10.1.1.2"))
    );
    assert_eq!(status, StatusCode::CREATED);
    let stats = registry.send(GetRegistryStats).await.unwrap();
    assert_eq!(stats.initing, 4);
}

#[actix_rt::test]
async fn the_hop_marker_skips_the_limit_only_from_a_member_of_the_election() {
    use flotilla::election::{Candidate, ElectionView, Member};
    let dir = TempDir::new().unwrap();
    let (state, registry) =
        state_with_limits(sqlite(&dir).await, config(), RegisterLimiter::new(1.0, 1)).await;
    // This server is the leader; 10.1.1.9 is a follower of the election.
    let member = |addr: &str| Member {
        candidate: Candidate {
            server_id: format!("server-{addr}"),
            advertise_addr: addr.into(),
        },
        lease: "1".into(),
        create_revision: 1,
    };
    let (_tx, view) = tokio::sync::watch::channel(ElectionView {
        leader: Some(member("127.0.0.1:0")),
        members: vec![member("127.0.0.1:0"), member("10.1.1.9:8080")],
        lease: Some("1".into()),
        is_leader: true,
    });
    let mut state = web::Data::into_inner(state);
    Arc::get_mut(&mut state).unwrap().election = Some(view);
    let app = app!(web::Data::from(state));
    let from = |ip: &str, name: &str, marked: bool| {
        let req = register_req(name, json!({})).peer_addr(format!("{ip}:40000").parse().unwrap());
        if marked {
            req.insert_header(("x-flotilla-forwarded-by", "server-x"))
        } else {
            req
        }
    };
    // A forged marker from a client: limited like any other request.
    let (status, _) = call!(app, from("10.1.1.1", "forged0", true));
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = call!(app, from("10.1.1.1", "forged1", true));
    assert_error(status, &body, 429, "too_many_requests");
    // The follower's forwards were limited there: not counted again here.
    for i in 0..5 {
        let (status, body) = call!(app, from("10.1.1.9", &format!("forwarded{i}"), true));
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    // The follower's own registrations (no marker) are counted.
    let (status, _) = call!(app, from("10.1.1.9", "own0", false));
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = call!(app, from("10.1.1.9", "own1", false));
    assert_error(status, &body, 429, "too_many_requests");
    assert_eq!(registry.send(GetRegistryStats).await.unwrap().initing, 7);
}

#[actix_rt::test]
async fn a_full_registry_refuses_with_503_and_stores_nothing() {
    let dir = TempDir::new().unwrap();
    let store = sqlite(&dir).await;
    let full = RegistryConfig {
        max_executors: 2,
        ..config()
    };
    let (state, registry) =
        state_with_limits(store.clone(), full, RegisterLimiter::default()).await;
    let app = app!(state);
    for i in 0..2 {
        let (status, _) = call!(app, register_req(&format!("cap{i}"), json!({})));
        assert_eq!(status, StatusCode::CREATED);
    }
    let (status, body) = call!(app, register_req("cap2", json!({})));
    assert_error(status, &body, 503, "registry_full");
    assert_eq!(registry.send(GetRegistryStats).await.unwrap().initing, 2);
    assert_eq!(
        store.load_executors().await.unwrap().len(),
        2,
        "nothing stored"
    );
}

/// Heartbeats are answered 503 until the owner has loaded its snapshot, so
/// a leader is not ready before that either, however ready the registry is.
#[actix_rt::test]
async fn readyz_is_503_until_the_owner_has_loaded_its_snapshot() {
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let dir = TempDir::new().unwrap();
    let (registry_only, registry) =
        registry_state(sqlite(&dir).await, config(), RegisterLimiter::default()).await;
    let prefix = "/flotilla/readyz";
    let owner = Owner::new(
        registry,
        client.clone(),
        Keys::new(prefix),
        OwnerSettings {
            worker: WorkerConfig {
                tick_interval: Duration::from_millis(50),
                ..WorkerConfig::new(format!("{prefix}/"))
            },
            owner: OwnerConfig {
                server_id: "readyz-test".into(),
                ..OwnerConfig::default()
            },
            restart_backoff: Duration::from_millis(200),
        },
    );
    let roles = Roles {
        owner: Some(owner.desk()),
        ..registry_only.roles.get().expect("a fixed registry")
    };
    let alarms = flotilla::actors::etcd_alarms::EtcdAlarms::default();
    let state = web::Data::new(
        AppState::new(
            registry_only.info.clone(),
            EtcdProbe::new(client, Duration::from_secs(5)),
        )
        .with_roles(RoleSlot::fixed(roles))
        .with_etcd_alarms(alarms.clone()),
    );
    let app = app!(state);
    let readyz = || test::TestRequest::get().uri("/readyz");

    // The registry is loaded and etcd answers: only the owner is missing.
    let (status, body) = call!(app, readyz());
    assert_error(status, &body, 503, "unavailable");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("owner"), "{body}");

    let owner = owner.start();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = call!(app, readyz());
        if status == StatusCode::OK {
            assert_eq!(body, json!({"status": "ok"}));
            break;
        }
        assert_error(status, &body, 503, "unavailable");
        assert!(
            std::time::Instant::now() < deadline,
            "not ready 10 s after the owner started: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // etcd refusing writes for lack of space (as the alarm monitor or a write
    // path sees it): not ready, saying what to do.
    let full = etcd_client::Error::GRpcStatus(tonic::Status::resource_exhausted(
        "etcdserver: mvcc: database space exceeded",
    ));
    assert!(alarms.note_error(&full));
    let (status, body) = call!(app, readyz());
    assert_error(status, &body, 503, "etcd_alarm");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("NOSPACE") && message.contains("defrag"),
        "{body}"
    );
    owner.send(StopOwner).await.unwrap();
}

/// A server whose roles have not started is ready only when a request can go
/// to the leader: not while the leader is this server itself (just elected,
/// its registry loading: a registration then would be 503 `not_ready`), nor an
/// earlier run of it at the same address.
#[actix_rt::test]
async fn readyz_is_503_while_this_server_is_the_leader_its_roles_not_started() {
    use flotilla::election::{Candidate, ElectionView, Member};
    harness::init_tracing();
    let etcd = EtcdCluster::single();
    let client = etcd.client().await;
    let info = ServerInfo {
        id: "me-00000001".into(),
        version: "0",
        cluster_id: "c".into(),
        advertise_addr: "127.0.0.1:8300".into(),
        etcd_endpoints: vec![],
    };
    let member = |server_id: &str, advertise_addr: &str| Member {
        candidate: Candidate {
            server_id: server_id.into(),
            advertise_addr: advertise_addr.into(),
        },
        lease: "1".into(),
        create_revision: 1,
    };
    let (view, election) = tokio::sync::watch::channel(ElectionView::default());
    let state = web::Data::new(
        AppState::new(info, EtcdProbe::new(client, Duration::from_secs(5))).with_election(election),
    );
    let app = app!(state);
    let readyz = || test::TestRequest::get().uri("/readyz");

    let (status, body) = call!(app, readyz());
    assert_error(status, &body, 503, "no_leader");
    for (leader, says) in [
        (member("me-00000001", "127.0.0.1:8300"), "just elected"),
        (
            member("me-00000000", "127.0.0.1:8300"),
            "earlier run of this server",
        ),
    ] {
        view.send_modify(|v| v.leader = Some(leader));
        let (status, body) = call!(app, readyz());
        assert_error(status, &body, 503, "no_leader");
        assert!(body["message"].as_str().unwrap().contains(says), "{body}");
    }
    view.send_modify(|v| v.leader = Some(member("other-00000002", "127.0.0.1:8301")));
    let (status, body) = call!(app, readyz());
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// A leader frozen past its election lease (a successor may exist and may have
/// moved the work) extends no lease and hands out nothing: 503 `no_leader`.
#[actix_rt::test]
async fn a_leader_whose_election_lease_lapsed_answers_no_heartbeat() {
    harness::init_tracing();
    let dir = TempDir::new().unwrap();
    let (state, _) = registry_state(sqlite(&dir).await, config(), RegisterLimiter::default()).await;
    let roles = state.roles.get().expect("fixed roles");
    let app = app!(web::Data::new(state));
    let (_, reg) = call!(app, register_req("exec", json!({})));
    let id = reg["id"].as_str().unwrap().to_owned();
    let token = reg["token"].as_str().unwrap().to_owned();
    let (status, _) = call!(app, heartbeat_req(&id, &token));
    assert_eq!(status, StatusCode::OK);

    let client = crate::harness::app::closed_etcd().await;
    let lapsed = AppState::new(
        crate::harness::app::server_info(),
        EtcdProbe::new(client, Duration::from_millis(100)),
    )
    .with_roles(RoleSlot::fixed(Roles {
        // Default: never extended, so never valid.
        lease: flotilla::election::LeaseGuard::default(),
        ..roles
    }))
    .with_max_body_bytes(MAX_BODY)
    .with_max_heartbeat_bytes(MAX_HEARTBEAT);
    let app = app!(web::Data::new(lapsed));
    let (status, body) = call!(app, heartbeat_req(&id, &token));
    assert_error(status, &body, 503, "no_leader");
}
