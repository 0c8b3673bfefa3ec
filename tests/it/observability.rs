//! What operators scrape and read, checked on the real `flotilla serve` (embedded etcd,
//! SQLite): `/metrics` passes `promtool check metrics` and labels requests by route
//! pattern; the shipped alert rules pass `promtool check rules`; the alert rules and
//! the Grafana dashboard use only metrics a live server exports; `--log-format json`
//! writes one JSON object per line, through a graceful SIGINT shutdown.
//!
//! promtool comes from the Debian package `prometheus` (`scripts/install-deps`).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

use crate::harness::http::request;
use crate::harness::server::{Etcd, FlotillaServer, ServerConfig, ServerOptions, Startup};

const HEARTBEAT_ROUTE: &str = "/api/v1/executors/{id}/heartbeat";

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs `promtool` with `args` (and `stdin`); a missing promtool fails the test.
fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install it with scripts/install-deps \
                 (Debian package `prometheus`)"
            )
        });
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A `flotilla serve` on its embedded etcd and the built-in defaults, logging at
/// `info`, with `args`.
fn start(args: &[&str]) -> FlotillaServer {
    FlotillaServer::start_with(
        ServerOptions {
            env: vec![("FLOTILLA_LOG_LEVEL".into(), "info".into())],
            ..ServerOptions::default()
        },
        Startup {
            etcd: Etcd::Embedded,
            config: ServerConfig::Defaults,
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Startup::default()
        },
    )
}

/// Registers an executor and heartbeats it `beats` times; returns its id.
fn executor_with_heartbeats(server: &FlotillaServer, name: &str, beats: usize) -> String {
    let body = json!({"name": name, "address": format!("{name}:9000")});
    let answer = request(
        server.port(),
        "POST",
        "/api/v1/executors",
        None,
        Some(&body),
    );
    assert_eq!(answer.status, 201, "{}", answer.body);
    let body = answer.json();
    let (id, token) = (
        body["id"].as_str().unwrap().to_owned(),
        body["token"].as_str().unwrap().to_owned(),
    );
    for _ in 0..beats {
        let answer = request(
            server.port(),
            "POST",
            &format!("/api/v1/executors/{id}/heartbeat"),
            Some(&token),
            Some(&json!({})),
        );
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    id
}

fn scrape(server: &FlotillaServer) -> String {
    let answer = request(server.port(), "GET", "/metrics", None, None);
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.body
}

/// The value of the sample `name{labels}` whose labels include every `want` pair.
fn sample(scrape: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(rest) => rest.rsplit_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        want.iter()
            .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().unwrap())
    })
}

/// Every sample name in a scrape (`flotilla_x_bucket`, `flotilla_y`, ...).
fn sample_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            l.split(['{', ' '])
                .next()
                .expect("split yields one item")
                .to_owned()
        })
        .collect()
}

/// Every `flotilla_*` identifier in `text`.
fn flotilla_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("flotilla_") {
        let start = i + at;
        let preceded_by_ident =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |n| start + n);
        if !preceded_by_ident {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

#[test]
fn metrics_pass_promtool_and_label_requests_by_route_pattern() {
    let server = start(&[]);
    let ids: Vec<String> = ["alpha", "beta"]
        .iter()
        .map(|name| executor_with_heartbeats(&server, name, 3))
        .collect();
    let status = request(
        server.port(),
        "POST",
        "/api/v1/executors/nobody-00000000/heartbeat",
        Some("nope"),
        Some(&json!({})),
    )
    .status;
    assert!(status >= 400, "{status}");
    let status = request(server.port(), "GET", "/no/such/route/42", None, None).status;
    assert_eq!(status, 404);

    let scrape = scrape(&server);
    let output = promtool(&["check", "metrics"], Some(&scrape));
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}\n--- scrape:\n{scrape}",
        output_text(&output)
    );

    let route = [("route", HEARTBEAT_ROUTE), ("method", "POST")];
    let ok = [route[0], route[1], ("status", "200")];
    assert_eq!(
        sample(&scrape, "flotilla_http_requests_total", &ok),
        Some(6.0),
        "{scrape}"
    );
    assert_eq!(
        sample(&scrape, "flotilla_http_request_duration_seconds_count", &ok),
        Some(6.0),
        "{scrape}"
    );
    assert!(
        sample(
            &scrape,
            "flotilla_http_request_duration_seconds_bucket",
            &[route[0], ("le", "+Inf")]
        )
        .is_some(),
        "{scrape}"
    );
    assert_eq!(
        sample(
            &scrape,
            "flotilla_http_requests_total",
            &[("route", "unmatched"), ("method", "GET"), ("status", "404")]
        ),
        Some(1.0),
        "{scrape}"
    );
    for raw in ids
        .iter()
        .map(String::as_str)
        .chain(["nobody-00000000", "/no/such"])
    {
        assert!(
            !scrape.contains(raw),
            "{raw} leaked into a label:\n{scrape}"
        );
    }
    for line in scrape.lines().filter(|l| l.starts_with("# HELP ")) {
        let (name, help) = line["# HELP ".len()..]
            .split_once(' ')
            .unwrap_or((line, ""));
        assert!(name.starts_with("flotilla_"), "{line}");
        assert!(!help.trim().is_empty(), "no help text: {line}");
    }
    assert_eq!(sample(&scrape, "flotilla_is_leader", &[]), Some(1.0));

    // The README's metrics table lists exactly the families a server exports.
    let readme = std::fs::read_to_string(repo_file("README.md")).unwrap();
    let documented: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `flotilla_"))
        .filter_map(|rest| rest.split_once('`'))
        .map(|(name, _)| format!("flotilla_{name}"))
        .collect();
    let families: BTreeSet<String> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|rest| rest.split(' ').next().unwrap().to_owned())
        .collect();
    assert_eq!(documented, families, "README.md (Metrics) vs /metrics");
}

