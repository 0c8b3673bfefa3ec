//! The `flotilla` binary's client commands against a real server over a real etcd:
//! human and JSON output, one-line errors, and the exit codes scripts rely on
//! (0 ok, 1 refused, 2 usage, 3 no usable answer).

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use crate::harness::server::{free_port, FlotillaServer, ServerOptions, BIN};
use flotilla::client::{Client, RegisterRequest};
use serde_json::Value;

const ADMIN: &str = "cli-admin-token";

/// `flotilla <args>` against `server`, with no admin token from the environment.
fn flotilla(server: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("FLOTILLA_SERVER", server)
        .env_remove("FLOTILLA_ADMIN_TOKEN")
        .env_remove("FLOTILLA_NAMESPACE")
        .stdin(Stdio::null())
        .output()
        .expect("run flotilla")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts success and returns stdout.
#[track_caller]
fn ok(output: Output) -> String {
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

#[track_caller]
fn json(output: Output) -> Value {
    let out = ok(output);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Asserts exit `code` with exactly one line on stderr starting with `prefix`, and
/// nothing on stdout.
#[track_caller]
fn fails(output: Output, code: i32, prefix: &str) {
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(code), "stderr: {err}");
    assert!(err.starts_with(prefix), "expected {prefix:?}: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(stdout(&output).is_empty(), "{}", stdout(&output));
}

#[test]
fn changefeed_commands_print_tables_and_json_and_exit_by_outcome() {
    let server = FlotillaServer::start(ServerOptions {
        admin_token: Some(ADMIN.into()),
        ..ServerOptions::default()
    });
    let url = server.url();
    let token_file = server.data_dir().join("cli-token");
    std::fs::write(&token_file, format!("{ADMIN}\n")).unwrap();
    let token_file = token_file.to_str().unwrap();
    let run = |args: &[&str]| flotilla(&url, args);
    let admin = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--admin-token-file", token_file]);
        flotilla(&url, &all)
    };

    let create = [
        "changefeed",
        "create",
        "orders",
        "--sink-uri",
        "kafka://broker/orders",
        "--start-ts",
        "1000",
        "--config",
        r#"{"batch":10}"#,
        "--selector",
        "zone=a",
    ];
    fails(run(&create), 1, "error: unauthorized: ");
    let created = ok(admin(&create));
    assert!(created.contains("state:"), "{created}");
    assert!(created.contains("normal"), "{created}");
    assert!(created.contains("kafka://broker/orders"), "{created}");
    // The token from the environment works as well as the file.
    let again = Command::new(BIN)
        .args(create)
        .env("FLOTILLA_SERVER", &url)
        .env("FLOTILLA_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    fails(again, 1, "error: changefeed_exists: ");

    let table = ok(run(&["changefeed", "list"]));
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    assert!(header.starts_with("ID "), "{table}");
    assert!(
        header.contains("STATE") && header.contains("CHECKPOINT"),
        "{table}"
    );
    let row = lines.next().expect("one row");
    assert!(row.starts_with("orders "), "{table}");
    assert!(row.contains("normal") && row.contains("1000"), "{table}");
    assert_eq!(lines.next(), None, "{table}");

    let listed = json(run(&["changefeed", "list", "--output", "json"]));
    assert_eq!(listed["total"], 1);
    assert_eq!(listed["items"][0]["id"], "orders");
    assert_eq!(listed["items"][0]["selector"]["zone"], "a");
    let one = json(run(&["changefeed", "get", "orders", "-o", "json"]));
    assert_eq!(one["config"]["batch"], 10);
    assert_eq!(one["checkpoint_ts"], 1000);
    let other_ns = json(run(&["changefeed", "list", "-n", "other", "-o", "json"]));
    assert_eq!(other_ns["total"], 0);

    fails(
        run(&["changefeed", "get", "missing"]),
        1,
        "error: not_found: ",
    );
    fails(
        admin(&[
            "changefeed",
            "update",
            "orders",
            "--sink-uri",
            "kafka://x/y",
        ]),
        1,
        "error: changefeed_not_paused: ",
    );
    let paused = json(admin(&["changefeed", "pause", "orders", "-o", "json"]));
    assert_eq!(paused["state"], "stopped");
    fails(
        admin(&["changefeed", "update", "orders"]),
        2,
        "error: nothing to update",
    );
    let updated = json(admin(&[
        "changefeed",
        "update",
        "orders",
        "--sink-uri",
        "kafka://x/y",
        "--clear-selector",
        "-o",
        "json",
    ]));
    assert_eq!(updated["sink_uri"], "kafka://x/y");
    assert_eq!(updated["selector"], serde_json::json!({}));
    let resumed = json(admin(&[
        "changefeed",
        "resume",
        "orders",
        "--checkpoint-ts",
        "2000",
        "-o",
        "json",
    ]));
    assert_eq!(
        (resumed["state"].as_str(), resumed["checkpoint_ts"].as_u64()),
        (Some("normal"), Some(2000))
    );

    fails(
        run(&["changefeed", "delete", "orders"]),
        1,
        "error: unauthorized: ",
    );
    let deleted = ok(admin(&["changefeed", "delete", "orders"]));
    assert_eq!(deleted.trim(), "changefeed default/orders deleted");
    fails(
        run(&["changefeed", "get", "orders"]),
        1,
        "error: not_found: ",
    );
    fails(
        admin(&["changefeed", "delete", "orders"]),
        1,
        "error: not_found: ",
    );

    // Usage errors are clap's exit 2, before any request.
    let usage = run(&["changefeed", "create", "x"]);
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));
    let bad_config = run(&[
        "changefeed",
        "create",
        "x",
        "--sink-uri",
        "k://a",
        "--config",
        "[1]",
    ]);
    assert_eq!(bad_config.status.code(), Some(2), "{}", stderr(&bad_config));
    fails(
        run(&[
            "changefeed",
            "list",
            "--admin-token-file",
            "/nonexistent/token",
        ]),
        2,
        "error: cannot read --admin-token-file /nonexistent/token",
    );
}

#[test]
fn executor_and_status_commands() {
    let server = FlotillaServer::start(ServerOptions {
        admin_token: Some(ADMIN.into()),
        ..ServerOptions::default()
    });
    let url = server.url();
    let run = |args: &[&str]| flotilla(&url, args);

    // `watch` first, so its snapshot is empty and the registration is an event.
    let mut watch = Command::new(BIN)
        .args(["executors", "watch", "-o", "json", "--server", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut watched = BufReader::new(watch.stdout.take().unwrap()).lines();
    let snapshot: Value = serde_json::from_str(&watched.next().unwrap().unwrap()).unwrap();
    assert_eq!(snapshot["event"], "snapshot", "{snapshot}");
    assert_eq!(snapshot["executors"], serde_json::json!([]));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let registration = runtime
        .block_on(Client::new(&url).unwrap().register(&RegisterRequest {
            name: "exec".into(),
            address: "10.0.0.1:9000".into(),
            labels: [("zone".to_string(), "a".to_string())].into(),
        }))
        .unwrap();
    let id = registration.executor.id.as_str();

    let online: Value = serde_json::from_str(&watched.next().unwrap().unwrap()).unwrap();
    assert_eq!(online["event"], "online", "{online}");
    assert_eq!(online["executor"]["id"], id);
    let _ = watch.kill();
    let _ = watch.wait();

    let table = ok(run(&["executors", "list"]));
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("ID "), "{table}");
    let row = lines.next().unwrap();
    assert!(row.starts_with(id), "{table}");
    assert!(row.contains("initing") && row.contains("zone=a"), "{table}");
    let listed = json(run(&[
        "executors",
        "list",
        "--label",
        "zone=b",
        "-o",
        "json",
    ]));
    assert_eq!(listed["total"], 0);
    let one = json(run(&["executors", "get", id, "-o", "json"]));
    assert_eq!(one["address"], "10.0.0.1:9000");
    let fields = ok(run(&["executors", "get", id]));
    assert!(fields.contains("last_heartbeat: never"), "{fields}");
    fails(
        run(&["executors", "get", "nobody-00000000"]),
        1,
        "error: unknown_executor: ",
    );
    fails(
        run(&["executors", "deregister", id]),
        1,
        "error: unauthorized: ",
    );
    let out = ok(run(&[
        "executors",
        "deregister",
        id,
        "--admin-token",
        ADMIN,
    ]));
    assert_eq!(out.trim(), format!("executor {id} deregistered"));
    let gone = json(run(&["executors", "get", id, "-o", "json"]));
    assert_eq!(gone["status"], "tombstone");

    let status = ok(run(&["status"]));
    assert!(
        status.contains(&format!("version:   {}", env!("CARGO_PKG_VERSION"))),
        "{status}"
    );
    assert!(
        status.contains("etcd:") && status.contains("healthy"),
        "{status}"
    );
    let status = json(run(&["status", "-o", "json"]));
    assert_eq!(status["cluster_id"], "client-test");
    assert_eq!(status["etcd"]["healthy"], true);
}

#[test]
fn a_5xx_exits_3_with_the_server_code() {
    let mut server = FlotillaServer::start(ServerOptions::default());
    server.etcd().kill(0);
    // The server waits etcd.request_timeout (1 s here), then answers 503.
    fails(
        flotilla(&server.url(), &["changefeed", "get", "orders"]),
        3,
        "error: etcd_unavailable: ",
    );
}

#[test]
fn an_unreachable_server_exits_3_with_one_line() {
    let url = format!("http://127.0.0.1:{}", free_port());
    for args in [
        &["status"][..],
        &["changefeed", "get", "orders"][..],
        &["executors", "list", "-o", "json"][..],
    ] {
        fails(
            flotilla(&url, args),
            3,
            "error: cannot reach http://127.0.0.1:",
        );
    }
    fails(
        flotilla("https://example.invalid", &["status"]),
        2,
        "error: invalid server URL",
    );
}
