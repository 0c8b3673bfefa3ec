//! The OpenAPI document against a real `flotilla serve` (real etcd, SQLite, an
//! admin token): every answer of a walk through the whole API (register,
//! heartbeat until a changefeed is assigned, every changefeed operation,
//! deregistration, the errors on the way) must be a status the document gives
//! its operation, with the documented content type, and a JSON body that
//! validates against the documented schema. The validator below knows the
//! keywords the document uses and fails on any other, so it cannot pass by
//! ignoring what it does not understand.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::http::{request_bytes, try_request, Response};
use crate::harness::server::{FlotillaServer, ServerOptions};
use serde_json::{json, Value};

const ADMIN: &str = "openapi-admin-token";

/// The document, and the checks of answers against it.
struct Spec {
    doc: Value,
    checked: Vec<String>,
}

impl Spec {
    fn schema(&self, name: &str) -> &Value {
        &self.doc["components"]["schemas"][name]
    }

    /// Checks `answer` to `method` on the documented `path`.
    #[track_caller]
    fn check(&mut self, method: &str, path: &str, answer: &Response) {
        let what = format!("{method} {path} -> {}", answer.status);
        let op = &self.doc["paths"][path][method.to_lowercase()];
        assert!(op.is_object(), "{what}: not documented");
        let response = &op["responses"][answer.status.to_string()];
        assert!(
            response.is_object(),
            "{what}: status not documented; body {}",
            answer.body
        );
        for name in response["headers"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(n, _)| n)
        {
            assert!(answer.header(name).is_some(), "{what}: no {name} header");
        }
        let Some(content) = response["content"].as_object() else {
            assert!(answer.body.is_empty(), "{what}: an undocumented body");
            self.checked.push(what);
            return;
        };
        let content_type = answer.header("content-type").unwrap_or_default();
        let mime = content_type.split(';').next().unwrap().trim();
        let (_, media) = content
            .iter()
            .find(|(documented, _)| documented.split(';').next().unwrap().trim() == mime)
            .unwrap_or_else(|| panic!("{what}: content type {mime} not documented"));
        if mime == "application/json" {
            let body: Value = serde_json::from_str(&answer.body)
                .unwrap_or_else(|e| panic!("{what}: {e}: {}", answer.body));
            let mut errors = Vec::new();
            self.validate(&media["schema"], &body, "$", &mut errors);
            assert!(errors.is_empty(), "{what}: {errors:#?}\nbody: {body:#}");
        }
        self.checked.push(what);
    }

    fn validate(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        let Some(schema) = schema.as_object() else {
            panic!("{at}: schema {schema} is not an object");
        };
        if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
            let name = r
                .strip_prefix("#/components/schemas/")
                .expect("a local ref");
            let target = self.schema(name);
            assert!(target.is_object(), "{r} does not resolve");
            self.validate(target, value, at, errors);
        }
        for (keyword, arg) in schema {
            match keyword.as_str() {
                "$ref" | "description" | "format" | "example" | "examples" | "default"
                | "title" => {}
                "type" => {
                    let types: Vec<&str> = match arg {
                        Value::String(t) => vec![t.as_str()],
                        Value::Array(ts) => ts.iter().map(|t| t.as_str().unwrap()).collect(),
                        _ => panic!("{at}: type {arg}"),
                    };
                    if !types.iter().any(|t| has_type(value, t)) {
                        errors.push(format!("{at}: {value} is not {types:?}"));
                    }
                }
                "properties" => {
                    if let Some(object) = value.as_object() {
                        for (name, property) in arg.as_object().unwrap() {
                            if let Some(v) = object.get(name) {
                                self.validate(property, v, &format!("{at}.{name}"), errors);
                            }
                        }
                    }
                }
                "required" => {
                    if let Some(object) = value.as_object() {
                        for name in arg.as_array().unwrap() {
                            if !object.contains_key(name.as_str().unwrap()) {
                                errors.push(format!("{at}: {name} is missing"));
                            }
                        }
                    }
                }
                "additionalProperties" => {
                    if let Some(object) = value.as_object() {
                        let known = schema.get("properties").and_then(Value::as_object);
                        for (name, v) in object {
                            if known.is_some_and(|k| k.contains_key(name)) {
                                continue;
                            }
                            match arg {
                                Value::Bool(false) => {
                                    errors.push(format!("{at}: unexpected property {name}"))
                                }
                                Value::Bool(true) => {}
                                _ => self.validate(arg, v, &format!("{at}.{name}"), errors),
                            }
                        }
                    }
                }
                "propertyNames" => {
                    if let Some(object) = value.as_object() {
                        for name in object.keys() {
                            self.validate(arg, &json!(name), &format!("{at}[key]"), errors);
                        }
                    }
                }
                "items" => {
                    for (i, item) in value.as_array().into_iter().flatten().enumerate() {
                        self.validate(arg, item, &format!("{at}[{i}]"), errors);
                    }
                }
                "enum" => {
                    if !arg.as_array().unwrap().contains(value) {
                        errors.push(format!("{at}: {value} is not one of {arg}"));
                    }
                }
                "minimum" => {
                    if value.as_f64().is_some_and(|v| v < arg.as_f64().unwrap()) {
                        errors.push(format!("{at}: {value} < {arg}"));
                    }
                }
                "allOf" => {
                    for part in arg.as_array().unwrap() {
                        self.validate(part, value, at, errors);
                    }
                }
                "oneOf" => {
                    let matching = arg
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|part| {
                            let mut errs = Vec::new();
                            self.validate(part, value, at, &mut errs);
                            errs.is_empty()
                        })
                        .count();
                    if matching != 1 {
                        errors.push(format!("{at}: {value} matches {matching} of oneOf {arg}"));
                    }
                }
                other => panic!("{at}: the validator does not know `{other}`; teach it"),
            }
        }
    }
}