#[test]
fn alert_rules_pass_promtool_and_deploy_files_use_only_exported_metrics() {
    let alerts_path = repo_file("deploy/prometheus/alerts.yml");
    let output = promtool(&["check", "rules", alerts_path.to_str().unwrap()], None);
    assert!(
        output.status.success(),
        "promtool check rules failed:\n{}",
        output_text(&output)
    );

    let dashboard_path = repo_file("deploy/grafana/flotilla.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&dashboard_path).unwrap())
        .expect("the dashboard is valid JSON");
    assert!(
        dashboard["schemaVersion"].as_u64().is_some(),
        "schemaVersion"
    );
    assert!(dashboard["title"].as_str().is_some(), "title");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut exprs = Vec::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"].as_array().unwrap_or_else(|| {
            panic!("panel {} has no targets", panel["title"]);
        });
        assert!(
            !targets.is_empty(),
            "panel {} has no targets",
            panel["title"]
        );
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.is_empty(),
                "panel {}: a target without expr",
                panel["title"]
            );
            exprs.push(expr.to_owned());
        }
        assert!(
            panel["gridPos"].is_object(),
            "panel {}: gridPos",
            panel["title"]
        );
    }

    let server = start(&[]);
    executor_with_heartbeats(&server, "gamma", 2);
    let exported = sample_names(&scrape(&server));

    let alerts = std::fs::read_to_string(&alerts_path).unwrap();
    for (file, names) in [
        ("alerts.yml", flotilla_names(&alerts)),
        ("flotilla.json", flotilla_names(&exprs.join("\n"))),
    ] {
        assert!(names.len() >= 4, "{file} uses only {names:?}");
        let missing: Vec<_> = names.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics a live server does not export: {missing:?}\nexported: {exported:?}"
        );
    }
}

#[test]
fn json_log_format_writes_json_lines_through_a_graceful_sigint_shutdown() {
    let mut server = start(&["--log-format", "json"]);
    // Not a quiet route, so it writes an access-log line.
    let status = request(server.port(), "GET", "/api/v1/status", None, None).status;
    assert_eq!(status, 200);
    // SIGINT (Ctrl-C); tests/serve.rs covers SIGTERM.
    let status = server.stop(libc::SIGINT);
    let stderr = server.log();
    assert_eq!(status.code(), Some(0), "{stderr}");

    let mut messages = Vec::new();
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let level = event["level"]
            .as_str()
            .unwrap_or_else(|| panic!("no level: {line}"));
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
            "{line}"
        );
        let message = event["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message: {line}"));
        if message == "request" {
            assert_eq!(event["path"], "/api/v1/status", "{line}");
            assert_eq!(event["status"], 200, "{line}");
            let peer = event["peer"].as_str().unwrap_or_default();
            assert!(peer.starts_with("127.0.0.1:"), "{line}");
        }
        messages.push(message.to_owned());
    }
    for expected in [
        "HTTP server listening",
        "request",
        "shutting down: HTTP stops accepting and drains in-flight requests",
        "HTTP server stopped",
        "embedded etcd stopped",
        "flotilla stopped",
    ] {
        assert!(
            messages.iter().any(|m| m == expected),
            "no {expected:?} in {messages:?}"
        );
    }
}