fn has_type(value: &Value, t: &str) -> bool {
    match t {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => panic!("unknown type {t}"),
    }
}

#[test]
fn every_answer_of_a_walk_through_the_api_matches_the_document() {
    let server = FlotillaServer::start(ServerOptions {
        admin_token: Some(ADMIN.into()),
        ..ServerOptions::default()
    });
    let port = server.port();
    let call = |method: &str, path: &str, token: Option<&str>, body: Option<Value>| {
        try_request(
            port,
            method,
            path,
            token,
            body.as_ref(),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    };

    let answer = call("GET", "/api/v1/openapi.json", None, None);
    assert_eq!(answer.status, 200);
    let mut spec = Spec {
        doc: answer.json(),
        checked: Vec::new(),
    };
    spec.check("GET", "/api/v1/openapi.json", &answer);
    assert_eq!(spec.doc["openapi"], "3.1.0");

    // Operations.
    for path in ["/healthz", "/readyz", "/metrics", "/api/v1/status"] {
        let answer = call("GET", path, None, None);
        assert_eq!(answer.status, 200, "{path}");
        spec.check("GET", path, &answer);
    }
    let answer = call("GET", "/api/v1/docs", None, None);
    assert_eq!(answer.status, 308);
    spec.check("GET", "/api/v1/docs", &answer);
    let answer = call("GET", "/api/v1/docs/", None, None);
    assert_eq!(answer.status, 200);
    spec.check("GET", "/api/v1/docs/{file}", &answer);
    let answer = call("GET", "/api/v1/docs/missing.js", None, None);
    assert_eq!(answer.status, 404);
    spec.check("GET", "/api/v1/docs/{file}", &answer);
    for path in ["/", "/assets/dashboard.js", "/assets/dashboard.css"] {
        let answer = call("GET", path, None, None);
        assert_eq!(answer.status, 200, "{path}");
        spec.check("GET", path, &answer);
    }

    // Executors: register (and refusals), heartbeat, read.
    let register =
        json!({"name": "walker", "address": "walker.local:9000", "labels": {"zone": "a"}});
    let answer = call("POST", "/api/v1/executors", None, Some(register));
    assert_eq!(answer.status, 201);
    spec.check("POST", "/api/v1/executors", &answer);
    let executor = answer.json();
    let id = executor["id"].as_str().unwrap().to_owned();
    let token = executor["token"].as_str().unwrap().to_owned();
    for bad in [
        json!({"name": "-bad", "address": "x"}),
        json!({"name": "a", "address": "x", "extra": 1}),
    ] {
        let answer = call("POST", "/api/v1/executors", None, Some(bad));
        assert_eq!(answer.status, 400);
        spec.check("POST", "/api/v1/executors", &answer);
    }

    let heartbeat = format!("/api/v1/executors/{id}/heartbeat");
    let progress =
        json!({"progress": [{"changefeed": "nothing-here", "epoch": 1, "checkpoint_ts": 5}]});
    let answer = call("POST", &heartbeat, Some(&token), Some(progress));
    assert_eq!(answer.status, 200);
    spec.check("POST", "/api/v1/executors/{id}/heartbeat", &answer);
    assert_eq!(answer.json()["rejected"].as_array().unwrap().len(), 1);
    let answer = call("POST", &heartbeat, Some("wrong"), None);
    assert_eq!(answer.status, 401);
    spec.check("POST", "/api/v1/executors/{id}/heartbeat", &answer);
    let answer = call(
        "POST",
        "/api/v1/executors/nobody-00000000/heartbeat",
        Some("t"),
        None,
    );
    assert_eq!(answer.status, 404);
    spec.check("POST", "/api/v1/executors/{id}/heartbeat", &answer);

    // Changefeeds: create (and refusals), then heartbeat until it is assigned.
    let create = json!({"id": "walk", "sink_uri": "kafka://broker/walk", "config": {"k": "v"},
                        "selector": {"zone": "a"}});
    let answer = call("POST", "/api/v1/changefeeds", None, Some(create.clone()));
    assert_eq!(answer.status, 401);
    spec.check("POST", "/api/v1/changefeeds", &answer);
    let answer = call(
        "POST",
        "/api/v1/changefeeds",
        Some(ADMIN),
        Some(create.clone()),
    );
    assert_eq!(answer.status, 201);
    spec.check("POST", "/api/v1/changefeeds", &answer);
    let answer = call(
        "POST",
        "/api/v1/changefeeds",
        Some(ADMIN),
        Some(create.clone()),
    );
    assert_eq!(answer.status, 409);
    spec.check("POST", "/api/v1/changefeeds", &answer);
    // A batch: one new, one existing (refused in the answer), then a bad body.
    let batch = json!({"items": [{"id": "walk-batch", "sink_uri": "kafka://broker/b",
                                  "selector": {"zone": "nowhere"}}, create]});
    let answer = call(
        "POST",
        "/api/v1/changefeeds:batch",
        Some(ADMIN),
        Some(batch),
    );
    assert_eq!(answer.status, 200);
    spec.check("POST", "/api/v1/changefeeds:batch", &answer);
    let answer = call(
        "POST",
        "/api/v1/changefeeds:batch",
        Some(ADMIN),
        Some(json!({"items": 1})),
    );
    assert_eq!(answer.status, 400);
    spec.check("POST", "/api/v1/changefeeds:batch", &answer);

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = call("POST", &heartbeat, Some(&token), None);
        assert_eq!(answer.status, 200);
        spec.check("POST", "/api/v1/executors/{id}/heartbeat", &answer);
        if !answer.json()["assignments"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never assigned:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    for (path, documented) in [
        ("/api/v1/executors", "/api/v1/executors"),
        (
            "/api/v1/executors?status=running&label=zone=a",
            "/api/v1/executors",
        ),
        ("/api/v1/executors?status=sleeping", "/api/v1/executors"),
        (&format!("/api/v1/executors/{id}"), "/api/v1/executors/{id}"),
        (
            "/api/v1/executors/nobody-00000000",
            "/api/v1/executors/{id}",
        ),
        ("/api/v1/changefeeds", "/api/v1/changefeeds"),
        (
            "/api/v1/changefeeds?state=normal&namespace=default",
            "/api/v1/changefeeds",
        ),
        ("/api/v1/changefeeds?state=nope", "/api/v1/changefeeds"),
        ("/api/v1/changefeeds/walk", "/api/v1/changefeeds/{id}"),
        ("/api/v1/changefeeds/absent", "/api/v1/changefeeds/{id}"),
        ("/api/v1/changefeeds/bad%20id", "/api/v1/changefeeds/{id}"),
    ] {
        let answer = call("GET", path, None, None);
        spec.check("GET", documented, &answer);
    }
    // Assigned: the executor lists it.
    let answer = call("GET", &format!("/api/v1/executors/{id}"), None, None);
    assert_eq!(answer.json()["changefeeds"], json!(["default/walk"]));

    // Changefeed operations and their refusals.
    for (method, path, token, body, status) in [
        (
            "PUT",
            "/api/v1/changefeeds/walk",
            Some(ADMIN),
            Some(json!({"config": {}})),
            409,
        ),
        (
            "POST",
            "/api/v1/changefeeds/walk/resume",
            Some(ADMIN),
            Some(json!({"checkpoint_ts": 1})),
            409,
        ),
        ("POST", "/api/v1/changefeeds/walk/pause", None, None, 401),
        (
            "POST",
            "/api/v1/changefeeds/walk/pause",
            Some(ADMIN),
            None,
            200,
        ),
        (
            "PUT",
            "/api/v1/changefeeds/walk",
            Some(ADMIN),
            Some(json!({})),
            400,
        ),
        (
            "PUT",
            "/api/v1/changefeeds/walk",
            Some(ADMIN),
            Some(json!({"sink_uri": "kafka://b/t2"})),
            200,
        ),
        (
            "POST",
            "/api/v1/changefeeds/walk/resume",
            Some(ADMIN),
            None,
            200,
        ),
        (
            "POST",
            "/api/v1/changefeeds/absent/pause",
            Some(ADMIN),
            None,
            404,
        ),
        ("DELETE", "/api/v1/changefeeds/walk", Some(ADMIN), None, 204),
        ("DELETE", "/api/v1/changefeeds/walk", Some(ADMIN), None, 404),
    ] {
        let answer = call(method, path, token, body);
        assert_eq!(answer.status, status, "{method} {path}: {}", answer.body);
        let documented = path.replace("/walk", "/{id}").replace("/absent", "/{id}");
        spec.check(method, &documented, &answer);
    }

    // 405 with its Allow.
    let answer = call("PATCH", "/api/v1/changefeeds/walk", None, None);
    assert_eq!(answer.status, 405);
    assert_eq!(answer.header("allow"), Some("DELETE, GET, PUT"));
    assert_eq!(answer.json()["code"], "method_not_allowed");

    // The watch: a 200 event stream whose first event is the snapshot.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(&request_bytes("GET", "/api/v1/executors/watch", None, None))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        reader.read_line(&mut head).unwrap();
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    let documented = &spec.doc["paths"]["/api/v1/executors/watch"]["get"]["responses"]["200"];
    assert!(documented["content"]["text/event-stream"].is_object());
    let mut first = String::new();
    while !first.contains("event: snapshot") {
        reader.read_line(&mut first).unwrap();
    }
    drop(reader);

    // Deregistration: a tombstone is still readable, and gone for heartbeats.
    let path = format!("/api/v1/executors/{id}");
    let answer = call("DELETE", &path, None, None);
    assert_eq!(answer.status, 401);
    spec.check("DELETE", "/api/v1/executors/{id}", &answer);
    let answer = call("DELETE", &path, Some(&token), None);
    assert_eq!(answer.status, 204);
    spec.check("DELETE", "/api/v1/executors/{id}", &answer);
    let answer = call("GET", &path, None, None);
    assert_eq!(answer.json()["status"], "tombstone");
    spec.check("GET", "/api/v1/executors/{id}", &answer);
    let answer = call("POST", &heartbeat, Some(&token), None);
    assert_eq!(answer.status, 410);
    spec.check("POST", "/api/v1/executors/{id}/heartbeat", &answer);
    let answer = call("DELETE", &path, Some(ADMIN), None);
    assert_eq!(answer.status, 410);
    spec.check("DELETE", "/api/v1/executors/{id}", &answer);

    // Every documented operation was exercised at least once.
    let mut untested = Vec::new();
    for (path, item) in spec.doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let prefix = format!("{} {path} ->", method.to_uppercase());
            let watched = path == "/api/v1/executors/watch";
            if !watched && !spec.checked.iter().any(|c| c.starts_with(&prefix)) {
                untested.push(prefix);
            }
        }
    }
    assert!(untested.is_empty(), "never checked: {untested:?}");
}
